"""What the console shows, read from where the gateway keeps it.

`ClinicData` reads and changes the clinic's state through the modules that own it: the session
(`lastmile.clinic.patients`), held readings (`lastmile.clinic.observations`), devices
(`lastmile.clinic.devices`), the outbox (ECG studies and their journey), visits
(`lastmile.visits.book`). Every change goes through here and into the audit trail with the user
who made it. One thread uses it (the console's database thread): SQLite calls never block the
event loop that serves the pages.

Two sources are interfaces, so tests and the bench can give them in memory:
- `ReportsSource`: returned reports and critical results; by default `stores.StoredReports`, the
  report store in clinic.db (`lastmile/reports/`, what `lastmile report list|show|ack` use).
  Tests may give reports in memory (`tests.console_harness.StaticReports`).
- `HeldEcgSource`: ECGs the outbox holds for the doctor (unassigned, another patient, a
  "re-record" verdict) and the doctor's decisions; by default `stores.OutboxHeldEcgs`, the same
  operations as `lastmile patient assign E<n>` and `lastmile ecg release|discard E<n>`.
A check-in is `lastmile patient set`: the ID checked against `[patient] id_kind` as the commands
check it, STAT and reason on the session, so the ECG recorded next is STAT.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import sqlite3
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from devices.ble.measurement import UNKNOWN_USER  # Bluetooth "unknown user" (0xFF): nobody's
from devices.identity import InvalidPatientIdError, Patient, device_clock_wrong
from devices.observation import Observation
from lastmile.clinic.db import DB_NAME as CLINIC_DB
from lastmile.clinic.db import from_iso, open_clinic_db, utc_now
from lastmile.clinic.device_users import DeviceUser, UserMapping, mapped_names
from lastmile.clinic.devices import (
    DeviceRecord,
    DeviceRegistry,
    SerialNames,
    is_bluetooth_address,
    normalise_address,
)
from lastmile.clinic.names import no_name, same_person_name
from lastmile.clinic.observations import (
    MAPPED_USER,
    OBSERVATION_KIND,
    ObservationStore,
    measured_since,
    observation_from_json,
    summary,
)
from lastmile.clinic.patient_ids import clinic_patient
from lastmile.clinic.patients import CurrentPatient, EndedByCard, PatientChanged, PatientContext, SameName
from lastmile.clinic.stick_files import RefusedStickFile, RefusedStickFiles
from lastmile.config import Config, fhir_naming
from lastmile.console.accounts import Accounts
from lastmile.console.audit import AuditLog
from lastmile.console.i18n import N_
from lastmile.data_dir import open_outbox
from lastmile.ecg.holds import (
    DOCTOR_HOLDS,
    ID_CONFLICT,
    LAN_SOURCE_FORMAT,
    NAME_MISMATCH,
    ecgs_waiting,
    re_recorded,
    set_aside_damaged,
)
from lastmile.reports.report_text import Reader, display_name
from lastmile.reports.sent_readings import SentReading, carrying_bundle, carrying_keys, taken_at
from lastmile.reports.store import ReportStore, SentStudy, is_record_of
from lastmile.reports.views import ecg_time
from lastmile.services.link_status import (
    FHIR_STATUS,
    READING_CENTER_STATUS,
    FhirPlatform,
    fhir_platform,
    reading_center_down,
)
from lastmile.services.metered import MeteredWait, metered_wait, meters
from lastmile.visits.relay_link import released_readings
from uploader.fhir_bundle import observation_key
from uploader.fhir_link import LAST_ERROR_AT, Said
from uploader.outbox import ItemState, Kind, MeterHold, OutboxItem, Priority
from uploader.report_lines import ReportLine

log = logging.getLogger(__name__)

MAX_NAME_LENGTH = 64
MAX_ROW_ID = 2**63 - 1  # SQLite's INTEGER: a larger number makes the driver raise OverflowError
_NOT_PURGED = tuple(
    s.value for s in ItemState if s != ItemState.PURGED
)  # the states of items that still carry a patient
# a quarantined reading is not shown on Today (it is never sent): the states of those that are
_SHOWN_READING_STATES = tuple(s for s in _NOT_PURGED if s != ItemState.QUARANTINED.value)
_PRIORITIES = tuple(int(p) for p in Priority)  # all named, so that the index reaches created_at
RECENT_READINGS = 500  # at most this many readings of the last MAPPED_SHOWN_FOR looked through for mapped ones
RECENT_ECG_ITEMS = 500  # at most this many recent ECGs looked through for a patient's (a clinic records tens a day)


def row_number(text: str) -> int | None:
    """The number of a stored row (report, outbox item, held reading) as an address or a form
    gives it: ASCII digits within SQLite's INTEGER, else None. str.isdigit() alone takes "²"
    (not int()'s) and 25 digits (int()'s, not SQLite's)."""
    text = text.strip()
    if not text or len(text) > len(str(MAX_ROW_ID)) or not (text.isascii() and text.isdigit()):
        return None
    number = int(text)
    return number if 1 <= number <= MAX_ROW_ID else None


class ConsoleInputError(ValueError):
    """Something the user typed cannot be used. `message` is an English catalog string (marked
    with N_), translated with `values` where it is shown."""

    def __init__(self, message: str, **values: object) -> None:
        super().__init__(message % values if values else message)
        self.message = message
        self.values = values


class EcgAssignFailed(Exception):
    """The assign of a held ECG could not be done (its worker crashed, timed out or could not
    start) and the ECG is still held: the doctor is told to try again, not that it was sent.
    `again`: it failed on this ECG before (a worker that fails every time: he is told whom to call)."""

    def __init__(self, message: str, *, again: bool = False) -> None:
        super().__init__(message)
        self.again = again


class EcgDamaged(Exception):
    """The held ECG's file from the cart is damaged: the doctor's answer could not be written into
    it, and it was set aside, never sent (`lastmile.ecg.holds.DamagedEcgError`). He records it
    again for the right patient; trying the answer again would change nothing."""


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
    other_ids: frozenset[str] = frozenset()  # those the doctor said are his other IDs (`patient_ids`)
    # the check-in a scanned card ended to begin this one (the acquire service's: said on Today)
    ended_by_card: EndedByCard | None = None

    @property
    def patient_ids(self) -> frozenset[str]:
        """Every ID of the patient in this session: an ECG under any of them is his."""
        return self.other_ids | {self.patient_id}


@dataclass(frozen=True, slots=True)
class MappedName:
    """A check-in's name for an ID a device user is mapped to under another person's name
    (`DeviceUsers.mapped_otherwise`): the cuff's readings would go out under the check-in's name,
    unasked. Both names as stored (PN); `users`: the device users mapped so, each as (the device
    as the doctor knows it: its name, else its model, else its address; the user's number)."""

    patient_id: str
    typed: str
    mapped: str
    users: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class CheckIn:
    """What a check-in did, for Today to say so: the patient whose check-in it ended (their name,
    else ID), or, for the patient checked in already (`again`), what it changed."""

    session: SessionView
    ended: str = ""
    again: bool = False
    changed: tuple[str, ...] = ()  # of "name", "stat-on", "stat-off", "reason"


def _changes(before: CurrentPatient, after: SessionView) -> tuple[str, ...]:
    """What checking the same patient in again changed in their session."""
    changed = []
    if after.patient_name != before.name:
        changed.append("name")
    if after.stat != before.stat:
        changed.append("stat-on" if after.stat else "stat-off")
    if after.reason != before.reason:
        changed.append("reason")
    return tuple(changed)


def _session_view(current: CurrentPatient) -> SessionView:
    return SessionView(
        current.patient_id,
        current.name,
        current.since,
        current.expires_at,
        current.doctor_id,
        current.stat,
        current.reason,
        current.linked,
        current.ended_by_card,
    )


def _not_shown(current_patient_id: str) -> ConsoleInputError:
    return ConsoleInputError(
        N_("%(patient)s has been checked in since this page was shown: that check-in goes on."),
        patient=current_patient_id,
    )


def _still_shown(current: CurrentPatient | None, shown_patient_id: str) -> None:
    """Refuse acting on the patient a page showed when another has been checked in since."""
    if current is not None and current.patient_id != shown_patient_id.strip():
        raise _not_shown(current.patient_id)


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
    device_user: int | None = None  # a multi-user device's user the reading is of
    device_address: str = ""  # that device's, for "this cuff's user N is ..."
    # whose that user is now, if the doctor said so since (this reading, measured before, stays held)
    user_mapping: UserMapping | None = None
    # held: measured during the current patient's check-in (its Assign box offers that patient);
    # one measured before it (yesterday's, the previous patient's) offers nobody
    during_check_in: bool = False
    patient_id: str = ""  # stored: the ID it was filed under (Today's, of a patient with other IDs)
    device_model: str = ""  # its maker and model, without the port or address `device` ends with
    registry_address: str = ""  # the device registry's address of the device that sent it, if stamped


@dataclass(frozen=True, slots=True)
class MappedReadingView:
    """A reading a device user's mapping stored for another patient than the one checked in."""

    device: str
    device_user: int
    patient_id: str
    patient_name: str
    stored_at: dt.datetime


# Today says where the last few readings a user mapping gave another patient went, this long
MAPPED_SHOWN_FOR = dt.timedelta(minutes=30)
MAPPED_SHOWN = 3


@dataclass(frozen=True, slots=True)
class EcgItemView:
    item_id: int
    sha256: str
    recorded_at: dt.datetime  # when it was recorded (acquired: `recorded_at`)
    patient_id: str
    patient_name: str
    state: str
    stat: bool
    flags: tuple[str, ...]
    quality: dict[str, Any] | None  # the stored quality report (issue 13), when the item carries one
    payload_available: bool
    device_clock_wrong: bool = False  # the cart dated it impossibly (clock reset or ahead): set its clock
    study_uid: str = ""  # the county files its report under it (a purged item's: its sent-study record's)
    committed_at: dt.datetime | None = None  # the county confirmed it keeps it
    quarantine_reason: str = ""
    re_recorded: bool = False  # the doctor's 重做 kept it back (quarantined by him, not refused)
    damaged: bool = False  # set aside here: the cart's file could not take the doctor's answer


@dataclass(frozen=True, slots=True)
class EcgAtCounty:
    """Where Today's ECG is on its way to the county, for the one line under it: the doctor with
    the patient in front of him asks "has the county got it / read it?" (REV-R 4). `where`:
    "waiting" (not at the county yet: queued, sending or held for the doctor), "refused"
    (quarantined), "damaged" (set aside here: the cart's file could not take his answer),
    "re-recorded" (kept back by the doctor's 重做: never sent, his own note says
    so), "sent" (sent, the county's confirmation to come), "at-county" (confirmed)."""

    where: str
    held_for_doctor: bool = False  # "waiting": for his decision on Today, not for the link
    link_down_since: dt.datetime | None = None  # "waiting": the reading center's link is down
    link_refused: bool = False  # "waiting": the reading center refuses this gateway (call the county IT)
    link_fault_since: dt.datetime | None = None
    committed_at: dt.datetime | None = None
    report_id: str = ""  # "at-county" (or "sent"): the county's report on it, when back
    report_at: dt.datetime | None = None
    report_critical: bool = False


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
    metered_held: bool = False  # a routine study the metered link holds now (window shut, budget spent)
    re_recorded: bool = False  # quarantined by the doctor's 重做, not refused: nothing for the county IT
    damaged: bool = False  # set aside here (the cart's file could not take his answer): not the county's refusal
    # held for the doctor now, one of lastmile.ecg.holds.DOCTOR_HOLDS (a patient to settle, a
    # re-record verdict), and when it goes as it is unless they decide: not the link's wait
    hold_reason: str = ""
    hold_until: dt.datetime | None = None
    held_as_written: bool = False  # a cart's LAN object: unanswered, it goes as the cart made it (`HeldEcg`'s)


@dataclass(frozen=True, slots=True)
class ReadingJourney:
    """A reading for the county health platform, where it is: whose it was stored for (a cuff
    user's goes to the patient that user is mapped to, whoever is checked in) and what it is."""

    item_id: int
    patient_id: str
    patient_name: str
    reading: ReadingView | None  # None: its payload cannot be read now (the page says what it can)
    kind: str
    measured_at: dt.datetime | None
    state: str
    sent_at: dt.datetime | None
    attempts: int
    last_error: str
    quarantine_reason: str
    with_visit: bool = False  # it goes in its home visit's bundle (state and time are that bundle's)
    metered_held: bool = False  # the metered county link (fhir.metered) holds the bundle carrying it now
    # relayed into its own bundle, but clinic.db refused its sent record: the reading was put back,
    # unmarked, and a later relay records it (lastmile.services.observation_relay._record)
    record_pending: bool = False


@dataclass(frozen=True, slots=True)
class LinkStatus:
    fault: str  # the reading center refuses this gateway (configuration): call the county IT
    fault_since: dt.datetime | None
    down_since: dt.datetime | None  # transient failures since the last success
    last_error: str
    last_success: dt.datetime | None
    waiting: int  # ECGs waiting for the link only: not those held for the doctor
    oldest_waiting: dt.datetime | None
    # routine studies held by the metered link (reading_center.metered): "window" or "budget",
    # and when they go; "" / None when none waits on it (STAT ECGs never do)
    metered_wait: str = ""
    metered_until: dt.datetime | None = None
    metered_budget_spent: bool = False  # today's budget is used up (whatever it waits for last)
    held_for_doctor: int = 0  # ECGs held for the doctor's decision on Today (not counted in `waiting`)


@dataclass(frozen=True, slots=True)
class MeteredNote:
    """What a metered link holds routine items back for now, and when they go: the Sent page says
    it in the same words on a held ECG and a held reading (sent.html's `metered_note`)."""

    reason: str  # "window" or "budget" (uploader.metering.Blocked.reason)
    until: dt.datetime


def metered_note(metered: MeteredWait | None) -> MeteredNote | None:
    blocked = None if metered is None else metered.blocked
    return None if blocked is None else MeteredNote(blocked.reason, _utc(blocked.until))


@dataclass(frozen=True, slots=True)
class CountyLink:
    """The county health platform (FHIR) as its forwarder judged it in its last rounds: read from
    its status row, never asked over the network (the page is viewed on a Pi)."""

    said: Said | None  # `FhirPlatform.said`: None before the first round that judged it
    when: dt.datetime | None  # the time its row names (`county_row_time`); None: words without one


def _last_sent(platform: FhirPlatform, now: float) -> float | None:
    """The last bundle it took, while it answers."""
    return platform.last_sent_at


def _taking_nothing_since(platform: FhirPlatform, now: float) -> float | None:
    """Since when it takes nothing, once it counts as down (not answering, refusing all, busy past
    a while: `FhirPlatform.down`, as lastmile_link_state says); busy a short while names none."""
    return platform.taking_nothing_since if platform.down(now) else None


class CountyRow(NamedTuple):
    """The System page's county row for one judgement of the FHIR forwarder: its words (msgids,
    worded in the page's language by lastmile.console.app) without a time and with the time it
    names, and which time that is (None: it names none)."""

    without_time: str
    with_time: str
    time: Callable[[FhirPlatform, float], float | None] | None


NOTHING_SENT_YET = N_("nothing sent yet")
WORKING = N_("working, last sent %(time)s")
# By uploader.fhir_link.Said's names (None: nothing judged yet). One judgement added without a row
# here fails tests/test_console_county_link.py.
COUNTY_ROW: dict[str | None, CountyRow] = {
    None: CountyRow(NOTHING_SENT_YET, WORKING, _last_sent),
    "NOTHING": CountyRow(NOTHING_SENT_YET, WORKING, _last_sent),
    "ANSWERED": CountyRow(NOTHING_SENT_YET, WORKING, _last_sent),
    "REFUSED_ONE": CountyRow(
        *(N_("refused one record, the others go on; if this lasts, tell the county IT"),) * 2, None
    ),
    "REFUSES_ALL": CountyRow(
        N_("refusing every record, nothing taken yet; tell the county IT"),
        N_("refusing every record, nothing taken since %(time)s; tell the county IT"),
        _taking_nothing_since,
    ),
    "BUSY": CountyRow(
        N_("busy, will retry by itself"),
        N_("busy, nothing taken since %(time)s; tell the county IT"),
        _taking_nothing_since,
    ),
    "DOWN": CountyRow(*(N_("not answering since %(time)s"),) * 2, _taking_nothing_since),
    "FAULT": CountyRow(*(N_("refused: call the county IT"),) * 2, None),
}


def county_row(said: Said | None) -> CountyRow:
    """The county row for what the forwarder judged (`COUNTY_ROW`)."""
    return COUNTY_ROW[said.name if said else None]


def county_row_time(platform: FhirPlatform, now: float) -> float | None:
    """The time the System page's county row names (`COUNTY_ROW`); None: no time named."""
    which = county_row(platform.said).time
    return which(platform, now) if which else None


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
    readings_sent_alone: int = 0  # went to the county on their own: the visit was never to be sent as it was
    readings_not_sent: int = 0  # released, not sent: quarantined (see the queue) or retried, not sent yet


def person_name(pn: str) -> str:
    """A DICOM person name on a page: the ideographic group alone when there is one
    ("Zhang^San=张^三" -> 张三), written as `report_text.display_name` writes names."""
    groups = (pn or "").split("=")
    return display_name(groups[1] if len(groups) > 1 and groups[1].strip("^ ") else groups[0])


@dataclass(frozen=True, slots=True)
class ReportView:
    """A report returned by the reading center (issue 14), as the Reports page shows it."""

    report_id: str
    study_uid: str
    patient_id: str
    patient_name: str
    ecg_time: dt.datetime | None
    received_at: dt.datetime
    status: str  # "received", "preliminary", "amended" or "withdrawn"
    critical: bool
    reading_doctor: str  # as the page writes it (a PN's ideographic group; free text as written)
    text: str  # the whole report in English as stored (all a report stored before `lines` has)
    has_pdf: bool = False
    quality_verdict: str = ""  # the quality gate's verdict on the ECG when it was sent
    acknowledged_at: dt.datetime | None = None  # read by a doctor (console or `lastmile report ack`)
    acknowledged_by: str = ""
    stat: bool = False
    critical_reasons: tuple[str, ...] = ()
    impressions: tuple[str, ...] = ()  # the reading doctor's conclusion(s), shown first
    findings: tuple[str, ...] = ()
    lines: tuple[ReportLine, ...] | None = None  # the whole report, worded in the page's language
    replaced_by: str = ""  # a newer version replaced this one: the id of the current version
    # the ECG was sent without a patient (held unassigned, never guessed): `patient_id` and
    # `patient_name` are then empty, and the patient the county's report names is only what the
    # county wrote (`county_patient_*`), shown flagged, never as this clinic's record
    unassigned: bool = False
    county_patient_id: str = ""
    county_patient_name: str = ""
    device: str = ""  # the device that recorded the ECG ("" if not known)

    @property
    def unread(self) -> bool:
        return self.acknowledged_at is None

    @property
    def county_patient(self) -> str:
        """The patient the county's report names on an ECG sent without one, as people read it
        ("" when it names none)."""
        return " ".join(x for x in (person_name(self.county_patient_name), self.county_patient_id) if x)


@dataclass(frozen=True, slots=True)
class HeldEcg:
    """An ECG the outbox holds back for the doctor (issues 12 and 13)."""

    item_id: int
    recorded_at: dt.datetime
    # the outbox item's hold reason, one of lastmile.ecg.holds.DOCTOR_HOLDS: "unassigned",
    # "patient-mismatch" (its file names another patient), "re-record" (quality) or
    # "name-mismatch" (the checked-in patient's ID under another name: `patient_name` is the file's)
    # or "patient-id-conflict" (its file's sex or birth date are not what its resident ID says)
    reason: str
    hold_until: dt.datetime
    device: str = ""
    # whose ECG it is now (the outbox item's patient): the row says it, "" for none; held for
    # "patient-mismatch", the patient its file names (a doctor's assignment ends that hold)
    patient_id: str = ""
    patient_name: str = ""
    quality_verdict: str = ""
    # recorded during the current check-in, whatever it is held for: Today says when it was
    # recorded truthfully; only an unassigned one that names nobody offers that patient (`offers_checked_in`)
    during_check_in: bool = False
    stat: bool = False  # urgent: Today shows it first
    checked_in_name: str = ""  # held "name-mismatch": the name the check-in gave `patient_id`
    # that name taken by a check-in with no name (a card; `PatientContext.inherited_ids`), not typed
    # at it: Today says where it came from, and "the ECG's name is right" renames no device user
    checked_in_name_taken: bool = False
    # held "patient-id-conflict": the sex ("M"/"F") and birth date (ISO) its file gives, and its ID's
    file_sex: str = ""
    file_birth_date: str = ""
    id_sex: str = ""
    id_birth_date: str = ""
    # held "unassigned" because its file's patient ID was refused (`lastmile.ecg.intake.refused_patient_meta`):
    # the ID and name as the cart wrote them, and the rule the ID broke ("check-character", "length", ...)
    id_refused: bool = False
    refused_id: str = ""
    refused_name: str = ""
    refused_id_problem: str = ""
    # a cart's LAN object: unanswered, it goes as the cart made it (its ID as written), not "without a patient"
    sent_as_written: bool = False

    @property
    def offers_checked_in(self) -> bool:
        """Its Assign box comes with the checked-in patient's ID typed in: an ECG that names nobody,
        recorded during his check-in. Never one whose file named someone (another patient, or an ID
        refused): one tap would put that person's ECG under the patient checked in."""
        return self.during_check_in and self.reason == "unassigned" and not self.id_refused

    @property
    def refused_who(self) -> str:
        """Whom its refused file named, as the cart wrote it: "李建国 110101196505050016" (the name
        when it is one, `no_name`), for Today's "the ECG machine says ..."."""
        name = person_name(self.refused_name) if not no_name(self.refused_name) else ""
        return " ".join(part for part in (name, self.refused_id) if part)

    @property
    def names_someone(self) -> bool:
        """Its patient's name is a name (not a cart's empty field or placeholder, `no_name`): Today
        may say it and offer "this name is right" (the check-in is never renamed to "^^^^")."""
        return not no_name(self.patient_name)


@dataclass(frozen=True, slots=True)
class EcgAssigned:
    """What assigning a held ECG did, for the page's answer: the patient the ECG now carries (the
    one given, with what its file says of that same ID: `lastmile.ecg.intake.as_on_file`), and
    whether it still waits for the doctor's decision on its quality (held 're-record')."""

    patient: Patient
    waits_for_quality: bool = False


# -- sources -----------------------------------------------------------------------------------------


class ReportsSource(Protocol):
    """Returned reports. The Reports page, the critical alert and the Sent page's "report
    received" step read only this; acknowledging one is `lastmile report ack`."""

    def reports(self, limit: int = 200) -> list[ReportView]: ...

    def unacknowledged_critical(self) -> list[ReportView]:
        """The current critical reports no one acknowledged yet, however old, newest first: the
        banner's, read on every page and every live push, so at the cost of those few alone."""
        ...

    def report(self, report_id: str) -> ReportView | None: ...

    def acknowledge(self, report_id: str, by: str, now: dt.datetime) -> ReportView | None: ...

    def pdf(self, report_id: str) -> bytes | None: ...

    def print_job(self, report_id: str, reader: Reader) -> tuple[str, bytes] | None:
        """(note, document) for the clinic printer, the note "" when none goes first; None: no such report."""
        ...


class HeldEcgSource(Protocol):
    """ECGs held in the outbox for the doctor, and the doctor's decisions on them."""

    def held_ecgs(self, now: dt.datetime) -> list[HeldEcg]: ...

    def assign(self, item_id: int, patient: Patient, *, now: dt.datetime, by: str = "") -> EcgAssigned | None:
        """What the assign did; None when the ECG was no longer held (sent already);
        EcgAssignFailed when it could not be done and the ECG is still held."""
        ...

    def send_anyway(self, item_id: int, *, now: dt.datetime, by: str = "") -> bool: ...

    def discard(self, item_id: int, *, now: dt.datetime, by: str = "") -> bool: ...


# -- input checks ----------------------------------------------------------------------------------


def checked_patient(text: str, name: str, config: Config) -> Patient:
    """The patient as typed or scanned, checked as the commands check it (`clinic_patient`,
    `[patient] id_kind`): with "cn-resident-id" every ID must be a valid GB 11643 number (birth
    date and sex come from it). With any kind of ID allowed (""), what looks like a resident ID
    must still be a valid one: a misread scan must not become a patient. A clinic number is
    taken as it is, trimmed."""
    text = text.strip()
    if not text:
        raise ConsoleInputError(N_("Type or scan the patient's ID."))
    if len(text) > MAX_NAME_LENGTH or _has_invisible(text):
        raise ConsoleInputError(N_("A patient ID has at most %(n)d characters and no line breaks."), n=MAX_NAME_LENGTH)
    name = short_text(name)
    try:
        return clinic_patient(text, name, config)
    except InvalidPatientIdError as exc:
        problem = _ID_PROBLEMS.get(exc.reason)
        raise ConsoleInputError(problem or N_("The resident ID is not valid: check the number.")) from None


def patient_identifier(text: str, config: Config) -> str:
    """The patient ID as typed or scanned, checked (`checked_patient`)."""
    return checked_patient(text, "", config).patient_id


def _has_invisible(text: str) -> bool:
    # Controls (DEL and C1 too), format characters, unassigned code points, line separators:
    # nothing a person types, and nothing a DICOM LO/PN value or the outbox should carry.
    return any(unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp") for ch in text)


def short_text(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > MAX_NAME_LENGTH:
        raise ConsoleInputError(N_("Names and reasons have at most %(n)d characters."), n=MAX_NAME_LENGTH)
    if _has_invisible(text):
        raise ConsoleInputError(N_("Names and reasons cannot contain control characters."))
    return text


def _t(value: float | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, dt.timezone.utc)


def _utc(value: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.timezone.utc)


def recorded_at(item: OutboxItem, study: SentStudy | None = None) -> dt.datetime:
    """When the ECG was recorded (acquired), the time its report gives too: the item's own, else
    its sent-study record's (a purged item's meta is erased), else (neither readable) when it
    entered the gateway."""
    acquired = ecg_time(str(item.meta.get("acquired_at") or "")) or (ecg_time(study.ecg_time) if study else None)
    return acquired or _utc(item.created_at)


def during_check_in(session: SessionView | None, at: dt.datetime) -> bool:
    """A held ECG recorded at `at` was recorded during `session` (the current check-in): its Assign
    box offers that patient; one from before it (yesterday's, the previous patient's) or dated past
    it (a clock running ahead) offers nobody."""
    return session is not None and session.since <= at <= session.expires_at


def _reading_during(obs: Observation, session: SessionView | None) -> bool:
    """A held reading measured during `session`, as `during_check_in` says of an ECG, except that
    whether it came at or after the check-in is the reading's own rule (`measured_since`: at its
    time stamp's resolution; a stored one of unknown time never). A device user's reading is never offered: whose that user is stays the doctor's
    to say (lastmile.clinic.device_users), whoever is checked in."""
    if obs.device_user is not None or session is None:
        return False
    return measured_since(obs, session.since) and obs.measured_at <= session.expires_at


def _doctor_hold(item: OutboxItem, at: float) -> dict[str, Any]:
    """A study's hold for the doctor now (StudyJourney's `hold_reason`, `hold_until`): none when it
    is not held, or held for another reason than the doctor's."""
    if not item.held(at) or item.hold_reason not in DOCTOR_HOLDS:
        return {}
    return {
        "hold_reason": item.hold_reason,
        "hold_until": _t(item.hold_until),
        "held_as_written": item.meta.get("source_format") == LAN_SOURCE_FORMAT,
    }


def _marks(values: Sequence[object]) -> str:
    """One SQL parameter mark per value, for an IN (...)."""
    return ",".join("?" * len(values))


def _mapped_reading(created_at: float, meta: dict[str, Any], patient: dict[str, Any]) -> MappedReadingView:
    return MappedReadingView(
        str(meta.get("device") or ""),
        int(meta[MAPPED_USER]),
        str(patient.get("patient_id") or ""),
        str(patient.get("name") or ""),
        _utc(created_at),
    )


def _mapping_of(obs: Observation, mapped: dict[tuple[str, int], UserMapping]) -> UserMapping | None:
    """Whose the device user `obs` is of is now, if the doctor said so (`mapped`: by address, user)."""
    if obs.device_user is None:
        return None
    return mapped.get((normalise_address(obs.device.address or ""), obs.device_user))


def _sent_reading_journey(item: OutboxItem, record: SentReading) -> ReadingJourney:
    """A purged reading as its sent record keeps it."""
    reading = ReadingView(
        record.record_key, record.kind, record.summary, record.device, record.measured_at, record.time_source
    )
    return ReadingJourney(
        item_id=item.id,
        patient_id=record.patient_id,
        patient_name=record.patient_name,
        reading=reading,
        kind=record.kind,
        measured_at=record.measured_at,
        state=item.state.value,
        sent_at=record.sent_at,  # `_carried` says where it is
        attempts=item.attempts,
        last_error="",
        quarantine_reason="",
    )


def _carried(
    journey: ReadingJourney,
    record: SentReading,
    bundles: Mapping[str, OutboxItem],
    hold: MeterHold | None,
    at: float,
) -> ReadingJourney:
    """A relayed reading (its own item done) is where the bundle carrying it is (`_in_bundle`).
    The bundle (among `bundles`, by key: those of the records knowing no sent time) is looked up
    only while the record knows no sent time."""
    bundle = None if record.sent_at is not None else carrying_bundle(bundles.get, record)
    with_visit = record.visit_id is not None and (bundle is None or bundle.key != record.bundle_key)
    return _in_bundle(journey, bundle, record.sent_at or taken_at(bundle), hold, at, with_visit=with_visit)


def _in_bundle(
    journey: ReadingJourney,
    bundle: OutboxItem | None,
    sent_at: dt.datetime | None,
    hold: MeterHold | None,
    at: float,
    *,
    with_visit: bool = False,
    record_pending: bool = False,
) -> ReadingJourney:
    """A reading where `bundle` carrying it is: sent at `sent_at` when the county platform took
    that bundle, else waiting for it - for the metered link if `hold` (what it holds at `at`)
    takes the bundle - or refused with the bundle's reason; waiting while there is no bundle yet."""
    if sent_at is not None:
        return replace(
            journey,
            state=ItemState.SENT.value,
            sent_at=sent_at,
            with_visit=with_visit,
            record_pending=record_pending,
        )
    return replace(
        journey,
        state=ItemState.QUEUED.value if bundle is None else bundle.state.value,
        sent_at=None,
        attempts=0 if bundle is None else bundle.attempts,
        last_error="" if bundle is None else bundle.last_error or "",
        quarantine_reason="" if bundle is None else bundle.quarantine_reason or "",
        metered_held=bundle is not None and hold is not None and hold.holds(bundle, at),
        with_visit=with_visit,
        record_pending=record_pending,
    )


def _observation_in(item_id: int, payload: bytes) -> Observation | None:
    """The reading outbox item `item_id` stores; None if it cannot be read (logged)."""
    try:
        return observation_from_json(json.loads(payload))
    except Exception as exc:  # noqa: BLE001 — one unreadable item must not take the page down
        log.warning("outbox item %d: cannot show it (%s)", item_id, type(exc).__name__)
        return None


def _reading_view(obs: Observation) -> ReadingView:
    return ReadingView(
        obs.record_key,
        obs.kind,
        summary(obs),
        obs.device.label(),
        obs.measured_at,
        obs.time_source.value,
        obs.flags,
        # Today names a serial device's by its settings name (`views.reading_device_names`)
        device_address=obs.device.address or "",
        device_model=" ".join(p for p in (obs.device.manufacturer, obs.device.model) if p),
        registry_address=obs.registry_address,
    )


def _device_user_number(text: str) -> int:
    """A device's user as a form gives it: 0-254 (255 is Bluetooth's "unknown user")."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) < UNKNOWN_USER:
        raise ConsoleInputError(N_("A device user is a number from 0 to 254."))
    return int(text)


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
        from lastmile.console.stores import OutboxHeldEcgs, StoredReports

        self.db = open_clinic_db(config.data_dir)
        self.outbox = open_outbox(config)
        # one store for the clinic's sent_studies and reports, the Sent page's reads each view
        self.report_store = ReportStore(self.db)
        self.reports: ReportsSource = reports or StoredReports(self.report_store)
        self.held_ecg_source: HeldEcgSource = held_ecgs or OutboxHeldEcgs(self.outbox, config)
        self.context = PatientContext(self.db, config.patient.idle_timeout_s)
        self.registry = DeviceRegistry(self.db)
        self.serial_names = SerialNames.of(config)  # once: the pages' names of its serial devices
        self.store = ObservationStore(self.outbox, self.db, self.context)
        c = config.console
        self.accounts = Accounts(
            self.db, max_failures=c.max_login_failures, lockout_s=c.lockout_s, idle_s=c.session_idle_s
        )
        self.audit = AuditLog(self.db)
        self.stick_files = RefusedStickFiles(self.db)
        # the readings shown at the last patient_readings, by (item id, payload hash, its patient
        # ID): a redraw reads and parses only the new ones
        self._shown_readings: dict[tuple[int, str, str], ReadingView | None] = {}

    def close(self) -> None:
        self.outbox.close()
        self.db.conn.close()

    # -- the session ------------------------------------------------------------------------------
    def session(self, now: dt.datetime) -> SessionView | None:
        current = self.context.current(now)
        if current is None:
            return None
        # with his other IDs the doctor linked and whom his card replaced: both on the session's row
        return _session_view(current)

    def doctor_on_duty(self, now: dt.datetime) -> str:
        return self.context.current_doctor(now) or ""

    def check_in(
        self,
        user: str,
        patient_text: str,
        name: str,
        doctor: str,
        stat: bool | None,
        reason: str,
        *,
        now: dt.datetime,
        shown_patient_id: str | None = None,
        clear_name: bool = False,
        clear_reason: bool = False,
        same_name: SameName | None = None,
        correct_name: bool = False,
    ) -> CheckIn:
        """Check the patient in; for the patient checked in already, what is left empty (the
        name, the reason, `stat` None) stays as it was, unless cleared on purpose (`clear_name`,
        `clear_reason`: a wrong one typed). `shown_patient_id`: the patient a page showed (its
        "not urgent" and clear buttons) or `same_name_replaced` saw ("": nobody; None: whoever),
        refused if another has been checked in since.
        `same_name`: the doctor's answer to `same_name_replaced` (None: unasked).
        `correct_name`: the doctor's answer to `mapped_otherwise`: the typed name is right, the
        device users mapped to the ID under another one take it for good (`correct_name`)."""
        patient = checked_patient(patient_text, name, self.config)
        doctor = short_text(doctor)
        reason = short_text(reason)
        # as `lastmile patient set --stat --reason`: the next ECG recorded is STAT, with its reason
        try:
            checked = self.context.check_in(
                patient.patient_id,
                patient.name,
                now=now,
                stat=stat,
                reason=reason,
                expected_patient_id=shown_patient_id,
                clear_name=clear_name,
                clear_reason=clear_reason,
                doctor_id=doctor,  # in its transaction: a refused check-in changes no doctor
                same_name=same_name,
            )
        except PatientChanged as exc:
            if not exc.current_patient_id:
                raise self._ended_meanwhile(shown_patient_id or "", patient.patient_id, now) from None
            raise _not_shown(exc.current_patient_id) from None
        renamed = correct_name and bool(patient.name)
        if renamed:  # the check-in and its name are the doctor's: his mapped users go under it for good
            self.context.correct_name(patient.patient_id, patient.name, now=now)
        before, view = checked.before, _session_view(checked.after)
        again = before is not None and before.patient_id == view.patient_id
        changed = _changes(before, view) if before is not None and again else ()
        self.audit.record(
            user,
            "check-in",
            now=now,
            target=patient.patient_id,
            detail={"name": view.patient_name, "doctor": doctor, "stat": view.stat, "reason": view.reason}
            | ({"changed": list(changed)} if again else {})
            | (
                {"same_name": same_name.value, "replaced": before.patient_id}
                if same_name is not None and before is not None
                else {}
            )
            | ({"name_corrected": True} if renamed else {}),
        )
        ended = before.name or before.patient_id if before is not None and not again else ""
        return CheckIn(view, ended=ended, again=again, changed=changed)

    def _ended_meanwhile(self, shown_patient_id: str, patient_id: str, now: dt.datetime) -> ConsoleInputError:
        """The check-in of the patient the page (or its question) showed ended before this one was
        saved - ended on another screen, or idle too long: nobody is checked in, nothing changed.
        A button of his own session (not urgent, clear) is not pressed again for a patient gone."""
        shown = person_name(self.context.known_name(shown_patient_id, now)) or shown_patient_id
        if patient_id == shown_patient_id.strip():
            return ConsoleInputError(
                N_(
                    "%(patient)s's check-in ended before this was saved (it was ended, or nothing happened "
                    "for too long): nothing was changed. If the patient is still here, check them in again."
                ),
                patient=shown,
            )
        return ConsoleInputError(
            N_(
                "%(patient)s's check-in ended before yours was saved (it was ended, or nothing happened for "
                "too long): nobody is checked in and nothing was changed. Press “Check in” again."
            ),
            patient=shown,
        )

    def mapped_otherwise(self, patient_text: str, name: str) -> MappedName | None:
        """The check-in typed (`patient_text`, `name`) would rename device users mapped to its ID
        under another person's name: the doctor says which name is right (None: nothing to ask,
        or a check-in the form refuses: it says why)."""
        try:
            patient = checked_patient(patient_text, name, self.config)
        except ConsoleInputError:
            return None
        users = self.store.device_users.mapped_otherwise(patient.patient_id, patient.name)
        if not users:
            return None
        named = tuple((self._device_called(u.address), u.user_id) for u in users)
        return MappedName(patient.patient_id, patient.name, users[0].mapping.patient_name, named)

    def _device_called(self, address: str) -> str:
        """A device as the doctor knows it: the name it was paired with, else its model, else its address."""
        record = self.registry.get(address)
        return (record.name or record.model if record is not None else "") or address

    def same_name_replaced(self, patient_text: str, name: str, now: dt.datetime) -> tuple[str, SessionView | None]:
        """Whom the check-in typed (`patient_text`, `name`) is decided about: the patient checked
        in now ("": nobody), whom it expects still if nothing is asked; and him again if it would
        replace him by another ID under his own name: the doctor says whether it corrects a
        mistyped ID, is his other ID or another patient (None: nothing to ask, or a check-in the
        form refuses: it says why)."""
        # read before the question: a card read between the two is refused by the check-in
        # (another patient than expected), never taken for the one the question was about
        current = self.context.current(now)
        seen = "" if current is None else current.patient_id
        try:
            patient = checked_patient(patient_text, name, self.config)
        except ConsoleInputError:
            return seen, None
        replaced = self.context.same_name_replaced(patient.patient_id, patient.name, now)
        return seen, None if replaced is None else _session_view(replaced)

    def end_session(self, user: str, *, now: dt.datetime, shown_patient_id: str = "") -> bool:
        """End the session of the patient the page showed (`shown_patient_id`; "" from a page of
        before it said: whoever is current). A page left open while someone else checked in
        another patient ends nothing: it says who is checked in now."""
        current = self.context.current(now)
        if current is None:
            return False
        if shown_patient_id:
            _still_shown(current, shown_patient_id)
        # clear() ends only this patient's session (atomically): the audit names the one ended
        ended = self.context.clear(now=now, reason="ended-by-doctor", patient_id=current.patient_id)
        if ended:
            self.audit.record(user, "end-session", now=now, target=current.patient_id)
        return ended

    # -- readings ---------------------------------------------------------------------------------
    def _unpurged_item_ids(self, kind: str, *, limit: int) -> list[int]:
        # The last `limit` items of `kind` not purged, whenever they came (the Sent page has no
        # time window), newest first: the states left are named so that the items_claim index
        # finds them, not a scan of every purged row.
        sql = f"SELECT id FROM items WHERE state IN ({_marks(_NOT_PURGED)}) AND kind = ? ORDER BY id DESC LIMIT ?"
        params = (*_NOT_PURGED, kind, int(limit))
        return [int(r[0]) for r in self.outbox.db.conn.execute(sql, params).fetchall()]

    def patient_readings(
        self, patient_id: str, since: dt.datetime, limit: int = 20, *, other_ids: Iterable[str] = ()
    ) -> list[ReadingView]:
        """The readings stored on `patient_id`, or on his `other_ids` (`SessionView.other_ids`: a
        BP taken under his first ID is his), since `since` (their session's start), newest first,
        each with the ID it was filed under. One statement however many there are (Today is
        redrawn every few seconds): which are there now; only a reading not shown at the previous
        call has its payload read (checked by the outbox) and parsed, once."""
        patient_ids = sorted({patient_id, *other_ids})
        # states and priorities named: the items_claim index (state, kind, priority, created_at)
        # finds the session's readings, not a scan of every row ever queued on every SSE wake
        rows = self.outbox.db.conn.execute(
            "SELECT id, sha256, json_extract(patient, '$.patient_id') FROM items "
            f"WHERE state IN ({_marks(_SHOWN_READING_STATES)}) AND kind = ? "
            f"AND priority IN ({_marks(_PRIORITIES)}) AND created_at >= ? "
            f"AND json_extract(patient, '$.patient_id') IN ({_marks(patient_ids)}) ORDER BY id DESC LIMIT ?",
            (
                *_SHOWN_READING_STATES,
                OBSERVATION_KIND,
                *_PRIORITIES,
                since.timestamp(),
                *patient_ids,
                int(limit),
            ),
        ).fetchall()
        shown = [(int(item_id), str(digest), str(filed_under)) for item_id, digest, filed_under in rows]
        new = [shown_one[0] for shown_one in shown if shown_one not in self._shown_readings]
        payloads = self.outbox.read_payloads(new) if new else {}
        views: dict[tuple[int, str, str], ReadingView | None] = {}
        for item_id, digest, filed_under in shown:
            if (item_id, digest, filed_under) in self._shown_readings:
                views[item_id, digest, filed_under] = self._shown_readings[item_id, digest, filed_under]
            elif item_id in payloads:  # else quarantined or unreadable now: asked again next time
                view = self._reading_from(item_id, payloads[item_id])
                views[item_id, digest, filed_under] = None if view is None else replace(view, patient_id=filed_under)
        self._shown_readings = views
        return [view for view in views.values() if view is not None]

    def mapped_elsewhere(self, session: SessionView | None, now: dt.datetime) -> list[MappedReadingView]:
        """The last MAPPED_SHOWN readings stored in the last MAPPED_SHOWN_FOR for a patient other
        than the one checked in because the doctor mapped their device user to that patient
        (user 2 is 张三 while 李四 is checked in), newest first: stored by design, said so on Today."""
        # the recent readings by index (items_claim), filtered here: a SQL filter on their JSON
        # scanned every row ever queued, on every wake of every tablet's Today
        shown_id = session.patient_id if session else None
        recent = self.outbox.newest(OBSERVATION_KIND, since=(now - MAPPED_SHOWN_FOR).timestamp(), limit=RECENT_READINGS)
        mapped = [
            item
            for item in recent
            if item.meta.get(MAPPED_USER) is not None and (item.patient or {}).get("patient_id") not in (None, shown_id)
        ]
        return [_mapped_reading(item.created_at, item.meta, item.patient or {}) for item in mapped[:MAPPED_SHOWN]]

    @staticmethod
    def _reading_from(item_id: int, payload: bytes) -> ReadingView | None:
        obs = _observation_in(item_id, payload)
        return None if obs is None else _reading_view(obs)

    def _put_back(self, items: Mapping[int, OutboxItem], observations: Mapping[int, Observation]) -> dict[int, str]:
        """Item id -> its own bundle's key, of each reading (`observations`, by item) still waiting:
        one the relay put back (clinic.db refused its record) has its bundle queued, maybe taken
        already; one never relayed has none. (One a home visit carries would be found by its
        record's visit alone: the page cannot know it - it says waiting until its record is written.)"""
        naming = fhir_naming(self.config)
        return {
            item_id: observation_key(obs, naming)
            for item_id, obs in observations.items()
            if (item := items.get(item_id)) is not None and item.state in (ItemState.QUEUED, ItemState.SENDING)
        }

    def held_readings(self, now: dt.datetime, session: SessionView | None = None) -> list[ReadingView]:
        """The held readings, each saying whether it was measured during `session` (the current
        check-in): only such a one is offered to that patient, never one from before it. A device
        user's says whose that user is now, if the doctor has said so (saying it again overwrites)."""
        mapped = {(u.address, u.user_id): u.mapping for u in self.device_users(now)}
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
                device_user=h.observation.device_user,
                device_address=h.observation.device.address or "",
                user_mapping=_mapping_of(h.observation, mapped),
                during_check_in=_reading_during(h.observation, session),
            )
            for h in self.store.held()
        ]

    def assign_reading(self, user: str, held_id: int, patient_text: str, *, now: dt.datetime) -> Patient:
        """Give the held reading to the patient typed (named as check-in named them, if it is the
        patient checked in); the patient it went to, for the page to say whose it now is."""
        patient = self.context.named(checked_patient(patient_text, "", self.config), now)
        patient_id = patient.patient_id
        held = self.store.get_held(held_id)
        if held is None:
            raise ConsoleInputError(N_("That reading has been assigned already."))
        result = self.store.assign(held_id, patient_id, name=patient.name, now=now)
        self.audit.record(
            user,
            "assign-reading",
            now=now,
            target=patient_id,
            detail={"held_id": held_id, "kind": held.observation.kind, "outbox_item": result.item_id},
        )
        return patient

    # -- a multi-user device's users ----------------------------------------------------------------
    def device_users(self, now: dt.datetime) -> list[DeviceUser]:
        """Every mapping the doctor made, each named as its user's next reading will be (`mapped_names`)."""
        users = self.store.device_users.mappings()
        names = mapped_names([u.mapping for u in users], self.context, now)
        return [replace(u, mapping=replace(u.mapping, patient_name=name)) for u, name in zip(users, names, strict=True)]

    def map_device_user(
        self, user: str, address: str, user_text: str, patient_text: str, *, checked_in: bool, now: dt.datetime
    ) -> str:
        """`lastmile patient map-user ADDRESS USER --patient ID|--current`: readings of that user of
        the device from now on are that patient's (the ID checked as everywhere: `checked_patient`),
        or whoever is checked in. Readings measured before stay held, as with the CLI. Returns the
        patient ID ("" for whoever is checked in)."""
        user_id = _device_user_number(user_text)
        patient = None if checked_in else checked_patient(patient_text, "", self.config)
        if not is_bluetooth_address(address):
            raise ConsoleInputError(
                N_("A Bluetooth address looks like AA:BB:CC:DD:EE:FF (it is on the device's label).")
            )
        patient = self.store.device_users.map_patient(address, user_id, patient, context=self.context, now=now)
        patient_id = patient.patient_id if patient else ""
        target = normalise_address(address)
        self.audit.record(
            user, "map-device-user", now=now, target=target, detail={"user": user_id, "patient": patient_id}
        )
        return patient_id

    def unmap_device_user(self, user: str, address: str, user_text: str, *, now: dt.datetime) -> bool:
        """`lastmile patient map-user ADDRESS USER --remove`: user 1's readings are the checked-in
        patient's again, another user's held."""
        user_id = _device_user_number(user_text)
        done = self.store.device_users.unmap_user(address, user_id)
        if done:
            target = normalise_address(address)
            self.audit.record(user, "unmap-device-user", now=now, target=target, detail={"user": user_id})
        return done

    # -- ECGs -------------------------------------------------------------------------------------
    def latest_ecg(
        self, session: SessionView | None, *, within: dt.timedelta = dt.timedelta(hours=12), now: dt.datetime
    ) -> EcgItemView | None:
        """The recent ECG Today shows: with a patient checked in, that patient's newest (never
        another's nor one with no patient under their name: those wait in "待指定患者"); with
        nobody checked in, the one stored last (the panel says whose, or that it has none)."""
        # the outbox's indexed newest-first query: no ECG in the window reads no old rows
        since = (now - within).timestamp()
        items = self.outbox.newest(Kind.DICOM, since=since, limit=1 if session is None else RECENT_ECG_ITEMS)
        sent = self._sent_studies_of_purged(items)
        if session is None:
            return self._ecg_of(items[0], sent.get(items[0].id)) if items else None
        for item in items:
            if self._ecg_patient_id(item, sent.get(item.id)) in session.patient_ids:
                return self._ecg_of(item, sent.get(item.id))
        return None

    def _sent_studies_of_purged(self, items: Sequence[OutboxItem]) -> dict[int, SentStudy]:
        """The sent-study records of the purged ones of `items`, by item id. The purge erases an
        item's patient with its payload once the county confirmed it (seconds on a good link, with
        no retention): whose ECG it was is then what sent_studies recorded when it went. None read
        when none is purged."""
        return self.report_store.studies_of_items([i for i in items if i.state == ItemState.PURGED])

    @staticmethod
    def _ecg_patient_id(item: OutboxItem, study: SentStudy | None) -> str:
        return str((item.patient or {}).get("patient_id") or (study.patient_id if study else ""))

    def ecg(self, item_id: int) -> EcgItemView | None:
        item = self.outbox.get(item_id)
        if item is None or item.kind != Kind.DICOM:
            return None
        return self._ecg_of(item, self._sent_studies_of_purged([item]).get(item.id))

    def _ecg_of(self, item: OutboxItem, study: SentStudy | None = None) -> EcgItemView:
        """`study`: its sent-study record, for a purged item (its patient and meta erased)."""
        patient = item.patient or {}
        quality = item.meta.get("quality")
        return EcgItemView(
            item_id=item.id,
            sha256=item.sha256,
            recorded_at=recorded_at(item, study),
            patient_id=self._ecg_patient_id(item, study),
            patient_name=str(patient.get("name") or (study.patient_name if study else "")),
            state=item.state.value,
            stat=item.priority == 0,
            flags=tuple(item.meta.get("flags") or ()),
            quality=quality if isinstance(quality, dict) else None,
            payload_available=item.state not in (ItemState.PURGED, ItemState.QUARANTINED),
            device_clock_wrong=device_clock_wrong(item.meta.get("flags") or ()),
            study_uid=str(item.meta.get("study_uid") or (study.study_uid if study else "")),
            committed_at=_t(item.committed_at),
            quarantine_reason=item.quarantine_reason or "",
            re_recorded=re_recorded(item),
            damaged=set_aside_damaged(item),
        )

    def ecg_at_county(self, ecg: EcgItemView, *, held_for_doctor: bool = False) -> EcgAtCounty:
        """Where `ecg` is on its way to the county; `held_for_doctor`: held now for his decision
        (Today's held ECGs). Today's live panels are rendered again on every change: one indexed
        statement at most (the link's status row while it waits; its reports by study, by index,
        once sent), never the Sent page's list of every report."""
        if ecg.re_recorded:
            return EcgAtCounty("re-recorded")
        if ecg.damaged:
            return EcgAtCounty("damaged")
        if ecg.state == ItemState.QUARANTINED.value:
            return EcgAtCounty("refused")
        if held_for_doctor:  # it goes when he decides (or its hold runs out), whatever the link (sent.html)
            return EcgAtCounty("waiting", held_for_doctor=True)
        if ecg.state not in (ItemState.SENT.value, ItemState.COMMITTED.value, ItemState.PURGED.value):
            status = self.outbox.status(READING_CENTER_STATUS) or {}
            if status.get("fault"):
                return EcgAtCounty("waiting", link_refused=True, link_fault_since=_t(status.get("fault_since")))
            down = reading_center_down(status)
            return EcgAtCounty("waiting", link_down_since=_t(status.get(LAST_ERROR_AT)) if down else None)
        where = "sent" if ecg.state == ItemState.SENT.value else "at-county"
        found = self.report_store.reports(study_uid=ecg.study_uid, current_only=True) if ecg.study_uid else []
        if not found:
            return EcgAtCounty(where, committed_at=ecg.committed_at)
        # an SR and a PDF of one reading are one report back: a critical one speaks for it, else the first
        report = next((r for r in found if r.critical), min(found, key=lambda r: (r.received_at, r.id)))
        return EcgAtCounty(
            where,
            committed_at=ecg.committed_at,
            report_id=str(report.id),
            report_at=report.received_at,
            report_critical=bool(report.critical),
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

    def held_ecgs(self, now: dt.datetime, session: SessionView | None = None) -> list[HeldEcg]:
        """The held ECGs, each saying whether it was recorded during `session` (for every reason:
        one of another patient recorded during the visit is not "from before it")."""
        return [replace(h, during_check_in=during_check_in(session, h.recorded_at)) for h in self._held_now(now)]

    def _held_now(self, now: dt.datetime) -> list[HeldEcg]:
        """The held ECGs, one held for its name naming its ID as the session knows it now
        (`PatientContext.known_names`): the doctor may have corrected that name on another ECG of
        the same ID since this one was held. The check-in's name stored with it at intake is only
        for an ID the session no longer knows: offered, it would send one ID under two names. An
        ID whose name was cleared since (`PatientContext.cleared_ids`) has none: the name stored
        then is the one the doctor cleared, neither worded nor offered."""
        held = self.held_ecg_source.held_ecgs(now)
        ids = {h.patient_id for h in held if h.reason == NAME_MISMATCH}
        known, taken = self.context.known_names(ids, now), self.context.inherited_ids(ids, now)
        cleared = self.context.cleared_ids(ids, now)
        return [
            replace(
                h,
                checked_in_name="" if h.patient_id in cleared else known.get(h.patient_id) or h.checked_in_name,
                checked_in_name_taken=h.patient_id in taken,
            )
            if h.reason == NAME_MISMATCH
            else h
            for h in held
        ]

    def assign_ecg(self, user: str, item_id: int, patient_text: str, *, now: dt.datetime) -> EcgAssigned | None:
        """Give the held ECG to the patient typed (named as check-in named them, if it is the
        patient checked in; the assign keeps what its own file gives with that ID): what it did,
        for the page to say whose it now is, or None if it was no longer held (sent already);
        EcgAssignFailed if it could not be done and is still held."""
        patient = self.context.named(checked_patient(patient_text, "", self.config), now)
        with self._answer_audited(user, "assign-ecg", item_id, target=patient.patient_id, now=now) as detail:
            assigned = self.held_ecg_source.assign(item_id, patient, now=now, by=user)
            detail["done"] = assigned is not None
        return assigned

    @contextlib.contextmanager
    def _answer_audited(
        self, user: str, action: str, item_id: int, *, target: str, now: dt.datetime
    ) -> Iterator[dict[str, object]]:
        """Audit the doctor's answer on held ECG `item_id` once it is done, into the detail the
        body fills ("done" ...): an answer the assign worker failed (EcgAssignFailed) is audited
        too, marked "failed", and one the ECG's damaged file could not carry (EcgDamaged), "damaged"."""
        detail: dict[str, object] = {"item": item_id, "done": False}
        try:
            yield detail
        except EcgAssignFailed:
            detail["failed"] = True
            raise
        except EcgDamaged:
            detail["damaged"] = True  # set aside, not sent
            raise
        finally:
            self.audit.record(user, action, now=now, target=target, detail=detail)

    def _held_for(self, item_id: int, reason: str, now: dt.datetime) -> HeldEcg | None:
        """The ECG `item_id` if it is held now for `reason` (NAME_MISMATCH: a name that is not the
        check-in's; ID_CONFLICT: a sex or birth date its resident ID contradicts)."""
        found = [h for h in self._held_now(now) if h.item_id == item_id]
        return found[0] if found and found[0].reason == reason else None

    def _id_patient(self, patient_id: str, name: str) -> Patient:
        """`patient_id` under `name`, with the birth date and sex a resident ID gives; one that is
        no valid ID under this configuration (the number as the cart wrote it, what intake kept of
        it) with nothing more."""
        try:
            return clinic_patient(patient_id, name, self.config)
        except InvalidPatientIdError:
            return Patient(patient_id, name)

    def ecg_is_checked_in_patients(self, user: str, item_id: int, *, now: dt.datetime) -> EcgAssigned | None:
        """The doctor's "it is his" on an ECG held for its name: it goes under the ID it carries and
        the name the check-in gave that ID (the one Today showed). The file's birth date and sex
        were its name's person's (`lastmile.ecg.intake.as_on_file`): only what the ID itself says
        (a resident ID) goes with it. None: no longer held for its name (sent already, or decided
        on another screen)."""
        held = self._held_for(item_id, NAME_MISMATCH, now)
        assigned = None
        target = held.patient_id if held else str(item_id)
        with self._answer_audited(user, "ecg-checked-in-name", item_id, target=target, now=now) as detail:
            if held is not None and held.checked_in_name:  # none (cleared since): no name to send it under
                patient = self._id_patient(held.patient_id, held.checked_in_name)  # the number is his, as checked in
                assigned = self.held_ecg_source.assign(item_id, patient, now=now, by=user)
                detail["done"] = assigned is not None
        return assigned

    def ecg_with_id_values(self, user: str, item_id: int, *, now: dt.datetime) -> EcgAssigned | None:
        """The doctor's "it is his: the ID is right" on an ECG whose file's sex or birth date its
        resident ID contradicts: it goes under its ID and name with the sex and birth date the ID
        says (`lastmile.ecg.intake.as_on_file`). None: no longer held for that (sent already, or
        decided on another screen)."""
        held = self._held_for(item_id, ID_CONFLICT, now)
        assigned = None
        target = held.patient_id if held else str(item_id)
        with self._answer_audited(user, "ecg-id-values", item_id, target=target, now=now) as detail:
            if held is not None:
                patient = self._id_patient(held.patient_id, held.patient_name)  # the ID's birth date and sex
                assigned = self.held_ecg_source.assign(item_id, patient, now=now, by=user)
                detail["done"] = assigned is not None
        return assigned

    def ecg_name_right(self, user: str, item_id: int, *, now: dt.datetime) -> EcgAssigned | None:
        """The doctor's "the ECG's name is right" on an ECG held for its name: the ECG is given its
        own file's patient (only that hold ends: one held for its quality too still waits for his
        "record again" or "send anyway"), and then - only once that is done - the check-in's name
        of that ID is corrected (`PatientContext.correct_name`: what the session sends from now
        on; its device users too, unless that name was taken by a check-in with no name: mapped
        to an ID typed alone by mistake, they are another patient's, and nobody asked). The ECG is in the outbox, the name in clinic.db: no one transaction holds both, so the
        name follows the ECG; an ECG gone meanwhile renames nobody. That ID's other ECGs held for
        this same name end their name hold with it (`_release_held_under`). None: no longer held for its
        name, or its name is no name (a cart's placeholder: nobody to rename him to)."""
        held = self._held_for(item_id, NAME_MISMATCH, now)
        assigned = None
        target = held.patient_id if held else str(item_id)
        with self._answer_audited(user, "ecg-name-right", item_id, target=target, now=now) as detail:
            detail |= {"name": held.patient_name if held else "", "released": []}
            if held is not None and held.names_someone:
                assigned = self.held_ecg_source.assign(
                    item_id, Patient(held.patient_id, held.patient_name), now=now, by=user
                )
                detail["done"] = assigned is not None
                if assigned is not None:
                    # no device user renamed for a name taken, nor for an ID the session knows no name
                    # of now (cleared: nobody said whose his cuff is)
                    named_now = bool(self.context.known_name(held.patient_id, now))
                    self.context.correct_name(
                        held.patient_id,
                        held.patient_name,
                        now=now,
                        rename_devices=named_now and not held.checked_in_name_taken,
                    )
                    detail["released"] = self._release_held_under(held, now=now, by=user)
        return assigned

    def _release_held_under(self, corrected: HeldEcg, *, now: dt.datetime, by: str) -> list[int]:
        """After "the ECG's name is right" on `corrected`: the other ECGs of its ID held for a name
        that is the one just made right (one cart, the same patient's ECGs) are assigned to their
        own file's patient, as `corrected` was - their name hold ends, one held for its quality too
        still waits. Left held, they asked again about a name already settled. Their items."""
        released: list[int] = []
        for other in self.held_ecg_source.held_ecgs(now):
            if (
                other.item_id != corrected.item_id
                and other.reason == NAME_MISMATCH
                and other.patient_id == corrected.patient_id
                and other.names_someone
                and same_person_name(other.patient_name, corrected.patient_name)
                and self._assigned_if_possible(other, now=now, by=by)
            ):
                released.append(other.item_id)
        return released

    def _assigned_if_possible(self, held: HeldEcg, *, now: dt.datetime, by: str) -> bool:
        """`held` given its own file's patient; False if no longer held, or if it could not be
        done (it stays held, asked about again: the one the doctor answered is done)."""
        try:
            patient = Patient(held.patient_id, held.patient_name)
            return self.held_ecg_source.assign(held.item_id, patient, now=now, by=by) is not None
        except EcgAssignFailed as exc:
            log.warning("%s: left held", exc)
            return False

    # -- ECG files on the USB stick that were not imported ------------------------------------------
    def refused_stick_files(self) -> list[RefusedStickFile]:
        """The stick's refused files the doctor has not yet said he has seen (Today's 待处理)."""
        return self.stick_files.unseen()

    def stick_file_seen(self, user: str, file_id: int, *, now: dt.datetime) -> bool:
        """He has seen that this file did not come in: no longer on Today (False: gone already)."""
        done = self.stick_files.seen(file_id, by=user, now=now)
        self.audit.record(user, "stick-file-seen", now=now, target=str(file_id), detail={"done": done})
        return done

    def send_anyway(self, user: str, item_id: int, *, now: dt.datetime) -> bool:
        done = self.held_ecg_source.send_anyway(item_id, now=now, by=user)
        self.audit.record(user, "send-anyway", now=now, target=str(item_id), detail={"done": done})
        return done

    def re_record(self, user: str, item_id: int, *, now: dt.datetime) -> str:
        """The doctor will record again (the new ECG comes as a new study): a held one is never
        sent (`lastmile ecg discard`); one already on its way is only noted. What the page says:
        "re-record" (kept back now), "re-record-already" (kept back by an earlier re-record: a
        second click, another tablet), "re-record-gone" (no such ECG here, or purged) or
        "re-record-set-aside" (quarantined for another reason, e.g. its file damaged: never sent)
        or "re-record-too-late" (on its way: it goes as it is)."""
        discarded = self.held_ecg_source.discard(item_id, now=now, by=user)
        self.audit.record(user, "re-record", now=now, target=str(item_id), detail={"discarded": discarded})
        return "re-record" if discarded else self._not_re_recorded(item_id)

    def _not_re_recorded(self, item_id: int) -> str:
        """Why a re-record kept nothing back now, from the ECG as it is."""
        item = self.outbox.get(item_id)
        if item is None or item.kind != Kind.DICOM or item.state == ItemState.PURGED:
            return "re-record-gone"
        if re_recorded(item):
            return "re-record-already"
        # set aside by the outbox (a damaged file, refused by the PACS): not on its way either
        return "re-record-set-aside" if item.state == ItemState.QUARANTINED else "re-record-too-late"

    def acknowledge_report(self, user: str, report_id: str, *, now: dt.datetime) -> ReportView | None:
        """The doctor has read this report: the store's acknowledgement (`lastmile report ack`).
        The store keeps the first acknowledgement; the audit trail says the same. A later click
        (another screen still showing the button) is audited apart, "acknowledge-report-again",
        naming who acknowledged first: an auditor asking who acknowledged a critical result gets
        one doctor, and still sees who else confirmed seeing it."""
        before = self.reports.report(report_id)
        if before is None:
            return None
        done = self.reports.acknowledge(report_id, user, now)
        if done is None:
            return None
        # unread before and now ours: this call acknowledged it (not `lastmile report ack` meanwhile)
        if before.unread and done.acknowledged_by == user:
            self.audit.record(user, "acknowledge-report", now=now, target=report_id)
        else:
            first = done.acknowledged_at.isoformat() if done.acknowledged_at else ""
            self.audit.record(
                user,
                "acknowledge-report-again",
                now=now,
                target=report_id,
                detail={"acknowledged_by": done.acknowledged_by, "acknowledged_at": first},
            )
        return done

    def re_record_noted(self, item_id: int) -> bool:
        """The doctor's re-record kept this ECG back (one already released goes as it is): the
        ECG's own state says so, whatever was clicked after."""
        item = self.outbox.get(item_id)
        return item is not None and re_recorded(item)

    # -- the journey of each study ------------------------------------------------------------------
    def journeys(
        self, metered: MeteredWait | None, limit: int = 50, *, now: dt.datetime | None = None
    ) -> list[StudyJourney]:
        """The latest studies, each with where it is; `metered`: what the metered link holds now
        (`metered_hold`)."""
        by_study = {r.study_uid: r for r in self.reports.reports()}
        at = (now or utc_now()).timestamp()
        hold = None if metered is None else metered.hold
        out = []
        items = self.outbox.latest_ecgs(limit)  # one index search, the items with it
        # a purged item's patient and study UID are erased with its payload: what was sent is
        # remembered in sent_studies (as the Reports page shows it)
        sent = self.report_store.studies_of_items(items)
        for item in items:
            study = sent.get(item.id)
            patient = item.patient or {}
            report = by_study.get(str(item.meta.get("study_uid") or (study.study_uid if study else "")))
            out.append(
                StudyJourney(
                    item_id=item.id,
                    patient_id=str(patient.get("patient_id") or (study.patient_id if study else "")),
                    patient_name=str(patient.get("name") or (study.patient_name if study else "")),
                    stat=item.priority == 0,
                    state=item.state.value,
                    recorded_at=recorded_at(item, study),
                    sent_at=_t(item.sent_at),
                    committed_at=_t(item.committed_at),
                    report_at=report.received_at if report else None,
                    report_id=report.report_id if report else "",
                    attempts=item.attempts,
                    last_error=item.last_error or "",
                    quarantine_reason=item.quarantine_reason or "",
                    metered_held=hold is not None and hold.holds(item, at),
                    re_recorded=re_recorded(item),
                    damaged=set_aside_damaged(item),
                    **_doctor_hold(item, at),
                )
            )
        return out

    def sent_readings(
        self, metered: MeteredWait | None = None, limit: int = 50, *, now: dt.datetime | None = None
    ) -> list[ReadingJourney]:
        """The latest readings for the county health platform, newest first, each with whose it
        is and where it is. A purged one (its patient and payload erased) is shown as its sent
        record keeps it (`sent_readings` in clinic.db), else left out. A relayed one is where the
        bundle carrying it is (`_carried`): sent only once the platform took it, held if the
        metered county link holds that bundle (`metered`: `metered_hold(now, "fhir")`)."""
        at = (now or utc_now()).timestamp()
        hold = None if metered is None else metered.hold
        # the outbox's by index (named states), the purged ones' from their records: no scan of
        # every purged row
        records = {r.outbox_item_id: r for r in self.report_store.recent_sent_readings(limit)}
        waiting = self._unpurged_item_ids(OBSERVATION_KIND, limit=limit)
        item_ids = sorted({*waiting, *records}, reverse=True)[:limit]
        payloads = self.outbox.read_payloads(item_ids)
        items = self.outbox.get_many(item_ids)  # one statement for the page, not one per reading
        observations = {i: obs for i, p in payloads.items() if (obs := _observation_in(i, p)) is not None}
        put_back = self._put_back(items, observations)
        untaken = [r for i, r in records.items() if i in items and r.sent_at is None]
        bundles = self.outbox.find_many([k for r in untaken for k in carrying_keys(r)] + list(put_back.values()))
        out = []
        for item_id in item_ids:
            item = items.get(item_id)
            if item is None:
                continue
            record = records.get(item_id)
            if record is not None and not is_record_of(record.record_key, item):
                record = None  # an earlier outbox's item of the same id
            if item.state == ItemState.PURGED:  # also one purged since `waiting` was read
                if record is not None:
                    out.append(_carried(_sent_reading_journey(item, record), record, bundles, hold, at))
                continue
            patient = item.patient or {}
            obs = observations.get(item_id)
            journey = ReadingJourney(
                item_id=item.id,
                patient_id=str(patient.get("patient_id") or ""),
                patient_name=str(patient.get("name") or ""),
                reading=None if obs is None else _reading_view(obs),
                kind=str(item.meta.get("kind") or ""),
                measured_at=from_iso(item.meta.get("measured_at")),
                state=item.state.value,
                sent_at=_t(item.sent_at),
                attempts=item.attempts,
                last_error=item.last_error or "",
                quarantine_reason=item.quarantine_reason or "",
            )
            if record is not None and item.state in (ItemState.SENT, ItemState.COMMITTED):  # relayed
                journey = _carried(journey, record, bundles, hold, at)
            elif (bundle := bundles.get(put_back.get(item_id, ""))) is not None:
                # relayed, then put back unmarked (its record refused, or a relay cut short): where
                # its own bundle is - maybe taken by the platform already - its record still to write
                journey = _in_bundle(journey, bundle, taken_at(bundle), hold, at, record_pending=record is None)
            out.append(journey)
        return out

    def link_status(self, now: dt.datetime, metered: MeteredWait | None) -> LinkStatus:
        """The reading center's link; `metered`: what its metered link holds now (`metered_hold`)."""
        status = self.outbox.status(READING_CENTER_STATUS) or {}
        last_success = _t(status.get("last_success"))
        last_error_at = _t(status.get(LAST_ERROR_AT))
        down_since = last_error_at if reading_center_down(status) else None
        ecgs = ecgs_waiting(self.outbox.db.conn, now.timestamp())
        blocked = None if metered is None else metered.blocked
        return LinkStatus(
            fault=str(status.get("fault") or ""),
            fault_since=_t(status.get("fault_since")) if status.get("fault") else None,
            down_since=down_since,
            last_error=str(status.get("last_error") or ""),
            last_success=last_success,
            waiting=ecgs.waiting,
            oldest_waiting=None if ecgs.oldest is None else _utc(ecgs.oldest),
            metered_wait=blocked.reason if blocked else "",
            metered_until=dt.datetime.fromtimestamp(blocked.until, dt.timezone.utc) if blocked else None,
            metered_budget_spent=bool(blocked) and metered is not None and metered.budget_spent_today,
            held_for_doctor=ecgs.held_for_doctor,
        )

    def county_link(self, now: dt.datetime) -> CountyLink | None:
        """The county health platform's link; None when none is configured (fhir.base_url)."""
        if not self.config.fhir.base_url:
            return None
        platform = fhir_platform(self.outbox.status(FHIR_STATUS))
        return CountyLink(platform.said, _t(county_row_time(platform, now.timestamp())))

    def metered_hold(self, now: dt.datetime, destination: str = "dicom") -> MeteredWait | None:
        """Why routine items wait on `destination`'s metered link now (ECGs: "dicom"; readings'
        and visits' bundles: "fhir") and since when, if any do (lastmile.services.metered: the
        sender's own `Meter`, as `lastmile queue` and the doctor say it)."""
        meter = meters(self.config, self.outbox).get(destination)
        if meter is None:
            return None
        wait = metered_wait(meter, self.outbox, now.timestamp(), count=False)
        return wait if wait.holding else None

    # -- devices ----------------------------------------------------------------------------------
    def devices(self) -> list[DeviceRecord]:
        return self.registry.all(self.config)

    def pair_device(self, user: str, address: str, name: str, *, now: dt.datetime) -> DeviceRecord:
        address = normalise_address(address)
        if not is_bluetooth_address(address):
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
            released = released_readings(conn, [r[0] for r in rows], self.config.data_dir)
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
                readings_sent_alone=released[r[0]].sent,
                readings_not_sent=released[r[0]].not_sent,
            )
            for r in rows
        ]

    def known_names(self, patient_ids: list[str], now: dt.datetime) -> dict[str, str]:
        """The name the gateway holds for each of `patient_ids` where it holds one, as a page
        shows it (`person_name`), in one order: what the session knows
        (`PatientContext.known_names`, the owner: the checked-in patient's, or the latest
        check-in's within NAME_KEPT), else what only the data carries - the newest an outbox item
        (an ECG or a reading, until purged) carries, else a sent study's. The gateway keeps no
        register of names: a patient it never saw named has none."""
        wanted = sorted({p for p in patient_ids if p})
        session = self.context.known_names(wanted, now)
        found = {**self._names_in_data([p for p in wanted if p not in session]), **session}
        return {pid: shown for pid, name in found.items() if (shown := person_name(name))}

    def _names_in_data(self, wanted: list[str]) -> dict[str, str]:
        """The newest name an outbox item carries for each of `wanted`, else a sent study's."""
        if not wanted:
            return {}
        marks = _marks(wanted)
        studies = self.db.conn.execute(
            f"SELECT patient_id, patient_name FROM sent_studies WHERE patient_id IN ({marks}) "
            "AND patient_name != '' ORDER BY sent_at",
            wanted,
        ).fetchall()
        # states and kinds named: the items_claim index finds the named ones (an ECG or a reading;
        # a purged one carries no patient), not a scan of every row ever queued on each Visits view
        items = self.outbox.db.conn.execute(
            "SELECT json_extract(patient, '$.patient_id'), json_extract(patient, '$.name') FROM items "
            f"WHERE state IN ({_marks(_NOT_PURGED)}) AND kind IN (?, ?) "
            f"AND json_extract(patient, '$.patient_id') IN ({marks}) "
            "AND json_extract(patient, '$.name') != '' ORDER BY id",
            (*_NOT_PURGED, Kind.DICOM, OBSERVATION_KIND, *wanted),
        ).fetchall()
        return {str(pid): str(name) for pid, name in [*studies, *items]}  # the newest last: it wins

    # -- change detection ---------------------------------------------------------------------------
    def watched_files(self) -> list[Path]:
        from uploader.outbox import DB_NAME as OUTBOX_DB

        return [self.config.data_dir / CLINIC_DB, self.config.data_dir / OUTBOX_DB]


def now_utc() -> dt.datetime:
    return utc_now()
