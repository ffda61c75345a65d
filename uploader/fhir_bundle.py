"""FHIR R4 transaction Bundles for home visits and vital-sign observations (pure: dicts in, dicts out).

Every resource carries a stable identifier minted at capture (the visit's UUID, the observation's
device record key ...) and is written with a conditional create (`ifNoneExist` on that
identifier), so sending the same bundle twice - after a timeout, a crash between send and
mark-sent, a kill -9 - never creates a second copy on the platform. `fullUrl`s are UUIDv5 of the
identifier, so the same visit always produces byte-identical bundles.

Codes: LOINC for what was measured, UCUM for units (the vital-signs profile's choices: BP panel
85354-9 with systolic 8480-6 / diastolic 8462-4, heart rate 8867-4, body temperature 8310-5,
SpO2 59408-5 + 2708-6, body weight 29463-7, blood glucose 2339-0 (mg/dL) or 15074-8 (mmol/L)).
Where each time came from (GPS, gateway clock ...) is kept as a `meta.tag`.

The output validates against R4 (checked in the tests with fhir.resources' R4B models, whose
Encounter/Observation/Location/Device/Provenance/Bundle have the R4 shape; see tests/fhir_server.py).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from devices.identity import DeviceIdentity, TimeSource
from devices.observation import Observation, Quantity
from uploader.errors import InvalidObjectError

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
PROVENANCE_AGENT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
LOCATION_TYPE = "http://terminology.hl7.org/CodeSystem/location-physical-type"
SIGNATURE_TYPE = "urn:iso-astm:E1762-95:2013"
_NAMESPACE = uuid.UUID("6f2d7f4e-9d1c-5b0e-8a43-3f6c1c0a7e21")

CHAIN_SIGNATURE_FORMAT = "application/vnd.lastmile.visit-chain+json"


@dataclass(frozen=True)
class FhirNaming:
    """Identifier systems; the county assigns the patient and practitioner ones."""

    gateway_id: str
    patient_system: str = "urn:lastmile:patient-id"
    practitioner_system: str = "urn:lastmile:practitioner-id"
    household_system: str = "urn:lastmile:household-id"
    base: str = "urn:lastmile"  # our own systems: {base}:visit, {base}:observation ...

    def system(self, kind: str) -> str:
        return f"{self.base}:{kind}"


@dataclass(frozen=True)
class VisitPosition:
    latitude: float
    longitude: float
    altitude_m: float | None = None
    eph_m: float | None = None  # 95 % horizontal error
    fix_time: dt.datetime | None = None
    mode: int = 2


@dataclass(frozen=True)
class VisitSignature:
    """The visit's place in the gateway's hash chain, and the Ed25519 signature over it."""

    chain_seq: int
    record_hash: str  # hex SHA-256 of the canonical record
    prev_hash: str
    signature: str  # base64
    public_key: str  # base64, raw 32 bytes
    signed_at: dt.datetime


@dataclass(frozen=True)
class VisitNote:
    """A note the family doctor wrote during the visit; `at` None when its time is unknown."""

    text: str
    at: dt.datetime | None = None


@dataclass(frozen=True)
class VisitSummary:
    visit_id: str
    doctor_id: str
    patient_id: str
    started_at: dt.datetime | None  # None: lost (stamped before a reboot, never repaired)
    ended_at: dt.datetime | None
    time_source: TimeSource
    setting: str = "home"  # "home" or "clinic"
    household_id: str | None = None
    position: VisitPosition | None = None
    flags: tuple[str, ...] = ()
    notes: tuple[VisitNote, ...] = field(default=())
    finished: bool | None = None  # None: finished when ended_at is known (True: also with its end lost)


# --- observations: our vocabulary → LOINC/UCUM --------------------------------------------------

_UNITS = {
    "mm[Hg]": "mmHg",
    "/min": "beats/minute",
    "Cel": "°C",
    "%": "%",
    "kg": "kg",
    "mg/dL": "mg/dL",
    "mmol/L": "mmol/L",
    "[degF]": "°F",
    "g": "g",
}
_QUANTITY_CODES: dict[str, tuple[str, str]] = {
    "systolic": ("8480-6", "Systolic blood pressure"),
    "diastolic": ("8462-4", "Diastolic blood pressure"),
    "mean-arterial-pressure": ("8478-0", "Mean blood pressure"),
    "pulse-rate": ("8867-4", "Heart rate"),
    "heart-rate": ("8867-4", "Heart rate"),
    "body-temperature": ("8310-5", "Body temperature"),
    "body-weight": ("29463-7", "Body weight"),
}
_SPECIAL = {
    "nan": "not-a-number",
    "nres": "error",
    "+inf": "positive-infinity",
    "-inf": "negative-infinity",
    "reserved": "unknown",
    "implausible": "error",  # outside devices/plausibility.py's range: the number goes in a note
}


def _coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"system": system, "code": code, "display": display}


def _loinc(code: str, display: str, *more: tuple[str, str]) -> dict[str, Any]:
    return {"coding": [_coding(LOINC, code, display)] + [_coding(LOINC, c, d) for c, d in more], "text": display}


def _quantity_code(q: Quantity) -> dict[str, Any]:
    if q.code == "spo2":
        return _loinc(
            "59408-5",
            "Oxygen saturation in Arterial blood by Pulse oximetry",
            ("2708-6", "Oxygen saturation in Arterial blood"),
        )
    if q.code == "glucose":
        if q.unit == "mmol/L":
            return _loinc("15074-8", "Glucose [Moles/volume] in Blood")
        return _loinc("2339-0", "Glucose [Mass/volume] in Blood")
    known = _QUANTITY_CODES.get(q.code)
    if known:
        return _loinc(*known)
    return {"text": q.code}  # no LOINC mapping we trust: keep our name rather than guess


def _value(q: Quantity) -> dict[str, Any]:
    if q.value is None:
        reason = _SPECIAL.get(q.special or "", "unknown")
        return {"dataAbsentReason": {"coding": [_coding(DATA_ABSENT, reason, reason)]}}
    return {"valueQuantity": {"value": q.value, "unit": _UNITS.get(q.unit, q.unit), "system": UCUM, "code": q.unit}}


def _implausible_note(q: Quantity) -> str:
    """What the device sent for a value it could not have measured (not sent as a value)."""
    sent = "nothing" if q.sent_value is None else f"{q.sent_value:g} {q.sent_unit}"
    return f"{q.code}: the device sent {sent}, outside the plausible range; not a measured value"


def _instant(value: dt.datetime) -> str:
    if value.tzinfo is None:
        raise InvalidObjectError(f"time {value} has no time zone")
    try:
        utc = value.astimezone(dt.timezone.utc)
    except OverflowError:  # year 1 east of UTC, year 9999 west of it: a damaged record, not a crash
        raise InvalidObjectError(f"time {value.isoformat()} cannot be said in UTC") from None
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ref_id(system: str, value: str) -> dict[str, Any]:
    return {"identifier": {"system": system, "value": value}}


def _full_url(system: str, value: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, f'{system}|{value}')}"


def _entry(resource: dict[str, Any], system: str, value: str, *, search: str | None = None) -> dict[str, Any]:
    condition = search or urlencode({"identifier": f"{system}|{value}"})
    return {
        "fullUrl": _full_url(system, value),
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], "ifNoneExist": condition},
    }


def _tag(naming: FhirNaming, kind: str, code: str) -> dict[str, Any]:
    return {"system": naming.system(kind), "code": code}


def device_key(device: DeviceIdentity) -> str | None:
    """A device's stable identifier: serial if it has one, else its address."""
    parts = [p for p in (device.manufacturer, device.model, device.serial or device.address) if p]
    return "/".join(parts) if (device.serial or device.address) else None


