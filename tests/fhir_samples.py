"""Sample visits and readings for the FHIR tests and the sync benchmark."""

from __future__ import annotations

import datetime as dt

from devices.identity import DeviceIdentity, TimeSource
from devices.observation import Observation, Quantity
from uploader.fhir_bundle import FhirNaming, VisitPosition, VisitSignature, VisitSummary, visit_bundle
from uploader.fhir_forwarder import enqueue_bundle
from uploader.outbox import Outbox

T0 = dt.datetime(2026, 3, 2, 8, 0, tzinfo=dt.timezone.utc)
NAMING = FhirNaming(gateway_id="gw-test-01")
CUFF = DeviceIdentity("Omron", "HEM-7600T", "SN1234", "AA:BB:CC:DD:EE:FF")
THERMO = DeviceIdentity("Braun", "IRT6520", "", "11:22:33:44:55:66")
OXI = DeviceIdentity("Nonin", "3230", "OX77", "")
SCALE = DeviceIdentity("Seca", "803", "SC1", "")
GLUCO = DeviceIdentity("Roche", "Accu-Chek Guide", "GL5", "")


def reading(
    kind: str, at: dt.datetime, patient: str | None, key: str, *quantities: Quantity, device: DeviceIdentity = CUFF
) -> Observation:
    return Observation(
        kind=kind,
        quantities=tuple(quantities),
        measured_at=at,
        time_source=TimeSource.DEVICE_CLOCK,
        received_at=at + dt.timedelta(seconds=5),
        device=device,
        record_key=key,
        patient_id=patient,
    )


def blood_pressure(at: dt.datetime, patient: str | None, key: str) -> Observation:
    return reading(
        "blood-pressure",
        at,
        patient,
        key,
        Quantity("systolic", 128.0, "mm[Hg]"),
        Quantity("diastolic", 82.0, "mm[Hg]"),
        Quantity("mean-arterial-pressure", 97.0, "mm[Hg]"),
        Quantity("pulse-rate", 71.0, "/min"),
    )


def all_kinds(at: dt.datetime, patient: str, tag: str = "") -> list[Observation]:
    return [
        blood_pressure(at, patient, f"bp-1{tag}"),
        reading("body-temperature", at, patient, f"t-1{tag}", Quantity("body-temperature", 37.2, "Cel"), device=THERMO),
        reading(
            "spo2",
            at,
            patient,
            f"o-1{tag}",
            Quantity("spo2", 97.0, "%"),
            Quantity("pulse-rate", 70.0, "/min"),
            device=OXI,
        ),
        reading("body-weight", at, patient, f"w-1{tag}", Quantity("body-weight", 71.3, "kg"), device=SCALE),
        reading("glucose", at, patient, f"g-1{tag}", Quantity("glucose", 104.0, "mg/dL"), device=GLUCO),
        reading("glucose", at, patient, f"g-2{tag}", Quantity("glucose", None, "mmol/L", special="nres"), device=GLUCO),
    ]


def visit(n: int, *, patient: str = "P-0001", flags: tuple[str, ...] = ()) -> VisitSummary:
    start = T0 + dt.timedelta(minutes=40 * n)
    return VisitSummary(
        visit_id=f"00000000-0000-4000-8000-{n:012d}",
        doctor_id="DR-17",
        patient_id=patient,
        started_at=start,
        ended_at=start + dt.timedelta(minutes=25),
        time_source=TimeSource.GPS,
        household_id=f"HH-{n:03d}",
        flags=flags,
        position=VisitPosition(31.2479 + n * 1e-3, 121.5874, 150.0, 12.0, start, 3),
    )


def signature(n: int) -> VisitSignature:
    return VisitSignature(
        chain_seq=n,
        record_hash="ab" * 32,
        prev_hash="cd" * 32,
        signature="c2lnbmF0dXJl",
        public_key="a2V5",
        signed_at=T0 + dt.timedelta(hours=n),
    )


def queue_visits(outbox: Outbox, visits: range, patient_of=lambda n: f"P-{n % 3}", at: float = 1000.0) -> list[str]:
    """Sample visits `visits` queued in `outbox` as the visit book queues them (visit n at `at` + n
    seconds); their visit ids."""
    keys = []
    for n in visits:
        v = visit(n, patient=patient_of(n))
        enqueue_bundle(
            outbox,
            visit_bundle(v, all_kinds(v.started_at, v.patient_id, f"/{n}"), NAMING, signature(n)),
            f"fhir:visit:{v.visit_id}",
            patient_id=v.patient_id,
            now=at + n,
        )
        keys.append(v.visit_id)
    return keys
