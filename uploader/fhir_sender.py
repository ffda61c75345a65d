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
  401/403 and TLS trust failures → ConfigurationFault (the platform refuses *us*, not the bundle);
  any other 4xx, or a transaction-response entry that is not 2xx → PermanentError carrying the
  server's OperationOutcome text, masked (`uploader.masking`): the bundle's patient values and
  anything shaped like patient data never reach a log line or a stored quarantine reason.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import gzip
import json
import logging
import os
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from uploader.errors import ConfigurationFault, PermanentError, TransientError
from uploader.masking import mask_server_text
from uploader.reachability import insecure_url_problem

log = logging.getLogger(__name__)

GZIP_MIN_BYTES = 1024  # below this, compressing costs more than it saves


@dataclass(frozen=True)
class FhirSenderSettings:
    base_url: str
    token_file: str = ""  # empty: no Authorization header (loopback test receivers only)
    ca_file: str = ""
    timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    gzip: str = "auto"  # "auto", "never"
    user_agent: str = "lastmile-gateway"


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The bearer token, after checking that nobody but its owner (us) can read the file."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise ConfigurationFault(f"FHIR token file {p}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigurationFault(f"FHIR token file {p} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigurationFault(
            f"FHIR token file {p} is readable by group/others (mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {p}"
        )
    if st.st_uid != os.geteuid():
        raise ConfigurationFault(f"FHIR token file {p} belongs to uid {st.st_uid}, not to this user")
    token = p.read_text(encoding="utf-8").strip()
    if not token or any(ch.isspace() for ch in token):
        raise ConfigurationFault(f"FHIR token file {p} must hold one token on one line")
    return token


def outcome_text(response: requests.Response, known: Iterable[str] = ()) -> str:
    """The OperationOutcome's diagnostics, else the start of the body; patient data masked
    (`known`: the patient values of what was sent)."""
    try:
        body = response.json()
    except ValueError:
        text = response.text[:300].strip() or response.reason
    else:
        text = _issues_text(body) or json.dumps(body, ensure_ascii=False)[:300]
    return mask_server_text(text, known)


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


def _issues_text(body: object) -> str:
    if not isinstance(body, dict):
        return ""
    if body.get("resourceType") != "OperationOutcome":
        return ""
    texts = []
    for issue in body.get("issue") or []:
        if isinstance(issue, dict):
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
            texts.append(f"{issue.get('severity', 'error')}: {text}")
    return "; ".join(texts)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class FhirSender:
    def __init__(self, settings: FhirSenderSettings, session: requests.Session | None = None) -> None:
        if not settings.base_url:
            raise ConfigurationFault("fhir.base_url is not configured")
        problem = insecure_url_problem(settings.base_url)
        if problem:
            raise ConfigurationFault(f"fhir.base_url: {problem}")
        self.settings = settings
        self._token = read_token_file(settings.token_file) if settings.token_file else None
        if settings.ca_file and not Path(settings.ca_file).is_file():
            raise ConfigurationFault(f"fhir.ca_file {settings.ca_file} does not exist")
        self._session = session or requests.Session()
        self._gzip = settings.gzip == "auto"
        self.bytes_sent = 0  # request bodies as they went on the wire
        self.requests_sent = 0

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> FhirSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _headers(self, compressed: bool) -> dict[str, str]:
        headers = {
            "Content-Type": "application/fhir+json; charset=utf-8",
            "Accept": "application/fhir+json",
            "User-Agent": self.settings.user_agent,
            "Prefer": "return=minimal",
        }
        if compressed:
            headers["Content-Encoding"] = "gzip"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

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
        verify: bool | str = self.settings.ca_file or True
        url = self.settings.base_url
        problem = insecure_url_problem(url)  # checked at start too; again here, where the token leaves
        if problem:
            raise ConfigurationFault(f"fhir.base_url: {problem}")
        try:
            response = self._session.post(
                url,
                data=data,
                headers=self._headers(compressed),
                verify=verify,
                timeout=(self.settings.connect_timeout_s, self.settings.timeout_s),
                allow_redirects=False,  # a redirect could lead the token and the data elsewhere
            )
        except requests.exceptions.SSLError as exc:
            raise ConfigurationFault(f"TLS with the FHIR server failed: {exc}") from None
        except (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ) as exc:
            raise TransientError(f"FHIR server unreachable: {type(exc).__name__}: {exc}") from None
        finally:
            self.requests_sent += 1
            self.bytes_sent += len(data)
        return response

    def _result(self, response: requests.Response, sent: bytes) -> dict[str, Any]:
        code = response.status_code
        if code == 429 or code == 408 or code >= 500:
            raise TransientError(
                f"FHIR server answered {code}: {outcome_text(response, patient_values(sent))}",
                retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            )
        if code in (401, 403):
            raise ConfigurationFault(
                f"FHIR server refused our credentials ({code}): {outcome_text(response, patient_values(sent))}"
            )
        if 300 <= code < 400:
            where = mask_server_text(response.headers.get("Location", "") or "an address it does not name")
            raise ConfigurationFault(
                f"FHIR server redirects ({code}) to {where}: set fhir.base_url to the real address"
            )
        if code >= 400:
            raise PermanentError(
                f"FHIR server rejected the bundle ({code}): {outcome_text(response, patient_values(sent))}"
            )
        try:
            result = response.json()
        except ValueError:
            raise TransientError(f"FHIR server answered {code} without a JSON body") from None
        failed = [
            e.get("response", {})
            for e in result.get("entry", [])
            if not str(e.get("response", {}).get("status", "")).startswith("2")
        ]
        if failed:
            texts = [f"{r.get('status')}: {_issues_text(r.get('outcome'))}" for r in failed]
            detail = mask_server_text("; ".join(texts), patient_values(sent))
            raise PermanentError("FHIR transaction entries failed: " + detail)
        return dict(result)
