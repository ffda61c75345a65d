"""Each page's data, gathered on the database thread from `ClinicData` (plain values for the
templates; nothing here renders or speaks a language)."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.metadata
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lastmile import __version__
from lastmile.clinic.device_users import may_have_users
from lastmile.clinic.devices import DeviceProblem, SerialNames
from lastmile.config import Config
from lastmile.console.audit import ACTIONS
from lastmile.console.i18n import N_
from lastmile.console.sources import ClinicData, ReadingView, ReportView, metered_note

if TYPE_CHECKING:
    from lastmile.doctor import VisitsReadCache

DOCTOR_CACHE_S = 60.0
PACKAGES = ("pydicom", "pynetdicom", "bleak", "starlette", "uvicorn", "jinja2", "babel", "argon2-cffi", "sqlite-utils")


@dataclass(frozen=True, slots=True)
class Alert:
    report_id: str
    patient_name: str
    patient_id: str
    received_at: dt.datetime
    unassigned: bool = False  # the ECG was sent without a patient: no name to give


def critical_alerts(data: ClinicData) -> list[Alert]:
    """Critical results not yet acknowledged by anyone (here or by `lastmile report ack`): shown
    on every page until they are. Those reports alone: every report and sent study was read on each
    page and live push (0.36 s at 2,000 reports on x86), and one older than the newest 200 was not said."""
    return [
        Alert(r.report_id, r.patient_name, r.patient_id, r.received_at, r.unassigned)
        for r in data.reports.unacknowledged_critical()
    ]


def acknowledge(data: ClinicData, user: str, report_id: str, now: dt.datetime) -> None:
    data.acknowledge_report(user, report_id, now=now)


def today(data: ClinicData, now: dt.datetime) -> dict[str, Any]:
    session = data.session(now)
    latest = data.latest_ecg(session, now=now)
    held_ecgs = data.held_ecgs(now, session)
    ecg_held = latest is not None and any(h.item_id == latest.item_id for h in held_ecgs)
    found = data.devices()
    readings = data.patient_readings(session.patient_id, session.since, other_ids=session.other_ids) if session else []
    return {
        "session": session,
        "doctor_on_duty": data.doctor_on_duty(now),
        # a scanner whose card a stop did not check in says so (scan again), whatever it did before;
        # one whose card was just refused too (`problem_said_on_today`)
        "devices": [
            d
            for d in found
            if not d.removed
            and (
                d.allowed or d.last_reading_at or d.connected or d.card_said_until(now) or d.problem_said_on_today(now)
            )
        ],
        # device and reading lines name a serial device as Devices does, never by its port
        "serial_names": data.serial_names.devices,
        "reading_devices": reading_device_names(readings, data.serial_names),
        "problem_advice": DEVICE_PROBLEM_ADVICE,
        "readings": readings,
        "mapped_elsewhere": data.mapped_elsewhere(session, now),
        "held": data.held_readings(now, session),
        "held_ecgs": held_ecgs,
        "stick_files": data.refused_stick_files(),
        "ecg": latest,
        "ecg_at_county": None if latest is None else data.ecg_at_county(latest, held_for_doctor=ecg_held),
        "ecg_held": ecg_held,
        "ecg_re_record_noted": latest is not None and data.re_record_noted(latest.item_id),
        "battery_refresh_s": data.config.ble.battery_refresh_s,
        "now": now,
    }


def sent(data: ClinicData, now: dt.datetime) -> dict[str, Any]:
    metered = data.metered_hold(now)  # once for both: the page is rendered every few seconds
    county_metered = data.metered_hold(now, "fhir")  # the readings' bundles
    return {
        "journeys": data.journeys(metered, now=now),
        "readings": data.sent_readings(county_metered, now=now),
        "county_metered": metered_note(county_metered),
        "link": data.link_status(now, metered),
        "now": now,
    }


def report_order(report: ReportView | ReportCard) -> tuple[bool, bool, bool, float]:
    """Unread critical results first, then the other critical ones, then unread reports; newest first."""
    return (
        not (report.critical and report.unread),
        not report.critical,
        not report.unread,
        -report.received_at.timestamp(),
    )


@dataclass(frozen=True, slots=True)
class ReportCard:
    """One ECG's card on the Reports page: the county often sends its reading twice (an SR with
    the text and a PDF of the same reading); one card per report object read as two readings and
    doubled the new-report count. `report` is the one whose words the card shows (text before a
    PDF; an unread critical one first; then the newest); `others` are the rest of the ECG's
    current reports (an amendment has replaced the version it corrects: it is `report` or here)."""

    report: ReportView
    others: tuple[ReportView, ...] = ()

    @property
    def all(self) -> tuple[ReportView, ...]:
        return (self.report, *self.others)

    @property
    def critical(self) -> bool:
        return any(r.critical for r in self.all)

    @property
    def unread(self) -> bool:
        """New for the doctor: any of the ECG's reports not read yet (a PDF that came later too)."""
        return any(r.unread for r in self.all)

    @property
    def received_at(self) -> dt.datetime:
        return max(r.received_at for r in self.all)

    @property
    def opens(self) -> ReportView:
        """What the card's link opens (opening reads it): its words, or what came new since they
        were read (the county's PDF sent later), so that opening the card clears its "new"."""
        return next((r for r in self.all if r.unread), self.report)

    @property
    def critical_unseen(self) -> ReportView | None:
        """The critical result on this ECG the doctor has not said he saw (its button), if any."""
        return next((r for r in self.all if r.critical and r.unread), None)

    @property
    def pdfs(self) -> tuple[ReportView, ...]:
        return tuple(r for r in self.others if r.has_pdf)

    @property
    def other_texts(self) -> tuple[ReportView, ...]:
        return tuple(r for r in self.others if not r.has_pdf)


