"""One connection to the county's FHIR platform, as both FHIR clients use it (requests).

`FhirSender` (transactions out) and `FhirReportClient` (reports back) share what makes talking to
the platform safe, so that it is written once and cannot drift between them:
- the bearer token from a file only its owner may read (`read_token_file`);
- https only, plain http to loopback alone (`insecure_url_problem`), checked at start and at every
  request, and every request stays on the configured platform's origin: a `next` link or any other
  URL the server hands back that points elsewhere is refused before the token is attached;
- TLS verified against the configured CA bundle (or the system's), timeouts on connect and read,
  redirects never followed (a 3xx is a ConfigurationFault naming where it pointed);
- failures typed: network errors, timeouts, 408, 429, 5xx → TransientError (Retry-After honoured),
  no answer or a gateway's 502/503/504 → `PlatformDown` (the link's), 429 → `Unavailable` (busy);
  401/403 and TLS trust → ConfigurationFault (the platform refuses *us*), and so is a transaction
  POST answered 404/405 or with a 4xx that is not an OperationOutcome (fhir.base_url is wrong);
  other 4xx → PermanentError with the server's OperationOutcome text, masked (`uploader.masking`).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import logging
import os
import stat
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from urllib3.exceptions import ConnectTimeoutError

from uploader.errors import ConfigurationFault, PermanentError, TransientError
from uploader.masking import mask_server_text
from uploader.reachability import insecure_url_problem

log = logging.getLogger(__name__)

# what a proxy or gateway in front of the platform answers when the platform behind it is down
# (bad gateway, unavailable, gateway timeout): every request gets it, whatever it carries
GATEWAY_DOWN = (502, 503, 504)


class Unavailable(TransientError):
    """The platform takes nothing now, whatever was sent (busy: 429; down: `PlatformDown`): no
    request's fault, so sending its parts apart would only press it harder."""


class PlatformDown(Unavailable):
    """The platform is not there: no answer (`NoAnswer`), or the proxy/gateway in front of it saying
    so (502/503/504, `GATEWAY_DOWN`). The link's failure, as far as this gateway can tell - one the
    platform answers with a refusal of its own failed alone."""


class NoAnswer(PlatformDown):
    """The platform gave no answer (the connection failed, timed out or was dropped)."""


class NotConnected(NoAnswer):
    """No connection to the platform was made (refused, unreachable, name not resolved, connect
    timed out): nothing of the request left this gateway, so a metered link has not paid for it."""


