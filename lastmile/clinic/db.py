"""The clinic's small state database (`clinic.db` in the data directory).

It holds what the clinic session knows beside the outbox: the current patient and doctor
(`patient_context`), the devices and their status (`device_registry`), and observations held
unassigned until the doctor says whose they are (`observation_store`), the studies the forwarder
sent and the reports that came back for them (`lastmile.reports.store`). WAL and a busy timeout,
because the acquire service and the `lastmile` commands use it at the same time; FULL sync,
because a held observation exists nowhere else.
"""

from __future__ import annotations

import datetime as dt
import json
import os

import sqlite_utils

from lastmile.data_dir import ensure_data_dir
from uploader.sqlite_store import Migration, open_database, transaction

__all__ = ["DB_NAME", "from_iso", "iso", "open_clinic_db", "transaction", "utc_now"]

DB_NAME = "clinic.db"


def _session(db: sqlite_utils.Database) -> None:
    # One row (id 1): the clinic session now. Times are ISO 8601 UTC.
    db.table("session").create(
        {
            "id": int,
            "patient_id": str,
            "patient_name": str,
            "patient_since": str,
            "doctor_id": str,
            "doctor_since": str,
            "last_activity": str,
        },
        pk="id",
    )
    db.table("session_log").create(
        {"id": int, "at": str, "event": str, "patient_id": str, "doctor_id": str, "detail": str},
        pk="id",
        not_null=["at", "event"],
    )


def _devices(db: sqlite_utils.Database) -> None:
    db.table("devices").create(
        {
            "address": str,  # BLE address (upper case) or serial port identity
            "transport": str,  # "ble", "serial" ...
            "name": str,
            "allowed": int,  # 1: paired for this clinic (BLE allow-list)
            "pair_required": int,  # 1: bond (encrypt) before using it
            "added_at": str,
            "manufacturer": str,
            "model": str,
            "serial": str,
            "software_version": str,
            "connected": int,
            "last_seen_at": str,
            "last_connected_at": str,
            "last_reading_at": str,
            "last_reading": str,  # short summary "120/80 mm[Hg]"
            "last_error": str,
            "last_error_at": str,
            "last_sequence": int,  # highest record sequence number stored (glucose RACP)
            "updated_at": str,
        },
        pk="address",
        not_null=["transport", "updated_at"],
        defaults={"allowed": 0, "pair_required": 0, "connected": 0},
    )


def _held_observations(db: sqlite_utils.Database) -> None:
    db.table("held_observations").create(
        {"id": int, "key": str, "kind": str, "measured_at": str, "device": str, "observation": str, "held_at": str},
        pk="id",
        not_null=["key", "kind", "observation", "held_at"],
    )
    db.table("held_observations").create_index(["key"], index_name="held_key", unique=True)


def _console(db: sqlite_utils.Database) -> None:
    # The doctor's console (lastmile.console): one account per person, their logins, and the
    # audit trail of every change a user makes (who, when, what).
    db.table("console_users").create(
        {
            "name": str,
            "role": str,  # "doctor" or "admin"
            "password_hash": str,  # argon2id, encoded with its parameters
            "language": str,  # "zh-CN", "en" or "" (the browser's)
            "created_at": str,
            "failed_logins": int,  # wrong passwords in a row
            "locked_until": str,  # ISO UTC; locked while in the future
            "last_login_at": str,
            "disabled": int,
        },
        pk="name",
        not_null=["role", "password_hash", "created_at"],
        defaults={"failed_logins": 0, "disabled": 0, "language": ""},
    )
    db.table("console_logins").create(
        {
            "token_hash": str,  # sha256 of the cookie's token: the token itself is never stored
            "user_name": str,
            "csrf_token": str,
            "created_at": str,
            "last_seen_at": str,
        },
        pk="token_hash",
        not_null=["user_name", "csrf_token", "created_at", "last_seen_at"],
        foreign_keys=[("user_name", "console_users", "name")],
    )
    db.table("audit").create(
        {"id": int, "at": str, "user_name": str, "action": str, "target": str, "detail": str},
        pk="id",
        not_null=["at", "user_name", "action"],
    )
    db.table("audit").create_index(["action", "target"], index_name="audit_action_target")


