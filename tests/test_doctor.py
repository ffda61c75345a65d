"""`lastmile doctor`: each check against real parts (a pynetdicom SCP, an HTTP server, an outbox)
on loopback, with the system-wide bits (mount table, clock, tools) injected."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import json
import os
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lastmile.cli import main
from lastmile.clinic.observations import OBSERVATION_KIND, observation_payload
from lastmile.config import Config
from lastmile.demo.loopback import free_port
from lastmile.doctor import Finding, Level, exit_code, find_mount, parse_mountinfo, render_json, render_text
from tests.fhir_samples import blood_pressure
from tests.service_harness import doctor, levels

MOUNTINFO = """\
22 1 179:2 / / ro,noatime shared:1 - ext4 /dev/mmcblk0p2 ro
23 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw,size=10240k
30 22 179:3 / /var/lib/lastmile rw,noatime shared:9 - ext4 /dev/mmcblk0p3 rw,commit=60
31 22 179:4 / /mnt/usb\\040stick rw,relatime shared:10 - vfat /dev/sda1 rw
"""


# -- mount table -------------------------------------------------------------------------------------


def test_mountinfo_is_parsed_with_super_options_and_escapes() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [m.mount_point for m in mounts] == ["/", "/dev", "/var/lib/lastmile", "/mnt/usb stick"]
    data = mounts[2]
    assert data.fstype == "ext4" and {"noatime", "commit=60", "rw"} <= data.options


def test_the_longest_mount_point_holds_a_path(tmp_path: Path) -> None:
    info = tmp_path / "mi"
    info.write_text(MOUNTINFO)
    assert find_mount(info, Path("/var/lib/lastmile/payloads")).mount_point == "/var/lib/lastmile"  # type: ignore[union-attr]
    assert find_mount(info, Path("/var/lib/other")).mount_point == "/"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "options,super_options,level",
    [
        ("rw,noatime", "rw,commit=60", Level.OK),
        ("rw,relatime", "rw", Level.WARN),  # atime writes and a 5 s journal commit wear the card
        ("rw,noatime", "rw", Level.WARN),
        ("ro,noatime", "ro,commit=60", Level.FAIL),  # errors=remount-ro happened
    ],
)
def test_wear_relevant_mount_options(tmp_path: Path, options: str, super_options: str, level: Level) -> None:
    d = doctor(tmp_path)
    d.mountinfo.write_text(f"30 1 179:3 / {tmp_path} {options} shared:9 - ext4 /dev/p3 {super_options}\n")
    assert levels(d.check_data_partition(), "data") == [Level.OK, level]


def test_too_little_free_space_fails(tmp_path: Path) -> None:
    d = doctor(tmp_path, "[outbox]\nmin_free_mb = 100000000\n")
    found = d.check_data_partition()
    assert found[0].level is Level.FAIL and "min_free_mb" in found[0].message


def test_a_missing_data_directory_fails(tmp_path: Path) -> None:
    d = doctor(tmp_path)
    d.config.gateway.data_dir = str(tmp_path / "not-mounted")
    assert levels(d.check_data_partition(), "data") == [Level.FAIL]


def test_root_and_journal(tmp_path: Path) -> None:
    d = doctor(tmp_path)
    assert levels(d.check_root_fs(), "root") == [Level.OK]  # ro root in the table
    assert levels(d.check_journal(), "journal") == [Level.WARN]
    conf = tmp_path / "journald.conf.d"
    conf.mkdir()
    (conf / "lastmile.conf").write_text("[Journal]\nStorage=persistent\nSystemMaxUse=32M\n")
    d.journald_paths = (conf,)
    assert levels(d.check_journal(), "journal") == [Level.OK]


# -- clock ---------------------------------------------------------------------------------------------


def test_a_1970_clock_fails(tmp_path: Path) -> None:
    d = doctor(tmp_path, now=lambda: 86400.0)
    found = d.check_clock()
    assert found[0].level is Level.FAIL and "1970-01-02" in found[0].message


def test_clock_source_from_timedatectl(tmp_path: Path) -> None:
    import subprocess

    def fake(cmd: list[str]) -> subprocess.CompletedProcess[str] | None:
        if cmd[0] == "timedatectl":
            return subprocess.CompletedProcess(cmd, 0, "Timezone=UTC\nNTP=yes\nNTPSynchronized=yes\n", "")
        return None

    found = doctor(tmp_path, run=fake).check_clock()
    assert found[0].level is Level.OK and "systemd-timesyncd" in found[0].message
    found = doctor(tmp_path).check_clock()  # no tool answers: plausible year only
    assert found[0].level is Level.WARN


# -- services --------------------------------------------------------------------------------------------


def test_services_the_console_is_optional_the_others_are_not(tmp_path: Path) -> None:
    import subprocess

    units = {
        "lastmile-acquire.service": "LoadState=loaded\nUnitFileState=enabled\nActiveState=active\nSubState=running\nNRestarts=0\n",
        "lastmile-ble.service": "LoadState=loaded\nUnitFileState=enabled\nActiveState=active\nSubState=running\n"
        "NRestarts=0\nStatusText=BLE not enabled ([ble] enabled = false in /etc/lastmile/lastmile.toml): idle\n",
        "lastmile-forward.service": "LoadState=not-found\nActiveState=inactive\nSubState=dead\nNRestarts=0\n",
        "lastmile-console.service": "LoadState=not-found\nActiveState=inactive\nSubState=dead\nNRestarts=0\n",
    }

    def fake(cmd: list[str]) -> subprocess.CompletedProcess[str] | None:
        return subprocess.CompletedProcess(cmd, 0, units[cmd[2]], "")

    (tmp_path / "systemd").mkdir()
    found = doctor(tmp_path, run=fake, systemd_run_dir=tmp_path / "systemd").check_services()
    assert [(f.level, f.message.split(":")[0]) for f in found] == [
        (Level.OK, "lastmile-acquire.service"),
        (Level.OK, "lastmile-ble.service"),  # idle when BLE is not enabled: up, and it says why
        (Level.FAIL, "lastmile-forward.service"),  # the gateway without its forwarder: never optional
        (Level.SKIP, "lastmile-console.service"),
    ]
    assert "BLE not enabled" in found[1].message
    assert found[3].message == "lastmile-console.service: not installed (optional)"
    units["lastmile-console.service"] = (
        "LoadState=loaded\nUnitFileState=enabled\nActiveState=failed\nSubState=failed\nNRestarts=9\n"
    )
    assert doctor(tmp_path, run=fake, systemd_run_dir=tmp_path / "systemd").check_services()[3].level is Level.FAIL
    # up, but only to show the doctor that lastmile.toml is refused (lastmile/console/refused.py)
    units["lastmile-console.service"] = (
        "LoadState=loaded\nUnitFileState=enabled\nActiveState=active\nSubState=running\nNRestarts=0\n"
        "StatusText=configuration refused: /etc/lastmile/lastmile.toml:7: unknown key 'x'; the console says so on "
        "https://127.0.0.1:8443\n"
    )
    console = doctor(tmp_path, run=fake, systemd_run_dir=tmp_path / "systemd").check_services()[3]
    assert console.level is Level.FAIL and "unknown key 'x'" in console.message, console
    units["lastmile-ble.service"] = "LoadState=loaded\nUnitFileState=enabled\nActiveState=inactive\nSubState=dead\n"
    assert doctor(tmp_path, run=fake, systemd_run_dir=tmp_path / "systemd").check_services()[1].level is Level.FAIL
    no_systemd = doctor(tmp_path, run=fake, systemd_run_dir=tmp_path / "absent")
    assert no_systemd.check_services()[0].level is Level.SKIP


# -- reading center, commitment listener ----------------------------------------------------------------


@contextlib.contextmanager
def verification_scp(ae_title: str = "READING") -> Iterator[int]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        yield port
    finally:
        server.shutdown()


def test_c_echo_ok_refused_and_unreachable(tmp_path: Path) -> None:
    with verification_scp("READING") as port:
        ok = doctor(
            tmp_path, f'[reading_center]\nhost = "127.0.0.1"\nport = {port}\ncalled_ae = "READING"\ntimeout_s = 5.0\n'
        ).check_reading_center()
        assert ok[0].level is Level.OK and "C-ECHO READING@127.0.0.1" in ok[0].message
        refused = doctor(
            tmp_path, f'[reading_center]\nhost = "127.0.0.1"\nport = {port}\ncalled_ae = "WRONG"\ntimeout_s = 5.0\n'
        ).check_reading_center()
        assert refused[0].level is Level.FAIL and "called_ae" in refused[0].hint
    gone = doctor(
        tmp_path, f'[reading_center]\nhost = "127.0.0.1"\nport = {free_port()}\ntimeout_s = 2.0\n'
    ).check_reading_center()
    assert gone[0].level is Level.FAIL and "network" in gone[0].hint


def test_commitment_listener(tmp_path: Path) -> None:
    port = free_port()
    d = doctor(tmp_path, f"[reading_center]\nlisten_port = {port}\n")
    assert levels(d.check_commitment_listener(), "commitment") == [Level.WARN]  # free, nobody listens
    with socket.socket() as s:  # held by a program that is not lastmile-forward: this test
        s.bind(("127.0.0.1", port))
        s.listen()
        assert levels(d.check_commitment_listener(), "commitment") == [Level.FAIL]
    off = doctor(tmp_path, "[reading_center]\nstorage_commitment = false\n")
    assert levels(off.check_commitment_listener(), "commitment") == [Level.OK]


# -- FHIR ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fhir_server(token: str, *, busy: bool = False) -> Iterator[str]:
    """A FHIR platform's /metadata on loopback; `busy`: its rate limiter answers everything 429."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if busy:
                self.send_response(429)
                self.send_header("Retry-After", "120")
            elif self.path != "/fhir/metadata":
                self.send_response(404)
            elif self.headers.get("Authorization") != f"Bearer {token}":
                self.send_response(401)
            else:
                self.send_response(200)
            body = b'{"resourceType": "CapabilityStatement"}'
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    finally:
        server.shutdown()
        server.server_close()


