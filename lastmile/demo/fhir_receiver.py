"""An embedded FHIR R4 receiver on loopback: conditional create, atomic transactions, fault injection.

Used by `lastmile demo` (the county platform stand-in) and, with fhir.resources validation
plugged in, by the tests (tests/fhir_server.py).

- POST of a transaction Bundle to the base URL; `validator(bundle)` may raise ValueError → 400
  with an OperationOutcome (the default checks the transaction's structure only).
- Conditional create (FHIR R4 http.html#ccreate): an entry whose `ifNoneExist`
  (identifier=system|value or _tag=system|code) matches one stored resource is not created again
  (200 instead of 201); urn:uuid references are rewritten to the stored ids. A condition that
  matches several resources (possible: a plain create need not carry a unique identifier) fails
  the whole transaction with 412 Precondition Failed, nothing applied. The whole transaction is
  applied atomically.
- Bearer token check, optional gzip request bodies (else 415), and injected faults, consumed one
  per request: "500", "429" (Retry-After), "400", "timeout" (answer late), "drop" (close without
  answering), "commit-then-drop" (apply, then close: the client cannot know it succeeded).
  `gateway_down = 503` (or 502, 504): the proxy in front of it answers every request with that
  status and its own HTML page, as while the platform behind it is down.
- The county's reports: `put_resource()` stores a DiagnosticReport (a new version each time);
  GET `DiagnosticReport?identifier=sys|val,sys|val&_lastUpdated=gtINSTANT` searches them and
  GET `DiagnosticReport/<id>` reads one (ETag W/"version"; If-None-Match → 304).
"""

from __future__ import annotations

import collections
import copy
import datetime as dt
import gzip
import itertools
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


def check_transaction_shape(bundle: dict) -> None:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
        raise ValueError("expected a transaction Bundle")
    for entry in bundle.get("entry", []):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("resource"), dict)
            or not isinstance(entry["resource"].get("resourceType"), str)
        ):
            raise ValueError("every entry needs a resource")
        request = entry.get("request") or {}
        if request.get("method") != "POST" or not request.get("url"):
            raise ValueError("entries must be POSTs")


def outcome(text: str, code: str = "invalid") -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


@dataclass
class ServerStats:
    requests: int = 0
    reads: int = 0  # GETs of resources (searches and reads)
    not_modified: int = 0  # conditional reads answered 304
    transactions: int = 0
    bytes_received: int = 0
    created: int = 0
    deduplicated: int = 0
    faults_served: list[str] = field(default_factory=list)


class MultipleMatches(Exception):
    """A conditional create's criteria match more than one resource: R4 says 412, not "take one"."""


