"""The county's LastmileQueueStuck alert must fire for a stuck link, not for routine items a
metered link holds as configured (a daily data budget spent, a send window shut): those wait by
the clinic's own choice, and `lastmile doctor` already judges the queue without them."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest

from lastmile.config import Config
from lastmile.services.metered import meters
from lastmile.services.metrics import GatewayCollector, make_registry
from tests.conftest import REPO
from tests.metering_setup import shut_window
from tests.metrics_harness import NOW, parse_exposition, tool, value
from uploader.outbox import Kind, Outbox, Priority

DAY = 86400.0
STUCK = "lastmile_queue_oldest_stuck_seconds"


def scraped(config: Config) -> list[tuple[str, dict[str, str], float]]:
    collector = GatewayCollector(config, run=tool({}), clock=lambda: NOW)
    return parse_exposition(generate_latest(make_registry(collector)).decode("utf-8"))


def test_routine_items_a_spent_data_budget_holds_do_not_count_as_stuck(tmp_path: Path) -> None:
    config = Config()
    config.set_data_dir(tmp_path)
    config.reading_center.metered.daily_budget_mb = 1.0
    with Outbox.open(tmp_path, now=NOW - 3 * DAY) as outbox:
        outbox.add(Kind.DICOM, "routine-ecg", b"x" * 100, now=NOW - 2 * DAY)
        outbox.add(Kind.FHIR_BUNDLE, "visit", b"{}", now=NOW - 3600)  # no meter on the FHIR link
        for days_ago in (0, 1, 2):  # the ECG budget was spent every day since the ECG was queued
            meters(config, outbox)["dicom"].spend(2 * 2**20, NOW - days_ago * DAY)
        samples = scraped(config)
        assert value(samples, "lastmile_queue_oldest_waiting_seconds", kind="dicom") == 2 * DAY
        assert value(samples, STUCK, kind="dicom") == 0.0, "an ECG the budget holds alerts the county"
        assert value(samples, STUCK, kind="fhir-bundle") == 3600.0
        # a STAT ECG is never held by a meter: waiting, it is a stuck link
        outbox.add(Kind.DICOM, "stat-ecg", b"y" * 100, priority=Priority.STAT, now=NOW - 1.5 * DAY)
        assert value(scraped(config), STUCK, kind="dicom") == 1.5 * DAY
    # with no meter, everything waiting counts
    config.reading_center.metered.daily_budget_mb = 0.0
    assert value(scraped(config), STUCK, kind="dicom") == 2 * DAY


def test_routine_items_that_missed_a_window_or_a_day_with_budget_left_count_as_stuck(tmp_path: Path) -> None:
    """A shut window holds what was queued since it last opened, today's spent budget what was
    queued today (or since the budget was first spent, day after day): an ECG older than that
    had its chance and did not go - the link's, and the county must hear of it."""
    config = Config()
    config.set_data_dir(tmp_path)
    with Outbox.open(tmp_path, now=NOW - 31 * DAY) as outbox:
        outbox.add(Kind.DICOM, "month-old-ecg", b"x" * 100, now=NOW - 30 * DAY)
        config.reading_center.metered.windows = [shut_window(NOW)]
        assert value(scraped(config), STUCK, kind="dicom") == 30 * DAY, "a shut window hides a month"
        config.reading_center.metered.windows = []
        config.reading_center.metered.daily_budget_mb = 1.0
        meters(config, outbox)["dicom"].spend(2 * 2**20, NOW)  # spent today, not yesterday
        assert value(scraped(config), STUCK, kind="dicom") == 30 * DAY, "today's spent budget hides a month"


def test_the_queue_stuck_alert_is_judged_on_what_no_meter_holds() -> None:
    rules = (REPO / "docs" / "prometheus" / "lastmile-alerts.yml").read_text()
    expr = re.search(r"alert: LastmileQueueStuck\n\s+expr: (.*)", rules)
    assert expr is not None and expr.group(1).startswith(STUCK), expr


def test_a_send_that_failed_in_last_nights_window_does_not_make_this_mornings_ecgs_stuck(tmp_path: Path) -> None:
    """One timeout as last night's window closed made each routine ECG queued since count as
    stuck all day, though no window had opened for it: the county was paged for the tariff."""
    config = Config()
    config.set_data_dir(tmp_path)
    config.reading_center.metered.windows = [shut_window(NOW)]  # last open from NOW - 22 h to NOW - 21 h
    with Outbox.open(tmp_path, now=NOW - 2 * DAY) as outbox:
        failed_at = NOW - 21 * 3600 - 60
        outbox.record_status(
            "reading_center",
            {"last_success": failed_at - 600, "last_error": "timed out", "last_error_at": failed_at},
            failed_at,
        )
        outbox.add(Kind.DICOM, "morning-ecg", b"x" * 100, now=NOW - 3 * 3600)
        assert value(scraped(config), STUCK, kind="dicom") == 0.0, "a window that has not opened pages the county"


def test_a_routine_ecg_whose_send_failed_before_the_link_worked_again_is_not_stuck_while_the_budget_holds_it(
    tmp_path: Path,
) -> None:
    """One timeout three days ago, successes since, and the budget spent every day: the ECG waits
    for the budget like the one beside it, but it alone paged the county."""
    config = Config()
    config.set_data_dir(tmp_path)
    config.reading_center.metered.daily_budget_mb = 1.0
    with Outbox.open(tmp_path, now=NOW - 4 * DAY) as outbox:
        outbox.add(Kind.DICOM, "failed-once", b"x" * 100, now=NOW - 3 * DAY)
        [item] = outbox.claim(Kind.DICOM, 10, NOW - 3 * DAY + 60)
        outbox.mark_transient_failure(item.id, "timed out", NOW - 3 * DAY + 120)
        outbox.record_status(
            "reading_center",
            {"last_success": NOW - 3600, "last_error": "timed out", "last_error_at": NOW - 3 * DAY + 120},
            NOW,
        )
        for days_ago in (0, 1, 2, 3):
            meters(config, outbox)["dicom"].spend(2 * 2**20, NOW - days_ago * DAY)
        assert value(scraped(config), STUCK, kind="dicom") == 0.0, "a failed send pages the county for the budget"
