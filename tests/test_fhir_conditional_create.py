"""Conditional create as FHIR R4 words it (http.html#ccreate), in our receiver and in our sender.

R4, 3.1.0.8.1 Conditional create, on `If-None-Exist` (a transaction entry's `request.ifNoneExist`):
- "No matches: The server processes the create as normal"
- "One Match: The server ignores the post and returns 200 OK"
- "Multiple matches: The server returns a 412 Precondition Failed error indicating the client's
  criteria were not selective enough"
and R4 3.1.0.11.2 (transaction): "If any resource identities ... the transaction SHALL fail";
a failed transaction changes nothing.

Our receiver is both the tests' peer and a site's stand-in platform: taking the first of several
matches would attach a re-sent visit's observations to whichever duplicate came first.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import requests

from lastmile.demo.fhir_receiver import FhirReceiver
from tests.fhir_samples import NAMING, all_kinds, signature, visit
from tests.fhir_server import FhirTestServer
from uploader.errors import PermanentError
from uploader.fhir_bundle import bundle_bytes, visit_bundle
from uploader.fhir_forwarder import enqueue_bundle, forward_fhir_once
from uploader.fhir_sender import FhirSender, FhirSenderSettings
from uploader.outbox import ItemState, Kind, Outbox

SYSTEM = "urn:lastmile:visit"


def _encounter_entry(n: int, value: str, condition: str | None) -> dict:
    request = {"method": "POST", "url": "Encounter"}
    if condition is not None:
        request["ifNoneExist"] = condition
    return {
        "fullUrl": f"urn:uuid:00000000-0000-4000-8000-{n:012d}",
        "resource": {"resourceType": "Encounter", "identifier": [{"system": SYSTEM, "value": value}]},
        "request": request,
    }


def _transaction(*entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def _post(receiver: FhirReceiver, bundle: dict) -> requests.Response:
    return requests.post(receiver.base_url, data=json.dumps(bundle), timeout=30)


def test_no_match_creates_and_one_match_answers_200_without_a_second_copy() -> None:
    condition = f"identifier={SYSTEM}|V-1"
    with FhirReceiver() as receiver:
        first = _post(receiver, _transaction(_encounter_entry(1, "V-1", condition)))
        again = _post(receiver, _transaction(_encounter_entry(2, "V-1", condition)))
        assert (first.status_code, again.status_code) == (200, 200)
        assert first.json()["entry"][0]["response"]["status"] == "201 Created"
        assert again.json()["entry"][0]["response"]["status"] == "200 OK"
        assert again.json()["entry"][0]["response"]["location"] == first.json()["entry"][0]["response"]["location"]
        assert receiver.identifiers("Encounter") == ["V-1"]


def test_a_condition_matching_two_resources_is_412_and_the_visit_is_not_attached_to_either() -> None:
    with FhirReceiver() as receiver:
        # two plain creates (no ifNoneExist) may carry the same identifier: R4 does not forbid it
        made = _post(receiver, _transaction(_encounter_entry(1, "V-2", None), _encounter_entry(2, "V-2", None)))
        assert made.status_code == 200 and receiver.identifiers("Encounter") == ["V-2", "V-2"]
        before = copy.deepcopy(receiver.stats)
        # the re-sent visit: its Encounter matches both, and an Observation rides along that must
        # not be stored against whichever came first
        observation = {
            "fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000009",
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "encounter": {"reference": "urn:uuid:00000000-0000-4000-8000-000000000003"},
            },
            "request": {"method": "POST", "url": "Observation"},
        }
        answer = _post(receiver, _transaction(_encounter_entry(3, "V-2", f"identifier={SYSTEM}|V-2"), observation))
        assert answer.status_code == 412
        issue = answer.json()["issue"][0]
        assert issue["code"] == "multiple-matches" and "matches 2 Encounter" in issue["diagnostics"]
        # the whole transaction failed: nothing created, nothing counted as applied
        assert receiver.resources("Observation") == []
        assert len(receiver.resources("Encounter")) == 2
        assert (receiver.stats.created, receiver.stats.transactions) == (before.created, before.transactions)


def test_two_creates_in_one_transaction_make_a_later_condition_ambiguous() -> None:
    """Matches staged earlier in the same transaction count too (R4: entries are processed as one)."""
    with FhirReceiver() as receiver:
        answer = _post(
            receiver,
            _transaction(
                _encounter_entry(1, "V-3", None),
                _encounter_entry(2, "V-3", None),
                _encounter_entry(3, "V-3", f"identifier={SYSTEM}|V-3"),
            ),
        )
        assert answer.status_code == 412
        assert receiver.resources("Encounter") == []


def test_an_identifier_listed_twice_on_one_resource_is_still_one_match() -> None:
    with FhirReceiver() as receiver:
        entry = _encounter_entry(1, "V-4", None)
        entry["resource"]["identifier"] *= 2
        assert _post(receiver, _transaction(entry)).status_code == 200
        again = _post(receiver, _transaction(_encounter_entry(2, "V-4", f"identifier={SYSTEM}|V-4")))
        assert again.status_code == 200 and again.json()["entry"][0]["response"]["status"] == "200 OK"


def _visit_body(n: int) -> dict:
    v = visit(n)
    return visit_bundle(v, all_kinds(v.started_at, v.patient_id, f"/{n}"), NAMING, signature(n))


def _duplicate_encounters_of(server: FhirTestServer, bundle: dict) -> None:
    """Store the visit's Encounter twice by plain create, as another client might have."""
    (encounter,) = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Encounter"]
    plain = []
    for n in (1, 2):
        entry = copy.deepcopy(encounter)
        entry["fullUrl"] = f"urn:uuid:00000000-0000-4000-8000-00000000010{n}"
        del entry["request"]["ifNoneExist"]
        plain.append(entry)
    server.apply_transaction(_transaction(*plain))


