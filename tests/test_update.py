"""`lastmile update` (issue 18 item 4): bundles from the county's HTTPS index or a USB stick.

Real parts: bundles made and signed by image/rauc/make-bundle with make-test-pki's throwaway county
CA; a real HTTPS server on loopback (http.server + ssl, a test CA from tests/tls_material) that
honours ETag/If-None-Match and Range and can cut a download short; real `rauc info` with the
gateway's own system.conf verifying every bundle against the keyring; real `rauc install` through
a real `rauc service` on a private D-Bus (plain bundles: this host has no device-mapper for verity
ones), with the no-op bootloader, or with RAUC's uboot backend on the miniature A/B card that real
U-Boot boots (tests/system/ab_card.py) for the power cuts during an install; without the service,
`rauc install` fails, typed, and the bundle is kept for the next round. The whole image's update
and rollback is the booted qemu test's (tests/system/test_ab_boot_update.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lastmile.cli import main
from lastmile.config import Config, parse_config
from lastmile.services.update import (
    BOOT_VERDICTS_FILE,
    STATE_FILE,
    UPDATES_DIR,
    Outcome,
    Updater,
    UpdateState,
    busy_reason,
    read_state,
)
from tests.conftest import REPO, require_tool
from tests.tls_material import TlsMaterial, make_tls_material

RAUC_DIR = REPO / "image" / "rauc"
SYSTEM_CONF_TEXT = (RAUC_DIR / "system.conf").read_text()


def run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], capture_output=True, text=True, check=True, timeout=300)


# -- bundles (real make-bundle, real PKI) -----------------------------------------------------------


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """county-0.2.0, county-0.3.0 (the county's), foreign-0.3.0 (another county's CA)."""
    for tool in ("openssl", "rauc", "mksquashfs", "mkfs.ext4"):
        require_tool(tool)
    work = tmp_path_factory.mktemp("bundles")
    for name in ("county", "foreign"):
        run(RAUC_DIR / "make-test-pki", work / name, f"Lastmile {name} test")
    made: dict[str, Path] = {}
    for name, version in (("county", "0.2.0"), ("county", "0.3.0"), ("foreign", "0.3.0")):
        tree = work / f"tree-{name}-{version}"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "lastmile-release").write_text(f"{version}\n")
        (tree / "noise").write_bytes(os.urandom(300_000))  # squashfs cannot shrink it: a real-sized payload
        rootfs = work / f"rootfs-{name}-{version}.ext4"
        run("mkfs.ext4", "-q", "-d", tree, rootfs, "8M")
        pki = work / name
        out = work / f"{name}-{version}.raucb"
        run(
            RAUC_DIR / "make-bundle", rootfs, version, pki / "signing.cert.pem", pki / "signing.key.pem",
            pki / "ca.cert.pem", out,
        )  # fmt: skip
        made[f"{name}-{version}"] = out
        made[f"rootfs-{name}-{version}"] = rootfs
    made["keyring"] = work / "county" / "ca.cert.pem"
    made["county-pki"] = work / "county"
    return made


# -- the county's update server (real HTTPS on loopback) ---------------------------------------------


@dataclass
class Served:
    method: str
    path: str
    status: int
    range: str
    sent: int  # body bytes written


@dataclass
class CountyServer:
    """Files by path; ETag = sha256 of the content; `cut_after[path]` closes the connection after
    that many body bytes once (a 4G link dropping mid-download)."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)
    served: list[Served] = field(default_factory=list)
    port: int = 0

    def publish(self, bundle: Path, version: str, name: str = "bundle.raucb") -> None:
        data = bundle.read_bytes()
        self.files[f"/lastmile/{name}"] = data
        index = {"version": version, "bundle": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        self.files["/lastmile/stable.json"] = json.dumps(index).encode()

    @property
    def index_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/lastmile/stable.json"

    def bundle_bytes_sent(self) -> int:
        return sum(s.sent for s in self.served if s.path.endswith(".raucb"))


def _handler(server: CountyServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            data = server.files.get(self.path)
            range_header = self.headers.get("Range", "")
            if data is None:
                return self._answer(404, b"", range_header)
            etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
            if self.headers.get("If-None-Match") == etag:
                return self._answer(304, b"", range_header, etag=etag)
            first, _, last = range_header.removeprefix("bytes=").partition("-")
            start, end = int(first or 0), min(int(last or len(data) - 1), len(data) - 1)
            if start >= len(data) > 0:
                return self._answer(416, b"", range_header, extra={"Content-Range": f"bytes */{len(data)}"})
            body = data[start : end + 1]
            extra = {"Content-Range": f"bytes {start}-{end}/{len(data)}"} if range_header else {}
            self._answer(206 if range_header else 200, body, range_header, etag=etag, extra=extra)

        def _answer(
            self, status: int, body: bytes, range_header: str, *, etag: str = "", extra: dict[str, str] | None = None
        ) -> None:
            self.send_response(status)
            for key, value in {"ETag": etag, **(extra or {})}.items():
                if value:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = server.cut_after.pop(self.path, None)
            sent = body if cut is None else body[:cut]
            self.wfile.write(sent)
            server.served.append(Served("GET", self.path, status, range_header, len(sent)))
            if cut is not None:
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)

    return Handler


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def county(tls: TlsMaterial) -> Iterator[CountyServer]:
    yield from _serve(tls.server_cert, tls.server_key)


def _serve(cert: Path, key: Path) -> Iterator[CountyServer]:
    state = CountyServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=30)


