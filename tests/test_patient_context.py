"""Patient context (clinic session), held/unassigned observations and the device registry."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from devices.identity import STORED_TIME_UNKNOWN, DeviceIdentity, TimeSource
from devices.observation import Observation, Quantity
from lastmile.cli import main
from lastmile.clinic.devices import DeviceRegistry
from lastmile.clinic.observations import (
    OBSERVATION_KIND,
    ObservationStore,
    UnknownObservationError,
    observation_from_json,
    observation_to_json,
    summary,
)
from lastmile.clinic.patients import CurrentPatient, EndedByCard, PatientContext, SameName
from tests.conftest import run_python
from uploader.outbox import Outbox

T0 = dt.datetime(2025, 6, 1, 9, 0, tzinfo=dt.timezone.utc)
MIN = dt.timedelta(minutes=1)


def bp(measured_at: dt.datetime, systolic: float = 120.0, key: str | None = None) -> Observation:
    return Observation(
        kind="blood-pressure",
        quantities=(
            Quantity("systolic", systolic, "mm[Hg]", systolic, "mm[Hg]"),
            Quantity("diastolic", 80.0, "mm[Hg]", 80.0, "mm[Hg]"),
            Quantity("pulse-rate", None, "/min", None, "/min", "nan"),
        ),
        measured_at=measured_at,
        time_source=TimeSource.DEVICE_CLOCK,
        received_at=measured_at + MIN,
        device=DeviceIdentity("Acme", "BP-1", "42", "AA:BB:CC:DD:EE:01"),
        record_key=key or f"test:{measured_at.isoformat()}:{systolic}",
    )


@pytest.fixture
def context(tmp_path: Path):
    ctx = PatientContext.open(tmp_path, idle_timeout_s=900)
    yield ctx
    ctx.close()


@pytest.fixture
def store(tmp_path: Path):
    outbox = Outbox.open(tmp_path, min_free_bytes=0)
    s = ObservationStore.open(tmp_path, outbox=outbox, idle_timeout_s=900)
    yield s
    s.close()
    outbox.close()


def test_set_current_and_expiry(context: PatientContext) -> None:
    assert context.current(T0) is None
    p = context.set_patient("P-1", "Doe^Jane", now=T0)
    assert (p.patient_id, p.name, p.since, p.expires_at) == ("P-1", "Doe^Jane", T0, T0 + 15 * MIN)
    assert context.current(T0 + 14 * MIN) is not None
    assert context.touch(now=T0 + 14 * MIN)
    assert context.current(T0 + 28 * MIN).patient_id == "P-1"  # activity kept it alive
    assert context.current(T0 + 30 * MIN) is None  # idle for 16 minutes: gone
    assert not context.touch(now=T0 + 31 * MIN)  # and touching does not revive it
    assert context.current(T0 + 31 * MIN) is None
    events = [e["event"] for e in context.history()]
    assert events[0] == "session-expired" and "patient-set" in events


def test_context_is_shared_between_processes_and_survives_restart(tmp_path: Path) -> None:
    a = PatientContext.open(tmp_path, idle_timeout_s=60)
    b = PatientContext.open(tmp_path, idle_timeout_s=60)
    a.set_patient("P-7", now=T0)
    assert b.current(T0 + MIN / 2).patient_id == "P-7"
    a.close()
    c = PatientContext.open(tmp_path, idle_timeout_s=60)
    assert c.current(T0 + MIN / 2).patient_id == "P-7"
    assert c.current(T0 + 2 * MIN) is None  # a restart never revives an expired session
    b.close()
    c.close()


def test_clear_replace_and_doctor(context: PatientContext) -> None:
    context.set_doctor("DR-1", now=T0)
    assert context.current(T0) is None and context.current_doctor(T0) == "DR-1"
    context.set_patient("P-1", now=T0 + MIN)
    assert context.set_patient("P-1", now=T0 + 90 * MIN / 60).since == T0 + MIN  # same patient: same session
    p2 = context.set_patient("P-2", now=T0 + 2 * MIN)
    assert (p2.patient_id, p2.since, p2.doctor_id) == ("P-2", T0 + 2 * MIN, "DR-1")
    assert context.clear(now=T0 + 3 * MIN)
    assert context.current(T0 + 3 * MIN) is None and context.current_doctor(T0 + 3 * MIN) == "DR-1"
    assert not context.clear(now=T0 + 4 * MIN)
    with pytest.raises(ValueError):
        context.set_patient("  ", now=T0)


def logged_naming(data_dir: Path, text: str) -> list[tuple]:
    """The rows of clinic.db's session log holding `text` (a name), read as a file."""
    import sqlite3

    conn = sqlite3.connect(data_dir / "clinic.db")
    try:
        return [row for row in conn.execute("SELECT * FROM session_log") if text in " ".join(map(str, row))]
    finally:
        conn.close()


def test_a_check_in_name_is_kept_in_the_session_log_only_as_long_as_it_is_used(tmp_path: Path) -> None:
    # 张三 checked in yesterday morning, 李四 a day and an hour later: 张三's name is used for
    # NAME_KEPT (24 h) and then must not stay in clinic.db forever (the outbox purges patient data).
    from lastmile.clinic.patients import NAME_KEPT

    context = PatientContext.open(tmp_path, idle_timeout_s=900)
    try:
        context.set_patient("P-1", "Zhang^San=张^三", now=T0)
        later = T0 + NAME_KEPT + 60 * MIN
        context.set_patient("P-2", "Li^Si=李^四", now=later)
        assert context.checked_in_name("P-2", later) == "Li^Si=李^四"  # still used
    finally:
        context.close()
    assert logged_naming(tmp_path, "张") == []


def test_a_check_in_name_is_forgotten_with_no_later_check_in(tmp_path: Path) -> None:
    """张三 checked in and the check-in ended; nobody was checked in after. His name stayed in
    clinic.db's session log for ever: only a later check-in forgot names past NAME_KEPT. Now the
    session's end (the doctor's end of check-in, the idle expiry a page's read makes) does too."""
    from lastmile.clinic.patients import NAME_KEPT

    context = PatientContext.open(tmp_path, idle_timeout_s=900)
    try:
        context.set_patient("P-1", "Zhang^San=张^三", now=T0)
        assert context.clear(now=T0 + 10 * MIN)
        assert context.checked_in_name("P-1", T0 + 10 * MIN) == "Zhang^San=张^三"  # still used
        assert context.current(T0 + NAME_KEPT + 60 * MIN) is None  # a page read, a day later
    finally:
        context.close()
    assert logged_naming(tmp_path, "张") == []


def session_log_statements(context: PatientContext, do) -> list[str]:
    """The statements on clinic.db's session log that `do()` ran (their values bound)."""
    seen: list[str] = []
    context.db.conn.set_trace_callback(seen.append)
    try:
        do()
    finally:
        context.db.conn.set_trace_callback(None)
    return [sql for sql in seen if "session_log" in sql]


