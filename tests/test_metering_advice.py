"""What holds routine items on a metered link, said where people look: `lastmile doctor`, the
console's System and Sent pages. A daily budget or a send window holding routine items is the link
working as the county configured it, not a link that is down: the technician and the village doctor
are told which of the two holds them and until when, and nothing FAILs for it. But a meter holds
only what it can explain: a window what was queued since it last opened, a budget what was queued
since the run of days it was all spent began; an older item had its chance - the link's."""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import json
import math
import threading
import time
from pathlib import Path

import pytest

from lastmile.clock import clinic_time, local_zone
from lastmile.config import Config
from lastmile.console.i18n import Localizer
from lastmile.doctor import Finding, Level, render_text
from lastmile.services.metered import held_since, meters
from tests.metering_setup import DAY, queue_items, shut_window, shut_window_open_after_midnight
from tests.service_harness import doctor
from uploader.fhir_forwarder import FhirRoundResult
from uploader.fhir_sender import FhirSender, FhirSenderSettings
from uploader.metering import KEEP_DAYS, Meter, MeterPolicy, SendWindow
from uploader.outbox import ItemState, Kind, MeterHold, Outbox, Priority


def queued_cards(config: Config) -> tuple[list[str], str]:
    """The sent page as the doctor sees it: its cards of studies still queued (newest first), and the page."""
    from tests.console_harness import DOCTOR, Client, running_console

    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        page = html.unescape(client.get("/sent").body)
    return [li.split("</section>")[0] for li in page.split('<li class="card journey') if li.startswith(" queued")], page


def queue_findings(found: list[Finding]) -> list[Finding]:
    return [f for f in found if f.check == "queue"]


def queue_visit(outbox: Outbox, n: int, at: float, *, patient: str | None = None, key: str | None = None) -> None:
    """Visit `n`'s FHIR bundle (every kind of reading) queued at `at`: patient P-n, key visit-n
    unless given."""
    from tests.fhir_samples import NAMING, T0, all_kinds, signature, visit
    from uploader.fhir_bundle import visit_bundle
    from uploader.fhir_forwarder import enqueue_bundle

    patient = patient or f"P-{n}"
    bundle = visit_bundle(visit(n, patient=patient), all_kinds(T0, patient), NAMING, signature(n))
    enqueue_bundle(outbox, bundle, key or f"visit-{n}", patient_id=patient, now=at)


WINDOW_AND_BUDGET = '[reading_center.metered]\nwindows = ["20:00-22:00"]\ndaily_budget_mb = 1.0\n'


def clinic_day_at(days_from_yesterday: int, hour: int) -> float:
    """`hour` o'clock (clinic time) on the day `days_from_yesterday` after yesterday: a fixed
    clock the doctor judges at, whatever time the test runs."""
    zone = local_zone()
    day = dt.datetime.now(zone).date() - dt.timedelta(days=1) + dt.timedelta(days=days_from_yesterday)
    return dt.datetime.combine(day, dt.time(hour), zone).timestamp()


def metered_finding(tmp_path: Path, metered: str, now: float) -> Finding:
    found = queue_findings(doctor(tmp_path, metered, now=lambda: now).check_queue())
    [held] = [f for f in found if f.advice_key.startswith("metered-")]
    return held


def test_doctor_says_a_send_window_holds_routine_ecgs_and_until_when_not_that_the_link_is_down(
    tmp_path: Path,
) -> None:
    """Routine ECGs recorded since the window last opened wait for the night tariff: they made
    `lastmile doctor` ask 'is the link down?', and the console told the doctor they had been
    set aside and to call the county IT."""
    now = time.time()
    window = shut_window(now)  # last opened 22 h ago
    queue_items(tmp_path, 3, at=now - 3600)
    d = doctor(tmp_path, f'[reading_center.metered]\nwindows = ["{window}"]\n', now=lambda: now)
    found = queue_findings(d.check_queue())
    text = render_text(found)
    assert "link down" not in text and Level.FAIL not in [f.level for f in found], text
    [held] = [f for f in found if f.advice_key == "metered-window"]
    assert "3 routine" in held.message and "send window" in held.message, text
    assert held.until is not None and window.split("-")[0] in held.message, text  # until it opens
    assert clinic_time(dt.datetime.fromtimestamp(held.until, dt.timezone.utc), minutes=True) in held.message


def test_doctor_blames_the_link_for_routine_ecgs_that_missed_the_windows_that_opened_since(tmp_path: Path) -> None:
    """A window opens every day: routine ECGs two days old missed two of them, so the link (or
    the PACS) is at fault, not the window - and none of them is 'held as configured'."""
    now = time.time()
    queue_items(tmp_path, 3, at=now - 2 * DAY)
    queue_items(tmp_path, 1, at=now - 3600)  # queued since the window last opened: that one it holds
    d = doctor(tmp_path, f'[reading_center.metered]\nwindows = ["{shut_window(now)}"]\n', now=lambda: now)
    found = queue_findings(d.check_queue())
    text = render_text(found)
    assert found[0].level is Level.WARN and "is the link down" in found[0].hint, text
    assert "2.0 d" in found[0].message and "all held" not in found[0].message, text
    [held] = [f for f in found if f.advice_key == "metered-window"]
    assert held.level is Level.OK and "1 routine" in held.message, text


def test_doctor_fails_a_month_old_routine_backlog_whatever_window_is_shut_now(tmp_path: Path) -> None:
    """The review's case: 3 routine ECGs 30 days old and a window shut now said 'OK ... all held
    by metered links' and 'working as configured'; with no window the same data FAILs."""
    now = time.time()
    queue_items(tmp_path, 3, at=now - 30 * DAY)
    for metered in (f'[reading_center.metered]\nwindows = ["{shut_window(now)}"]\n', ""):
        found = queue_findings(doctor(tmp_path, metered, now=lambda: now).check_queue())
        text = render_text(found)
        assert [f.level for f in found] == [Level.FAIL], text
        assert "nothing has gone out for a week" in found[0].hint and "held" not in text, text


def test_doctor_blames_the_link_for_routine_ecgs_a_day_with_budget_left_did_not_send(tmp_path: Path) -> None:
    """A budget resets at midnight: today's spent budget holds what is queued today, not an ECG
    that waited through yesterday, when nothing held it."""
    now = time.time()
    queue_items(tmp_path, 2, at=now - 3 * DAY)
    d = doctor(tmp_path, "[reading_center.metered]\ndaily_budget_mb = 1.0\n", now=lambda: now)
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        meters(d.config, outbox)["dicom"].spend(2**20, now)
    found = queue_findings(d.check_queue())
    text = render_text(found)
    assert [f.advice_key for f in found] == ["waiting"] and "is the link down" in found[0].hint, text


def test_doctor_does_not_fail_a_week_of_routine_ecgs_a_spent_daily_budget_holds(tmp_path: Path) -> None:
    """A budget smaller than the clinic's ECGs keeps a backlog for days: the county must hear
    that the budget is too small (a WARN naming it), not that nothing has gone out (a FAIL)."""
    now = time.time()
    queue_items(tmp_path, 4, at=now - 8 * DAY)
    d = doctor(tmp_path, "[reading_center.metered]\ndaily_budget_mb = 1.0\n", now=lambda: now)
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        for days_ago in range(KEEP_DAYS):  # spent every day the meter remembers
            meters(d.config, outbox)["dicom"].spend(2**20, now - days_ago * DAY)
    found = queue_findings(d.check_queue())
    text = render_text(found)
    assert Level.FAIL not in [f.level for f in found], text
    assert "link down" not in text and "nothing has gone out" not in text, text
    [held] = [f for f in found if f.advice_key == "metered-budget"]
    assert held.level is Level.WARN and "4 routine" in held.message and "daily budget" in held.message, text
    midnight = dt.datetime.combine(
        dt.datetime.fromtimestamp(now, local_zone()).date() + dt.timedelta(days=1), dt.time(), local_zone()
    )
    assert held.until == midnight.timestamp() and clinic_time(midnight, minutes=True) in held.message, text
    assert "daily_budget_mb" in held.hint and "too tight" in held.hint and "working as configured" not in held.hint