def _device_entry(device: DeviceIdentity, naming: FhirNaming) -> dict[str, Any] | None:
    key = device_key(device)
    if key is None:
        return None
    system = naming.system("device")
    resource: dict[str, Any] = {
        "resourceType": "Device",
        "identifier": [{"system": system, "value": key}],
        "deviceName": [{"name": device.label(), "type": "user-friendly-name"}],
    }
    if device.manufacturer:
        resource["manufacturer"] = device.manufacturer
    if device.model:
        resource["modelNumber"] = device.model
    if device.serial:
        resource["serialNumber"] = device.serial
    if device.software_version:
        resource["version"] = [{"value": device.software_version}]
    return _entry(resource, system, key)


def _gateway_entry(naming: FhirNaming) -> dict[str, Any]:
    system = naming.system("gateway")
    resource = {
        "resourceType": "Device",
        "identifier": [{"system": system, "value": naming.gateway_id}],
        "deviceName": [{"name": f"Lastmile gateway {naming.gateway_id}", "type": "user-friendly-name"}],
    }
    return _entry(resource, system, naming.gateway_id)


def observation_identifier(obs: Observation, naming: FhirNaming, suffix: str = "") -> str:
    """Stable per reading: gateway + device + the device's record key (+ a part name)."""
    device = device_key(obs.device) or obs.device.label()
    return f"{naming.gateway_id}/{device}/{obs.record_key}{suffix}"


