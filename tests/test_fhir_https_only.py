"""The FHIR bearer token (and the patient data with it) goes out only over https, or to this
machine (loopback); never where a redirect points (issue 10, item 4)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from lastmile.config import Config
from lastmile.doctor import Doctor, Level
from tests.fhir_samples import NAMING, T0, all_kinds, signature, visit
from tests.fhir_server import FhirTestServer
from tests.service_harness import fhir_token_file
from uploader.errors import ConfigurationFault, PermanentError
from uploader.fhir_bundle import bundle_bytes, visit_bundle
from uploader.fhir_reports import FhirReportClient
from uploader.fhir_sender import FhirSender, FhirSenderSettings
from uploader.reachability import insecure_url_problem


class NoNetwork(requests.Session):
    """A session that records any attempt to send."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts: list[str] = []

    def send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:  # type: ignore[override]
        self.attempts.append(str(request.url))
        raise AssertionError(f"nothing may be sent to {request.url}")


def visit_body() -> bytes:
    return bundle_bytes(visit_bundle(visit(1), all_kinds(T0, "P-0001"), NAMING, signature(1)))


@pytest.mark.parametrize(
    "url", ["http://county.example/fhir", "http://192.0.2.10:8080/fhir", "ftp://x/fhir", "county.example/fhir"]
)
def test_plain_http_to_another_machine_is_refused_before_anything_is_sent(tmp_path: Path, url: str) -> None:
    session = NoNetwork()
    with pytest.raises(ConfigurationFault, match="https://"):
        FhirSender(FhirSenderSettings(base_url=url, token_file=fhir_token_file(tmp_path)), session=session)
    assert session.attempts == []


@pytest.mark.parametrize(
    "url",
    ["https://county.example/fhir", "http://127.0.0.1:8080/fhir", "http://localhost/fhir", "http://[::1]:8080/fhir"],
)
def test_https_anywhere_and_http_to_loopback_are_allowed(url: str) -> None:
    assert insecure_url_problem(url) is None


def test_the_token_goes_to_a_loopback_receiver_over_http(tmp_path: Path) -> None:
    with (
        FhirTestServer(token="s3cret-token") as server,
        FhirSender(FhirSenderSettings(base_url=server.base_url, token_file=fhir_token_file(tmp_path))) as sender,
    ):
        sender.post_transaction(visit_body())
        assert server.stats.transactions == 1


class Redirector(http.server.BaseHTTPRequestHandler):
    requests_seen: list[str] = []

    def do_POST(self) -> None:
        Redirector.requests_seen.append(self.path)
        self.send_response(307)
        self.send_header("Location", "http://192.0.2.10/fhir")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def redirector() -> Iterator[str]:
    Redirector.requests_seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    server.shutdown()
    server.server_close()


def test_a_redirect_is_not_followed_with_the_token(tmp_path: Path, redirector: str) -> None:
    with FhirSender(
        FhirSenderSettings(base_url=redirector, token_file=fhir_token_file(tmp_path), gzip="never")
    ) as sender:
        with pytest.raises(ConfigurationFault, match=r"redirects \(307\) to http://192.0.2.10/fhir"):
            sender.post_transaction(visit_body())
    assert Redirector.requests_seen == ["/fhir"]  # asked once, never followed


def test_the_forward_service_refuses_to_start_its_fhir_sender_over_http(tmp_path: Path) -> None:
    from lastmile.services.forward import ForwardService

    config = Config()  # built in code, so `config check` never saw it: the sender still refuses
    config.set_data_dir(tmp_path / "data")
    config.reading_center.storage_commitment = False
    config.fhir.base_url = "http://county.example/fhir"
    config.fhir.token_file = fhir_token_file(tmp_path)
    with pytest.raises(ConfigurationFault, match="in clear"):
        ForwardService(config)


def test_doctor_does_not_send_the_token_over_http(tmp_path: Path) -> None:
    config = Config()
    config.set_data_dir(tmp_path)
    config.fhir.base_url = "http://192.0.2.10/fhir"
    config.fhir.token_file = fhir_token_file(tmp_path)
    (finding,) = Doctor(config).check_fhir()
    assert finding.level is Level.FAIL and "in clear" in finding.message


class Searcher(http.server.BaseHTTPRequestHandler):
    """A platform whose search answer's `next` link points at another server (`elsewhere`)."""

    elsewhere = ""
    seen: list[tuple[str, str]] = []  # (path, Authorization header) of every request it got

    def do_GET(self) -> None:
        Searcher.seen.append((self.path, self.headers.get("Authorization", "")))
        body = json.dumps(
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "link": [{"relation": "next", "url": f"{Searcher.elsewhere}/DiagnosticReport?page=2"}],
                "entry": [],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/fhir"


def test_a_next_link_to_another_server_is_not_followed_with_the_token(tmp_path: Path) -> None:
    """The report search follows `next` links the server hands back: one pointing off the
    platform (here another port on this machine) would take the bearer token with it."""
    Searcher.seen = []
    platform, platform_url = _serve(Searcher)
    other, other_url = _serve(Searcher)
    Searcher.elsewhere = other_url
    try:
        settings = FhirSenderSettings(base_url=platform_url, token_file=fhir_token_file(tmp_path))
        with FhirReportClient(settings) as client, pytest.raises(PermanentError, match="not followed"):
            client.search(["1.2.3.4"])
    finally:
        for server in (platform, other):
            server.shutdown()
            server.server_close()
    assert [auth for _path, auth in Searcher.seen] == ["Bearer s3cret-token"]  # the platform alone


def test_the_report_client_refuses_plain_http_to_another_machine(tmp_path: Path) -> None:
    session = NoNetwork()
    settings = FhirSenderSettings(base_url="http://192.0.2.10/fhir", token_file=fhir_token_file(tmp_path))
    with pytest.raises(ConfigurationFault, match="https://"):
        FhirReportClient(settings, session=session)
    assert session.attempts == []


class Recording(requests.Session):
    """A session that records how each request would be sent and answers 200."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[requests.PreparedRequest, dict[str, object]]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: object) -> requests.Response:  # type: ignore[override]
        self.sent.append((request, kwargs))
        answer = requests.Response()
        answer.status_code, answer.url = 200, str(request.url)
        return answer


def test_a_request_goes_through_the_clinics_proxy_and_ca_bundle_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uploader/fhir_connection.py request: sent as requests' Session.request sends it - the proxy
    the clinic's network needs (HTTPS_PROXY) and the CA bundle it trusts (REQUESTS_CA_BUNDLE)."""
    bundle = tmp_path / "clinic-ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.clinic.example:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    for shadowing in ("https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(shadowing, raising=False)
    session = Recording()
    settings = FhirSenderSettings(base_url="https://county.example/fhir", token_file=fhir_token_file(tmp_path))
    with FhirReportClient(settings, session=session) as client:
        client.request("GET", "https://county.example/fhir/DiagnosticReport", {}, params={"code": "x"})
    ((request, how),) = session.sent
    assert request.url == "https://county.example/fhir/DiagnosticReport?code=x"
    proxies = how["proxies"]
    assert isinstance(proxies, dict) and proxies["https"] == "http://proxy.clinic.example:3128"
    assert how["verify"] == str(bundle)
    assert how["allow_redirects"] is False