def test_doctor_still_blames_the_link_for_a_stat_ecg_no_window_holds(tmp_path: Path) -> None:
    """STAT goes whatever the meter says: a STAT ECG two days old is the link's, window or not."""
    now = time.time()
    queue_items(tmp_path, 2, at=now - 3600)
    queue_items(tmp_path, 1, at=now - 2 * DAY, priority=Priority.STAT)
    d = doctor(tmp_path, f'[reading_center.metered]\nwindows = ["{shut_window(now)}"]\n', now=lambda: now)
    found = queue_findings(d.check_queue())
    assert found[0].level is Level.WARN and "is the link down" in found[0].hint, render_text(found)
    assert [f.advice_key for f in found] == ["waiting", "metered-window"]
    assert "2 routine" in found[1].message


def test_the_system_page_tells_the_doctor_in_chinese_what_holds_routine_studies_and_until_when(
    tmp_path: Path,
) -> None:
    """Routine studies two days old under a data budget spent every day since: the allowance is
    too small (a WARN the doctor sees in Chinese, with when they go), not 'set aside'."""
    from tests.console_harness import DOCTOR, Client, console_config, running_console

    config = console_config(tmp_path / "data")
    now = time.time()
    config.reading_center.metered.daily_budget_mb = 1.0
    config.data_dir.mkdir(parents=True, exist_ok=True)
    queue_items(config.data_dir, 3, at=now - 2 * DAY)
    with Outbox.open(config.data_dir, min_free_bytes=0) as outbox:
        for days_ago in (0, 1, 2):
            meters(config, outbox)["dicom"].spend(2**20, now - days_ago * DAY)
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        page = html.unescape(client.get("/system").body)
    items = [li for li in page.split("<li ") if "<strong>发送队列" in li]
    shown = "\n".join(items)
    assert "单独存放" not in shown, shown  # not "set aside"
    advice = [li for li in items if 'class="advice"' in li]
    assert len(advice) == 1 and "流量额度太小" in advice[0], shown  # the budget holds them: too small
    with Outbox.open(config.data_dir, min_free_bytes=0) as outbox:
        blocked = meters(config, outbox)["dicom"].blocked(time.time())
    assert blocked is not None
    opens = dt.datetime.fromtimestamp(blocked.until, dt.timezone.utc)
    assert Localizer("zh-CN", local_zone()).when(opens) in advice[0], shown  # until when


# -- one computation for `lastmile queue`, the doctor and the console ---------------------------------


def test_the_outbox_says_which_routine_items_wait_for_their_sender(tmp_path: Path) -> None:
    """What a meter holds: queued routine items of its kind since it began holding them - not
    STAT (never held), not one on the wire, not one held for the doctor (it waits for a patient,
    not for the link), not one queued before (it had its chance: the link's)."""
    from uploader.outbox import Hold

    now = time.time()
    queue_items(tmp_path, 2, at=now - 300)
    queue_items(tmp_path, 1, at=now - 60)
    queue_items(tmp_path, 1, at=now - 1500)  # before the meter held anything
    queue_items(tmp_path, 1, at=now - 600, priority=Priority.STAT)
    queue_items(tmp_path, 1, at=now - 900, kind=Kind.FHIR_BUNDLE)
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        oldest = outbox.oldest_waiting_item
        assert oldest(now).created_at == now - 1500
        assert oldest(now, except_routine_of={Kind.DICOM: MeterHold(now - 1000)}).created_at == now - 1500
        assert oldest(now, except_routine_of={Kind.DICOM: MeterHold(now - 2000)}).created_at == now - 900
        assert oldest(
            now, except_routine_of={Kind.DICOM: MeterHold(-math.inf), Kind.FHIR_BUNDLE: MeterHold(now - 2000)}
        ).created_at == (
            now - 600  # the STAT one waits whatever the meter says
        )
        outbox.add(Kind.DICOM, "unassigned", b"u", now=now - 1200, hold=Hold("unassigned", now + DAY))
        assert outbox.routine_queued(Kind.DICOM, now) == (4, now - 1500)
        assert outbox.routine_queued(Kind.DICOM, now, MeterHold(now - 1000)) == (3, now - 300)
        assert outbox.has_routine_queued(Kind.DICOM, now, MeterHold(now - 1000))
        assert not outbox.has_routine_queued(Kind.DICOM, now, MeterHold(now - 30))
        failed = outbox.add(Kind.DICOM, "failed", b"f", now=now - 200).item
        outbox.claim(Kind.DICOM, 10, now - 100)
        outbox.mark_transient_failure(failed.id, "timed out", now - 100)
        outbox.release([i.id for i in outbox.items(state=ItemState.SENDING)], "round over", now - 100, 0.0)
        for hold in (MeterHold(-math.inf), MeterHold(now - 1000), MeterHold(now - 1000, failed_too=True)):
            # the console's per-study answer (MeterHold.holds) is the SQL's
            count, _ = outbox.routine_queued(Kind.DICOM, now, hold)
            assert sum(hold.holds(item, now) for item in outbox.items(kind=Kind.DICOM)) == count, hold
        assert outbox.routine_queued(Kind.DICOM, now, MeterHold(now - 1000, failed_too=True))[0] == 4
        outbox.claim(Kind.DICOM, 10, now)  # the STAT one and the four routine ones go on the wire
        assert outbox.routine_queued(Kind.DICOM, now) == (0, None)
        assert not outbox.has_routine_queued(Kind.DICOM, now)


def test_the_metered_wait_is_computed_in_a_process_that_keeps_numpy_out(tmp_path: Path) -> None:
    """`lastmile forward` keeps numpy out of its process (RSS on a 512 MB Pi) and composes
    lastmile.services.metered: what it shares with the doctor and the console must run there."""
    from tests.conftest import run_python

    now = time.time()
    queue_items(tmp_path, 2, at=now - 60)
    toml = tmp_path / "lastmile.toml"
    toml.write_text(f'[gateway]\ndata_dir = "{tmp_path}"\n[reading_center.metered]\nwindows = ["{shut_window(now)}"]\n')
    script = """if True:
        import sys, time
        sys.modules["numpy"] = None  # as lastmile/commands/forwarding.py does
        import lastmile.services.forward
        from lastmile.config import load_config
        from lastmile.services.metered import metered_waits
        from uploader.outbox import Outbox

        config = load_config(sys.argv[1])
        with Outbox.open(config.data_dir, min_free_bytes=0) as outbox:
            wait = metered_waits(config, outbox, time.time())["dicom"]
        print(wait.blocked.reason, wait.routine_waiting)
    """
    done = run_python(script, toml)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["window", "2"]


