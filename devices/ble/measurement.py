"""What a decoded health-profile measurement is, before we know whose it is and when it was.

A `Measurement` is what the bytes say. Turning it into a `devices.observation.Observation`
needs what the bytes do not say: the device identity, the receipt time, the resolved
measurement time and its source (see `devices.ble.clock`), and the patient.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

from devices.ble.sfloat import MedFloat
from devices.identity import STORED_TIME_UNKNOWN, DeviceIdentity, TimeSource
from devices.observation import Observation, Quantity

# The user index a multi-user device sends for a reading it cannot give to any of its users
# (Bluetooth SIG: blood pressure and weight "unknown user"): nobody's, as if none was sent.
UNKNOWN_USER = 0xFF


@dataclass(frozen=True, slots=True)
class Measurement:
    characteristic: int  # 16-bit UUID it came from, e.g. 0x2A35
    kind: str  # Observation.kind: "blood-pressure", "body-temperature", "spo2" ...
    quantities: tuple[Quantity, ...]
    device_time: dt.datetime | None = None  # naive, the device's own clock; None: not sent/unknown
    flags: tuple[str, ...] = ()  # status bits worth showing: "irregular-pulse", "cuff-too-loose" ...
    details: dict[str, object] = field(default_factory=dict)  # everything else the bytes said
    sequence: int | None = None  # record sequence number (glucose)
    user_id: int | None = None  # device user index; None: not sent or "unknown user" (0xFF)
    live: bool = False  # taken just now (intermediate/continuous), not a stored record
    stored: bool = False  # from the device's memory (an RACP record, PLX "data-from-storage")
    clock_untrusted: bool = False  # the device itself says its clock is not set / had a fault
    context_follows: bool = False  # glucose: a Measurement Context with this sequence follows


def quantity(
    code: str, reading: MedFloat, unit: str, sent_unit: str, factor: float = 1.0, offset: float = 0.0, digits: int = 6
) -> Quantity:
    """A Quantity normalised to `unit`; specials stay "no value" with their reason."""
    if reading.value is None:
        return Quantity(code, None, unit, None, sent_unit, reading.special)
    value = reading.value if factor == 1.0 and offset == 0.0 else round(reading.value * factor + offset, digits)
    return Quantity(code, value, unit, reading.value, sent_unit)


def bit_flags(value: int, names: dict[int, str]) -> tuple[str, ...]:
    """Names of the set bits, in bit order (unnamed bits are ignored)."""
    return tuple(name for bit, name in sorted(names.items()) if value >> bit & 1)


def record_key(address: str, m: Measurement, received_at: dt.datetime) -> str:
    """Identity of one reading on its device, stable when the device sends its memory again.

    Built from the device, the record's own time stamp and/or sequence number *as the device
    sent them* (not our corrected time) and the values. A reading that carries neither time nor
    sequence cannot be recognised when re-sent: its receipt time makes it unique instead.
    """
    anchors = []
    if m.sequence is not None:
        anchors.append(f"seq{m.sequence}")
    if m.device_time is not None and not m.live:
        anchors.append(m.device_time.strftime("%Y%m%dT%H%M%S"))
    if not anchors:
        anchors.append("rx" + received_at.astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%f"))
    values = ";".join(
        f"{q.code}={q.sent_value if q.value is not None else q.special}{q.sent_unit}" for q in m.quantities
    )
    ident = f"{address.upper()}|{m.characteristic:04x}|{'|'.join(anchors)}|{values}|u{m.user_id}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:24]
    return f"ble:{address.upper()}:{m.kind}:{'-'.join(anchors)}:{digest}"


def to_observation(
    m: Measurement,
    *,
    device: DeviceIdentity,
    measured_at: dt.datetime,
    time_source: TimeSource,
    received_at: dt.datetime,
    key: str,
    patient_id: str | None = None,
    extra_flags: tuple[str, ...] = (),
) -> Observation:
    """`m` as an Observation. A stored record whose time fell back to our receipt time is flagged
    STORED_TIME_UNKNOWN: the receipt time says nothing about when (or on whom) it was taken."""
    if m.stored and time_source is TimeSource.GATEWAY_RECEIPT and STORED_TIME_UNKNOWN not in extra_flags:
        extra_flags += (STORED_TIME_UNKNOWN,)
    return Observation(
        kind=m.kind,
        quantities=m.quantities,
        measured_at=measured_at,
        time_source=time_source,
        received_at=received_at,
        device=device,
        record_key=key,
        patient_id=patient_id,
        flags=m.flags + extra_flags,
        device_user=m.user_id,
    )
