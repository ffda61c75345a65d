"""The reports stored before 0009_report_lines are read again by the forward service after its
start (lastmile.reports.old_lines), never while clinic.db is opened (a migration: the console
then loaded pydicom, and all the rows in one write transaction held the other services past
their busy timeout on a Pi)."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from lastmile.clinic.db import DB_NAME, open_clinic_db
from lastmile.reports.old_lines import BATCH, add_old_report_lines
from lastmile.reports.store import ReportStore
from tests.old_reports import write_old_reports
from tests.service_harness import no_reading_center_toml, start, stop
from tests.waiting import wait_for


def test_a_report_that_cannot_be_read_again_never_stops_the_others_and_is_not_read_again(tmp_path: Path) -> None:
    """The first row's object is damaged, another's too in the next batch: every other report
    gets its lines (SR and PDF, across batches), the damaged keep their English text, marked;
    the next start's run reads and writes nothing."""
    damaged = (0, BATCH + 3)
    write_old_reports(tmp_path, BATCH + 10, pdf_every=4, damaged=damaged)
    db = open_clinic_db(tmp_path)
    try:
        assert add_old_report_lines(db) == BATCH + 10 - len(damaged)
        rows = db.conn.execute("SELECT id, kind, lines, lines_not_read, text FROM reports ORDER BY id").fetchall()
        read_again = [r for r in rows if r[2] is not None]
        assert {r[1] for r in read_again} == {"sr", "pdf"}
        kept = [(r[0], r[3].split(":")[0], r[4].split("\n")[0]) for r in rows if r[2] is None]
        assert kept == [(1, "unreadable", "ECG Report"), (BATCH + 4, "unreadable", "ECG Report")]

        changes = db.conn.total_changes
        assert add_old_report_lines(db) == 0  # the next start
        assert db.conn.total_changes == changes
    finally:
        db.conn.close()
    with ReportStore.open(tmp_path) as store:
        shown = {r.id: r for r in store.reports()}
    assert shown[2].lines is not None and shown[1].lines is None


def test_opening_clinic_db_with_old_reports_in_the_console_does_not_load_pydicom(tmp_path: Path) -> None:
    """The console opened clinic.db first after the upgrade: the migration read the old reports
    again in the console's process, which then kept pydicom (~9 MB of its 64 MB) for its life."""
    write_old_reports(tmp_path, 3, pdf_every=3)
    code = (
        "import sys; from pathlib import Path; from lastmile.console.service import prepare_console_process; "
        "prepare_console_process(); "
        "import lastmile.console.app, lastmile.console.stores, lastmile.console.sources; "
        "from lastmile.clinic.db import open_clinic_db; "
        f"open_clinic_db(Path({str(tmp_path)!r})).conn.close(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pydicom')[:1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    with ReportStore.open(tmp_path) as store:
        assert [r.lines for r in store.reports()] == [None, None, None]  # for the forward service to read


def forward_config(tmp_path: Path) -> Path:
    """The forward service of a gateway upgraded with old reports (kept: not past their retention);
    no reading center, no platform."""
    path = tmp_path / "lastmile.toml"
    path.write_text(
        f"""
[gateway]
data_dir = "{tmp_path / "data"}"
{no_reading_center_toml()}[outbox]
min_free_mb = 0
[reports]
source = "off"
retention_days = 3650
"""
    )
    return path


def rows_left(data_dir: Path) -> tuple[int, int, int]:
    """(read again, marked, still to read), as another process reads clinic.db."""
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / DB_NAME}?mode=ro", uri=True, timeout=30)) as conn:
        row = conn.execute(
            "SELECT count(lines), count(lines_not_read), sum(lines IS NULL AND lines_not_read IS NULL) FROM reports"
        ).fetchone()
    return int(row[0]), int(row[1]), int(row[2] or 0)


def lines_by_row(data_dir: Path) -> dict[int, tuple[str | None, str | None]]:
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / DB_NAME}?mode=ro", uri=True, timeout=30)) as conn:
        return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT id, lines, lines_not_read FROM reports")}


def said_read_again(journal: str) -> list[tuple[int, int]]:
    """What each run said it did: (rows read again, rows that keep their text)."""
    return [(int(a), int(b)) for a, b in re.findall(r"(\d+) read again in the reader's language, (\d+) keep", journal)]


def test_a_stop_in_the_middle_is_quick_and_the_next_start_reads_the_rest_once(tmp_path: Path) -> None:
    """The real `lastmile forward` is stopped while it reads the old reports again, the console
    holding clinic.db's write lock meanwhile (a doctor saving a check-in, a long write): the stop
    was held ~15 s, the busy timeout of the batch's write (systemd allows the whole stop 45 s).
    Now the write gives the lock up at the stop; the rows it read wait for the next start, which
    reads exactly those left: none twice (what each run says it read adds up), none left out, each
    as one uninterrupted run reads it."""
    count, damaged = 40 * BATCH, (7, 21 * BATCH + 2)
    data = tmp_path / "data"
    write_old_reports(data, count, pdf_every=4, damaged=damaged)
    open_clinic_db(data).conn.close()  # the upgrade's migrations, as the first service to start runs them
    whole = tmp_path / "whole"
    shutil.copytree(data, whole)
    db = open_clinic_db(whole)
    try:
        add_old_report_lines(db)  # one run, never stopped: what every row must end as
    finally:
        db.conn.close()
    cfg, journal = forward_config(tmp_path), tmp_path / "forward.log"

    first = start(cfg, "forward", log=journal)
    try:
        wait_for(lambda: rows_left(data)[0] >= BATCH or first.poll() is not None, 60, what="a first batch read again")
        with contextlib.closing(sqlite3.connect(data / DB_NAME, timeout=30, isolation_level=None)) as console:
            console.execute("BEGIN IMMEDIATE")
            read_before_the_stop = rows_left(data)
            assert read_before_the_stop[2] > 0, "all read before the stop: nothing of this test happened"
            time.sleep(0.5)  # the next batch read, its write waiting for the console
            first.send_signal(signal.SIGTERM)
            stopping = time.monotonic()
            while first.poll() is None and time.monotonic() - stopping < 30:
                time.sleep(0.05)
            stop_took = time.monotonic() - stopping
            console.execute("ROLLBACK")
        assert first.poll() == 0, journal.read_text(errors="replace")[-3000:]
    finally:
        stop(first)
    assert stop_took < 5.0, f"the stop took {stop_took:.1f} s\n{journal.read_text(errors='replace')[-3000:]}"
    assert rows_left(data) == read_before_the_stop  # nothing written after the stop

    second = start(cfg, "forward", log=journal)
    try:
        wait_for(lambda: rows_left(data)[2] == 0 or second.poll() is not None, 60, what="the rest read again")
    finally:
        stop(second)
    text = journal.read_text(errors="replace")
    runs = said_read_again(text)
    assert len(runs) == 2, text[-3000:]
    assert runs[0] == read_before_the_stop[:2], (runs, read_before_the_stop)
    assert (runs[0][0] + runs[1][0], runs[0][1] + runs[1][1]) == (count - len(damaged), len(damaged)), runs
    assert lines_by_row(data) == lines_by_row(whole)