def observation_entries(
    obs: Observation, naming: FhirNaming, *, encounter_url: str | None = None, patient_id: str | None = None
) -> list[dict[str, Any]]:
    """Device + Observation(s) for one reading. A BP or SpO2 reading's pulse becomes its own
    heart-rate Observation (that is where the vital-signs profile wants it)."""
    subject = patient_id if patient_id is not None else obs.patient_id
    if subject is None:
        raise InvalidObjectError("an unassigned observation is held for the doctor, not sent")
    entries: list[dict[str, Any]] = []
    device = _device_entry(obs.device, naming)
    if device is not None:
        entries.append(device)
    groups: list[tuple[str, dict[str, Any], list[Quantity], str]] = []  # (suffix, code, quantities, category)
    pulse = obs.quantity("pulse-rate") or obs.quantity("heart-rate")
    if obs.kind == "blood-pressure":
        rest = [q for q in obs.quantities if q is not pulse]
        groups.append(("", _loinc("85354-9", "Blood pressure panel with all children optional"), rest, "vital-signs"))
        if pulse is not None:
            groups.append(("#heart-rate", _quantity_code(pulse), [pulse], "vital-signs"))
    else:
        for i, q in enumerate(obs.quantities):
            suffix = "" if i == 0 else f"#{q.code}"
            category = "laboratory" if q.code == "glucose" else "vital-signs"
            groups.append((suffix, _quantity_code(q), [q], category))
    system = naming.system("observation")
    for suffix, code, quantities, category in groups:
        ident = observation_identifier(obs, naming, suffix)
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "meta": {"tag": [_tag(naming, "time-source", obs.time_source.value)]},
            "identifier": [{"system": system, "value": ident}],
            "status": "final",
            "category": [{"coding": [_coding(OBS_CATEGORY, category, category.replace("-", " ").title())]}],
            "code": code,
            "subject": _ref_id(naming.patient_system, subject),
            "effectiveDateTime": _instant(obs.measured_at),
            "issued": _instant(obs.received_at),
        }
        if encounter_url:
            resource["encounter"] = {"reference": encounter_url}
        if device is not None:
            resource["device"] = {"reference": device["fullUrl"]}
        if obs.kind == "blood-pressure" and suffix == "":  # the panel: one component per value
            resource["component"] = [{"code": _quantity_code(q), **_value(q)} for q in quantities]
        else:
            resource.update(_value(quantities[0]))
        notes = [{"text": "device flags: " + ", ".join(obs.flags)}] if obs.flags else []
        notes += [{"text": _implausible_note(q)} for q in quantities if q.special == "implausible"]
        if notes:
            resource["note"] = notes
        entries.append(_entry(resource, system, ident))
    return entries


# --- visits ---------------------------------------------------------------------------------------


def _location_entry(visit: VisitSummary, naming: FhirNaming) -> dict[str, Any] | None:
    p = visit.position
    if p is None:
        return None
    position: dict[str, Any] = {"longitude": round(p.longitude, 7), "latitude": round(p.latitude, 7)}
    if p.altitude_m is not None:
        position["altitude"] = round(p.altitude_m, 1)
    accuracy = f"±{p.eph_m:.0f} m (95 %)" if p.eph_m is not None else "accuracy unknown"
    when = f" at {_instant(p.fix_time)}" if p.fix_time else ""
    house = f" near household {visit.household_id}" if visit.household_id else ""
    system = naming.system("visit-location")
    resource = {
        "resourceType": "Location",
        "identifier": [{"system": system, "value": visit.visit_id}],
        "status": "active",
        "mode": "instance",
        "name": f"{'Home' if visit.setting == 'home' else 'Clinic'} visit {visit.visit_id}",
        "description": f"GNSS fix ({p.mode}D) {accuracy}{when}{house}",
        "physicalType": {
            "coding": [
                _coding(LOCATION_TYPE, "ho", "House")
                if visit.setting == "home"
                else _coding(LOCATION_TYPE, "bu", "Building")
            ]
        },
        "position": position,
    }
    return _entry(resource, system, visit.visit_id)


