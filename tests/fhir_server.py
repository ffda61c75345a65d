"""The loopback FHIR R4 test server: lastmile.demo.fhir_receiver with every resource validated.

- Every resource of a POSTed transaction Bundle is validated with fhir.resources
  (the R4B models: fhir.resources 8 ships R5, R4B and STU3; R4B's Encounter, Observation,
  Location, Device, Provenance and Bundle have the R4 shape, e.g. Encounter.class is one Coding,
  which R5 changed). An invalid resource answers 400 with an OperationOutcome.
- Conditional create: an entry whose `ifNoneExist` (identifier=system|value or _tag=system|code)
  matches a stored resource is not created again (200 instead of 201); urn:uuid references are
  rewritten to the stored ids. The whole transaction is applied atomically.
- Bearer token check, optional gzip request bodies (else 415), and injected faults, consumed one
  per request: "500", "429" (Retry-After), "400", "timeout" (answer late), "drop" (close without
  answering), "commit-then-drop" (apply, then close: the client cannot know it succeeded).
"""

from __future__ import annotations

import collections
import threading

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from lastmile.demo.fhir_receiver import FhirReceiver, ServerStats, check_transaction_shape, outcome

__all__ = [
    "FhirTestServer",
    "RefusesVisits",
    "ServerStats",
    "encounter_identifiers",
    "outcome",
    "validate_resource",
    "validate_transaction",
]


def validate_resource(resource: dict) -> None:
    """Raise ValueError with a readable message if `resource` is not valid FHIR R4(B)."""
    kind = resource.get("resourceType")
    if not isinstance(kind, str):
        raise ValueError("resource without resourceType")
    try:
        get_fhir_model_class(kind).model_validate(resource)
    except ValidationError as exc:
        raise ValueError(f"{kind}: {exc}") from None


def validate_transaction(bundle: dict) -> None:
    check_transaction_shape(bundle)
    validate_resource({k: v for k, v in bundle.items() if k != "entry"})
    for entry in bundle.get("entry", []):
        validate_resource(entry["resource"])


def encounter_identifiers(bundle: dict) -> list[str]:
    """The visits a transaction Bundle carries: its Encounters' identifier values."""
    return [
        i["value"]
        for entry in bundle["entry"]
        if entry["resource"]["resourceType"] == "Encounter"
        for i in entry["resource"].get("identifier", [])
    ]


class FhirTestServer(FhirReceiver):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(validator=self.receive, **kwargs)  # type: ignore[arg-type]
        # Encounter identifier -> how many valid transactions carrying it arrived, counted before any
        # late answer ("timeout"): a copy the client gave up on counts while the server still works on it.
        self.received: collections.Counter[str] = collections.Counter()
        # Encounter identifier -> how many transactions carrying it the server applied: a re-send
        # that conditional create absorbed is invisible in the stored resources, not here.
        self.applied: collections.Counter[str] = collections.Counter()
        self._applied_lock = threading.Lock()

    def receive(self, bundle: dict) -> None:
        validate_transaction(bundle)
        with self._applied_lock:
            self.received.update(encounter_identifiers(bundle))

    def apply_transaction(self, bundle: dict) -> dict:
        result = super().apply_transaction(bundle)
        self.count_applied(bundle)
        return result

    def count_applied(self, bundle: dict) -> None:
        with self._applied_lock:
            self.applied.update(encounter_identifiers(bundle))


class RefusesVisits(FhirTestServer):
    """The platform storing every transaction but those carrying one of the visits `refused`, whose
    entries it answers "500" in its transaction-response at every try (a refusal of those bundles
    alone, for now)."""

    def __init__(self, *refused: str, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.refused = set(refused)

    def apply_transaction(self, bundle: dict) -> dict:
        if self.refused.intersection(encounter_identifiers(bundle)):
            return {
                "resourceType": "Bundle",
                "type": "transaction-response",
                "entry": [{"response": {"status": "500 Internal Server Error"}} for _ in bundle["entry"]],
            }
        return super().apply_transaction(bundle)