def test_fhir_endpoint_and_token(tmp_path: Path) -> None:
    assert levels(doctor(tmp_path).check_fhir(), "fhir") == [Level.SKIP]  # not configured
    token = tmp_path / "token"
    token.write_text("good-token\n")
    token.chmod(0o600)
    with fhir_server("good-token") as base:
        toml = f'[fhir]\nbase_url = "{base}"\ntoken_file = "{token}"\ntimeout_s = 5.0\n'
        assert levels(doctor(tmp_path, toml).check_fhir(), "fhir") == [Level.OK]
        token.write_text("stale-token\n")
        refused = doctor(tmp_path, toml).check_fhir()
        assert refused[0].level is Level.FAIL and "401" in refused[0].message
        token.chmod(0o644)
        loose = doctor(tmp_path, toml).check_fhir()
        assert loose[0].level is Level.FAIL and "readable by group/others" in loose[0].message
        wrong = doctor(tmp_path, f'[fhir]\nbase_url = "{base}/nothere"\ntimeout_s = 5.0\n').check_fhir()
        assert wrong[0].level is Level.FAIL and "404" in wrong[0].message


def test_a_busy_platform_is_said_busy_not_unreachable(tmp_path: Path) -> None:
    """The county platform's rate limiter answers 429 (busy, Retry-After) to everything, /metadata
    too: the doctor said FAIL "HTTP 429" ("is fhir.base_url the FHIR R4 base?") - though it answers,
    and the forwarder sends again by itself. (The System page never runs this check: offline.)"""
    with fhir_server("good-token", busy=True) as base:
        [finding] = doctor(tmp_path, f'[fhir]\nbase_url = "{base}"\ntimeout_s = 5.0\n').check_fhir()
    text = render_text([finding])
    assert finding.level is Level.WARN, text
    assert "busy" in finding.message and "120 s" in finding.message and "base_url" not in text, text
    assert finding.to_json()["advice"] == "busy", text  # what `lastmile doctor --json` prints for scripts


# -- devices, queue -----------------------------------------------------------------------------------


