"""The metrics exporter's sources and collector against real parts: an outbox moved through its
states by its own API, a visit book anchored by a GPS fix, processes in a cgroup-shaped tree,
chronyc's output as captured from a real chronyd, and the endpoint served over HTTP."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from lastmile.config import Config, ConfigError, parse_config, render_defaults
from lastmile.demo.loopback import free_port
from lastmile.services import metrics_sources as sources
from lastmile.services.metrics import MetricsService, render_once
from tests.fhir_samples import queue_visits
from tests.fhir_server import FhirTestServer, RefusesVisits
from tests.metrics_harness import (
    NOW,
    busy_after_taking_two,
    config_at,
    forwarding,
    make_report_store,
    not_answering_after_taking_one,
    parse_exposition,
    queue_ecgs,
    scrape,
    tool,
    value,
    write_config,
)
from uploader.fhir_forwarder import forward_fhir_once
from uploader.outbox import Hold, Kind, Outbox

# `chronyc -c -n tracking` from chrony 4.3 (Debian 12), captured from a real chronyd on loopback:
# synchronised to an NTP server (its text form said "0.000001606 seconds fast of NTP time"),
# running on its own clock (`local stratum 10`), and with no source at all.
CHRONY_SYNCED = (
    "7F000001,127.0.0.1,9,1796110871.875084692,-0.000001603,0.000000568,0.000000265,0.040,0.189,0.436,"
    "0.000005029,0.000001561,0.3,Normal"
)
CHRONY_LOCAL = "7F7F0101,,10,1796110844.813257955,0.000000000,0.000000000,0.000000000,0.000,0.000,0.000,0.000000000,0.000000000,0.0,Normal"
CHRONY_NONE = "00000000,,0,0.000000000,0.000000000,0.000000000,0.000000000,0.000,0.000,0.000,1.000000000,1.000000000,0.0,Not synchronised"
# a GPS reference clock through gpsd's SHM as chrony names it (the image's planned set-up)
CHRONY_GPS = "47505300,GPS,1,1796110871.5,0.000250000,0.0,0.0,0.0,0.0,0.0,0.0,0.000100000,16.0,Normal"


def answered(stdout: str, returncode: int = 0, stderr: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(["tool"], returncode, stdout, stderr)


# -- the outbox ----------------------------------------------------------------------------------------


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox.open(tmp_path, now=NOW - 1000)
    yield box
    box.close()


def test_outbox_counts_ages_holds_and_links_as_the_outbox_api_left_them(outbox: Outbox, tmp_path: Path) -> None:
    def add(kind: str, key: str, at: float, **kw: object) -> int:
        return outbox.add(kind, key, b"x" * 100, now=at, **kw).item.id  # type: ignore[arg-type]

    first = add(Kind.DICOM, "d1", NOW - 900, meta={"quality": {"verdict": "warn"}})
    add(Kind.DICOM, "d2", NOW - 800, meta={"quality": {"verdict": "acceptable"}})
    add(Kind.DICOM, "d3", NOW - 700, meta={"quality": {"verdict": "re-record"}}, hold=Hold("re-record", NOW + 60))
    add(Kind.DICOM, "d4", NOW - 600)  # no quality verdict (checked off)
    sent = add(Kind.DICOM, "d5", NOW - 500)
    gone = add(Kind.DICOM, "d6", NOW - 400)
    add(Kind.FHIR_BUNDLE, "f1", NOW - 300)
    # d1 sent and committed, d5 sent (awaiting commitment), d6 quarantined, f1 failed once
    claimed = outbox.claim(Kind.DICOM, 10, NOW - 200)
    assert {i.id for i in claimed} == {first, 2, 4, sent, gone}  # d3 is held
    outbox.mark_sent([first, sent], NOW - 150)
    outbox.mark_committed([first], NOW - 100)
    outbox.quarantine(gone, "refused by the reading center: 0xA900", NOW - 90)
    outbox.release([2, 4], "forwarder stopped", NOW - 80, 0.0)
    outbox.claim(Kind.FHIR_BUNDLE, 1, NOW - 60)
    outbox.mark_transient_failure(7, "HTTP 503", NOW - 50)
    outbox.record_status("reading_center", {"fault": None, "last_success": NOW - 150}, NOW - 150)

    snap = sources.read_outbox(tmp_path, NOW)
    assert snap is not None
    assert snap.counts == {
        ("dicom", "queued"): 3,
        ("dicom", "sent"): 1,
        ("dicom", "committed"): 1,
        ("dicom", "quarantined"): 1,
        ("fhir-bundle", "queued"): 1,
    }
    assert snap.held == {("dicom", "re-record"): 1}
    assert snap.oldest_waiting_s == {"dicom": 800.0, "fhir-bundle": 300.0}  # d2, f1
    assert snap.uncommitted_bytes == {"dicom": 400, "fhir-bundle": 100}  # d2, d3, d4, d5; f1
    # d1 committed still has its meta; the quarantined one too; purged ones would not
    assert snap.quality == {"warn": 1, "acceptable": 1, "re-record": 1, "unchecked": 3}
    assert snap.last_committed_at == {"dicom": NOW - 100}
    assert snap.links["dicom"].state == "up" and snap.links["dicom"].last_success_at == NOW - 150
    # f1's failure is not a judgement of the platform: no FHIR round recorded one (the doctor's word too)
    assert snap.links["fhir"].state == "unknown" and snap.links["fhir"].last_failure_at is None

    # the forwarder's configuration fault, as uploader.ecg_forwarder records it
    outbox.record_status("reading_center", {"fault": "association rejected: calling AE not recognised"}, NOW)
    assert sources.read_outbox(tmp_path, NOW).links["dicom"].state == "refused"  # type: ignore[union-attr]


def test_an_outbox_never_created_is_none_and_nothing_is_created(tmp_path: Path) -> None:
    assert sources.read_outbox(tmp_path, NOW) is None
    assert list(tmp_path.iterdir()) == []


def test_reading_takes_no_write_lock_and_cannot_write(outbox: Outbox, tmp_path: Path) -> None:
    outbox.add(Kind.DICOM, "a", b"1", now=NOW)
    with sources.read_only(tmp_path / "outbox.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM items").fetchone() == (1,)  # a read transaction is open
        # the services keep writing meanwhile: a write lock held here would make this wait, then fail
        outbox.add(Kind.DICOM, "b", b"2", now=NOW)
        with pytest.raises(sqlite3.OperationalError, match=r"readonly|read-only"):
            conn.execute("UPDATE items SET state = 'purged'")
        # the snapshot is the one the transaction began with
        assert conn.execute("SELECT COUNT(*) FROM items").fetchone() == (1,)
    assert sources.read_outbox(tmp_path, NOW).counts[("dicom", "queued")] == 2  # type: ignore[union-attr]


# -- returned reports ----------------------------------------------------------------


def test_reports_are_none_until_clinic_db_exists_then_zero(tmp_path: Path) -> None:
    from lastmile.clinic.db import open_clinic_db

    assert sources.read_reports(tmp_path, NOW) is None  # no clinic.db
    open_clinic_db(tmp_path).close()  # its migrations make the report store, empty
    snapshot = sources.read_reports(tmp_path, NOW)
    assert snapshot is not None
    assert (snapshot.critical_unacknowledged, snapshot.awaited_studies, snapshot.awaited_stat) == (0, 0, 0)
    assert snapshot.critical_oldest_s is None and snapshot.awaited_oldest_s is None


def test_critical_reports_not_opened_and_studies_awaiting_their_report(tmp_path: Path) -> None:
    conn = make_report_store(tmp_path)

    def iso(t: float) -> str:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()

    studies = [("1.2.1", 0, NOW - 7200, iso(NOW - 3600)), ("1.2.2", 1, NOW - 5400, None), ("1.2.3", 0, NOW - 600, None)]
    for uid, stat, sent, final in studies:
        conn.execute(
            "INSERT INTO sent_studies (study_uid, stat, sent_at, final_at) VALUES (?, ?, ?, ?)",
            (uid, stat, iso(sent), final),
        )
    reports = [  # (study, critical, acknowledged_at, received_at)
        ("1.2.1", json.dumps(["ST elevation"]), None, NOW - 3600),
        ("1.2.1", None, None, NOW - 3500),
        ("1.2.2", json.dumps(["VF"]), iso(NOW - 60), NOW - 120),
    ]
    for i, (uid, critical, acked, received) in enumerate(reports):
        conn.execute(
            "INSERT INTO reports (study_uid, source, kind, object_uid, status, critical, acknowledged_at, "
            "received_at, data) VALUES (?, 'dicom', 'sr', ?, 'final', ?, ?, ?, x'00')",
            (uid, f"1.9.{i}", critical, acked, iso(received)),
        )
    conn.execute(
        "INSERT INTO report_status (name, value) VALUES ('poller', ?)",
        (json.dumps({"last_success_at": NOW - 30, "error": None, "fault": None, "failing_since": None}),),
    )
    conn.close()
    snap = sources.read_reports(tmp_path, NOW)
    assert snap is not None
    assert snap.critical_unacknowledged == 1 and snap.critical_oldest_s == pytest.approx(3600.0)
    assert (snap.awaited_studies, snap.awaited_stat) == (2, 1)
    assert snap.awaited_oldest_s == pytest.approx(5400.0)
    assert snap.link.state == "up" and snap.link.last_success_at == NOW - 30


# -- the clock -----------------------------------------------------------------------------------------


def test_chrony_tracking_as_chronyc_prints_it() -> None:
    synced = sources.parse_chrony_tracking(CHRONY_SYNCED)
    assert synced is not None and synced.synchronized
    assert synced.reference == "127.0.0.1" and synced.stratum == 9
    assert synced.offset_s == pytest.approx(1.603e-6)  # "fast": the system clock is ahead
    local = sources.parse_chrony_tracking(CHRONY_LOCAL)
    assert local is not None and not local.synchronized  # its own clock is no reference
    none = sources.parse_chrony_tracking(CHRONY_NONE)
    assert none is not None and not none.synchronized and none.leap_status == "Not synchronised"
    assert sources.parse_chrony_tracking("506 Cannot talk to daemon") is None


def test_clock_from_chrony_then_timesyncd_then_nothing(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    chrony = tool({"chronyc": answered(CHRONY_GPS + "\n")})
    clock = sources.read_clock(tmp_path, run=chrony, now=NOW, timesyncd_flag=flag)
    assert (clock.source, clock.synchronized, clock.reference) == ("chrony", True, "GPS")
    assert clock.offset_s == pytest.approx(-0.00025) and clock.last_sync_at == pytest.approx(1796110871.5)

    not_running = tool({"chronyc": answered("", 1, "506 Cannot talk to daemon")})
    clock = sources.read_clock(tmp_path, run=not_running, now=NOW, timesyncd_flag=flag)
    assert (clock.source, clock.synchronized) == ("none", False) and clock.plausible

    flag.touch()
    os.utime(flag, (NOW - 40, NOW - 40))
    clock = sources.read_clock(tmp_path, run=tool({}), now=NOW, timesyncd_flag=flag)
    assert (clock.source, clock.synchronized, clock.last_sync_at) == ("timesyncd", True, NOW - 40)

    booted_in_1970 = sources.read_clock(tmp_path, run=tool({}), now=86400.0, timesyncd_flag=flag)
    assert not booted_in_1970.plausible


def test_gps_offset_from_the_visit_books_anchor_of_this_boot(tmp_path: Path) -> None:
    from devices.gps.fix import Fix, FixMode
    from lastmile.visits.book import VisitBook

    assert sources.read_gps_offset(tmp_path, time.time()) is None  # no visits.db
    with VisitBook.open(tmp_path, gateway_id="gw") as book:
        assert sources.read_gps_offset(tmp_path, time.time()) is None  # no fix yet
        gps_time = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=90)  # our clock is 90 s ahead
        book.observe_fix(Fix(FixMode.FIX_3D, gps_time, latitude=30.0, longitude=120.0))
    offset = sources.read_gps_offset(tmp_path, time.time())
    assert offset == pytest.approx(90.0, abs=5.0)


# -- the services --------------------------------------------------------------------------------------


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; x = bytearray(30_000_000); print('ready', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE,
    )
    # its memory read only once it has all of it: under load RSS passed 30 MB with the zero-fill
    # still going, and the probe and the test's own reading a moment later differed by 5 MB
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    yield proc
    proc.kill()
    proc.wait()


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def start_ticks(pid: int) -> int:
    """proc(5)'s starttime of `pid`: clock ticks after the kernel's boot."""
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19])


def started(pid: int) -> float:
    """When `pid` started, epoch seconds, from /proc as proc(5) defines starttime: clock ticks after
    the kernel's boot time, which /proc/stat's btime states in whole seconds (truncated)."""
    btime = next(
        int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
    )
    return btime + start_ticks(pid) / os.sysconf("SC_CLK_TCK")


def test_the_start_time_from_btime_is_within_a_second_of_the_true_one() -> None:
    """btime is whole seconds: a start time read from it is up to 1 s early (the boot's own
    fraction of a second), never more - the price of a number that stays the same at every scrape.
    (Compared with a tolerance of 0.5 s, the tests below failed on machines booted late in a second.)"""
    ticks = start_ticks(os.getpid())
    true_start = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + ticks / os.sysconf("SC_CLK_TCK")
    assert 0.0 <= true_start - started(os.getpid()) < 1.05


def test_a_start_time_is_the_same_number_at_every_scrape(tmp_path: Path) -> None:
    """Prometheus counts restarts with changes(): a start time that jitters would be restarts."""
    group = tmp_path / "system.slice/lastmile-forward.service"
    group.mkdir(parents=True)
    (group / "cgroup.procs").write_text(f"{os.getpid()}\n")
    probe = sources.ServiceProbe(("lastmile-forward.service",), run=tool({}), cgroup_root=tmp_path)
    seen = {probe.read()[0].started_at for _ in range(200)}
    assert len(seen) == 1 and seen != {None}
    assert seen.pop() == pytest.approx(started(os.getpid()), abs=1.0)


def wait_for_rss(pid: int, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while vm_rss(pid) < at_least:
        assert time.monotonic() < deadline, "the child never grew"
        time.sleep(0.05)


def test_services_from_their_cgroups_and_proc_without_systemd(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    wait_for_rss(sleeper.pid, 30_000_000)
    slice_dir = tmp_path / "system.slice"
    (slice_dir / "lastmile-forward.service").mkdir(parents=True)
    (slice_dir / "lastmile-forward.service/cgroup.procs").write_text(f"{sleeper.pid}\n")
    (slice_dir / "lastmile-acquire.service").mkdir()
    (slice_dir / "lastmile-acquire.service/cgroup.procs").write_text("")  # stopped: an empty cgroup
    probe = sources.ServiceProbe(
        ("lastmile-forward.service", "lastmile-acquire.service", "lastmile-console.service"),
        run=tool({}),
        cgroup_root=tmp_path,
        slice_dir=slice_dir,
    )
    forward, acquire, console = probe.read()
    assert forward.active and forward.processes == 1 and forward.restarts is None
    assert forward.resident_bytes == pytest.approx(vm_rss(sleeper.pid), rel=0.1)
    assert forward.started_at == pytest.approx(started(sleeper.pid), abs=0.5)
    assert not acquire.active and acquire.resident_bytes is None and acquire.started_at is None
    assert not console.active  # no cgroup at all


SYSTEMCTL_SHOW = """\
Id=lastmile-forward.service
ActiveState=active
NRestarts=4
MainPID={pid}
ControlGroup=/system.slice/lastmile-forward.service

