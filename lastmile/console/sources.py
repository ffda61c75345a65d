"""What the console shows, read from where the gateway keeps it, and the seams for what is coming.

`ClinicData` reads and changes the clinic's state through the modules that own it: the session
(`lastmile.clinic.patients`), held readings (`lastmile.clinic.observations`), devices
(`lastmile.clinic.devices`), the outbox (ECG studies and their journey), visits
(`lastmile.visits.book`). Every change goes through here and into the audit trail with the user
who made it. One thread uses it (the console's database thread): SQLite calls never block the
event loop that serves the pages.

Seams (issues not on main yet, marked `SEAM(issue N)`):
- `ReportsSource`: returned reports and critical results (issue 14 stores them in clinic.db,
  `lastmile/reports/`). `NoReports` until then; `StaticReports` for tests.
- `HeldEcgSource`: ECGs the outbox holds back, unassigned or waiting for the doctor after a
  "re-record" verdict (issues 12 and 13: `Outbox.held_items` / `release_hold` /
  `replace_held_payload`). `NoHeldEcgs` until then.
- STAT and reason of a check-in (issue 12 puts them on the session): kept in the audit trail of
  the check-in meanwhile and read back from there for the current patient.
- Resident ID check (issue 12 puts it in `devices/identity.py`): `devices/resident_id.py`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from devices.identity import InvalidPatientIdError, looks_like_resident_id, parse_resident_id
from lastmile.clinic.db import DB_NAME as CLINIC_DB
from lastmile.clinic.db import from_iso, open_clinic_db, utc_now
from lastmile.clinic.devices import DeviceRecord, DeviceRegistry, normalise_address
from lastmile.clinic.observations import (
    OBSERVATION_KIND,
    ObservationStore,
    observation_from_json,
    summary,
)
from lastmile.clinic.patients import PatientContext
from lastmile.config import Config
from lastmile.console.accounts import Accounts
from lastmile.console.audit import AuditLog
from lastmile.console.i18n import N_
from lastmile.data_dir import open_outbox
from uploader.outbox import ItemState, Kind, OutboxItem

log = logging.getLogger(__name__)

READING_CENTER_STATUS = "reading_center"  # uploader.ecg_forwarder.STATUS_NAME (no DICOM import here)
MAX_NAME_LENGTH = 64


class ConsoleInputError(ValueError):
    """Something the user typed cannot be used. `message` is an English catalog string (marked
    with N_), translated with `values` where it is shown."""

    def __init__(self, message: str, **values: object) -> None:
        super().__init__(message % values if values else message)
        self.message = message
        self.values = values


_ID_PROBLEMS = {
    "length": N_("A resident ID has 18 characters: 17 digits and a check character (0-9 or X). Check the number."),
    "check-character": N_(
        "The resident ID's last character does not match the others: check the number or scan the card again."
    ),
    "birth-date": N_("The birth date inside the resident ID is not a valid date: check the number."),
}


# -- what the pages show ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionView:
    patient_id: str
    patient_name: str
    since: dt.datetime
    expires_at: dt.datetime
    doctor: str
    stat: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ReadingView:
    key: str
    kind: str
    summary: str
    device: str
    measured_at: dt.datetime
    time_source: str
    flags: tuple[str, ...] = ()
    held_id: int | None = None  # held unassigned: its number for "assign"


@dataclass(frozen=True, slots=True)
class EcgItemView:
    item_id: int
    sha256: str
    recorded_at: dt.datetime  # when the gateway stored it
    patient_id: str
    patient_name: str
    state: str
    stat: bool
    flags: tuple[str, ...]
    quality: dict[str, Any] | None  # the stored quality report (issue 13), when the item carries one
    payload_available: bool


@dataclass(frozen=True, slots=True)
class StudyJourney:
    item_id: int
    patient_id: str
    patient_name: str
    stat: bool
    state: str
    recorded_at: dt.datetime
    sent_at: dt.datetime | None
    committed_at: dt.datetime | None
    report_at: dt.datetime | None
    report_id: str
    attempts: int
    last_error: str
    quarantine_reason: str


@dataclass(frozen=True, slots=True)
class LinkStatus:
    fault: str  # the reading center refuses this gateway (configuration): call the county IT
    fault_since: dt.datetime | None
    down_since: dt.datetime | None  # transient failures since the last success
    last_error: str
    last_success: dt.datetime | None
    waiting: int
    oldest_waiting: dt.datetime | None


@dataclass(frozen=True, slots=True)
class VisitView:
    visit_id: str
    doctor_id: str
    patient_id: str
    household_id: str
    state: str  # "open" or "closed"
    started_at: dt.datetime | None  # None: no plausible time was known (repaired later)
    ended_at: dt.datetime | None
    flags: tuple[str, ...]
    distance_m: float | None
    fhir_queued: bool


@dataclass(frozen=True, slots=True)
class ReportView:
    """A report returned by the reading center (issue 14), as the Reports page shows it."""

    report_id: str
    study_uid: str
    patient_id: str
    patient_name: str
    ecg_time: dt.datetime | None
    received_at: dt.datetime
    status: str  # "received" or "amended"
    critical: bool
    reading_doctor: str
    text: str  # SR content rendered to text (findings, impression)
    has_pdf: bool = False
    quality_verdict: str = ""


@dataclass(frozen=True, slots=True)
class HeldEcg:
    """An ECG the outbox holds back for the doctor (issues 12 and 13)."""

    item_id: int
    recorded_at: dt.datetime
    reason: str  # "unassigned", "re-record", "mismatch"
    hold_until: dt.datetime
    patient_hint: str = ""  # what the file says, if anything
    device: str = ""


# -- seams -----------------------------------------------------------------------------------------


class ReportsSource(Protocol):
    """SEAM(issue 14): the store of returned reports. The Reports page, the critical alert and the
    Sent page's "report received" step read only this."""

    def reports(self, limit: int = 200) -> list[ReportView]: ...

    def report(self, report_id: str) -> ReportView | None: ...

    def pdf(self, report_id: str) -> bytes | None: ...


