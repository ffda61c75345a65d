"""Who is being examined now: the clinic session's current patient (and doctor).

Set by `lastmile patient set`, a scanned patient card or a visit; every reading that lands on
the patient counts as activity. After `idle_timeout_s` without activity the session ends on
its own, so the next patient's reading can never land on the previous patient: it is held
unassigned instead, for the doctor to assign. Persisted in clinic.db so the acquire service and
the commands (separate processes) see the same session, and a restart does not lose it - nor
revive an expired one.

Every method takes `now` (an aware datetime): the caller's clock, testable.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import logging
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, replace

import sqlite_utils

from devices.identity import Patient
from lastmile.clinic.db import from_iso, iso, open_clinic_db, transaction
from lastmile.clinic.devices import CARD_DOCTOR, CARD_PATIENT, end_card_notices
from lastmile.clinic.names import has_ideographs, no_name, same_person_name

log = logging.getLogger(__name__)

_ROW = 1
# how long a check-in's name names its ID for a mapping or an assignment made after the session moved on
NAME_KEPT = dt.timedelta(hours=24)
# the session log's event of a patient ID corrected while checked in (`_replaced_event`)
CORRECTED = "patient-id-corrected"
# the session log's event of the checked-in patient checked in again under his other ID, same name
OTHER_ID = "patient-other-id"
# the session log's event of the name an ID was checked in under corrected (`correct_name`)
NAME_CORRECTED = "patient-name-corrected"
# the session log's event of a check-in with no name taking the name said for its ID (`check_in`):
# never a name said (it renews nothing), only what tells Today the check-in did not say it
NAME_INHERITED = "patient-name-inherited"
# the session log's event of a taken name corrected for the session only (`correct_name_in` with
# `rename_devices` False): no name said for the ID (`_said_names` skips it), so it names him and
# his device users no longer than the session does
NAME_CORRECTED_SESSION_ONLY = "patient-name-corrected-session-only"
# the session log's event of a patient's check-in ended by a scanned card of another patient
# (`check_in` with `by_card`), for the history; detail: the ended check-in as JSON. Today says it
# from the session's row (`CurrentPatient.ended_by_card`), kept there for as long as his session
ENDED_BY_CARD = "patient-ended-by-card"


class SameName(enum.Enum):
    """The doctor's answer when another ID is checked in under the checked-in patient's own name
    (`same_name_replaced`): only he knows which it is. The values are the console form's and the
    command's words for them."""

    CORRECTED = "corrected"  # a mistyped ID corrected: the old ID loses the name
    OTHER_ID = "other-id"  # the same patient's other ID (ID card and clinic number): both keep it
    ANOTHER_PERSON = "another-person"  # another patient who has the same name (common names are common)


@dataclass(frozen=True)
class StatSession:
    """The clinic session's patient, checked in as STAT by the doctor, and since when; `linked`:
    the IDs the doctor said are his other IDs in this session (`OTHER_ID`)."""

    patient_id: str
    since: dt.datetime
    linked: frozenset[str] = frozenset()

    @property
    def patient_ids(self) -> frozenset[str]:
        """All his IDs: `PatientContext.patient_ids` at the moment this session was read."""
        return self.linked | {self.patient_id}

    def covers(self, patient_id: str | None, acquired_at: dt.datetime | None) -> bool:
        """An ECG of this patient, under any of his IDs, recorded during this session (never an
        older one of theirs that a stick still holds: that one keeps its own priority)."""
        return (
            bool(patient_id) and patient_id in self.patient_ids and (acquired_at is None or acquired_at >= self.since)
        )


@dataclass(frozen=True, slots=True)
class EndedByCard:
    """A check-in a scanned card ended (`ENDED_BY_CARD`): who he was, as his session had him, and when."""

    patient_id: str
    name: str
    stat: bool
    reason: str
    at: dt.datetime