def test_devices_seen(tmp_path: Path) -> None:
    import datetime as dt

    from lastmile.clinic.devices import DeviceRegistry

    links = tmp_path / "dev-lastmile"
    links.mkdir()
    (links / "gps").touch()
    d = doctor(tmp_path, device_links=links)
    first = d.check_devices()
    assert first[0].level is Level.OK and "plugged in: gps" in first[0].message
    registry = DeviceRegistry.open(tmp_path)
    now = dt.datetime.now(dt.timezone.utc)
    registry.allow("C0:FF:EE:00:00:01", now=now, name="BP cuff")
    registry.update_status("C0:FF:EE:00:00:01", now=now, connected=True)
    registry.close()
    found = d.check_devices()
    assert found[0].level is Level.OK and "1 known, 1 seen in 24 h, 1 connected" in found[0].message


def test_queue_health(tmp_path: Path) -> None:
    from uploader.outbox import Outbox

    t0 = time.time()
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        outbox.add("dicom", "a", b"x" * 10, now=t0)
        bad = outbox.add("dicom", "b", b"y" * 10, now=t0)
    d = doctor(tmp_path, now=lambda: t0 + 60)
    assert levels(d.check_queue(), "queue") == [Level.OK]
    assert "2 waiting" in d.check_queue()[0].message
    late = doctor(tmp_path, now=lambda: t0 + 2 * 86400)
    found = late.check_queue()
    assert found[0].level is Level.WARN and "oldest waiting 2.0 d" in found[0].message
    assert levels(doctor(tmp_path, now=lambda: t0 + 8 * 86400).check_queue(), "queue") == [Level.FAIL]
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        outbox.quarantine(bad.item.id, "not a DICOM object", now=t0 + 61)
        outbox.record_status("reading_center", {"fault": "A-ASSOCIATE-RJ: called AE not recognised"}, t0 + 62)
    found = doctor(tmp_path, now=lambda: t0 + 120).check_queue()
    # the link's row (the other item waits a minute: OK), the set-aside one's, the refusal
    assert [(f.level, f.topic) for f in found] == [
        (Level.OK, "link"),
        (Level.WARN, "set-aside"),
        (Level.FAIL, "refused-reading_center"),
    ]
    assert "1 quarantined" in found[1].message and "called AE" in found[2].message


def test_an_empty_data_dir_has_no_queue_yet(tmp_path: Path) -> None:
    assert levels(doctor(tmp_path).check_queue(), "queue") == [Level.OK]
    assert not (tmp_path / "outbox.sqlite").exists()  # the doctor never creates the outbox


# -- the command --------------------------------------------------------------------------------------


def test_offline_run_skips_the_network_and_exits_zero_without_fail(tmp_path: Path) -> None:
    findings = doctor(tmp_path, offline=True).run_all()
    assert levels(findings, "reading-center") == [Level.SKIP] and levels(findings, "fhir") == [Level.SKIP]
    assert exit_code(findings) == 0, render_text(findings)
    assert json.loads(render_json(findings))["ok"] is True


