"""Metered links (issue 16, item 5): daily byte budgets and send windows per destination, STAT
exempt, and what `lastmile queue` says is waiting on them.

The forwarder tests send to the demo's real pynetdicom reading center on loopback and count what
it received; windows are set relative to the present local time so that they are shut (or open)
whenever the test runs."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from pathlib import Path

import pytest

from lastmile.cli import main as cli
from lastmile.clock import local_zone
from lastmile.config import Config, ConfigError, load_config
from lastmile.demo.loopback import free_port
from lastmile.demo.reading_center import EmbeddedReadingCenter
from lastmile.ecg.intake import enqueue_recording
from lastmile.services.forward import forwarder_settings, open_outbox
from tests.ecg_factories import make_recording
from tests.waiting import wait_for
from uploader.ecg_forwarder import EcgForwarder
from uploader.metering import Meter, MeterPolicy, SendWindow
from uploader.outbox import ItemState

UTC = dt.timezone.utc
T_NOON = dt.datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()


class MemoryStatus:
    def __init__(self) -> None:
        self.values: dict[str, dict] = {}

    def status(self, name: str) -> dict | None:
        return self.values.get(name)

    def record_status(self, name: str, value: dict, now: float) -> None:
        self.values[name] = dict(value)


# -- windows and budgets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "inside", "outside"),
    [
        ("22:00-06:00", ["22:00", "23:59", "00:00", "05:59"], ["06:00", "12:00", "21:59"]),
        ("09:30-17:00", ["09:30", "16:59"], ["09:29", "17:00", "00:00"]),
        ("00:00-24:00", ["00:00", "12:00", "23:59"], []),
    ],
)
def test_send_windows_contain_their_minutes_and_wrap_midnight(text, inside, outside) -> None:
    w = SendWindow.parse(text)

    def minute(hhmm: str) -> int:
        h, m = hhmm.split(":")
        return int(h) * 60 + int(m)

    assert all(w.contains(minute(t)) for t in inside)
    assert not any(w.contains(minute(t)) for t in outside)


@pytest.mark.parametrize(
    "text", ["22-06", "25:00-06:00", "10:60-11:00", "08:00-08:00", "", "24:30-01:00", "24:00-00:00", "24:00-24:00"]
)
def test_malformed_windows_are_refused(text) -> None:
    with pytest.raises(ValueError):
        SendWindow.parse(text)


def test_shut_window_says_when_it_opens() -> None:
    meter = Meter.charging("dicom", MeterPolicy(windows=(SendWindow.parse("22:00-06:00"),), zone=UTC), MemoryStatus())
    blocked = meter.blocked(T_NOON)
    assert blocked is not None and blocked.reason == "window"
    assert blocked.until == dt.datetime(2026, 12, 1, 22, 0, tzinfo=UTC).timestamp()
    assert meter.blocked(T_NOON + 10 * 3600) is None  # 22:00
    after_midnight = meter.blocked(T_NOON + 18 * 3600)  # 06:00 next day: shut until 22:00 that day
    assert after_midnight is not None
    assert after_midnight.until == dt.datetime(2026, 12, 2, 22, 0, tzinfo=UTC).timestamp()


def test_budget_is_per_local_day_and_survives_a_new_meter() -> None:
    store = MemoryStatus()
    cst = dt.timezone(dt.timedelta(hours=8))
    policy = MeterPolicy(daily_budget_bytes=1000, zone=cst)
    meter = Meter.charging("fhir", policy, store)
    meter.spend(600, T_NOON)
    assert meter.blocked(T_NOON) is None
    meter.spend(400, T_NOON)
    blocked = Meter.charging("fhir", policy, store).blocked(T_NOON + 60)  # a restart: same spend
    assert blocked is not None and blocked.reason == "budget" and "used today" in blocked.detail
    # 12:00 UTC is 20:00 in China: the day (and the budget) turns at 16:00 UTC
    assert blocked.until == dt.datetime(2026, 12, 2, 0, 0, tzinfo=cst).timestamp()
    assert meter.blocked(blocked.until) is None and meter.spent_today(blocked.until) == 0


def test_a_window_starting_at_24_00_opens_at_midnight() -> None:
    """ "24:00-06:00" is midnight to six; read as a window from minute 1440 it never opened, and
    `lastmile queue` promised every night that it would at 00:00."""
    meter = Meter.charging("dicom", MeterPolicy(windows=(SendWindow.parse("24:00-06:00"),), zone=UTC), MemoryStatus())
    midnight = dt.datetime(2026, 12, 2, 0, 0, tzinfo=UTC).timestamp()
    assert meter.blocked(midnight + 3600) is None  # 01:00
    blocked = meter.blocked(T_NOON)
    assert blocked is not None and blocked.until == midnight
    assert meter.blocked(blocked.until) is None


def test_a_clock_set_back_across_midnight_does_not_forget_the_days_spending() -> None:
    """Midnight opened the day's budget and the backlog spent it by 00:30; a power cut, and the
    Pi boots at the fake-hwclock's last save (23:17 yesterday). A STAT ECG goes before chrony
    steps the clock: its bytes were recorded as yesterday's in place of today's, and once the
    clock was right today's budget was all there again - spent twice."""
    cst = dt.timezone(dt.timedelta(hours=8))
    store = MemoryStatus()
    policy = MeterPolicy(daily_budget_bytes=1000, zone=cst)
    Meter.charging("dicom", policy, store).spend(1000, dt.datetime(2026, 12, 2, 0, 30, tzinfo=cst).timestamp())
    rebooted = Meter.charging("dicom", policy, store)
    rebooted.spend(200, dt.datetime(2026, 12, 1, 23, 17, tzinfo=cst).timestamp())  # the stale clock
    corrected = dt.datetime(2026, 12, 2, 0, 50, tzinfo=cst).timestamp()  # chrony stepped it
    assert rebooted.spent_today(corrected) == 1000
    blocked = rebooted.blocked(corrected)
    assert blocked is not None and blocked.reason == "budget"