def never_connected(exc: requests.exceptions.RequestException) -> bool:
    """Whether `exc` ended the request before a connection existed (requests reports a refused or
    unreachable connection as a ConnectionError around urllib3's NewConnectionError)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, ConnectTimeoutError)  # NewConnectionError and NameResolutionError are ones


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
        text = issues_text(body) or json.dumps(body, ensure_ascii=False)[:300]
    return mask_server_text(text, known)


def issues_text(body: object) -> str:
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


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return (parts.scheme.lower(), (parts.hostname or "").lower(), parts.port)


def header_block_bytes(first_line: str, headers: Iterable[tuple[str, str]]) -> int:
    """An HTTP/1.1 message head as it is written: first line, `Name: value` lines, blank line."""
    return len(first_line) + 2 + sum(len(k) + len(v) + 4 for k, v in headers) + 2


def request_wire_bytes(request: requests.PreparedRequest) -> int:
    """`request` as http.client writes it: the request line, its headers with the Host header
    http.client adds, and the body."""
    parts = urllib.parse.urlsplit(request.url or "")
    host = parts.netloc.rsplit("@", 1)[-1]
    headers = [*request.headers.items(), *([] if "Host" in request.headers else [("Host", host)])]
    body = request.body.encode() if isinstance(request.body, str) else request.body
    size = len(body) if isinstance(body, (bytes, bytearray)) else 0
    return header_block_bytes(f"{request.method} {request.path_url} HTTP/1.1", headers) + size


def response_wire_bytes(response: requests.Response) -> int:
    """`response` as it came: the status line, its headers, and its body as read off the wire
    (compressed, if it was: urllib3's `tell()` counts the bytes pulled from the socket)."""
    content = response.content  # read in full here (its callers read it anyway): the count is whole
    raw = response.raw
    body = raw.tell() if hasattr(raw, "tell") else 0
    head = header_block_bytes(f"HTTP/1.1 {response.status_code} {response.reason}", response.headers.items())
    return head + (body or len(content or b""))


class FhirConnection:
    """A keep-alive session to `settings.base_url` with the checks above; subclasses add the verbs."""

    def __init__(self, settings: FhirSenderSettings, session: requests.Session | None = None) -> None:
        if not settings.base_url:
            raise ConfigurationFault("fhir.base_url is not configured")
        problem = insecure_url_problem(settings.base_url)
        if problem:
            raise ConfigurationFault(f"fhir.base_url: {problem}")
        if settings.ca_file and not Path(settings.ca_file).is_file():
            raise ConfigurationFault(f"fhir.ca_file {settings.ca_file} does not exist")
        self.settings = settings
        self._token = read_token_file(settings.token_file) if settings.token_file else None
        self._session = session or requests.Session()
        self.requests_sent = 0  # requests that left this gateway (a connection was made)
        # HTTP bytes each way, as on the wire (request line, headers, body as sent; status line,
        # headers, body as read): what a metered link pays for, as the DICOM side counts it. The
        # TLS records around them are not counted (requests does not show them).
        self.bytes_sent = 0
        self.bytes_received = 0

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> FhirConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        return f"{self.settings.base_url.rstrip('/')}/{path.lstrip('/')}" if path else self.settings.base_url

    def headers(self, extra: dict[str, str]) -> dict[str, str]:
        headers = {"Accept": "application/fhir+json", "User-Agent": self.settings.user_agent, **extra}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def request(
        self, method: str, url: str, headers: dict[str, str], *, data: bytes | None = None, params: Any = None
    ) -> requests.Response:
        """One request to the platform; network failures raised typed, the answer returned as it is."""
        problem = insecure_url_problem(url)  # checked at start too; again here, where the token leaves
        if problem:
            raise ConfigurationFault(f"fhir.base_url: {problem}")
        if origin(url) != origin(self.settings.base_url):
            where = mask_server_text(url)
            raise PermanentError(f"FHIR server pointed us to {where}, outside {self.settings.base_url}: not followed")
        # Prepared once (the session's default headers merged) and sent as the session's `request`
        # sends it, with the environment's proxies and CA bundle: what is counted is what went
        session = self._session
        sent = session.prepare_request(requests.Request(method, url, self.headers(headers), data=data, params=params))
        environment = session.merge_environment_settings(sent.url, {}, None, self.settings.ca_file or True, None)
        try:
            response = session.send(
                sent,
                timeout=(self.settings.connect_timeout_s, self.settings.timeout_s),
                allow_redirects=False,  # a redirect could lead the token and the data elsewhere
                **environment,
            )
        except requests.exceptions.SSLError as exc:  # the handshake failed: the request never went out
            raise ConfigurationFault(f"TLS with the FHIR server failed: {exc}") from None
        except (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ) as exc:
            if never_connected(exc):
                raise NotConnected(f"FHIR server unreachable: {type(exc).__name__}: {exc}") from None
            self._count(sent)  # connected: the request went (or began to go) out
            raise NoAnswer(f"FHIR server unreachable: {type(exc).__name__}: {exc}") from None
        self._count(sent, response)
        return response

    @property
    def bytes_on_wire(self) -> int:
        """Both ways: what the metered link's budget is charged."""
        return self.bytes_sent + self.bytes_received

    def _count(self, request: requests.PreparedRequest, response: requests.Response | None = None) -> None:
        self.requests_sent += 1
        self.bytes_sent += request_wire_bytes(request)
        if response is not None:
            self.bytes_received += response_wire_bytes(response)

    @staticmethod
    def raise_for_refusal(
        response: requests.Response, refused: str, known: Iterable[str] = (), *, endpoint: bool = False
    ) -> None:
        """Raise the typed error for an answer that is not a success (`refused` names what was
        refused: "the bundle", "the request"); `known` are values to mask in the server's text.
        `endpoint`: the request went to the base URL itself (the transaction POST), so a 404/405,
        or a 4xx that is no FHIR server's answer, means the base URL is wrong, not the request."""
        code = response.status_code
        if code in (408, 429) or code >= 500:
            kind = PlatformDown if code in GATEWAY_DOWN else Unavailable if code == 429 else TransientError
            raise kind(
                f"FHIR server answered {code}: {outcome_text(response, known)}",
                retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            )
        if code in (401, 403):
            raise ConfigurationFault(f"FHIR server refused our credentials ({code}): {outcome_text(response, known)}")
        if 300 <= code < 400 and code != 304:
            where = mask_server_text(response.headers.get("Location", "") or "an address it does not name")
            raise ConfigurationFault(
                f"FHIR server redirects ({code}) to {where}: set fhir.base_url to the real address"
            )
        # 413 stays the bundle's: a web server's size limit refuses that bundle, not every one
        if endpoint and (code in (404, 405) or (code >= 400 and code != 413 and not _is_outcome(response))):
            raise ConfigurationFault(
                f"FHIR server does not take transactions at fhir.base_url ({code}): "
                f"{outcome_text(response, known)}; check fhir.base_url"
            )
        if code >= 400:
            raise PermanentError(f"FHIR server rejected {refused} ({code}): {outcome_text(response, known)}")


def _is_outcome(response: requests.Response) -> bool:
    """Whether the answer is a FHIR OperationOutcome (what a FHIR server refuses a request with)."""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("resourceType") == "OperationOutcome"
