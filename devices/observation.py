"""Vital-sign observations (BP, temperature, SpO2, weight, glucose ...) from any device."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from devices.errors import InvalidRecordingError
from devices.identity import DeviceIdentity, TimeSource, require_aware
from devices.plausibility import FLAG_PREFIX, IMPLAUSIBLE, implausibility


@dataclass(frozen=True, slots=True)
class Quantity:
    """One measured value.

    `code` is our vocabulary ("systolic", "diastolic", "mean-arterial-pressure", "pulse-rate",
    "body-temperature", "spo2", "body-weight", "glucose" ...). `value`/`unit` are normalised
    (UCUM: "mm[Hg]", "Cel", "%", "kg", "mg/dL", "/min"); `sent_value`/`sent_unit` keep what the
    device sent. `value` None means the device reported "no value" (`special` says which:
    "nan", "nres", "+inf", "-inf", "reserved") — never a 0 — or that what it sent is outside
    the plausible range (`special` "implausible", the number kept in `sent_value`; see
    devices/plausibility.py).
    """

    code: str
    value: float | None
    unit: str
    sent_value: float | None = None
    sent_unit: str = ""
    special: str | None = None

    def __post_init__(self) -> None:
        if not self.code or not self.unit:
            raise InvalidRecordingError("a quantity needs a code and a unit")
        if self.value is None and self.special is None:
            raise InvalidRecordingError(f"{self.code}: no value and no reason why")


def screened(q: Quantity) -> Quantity:
    """`q`, or - if its value is outside the plausible range - the same quantity with no value
    (special "implausible") and the device's number kept in `sent_value`/`sent_unit`."""
    if q.value is None or implausibility(q.code, q.value, q.unit) is None:
        return q
    if q.sent_value is None:
        return Quantity(q.code, None, q.unit, q.value, q.unit, IMPLAUSIBLE)
    return Quantity(q.code, None, q.unit, q.sent_value, q.sent_unit or q.unit, IMPLAUSIBLE)


@dataclass(frozen=True, slots=True)
class Observation:
    """A measurement event: one or more quantities taken together (a BP panel, a temperature ...).

    `patient_id` None means unassigned (held for the doctor). `record_key` identifies the
    reading on its device (record time/sequence + values) so re-sent memory is recognised.
    `device_user` is the user a multi-user device says the reading is of (BP cuff / scale
    "User ID"): user 2, 3 ... is someone's on that device, not whoever is checked in, so it goes
    to a patient only through a mapping of that device's user; user 1 (what most cuffs always
    send) is the checked-in patient's unless mapped (lastmile.clinic.device_users).

    Every observation is screened when it is made, whichever device or file it came from: a
    value outside its plausible range (devices/plausibility.py) loses its `value` (kept as
    `sent_value`) and the observation gains the flag "implausible-<code>", so it is shown to
    the doctor and never passed on as a normal value.
    """

    kind: str  # "blood-pressure", "body-temperature", "spo2", "body-weight", "glucose" ...
    quantities: tuple[Quantity, ...]
    measured_at: dt.datetime
    time_source: TimeSource
    received_at: dt.datetime
    device: DeviceIdentity
    record_key: str
    patient_id: str | None = None
    flags: tuple[str, ...] = ()  # device status bits worth showing: "irregular-pulse", "body-movement" ...
    device_user: int | None = None  # the device's user index (0-254); None: not sent, or "unknown user"
    # the address the gateway's device registry knows the device that sent it by (a serial
    # device's settings name, "serial:<name>"), stamped by the service that records it: unlike
    # `device.address` (a port, which another device may have had or take) it names one device;
    # "": not stamped (a reading recorded before it was, or by a service that needs no stamp)
    registry_address: str = ""

    def __post_init__(self) -> None:
        if not self.quantities:
            raise InvalidRecordingError("an observation needs at least one quantity")
        require_aware(self.measured_at, "measured_at")
        require_aware(self.received_at, "received_at")
        if not self.record_key:
            raise InvalidRecordingError("an observation needs a record key")
        quantities = tuple(screened(q) for q in self.quantities)
        if quantities != self.quantities:  # frozen: set once, here, before anyone sees it
            object.__setattr__(self, "quantities", quantities)
        extra = tuple(
            FLAG_PREFIX + q.code
            for q in quantities
            if q.special == IMPLAUSIBLE and FLAG_PREFIX + q.code not in self.flags
        )
        if extra:
            object.__setattr__(self, "flags", self.flags + extra)

    @property
    def implausible(self) -> tuple[Quantity, ...]:
        """The quantities whose device value was outside the plausible range."""
        return tuple(q for q in self.quantities if q.special == IMPLAUSIBLE)

    def quantity(self, code: str) -> Quantity | None:
        return next((q for q in self.quantities if q.code == code), None)
