"""`lastmile console` with a refused configuration: the page that says so, as a real process.

A broken lastmile.toml stops every service (exit 78). The console alone stays up, on what can be
salvaged of [console], and answers every request with a 503 page in Chinese (English on request),
no login, the error for the technician; it ends by itself (exit 75: systemd starts the real
console) once the file loads. Real processes, a real notify socket, real HTTP(S).
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lastmile.config import ConfigError, salvage_console_config
from lastmile.console.refused import CHECK_AGAIN_S, CONFIG_CHECK_S, SETTLE_S, RefusedConsole
from lastmile.console.tls import existing_certificate
from lastmile.demo.loopback import free_port
from lastmile.services.runtime import EXIT_CONFIG, EXIT_OK, EXIT_RESTART, RestartRequested
from tests.console_harness import Client

WAIT_S = 60.0
UNKNOWN_KEY = "[outbox]\nbogus_key = 1\n"  # refused: an unknown key, line 9 of the file below


def write_config(path: Path, data_dir: Path, port: int, *, https: bool = False, extra: str = UNKNOWN_KEY) -> None:
    path.write_text(
        f'[gateway]\ndata_dir = "{data_dir}"\n[gps]\nsource = "none"\n'
        f'[console]\nlisten = "127.0.0.1:{port}"\nhttps = {"true" if https else "false"}\n' + extra
    )


class RefusedConsoleProcess:
    """`lastmile console` started on a refused file, with systemd's notify socket."""

    def __init__(self, tmp_path: Path, *, https: bool = False) -> None:
        self.port = free_port()
        self.data_dir = tmp_path / "data"
        self.config_file = tmp_path / "lastmile.toml"
        write_config(self.config_file, self.data_dir, self.port, https=https)
        self.url = f"{'https' if https else 'http'}://127.0.0.1:{self.port}"
        self.manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.manager.bind(str(tmp_path / "notify.sock"))
        self.manager.settimeout(WAIT_S)
        self.messages: list[str] = []
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
            "WATCHDOG_USEC": "4000000",
            "WATCHDOG_PID": "",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lastmile", "-c", str(self.config_file), "console"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_for(self, text: str) -> str:
        """The first notification holding `text` (READY=1, STATUS=...)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for message in self.messages:
                if text in message:
                    return message
            self.messages.append(self.manager.recv(4096).decode())
        raise AssertionError(f"no {text!r} in {self.messages}")

    def end(self, timeout: float = WAIT_S) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.manager.close()


@pytest.fixture
def refused(tmp_path: Path) -> Iterator[RefusedConsoleProcess]:
    console = RefusedConsoleProcess(tmp_path)
    try:
        yield console
    finally:
        console.close()


def test_every_path_answers_503_with_the_page_in_chinese(refused: RefusedConsoleProcess) -> None:
    ready = refused.wait_for("READY=1")
    # systemctl status and lastmile doctor still read that the configuration is refused
    assert "STATUS=configuration refused: " in ready and "unknown key 'outbox.bogus_key'" in ready, ready
    client = Client(refused.url)
    for method, path in (("GET", "/"), ("GET", "/login"), ("GET", "/patients/110101199003071234"), ("POST", "/login")):
        reply = client.request(method, path, form={"name": "x"} if method == "POST" else None)
        assert reply.status == 503, (method, path, reply.status)
        assert reply.headers["retry-after"] == str(CHECK_AGAIN_S) and reply.headers["cache-control"] == "no-store"
        assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
        assert "网关配置文件有错误" in reply.body and "请告知县信息科" in reply.body, reply.body
        assert "修好之前，网关不会记录设备的测量结果，也不会发送到县里" in reply.body
        assert "之前记录的测量结果和心电图都安全保存在网关中" in reply.body
        assert "修好之后，本页会自动回到网关控制台" in reply.body
        # asks again by itself: console.js (data-until-fixed), a refresh without script
        assert f'data-until-fixed="{CHECK_AGAIN_S}"' in reply.body
        assert f'<noscript><meta http-equiv="refresh" content="{CHECK_AGAIN_S}"></noscript>' in reply.body
        assert not reply.cookies  # no login, no session: nothing behind the page is trusted
    # the error for the technician, escaped (a file's text is no markup)
    body = client.get("/").body
    assert f"{refused.config_file}:9: unknown key &#39;outbox.bogus_key&#39;" in body, body
    assert Client(refused.url).request("HEAD", "/").status == 503
    # its look: the console's own stylesheet is served
    assert client.get("/static/console.css").status == 200


def test_english_when_the_browser_asks_for_it(refused: RefusedConsoleProcess) -> None:
    refused.wait_for("READY=1")
    page = Client(refused.url, language="en-GB,en;q=0.9").get("/today").body
    assert "The gateway&#39;s settings file has an error" in page and 'lang="en"' in page, page
    assert "Please tell the county IT." in page
    # and by the link on the page (a shared tablet's browser may say Chinese)
    page = Client(refused.url).get("/?lang=en").body
    assert "The gateway&#39;s settings file has an error" in page
    assert 'href="?lang=zh-CN"' in page


def test_sigterm_ends_it_cleanly(refused: RefusedConsoleProcess) -> None:
    refused.wait_for("READY=1")
    refused.proc.send_signal(signal.SIGTERM)
    code, out = refused.end()
    assert code == EXIT_OK, out


def test_a_fixed_file_brings_the_real_console_back_by_itself(refused: RefusedConsoleProcess) -> None:
    """No SIGHUP: the console sees the file change within seconds and exits for systemd to start
    the real one (Restart=on-failure; 78 alone is not restarted)."""
    refused.wait_for("READY=1")
    # edited but still refused: keeps serving, the new error shown
    write_config(refused.config_file, refused.data_dir, refused.port, extra="[outbox]\nmin_free_mb = -3\n")
    deadline = time.monotonic() + WAIT_S
    while "outbox.min_free_mb" not in (body := Client(refused.url).get("/").body) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "outbox.min_free_mb" in body and "bogus_key" not in body, body
    assert refused.proc.poll() is None
    write_config(refused.config_file, refused.data_dir, refused.port, extra="")
    began = time.monotonic()
    code, out = refused.end()
    assert code == EXIT_RESTART, out
    assert time.monotonic() - began < 15, out
    assert "configuration accepted: restarting into the console" in out


def test_sighup_after_the_fix_restarts_it(refused: RefusedConsoleProcess) -> None:
    refused.wait_for("READY=1")
    write_config(refused.config_file, refused.data_dir, refused.port, extra="")
    refused.proc.send_signal(signal.SIGHUP)
    code, out = refused.end()
    assert code == EXIT_RESTART, out


class _Alive:
    """Stands in for the page's server thread: the step checks that the page still answers."""

    def is_alive(self) -> bool:
        return True