def gateway(tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, url: str = "", **extra: str) -> Config:
    """A gateway whose update settings point at the test county (its CA, its keyring)."""
    usb = tmp_path / "stick"
    usb.mkdir(exist_ok=True)
    lines = [
        "[gateway]",
        f'data_dir = "{tmp_path / "data"}"',
        "[outbox]",
        f"min_free_mb = {extra.pop('min_free_mb', '0')}",
        "[usb_import]",
        f'folders = ["{usb}"]',
        "[update]",
        "enabled = true",
        f'url = "{url}"' if url else "",
        f'ca_file = "{tls.ca_cert}"',
        f'rauc_conf = "{RAUC_DIR / "system.conf"}"',
        f'keyring = "{bundles["keyring"]}"',
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    path = tmp_path / "lastmile.toml"
    path.write_text("\n".join(lines) + "\n")
    return parse_config(path.read_text(), str(path))


def updates_dir(config: Config) -> Path:
    return config.data_dir / UPDATES_DIR


# -- the county's index over HTTPS --------------------------------------------------------------------


def test_a_new_bundle_is_downloaded_verified_by_rauc_and_handed_to_rauc_install(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, county: CountyServer
) -> None:
    county.publish(bundles["county-0.3.0"], "0.3.0")
    config = gateway(tmp_path, bundles, tls, county.index_url)
    result = Updater(config).run()
    # rauc info accepted it (signature, purpose, compatible); rauc install is what failed here:
    # this host runs no rauc D-Bus service. Typed, recorded, and the verified bundle kept for a retry.
    assert result.outcome is Outcome.INSTALL_FAILED, result
    assert "rauc install failed" in result.message and "D-Bus" in result.message
    kept = list(updates_dir(config).glob("*.raucb"))
    assert [p.read_bytes() for p in kept] == [bundles["county-0.3.0"].read_bytes()]
    state = read_state(config.data_dir)
    assert state is not None and state.last_result["outcome"] == "install-failed" and not state.refused
    # the next round asks the index conditionally (304) and retries the install without a new download
    sent = county.bundle_bytes_sent()
    assert Updater(config, clock=lambda: 1e10).run().outcome is Outcome.INSTALL_FAILED
    assert county.bundle_bytes_sent() == sent == len(bundles["county-0.3.0"].read_bytes())
    assert [s.status for s in county.served if s.path.endswith(".json")] == [200, 304]


def _polling_foreign_bundle(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, county: CountyServer, interval_h: str
) -> tuple[Config, Updater, list[float]]:
    """A gateway polling a county index that offers another county's bundle (refused once, then
    nothing new), on a clock the test moves: (config, updater, [now])."""
    county.publish(bundles["foreign-0.3.0"], "0.3.0")
    config = gateway(tmp_path, bundles, tls, county.index_url, poll_interval_h=interval_h)
    now = [1000.0]
    return config, Updater(config, clock=lambda: now[0]), now


def test_an_unchanged_index_is_asked_conditionally_and_nothing_is_downloaded_again(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, county: CountyServer
) -> None:
    config, updater, now = _polling_foreign_bundle(tmp_path, bundles, tls, county, "1.0")
    first = updater.run()
    assert first.outcome is Outcome.REFUSED
    assert "unable to get local issuer certificate" in first.message  # real rauc, another county's CA
    for _ in range(3):
        now[0] += 3601
        assert updater.run().outcome is Outcome.UP_TO_DATE
    index = [s.status for s in county.served if s.path.endswith(".json")]
    assert index == [200, 304, 304, 304]
    assert county.bundle_bytes_sent() == len(bundles["foreign-0.3.0"].read_bytes())  # once, never again
    assert not list(updates_dir(config).glob("*.raucb*"))  # the refused bundle is not kept


def test_the_poll_interval_keeps_the_index_from_being_asked_every_round(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, county: CountyServer
) -> None:
    _, updater, now = _polling_foreign_bundle(tmp_path, bundles, tls, county, "6.0")
    for at in (1000.0, 1000.0 + 5 * 3600, 1000.0 + 6 * 3600):
        now[0] = at
        updater.run()
    assert [s.status for s in county.served if s.path.endswith(".json")] == [200, 304]


def test_quiet_rounds_do_not_rewrite_the_state_file_on_the_card(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, county: CountyServer
) -> None:
    """The timer's round every 10 minutes with nothing new writes the state (and its fsync) only
    when something changed, or when the round time it records is 6 hours old."""
    config, updater, now = _polling_foreign_bundle(tmp_path, bundles, tls, county, "24.0")
    assert updater.run().outcome is Outcome.REFUSED
    path = updates_dir(config) / "state.json"

    def written() -> tuple[int, float]:  # each save replaces the file: a new inode
        state = read_state(config.data_dir)
        assert state is not None
        return path.stat().st_ino, state.last_result["at"]

    now[0] += 600
    assert updater.run().outcome is Outcome.UP_TO_DATE
    first = written()
    for _ in range(5):
        now[0] += 600
        assert updater.run().outcome is Outcome.UP_TO_DATE
        assert written() == first
    now[0] = first[1] + 6 * 3600
    assert updater.run().outcome is Outcome.UP_TO_DATE
    assert written()[1] == now[0] and written()[0] != first[0]


def test_one_refused_bundle_never_blocks_the_next_good_one(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, county: CountyServer
) -> None:
    config = gateway(tmp_path, bundles, tls, county.index_url)
    county.publish(bundles["foreign-0.3.0"], "0.3.0")
    assert Updater(config).run(url=county.index_url).outcome is Outcome.REFUSED
    county.publish(bundles["county-0.3.0"], "0.3.0")  # the county replaces it: a new ETag
    result = Updater(config).run(url=county.index_url)
    assert result.outcome is Outcome.INSTALL_FAILED and "D-Bus" in result.message  # verified; install reached
    state = read_state(config.data_dir)
    assert state is not None and len(state.refused) == 1


def test_a_download_cut_short_resumes_with_a_range_request(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, county: CountyServer
) -> None:
    data = bundles["county-0.3.0"].read_bytes()
    county.publish(bundles["county-0.3.0"], "0.3.0")
    county.cut_after["/lastmile/bundle.raucb"] = 100_000
    config = gateway(tmp_path, bundles, tls, county.index_url)
    first = Updater(config).run()
    assert first.outcome is Outcome.DOWNLOAD_FAILED, first
    assert "resumes next round" in first.message
    parts = list(updates_dir(config).glob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == 100_000
    second = Updater(config).run(url=county.index_url)
    assert second.outcome is Outcome.INSTALL_FAILED  # verified by rauc info: every byte right
    bundle_requests = [(s.status, s.range) for s in county.served if s.path.endswith(".raucb")]
    assert bundle_requests == [(200, ""), (206, "bytes=100000-")]
    assert county.bundle_bytes_sent() == len(data)  # no byte fetched twice
    assert [p.read_bytes() for p in updates_dir(config).glob("*.raucb")] == [data]


def test_a_truncated_bundle_that_claims_to_be_whole_is_refused_by_its_sha256(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, county: CountyServer
) -> None:
    data = bundles["county-0.3.0"].read_bytes()
    county.publish(bundles["county-0.3.0"], "0.3.0")
    county.files["/lastmile/bundle.raucb"] = data[:-5000]  # what the index names is not what is served
    index = json.loads(county.files["/lastmile/stable.json"])
    index["size"] = len(data) - 5000
    county.files["/lastmile/stable.json"] = json.dumps(index).encode()
    config = gateway(tmp_path, bundles, tls, county.index_url)
    result = Updater(config).run()
    assert result.outcome is Outcome.REFUSED and "sha256" in result.message
    assert not list(updates_dir(config).glob("*.raucb*"))


def test_a_bundle_that_would_eat_the_outbox_reserve_is_not_downloaded(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, county: CountyServer
) -> None:
    county.publish(bundles["county-0.3.0"], "0.3.0")
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    config = gateway(tmp_path, bundles, tls, county.index_url, min_free_mb=str(free_mb + 1))
    result = Updater(config).run()
    assert result.outcome is Outcome.NO_SPACE, result
    assert "outbox.min_free_mb" in result.message
    assert result.lines()[0] == "存储空间不足，无法下载更新（测量数据不受影响）", result  # the console's 测量, not 检查
    assert county.bundle_bytes_sent() == 0  # refused before a byte was asked for
    assert not list(updates_dir(config).glob("*.raucb*"))


def test_an_update_server_with_a_certificate_from_another_ca_is_not_trusted(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial
) -> None:
    for rogue in _serve(tls.rogue_cert, tls.rogue_key):
        rogue.publish(bundles["county-0.3.0"], "0.3.0")
        config = gateway(tmp_path, bundles, tls, rogue.index_url)
        result = Updater(config).run()
        assert result.outcome is Outcome.SOURCE_FAILED and "update.ca_file" in result.message
        assert rogue.served == []


@pytest.mark.parametrize(
    ("index", "problem"),
    [
        (b"<html>captive portal</html>", "not JSON"),
        (json.dumps({"version": "1", "bundle": "b.raucb", "sha256": "xyz", "size": 10}).encode(), "64 hex digits"),
        (
            json.dumps({"version": "1", "bundle": "http://x/b.raucb", "sha256": "0" * 64, "size": 10}).encode(),
            "not on https",
        ),
    ],
)
def test_an_index_that_is_not_the_countys_is_a_typed_failure(
    tmp_path: Path,
    bundles: dict[str, Path],
    tls: TlsMaterial,
    county: CountyServer,
    index: bytes,
    problem: str,
) -> None:
    county.files["/lastmile/stable.json"] = index
    result = Updater(gateway(tmp_path, bundles, tls, county.index_url)).run()
    assert result.outcome is Outcome.INDEX_INVALID and problem in result.message


def test_a_metered_link_takes_the_bundle_a_daily_budget_at_a_time(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, county: CountyServer
) -> None:
    from lastmile.clock import local_zone

    data = bundles["county-0.3.0"].read_bytes()
    county.publish(bundles["county-0.3.0"], "0.3.0")
    config = gateway(tmp_path, bundles, tls, county.index_url)
    config.update.metered.daily_budget_mb = 0.125  # 131072 bytes a day: this bundle takes three days
    day = dt.datetime.now(local_zone()).replace(hour=10, minute=0, second=0, microsecond=0)
    now = [day.timestamp()]
    updater = Updater(config, clock=lambda: now[0])
    first = updater.run()
    assert first.outcome is Outcome.DEFERRED and "resumes tomorrow" in first.message, first
    now[0] += 7 * 3600  # the same day: the budget is spent, nothing is asked for
    assert updater.run().outcome is Outcome.DEFERRED
    for _ in range(2):
        now[0] += 24 * 3600
        result = updater.run(url=county.index_url)
    assert result.outcome is Outcome.INSTALL_FAILED, result  # whole, verified by rauc info, install reached
    ranges = [s.range for s in county.served if s.path.endswith(".raucb")]
    assert ranges == ["bytes=0-131071", "bytes=131072-262143", "bytes=262144-"]
    assert county.bundle_bytes_sent() == len(data)
    state = read_state(config.data_dir)
    assert state is not None and state.meter["meter:update"]["bytes"] == len(data) - 2 * 131072


def test_a_metered_link_downloads_only_in_its_window(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, county: CountyServer
) -> None:
    from lastmile.clock import local_zone

    county.publish(bundles["county-0.3.0"], "0.3.0")
    config = gateway(tmp_path, bundles, tls, county.index_url)
    config.update.metered.windows = ["22:00-06:00"]
    day = dt.datetime.now(local_zone()).replace(hour=12, minute=0, second=0, microsecond=0)
    noon = Updater(config, clock=day.timestamp).run()
    assert noon.outcome is Outcome.DEFERRED and "22:00" in noon.message
    assert county.bundle_bytes_sent() == 0
    night = Updater(config, clock=(day + dt.timedelta(hours=11)).timestamp).run(url=county.index_url)
    assert night.outcome is Outcome.INSTALL_FAILED
    assert county.bundle_bytes_sent() == len(bundles["county-0.3.0"].read_bytes())


# -- USB stick ---------------------------------------------------------------------------------------


def test_a_bundle_on_a_stick_is_verified_and_offered_like_a_download(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial
) -> None:
    config = gateway(tmp_path, bundles, tls)
    stick = Path(config.usb_import.folders[0])
    shutil.copy(bundles["foreign-0.3.0"], stick / "lastmile-update-0.3.0-other.raucb")
    shutil.copy(bundles["county-0.3.0"], stick / "lastmile-update-0.3.0.raucb")
    (stick / "notes.raucb").write_bytes(b"not named as an update: ignored")
    result = Updater(config).run()
    # the other county's bundle is refused; the good one right after it reaches rauc install
    assert result.outcome is Outcome.INSTALL_FAILED and "D-Bus" in result.message, result
    state = read_state(config.data_dir)
    assert state is not None and len(state.refused) == 1
    assert [p.read_bytes() for p in updates_dir(config).glob("*.raucb")] == [bundles["county-0.3.0"].read_bytes()]
    assert (stick / "lastmile-update-0.3.0.raucb").exists()  # the stick is only read
    from firmware_bridge.usb_import import find_ecg_files

    assert find_ecg_files([stick]) == []  # the ECG import passes over bundles: no "refused file" noise


# -- rebooting only when the clinic is idle ------------------------------------------------------------


def _installed_this_boot(config: Config) -> None:
    from lastmile.clock import read_boot_id

    updates_dir(config).mkdir(parents=True)
    state = UpdateState(installed={"version": "0.3.0", "sha256": "0" * 64, "at": 1.0, "boot_id": read_boot_id()})
    state.save(updates_dir(config) / STATE_FILE)


def test_the_new_slot_is_rebooted_into_only_when_nothing_is_in_flight(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial
) -> None:
    from lastmile.data_dir import open_outbox
    from uploader.outbox import Kind

    config = gateway(tmp_path, bundles, tls, idle_before_reboot_s="600")
    _installed_this_boot(config)
    outbox = open_outbox(config)
    now = dt.datetime.now(dt.timezone.utc).timestamp()
    item = outbox.add(Kind.FHIR_BUNDLE, "k1", b"{}", now=now - 3600).item
    outbox.claim(Kind.FHIR_BUNDLE, 1, now - 10)
    reboots: list[str] = []
    updater = Updater(config, reboot=lambda: reboots.append("reboot"), clock=lambda: now)
    result = updater.run()
    assert result.outcome is Outcome.INSTALLED and not result.rebooting and reboots == []
    assert busy_reason(config, now) == "1 item(s) being sent"
    outbox.mark_sent([item.id], now - 5)
    assert updater.run().rebooting and reboots == ["reboot"]


def test_a_fresh_measurement_or_a_patient_holds_the_reboot_back(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial
) -> None:
    from lastmile.clinic.patients import PatientContext
    from lastmile.data_dir import open_outbox
    from uploader.outbox import Kind

    config = gateway(tmp_path, bundles, tls, idle_before_reboot_s="600")
    _installed_this_boot(config)
    now = dt.datetime.now(dt.timezone.utc)
    reboots: list[str] = []
    updater = Updater(config, reboot=lambda: reboots.append("reboot"), clock=now.timestamp)
    assert busy_reason(config, now.timestamp()) is None
    patients = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    patients.set_patient("P1", now=now - dt.timedelta(seconds=700))
    assert busy_reason(config, now.timestamp()) == "a patient is with the doctor"
    assert busy_reason(config, now.timestamp() + config.patient.idle_timeout_s) is None
    open_outbox(config).add(Kind.FHIR_BUNDLE, "k1", b"{}", now=now.timestamp() - 30)
    later = now.timestamp() + config.patient.idle_timeout_s
    assert busy_reason(config, later - 900 + 60) is not None
    assert reboots == []
    idle = Updater(config, reboot=lambda: reboots.append("reboot"), clock=lambda: now.timestamp() + 7200)
    assert idle.run().rebooting and reboots == ["reboot"]
    assert updater  # the busy updater never rebooted


def test_the_reboot_waits_for_the_window(tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial) -> None:
    from lastmile.clock import local_zone

    config = gateway(tmp_path, bundles, tls, reboot_window='"02:00-05:00"')
    _installed_this_boot(config)
    day = dt.datetime.now(local_zone()).replace(hour=0, minute=0, second=0, microsecond=0)
    noon, three = (day + dt.timedelta(hours=h) for h in (12, 3))
    assert "outside the reboot window 02:00-05:00" in (busy_reason(config, noon.timestamp()) or "")
    reboots: list[str] = []
    assert not Updater(config, reboot=lambda: reboots.append("r"), clock=noon.timestamp).run().rebooting
    assert Updater(config, reboot=lambda: reboots.append("r"), clock=three.timestamp).run().rebooting
    assert reboots == ["r"]


# -- configuration and CLI ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[update]\nurl = "http://county.example/stable.json"', "is not an https:// URL"),
        ('[update]\nreboot_window = "2-5"', "HH:MM-HH:MM"),
        ("[update]\nenabled = true\nusb_bundles = false", "nowhere to get updates from"),
        ('[update]\nkeyring = "county-ca.pem"', "absolute path"),
        ("[update]\npoll_interval_h = 0", "a number of hours"),
    ],
)
def test_update_settings_are_checked_for_meaning(text: str, problem: str) -> None:
    from lastmile.config import ConfigError

    with pytest.raises(ConfigError, match=problem):
        parse_config(text)