def _reports(db: sqlite_utils.Database) -> None:
    # What the forwarder sent, kept past the outbox's purge so returning reports can be linked
    # to it (lastmile/reports/): one row per study, times ISO 8601 UTC.
    # WITHOUT ROWID, no secondary index: recording a study touches one B-tree page (one write
    # per batch of sent ECGs on the SD card); a few hundred rows are scanned in no time.
    db.conn.execute(
        """CREATE TABLE sent_studies (
            study_uid TEXT PRIMARY KEY,
            outbox_item_id INTEGER,
            sop_instance_uid TEXT,  -- the ECG object sent
            accession TEXT,
            patient_id TEXT,
            patient_name TEXT,
            ecg_time TEXT,  -- the ECG's acquisition time (with its offset), else when it was queued
            description TEXT,
            stat INTEGER NOT NULL DEFAULT 0,
            sent_at TEXT NOT NULL,
            committed_at TEXT,
            final_at TEXT,  -- when a final report arrived
            last_polled_at TEXT,
            polls INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID"""
    )
    # Reports as received (`data`: the Part-10 object or the FHIR JSON), read into text.
    db.table("reports").create(
        {
            "id": int,
            "study_uid": str,
            "source": str,  # "dicom" or "fhir"
            "kind": str,  # "sr", "pdf", "fhir"
            "object_uid": str,  # SOP Instance UID or DiagnosticReport/<id>
            "version": str,  # FHIR versionId ("" for DICOM)
            "sop_class_uid": str,
            "status": str,  # preliminary, final, amended
            "superseded_by": int,  # the report that replaced this one
            "title": str,
            "text": str,
            "observer": str,  # the reading doctor
            "report_time": str,
            "patient_id": str,  # as the report names the patient
            "patient_name": str,
            "critical": str,  # JSON list of reasons; NULL: not critical
            "problems": str,  # JSON list of what could not be read; NULL: none
            "document_type": str,
            "alerted_at": str,
            "acknowledged_at": str,
            "acknowledged_by": str,
            "received_at": str,
            "data": bytes,
        },
        pk="id",
        not_null=["study_uid", "source", "kind", "object_uid", "version", "status", "received_at", "data"],
        defaults={"version": ""},
        foreign_keys=[("study_uid", "sent_studies", "study_uid")],
    )
    db.table("reports").create_index(["object_uid", "version"], index_name="reports_object", unique=True)
    db.table("reports").create_index(["study_uid"], index_name="reports_study")
    db.table("report_status").create({"name": str, "value": str, "updated_at": str}, pk="name", not_null=["value"])


# The words each kind of device error began with until 0026 (then devices.device_errors's, as
# written here: the migration stays what it was when those constants change).
_ERROR_WORDS_BEFORE_0026 = (
    ("device gone", "unplugged"),
    ("malformed ", "unreadable"),
    ("report rejected:", "unreadable"),
    ("code not recognised:", "code-not-recognised"),
    ("cannot store ", "not-saved"),
    ("ECG refused:", "ecg-refused"),
    ("not started: ", "settings"),
    ("forwarded device lines not read:", "forward-not-read"),
)
_ERROR_KINDS_BEFORE = (
    "UPDATE devices SET last_error_kind = CASE"
    " WHEN instr(last_error, ' readings not stored: device reports ') > 0 THEN 'not-a-result'"
    + "".join(f" WHEN substr(last_error, 1, {len(w)}) = '{w}' THEN '{kind}'" for w, kind in _ERROR_WORDS_BEFORE_0026)
    + " ELSE 'other' END WHERE COALESCE(last_error, '') != '';"
)


def _session_linked_ids(db: sqlite_utils.Database) -> None:
    db.conn.execute("ALTER TABLE session ADD COLUMN linked_ids TEXT")
    row = db.conn.execute("SELECT patient_id FROM session WHERE id = 1 AND patient_id IS NOT NULL").fetchone()
    if row is not None:
        linked = _linked_in_log_before_0032(db, row[0])
        db.conn.execute(
            "UPDATE session SET linked_ids = ? WHERE id = 1", (json.dumps(sorted(linked)) if linked else None,)
        )


