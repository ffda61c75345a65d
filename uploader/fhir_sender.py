"""POST FHIR transaction Bundles to the county platform (requests), failures typed.

- Bearer token read from a file that only its owner may read: group/other permission bits, or a
  file owned by someone else, make the sender refuse to start (ConfigurationFault).
- Nothing goes out over plain http except to loopback (a test receiver on this machine): the
  token and the patient data would cross the network in clear. `insecure_url_problem` says so,
  for `lastmile config check`, the doctor and this sender (at start and at every request);
  redirects are not followed (a 3xx is a ConfigurationFault naming the new address).
- TLS verified against the configured CA bundle (or the system's when none is configured).
- Timeouts on connect and read; one keep-alive session.
- gzip request bodies where the server accepts them: tried first ("auto"); a 415 turns it off for
  the life of this sender and the same body is sent again plain at once.
- Network errors, timeouts, 408, 429 and 5xx → TransientError (Retry-After honoured);
  401/403, TLS trust failures, and a transaction POST the base URL does not take (404/405, or a
  4xx without an OperationOutcome, e.g. a web server's HTML page) → ConfigurationFault (the
  platform refuses *us*, or we are not talking to it, not the bundle);
  any other 4xx, or a transaction-response entry refused with a 4xx → PermanentError carrying the
  server's OperationOutcome text, masked (`uploader.masking`): the bundle's patient values and
  anything shaped like patient data never reach a log line or a stored quarantine reason.
- A 2xx counts only as a transaction-response Bundle with one entry per entry sent, each 2xx;
  any other 2xx answer (a proxy's `{}`, an OperationOutcome, a short Bundle) → TransientError,
  never "sent" (re-sending is safe: every entry is a conditional create).
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterator
from typing import Any

import requests

from uploader.errors import PermanentError, TransientError
from uploader.fhir_connection import (
    FhirConnection,
    FhirSenderSettings,
    issues_text,
    outcome_text,
    read_token_file,
    retry_after_seconds,
)
from uploader.masking import mask_server_text

__all__ = [
    "FhirSender",
    "FhirSenderSettings",
    "outcome_text",
    "patient_values",
    "read_token_file",
    "retry_after_seconds",
]

log = logging.getLogger(__name__)

GZIP_MIN_BYTES = 1024  # below this, compressing costs more than it saves


def patient_values(body: bytes) -> list[str]:
    """The patient identifiers, names and birth dates in a Bundle we sent (to mask them in the
    server's answer about it). Only read when the server refused something."""
    try:
        bundle = json.loads(gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body)
    except (ValueError, OSError, EOFError):
        return []
    return sorted(set(_patient_strings(bundle, inside_patient=False)))


def _patient_strings(node: object, *, inside_patient: bool) -> Iterator[str]:
    if isinstance(node, list):
        for item in node:
            yield from _patient_strings(item, inside_patient=inside_patient)
        return
    if not isinstance(node, dict):
        return
    is_patient = inside_patient or node.get("resourceType") == "Patient"
    for key, value in node.items():
        if key in ("subject", "patient"):
            yield from _patient_strings(value, inside_patient=True)
        elif is_patient and isinstance(value, str) and key in ("value", "display", "text", "family", "birthDate"):
            yield value
        elif is_patient and key == "given" and isinstance(value, list):
            yield from (v for v in value if isinstance(v, str))
        else:
            yield from _patient_strings(value, inside_patient=is_patient)


class FhirSender(FhirConnection):
    def __init__(self, settings: FhirSenderSettings, session: requests.Session | None = None) -> None:
        super().__init__(settings, session)
        self._gzip = settings.gzip == "auto"

    def __enter__(self) -> FhirSender:
        return self

    def post_transaction(self, body: bytes) -> dict[str, Any]:
        """Send one transaction; return the transaction-response Bundle or raise a typed error."""
        compress = self._gzip and len(body) >= GZIP_MIN_BYTES
        response = self._post(gzip.compress(body, compresslevel=5) if compress else body, compress)
        if compress and response.status_code == 415:
            log.info("the FHIR server refuses gzip request bodies; sending plain from now on")
            self._gzip = False
            response = self._post(body, False)
        return self._result(response, body)

    def _post(self, data: bytes, compressed: bool) -> requests.Response:
        headers = {"Content-Type": "application/fhir+json; charset=utf-8", "Prefer": "return=minimal"}
        if compressed:
            headers["Content-Encoding"] = "gzip"
        # bytes_sent (FhirConnection.request) counts the body only if it went out: a day of a link
        # down must not "spend" the metered budget the visits then wait on
        return self.request("POST", self.settings.base_url, headers, data=data)

    def _result(self, response: requests.Response, sent: bytes) -> dict[str, Any]:
        code = response.status_code
        self.raise_for_refusal(response, "the bundle", patient_values(sent) if code >= 300 else (), endpoint=True)
        try:
            result = response.json()
        except ValueError:
            raise TransientError(f"FHIR server answered {code} without a JSON body") from None
        # Only a transaction-response with one entry per entry sent says the platform stored the
        # bundle; anything else (a proxy's answer, an empty or truncated Bundle) is not a commitment.
        # Sending again is safe: every entry is a conditional create (ifNoneExist).
        entries = result.get("entry") if isinstance(result, dict) else None
        if not (
            isinstance(result, dict)
            and result.get("resourceType") == "Bundle"
            and result.get("type") == "transaction-response"
            and isinstance(entries, list)
            and all(isinstance(e, dict) and isinstance(e.get("response"), dict) for e in entries)
        ):
            raise TransientError(
                f"FHIR server answered {code} without a transaction-response Bundle: {_what(result, sent)}"
            )
        answers: list[dict[str, Any]] = [e["response"] for e in entries]
        expected = _entry_count(sent)
        if expected is not None and len(answers) != expected:
            raise TransientError(
                f"FHIR server answered {code} with {len(answers)} transaction-response entries for {expected} sent"
            )
        statuses = [_status_code(r.get("status")) for r in answers]
        failed = [(s, r) for s, r in zip(statuses, answers, strict=True) if s is None or not 200 <= s < 300]
        if not failed:
            return dict(result)
        texts = [f"{r.get('status')}: {issues_text(r.get('outcome'))}" for _, r in failed]
        detail = mask_server_text("; ".join(texts), patient_values(sent))
        # As for the whole answer: an entry refused (4xx) is the bundle's fault; a server error,
        # or a status that is not one, is the platform's and passes.
        if all(s is not None and 400 <= s < 500 and s not in (408, 429) for s, _ in failed):
            raise PermanentError("FHIR transaction entries failed: " + detail)
        raise TransientError("FHIR transaction entries not stored: " + detail)


def _status_code(status: object) -> int | None:
    """The code of a transaction-response entry's status ("201 Created" → 201), None if none."""
    head = str(status).strip().split(" ", 1)[0] if isinstance(status, (str, int)) else ""
    return int(head) if head.isdigit() and len(head) == 3 else None


def _entry_count(body: bytes) -> int | None:
    """How many entries the Bundle we sent holds (None if it cannot be read: not checked then)."""
    try:
        bundle = json.loads(body)
    except ValueError:
        return None
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    return len(entries) if isinstance(entries, list) else None


def _what(result: object, sent: bytes) -> str:
    """A short, masked description of an answer that is not a transaction-response."""
    if isinstance(result, dict):
        issues = issues_text(result)
        if issues:
            return mask_server_text(issues, patient_values(sent))
        return f"resourceType {result.get('resourceType')!r}, type {result.get('type')!r}"
    return f"a JSON {type(result).__name__}"