def test_a_changed_file_is_read_only_once_it_stays_as_it_is(tmp_path: Path) -> None:
    """An editor writing lastmile.toml in place: a half-written file that happens to load must not
    become the console's configuration; a rename over the file (another inode, same size and
    time) is an edit too."""
    path = tmp_path / "lastmile.toml"
    write_config(path, tmp_path / "data", 9443)
    config = salvage_console_config(path)
    read: list[str] = []

    def load() -> object:
        read.append(path.read_text())
        if "bogus_key" in read[-1]:
            raise ConfigError(f"{path}:9: unknown key 'outbox.bogus_key'")
        return config

    console = RefusedConsole(config, ConfigError("refused"), load_config=load)
    console.thread = _Alive()  # type: ignore[assignment]
    stop = threading.Event()
    assert console.step(stop) == CONFIG_CHECK_S and read == []  # unchanged: not read again
    whole = path.read_text().replace(UNKNOWN_KEY, "")
    path.write_text(whole[: whole.index("[console]")])  # half written, and valid TOML
    assert console.step(stop) == SETTLE_S and read == []
    path.write_text(whole)  # the rest of it, before the next look
    assert console.step(stop) == SETTLE_S and read == []
    with pytest.raises(RestartRequested):
        console.step(stop)
    assert read == [whole]  # the whole file, read once

    # a rename over the file: same size and modification time, another inode (what was read
    # last is the whole file above: unchanged, it is not read again)
    assert console.step(stop) == CONFIG_CHECK_S
    other = tmp_path / "lastmile.toml.new"
    other.write_text(whole.replace("9443", "9444"))
    stamp = path.stat()
    os.utime(other, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    os.replace(other, path)
    assert console.step(stop) == SETTLE_S


def test_when_the_page_cannot_listen_either_it_exits_78(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    config_file = tmp_path / "lastmile.toml"
    write_config(config_file, tmp_path / "data", taken.getsockname()[1])
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lastmile", "-c", str(config_file), "console"],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
    finally:
        taken.close()
    assert proc.returncode == EXIT_CONFIG, proc.stdout + proc.stderr
    assert "configuration refused" in proc.stdout + proc.stderr


def test_over_https_with_the_consoles_own_certificate(tmp_path: Path) -> None:
    console = RefusedConsoleProcess(tmp_path, https=True)
    try:
        console.wait_for("READY=1")
        reply = Client(console.url).get("/")
        assert reply.status == 503 and "网关配置文件有错误" in reply.body
        assert reply.headers["strict-transport-security"].startswith("max-age=")
        # the certificate the real console makes and keeps (the browsers trust it once, not twice)
        certificate = existing_certificate(console.data_dir)
        assert certificate is not None
        served = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", console.port)))
        assert served == ssl.PEM_cert_to_DER_cert(certificate.cert_path.read_text())
    finally:
        console.close()


# -- what is salvaged ------------------------------------------------------------------------------


def test_the_console_settings_are_salvaged_one_by_one(tmp_path: Path) -> None:
    path = tmp_path / "lastmile.toml"
    path.write_text(
        '[gateway]\ndata_dir = "/srv/lastmile"\nid = 7\n'
        '[console]\nlisten = "127.0.0.1:9443"\nhttps = false\nlanguage = "en"\nsession_idle_s = "soon"\n'
    )
    config = salvage_console_config(path)
    assert (config.console.listen, config.console.https, config.console.language) == ("127.0.0.1:9443", False, "en")
    assert str(config.data_dir) == "/srv/lastmile" and config.source == str(path)
    # a value of the wrong kind or meaning: that one from the defaults, the others kept
    path.write_text('[gateway]\ndata_dir = "relative/dir"\n[console]\nlisten = 8443\nlanguage = "fr"\n')
    config = salvage_console_config(path)
    assert (config.console.listen, config.console.https, config.console.language) == ("0.0.0.0:8443", True, "zh-CN")
    assert str(config.data_dir) == "/var/lib/lastmile"


def test_plain_http_stays_on_loopback_even_for_the_refused_page(tmp_path: Path) -> None:
    path = tmp_path / "lastmile.toml"
    path.write_text('[console]\nlisten = "0.0.0.0:18080"\nhttps = false\n')
    config = salvage_console_config(path)
    assert (config.console.listen, config.console.https) == ("0.0.0.0:8443", True)


def test_a_file_that_is_not_toml_gives_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "lastmile.toml"
    path.write_text('[console\nlisten = "127.0.0.1:9443"\n')
    config = salvage_console_config(path)
    assert (config.console.listen, config.console.https, str(config.data_dir)) == (
        "0.0.0.0:8443",
        True,
        "/var/lib/lastmile",
    )
    path.write_bytes(b"\xff\xfe not utf-8")
    assert salvage_console_config(path).console.listen == "0.0.0.0:8443"


@pytest.mark.timeout(300)
def test_the_page_in_a_real_browser_on_a_tablet_and_a_phone(refused: RefusedConsoleProcess) -> None:
    """Debian's Chromium: the Chinese page renders (its stylesheet loaded under the CSP), fits a
    phone without sideways scrolling, and switches to English by its link."""
    from selenium.webdriver.common.by import By

    from tests.console_browser import PHONE, TABLET, chromium, save_screenshot, set_viewport, text_in

    refused.wait_for("READY=1")
    with chromium() as browser:
        browser.get(refused.url + "/today")  # type: ignore[attr-defined]
        assert browser.find_element(By.TAG_NAME, "h1").text == "网关配置文件有错误"  # type: ignore[attr-defined]
        # styled: the console's stylesheet applied (its card), not a bare page
        card = browser.find_element(By.CSS_SELECTOR, ".card")  # type: ignore[attr-defined]
        assert card.value_of_css_property("border-top-style") != "none" or card.value_of_css_property(
            "background-color"
        ) not in ("rgba(0, 0, 0, 0)", "transparent")
        set_viewport(browser, TABLET)
        save_screenshot(browser, "refused-configuration-tablet")
        set_viewport(browser, PHONE)
        fits = browser.execute_script(  # type: ignore[attr-defined]
            "return document.documentElement.scrollWidth <= window.innerWidth"
        )
        assert fits, "the phone must not scroll sideways"
        save_screenshot(browser, "refused-configuration-phone")
        browser.find_element(By.LINK_TEXT, "English").click()  # type: ignore[attr-defined]
        # the English page, once it has replaced this one (reading at once could read the old page)
        text_in(browser, "h1", "The gateway's settings file has an error")
        save_screenshot(browser, "refused-configuration-phone-en")


@pytest.mark.timeout(300)
def test_the_open_page_turns_into_the_console_by_itself_across_the_restart(
    refused: RefusedConsoleProcess,
) -> None:
    """The doctor's tab, left open on the page: the file is fixed, the page's process ends, for a
    while nothing listens (systemd's RestartSec, or the whole gateway rebooting), then the real
    console starts. The tab must become the console without anyone touching it - not stay on the
    error, and not land on the browser's own "cannot connect" page, which never comes back."""
    from selenium.webdriver.common.by import By

    from tests.console_browser import chromium, save_screenshot

    def refused_error(browser: object) -> str:
        return browser.find_element(By.ID, "refused-error").text  # type: ignore[attr-defined]

    refused.wait_for("READY=1")
    with chromium() as browser:
        browser.get(refused.url + "/today")  # type: ignore[attr-defined]
        assert browser.find_element(By.TAG_NAME, "h1").text == "网关配置文件有错误"  # type: ignore[attr-defined]
        # still refused for another reason: the open page shows the newest error by itself
        write_config(refused.config_file, refused.data_dir, refused.port, extra="[outbox]\nmin_free_mb = -3\n")
        deadline = time.monotonic() + WAIT_S
        while "outbox.min_free_mb" not in (shown := refused_error(browser)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "outbox.min_free_mb" in shown and "bogus_key" not in shown, shown
        write_config(refused.config_file, refused.data_dir, refused.port, extra="")
        code, out = refused.end()
        assert code == EXIT_RESTART, out
        time.sleep(CHECK_AGAIN_S * 1.5)  # the page asked at least once while nothing answered
        assert browser.find_element(By.TAG_NAME, "h1").text == "网关配置文件有错误"  # type: ignore[attr-defined]
        console = subprocess.Popen(
            [sys.executable, "-m", "lastmile", "-c", str(refused.config_file), "console"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + WAIT_S + CHECK_AGAIN_S
            while time.monotonic() < deadline:
                if "/login" in browser.current_url:  # type: ignore[attr-defined]
                    break
                time.sleep(0.5)
            save_screenshot(browser, "refused-configuration-then-console")
            assert "/login" in browser.current_url, browser.current_url  # type: ignore[attr-defined]
            assert browser.find_element(By.TAG_NAME, "h1").text == "登录"  # type: ignore[attr-defined]
        finally:
            console.terminate()
            console.communicate(timeout=WAIT_S)