class FhirReceiver:
    def __init__(
        self,
        *,
        token: str | None = None,
        accept_gzip: bool = True,
        response_delay_s: float = 0.0,
        validator: Callable[[dict], None] | None = check_transaction_shape,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.token = token
        self.accept_gzip = accept_gzip
        self.response_delay_s = response_delay_s
        self.validator = validator
        self.faults: collections.deque[str] = collections.deque()
        self.retry_after_s = 1
        self.timeout_delay_s = 3.0
        self.gateway_down: int | None = None
        self.stats = ServerStats()
        self.store: dict[str, dict[str, dict]] = collections.defaultdict(dict)  # type → id → resource
        # "Type?identifier=sys|val" → ids of every resource carrying it (several: a 412 on ifNoneExist)
        self._index: dict[str, list[str]] = collections.defaultdict(list)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._httpd = _QuietServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._scheme = "http"
        if ssl_context is not None:
            self._httpd.socket = ssl_context.wrap_socket(self._httpd.socket, server_side=True)
            self._scheme = "https"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fhir-test-server", daemon=True)

    # --- life cycle ----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self._httpd.server_address[1]}/fhir"

    def __enter__(self) -> FhirReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- inspection ----------------------------------------------------------------------------
    def resources(self, kind: str) -> list[dict]:
        with self._lock:
            return list(self.store[kind].values())

    def identifiers(self, kind: str) -> list[str]:
        return [r["identifier"][0]["value"] for r in self.resources(kind) if r.get("identifier")]

    # --- served resources (the county's DiagnosticReports) --------------------------------------
    def put_resource(self, resource: dict) -> dict:
        """Create or update a resource served by search/read: a new versionId each time."""
        with self._lock:
            kind = resource["resourceType"]
            stored = copy.deepcopy(resource)
            stored.setdefault("id", str(next(self._ids)))
            previous = self.store[kind].get(stored["id"])
            version = int((previous or {}).get("meta", {}).get("versionId", "0")) + 1
            now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
            stored["meta"] = {**stored.get("meta", {}), "versionId": str(version), "lastUpdated": now}
            self.store[kind][stored["id"]] = stored
            return copy.deepcopy(stored)

    def search(self, kind: str, query: dict[str, list[str]]) -> dict:
        """A searchset Bundle: identifier (comma = OR of system|value) and _lastUpdated=gt/ge."""
        wanted = {v for values in query.get("identifier", []) for v in values.split(",")}
        since = query.get("_lastUpdated", [""])[0]
        op, instant = since[:2], since[2:]
        after = dt.datetime.fromisoformat(instant) if since else None
        with self._lock:
            found = []
            for res in self.store[kind].values():
                idents = {f"{i.get('system', '')}|{i.get('value', '')}" for i in res.get("identifier") or []}
                if wanted and not idents & wanted:
                    continue
                if after is not None:
                    updated = dt.datetime.fromisoformat(res["meta"]["lastUpdated"])
                    if not (updated > after if op == "gt" else updated >= after):
                        continue
                found.append(copy.deepcopy(res))
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(found),
            "entry": [{"fullUrl": f"{self.base_url}/{kind}/{r['id']}", "resource": r} for r in found],
        }

    # --- transaction processing ----------------------------------------------------------------
    def _conditions(self, kind: str, condition: str) -> str:
        query = parse_qs(condition, keep_blank_values=True)
        ((name, values),) = query.items()
        return f"{kind}?{name}={values[0]}"

    def _keys_of(self, resource: dict) -> list[str]:
        kind = resource["resourceType"]
        keys = [
            f"{kind}?identifier={i.get('system', '')}|{i['value']}"
            for i in resource.get("identifier") or []
            if isinstance(i, dict) and "value" in i
        ]
        keys += [f"{kind}?_tag={t.get('system', '')}|{t['code']}" for t in (resource.get("meta") or {}).get("tag", [])]
        return list(dict.fromkeys(keys))  # an identifier listed twice is still one resource

    def apply_transaction(self, bundle: dict) -> dict:
        """All entries or none: new resources are staged and only stored at the end."""
        with self._lock:
            staged_index: dict[str, list[str]] = collections.defaultdict(list)
            resolved: dict[str, str] = {}
            responses = []
            created = dedup = 0
            pending: list[tuple[str, str, dict]] = []
            for entry in bundle["entry"]:
                res = entry["resource"]
                kind = res["resourceType"]
                condition = entry["request"].get("ifNoneExist")
                existing = None
                if condition:
                    key = self._conditions(kind, condition)
                    matches = self._index.get(key, []) + staged_index.get(key, [])
                    if len(matches) > 1:
                        # "Multiple matches: The server returns a 412 Precondition Failed error
                        # indicating the client's criteria were not selective enough" (R4 ccreate)
                        raise MultipleMatches(f"ifNoneExist {condition} matches {len(matches)} {kind} resources")
                    existing = matches[0] if matches else None
                if existing is not None:
                    resolved[entry["fullUrl"]] = f"{kind}/{existing}"
                    responses.append({"response": {"status": "200 OK", "location": f"{kind}/{existing}"}})
                    dedup += 1
                    continue
                new_id = str(next(self._ids))
                resolved[entry["fullUrl"]] = f"{kind}/{new_id}"
                pending.append((kind, new_id, copy.deepcopy(res)))
                for key in self._keys_of(res):
                    staged_index[key].append(new_id)
                responses.append({"response": {"status": "201 Created", "location": f"{kind}/{new_id}"}})
                created += 1
            for kind, new_id, res in pending:
                _rewrite_references(res, resolved)
                res["id"] = new_id
                self.store[kind][new_id] = res
            for key, ids in staged_index.items():
                self._index[key].extend(ids)
            self.stats.created += created
            self.stats.deduplicated += dedup
            self.stats.transactions += 1
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": responses}

    # --- HTTP ----------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _gateway_page(self, status: int) -> None:
                data = f"<html><body><h1>{status} {self.responses[status][0]}</h1></body></html>".encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def do_GET(self) -> None:
                if self.path.endswith("/metadata"):
                    return self._send(
                        200,
                        {
                            "resourceType": "CapabilityStatement",
                            "status": "active",
                            "kind": "instance",
                            "fhirVersion": "4.0.1",
                            "format": ["application/fhir+json"],
                        },
                    )
                url = urlsplit(self.path)
                parts = url.path.rstrip("/").split("/")
                if "DiagnosticReport" not in parts[-2:]:
                    return self._send(
                        404, outcome("only /metadata, DiagnosticReport and transactions here", "not-found")
                    )
                with server._lock:
                    server.stats.requests += 1
                    server.stats.reads += 1
                    fault = server.faults.popleft() if server.faults else None
                    if fault:
                        server.stats.faults_served.append(fault)
                if fault == "drop":
                    return self._drop()
                if fault == "500":
                    return self._send(500, outcome("injected server error", "exception"))
                if server.token is not None and self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._send(401, outcome("bad or missing bearer token", "login"))
                if parts[-1] == "DiagnosticReport":
                    return self._send(200, server.search("DiagnosticReport", parse_qs(url.query)))
                with server._lock:
                    found = copy.deepcopy(server.store["DiagnosticReport"].get(parts[-1]))
                if found is None:
                    return self._send(404, outcome(f"no DiagnosticReport/{parts[-1]}", "not-found"))
                etag = f'W/"{found["meta"]["versionId"]}"'
                if self.headers.get("If-None-Match") == etag:
                    with server._lock:
                        server.stats.not_modified += 1
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return self._send(200, found, {"ETag": etag})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with server._lock:
                    server.stats.requests += 1
                    server.stats.bytes_received += length + len(str(self.headers))
                    fault = server.faults.popleft() if server.faults else None
                    if fault:
                        server.stats.faults_served.append(fault)
                if server.gateway_down is not None:
                    return self._gateway_page(server.gateway_down)
                if fault == "drop":
                    return self._drop()
                if fault == "500":
                    return self._send(500, outcome("injected server error", "exception"))
                if fault == "429":
                    return self._send(
                        429, outcome("slow down", "throttled"), {"Retry-After": str(server.retry_after_s)}
                    )
                if fault == "400":
                    return self._send(400, outcome("injected: Encounter.subject unknown patient"))
                if server.token is not None and self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._send(401, outcome("bad or missing bearer token", "login"))
                if self.headers.get("Content-Encoding") == "gzip":
                    if not server.accept_gzip:
                        return self._send(415, outcome("gzip request bodies are not accepted", "not-supported"))
                    try:
                        raw = gzip.decompress(raw)
                    except OSError:
                        return self._send(400, outcome("bad gzip body", "structure"))
                try:
                    bundle = json.loads(raw)
                    if server.validator is not None:
                        server.validator(bundle)
                except (ValueError, KeyError, TypeError) as exc:
                    return self._send(400, outcome(f"invalid: {exc}"))
                if fault == "timeout":
                    time.sleep(server.timeout_delay_s)
                try:
                    result = server.apply_transaction(bundle)
                except MultipleMatches as exc:
                    return self._send(412, outcome(f"the transaction is not applied: {exc}", "multiple-matches"))
                except (ValueError, KeyError, TypeError) as exc:
                    return self._send(400, outcome(f"cannot apply the transaction: {exc}"))
                if fault == "commit-then-drop":
                    return self._drop()
                if server.response_delay_s:
                    time.sleep(server.response_delay_s)
                self._send(200, result)

        return Handler


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that time out or are killed leave broken pipes: expected here


def _rewrite_references(node: object, resolved: dict[str, str]) -> None:
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref in resolved:
            node["reference"] = resolved[ref]
        for value in node.values():
            _rewrite_references(value, resolved)
    elif isinstance(node, list):
        for value in node:
            _rewrite_references(value, resolved)