@dataclass(frozen=True, slots=True)
class CurrentPatient:
    patient_id: str
    name: str
    since: dt.datetime  # when this patient was set
    last_activity: dt.datetime
    expires_at: dt.datetime  # unless something happens before
    doctor_id: str = ""
    stat: bool = False  # the doctor asked for an urgent read of this patient's ECGs
    reason: str = ""  # why the ECG is taken, e.g. "胸痛 chest pain"
    # the IDs the doctor said are his other IDs in this session (`OTHER_ID`), never patient_id
    linked: frozenset[str] = frozenset()
    # the check-in a scanned card ended when it began this session (None: none, or not begun by a
    # card): the acquire service cannot say it on the doctor's page, so Today says it while he is current
    ended_by_card: EndedByCard | None = None


@dataclass(frozen=True, slots=True)
class CheckedIn:
    """What a check-in changed: the patient current before it (None: nobody) and after."""

    before: CurrentPatient | None
    after: CurrentPatient


class PatientChanged(Exception):
    """The patient the caller expected (a page showed) is no longer the current one."""

    def __init__(self, current_patient_id: str) -> None:
        super().__init__(f"the current patient is {current_patient_id or 'nobody'} now")
        self.current_patient_id = current_patient_id  # "": nobody is checked in


class NameConflict(ValueError):
    """A name given for an ID the session knows under another name (`PatientContext.given_name`):
    one of the two is wrong, and only the doctor knows which."""

    def __init__(self, patient_id: str, known: str, given: str) -> None:
        super().__init__(f"{patient_id} was checked in as {known}, not {given}")
        self.patient_id, self.known, self.given = patient_id, known, given


