"""The pure FHIR builder: valid R4 resources, right codes, stable identifiers."""

from __future__ import annotations

import dataclasses

import pytest

from tests.fhir_samples import NAMING, T0, all_kinds, blood_pressure, signature, visit
from tests.fhir_server import FhirTestServer, validate_transaction
from uploader.errors import InvalidObjectError
from uploader.fhir_bundle import bundle_bytes, bundle_identifiers, merge_transactions, observation_bundle, visit_bundle


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