def _linked_in_log_before_0032(db: sqlite_utils.Database, patient_id: str) -> set[str]:
    """The links of `patient_id`'s session as the log held them until 0032 (its events written
    here: the migration stays what it was when lastmile.clinic.patients' constants change): the
    log newest first back to the check-in that began his session."""
    linked = {patient_id}
    rows = db.conn.execute("SELECT event, patient_id FROM session_log WHERE event != 'doctor-set' ORDER BY id DESC")
    for event, logged_id in rows.fetchall():
        if event == "patient-name-corrected":
            continue  # a name corrected (`lastmile patient map-user --correct-name`): no check-in
        if event == "patient-other-id":
            linked.add(logged_id)
        elif event != "patient-set" or logged_id not in linked:
            break
    return linked - {patient_id}


def _session_ended_by_card(db: sqlite_utils.Database) -> None:
    db.conn.execute("ALTER TABLE session ADD COLUMN ended_by_card TEXT")
    row = db.conn.execute("SELECT patient_since FROM session WHERE id = 1 AND patient_id IS NOT NULL").fetchone()
    if row is None:
        return
    # the check-in a card ended when it began the open session, as Today read it from the log until
    # 0040 (its event written here: the migration stays what it was); one seek on the log's `at` index
    logged = db.conn.execute(
        "SELECT at, patient_id, detail FROM session_log WHERE event = 'patient-ended-by-card' AND at >= ? "
        "ORDER BY id DESC LIMIT 1",
        (row[0],),
    ).fetchone()
    if logged is None:
        return
    try:
        ended = json.loads(logged[2] or "{}")
    except ValueError:  # a log line Today could not read either: no notice, as before
        return
    if not isinstance(ended, dict):
        return
    ended.update(at=logged[0], patient_id=logged[1] or "")
    db.conn.execute("UPDATE session SET ended_by_card = ? WHERE id = 1", (json.dumps(ended, ensure_ascii=False),))