def test_the_sent_page_does_not_say_a_send_window_holds_a_study_that_missed_it(tmp_path: Path) -> None:
    """A study a month old under a shut window missed thirty of them: 'Waits for the send window'
    on it told the doctor all was well while the link had sent nothing; the study queued since the
    window last opened does wait for it."""
    from tests.console_harness import console_config

    config = console_config(tmp_path / "data")
    now = time.time()
    config.reading_center.metered.windows = [shut_window(now)]
    config.data_dir.mkdir(parents=True, exist_ok=True)
    queue_items(config.data_dir, 1, at=now - 30 * DAY)
    queue_items(config.data_dir, 1, at=now - 3600)
    cards, page = queued_cards(config)
    assert len(cards) == 2, page
    notes = ["等待发送时段" in card for card in cards]  # newest first
    assert notes == [True, False], cards


def test_doctor_does_not_blame_the_link_for_a_routine_ecg_a_window_and_a_spent_budget_held_together(
    tmp_path: Path,
) -> None:
    """Window 20:00-22:00 and a 1 MB budget spent in it every night: an ECG queued at 09:00 waited
    through last night's window (budget spent), and today's window has not opened - no moment let
    it go. The review's case said 'is the link down?' at 24 h: the budget part answered 'holds
    nothing' (today's unspent until the window opens), the window part reached back only to last night."""
    zone = local_zone()
    day5 = dt.datetime.now(zone).date() - dt.timedelta(days=1)

    def at(days_before: int, hour: int) -> float:
        return dt.datetime.combine(day5 - dt.timedelta(days=days_before), dt.time(hour), zone).timestamp()

    now = at(0, 12)
    queue_items(tmp_path, 1, at=at(1, 9))
    d = doctor(
        tmp_path, '[reading_center.metered]\nwindows = ["20:00-22:00"]\ndaily_budget_mb = 1.0\n', now=lambda: now
    )
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        for days_before in (1, 2, 3, 4):  # each night's window spent the budget
            meters(d.config, outbox)["dicom"].spend(2**20, at(days_before, 21))
    found = queue_findings(d.check_queue())
    text = render_text(found)
    assert "link down" not in text and Level.FAIL not in [f.level for f in found], text
    [held] = [f for f in found if f.advice_key.startswith("metered-")]
    assert held.level is Level.WARN and "1 routine" in held.message and "too tight" in held.hint, text


def spend_every_remembered_day(data_dir: Path, config_text: str, now: float, destination: str) -> None:
    """The budget spent every day the meter remembers (as failed sends spend it too)."""
    d = doctor(data_dir, config_text, now=lambda: now)
    with Outbox.open(data_dir, min_free_bytes=0) as outbox:
        for days_ago in range(KEEP_DAYS):
            meters(d.config, outbox)[destination].spend(2**20, now - days_ago * DAY)


def test_doctor_does_not_excuse_a_backlog_by_a_budget_a_link_failing_since_its_last_success_spent(
    tmp_path: Path,
) -> None:
    """Bytes written are charged whatever became of them: a link dropping mid-transfer spends the
    budget every day and sends nothing. 'the link works, but the budget is too tight' was said
    for a week of it; the forwarder's last error, newer than its last success, says otherwise."""
    now = time.time()
    metered = "[reading_center.metered]\ndaily_budget_mb = 1.0\n"
    queue_items(tmp_path, 4, at=now - 8 * DAY)
    spend_every_remembered_day(tmp_path, metered, now, "dicom")
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        outbox.record_status(
            "reading_center",
            {"last_success": now - 9 * DAY, "last_error": "timed out", "last_error_at": now - 3600},
            now,
        )
    found = queue_findings(doctor(tmp_path, metered, now=lambda: now).check_queue())
    text = render_text(found)
    assert found[0].level is Level.FAIL and "link works" not in text and "held" not in text, text


def test_doctor_does_not_excuse_routine_items_whose_sends_failed_by_a_spent_budget(tmp_path: Path) -> None:
    """FHIR rounds keep no last error: the items do. A routine bundle whose sends failed was not
    held by the budget - the link had it and lost it."""
    now = time.time()
    metered = "[fhir.metered]\ndaily_budget_mb = 1.0\n"
    queue_items(tmp_path, 2, at=now - 3 * DAY, kind=Kind.FHIR_BUNDLE)
    spend_every_remembered_day(tmp_path, metered, now, "fhir")
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        for item in outbox.claim(Kind.FHIR_BUNDLE, 10, now - 3 * DAY + 60):
            outbox.mark_transient_failure(item.id, "connection reset", now - 3 * DAY + 120)
    found = queue_findings(doctor(tmp_path, metered, now=lambda: now).check_queue())
    text = render_text(found)
    assert found[0].level is Level.WARN and "is the link down" in found[0].hint, text
    assert "link works" not in text and not [f for f in found if f.advice_key.startswith("metered-")], text


def test_doctor_says_a_shut_window_holds_a_routine_ecg_queued_after_a_send_failed_in_the_last_one(
    tmp_path: Path,
) -> None:
    """One timeout at the end of last night's window made every routine ECG queued since - none of
    which had a chance yet - the link's: 'is the link down?' all day, and no word that they wait for
    tonight's window. A failing link stops excusing a spent budget (failed sends spend it), not a
    window that has not opened since."""
    zone = local_zone()
    yesterday = dt.datetime.now(zone).date() - dt.timedelta(days=1)

    def at(days_before: int, hour: int, minute: int = 0) -> float:
        return dt.datetime.combine(yesterday - dt.timedelta(days=days_before), dt.time(hour, minute), zone).timestamp()

    now = at(0, 12)
    metered = '[reading_center.metered]\nwindows = ["20:00-22:00"]\n'
    queue_items(tmp_path, 1, at=at(0, 9))  # this morning: no window has opened since
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        outbox.record_status(
            "reading_center",
            {"last_success": at(1, 21), "last_error": "timed out", "last_error_at": at(1, 21, 59)},
            at(1, 21, 59),
        )
    found = queue_findings(doctor(tmp_path, metered, now=lambda: now).check_queue())
    text = render_text(found)
    assert "link down" not in text and Level.FAIL not in [f.level for f in found], text
    [held] = [f for f in found if f.advice_key == "metered-window"]
    assert "1 routine" in held.message and "20:00" in held.message, text


def test_the_link_statuses_are_the_ones_the_senders_record() -> None:
    from lastmile.services.link_status import FHIR_STATUS, READING_CENTER_STATUS
    from uploader import ecg_forwarder, fhir_forwarder

    # copied to keep pydicom out of the metrics exporter and the console's imports
    assert (READING_CENTER_STATUS, FHIR_STATUS) == (ecg_forwarder.STATUS_NAME, fhir_forwarder.STATUS_NAME)


def test_doctor_does_not_excuse_by_a_failing_links_spent_budget_a_routine_ecg_queued_in_an_open_window(
    tmp_path: Path,
) -> None:
    """The window is open now; only the budget, spent by the failing link's sends, holds the ECG
    queued in it: the link's, as with no window."""
    now = time.time()
    opened = dt.datetime.fromtimestamp(now, local_zone()) - dt.timedelta(hours=1)
    metered = f'[reading_center.metered]\nwindows = ["{opened:%H:%M}-{opened + dt.timedelta(hours=3):%H:%M}"]\n'
    metered += "daily_budget_mb = 1.0\n"
    queue_items(tmp_path, 1, at=now - 1800)
    spend_every_remembered_day(tmp_path, metered, now, "dicom")
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        outbox.record_status(
            "reading_center", {"last_success": now - DAY, "last_error": "timed out", "last_error_at": now - 300}, now
        )
    found = queue_findings(doctor(tmp_path, metered, now=lambda: now).check_queue())
    assert not [f for f in found if f.advice_key.startswith("metered-")], render_text(found)