Id=lastmile-console.service
ActiveState=failed
NRestarts=0
MainPID=0
ControlGroup=
"""


def test_systemd_adds_its_restart_count_and_main_pid(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    group = tmp_path / "system.slice/lastmile-forward.service"
    group.mkdir(parents=True)
    (group / "cgroup.procs").write_text(f"{os.getpid()}\n{sleeper.pid}\n")  # a main process and a worker
    seen: list[list[str]] = []

    def systemctl(cmd: Sequence[str]) -> subprocess.CompletedProcess[str] | None:
        seen.append(list(cmd))
        return answered(SYSTEMCTL_SHOW.format(pid=sleeper.pid))

    probe = sources.ServiceProbe(
        ("lastmile-forward.service", "lastmile-console.service"), run=systemctl, cgroup_root=tmp_path
    )
    forward, console = probe.read()
    assert seen[0][:2] == ["systemctl", "show"] and seen[0][-2:] == [
        "lastmile-forward.service",
        "lastmile-console.service",
    ]
    assert forward.active and forward.restarts == 4 and forward.processes == 2
    assert forward.resident_bytes == pytest.approx(vm_rss(os.getpid()) + vm_rss(sleeper.pid), rel=0.2)
    # the main process's start (systemd's MainPID), not the older one's (this test process)
    assert started(os.getpid()) < started(sleeper.pid) - 0.5
    assert forward.started_at == pytest.approx(started(sleeper.pid), abs=0.5)
    assert not console.active and console.restarts == 0


def test_without_systemd_systemctl_is_asked_once(tmp_path: Path) -> None:
    calls = []

    def no_systemd(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return answered("", 1, "System has not been booted with systemd as init system (PID 1). Can't operate.")

    probe = sources.ServiceProbe(("lastmile-forward.service",), run=no_systemd, cgroup_root=tmp_path)
    probe.read()
    probe.read()
    assert len(calls) == 1


# -- configuration ---------------------------------------------------------------------------------------


def test_metrics_listen_is_checked_and_documented() -> None:
    assert parse_config("").metrics.listen == "127.0.0.1:9560"
    assert parse_config('[metrics]\nlisten = "[::1]:9560"\n').metrics.listen == "[::1]:9560"
    for bad in ("9560", "10.8.0.12", "10.8.0.12:0", "10.8.0.12:70000", ":9560"):
        with pytest.raises(ConfigError, match=r"test.toml:2: 'metrics.listen' must be \"HOST:PORT\""):
            parse_config(f'[metrics]\nlisten = "{bad}"\n', "test.toml")
    assert 'listen = "127.0.0.1:9560"  # HOST:PORT of the Prometheus endpoint' in render_defaults()


# -- the collector and the endpoint ---------------------------------------------------------------------


def test_a_scrape_shows_the_queue_the_quality_gate_and_the_disk(tmp_path: Path) -> None:
    config = config_at(write_config(tmp_path))
    metas = queue_ecgs(config, good=2, lead_off=1)
    text = render_once(config)
    samples = parse_exposition(text)
    assert value(samples, "lastmile_queue_items", kind="dicom", state="queued") == 3
    assert value(samples, "lastmile_queue_items", kind="fhir-bundle", state="queued") == 0
    assert value(samples, "lastmile_queue_held_items", kind="dicom", reason="re-record") == 1
    verdicts = [m["quality"]["verdict"] for m in metas]
    for verdict in ("acceptable", "warn", "re-record"):
        assert value(samples, "lastmile_ecg_quality_items", verdict=verdict) == verdicts.count(verdict)
    assert value(samples, "lastmile_link_state", destination="dicom", state="unknown") == 1
    assert value(samples, "lastmile_gateway_info", gateway="clinic-xiaohe-01") == 1
    st = os.statvfs(config.data_dir)
    assert value(samples, "lastmile_data_size_bytes") == st.f_blocks * st.f_frsize
    assert value(samples, "lastmile_outbox_min_free_bytes") == 200 * 2**20
    assert all(value(samples, "lastmile_source_up", source=s) == 1 for s in ("outbox", "disk", "clock", "services"))
    assert value(samples, "lastmile_reports_critical_unacknowledged") is None  # SEAM(issue 14): no store yet
    assert "Zhang" not in text and "11010519491231002X" not in text  # no patient data, ever
    print(f"scrape: {len(text.encode())} bytes, {len(samples)} samples")


def test_an_unreadable_source_is_reported_and_the_rest_still_shown(tmp_path: Path) -> None:
    config = config_at(write_config(tmp_path))
    data = config.data_dir
    data.mkdir()
    (data / "outbox.sqlite").write_bytes(b"this is not a database, it is a damaged card" * 100)
    samples = parse_exposition(render_once(config))
    assert value(samples, "lastmile_source_up", source="outbox") == 0
    assert value(samples, "lastmile_queue_items", kind="dicom", state="queued") is None  # no zeros that lie
    assert value(samples, "lastmile_source_up", source="disk") == 1 and value(samples, "lastmile_data_free_bytes")


def test_the_service_serves_over_http_until_closed(tmp_path: Path) -> None:
    config = config_at(write_config(tmp_path, metrics_port=free_port()))
    queue_ecgs(config, good=1)
    service = MetricsService(config)
    url = service.server.listen.url("/metrics")
    try:
        assert service.step(__import__("threading").Event()) > 0
        samples = parse_exposition(scrape(url).decode())
        assert value(samples, "lastmile_queue_items", kind="dicom", state="queued") == 1
        assert value(samples, "process_resident_memory_bytes")  # the exporter's own figures
        # a second server on the same address is an operational fault (waited out), not a crash
        with pytest.raises(OSError, match=r"metrics\.listen"):
            MetricsService(config)
    finally:
        service.close()
    with pytest.raises(OSError):
        scrape(url)


def test_doctor_shows_the_endpoint(tmp_path: Path) -> None:
    from lastmile.doctor import Doctor, Level

    config = config_at(write_config(tmp_path, metrics_port=free_port()))
    [finding] = Doctor(config).check_metrics()
    assert finding.level is Level.WARN and "nothing answers" in finding.message
    service = MetricsService(config)
    try:
        [finding] = Doctor(config).check_metrics()
    finally:
        service.close()
    assert finding.level is Level.OK and "loopback only" in finding.message and "series" in finding.message


# -- the county platform's link, as the FHIR forwarder judged it ----------------------------------------


def fhir_link_state(config: Config) -> dict[str, float | None]:
    """lastmile_link_state{destination="fhir"} by state, from the real exporter's output."""
    samples = parse_exposition(render_once(config))
    return {s: value(samples, "lastmile_link_state", destination="fhir", state=s) for s in ("up", "down", "refused")}