MIGRATIONS = (
    Migration("0001_session", _session),
    Migration("0002_devices", _devices),
    Migration("0003_held_observations", _held_observations),
    # triage of the current patient's examination: urgent (STAT) and why (`patient set --stat --reason`)
    Migration.sql(
        "0004_session_triage",
        "ALTER TABLE session ADD COLUMN stat INTEGER NOT NULL DEFAULT 0;\nALTER TABLE session ADD COLUMN reason TEXT;",
    ),
    Migration("0005_console", _console),
    Migration("0006_reports", _reports),
    # the quality gate's verdict on the ECG sent ("acceptable", "re-record", ...): its report,
    # days later, still says what quality the county was sent (the outbox item may be purged)
    Migration.sql("0007_sent_study_quality", "ALTER TABLE sent_studies ADD COLUMN quality_verdict TEXT;"),
    # the cardiologist's impressions and findings as read (JSON lists): the console shows the
    # conclusion first, under its own heading, before the whole report's text
    Migration.sql(
        "0008_report_conclusions",
        "ALTER TABLE reports ADD COLUMN impressions TEXT;\nALTER TABLE reports ADD COLUMN findings TEXT;",
    ),
    # the whole report as lines in no language (JSON, uploader.report_lines): the county's words
    # as written, the gateway's own worded in the reader's language where it is shown. NULL: a
    # report stored before, shown as its English `text`
    Migration.sql("0009_report_lines", "ALTER TABLE reports ADD COLUMN lines TEXT;"),
    # the object uids a report names as the ones it replaces (JSON list): a correction that
    # arrives before the report it corrects still replaces it when that one comes
    Migration.sql("0010_report_amends", "ALTER TABLE reports ADD COLUMN amends TEXT;"),
    # report objects the reading center listed for a study that did not arrive (JSON list): the
    # study is not done until they have, whatever else came (lastmile.reports.poller)
    Migration.sql("0011_awaited_report_objects", "ALTER TABLE sent_studies ADD COLUMN awaiting TEXT;"),
    # the device that recorded the ECG sent (its label): a report on an ECG sent without a patient
    # shows which recording it reads, by its time and device (NULL: recorded before)
    Migration.sql("0012_sent_study_device", "ALTER TABLE sent_studies ADD COLUMN device TEXT;"),
    # whose readings a multi-user device's user N are (BP cuff / scale "User ID"): one patient, or
    # (patient_id NULL) whoever is checked in; without a row such a reading is held for the doctor
    Migration.sql(
        "0013_device_users",
        "CREATE TABLE device_users (address TEXT NOT NULL, user_id INTEGER NOT NULL, patient_id TEXT, "
        "patient_name TEXT NOT NULL DEFAULT '', set_at TEXT NOT NULL, PRIMARY KEY (address, user_id));",
    ),
    # a report's DICOM person names are stored as sent ("陈^静") from now on; the rows stored before
    # (names spaced, "陈 静") read 1 here without being rewritten (a constant default costs no write:
    # rewriting them rewrote every stored PDF), and are read as before (reports.store._report)
    Migration.sql(
        "0014_report_names_spaced", "ALTER TABLE reports ADD COLUMN names_spaced INTEGER NOT NULL DEFAULT 1;"
    ),
    # where the readings a device's last error says wait for space are ('disk', 'memory'; NULL or
    # '': none): the doctor FAILs on 'memory' whatever words the error is written in
    Migration.sql("0015_device_held_readings", "ALTER TABLE devices ADD COLUMN held_readings TEXT;"),
    # how many readings and streamed ECGs wait for space (with held_readings): the doctor and the
    # System page name what is at risk (an ECG is not "readings") without reading the error's words
    Migration.sql(
        "0016_device_held_counts",
        "ALTER TABLE devices ADD COLUMN held_reading_count INTEGER NOT NULL DEFAULT 0;\n"
        "ALTER TABLE devices ADD COLUMN held_ecg_count INTEGER NOT NULL DEFAULT 0;",
    ),
    # what a stop (a power cut) lost of what the row said was held in memory only, after when
    # (the row's last word on it) and found when (the restart): the doctor FAILs on it for a while
    Migration.sql(
        "0017_device_lost_counts",
        "ALTER TABLE devices ADD COLUMN lost_reading_count INTEGER NOT NULL DEFAULT 0;\n"
        "ALTER TABLE devices ADD COLUMN lost_ecg_count INTEGER NOT NULL DEFAULT 0;\n"
        "ALTER TABLE devices ADD COLUMN lost_after TEXT;\n"
        "ALTER TABLE devices ADD COLUMN lost_at TEXT;",
    ),
    # how many of what waits for space (held_*_count) is held in memory only, when the spill file
    # keeps the rest: the doctor names only those at risk, not the ones kept on disk as well
    Migration.sql(
        "0018_device_memory_counts",
        "ALTER TABLE devices ADD COLUMN memory_reading_count INTEGER NOT NULL DEFAULT 0;\n"
        "ALTER TABLE devices ADD COLUMN memory_ecg_count INTEGER NOT NULL DEFAULT 0;",
    ),
    # the Bluetooth SIG services (16-bit UUIDs, hex, comma-separated) a device advertised or
    # offered when the BLE link saw or connected it: a cuff named by its model number ("UA-651BLE")
    # is known by its Blood Pressure service (1810) before its first reading. NULL: none seen yet
    Migration.sql("0019_device_services", "ALTER TABLE devices ADD COLUMN services TEXT;"),
    # what waits for space is the row's held status alone (held_readings and its counts), never its
    # error: a later error (unplugged ...) is no longer cleared when they are stored. When the held
    # status was last written (the row's last word on them: what a stop lost was held after it);
    # the waiting words an older version wrote as the error are cleared, else said twice
    Migration.sql(
        "0020_device_held_at",
        "ALTER TABLE devices ADD COLUMN held_at TEXT;\n"
        "UPDATE devices SET held_at = last_error_at, last_error = '' "
        "WHERE COALESCE(held_readings, '') != '' AND last_error LIKE '% waiting for space on the data partition (%';",
    ),
    # whether a device sent a reading naming its user (Bluetooth "User ID"): a multi-user device,
    # whatever it measures, whose users the doctor must be able to map (lastmile.clinic.device_users)
    Migration.sql("0021_device_sends_users", "ALTER TABLE devices ADD COLUMN sends_users INTEGER NOT NULL DEFAULT 0;"),
    # the name a BLE device advertises, for the technician: `name` is the one given at pairing
    # ("血压计 1号诊室"), which the doctor tells the clinic's cuffs apart by; an unnamed pairing is
    # shown by this one. NULL: not seen since (a row seen before holds the advertised name as its name)
    Migration.sql("0022_device_advertised_name", "ALTER TABLE devices ADD COLUMN advertised_name TEXT;"),
    # the session log by time: every change of the session prunes it to what is read (names of the
    # last day, lastmile.clinic.patients.NAME_KEPT) without reading the whole table on the SD card
    Migration.sql("0023_session_log_at", "CREATE INDEX session_log_at ON session_log (at);"),
    # the charge a BLE device last reported (Battery Level, percent, read at connect) and when: the
    # Devices page said "Battery: not reported" of every BLE device, as nothing read it. NULL: never
    Migration.sql(
        "0024_device_battery",
        "ALTER TABLE devices ADD COLUMN battery_level INTEGER;\nALTER TABLE devices ADD COLUMN battery_at TEXT;",
    ),
    # the readings relayed to the county platform, kept past the outbox's purge of their items (as
    # sent_studies keeps the ECGs): the Sent page still answers "did the BP go?" (lastmile.reports.
    # sent_readings). One small row per reading, keyed by its outbox item (the page's order), no
    # secondary index: recording a round's readings touches one B-tree page. Relayed is not sent:
    # sent_at is when the platform took the bundle that carries it (bundle_key, or its home visit's
    # visit_id), NULL until then; relayed_at (the relay's time) is what retention counts from
    Migration.sql(
        "0025_sent_readings",
        "CREATE TABLE sent_readings (outbox_item_id INTEGER PRIMARY KEY, record_key TEXT NOT NULL, "
        "patient_id TEXT NOT NULL, patient_name TEXT NOT NULL DEFAULT '', kind TEXT NOT NULL, "
        "summary TEXT NOT NULL, device TEXT NOT NULL DEFAULT '', measured_at TEXT NOT NULL, "
        "time_source TEXT NOT NULL, relayed_at TEXT NOT NULL, sent_at TEXT, "
        "bundle_key TEXT NOT NULL DEFAULT '', visit_id TEXT, destination TEXT NOT NULL DEFAULT '');",
    ),
    # the kind of a device row's error (devices.device_errors.DeviceProblem), written with it: what
    # the doctor is told no longer hangs on the error's opening words (reworded, translated). The
    # rows written before get theirs once, from the words they were written with then
    Migration.sql(
        "0026_device_error_kind", "ALTER TABLE devices ADD COLUMN last_error_kind TEXT;\n" + _ERROR_KINDS_BEFORE
    ),
    # wrong passwords in a row by the name typed, whether an account has it or not (bounded,
    # lastmile.console.accounts): a real name and an unknown one are counted, kept and written
    # alike, so neither a restart nor a write's time tells which names exist. console_users'
    # failed_logins and locked_until are no longer read (their counts move here)
    Migration.sql(
        "0027_console_login_failures",
        "CREATE TABLE console_login_failures (name TEXT PRIMARY KEY, failures INTEGER NOT NULL, "
        "locked_until TEXT, failed_at TEXT NOT NULL);\n"
        "INSERT INTO console_login_failures (name, failures, locked_until, failed_at) "
        "SELECT name, COALESCE(failed_logins, 0), locked_until, created_at FROM console_users "
        "WHERE failed_logins > 0 OR locked_until IS NOT NULL;",
    ),
    # why what a stop lost from memory waited, when not space (locked, damaged: the row's "cannot
    # store" error then): the doctor's FAIL on the loss says it, not "waiting for space". NULL: space
    Migration.sql("0028_device_lost_cause", "ALTER TABLE devices ADD COLUMN lost_cause TEXT;"),
    # the outbox item's key with its id: outbox.sqlite made anew numbers its items from 1 again, and
    # an earlier outbox's record of item 1 put another patient (and his report) on the new item 1.
    # A row written before has none: it matches no item (lastmile.reports.store.is_record_of)
    Migration.sql("0029_sent_study_item_key", "ALTER TABLE sent_studies ADD COLUMN item_key TEXT;"),
    # the rows written before 0029 (no item key), found without reading the table: the forward
    # service's start gives each the key of its own item when that is certain (SentStudyRecorder.
    # give_keys_to_old_records). Partial: rows written since are never in it (an insert costs nothing)
    Migration.sql(
        "0030_sent_studies_keyless",
        "CREATE INDEX sent_studies_keyless ON sent_studies (outbox_item_id) WHERE item_key IS NULL;",
    ),
    # why what waits (held_readings) was not stored at its last try, when not space (locked,
    # damaged: the "cannot store" error then), written with the held status: a later error
    # (unplugged ...) no longer turns it into "waiting for space". NULL or '': space. The rows held
    # before get theirs from their error, if it is still that one
    Migration.sql(
        "0031_device_held_cause",
        "ALTER TABLE devices ADD COLUMN held_cause TEXT;\n"
        "UPDATE devices SET held_cause = last_error "
        "WHERE COALESCE(held_readings, '') != '' AND last_error_kind = 'not-saved';",
    ),
    # the IDs the doctor said are the checked-in patient's other IDs ("同一人的另一个号码"), JSON list,
    # on his session row (lastmile.clinic.patients): they were read back from the session log,
    # which is pruned past a day - a session kept longer lost them (his ECG under his first ID
    # held as another patient's, not STAT). A session open at the upgrade gets its links once
    Migration("0032_session_linked_ids", _session_linked_ids),
    # why a report stored before 0009 (no lines: shown as its English text) keeps that text: its
    # object could not be read again into lines (lastmile.reports.old_lines, run by the forward
    # service after its start, never in a migration). NULL: not tried yet. The partial index
    # finds the rows still to read without reading the table (each row holds its object)
    Migration.sql(
        "0033_report_lines_not_read",
        "ALTER TABLE reports ADD COLUMN lines_not_read TEXT;\n"
        "CREATE INDEX reports_without_lines ON reports (id) WHERE lines IS NULL AND lines_not_read IS NULL;",
    ),
    # of what a stop lost, what was kept on disk and the spill file did not give back (missing,
    # damaged), and which file and why: said as that, not as "held in memory only"
    Migration.sql(
        "0034_device_lost_on_disk",
        "ALTER TABLE devices ADD COLUMN lost_disk_reading_count INTEGER NOT NULL DEFAULT 0;\n"
        "ALTER TABLE devices ADD COLUMN lost_disk_ecg_count INTEGER NOT NULL DEFAULT 0;\n"
        "ALTER TABLE devices ADD COLUMN lost_damage TEXT;",
    ),
    # the spill files' generations when a row's held status was written: a newer whole copy at the
    # restart was saved after it, holding all that waited then - its memory-only count is stale
    # (NULL: a row written before, or no spill file: its count is taken as it is)
    Migration.sql(
        "0035_device_held_spill_generation",
        "ALTER TABLE devices ADD COLUMN held_spill_generation INTEGER;\n"
        "ALTER TABLE devices ADD COLUMN held_ecg_spill_generation INTEGER;",
    ),
    # the id of the last stop's word on a row (serial-rows-behind.jsonl) whose loss the row counted:
    # a start that reads that word again skips it by id, not by clock (a Pi without RTC boots behind)
    Migration.sql("0036_device_lost_word_id", "ALTER TABLE devices ADD COLUMN lost_word_id TEXT;"),
    # a card (badge) a scanner read as the gateway stopped, whose check-in the stop gave up and the
    # restart did not find done (lastmile.services.serial_spill.CardGivenUp): which, when, and the
    # restart that found it (said from then for LOST_SAID_FOR); the id of the stop's record, so a
    # start that reads it again does not say it anew
    Migration.sql(
        "0037_device_card_not_checked_in",
        "ALTER TABLE devices ADD COLUMN card_kind TEXT;\n"
        "ALTER TABLE devices ADD COLUMN card_id TEXT;\n"
        "ALTER TABLE devices ADD COLUMN card_scanned_at TEXT;\n"
        "ALTER TABLE devices ADD COLUMN card_time_source TEXT;\n"
        "ALTER TABLE devices ADD COLUMN card_found_at TEXT;\n"
        "ALTER TABLE devices ADD COLUMN card_word_id TEXT;",
    ),
    # Today finds the sent studies of its ECGs by item (ReportStore.studies_of_items) on every
    # live-panel push: without it a scan of every study ever sent (~10 ms at 30,000 rows on x86,
    # several times that on a Pi, under clinic.db's lock). One more page written per sent study.
    # IF NOT EXISTS: a database a lead renumbered this migration on is not refused
    Migration.sql(
        "0038_sent_studies_item_index",
        "CREATE INDEX IF NOT EXISTS sent_studies_item ON sent_studies (outbox_item_id);",
    ),
    # when the gateway stored its last reading (last_reading_at is the device's clock, and a cuff's
    # memory is hours old): what a later error is judged by (last_seen_at is set on connecting too)
    Migration.sql("0039_device_reading_received_at", "ALTER TABLE devices ADD COLUMN reading_received_at TEXT;"),
    # the check-in a scanned card ended when it began the session's patient (JSON: whom, his name,
    # STAT, reason, when; NULL: none), on the session's row: Today said it from the session log,
    # a query on every render and live push. A session open at the upgrade gets it from its log once
    Migration("0040_session_ended_by_card", _session_ended_by_card),
    # ECG files on a USB stick the import refused (damaged, unreadable), said on Today until the
    # doctor has seen them or the same name came in fine (lastmile.clinic.stick_files): one row a
    # file on the stick, however often the watcher looks at it again. A new, empty table: quick
    Migration.sql(
        "0041_stick_files_refused",
        "CREATE TABLE stick_files_refused (id INTEGER PRIMARY KEY, path TEXT NOT NULL, name TEXT NOT NULL, "
        "trouble TEXT NOT NULL, reason TEXT, key TEXT NOT NULL, refused_at TEXT NOT NULL, seen_at TEXT, seen_by TEXT);\n"
        "CREATE UNIQUE INDEX stick_files_refused_path ON stick_files_refused (path);\n"
        "CREATE INDEX stick_files_refused_name ON stick_files_refused (name);",
    ),
    # the critical-result banner (every page, every live push) finds the unacknowledged critical
    # reports without reading the table (each row holds its object): the same condition as
    # lastmile.reports.unread_critical's. IF NOT EXISTS: a database a lead renumbered it on is not refused
    Migration.sql(
        "0042_reports_unacknowledged_critical_index",
        "CREATE INDEX IF NOT EXISTS reports_unacknowledged_critical ON reports (id) "
        "WHERE critical IS NOT NULL AND acknowledged_at IS NULL AND superseded_by IS NULL;",
    ),
)


def open_clinic_db(data_dir: str | os.PathLike[str]) -> sqlite_utils.Database:
    """Open (creating or migrating) clinic.db in `data_dir`; autocommit, explicit transactions."""
    path = ensure_data_dir(data_dir)
    # same connection discipline as the outbox (WAL, busy_timeout, 0600, transactional migrations)
    return open_database(path / DB_NAME, MIGRATIONS)


def iso(value: dt.datetime) -> str:
    if value.tzinfo is None:
        raise ValueError(f"naive time {value.isoformat()} (clinic.db keeps UTC)")
    return value.astimezone(dt.timezone.utc).isoformat()


def iso_or_none(value: dt.datetime | None) -> str | None:
    return None if value is None else iso(value)


def from_iso(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