def test_doctor_blames_a_failing_link_for_a_routine_ecg_that_waited_through_a_window_its_sends_spent(
    tmp_path: Path,
) -> None:
    """Window 20:00-22:00, last night's budget spent there by sends that failed: the ECG queued
    before it had its chance - the link's, not 'the budget is too tight'."""
    zone = local_zone()
    yesterday = dt.datetime.now(zone).date() - dt.timedelta(days=1)
    now = dt.datetime.combine(yesterday, dt.time(12), zone).timestamp()
    metered = '[reading_center.metered]\nwindows = ["20:00-22:00"]\ndaily_budget_mb = 1.0\n'
    queue_items(tmp_path, 1, at=now - DAY)
    spend_every_remembered_day(tmp_path, metered, now - 15 * 3600, "dicom")  # at 21:00 each night
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        outbox.record_status(
            "reading_center",
            {"last_success": now - 3 * DAY, "last_error": "timed out", "last_error_at": now - 14 * 3600},
            now,
        )
    found = queue_findings(doctor(tmp_path, metered, now=lambda: now).check_queue())
    text = render_text(found)
    assert "held" not in text and not [f for f in found if f.advice_key.startswith("metered-")], text


def two_held_by_the_budget_one_failed_once(data_dir: Path, metered: str, now: float) -> None:
    """Two routine ECGs eight days old, the budget spent every day since; one send timed out then,
    and the link has worked since (the forwarder's last success is newer than its last error)."""
    queue_items(data_dir, 2, at=now - 8 * DAY)
    spend_every_remembered_day(data_dir, metered, now, "dicom")
    with Outbox.open(data_dir, min_free_bytes=0) as outbox:
        [failed, other] = outbox.claim(Kind.DICOM, 10, now - 8 * DAY + 60)
        outbox.mark_transient_failure(failed.id, "timed out", now - 8 * DAY + 120)
        outbox.release([other.id], "metered link: budget", now - 8 * DAY + 120, 0.0)
        outbox.record_status(
            "reading_center",
            {"last_success": now - 3600, "last_error": "timed out", "last_error_at": now - 8 * DAY + 120},
            now,
        )


def test_doctor_holds_by_the_budget_a_routine_ecg_whose_send_failed_once_before_the_link_worked_again(
    tmp_path: Path,
) -> None:
    """One timeout eight days ago, the link has worked since (the forwarder's last success is
    newer than its last error), and only the budget, spent every day, holds the ECG: it was
    'nothing has gone out for a week' (FAIL) beside an identical ECG the budget holds."""
    now = time.time()
    metered = "[reading_center.metered]\ndaily_budget_mb = 1.0\n"
    two_held_by_the_budget_one_failed_once(tmp_path, metered, now)
    found = queue_findings(doctor(tmp_path, metered, now=lambda: now).check_queue())
    text = render_text(found)
    assert Level.FAIL not in [f.level for f in found] and "link down" not in text, text
    [held] = [f for f in found if f.advice_key == "metered-budget"]
    assert "2 routine" in held.message, text


def test_doctor_names_the_budget_when_a_window_is_shut_now_but_the_budget_held_the_ecg_for_days(
    tmp_path: Path,
) -> None:
    """Window 20:00-22:00, the 1 MB budget spent in it every night, now 12:00: an ECG three days
    old waits for tonight's window, but what kept it for days is the budget. The WARN named the
    window (the console: 'waited for the send window'), which widening would not cure."""
    now = clinic_day_at(0, 12)
    queue_items(tmp_path, 1, at=now - 3 * DAY)
    spend_every_remembered_day(tmp_path, WINDOW_AND_BUDGET, now - 15 * 3600, "dicom")  # at 21:00 each night
    held = metered_finding(tmp_path, WINDOW_AND_BUDGET, now)
    assert held.level is Level.WARN and held.advice_key == "metered-budget-before", held  # not today's, used up
    assert "daily_budget_mb is too tight" in held.hint and "windows" not in held.hint, held


def test_a_backlog_a_budget_has_held_longer_than_the_meter_remembers_is_still_the_budgets(tmp_path: Path) -> None:
    """The meter keeps KEEP_DAYS days of counts: ECGs held twelve days by a budget spent every
    night in the window are not then blamed on the link (no FAIL, no 'is the link down?', not
    stuck for the county's alert) - with no remembered day that let them go, the budget holds them."""
    from lastmile.services.metrics_sources import read_outbox

    now = clinic_day_at(0, 12)
    queue_items(tmp_path, 3, at=now - 12 * DAY)
    d = doctor(tmp_path, WINDOW_AND_BUDGET, now=lambda: now)
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        for days_ago in range(1, 13):  # every night's window spent the budget, longer than the meter keeps
            meters(d.config, outbox)["dicom"].spend(2**20, now - days_ago * DAY + 9 * 3600)
    found = queue_findings(d.check_queue())
    text = render_text(found)
    assert Level.FAIL not in [f.level for f in found] and "link down" not in text, text
    [held] = [f for f in found if f.advice_key.startswith("metered-")]
    assert "3 routine" in held.message and held.level is Level.WARN, text
    snapshot = read_outbox(tmp_path, now, config=d.config)
    assert snapshot is not None and snapshot.oldest_stuck_s.get(Kind.DICOM, 0.0) == 0.0, snapshot


def test_doctor_holds_by_the_budget_a_visit_record_whose_send_failed_before_the_platform_took_later_ones(
    tmp_path: Path,
) -> None:
    """FHIR keeps when its link last failed, and its rounds say what they did: the latest round sent bundles
    and none failed, so the bundle that failed three days ago waits for the budget, spent every
    day, like the one beside it - not 'is the link down?'."""
    from uploader.fhir_forwarder import STATUS_NAME, FhirRoundResult

    now = time.time()
    metered = "[fhir.metered]\ndaily_budget_mb = 1.0\n"
    queue_items(tmp_path, 2, at=now - 3 * DAY, kind=Kind.FHIR_BUNDLE)
    spend_every_remembered_day(tmp_path, metered, now, "fhir")
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        [failed, other] = outbox.claim(Kind.FHIR_BUNDLE, 10, now - 3 * DAY + 60)
        outbox.mark_transient_failure(failed.id, "connection reset", now - 3 * DAY + 120)
        outbox.release([other.id], "metered link: budget", now - 3 * DAY + 120, 0.0)
        worked = FhirRoundResult(claimed=5, sent=3, deferred=2)  # then the budget was spent
        # the reset was the link's (no answer): the round that failed recorded when, later rounds keep it
        status = {
            "last_round": dataclasses.asdict(worked),
            "at": now - 3600,
            "last_error_at": now - 3 * DAY + 120,
            "said": "answered",
            "last_sent_at": now - 3600,
        }
        outbox.record_status(STATUS_NAME, status, now - 3600)
    found = queue_findings(doctor(tmp_path, metered, now=lambda: now).check_queue())
    text = render_text(found)
    assert "link down" not in text, text
    [held] = [f for f in found if f.advice_key == "metered-budget"]
    assert "2 routine" in held.message, text


# -- what the finding says, what its hint names and what the console advises agree -----------------


def system_page_advice(finding: Finding, language: str) -> str:
    """The advice the System page shows under `finding` (console.app.advice_text), in `language`."""
    from lastmile.console.app import advice_text

    return advice_text(finding, Localizer(language, local_zone()))


