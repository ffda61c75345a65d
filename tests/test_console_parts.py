"""The console's parts without a browser: accounts and lockout, the audit trail, the change
watcher behind the live pages, the ECG worker, `lastmile user`."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from devices.identity import Patient
from lastmile.clinic.db import iso, open_clinic_db
from lastmile.config import Config
from lastmile.console import accounts as accounts_module
from lastmile.console.accounts import AccountError, Accounts, LoginRefused
from lastmile.console.live import Broker, ChangeWatcher
from lastmile.console.sources import ConsoleInputError, EcgAssigned, patient_identifier, person_name

T0 = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def accounts(tmp_path: Path) -> Accounts:
    return Accounts(open_clinic_db(tmp_path), max_failures=3, lockout_s=600, idle_s=3600)


def test_passwords_are_argon2id_and_checked(accounts: Accounts) -> None:
    accounts.add_user("李医生", "doctor", "long enough", now=T0)
    stored = accounts.db.conn.execute("SELECT password_hash FROM console_users").fetchone()[0]
    assert stored.startswith("$argon2id$") and "long enough" not in stored
    assert accounts.authenticate("李医生", "long enough", now=T0).role == "doctor"
    with pytest.raises(LoginRefused):
        accounts.authenticate("李医生", "wrong one", now=T0)
    with pytest.raises(LoginRefused):
        accounts.authenticate("nobody", "long enough", now=T0)


@pytest.mark.parametrize(
    "name,role,password", [("", "doctor", "long enough"), ("x", "nurse", "long enough"), ("x", "doctor", "short")]
)
def test_bad_accounts_are_refused(accounts: Accounts, name: str, role: str, password: str) -> None:
    with pytest.raises(AccountError):
        accounts.add_user(name, role, password, now=T0)


def test_lockout_and_its_end(accounts: Accounts) -> None:
    accounts.add_user("a", "doctor", "long enough", now=T0)
    for i in range(3):
        with pytest.raises(LoginRefused) as refused:
            accounts.authenticate("a", "wrong", now=T0 + dt.timedelta(seconds=i))
    assert refused.value.locked_until == T0 + dt.timedelta(seconds=2 + 600)
    with pytest.raises(LoginRefused, match="locked"):
        accounts.authenticate("a", "long enough", now=T0 + dt.timedelta(seconds=5))
    assert accounts.authenticate("a", "long enough", now=T0 + dt.timedelta(seconds=700)).failed_logins == 0


def test_a_wrong_password_writes_the_same_for_a_real_name_and_an_unknown_one(accounts: Accounts) -> None:
    """A real name's failure must not cost a write (an fsync on the SD card) that an unknown
    name's does not: the time the refusal takes would tell which names exist."""
    accounts.add_user("a", "doctor", "long enough", now=T0)
    conn = accounts.db.conn
    written = []
    for name in ("a", "nobody"):
        before = conn.total_changes
        with pytest.raises(LoginRefused):
            accounts.authenticate(name, "wrong", now=T0)
        written.append(conn.total_changes - before)
    assert written[0] == written[1]


