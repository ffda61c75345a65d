"""The reports stored before 0009_report_lines are read again by the forward service after its
start (lastmile.reports.old_lines), never while clinic.db is opened (a migration: the console
then loaded pydicom, and all the rows in one write transaction held the other services past
their busy timeout on a Pi)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lastmile.clinic.db import open_clinic_db
from lastmile.reports.old_lines import BATCH, add_old_report_lines
from lastmile.reports.store import ReportStore
from tests.old_reports import write_old_reports


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
