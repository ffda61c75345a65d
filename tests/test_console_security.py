"""The console's guards over real HTTP: no session, no patient data; CSRF; lockout; cookie flags;
HTTPS with a certificate made at first start; plain HTTP only on loopback."""

from __future__ import annotations

import datetime as dt
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lastmile.config import ConfigError, load_config, salvage_console_config
from lastmile.console.app import PUBLIC_PATHS, routes
from lastmile.console.listen import parse_listen
from lastmile.console.service import ConsoleServer
from lastmile.console.sources import ReportView
from lastmile.console.tls import existing_certificate, fingerprint_of
from tests.console_harness import DOCTOR, Client, Reply, StaticReports, console_config, running_console

PATIENT_ID = "11010519491231002X"
PATIENT_NAME = "张三"
REPORTS = StaticReports(
    [
        ReportView(
            report_id="r1",
            study_uid="1.2.3",
            patient_id=PATIENT_ID,
            patient_name=PATIENT_NAME,
            ecg_time=None,
            received_at=dt.datetime.now(dt.timezone.utc),
            status="received",
            critical=True,
            reading_doctor="赵医生",
            text="急性心肌梗死",
        )
    ],
    pdfs={"r1": b"%PDF-1.4 report of " + PATIENT_NAME.encode()},
)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleServer]:
    config = console_config(tmp_path_factory.mktemp("console") / "data")
    with running_console(config, reports=REPORTS) as server:
        doctor = Client(server.url)
        doctor.login()
        reply = doctor.post("/today/check-in", {"patient_id": PATIENT_ID, "name": PATIENT_NAME})
        assert reply.status == 303
        yield server


def concrete_paths() -> list[tuple[str, str]]:
    """Every route of the app but the public ones, with its path parameters filled in."""
    found = []
    for route in routes():
        path = getattr(route, "path", "")
        if any(path == p or path.startswith(p + "/") for p in PUBLIC_PATHS):
            continue
        concrete = re.sub(r"\{\w+:int\}", "1", path).replace("{report_id}", "r1")
        assert "{" not in concrete, f"{path}: a parameter this test does not fill"
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                found.append((method, concrete))
    return found


def test_the_route_list_is_not_empty_and_covers_the_pages() -> None:
    paths = {p for _m, p in concrete_paths()}
    assert {"/today", "/sent", "/reports", "/devices", "/visits", "/system", "/events"} <= paths
    assert "/ecg/1/preview.svg" in paths and "/reports/r1/pdf" in paths and "/today/check-in" in paths


@pytest.mark.parametrize("method,path", concrete_paths())
def test_nothing_without_a_session(console: ConsoleServer, method: str, path: str) -> None:
    anonymous = Client(console.url)
    reply = anonymous.request(method, path, form={} if method == "POST" else None)
    if method == "GET":
        assert reply.status == 303 and reply.location.startswith("/login"), (reply.status, reply.location)
    else:
        assert reply.status in (401, 403), reply.status
    assert PATIENT_ID not in reply.body and PATIENT_NAME not in reply.body
    # an API-style request (no text/html) gets 401, never the page
    reply = anonymous.request(method, path, form={} if method == "POST" else None, headers={"Accept": "*/*"})
    assert reply.status in (401, 403)


def test_a_forged_or_stale_cookie_is_no_session(console: ConsoleServer) -> None:
    client = Client(console.url)
    reply = client.get("/today", headers={"Cookie": "lastmile_session=" + "A" * 43})
    assert reply.status == 303 and PATIENT_ID not in reply.body


def test_with_a_session_the_patient_is_there(console: ConsoleServer) -> None:
    """The guard above is not vacuous: the same pages do show the patient to a logged-in user."""
    client = Client(console.url)
    client.login()
    assert PATIENT_ID in client.get("/today").body
    assert PATIENT_NAME in client.get("/reports").body
    assert client.get("/reports/r1/pdf").body.startswith("%PDF")


def test_posts_without_the_csrf_token_are_refused(console: ConsoleServer) -> None:
    client = Client(console.url)
    client.login()
    before = client.get("/today").body
    assert PATIENT_ID in before
    for form in ({}, {"csrf": "wrong"}, {"csrf": ""}):
        reply = client.post("/today/end-session", form, csrf=False)
        assert reply.status == 403
    assert PATIENT_ID in client.get("/today").body  # the session was not ended
    # the right token, but posted from another site's page: refused too
    reply = client.post("/today/end-session", headers={"Origin": "http://evil.example"})
    assert reply.status == 403
    assert PATIENT_ID in client.get("/today").body
    # a GET never changes anything: the form's address opened as a page is the page of the form
    reply = client.get("/today/end-session")
    assert (reply.status, reply.location) == (303, "/today")
    assert PATIENT_ID in client.get("/today").body


