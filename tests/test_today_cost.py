"""What the Today page costs for the checked-in patient's readings: the page is redrawn every few
seconds on the doctor's tablet, on a Pi with an SD card. A patient measured often (a cuff and an
oximeter left on for an hour) must cost the same few statements as one measured twice, not one
outbox look-up and one payload read per reading."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from lastmile.console import views
from lastmile.console.sources import ClinicData
from tests.console_harness import bp_reading, console_config
from tests.statement_trace import FEW, MANY, T0, traced


def record_readings(data: ClinicData, first: int, count: int) -> None:
    """`count` BP readings of the checked-in patient, a second apart: each one goes to the outbox."""
    for n in range(first, first + count):
        at = T0 + dt.timedelta(seconds=n)
        assert data.store.record(bp_reading(at, f"cuff:{n}"), now=at).outcome != "held"


def test_today_page_costs_the_same_statements_for_2_or_60_readings_of_the_patient(tmp_path: Path) -> None:
    data = ClinicData(console_config(tmp_path / "data"))
    shown_at = T0 + dt.timedelta(seconds=MANY + 30)

    def statements_of_a_render() -> tuple[int, int]:
        with traced(data.db.conn, data.outbox.db.conn) as statements:
            page = views.today(data, shown_at)
        return len(statements), len(page["readings"])

    try:
        data.context.set_patient("P-7", "张三", now=T0)
        record_readings(data, 0, FEW)
        few, shown = statements_of_a_render()
        assert shown == FEW
        record_readings(data, FEW, MANY - FEW)
        many, shown = statements_of_a_render()
        assert shown == 20  # the page shows the newest 20
    finally:
        data.close()
    assert many == few, f"Today with {MANY} readings of the patient ran {many} SQL statements, with {FEW}: {few}"


def test_today_page_shows_only_the_patients_readings_newest_first(tmp_path: Path) -> None:
    data = ClinicData(console_config(tmp_path / "data"))
    try:
        data.context.set_patient("P-1", now=T0)
        record_readings(data, 0, 2)
        data.context.set_patient("P-2", now=T0 + dt.timedelta(seconds=5))
        record_readings(data, 5, 3)
        # P-1 back in the chair after P-2's session began: those readings are P-1's, not P-2's
        data.context.set_patient("P-1", now=T0 + dt.timedelta(seconds=10))
        record_readings(data, 10, 2)
        readings = data.patient_readings("P-2", T0 + dt.timedelta(seconds=5))
        assert [r.key for r in readings] == ["cuff:7", "cuff:6", "cuff:5"]
        assert [r.key for r in data.patient_readings("P-1", T0)] == ["cuff:11", "cuff:10", "cuff:1", "cuff:0"]
        assert readings[0].summary and readings[0].time_source == "device-clock"
    finally:
        data.close()


def test_a_reading_whose_stored_bytes_changed_is_not_shown_and_is_quarantined(tmp_path: Path) -> None:
    """The bulk read checks each payload against its hash, as the outbox's own read does: a
    reading the SD card altered is never shown as the patient's (nor sent), it is quarantined."""
    data = ClinicData(console_config(tmp_path / "data"))
    try:
        data.context.set_patient("P-3", now=T0)
        record_readings(data, 0, 2)
        first = data.outbox.items(kind="observation")[0]
        data.outbox.db.conn.execute("UPDATE payloads SET data = ? WHERE item_id = ?", (b"{}", first.id))
        assert [r.key for r in data.patient_readings("P-3", T0)] == ["cuff:1"]
        assert data.outbox.get(first.id).state.value == "quarantined"  # type: ignore[union-attr]
    finally:
        data.close()


def test_today_redrawn_with_no_new_reading_reads_no_payload_again(tmp_path: Path) -> None:
    """Today is redrawn every few seconds while the patient is in the chair: the readings shown
    were read, checked and parsed at the first draw; a redraw asks only which are there now, it
    does not read their payloads from the SD card again. A new reading is read once."""
    data = ClinicData(console_config(tmp_path / "data"))
    shown_at = T0 + dt.timedelta(seconds=MANY + 30)

    def payload_reads_of_a_render(shown: int) -> list[str]:
        with traced(data.db.conn, data.outbox.db.conn) as statements:
            page = views.today(data, shown_at)
        assert len(page["readings"]) == shown
        return [s for s in statements if "payloads" in s]

    try:
        data.context.set_patient("P-8", now=T0)
        record_readings(data, 0, FEW)
        assert payload_reads_of_a_render(FEW)  # the first draw reads them
        assert payload_reads_of_a_render(FEW) == []
        record_readings(data, FEW, 1)
        assert len(payload_reads_of_a_render(FEW + 1)) == 1  # the new one only
        assert payload_reads_of_a_render(FEW + 1) == []
        newest = data.patient_readings("P-8", T0)[0]
        assert newest.key == f"cuff:{FEW}" and newest.summary
    finally:
        data.close()