def test_a_month_of_check_ins_keeps_only_the_session_log_that_is_read(tmp_path: Path) -> None:
    """A gateway checks a patient in every 3 hours for a month: its session log (on the Pi's SD
    card) grew for ever, and every check-in scanned all of it. Now it keeps only the NAME_KEPT that
    named() reads, and no statement of a check-in reads the whole table."""
    from lastmile.clinic.patients import NAME_KEPT

    step, count = dt.timedelta(hours=3), 30 * 8
    context = PatientContext.open(tmp_path, idle_timeout_s=900)
    try:
        for n in range(count):
            context.set_patient(f"P-{n}", f"Name^{n}", now=T0 + n * step)
        now = T0 + count * step
        statements = session_log_statements(context, lambda: context.set_patient("P-NOW", "Wang^Wu", now=now))
        assert context.checked_in_name(f"P-{count - 1}", now) == f"Name^{count - 1}"  # still used
        kept = [dt.datetime.fromisoformat(row["at"]) for row in context.db.conn.execute("SELECT at FROM session_log")]
        assert min(kept) >= now - NAME_KEPT, f"the session log keeps {len(kept)} rows back to {min(kept)}"
        # each check-in in NAME_KEPT: its own row and its predecessor's idle end
        assert len(kept) == 2 * (NAME_KEPT // step + 1)
        plans = {
            sql: " / ".join(row[3] for row in context.db.conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
            for sql in statements
            if not sql.startswith("INSERT")
        }
        assert plans and all("USING INDEX session_log_at" in plan for plan in plans.values()), plans
    finally:
        context.close()


def test_a_corrected_id_does_not_keep_the_name_typed_with_it(tmp_path: Path) -> None:
    """The doctor checks 张三 in under P-12, a typo, and corrects it to his P-21. Later the true
    P-12 (李四) checks in without a name, and then her reading is assigned to P-12 after the session
    moved on: it went to the county as 张三. A corrected ID's name is not its own, and the latest
    check-in of an ID names it (none: no name)."""
    from devices.identity import Patient

    context = PatientContext.open(tmp_path, idle_timeout_s=900)
    try:
        context.set_patient("P-12", "Zhang^San=张^三", now=T0)
        context.set_patient("P-21", "Zhang^San=张^三", now=T0 + MIN)  # the same patient, ID corrected
        later = T0 + 30 * MIN
        assert context.named(Patient("P-12"), later).name == "", "a mistyped ID keeps the name typed with it"
        assert context.named(Patient("P-21"), later).name == "Zhang^San=张^三"
        context.set_patient("P-12", now=T0 + 60 * MIN)  # the true owner of P-12, no name given
        context.set_patient("P-30", "Wang^Wu=王^五", now=T0 + 70 * MIN)
        assert context.named(Patient("P-12"), T0 + 80 * MIN).name == ""
    finally:
        context.close()


def test_the_checked_in_patients_other_id_said_so_keeps_his_name_on_both(tmp_path: Path) -> None:
    """王五 is checked in by his ID card number and, still checked in, by his clinic number: the
    doctor says it is his other ID (`SameName.OTHER_ID`), not a typo corrected. Both IDs keep his name; the
    session goes on under the clinic number. Unasked, the same name stays a correction (no name
    on an ID from a guess)."""
    id_card, clinic_number, name = "11010519491231002X", "MZ-0042", "Wang^Wu=王^五"
    context = PatientContext.open(tmp_path, idle_timeout_s=900)
    try:
        context.set_patient(id_card, name, now=T0)
        assert context.same_name_replaced(clinic_number, name, T0 + MIN) is not None
        assert context.same_name_replaced(clinic_number, "Li^Si=李^四", T0 + MIN) is None
        assert context.same_name_replaced(id_card, name, T0 + MIN) is None
        context.check_in(clinic_number, name, now=T0 + MIN, same_name=SameName.OTHER_ID)
        later = T0 + 10 * MIN
        assert context.known_names([id_card, clinic_number], later) == {id_card: name, clinic_number: name}
        current = context.current(later)
        assert current is not None and current.patient_id == clinic_number
    finally:
        context.close()


def test_the_ids_of_the_current_patient_are_those_the_doctor_linked_in_his_session(tmp_path: Path) -> None:
    """`patient_ids`: the current patient's ID and the IDs the doctor said are his (other ID, each
    time asked) while he was checked in, kept when his ID is corrected - never the ID corrected,
    another patient's, or one of a session that has ended (cleared or idle)."""
    id_card, clinic_number, insurance, name = "11010519491231002X", "MZ-0042", "YB-7", "Wang^Wu=王^五"
    context = PatientContext.open(tmp_path, idle_timeout_s=900)
    try:
        assert context.patient_ids(T0) == frozenset()
        context.set_patient(id_card, name, now=T0)
        context.check_in(clinic_number, name, now=T0 + MIN, same_name=SameName.OTHER_ID)
        context.set_patient(clinic_number, now=T0 + 2 * MIN)  # the same patient again (a card): still his
        context.check_in(insurance, name, now=T0 + 3 * MIN, same_name=SameName.OTHER_ID)
        assert context.patient_ids(T0 + 4 * MIN) == {id_card, clinic_number, insurance}
        context.set_patient("MZ-0043", name, now=T0 + 5 * MIN)  # unasked: the insurance number a typo
        assert context.patient_ids(T0 + 6 * MIN) == {id_card, clinic_number, "MZ-0043"}
        context.set_patient("P-9", "Li^Si=李^四", now=T0 + 7 * MIN)
        context.check_in(clinic_number, "Li^Si=李^四", now=T0 + 8 * MIN, same_name=SameName.OTHER_ID)
        assert context.patient_ids(T0 + 9 * MIN) == {"P-9", clinic_number}
        assert context.clear(now=T0 + 10 * MIN)
        context.set_patient(clinic_number, "Li^Si=李^四", now=T0 + 11 * MIN)  # a new session: no links
        assert context.patient_ids(T0 + 12 * MIN) == {clinic_number}
        context.check_in("P-10", "Li^Si=李^四", now=T0 + 13 * MIN, same_name=SameName.OTHER_ID)
        assert context.patient_ids(T0 + 14 * MIN) == {clinic_number, "P-10"}
        assert context.patient_ids(T0 + 29 * MIN) == frozenset()  # idle past its timeout: ended
        context.set_patient("P-10", "Li^Si=李^四", now=T0 + 30 * MIN)
        assert context.patient_ids(T0 + 31 * MIN) == {"P-10"}
    finally:
        context.close()


def test_a_session_open_when_the_gateway_is_updated_keeps_the_ids_its_log_linked(tmp_path: Path) -> None:
    """The version before 0032 read a session's links from its log: a session open across the
    update keeps them (its row gets them once), another patient's check-in before links nothing."""
    from lastmile.clinic.db import DB_NAME, MIGRATIONS
    from uploader.sqlite_store import open_database

    now = dt.datetime.now(dt.timezone.utc)
    db = open_database(tmp_path / DB_NAME, tuple(m for m in MIGRATIONS if m.name < "0032_session_linked_ids"))
    db.conn.execute(
        "INSERT INTO session (id, patient_id, patient_name, patient_since, last_activity) VALUES (1, ?, ?, ?, ?)",
        ("MZ-0042", "Wang^Wu=王^五", now.isoformat(), now.isoformat()),
    )
    for event, patient_id in (
        ("patient-set", "P-9"),
        ("patient-replaced", "P-9"),
        ("patient-set", "11010519491231002X"),
        ("doctor-set", None),
        ("patient-other-id", "11010519491231002X"),
        ("patient-set", "MZ-0042"),
    ):
        db.conn.execute(
            "INSERT INTO session_log (at, event, patient_id) VALUES (?, ?, ?)", (now.isoformat(), event, patient_id)
        )
    db.conn.close()
    context = PatientContext.open(tmp_path, idle_timeout_s=900)
    try:
        assert context.patient_ids(now) == {"MZ-0042", "11010519491231002X"}
    finally:
        context.close()


def test_whom_a_card_ended_is_said_for_as_long_as_the_session_the_card_began(context: PatientContext) -> None:
    """On the session's row: kept while the card's patient is checked in again or his ID corrected,
    gone with his session (ended, or another patient typed in), never begun by a typed check-in."""
    context.set_patient("P-STAT-1", "李建国", now=T0, stat=True, reason="胸痛")
    context.set_patient("CARD-1", now=T0 + MIN, by_card=True)
    ended = EndedByCard("P-STAT-1", "李建国", True, "胸痛", T0 + MIN)
    assert getattr(context.current(T0 + 2 * MIN), "ended_by_card", None) == ended
    context.set_patient("CARD-1", "王五", now=T0 + 3 * MIN)  # the same patient, his name typed
    context.set_patient("CARD-1", now=T0 + 4 * MIN, by_card=True)  # his card read again
    assert getattr(context.current(T0 + 5 * MIN), "ended_by_card", None) == ended
    assert context.clear(now=T0 + 6 * MIN)
    context.set_patient("CARD-1", now=T0 + 7 * MIN, by_card=True)  # nobody's check-in ended
    assert getattr(context.current(T0 + 8 * MIN), "ended_by_card", "read") is None
    context.set_patient("CARD-2", now=T0 + 9 * MIN, by_card=True)
    context.set_patient("P-3", "张三", now=T0 + 10 * MIN)  # typed: its own news on Today
    assert getattr(context.current(T0 + 11 * MIN), "ended_by_card", "read") is None


def test_whom_a_card_ended_is_still_said_for_a_session_open_when_the_gateway_is_updated(tmp_path: Path) -> None:
    """Until 0040 Today read it from the session log: a session a card began before the update
    keeps its notice (its row gets it once); one begun by a typed check-in since gets none."""
    from lastmile.clinic.db import DB_NAME, MIGRATIONS
    from uploader.sqlite_store import open_database

    def with_log(lines: list[tuple[dt.datetime, str, str, str | None]], since: dt.datetime) -> PatientContext:
        data = tmp_path / since.isoformat()
        data.mkdir()
        db = open_database(data / DB_NAME, tuple(m for m in MIGRATIONS if m.name < "0040_session_ended_by_card"))
        db.conn.execute(
            "INSERT INTO session (id, patient_id, patient_since, last_activity) VALUES (1, 'CARD-1', ?, ?)",
            (since.isoformat(), since.isoformat()),
        )
        for at, event, patient_id, detail in lines:
            db.conn.execute(
                "INSERT INTO session_log (at, event, patient_id, detail) VALUES (?, ?, ?, ?)",
                (at.isoformat(), event, patient_id, detail),
            )
        db.conn.close()
        return PatientContext.open(data, idle_timeout_s=900)

    now = dt.datetime.now(dt.timezone.utc)
    lines = [
        (now - 5 * MIN, "patient-set", "P-STAT-1", "李建国"),
        (now - MIN, "patient-ended-by-card", "P-STAT-1", '{"name": "李建国", "stat": true, "reason": "胸痛"}'),
        (now - MIN, "patient-set", "CARD-1", None),
    ]
    context = with_log(lines, now - MIN)
    try:
        ended = EndedByCard("P-STAT-1", "李建国", True, "胸痛", now - MIN)
        assert getattr(context.current(now), "ended_by_card", None) == ended
    finally:
        context.close()
    context = with_log(lines, now)  # a session begun after the card's line: another check-in's
    try:
        assert getattr(context.current(now), "ended_by_card", "read") is None
    finally:
        context.close()


def test_a_corrected_id_keeps_the_stat_check_in_and_another_patient_of_the_name_starts_anew(
    tmp_path: Path,
) -> None:
    """王五 is checked in as STAT for 胸痛 and his ID is then corrected (a typo): the correction
    started a new, routine session - the chest-pain patient's next ECG went ROUTINE. Now a
    correction goes on with his session (start, STAT, reason), as his other ID does. Another
    patient who has the same name (the doctor says so: common names are common) starts anew:
    not STAT, no reason, and the first keeps his name."""
    typo, corrected, other_man, name = "MZ-0024", "MZ-0042", "MZ-0777", "Wang^Wu=王^五"
    context = PatientContext.open(tmp_path, idle_timeout_s=3600)
    try:
        context.check_in(typo, name, now=T0, stat=True, reason="胸痛")
        context.check_in(corrected, name, now=T0 + MIN)  # unasked: a correction
        current = context.current(T0 + 2 * MIN)
        assert current is not None, current
        assert (current.patient_id, current.stat, current.reason, current.since) == (corrected, True, "胸痛", T0)
        assert context.known_name(typo, T0 + 2 * MIN) == ""  # a typo names nobody
        context.check_in(other_man, name, now=T0 + 3 * MIN, same_name=SameName.ANOTHER_PERSON)
        current = context.current(T0 + 4 * MIN)
        assert current is not None, current
        assert (current.patient_id, current.stat, current.reason, current.since) == (
            other_man,
            False,
            "",
            T0 + 3 * MIN,
        )
        assert context.known_names([corrected, other_man], T0 + 4 * MIN) == {corrected: name, other_man: name}
        assert context.patient_ids(T0 + 4 * MIN) == {other_man}  # not linked to the first 王五
    finally:
        context.close()


def printed_command(said: str, flag: str) -> list[str] | None:
    """The command `lastmile patient set`'s question printed for the answer `flag`, as the doctor
    pastes it (the words after `lastmile`); None if it printed none."""
    lines = [line for line in said.splitlines() if line.strip().startswith("lastmile ") and "--about" in line]
    found = [shlex.split(line)[1:] for line in lines if line.rstrip().endswith(flag)]
    return found[0] if len(found) == 1 else None


def test_lastmile_patient_set_under_the_checked_in_patients_name_asks_whose_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """王五 is checked in by his ID card number; a technician runs `lastmile patient set MZ-0042
    --name 王五`. The command took it, unasked, for a typo corrected: his ID card number lost his
    name. The console asks the doctor; the command cannot, so it refuses, naming both IDs and the
    answers, each a command to paste (`--about` the checked-in ID), and changes nothing until told."""
    id_card, clinic_number, name = "11010519491231002X", "MZ-0042", "Wang^Wu=王^五"
    data = tmp_path / "data"
    run = ["--data-dir", str(data)]
    assert main(["patient", "set", id_card, "--name", "王五", *run]) == 0
    capsys.readouterr()
    assert main(["patient", "set", clinic_number, "--name", "王五", *run]) == 2
    said = capsys.readouterr().err
    assert all(word in said for word in (id_card, clinic_number, "--corrected", "--other-id", "--another-person")), said
    # the console's words (就诊 a visit, 登记 to check in), never 检查 (an examination) for a check-in
    assert f"同名患者已用 {id_card} 登记就诊" in said and f"结束 {id_card} 的就诊" in said and "检查" not in said, said
    assert main(["patient", "set", clinic_number, "--name", "王五", "--other-id", *run]) == 2  # about whom?
    assert "must name the checked-in patient it answers about" in capsys.readouterr().err
    context = PatientContext.open(data, idle_timeout_s=900)
    try:
        now = dt.datetime.now(dt.timezone.utc)
        current = context.current(now)
        assert current is not None and (current.patient_id, current.name) == (id_card, name)
        assert main(printed_command(said, "--other-id") or []) == 0
        now = dt.datetime.now(dt.timezone.utc)
        assert context.known_names([id_card, clinic_number], now) == {id_card: name, clinic_number: name}
        assert context.patient_ids(now) == {id_card, clinic_number}
        assert main(["patient", "set", "MZ-0043", "--name", "王五", *run]) == 2
        assert main(printed_command(capsys.readouterr().err, "--corrected") or []) == 0  # MZ-0042 a typo
        assert context.known_name(clinic_number, dt.datetime.now(dt.timezone.utc)) == ""
        assert main(["patient", "set", "MZ-0077", "--name", "王五", *run]) == 2
        assert main(printed_command(capsys.readouterr().err, "--another-person") or []) == 0
        now = dt.datetime.now(dt.timezone.utc)
        assert context.known_names(["MZ-0043", "MZ-0077"], now) == {"MZ-0043": name, "MZ-0077": name}
    finally:
        context.close()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["patient", "set", "--help"])
    usage = capsys.readouterr().out
    assert "--corrected" in usage and "--other-id" in usage and "--another-person" in usage


CARD, WANG_WU = "11010519491231002X", "Wang^Wu=王^五"  # the ID card read at the acquire service meanwhile


def read_card(data: Path) -> None:
    """王五's ID card read at the acquire service: its own connection on the same clinic.db."""
    scanner = PatientContext.open(data, idle_timeout_s=900)
    try:
        scanner.set_patient(CARD, WANG_WU, now=dt.datetime.now(dt.timezone.utc))
    finally:
        scanner.close()


def only_the_card_is_checked_in(data: Path) -> None:
    """The card's patient is checked in, named; no ID linked to him, none named after him."""
    context = PatientContext.open(data, idle_timeout_s=900)
    try:
        now = dt.datetime.now(dt.timezone.utc)
        current = context.current(now)
        assert current is not None and (current.patient_id, current.name) == (CARD, WANG_WU)
        assert context.patient_ids(now) == {CARD}
        assert context.known_names([CARD, "MZ-0042"], now) == {CARD: WANG_WU}
    finally:
        context.close()


@pytest.mark.parametrize(
    ("checked_in", "answer", "said"),
    [
        ((), (), "changed meanwhile"),  # nobody checked in: nothing to ask
        (("P-9", "李四"), (), "changed meanwhile"),  # another name: nothing to ask
        (("P-9", "李四"), ("--other-id", "--about", "P-9"), "answers no question"),  # a question not asked
        ((), ("--corrected", "--about", "YB-7"), "changed meanwhile"),  # about YB-7: nobody checked in
        (("YB-7", "王五"), ("--other-id", "--about", "YB-7"), "changed meanwhile"),  # a card meanwhile
    ],
)
def test_a_card_checked_in_while_lastmile_patient_set_asks_is_never_taken_for_what_was_asked(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    checked_in: tuple[str, ...],
    answer: tuple[str, ...],
    said: str,
) -> None:
    """`lastmile patient set MZ-0042 --name 王五` asks whether it replaces the checked-in patient
    under his own name, then checks in. 王五's ID card was read at the acquire service between
    the two: the check-in took it, unasked, for a typo corrected (his ID card number lost his
    name), or applied an answer about YB-7, or about nobody, to him (MZ-0042 linked as his).
    Now the command refuses and says the current patient changed meanwhile, or that its
    answer answers no question; the card's patient stays checked in, named, linked to nothing."""
    data = tmp_path / "data"
    run = ["--data-dir", str(data)]
    if checked_in:
        assert main(["patient", "set", checked_in[0], "--name", checked_in[1], *run]) == 0
    capsys.readouterr()
    asked = PatientContext.same_name_replaced

    def card_read_meanwhile(
        self: PatientContext, patient_id: str, typed: str, now: dt.datetime
    ) -> CurrentPatient | None:
        question = asked(self, patient_id, typed, now)
        read_card(data)
        return question

    monkeypatch.setattr(PatientContext, "same_name_replaced", card_read_meanwhile)
    code = main(["patient", "set", "MZ-0042", "--name", "王五", *answer, *run])
    monkeypatch.undo()
    only_the_card_is_checked_in(data)
    err = capsys.readouterr().err
    assert code == 2 and said in err and "MZ-0042" in err, err


def test_an_answer_to_lastmile_patient_set_is_never_given_to_a_card_read_since_it_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """王五 is checked in as YB-7; `lastmile patient set MZ-0042 --name 王五` asks which it is and
    stops. Before the doctor answers, another 王五's ID card is read at the acquire service. The
    answer (--other-id, run again) was given to the card's patient: MZ-0042 linked as his other ID,
    named after him. Now the question prints the command to paste, naming whom it answers
    (--about YB-7): run after the card, it is refused, in Chinese and English; the card's patient
    stays checked in, linked to nothing. Run while YB-7 is still checked in, it is taken."""
    data = tmp_path / "data"
    run = ["--data-dir", str(data)]
    assert main(["patient", "set", "YB-7", "--name", "王五", *run]) == 0
    capsys.readouterr()
    typed = ["patient", "set", "MZ-0042", "--name", "王五", *run]
    assert main(typed) == 2
    asked = capsys.readouterr().err
    # the old question printed no command: the doctor added the answer's flag to his own
    answer = printed_command(asked, "--other-id") or [*typed, "--other-id"]
    read_card(data)
    code = main(answer)
    err = capsys.readouterr().err
    only_the_card_is_checked_in(data)
    assert code == 2 and "YB-7" in err and CARD in err and "当前患者" in err, err
    assert answer == [*typed, "--about", "YB-7", "--other-id"], asked
    # the answer run while the patient it is about is checked in is taken
    assert main(["patient", "set", "YB-7", "--name", "王五", "--another-person", "--about", CARD, *run]) == 0
    assert main(answer) == 0, capsys.readouterr().err


def test_a_patient_checked_in_again_under_his_other_id_keeps_his_name_on_both(tmp_path: Path) -> None:
    """The check-in form takes a resident ID card number or a clinic number. 张三 is checked in
    by his ID card number, his check-in ends, and later he is checked in by his clinic number:
    the gateway took that for a typo corrected (the next check-in, the same name under another
    ID) and forgot his name on his ID card number. A correction is the current patient replaced
    by another ID under the same name while he is checked in; an ended check-in is not corrected."""
    id_card, clinic_number, name = "11010519491231002X", "MZ-0042", "Zhang^San=张^三"
    context = PatientContext.open(tmp_path, idle_timeout_s=900)
    try:
        context.set_patient(id_card, name, now=T0)
        assert context.clear(now=T0 + 10 * MIN, reason="ended-by-doctor")
        context.set_patient(clinic_number, name, now=T0 + 60 * MIN)
        later = T0 + 70 * MIN
        assert context.known_name(id_card, later) == name
        assert context.known_name(clinic_number, later) == name
    finally:
        context.close()


def test_observation_json_round_trip() -> None:
    obs = bp(T0)
    assert observation_from_json(json.loads(json.dumps(observation_to_json(obs)))) == obs
    assert summary(obs) == "120/80 mm[Hg], pulse-rate (nan) /min"


def test_reading_lands_on_current_patient_once(store: ObservationStore) -> None:
    store.context.set_patient("P-1", "Doe^Jane", now=T0)
    r = store.record(bp(T0 + MIN), now=T0 + 2 * MIN)
    assert (r.outcome, r.patient_id) == ("stored", "P-1")
    item = store.outbox.get(r.item_id)
    assert item.kind == OBSERVATION_KIND and item.patient == {"patient_id": "P-1", "name": "Doe^Jane"}
    payload = json.loads(store.outbox.read_payload(item))
    assert payload["patient_id"] == "P-1" and payload["quantities"][0]["value"] == 120.0
    assert store.record(bp(T0 + MIN), now=T0 + 3 * MIN).outcome == "duplicate"
    # activity: storing the reading kept the session alive beyond the original timeout
    assert store.context.current(T0 + 16 * MIN) is not None


def test_no_patient_means_held_then_assigned(store: ObservationStore) -> None:
    r = store.record(bp(T0), now=T0 + MIN)
    assert r.outcome == "held" and r.patient_id is None
    assert store.outbox.items(kind=OBSERVATION_KIND) == []
    held = store.held()
    assert [h.held_id for h in held] == [r.held_id] and held[0].observation.patient_id is None
    # a re-send while held is a duplicate, even once a patient is current
    store.context.set_patient("P-9", now=T0 + 2 * MIN)
    assert store.record(bp(T0), now=T0 + 3 * MIN).outcome == "duplicate"
    assigned = store.assign(r.held_id, "P-3", now=T0 + 4 * MIN)
    assert assigned.outcome == "stored" and store.held() == []
    item = store.outbox.get(assigned.item_id)
    assert item.patient["patient_id"] == "P-3"
    assert json.loads(store.outbox.read_payload(item))["patient_id"] == "P-3"
    with pytest.raises(UnknownObservationError):
        store.assign(r.held_id, "P-3", now=T0)
    assert store.counts() == {"stored": 1, "held": 0}


def test_reading_from_before_the_patient_session_is_held(store: ObservationStore) -> None:
    store.context.set_patient("P-1", now=T0)
    store.context.set_patient("P-2", now=T0 + 10 * MIN)
    late = store.record(bp(T0 + 5 * MIN), now=T0 + 11 * MIN)  # previous patient's, delivered late
    assert late.outcome == "held"
    assert store.record(bp(T0 + 12 * MIN), now=T0 + 12 * MIN).patient_id == "P-2"


def test_expired_session_holds_next_reading(store: ObservationStore) -> None:
    store.context.set_patient("P-1", now=T0)
    assert store.record(bp(T0 + 20 * MIN), now=T0 + 20 * MIN).outcome == "held"


def test_device_registry(tmp_path: Path) -> None:
    reg = DeviceRegistry.open(tmp_path)
    assert not reg.is_allowed("aa:bb:cc:dd:ee:01")
    reg.allow("aa:bb:cc:dd:ee:01", name="cuff", now=T0)
    assert reg.is_allowed("AA:BB:CC:DD:EE:01") and list(reg.allowed()) == ["AA:BB:CC:DD:EE:01"]
    reg.update_status(
        "AA:BB:CC:DD:EE:01",
        now=T0 + MIN,
        connected=True,
        identity=DeviceIdentity("Acme", "BP-1", "42", "AA:BB:CC:DD:EE:01"),
    )
    reg.update_status("AA:BB:CC:DD:EE:01", now=T0 + 2 * MIN, reading="120/80 mm[Hg]", reading_at=T0 + MIN)
    reg.update_status("AA:BB:CC:DD:EE:01", now=T0 + 3 * MIN, connected=False, error="link lost")
    reg.set_last_sequence("AA:BB:CC:DD:EE:01", 12, now=T0)
    reg.set_last_sequence("AA:BB:CC:DD:EE:01", 7, now=T0)  # never moves back
    d = reg.get("aa:bb:cc:dd:ee:01")
    assert (d.name, d.model, d.connected, d.last_reading, d.last_reading_at, d.last_error, d.last_sequence) == (
        "cuff",
        "BP-1",
        False,
        "120/80 mm[Hg]",
        T0 + MIN,
        "link lost",
        12,
    )
    assert d.to_json()["last_connected_at"] == (T0 + MIN).isoformat()
    assert reg.disallow("AA:BB:CC:DD:EE:01", now=T0) and not reg.is_allowed("AA:BB:CC:DD:EE:01")
    reg.update_status("/dev/ttyUSB0", now=T0, transport="serial", connected=True)
    assert [r.transport for r in reg.all()] == ["ble", "serial"]
    reg.close()


# The doctor's `lastmile patient assign N P-A`, killed (power cut) the moment the reading is in
# the outbox, before its held copy is forgotten: the window between the two databases' commits.
ASSIGN_KILLED_SCRIPT = r"""
import datetime as dt, os, signal, sys
from lastmile.clinic import observations
from lastmile.clinic.observations import ObservationStore
from uploader.outbox import Outbox

data_dir, held_id = sys.argv[1], int(sys.argv[2])
outbox = Outbox.open(data_dir, min_free_bytes=0)
store = ObservationStore.open(data_dir, outbox=outbox, idle_timeout_s=900)
observations.transaction = lambda db: os.kill(os.getpid(), signal.SIGKILL)  # the held row's DELETE
store.assign(held_id, "P-A", now=dt.datetime(2025, 6, 1, 9, 5, tzinfo=dt.timezone.utc))
"""


def test_a_reading_assigned_when_the_power_went_is_not_shown_held_nor_assigned_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reading held unassigned; the doctor assigns it to P-A and the power goes just after it
    reached the outbox. After the reboot the reading is on its way to the county for P-A: it
    must not be listed as waiting for a patient, and assigning it again to P-B must not say
    "assigned to P-B" while P-A's reading is what is sent."""
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        store = ObservationStore.open(tmp_path, outbox=outbox, idle_timeout_s=900)
        held_id = store.record(bp(T0), now=T0 + MIN).held_id
        store.close()
    child = run_python(ASSIGN_KILLED_SCRIPT, str(tmp_path), str(held_id))
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    capsys.readouterr()
    assert main(["patient", "show", "--json", "--data-dir", str(tmp_path)]) == 0
    shown = json.loads(capsys.readouterr().out)["unassigned"]
    assert shown == [], "`lastmile patient show` lists an assigned reading as unassigned"
    with Outbox.open(tmp_path, min_free_bytes=0) as outbox:
        store = ObservationStore.open(tmp_path, outbox=outbox, idle_timeout_s=900)
        try:
            [item] = outbox.items(kind=OBSERVATION_KIND)
            assert item.patient is not None and item.patient["patient_id"] == "P-A"
            assert [h.held_id for h in store.held()] == [], "an assigned reading is still shown as unassigned"
            try:
                again = store.assign(held_id, "P-B", now=T0 + 10 * MIN)
            except UnknownObservationError:
                again = None
            if again is not None:
                sent = outbox.get(again.item_id or 0)
                assert sent is not None and sent.patient is not None
                assert sent.patient["patient_id"] == again.patient_id, (
                    f"the doctor is told {again.patient_id}, the county gets {sent.patient['patient_id']}"
                )
        finally:
            store.close()


def test_todays_unassigned_reading_is_listed_after_months_of_unassigned_ones(store: ObservationStore) -> None:
    """A cuff used without a check-in leaves readings held, unassigned, and nothing ever ends
    them. Months later the doctor takes a reading before checking the patient in: it must be in
    the list she assigns from (the console shows `held()`), not hidden behind the 200 oldest."""
    for n in range(205):
        store.record(bp(T0 + n * MIN, key=f"old-{n}"), now=T0 + n * MIN)
    today = T0 + dt.timedelta(days=120)
    newest = store.record(bp(today, key="today"), now=today + MIN)
    listed = [h.held_id for h in store.held()]
    assert newest.held_id in listed, "today's unassigned reading is not on the doctor's list"
    assert listed == sorted(listed)  # still oldest first on the page


# `lastmile patient map-user`: the doctor says whose user N of a multi-user cuff (bp()'s device) is.
CUFF_ADDRESS = "AA:BB:CC:DD:EE:01"


def reading(user: int, minute: int) -> Observation:
    """A reading of the cuff's user `user`, `minute` minutes after T0."""
    return replace(bp(T0 + minute * MIN, 151.0, key=f"test:user{user}:{minute}"), device_user=user)


def patient_command(tmp_path: Path, command: str, *args: str, at: dt.datetime) -> int:
    """`lastmile patient COMMAND ...` run at `at`."""
    with pytest.MonkeyPatch.context() as clock:
        clock.setattr("lastmile.commands.patient._now", lambda: at)
        return main(["patient", command, "--data-dir", str(tmp_path), *args])


def map_user(tmp_path: Path, *args: str, at: dt.datetime = T0) -> int:
    """`lastmile patient map-user ...` run at `at` (the mapping holds from then on)."""
    return patient_command(tmp_path, "map-user", *args, at=at)


def test_map_user_current_and_remove_decide_where_user_2s_readings_go(
    tmp_path: Path, store: ObservationStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.context.set_patient("P-1", now=T0)

    def where(minute: int) -> str | None:
        return store.record(reading(2, minute), now=T0 + minute * MIN).patient_id

    assert where(1) is None  # nobody said whose user 2 is: held, not on P-1

    assert map_user(tmp_path, CUFF_ADDRESS.lower(), "2", "--patient", "P-2") == 0
    assert "readings are P-2's" in capsys.readouterr().out
    assert where(2) == "P-2"  # the address as typed in lower case is the same cuff

    assert map_user(tmp_path, CUFF_ADDRESS, "2", "--current") == 0
    assert "the checked-in patient's" in capsys.readouterr().out
    assert where(3) == "P-1"

    assert map_user(tmp_path, CUFF_ADDRESS, "2", "--remove") == 0
    assert "readings held again" in capsys.readouterr().out
    assert where(4) is None
    assert map_user(tmp_path, CUFF_ADDRESS, "2", "--remove") == 0
    assert "was not mapped" in capsys.readouterr().out


def test_removing_user_1s_mapping_gives_it_back_to_the_checked_in_patient(
    tmp_path: Path, store: ObservationStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.context.set_patient("P-1", now=T0)
    assert map_user(tmp_path, CUFF_ADDRESS, "1", "--patient", "P-HOME") == 0
    assert store.record(reading(1, 1), now=T0 + MIN).patient_id == "P-HOME"
    assert map_user(tmp_path, CUFF_ADDRESS, "1", "--remove") == 0
    assert "the checked-in patient's again" in capsys.readouterr().out
    assert store.record(reading(1, 2), now=T0 + 2 * MIN).patient_id == "P-1"


@pytest.mark.parametrize(
    ("address", "user", "message"),
    [
        ("AA:BB:CC:DD:EE", "2", "is not a Bluetooth address"),
        ("P-2", "2", "is not a Bluetooth address"),
        (CUFF_ADDRESS, "255", "a device user is 0-254, not 255"),
        (CUFF_ADDRESS, "-1", "a device user is 0-254, not -1"),
        (CUFF_ADDRESS, "two", "invalid int value: 'two'"),
    ],
)
def test_a_bad_address_or_user_is_refused_clearly_and_maps_nothing(
    tmp_path: Path, store: ObservationStore, capsys: pytest.CaptureFixture[str], address: str, user: str, message: str
) -> None:
    store.context.set_patient("P-1", now=T0)
    try:
        code = map_user(tmp_path, address, user, "--patient", "P-2")
    except SystemExit as exc:  # argparse: the user number is not a number
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert store.record(reading(2, 1), now=T0 + MIN).patient_id is None
    assert store.db.conn.execute("SELECT COUNT(*) FROM device_users").fetchone()[0] == 0


def test_map_user_keeps_a_resident_id_and_name_as_check_in_does(
    tmp_path: Path, store: ObservationStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """Check-in keeps 11010519491231002x as ...002X: the mapped user's readings must go to the
    county under that same ID (one person, not two) and with the patient's name."""
    now = dt.datetime.now(dt.timezone.utc)
    assert main(["patient", "set", "11010519491231002x", "--name", "张三", "--data-dir", str(tmp_path)]) == 0
    checked_in = store.context.current(now + MIN)
    assert checked_in is not None and checked_in.patient_id == "11010519491231002X"
    assert map_user(tmp_path, CUFF_ADDRESS, "2", "--patient", "11010519491231002x", at=now) == 0
    said = capsys.readouterr().out
    later = replace(reading(2, 0), measured_at=now + MIN, received_at=now + MIN)
    item = store.outbox.get(store.record(later, now=now + MIN).item_id or 0)
    assert item is not None and item.patient == {"patient_id": checked_in.patient_id, "name": checked_in.name}
    assert "readings are 11010519491231002X's" in said

    assert map_user(tmp_path, CUFF_ADDRESS, "3", "--patient", "P-3", "--name", "李四") == 0
    item = store.outbox.get(store.record(reading(3, 1), now=T0 + MIN).item_id or 0)
    assert item is not None and item.patient is not None and "李" in item.patient["name"]


def test_map_user_refuses_a_resident_id_with_a_wrong_check_digit(
    tmp_path: Path, store: ObservationStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """assign refuses 110105194912310021 (its check digit is X): map-user must too."""
    assert main(["patient", "assign", "1", "110105194912310021", "--data-dir", str(tmp_path)]) == 2
    capsys.readouterr()
    assert map_user(tmp_path, CUFF_ADDRESS, "2", "--patient", "110105194912310021") == 2
    assert capsys.readouterr().err
    assert store.db.conn.execute("SELECT COUNT(*) FROM device_users").fetchone()[0] == 0


def test_a_reading_measured_before_a_remap_is_held_not_given_to_the_new_patient(
    tmp_path: Path, store: ObservationStore
) -> None:
    """User 2 of the family cuff was P-A's; at minute 10 the doctor maps it to P-B. The cuff's
    memory, synced at minute 11, still holds P-A's reading of minute 5: held, never P-B's. A record
    whose time is unknown cannot be placed after the remap either: held."""
    assert map_user(tmp_path, CUFF_ADDRESS, "2", "--patient", "P-A", at=T0) == 0
    assert map_user(tmp_path, CUFF_ADDRESS, "2", "--patient", "P-B", at=T0 + 10 * MIN) == 0
    older = store.record(reading(2, 5), now=T0 + 11 * MIN)
    assert older.patient_id is None and older.outcome == "held"
    unknown_time = replace(reading(2, 11), flags=(STORED_TIME_UNKNOWN,))
    assert store.record(unknown_time, now=T0 + 11 * MIN).outcome == "held"
    assert store.record(reading(2, 12), now=T0 + 12 * MIN).patient_id == "P-B"
    assert [i.patient and i.patient["patient_id"] for i in store.outbox.items(kind=OBSERVATION_KIND)] == ["P-B"]


def test_a_mapped_users_reading_takes_the_name_of_the_latest_check_in_of_its_patient(
    tmp_path: Path, store: ObservationStore
) -> None:
    """User 2 of the cuff is mapped to P-1 while P-1 is checked in as Zhang^San (a typo); the
    doctor checks P-1 in again with the name corrected, then the next patient. User 2's reading
    went to the county under the name stored with the mapping, while Visits and an assignment name
    P-1 as corrected: the session's name comes first, the mapping's only where it knows none."""
    store.context.set_patient("P-1", "Zhang^San=张^三", now=T0)
    assert map_user(tmp_path, CUFF_ADDRESS, "2", "--patient", "P-1", at=T0 + MIN) == 0
    store.context.set_patient("P-1", "Zhang^Sanfeng=张^三丰", now=T0 + 2 * MIN)
    store.context.set_patient("P-2", "Li^Si=李^四", now=T0 + 3 * MIN)
    item = store.outbox.get(store.record(reading(2, 4), now=T0 + 4 * MIN).item_id or 0)
    assert item is not None and item.patient == {"patient_id": "P-1", "name": "Zhang^Sanfeng=张^三丰"}
    # a day on, the session has forgotten P-1's name: the mapping's is all the gateway knows
    day_on = T0 + dt.timedelta(days=1, minutes=10)
    store.context.set_patient("P-3", now=day_on - MIN)
    late = replace(reading(2, 0), measured_at=day_on, received_at=day_on, record_key="test:user2:day-on")
    item = store.outbox.get(store.record(late, now=day_on).item_id or 0)
    assert item is not None and item.patient == {"patient_id": "P-1", "name": "Zhang^San=张^三"}


@pytest.mark.parametrize("still_checked_in", [True, False], ids=["checked-in", "next-patient-since"])
def test_map_user_with_another_name_than_its_ids_check_in_is_refused_naming_both(
    tmp_path: Path, store: ObservationStore, capsys: pytest.CaptureFixture[str], still_checked_in: bool
) -> None:
    """P-1 was checked in as 张三; the doctor maps user 2 of the cuff to P-1 typing 李四. The CLI
    said "readings are P-1's" and they went to the county as 张三: the name she typed silently
    gave way. Two names for one ID: one is wrong, she is asked which - without --name, 张三; with
    --correct-name, 李四 for the mapping and the check-in alike."""
    store.context.set_patient("P-1", "Zhang^San=张^三", now=T0)
    if not still_checked_in:  # the next patient, and his other ID
        store.context.set_patient("P-2", "Wang^Wu=王^五", now=T0 + MIN)
        store.context.check_in("P-2B", "Wang^Wu=王^五", now=T0 + MIN, same_name=SameName.OTHER_ID)
    assert map_user(tmp_path, CUFF_ADDRESS, "2", "--patient", "P-1", "--name", "李四", at=T0 + 2 * MIN) == 2
    said = capsys.readouterr()
    assert "张三" in said.err and "李四" in said.err and "^" not in said.err and "--correct-name" in said.err, said
    assert "readings are" not in said.out
    assert store.db.conn.execute("SELECT COUNT(*) FROM device_users").fetchone()[0] == 0

    # 李四 is right: the mapping and what the session names P-1 say so
    assert (
        map_user(tmp_path, CUFF_ADDRESS, "2", "--patient", "P-1", "--name", "李四", "--correct-name", at=T0 + 3 * MIN)
        == 0
    )
    item = store.outbox.get(store.record(reading(2, 4), now=T0 + 4 * MIN).item_id or 0)
    assert item is not None and item.patient == {"patient_id": "P-1", "name": "Li^Si=李^四"}
    assert store.context.known_name("P-1", T0 + 4 * MIN) == "Li^Si=李^四"
    current = store.context.current(T0 + 4 * MIN)
    assert current is not None and current.name == ("Li^Si=李^四" if still_checked_in else "Wang^Wu=王^五")
    assert store.context.patient_ids(T0 + 4 * MIN) == ({"P-1"} if still_checked_in else {"P-2B", "P-2"})

    # mapped again without --name: the name the session knows now
    assert map_user(tmp_path, CUFF_ADDRESS, "2", "--patient", "P-1", at=T0 + 5 * MIN) == 0
    item = store.outbox.get(store.record(reading(2, 6), now=T0 + 6 * MIN).item_id or 0)
    assert item is not None and item.patient == {"patient_id": "P-1", "name": "Li^Si=李^四"}


def test_assigning_a_held_reading_with_another_name_than_its_ids_check_in_is_refused_naming_both(
    tmp_path: Path, store: ObservationStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """P-1 was checked in as 张三; the cuff's user 2 reading is held and the doctor assigns it to
    P-1 typing 李四. The CLI said "assigned to P-1" and it went to the county as 李四 while P-1's
    other readings go as 张三: one of the two names is wrong. She is asked which, as map-user asks -
    without --name, 张三; with --correct-name, 李四 for this reading and the check-in alike."""
    store.context.set_patient("P-1", "Zhang^San=张^三", now=T0)
    first, second = (store.record(reading(2, m), now=T0 + m * MIN).held_id for m in (1, 2))
    assert first is not None and second is not None

    assert patient_command(tmp_path, "assign", str(first), "P-1", "--name", "李四", at=T0 + 3 * MIN) == 2
    said = capsys.readouterr()
    assert "张三" in said.err and "李四" in said.err and "^" not in said.err and "--correct-name" in said.err, said
    assert "assigned to" not in said.out
    assert store.outbox.items(kind=OBSERVATION_KIND) == [] and store.get_held(first) is not None

    # without --name: the name P-1 was checked in under, not none
    assert patient_command(tmp_path, "assign", str(first), "P-1", at=T0 + 4 * MIN) == 0
    assert [i.patient for i in store.outbox.items(kind=OBSERVATION_KIND)] == [
        {"patient_id": "P-1", "name": "Zhang^San=张^三"}
    ]

    # 李四 is right: this reading and what the session names P-1 say so
    assert (
        patient_command(tmp_path, "assign", str(second), "P-1", "--name", "李四", "--correct-name", at=T0 + 5 * MIN)
        == 0
    )
    assert "assigned to P-1" in capsys.readouterr().out
    assert store.outbox.items(kind=OBSERVATION_KIND)[-1].patient == {"patient_id": "P-1", "name": "Li^Si=李^四"}
    assert store.context.known_name("P-1", T0 + 5 * MIN) == "Li^Si=李^四"


@pytest.mark.parametrize("command", ["assign", "map-user"])
def test_a_refused_assign_or_mapping_with_correct_name_leaves_the_check_ins_name_as_it_was(
    tmp_path: Path, store: ObservationStore, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """P-1 was checked in as 张三; the doctor types 李四 with --correct-name for an assignment of a
    held reading that is not there (a mistyped number) or a mapping of a user no cuff has. The
    command was refused, and P-1's check-in was 李四 all the same: his next readings went to the
    county under a name the doctor gave for something not done. Now the name is corrected only
    with the assignment or the mapping (one clinic.db transaction)."""
    store.context.set_patient("P-1", "Zhang^San=张^三", now=T0)
    typed = ("P-1", "--name", "李四", "--correct-name")
    if command == "assign":
        assert patient_command(tmp_path, "assign", "99", *typed, at=T0 + MIN) == 1
        assert "no unassigned observation #99" in capsys.readouterr().err
    else:
        assert map_user(tmp_path, CUFF_ADDRESS, "255", "--patient", *typed, at=T0 + MIN) == 2
        assert "a device user is 0-254, not 255" in capsys.readouterr().err
    assert store.context.known_name("P-1", T0 + 2 * MIN) == "Zhang^San=张^三"
    current = store.context.current(T0 + 2 * MIN)
    assert current is not None and current.name == "Zhang^San=张^三"
    corrected = "SELECT COUNT(*) FROM session_log WHERE event = 'patient-name-corrected'"
    assert store.db.conn.execute(corrected).fetchone()[0] == 0
    assert store.record(reading(1, 3), now=T0 + 3 * MIN).patient_id == "P-1"
    (item,) = store.outbox.items(kind=OBSERVATION_KIND)
    assert item.patient == {"patient_id": "P-1", "name": "Zhang^San=张^三"}


def test_a_name_corrected_under_his_other_id_is_his_name_under_every_id_of_his_session(context) -> None:
    """张三 checked in under P-1, then P-2 said to be his other ID; the doctor then says P-1's name
    is 李四 (`map-user ... --correct-name`, `assign ... --correct-name`). The correction was logged
    for P-1 only while every ID of his session is named by his session: the command said done and
    his readings still went to the county as 张三. His session's name is corrected."""
    from devices.identity import Patient

    context.check_in("P-1", "Zhang^San=张^三", now=T0)
    context.check_in("P-2", "Zhang^San=张^三", now=T0 + MIN, same_name=SameName.OTHER_ID)
    named = context.given_name(Patient("P-1", name="Li^Si=李^四"), T0 + 2 * MIN, correct=True)
    assert named.name == "Li^Si=李^四"
    assert context.known_name("P-1", T0 + 2 * MIN) == "Zhang^San=张^三"  # corrected with what it names, not before
    context.correct_name("P-1", named.name, now=T0 + 2 * MIN)
    assert context.known_names(["P-1", "P-2"], T0 + 2 * MIN) == {"P-1": "Li^Si=李^四", "P-2": "Li^Si=李^四"}


def users_reading_goes_as(store: ObservationStore, user: int, at: dt.datetime) -> dict | None:
    """The patient (ID and name) a reading of the cuff's user `user` taken at `at` goes to the county as."""
    taken = replace(reading(user, 0), measured_at=at, received_at=at, record_key=f"test:user{user}:{at.isoformat()}")
    item = store.outbox.get(store.record(taken, now=at).item_id or 0)
    assert item is not None, "held, not stored"
    return item.patient


DAY_ON = T0 + dt.timedelta(days=1, minutes=30)  # the session's log of names of T0's check-ins is gone


def test_a_check_in_under_another_name_than_a_mapped_user_asks_which_name_is_right(
    tmp_path: Path, store: ObservationStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """The family's cuff user 2 is mapped to P-1 as 张三 (`map-user --name 张三`); later P-1 is
    checked in as 张山. The check-in renamed user 2's readings to 张山 unasked (taken for a typo
    corrected), and a day later they went back to 张三. Two names for one ID: the check-in is
    refused naming both as people write them; 张三 checks in as asked; --correct-name 张山 makes
    张山 the mapping's name too, still his a day later."""
    assert map_user(tmp_path, CUFF_ADDRESS, "2", "--patient", "P-1", "--name", "张三") == 0
    capsys.readouterr()
    assert patient_command(tmp_path, "set", "P-1", "--name", "张山", at=T0 + MIN) == 2
    said = capsys.readouterr()
    assert "张三 (Zhang San)" in said.err and "张山 (Zhang Shan)" in said.err, said.err
    assert "--correct-name" in said.err and "^" not in said.err and "current patient" not in said.out, said
    assert store.context.current(T0 + MIN) is None
    assert users_reading_goes_as(store, 2, T0 + 2 * MIN) == {"patient_id": "P-1", "name": "Zhang^San=张^三"}

    # 张三 is right: checked in as the mapping has him
    assert patient_command(tmp_path, "set", "P-1", "--name", "张三", at=T0 + 3 * MIN) == 0
    # 张山 is right after all: the mapping says so too, and keeps saying so after the session's day
    assert patient_command(tmp_path, "set", "P-1", "--name", "张山", "--correct-name", at=T0 + 4 * MIN) == 0
    assert users_reading_goes_as(store, 2, T0 + 5 * MIN) == {"patient_id": "P-1", "name": "Zhang^Shan=张^山"}
    assert users_reading_goes_as(store, 2, DAY_ON) == {"patient_id": "P-1", "name": "Zhang^Shan=张^山"}
    assert patient_command(tmp_path, "set", "P-1", "--correct-name", at=DAY_ON) == 2
    assert "--correct-name goes with --name" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("mapped_as", "checked_in_as"),
    [("张三", "Zhang San"), ("Zhang San", "张三"), ("张^三", "张三"), ("ZHANG^SAN", "张三"), ("张三", "张三")],
)
def test_the_same_name_in_pinyin_or_characters_checks_in_unasked(
    tmp_path: Path, store: ObservationStore, mapped_as: str, checked_in_as: str
) -> None:
    """One name written two ways (the cuff's user mapped in pinyin from a keyboard without an input
    method, the check-in in characters, or the other way round) is one person: no question."""
    assert map_user(tmp_path, CUFF_ADDRESS, "2", "--patient", "P-1", "--name", mapped_as) == 0
    assert patient_command(tmp_path, "set", "P-1", "--name", checked_in_as, at=T0 + MIN) == 0
    current = store.context.current(T0 + MIN)
    assert current is not None and current.patient_id == "P-1"


def test_same_person_name_is_one_name_in_characters_or_its_pinyin_never_two_sets_of_characters() -> None:
    from lastmile.clinic.names import same_person_name

    assert same_person_name("Zhang^San=张^三", "张三") and same_person_name("zhang san", "张三")
    assert same_person_name("Ouyang^Xiu=欧阳^修", "Ouyang Xiu") and same_person_name("吕^布", "lyu bu")
    assert not same_person_name("张三", "张山")  # Zhang San, Zhang Shan: two names
    assert not same_person_name("张三", "张叁")  # read alike, written otherwise: the doctor says which
    assert not same_person_name("张三", "Zhang Shan") and not same_person_name("张三", "")


def test_a_name_corrected_by_assign_stays_the_mapped_users_name_after_the_sessions_day(
    tmp_path: Path, store: ObservationStore
) -> None:
    """P-1 was checked in as 张三 and cuff user 2 mapped to him; the doctor then assigns a held
    reading to P-1 saying his name is 李四 (`assign --name 李四 --correct-name`). User 2's
    readings went as 李四 that day and, once the session's log forgot the correction (a day),
    as 张三 again: the name the doctor said was wrong. The correction is the mapping's name now."""
    store.context.set_patient("P-1", "Zhang^San=张^三", now=T0)
    assert map_user(tmp_path, CUFF_ADDRESS, "2", "--patient", "P-1", at=T0 + MIN) == 0
    held = store.record(reading(3, 2), now=T0 + 2 * MIN).held_id  # user 3: nobody said whose
    assert held is not None
    assert (
        patient_command(tmp_path, "assign", str(held), "P-1", "--name", "李四", "--correct-name", at=T0 + 3 * MIN) == 0
    )
    assert users_reading_goes_as(store, 2, T0 + 4 * MIN) == {"patient_id": "P-1", "name": "Li^Si=李^四"}
    assert users_reading_goes_as(store, 2, DAY_ON) == {"patient_id": "P-1", "name": "Li^Si=李^四"}


def test_a_check_in_with_no_name_takes_the_name_the_clinic_knows_for_its_id(context: PatientContext) -> None:
    """A card carries an ID and no name: its check-in takes the ID's latest check-in's name as the
    doctor corrected it; an ID corrected away as a typo, or never named, none; a name cleared on
    purpose stays cleared; a cuff user's mapping names no check-in (months old, maybe a typo's)."""
    from lastmile.clinic.device_users import DeviceUsers
    from lastmile.clinic.patients import NAME_KEPT

    context.set_patient("P-1", "Zhang^San", now=T0)
    context.correct_name("P-1", "Zhang^San=张^三", now=T0 + MIN)
    context.set_patient("P-2", "Li^Si", now=T0 + 2 * MIN)
    assert context.set_patient("P-1", now=T0 + 3 * MIN).name == "Zhang^San=张^三"
    assert context.check_in("P-1", now=T0 + 4 * MIN, clear_name=True).after.name == ""
    context.set_patient("P-21", "Wang^Wu", now=T0 + 5 * MIN)
    context.check_in("P-12", "Wang^Wu", now=T0 + 6 * MIN, same_name=SameName.CORRECTED)  # P-21 was the typo
    assert context.set_patient("P-21", now=T0 + 7 * MIN).name == ""
    assert context.set_patient("P-3", now=T0 + 8 * MIN).name == ""
    DeviceUsers(context.db).map_user("C0:26:DA:01:02:03", 2, "P-2", now=T0 + 9 * MIN, name="Li^Si=李^四")
    assert context.set_patient("P-2", now=T0 + 10 * MIN).name == "Li^Si"  # the session's, first
    assert context.set_patient("P-2", now=T0 + NAME_KEPT + 20 * MIN).name == ""


def test_a_name_the_doctor_cleared_stays_cleared_when_the_card_is_scanned_again(context: PatientContext) -> None:
    """Review C (1): 张三 checked in under P-1, his cuff user mapped to it; the doctor clears the
    name (清除姓名). The card scanned again, 不急了 / 清除原因 (a check-in with no name), the ID typed
    again, or the card after another patient: the name he cleared never comes back (a mapping,
    or the check-in before the clearing, brought 张三 back, and an ECG under the true name was held)."""
    from lastmile.clinic.device_users import DeviceUsers

    DeviceUsers(context.db).map_user("C0:26:DA:01:02:03", 1, "P-1", now=T0, name="Zhang^San")
    context.set_patient("P-1", "Zhang^San", now=T0 + MIN)
    assert context.check_in("P-1", now=T0 + 2 * MIN, clear_name=True).after.name == ""
    assert context.set_patient("P-1", now=T0 + 3 * MIN).name == ""  # the card again
    assert context.check_in("P-1", now=T0 + 4 * MIN, stat=False, clear_reason=True).after.name == ""
    context.set_patient("P-2", "Li^Si", now=T0 + 5 * MIN)
    assert context.set_patient("P-1", now=T0 + 6 * MIN).name == ""  # a new session: said nobody
    assert context.known_name("P-1", T0 + 7 * MIN) == ""


def test_an_id_corrected_away_as_a_typo_is_not_named_by_a_mapping_made_during_the_typo(
    context: PatientContext,
) -> None:
    """Review C (2): 张三 checked in under P-21 (a typo), his new cuff user mapped to it, the ID
    corrected to P-12. Later 李四 scans his own card, P-21: his session is nameless, not 张三."""
    from lastmile.clinic.device_users import DeviceUsers

    context.set_patient("P-21", "Zhang^San", now=T0)
    DeviceUsers(context.db).map_user("C0:26:DA:01:02:03", 2, "P-21", now=T0 + MIN, name="Zhang^San")
    context.check_in("P-12", "Zhang^San", now=T0 + 2 * MIN, same_name=SameName.CORRECTED)
    context.clear(now=T0 + 30 * MIN)
    assert context.set_patient("P-21", now=T0 + 60 * MIN).name == ""


def test_a_name_taken_by_a_card_never_renews_itself_past_name_kept(context: PatientContext) -> None:
    """Review C (4): 李四 typed at T0, his card scanned every 23 h (daily infusions). Each nameless
    check-in re-logged the name it took, so a name typed once lived on for days. The card at
    T0+23 h takes it (typed within NAME_KEPT), as its scan again in that session; at T0+46 h it
    is nameless - and a mapping or assignment of the ID is named by nobody after NAME_KEPT."""
    context.set_patient("P-4", "Li^Si", now=T0)
    day = dt.timedelta(hours=23)
    assert context.set_patient("P-4", now=T0 + day).name == "Li^Si"
    assert context.set_patient("P-4", now=T0 + day + MIN).name == "Li^Si"  # the session going on
    assert context.set_patient("P-4", now=T0 + 2 * day).name == ""
    assert context.checked_in_name("P-4", T0 + 2 * day + MIN) == ""


def test_a_name_taken_by_a_card_corrected_renames_the_session_and_only_as_told_its_device_users(
    context: PatientContext,
) -> None:
    """Review C (3): 李四 checked in under P-13 with his cuff user mapped; later P-13 typed alone
    (meant P-12) takes 李四. "The ECG's name is right" on 张三's ECG corrects only the session
    (`rename_devices=False`): 李四's cuff stays his. A name said since is no longer taken."""
    from lastmile.clinic.device_users import DeviceUsers, mapped_name

    users = DeviceUsers(context.db)
    context.set_patient("P-13", "Li^Si=李^四", now=T0)
    users.map_user("C0:26:DA:01:02:03", 1, "P-13", now=T0 + MIN, name="Li^Si=李^四")
    context.set_patient("P-2", "Wang^Wu", now=T0 + 2 * MIN)
    assert context.set_patient("P-13", now=T0 + 3 * MIN).name == "Li^Si=李^四"
    assert context.inherited_ids({"P-13", "P-2"}, T0 + 4 * MIN) == {"P-13"}
    context.correct_name("P-13", "Zhang^San=张^三", now=T0 + 5 * MIN, rename_devices=False)
    current = context.current(T0 + 6 * MIN)
    assert current is not None and current.name == "Zhang^San=张^三"
    cuff = users.whose("C0:26:DA:01:02:03", 1)
    assert cuff is not None and cuff.patient_name == "Li^Si=李^四"
    # the correction is no name said for P-13: the name is still one nobody typed at this check-in
    assert context.inherited_ids({"P-13"}, T0 + 6 * MIN) == {"P-13"}
    context.set_patient("P-2", "Wang^Wu", now=T0 + 7 * MIN)
    assert mapped_name(cuff, context, T0 + 8 * MIN) == "Li^Si=李^四"  # his readings, under his name
    context.set_patient("P-13", "Zhao^Liu", now=T0 + 9 * MIN)
    assert context.inherited_ids({"P-13"}, T0 + 10 * MIN) == set()  # a name said since: not taken


def test_a_taken_name_corrected_for_the_session_only_never_names_the_id_after_it(
    tmp_path: Path, store: ObservationStore
) -> None:
    """Review D (1): "张三 is right: correct this check-in's name only (device users keep theirs)" logged the correction as a
    name said for P-13: for 24 h 李四's mapped cuff user's readings went to the county as 张三
    (the session's names win over the mapping's), and 李四's own card next morning took 张三."""
    ctx = store.context
    ctx.set_patient("P-13", "Li^Si=李^四", now=T0)
    assert map_user(tmp_path, CUFF_ADDRESS, "2", "--patient", "P-13", at=T0 + MIN) == 0
    ctx.set_patient("P-2", "Wang^Wu", now=T0 + 2 * MIN)
    assert ctx.set_patient("P-13", now=T0 + 3 * MIN).name == "Li^Si=李^四"
    ctx.correct_name("P-13", "Zhang^San=张^三", now=T0 + 5 * MIN, rename_devices=False)
    ctx.set_patient("P-2", "Wang^Wu", now=T0 + 6 * MIN)  # the next patient
    ctx.clear(now=T0 + 7 * MIN)
    for later in (T0 + 8 * MIN, T0 + 12 * 60 * MIN):
        goes_as = users_reading_goes_as(store, 2, later)
        assert goes_as is not None and goes_as["name"] == "Li^Si=李^四", goes_as
    assert ctx.set_patient("P-13", now=T0 + 20 * 60 * MIN).name == "Li^Si=李^四"  # his card, his name


def test_a_taken_name_cleared_stays_one_nobody_typed(context: PatientContext) -> None:
    """Review D (2): 清除姓名 on a session whose name a card took dropped the "taken" mark: Today
    then worded the cleared name as typed at this check-in, and its answer renamed the device users
    mapped to the ID (another patient's). Only a name said ends the mark; cleared, the ID is
    nameless (`cleared_ids`) until one is."""
    context.set_patient("P-13", "Li^Si=李^四", now=T0)
    context.set_patient("P-2", "Wang^Wu", now=T0 + MIN)
    assert context.set_patient("P-13", now=T0 + 2 * MIN).name == "Li^Si=李^四"
    context.check_in("P-13", now=T0 + 3 * MIN, clear_name=True)
    assert context.known_name("P-13", T0 + 4 * MIN) == ""
    assert context.inherited_ids({"P-13"}, T0 + 4 * MIN) == {"P-13"}
    assert context.cleared_ids({"P-13", "P-2"}, T0 + 4 * MIN) == {"P-13"}
    context.set_patient("P-13", "Zhang^San=张^三", now=T0 + 5 * MIN)
    assert context.inherited_ids({"P-13"}, T0 + 6 * MIN) == set()
    assert context.cleared_ids({"P-13"}, T0 + 6 * MIN) == set()