def test_cli_reports_a_bad_config_with_its_line_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "lastmile.toml"
    bad.write_text('[gateway]\nid = "x"\n[outbox]\nmin_free_mb = "lots"\n')
    code = main(["-c", str(bad), "doctor", "--offline", "--json", "--data-dir", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["ok"] is False
    config_line = next(f for f in out["findings"] if f["check"] == "config")
    assert config_line["level"] == "FAIL" and "lastmile.toml:4" in config_line["message"]
    # The other checks still ran (on defaults) and told the technician about them.
    assert {f["check"] for f in out["findings"]} >= {"data", "clock", "queue"}


def test_json_output_keeps_the_advice_key_scripts_read() -> None:
    """`lastmile doctor --json` said "advice" since it had it; renaming the field in the code must
    not break the county's scripts that read it."""
    [finding] = json.loads(render_json([Finding("queue", Level.OK, "held", advice_key="metered-window")]))["findings"]
    assert finding["advice"] == "metered-window" and "advice_key" not in finding, finding


def test_text_output_has_hints_for_problems() -> None:
    text = render_text([Finding("clock", Level.FAIL, "1970", "connect NTP"), Finding("x", Level.OK, "fine")])
    lines = text.splitlines()
    assert lines[0] == "FAIL  clock  1970" and lines[1].strip() == "hint: connect NTP"
    assert text.endswith("1 FAIL, 0 WARN")
    assert Config().gateway.data_dir == "/var/lib/lastmile"


FAKE_SYSTEMCTL = """#!/bin/sh
# `systemctl show UNIT -p A,B [--value]` as systemd answers it for lastmile-forward.service: one
# line per property asked, KEY=VALUE (the value alone with --value); every call logged
echo "$*" >> "$0.log"
props="" value=""
while [ $# -gt 0 ]; do
  case "$1" in
    -p) props="$props,$2"; shift ;;
    --property=*) props="$props,${1#--property=}" ;;
    --value) value=1 ;;
  esac
  shift
done
Id=lastmile-forward.service
for name in Id MainPID LoadState; do
  case ",$props," in *",$name,"*)
    eval "v=\\$$name"
    if [ -n "$value" ]; then echo "$v"; else echo "$name=$v"; fi ;;
  esac
done
"""


def fake_systemctl(directory: Path, monkeypatch: pytest.MonkeyPatch, **answers: str) -> Path:
    """A `systemctl` first on PATH answering `show` with `answers` (MainPID, LoadState)."""
    directory.mkdir(exist_ok=True)
    tool = directory / "systemctl"
    lines = [FAKE_SYSTEMCTL.split("\n", 1)[0]] + [f"{k}={v}" for k, v in answers.items()]
    tool.write_text("\n".join(lines) + "\n" + FAKE_SYSTEMCTL.split("\n", 1)[1])
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}:{os.environ['PATH']}")
    return tool


def test_the_commitment_port_is_lastmile_forward_s_when_systemd_says_it_is_its_main_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where systemd runs the gateway, the forward service is the unit's MainPID, not whatever
    has "lastmile" and "forward" on its command line: a `lastmile forward` a technician left
    running by hand holds the port, lastmile-forward.service cannot listen (restarting), and the
    doctor said "listener up". But where the unit is not installed, systemd still answers
    MainPID=0 (rc 0): a `lastmile forward` run by hand is then the gateway's forwarder, and the
    doctor said "held by another program"."""
    from tests.peers import wait_for_port
    from tests.service_harness import start, stop

    port = free_port()
    toml = f'[reading_center]\nhost = "127.0.0.1"\nport = {free_port()}\nlisten_port = {port}\n'
    config = tmp_path / "lastmile.toml"
    config.write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n' + toml)
    by_hand = start(config, "forward", log=tmp_path / "forward.log")
    systemd = tmp_path / "run-systemd-system"
    systemd.mkdir()

    def listener(load_state: str, main_pid: int, run_dir: Path = systemd) -> Finding:
        fake_systemctl(tmp_path / "bin", monkeypatch, MainPID=str(main_pid), LoadState=load_state)
        [found] = doctor(tmp_path, toml, systemd_run_dir=run_dir, run=None).check_commitment_listener()
        return found

    try:
        wait_for_port(port, 60, by_hand)
        unit_down = listener("loaded", 0)
        unit_up = listener("loaded", by_hand.pid)
        not_installed = listener("not-found", 0)
        no_systemd = listener("loaded", 0, run_dir=tmp_path / "none")
    finally:
        stop(by_hand)
    assert unit_down.level is Level.FAIL and f"pid {by_hand.pid}" in unit_down.message, unit_down
    assert unit_up.level is Level.OK, unit_up
    assert not_installed.level is Level.OK, not_installed
    assert no_systemd.level is Level.OK, no_systemd
    asked = (tmp_path / "bin" / "systemctl.log").read_text()
    assert "MainPID" in asked and "LoadState" in asked, asked


# -- home visits ---------------------------------------------------------------------------------------


def test_home_visits_set_aside_a_damaged_key_and_visits_not_queued_for_a_day(tmp_path: Path) -> None:
    """`lastmile doctor` said nothing of home visits: a visit set aside for ever, a damaged
    signing key (no visit signed nor sent), the forward service not queueing closed visits for
    days were seen only in the journal."""
    from lastmile.visits.book import VisitBook
    from lastmile.visits.chain import KEY_FILE
    from lastmile.visits.relay_link import fault_generation
    from tests.fhir_samples import NAMING
    from uploader.outbox import Outbox

    assert "visits" in [name for name, _, _ in doctor(tmp_path).checks()]
    assert [(f.level, f.message) for f in doctor(tmp_path).check_visits()] == [(Level.OK, "no home visits recorded")]
    assert not (tmp_path / "visits.db").exists()  # the doctor never creates it
    with VisitBook.open(tmp_path, gateway_id="gw-1") as book:
        book.start("P-1", doctor_id="DR-1")
        book.stop()
        with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
            assert book.queue_closed(outbox, NAMING) == 1
        waiting = book.start("P-2", doctor_id="DR-1")
        book.stop()  # closed and signed; the forward service never queued it
        damaged = book.start("P-3", doctor_id="DR-1")
        book.stop()
        book.db.execute(  # as this version sets it aside (another version's verdict is tried again)
            "UPDATE visits SET fhir_fault = 'KeyError: quantities', fhir_fault_version = ? WHERE id = ?",
            [fault_generation(), damaged.id],
        )
        book.db.conn.commit()
    now = time.time()
    found = doctor(tmp_path, now=lambda: now + 60).check_visits()
    assert [f.level for f in found] == [Level.WARN], found
    assert "1 set aside" in found[0].message and "lastmile visit retry" in found[0].hint
    late = doctor(tmp_path, now=lambda: now + 2 * 86400).check_visits()
    assert [f.level for f in late] == [Level.WARN, Level.WARN], late
    assert "1 closed visit(s) not queued" in late[1].message and "lastmile-forward" in late[1].hint
    assert [f.topic for f in late] == ["set-aside", "not-queued"]  # two rows, each saying which
    (tmp_path / KEY_FILE).write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    with VisitBook.open(tmp_path, gateway_id="gw-1") as book, Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        assert book.queue_closed(outbox, NAMING) == 0  # the forward service tries, with the damaged key
    found = doctor(tmp_path, now=lambda: now + 60).check_visits()
    assert [f.topic for f in found if f.level is Level.FAIL] == ["signing-key"], found
    assert any("backup" in f.hint for f in found), found
    # the visit waiting for the repaired key is never counted set aside: only the damaged one is
    set_aside = [f for f in found if f.topic == "set-aside"]
    assert len(set_aside) == 1 and "1 set aside" in set_aside[0].message, set_aside
    assert damaged.id in set_aside[0].message, set_aside
    assert not [f for f in found if waiting.id in f.message], found


def test_the_home_visits_check_reads_visits_db_in_two_queries_not_four(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console runs the doctor every minute: its visits check asked visits.db four queries
    (the counts one by one) where two answer it when nothing is set aside."""
    import lastmile.data_dir
    from lastmile.visits.book import VisitBook
    from tests.statement_trace import traced

    with VisitBook.open(tmp_path, gateway_id="gw-1") as book:
        book.start("P-1", doctor_id="DR-1")
        book.stop()
    real_read_only = lastmile.data_dir.read_only
    statements: list[str] = []

    @contextlib.contextmanager
    def read_only_traced(path: Path) -> Iterator[object]:
        with real_read_only(path) as conn, traced(conn) as seen:
            yield conn
        statements.extend(seen)

    monkeypatch.setattr(lastmile.data_dir, "read_only", read_only_traced)
    found = doctor(tmp_path).check_visits()
    assert [f.level for f in found] == [Level.OK], found
    queries = [s for s in statements if " FROM " in s]
    assert len(queries) == 2, queries


def test_a_damaged_open_visit_fails_the_doctor_with_what_to_do(tmp_path: Path) -> None:
    """The open visit's row was damaged on the SD card: `visit start` and `visit note` refuse and
    say to stop it, but `lastmile doctor` and the console's System page said nothing (OK): the
    doctor learnt it only when the next visit would not start."""
    import gettext

    from lastmile.console.app import advice_for
    from lastmile.visits.book import VisitBook
    from tests.visit_harness import damage_open_row

    with VisitBook.open(tmp_path, gateway_id="gw-1") as book:
        visit = book.start("P-2", doctor_id="DR-1")
        damage_open_row(book, visit.id)
    found = doctor(tmp_path).check_visits()
    assert [(f.level, f.topic) for f in found] == [(Level.FAIL, "open-damaged")], found
    assert visit.id in found[0].message and "lastmile visit stop" in found[0].message, found
    assert "lastmile visit start --patient P-2" in found[0].hint, found
    advice = advice_for("visits", "FAIL", found[0].advice_key)
    assert "visit stop" in advice and "start the visit again" in advice, advice
    zh = gettext.translation("console", Path("lastmile/console/locale"), ["zh_CN"]).gettext(advice)
    assert zh != advice and "lastmile visit stop" in zh and "重新开始" in zh, zh


def _damage_first_page(db: Path) -> None:
    db.write_bytes(b"\xa5" * 512 + db.read_bytes()[512:])  # SQLite: "file is not a database"


def _make_unopenable(db: Path) -> None:
    db.unlink()
    db.mkdir()  # SQLite: "unable to open database file"


@pytest.mark.parametrize("damage", [_damage_first_page, _make_unopenable], ids=["not-a-database", "cannot-open"])
def test_a_damaged_visits_db_fails_the_doctor_saying_the_readings_it_holds_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Callable[[Path], None]
) -> None:
    """While visits.db cannot be read, the relay puts every reading of the clinic back each round
    (it cannot tell whether one belongs to an open visit). `lastmile doctor` said only "check
    failed: DatabaseError: file is not a database", "report this to the Lastmile maintainers",
    and the System page the signing key's advice: nothing the doctor could act on."""
    import gettext

    from lastmile.console.app import advice_for
    from lastmile.visits.book import VisitBook
    from uploader.outbox import Outbox

    with VisitBook.open(tmp_path, gateway_id="gw-1") as book:
        book.start("P-1", doctor_id="DR-1")
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        for n in range(3):
            obs = blood_pressure(dt.datetime.now(dt.timezone.utc), "P-1", f"bp-{n}")
            outbox.add(OBSERVATION_KIND, obs.record_key, observation_payload(obs), now=time.time())
    damage(tmp_path / "visits.db")
    config = tmp_path / "lastmile.toml"
    config.write_text('[gateway]\nid = "gw-1"\n')
    main(["-c", str(config), "doctor", "--offline", "--json", "--data-dir", str(tmp_path)])
    [visits] = [f for f in json.loads(capsys.readouterr().out)["findings"] if f["check"] == "visits"]
    assert visits["level"] == "FAIL", visits
    assert visits["message"].startswith("visits.db is damaged: readings and home visits wait (3 readings held back)"), (
        visits
    )
    assert "restore visits.db from its backup" in visits["hint"], visits
    advice = advice_for("visits", "FAIL", visits["advice"])
    assert "restore" in advice and "signing key" not in advice, advice
    zh = gettext.translation("console", Path("lastmile/console/locale"), ["zh_CN"]).gettext(advice)
    assert zh != advice and "visits.db" in zh, zh