def _encounter_entry(visit: VisitSummary, naming: FhirNaming, location_url: str | None) -> dict[str, Any]:
    system = naming.system("visit")
    klass = (
        _coding(ACT_CODE, "HH", "home health") if visit.setting == "home" else _coding(ACT_CODE, "AMB", "ambulatory")
    )
    period = {}
    if visit.started_at is not None:  # period.start is optional: absent rather than guessed
        period["start"] = _instant(visit.started_at)
    if visit.ended_at is not None:
        period["end"] = _instant(visit.ended_at)
    finished = visit.finished if visit.finished is not None else visit.ended_at is not None
    tags = [_tag(naming, "time-source", visit.time_source.value)]
    tags += [_tag(naming, "visit-check", flag) for flag in visit.flags]
    resource: dict[str, Any] = {
        "resourceType": "Encounter",
        "meta": {"tag": tags},
        "identifier": [{"system": system, "value": visit.visit_id}],
        "status": "finished" if finished else "in-progress",
        "class": klass,
        "subject": _ref_id(naming.patient_system, visit.patient_id),
        "participant": [
            {
                "type": [{"coding": [_coding(PARTICIPATION, "PPRF", "primary performer")]}],
                "individual": _ref_id(naming.practitioner_system, visit.doctor_id),
            }
        ],
        "period": period,
    }
    if not period:  # both times lost to reboots: an empty element is not valid FHIR
        del resource["period"]
    if location_url:
        resource["location"] = [
            {"location": {"reference": location_url}, "status": "completed" if finished else "active"}
        ]
    if visit.household_id:
        resource["serviceType"] = {"text": f"household {visit.household_id}"}
    return _entry(resource, system, visit.visit_id)


def _note_entries(visit: VisitSummary, naming: FhirNaming, encounter_url: str) -> list[dict[str, Any]]:
    """Each visit note as an Observation (LOINC 34109-9 "Note") linked to the Encounter: R4's
    Encounter has no note element, and the county platform files notes with the visit this way."""
    system = naming.system("visit-note")
    entries = []
    for number, note in enumerate(visit.notes, start=1):
        ident = f"{visit.visit_id}/note/{number}"
        at = note.at or visit.started_at
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "identifier": [{"system": system, "value": ident}],
            "status": "final",
            "category": [{"coding": [_coding(OBS_CATEGORY, "exam", "Exam")]}],
            "code": _loinc("34109-9", "Note"),
            "subject": _ref_id(naming.patient_system, visit.patient_id),
            "encounter": {"reference": encounter_url},
            "effectiveDateTime": _instant(at) if at is not None else None,
            "performer": [_ref_id(naming.practitioner_system, visit.doctor_id)],
            "valueString": note.text,
        }
        if at is None:  # effective[x] is optional: a note of unknown time has none
            del resource["effectiveDateTime"]
        entries.append(_entry(resource, system, ident))
    return entries


def _provenance_entry(
    visit: VisitSummary, naming: FhirNaming, signature: VisitSignature, targets: Sequence[str], gateway_url: str
) -> dict[str, Any]:
    payload = {
        "alg": "Ed25519",
        "seq": signature.chain_seq,
        "hash": signature.record_hash,
        "prev": signature.prev_hash,
        "sig": signature.signature,
        "key": signature.public_key,
        "gateway": naming.gateway_id,
    }
    data = base64.b64encode(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).decode()
    tag_system = naming.system("provenance")
    resource = {
        "resourceType": "Provenance",
        "meta": {"tag": [{"system": tag_system, "code": visit.visit_id}]},
        "target": [{"reference": url} for url in targets],
        "recorded": _instant(signature.signed_at),
        "agent": [
            {
                "type": {"coding": [_coding(PROVENANCE_AGENT, "author", "Author")]},
                "who": _ref_id(naming.practitioner_system, visit.doctor_id),
            },
            {
                "type": {"coding": [_coding(PROVENANCE_AGENT, "assembler", "Assembler")]},
                "who": {"reference": gateway_url},
            },
        ],
        "signature": [
            {
                "type": [_coding(SIGNATURE_TYPE, "1.2.840.10065.1.12.1.5", "Verification Signature")],
                "when": _instant(signature.signed_at),
                "who": {"reference": gateway_url},
                "sigFormat": CHAIN_SIGNATURE_FORMAT,
                "data": data,
            }
        ],
    }
    return _entry(resource, tag_system, visit.visit_id, search=urlencode({"_tag": f"{tag_system}|{visit.visit_id}"}))