def test_a_busy_county_platform_is_up_not_down(tmp_path: Path) -> None:
    """The platform takes the visit records, then answers the next one 429 (busy, Retry-After):
    the county's link_state said "down" - a false alarm, the platform answers; the queue metrics
    show the backlog."""
    config = config_at(write_config(tmp_path))
    busy_after_taking_two(config, time.time() - 60, busy_after_s=(1,))
    assert fhir_link_state(config) == {"up": 1, "down": 0, "refused": 0}
    samples = parse_exposition(render_once(config))
    assert value(samples, "lastmile_queue_items", kind="fhir-bundle", state="queued") == 1  # the backlog


def test_one_visit_record_refused_alone_leaves_the_county_platform_up(tmp_path: Path) -> None:
    """The platform answers one visit's entries "500" at every try and stores the others: when
    that bundle was tried again alone, the county's link_state said "down" - the link is fine."""
    config = config_at(write_config(tmp_path))
    t0 = time.time() - 7200
    with Outbox.open(config.data_dir, min_free_bytes=0) as outbox:
        ids = queue_visits(outbox, range(4), patient_of=lambda n: f"P-{n}")
    with RefusesVisits(ids[1]) as server, forwarding(config, server.base_url) as (outbox, sender):
        assert forward_fhir_once(outbox, sender, t0).sent == 3
        assert forward_fhir_once(outbox, sender, t0 + 3600).transient == 1  # tried again, alone
    assert fhir_link_state(config) == {"up": 1, "down": 0, "refused": 0}