def test_the_home_visits_check_looks_into_visits_db_only_after_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console runs the doctor every minute: its visits check opened visits.db each time (a
    read-only look still writes SQLite's shared-memory file on the SD card), all day, though
    nothing had changed. It opens it again only once a commit changed its files (what it read
    kept by its caller, the console: `lastmile doctor`, run once, keeps nothing)."""
    from lastmile.doctor import VisitsReadCache
    from lastmile.visits.book import VisitBook
    from tests.visit_harness import visits_db_opens

    cache = VisitsReadCache()
    with VisitBook.open(tmp_path, gateway_id="gw-1") as book:  # as the acquire service holds it
        book.start("P-1", doctor_id="DR-1")
        with visits_db_opens(monkeypatch) as opened:
            first = doctor(tmp_path, visits_cache=cache).check_visits()
            assert doctor(tmp_path, visits_cache=cache).check_visits() == first  # a minute later: nothing changed
        assert len(opened) == 1, opened
        book.stop()
        book.start("P-2", doctor_id="DR-1")
        with visits_db_opens(monkeypatch) as opened:
            later = doctor(tmp_path, visits_cache=cache).check_visits()
            assert doctor(tmp_path).check_visits() == later  # a CLI run: no cache, it reads
    assert len(opened) == 2, opened  # the commits are seen
    assert "1 home visit(s)" in first[0].message and "2 home visit(s)" in later[0].message, later


def test_forward_pids_reads_the_cgroup_tree_its_mountinfo_names(tmp_path: Path) -> None:
    """lastmile/doctor.py forward_pids: the cgroup v2 mount is the doctor's `mountinfo`'s (a hybrid
    system keeps it at /sys/fs/cgroup/unified), as every other check of it reads it."""
    cgroups = tmp_path / "unified"
    group = cgroups / "system.slice/lastmile-forward.service"
    group.mkdir(parents=True)
    (group / "cgroup.procs").write_text("4242\n4343\n")
    (tmp_path / "systemd").mkdir()

    def systemctl(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        text = (
            "Id=lastmile-forward.service\nLoadState=loaded\nMainPID=4242\n"
            "ControlGroup=/system.slice/lastmile-forward.service\n"
        )
        return subprocess.CompletedProcess(cmd, 0, text, "")

    d = doctor(tmp_path, run=systemctl, systemd_run_dir=tmp_path / "systemd")
    with d.mountinfo.open("a") as f:
        f.write(f"35 22 0:30 / {cgroups} rw,nosuid shared:10 - cgroup2 cgroup2 rw\n")
    assert d.forward_pids() == {4242, 4343}


def test_an_ecg_cart_whose_clock_was_reset_is_a_devices_warning_until_its_next_ecg_is_dated_right(
    tmp_path: Path,
) -> None:
    """The Contec cart's clock battery went flat: it dates its ECGs 2000-01-01. `lastmile doctor`
    (and the System page) said the devices were fine. Now it warns that the cart's clock needs
    setting, until the cart's newest ECG has a believable time again."""
    import datetime as dt

    from firmware_bridge.usb_import import import_paths
    from lastmile.clock import local_zone
    from lastmile.console.app import advice_text, finding_label
    from lastmile.console.i18n import Localizer
    from lastmile.ecg.intake import file_enqueuer
    from tests.conftest import shared_file
    from uploader.outbox import Outbox

    cart_file = shared_file("ecg", "contec", "0000037.ECG").read_bytes()  # written 2020-11-15 12:59:50
    received = dt.datetime(2026, 12, 6, 9, 0, tzinfo=dt.timezone.utc)
    d = doctor(tmp_path, now=lambda: received.timestamp() + 3600)
    config = d.config

    def import_stick(name: str, data: bytes) -> None:
        stick = tmp_path / name
        stick.mkdir()
        (stick / "0000037.ECG").write_bytes(data)
        with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
            summary = import_paths(
                [stick],
                is_known=lambda key: outbox.find(key) is not None,
                enqueue=file_enqueuer(outbox, config),
                local_tz=dt.timezone(dt.timedelta(hours=8)),
                now=lambda: received,
            )
        assert summary.imported == 1, summary.line()

    import_stick("reset", cart_file.replace(b"2020-11-15 12:59:50", b"2000-01-01 00:00:00"))
    clock = [f for f in d.check_devices() if f.topic == "ecg-clock"]
    assert [f.level for f in clock] == [Level.WARN]
    assert "clock is wrong" in clock[0].message and "2000-01-01" in clock[0].message
    assert "set the cart's date and time" in clock[0].hint
    # the System page heads it with the cart and tells the village doctor what to do, in Chinese
    zh = Localizer("zh-CN", local_zone())
    assert finding_label(clock[0], zh).endswith("的时钟") and "请设置心电图机的日期和时间" in advice_text(clock[0], zh)

    import_stick("set", cart_file)  # the clock set again: its next ECG is believed
    assert [f for f in d.check_devices() if f.topic == "ecg-clock"] == []


def test_an_open_visit_set_aside_by_a_repair_pass_is_not_offered_visit_retry(tmp_path: Path) -> None:
    """A repair pass met a damaged note of the open visit and set the visit aside (fhir_fault):
    the doctor counted it "set aside" and offered `lastmile visit retry`, which only retries
    closed visits (and the next pass sets it aside again). It is the open visit that is damaged:
    the doctor FAILs with what `visit start`/`note` say - stop it, then start it again."""
    from lastmile.visits.book import VisitBook
    from tests.visit_harness import set_aside_by_a_damaged_note
    from uploader.outbox import Outbox

    with VisitBook.open(tmp_path, gateway_id="gw-1") as book, Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        visit = book.start("P-4", doctor_id="DR-1")
        book.note("wound dressed")
        set_aside_by_a_damaged_note(book, outbox)
    row = _visit_row(tmp_path, visit.id)
    assert row[0] == "open" and row[1] is not None, row  # set aside while open
    found = doctor(tmp_path).check_visits()
    assert not [f for f in found if "lastmile visit retry" in f.hint], found
    assert [(f.level, f.topic) for f in found] == [(Level.FAIL, "open-damaged")], found
    assert visit.id in found[0].message and "lastmile visit stop" in found[0].message, found
    assert "lastmile visit start --patient P-4" in found[0].hint, found


def _visit_row(data: Path, visit_id: str) -> tuple[str, str | None]:
    with sqlite3.connect(data / "visits.db") as conn:
        return conn.execute("SELECT state, fhir_fault FROM visits WHERE id = ?", [visit_id]).fetchone()


def test_the_consoles_doctor_minute_reopens_visits_db_only_once_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the home visits check last read is kept by the console's doctor runs (its state's,
    ConsoleState.doctor_runs; lastmile.doctor holds no module-wide state): the System page's next run of the
    checks does not reopen an unchanged visits.db (SD wear), and sees a new visit."""
    import asyncio

    from lastmile.console.views import DoctorRuns
    from lastmile.visits.book import VisitBook
    from tests.visit_harness import visits_db_opens

    config = doctor(tmp_path).config
    runs = DoctorRuns()  # the console's (ConsoleState.doctor_runs)
    with VisitBook.open(tmp_path, gateway_id="gw-1") as book:
        book.start("P-1", doctor_id="DR-1")
        with visits_db_opens(monkeypatch) as opened:
            asyncio.run(runs.findings(config))
            runs.forget()  # as a minute later: the checks run again
            found = asyncio.run(runs.findings(config))
        assert len(opened) == 1, opened
        assert any(f.check == "visits" and "1 home visit(s)" in f.message for f in found), found
        book.stop()
        book.start("P-2", doctor_id="DR-1")
        runs.forget()
        with visits_db_opens(monkeypatch) as opened:
            found = asyncio.run(runs.findings(config))
    assert len(opened) == 1, opened
    assert any(f.check == "visits" and "2 home visit(s)" in f.message for f in found), found


def test_a_doctor_run_opens_the_outbox_once_and_finds_recent_ecgs_without_a_full_scan(tmp_path: Path) -> None:
    """The console runs the doctor every minute. Its ECG-clock check opened the outbox a second
    time per run (each open: crash recovery, reserve check, lock file written: SD wear) and read
    the recent ECGs with a scan of every row ever queued (purged rows stay: hundreds of ms on a
    Pi's 300k-row outbox). One open per run, and an index search."""
    import sys

    from uploader.outbox import Kind, Outbox, Priority

    d = doctor(tmp_path, offline=True)
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        outbox.add(Kind.DICOM, "ecg-1", b"x", priority=Priority.ROUTINE, meta={"device": "cart"}, now=d.now())
        traced: list[str] = []
        outbox.db.conn.set_trace_callback(traced.append)
        [recent] = outbox.newest(Kind.DICOM, since=d.now() - 86400, limit=50)
        assert recent.key == "ecg-1"
        outbox.db.conn.set_trace_callback(None)
        [query] = [sql for sql in traced if "created_at >=" in sql]
        plan = [row[3] for row in outbox.db.conn.execute("EXPLAIN QUERY PLAN " + query)]
    assert not [step for step in plan if step.startswith("SCAN items")], plan

    opens: list[str] = []
    counting = [True]

    def count_outbox_opens(event: str, args: tuple) -> None:
        if counting and event == "sqlite3.connect" and str(args[0]).endswith("outbox.sqlite"):
            opens.append(str(args[0]))

    sys.addaudithook(count_outbox_opens)  # stays for the worker's life: `counting` ends it
    try:
        d.run_all()
    finally:
        counting.clear()
    assert len(opens) == 1, f"one doctor run opened the outbox {len(opens)} times"


# -- what a stop kept for the next start ---------------------------------------------------------------


def test_what_a_stop_kept_for_the_next_start_and_damaged_copies_set_aside_are_warnings(tmp_path: Path) -> None:
    """The files in which a stop keeps what it could not write (uploader.unwritten_records) were
    said by nobody: a start that could not apply one left it for ever, and the damaged copies a
    start set aside were never named. Now `lastmile doctor` warns with what and how many, and
    names each damaged copy. Written here by the code that writes them at a stop (the outbox's
    note of what the county stored, the serial device rows the stop gave up), read back by a start."""
    from lastmile.services.serial_spill import RowBehind, rows_behind_file
    from uploader.outbox import Outbox
    from uploader.payload_files import OwnerLock

    data = tmp_path
    assert [f.topic for f in doctor(data).check_data_partition()] == ["space", "sd-card"]  # none: nothing said
    rows_behind_file(data).save(
        [("serial:a", RowBehind((2, 0), (1, 0), "")), ("serial:b", RowBehind((1, 0), (1, 0), ""))]
    )
    with Outbox.open(data, min_free_bytes=0) as forwarder:
        first = forwarder.add("dicom", "a", b"x" * 10).item
        forwarder.add("dicom", "b", b"y" * 10)
        assert [i.id for i in forwarder.claim("dicom", 10, time.time())] == [first.id, first.id + 1]
        assert forwarder.begin_send(first.id, time.time())
        forwarder.remember_stored([first.id, first.id + 1], taken=False)  # the county stored both; mark_sent failed
        found = {f.topic: f for f in doctor(data).check_data_partition()}
    kept = found["left-by-stop"]
    assert kept.level is Level.WARN and kept.advice_key == "left-by-stop", kept
    # a running forwarder's note (a passing lock) is no stop's: it records it itself
    assert "outbox item(s)" not in kept.message and "stored-" not in kept.message, kept
    assert "2 device row(s) whose held readings' counts were not written" in kept.message, kept
    assert "damaged-copy" not in found
    # one a dead forwarder left (killed before recording what the county stored) waits for a start
    dead = "0000-dead"
    OwnerLock.stored_file(data / "locks", dead).replace([f"{first.id} sent", f"{first.id + 1} sent"])
    kept = {f.topic: f for f in doctor(data).check_data_partition()}["left-by-stop"]
    assert "2 outbox item(s) the county stored that the sending could not record as sent" in kept.message, kept
    assert f"locks/stored-{dead}" in kept.message, kept
    OwnerLock.stored_file(data / "locks", dead).forget()

    (data / "serial-rows-behind.jsonl").write_bytes(b'{"address": "serial:a"\n')  # torn on the SD card
    assert rows_behind_file(data).load() == []  # the start: set aside, said; nothing readable: the file goes
    found = {f.topic: f for f in doctor(data).check_data_partition()}
    (aside,) = data.glob("serial-rows-behind.jsonl.damaged-*")
    damaged = found["damaged-copy"]
    assert damaged.level is Level.WARN and str(aside) in damaged.message and damaged.subject == aside.name, damaged
    # no file waits: not a file to look for that is not there
    assert "if any, were written" in damaged.message and "wait in" not in damaged.message, damaged
    assert f"they are in {aside} only (a full disk)" in damaged.message, damaged  # the journal's rare case
    assert "left-by-stop" not in found  # the outbox recorded what it kept at its close; the rows' was taken
    said = [f.topic for f in doctor(data, offline=True).run_all() if f.check == "data"]
    assert said == ["space", "damaged-copy", "sd-card"], said
    aside.unlink()


def test_a_damaged_copys_readable_records_are_said_waiting_while_their_file_is_there_written_once_gone(
    tmp_path: Path,
) -> None:
    """REV-A 1: the doctor said a damaged copy's readable records "are kept in <file> until written"
    whether or not that file was there: it usually is not (the start wrote them and removed it), and
    a technician looked for it in vain, unsure whether records were lost. Now it looks: while the
    file is there they wait in it for the next start; once it is gone they were written."""
    from lastmile.services.serial_spill import RowBehind, rows_behind_file

    data = tmp_path
    original = data / "serial-rows-behind.jsonl"
    rows_behind_file(data).save([("serial:a", RowBehind((2, 0), (1, 0), ""))])
    with original.open("ab") as f:
        f.write(b'{"address": "serial:b"\n')  # torn on the SD card
    start = rows_behind_file(data)
    assert [address for address, _ in start.load()] == ["serial:a"]  # copied aside, the readable line kept in the file
    # the start has not written them (it failed, or is still at it): they wait in the file
    (aside,) = data.glob("serial-rows-behind.jsonl.damaged-*")
    found = {f.topic: f for f in doctor(data).check_data_partition()}
    damaged = found["damaged-copy"]
    assert f"its readable records, unless a start wrote them since, wait in {original} for the next start" in (
        damaged.message
    ), damaged
    assert "were written" not in damaged.message, damaged
    assert str(original) in found["left-by-stop"].message  # the waiting file is said there too
    start.forget()  # the start wrote them: the file goes
    found = {f.topic: f for f in doctor(data).check_data_partition()}
    damaged = found["damaged-copy"]
    assert str(aside) in damaged.message and "its readable records, if any, were written" in damaged.message, damaged
    assert "wait in" not in damaged.message and "left-by-stop" not in found, found


def test_a_card_a_stop_kept_for_the_next_start_is_a_warning_and_a_torn_one_is_set_aside(tmp_path: Path) -> None:
    """serial-cards-given-up.jsonl: the card (badge) whose check-in a stop gave up, kept for the next
    start (lastmile.services.serial_devices), is one of the files `lastmile doctor` says while it
    waits; a torn line of it is copied aside and named, as the others' are."""
    from lastmile.services.serial_spill import CardGivenUp, cards_given_up_file

    data = tmp_path
    scanned_at = dt.datetime(2026, 12, 7, 18, 30, tzinfo=dt.timezone.utc)
    card = CardGivenUp("patient", "80276001234567890123", "desk-scanner", scanned_at, "gateway-receipt")
    cards_given_up_file(data).save([card])  # two stops, no start between that took the first
    cards_given_up_file(data).save([CardGivenUp("doctor", "004711", "desk-scanner", scanned_at, card.time_source)])
    kept = {f.topic: f for f in doctor(data).check_data_partition()}["left-by-stop"]
    assert "2 card(s) scanned as the gateway stopped, maybe not checked in" in kept.message, kept
    assert "80276001234567890123" not in kept.message  # the doctor's words name no patient
    assert [c.kind for c in cards_given_up_file(data).load()] == ["patient", "doctor"]
    with (data / "serial-cards-given-up.jsonl").open("ab") as f:
        f.write(b'{"kind": "patient", "scanned_id"\n')  # torn on the SD card
    taken = cards_given_up_file(data).load()  # the readable ones; the file copied aside, said
    assert [c.kind for c in taken] == ["patient", "doctor"] and taken[0] == card, taken
    (aside,) = data.glob("serial-cards-given-up.jsonl.damaged-*")
    damaged = {f.topic: f for f in doctor(data).check_data_partition()}["damaged-copy"]
    assert str(aside) in damaged.message, damaged


def test_the_doctor_only_looks_at_an_outbox_owners_lock_never_takes_it(tmp_path: Path) -> None:
    """REV-E 4: the doctor's live-owner check (the System page runs it) took a dead owner's lock
    for a moment and removed its file: an outbox opening then found the owner "alive", skipped its
    note of what the county stored, then found it dead and sent those again. Now it only reads
    /proc/locks: a dead owner's lock file stays as it is, a live one (another process) is seen."""
    import sys

    from lastmile.doctor import locks_named_by_stats_device
    from uploader.payload_files import OwnerLock

    locks = tmp_path / "locks"
    locks.mkdir()
    for token in ("0000-dead", "0000-live"):
        OwnerLock.stored_file(locks, token).replace(["7 sent"])
    dead_lock = locks / "owner-0000-dead.lock"
    dead_lock.touch()  # its process died: the kernel dropped its flock, the file stays
    trusted = locks_named_by_stats_device(locks, Path("/proc/self/mountinfo"))  # as the doctor decides it
    inode = dead_lock.stat().st_ino
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from uploader.payload_files import OwnerLock;"
            "lock = OwnerLock(Path(sys.argv[1]), '0000-live'); print('held', flush=True); sys.stdin.read()",
            str(locks),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        kept = {f.topic: f for f in doctor(tmp_path).check_data_partition()}["left-by-stop"]
        assert "locks/stored-0000-dead" in kept.message and "stored-0000-live" not in kept.message, kept
        assert dead_lock.exists() and dead_lock.stat().st_ino == inode  # looked at, not taken nor removed
        assert OwnerLock.seen_held(locks, "0000-live", device_is_stats=trusted)
        assert not OwnerLock.seen_held(locks, "0000-dead", device_is_stats=trusted)
    finally:
        holder.communicate("", timeout=10)
    assert not OwnerLock.seen_held(locks, "0000-live", device_is_stats=trusted)  # its process ended


def test_a_lock_with_the_same_inode_number_on_another_filesystem_is_not_the_owners(tmp_path: Path) -> None:
    """REV-F 3: the doctor matched /proc/locks by inode number alone: a flock on another filesystem
    (a tmpfs /run) with the same number made a dead owner look alive, and its note was never said
    to be a stop's. Now the device must agree too, except on overlayfs (its device is a layer's)."""
    import os

    from lastmile.doctor import locks_named_by_stats_device
    from uploader.payload_files import OwnerLock

    def seen_held(mountinfo: Path) -> bool:
        """The owner's lock seen held, the device trusted as the doctor decides it from `mountinfo`."""
        trusted = locks_named_by_stats_device(locks, mountinfo)
        return OwnerLock.seen_held(locks, "0000-dead", device_is_stats=trusted, proc_locks=proc_locks)

    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "owner-0000-dead.lock").touch()
    here = (locks / "owner-0000-dead.lock").stat()
    major, minor = os.major(here.st_dev), os.minor(here.st_dev)
    proc_locks = tmp_path / "locks.txt"
    proc_locks.write_text(f"1: FLOCK  ADVISORY  WRITE 1234 {major + 1:02x}:{minor:02x}:{here.st_ino} 0 EOF\n")
    mounted_as = [
        line.partition(" - ")[2].split()[0]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[2] == f"{major}:{minor}"
    ]
    if mounted_as and mounted_as[0] != "overlay":  # this machine's own mounts say the device is stat's
        assert not seen_held(Path("/proc/self/mountinfo"))
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"36 35 {major}:{minor} / / rw,noatime shared:1 - ext4 /dev/mmcblk0p2 rw\n")
    assert not seen_held(mountinfo)

    proc_locks.write_text(f"1: FLOCK  ADVISORY  WRITE 1234 {major:02x}:{minor:02x}:{here.st_ino} 0 EOF\n")
    assert seen_held(mountinfo)  # its own lock

    proc_locks.write_text(f"1: FLOCK  ADVISORY  WRITE 1234 {major + 1:02x}:{minor:02x}:{here.st_ino} 0 EOF\n")
    mountinfo.write_text(f"36 35 {major}:{minor} / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u\n")
    assert seen_held(mountinfo)  # a layer's device
    mountinfo.write_text(f"36 35 {major + 1}:{minor} / / rw,noatime shared:1 - ext4 /dev/mmcblk0p2 rw\n")
    assert seen_held(mountinfo)  # no mount of stat's device (a btrfs subvolume's): the inode alone