def test_failure_counts_are_bounded_whatever_names_are_tried(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names typed at random cannot fill the SD card: the counts kept are bounded."""
    monkeypatch.setattr(accounts_module, "FAILURE_COUNTS_KEPT", 5)  # 4096 argon2 checks take minutes
    for i in range(8):
        with pytest.raises(LoginRefused):
            accounts.authenticate(f"name {i}", "wrong", now=T0)
    assert accounts.db.conn.execute("SELECT COUNT(*) FROM console_login_failures").fetchone()[0] == 5


def test_unknown_names_tried_do_not_push_out_a_real_accounts_lock(
    accounts: Accounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many unknown names typed from one address must not trim a real account's count: its lock
    (and the wrong passwords counted towards one) outlive the flood; unknown names go first."""
    monkeypatch.setattr(accounts_module, "FAILURE_COUNTS_KEPT", 5)  # 4096 argon2 checks take minutes
    accounts.add_user("a", "doctor", "long enough", now=T0)
    accounts.add_user("b", "doctor", "long enough", now=T0)
    for _ in range(3):
        with pytest.raises(LoginRefused):
            accounts.authenticate("a", "wrong", now=T0)
    with pytest.raises(LoginRefused):
        accounts.authenticate("b", "wrong", now=T0)
    for i in range(8):
        with pytest.raises(LoginRefused):
            accounts.authenticate(f"name {i}", "wrong", now=T0 + dt.timedelta(seconds=1 + i))
    later = T0 + dt.timedelta(seconds=30)
    with pytest.raises(LoginRefused, match="locked"):
        accounts.authenticate("a", "long enough", now=later)
    with pytest.raises(LoginRefused) as refused:
        accounts.authenticate("b", "wrong", now=later)
    assert refused.value.attempts_left == 1
    assert accounts.db.conn.execute("SELECT COUNT(*) FROM console_login_failures").fetchone()[0] == 5


def test_an_account_locked_before_the_update_stays_locked_and_keeps_its_count(tmp_path: Path) -> None:
    """Counts written in console_users before migration 0027 move to the table every name's count
    is kept in: an update neither unlocks a locked account nor gives one more tries."""
    from lastmile.clinic.db import DB_NAME, MIGRATIONS
    from uploader.sqlite_store import open_database

    db = open_database(tmp_path / DB_NAME, tuple(m for m in MIGRATIONS if m.name < "0027_console_login_failures"))
    encoded = accounts_module.HASHER.hash("long enough")
    db.conn.executemany(
        "INSERT INTO console_users (name, role, password_hash, created_at, failed_logins, locked_until) "
        "VALUES (?, 'doctor', ?, ?, ?, ?)",
        [("a", encoded, iso(T0), 0, iso(T0 + dt.timedelta(hours=1))), ("b", encoded, iso(T0), 1, None)],
    )
    db.conn.close()
    accounts = Accounts(open_clinic_db(tmp_path), max_failures=3)
    with pytest.raises(LoginRefused, match="locked"):
        accounts.authenticate("a", "long enough", now=T0)
    with pytest.raises(LoginRefused) as refused:
        accounts.authenticate("b", "wrong", now=T0)
    assert refused.value.attempts_left == 1


def test_logins_end_when_idle_disabled_or_the_password_changes(accounts: Accounts) -> None:
    user = accounts.add_user("a", "doctor", "long enough", now=T0)
    token = accounts.start_login(user, now=T0)
    stored = accounts.db.conn.execute("SELECT token_hash FROM console_logins").fetchone()[0]
    assert token not in stored  # only its hash is kept
    login = accounts.login_for(token, now=T0 + dt.timedelta(minutes=30))
    assert login is not None and login.user.name == "a" and len(login.csrf_token) > 30
    assert accounts.login_for(token, now=T0 + dt.timedelta(hours=2)) is None  # idle for more than an hour
    token = accounts.start_login(user, now=T0)
    accounts.set_disabled("a", True)
    assert accounts.login_for(token, now=T0) is None
    accounts.set_disabled("a", False)
    token = accounts.start_login(user, now=T0)
    accounts.set_password("a", "another long one")
    assert accounts.login_for(token, now=T0) is None
    assert accounts.login_for("made-up", now=T0) is None


def test_patient_identifiers() -> None:
    config = Config()  # [patient] id_kind = "": any ID, but a resident ID must be a valid one
    assert patient_identifier(" 11010519491231002x ", config) == "11010519491231002X"
    assert patient_identifier("MRN-0042", config) == "MRN-0042"
    for bad in ("110105194912310021", "", "   ", "x" * 65):
        with pytest.raises(ConsoleInputError):
            patient_identifier(bad, config)


def test_person_names() -> None:
    assert person_name("Zhang^San") == "Zhang San"
    assert person_name("Zhang^San=张^三") == "张三"
    assert person_name("张三") == "张三" and person_name("") == ""
    assert person_name("Ouyang^Na^Na=欧阳^娜^娜") == "欧阳娜娜" and person_name("Clark Ann") == "Clark Ann"
    assert person_name("王 医生") == "王 医生"  # one component (free text): as written, never joined


def test_the_watcher_sees_commits_of_other_connections(tmp_path: Path) -> None:
    db = open_clinic_db(tmp_path)
    broker = Broker()
    watcher = ChangeWatcher([tmp_path / "clinic.db", tmp_path / "absent.db"], broker)
    assert watcher.poll() is False  # first look: a baseline
    assert watcher.poll() is False  # nothing happened
    db.conn.execute("INSERT INTO audit (at, user_name, action) VALUES ('x', 'y', 'z')")
    assert watcher.poll() is True
    assert watcher.poll() is False

    async def run() -> int:
        stop = asyncio.Event()
        wake = broker.subscribe()
        watcher.poll_s = 0.05
        task = asyncio.create_task(watcher.run(stop))
        await asyncio.sleep(0.2)
        db.conn.execute("INSERT INTO audit (at, user_name, action) VALUES ('x', 'y', 'z2')")
        await asyncio.wait_for(wake.wait(), 30)
        stop.set()
        await task
        return watcher.changes_seen

    assert asyncio.run(run()) >= 1


def test_the_ecg_worker_on_good_and_bad_bytes() -> None:
    from pydicom.data import get_testdata_file

    ecg = Path(get_testdata_file("waveform_ecg.dcm")).read_bytes()  # type: ignore[arg-type]
    for payload, ok in ((ecg, True), (b"not an ECG at all" * 10, False)):
        proc = subprocess.run(
            [sys.executable, "-m", "lastmile.console.ecg_worker"], input=payload, capture_output=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        if ok:
            assert result["quality"]["verdict"] in ("acceptable", "warn", "re-record")
            assert result["svg"].startswith("<?xml") and "data-lead=" in result["svg"]
        else:
            assert "error" in result and "svg" not in result


def test_user_add_reads_the_password_from_stdin(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "lastmile", "user"]
    proc = subprocess.run(
        [*command, "add", "赵医生", "--role", "admin", "--data-dir", str(tmp_path)],
        input="from stdin 123\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    accounts = Accounts(open_clinic_db(tmp_path))
    assert accounts.authenticate("赵医生", "from stdin 123", now=T0).is_admin
    proc = subprocess.run(
        [*command, "add", "x", "--data-dir", str(tmp_path)],
        input="short\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "at least 8" in proc.stderr
    listing = subprocess.run(
        [*command, "list", "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120
    ).stdout
    assert "赵医生" in listing and "admin" in listing


def test_the_visits_page_reads_the_visit_book(tmp_path: Path) -> None:
    """A replayed field day (GPS track, one visit far from its household) as the Visits page sees it."""
    from lastmile.config import Config
    from lastmile.console.sources import ClinicData
    from lastmile.demo.field_day import run_field_day

    day = run_field_day(tmp_path, visits=3)
    config = Config()
    config.set_data_dir(tmp_path / "field-gateway")
    config.outbox.min_free_mb = 1
    data = ClinicData(config)
    try:
        visits = data.visits()
    finally:
        data.close()
    assert len(visits) == day["visits"] == 3
    assert sum(bool(v.flags) for v in visits) == day["visits_flagged"] >= 1
    assert any("outside-radius" in v.flags for v in visits)
    assert all(v.started_at is not None and v.state == "closed" for v in visits)


class FakeHeldEcgs:
    """Stands in for the outbox holds behind HeldEcgSource (the real one: test_console_stores)."""

    def __init__(self) -> None:
        self.items: dict[int, str] = {}  # item id -> hold reason
        self.assigned: list[tuple[int, str, str]] = []
        self.released: list[int] = []

    def held_ecgs(self, now: dt.datetime) -> list:
        from lastmile.console.sources import HeldEcg

        return [
            HeldEcg(i, now, reason, now + dt.timedelta(minutes=15), device="Contec ECG90A")
            for i, reason in self.items.items()
        ]

    def assign(self, item_id: int, patient: Patient, *, now: dt.datetime, by: str = "") -> EcgAssigned | None:
        self.assigned.append((item_id, patient.patient_id, patient.name))
        return EcgAssigned(patient) if self.items.pop(item_id, None) is not None else None

    def send_anyway(self, item_id: int, *, now: dt.datetime, by: str = "") -> bool:
        self.released.append(item_id)
        return self.items.pop(item_id, None) is not None

    def discard(self, item_id: int, *, now: dt.datetime, by: str = "") -> bool:
        return self.items.pop(item_id, None) is not None


def test_the_ecg_panel_dates_the_ecg_by_its_recording_not_by_its_files_date(tmp_path: Path) -> None:
    """The Today panel's time of an ECG is when the cart recorded it, not the date of the file
    the gateway keeps it in (a file restored from a backup or copied later has another mtime)."""
    import os
    import re
    from dataclasses import replace

    from lastmile.data_dir import open_outbox
    from lastmile.demo.runner import source_ecg
    from lastmile.ecg.intake import enqueue_recording
    from tests.console_harness import DOCTOR, VALID_ID, Client, console_config, running_console

    config = console_config(tmp_path / "data")
    recorded = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=40)).replace(microsecond=0)
    file_date = (recorded - dt.timedelta(days=3)).timestamp()
    with running_console(config) as server:
        rec = replace(source_ecg(), patient=Patient(VALID_ID, "Zhang^San"), acquired_at=recorded)
        with open_outbox(config) as outbox:
            enqueue_recording(outbox, rec, config, key="ecg-with-an-old-file")
            item = outbox.find("ecg-with-an-old-file")
            assert item is not None
            payload = outbox.payload_path(item)
            assert payload is not None  # a DICOM ECG is kept in a file
            os.utime(payload, (file_date, file_date))
        client = Client(server.url)
        client.login(DOCTOR)
        page = client.get("/today").body
    shown = {dt.datetime.fromisoformat(t) for t in re.findall(r'<time datetime="([^"]+)"', page)}
    assert recorded in shown and dt.datetime.fromtimestamp(file_date, dt.timezone.utc) not in shown


def test_held_ecgs_through_the_seam(tmp_path: Path) -> None:
    """The Today page lists held ECGs, assigns them and sends a re-record one anyway through
    HeldEcgSource; each decision lands in the audit trail with who made it."""
    import time as time_

    from lastmile.console.audit import AuditLog
    from lastmile.data_dir import open_outbox
    from tests.console_harness import DOCTOR, VALID_ID, Client, console_config, enqueue_ecg, running_console

    held = FakeHeldEcgs()
    config = console_config(tmp_path / "data")
    with running_console(config, held_ecgs=held) as server:
        enqueue_ecg(config, lead_off=True)
        with open_outbox(config) as outbox:
            latest = outbox.items(kind="dicom")[-1].id
        held.items = {latest: "re-record", 99: "unassigned"}
        client = Client(server.url)
        client.login(DOCTOR)
        deadline = time_.monotonic() + 120
        page = client.get("/today").body
        while "仍然发送" not in page and time_.monotonic() < deadline:
            time_.sleep(0.5)  # the quality verdict comes from the worker process
            page = client.get("/today").body
        assert "仍然发送" in page and 'name="item_id" value="99"' in page
        # the name comes from the checked-in patient's session, not from the form
        assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
        reply = client.post("/today/assign-ecg", {"item_id": "99", "patient_id": VALID_ID.lower()})
        assert reply.status == 303 and held.assigned == [(99, VALID_ID, "Zhang^San=张^三")]
        client.get("/today")
        reply = client.post(f"/today/ecg/{latest}/send-anyway")
        assert reply.status == 303 and held.released == [latest]
        page = client.get(reply.location).body
        assert "心电图将按原样发送" in page and "仍然发送" not in page
        reply = client.post("/today/assign-ecg", {"item_id": "99", "patient_id": VALID_ID})
        assert "too-late" in reply.location  # already assigned: said so, nothing changed
    db = open_clinic_db(config.data_dir)
    try:
        actions = {(e.action, e.user_name) for e in AuditLog(db).recent(10)}
    finally:
        db.conn.close()
    assert {("assign-ecg", DOCTOR[0]), ("send-anyway", DOCTOR[0])} <= actions