@pytest.mark.parametrize(
    ("window", "spent_at", "asked_at", "opens_at"),
    [
        # the budget is spent at 21:00: tomorrow's budget comes at midnight, but the window
        # only at 20:00 tomorrow
        ("20:00-23:00", (1, 21), (1, 21), (2, 20)),
        # the budget was spent at 02:00 in the night window: at 10:00 the window opens at 22:00,
        # but today's budget is still spent then; midnight (still inside the window) it is
        ("22:00-06:00", (2, 2), (2, 10), (3, 0)),
    ],
)
def test_shut_by_window_and_budget_says_when_both_allow(window, spent_at, asked_at, opens_at) -> None:
    def at(day_hour: tuple[int, int]) -> float:
        return dt.datetime(2026, 12, day_hour[0], day_hour[1], tzinfo=UTC).timestamp()

    policy = MeterPolicy(daily_budget_bytes=1000, windows=(SendWindow.parse(window),), zone=UTC)
    meter = Meter.charging("dicom", policy, MemoryStatus())
    meter.spend(1000, at(spent_at))
    blocked = meter.blocked(at(asked_at))
    assert blocked is not None
    assert dt.datetime.fromtimestamp(blocked.until, UTC) == dt.datetime.fromtimestamp(at(opens_at), UTC)
    assert meter.blocked(blocked.until) is None  # "until" is when it opens, not one of two reasons gone


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ('windows = ["22:00-6"]', "reading_center.metered.windows"),
        ("daily_budget_mb = -1", "fhir.metered.daily_budget_mb"),
    ],
)
def test_config_refuses_meaningless_metering(tmp_path: Path, section: str, key: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'[gateway]\ndata_dir = "{tmp_path}"\n[{key.rsplit(".", 1)[0]}]\n{section}\n')
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert f"'{key}'" in str(err.value) and ":4:" in str(err.value)  # names the key and its line


# -- the forwarder and `lastmile queue` -----------------------------------------------------------


def window_around(hours_from_now: float, length_h: float = 1.0) -> str:
    start = dt.datetime.now(local_zone()) + dt.timedelta(hours=hours_from_now)
    end = start + dt.timedelta(hours=length_h)
    return f"{start:%H:%M}-{end:%H:%M}"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    c = Config()
    c.gateway.data_dir = str(tmp_path / "data")
    rc = c.reading_center
    rc.port, rc.listen_port, rc.listen_host = free_port(), free_port(), "127.0.0.1"
    rc.called_ae, rc.calling_ae = "READING_CENTER", "LASTMILE"
    rc.associations, rc.batch_size, rc.timeout_s = 1, 10, 10.0
    rc.storage_commitment, rc.no_commitment_policy = False, "keep"
    c.outbox.backoff_base_s, c.outbox.backoff_max_s, c.outbox.min_free_mb = 0.1, 0.5, 1
    c.ecg.re_record_hold_s = 0  # the synthetic 2 s ECGs are re-record cases: forwarding is the subject here
    return c


@pytest.fixture
def center(config: Config):
    rc = config.reading_center
    c = EmbeddedReadingCenter(port=rc.port, gateway_port=rc.listen_port)
    c.start()
    yield c
    c.stop()