def test_updates_are_off_by_default() -> None:
    assert Config().update.enabled is False and Config().update.url == ""


def test_the_cli_checks_installs_and_shows_the_status(
    tmp_path: Path,
    bundles: dict[str, Path],
    tls: TlsMaterial,
    county: CountyServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    county.publish(bundles["county-0.3.0"], "0.3.0")
    config = gateway(tmp_path, bundles, tls, county.index_url)
    conf = ["--config", config.source]
    assert main([*conf, "update", "check"]) == 0
    assert "offered: 0.3.0" in capsys.readouterr().out
    assert county.bundle_bytes_sent() == 0  # check looks, it does not download
    assert main([*conf, "update", "install", "--file", str(bundles["foreign-0.3.0"])]) == 1
    out = capsys.readouterr().out
    assert "更新包未通过验证" in out and "refused: rauc refuses the bundle" in out
    assert main([*conf, "update", "check", "--url", county.index_url.replace("https:", "http:")]) == 1
    assert "must come over TLS" in capsys.readouterr().out
    assert main([*conf, "update", "status"]) == 0
    out = capsys.readouterr().out
    assert "更新包未通过验证" in out and "refused: bundle" in out
    assert main([*conf, "update", "poll"]) == 1  # install failed (no rauc service here): the unit shows it
    assert "install-failed" in capsys.readouterr().out


def test_a_failure_shows_in_the_doctor_and_the_metrics(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial
) -> None:
    from lastmile.doctor import Doctor, Level
    from lastmile.services.metrics import render_once

    config = gateway(tmp_path, bundles, tls)
    assert Doctor(config).check_update()[0].level is Level.WARN  # enabled, no round yet
    stick = Path(config.usb_import.folders[0])
    shutil.copy(bundles["foreign-0.3.0"], stick / "lastmile-update-0.3.0.raucb")
    assert Updater(config).run().outcome is Outcome.REFUSED
    finding = Doctor(config).check_update()[0]
    assert finding.level is Level.FAIL and "refused" in finding.message and "release team" in finding.hint
    scrape = render_once(config)
    assert 'lastmile_update_last_result{result="refused"} 1.0' in scrape
    assert 'lastmile_update_last_result{result="up-to-date"} 0.0' in scrape
    assert "lastmile_update_refused_bundles 1.0" in scrape
    assert "lastmile_update_reboot_pending 0.0" in scrape
    # the county's next, good bundle: the refusal no longer shows, only what this round did
    shutil.copy(bundles["county-0.3.0"], stick / "lastmile-update-0.3.1.raucb")
    assert Updater(config).run().outcome is Outcome.INSTALL_FAILED
    assert 'lastmile_update_last_result{result="install-failed"} 1.0' in render_once(config)


# -- rauc install for real: RAUC's D-Bus service on a private bus, file-backed slots -------------------


class RaucService:
    """`rauc service` as on the gateway, but on a private session bus, with the no-op bootloader and
    two file-backed slots. This kernel has no device-mapper, so it cannot mount verity bundles:
    its system.conf also takes the plain format, and the bundles installed here are plain ones.
    `boot(slot)` restarts it as if that slot had been booted (RAUC keeps each slot's bundle
    version in its status file, as on the gateway's data partition)."""

    def __init__(
        self, work: Path, keyring: Path, *, bootloader: str = "noop", env: dict[str, str] | None = None
    ) -> None:
        self.work = work
        self.env = env  # the service's environment (the uboot backend's fw_printenv/fw_setenv on PATH)
        (work / "mnt").mkdir(parents=True)
        self.slots = {"A": work / "slot-a.img", "B": work / "slot-b.img"}
        for slot in self.slots.values():
            slot.write_bytes(b"\0" * 8 * 2**20)
        # the gateway's tries (image/rauc/system.conf) when the bootloader is U-Boot's
        tries = "".join(line + "\n" for line in SYSTEM_CONF_TEXT.splitlines() if line.startswith("boot-attempts"))
        self.conf = work / "system.conf"
        self.conf.write_text(
            f"[system]\ncompatible=lastmile-gateway-arm64\nbootloader={bootloader}\n{tries}"
            f"data-directory={work}\nmountprefix={work / 'mnt'}\n\n"
            f"[keyring]\npath={keyring}\ncheck-purpose=codesign\nuse-bundle-signing-time=true\n\n"
            f"[slot.rootfs.0]\ndevice={self.slots['A']}\ntype=ext4\nbootname=A\n\n"
            f"[slot.rootfs.1]\ndevice={self.slots['B']}\ntype=ext4\nbootname=B\n"
        )
        self.service: subprocess.Popen[bytes] | None = None

    def boot(self, slot: str) -> None:
        self.stop()
        with (self.work / "service.log").open("a") as log:
            self.service = subprocess.Popen(
                ["rauc", "--conf", str(self.conf), "service", f"--override-boot-slot={slot}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        for _ in range(300):  # until the service owns its name on the bus
            status = subprocess.run(
                ["rauc", "--conf", str(self.conf), "status"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                env=self.env,
            )
            if status.returncode == 0 or self.service.poll() is not None:
                break
            threading.Event().wait(0.1)
        assert self.service.poll() is None, (self.work / "service.log").read_text()

    def stop(self) -> None:
        if self.service is not None:
            self.service.terminate()
            self.service.wait(timeout=30)
            self.service = None


@contextlib.contextmanager
def session_bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A private D-Bus session bus for `rauc service` and its clients (this process's and children's)."""
    for tool in ("dbus-daemon", "rauc"):
        require_tool(tool)
    if not Path("/dev/loop-control").exists():
        from tests.conftest import missing

        missing("no loop devices here: rauc service cannot mount a bundle")
    bus = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--nopidfile", "--print-address=1"], stdout=subprocess.PIPE, text=True
    )
    assert bus.stdout is not None
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", bus.stdout.readline().strip())
    monkeypatch.setenv("DBUS_STARTER_BUS_TYPE", "session")  # rauc's switch from the system bus
    try:
        yield
    finally:
        bus.terminate()
        bus.wait(timeout=30)


@pytest.fixture
def rauc_service(tmp_path: Path, bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[RaucService]:
    with session_bus(monkeypatch):
        service = RaucService(tmp_path / "rauc", bundles["keyring"])
        try:
            service.boot("A")
            yield service
        finally:
            service.stop()


def plain_bundle(rootfs: Path, pki: Path, version: str, out: Path) -> Path:
    stage = out.parent / f"stage-{version}"
    stage.mkdir()
    shutil.copy(rootfs, stage / "rootfs.ext4")
    (stage / "manifest.raucm").write_text(
        f"[update]\ncompatible=lastmile-gateway-arm64\nversion={version}\n\n[bundle]\nformat=plain\n\n"
        "[image.rootfs]\nfilename=rootfs.ext4\n"
    )
    run("rauc", "bundle", "--cert", pki / "signing.cert.pem", "--key", pki / "signing.key.pem", stage, out)
    return out


def test_rauc_install_writes_the_other_slot_and_the_reboot_follows_when_idle(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, county: CountyServer, rauc_service: RaucService
) -> None:
    rootfs = bundles["rootfs-county-0.3.0"]
    bundle = plain_bundle(rootfs, bundles["county-pki"], "0.3.0", tmp_path / "plain.raucb")
    county.publish(bundle, "0.3.0")
    config = gateway(tmp_path, bundles, tls, county.index_url)
    config.update.rauc_conf = str(rauc_service.conf)
    reboots: list[str] = []
    result = Updater(config, reboot=lambda: reboots.append("reboot")).run()
    assert result.outcome is Outcome.INSTALLED and result.version == "0.3.0", result
    image = rootfs.read_bytes()
    with rauc_service.slots["B"].open("rb") as slot:
        assert slot.read(len(image)) == image  # slot B holds the county's root image, byte for byte
    assert result.rebooting and reboots == ["reboot"]  # nothing in flight: straight into the new slot
    state = read_state(config.data_dir)
    assert state is not None and state.installed["version"] == "0.3.0"
    assert not list(updates_dir(config).glob("*.raucb*"))  # the bundle is in the slot, not on the card
    # the next round (still this boot: the reboot has not happened) installs nothing twice
    again = Updater(config, reboot=lambda: reboots.append("reboot")).run(reboot=False)
    assert again.outcome is Outcome.INSTALLED and "waiting to reboot" in again.message
    assert county.bundle_bytes_sent() == len(bundle.read_bytes())


def test_the_doctors_system_page_says_in_chinese_that_an_update_waits_for_a_quiet_moment(tmp_path: Path) -> None:
    from tests.console_harness import DOCTOR, Client, console_config, running_console

    config = console_config(tmp_path / "data")
    config.update.enabled = True
    _installed_this_boot(config)
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        page = client.get("/system").body
        assert "软件更新" in page and "新版本 0.3.0 已就绪：诊所空闲时网关会自动重启" in page
        Path(updates_dir(config) / STATE_FILE).write_text(
            json.dumps({"last_result": {"outcome": "refused", "message": "x", "at": 1.0}})
        )
        assert "上次更新失败：请告知县信息科" in client.get("/system").body
        Path(updates_dir(config) / STATE_FILE).write_text(
            json.dumps(
                {
                    "last_result": {"outcome": "up-to-date", "message": "x", "at": 1.0},
                    "installed": {
                        "version": "0.3.0",
                        "slot": "B",
                        "boot_id": "an-earlier-boot",
                        "rolled_back": {"at": 2.0, "booted_slot": "A"},
                    },
                }
            )
        )
        assert (
            "新版本 0.3.0 未能正常启动，网关已自动退回原版本（测量数据不受影响）：请告知县信息科"
            in client.get("/system").body
        )
        # the same rollback with no failed boot noted by lastmile-mark-good: power cuts, installed once more
        state = json.loads(Path(updates_dir(config) / STATE_FILE).read_text())
        state["installed"]["rolled_back"]["failed_boots"] = 0
        Path(updates_dir(config) / STATE_FILE).write_text(json.dumps(state))
        assert (
            "新版本 0.3.0 启动时多次断电，网关已退回原版本（测量数据不受影响），将再安装一次"
            in client.get("/system").body
        )
        # ... and while it is written to the other slot (this boot's round)
        from lastmile.clock import read_boot_id

        state["installing"] = {"version": "0.3.0", "slot": "B", "boot_id": read_boot_id(), "at": 3.0}
        Path(updates_dir(config) / STATE_FILE).write_text(json.dumps(state))
        assert "正在安装新版本 0.3.0（测量照常进行）" in client.get("/system").body


def test_one_round_at_a_time(tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial) -> None:
    import fcntl

    from lastmile.services.update import LOCK_FILE

    config = gateway(tmp_path, bundles, tls)
    updates_dir(config).mkdir(parents=True)
    with (updates_dir(config) / LOCK_FILE).open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the timer's round, downloading
        result = Updater(config).run()
    assert result.outcome is Outcome.ALREADY_RUNNING and read_state(config.data_dir) is None
    assert Updater(config).run().outcome is Outcome.UP_TO_DATE


def test_the_booted_slots_version_comes_from_rauc_and_a_rollback_is_named(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, rauc_service: RaucService
) -> None:
    from lastmile.doctor import Doctor, Level
    from lastmile.services.update import Rauc

    pki = bundles["county-pki"]
    config = gateway(tmp_path, bundles, tls)
    config.update.rauc_conf = str(rauc_service.conf)
    stick = Path(config.usb_import.folders[0])
    plain_bundle(bundles["rootfs-county-0.3.0"], pki, "0.3.0", stick / "lastmile-update-0.3.0.raucb")
    assert Updater(config, reboot=lambda: None).run(reboot=False).outcome is Outcome.INSTALLED  # into B
    rauc = Rauc(str(rauc_service.conf))
    assert rauc.booted_version() is None  # A was never written by RAUC: no version known
    # "after the reboot" (another boot id), B booted: the stick's bundle is the one running
    _rebooted(config)
    state_file = updates_dir(config) / STATE_FILE
    rauc_service.boot("B")
    assert rauc.booted_version() == "0.3.0"
    assert Updater(config).run().outcome is Outcome.UP_TO_DATE  # the stick's bundle is not installed again
    assert [f.level for f in Doctor(config).check_update()] == [Level.OK]
    state = json.loads(state_file.read_text())
    assert state["installed"]["slot"] == "B" and "rolled_back" not in state["installed"]  # it took
    # 0.2.0 written to A from B, then A booted while 0.3.0 is what the updater installed: a rollback
    rauc.install(plain_bundle(bundles["rootfs-county-0.2.0"], pki, "0.2.0", tmp_path / "old.raucb"))
    _failed_boots(config, "B")
    rauc_service.boot("A")
    assert rauc.booted_version() == "0.2.0"
    rolled_back = Doctor(config).check_update()[0]
    assert rolled_back.level is Level.FAIL and "runs 0.2.0" in rolled_back.message
    # the next round records it (from the slots): what runs instead, by slot and version
    Updater(config).run()
    record = json.loads(state_file.read_text())["installed"]["rolled_back"]
    assert (record["booted_slot"], record["booted_version"]) == ("A", "0.2.0")
    finding = Doctor(config).check_update()[0]
    assert finding.level is Level.FAIL and "back to slot A (version 0.2.0)" in finding.message, finding


def _failed_boots(config: Config, slot: str, times: int = 3) -> None:
    """What lastmile-mark-good notes for each boot of `slot` it failed (the release's fault)."""
    updates_dir(config).mkdir(parents=True, exist_ok=True)
    with (updates_dir(config) / BOOT_VERDICTS_FILE).open("a") as notes:
        notes.writelines(f"boot-{slot}-{n} {slot} unhealthy\n" for n in range(times))


def _rebooted(config: Config) -> None:
    """As after a reboot: the install happened in another boot."""
    state_file = updates_dir(config) / STATE_FILE
    state = json.loads(state_file.read_text())
    state["installed"]["boot_id"] = "an-earlier-boot"
    state_file.write_text(json.dumps(state))


def test_a_rollback_to_a_new_cards_slot_is_recorded_and_shown_everywhere(
    tmp_path: Path,
    bundles: dict[str, Path],
    tls: TlsMaterial,
    rauc_service: RaucService,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The first update of a new card fails to come up and U-Boot boots A again: RAUC never wrote A,
    so no version tells the rollback; the slots do. The doctor, the console and the county's metrics
    say so; the bundle is not installed again."""
    from lastmile.console.views import update_status
    from lastmile.doctor import Doctor, Level
    from lastmile.services.metrics import render_once

    config = gateway(tmp_path, bundles, tls)
    config.update.rauc_conf = str(rauc_service.conf)
    stick = Path(config.usb_import.folders[0])
    plain_bundle(bundles["rootfs-county-0.3.0"], bundles["county-pki"], "0.3.0", stick / "lastmile-update-0.3.0.raucb")
    assert Updater(config, reboot=lambda: None).run(reboot=False).outcome is Outcome.INSTALLED
    state = read_state(config.data_dir)
    assert state is not None and state.installed["slot"] == "B"
    assert update_status(config) == {"state": "ready", "version": "0.3.0"}
    assert "lastmile_update_rolled_back 0.0" in render_once(config)
    # B's three boots never got healthy (lastmile-mark-good); U-Boot boots the new card's A again
    _rebooted(config)
    _failed_boots(config, "B")
    rauc_service.boot("A")
    result = Updater(config).run()
    assert result.outcome is Outcome.UP_TO_DATE, result  # the stick's bundle is not installed again
    state = read_state(config.data_dir)
    assert state is not None
    record = state.installed["rolled_back"]
    assert (record["booted_slot"], record["booted_version"], record["failed_boots"]) == ("A", "", 3), record
    finding = Doctor(config).check_update()[0]
    assert finding.level is Level.FAIL, finding
    assert "version 0.3.0 was installed into slot B but did not come up healthy" in finding.message, finding
    assert "back to slot A (version unknown)" in finding.message, finding
    assert "lastmile_update_rolled_back 1.0" in render_once(config)
    assert update_status(config) == {"state": "rolled-back", "version": "0.3.0"}
    assert main(["--config", config.source, "update", "status"]) == 0
    status = capsys.readouterr().out
    assert (
        "新版本未能正常启动" in status
        and "rolled back: it did not come up healthy; slot A (version unknown) runs again" in status
    ), status
    # recorded once: later rounds leave it as it is
    Updater(config).run()
    again = read_state(config.data_dir)
    assert again is not None and again.installed["rolled_back"] == record


# -- power cuts during `rauc install` (docs/updates.md item 7) -----------------------------------------

# RAUC 1.8's uboot backend, one fw_setenv per variable: slot B out of the boot order and no tries
# (before its image is written), then (after its image and RAUC's status of it, which names the
# version) its tries and first in the order
RAUC_INSTALL_WRITES = ["BOOT_ORDER A", "BOOT_B_LEFT 0", "BOOT_B_LEFT 3", "BOOT_ORDER B A"]

CUT_FW_SETENV = """#!/bin/sh
# fw_setenv as RAUC runs it, each write logged; after the write numbered in $CUT_AFTER the power goes:
# the rauc service and the update round (its process group) are killed at once
set -eu
n=$(( $(cat "$CUT_DIR/count" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$CUT_DIR/count"
"$CUT_REAL" "$@"
echo "$*" >> "$CUT_DIR/writes"
if [ "$(cat "$CUT_DIR/after" 2>/dev/null || true)" = "$n" ]; then
  kill -KILL $(cat "$CUT_DIR/pids")
fi
"""


@dataclass
class CardGateway:
    """A gateway on the A/B card: real U-Boot boots it (tests/system/ab_card.py), a real `rauc service`
    with the uboot backend writes its slot state through image/rauc/fw_env and its slots (files), and
    the power can be cut after any of RAUC's slot-state writes."""

    card: Any
    rauc: RaucService
    cut_dir: Path

    def writes(self) -> list[str]:
        path = self.cut_dir / "writes"
        return path.read_text().splitlines() if path.exists() else []

    def cut_after(self, n: int) -> None:
        (self.cut_dir / "after").write_text(f"{n}\n")
        (self.cut_dir / "count").unlink(missing_ok=True)
        (self.cut_dir / "writes").unlink(missing_ok=True)

    def power_off(self) -> None:
        """After the cut: what RAUC had mounted (the bundle) is gone, as after any reboot."""
        mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True, check=True)
        under = str(self.rauc.work / "mnt")
        for target in sorted((m for m in mounts.stdout.splitlines() if m.startswith(under)), reverse=True):
            subprocess.run(["umount", "-l", target], check=True, timeout=60)

    def power_on(self) -> str:
        """The power comes back: U-Boot chooses a slot, and Linux (here: rauc service) runs it."""
        for name in ("after", "count", "writes"):
            (self.cut_dir / name).unlink(missing_ok=True)
        chosen = self.card.boot()["slot"]
        self.rauc.boot(chosen)
        return chosen


@pytest.fixture
def card_gateway(tmp_path: Path, bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[CardGateway]:
    from tests.system.ab_card import Card

    (tmp_path / "card").mkdir()
    card = Card(tmp_path / "card")
    cut_dir = tmp_path / "cut"
    (cut_dir / "bin").mkdir(parents=True)
    wrapper = cut_dir / "bin" / "fw_setenv"
    wrapper.write_text(CUT_FW_SETENV)
    wrapper.chmod(0o755)
    (cut_dir / "bin" / "fw_printenv").symlink_to(card.tools / "fw_printenv")
    env = {
        **card.fw_env,
        "PATH": f"{cut_dir / 'bin'}:{os.environ['PATH']}",
        "CUT_DIR": str(cut_dir),
        "CUT_REAL": str(card.tools / "fw_setenv"),
    }
    with session_bus(monkeypatch):
        env.update({k: os.environ[k] for k in ("DBUS_SESSION_BUS_ADDRESS", "DBUS_STARTER_BUS_TYPE")})
        service = RaucService(tmp_path / "rauc", bundles["keyring"], bootloader="uboot", env=env)
        gw = CardGateway(card, service, cut_dir)
        try:
            assert gw.power_on() == "A"  # a new card
            subprocess.run(  # lastmile-mark-good: A came up healthy
                ["rauc", "--conf", str(service.conf), "status", "mark-good"], env=env, check=True, capture_output=True
            )
            assert card.env() == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "9", "BOOT_B_LEFT": "0"}
            yield gw
        finally:
            service.stop()
            gw.power_off()  # a test that failed between its cut and the power coming back


@pytest.mark.parametrize(
    ("writes", "torn", "boots"),
    [
        (1, False, "A"),  # B out of the boot order
        (2, True, "A"),  # ... and its tries gone; the cut comes half way through writing its image
        (3, False, "A"),  # the image and RAUC's status written, B has its tries but is not in the order
        (4, False, "B"),  # B first in the order: RAUC's status of the slot not yet written
    ],
)
def test_a_power_cut_during_rauc_install_leaves_a_slot_that_boots_and_the_install_is_finished_once(
    tmp_path: Path,
    bundles: dict[str, Path],
    tls: TlsMaterial,
    card_gateway: CardGateway,
    writes: int,
    torn: bool,
    boots: str,
) -> None:
    """The power goes during `rauc install` (the round and RAUC die together) after each of RAUC's
    writes of the slot state. U-Boot always finds a slot that boots: the old one until the new is
    whole and first in the order. The next round (a later boot) tells from its write-ahead record
    what happened: a whole slot booted is recorded as installed (not written again); otherwise the
    kept bundle is installed again, and the slot is then whole, byte for byte."""
    gw = card_gateway
    config = gateway(tmp_path, bundles, tls)
    source = Path(config.source)
    source.write_text(source.read_text().replace(str(RAUC_DIR / "system.conf"), str(gw.rauc.conf)))
    config = parse_config(source.read_text(), str(source))
    stick = Path(config.usb_import.folders[0])
    rootfs = bundles["rootfs-county-0.3.0"]
    plain_bundle(rootfs, bundles["county-pki"], "0.3.0", stick / "lastmile-update-0.3.0.raucb")
    slot_a = gw.rauc.slots["A"].read_bytes()
    image = rootfs.read_bytes()

    gw.cut_after(writes)
    assert gw.rauc.service is not None
    round_ = subprocess.Popen(
        [sys.executable, "-m", "lastmile", "--config", str(source), "update", "install", "--no-reboot"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (gw.cut_dir / "pids").write_text(f"-{round_.pid} {gw.rauc.service.pid}\n")
    output = round_.communicate(timeout=300)[0].decode(errors="replace")
    assert round_.returncode == -signal.SIGKILL, output  # the power went mid-install
    gw.rauc.service.wait(timeout=30)
    gw.power_off()
    assert gw.writes() == RAUC_INSTALL_WRITES[:writes]
    state = json.loads((updates_dir(config) / STATE_FILE).read_text())
    assert state["installing"]["version"] == "0.3.0" and state["installing"]["slot"] == "B", state
    status = subprocess.run(
        [sys.executable, "-m", "lastmile", "--config", str(source), "update", "status"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "installing: version 0.3.0 into slot B" in status, status
    assert "正在安装新版本 0.3.0（测量照常进行）" in status and "检查" not in status, status  # the console's words
    assert "version" not in state["installed"]
    assert list(updates_dir(config).glob("*.raucb"))  # the bundle, kept for the install again
    if torn:
        with gw.rauc.slots["B"].open("r+b") as slot:
            slot.write(image[: len(image) // 2])

    assert gw.power_on() == boots
    assert gw.rauc.slots["A"].read_bytes() == slot_a  # the slot that runs was never touched
    # a later boot (the host's boot id does not change: the record's is made an earlier one's)
    state["installing"]["boot_id"] = "an-earlier-boot"
    (updates_dir(config) / STATE_FILE).write_text(json.dumps(state))
    result = Updater(config, reboot=lambda: None).run(reboot=False)
    after = read_state(config.data_dir)
    assert after is not None and after.installing == {}
    assert (after.installed["version"], after.installed["slot"]) == ("0.3.0", "B"), after.installed
    assert "rolled_back" not in after.installed
    with gw.rauc.slots["B"].open("rb") as slot:
        assert slot.read(len(image)) == image  # the county's root image, byte for byte
    assert not list(updates_dir(config).glob("*.raucb*"))  # in the slot, not on the card
    if boots == "B":
        assert result.outcome is Outcome.UP_TO_DATE, result  # not written again
        assert gw.writes() == []
        assert gw.card.env()["BOOT_ORDER"] == "B A"
    else:
        assert result.outcome is Outcome.INSTALLED, result  # written again, whole
        assert gw.writes() == RAUC_INSTALL_WRITES
        # B first with an install's tries; A's as this boot left them (its mark-good has not run yet)
        assert gw.card.env() == {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "8", "BOOT_B_LEFT": "3"}
        assert gw.power_on() == "B"


def test_after_a_cut_install_booted_the_previous_installs_record_is_not_read_as_a_rollback(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, rauc_service: RaucService
) -> None:
    """A second update: 0.2.0 was installed into A (and runs), 0.3.0 was being installed into B when
    the power went, after RAUC put B first. B boots: 0.3.0 is what is installed, and 0.2.0's record
    (slot A, not booted) is not a rollback."""
    config = gateway(tmp_path, bundles, tls)
    config.update.rauc_conf = str(rauc_service.conf)
    updates_dir(config).mkdir(parents=True)
    before = {"version": "0.2.0", "sha256": "2" * 64, "at": 1.0, "boot_id": "an-earlier-boot", "slot": "A"}
    cut = {"version": "0.3.0", "sha256": "3" * 64, "at": 2.0, "boot_id": "the-boot-the-power-went", "slot": "B"}
    (updates_dir(config) / STATE_FILE).write_text(json.dumps({"installed": before, "installing": cut}))
    kept = updates_dir(config) / f"{'3' * 16}.raucb"
    kept.write_bytes(b"the bundle, kept for an install again")
    rauc_service.boot("B")
    Updater(config).run()
    state = read_state(config.data_dir)
    assert state is not None and state.installed == cut and state.installing == {}, state
    assert not kept.exists()  # in slot B: not kept on the card
    from lastmile.doctor import Doctor, Level

    assert [f.level for f in Doctor(config).check_update()] == [Level.OK]


def test_a_rollback_by_power_cuts_alone_is_installed_once_more(
    tmp_path: Path,
    bundles: dict[str, Path],
    tls: TlsMaterial,
    rauc_service: RaucService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The new slot's three tries all ended before lastmile-mark-good judged them (the supply
    flickered: no failed boot noted): not the release's fault, so the bundle is installed once more,
    in the same round. A second rollback like it is the release's to answer for: not again."""
    from lastmile.doctor import Doctor, Level

    config = gateway(tmp_path, bundles, tls)
    config.update.rauc_conf = str(rauc_service.conf)
    stick = Path(config.usb_import.folders[0])
    plain_bundle(bundles["rootfs-county-0.3.0"], bundles["county-pki"], "0.3.0", stick / "lastmile-update-0.3.0.raucb")
    _failed_boots(config, "B", 3)  # an earlier release's trial of B, rolled back: not this one's
    assert Updater(config, reboot=lambda: None).run(reboot=False).outcome is Outcome.INSTALLED
    assert not (updates_dir(config) / BOOT_VERDICTS_FILE).exists()  # a new trial
    _rebooted(config)
    rauc_service.boot("A")  # three cut boots of B later
    _failed_boots(config, "A", 1)  # and A's first boot back failed too (a device): not B's
    # the round after the rollback: noted as the power's, and installed once more
    with caplog.at_level(logging.WARNING, logger="lastmile.services.update"):
        assert Updater(config, reboot=lambda: None).run(reboot=False).outcome is Outcome.INSTALLED
    state = read_state(config.data_dir)
    assert state is not None and state.installed["retried"] is True and "rolled_back" not in state.installed
    assert (state.installed["version"], state.installed["slot"]) == ("0.3.0", "B")
    assert "every boot of it ended before it was judged" in caplog.text, caplog.text
    assert "installing version 0.3.0 once more" in caplog.text, caplog.text
    # ... its three tries cut again: recorded, and now not installed again
    _rebooted(config)
    rauc_service.boot("A")
    assert Updater(config).run().outcome is Outcome.UP_TO_DATE
    state = read_state(config.data_dir)
    assert state is not None and state.installed["rolled_back"]["failed_boots"] == 0
    finding = Doctor(config).check_update()[0]
    assert finding.level is Level.FAIL and "it is not installed again" in finding.message, finding


def test_the_doctor_and_update_status_say_a_power_rollback_will_be_installed_once_more(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, capsys: pytest.CaptureFixture[str]
) -> None:
    from lastmile.doctor import Doctor, Level

    config = gateway(tmp_path, bundles, tls)
    updates_dir(config).mkdir(parents=True)
    rolled = {"at": 2.0, "booted_slot": "A", "booted_version": "0.2.0", "failed_boots": 0}
    installed = {"version": "0.3.0", "sha256": "3" * 64, "boot_id": "an-earlier-boot", "slot": "B"}
    last = {"outcome": "up-to-date", "message": "x", "at": 1.0}
    state_file = updates_dir(config) / STATE_FILE
    state_file.write_text(json.dumps({"installed": {**installed, "rolled_back": rolled}, "last_result": last}))
    finding = Doctor(config).check_update()[0]
    assert finding.level is Level.WARN, finding
    assert "every boot of it ended before it was judged" in finding.message and "installed once more" in finding.message
    assert main(["--config", config.source, "update", "status"]) == 0
    assert "新版本启动时多次断电，网关已退回原版本；将再安装一次" in capsys.readouterr().out
    # judged unhealthy (mark-good noted its boots), or tried once more already: the release's
    for record in (
        {**installed, "rolled_back": {**rolled, "failed_boots": 3}},
        {**installed, "rolled_back": rolled, "retried": True},
    ):
        state_file.write_text(json.dumps({"installed": record, "last_result": last}))
        finding = Doctor(config).check_update()[0]
        assert finding.level is Level.FAIL and "it is not installed again" in finding.message, finding


def test_a_power_rollbacks_bundle_from_the_county_is_asked_for_again_at_once(
    tmp_path: Path, bundles: dict[str, Path], tls: TlsMaterial, county: CountyServer, rauc_service: RaucService
) -> None:
    """The index is asked every poll_interval_h (6 h); a bundle to install once more does not wait
    for it (the supply is steady now: the round runs 15 min after boot)."""
    bundle = plain_bundle(bundles["rootfs-county-0.3.0"], bundles["county-pki"], "0.3.0", tmp_path / "plain.raucb")
    county.publish(bundle, "0.3.0")
    config = gateway(tmp_path, bundles, tls, county.index_url)
    config.update.rauc_conf = str(rauc_service.conf)
    assert Updater(config, reboot=lambda: None).run(reboot=False).outcome is Outcome.INSTALLED
    _rebooted(config)
    rauc_service.boot("A")  # B's tries all cut
    assert Updater(config, reboot=lambda: None).run(reboot=False).outcome is Outcome.INSTALLED
    assert [s.path for s in county.served] == ["/lastmile/stable.json", "/lastmile/bundle.raucb"] * 2
    _rebooted(config)
    rauc_service.boot("A")  # and again: now the poll interval holds
    assert Updater(config, reboot=lambda: None).run(reboot=False).outcome is Outcome.UP_TO_DATE
    assert len(county.served) == 4
