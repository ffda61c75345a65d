"""What a page costs the gateway in SQL statements: the console's Today page is rendered every few
seconds on the doctor's tablet, on a Pi with an SD card. Readings held unassigned pile up (a cuff
used without a check-in, for weeks): showing them must cost the same few queries whether there
are 2 or 60 of them, not one outbox look-up per reading."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import pytest

import lastmile.data_dir
from lastmile.cli import main
from lastmile.clinic.patients import EndedByCard
from lastmile.config import Config
from lastmile.console import views
from lastmile.console.sources import ClinicData
from tests.console_harness import bp_reading, console_config
from tests.statement_trace import FEW, MANY, T0, traced
from uploader.outbox import Outbox


def hold_readings(data: ClinicData, first: int, count: int) -> None:
    """`count` BP readings with no patient checked in: each one is held, unassigned."""
    for n in range(first, first + count):
        at = T0 + dt.timedelta(minutes=n)
        assert data.store.record(bp_reading(at, f"cuff:{n}"), now=at).outcome == "held"


def with_few_then_many_held(data: ClinicData, statements_of: Callable[[], int]) -> tuple[int, int]:
    """`statements_of()` with FEW readings held, then with MANY; closes `data`."""
    try:
        hold_readings(data, 0, FEW)
        few = statements_of()
        hold_readings(data, FEW, MANY - FEW)
        return few, statements_of()
    finally:
        data.close()


def test_today_page_costs_the_same_statements_with_2_or_60_held_readings(tmp_path: Path) -> None:
    data = ClinicData(console_config(tmp_path / "data"))

    def statements_of_a_render() -> int:
        with traced(data.db.conn, data.outbox.db.conn) as statements:
            page = views.today(data, T0 + dt.timedelta(days=1))
        assert len(page["held"]) in (FEW, MANY)
        return len(statements)

    few, many = with_few_then_many_held(data, statements_of_a_render)
    assert many == few, f"Today with {MANY} held readings ran {many} SQL statements, with {FEW}: {few}"


def test_today_says_whose_check_in_a_card_ended_without_reading_the_session_log(tmp_path: Path) -> None:
    """Today (each render, each live push) read the session log for the check-in a card ended,
    a seek into a day of check-ins on the Pi's SD card every few seconds: it is on the session's
    row, read for the patient anyway. Said as before: whom, STAT, reason, when."""
    data = ClinicData(console_config(tmp_path / "data"))
    minute = dt.timedelta(minutes=1)
    try:
        data.context.set_patient("P-STAT-1", "李建国", now=T0, stat=True, reason="胸痛")
        data.context.set_patient("110101198001010010", now=T0 + minute, by_card=True)
        with traced(data.db.conn) as statements:
            session = data.session(T0 + 2 * minute)
        assert session is not None and session.patient_id == "110101198001010010"
        assert session.ended_by_card == EndedByCard("P-STAT-1", "李建国", True, "胸痛", T0 + minute)
        log_reads = [s for s in statements if "session_log" in s]
        assert log_reads == [], f"the session panel read the session log: {log_reads}"
    finally:
        data.close()


def test_patient_show_asks_the_outbox_once_however_many_readings_are_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = console_config(tmp_path / "data")
    data = ClinicData(config)
    statements: list[str] = []
    real_open: Callable[[Config], Outbox] = lastmile.data_dir.open_outbox

    def open_traced(config: Config) -> Outbox:
        outbox = real_open(config)
        outbox.db.conn.set_trace_callback(statements.append)
        return outbox

    monkeypatch.setattr(lastmile.data_dir, "open_outbox", open_traced)

    def outbox_statements_of_patient_show() -> int:
        statements.clear()
        assert main(["patient", "show", "--json", "--data-dir", str(config.data_dir)]) == 0
        assert len(json.loads(capsys.readouterr().out)["unassigned"]) in (FEW, MANY)
        return len(statements)

    few, many = with_few_then_many_held(data, outbox_statements_of_patient_show)
    assert many == few, (
        f"`lastmile patient show` ran {many} outbox statements for {MANY} held readings, {few} for {FEW}"
    )


def test_present_keys_answers_for_more_keys_than_one_statement_takes(tmp_path: Path) -> None:
    """`lastmile patient show` lists every held reading (months of them): past SQLite's limit of
    variables per statement the look-up is split, and still answers for every key."""
    with Outbox.open(tmp_path, min_free_bytes=0, reserve_bytes=0) as outbox:
        for key in ("first", "middle", "last"):
            outbox.add("observation", key, b"{}")
        keys = ["first", *(f"other-{n}" for n in range(600)), "middle", "middle", *(f"more-{n}" for n in range(600))]
        assert outbox.present_keys([*keys, "last"]) == {"first", "middle", "last"}
        assert outbox.present_keys([]) == set()


def test_what_a_metered_link_holds_reads_its_meter_once_however_many_days_and_windows(tmp_path: Path) -> None:
    """The Sent and System pages, `lastmile doctor` and every metrics scrape ask what the metered
    links hold: the meter's record (one JSON row) was read again for each remembered day, window
    and budget check, and the reading center's status besides, on each of them."""
    from lastmile.services.metered import metered_waits, meters

    config = console_config(tmp_path / "data")
    config.reading_center.metered.windows = ["01:00-02:00", "03:00-04:00", "20:00-22:00"]
    config.reading_center.metered.daily_budget_mb = 1.0
    now = T0.timestamp()
    with Outbox.open(config.data_dir, min_free_bytes=0, reserve_bytes=0) as outbox:
        outbox.add("dicom", "routine-ecg", b"x" * 100, now=now - 8 * 86400)
        for days_ago in range(8):  # spent every day: the walk goes back as far as the meter remembers
            meters(config, outbox)["dicom"].spend(2**20, now - days_ago * 86400)
        with traced(outbox.db.conn) as statements:
            waits = metered_waits(config, outbox, now)
        assert waits["dicom"].holding
        status_reads = [s for s in statements if "FROM status" in s]
        assert len(status_reads) <= 2, f"{len(status_reads)} reads of the status table:\n" + "\n".join(statements)


def test_a_missing_picture_or_script_costs_the_console_no_database_access(tmp_path: Path) -> None:
    """A browser asks for /favicon.ico (and old scripts) on every page: its 404 is the sentence
    alone, and looking up the login for it (a read, and a throttled session write on the SD card)
    bought nothing. The doctor's own missing page still shows her menu."""
    from tests.console_harness import DOCTOR, Client, running_console

    with running_console(console_config(tmp_path / "data")) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        assert server.state is not None
        state = server.state
        conn = state.data.db.conn
        statements: list[str] = []
        state.executor.submit(conn.set_trace_callback, statements.append).result()
        try:
            for path in ("/favicon.ico", "/static/old-console.js"):
                reply = client.get(path, headers={"Accept": "image/avif,image/webp,*/*"})
                assert reply.status == 404 and "<html" not in reply.body, reply.body
            refused = client.request("PUT", "/today", headers={"Accept": "*/*"})
            assert refused.status == 405, refused.body
            asked = list(statements)
            page = client.get("/no-such-page")
        finally:
            state.executor.submit(conn.set_trace_callback, None).result()
    assert asked == [], asked
    assert page.status == 404 and 'action="/logout"' in page.body, page.body