def test_the_login_form_has_its_own_csrf_token(console: ConsoleServer) -> None:
    client = Client(console.url)
    client.get("/login")
    reply = client.post("/login", {"name": DOCTOR[0], "password": DOCTOR[1], "csrf": "forged"}, csrf=False)
    assert reply.status == 403 and not any("lastmile_session" in c for c in reply.cookies)


# What the refusal page says, per language: why the form was refused, and where it leads.
BEFORE_LAST_LOGIN = {"zh-CN": "上次登录之前", "en": "before your last login"}
LOGIN_PAGE_OUT_OF_DATE = {"zh-CN": "登录页面已过期", "en": "the login page was out of date"}
NOT_FROM_THIS_CONSOLE = {"zh-CN": "不是由本控制台的页面发送的", "en": "not sent by a page of this console"}


@pytest.mark.parametrize("language", ["zh-CN", "en"])
def test_a_login_refused_then_sent_again_without_the_login_pages_token_is_not_said_to_predate_a_login(
    console: ConsoleServer, language: str
) -> None:
    """A wrong password re-shows the login form; the browser closed in between (its session
    cookies, the login page's token among them, gone) and the form sent again: the refusal said the
    page "was opened before your last login" to someone who never logged in."""
    visitor = Client(console.url, language=language)
    visitor.get("/login")
    assert visitor.post("/login", {"name": DOCTOR[0], "password": "wrong"}).status == 401
    visitor.jar.clear_session_cookies()  # the browser closed and its tab restored
    refused = visitor.post("/login", {"name": DOCTOR[0], "password": DOCTOR[1]})
    assert refused.status == 403 and not any("lastmile_session" in c for c in refused.cookies)
    assert BEFORE_LAST_LOGIN[language] not in refused.body, refused.body
    assert LOGIN_PAGE_OUT_OF_DATE[language] in refused.body, refused.body
    assert 'class="button primary" href="/login"' in refused.body, refused.body
    assert visitor.get("/login").status == 200  # the way on: a fresh login page, and it logs in
    assert visitor.post("/login", {"name": DOCTOR[0], "password": DOCTOR[1]}).status == 303


@pytest.mark.parametrize("language", ["zh-CN", "en"])
def test_a_form_from_a_page_opened_before_the_login_is_said_to_be_so(console: ConsoleServer, language: str) -> None:
    doctor = Client(console.url, language=language)
    doctor.get("/login")
    opened_before = doctor.csrf  # a second tab still shows the login page
    doctor.login()
    refused = doctor.post("/login", {"name": DOCTOR[0], "password": DOCTOR[1], "csrf": opened_before}, csrf=False)
    assert refused.status == 403 and BEFORE_LAST_LOGIN[language] in refused.body, refused.body
    assert 'class="button primary" href="/today"' in refused.body, refused.body


@pytest.mark.parametrize("language", ["zh-CN", "en"])
def test_a_form_posted_from_another_site_is_not_said_to_predate_a_login(console: ConsoleServer, language: str) -> None:
    """The right token, posted from another site's page: no page of the console was out of date."""
    doctor = Client(console.url, language=language)
    doctor.login()
    refused = doctor.post("/today/end-session", headers={"Origin": "http://evil.example"})
    assert refused.status == 403 and BEFORE_LAST_LOGIN[language] not in refused.body, refused.body
    assert NOT_FROM_THIS_CONSOLE[language] in refused.body, refused.body


# What the other refusals say, per language: their real cause and what to do.
LOGIN_EXPIRED = {"zh-CN": "登录已过期", "en": "Your login has expired"}
TOO_LONG = {"zh-CN": "表单太长", "en": "the form was too long"}
SHORTEN = {"zh-CN": "缩短", "en": "shorten"}
NOT_A_PAGE_FORM = {"zh-CN": "格式不是本控制台页面的表单格式", "en": "not in the format of this console"}


def forget_the_login(client: Client) -> None:
    """What the idle timeout, or a browser closed and its tab restored, leaves: no live login."""
    for cookie in [c for c in client.jar if c.name == "lastmile_session"]:
        client.jar.clear(cookie.domain, cookie.path, cookie.name)