def test_a_window_shut_now_after_days_of_a_spent_budget_is_not_said_to_be_todays_allowance_used_up(
    tmp_path: Path,
) -> None:
    """Window 20:00-22:00, the budget spent in it on the nights before, today's not touched, now
    12:00: the doctor said 'held by its send window until 20:00' with the hint 'daily_budget_mb is
    too tight', and the System page told the village doctor 'the daily data allowance is used up'
    (今天的流量额度已用完) - it is not: the window is shut, and the budget kept them on earlier days."""
    now = clinic_day_at(0, 12)
    queue_items(tmp_path, 1, at=now - 3 * DAY)
    spend_every_remembered_day(tmp_path, WINDOW_AND_BUDGET, now - DAY + 9 * 3600, "dicom")  # 21:00, nights before
    held = metered_finding(tmp_path, WINDOW_AND_BUDGET, now)
    assert held.level is Level.WARN and held.until == clinic_day_at(0, 20), held
    english, chinese = system_page_advice(held, "en"), system_page_advice(held, "zh-CN")
    assert "is used up" not in english and "send window" in english, english
    assert "已用完" not in chinese and "流量额度太小" in chinese, chinese
    opens = dt.datetime.fromtimestamp(clinic_day_at(0, 20), dt.timezone.utc)
    assert Localizer("zh-CN", local_zone()).when(opens) in chinese, chinese
    assert "send window until" in held.message and "daily budget" in held.message, held.message
    assert "daily_budget_mb is too tight" in held.hint, held.hint


def test_a_budget_spent_today_under_a_shut_window_is_named_in_the_finding_as_in_its_advice(tmp_path: Path) -> None:
    """Window 20:00-22:00, the budget spent in tonight's window too, now 23:00: the finding said
    only 'held by its send window until 20:00' while its hint and the console blamed the budget,
    used up today - which is what holds them."""
    now = clinic_day_at(0, 23)
    queue_items(tmp_path, 1, at=now - 3 * DAY)
    spend_every_remembered_day(tmp_path, WINDOW_AND_BUDGET, now - 2 * 3600, "dicom")  # 21:00, tonight too
    held = metered_finding(tmp_path, WINDOW_AND_BUDGET, now)
    assert held.level is Level.WARN and held.until == clinic_day_at(1, 20), held
    assert "daily budget" in held.message and "used up today" in held.message, held.message
    assert "daily_budget_mb is too tight" in held.hint, held.hint
    assert "今天的流量额度已用完" in system_page_advice(held, "zh-CN")


def test_a_metered_findings_hint_names_only_the_settings_the_link_has(tmp_path: Path) -> None:
    """A window alone: 'raise reading_center.metered.daily_budget_mb' was advised for a budget
    the link does not have (and a budget alone: widen windows it does not have)."""
    now = clinic_day_at(0, 12)
    queue_items(tmp_path, 1, at=now - 3600)
    held = metered_finding(tmp_path, '[reading_center.metered]\nwindows = ["20:00-22:00"]\n', now)
    assert "send window" in held.message and "windows" in held.hint and "daily_budget_mb" not in held.hint, held
    budget = "[reading_center.metered]\ndaily_budget_mb = 1.0\n"
    spend_every_remembered_day(tmp_path, budget, now, "dicom")
    held = metered_finding(tmp_path, budget, now)
    assert "daily budget" in held.message and "daily_budget_mb" in held.hint and "windows" not in held.hint, held


def test_an_ecg_the_reading_center_keeps_refusing_for_later_is_stuck_not_held_by_a_spent_budget(
    tmp_path: Path, scripted_scp_factory
) -> None:
    """The reading center answers one ECG 0xA700 (out of resources: try later) at every try while
    it stores the others: the forwarder records no link error (the link works). With the budget
    spent every day that ECG counted as held by the budget - 'the budget is too tight', 'all held
    by metered links', and no stuck item for the county's alert - though no budget lets it go."""
    from lastmile.services.forward import forwarder_settings, open_outbox
    from lastmile.services.metrics_sources import read_outbox
    from tests.forward_faults_setup import enqueue, make_config
    from tests.waiting import wait_for
    from uploader.ecg_forwarder import EcgForwarder

    config = make_config(tmp_path, 0, "SCRIPTED")
    config.reading_center.metered.daily_budget_mb = 1.0
    uids = list(enqueue(config, 3).values())
    refused, others = uids[0], uids[1:]
    scp = scripted_scp_factory(statuses={refused: [0xA700]})  # at every try
    config.reading_center.port = scp.port
    with open_outbox(config) as outbox, EcgForwarder(outbox, forwarder_settings(config)) as fwd:

        def refused_thrice() -> bool:
            fwd.run_round(threading.Event())
            return scp.arrivals.count(refused) >= 3

        wait_for(refused_thrice, 60, what="three refusals of the one ECG", interval=0.1)
    assert set(scp.received_uids()) >= set(others)
    with Outbox.open(config.data_dir, min_free_bytes=0) as outbox:
        assert "last_error_at" not in (outbox.status("reading_center") or {})  # the link works
    now = time.time() + 2 * DAY  # two days on, the budget spent each of them
    metered = "[reading_center.metered]\ndaily_budget_mb = 1.0\n"
    spend_every_remembered_day(config.data_dir, metered, now, "dicom")
    found = queue_findings(doctor(config.data_dir, metered, now=lambda: now).check_queue())
    text = render_text(found)
    assert "all held" not in text and found[0].level is Level.WARN, text
    # the link works: the reading center refuses this one, and the hint says so (and what to do)
    assert "is the link down" not in found[0].hint and "reading center refuses" in found[0].hint, text
    assert "0xA700" in found[0].hint and "lastmile queue" in found[0].hint, text
    snapshot = read_outbox(config.data_dir, now, config=doctor(config.data_dir, metered).config)
    assert snapshot is not None and snapshot.oldest_stuck_s.get(Kind.DICOM, 0.0) >= 2 * DAY, snapshot


def test_a_fhir_budget_spent_by_failing_sends_is_not_said_to_be_too_tight(tmp_path: Path) -> None:
    """The FHIR platform times out: each round's first batch fails and the rest is released
    (attempts back to 0), and the failing sends spend the budget. The doctor said "the link works,
    but fhir.metered.daily_budget_mb is too tight: raise it" - the link does not work."""
    from uploader.fhir_forwarder import STATUS_NAME, FhirRoundResult

    now = time.time()
    metered = "[fhir.metered]\ndaily_budget_mb = 1.0\n"
    queue_items(tmp_path, 4, at=now - 3 * DAY, kind=Kind.FHIR_BUNDLE)
    spend_every_remembered_day(tmp_path, metered, now, "fhir")  # by the timed-out sends
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        # what forward_fhir_once does when the first batch times out: that one failed, the rest released
        [first, *rest] = outbox.claim(Kind.FHIR_BUNDLE, 10, now - 600)
        outbox.mark_transient_failure(first.id, "read timed out", now - 590)
        outbox.release([i.id for i in rest], "FHIR server unavailable; sent in a later round", now - 590, 0.0)
        failed = FhirRoundResult(claimed=4, sent=0, transient=1)
        status = {"last_round": dataclasses.asdict(failed), "at": now - 590, "said": "down", "down_since": now - 590}
        outbox.record_status(STATUS_NAME, status, now - 590)
    text = render_text(queue_findings(doctor(tmp_path, metered, now=lambda: now).check_queue()))
    assert "link works" not in text and "too tight" not in text, text
    assert "link down" in text, text


