"""Serial devices in the acquire service: bridges, ASCII-report monitors and card scanners.

    service = SerialService.open(config, outbox=outbox)   # outbox owned by the caller
    service.start()          # a thread running the link manager
    ...
    service.close()

Each configured `[[serial.devices]]` entry (`name`, `match`, `profile`, optional `baudrate` and,
for a bridge, `forward_profile`) becomes a `LinkSpec`; the profile decides the handler:

- `bridge`: the bridge protocol (docs/bridge-protocol.md). Measurements go to the observation
  store (outbox, or held unassigned), streamed ECGs through `enqueue_recording` into the outbox;
  only then is the message acknowledged. SERIAL_DATA is parsed with `forward_profile`.
- `scanner`: ID/health-card codes set the clinic session's patient or doctor.
- any other name: an ASCII-report profile (built-in `firmware_bridge/profiles/` or
  `serial.profiles_dir`), whose reports become observations. A profile file that does not load
  stops only the devices naming it: one naming it as `profile` is not started, a bridge naming it
  as `forward_profile` runs with its forwarded lines refused (kept on the bridge); the status
  (the device's, or `<bridge>:forwarded`) says which file and line is wrong; the other devices run.

Device status (connected, last reading, last error) goes to the device registry (clinic.db) under
the address `serial:<name>`, which `lastmile devices` lists next to the BLE devices.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

# loaded at the start (serial_spill imports it lazily, for the console): an ECG held at a stop
# then needs no first import from a code tree replaced since
import devices.ecg.npz  # noqa: F401
from devices.ascii_report import ReportParsed, ReportParser, ReportProfile, ReportRejected
from devices.bridge import codec
from devices.bridge.session import (
    BridgeSession,
    DeviceHello,
    DeviceLog,
    EcgEndUnknown,
    ObservationReady,
    RecordingReady,
    SerialDataReceived,
    SessionEvent,
    SessionProblem,
)
from devices.device_errors import (
    CANNOT_STORE,
    CODE_NOT_RECOGNISED,
    ECG_REFUSED,
    FORWARD_NOT_READ,
    NOT_STARTED,
    REPORT_REJECTED,
)
from devices.ecg.recording import EcgRecording
from devices.errors import DeviceError
from devices.identity import Patient, TimeSource
from devices.observation import Observation
from devices.scanner import CodeUnrecognised, DoctorScanned, PatientScanned, ScannerDecoder, ScanRules
from firmware_bridge.serial_link import (
    BY_ID_DIR,
    Link,
    LinkSpec,
    LinkStatus,
    PortInfo,
    PortMatch,
    SerialLinkManager,
    list_ports,
)
from lastmile import __version__
from lastmile.clinic.db import iso
from lastmile.clinic.devices import (
    CARD_DOCTOR,
    CARD_PATIENT,
    HELD_AT_STOP,
    DeviceProblem,
    DeviceRecord,
    DeviceRegistry,
    HeldReadings,
    forwarded_name,
    held_words,
    lost_message,
    lost_on_disk_message,
    normalise_address,
    serial_address,
    waiting_message,
)
from lastmile.clinic.observations import ObservationStore, summary
from lastmile.clinic.patients import PatientContext
from lastmile.config import (
    SERIAL_HANDLERS,
    Config,
    ConfigError,
    devices_naming,
    load_profiles_apart,
    serial_device_problems,
)
from lastmile.ecg.intake import enqueue_recording, session_request
from lastmile.services.serial_spill import (
    ECG_SPILL_BYTES,
    ECG_SPILL_NAME,
    SPILL_NAME,
    CardGivenUp,
    LeftAtStopFile,
    RowBehind,
    SpillFile,
    cards_given_up_file,
    kept_in,
    rows_behind_file,
)
from uploader.errors import InvalidObjectError, UploadError
from uploader.outbox import Outbox, is_storage_full
from uploader.sqlite_store import BUSY_TIMEOUT_MS, StopWaits, WaitGivenUp, gave_up_at_stop, give_up_waits_on

log = logging.getLogger(__name__)
# past a card's wait for clinic.db's lock, what else a turn writes (under the stop: a second each)
TURN_WRITE_MARGIN_S = 2.0

BRIDGE, SCANNER = SERIAL_HANDLERS
DEFAULT_BAUD = {BRIDGE: 115200, SCANNER: 9600}
ASCII_IDLE_FLUSH_S = 5.0  # a device quiet this long: finish (or reject) the report in hand
TIME_SYNC_EVERY_S = 600.0
# the row error of a report in which nothing was measured (a newer kind than migration 0026's
# words, so not among devices.device_errors' words)
NOTHING_MEASURED = "report with nothing measured:"
ERROR_STATUS_EVERY_S = 5.0  # a port spewing garbage must not turn into a database write per frame
RETRY_STORE_S = 30.0


class RecordingRefused(Exception):
    """A recording no DICOM ECG object can hold (a rate outside 200-1000 Hz ...): storing it again
    would fail again, so it is refused at once rather than held and retried."""


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# -- configuration -------------------------------------------------------------------------------


def refused_devices(config: Config, bad: dict[str, str]) -> dict[str, str]:
    """Device name -> why it is not started or read: its `profile` is a bad file (the device is not
    started), or a bridge's `forward_profile` is (only the forwarded device, `forwarded_name`: the
    bridge and its ECG run)."""
    refused: dict[str, str] = {}
    for i, key, name in devices_naming(config.serial.devices, bad):
        device = config.serial.devices[i]["name"]
        if key == "profile":
            refused[device] = f"{NOT_STARTED}its profile {name!r} is refused: {bad[name]}"
        elif device not in refused:  # a device not started forwards nothing either
            refused[forwarded_name(device)] = (
                f"not read (the bridge runs): its forward_profile {name!r} is refused: {bad[name]}"
            )
    return refused


def link_specs(config: Config, profiles: dict[str, ReportProfile], bad: dict[str, str] | None = None) -> list[LinkSpec]:
    """`[[serial.devices]]` as link specs, leaving out the devices that name a `bad` profile (see
    `refused_devices`; a bridge whose `forward_profile` is bad runs, its forwarded lines refused);
    ConfigError names the entry and what is wrong (the same checks `lastmile config check` runs,
    there with the file's line)."""
    bad = bad or {}
    problems = serial_device_problems(config.serial.devices, [*profiles, *bad])
    if problems:
        i, _key, message = problems[0]
        raise ConfigError(f"{config.source}: serial.devices[{i}]: {message}")
    refused = refused_devices(config, bad)
    specs = []
    for entry in config.serial.devices:
        if entry["name"] in refused:
            continue
        name, match, profile = entry["name"], entry["match"], entry["profile"]
        options = {"forward_profile": entry.get("forward_profile", "")}
        if forwarded_name(name) in refused:
            options["forward_refused"] = refused[forwarded_name(name)]
        default_baud = profiles[profile].baudrate if profile in profiles else DEFAULT_BAUD[profile]
        baud = entry.get("baudrate", default_baud)
        specs.append(LinkSpec(name, PortMatch.parse(match), profile, baud, options))
    return specs


def scan_rules(config: Config) -> ScanRules:
    try:
        return ScanRules.from_patterns(
            config.serial.patient_card_pattern, config.serial.doctor_badge_pattern, config.patient.id_kind
        )
    except DeviceError as exc:
        raise ConfigError(f"{config.source}: {exc}") from None


def clear_refusals_fixed_since(registry: DeviceRegistry, specs: Sequence[LinkSpec], *, now: dt.datetime) -> None:
    """A device (or a bridge's forwarded device) refused at an earlier start, started now that
    its profile is fixed: its refusal is no fault any more, even while it stays unplugged (the
    doctor warns of an error newer than the device was last seen)."""
    for spec in specs:
        own = serial_address(spec.name)
        record = registry.get(own)
        if record is not None and record.problem is DeviceProblem.SETTINGS:  # its refusal, whatever its words
            registry.update_status(own, now=now, transport="serial", error="")
        if spec.options.get("forward_profile") and "forward_refused" not in spec.options:
            forwarded = serial_address(forwarded_name(spec.name))
            record = registry.get(forwarded)
            if record is not None and record.last_error:  # only ever its refusal: nothing connects to it
                registry.update_status(forwarded, now=now, transport="serial", error="")


# -- what handlers share -------------------------------------------------------------------------


@dataclass
class Unstored:
    """What one device sent that the outbox refused (e.g. briefly full). The device cannot
    resend it (a monitor prints once; a bridge streams an ECG once), so it is kept per device,
    not per connection: a handler dies with its connection, a re-plugged device gets a new one;
    and in the spill files, past a power cut."""

    observations: list[Observation] = field(default_factory=list)
    recordings: dict[str, EcgRecording] = field(default_factory=dict)  # by outbox key
    next_retry: float = 0.0  # time.monotonic()
    cause: str = ""  # why its last try to store failed, when not space: the row's held cause
    # its last try was refused for want of space ("" above is that, or not tried yet since the
    # start): a stop giving up the next one keeps it, so its advice is not lost
    refused_for_space: bool = False

    def __bool__(self) -> bool:
        return bool(self.observations or self.recordings)


@dataclass
class RowError:
    """What `SerialContext.error` wrote on one device row in its window of ERROR_STATUS_EVERY_S."""

    since: float  # time.monotonic(): when the window began
    said: set[DeviceProblem] = field(default_factory=set)  # the kinds written in it
    pending: TimedError | None = None  # the latest repeat held back
    shown: tuple[DeviceProblem, dt.datetime] | None = None  # the kind it wrote last, and since when

    def over(self) -> bool:
        return time.monotonic() - self.since >= ERROR_STATUS_EVERY_S

    def hold(self, spec: LinkSpec, message: str, problem: DeviceProblem, now: dt.datetime) -> None:
        """Hold back `message`, the latest, with the time the first of its kind happened: the one
        held already, else the one the row shows (its error since then), else now."""
        if self.pending is not None and self.pending.problem is problem:
            now = self.pending.at
        elif self.shown is not None and self.shown[0] is problem:
            now = self.shown[1]
        self.pending = TimedError(spec, message, problem, now)


@dataclass(frozen=True)
class TimedError:
    """A row error `SerialContext.error` writes, and when it happened (held back: the first of its kind)."""

    spec: LinkSpec
    message: str
    problem: DeviceProblem
    at: dt.datetime


@dataclass
class SerialContext:
    """Everything a handler needs to make things durable and report status."""

    config: Config
    outbox: Outbox
    store: ObservationStore
    patients: PatientContext
    registry: DeviceRegistry
    profiles: dict[str, ReportProfile]
    rules: ScanRules
    now: Callable[[], dt.datetime] = utc_now
    _row_errors: dict[str, RowError] = field(default_factory=dict)  # by device name (see `error`)
    unstored: dict[str, Unstored] = field(default_factory=dict)  # by device (spec) name
    spill: SpillFile | None = None  # the unstored observations, on disk too (a power cut)
    ecg_spill: SpillFile | None = None  # the unstored streamed ECGs, on disk too
    # by device row address: how many ECG_ENDs a bridge may resend of the ECGs this start found a
    # stop lost (the lost FAIL says them: their NACK is not the row's error too), until the first
    # connection it spoke on ends: a later unknown ECG_END is a new loss, the row's error
    lost_ecg_ends: dict[str, int] = field(default_factory=dict)
    stopping: bool = False  # the service's stop gave up a store: what waits now is said at INFO, expected
    # by device row address: the held status a row write did not get while some of what waited was
    # in memory only (`_say_waiting`), kept in a file at the close for the next start (`RowBehind`)
    rows_behind: dict[str, RowBehind] = field(default_factory=dict)
    # their file: one from the start's reading to its forgetting, and the stop's save
    rows_behind_file: LeftAtStopFile[tuple[str, RowBehind]] = field(init=False)
    # the cards a stop gave up: one from the start's reading to its forgetting, and the stop's save
    cards_given_up_file: LeftAtStopFile[CardGivenUp] = field(init=False)

    # the card (badge) whose check-in a scanner's turn is writing, set before its write and cleared
    # after: the close reads it without the turn's locks when it gives that turn up (`CardGivenUp`)
    card_in_hand: CardGivenUp | None = None
    # a card whose write failed once the stop was set (its own lock wait ran out before the
    # close's did): the close keeps it as it keeps the one in hand; a later card's check-in clears it
    card_failed: CardGivenUp | None = None
    # the acquire service's stop (`SerialService.open`), and the close's: a write failing after
    # either is one the stop cost, not a fault the running gateway says on its own
    stop: threading.Event | None = None
    closing: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.rows_behind_file = rows_behind_file(Path(self.config.data_dir))
        self.cards_given_up_file = cards_given_up_file(Path(self.config.data_dir))

    def stop_set(self) -> bool:
        """The acquire service's stop or the close's is set (`stop`, `closing`): a write failing now
        is one the stop cost."""
        return self.closing.is_set() or (self.stop is not None and self.stop.is_set())

    def status(self, spec: LinkSpec, port: str = "", **facts: object) -> bool:
        """Record device facts; `port` (given on connect) goes into the name `lastmile devices` shows.
        False if the row could not be written (best effort)."""
        if not self._write_status(spec, port, **facts):
            return False
        if isinstance(facts.get("error"), str):  # another writer's error (an unplug ...): `error`'s window ends
            self._row_errors.pop(spec.name, None)
        elif facts.get("seen") and spec.name in self._row_errors:
            # heard well since: what waited is over, and what the row showed too - an error after
            # it is a new one, said with its own time (not the first's, before the good reading)
            row = self._row_errors[spec.name]
            row.pending = row.shown = None
        return True

    def _write_status(self, spec: LinkSpec, port: str = "", **facts: object) -> bool:
        name = f"{spec.name} ({spec.profile}) on {port}" if port else None
        try:
            self.registry.update_status(
                serial_address(spec.name),
                now=self.now(),
                transport="serial",
                name=name,
                **facts,  # type: ignore[arg-type]
            )
        except Exception as exc:  # status is best effort; readings are not
            if not status_given_up(spec, exc):
                log.exception("%s: cannot record device status", spec.name)
            return False
        return True

    def error(self, spec: LinkSpec, message: str, problem: DeviceProblem) -> None:
        """Write `spec`'s row error, each kind at most once in a window of ERROR_STATUS_EVERY_S (a
        port spewing garbage, of one kind or several in turn, is no database write per frame): a
        kind not written in it yet at once (a store error just after a rejected report is the row's
        cause, not dropped); a repeat waits, the latest, to the window's end (`write_pending_errors`),
        so the row ends saying the last cause. Another writer's error (an unplug) ends the window."""
        row = self._row_errors.get(spec.name)
        if row is None or row.over():
            row = self._row_errors[spec.name] = RowError(time.monotonic())
        if problem in row.said:
            row.hold(spec, message, problem, self.now())
        else:
            self._write_error(row, TimedError(spec, message, problem, self.now()))

    def write_pending_errors(self, *, now: bool = False) -> None:
        """Write the latest error each row's window held back, once it is over (`now`: at once, at
        a stop): a new window begins. Runs in the link manager's thread, as the handlers do."""
        for row in self._row_errors.values():
            if row.pending is not None and (now or row.over()):
                pending = row.pending
                row.since, row.said, row.pending = time.monotonic(), set(), None
                self._write_error(row, pending)

    def _write_error(self, row: RowError, error: TimedError) -> None:
        """Write `error` on its row, with the time it happened (a held-back one's is seconds ago)."""
        if self._write_status(error.spec, error=error.message[:200], problem=error.problem, error_at=error.at):
            row.said.add(error.problem)
            row.shown = (error.problem, error.at)

    def nothing_measured(self, spec: LinkSpec, report: ReportParsed) -> None:
        """`report` had nothing measured in it (every value "not measured", none required): no
        reading, but the device answered, and its row says so until its next reading. Only for a
        framed report (the device printed it for a measurement): a start-less monitor prints
        "SPO2 -- %" every second while no finger is in it, which is no measurement. Said once
        while the row says it: a repeat before the next reading is no log line and no row write."""
        if not report.framed:
            return
        row = self._row_errors.get(spec.name)
        if row is not None and row.shown is not None and row.shown[0] is DeviceProblem.NOTHING_MEASURED:
            log.debug("%s: another report with nothing measured: the row says it already", spec.name)
            return
        log.warning("%s: a report with nothing measured (%d lines): no reading stored", spec.name, report.lines)
        self.error(
            spec, f"{NOTHING_MEASURED} {report.lines} line(s), every value not measured", DeviceProblem.NOTHING_MEASURED
        )

    def store_observation(
        self, spec: LinkSpec, obs: Observation, *, held: bool = False, forwarded: bool = False
    ) -> bool:
        """Make `obs` durable (outbox or held); False if it could not be stored now. `held`: the
        caller holds it then, and the row's held status says it waits for space (not its error
        too, unless another cause than space refused it). `forwarded`: `spec` is the bridge that
        forwarded it from the device on its RS-232 port."""
        now = self.now()
        # stamped with its device's registry address: the console names a reading by the device
        # that sent it, not by its port (which a renamed or moved device's old row may still name)
        device = serial_address(forwarded_name(spec.name) if forwarded else spec.name)
        obs = replace(obs, registry_address=device)
        try:
            result = self.store.record(obs, now=now)
        except (UploadError, DeviceError, sqlite3.Error, OSError, ValueError) as exc:
            if gave_up_at_stop(exc):  # the stop's, not a fault: held (spill file) for the next start, or resent
                log.info("%s: stopping: a %s observation not stored yet: %s", spec.name, obs.kind, exc)
                self.stopping = True  # what waits now is said at INFO too: expected
                if held:  # its own cause, not space: no free-space advice for a stop
                    self._held_cause(spec, HELD_AT_STOP)
                return False
            log.error("%s: cannot store a %s observation: %s", spec.name, obs.kind, exc)
            message, space = f"{CANNOT_STORE}reading: {exc}", is_storage_full(exc)
            if not held or not space:
                self.error(spec, message, DeviceProblem.NOT_SAVED)
            else:
                self._store_error_over(spec)  # space is the cause now: the held status says it
            if held:
                self._held_cause(spec, "" if space else message)
            return False
        log.info("%s: %s observation %s", spec.name, obs.kind, result.outcome)
        # seen: heard from now (reading_at is the device's clock, maybe behind the error's time)
        self.status(spec, seen=True, reading=summary(obs), reading_at=obs.measured_at, identity=obs.device)
        return True

    def hold_observation(self, spec: LinkSpec, obs: Observation) -> None:
        held = self.unstored.setdefault(spec.name, Unstored())
        held.observations.append(obs)
        held.next_retry = time.monotonic() + RETRY_STORE_S
        self._spill_changed(spec)

    def load_spilled(self) -> None:
        """What a previous run kept in the spill files waits again, retried at once."""
        loaded = self.spill.load() if self.spill is not None else {}
        for name, observations in loaded.items():
            log.warning("%s: %d reading(s) kept from before the restart wait to be stored", name, len(observations))
            self.unstored.setdefault(name, Unstored()).observations.extend(observations)
        recordings = self.ecg_spill.load_recordings() if self.ecg_spill is not None else {}
        for name, by_key in recordings.items():
            log.warning("%s: %d streamed ECG(s) kept from before the restart wait to be stored", name, len(by_key))
            self.unstored.setdefault(name, Unstored()).recordings.update(by_key)

    def settle_held_at_start(self) -> None:
        """Each device row's held readings as this start finds them: those the spill files kept
        wait again (on disk); those a previous run held in memory only are gone, and the row's
        lost counts say so (their one record: not its error too) instead of FAILing for readings
        no longer anywhere. A row nothing of which waits again loses its "cannot store" error of
        before the stop: no state of today (its loss says that cause, with its time); the row's
        error, another problem, is left as it is."""
        loaded = {normalise_address(serial_address(name)): held for name, held in self.unstored.items()}
        behind = dict(self.rows_behind_file.load())
        for record in self.registry.all():
            if record.transport != "serial":
                continue
            word = behind.get(record.address)
            if word is not None and word.applied_to(record.lost_word_id):  # a start read it before: counted
                log.info("%s: the last stop's word on its held readings was applied before", record.address)
                word = None
            if word is not None:  # newer than the row and every spill copy
                record = replace(
                    record,
                    held_readings=HeldReadings.MEMORY,
                    held_reading_count=word.held[0],
                    held_ecg_count=word.held[1],
                    memory_reading_count=word.memory[0],
                    memory_ecg_count=word.memory[1],
                    held_cause=word.cause,
                    held_spill_generations=(None, None),  # no copy saved after it covers what memory held
                )
            if not record.waits_for_space:
                continue
            if record.address in loaded:  # waits again for what it waited for (until its next try)
                # a stop's is over: this start stores them now (a refusal then says its own cause)
                loaded[record.address].cause = "" if record.held_at_stop else record.held_cause
            # what the spill files did not give back is lost too, not only what memory held
            word_id = word.word_id if word is not None else ""
            counted = self._say_lost_at_stop(record, loaded.get(record.address) or Unstored(), word_id=word_id)
            if word_id and not counted:  # nothing lost by it: read again, it must not count then either
                self.registry.word_applied(record.address, word_id, now=self.now())
            # a row an older version wrote has no counts to keep the loss by: its words say it
            uncounted = not (record.held_reading_count or record.held_ecg_count)
            if record.address not in loaded:
                error = lost_message(record.held_words, record.held_cause) if uncounted else None
                self.registry.update_status(
                    record.address, now=self.now(), transport="serial", error=error, held=HeldReadings.NONE
                )
                self.registry.clear_error(record.address, DeviceProblem.NOT_SAVED, now=self.now())
        self.rows_behind_file.forget()
        for name in self.unstored:
            self._say_waiting(LinkSpec(name, PortMatch()))

    def settle_cards_at_start(self) -> None:
        """The cards (badges) whose check-in a stop gave up: one the process finished before it
        exited is in clinic.db, and forgotten (INFO); one that is not is said on its scanner's row
        (Today: scan it again), once - a start that reads the file again skips the one its row
        said (`card_word_id`). The journal never has the ID (personal data)."""
        for card in self.cards_given_up_file.load():
            address = normalise_address(serial_address(card.device))
            what = "doctor's badge" if card.kind == CARD_DOCTOR else "patient card"
            by_id = {"doctor_id" if card.kind == CARD_DOCTOR else "patient_id": card.scanned_id}
            if self.patients.scan_written(at=iso(card.scanned_at), **by_id):
                log.info("%s: the %s scanned as the gateway stopped was checked in before it exited", card.device, what)
                continue
            record = self.registry.get(address)
            if record is not None and record.card_word_id == card.word_id:  # a start read it before: said
                log.info("%s: the %s not checked in at the last stop was said before", card.device, what)
                continue
            log.warning(
                "%s: a %s scanned as the gateway stopped (at %s, %s) was not checked in: said on Today, to scan again",
                card.device,
                what,
                iso(card.scanned_at),
                card.time_source,
            )
            self.registry.card_not_checked_in(
                address,
                card.kind,
                card.scanned_id,
                scanned_at=card.scanned_at,
                time_source=card.time_source,
                word_id=card.word_id,
                now=self.now(),
            )
        self.cards_given_up_file.forget()

    def counted_lost(self, spec: LinkSpec) -> bool:
        """An unknown ECG_END from `spec`'s bridge is (taken as) one of an ECG its row says a stop lost."""
        address = normalise_address(serial_address(spec.name))
        left = self.lost_ecg_ends.get(address, 0)
        if left:
            self.lost_ecg_ends[address] = left - 1
        return bool(left)

    def resend_window_closed(self, spec: LinkSpec) -> None:
        """A connection `spec`'s bridge spoke on ended: what it resent of the ECGs a stop lost has come."""
        self.lost_ecg_ends.pop(normalise_address(serial_address(spec.name)), None)

    def _say_lost_at_stop(self, record: DeviceRecord, loaded: Unstored, *, word_id: str = "") -> bool:
        """What `record` said was held before the stop and is not back (`loaded`: what the spill
        files gave back) was lost at the stop, the device cannot resend it: the row keeps the loss
        for `lastmile doctor` even once the rest is stored, by where it was. A spill file that gave
        back its newest copy whole is the truth of what was on disk (a row written before the file
        was saved empty, or whose write failed, says more): only what the row said was held in
        memory only is lost then. One that did not (missing, damaged) lost the rest of what the
        row said it kept, too. `word_id`: the stop's word this loss comes from, kept on the row with
        it, so that a start that reads that word again knows it counted already. Whether a loss was
        recorded."""
        held = (record.held_reading_count, record.held_ecg_count)
        given = (len(loaded.observations), len(loaded.recordings))
        in_memory = record.in_memory_only if record.held_in_memory_only else (0, 0)
        spills = (self.spill, self.ecg_spill)
        names = (SPILL_NAME, ECG_SPILL_NAME)
        memory, disk, damaged = [0, 0], [0, 0], []
        for i, spill in enumerate(spills):
            memory[i] = min(in_memory[i], max(0, held[i] - given[i]))  # what is back was on disk
            if spill is not None and spill.saved_after(record.held_spill_generations[i]):
                memory[i] = 0  # a save after the row's word held all that waited then: its count is stale
            if spill is None or not spill.gave_back_all:
                disk[i] = max(0, held[i] - in_memory[i] - given[i])
            if disk[i]:
                damaged.append(
                    spill.not_given_back if spill is not None else f"{Path(self.config.data_dir) / names[i]} (missing)"
                )
        lost, on_disk = (memory[0] + disk[0], memory[1] + disk[1]), (disk[0], disk[1])
        if any(lost):
            damage = "; ".join(damaged)
            if any(memory):
                log.error("%s: %s", record.name or record.address, lost_message(held_words(*memory), record.held_cause))
            if any(on_disk):
                log.error("%s: %s", record.name or record.address, lost_on_disk_message(held_words(*on_disk), damage))
            self.registry.record_lost(record, lost, now=self.now(), on_disk=on_disk, damage=damage, word_id=word_id)
        if lost[1]:  # the bridge resends these ECGs' ECG_ENDs to this start
            self.lost_ecg_ends[record.address] = lost[1]
        return any(lost)

    def _spill_changed(self, spec: LinkSpec) -> None:
        """The unstored observations changed: write them all to the spill file, and say so."""
        if self.spill is not None:
            self.spill.save({name: held.observations for name, held in self.unstored.items()})
        self._say_waiting(spec)

    def _ecg_spill_changed(self, spec: LinkSpec) -> None:
        """The unstored streamed ECGs changed: write them all to the ECG spill file, and say so."""
        if self.ecg_spill is not None:
            self.ecg_spill.save_recordings({name: held.recordings for name, held in self.unstored.items()})
        self._say_waiting(spec)

    def _say_waiting(self, spec: LinkSpec) -> None:
        """Say on the device's row what waits for space (never silent: also when only memory holds it),
        as its held status: never as its error, which a later problem (unplugged ...) writes."""
        held = self.unstored.get(spec.name) or Unstored()
        if not held:  # its error first: the row never says nothing waits beside the over "cannot store"
            self.rows_behind.pop(normalise_address(serial_address(spec.name)), None)
            self._store_error_over(spec)
            self.status(spec, held=HeldReadings.NONE)
            return
        counts = (len(held.observations), len(held.recordings))
        kept = (kept_in(self.spill) or not held.observations) and (kept_in(self.ecg_spill) or not held.recordings)
        where = HeldReadings.DISK if kept else HeldReadings.MEMORY
        memory = (0, 0)
        if not kept:  # what the spill files hold is kept: only the rest is lost if the power fails
            memory = (
                counts[0] - on_disk(counts[0], self.spill, spec.name),
                counts[1] - on_disk(counts[1], self.ecg_spill, spec.name),
            )
        generations = tuple(s.generation if s is not None else None for s in (self.spill, self.ecg_spill))
        written = self.status(
            spec,
            held=where,
            held_cause=held.cause,
            held_counts=counts,
            memory_counts=memory,
            spill_generations=generations,
        )
        address = normalise_address(serial_address(spec.name))
        if written or not any(memory):  # the row's word, or a whole spill copy newer than it, holds all
            self.rows_behind.pop(address, None)
        else:  # the row keeps an older word: a newer spill copy must not seem to cover these at the restart
            self.rows_behind[address] = RowBehind(counts, memory, held.cause)
        (log.info if self.stopping else log.error)(
            "%s: %s",
            spec.name,
            self._row_waiting(spec) or waiting_message(held_words(*counts), where, held_words(*memory)),
        )

    def _held_cause(self, spec: LinkSpec, cause: str) -> None:
        """`spec`'s device is held (or about to be) because a store failed for `cause` ("": space):
        the row's held cause, written with its held status, at once if it changed on what waits
        already (once per change, not per retry); a later error (unplugged ...) leaves it, and so
        does a stop's (HELD_AT_STOP) over readings waiting for space."""
        held, cause = self.unstored.setdefault(spec.name, Unstored()), cause[:200]
        if cause == HELD_AT_STOP and held and held.refused_for_space:
            return  # they waited for space: the stop's cause (no fault) would hide the space's advice
        held.refused_for_space = not cause
        if held.cause != cause:
            held.cause = cause
            if held:
                self._say_waiting(spec)

    def _row_waiting(self, spec: LinkSpec) -> str:
        """What `spec`'s device row says waits and why (`DeviceRecord.waiting`: its cause when it is
        not space, locked ...), for the journal to say the same; "" if the row cannot be read."""
        try:
            record = self.registry.get(serial_address(spec.name))
        except Exception:  # status is best effort, as in status()
            log.exception("%s: cannot read device status", spec.name)
            return ""
        return record.waiting if record is not None else ""

    def _store_error_over(self, spec: LinkSpec) -> None:
        """Nothing of `spec`'s device waits any more, or what waits is refused for space now: a
        "cannot store" error (locked, damaged) written while it was held is no longer its state
        (a later error, unplugged ..., stays). Cleared only when the row says one: no clinic.db
        write per retry when nothing changes."""
        address = serial_address(spec.name)
        try:
            record = self.registry.get(address)
            if record is not None and record.problem is DeviceProblem.NOT_SAVED:
                self.registry.clear_error(address, DeviceProblem.NOT_SAVED, now=self.now())
                self._row_errors.pop(spec.name, None)  # that cause back again is said at once
        except Exception as exc:  # status is best effort, as in status()
            if not status_given_up(spec, exc):
                log.exception("%s: cannot record device status", spec.name)

    def hold_recording(self, spec: LinkSpec, recording: EcgRecording, key: str) -> None:
        held = self.unstored.setdefault(spec.name, Unstored())
        held.recordings[key] = recording
        held.next_retry = time.monotonic() + RETRY_STORE_S
        self._ecg_spill_changed(spec)

    def is_held(self, spec: LinkSpec, key: str) -> bool:
        held = self.unstored.get(spec.name)
        return held is not None and key in held.recordings

    def retry_unstored(self, spec: LinkSpec, *, force: bool = False) -> set[str]:
        """Try again to store what `spec`'s device sent and the outbox refused (when due, or now
        if `force`); returns the keys of the recordings stored now, which may be acknowledged."""
        held = self.unstored.get(spec.name)
        if not held or (not force and time.monotonic() < held.next_retry):
            return set()
        before = len(held.observations)
        held.observations = [o for o in held.observations if not self.store_observation(spec, o, held=True)]
        if len(held.observations) != before:
            self._spill_changed(spec)
        stored, refused = set(), set()
        for key, recording in held.recordings.items():
            try:
                if self.store_recording(spec, recording, key):
                    stored.add(key)
            except RecordingRefused:
                refused.add(key)
        for key in stored | refused:
            del held.recordings[key]
        if stored | refused:
            self._ecg_spill_changed(spec)
        held.next_retry = time.monotonic() + RETRY_STORE_S
        if held:
            log.error(
                "%s: %d reading(s), %d ECG recording(s) not stored yet; held, retried in %g s",
                spec.name,
                len(held.observations),
                len(held.recordings),
                RETRY_STORE_S,
            )
        else:
            del self.unstored[spec.name]
        return stored

    def store_recording(self, spec: LinkSpec, recording: EcgRecording, key: str) -> bool:
        """Make `recording` durable in the outbox; False if it could not be stored now (try again:
        the caller holds it, and the row's held status says so), RecordingRefused if it never can be."""
        now = self.now()
        try:
            # inside the try: reading the session writes when it just expired, a write a stop may give up
            current = self.patients.current(now)
            patient = None
            request = session_request(self.patients.current_doctor(now))
            # Only a patient whose session began before the recording: never the next patient's.
            if current is not None and recording.acquired_at >= current.since:
                patient = Patient(patient_id=current.patient_id, name=current.name)
                request = session_request(current.doctor_id, reason=current.reason)
                recording = replace(recording, stat=recording.stat or current.stat)
            enqueue_recording(
                self.outbox,
                replace(recording, patient=patient),
                self.config,
                key=key,
                now=now.timestamp(),
                request=request,
            )
        except (InvalidObjectError, DeviceError) as exc:
            log.error("%s: ECG recording refused, it cannot become a DICOM ECG: %s", spec.name, exc)
            self.status(
                spec, error=f"{ECG_REFUSED} {exc}"[:200], problem=DeviceProblem.ECG_REFUSED
            )  # once per recording: not rate-limited
            raise RecordingRefused(str(exc)) from exc
        except (UploadError, sqlite3.Error, OSError, ValueError) as exc:
            cause = "" if is_storage_full(exc) else f"{CANNOT_STORE}ECG: {exc}"
            if gave_up_at_stop(exc):  # expected at a stop, no fault of the device: held, stored after the restart
                log.info(
                    "%s: stopping: an ECG recording not stored yet is kept to be stored after the restart", spec.name
                )
                self.stopping = True
                self._held_cause(spec, HELD_AT_STOP)  # its own cause, not space: no free-space advice for a stop
                return False
            log.error("%s: cannot store an ECG recording: %s", spec.name, exc)
            if cause:
                self.error(spec, cause, DeviceProblem.NOT_SAVED)
            else:  # held: the row's held status says it waits for space
                self._store_error_over(spec)
            self._held_cause(spec, cause)
            return False
        if patient is not None:
            try:
                self.patients.touch(now=now)
            except WaitGivenUp:  # the ECG is stored: a stop does not make it "not stored"
                log.info("stopping: the session's activity not recorded (clinic.db locked by another process)")
        gaps = sum(g.missing for g in recording.gaps)
        text = f"ECG {recording.n_leads} leads {recording.duration_s:.0f} s" + (
            f", {gaps} samples missing" if gaps else ""
        )
        self.status(spec, seen=True, reading=text, reading_at=recording.acquired_at, identity=recording.device)
        return True


def status_given_up(spec: LinkSpec, exc: Exception) -> bool:
    """Whether a device row's status write (best effort: readings are not) failed because the stop
    gave it up, another process holding clinic.db's lock: expected, said at INFO. The row is
    written again as the next start finds the device (disconnected, what waits); only its last
    reading's summary is not."""
    if not gave_up_at_stop(exc):
        return False
    log.info("%s: stopping: device status not recorded (clinic.db locked by another process): %s", spec.name, exc)
    return True


def on_disk(waiting: int, spill: SpillFile | None, name: str) -> int:
    """How many of the `waiting` readings (ECGs) of device `name` `spill` holds: its last save that
    worked (a save that does not fit leaves the copy before it), not merely that it exists."""
    return min(waiting, spill.holds.get(name, 0) if spill is not None else 0)


def at_stop(what: str, waiting: int, spill: SpillFile | None, name: str) -> str:
    """The `waiting` readings (`what`) of device `name` as a stop leaves them, for the journal:
    what `spill` holds of them (`on_disk`) is stored after the restart, the rest (in memory only)
    is lost ("" when none wait)."""
    if not waiting:
        return ""
    kept = on_disk(waiting, spill, name)
    if kept == waiting:
        how = "kept on disk, stored after the restart"
    else:
        how = f"{kept} kept on disk, stored after the restart; {waiting - kept} lost" if kept else "lost"
    return f"{waiting} {what} ({how})"


# -- handlers --------------------------------------------------------------------------------------


def _until_idle_flush(idle: bool, quiet_s: float) -> float:
    """Seconds until the next tick: when a report in hand is due for its idle flush, not a
    whole period later (a report finished late is a wider window for the next patient's card)."""
    if idle:
        return ASCII_IDLE_FLUSH_S
    return max(ASCII_IDLE_FLUSH_S - quiet_s, 0.01)


class BridgeHandler:
    """A bridge: protocol session, storage, then ACK."""

    def __init__(self, ctx: SerialContext, spec: LinkSpec, port: PortInfo) -> None:
        self.ctx = ctx
        self.spec = spec
        self.address = port.by_id or port.device
        hello = codec.Hello(ctx.config.gateway.id, "lastmile-gateway", __version__, 0, ("ack-when-durable",))
        self.session = BridgeSession(self.address, gateway_hello=hello)
        self.link: Link | None = None
        forward = spec.options.get("forward_profile", "")
        self.forward = ctx.profiles.get(forward) if forward else None
        self._parsers: dict[int, ReportParser] = {}
        self._unsettled: dict[int, list[int]] = {}  # channel -> SERIAL_DATA seqs not yet ACKed
        self._last_data = time.monotonic()
        self._next_sync = time.monotonic() + TIME_SYNC_EVERY_S
        # Recordings held in the context (not stored yet) whose ECG_END, on this connection,
        # waits for its ACK: key -> seq. The ACK goes out once the recording is stored.
        self._awaiting: dict[str, int] = {}
        self._warned_unreadable = False  # SERIAL_DATA without a forward_profile: logged once

    def connection_made(self, link: Link) -> None:
        self.link = link
        link.write(self.session.connection_made(self.ctx.now()))
        self.ctx.status(self.spec, port=self.address, connected=True, seen=True)

    def data_received(self, data: bytes) -> None:
        assert self.link is not None
        self._last_data = time.monotonic()
        for event in self.session.receive_data(data, self.ctx.now()):
            self._event(event)
        self.link.write(self.session.data_to_send())

    def _event(self, event: SessionEvent) -> None:
        assert self.link is not None
        if isinstance(event, ObservationReady):
            if self.ctx.store_observation(self.spec, event.observation):
                self.link.write(self.session.acknowledge(event.seq))
            else:
                self.link.write(self.session.reject(event.seq, codec.NACK_REFUSED, "not stored"))
        elif isinstance(event, RecordingReady):
            self._recording(event)
        elif isinstance(event, EcgEndUnknown):
            if self.ctx.is_held(self.spec, event.key):  # received before a re-plug, not stored yet
                self._awaiting[event.key] = event.seq
                self._acknowledge_stored(self.ctx.retry_unstored(self.spec, force=True))
            elif self.ctx.outbox.find(event.key) is not None:  # stored before a restart: only the ACK was lost
                self.link.write(self.session.acknowledge(event.seq))
            else:
                self.link.write(
                    self.session.reject(event.seq, codec.NACK_UNKNOWN_RECORDING, "no such recording in progress")
                )
                if self.ctx.counted_lost(self.spec):  # the row's lost FAIL says it: not its error too
                    log.warning("%s: ECG_END of an ECG lost when the gateway stopped: NACKed", self.spec.name)
                else:
                    self.ctx.error(self.spec, "ECG_END for an unknown recording", DeviceProblem.OTHER)
        elif isinstance(event, SerialDataReceived):
            self._serial_data(event)
        elif isinstance(event, DeviceHello):
            log.info(
                "%s: bridge %s firmware %s (boot %08x)",
                self.spec.name,
                event.identity.serial,
                event.identity.software_version,
                event.boot_id,
            )
            self.ctx.status(self.spec, identity=event.identity, seen=True)
        elif isinstance(event, DeviceLog):
            log.log(
                max(logging.DEBUG, min(event.level, logging.CRITICAL)), "%s (bridge): %s", self.spec.name, event.text
            )
        elif isinstance(event, SessionProblem):
            log.debug("%s: %s", self.spec.name, event.reason)
            self.ctx.error(self.spec, event.reason, DeviceProblem.OTHER)

    def _recording(self, event: RecordingReady) -> None:
        try:
            stored = self.ctx.store_recording(self.spec, event.recording, event.key)
        except RecordingRefused as exc:  # the bridge drops it and logs why (a firmware fault)
            if event.seq is not None and self.link is not None:
                self.link.write(self.session.reject(event.seq, codec.NACK_MALFORMED, str(exc)))
            return
        if stored:
            if event.seq is not None and self.link is not None:
                self.link.write(self.session.acknowledge(event.seq))
        else:  # the bridge cannot resend a stream: hold it (past this connection) and retry
            self.ctx.hold_recording(self.spec, event.recording, event.key)
            if event.seq is not None:
                self._awaiting[event.key] = event.seq

    def _acknowledge_stored(self, keys: set[str]) -> None:
        for key in keys:
            seq = self._awaiting.pop(key, None)
            if seq is not None and self.link is not None:
                self.link.write(self.session.acknowledge(seq))

    def _serial_data(self, event: SerialDataReceived) -> None:
        assert self.link is not None
        if self.forward is None:
            # Nothing here can read these lines: refused, so the bridge keeps them until a profile
            # is configured or fixed (an ACK would tell it readings were stored that were thrown away).
            refused = self.spec.options.get("forward_refused", "")
            if not refused:
                if not self._warned_unreadable:
                    log.warning(
                        "%s: the bridge forwards device lines but no forward_profile is configured", self.spec.name
                    )
                    self._warned_unreadable = True
                self.ctx.error(
                    self.spec, f"{FORWARD_NOT_READ} set forward_profile for this bridge", DeviceProblem.FORWARD_NOT_READ
                )
            reason = "forward_profile refused" if refused else "no forward_profile configured"
            self.link.write(self.session.reject(event.seq, codec.NACK_REFUSED, reason))
            return
        parser = self._parsers.get(event.channel)
        if parser is None:
            identity = replace(self.session.identity, manufacturer=self.forward.manufacturer, model=self.forward.model)
            parser = self._parsers[event.channel] = ReportParser(self.forward, identity)
        self._unsettled.setdefault(event.channel, []).append(event.seq)
        self._report_events(event.channel, parser.feed(event.data, self.ctx.now()))

    def _report_events(self, channel: int, events: list) -> None:
        assert self.link is not None
        stored_all = True
        for ev in events:
            if isinstance(ev, ReportParsed):
                if not ev.observations:
                    self.ctx.nothing_measured(self.spec, ev)
                for obs in ev.observations:
                    stored_all &= self.ctx.store_observation(self.spec, obs, forwarded=True)
            elif isinstance(ev, ReportRejected):
                log.warning("%s: report rejected: %s", self.spec.name, ev.reason)
                self.ctx.error(self.spec, f"{REPORT_REJECTED} {ev.reason}", DeviceProblem.UNREADABLE)
        parser = self._parsers[channel]
        if parser.idle and stored_all:
            # Every line received so far is part of a stored report or of nothing: all durable.
            for seq in self._unsettled.pop(channel, []):
                self.link.write(self.session.acknowledge(seq))
        elif not stored_all:
            for seq in self._unsettled.pop(channel, []):
                self.link.write(self.session.reject(seq, codec.NACK_REFUSED, "not stored"))

    def connection_lost(self, reason: str | None, problem: DeviceProblem = DeviceProblem.OTHER) -> None:
        for event in self.session.connection_lost(self.ctx.now()):
            if isinstance(event, RecordingReady):
                self._recording(event)  # kept, flagged truncated
        # This connection's seqs mean nothing to the next one: the bridge resends its ECG_END
        # after the re-plug and that one is acknowledged.
        self._awaiting.clear()
        # A USB bridge often enumerates, goes away and comes back at boot before it says a word:
        # its resends are due on the first connection it greets the gateway on, not on that one.
        if self.session.hello is not None:
            self.ctx.resend_window_closed(self.spec)
        self.ctx.retry_unstored(self.spec, force=True)
        self.ctx.status(self.spec, connected=False, error=reason, problem=problem)

    def tick(self) -> float | None:
        now = time.monotonic()
        if self.link is not None and now >= self._next_sync:
            self.link.write(self.session.time_sync(self.ctx.now()))
            self._next_sync = now + TIME_SYNC_EVERY_S
        self._acknowledge_stored(self.ctx.retry_unstored(self.spec))
        if self._parsers and now - self._last_data >= ASCII_IDLE_FLUSH_S:
            for channel, parser in self._parsers.items():
                if not parser.idle:
                    self._report_events(channel, parser.flush(self.ctx.now()))
        idle = all(p.idle for p in self._parsers.values())
        return min(_until_idle_flush(idle, now - self._last_data), self._next_sync - now)


class AsciiReportHandler:
    """A monitor printing reports: parse, store each observation (nothing to acknowledge)."""

    def __init__(self, ctx: SerialContext, spec: LinkSpec, port: PortInfo) -> None:
        self.ctx = ctx
        self.spec = spec
        profile = ctx.profiles[spec.profile]
        self.address = port.by_id or port.device
        self.parser = ReportParser(profile, profile.identity(address=self.address))
        self._last_data = time.monotonic()

    def connection_made(self, link: Link) -> None:
        self.ctx.status(self.spec, port=self.address, connected=True, seen=True)

    def data_received(self, data: bytes) -> None:
        self._last_data = time.monotonic()
        self._events(self.parser.feed(data, self.ctx.now()))

    def _events(self, events: list) -> None:
        for ev in events:
            if isinstance(ev, ReportParsed):
                if not ev.observations:
                    self.ctx.nothing_measured(self.spec, ev)
                for obs in ev.observations:
                    if not self.ctx.store_observation(self.spec, obs, held=True):
                        self.ctx.hold_observation(self.spec, obs)  # the device cannot resend
            elif isinstance(ev, ReportRejected):
                log.warning("%s: report rejected: %s", self.spec.name, ev.reason)
                self.ctx.error(self.spec, f"{REPORT_REJECTED} {ev.reason}", DeviceProblem.UNREADABLE)

    def connection_lost(self, reason: str | None, problem: DeviceProblem = DeviceProblem.OTHER) -> None:
        self._events(self.parser.flush(self.ctx.now()))  # a half report is rejected, never half-stored
        self.ctx.status(self.spec, connected=False, error=reason, problem=problem)

    def tick(self) -> float | None:
        now = time.monotonic()
        if not self.parser.idle and now - self._last_data >= ASCII_IDLE_FLUSH_S:
            self._events(self.parser.flush(self.ctx.now()))
        self.ctx.retry_unstored(self.spec)
        return _until_idle_flush(self.parser.idle, now - self._last_data)


class ScannerHandler:
    """A card scanner: patient cards set the current patient, badges the doctor."""

    def __init__(self, ctx: SerialContext, spec: LinkSpec, port: PortInfo) -> None:
        self.ctx = ctx
        self.spec = spec
        self.address = port.by_id or port.device
        self.decoder = ScannerDecoder(ctx.rules)

    def connection_made(self, link: Link) -> None:
        self.ctx.status(self.spec, port=self.address, connected=True, seen=True)

    def data_received(self, data: bytes) -> None:
        for ev in self.decoder.feed(data):
            now = self.ctx.now()
            # A card given up at a stop would leave the previous patient current after the restart,
            # and the next readings on him: a card waits for the lock as if there were no stop.
            if isinstance(ev, PatientScanned):
                with self._in_hand(CARD_PATIENT, ev.patient_id, now):
                    self.ctx.patients.set_patient(ev.patient_id, now=now, wait_past_stop=True, by_card=True)
                self.ctx.status(
                    self.spec, reading="patient card", reading_at=now, card=(CARD_PATIENT, ev.patient_id.strip())
                )
            elif isinstance(ev, DoctorScanned):
                with self._in_hand(CARD_DOCTOR, ev.doctor_id, now):
                    self.ctx.patients.set_doctor(ev.doctor_id, now=now, wait_past_stop=True)
                self.ctx.status(
                    self.spec, reading="doctor badge", reading_at=now, card=(CARD_DOCTOR, ev.doctor_id.strip())
                )
            elif isinstance(ev, CodeUnrecognised):
                # The code itself may be personal data: log its length only.
                log.warning("%s: scanned code not recognised (%s, %d characters)", self.spec.name, ev.reason, ev.length)
                # a wrong check digit is read again the same: the doctor is told to type it instead
                problem = (
                    DeviceProblem.CARD_CHECK_DIGIT
                    if ev.rule == "check-character"
                    else DeviceProblem.CODE_NOT_RECOGNISED
                )
                self.ctx.error(self.spec, f"{CODE_NOT_RECOGNISED} {ev.reason}", problem)

    @contextlib.contextmanager
    def _in_hand(self, kind: str, scanned_id: str, now: dt.datetime) -> Iterator[None]:
        """The card's check-in is being written (at `now`, its session log line's time): the close
        keeps it for the next start if it gives this turn up (`SerialService.close`)."""
        # the gateway's clock is the scan's time: a scanner has none (devices.identity.TimeSource)
        card = CardGivenUp(kind, scanned_id.strip(), self.spec.name, now, TimeSource.GATEWAY_RECEIPT.value)
        self.ctx.card_in_hand = card
        try:
            yield
        except sqlite3.OperationalError:
            # Its 15 s lock wait ends before the close's (turn start + 1 + 15 + margin): the close
            # then finds the links idle, and without this the card would be gone with the process.
            if self.ctx.stop_set():
                self.ctx.card_failed = card
            raise
        else:
            self.ctx.card_failed = None  # a later check-in: the failed card's patient is no longer the one
        finally:
            self.ctx.card_in_hand = None

    def connection_lost(self, reason: str | None, problem: DeviceProblem = DeviceProblem.OTHER) -> None:
        self.ctx.status(self.spec, connected=False, error=reason, problem=problem)

    def tick(self) -> float | None:
        return None


def handler_for(
    ctx: SerialContext, spec: LinkSpec, port: PortInfo
) -> BridgeHandler | AsciiReportHandler | ScannerHandler:
    if spec.profile == BRIDGE:
        return BridgeHandler(ctx, spec, port)
    if spec.profile == SCANNER:
        return ScannerHandler(ctx, spec, port)
    return AsciiReportHandler(ctx, spec, port)


# -- the service -----------------------------------------------------------------------------------


class SerialService:
    """Runs the serial link manager for the acquire service (in a thread, or step by step)."""

    def __init__(
        self,
        ctx: SerialContext,
        specs: Sequence[LinkSpec],
        *,
        lister: Callable[[], list[PortInfo]] = list_ports,
        watch_dirs: Sequence[str | Path] | None = ("/dev", BY_ID_DIR),
        rescan_s: float | None = None,
        owned: Sequence[object] = (),
    ) -> None:
        self.ctx = ctx
        self.specs = list(specs)
        self.manager = SerialLinkManager(
            self.specs,
            lambda spec, port: handler_for(ctx, spec, port),
            lister=lister,
            watch_dirs=watch_dirs,
            rescan_s=rescan_s,
        )
        self._owned = list(owned)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Held through each turn: `close` sees whether the links thread is still in one (a card
        # waiting out clinic.db's lock), and then keeps off the connection that turn is using.
        self._turn = threading.Lock()
        # monotonic time by which the turn under way has ended (its poll, and a card's write that
        # waits SQLite's whole busy timeout for clinic.db's lock): how long the close waits for it
        self._turn_ends_by = 0.0
        self.refused: dict[str, str] = {}  # device name -> why it is not started (`refused_devices`)
        ctx.registry.mark_all_disconnected(now=ctx.now(), transport="serial")

    @classmethod
    def open(cls, config: Config, *, outbox: Outbox, stop: StopWaits | None = None, **kwargs: object) -> SerialService:
        """Check the configuration (ConfigError) and open clinic.db; the outbox stays the caller's.
        `stop`: the acquire service's (its outbox's too): at a stop, the devices' clinic.db writes
        wait at most a second more for another process's lock (WaitGivenUp): a reading is held
        (spill file), a row's status is redone at the next start."""
        # A bad profile file stops only the devices that name it: each says why in its status.
        profiles, bad = load_profiles_apart(config)
        specs = link_specs(config, profiles, bad)
        rules = scan_rules(config)
        store = ObservationStore.open(config.data_dir, outbox=outbox, idle_timeout_s=config.patient.idle_timeout_s)
        owned: list[object] = [store]
        if stop is not None:  # not a scanned card's (ScannerHandler: `wait_past_stop`)
            give_up_waits_on(store.db, stop)
        registry = DeviceRegistry(store.db)
        ctx = SerialContext(
            config=config,
            outbox=outbox,
            store=store,
            patients=store.context,
            registry=registry,
            profiles=profiles,
            rules=rules,
            spill=SpillFile(config.data_dir),  # allocated now, while the partition has room
            # 4 MB of the SD card only where ECGs can stream in (a bridge), or one left ECGs in it
            ecg_spill=SpillFile(config.data_dir, ECG_SPILL_BYTES, ECG_SPILL_NAME)
            if any(spec.profile == "bridge" for spec in specs) or (Path(config.data_dir) / ECG_SPILL_NAME).exists()
            else None,
        )
        ctx.stop = stop.stop if stop is not None else None
        ctx.load_spilled()
        ctx.settle_held_at_start()
        ctx.settle_cards_at_start()
        service = cls(ctx, specs, owned=owned, **kwargs)  # type: ignore[arg-type]
        service.refused = refused_devices(config, bad)
        for name, reason in service.refused.items():
            log.error("serial device %s %s", name, reason)
            registry.update_status(
                serial_address(name),
                now=ctx.now(),
                transport="serial",
                connected=False,
                error=reason,
                problem=DeviceProblem.SETTINGS,
            )
        clear_refusals_fixed_since(registry, specs, now=ctx.now())
        return service

    def start(self) -> None:
        if not self.specs and not any(self.ctx.unstored.values()):
            log.info("no serial devices configured")
            return
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="serial-links", daemon=True)
        self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_once(1.0)

    def run_once(self, max_wait_s: float) -> None:
        """One turn: the link manager's (bytes, hot-plug, handlers' ticks), then what unplugged
        devices left unstored. Whoever drives the links (this service's thread, a runtime step,
        the acquire service's part) goes round through here, so none of them leaves that behind."""
        with self._turn:
            self._turn_ends_by = time.monotonic() + max_wait_s + BUSY_TIMEOUT_MS / 1000 + TURN_WRITE_MARGIN_S
            self.manager.poll(max_wait_s)
            self.retry_unstored()
            self.ctx.write_pending_errors()

    def step(self, stop: threading.Event) -> float:
        """One `ServiceRuntime` step, for running without a thread."""
        self.run_once(0.5)
        return 0.0

    def retry_unstored(self) -> None:
        """Store what unplugged devices left unstored once the outbox has room (a connected
        device's handler retries its own, so that it can acknowledge what it stored). Runs in
        the link manager's thread, as the handlers do."""
        if not any(self.ctx.unstored.values()):
            return
        connected = {s.name for s in self.manager.statuses() if s.connected}
        for spec in self.unstored_specs():
            if spec.name not in connected:
                self.ctx.retry_unstored(spec)

    def unstored_specs(self) -> list[LinkSpec]:
        """The configured devices, and those that left readings in the spill file and were taken
        out of the configuration before the restart: each reading names its device, so it is
        stored all the same (its row, kept as removed, says when)."""
        configured = {spec.name for spec in self.specs}
        removed = [LinkSpec(name, PortMatch()) for name in self.ctx.unstored if name not in configured]
        return [*self.specs, *removed]

    def statuses(self) -> list[LinkStatus]:
        return self.manager.statuses()

    def status_line(self) -> str:
        states = self.statuses()
        up = sum(s.connected for s in states)
        return f"serial {up}/{len(states)} connected"

    def close(self) -> None:
        self.ctx.closing.set()
        self._stop.set()
        self.manager.wakeup()
        if self._thread is not None:
            self._thread.join(10)
        # A turn still under way (a card's write waits the full busy timeout, past the thread's
        # join) has the links and clinic.db's one connection in hand: writing or closing them from
        # here would mix into, or break, its transaction. It is waited for, up to the card's whole
        # lock wait: the process ends after this close, and the links thread (a daemon) with it -
        # the card's check-in would be lost, the previous patient current after the restart. From
        # the turn's start that is at most 18 s; the acquire part's join (15 s) is within it, so
        # the stop takes about 18 s at worst, inside the unit's TimeoutStopSec=30.
        links_idle = self._turn.acquire(timeout=max(0.0, self._turn_ends_by - time.monotonic()))
        # the card the stop leaves unwritten, read once: a busy turn clears card_in_hand when its
        # write ends (and may set card_failed); an idle one's is over, only a failed card is left
        card = self.ctx.card_in_hand or self.ctx.card_failed
        if links_idle:
            self.manager.close()
            for spec in self.unstored_specs():
                self.ctx.retry_unstored(spec, force=True)
            self.ctx.write_pending_errors(now=True)  # the row's last cause, not one before it
            if card is not None:  # its own lock wait ran out first
                log.warning(
                    "serial devices: a card scanned as the gateway stopped could not be checked in "
                    "(clinic.db was locked): kept for the next start, which says it on Today"
                )
        else:
            log.warning(
                "serial devices: still busy at shutdown past a card's whole wait for clinic.db's lock: "
                "the links and clinic.db left to it; readings not stored are kept in the spill file%s",
                "; the card scanned is kept for the next start, which says it on Today if it is not checked in"
                if card is not None
                else "",
            )
        if card is not None:
            self.ctx.cards_given_up_file.save([card], unsaved=card.unkept)
        for name, held in list(self.ctx.unstored.items()):  # a busy turn may still add to it
            said = (
                at_stop("reading(s)", len(held.observations), self.ctx.spill, name),
                at_stop("ECG recording(s)", len(held.recordings), self.ctx.ecg_spill, name),
            )
            what = ", ".join(s for s in said if s)
            if held.cause == HELD_AT_STOP and all("lost" not in s for s in said):  # the stop's, all on disk: expected
                log.info("%s: %s not stored: the gateway was stopping", name, what)
            else:
                log.error("%s: %s not stored: the outbox refused them", name, what)
        self.ctx.rows_behind_file.save(list(self.ctx.rows_behind.copy().items()))  # a busy turn may add
        for thing in self._owned if links_idle else ():  # clinic.db: not under the busy turn's write
            close = getattr(thing, "close", None)
            if close is not None:
                close()
        if links_idle:
            self._turn.release()