class PatientContext:
    def __init__(self, db: sqlite_utils.Database, idle_timeout_s: float) -> None:
        if idle_timeout_s <= 0:
            raise ValueError("the patient idle timeout must be positive")
        self.db = db
        self.idle_timeout = dt.timedelta(seconds=idle_timeout_s)

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], idle_timeout_s: float) -> PatientContext:
        return cls(open_clinic_db(data_dir), idle_timeout_s)

    def close(self) -> None:
        self.db.conn.close()

    # -- changing the session ---------------------------------------------------------------
    def set_patient(
        self,
        patient_id: str,
        name: str = "",
        *,
        now: dt.datetime,
        stat: bool | None = None,
        reason: str = "",
        wait_past_stop: bool = False,
        by_card: bool = False,
    ) -> CurrentPatient:
        """`check_in` (see it for `stat`, `reason`, `wait_past_stop` and `by_card`): the patient current after it."""
        return self.check_in(
            patient_id, name, now=now, stat=stat, reason=reason, wait_past_stop=wait_past_stop, by_card=by_card
        ).after

    def check_in(
        self,
        patient_id: str,
        name: str = "",
        *,
        now: dt.datetime,
        stat: bool | None = None,
        reason: str = "",
        expected_patient_id: str | None = None,
        doctor_id: str = "",
        clear_name: bool = False,
        clear_reason: bool = False,
        same_name: SameName | None = None,
        wait_past_stop: bool = False,
        by_card: bool = False,
    ) -> CheckedIn:
        """Make `patient_id` current (setting the same patient again keeps their session's start).
        For the patient already current, what is not given stays as the session has it: an empty
        `name` or `reason`, `stat` None (a scanned card names none of them; a check-in typed again
        with the box unticked must not make a STAT patient routine). Another patient starts with
        only what is given (`stat` None: not STAT). `stat` False turns STAT off on purpose, as
        `clear_name` / `clear_reason` clear a wrong name or reason (unless one is given instead).
        `expected_patient_id` (the patient a page showed, or a command asked about; "": nobody;
        None: whoever is current): PatientChanged if another patient, or nobody, is current -
        checked in the same transaction, so a card the acquire service reads meanwhile is never
        replaced, nor taken for the patient the doctor's answer (`same_name`) is about.
        `doctor_id`: the doctor of the session from now (as `set_doctor`), set only if the
        check-in is - never on a patient the page did not show.
        `same_name`: the doctor's answer when `patient_id` is checked in under the current
        patient's name (None: not asked; `_replaced_event`).
        A new session with no name (a scanned card, an ID typed alone), unless `clear_name`, takes the
        name the doctor last said for the ID within NAME_KEPT (`_checked_in_names`: typed at a
        check-in or corrected, never cleared nor corrected away as a typo): left nameless, an ECG
        naming that ID under anyone's name would pass the name check, one ID going to the county
        under two names. Only a name said is logged as the check-in's: one taken (`NAME_INHERITED`)
        or kept by a session going on is no news, and never renews itself past NAME_KEPT.
        `wait_past_stop`: the write waits for another process's lock as if the service were not
        stopping (`sqlite_store.transaction`): a scanned card given up at a stop would leave the
        previous patient current after the restart, and the next readings on him.
        `by_card`: a scanned card checks the patient in (the acquire service): another patient's
        check-in it ends is kept on the session's row for Today to say, as a typed one says it
        (`CurrentPatient.ended_by_card`), and logged (`ENDED_BY_CARD`)."""
        patient_id = patient_id.strip()
        if not patient_id:
            raise ValueError("a patient needs a non-empty identifier")
        # what this check-in says of the ID's name: a name, "" (nobody: cleared), None (nothing)
        said: str | None = name.strip() or ("" if clear_name else None)
        with transaction(self.db, wait_past_stop=wait_past_stop) as conn:
            row = self._expire_locked(conn, now)
            before = self._current_of(row) if row is not None and row["patient_id"] else None
            current_id = before.patient_id if before is not None else ""
            if expected_patient_id is not None and current_id != expected_patient_id.strip():
                raise PatientChanged(current_id)
            doctor = row["doctor_id"] if row else None
            doctor_since = row["doctor_since"] if row else None
            if doctor_id.strip():
                doctor, doctor_since = doctor_id.strip(), iso(now)
                self._log(conn, now, "doctor-set", None, doctor)
                end_card_notices(conn, CARD_DOCTOR)
            replaced = row["patient_id"] if row and row["patient_id"] != patient_id else None
            event = _replaced_event(row, name, same_name) if row and replaced else ""
            # the same patient goes on (checked in again, his mistyped ID corrected, or under his
            # other ID): his session keeps its start, its STAT and its reason - the doctor's triage
            # of the man, not of a number (a chest-pain patient's typo corrected stays STAT)
            same_man = not replaced or event in (OTHER_ID, CORRECTED)
            going_on = row if row is not None and row["patient_id"] and same_man else None
            if going_on is not None:
                name = name or ("" if clear_name else going_on["patient_name"] or "")
                reason = reason.strip() or ("" if clear_reason else going_on["reason"] or "")
                stat = bool(going_on["stat"]) if stat is None else stat
            inherited = ""
            if going_on is None and said is None:
                # a card names nobody: the name said for the ID today, after the event (which is
                # judged on the name given: a card's ID is never a typo corrected). A session going
                # on keeps its own, even cleared; no device mapping (months old, maybe a typo's)
                name = inherited = self._checked_in_names(now).get(patient_id, "")
            if event:
                self._log(conn, now, event, replaced, doctor)
            # whom a card ended goes on with the session it began (its row), a new one starts with none
            ended_by_card = going_on["ended_by_card"] if going_on is not None else None
            if by_card and row is not None and replaced and going_on is None:
                ended = {"name": row["patient_name"] or "", "stat": bool(row["stat"]), "reason": row["reason"] or ""}
                self._log(conn, now, ENDED_BY_CARD, replaced, doctor, json.dumps(ended, ensure_ascii=False))
                ended_by_card = json.dumps({**ended, "patient_id": replaced, "at": iso(now)}, ensure_ascii=False)
            # his other IDs go on with his session, on its row (the log is pruned past NAME_KEPT): a
            # correction keeps them (the typo itself is not one); another patient starts with none
            linked = set(_linked_of(going_on)) if going_on is not None else set()
            if event == OTHER_ID and replaced is not None:  # (it is, for this event)
                linked.add(replaced)
            linked.discard(patient_id)
            conn.execute(
                "INSERT INTO session (id, patient_id, patient_name, patient_since, doctor_id, "
                "doctor_since, last_activity, stat, reason, linked_ids, ended_by_card) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE "
                "SET patient_since = excluded.patient_since, "
                "patient_id = excluded.patient_id, patient_name = excluded.patient_name, "
                "doctor_id = excluded.doctor_id, doctor_since = excluded.doctor_since, "
                "last_activity = excluded.last_activity, stat = excluded.stat, reason = excluded.reason, "
                "linked_ids = excluded.linked_ids, ended_by_card = excluded.ended_by_card",
                (
                    _ROW,
                    patient_id,
                    name,
                    going_on["patient_since"] if going_on is not None else iso(now),
                    doctor,
                    doctor_since,
                    iso(now),
                    int(bool(stat)),
                    reason.strip() or None,
                    _linked_text(linked),
                    ended_by_card,
                ),
            )
            # the name as said at check-in, so a later mapping or assignment of this ID can name it
            self._log(conn, now, "patient-set", patient_id, doctor, said)
            end_card_notices(conn, CARD_PATIENT)  # whoever was current before: not now
            if inherited:
                self._log(conn, now, NAME_INHERITED, patient_id, doctor, inherited)
            after = self._current_of(conn.execute("SELECT * FROM session WHERE id = ?", (_ROW,)).fetchone())
        log.debug("current patient set")
        return CheckedIn(before, after)

    def same_name_replaced(self, patient_id: str, name: str, now: dt.datetime) -> CurrentPatient | None:
        """The current patient, if checking `patient_id` in as `name` would replace him under his
        own name: a mistyped ID corrected, or his other ID - only the doctor knows which."""
        current = self.current(now)
        if current is None or current.patient_id == patient_id.strip() or not _same_name(current.name, name):
            return None
        return current

    def set_doctor(self, doctor_id: str, *, now: dt.datetime, wait_past_stop: bool = False) -> None:
        """`wait_past_stop`: as `check_in`'s (a scanned badge)."""
        doctor_id = doctor_id.strip()
        if not doctor_id:
            raise ValueError("a doctor needs a non-empty identifier")
        with transaction(self.db, wait_past_stop=wait_past_stop) as conn:
            self._expire_locked(conn, now)
            conn.execute(
                "INSERT INTO session (id, doctor_id, doctor_since, last_activity) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET doctor_id = excluded.doctor_id, "
                "doctor_since = excluded.doctor_since, last_activity = excluded.last_activity",
                (_ROW, doctor_id, iso(now), iso(now)),
            )
            self._log(conn, now, "doctor-set", None, doctor_id)
            end_card_notices(conn, CARD_DOCTOR)

    def touch(self, *, now: dt.datetime) -> bool:
        """Activity in the session: the idle timer starts again. False if nothing was current."""
        with transaction(self.db) as conn:
            row = self._expire_locked(conn, now)
            if row is None:
                return False
            latest = max(now, _t(row["last_activity"]))
            conn.execute("UPDATE session SET last_activity = ? WHERE id = ?", (iso(latest), _ROW))
            return True

    def clear(self, *, now: dt.datetime, reason: str = "cleared", patient_id: str = "") -> bool:
        """End the patient's session (the doctor stays). False if no patient was current - or,
        given `patient_id` (the patient a page showed), if another patient is current now."""
        with transaction(self.db) as conn:
            row = self._expire_locked(conn, now)
            if row is None or not row["patient_id"]:
                return False
            if patient_id and row["patient_id"] != patient_id.strip():
                return False
            conn.execute(
                "UPDATE session SET patient_id = NULL, patient_name = NULL, patient_since = NULL, stat = 0, "
                "reason = NULL, linked_ids = NULL, ended_by_card = NULL WHERE id = ?",
                (_ROW,),
            )
            self._log(conn, now, f"patient-{reason}", row["patient_id"], row["doctor_id"])
        return True

    # -- reading it -------------------------------------------------------------------------
    def current(self, now: dt.datetime) -> CurrentPatient | None:
        """The current patient, or None (never set, cleared, or idle for too long)."""
        row = self._row()
        if row is None or self._expired(row, now):
            if row is not None:
                with transaction(self.db) as conn:
                    self._expire_locked(conn, now)
            return None
        if not row["patient_id"]:
            return None
        return self._current_of(row)

    def _current_of(self, row: sqlite3.Row) -> CurrentPatient:
        """The live session row with a patient, as the callers read it."""
        last = _t(row["last_activity"])
        return CurrentPatient(
            patient_id=row["patient_id"],
            name=row["patient_name"] or "",
            since=_t(row["patient_since"]),
            last_activity=last,
            expires_at=last + self.idle_timeout,
            doctor_id=row["doctor_id"] or "",
            stat=bool(row["stat"]),
            reason=row["reason"] or "",
            linked=_linked_of(row),
            ended_by_card=_ended_by_card_of(row),
        )

    def patient_ids(self, now: dt.datetime) -> frozenset[str]:
        """The IDs that are the current patient in this session: his own and those the doctor said
        are his other IDs (`OTHER_ID`) while he was checked in; empty if nobody is current. A
        device file naming one of them is his - never a guess: a name alone links nothing."""
        current = self.current(now)
        if current is None:
            return frozenset()
        return current.linked | {current.patient_id}

    def stat_session(self, now: dt.datetime) -> StatSession | None:
        """The current patient's session if the doctor checked them in as STAT, with the IDs he
        linked to it (one read of the session, as `patient_ids`)."""
        current = self.current(now)
        if current is None or not current.stat:
            return None
        return StatSession(current.patient_id, current.since, current.linked)

    def named(self, patient: Patient, now: dt.datetime) -> Patient:
        """`patient`, given without a name, with the name the gateway knows for its ID
        (`known_name`); another ID keeps none. A name taken from the session for another ID
        would send one patient's ID under another's name: the gateway keeps no names by ID
        (the session holds only the current one, its log NAME_KEPT of check-ins)."""
        if patient.name:
            return patient
        return replace(patient, name=self.known_name(patient.patient_id, now))

    def given_name(self, patient: Patient, now: dt.datetime, *, correct: bool = False) -> Patient:
        """`named`, for a patient whose name the doctor typed: NameConflict if the session knows his
        ID under another name (one of them is wrong: neither may go to the county unsaid), unless
        `correct` - the typed name is right. Writes nothing: the session's name is corrected by
        `correct_name_in`, in the transaction of what the doctor named him for (an assignment, a
        mapping): one refused must leave the name as it was."""
        known = self.known_name(patient.patient_id, now)
        # one rule for "another name" (`same_person_name`): Zhang San typed for Zhang^San=张^三 is his
        same = bool(patient.name and known) and same_person_name(patient.name, known)
        if patient.name and known and not same and not correct:
            raise NameConflict(patient.patient_id, known, patient.name)
        if same and not fuller_name(patient.name, known):
            # his name as checked in, with its characters: the county must not get the typed pinyin alone
            return replace(patient, name=known)
        return self.named(patient, now)

    def correct_name(self, patient_id: str, name: str, *, now: dt.datetime, rename_devices: bool = True) -> None:
        """`correct_name_in`, in a transaction of its own."""
        with transaction(self.db) as conn:
            self.correct_name_in(conn, patient_id, name, now=now, rename_devices=rename_devices)

    def correct_name_in(
        self, conn: sqlite3.Connection, patient_id: str, name: str, *, now: dt.datetime, rename_devices: bool = True
    ) -> None:
        """Inside a write transaction on this context's clinic.db (`conn`): the doctor says
        `patient_id`'s checked-in name was wrong, it is `name` from now on, for whatever the session
        names him (his session too, if he is the one checked in or it is one of his other IDs: they
        all carry his session's name). A device user mapped to him keeps it too, whatever the
        session knows: its log goes after NAME_KEPT, and his cuff's readings must not go back to
        the name the doctor said was wrong a day later. Nothing is written to the session if it
        knows him under no other name. A name that is no name (`no_name`: "^^^^", "UNKNOWN"), a
        cart's empty field, is refused (ValueError): it would rename him and his cuff's users to nothing.
        `rename_devices` False: the session's row only (the name corrected was not said at this
        check-in, `inherited_ids`: the device users mapped to the ID may be another patient's). Its
        log event is one `known_names` ignores: a NAME_CORRECTED would name the ID for NAME_KEPT,
        and a cuff user mapped to it (the father's, on a family card) would send his readings under
        the corrected name after the session moved on."""
        if not name.strip():
            return
        if no_name(name):
            raise ValueError(f"{name!r} is no name: {patient_id}'s name is not changed to it")
        row = self._expire_locked(conn, now)
        current = self._current_of(row) if row is not None and row["patient_id"] else None
        his_session = current is not None and patient_id in current.linked | {current.patient_id}
        his_ids = current.linked | {current.patient_id} if current is not None and his_session else {patient_id}
        # device_users (lastmile.clinic.device_users, which reads this module) in this
        # transaction: the correction and the mappings' name are one change
        if rename_devices:
            conn.execute(
                f"UPDATE device_users SET patient_name = ? WHERE patient_id IN ({', '.join('?' * len(his_ids))})",
                (name, *sorted(his_ids)),
            )
        known = self._known_of({patient_id}, current, now).get(patient_id, "")
        if not known or known.strip() == name.strip():
            return
        if his_session:
            conn.execute("UPDATE session SET patient_name = ? WHERE id = ?", (name, _ROW))
        elif not rename_devices:
            return  # not his session: nothing of it to correct, and no name said for the ID
        event = NAME_CORRECTED if rename_devices else NAME_CORRECTED_SESSION_ONLY
        self._log(conn, now, event, patient_id, row["doctor_id"] if row else None, name)

    def known_name(self, patient_id: str, now: dt.datetime) -> str:
        """`known_names` of one ID: its name, or "" if the session knows none."""
        return self.known_names([patient_id], now).get(patient_id, "")

    def known_names(self, patient_ids: Iterable[str], now: dt.datetime) -> dict[str, str]:
        """The one answer to "what name does the gateway know for each of `patient_ids`" from the
        session, for those it knows one of: the checked-in patient's name when it is that patient
        (none, if checked in with none), else `checked_in_name`. Everything else that names an ID
        (the console's `known_names`, a device user's mapping) asks this first and adds only what
        the session cannot know. One read of the session and one of its log, however many IDs:
        Today names every mapped user on each render."""
        wanted = set(patient_ids)
        if not wanted:
            return {}
        return self._known_of(wanted, self.current(now), now)

    def _known_of(self, wanted: set[str], current: CurrentPatient | None, now: dt.datetime) -> dict[str, str]:
        """`known_names` of `wanted`, the session's patient being `current`."""
        names = self._said_of(current, now)
        return {pid: names[pid] for pid in wanted if names.get(pid)}

    def _said_of(self, current: CurrentPatient | None, now: dt.datetime) -> dict[str, str]:
        """Each ID the session has news of, named as it knows him now ("": no name, cleared)."""
        names = self._checked_in_names(now)
        if current is not None:
            # his other IDs are his (the doctor said so): his name, however long ago they were checked in
            names.update(dict.fromkeys(current.linked | {current.patient_id}, current.name))
        return names

    def cleared_ids(self, patient_ids: Iterable[str], now: dt.datetime) -> set[str]:
        """Those of `patient_ids` the session knows under no name now: checked in with it cleared
        (清除姓名), or corrected away as a typo, since a name was said for them. A name stored with
        something that came in before (an ECG held for its name) is no longer his name to offer."""
        wanted = set(patient_ids)
        if not wanted:
            return set()  # Today with none held: no read
        names = self._said_of(self.current(now), now)
        return {pid for pid in wanted if pid in names and not names[pid]}

    def checked_in_name(self, patient_id: str, now: dt.datetime) -> str:
        """The name `patient_id` was checked in under within NAME_KEPT before `now` (张三 checked in
        this morning, 李四 now: user 2 mapped to 张三's ID is named 张三); "" if none. Only a
        name typed for this very ID: never the current patient's for another one."""
        return self._checked_in_names(now).get(patient_id, "")

    def _checked_in_names(self, now: dt.datetime) -> dict[str, str]:
        """Each ID checked in within NAME_KEPT before `now`, named as its latest check-in named it
        ("": none), or as the doctor corrected that name since (`correct_name`), unless that
        check-in's ID was corrected since (`_replaced_event`: the correction recorded when the
        doctor made it). One seek on the log's `at` index."""
        return self._said_names(now)[0]

    def inherited_ids(self, patient_ids: Iterable[str], now: dt.datetime) -> set[str]:
        """Those of `patient_ids` whose name the session knows only because a check-in with no name
        took it (`NAME_INHERITED`: a card scanned, the ID typed alone), nothing said of it since:
        nobody typed it at that check-in, and a device user mapped to the ID may be another
        patient's (the ID mistyped), so an answer about that name must not rename them."""
        wanted = set(patient_ids)
        return self._said_names(now)[1] & wanted if wanted else set()  # Today with none held: no read

    def _said_names(self, now: dt.datetime) -> tuple[dict[str, str], set[str]]:
        """`_checked_in_names`, and the IDs whose latest news is a name taken (`NAME_INHERITED`,
        which names nothing itself), no name said since (cleared, the mark stays). A check-in that said nothing of the name (logged NULL: a
        session going on, a card) is skipped: no news, never a renewal."""
        rows = self.db.conn.execute(
            "SELECT event, patient_id, detail FROM session_log WHERE at >= ? AND event IN ('patient-set', ?, ?, ?) "
            "AND NOT (event = 'patient-set' AND detail IS NULL) ORDER BY id",
            (iso(now - NAME_KEPT), CORRECTED, NAME_CORRECTED, NAME_INHERITED),
        ).fetchall()
        names: dict[str, str] = {}
        inherited: set[str] = set()
        for row in rows:  # oldest first: the latest check-in, or its correction, names the ID
            if row["event"] == NAME_INHERITED:
                inherited.add(row["patient_id"])
                continue
            if row["detail"]:  # only a name said: a name cleared leaves nothing typed in its place
                inherited.discard(row["patient_id"])
            names[row["patient_id"]] = "" if row["event"] == CORRECTED else row["detail"] or ""
        return names, inherited

    def current_doctor(self, now: dt.datetime) -> str | None:
        row = self._row()
        if row is None or self._expired(row, now):
            return None
        return row["doctor_id"] or None

    def scan_written(self, *, patient_id: str = "", doctor_id: str = "", at: str) -> bool:
        """Whether the check-in of `patient_id` (the doctor `doctor_id`) made at `at` (its `iso`
        time, the caller's `now`) is in clinic.db: its session log line, written in the same
        transaction. For a card whose write a stop gave up: the process may have finished it before
        it exited. Any log line naming the ID at or after `at` says it was current then (its check-in,
        its session's idle end: written when found, however late). The log keeps NAME_KEPT, and a
        write after a long stop prunes the check-in's line: the session row says it too - its patient
        (doctor) is the one scanned, or was set at or after `at` (a later check-in made the card moot)."""
        column, value = ("patient_id", patient_id.strip()) if patient_id else ("doctor_id", doctor_id.strip())
        row = self.db.conn.execute(
            f"SELECT 1 FROM session_log WHERE at >= ? AND {column} = ? LIMIT 1", (at, value)
        ).fetchone()
        if row is not None:
            return True
        session = self._row()  # as written, idle or not: what the stop's process left
        if session is None or not session[column]:
            return False
        since = from_iso(session["patient_since" if patient_id else "doctor_since"])
        scanned_at = from_iso(at)
        return session[column] == value or (since is not None and scanned_at is not None and since >= scanned_at)

    def history(self, limit: int = 20) -> list[dict]:
        rows = self.db.conn.execute(
            "SELECT at, event, patient_id, doctor_id, detail FROM session_log ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [dict(r) for r in rows]

    # -- internals --------------------------------------------------------------------------
    def _row(self) -> sqlite3.Row | None:
        return self.db.conn.execute("SELECT * FROM session WHERE id = ?", (_ROW,)).fetchone()

    def _expired(self, row: sqlite3.Row, now: dt.datetime) -> bool:
        last = from_iso(row["last_activity"])
        return last is None or now - last > self.idle_timeout

    def _expire_locked(self, conn: sqlite3.Connection, now: dt.datetime) -> sqlite3.Row | None:
        """Inside a transaction: end an idle session; return the live row or None. Every change of
        the session (a check-in, its end, its idle expiry, a doctor, a reading) prunes the log past
        NAME_KEPT: a gateway with no later check-in must not keep its names either."""
        _prune_log(conn, now - NAME_KEPT)
        row = conn.execute("SELECT * FROM session WHERE id = ?", (_ROW,)).fetchone()
        if row is None:
            return None
        if self._expired(row, now):
            if row["patient_id"] or row["doctor_id"]:
                self._log(
                    conn,
                    now,
                    "session-expired",
                    row["patient_id"],
                    row["doctor_id"],
                    f"idle since {row['last_activity']}",
                )
                log.info("clinic session expired after %.0f s idle", self.idle_timeout.total_seconds())
            conn.execute("DELETE FROM session WHERE id = ?", (_ROW,))
            end_card_notices(conn, None)  # nobody the stop left current is current now
            return None
        return row

    @staticmethod
    def _log(
        conn: sqlite3.Connection,
        now: dt.datetime,
        event: str,
        patient_id: str | None,
        doctor_id: str | None,
        detail: str | None = "",
    ) -> None:
        conn.execute(
            "INSERT INTO session_log (at, event, patient_id, doctor_id, detail) VALUES (?, ?, ?, ?, ?)",
            (iso(now), event, patient_id, doctor_id, detail),
        )


def _replaced_event(row: sqlite3.Row, name: str, same_name: SameName | None) -> str:
    """The log event of the session's patient (`row`) replaced by another ID checked in as `name`:
    the same name while he is checked in is either his ID corrected (张三 checked in as P-12, then
    as P-21: P-12's check-in names nobody, `_checked_in_names`) or, as the doctor says
    (`SameName.OTHER_ID`), his other ID (ID card, then clinic number: both keep his name). The
    console and the command ask (`same_name_replaced`); a caller that did not ask (None) names no
    ID from a guess. Another name, or the doctor's `SameName.ANOTHER_PERSON`, is the next patient."""
    if same_name is SameName.ANOTHER_PERSON or not _same_name(row["patient_name"] or "", name):
        return "patient-replaced"
    return OTHER_ID if same_name is SameName.OTHER_ID else CORRECTED


def _linked_of(row: sqlite3.Row) -> frozenset[str]:
    """The session row's linked IDs (`CurrentPatient.linked`; NULL: none)."""
    return frozenset(json.loads(row["linked_ids"])) if row["linked_ids"] else frozenset()


def _ended_by_card_of(row: sqlite3.Row) -> EndedByCard | None:
    """The session row's check-in a card ended (`CurrentPatient.ended_by_card`; NULL: none)."""
    if not row["ended_by_card"]:
        return None
    try:
        ended = json.loads(row["ended_by_card"])
    except ValueError:
        ended = None
    at = from_iso(str(ended.get("at") or "")) if isinstance(ended, dict) else None
    if not isinstance(ended, dict) or at is None:
        return None  # a row this version cannot read: no news rather than no page
    return EndedByCard(
        str(ended.get("patient_id") or ""),
        str(ended.get("name") or ""),
        bool(ended.get("stat")),
        str(ended.get("reason") or ""),
        at,
    )


def _linked_text(linked: set[str]) -> str | None:
    """`linked` as the session row keeps it: a JSON list, NULL for none."""
    return json.dumps(sorted(linked), ensure_ascii=False) if linked else None


def fuller_name(typed: str, known: str) -> bool:
    """Of two spellings of one person's name, `typed` says more than `known`: it has the Chinese
    characters `known` lacks (张三 typed for a check-in as Zhang San)."""
    return has_ideographs(typed) and not has_ideographs(known)


def _same_name(checked_in: str, name: str) -> bool:
    """A name typed again for the checked-in patient's name (none is nobody's), by the one rule
    the gateway compares names by (`same_person_name`: 张三 is Zhang^San=张^三)."""
    return same_person_name(checked_in, name)


def _prune_log(conn: sqlite3.Connection, before: dt.datetime) -> None:
    """Delete the session log before `before`: only NAME_KEPT of it is read (`checked_in_name`; the
    console's audit trail is its own table), its names must not outlive the outbox's purge of the
    patient's data, and the log must not grow on the SD card for ever. A seek on its `at` index."""
    conn.execute("DELETE FROM session_log WHERE at < ?", (iso(before),))


def _t(value: str) -> dt.datetime:
    parsed = from_iso(value)
    assert parsed is not None
    return parsed