def test_a_metrics_scrape_of_a_gateway_metering_nothing_loads_no_outbox_module(tmp_path: Path) -> None:
    """The metrics exporter reads outbox.db with sqlite3 alone (~15 MB less RSS than with
    sqlite-utils and uploader.outbox): asking what meters hold must not load them when no link
    is metered."""
    from tests.conftest import run_python

    queue_items(tmp_path, 2, at=time.time() - 60)
    script = """if True:
        import sys, time
        from pathlib import Path
        from lastmile.config import Config
        from lastmile.services.metrics_sources import read_outbox

        read_outbox(Path(sys.argv[1]), time.time(), config=Config())
        print(sorted(m for m in ("sqlite_utils", "uploader.outbox") if m in sys.modules))
    """
    done = run_python(script, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_the_sent_page_says_the_budget_holds_an_ecg_whose_send_failed_once_before_the_link_worked_again(
    tmp_path: Path,
) -> None:
    """The doctor (above) says the budget holds both ECGs; the sent page said "1 attempt failed,
    trying again" on the one that failed eight days ago - it is not being tried, the meter holds it."""
    from tests.console_harness import console_config

    config = console_config(tmp_path / "data")
    config.reading_center.metered.daily_budget_mb = 1.0
    config.data_dir.mkdir(parents=True, exist_ok=True)
    two_held_by_the_budget_one_failed_once(
        config.data_dir, "[reading_center.metered]\ndaily_budget_mb = 1.0\n", time.time()
    )
    cards, page = queued_cards(config)
    assert len(cards) == 2, page
    assert all("正在重试" not in card and 'class="metered"' in card for card in cards), cards


def test_a_visit_record_the_platform_keeps_refusing_for_later_is_stuck_not_held_by_a_spent_budget(
    tmp_path: Path,
) -> None:
    """The county platform answers one bundle "500" in its transaction-response at every try while
    it stores the others (the link works): with the budget spent every day since, that bundle
    counted as held by the budget ('all held by metered links', no stuck item for the county's
    alert), as the reading center's 0xA700 ECG did before 0007_failed_at - no budget lets it go."""
    from lastmile.services.metrics_sources import read_outbox
    from tests.fhir_samples import visit
    from tests.fhir_server import RefusesVisits
    from uploader.fhir_forwarder import forward_fhir_once
    from uploader.fhir_sender import FhirSender, FhirSenderSettings

    refused_visit = visit(0).visit_id
    t0 = time.time()
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        for n in range(3):
            queue_visit(outbox, n, t0)
    with RefusesVisits(refused_visit) as server, FhirSender(FhirSenderSettings(base_url=server.base_url)) as sender:
        with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
            for hour in range(3):  # it is tried again each hour, refused; the others went meanwhile
                forward_fhir_once(outbox, sender, t0 + hour * 3600, batch_size=1)
                forward_fhir_once(outbox, sender, t0 + hour * 3600 + 1, batch_size=1)
                queue_visit(outbox, 10 + hour, t0 + hour * 3600 + 2, patient="P-9", key=f"later-{hour}")
                forward_fhir_once(outbox, sender, t0 + hour * 3600 + 3, batch_size=1)
        assert len(server.identifiers("Encounter")) == 5 and refused_visit not in server.identifiers("Encounter")
    now = t0 + 2 * DAY  # two days on, the budget spent each of them
    metered = "[fhir.metered]\ndaily_budget_mb = 1.0\n"
    spend_every_remembered_day(tmp_path, metered, now, "fhir")
    found = queue_findings(doctor(tmp_path, metered, now=lambda: now).check_queue())
    text = render_text(found)
    assert "all held" not in text, text
    snapshot = read_outbox(tmp_path, now, config=doctor(tmp_path, metered).config)
    assert snapshot is not None and snapshot.oldest_stuck_s.get(Kind.FHIR_BUNDLE, 0.0) >= 2 * DAY, snapshot


def test_the_sent_pages_banner_names_a_spent_budget_as_well_as_the_send_window_it_waits_for_next(
    tmp_path: Path,
) -> None:
    """Today's budget spent and the window shut (its next opening after midnight, when the budget
    is new): the banner named only the window - the doctor and `lastmile queue` say both."""
    from tests.console_harness import console_config

    config = console_config(tmp_path / "data")
    now = time.time()
    config.reading_center.metered.windows = [shut_window_open_after_midnight(now)]
    config.reading_center.metered.daily_budget_mb = 1.0
    config.data_dir.mkdir(parents=True, exist_ok=True)
    queue_items(config.data_dir, 1, at=now - 60)
    with Outbox.open(config.data_dir, min_free_bytes=0) as outbox:
        meters(config, outbox)["dicom"].spend(2**20, now)
    _, page = queued_cards(config)
    banner = page.split('<p class="metered">')[1]  # the link's, above the studies
    assert "流量额度已用完" in banner and "发送时段" in banner, banner


def test_visit_records_that_failed_while_the_platforms_gateway_answered_503_are_held_by_the_budget_not_stuck(
    tmp_path: Path,
) -> None:
    """The county platform down behind its proxy, which answers every bundle 503: those bundles
    failed with the link, not alone. Once the link worked again and the budget was spent every
    day since, they were said stuck - the platform 'refuses this one' - as if no budget held them."""
    from lastmile.services.metrics_sources import read_outbox
    from tests.fhir_samples import visit
    from tests.fhir_server import FhirTestServer
    from uploader.fhir_forwarder import forward_fhir_once
    from uploader.fhir_sender import FhirSender, FhirSenderSettings

    t0 = time.time()
    with FhirTestServer() as server, FhirSender(FhirSenderSettings(base_url=server.base_url)) as sender:
        with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
            for n in range(3):
                queue_visit(outbox, n, t0)
            server.gateway_down = 503
            assert forward_fhir_once(outbox, sender, t0).transient == 3
            server.gateway_down = None  # the platform is back: a later visit goes, the budget then spent
            queue_visit(outbox, 9, t0 + 1)
            assert forward_fhir_once(outbox, sender, t0 + 1).sent == 1
        assert server.identifiers("Encounter") == [visit(9).visit_id]
    now = t0 + 2 * DAY
    metered = "[fhir.metered]\ndaily_budget_mb = 1.0\n"
    spend_every_remembered_day(tmp_path, metered, now, "fhir")
    found = queue_findings(doctor(tmp_path, metered, now=lambda: now).check_queue())
    text = render_text(found)
    assert "refuses" not in text and "all held" in text, text
    snapshot = read_outbox(tmp_path, now, config=doctor(tmp_path, metered).config)
    assert snapshot is not None and snapshot.oldest_stuck_s.get(Kind.FHIR_BUNDLE, 0.0) == 0.0, snapshot


# -- a window that runs past midnight: each part is judged by its own day's budget ---------------

NIGHT_WINDOW = '[reading_center.metered]\nwindows = ["22:00-06:00"]\ndaily_budget_mb = 1.0\n'


def night_meter(store: Outbox) -> Meter:
    """Window 22:00-06:00 and a 1 MB budget, as NIGHT_WINDOW configures them."""
    return Meter("dicom", MeterPolicy(2**20, (SendWindow.parse("22:00-06:00"),), local_zone()), store, round_s=0.0)


@pytest.mark.parametrize(
    ("hour", "minute", "yesterday_spent", "chance"),
    [
        # (days before today, hour) the last chance ended: an item queued before it could have gone
        (22, 0, False, (0, 0)),  # tonight's opening: today's budget spent, last night's part before midnight not
        (23, 59, False, (0, 0)),
        (0, 0, False, (0, 0)),  # midnight: last night's part just ended with budget left
        (0, 1, False, (0, 0)),
        (23, 59, True, (1, 0)),  # yesterday's spent too: the night before's part before midnight
        (0, 1, True, (1, 0)),
    ],
)
def test_a_night_window_holds_what_was_queued_since_the_last_part_of_it_a_budget_day_let_go(
    tmp_path: Path, hour: int, minute: int, yesterday_spent: bool, chance: tuple[int, int]
) -> None:
    """Window 22:00-06:00, today's budget spent: the meter held everything queued since last
    night's 22:00 opening, though last night's budget was never used up before midnight (what was
    queued then had its chance and did not go: the link's); with yesterday's spent too, since the
    opening the night before. Each part of the window, split at midnight, is its own day's budget."""
    zone = local_zone()
    today = dt.datetime.now(zone).date()
    now = dt.datetime.combine(today, dt.time(hour, minute), zone).timestamp()
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        meter = night_meter(outbox)
        for days_ago in range(1, KEEP_DAYS):  # the days before: budget left, but yesterday's if spent
            spent = 2 * 2**20 if days_ago == 1 and yesterday_spent else 1000
            meter.spend(spent, dt.datetime.combine(today - dt.timedelta(days=days_ago), dt.time(12), zone).timestamp())
        meter.spend(2 * 2**20, now)
        since = held_since(meter, now, meter.blocked(now))  # round_s 0: the chances themselves
    days_ago, at_hour = chance
    expected = dt.datetime.combine(today - dt.timedelta(days=days_ago), dt.time(at_hour), zone)
    assert since == expected.timestamp(), dt.datetime.fromtimestamp(since, zone) if math.isfinite(since) else since


def test_an_ecg_a_night_windows_budget_let_go_before_midnight_is_stuck_and_one_queued_tonight_held(
    tmp_path: Path,
) -> None:
    """Window 22:00-06:00, now 23:59, tonight's budget spent, last night's not: the ECG queued at
    23:00 last night waited through an hour of open window with budget left - the link's (stuck:
    'is the link down?', the county's stuck alert), not 'held by the daily budget' as it was; the one
    queued tonight is the budget's."""
    from lastmile.services.metrics_sources import read_outbox

    now = clinic_day_at(1, 23) + 59 * 60
    queue_items(tmp_path, 1, at=clinic_day_at(0, 23))
    queue_items(tmp_path, 1, at=clinic_day_at(1, 22) + 30 * 60)
    d = doctor(tmp_path, NIGHT_WINDOW, now=lambda: now)
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        meters(d.config, outbox)["dicom"].spend(2 * 2**20, now - 60)
    found = queue_findings(d.check_queue())
    text = render_text(found)
    [held] = [f for f in found if f.advice_key.startswith("metered-")]
    assert "1 routine" in held.message, text
    assert "is the link down" in found[0].hint, text
    snapshot = read_outbox(tmp_path, now, config=d.config)
    assert snapshot is not None and snapshot.oldest_stuck_s.get(Kind.DICOM, 0.0) == now - clinic_day_at(0, 23), snapshot


# -- an item queued in the last sender round before a window closed: the window never tried it -------

# (the window, the day (from yesterday) and hour it closed, the day and hour just before it opens again)
WINDOW_CLOSES = [
    ("22:00-06:00", (1, 6), (1, 21)),  # a night window: closed at 06:00 this morning
    ("09:00-17:00", (0, 17), (1, 8)),  # a day window: closed at 17:00 yesterday
]


def queued_at_the_close(data_dir: Path, window: str, closed: float) -> tuple[str, float]:
    """The window's settings (a budget left every day), and one routine ECG queued 10 s before it closed."""
    queue_items(data_dir, 1, at=closed - 10)
    return f'[reading_center.metered]\nwindows = ["{window}"]\ndaily_budget_mb = 1.0\n', closed - 10


@pytest.mark.parametrize(("window", "close", "reopen"), WINDOW_CLOSES)
@pytest.mark.parametrize("later", ["an hour later", "just before it opens again"])
def test_an_ecg_queued_seconds_before_a_window_closed_is_held_by_the_window_not_stuck(
    tmp_path: Path, window: str, close: tuple[int, int], reopen: tuple[int, int], later: str
) -> None:
    """An ECG queued 10 s before the window closed, which no sender round reached before it shut
    (the forwarder waits a poll between rounds, a transfer on the wire finishes first): it counted as
    let go by the window - stuck for ~16 h, a doctor FAIL and the county's stuck alert for a routine
    ECG - though the window never tried it. It waits for the window's next opening: held."""
    from lastmile.services.metrics_sources import read_outbox

    closed = clinic_day_at(*close)
    metered, _ = queued_at_the_close(tmp_path, window, closed)
    now = closed + 3600 if later == "an hour later" else clinic_day_at(*reopen) + 59 * 60
    found = queue_findings(doctor(tmp_path, metered, now=lambda: now).check_queue())
    text = render_text(found)
    held = [f.message for f in found if f.advice_key.startswith("metered-")]
    assert len(held) == 1 and "1 routine" in held[0] and "all held" in text, text
    snapshot = read_outbox(tmp_path, now, config=doctor(tmp_path, metered).config)
    assert snapshot is not None and snapshot.oldest_stuck_s.get(Kind.DICOM, 0.0) == 0.0, snapshot


@pytest.mark.parametrize(("window", "close", "reopen"), WINDOW_CLOSES)
def test_an_ecg_tried_and_refused_alone_seconds_before_a_window_closed_is_stuck(
    tmp_path: Path, window: str, close: tuple[int, int], reopen: tuple[int, int]
) -> None:
    """The same ECG, but a round did try it before the window shut and the reading center refused
    it alone (the link worked: others stored): its failure judges it - stuck, not held."""
    from lastmile.services.metrics_sources import read_outbox

    closed = clinic_day_at(*close)
    metered, queued = queued_at_the_close(tmp_path, window, closed)
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        [item] = outbox.claim(Kind.DICOM, 1, queued + 1)
        outbox.mark_transient_failure(item.id, "0xA700 out of resources", queued + 5)
        outbox.record_status("reading_center", {"last_success": closed - 1, "last_error_at": closed - 3 * DAY}, closed)
    now = clinic_day_at(*reopen) + 59 * 60
    snapshot = read_outbox(tmp_path, now, config=doctor(tmp_path, metered).config)
    assert snapshot is not None and snapshot.oldest_stuck_s.get(Kind.DICOM, 0.0) == now - queued, snapshot


class TooBigForTheLink(FhirSender):
    """A real sender whose link carries every bundle within its (generous) timeout but the ones
    carrying one of `visits`, which it gives up on after `timeout_s`: which send times out is the
    test's choice, not the machine's speed (a loaded machine made an ordinary transaction outlast
    a 1 s timeout, and the round stopped before the bundle meant to time out)."""

    def __init__(self, settings: FhirSenderSettings, *visits: str, timeout_s: float) -> None:
        super().__init__(settings)
        self.visits, self.short = set(visits), dataclasses.replace(settings, timeout_s=timeout_s)

    def post_transaction(self, body: bytes) -> dict:
        from tests.fhir_server import encounter_identifiers

        if not self.visits.intersection(encounter_identifiers(json.loads(body))):
            return super().post_transaction(body)
        patient, self.settings = self.settings, self.short
        try:
            return super().post_transaction(body)
        finally:
            self.settings = patient


def test_a_visit_record_whose_send_timed_out_after_another_went_is_not_said_refused_alone(tmp_path: Path) -> None:
    """A flaky 2G link: the first visit record goes, the second is too big for the link and times
    out in the same round. Once a clean round ran, it was said refused alone: "the county platform
    refuses this one visit record (last answer: ReadTimeout)". No answer is the link's."""
    from lastmile.services.metered import refused_alone
    from tests.fhir_samples import visit
    from tests.fhir_server import FhirTestServer
    from tests.waiting import wait_for
    from uploader.fhir_forwarder import forward_fhir_once

    t0 = time.time()
    with FhirTestServer() as server:
        settings = FhirSenderSettings(base_url=server.base_url)
        with TooBigForTheLink(settings, visit(1).visit_id, timeout_s=1.0) as sender:
            server.timeout_delay_s = 3.0  # the platform answers it, after the sender gave up
            server.faults.extend(["", "timeout"])
            with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
                for n in range(3):
                    queue_visit(outbox, n, t0)
                first = forward_fhir_once(outbox, sender, t0, batch_size=1)
                assert (first.sent, first.transient) == (1, 1), first  # visit 0 went, visit 1 timed out
                assert server.stats.faults_served == ["timeout"], server.stats
                wait_for(lambda: server.stats.transactions == 2, what="the late answer's transaction applied")
                queue_visit(outbox, 9, t0 + 1)
                assert forward_fhir_once(outbox, sender, t0 + 1).sent == 2  # a clean round
                [timed_out] = outbox.items(state=ItemState.QUEUED, kind=Kind.FHIR_BUNDLE)
                assert "Timeout" in (timed_out.last_error or "")
                assert not refused_alone(timed_out, outbox)
    text = render_text(queue_findings(doctor(tmp_path, "", now=lambda: t0 + DAY).check_queue()))
    assert "refuses this one" not in text, text


def test_visit_records_that_failed_before_an_upgrade_are_not_said_refused_alone(tmp_path: Path) -> None:
    """The FHIR sender recorded no link failure time before its upgrade: every visit record that
    failed in an outage then counted as refused alone once a round had gone - a false alarm."""
    from lastmile.services.metered import refused_alone
    from uploader.fhir_forwarder import STATUS_NAME, FhirRoundResult

    now = time.time()
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        outbox.add(Kind.FHIR_BUNDLE, "visit-1", b"{}", now=now - 3 * DAY)
        [item] = outbox.claim(Kind.FHIR_BUNDLE, 1, now - 3 * DAY)
        outbox.mark_transient_failure(item.id, "ReadTimeout", now - 3 * DAY)  # the outage, before the upgrade
        worked = dataclasses.asdict(FhirRoundResult(claimed=1, sent=1))  # as the old sender recorded a round
        outbox.record_status(STATUS_NAME, {"last_round": worked, "at": now - 3600}, now - 3600)
        [failed] = outbox.items(state=ItemState.QUEUED, kind=Kind.FHIR_BUNDLE)
        assert not refused_alone(failed, outbox)
    text = render_text(queue_findings(doctor(tmp_path, "", now=lambda: now).check_queue()))
    assert "refuses this one" not in text, text


def test_a_visit_record_refused_alone_in_the_first_round_after_an_upgrade_is_stuck_not_held_by_the_budget(
    tmp_path: Path,
) -> None:
    """The sender's first round after its upgrade (no link failure time recorded yet): the county
    platform answers one bundle "500" and stores the others. That round recorded its own time as
    the link's failure, so the bundle it refused alone counted as the link's - held by the spent
    budget ('all held by metered links'), no stuck item for the county's alert."""
    from lastmile.services.metrics_sources import read_outbox
    from tests.fhir_samples import visit
    from tests.fhir_server import RefusesVisits
    from uploader.fhir_forwarder import STATUS_NAME, FhirRoundResult, forward_fhir_once
    from uploader.fhir_sender import FhirSender, FhirSenderSettings

    refused_visit = visit(0).visit_id
    t0 = time.time()
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        worked = dataclasses.asdict(FhirRoundResult(claimed=1, sent=1))  # as the old sender recorded a round
        outbox.record_status(STATUS_NAME, {"last_round": worked, "at": t0 - 3600}, t0 - 3600)
        for n in range(3):
            queue_visit(outbox, n, t0)
    with RefusesVisits(refused_visit) as server, FhirSender(FhirSenderSettings(base_url=server.base_url)) as sender:
        with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
            assert forward_fhir_once(outbox, sender, t0).transient == 1  # the first round after the upgrade
            queue_visit(outbox, 9, t0 + 1)
            assert forward_fhir_once(outbox, sender, t0 + 1).sent == 1  # a clean round: the link works
    now = t0 + 2 * DAY  # two days on, the budget spent each of them
    metered = "[fhir.metered]\ndaily_budget_mb = 1.0\n"
    spend_every_remembered_day(tmp_path, metered, now, "fhir")
    text = render_text(queue_findings(doctor(tmp_path, metered, now=lambda: now).check_queue()))
    assert "all held" not in text, text
    snapshot = read_outbox(tmp_path, now, config=doctor(tmp_path, metered).config)
    assert snapshot is not None and snapshot.oldest_stuck_s.get(Kind.FHIR_BUNDLE, 0.0) >= 2 * DAY, snapshot


def test_a_visit_record_answered_429_before_a_clean_round_is_not_said_refused_alone(tmp_path: Path) -> None:
    """The county platform comes back busy: it takes the first visit record and answers the second
    429 (busy, Retry-After). Once a clean round ran, that one was said refused alone - "the county
    platform refuses this one visit record", stuck - though busy is about the platform, never the bundle."""
    from lastmile.services.metered import refused_alone
    from tests.fhir_server import FhirTestServer
    from uploader.fhir_forwarder import forward_fhir_once
    from uploader.fhir_sender import FhirSender, FhirSenderSettings

    t0 = time.time()
    with FhirTestServer() as server, FhirSender(FhirSenderSettings(base_url=server.base_url)) as sender:
        server.retry_after_s = 600  # not due again in the next round
        with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
            for n in range(3):
                queue_visit(outbox, n, t0)
            server.faults.extend(["", "429"])
            assert forward_fhir_once(outbox, sender, t0, batch_size=1).transient == 1
            queue_visit(outbox, 9, t0 + 1)
            assert forward_fhir_once(outbox, sender, t0 + 1).sent == 1  # a clean round (the rest wait out the 429)
            busy = next(i for i in outbox.items(state=ItemState.QUEUED, kind=Kind.FHIR_BUNDLE) if i.attempts)
            assert "429" in (busy.last_error or "")
            assert not refused_alone(busy, outbox)
    text = render_text(queue_findings(doctor(tmp_path, "", now=lambda: t0 + DAY).check_queue()))
    assert "refuses this one" not in text, text


@pytest.mark.parametrize(
    "last_round",
    [
        dataclasses.asdict(FhirRoundResult(claimed=1, sent=1)),  # as the sender before 2b828d8 recorded a round
        dataclasses.asdict(FhirRoundResult(claimed=1, transient=1)),
        "damaged",
    ],
    ids=["took-one", "failed-one", "damaged"],
)
def test_a_status_recorded_before_the_sender_judged_the_platform_reads_unknown(
    tmp_path: Path, last_round: object
) -> None:
    """A status the FHIR sender wrote before it recorded what the platform said (`Said`, 2b828d8;
    every round that claims anything rewrites it): neither working nor failing, never a crash."""
    from lastmile.services.link_status import fhir_link_failing, fhir_link_worked
    from uploader.fhir_forwarder import STATUS_NAME

    now = time.time()
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        outbox.record_status(STATUS_NAME, {"last_round": last_round, "at": now - 3600}, now - 3600)
        status = outbox.status(STATUS_NAME)
    assert (fhir_link_worked(status), fhir_link_failing(status)) == (False, False), status