class NoReports:
    """No report store yet: the pages say no report has come back."""

    def reports(self, limit: int = 200) -> list[ReportView]:
        return []

    def report(self, report_id: str) -> ReportView | None:
        return None

    def pdf(self, report_id: str) -> bytes | None:
        return None


@dataclass
class StaticReports:
    """Reports given in memory (tests; a demo that has no reading doctor)."""

    items: list[ReportView] = field(default_factory=list)
    pdfs: dict[str, bytes] = field(default_factory=dict)

    def reports(self, limit: int = 200) -> list[ReportView]:
        return sorted(self.items, key=lambda r: r.received_at, reverse=True)[:limit]

    def report(self, report_id: str) -> ReportView | None:
        return next((r for r in self.items if r.report_id == report_id), None)

    def pdf(self, report_id: str) -> bytes | None:
        return self.pdfs.get(report_id)


class HeldEcgSource(Protocol):
    """SEAM(issues 12, 13): ECGs held in the outbox for the doctor, and the doctor's decisions."""

    def held_ecgs(self, now: dt.datetime) -> list[HeldEcg]: ...

    def assign(self, item_id: int, patient_id: str, patient_name: str, *, now: dt.datetime) -> bool: ...

    def send_anyway(self, item_id: int, *, now: dt.datetime) -> bool: ...


class NoHeldEcgs:
    """Nothing is held on main yet: every ECG goes straight to the outbox queue."""

    def held_ecgs(self, now: dt.datetime) -> list[HeldEcg]:
        return []

    def assign(self, item_id: int, patient_id: str, patient_name: str, *, now: dt.datetime) -> bool:
        return False

    def send_anyway(self, item_id: int, *, now: dt.datetime) -> bool:
        return False


# -- input checks ----------------------------------------------------------------------------------


def patient_identifier(text: str) -> str:
    """The identifier as typed or scanned, checked: a resident ID (digits, 15-19 of them) must
    be a valid GB 11643 number; anything else (a clinic number) is taken as it is, trimmed.
    SEAM(issue 12): use the configured `patient.id_kind` when it lands."""
    text = text.strip()
    if not text:
        raise ConsoleInputError(N_("Type or scan the patient's ID."))
    if looks_like_resident_id(text):
        try:
            return parse_resident_id(text).number
        except InvalidPatientIdError as exc:
            problem = _ID_PROBLEMS.get(exc.reason)
            raise ConsoleInputError(problem or N_("The resident ID is not valid: check the number.")) from None
    if len(text) > MAX_NAME_LENGTH or any(ord(ch) < 32 for ch in text):
        raise ConsoleInputError(N_("A patient ID has at most %(n)d characters and no line breaks."), n=MAX_NAME_LENGTH)
    return text