def _shown_first(report: ReportView) -> tuple[bool, bool, float]:
    return (report.has_pdf, not (report.critical and report.unread), -report.received_at.timestamp())


def report_cards(found: list[ReportView]) -> list[ReportCard]:
    """`found` grouped by ECG (study), in `report_order`: in memory, no query per card (a Pi)."""
    by_study: dict[str, list[ReportView]] = {}
    for report in found:
        by_study.setdefault(report.study_uid or report.report_id, []).append(report)
    cards = []
    for reports_of_study in by_study.values():
        first, *others = sorted(reports_of_study, key=_shown_first)
        cards.append(ReportCard(first, tuple(others)))
    return sorted(cards, key=report_order)


def reports(data: ClinicData, now: dt.datetime) -> dict[str, Any]:
    found = sorted(data.reports.reports(), key=report_order)
    return {"reports": found, "cards": report_cards(found), "now": now}


def report(data: ClinicData, now: dt.datetime, report_id: str, user: str = "") -> dict[str, Any]:
    """One report, opened by `user`: a routine report opened is read (acknowledged, as by
    `lastmile report ack`); a critical one needs the doctor's explicit "I have seen it"."""
    found = data.reports.report(report_id)
    if found is not None and user and found.unread and not found.critical:
        found = data.acknowledge_report(user, report_id, now=now) or found
    return {"report": found, "now": now}


# What a device's problem means for the village doctor, and what to do, by its kind: the row's
# own error (English, technical) stays below it for the county's technician.
DEVICE_PROBLEM_ADVICE: dict[DeviceProblem, str] = {
    DeviceProblem.UNPLUGGED: N_(
        "Unplugged: plug its cable back in and switch it on. Until then nothing it measures arrives."
    ),
    DeviceProblem.UNREADABLE: N_(
        "It sent a measurement that could not be read: please measure again. If this keeps happening, tell the "
        "county IT."
    ),
    DeviceProblem.NOT_A_RESULT: N_(
        "It marks its measurements as tests (demonstration or calibration mode), so they are not kept: switch the "
        "device back to normal measuring."
    ),
    DeviceProblem.CODE_NOT_RECOGNISED: N_(
        "A card or code it scanned was not recognised: scan it again, or type the patient ID."
    ),
    DeviceProblem.CARD_CHECK_DIGIT: N_(
        "The card's number failed its check (its last digit does not match): scan it again, or type the patient ID "
        "from the card."
    ),
    DeviceProblem.NOT_SAVED: N_(
        "A measurement from it could not be saved: please measure again. If this keeps happening, tell the county IT."
    ),
    DeviceProblem.NOTHING_MEASURED: N_(
        "It sent a result, but nothing was measured: check that its probe is connected and placed well, then "
        "measure again."
    ),
    DeviceProblem.ECG_REFUSED: N_(
        "An ECG from it could not be used: please record it again. If this keeps happening, tell the county IT."
    ),
    DeviceProblem.SETTINGS: N_("Its settings have a mistake, so it is not read: please call the county IT."),
    DeviceProblem.FORWARD_NOT_READ: N_(
        "It passes on another device's measurements, which the gateway is not set to read: they wait on it. "
        "Please call the county IT."
    ),
    DeviceProblem.OTHER: N_("It reported a problem: if it keeps happening, tell the county IT."),
}


def reading_device_names(readings: list[ReadingView], names: SerialNames) -> dict[str, str]:
    """What Today calls the device each reading (by its key) came from: a serial device by its
    settings name, the one the serial service stamped it with (`registry_address`); a bridge's,
    one a bridge forwarded or one no longer set up by its maker and model, never its port; a
    Bluetooth one as it calls itself. One stored before the stamp keeps its old words: its maker and
    model if its address is a port (a path), else as its device calls itself."""
    shown: dict[str, str] = {}
    for r in readings:
        if r.registry_address:
            shown[r.key] = names.of_reading(r.registry_address) or r.device_model or r.device
        else:
            shown[r.key] = (r.device_model if r.device_address.startswith("/") else "") or r.device
    return shown