def _transaction(entries: Iterable[dict[str, Any]], bundle_id: str, naming: FhirNaming) -> dict[str, Any]:
    unique: dict[str, dict[str, Any]] = {}
    for e in entries:
        unique.setdefault(e["fullUrl"], e)  # the same device twice is one entry
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "identifier": {"system": naming.system("bundle"), "value": bundle_id},
        "entry": list(unique.values()),
    }


def observation_key(obs: Observation, naming: FhirNaming) -> str:
    """The outbox key of a reading's own bundle: derived from the reading, so queued twice it is
    one. Here with the builders (as `visit_bundle_key`): the console looks a reading's bundle up."""
    return f"fhir:obs:{observation_identifier(obs, naming)}"


def visit_bundle_key(visit_id: str) -> str:
    """The outbox key of a home visit's bundle (it carries the readings taken during the visit).
    Here with the builders, not in fhir_forwarder: the console reads it and must not import the
    sender (requests, urllib3: ~4 MB of its RSS)."""
    return f"{_VISIT_BUNDLE}{visit_id}"


def visit_of_bundle_key(key: str) -> str | None:
    """The home visit whose bundle has outbox key `key` (`visit_bundle_key`); None: not a visit's."""
    return key[len(_VISIT_BUNDLE) :] if key.startswith(_VISIT_BUNDLE) else None


_VISIT_BUNDLE = "fhir:visit:"


def visit_bundle(
    visit: VisitSummary,
    observations: Sequence[Observation],
    naming: FhirNaming,
    signature: VisitSignature | None = None,
) -> dict[str, Any]:
    """Encounter + Location + Devices + Observations (+ Provenance with the chain signature)."""
    if not visit.patient_id or not visit.doctor_id:
        raise InvalidObjectError("a visit needs a patient and a doctor")
    gateway = _gateway_entry(naming)
    location = _location_entry(visit, naming)
    encounter = _encounter_entry(visit, naming, location["fullUrl"] if location else None)
    obs_entries: list[dict[str, Any]] = []
    for obs in observations:
        obs_entries += observation_entries(obs, naming, encounter_url=encounter["fullUrl"], patient_id=visit.patient_id)
    obs_entries += _note_entries(visit, naming, encounter["fullUrl"])
    entries = [gateway] + ([location] if location else []) + [encounter] + obs_entries
    if signature is not None:
        targets = [encounter["fullUrl"]] + [
            e["fullUrl"] for e in obs_entries if e["resource"]["resourceType"] == "Observation"
        ]
        entries.append(_provenance_entry(visit, naming, signature, targets, gateway["fullUrl"]))
    return _transaction(entries, f"visit/{visit.visit_id}", naming)


def observation_bundle(obs: Observation, naming: FhirNaming) -> dict[str, Any]:
    """A reading taken outside any visit (patient known): Device + Observation(s)."""
    entries = observation_entries(obs, naming)
    return _transaction(entries, f"observation/{observation_identifier(obs, naming)}", naming)


def merge_transactions(bundles: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several transactions as one (fewer round trips); shared Devices appear once."""
    if not bundles:
        raise InvalidObjectError("nothing to merge")
    entries = [e for b in bundles for e in b.get("entry", [])]
    unique: dict[str, dict[str, Any]] = {}
    for e in entries:
        unique.setdefault(e["fullUrl"], e)
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(unique.values())}


def bundle_bytes(bundle: dict[str, Any]) -> bytes:
    """Canonical compact JSON (what the outbox stores and the sender posts)."""
    return json.dumps(bundle, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")


def bundle_identifiers(bundle: dict[str, Any]) -> list[tuple[str, str]]:
    """(resourceType, identifier value) of every entry, for logs and tests."""
    out = []
    for e in bundle.get("entry", []):
        res = e["resource"]
        ids = res.get("identifier")
        if isinstance(ids, list) and ids:
            out.append((res["resourceType"], ids[0]["value"]))
        elif res["resourceType"] == "Provenance":
            out.append(("Provenance", res["meta"]["tag"][0]["code"]))
    return out