@pytest.mark.parametrize("language", ["zh-CN", "en"])
def test_the_language_button_after_the_login_expired_says_so_and_leads_to_the_login(
    console: ConsoleServer, language: str
) -> None:
    """Today left open overnight, then the language button: the doctor read "the login page was
    out of date" (登录页面已过期) though she was on Today, not the login page."""
    doctor = Client(console.url, language=language)
    doctor.login()
    doctor.get("/today")
    forget_the_login(doctor)
    other = "en" if language == "zh-CN" else "zh-CN"
    refused = doctor.post("/language", {"language": other, "next": "/today"})
    assert LOGIN_PAGE_OUT_OF_DATE[language] not in refused.body, refused.body
    assert refused.status == 401 and LOGIN_EXPIRED[language] in refused.body, refused.body
    assert 'class="button primary" href="/login?next=/today"' in refused.body, refused.body


@pytest.mark.parametrize("language", ["zh-CN", "en"])
def test_a_form_too_large_says_so_and_what_to_do(console: ConsoleServer, language: str) -> None:
    """A form over 16 KB read "it was not sent by a page of this console": the doctor who typed
    it learns nothing she can change. Now: too long, shorten it."""
    doctor = Client(console.url, language=language)
    doctor.login()
    refused = doctor.post("/today/check-in", {"patient_id": PATIENT_ID, "name": "张" * 6000})
    assert NOT_FROM_THIS_CONSOLE[language] not in refused.body, refused.body
    assert refused.status == 403 and TOO_LONG[language] in refused.body, refused.body
    assert SHORTEN[language] in refused.body, refused.body
    assert PATIENT_ID in doctor.get("/today").body  # nothing else changed