def devices(data: ClinicData, now: dt.datetime) -> dict[str, Any]:
    found, device_users = data.devices(), data.device_users(now)
    mapped = {u.address for u in device_users}
    return {
        "devices": found,
        "problem_advice": DEVICE_PROBLEM_ADVICE,
        "serial_names": data.serial_names.devices,
        "device_users": device_users,
        # the devices whose users the page offers to map: cuffs, scales (a thermometer has no users)
        "with_users": {d.address for d in found if may_have_users(d, mapped)},
        "serial": list(data.config.serial.devices),
        "battery_refresh_s": data.config.ble.battery_refresh_s,
        "now": now,
    }


def visits(data: ClinicData, now: dt.datetime) -> dict[str, Any]:
    found = data.visits()
    names = data.known_names([v.patient_id for v in found], now)
    return {"visits": found, "flagged": [v for v in found if v.flags], "names": names, "now": now}


def versions() -> dict[str, str]:
    """What runs, by name: a program's own, or a catalog string (N_) the page translates."""
    out = {"lastmile": __version__, "Python": platform.python_version(), N_("Linux kernel"): platform.release()}
    try:
        text = Path("/etc/os-release").read_text(encoding="utf-8")
        os_release = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        out[N_("Operating system")] = os_release.get("PRETTY_NAME", "").strip('"')
    except OSError:
        pass
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def system(data: ClinicData, now: dt.datetime, is_admin: bool) -> dict[str, Any]:
    usage = shutil.disk_usage(data.config.data_dir)
    return {
        "now": now,
        "link": data.link_status(now, data.metered_hold(now)),
        "county": data.county_link(now),
        "disk": {"free": usage.free, "total": usage.total, "min_free": data.config.outbox.min_free_mb * 2**20},
        "versions": versions(),
        "users": data.accounts.users() if is_admin else [],
        "audit": data.audit.recent(30) if is_admin else [],
        "audit_actions": ACTIONS,
        "uptime_s": time.monotonic(),
        "pid": os.getpid(),
        "update": update_status(data.config),
    }


def update_status(config: Config) -> dict[str, str]:
    """The software update in a word the page translates: off, installing (the other slot is being
    written), ready (a new slot waits for a quiet moment), retrying (the new version's first boots
    were all cut by the power: it is installed once more), rolled-back (the new version did not come
    up: the old one runs), failed (the county must act), offline (waiting for the link), current."""
    from lastmile.clock import read_boot_id
    from lastmile.services.update import Outcome, read_state, reboot_pending, retry_due, rolled_back

    if not config.update.enabled:
        return {"state": "off"}
    state = read_state(config.data_dir)
    if state is not None and state.installing.get("boot_id") == read_boot_id():
        return {"state": "installing", "version": str(state.installing.get("version", ""))}
    if state is not None and retry_due(state):
        return {"state": "retrying", "version": str(state.installed.get("version", ""))}
    if state is not None and rolled_back(state) is not None:  # until the next version is installed
        return {"state": "rolled-back", "version": str(state.installed.get("version", ""))}
    if state is not None and reboot_pending(state):
        return {"state": "ready", "version": str(state.installed.get("version", ""))}
    outcome = state.last_result.get("outcome") if state is not None else None
    if outcome in (Outcome.SOURCE_FAILED, Outcome.DOWNLOAD_FAILED, Outcome.DEFERRED):
        return {"state": "offline"}
    if outcome in (Outcome.REFUSED, Outcome.NO_SPACE, Outcome.INSTALL_FAILED, Outcome.INDEX_INVALID):
        return {"state": "failed"}
    return {"state": "current"}


@dataclass
class DoctorRuns:
    """This console's doctor runs (`ConsoleState.doctor_runs`; a second console in the process, the
    demo's or a test's, has its own): the last findings, and what its home visits check last read
    (`lastmile.doctor.VisitsReadCache`: visits.db reopened only once changed)."""

    visits: VisitsReadCache | None = None  # made at the first run (lastmile.doctor is imported late)
    at: float | None = None  # when `found` were found (monotonic); None: run again
    found: list[Any] | None = None

    def forget(self) -> None:
        """The next System page runs the checks again (a reload changed what they find)."""
        self.at = None  # what visits.db held is kept: its files say when it changed

    async def findings(self, config: Config) -> list[Any]:
        """`lastmile doctor --offline`'s checks, at most once a minute (they run systemctl and the
        like); the network ones are left to `lastmile doctor` itself: the console's unit reaches
        only the LAN."""
        from lastmile.doctor import Doctor, VisitsReadCache

        if self.found is not None and self.at is not None and time.monotonic() - self.at < DOCTOR_CACHE_S:
            return list(self.found)
        if self.visits is None:
            self.visits = VisitsReadCache()
        visits = self.visits
        found = await asyncio.to_thread(lambda: Doctor(config, offline=True, visits_cache=visits).run_all())
        self.at, self.found = time.monotonic(), found
        return found