def test_sender_treats_412_as_permanent_not_as_a_retry() -> None:
    """A 412 will be a 412 again: retrying would send the same ambiguous bundle forever."""
    bundle = _visit_body(1)
    with FhirTestServer() as server, FhirSender(FhirSenderSettings(base_url=server.base_url)) as sender:
        _duplicate_encounters_of(server, bundle)
        with pytest.raises(PermanentError, match=r"\(412\).*matches 2 Encounter"):
            sender.post_transaction(bundle_bytes(bundle))
        assert server.resources("Observation") == []


def test_forwarder_quarantines_a_412_visit_with_its_reason_and_sends_the_others(tmp_path: Path) -> None:
    """The ambiguous visit waits for a person (quarantine with the server's reason), never merged
    into a duplicate; the clinic's other visits still go."""
    outbox = Outbox.open(tmp_path / "data", min_free_bytes=0)
    bundles = {n: _visit_body(n) for n in (1, 2, 3)}
    for n, bundle in bundles.items():
        enqueue_bundle(outbox, bundle, f"fhir:visit:{n}", patient_id=visit(n).patient_id, now=1000.0 + n)
    with FhirTestServer() as server, FhirSender(FhirSenderSettings(base_url=server.base_url)) as sender:
        _duplicate_encounters_of(server, bundles[2])
        counts = forward_fhir_once(outbox, sender, 2000.0, batch_size=10)
        assert (counts.sent, counts.quarantined) == (2, 1)
        (q,) = outbox.stats(2000.0)["quarantined"]
        assert q["key"] == "fhir:visit:2" and "412" in q["reason"] and "matches 2 Encounter" in q["reason"]
        assert [i.key for i in outbox.items(state=ItemState.QUEUED, kind=Kind.FHIR_BUNDLE)] == []
        assert sorted(server.identifiers("Encounter")) == sorted(
            [visit(1).visit_id, visit(2).visit_id, visit(2).visit_id, visit(3).visit_id]
        )
    outbox.close()