def test_a_county_platform_refusing_every_visit_record_is_down(tmp_path: Path) -> None:
    """The platform answers 500 to every bundle, alone or merged: nothing reaches it, and the
    county's link_state said "up" - its alert on state="down" stayed quiet."""
    config = config_at(write_config(tmp_path))
    t0 = time.time() - 60
    with FhirTestServer() as server, forwarding(config, server.base_url) as (outbox, sender):
        queue_visits(outbox, range(4), patient_of=lambda n: f"P-{n}")
        server.faults.extend(["500"] * 10)
        round_ = forward_fhir_once(outbox, sender, t0)
    assert round_.refused_everything and round_.sent == 0
    assert fhir_link_state(config) == {"up": 0, "down": 1, "refused": 0}


def test_a_county_platform_busy_for_long_is_down(tmp_path: Path) -> None:
    """The platform takes the visit records, then answers 429 at every try for 50 minutes: the
    county's link_state said "up" all day while nothing reached it; busy that long is down."""
    config = config_at(write_config(tmp_path))
    busy_after_taking_two(config, time.time() - 3000, busy_after_s=(60, 1200, 2400))  # each after the backoff
    assert fhir_link_state(config) == {"up": 0, "down": 1, "refused": 0}


def test_a_county_platform_that_does_not_answer_is_down(tmp_path: Path) -> None:
    """Nothing listens at the platform's address: down, after it last took something."""
    config = config_at(write_config(tmp_path))
    not_answering_after_taking_one(config, time.time() - 60)
    assert fhir_link_state(config) == {"up": 0, "down": 1, "refused": 0}


def test_a_county_platform_taking_records_again_after_refusing_the_token_is_up(tmp_path: Path) -> None:
    """The platform refused the gateway's token (401); the county IT fixed it and the next visit
    record went: the county's link_state still said "refused" (read from the bundles the refused
    round held back 5 minutes) while the platform took records."""
    config = config_at(write_config(tmp_path))
    t0 = time.time() - 60
    with FhirTestServer(token="county-token") as server, forwarding(config, server.base_url) as (outbox, sender):
        queue_visits(outbox, range(2))
        assert forward_fhir_once(outbox, sender, t0).fault
        assert fhir_link_state(config) == {"up": 0, "down": 0, "refused": 1}
        server.token = None  # the county IT fixed it
        queue_visits(outbox, range(2, 3))
        assert forward_fhir_once(outbox, sender, t0 + 30).sent == 1
    assert fhir_link_state(config) == {"up": 1, "down": 0, "refused": 0}