@pytest.mark.parametrize("language", ["zh-CN", "en"])
def test_a_form_not_urlencoded_says_its_format_was_not_a_console_form(console: ConsoleServer, language: str) -> None:
    """A multipart post (a file upload, or a program) read "not sent by a page of this console", as
    if from another site: it says the format was not the console's."""
    doctor = Client(console.url, language=language)
    doctor.login()
    refused = doctor.post("/today/end-session", headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert NOT_FROM_THIS_CONSOLE[language] not in refused.body, refused.body
    assert refused.status == 403 and NOT_A_PAGE_FORM[language] in refused.body, refused.body
    assert PATIENT_ID in doctor.get("/today").body


def test_session_cookie_flags(console: ConsoleServer) -> None:
    client = Client(console.url)
    reply = client.login()
    cookie = next(c for c in reply.cookies if c.startswith("lastmile_session="))
    flags = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")[1:]}
    assert "httponly" in flags and "secure" in flags
    assert flags["samesite"].lower() == "samesite=strict" and flags["path"] == "Path=/"
    assert "max-age" not in flags and "expires" not in flags  # ends with the browser


def test_security_headers(console: ConsoleServer) -> None:
    client = Client(console.url)
    client.login()
    reply = client.get("/today")
    assert "script-src 'self'" in reply.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
    assert reply.headers["cache-control"] == "no-store" and reply.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in reply.body and "onclick" not in reply.body  # nothing inline the CSP would block


def test_lockout_after_repeated_failures(tmp_path: Path) -> None:
    config = console_config(tmp_path / "data")
    config.console.max_login_failures = 3
    with running_console(config) as server:
        client = Client(server.url)
        for _ in range(3):
            client.get("/login")
            reply = client.post("/login", {"name": DOCTOR[0], "password": "guess"})
            assert reply.status == 401
        client.get("/login")
        reply = client.post("/login", {"name": DOCTOR[0], "password": DOCTOR[1]})  # right, but locked
        assert reply.status == 401 and "锁定" in reply.body
        assert not any("lastmile_session" in c for c in reply.cookies)
        # unlocking from the command line lets them in again, and the trail says who failed when
        proc = subprocess.run(
            [sys.executable, "-m", "lastmile", "user", "unlock", DOCTOR[0], "--data-dir", str(config.data_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        client.login()
        from lastmile.clinic.db import open_clinic_db
        from lastmile.console.audit import AuditLog

        db = open_clinic_db(config.data_dir)
        try:
            actions = [e.action for e in AuditLog(db).recent(20)]
        finally:
            db.conn.close()
        assert actions.count("login-failed") == 4 and actions[0] == "login" and "user-unlock" in actions


def _as_seen_from_outside(reply: Reply, name: str) -> tuple[int, str]:
    """The status and page of a refused login, without what differs by design: the name typed
    (echoed back into the form) and the form's own random CSRF token."""
    page = re.sub(r'name="csrf" value="[^"]*"', 'name="csrf" value="-"', reply.body)
    return reply.status, page.replace(name, "NAME")


def test_a_wrong_password_does_not_tell_whether_the_name_exists(tmp_path: Path) -> None:
    """Typing names at the login page must not tell which accounts exist: a real name and an
    unknown one get the same page and status, try after try, up to and through the lockout."""
    config = console_config(tmp_path / "data")
    config.console.max_login_failures = 3
    with running_console(config) as server:
        real, unknown = Client(server.url), Client(server.url)
        for _ in range(4):
            seen = []
            for client, name in ((real, DOCTOR[0]), (unknown, "李医生")):
                client.get("/login")
                reply = client.post("/login", {"name": name, "password": "guess 1234"})
                seen.append(_as_seen_from_outside(reply, name))
            assert seen[0] == seen[1]
        assert seen[0][0] == 401 and "锁定" in seen[0][1]  # the real account did lock
        real.get("/login")
        reply = real.post("/login", {"name": DOCTOR[0], "password": DOCTOR[1]})  # right, but locked
        assert reply.status == 401 and "锁定" in reply.body


def test_a_restart_does_not_tell_whether_the_name_exists(tmp_path: Path) -> None:
    """The count of wrong passwords is kept alike for a real name and an unknown one: after a
    console restart on the same data, "tries left" is the same for both (else the names that
    kept their count are the real accounts)."""
    config = console_config(tmp_path / "data")
    config.console.max_login_failures = 4
    names = (DOCTOR[0], "李医生")

    def fail_each() -> list[tuple[int, str]]:
        seen = []
        for name in names:
            client = Client(server.url)
            client.get("/login")
            seen.append(_as_seen_from_outside(client.post("/login", {"name": name, "password": "guess 1234"}), name))
        return seen

    with running_console(config) as server:
        fail_each()
        fail_each()
    with running_console(config) as server:
        real, unknown = fail_each()
    assert real == unknown
    assert real[0] == 401 and "再输错 1 次" in real[1]  # 3 of 4 counted, across the restart


def test_plain_http_only_on_loopback(tmp_path: Path) -> None:
    config = console_config(tmp_path / "data")
    config.console.listen = "0.0.0.0:8443"
    config.console.https = False
    with pytest.raises(ConfigError, match="loopback only"):
        parse_listen(config)
    config.console.listen = "192.168.1.10:8080"
    with pytest.raises(ConfigError, match="loopback only"):
        parse_listen(config)
    config.console.https = True
    assert parse_listen(config).port == 8080
    config.console.listen = "nonsense"
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_listen(config)
    # the service refuses such a configuration; the page that says so listens where the defaults
    # say (HTTPS), never in plain HTTP off loopback (tests/test_console_refused.py)
    config_file = tmp_path / "lastmile.toml"
    config_file.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[console]\nlisten = "0.0.0.0:18080"\nhttps = false\n'
    )
    with pytest.raises(ConfigError, match="loopback only"):
        load_config(config_file)
    salvaged = salvage_console_config(config_file)
    assert (salvaged.console.listen, salvaged.console.https) == ("0.0.0.0:8443", True)


def test_a_loopback_console_refuses_foreign_hosts(console: ConsoleServer) -> None:
    """Plain HTTP answers loopback names only: a DNS-rebinding page cannot read it."""
    client = Client(console.url)
    assert client.get("/login", headers={"Host": "evil.example"}).status == 403
    assert client.get("/login").status == 200


def test_https_with_a_certificate_made_at_first_start(tmp_path: Path) -> None:
    config = console_config(tmp_path / "data", https=True)
    assert existing_certificate(config.data_dir) is None
    with running_console(config) as server:
        assert server.url.startswith("https://")
        cert = existing_certificate(config.data_dir)
        assert cert is not None
        assert (cert.key_path.stat().st_mode & 0o777) == 0o600
        host, port = server.url.removeprefix("https://").split(":")
        # the certificate the server presents is the one whose fingerprint doctor shows
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection((host, int(port)), timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
        import hashlib

        presented = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
        assert presented == cert.fingerprint == fingerprint_of(cert.cert_path)
        client = Client(server.url)
        reply = client.login()
        cookie = next(c for c in reply.cookies if c.startswith("lastmile_session="))
        assert "Secure" in cookie
        assert client.get("/today").headers["strict-transport-security"].startswith("max-age=")
        # plain HTTP to the HTTPS port gets no page
        with socket.create_connection((host, int(port)), timeout=30) as raw:
            raw.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            raw.settimeout(30)
            try:
                answer = raw.recv(4096)
            except (ConnectionResetError, TimeoutError):
                answer = b""
        assert b"<html" not in answer
    # the second start keeps the same certificate (the clinic checked its fingerprint once)
    with running_console(config):
        again = existing_certificate(config.data_dir)
        assert again is not None and again.fingerprint == cert.fingerprint
    # and `lastmile doctor` shows it
    proc = subprocess.run(
        [sys.executable, "-m", "lastmile", "doctor", "--offline", "--json", "--data-dir", str(config.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cert.fingerprint in proc.stdout