def short_text(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > MAX_NAME_LENGTH:
        raise ConsoleInputError(N_("Names and reasons have at most %(n)d characters."), n=MAX_NAME_LENGTH)
    return text


def _t(value: float | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, dt.timezone.utc)


def _utc(value: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.timezone.utc)


# -- the clinic's data -----------------------------------------------------------------------------


class ClinicData:
    """The console's one view of the gateway's state; use it from one thread."""

    def __init__(
        self,
        config: Config,
        *,
        reports: ReportsSource | None = None,
        held_ecgs: HeldEcgSource | None = None,
    ) -> None:
        self.config = config
        self.reports: ReportsSource = reports or NoReports()
        self.held_ecg_source: HeldEcgSource = held_ecgs or NoHeldEcgs()
        self.db = open_clinic_db(config.data_dir)
        self.outbox = open_outbox(config)
        self.context = PatientContext(self.db, config.patient.idle_timeout_s)
        self.registry = DeviceRegistry(self.db)
        self.store = ObservationStore(self.outbox, self.db, self.context)
        c = config.console
        self.accounts = Accounts(
            self.db, max_failures=c.max_login_failures, lockout_s=c.lockout_s, idle_s=c.session_idle_s
        )
        self.audit = AuditLog(self.db)

    def close(self) -> None:
        self.outbox.close()
        self.db.conn.close()

    # -- the session ------------------------------------------------------------------------------
    def session(self, now: dt.datetime) -> SessionView | None:
        current = self.context.current(now)
        if current is None:
            return None
        stat, reason = False, ""
        # SEAM(issue 12): STAT and reason from the session row once it carries them.
        entry = self.audit.latest("check-in", current.patient_id)
        if entry is not None and entry.at >= current.since.replace(microsecond=0) - dt.timedelta(seconds=1):
            stat, reason = bool(entry.detail.get("stat")), str(entry.detail.get("reason", ""))
        return SessionView(
            current.patient_id,
            current.name,
            current.since,
            current.expires_at,
            current.doctor_id,
            stat,
            reason,
        )

    def doctor_on_duty(self, now: dt.datetime) -> str:
        return self.context.current_doctor(now) or ""

    def check_in(
        self, user: str, patient_text: str, name: str, doctor: str, stat: bool, reason: str, *, now: dt.datetime
    ) -> SessionView:
        patient_id = patient_identifier(patient_text)
        name = short_text(name)
        doctor = short_text(doctor)
        reason = short_text(reason)
        if doctor:
            self.context.set_doctor(doctor, now=now)
        # SEAM(issue 12): pass stat/reason to set_patient when the session carries them.
        self.context.set_patient(patient_id, name, now=now)
        self.audit.record(
            user,
            "check-in",
            now=now,
            target=patient_id,
            detail={"name": name, "doctor": doctor, "stat": stat, "reason": reason},
        )
        view = self.session(now)
        assert view is not None
        return view

    def end_session(self, user: str, *, now: dt.datetime) -> bool:
        current = self.context.current(now)
        ended = self.context.clear(now=now, reason="ended-by-doctor")
        if ended and current is not None:
            self.audit.record(user, "end-session", now=now, target=current.patient_id)
        return ended

    # -- readings ---------------------------------------------------------------------------------
    def _recent_item_ids(self, kind: str, *, limit: int, since: float | None = None) -> list[int]:
        # The outbox has no "newest first" query; its items table is read directly (indexed id).
        sql = "SELECT id FROM items WHERE kind = ?"
        params: list[object] = [kind]
        if since is not None:
            sql += " AND created_at >= ?"
            params.append(since)
        rows = self.outbox.db.conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*params, int(limit))).fetchall()
        return [int(r[0]) for r in rows]

    def patient_readings(self, patient_id: str, since: dt.datetime, limit: int = 20) -> list[ReadingView]:
        """The readings stored on `patient_id` since `since` (their session's start), newest first."""
        out = []
        for item_id in self._recent_item_ids(OBSERVATION_KIND, limit=200, since=since.timestamp()):
            item = self.outbox.get(item_id)
            if item is None or (item.patient or {}).get("patient_id") != patient_id:
                continue
            reading = self._reading_of(item)
            if reading is not None:
                out.append(reading)
            if len(out) >= limit:
                break
        return out

    def _reading_of(self, item: OutboxItem) -> ReadingView | None:
        if item.state in (ItemState.PURGED, ItemState.QUARANTINED):
            return None
        try:
            obs = observation_from_json(json.loads(self.outbox.read_payload(item)))
        except Exception as exc:  # noqa: BLE001 — one unreadable item must not take the page down
            log.warning("outbox item %d: cannot show it (%s)", item.id, type(exc).__name__)
            return None
        return ReadingView(
            obs.record_key,
            obs.kind,
            summary(obs),
            obs.device.label(),
            obs.measured_at,
            obs.time_source.value,
            obs.flags,
        )

    def held_readings(self) -> list[ReadingView]:
        return [
            ReadingView(
                h.observation.record_key,
                h.observation.kind,
                summary(h.observation),
                h.observation.device.label(),
                h.observation.measured_at,
                h.observation.time_source.value,
                h.observation.flags,
                held_id=h.held_id,
            )
            for h in self.store.held()
        ]

    def assign_reading(self, user: str, held_id: int, patient_text: str, name: str, *, now: dt.datetime) -> str:
        patient_id = patient_identifier(patient_text)
        name = short_text(name)
        held = self.store.get_held(held_id)
        if held is None:
            raise ConsoleInputError(N_("That reading has been assigned already."))
        result = self.store.assign(held_id, patient_id, name=name, now=now)
        self.audit.record(
            user,
            "assign-reading",
            now=now,
            target=patient_id,
            detail={"held_id": held_id, "kind": held.observation.kind, "outbox_item": result.item_id},
        )
        return patient_id

    # -- ECGs -------------------------------------------------------------------------------------
    def latest_ecg(self, *, within: dt.timedelta = dt.timedelta(hours=12), now: dt.datetime) -> EcgItemView | None:
        """The ECG stored last (the one just recorded), if it is recent."""
        ids = self._recent_item_ids(Kind.DICOM, limit=1, since=(now - within).timestamp())
        item = self.outbox.get(ids[0]) if ids else None
        return None if item is None else self._ecg_of(item)

    def ecg(self, item_id: int) -> EcgItemView | None:
        item = self.outbox.get(item_id)
        return None if item is None or item.kind != Kind.DICOM else self._ecg_of(item)

    def _ecg_of(self, item: OutboxItem) -> EcgItemView:
        patient = item.patient or {}
        quality = item.meta.get("quality")
        return EcgItemView(
            item_id=item.id,
            sha256=item.sha256,
            recorded_at=_utc(item.created_at),
            patient_id=str(patient.get("patient_id") or ""),
            patient_name=str(patient.get("name") or ""),
            state=item.state.value,
            stat=item.priority == 0,
            flags=tuple(item.meta.get("flags") or ()),
            quality=quality if isinstance(quality, dict) else None,
            payload_available=item.state not in (ItemState.PURGED, ItemState.QUARANTINED),
        )

    def ecg_payload(self, item_id: int) -> bytes | None:
        item = self.outbox.get(item_id)
        if item is None or item.kind != Kind.DICOM or item.state in (ItemState.PURGED, ItemState.QUARANTINED):
            return None
        try:
            return self.outbox.read_payload(item)
        except Exception as exc:  # noqa: BLE001 — purged meanwhile, or corrupt (then quarantined by the outbox)
            log.info("ECG item %d: payload not readable (%s)", item_id, type(exc).__name__)
            return None

    def held_ecgs(self, now: dt.datetime) -> list[HeldEcg]:
        return self.held_ecg_source.held_ecgs(now)

    def assign_ecg(self, user: str, item_id: int, patient_text: str, name: str, *, now: dt.datetime) -> bool:
        patient_id = patient_identifier(patient_text)
        name = short_text(name)
        done = self.held_ecg_source.assign(item_id, patient_id, name, now=now)
        self.audit.record(user, "assign-ecg", now=now, target=patient_id, detail={"item": item_id, "done": done})
        return done

    def send_anyway(self, user: str, item_id: int, *, now: dt.datetime) -> bool:
        done = self.held_ecg_source.send_anyway(item_id, now=now)
        self.audit.record(user, "send-anyway", now=now, target=str(item_id), detail={"done": done})
        return done

    def re_record(self, user: str, item_id: int, *, now: dt.datetime) -> None:
        """The doctor will record again: noted (the new ECG comes as a new study)."""
        self.audit.record(user, "re-record", now=now, target=str(item_id))

    def re_record_noted(self, item_id: int) -> bool:
        return self.audit.latest("re-record", str(item_id)) is not None

    # -- the journey of each study ------------------------------------------------------------------
    def journeys(self, limit: int = 50) -> list[StudyJourney]:
        by_study = {r.study_uid: r for r in self.reports.reports()}
        out = []
        for item_id in self._recent_item_ids(Kind.DICOM, limit=limit):
            item = self.outbox.get(item_id)
            if item is None:
                continue
            patient = item.patient or {}
            report = by_study.get(str(item.meta.get("study_uid", "")))
            out.append(
                StudyJourney(
                    item_id=item.id,
                    patient_id=str(patient.get("patient_id") or ""),
                    patient_name=str(patient.get("name") or ""),
                    stat=item.priority == 0,
                    state=item.state.value,
                    recorded_at=_utc(item.created_at),
                    sent_at=_t(item.sent_at),
                    committed_at=_t(item.committed_at),
                    report_at=report.received_at if report else None,
                    report_id=report.report_id if report else "",
                    attempts=item.attempts,
                    last_error=item.last_error or "",
                    quarantine_reason=item.quarantine_reason or "",
                )
            )
        return out

    def link_status(self, now: dt.datetime) -> LinkStatus:
        status = self.outbox.status(READING_CENTER_STATUS) or {}
        stats = self.outbox.stats(now.timestamp())
        counts = stats["counts"]
        last_success = _t(status.get("last_success"))
        last_error_at = _t(status.get("last_error_at"))
        down_since = last_error_at if last_error_at and (last_success is None or last_error_at > last_success) else None
        oldest = stats["oldest_waiting_s"]
        return LinkStatus(
            fault=str(status.get("fault") or ""),
            fault_since=_t(status.get("fault_since")) if status.get("fault") else None,
            down_since=down_since,
            last_error=str(status.get("last_error") or ""),
            last_success=last_success,
            waiting=counts.get("queued", 0) + counts.get("sending", 0),
            oldest_waiting=None if oldest is None else now - dt.timedelta(seconds=oldest),
        )

    # -- devices ----------------------------------------------------------------------------------
    def devices(self) -> list[DeviceRecord]:
        return self.registry.all()

    def pair_device(self, user: str, address: str, name: str, *, now: dt.datetime) -> DeviceRecord:
        address = normalise_address(address)
        parts = address.split(":")
        if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789ABCDEF" for c in p) for p in parts):
            raise ConsoleInputError(
                N_("A Bluetooth address looks like AA:BB:CC:DD:EE:FF (it is on the device's label).")
            )
        name = short_text(name)
        record = self.registry.allow(address, name=name, now=now)
        self.audit.record(user, "pair-device", now=now, target=address, detail={"name": name})
        return record

    def unpair_device(self, user: str, address: str, *, now: dt.datetime) -> bool:
        done = self.registry.disallow(address, now=now)
        if done:
            self.audit.record(user, "unpair-device", now=now, target=normalise_address(address))
        return done

    # -- visits -----------------------------------------------------------------------------------
    def visits(self, limit: int = 50) -> list[VisitView]:
        """The visit book's visits, newest first. Read from visits.db directly, read-only: the
        VisitBook module brings the signing chain's crypto (~8 MB of the console's 64)."""
        path = self.config.data_dir / "visits.db"  # lastmile.visits.book.DB_NAME
        if not path.exists():
            return []
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=15.0)
        try:
            rows = conn.execute(
                "SELECT id, doctor_id, patient_id, household_id, state, started_at, ended_at, flags, distance_m, "
                "fhir_queued_at FROM visits ORDER BY rowid DESC LIMIT ?",
                (int(limit),),
            ).fetchall()
        finally:
            conn.close()
        return [
            VisitView(
                visit_id=r[0],
                doctor_id=r[1],
                patient_id=r[2],
                household_id=r[3] or "",
                state=r[4],
                started_at=from_iso(r[5]),
                ended_at=from_iso(r[6]),
                flags=tuple(json.loads(r[7] or "[]")),
                distance_m=r[8],
                fhir_queued=r[9] is not None,
            )
            for r in rows
        ]

    # -- change detection ---------------------------------------------------------------------------
    def watched_files(self) -> list[Path]:
        from uploader.outbox import DB_NAME as OUTBOX_DB

        return [self.config.data_dir / CLINIC_DB, self.config.data_dir / OUTBOX_DB]


def now_utc() -> dt.datetime:
    return utc_now()
