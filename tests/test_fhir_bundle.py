"""The pure FHIR builder: valid R4 resources, right codes, stable identifiers."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from urllib.parse import urlencode

import pytest

from devices.identity import DeviceIdentity
from devices.observation import Quantity
from tests.fhir_samples import NAMING, T0, THERMO, all_kinds, blood_pressure, reading, signature, visit
from tests.fhir_server import FhirTestServer, validate_transaction
from uploader.errors import InvalidObjectError
from uploader.fhir_bundle import (
    OBS_CATEGORY,
    UCUM,
    VisitNote,
    VisitPosition,
    bundle_bytes,
    bundle_identifiers,
    merge_transactions,
    observation_bundle,
    visit_bundle,
)


def _by_type(bundle: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def _loinc(resource: dict) -> list[str]:
    return [c["code"] for c in resource["code"].get("coding", [])]


def test_visit_bundle_is_a_valid_r4_transaction() -> None:
    bundle = visit_bundle(visit(1), all_kinds(T0, "P-0001"), NAMING, signature(1))
    validate_transaction(bundle)  # every resource through fhir.resources
    (enc,) = _by_type(bundle, "Encounter")
    assert enc["class"]["code"] == "HH" and enc["status"] == "finished"
    assert enc["subject"] == {"identifier": {"system": NAMING.patient_system, "value": "P-0001"}}
    assert enc["participant"][0]["individual"]["identifier"]["value"] == "DR-17"
    (loc,) = _by_type(bundle, "Location")
    assert enc["location"][0]["location"]["reference"] == next(
        e["fullUrl"] for e in bundle["entry"] if e["resource"] is loc
    )
    assert loc["position"]["latitude"] == pytest.approx(31.2489)
    (prov,) = _by_type(bundle, "Provenance")
    assert prov["signature"][0]["data"] and len(prov["target"]) == 1 + 8
    # each entry is a conditional create on its stable identifier
    assert all(e["request"]["ifNoneExist"] for e in bundle["entry"])


def test_observation_codes_and_units() -> None:
    bundle = visit_bundle(visit(1), all_kinds(T0, "P-0001"), NAMING)
    obs = _by_type(bundle, "Observation")
    codes = [_loinc(o) for o in obs]
    assert ["85354-9"] in codes and codes.count(["8867-4"]) == 2  # BP's and oximeter's pulse
    assert ["8310-5"] in codes and ["59408-5", "2708-6"] in codes and ["29463-7"] in codes
    assert ["2339-0"] in codes and ["15074-8"] in codes
    panel = next(o for o in obs if _loinc(o) == ["85354-9"])
    comps = {c["code"]["coding"][0]["code"]: c["valueQuantity"] for c in panel["component"]}
    assert comps["8480-6"] == {"value": 128.0, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}
    assert comps["8462-4"]["value"] == 82.0
    temp = next(o for o in obs if _loinc(o) == ["8310-5"])
    assert temp["valueQuantity"]["code"] == "Cel" and temp["meta"]["tag"][0]["code"] == "device-clock"
    absent = next(o for o in obs if _loinc(o) == ["15074-8"])
    assert absent["dataAbsentReason"]["coding"][0]["code"] == "error" and "valueQuantity" not in absent
    devices = _by_type(bundle, "Device")
    assert {d["identifier"][0]["value"] for d in devices} >= {"Omron/HEM-7600T/SN1234", "gw-test-01"}


def test_same_visit_gives_identical_bytes() -> None:
    a = bundle_bytes(visit_bundle(visit(3), all_kinds(T0, "P-0001"), NAMING, signature(3)))
    b = bundle_bytes(visit_bundle(visit(3), all_kinds(T0, "P-0001"), NAMING, signature(3)))
    assert a == b


def test_flags_and_clinic_visits() -> None:
    v = dataclasses.replace(visit(2, flags=("outside-radius", "stale-fix")), setting="clinic", position=None)
    bundle = visit_bundle(v, [], NAMING)
    validate_transaction(bundle)
    (enc,) = _by_type(bundle, "Encounter")
    assert enc["class"]["code"] == "AMB" and "location" not in enc
    assert {t["code"] for t in enc["meta"]["tag"]} >= {"outside-radius", "stale-fix"}


def test_standalone_observation_and_unassigned_refusal() -> None:
    bundle = observation_bundle(blood_pressure(T0, "P-0009", "bp-77"), NAMING)
    validate_transaction(bundle)
    assert [k for k, _ in bundle_identifiers(bundle)] == ["Device", "Observation", "Observation"]
    with pytest.raises(InvalidObjectError):
        observation_bundle(blood_pressure(T0, None, "bp-78"), NAMING)


def test_conditional_create_never_duplicates_on_the_server() -> None:
    import requests

    bundles = [visit_bundle(visit(n), all_kinds(T0, "P-0001"), NAMING, signature(n)) for n in range(3)]
    with FhirTestServer() as server:
        for body in (bundles[0], merge_transactions(bundles), bundles[2]):
            r = requests.post(
                server.base_url, data=bundle_bytes(body), timeout=10, headers={"Content-Type": "application/fhir+json"}
            )
            assert r.status_code == 200, r.text
        assert sorted(server.identifiers("Encounter")) == sorted(v.visit_id for v in map(visit, range(3)))
        assert len(server.resources("Provenance")) == 3
        assert len(server.resources("Device")) == 6  # gateway + five devices, once each
        enc = server.resources("Encounter")[0]
        assert enc["location"][0]["location"]["reference"].startswith("Location/")


# --- every field the county platform files on (each assertion names what goes wrong without it) ---

UTC_T0 = "2026-03-02T08:00:00.000Z"


def _entry_of(bundle: dict, resource: dict) -> dict:
    return next(e for e in bundle["entry"] if e["resource"] is resource)


def test_encounter_location_and_provenance_in_full() -> None:
    v = visit(1)
    bundle = visit_bundle(v, all_kinds(T0, "P-0001"), NAMING, signature(1))
    (gateway,) = [d for d in _by_type(bundle, "Device") if d["identifier"][0]["system"] == "urn:lastmile:gateway"]
    (loc,) = _by_type(bundle, "Location")
    (enc,) = _by_type(bundle, "Encounter")
    (prov,) = _by_type(bundle, "Provenance")
    enc_url, loc_url, gw_url = (_entry_of(bundle, r)["fullUrl"] for r in (enc, loc, gateway))
    # the visit's times, in UTC with milliseconds: a wrong end is a visit the platform never closes
    assert enc["period"] == {"start": "2026-03-02T08:40:00.000Z", "end": "2026-03-02T09:05:00.000Z"}
    assert enc["meta"]["tag"] == [{"system": "urn:lastmile:time-source", "code": "gps"}]
    assert enc["identifier"] == [{"system": "urn:lastmile:visit", "value": v.visit_id}]
    assert enc["participant"][0]["type"][0]["coding"][0]["code"] == "PPRF"
    assert enc["location"] == [{"location": {"reference": loc_url}, "status": "completed"}]
    assert enc["serviceType"] == {"text": "household HH-001"}
    # where the family doctor stood: a rounded or swapped coordinate sends the county to the wrong house
    assert loc["position"] == {"longitude": 121.5874, "latitude": 31.2489, "altitude": 150.0}
    assert loc["description"] == "GNSS fix (3D) ±12 m (95 %) at 2026-03-02T08:40:00.000Z near household HH-001"
    assert loc["physicalType"]["coding"][0]["code"] == "ho" and loc["name"] == f"Home visit {v.visit_id}"
    assert loc["identifier"] == [{"system": "urn:lastmile:visit-location", "value": v.visit_id}]
    # the signature covers the Encounter and every measurement: a missing target is an unsigned value
    obs_urls = [_entry_of(bundle, o)["fullUrl"] for o in _by_type(bundle, "Observation")]
    assert prov["target"] == [{"reference": u} for u in [enc_url, *obs_urls]]
    assert prov["recorded"] == "2026-03-02T09:00:00.000Z" and prov["signature"][0]["when"] == prov["recorded"]
    assert prov["agent"][1]["who"] == {"reference": gw_url} and prov["signature"][0]["who"] == {"reference": gw_url}
    assert [a["type"]["coding"][0]["code"] for a in prov["agent"]] == ["author", "assembler"]
    payload = json.loads(base64.b64decode(prov["signature"][0]["data"]))
    assert payload == {
        "alg": "Ed25519",
        "seq": 1,
        "hash": "ab" * 32,
        "prev": "cd" * 32,
        "sig": "c2lnbmF0dXJl",
        "key": "a2V5",
        "gateway": "gw-test-01",
    }
    # Provenance has no identifier: conditional create on its tag, so a re-send adds no second one
    prov_entry = _entry_of(bundle, prov)
    assert prov_entry["request"]["ifNoneExist"] == urlencode({"_tag": f"urn:lastmile:provenance|{v.visit_id}"})
    assert bundle["identifier"] == {"system": "urn:lastmile:bundle", "value": f"visit/{v.visit_id}"}
    assert bundle_identifiers(bundle)[-1] == ("Provenance", v.visit_id)


def test_every_entry_is_a_conditional_create_on_its_own_identifier() -> None:
    bundle = visit_bundle(visit(4), all_kinds(T0, "P-0001"), NAMING, signature(4))
    for e in bundle["entry"]:
        res, request = e["resource"], e["request"]
        assert request["method"] == "POST" and request["url"] == res["resourceType"]
        if res["resourceType"] != "Provenance":
            ident = res["identifier"][0]
            # a condition on another resource's identifier would swallow this one on the server
            assert request["ifNoneExist"] == urlencode({"identifier": f"{ident['system']}|{ident['value']}"})
    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(urls)) == len(urls) and all(u.startswith("urn:uuid:") for u in urls)


def test_in_progress_visit_without_position_household_or_notes_times() -> None:
    v = dataclasses.replace(visit(5), ended_at=None, household_id=None)
    bundle = visit_bundle(v, [], NAMING)
    validate_transaction(bundle)
    (enc,) = _by_type(bundle, "Encounter")
    # an open visit must not be filed as finished (the doctor may still add readings)
    assert enc["status"] == "in-progress" and "end" not in enc["period"]
    assert enc["location"][0]["status"] == "active" and "serviceType" not in enc
    (loc,) = _by_type(bundle, "Location")
    assert "near household" not in loc["description"]
    unknown = dataclasses.replace(
        v, position=dataclasses.replace(v.position, altitude_m=None, eph_m=None, fix_time=None)
    )
    (loc,) = _by_type(visit_bundle(unknown, [], NAMING), "Location")
    assert loc["description"] == "GNSS fix (3D) accuracy unknown" and "altitude" not in loc["position"]
    clinic = dataclasses.replace(v, setting="clinic")
    (loc,) = _by_type(visit_bundle(clinic, [], NAMING), "Location")
    assert loc["physicalType"]["coding"][0]["code"] == "bu" and loc["name"].startswith("Clinic visit")


def test_visit_notes_are_observations_on_the_encounter() -> None:
    later = T0 + dt.timedelta(hours=2)
    v = dataclasses.replace(visit(0), notes=(VisitNote("头晕三天"), VisitNote("BP re-checked", at=later)))
    bundle = visit_bundle(v, [], NAMING)
    validate_transaction(bundle)
    (enc,) = _by_type(bundle, "Encounter")
    notes = [o for o in _by_type(bundle, "Observation") if _loinc(o) == ["34109-9"]]
    assert [n["valueString"] for n in notes] == ["头晕三天", "BP re-checked"]
    assert [n["identifier"][0]["value"] for n in notes] == [f"{v.visit_id}/note/1", f"{v.visit_id}/note/2"]
    # a note with no time of its own is filed at the visit's start, not at "now"
    assert [n["effectiveDateTime"] for n in notes] == [UTC_T0, "2026-03-02T10:00:00.000Z"]
    assert all(n["encounter"]["reference"] == _entry_of(bundle, enc)["fullUrl"] for n in notes)
    assert notes[0]["performer"] == [{"identifier": {"system": NAMING.practitioner_system, "value": "DR-17"}}]


def test_reading_times_devices_and_flags() -> None:
    bp = dataclasses.replace(blood_pressure(T0, "P-0001", "bp-9"), flags=("irregular-pulse",))
    bundle = observation_bundle(bp, NAMING)
    (device,) = _by_type(bundle, "Device")
    panel, pulse = _by_type(bundle, "Observation")
    # measured vs received: swapping them dates a reading to when the link came back
    assert panel["effectiveDateTime"] == UTC_T0 and panel["issued"] == "2026-03-02T08:00:05.000Z"
    assert panel["device"] == {"reference": _entry_of(bundle, device)["fullUrl"]}
    assert panel["note"] == [{"text": "device flags: irregular-pulse"}]
    assert panel["identifier"][0]["value"] == "gw-test-01/Omron/HEM-7600T/SN1234/bp-9"
    assert pulse["identifier"][0]["value"] == "gw-test-01/Omron/HEM-7600T/SN1234/bp-9#heart-rate"
    assert pulse["valueQuantity"]["value"] == 71.0 and "component" not in pulse
    assert [c["code"]["coding"][0]["code"] for c in panel["component"]] == ["8480-6", "8462-4", "8478-0"]
    assert device == {
        "resourceType": "Device",
        "identifier": [{"system": "urn:lastmile:device", "value": "Omron/HEM-7600T/SN1234"}],
        "deviceName": [{"name": "Omron HEM-7600T SN1234", "type": "user-friendly-name"}],
        "manufacturer": "Omron",
        "modelNumber": "HEM-7600T",
        "serialNumber": "SN1234",
    }
    assert bundle["identifier"]["value"] == "observation/gw-test-01/Omron/HEM-7600T/SN1234/bp-9"


def test_devices_without_serial_or_address() -> None:
    # no serial: the address identifies it (two cuffs of one model must stay two devices)
    thermo = reading("body-temperature", T0, "P-1", "t-9", Quantity("body-temperature", 36.6, "Cel"), device=THERMO)
    (device,) = _by_type(observation_bundle(thermo, NAMING), "Device")
    assert device["identifier"][0]["value"] == "Braun/IRT6520/11:22:33:44:55:66" and "serialNumber" not in device
    versioned = DeviceIdentity("Acme", "", "S1", "", software_version="2.1")
    (device,) = _by_type(observation_bundle(dataclasses.replace(thermo, device=versioned), NAMING), "Device")
    assert device["version"] == [{"value": "2.1"}] and "modelNumber" not in device
    # neither: no Device resource (nothing stable to deduplicate on), the reading still goes
    anonymous = dataclasses.replace(thermo, device=DeviceIdentity("Acme", "T1", "", ""))
    bundle = observation_bundle(anonymous, NAMING)
    assert not _by_type(bundle, "Device")
    (obs,) = _by_type(bundle, "Observation")
    assert "device" not in obs and obs["identifier"][0]["value"] == "gw-test-01/Acme T1/t-9"


def test_codes_for_other_readings_and_absent_values() -> None:
    def value_of(*quantities: Quantity, kind: str = "other") -> list[dict]:
        return _by_type(observation_bundle(reading(kind, T0, "P-1", "k", *quantities), NAMING), "Observation")

    (weight_lb,) = value_of(Quantity("body-weight", 157.0, "[lb_av]"))
    # a unit we have no display for keeps its UCUM code rather than a guess
    assert weight_lb["valueQuantity"] == {"value": 157.0, "unit": "[lb_av]", "system": UCUM, "code": "[lb_av]"}
    (unknown,) = value_of(Quantity("respiratory-rate", 16.0, "/min"))
    assert unknown["code"] == {"text": "respiratory-rate"}  # no LOINC we trust: no invented code
    (mmol,) = value_of(Quantity("glucose", 5.8, "mmol/L"), kind="glucose")
    assert _loinc(mmol) == ["15074-8"] and mmol["category"][0]["coding"][0]["code"] == "laboratory"
    first, second = value_of(Quantity("spo2", 98.0, "%"), Quantity("pulse-rate", 66.0, "/min"), kind="spo2")
    assert first["category"][0]["coding"][0] == {
        "system": OBS_CATEGORY,
        "code": "vital-signs",
        "display": "Vital Signs",
    }
    assert second["identifier"][0]["value"].endswith("/k#pulse-rate") and _loinc(second) == ["8867-4"]
    for special, reason in [("nan", "not-a-number"), ("+inf", "positive-infinity"), ("-inf", "negative-infinity")]:
        (absent,) = value_of(Quantity("body-temperature", None, "Cel", special=special))
        # a device's "no value" must never arrive as a number
        assert absent["dataAbsentReason"]["coding"][0]["code"] == reason and "valueQuantity" not in absent
    (odd,) = value_of(Quantity("body-temperature", None, "Cel", special="what"))
    assert odd["dataAbsentReason"]["coding"][0]["code"] == "unknown"


def test_refusals_instead_of_wrong_resources() -> None:
    naive = dataclasses.replace(visit(1), started_at=dt.datetime(2026, 3, 2, 8, 0))
    with pytest.raises(InvalidObjectError, match="time zone"):  # a local time sent as UTC is 8 h off
        visit_bundle(naive, [], NAMING)
    for broken in (dataclasses.replace(visit(1), patient_id=""), dataclasses.replace(visit(1), doctor_id="")):
        with pytest.raises(InvalidObjectError, match="patient and a doctor"):
            visit_bundle(broken, [], NAMING)
    with pytest.raises(InvalidObjectError):
        merge_transactions([])


def test_merge_keeps_shared_devices_once_and_every_visit() -> None:
    bundles = [visit_bundle(visit(n), all_kinds(T0, "P-0001", f"/{n}"), NAMING) for n in range(2)]
    merged = merge_transactions(bundles)
    assert merged["type"] == "transaction" and merged["resourceType"] == "Bundle"
    kinds = [k for k, _ in bundle_identifiers(merged)]
    assert kinds.count("Encounter") == 2 and kinds.count("Device") == 6  # gateway + 5 devices, once each
    assert len(merged["entry"]) == sum(len(b["entry"]) for b in bundles) - 6
    # the canonical bytes keep Chinese text readable and are stable across runs
    assert bundle_bytes({"a": "头晕", "b": 1}) == '{"a":"头晕","b":1}'.encode()


def test_position_precision_and_defaults() -> None:
    # GNSS gives ~1e-7 degrees (1 cm): keep that, no more (noise) and no less (a metre per digit lost)
    v = dataclasses.replace(visit(1), position=VisitPosition(31.248912345, 121.587412345, 150.46))
    (loc,) = _by_type(visit_bundle(v, [], NAMING), "Location")
    assert loc["position"] == {"longitude": 121.5874123, "latitude": 31.2489123, "altitude": 150.5}
    assert loc["description"].startswith("GNSS fix (2D) accuracy unknown")  # mode unknown: the weaker claim


def test_observations_link_to_their_visit_only_inside_one() -> None:
    bundle = visit_bundle(visit(1), all_kinds(T0, "P-0001"), NAMING)
    (enc,) = _by_type(bundle, "Encounter")
    readings = _by_type(bundle, "Observation")
    assert readings and all(o["encounter"] == {"reference": _entry_of(bundle, enc)["fullUrl"]} for o in readings)
    # a reading outside any visit must not point at one (the platform would reject a dangling reference)
    alone = observation_bundle(blood_pressure(T0, "P-0001", "bp-5"), NAMING)
    assert all("encounter" not in o for o in _by_type(alone, "Observation"))


def test_signed_payload_and_bundle_bytes_are_canonical() -> None:
    bundle = visit_bundle(visit(1), [], NAMING, signature(1))
    (prov,) = _by_type(bundle, "Provenance")
    raw = base64.b64decode(prov["signature"][0]["data"])
    # the county re-serialises the payload to check the chain: it must be the sorted, compact form
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    # the outbox keys re-sends on these bytes: the same bundle must give the same bytes in any key order
    assert bundle_bytes({"b": 1, "a": "头晕"}) == '{"a":"头晕","b":1}'.encode()


def test_bundle_identifiers_reads_the_first_identifier_or_the_provenance_tag() -> None:
    bundle = {
        "entry": [
            {"resource": {"resourceType": "Device", "identifier": [{"value": "first"}, {"value": "second"}]}},
            {"resource": {"resourceType": "Observation", "identifier": []}},
            {
                "resource": {
                    "resourceType": "Provenance",
                    "identifier": [],
                    "meta": {"tag": [{"code": "visit-1"}, {"code": "other"}]},
                }
            },
        ]
    }
    assert bundle_identifiers(bundle) == [("Device", "first"), ("Provenance", "visit-1")]


def test_an_implausible_value_is_sent_as_absent_with_what_the_device_said() -> None:
    # a reading outside the plausible range must not reach the record as a measured value, but the
    # county must be able to see what the device sent (a broken cuff, not a dead patient)
    odd = Quantity("body-temperature", None, "Cel", sent_value=55.5, sent_unit="Cel", special="implausible")
    blank = Quantity("spo2", None, "%", special="implausible")
    for q, sent in ((odd, "55.5 Cel"), (blank, "nothing")):
        (obs,) = _by_type(observation_bundle(reading(q.code, T0, "P-1", "k", q), NAMING), "Observation")
        assert "valueQuantity" not in obs and obs["dataAbsentReason"]
        assert obs["note"][-1] == {
            "text": f"{q.code}: the device sent {sent}, outside the plausible range; not a measured value"
        }