def write_toml(config: Config, path: Path) -> Path:
    rc, m = config.reading_center, config.reading_center.metered
    path.write_text(
        f'[gateway]\ndata_dir = "{config.gateway.data_dir}"\n'
        f'[reading_center]\nport = {rc.port}\nlisten_port = {rc.listen_port}\nlisten_host = "127.0.0.1"\n'
        f"[reading_center.metered]\ndaily_budget_mb = {m.daily_budget_mb}\nwindows = {m.windows!r}\n".replace("'", '"')
    )
    return path


def enqueue(config: Config, n: int, *, stat: bool = False, start: int = 0) -> list[str]:
    with open_outbox(config) as outbox:
        return [
            enqueue_recording(outbox, make_recording(i, stat=stat), config, key=f"k{i}").item.meta["sop_instance_uid"]
            for i in range(start, start + n)
        ]


def rounds(config: Config, n: int = 3) -> None:
    with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as fwd:
        for _ in range(n):
            fwd.run_round(threading.Event())


def test_routine_ecgs_wait_for_the_window_stat_goes_and_queue_says_until_when(config, center, tmp_path, capsys) -> None:
    config.reading_center.metered.windows = [window_around(2)]
    routine = enqueue(config, 3)
    [stat] = enqueue(config, 1, stat=True, start=50)
    rounds(config)
    assert set(center.received) == {stat}  # STAT is exempt; the routine ones were not sent
    with open_outbox(config) as outbox:
        assert [i.state for i in outbox.items() if i.meta["sop_instance_uid"] in routine] == [ItemState.QUEUED] * 3

    assert cli(["-c", str(write_toml(config, tmp_path / "lastmile.toml")), "queue"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("metered ECGs"))
    assert "3 routine item(s) waiting on the send window until" in line
    assert config.reading_center.metered.windows[0].split("-")[0] in line  # until the window opens

    config.reading_center.metered.windows = [window_around(-0.5)]  # now open
    rounds(config)
    assert set(center.received) == {stat, *routine}


@pytest.mark.parametrize("associations", [1, 4])
def test_daily_budget_stops_routine_sending_once_spent(config, center, tmp_path, capsys, associations) -> None:
    """With several associations sending at once, each checked the budget before its object while
    the others' objects were still on the wire, uncounted: 5 routine ECGs went on a budget for 2
    (one association grows to more on a loaded machine, whose loopback looks like a slow link).
    Objects in flight count against the budget: routine traffic overspends by less than one object
    (the last one started under it), however many associations carry it."""
    config.reading_center.associations = associations
    with open_outbox(config) as outbox:
        size = enqueue_recording(outbox, make_recording(0), config, key="k0").item.size
    enqueue(config, 4, start=1)
    # room for two objects (a budget is checked before each object, with those in flight, so the second fits)
    config.reading_center.metered.daily_budget_mb = 1.5 * size / 2**20
    rounds(config)
    assert len(center.received) == 2
    [stat] = enqueue(config, 1, stat=True, start=50)
    rounds(config)  # a new forwarder: the day's spend is remembered
    assert len(center.received) == 3 and stat in center.received

    assert cli(["-c", str(write_toml(config, tmp_path / "lastmile.toml")), "queue", "--json"]) == 0
    metered = json.loads(capsys.readouterr().out)["metered"]["dicom"]
    assert metered["waits_on"] == "budget" and metered["routine_waiting"] == 3
    assert metered["spent_today_bytes"] >= 3 * size * 0.9  # what went on the wire, STAT included
    tomorrow = dt.datetime.combine(dt.datetime.now(local_zone()).date() + dt.timedelta(days=1), dt.time(), local_zone())
    assert metered["until"] == pytest.approx(tomorrow.timestamp())
    assert time.time() < metered["until"]


def visit_bundles(outbox, n: int) -> list[int]:
    """`n` home visits' bundles queued for the county platform, one patient each; their sizes."""
    from tests.fhir_samples import NAMING, all_kinds, signature, visit
    from uploader.fhir_bundle import bundle_bytes, visit_bundle
    from uploader.fhir_forwarder import enqueue_bundle

    sizes = []
    for i in range(n):
        v = visit(i, patient=f"P-{i}")
        bundle = visit_bundle(v, all_kinds(v.started_at, v.patient_id, f"/{i}"), NAMING, signature(i))
        sizes.append(len(bundle_bytes(bundle)))
        enqueue_bundle(outbox, bundle, f"fhir:visit:{v.visit_id}", patient_id=v.patient_id, now=1000.0 + i)
    return sizes


def test_fhir_bundles_stop_at_the_budget_and_wait_out_a_shut_window(tmp_path: Path) -> None:
    from tests.fhir_server import FhirTestServer
    from uploader.fhir_forwarder import forward_fhir_once
    from uploader.fhir_sender import FhirSender, FhirSenderSettings
    from uploader.outbox import Kind, Outbox

    outbox = Outbox.open(tmp_path / "data", min_free_bytes=0)
    sizes = visit_bundles(outbox, 6)
    budget = Meter.charging("fhir", MeterPolicy(daily_budget_bytes=int(2.5 * max(sizes)), zone=UTC), outbox)
    shut = Meter.charging("fhir", MeterPolicy(windows=(SendWindow.parse("00:00-00:01"),), zone=UTC), MemoryStatus())
    with FhirTestServer() as server, FhirSender(FhirSenderSettings(base_url=server.base_url, gzip="never")) as sender:
        assert forward_fhir_once(outbox, sender, T_NOON, batch_size=1, meter=shut).claimed == 0
        counts = forward_fhir_once(outbox, sender, T_NOON, batch_size=1, meter=budget)
        assert (counts.sent, counts.deferred) == (3, 3)  # checked before each request: the third still fits
        assert len(server.resources("Encounter")) == 3
        assert budget.spent_today(T_NOON) == sender.bytes_on_wire  # the HTTP bytes both ways
        assert forward_fhir_once(outbox, sender, T_NOON + 60, batch_size=1, meter=budget).claimed == 0
    assert len(outbox.items(state=ItemState.QUEUED, kind=Kind.FHIR_BUNDLE)) == 3
    outbox.close()


def test_fhir_requests_that_never_left_the_gateway_are_not_counted(tmp_path: Path) -> None:
    """The village link is down (the platform's port unreachable): every retry of the day's visits
    counted their whole bodies, nothing went out, and when the link came back the day's budget was
    "used" - the visits waited until tomorrow."""
    from uploader.fhir_forwarder import forward_fhir_once
    from uploader.fhir_sender import FhirSender, FhirSenderSettings
    from uploader.outbox import Outbox

    outbox = Outbox.open(tmp_path / "data", min_free_bytes=0)
    visit_bundles(outbox, 2)
    meter = Meter.charging("fhir", MeterPolicy(daily_budget_bytes=2**20, zone=UTC), outbox)
    nobody = f"http://127.0.0.1:{free_port()}/fhir"  # nothing listens: the connection is refused
    with FhirSender(FhirSenderSettings(base_url=nobody, gzip="never")) as sender:
        for attempt in range(3):
            counts = forward_fhir_once(outbox, sender, T_NOON + 3600 * attempt, batch_size=1, meter=meter)
            assert counts.sent == 0 and counts.claimed
    assert meter.spent_today(T_NOON) == 0
    outbox.close()


def test_report_polling_asks_only_about_stat_studies_while_shut(tmp_path: Path) -> None:
    from lastmile.demo.cardiologist import ecg_report_sr
    from lastmile.reports.service import make_poller
    from lastmile.reports.store import ReportStore
    from lastmile.services.forward import peer_settings
    from tests.report_peers import GATEWAY_AE, gateway_config, send_ecgs, to_read

    center = EmbeddedReadingCenter(port=free_port(), gateway_port=free_port(), gateway_ae=GATEWAY_AE)
    center.start()
    try:
        config = gateway_config(tmp_path, center.port, center.ae_title, listen_port=center.gateway_port)
        studies = send_ecgs(config, [make_recording(1), make_recording(2, stat=True)])
        [stat] = [s for s in studies if s.stat]
        [routine] = [s for s in studies if not s.stat]
        for study in (routine, stat):
            center.add_report(ecg_report_sr(to_read(study), findings=["Sinus rhythm"], impression="Normal"))
        later = time.time() + 2 * 3600  # both are due for a poll by then
        never_now = (dt.datetime.fromtimestamp(later, UTC).hour * 60 + 12 * 60) % 1440  # a minute 12 h away
        window = SendWindow(never_now, never_now + 1)
        with open_outbox(config) as outbox, ReportStore.open(config.data_dir) as store:
            meter = Meter.charging("reports", MeterPolicy(windows=(window,), zone=UTC), outbox)
            poller = make_poller(config, store, peer_settings(config.reading_center), meter)
            poller.clock = lambda: later
            shut = poller.run_round()
            assert (shut.study_uids, shut.stored) == ([stat.study_uid], 1)
            assert meter.spent_today(later) == shut.bytes > 0  # the report fetched counts
            meter.policy = MeterPolicy(zone=UTC)  # open
            opened = poller.run_round(force=True)
            assert set(opened.study_uids) == {routine.study_uid, stat.study_uid}
            assert {r.study_uid for r in store.reports()} == {routine.study_uid, stat.study_uid}
    finally:
        center.stop()


def test_bytes_of_a_store_that_timed_out_count_against_the_budget(config, scripted_scp_factory) -> None:
    """A village link that loses the C-STORE response (the object went out whole, the answer
    never came) sends the object again and again: each try is paid for. Uncounted, the budget
    said 0 MB used while the clinic's data went out several times over."""
    uids = enqueue(config, 3)
    with open_outbox(config) as outbox:
        size = min(i.size for i in outbox.items())
    scp = scripted_scp_factory(hold=frozenset(uids))  # never answered while it runs
    rc = config.reading_center
    # the answer never comes: each try ends at the timeout, long enough to set up an association on a loaded machine
    rc.port, rc.called_ae, rc.timeout_s = scp.port, scp.ae_title, 5.0
    rc.metered.daily_budget_mb = 1.5 * size / 2**20
    with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as fwd:
        assert fwd.meter is not None
        fwd.run_round(threading.Event())
        assert len(scp.arrivals) == 1
        assert fwd.meter.spent_today(time.time()) >= 0.9 * size  # the object went out: paid for

        def sent_again() -> bool:
            fwd.run_round(threading.Event())
            return len(scp.arrivals) == 2

        wait_for(sent_again, 150, what="the second try", interval=0.05)
        blocked = fwd.meter.blocked(time.time())
        assert blocked is not None and blocked.reason == "budget"  # two tries spent the day's budget

        def due_again() -> bool:
            queued = outbox.items(state=ItemState.QUEUED)
            return len(queued) == 3 and max(i.next_attempt_at for i in queued) <= time.time()

        wait_for(due_again, 150, what="the items' backoff to end", interval=0.05)
        fwd.run_round(threading.Event())
        assert len(scp.arrivals) == 2  # nothing more goes today


def test_the_console_tells_the_doctor_in_chinese_why_studies_wait_and_until_when(tmp_path: Path) -> None:
    """The Sent page said "Working: last sent at ..." and "3 studies waiting" all day long while
    the routine ECGs waited for the night tariff: the doctor could only guess (or call the county)."""
    from tests.console_harness import Client, console_config, running_console

    config = console_config(tmp_path / "data")
    config.ecg.re_record_hold_s = 0
    window = window_around(2)
    config.reading_center.metered.windows = [window]
    enqueue(config, 3)
    with running_console(config) as server:
        doctor = Client(server.url)
        doctor.login()
        page = doctor.get("/sent").body
    assert "常规检查在等待发送时段" in page, page
    assert window.split("-")[0] in page  # when they go
    assert "急诊心电图立即发送" in page  # STAT is not held by it


def test_fhir_spending_is_what_crossed_the_link_like_dicom(tmp_path: Path) -> None:
    """The daily budget counts DICOM as the bytes the association put on the link (what the carrier
    bills), but counted FHIR as request bodies alone: no request line, no headers, none of the
    platform's answers - the county's bill ran over a budget the gateway thought it kept. Through a
    relay that counts every byte each way, the FHIR count is the HTTP bytes both ways."""
    from tests.fhir_server import FhirTestServer
    from tests.link_emulator import PROFILES, LinkRelay
    from uploader.fhir_connection import origin
    from uploader.fhir_forwarder import forward_fhir_once
    from uploader.fhir_sender import FhirSender, FhirSenderSettings
    from uploader.outbox import Outbox

    outbox = Outbox.open(tmp_path / "data", min_free_bytes=0)
    visit_bundles(outbox, 4)
    meter = Meter.charging("fhir", MeterPolicy(daily_budget_bytes=2**30, zone=UTC), outbox)
    with FhirTestServer() as server, LinkRelay(PROFILES["lan"], "127.0.0.1", origin(server.base_url)[2]) as relay:
        settings = FhirSenderSettings(base_url=f"http://127.0.0.1:{relay.port}/fhir", gzip="never")
        with FhirSender(settings) as sender:
            assert forward_fhir_once(outbox, sender, T_NOON, batch_size=1, meter=meter).sent == 4
        assert relay.up is not None and relay.down is not None
        wire = relay.up.bytes_total + relay.down.bytes_total
        assert len(server.resources("Encounter")) == 4
    assert meter.spent_today(T_NOON) == pytest.approx(wire, rel=0.02), (meter.spent_today(T_NOON), wire)
    outbox.close()
