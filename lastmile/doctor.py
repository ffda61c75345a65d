"""`lastmile doctor`: one command that tells a county technician what is wrong, and what to do.

Each check gives a line, OK / WARN / FAIL (or SKIP), with a hint for anything not OK (a check
that looks at several things, one line each, labelled check/topic):
configuration, data partition (free space, wear-relevant mount options), read-only root,
journal size, clock and its source, the services, reading center C-ECHO, the storage-commitment
listener, the FHIR endpoint and its token, devices seen, queue health, the console, the metrics
endpoint the county scrapes, reports coming back (a critical report not yet acknowledged is a
FAIL). `--offline` skips what needs the network. The exit code is 1 when anything FAILs.

Run as root, the checks that touch the data directory or the token run with the effective
user of the data directory's owner (the service user), so they see what the services see and
never leave root-owned files behind in /var/lib/lastmile.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from devices.device_errors import DeviceProblem
from lastmile.doctor_ble import check_bluetooth

if TYPE_CHECKING:
    from lastmile.clinic.devices import DeviceRecord
    from lastmile.clinic.stick_files import RefusedStickFile
    from lastmile.config import Config
    from lastmile.ecg.holds import EcgsWaiting
    from lastmile.services.link_status import FhirPlatform
    from lastmile.services.metered import MeteredWait
    from uploader.outbox import OutboxItem

_R = TypeVar("_R")  # what Doctor._read_once keeps for a run

SERVICES = (
    "lastmile-acquire.service",
    "lastmile-ble.service",
    "lastmile-forward.service",
    "lastmile-console.service",
)
# A gateway may run without the console (a clinic that uses the CLI, a test container): its unit
# not installed or disabled is said, not failed. The others are the gateway; lastmile-ble stays
# up (idle, saying so in its status) when BLE is not enabled, so inactive is a fault there too.
OPTIONAL_SERVICES = frozenset({"lastmile-console.service"})
FORWARD_SERVICE = "lastmile-forward.service"  # holds the storage-commitment listener
DEVICE_LINKS = Path("/dev/lastmile")
JOURNALD_DROPINS = (
    Path("/etc/systemd/journald.conf"),
    Path("/etc/systemd/journald.conf.d"),
    Path("/usr/lib/systemd/journald.conf.d"),
)
RECOMMENDED_COMMIT_S = 30  # ext4 default is 5 s: every 5 s a journal commit wears the SD card
NETWORK_TIMEOUT_S = 10.0
METRICS_TIMEOUT_S = 5.0
WAITING_WARN_S = 24 * 3600.0  # an item waiting longer than a day: the link has been down a while
WAITING_FAIL_S = 7 * 24 * 3600.0
DOCTOR_DECIDES = "not waiting for the link: the doctor decides on the console's Today page or `lastmile patient show`"
REPORTS_FAILING_WARN_S = 3600.0  # no report query has worked for an hour
# What each finding of a check that gives several is about (Finding.topic): the System page heads
# each with its check's label and its own (console/app.py TOPIC_LABELS), `lastmile doctor` prints
# check/topic; a check with one finding has none. Metered holds are "<what holds>-<destination>"
# (uploader.metering.Blocked.reason, lastmile.services.metered.QUEUED_KINDS), refusals
# "refused-<outbox status>" (the forwarders' STATUS_NAME).
SERVICE_TOPICS = {unit: unit.removeprefix("lastmile-").removesuffix(".service") for unit in SERVICES}
TOPICS = (
    "space",
    "sd-card",
    *SERVICE_TOPICS.values(),
    "link",
    "set-aside",
    "window-dicom",
    "budget-dicom",
    "window-fhir",
    "budget-fhir",
    "refused-reading_center",
    "refused-fhir",
    "critical",
    "critical-unassigned",
    "queries",
    "unrecorded",
    "lost-records",
    "installed-version",
    "last-round",
    "signing-key",
    "not-queued",
    "open-damaged",
    "ecg-clock",
    "stick-file",
    "battery",
    "restart-needed",
    "left-by-stop",
    "damaged-copy",
)
# An ECG cart's clock is judged by its newest ECG of this last week (of the newest ECGs).
ECG_CLOCK_LOOKBACK_S = 7 * 86400
ECG_CLOCK_ITEMS = 50
_WEAR_OPTIONS = {"ro", "rw", "noatime", "relatime", "strictatime", "lazytime", "nodiratime", "sync"}


class Level(str, enum.Enum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass
class Finding:
    check: str
    level: Level
    message: str
    hint: str = ""
    # the key of the console's advice for it when it is not its check's level's (console/app.py CHECK_ADVICE)
    advice_key: str = ""
    until: float | None = None  # when what it reports lets go (epoch s), said in that advice
    since: float | None = None  # when what it reports was found (epoch s), said in that advice too
    topic: str = ""  # what in its check it is about, when the check gives several (TOPICS)
    subject: str = ""  # which one of many it names (a critical report's patient), shown with its topic
    # how many readings and ECGs it is about, for an advice that says so (a stop's losses); None: none said
    counts: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        """The check and what in it this finding is about, as `lastmile doctor` prints it."""
        return f"{self.check}/{self.topic}" if self.topic else self.check

    def to_json(self) -> dict:
        d = asdict(self)
        d["level"] = self.level.value
        d["advice"] = d.pop("advice_key")  # the key `lastmile doctor --json` always had: scripts read it
        if d["counts"] is None:  # only the findings that count something have it
            del d["counts"]
        return d


def last_seen(r: DeviceRecord) -> dt.datetime | None:
    stamps = [t for t in (r.last_seen_at, r.last_connected_at, r.last_reading_at) if t is not None]
    return max(stamps) if stamps else None


def failing_since_seen(r: DeviceRecord) -> bool:
    """`r`'s last error is its current state (not one it was seen past since). A report with
    nothing measured is no fault of the device's (the doctor is told on Today, no one else)."""
    seen = last_seen(r)
    if r.problem is DeviceProblem.NOTHING_MEASURED:
        return False
    return bool(r.last_error and r.last_error_at and (seen is None or r.last_error_at >= seen))


# Held readings whose device row says another cause than space (NOT_STORED: the advice key's
# suffix, the System page's words for it)
NOT_STORED = "-not-stored"
NOT_STORED_HINT = (
    "the data store cannot be written (see the device's error), not for want of space: the acquire "
    "service retries every 30 s; if it lasts, check the outbox (lastmile queue) and call the county IT"
)
LOST_NOT_STORED_HINT = "the data store could not be written, not for want of space: call the county IT"
FREE_SPACE_HINT = "free space on the data partition (see the data line); the acquire service stores them within 30 s"
# what waits in the spill file of readings, whose advice for space is the devices check's own (no key)
READINGS_KEPT = "readings-kept"
# Held because the gateway's stop gave their store up (devices.HELD_AT_STOP): neither space nor a
# fault - the next start stores them (AT_STOP: the advice key's suffix)
AT_STOP = "-at-stop"
AT_STOP_HINT = "the gateway stopped before it stored them: the acquire service stores them when it starts again"
# held at a stop in memory only, and so gone with it: nothing is broken and the county IT can bring
# nothing back; the doctor measures again
LOST_AT_STOP_HINT = "nothing to repair: the gateway stopped before it stored them"
# a stop kept them on disk and the spill file did not give them back (missing, damaged): its advice
LOST_DAMAGED_READINGS, LOST_DAMAGED_ECGS = "lost-readings-damaged-file", "lost-ecgs-damaged-file"
LOST_DAMAGED_BOTH = "lost-readings-and-ecgs-damaged-file"
LOST_AT_STOP = "lost-at-stop"  # held at a stop in memory only, lost with it: its advice (which device, how many)
LOST_ECGS_AT_STOP = "lost-ecgs-at-stop"  # the same, ECGs only: record the ECG again, not "measure"
# a card (a doctor's badge) scanned as the gateway stopped, its check-in given up and not done: its advice
CARD_NOT_CHECKED_IN, BADGE_NOT_TAKEN = "card-not-checked-in", "badge-not-taken"
LOST_BOTH_AT_STOP = "lost-readings-and-ecgs-at-stop"  # readings and ECGs: measure again and record the ECG again
# held in memory only by a stop (the row's word from its last try, until the next start counts them
# lost): nothing stores them after it, the process that held them ends
GONE_WITH_STOP_HINT = "nothing to repair: the gateway stopped before it stored them, and they were in memory only"


def by_what(counts: tuple[int, int], readings: str, ecgs: str, both: str) -> str:
    """The advice key for what to do again about `counts` (readings, ECGs): measure again (`readings`),
    record the ECG again (`ecgs`), or both (`both`): a doctor told only one redoes only one."""
    return both if all(counts) else ecgs if counts[1] else readings


def held_advice(cause: str, where: str, kind: str) -> tuple[str, str, str]:
    """What readings held `where` wait for, what to do, and the System page's advice key, by their
    held rows' `cause` ("": space): another cause (locked, damaged) is the county IT's, since
    freeing space does nothing for it. `kind` names what waits there (READINGS_KEPT, "ecgs-kept",
    "memory-only", "memory-only-ecgs", "memory-only-readings-and-ecgs"): its key for space, its
    NOT_STORED one for another cause, its AT_STOP one for a stop's (neither free space nor the
    county IT: the next start)."""
    from lastmile.clinic.devices import HELD_AT_STOP

    if cause.endswith(HELD_AT_STOP):
        return f"wait to be stored ({where}): {cause}", AT_STOP_HINT, kind + AT_STOP
    if cause:
        return f"wait to be stored ({where}): {cause}", NOT_STORED_HINT, kind + NOT_STORED
    return f"wait for space on the data partition ({where})", FREE_SPACE_HINT, "" if kind == READINGS_KEPT else kind


@dataclass(frozen=True, slots=True)
class OutboxReads:
    """What a doctor run read from the outbox, in its one open (see `Doctor.outbox_reads`)."""

    stats: dict[str, Any]
    held: list[MeteredWait]  # metered links that hold routine items now
    oldest_item: OutboxItem | None  # the oldest waiting item no metered link holds, not held for the doctor
    refused: OutboxItem | None  # that item, when the server refuses it alone
    recent_ecgs: list[OutboxItem]  # DICOM items of the last ECG_CLOCK_LOOKBACK_S, newest first
    fhir_status: dict[str, Any] | None  # what the FHIR forwarder recorded of its last rounds (FHIR_STATUS)
    ecgs: EcgsWaiting  # the ECGs waiting for the link, and those held for the doctor instead


@dataclass
class Doctor:
    """What the checks look at; tests replace the system parts (paths, clock, commands)."""

    config: Config
    config_error: str | None = None
    offline: bool = False
    now: Callable[[], float] = time.time
    mountinfo: Path = Path("/proc/self/mountinfo")
    device_links: Path = DEVICE_LINKS
    journald_paths: tuple[Path, ...] = JOURNALD_DROPINS
    systemd_run_dir: Path = Path("/run/systemd/system")  # present when systemd is the init
    proc_root: Path = Path("/proc")
    run: Callable[[list[str]], subprocess.CompletedProcess[str] | None] = field(default=None)  # type: ignore[assignment]
    # what the home visits check last read, kept by a caller that runs the doctor every minute
    # (the console, per data directory); None (a `lastmile doctor` run): read each time
    visits_cache: VisitsReadCache | None = None
    # what `run_all` read once for several checks (clinic.db's devices); None outside a run
    _run_reads: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.run is None:
            self.run = _run_tool

    def device_records(self) -> list[DeviceRecord] | None:
        """Every device clinic.db knows; None before clinic.db exists (never created here). Read
        once per `run_all`: the devices and bluetooth checks both look (the console runs the
        doctor every minute)."""
        return self._read_once("clinic", self._read_clinic)[0]

    def _read_clinic(self) -> tuple[list[DeviceRecord] | None, list[RefusedStickFile]]:
        """What the checks read from clinic.db, in one open (each open checks its migrations): the
        devices (None before clinic.db exists) and the stick files refused and not yet seen."""
        from lastmile.clinic.db import DB_NAME
        from lastmile.clinic.devices import DeviceRegistry
        from lastmile.clinic.stick_files import RefusedStickFiles

        if not (self.config.data_dir / DB_NAME).exists():
            return None, []
        with as_owner_of(self.config.data_dir):
            registry = DeviceRegistry.open(self.config.data_dir)
            try:
                return registry.all(self.config), RefusedStickFiles(registry.db).unseen()
            finally:
                registry.close()

    def outbox_reads(self) -> OutboxReads | None:
        """What the queue and devices checks read from the outbox; None before it exists (never
        created here). One open per `run_all`: each open recovers, checks the reserve and writes
        its lock file (SD wear), and the console runs the doctor every minute."""
        return self._read_once("outbox", self._read_outbox)

    def _read_outbox(self) -> OutboxReads | None:
        from lastmile.data_dir import open_existing_outbox
        from lastmile.ecg.holds import ecgs_waiting, held_for_doctor, oldest_wait_s
        from lastmile.services.link_status import FHIR_STATUS
        from lastmile.services.metered import QUEUED_KINDS, metered_waits, refused_alone
        from uploader.outbox import Kind

        now = self.now()
        reads = None
        with as_owner_of(self.config.data_dir):
            outbox = open_existing_outbox(self.config)  # creates nothing
            if outbox is not None:
                with outbox:
                    # an ECG held for the doctor waits for him: not the age of what waits for the link
                    stats = outbox.stats(now) | {"oldest_waiting_s": oldest_wait_s(outbox.db.conn, now)}
                    # routine items a metered link holds now are its (as configured), not the link's;
                    # nor is an ECG held for the doctor (the ages' rule): the level is judged on this one
                    held = [w for w in metered_waits(self.config, outbox, now).values() if w.holding]
                    oldest_item = outbox.oldest_waiting_item(
                        now,
                        except_routine_of={QUEUED_KINDS[w.destination]: w.hold for w in held if w.hold is not None},
                        leaving_out=held_for_doctor(now),
                    )
                    reads = OutboxReads(
                        stats,
                        held,
                        oldest_item,
                        oldest_item if oldest_item and refused_alone(oldest_item, outbox) else None,
                        outbox.newest(Kind.DICOM, since=now - ECG_CLOCK_LOOKBACK_S, limit=ECG_CLOCK_ITEMS),
                        outbox.status(FHIR_STATUS),
                        ecgs_waiting(outbox.db.conn, now),
                    )
        return reads

    def _read_once(self, key: str, read: Callable[[], _R]) -> _R:
        """`read()`, kept for the rest of a `run_all` (several checks look); outside one, read each time."""
        if self._run_reads is None:
            return read()
        if key not in self._run_reads:
            self._run_reads[key] = read()
        result: _R = self._run_reads[key]
        return result

    # -- the checks -------------------------------------------------------------------------------

    def checks(self) -> list[tuple[str, Callable[[], list[Finding]], bool]]:
        """(name, check, needs network)."""
        return [
            ("config", self.check_config, False),
            ("data", self.check_data_partition, False),
            ("root", self.check_root_fs, False),
            ("journal", self.check_journal, False),
            ("clock", self.check_clock, False),
            ("services", self.check_services, False),
            ("reading-center", self.check_reading_center, True),
            ("commitment", self.check_commitment_listener, False),
            ("fhir", self.check_fhir, True),
            ("devices", self.check_devices, False),
            ("queue", self.check_queue, False),
            ("console", self.check_console, False),
            ("reports", self.check_reports, False),
            ("metrics", self.check_metrics, False),
            ("update", self.check_update, False),
            ("bluetooth", lambda: check_bluetooth(self), False),
            ("visits", self.check_visits, False),
        ]

    def run_all(self) -> list[Finding]:
        findings: list[Finding] = []
        self._run_reads = {}
        try:
            self._run_each(findings)
        finally:
            self._run_reads = None
        return findings

    def _run_each(self, findings: list[Finding]) -> None:
        from lastmile.data_dir import DataDirError

        for name, check, network in self.checks():
            if network and self.offline:
                # the console says why, and where the link's state is instead (advice "offline")
                findings.append(Finding(name, Level.SKIP, "skipped (--offline)", advice_key="offline"))
                continue
            try:
                findings += check()
            except DataDirError as exc:  # an operational fault, already worded for people
                findings.append(Finding(name, Level.FAIL, str(exc), "fix the data directory first (see above)"))
            except Exception as exc:  # noqa: BLE001 — a check that breaks is itself a finding, never a traceback
                findings.append(
                    Finding(
                        name,
                        Level.FAIL,
                        f"check failed: {type(exc).__name__}: {exc}",
                        "report this to the Lastmile maintainers",
                    )
                )

    def check_config(self) -> list[Finding]:
        if self.config_error:
            return [
                Finding(
                    "config",
                    Level.FAIL,
                    self.config_error,
                    "fix that line; `lastmile config defaults` lists every key (the other "
                    "checks below use the defaults)",
                )
            ]
        return [Finding("config", Level.OK, f"{self.config.source} is valid")]

    def check_data_partition(self) -> list[Finding]:
        from lastmile.data_dir import DataDirError, existing_data_dir

        data = self.config.data_dir
        try:
            found = existing_data_dir(data)  # looks, never creates
        except DataDirError as exc:
            return [Finding("data", Level.FAIL, str(exc), "the services cannot store anything until this is fixed")]
        if found is None:
            return [
                Finding(
                    "data",
                    Level.FAIL,
                    f"{data} does not exist",
                    "is the data partition mounted? (systemctl status var-lib-lastmile.mount)",
                )
            ]
        out = []
        st = os.statvfs(data)
        free_mb = st.f_bavail * st.f_frsize / 2**20
        total_mb = st.f_blocks * st.f_frsize / 2**20
        need = self.config.outbox.min_free_mb
        text = f"{data}: {free_mb:.0f} MB free of {total_mb:.0f} MB"
        if free_mb < need:
            out.append(
                Finding(
                    "data",
                    Level.FAIL,
                    text + f" (below outbox.min_free_mb = {need}: new items refused)",
                    "forward the queue (is the link up?) or purge committed items",
                    topic="space",
                )
            )
        elif free_mb < 2 * need:
            out.append(
                Finding(
                    "data",
                    Level.WARN,
                    text + f" (close to outbox.min_free_mb = {need})",
                    "check that forwarding keeps up (`lastmile queue`)",
                    topic="space",
                )
            )
        else:
            out.append(Finding("data", Level.OK, text, topic="space"))
        out += self._left_by_last_stop(data)
        mount = find_mount(self.mountinfo, data)
        if mount is None:
            out.append(
                Finding(
                    "data",
                    Level.WARN,
                    f"cannot tell which filesystem holds {data}",
                    advice_key="sd-card",
                    topic="sd-card",
                )
            )
            return out
        out.append(self._wear_finding(data, mount))
        return out

    def _left_by_last_stop(self, data: Path) -> list[Finding]:
        """The files in which a stop keeps what it could not write into its database for the next
        start (uploader.unwritten_records): one there waits for a start, or a start could not
        apply it (WARN, what and how many); a damaged one a start set aside (WARN, naming it and
        where its readable records are: waiting in the file for a start, or written)."""
        from uploader.payload_files import STORED_PREFIX
        from uploader.unwritten_records import UnwrittenRecords, original_of, pending_in, set_aside_in

        waiting: list[str] = []
        damaged: dict[Path, list[Path]] = {}  # the copies set aside, by the file each was made of
        with as_owner_of(data):
            for directory, family, what in left_by_stop_files(data):
                for path in pending_in(directory, family):
                    if family == STORED_PREFIX and _owner_alive(directory, path.name[len(family) :], self.mountinfo):
                        continue  # a running forwarder's (a passing lock): it records them itself, no stop's
                    try:
                        count: int | str = len(UnwrittenRecords(path, what=what).lines())
                    except OSError as exc:
                        count = f"unreadable ({exc.strerror or exc})"
                    waiting.append(f"{count} {what} ({path})")
                for copy in set_aside_in(directory, family):
                    damaged.setdefault(original_of(copy), []).append(copy)
        out = []
        if waiting:
            out.append(
                Finding(
                    "data",
                    Level.WARN,
                    "kept by a stop for the next start: " + "; ".join(waiting),
                    "the next start of its service writes them; still here after a start: it could not "
                    "(journalctl -u lastmile-acquire -u lastmile-forward)",
                    advice_key="left-by-stop",
                    topic="left-by-stop",
                )
            )
        if damaged:
            out.append(
                Finding(
                    "data",
                    Level.WARN,
                    "damaged, set aside by a start: "
                    + "; ".join(
                        f"{', '.join(map(str, copies))} ({_where_readable_records_are(original, copies)})"
                        for original, copies in damaged.items()
                    ),
                    "what it could not read is said in the journal at its start; remove the copy once looked at "
                    "(only the newest few are kept)",
                    advice_key="damaged-copy",
                    topic="damaged-copy",
                    subject=", ".join(copy.name for copies in damaged.values() for copy in copies),
                )
            )
        return out

    def _wear_finding(self, data: Path, mount: Mount) -> Finding:
        opts = mount.options
        shown = sorted(o for o in opts if o in _WEAR_OPTIONS or o.startswith("commit="))
        where = f"{data} is on {mount.mount_point} ({mount.fstype}, {','.join(shown)})"
        if "ro" in opts:
            return Finding(
                "data",
                Level.FAIL,
                where + ": read-only",
                "the data partition went read-only (I/O errors?): run fsck, check the SD card",
                topic="sd-card",
            )
        problems = []
        if "noatime" not in opts:
            problems.append("no noatime (every read writes an access time)")
        if mount.fstype == "ext4":
            commit = next((int(o.split("=", 1)[1]) for o in opts if o.startswith("commit=")), 5)
            if commit < RECOMMENDED_COMMIT_S:
                problems.append(f"journal commit every {commit} s")
        if problems:
            return Finding(
                "data",
                Level.WARN,
                where + ": " + "; ".join(problems),
                "mount it with noatime,commit=60 (image/ does) to spare the SD card",
                advice_key="sd-card",  # not the space's "getting full" beside a row that says it is not
                topic="sd-card",
            )
        return Finding("data", Level.OK, where, topic="sd-card")

    def check_root_fs(self) -> list[Finding]:
        mount = find_mount(self.mountinfo, Path("/"))
        if mount is None:
            return [Finding("root", Level.WARN, "cannot read the mount table")]
        if mount.fstype == "overlay" or "ro" in mount.options:
            return [
                Finding(
                    "root", Level.OK, f"root filesystem is {'an overlay' if mount.fstype == 'overlay' else 'read-only'}"
                )
            ]
        return [
            Finding(
                "root",
                Level.WARN,
                f"root filesystem is writable ({mount.fstype})",
                "on a clinic gateway the root should be read-only (overlayroot) so a power cut cannot corrupt it",
            )
        ]

    def check_journal(self) -> list[Finding]:
        settings: dict[str, str] = {}
        for path in self.journald_paths:
            files = sorted(path.glob("*.conf")) if path.is_dir() else [path] if path.is_file() else []
            for f in files:
                for line in f.read_text(errors="replace").splitlines():
                    key, sep, value = line.strip().partition("=")
                    if sep and not key.startswith("#"):
                        settings[key.strip()] = value.strip()
        storage = settings.get("Storage", "auto")
        limit = settings.get("SystemMaxUse") if storage != "volatile" else settings.get("RuntimeMaxUse", "default")
        if storage == "volatile" or settings.get("SystemMaxUse"):
            return [Finding("journal", Level.OK, f"Storage={storage}, max {limit}")]
        return [
            Finding(
                "journal",
                Level.WARN,
                f"journal Storage={storage} with no SystemMaxUse",
                "set SystemMaxUse=32M (or Storage=volatile) in /etc/systemd/journald.conf.d/",
            )
        ]

    def check_clock(self) -> list[Finding]:
        from devices.identity import EARLIEST_PLAUSIBLE

        now = dt.datetime.fromtimestamp(self.now(), dt.timezone.utc)
        stamp = _stamp(now)
        if now < EARLIEST_PLAUSIBLE:
            return [
                Finding(
                    "clock",
                    Level.FAIL,
                    f"system clock says {stamp}: not plausible",
                    "no time source yet: connect the network (NTP) or a GPS receiver; "
                    "measurements get the gateway-receipt time until then",
                )
            ]
        source, synced = self._time_source()
        if synced:
            return [Finding("clock", Level.OK, f"{stamp}, synchronised ({source})")]
        return [
            Finding(
                "clock",
                Level.WARN,
                f"{stamp}, plausible but not synchronised ({source})",
                "enable systemd-timesyncd or chrony, or gpsd with a receiver; `timedatectl` shows the state",
            )
        ]

    def _time_source(self) -> tuple[str, bool]:
        if shutil.which("chronyc"):
            r = self.run(["chronyc", "-n", "tracking"])
            if r is not None and r.returncode == 0:
                fields = dict(ln.split(":", 1) for ln in r.stdout.splitlines() if ":" in ln)
                ref = fields.get("Reference ID", "").strip()
                leap = fields.get("Leap status", "").strip()
                return f"chrony, reference {ref or '?'}", leap == "Normal"
        r = self.run(["timedatectl", "show"])
        if r is not None and r.returncode == 0:
            props = dict(ln.split("=", 1) for ln in r.stdout.splitlines() if "=" in ln)
            if "NTPSynchronized" in props:
                source = "systemd-timesyncd" if props.get("NTP") == "yes" else "timedatectl (NTP off)"
                return source, props["NTPSynchronized"] == "yes"
        if Path("/run/systemd/timesync/synchronized").exists():
            return "systemd-timesyncd", True
        return "no time daemon found; year check only", False

    def check_services(self) -> list[Finding]:
        from lastmile.services.runtime import CONFIG_REFUSED, FAULT

        if not self.systemd_run_dir.is_dir():
            return [Finding("services", Level.SKIP, "systemd is not running here")]
        out = []
        for unit in SERVICES:
            topic = SERVICE_TOPICS[unit]
            r = self.run(
                ["systemctl", "show", unit, "-p", "ActiveState,SubState,NRestarts,StatusText,LoadState,UnitFileState"]
            )
            if r is None:
                return [Finding("services", Level.SKIP, "systemctl not found")]
            props = dict(ln.split("=", 1) for ln in r.stdout.splitlines() if "=" in ln)
            unused = props.get("LoadState") == "not-found" or props.get("UnitFileState") in ("disabled", "masked")
            if unit in OPTIONAL_SERVICES and unused and props.get("ActiveState") != "active":
                why = "not installed" if props.get("LoadState") == "not-found" else props.get("UnitFileState", "")
                out.append(Finding("services", Level.SKIP, f"{unit}: {why} (optional)", topic=topic))
                continue
            state = f"{props.get('ActiveState', '?')}/{props.get('SubState', '?')}"
            restarts = props.get("NRestarts", "0")
            text = f"{unit}: {state}, {restarts} restarts" + (
                f", {props['StatusText']}" if props.get("StatusText") else ""
            )
            status = props.get("StatusText", "")
            if status.startswith(CONFIG_REFUSED):
                # up only to say so (the console's page): nothing records or sends
                out.append(
                    Finding("services", Level.FAIL, text, "lastmile config check says what is wrong", topic=topic)
                )
            elif props.get("ActiveState") == "active" and FAULT in status.split():
                # up, but a fault keeps it from (part of) its work: waited out, or a part down
                out.append(
                    Finding(
                        "services",
                        Level.FAIL,
                        text,
                        f"up but not doing all its work: journalctl -u {unit} -n 50 says why; it retries by itself",
                        topic=topic,
                    )
                )
            elif props.get("ActiveState") == "active":
                level = Level.WARN if int(restarts or 0) > 5 else Level.OK
                out.append(
                    Finding(
                        "services",
                        level,
                        text,
                        f"restarting often: journalctl -u {unit}" if level is Level.WARN else "",
                        topic=topic,
                    )
                )
            else:
                out.append(
                    Finding(
                        "services",
                        Level.FAIL,
                        text,
                        f"journalctl -u {unit} -n 50 says why; systemctl restart {unit}",
                        topic=topic,
                    )
                )
        return out

    def check_reading_center(self) -> list[Finding]:
        from lastmile.services.forward import peer_settings
        from uploader.dicom_association import echo
        from uploader.errors import ConfigurationFault, TransientError

        rc = self.config.reading_center
        peer = peer_settings(rc)
        peer = type(peer)(**{**peer.__dict__, "timeout_s": min(peer.timeout_s, NETWORK_TIMEOUT_S)})
        try:
            rtt = echo(peer)
        except ConfigurationFault as exc:
            return [
                Finding(
                    "reading-center",
                    Level.FAIL,
                    f"C-ECHO refused: {exc}",
                    "the PACS does not accept us: check reading_center.called_ae / calling_ae "
                    "and that the reading center registered this gateway's AE title and address",
                )
            ]
        except TransientError as exc:
            return [
                Finding(
                    "reading-center",
                    Level.FAIL,
                    f"C-ECHO failed: {exc}",
                    "check the network link and reading_center.host/port; items stay queued",
                )
            ]
        return [Finding("reading-center", Level.OK, f"C-ECHO {peer.where}: {rtt * 1000:.0f} ms")]

    def check_commitment_listener(self) -> list[Finding]:
        rc = self.config.reading_center
        if not rc.storage_commitment:
            return [
                Finding(
                    "commitment",
                    Level.OK,
                    "storage commitment not requested "
                    f"(local copies are kept: no_commitment_policy = {rc.no_commitment_policy})",
                )
            ]
        port = rc.listen_port
        bind_host = rc.listen_host
        if not bind_host:  # the forwarder listens on its address toward the reading center
            from uploader.reachability import address_toward

            try:
                bind_host = address_toward(rc.host, rc.port)
            except OSError:
                bind_host = "127.0.0.1"
        probe = "127.0.0.1" if bind_host in ("0.0.0.0", "::") else bind_host
        with socket.socket() as s:
            s.settimeout(1.0)
            answers = s.connect_ex((probe, port)) == 0
        if answers:
            return [self._listener_finding(port)]
        try:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((bind_host, port))
        except OSError as exc:
            return [
                Finding(
                    "commitment",
                    Level.FAIL,
                    f"port {port} cannot be bound: {exc.strerror}",
                    "another program holds it, or it needs privileges: change reading_center.listen_port",
                )
            ]
        return [
            Finding(
                "commitment",
                Level.WARN,
                f"nothing listens on port {port} yet (it is free)",
                "lastmile-forward opens it when it runs: systemctl status lastmile-forward",
            )
        ]

    def _listener_finding(self, port: int) -> Finding:
        """Something answers on the commitment port: lastmile-forward's listener, or another
        program holding the port - which is what keeps lastmile-forward from starting."""
        holders = listening_processes(port, self.proc_root)
        if holders is None:  # other users' processes are not ours to look at (not root)
            return Finding(
                "commitment", Level.OK, f"something listens on port {port} (run as root to see it is lastmile-forward)"
            )
        forward_pids = self.forward_pids()
        if forward_pids is None:  # no systemd here: the command line says it
            ours = any(is_forward_service(argv) for _, argv in holders)
        else:
            ours = any(pid in forward_pids for pid, _ in holders)
        if not holders or ours:
            return Finding("commitment", Level.OK, f"listener up on port {port} for commitment reports")
        pid, argv = holders[0]
        program = " ".join(argv)[:80] or "?"
        return Finding(
            "commitment",
            Level.FAIL,
            f"port {port} is held by another program ({program}, pid {pid}): lastmile-forward cannot listen "
            "there for commitment reports, and sends nothing until it can",
            "stop that program, or set reading_center.listen_port to a free port (and tell the reading center)",
        )

    def forward_pids(self) -> set[int] | None:
        """lastmile-forward.service's processes as systemd knows them: its main process and every
        process in its cgroup (empty: the unit is not running); None where systemd does not run the
        gateway (the unit is not installed: a `lastmile forward` run by hand is then the forwarder)
        or cannot be asked."""
        from lastmile.services.metrics_sources import ServiceProbe, cgroup2_mount

        if not self.systemd_run_dir.is_dir():
            return None
        run = self.run
        probe = ServiceProbe(
            (FORWARD_SERVICE,),
            run=lambda cmd: run(list(cmd)),
            cgroup_root=cgroup2_mount(self.mountinfo),
            proc=self.proc_root,
        )
        props = probe.systemd_properties().get(FORWARD_SERVICE, {})
        # systemd answers MainPID=0 for a unit it has never heard of: LoadState tells them apart
        main = props.get("MainPID", "").strip()
        if props.get("LoadState", "").strip() != "loaded" or not (main.isascii() and main.isdigit()):
            return None
        group = props.get("ControlGroup", "").strip()
        in_group = probe.pids_in(probe.cgroup_root / group.lstrip("/")) if group else []
        return {int(main), *in_group} - {0}

    def check_fhir(self) -> list[Finding]:
        """The platform's /metadata asked now (token, TLS, base URL), and what the forwarder found
        of it in its rounds - what the county's alert on lastmile_link_state points here for."""
        if not self.config.fhir.base_url:
            return [Finding("fhir", Level.SKIP, "fhir.base_url not configured")]
        return [*self._probe_fhir_metadata(), *self._fhir_link_recorded()]

    def _fhir_link_recorded(self) -> list[Finding]:
        """What the FHIR forwarder recorded of the county platform (read, no network call), judged
        as the metrics exporter and the System page judge it (`FhirPlatform`)."""
        from lastmile.data_dir import DataDirError
        from lastmile.services.link_status import fhir_platform

        try:
            reads = self.outbox_reads()
        except DataDirError:  # the queue check says it; the /metadata probe's finding stays
            return []
        if reads is None:
            return []
        finding = _county_platform_finding(fhir_platform(reads.fhir_status), self.now())
        return [] if finding is None else [finding]

    def _probe_fhir_metadata(self) -> list[Finding]:
        f = self.config.fhir
        import requests

        from uploader.errors import ConfigurationFault
        from uploader.fhir_sender import read_token_file
        from uploader.reachability import insecure_url_problem

        problem = insecure_url_problem(f.base_url)
        if problem:  # never send the token (or anything) that way, not even to ask /metadata
            return [Finding("fhir", Level.FAIL, f"fhir.base_url: {problem}", "use the platform's https:// address")]
        headers = {"Accept": "application/fhir+json"}
        if f.token_file:
            try:
                with as_owner_of(self.config.data_dir):
                    headers["Authorization"] = "Bearer " + read_token_file(f.token_file)
            except ConfigurationFault as exc:
                return [
                    Finding(
                        "fhir", Level.FAIL, str(exc), "put the token in the file, owned by the service user, mode 600"
                    )
                ]
        url = f.base_url.rstrip("/") + "/metadata"
        try:
            r = requests.get(
                url,
                headers=headers,
                timeout=min(f.timeout_s, NETWORK_TIMEOUT_S),
                verify=f.ca_file or True,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            return [
                Finding(
                    "fhir",
                    Level.FAIL,
                    f"{url}: {type(exc).__name__}: {exc}",
                    "check the network, fhir.base_url and fhir.ca_file",
                )
            ]
        if r.status_code in (401, 403):
            return [
                Finding(
                    "fhir",
                    Level.FAIL,
                    f"{url}: HTTP {r.status_code}: the token was refused",
                    "ask the county platform for a new token; write it to fhir.token_file",
                )
            ]
        if r.status_code == 429:
            return [_platform_busy(url, r.headers.get("Retry-After"))]
        if r.status_code != 200:
            return [
                Finding(
                    "fhir",
                    Level.FAIL,
                    f"{url}: HTTP {r.status_code}",
                    "is fhir.base_url the FHIR R4 base (ends before /metadata)?",
                )
            ]
        return [
            Finding(
                "fhir",
                Level.OK,
                f"{url}: HTTP 200 in {r.elapsed.total_seconds() * 1000:.0f} ms"
                + (" with token" if f.token_file else " (no token configured)"),
            )
        ]

    def check_devices(self) -> list[Finding]:
        return [
            *self._readings_waiting_for_space(),
            *self._lost_at_stop(),
            *self._registry_findings(),
            *self._ecg_clock_findings(),
            *self._stick_files_refused(),
            *self._battery_findings(),
        ]

    def _stick_files_refused(self) -> list[Finding]:
        """ECG files on a USB stick the import refused, that the doctor has not said (on Today) he
        has seen (lastmile.clinic.stick_files): one patient's ECG that never reaches the county."""
        from lastmile.clinic.stick_files import StickTrouble

        refused = self._read_once("clinic", self._read_clinic)[1]
        return [
            Finding(
                "devices",
                Level.WARN,
                f"ECG file on the USB stick not imported: {f.path}: {f.reason} (at {_stamp(f.refused_at)})",
                "export it again on the ECG cart"
                if f.trouble == StickTrouble.DAMAGED
                else "plug the stick in again; if it still fails, export it again on the ECG cart",
                advice_key=f"stick-file-{f.trouble.value}",
                topic="stick-file",
                subject=f.name,
                since=f.refused_at.timestamp(),
            )
            for f in refused
        ]

    def _lost_at_stop(self) -> list[Finding]:
        """Readings (streamed ECGs) a stop lost: held in memory only (a power cut), or kept on disk
        in a spill file that did not give them back at the restart (missing, damaged: the file and
        its .bad copy named for the county IT). Nothing brings them back (a bridge streams an ECG
        once), so the doctor says how many and when for LOST_SAID_FOR (lastmile.clinic.devices),
        whatever was stored since."""
        from lastmile.clinic.devices import HELD_AT_STOP, held_words, lost_message, lost_on_disk_message

        now = dt.datetime.fromtimestamp(self.now(), dt.timezone.utc)
        found = []
        for r in self.device_records() or []:
            until = r.lost_said_until(now)
            if r.removed or until is None or r.lost_at is None:  # lost_said_until: never without lost_at
                continue
            after = f"after {_stamp(r.lost_after)}, " if r.lost_after is not None else ""
            when = f"({after}found at its restart at {_stamp(r.lost_at)})"
            again = "they cannot be recovered: record them again if the patients are still here; "
            memory, disk = held_words(*r.lost_from_memory), held_words(*r.lost_from_disk)
            if memory:
                # another cause than space (locked, damaged) is the county IT's: freeing space does
                # nothing; the stop's own (and only it) is no fault: what to do is measure again
                at_stop = r.lost_cause == HELD_AT_STOP
                if at_stop:
                    keep = LOST_AT_STOP_HINT
                    advice = by_what(r.lost_from_memory, LOST_AT_STOP, LOST_ECGS_AT_STOP, LOST_BOTH_AT_STOP)
                else:
                    keep = (
                        LOST_NOT_STORED_HINT
                        if r.lost_cause
                        else "keep the gateway powered while readings wait for space (see the data line)"
                    )
                    advice = by_what(r.lost_from_memory, "lost-readings", "lost-ecgs", "lost-readings-and-ecgs") + (
                        NOT_STORED if r.lost_cause else ""
                    )
                found.append(
                    Finding(
                        "devices",
                        Level.FAIL,
                        f"{r.name or r.address}: {lost_message(memory, r.lost_cause)} {when}",
                        f"{again}{keep}; said until {_stamp(until)}",
                        advice_key=advice,
                        until=until.timestamp(),
                        since=r.lost_at.timestamp(),
                        subject=r.name or r.address if at_stop else "",
                        counts=r.lost_from_memory if at_stop else None,
                    )
                )
            if disk:
                found.append(
                    Finding(
                        "devices",
                        Level.FAIL,
                        f"{r.name or r.address}: {lost_on_disk_message(disk, r.lost_damage or 'its spill file')} "
                        f"{when}",
                        f"{again}the county IT: look at the damaged or missing file (its .bad copy) and the SD card; "
                        f"said until {_stamp(until)}",
                        advice_key=by_what(
                            r.lost_from_disk, LOST_DAMAGED_READINGS, LOST_DAMAGED_ECGS, LOST_DAMAGED_BOTH
                        ),
                        until=until.timestamp(),
                        since=r.lost_at.timestamp(),
                    )
                )
        return found + self._cards_not_checked_in(now)

    def _cards_not_checked_in(self, now: dt.datetime) -> list[Finding]:
        """A card (a doctor's badge) a scanner read as the gateway stopped, whose check-in the stop
        gave up and the restart did not find done (lastmile.services.serial_devices): said for
        LOST_SAID_FOR as what a stop lost; Today says which ID (not here: the journal's words)."""
        from lastmile.clinic.devices import CARD_DOCTOR

        found = []
        for r in self.device_records() or []:
            until = r.card_said_until(now)
            # card_said_until: never without card_found_at; its check stays for the type checker (_stamp below)
            if r.removed or until is None or r.card_found_at is None or r.card_scanned_at is None:
                continue
            badge = r.card_kind == CARD_DOCTOR
            what = "a doctor's badge" if badge else "a patient card"
            found.append(
                Finding(
                    "devices",
                    Level.WARN,
                    f"{r.name or r.address}: {what} scanned as the gateway stopped, at {_stamp(r.card_scanned_at)} "
                    f"({r.card_time_source}), was not {'taken' if badge else 'checked in'} (found at its restart "
                    f"at {_stamp(r.card_found_at)})",
                    f"scan it again if {'that doctor is on duty' if badge else 'the patient is still here'} "
                    f"(Today names it); said until {_stamp(until)}",
                    advice_key=BADGE_NOT_TAKEN if badge else CARD_NOT_CHECKED_IN,
                    until=until.timestamp(),
                    since=r.card_scanned_at.timestamp(),
                )
            )
        return found

    def _readings_waiting_for_space(self) -> list[Finding]:
        """Readings a serial monitor printed that the outbox refused: kept in the spill file until
        they can be stored, and a FAIL until then (the monitor cannot print them again). Its advice
        is the cause's: free space, or - the held rows' error says another cause (locked,
        damaged) - the county IT's, since freeing space does nothing for those."""
        from lastmile.clinic.devices import MEMORY_ONLY, lost_message
        from lastmile.services.serial_spill import ECG_SPILL_NAME, SPILL_NAME, waiting_readings

        records = [r for r in self.device_records() or [] if not r.removed]
        held = [r for r in records if r.waits_for_space]
        # every row that holds some says another cause than space: the spill files wait for that (a
        # stop's only when no row says a fault: the fault's advice first)
        named = next((r for r in held if not r.held_at_stop), held[0]) if held else None
        cause = named.held_cause if named is not None and all(r.held_cause for r in held) else ""
        found = []
        # the System page's advice names what waits too: a village doctor does not take an ECG for a reading
        for what, name, kind in (
            ("reading(s)", SPILL_NAME, READINGS_KEPT),
            ("streamed ECG(s)", ECG_SPILL_NAME, "ecgs-kept"),
        ):
            waiting = waiting_readings(self.config.data_dir, name)
            if not waiting:
                continue
            words, hint, advice = held_advice(
                f"{named.name or named.address}: {cause}" if cause and named is not None else "",
                f"kept in {name}",
                kind,
            )
            room = "" if cause else "; they are stored once there is room"
            found.append(
                Finding(
                    "devices",
                    Level.WARN if advice.endswith(AT_STOP) else Level.FAIL,  # kept on disk, stored at the next start
                    f"{waiting} {what} from serial devices {words}{room}",
                    hint,
                    advice_key=advice,
                )
            )
        # no spill file could be set aside (the partition was full at start), or they do not fit in
        # it: the row's own status says so until they are stored (seen again or not since)
        for r in (r for r in held if r.held_in_memory_only):
            if r.held_at_stop:  # said from the stop's last try: gone with its process, never stored at the next start
                message = lost_message(r.memory_words, r.held_cause)
                hint = f"{GONE_WITH_STOP_HINT}; record them again if the patients are still here"
                advice = by_what(
                    r.in_memory_only,
                    "memory-only" + AT_STOP,
                    "memory-only-ecgs" + AT_STOP,
                    "memory-only-readings-and-ecgs" + AT_STOP,
                )
            else:
                kind = by_what(r.in_memory_only, "memory-only", "memory-only-ecgs", "memory-only-readings-and-ecgs")
                words, hint, advice = held_advice(r.held_cause, MEMORY_ONLY, kind)
                message = f"{r.memory_words} {words}"
                hint += "; do not switch the gateway off before they are stored"
            found.append(Finding("devices", Level.FAIL, f"{r.name or r.address}: {message}", hint, advice_key=advice))
        return found

    def _registry_findings(self) -> list[Finding]:
        """The devices clinic.db knows (and the USB ones plugged in): seen, connected, failing."""
        links = sorted(p.name for p in self.device_links.iterdir()) if self.device_links.is_dir() else []
        plugged = f"plugged in: {', '.join(links)}" if links else "no USB device plugged in"
        records = self.device_records()
        if records is None:
            return [
                Finding(
                    "devices",
                    Level.OK if links else Level.WARN,
                    f"no device seen yet; {plugged}",
                    "" if links else "plug in the clinic's devices, or pair BLE ones: lastmile ble pair",
                )
            ]
        now = dt.datetime.fromtimestamp(self.now(), dt.timezone.utc)
        day = dt.timedelta(days=1)
        # unpaired or no longer configured: its last error is history, not a fault to fix
        records = [r for r in records if not r.removed]
        recent = [r for r in records if (t := last_seen(r)) is not None and now - t < day]
        # readings waiting for space are the space check's FAIL (the row's held status, never its
        # error): a row's error is another problem, a WARN here whatever waits
        errors = [r for r in records if failing_since_seen(r)]
        text = (
            f"{len(records)} known, {len(recent)} seen in 24 h, "
            f"{sum(r.connected for r in records)} connected; {plugged}"
        )
        if errors:
            worst = errors[0]
            return [
                Finding(
                    "devices",
                    Level.WARN,
                    text + f"; {worst.name or worst.address}: {worst.last_error}",
                    "`lastmile devices` lists each device's state",
                    advice_key="device-failing",  # the console's advice names them (subject)
                    subject=", ".join(r.name or r.address for r in errors),
                )
            ]
        return [Finding("devices", Level.OK, text)]

    def _ecg_clock_findings(self) -> list[Finding]:
        """An ECG cart whose newest ECG of the last week it dated impossibly (its clock reset, or
        set ahead: devices.identity.device_clock_wrong): its clock needs setting. Its next ECG
        with a believable time ends the warning."""
        from devices.identity import device_clock_wrong

        reads = self.outbox_reads()
        recent = reads.recent_ecgs if reads is not None else []
        newest: dict[str, dict[str, Any]] = {}
        for item in recent:  # newest first: each cart's first is its newest
            newest.setdefault(str(item.meta.get("device") or "unknown device"), item.meta)
        return [
            Finding(
                "devices",
                Level.WARN,
                f"ECG cart {cart}: its clock is wrong (its newest ECG is dated {meta.get('acquired_at', '?')}, "
                f"flags {', '.join(meta.get('flags') or ())})",
                "set the cart's date and time",
                advice_key="ecg-clock",
                topic="ecg-clock",
                subject=cart,
            )
            for cart, meta in newest.items()
            if device_clock_wrong(meta.get("flags") or ())
        ]

    def _battery_findings(self) -> list[Finding]:
        """A device whose last Battery Level is low (devices.ble.battery.LOW_BATTERY_PERCENT): a WARN
        until it reads higher (new batteries), so they are changed before it dies mid-measurement.
        A level not read lately (DeviceRecord.battery_current) is said as the last one read."""
        now = dt.datetime.fromtimestamp(self.now(), dt.timezone.utc)
        found = []
        for r in self.device_records() or []:
            if r.removed or not r.battery_low or r.battery_at is None:  # battery_low: a level, with its time
                continue
            read = "read" if r.battery_current(now, self.config.ble.battery_refresh_s) else "last read"
            found.append(
                Finding(
                    "devices",
                    Level.WARN,
                    f"{r.name or r.address}: battery low, {r.battery_level}% ({read} {_stamp(r.battery_at)})",
                    "replace or charge its batteries soon, before it stops during a measurement",
                    advice_key="battery-low",
                    topic="battery",
                    subject=r.name or r.address,
                )
            )
        return found

    def check_queue(self) -> list[Finding]:
        from lastmile.data_dir import DataDirError
        from uploader.masking import mask_server_text

        now = self.now()
        try:
            reads = self.outbox_reads()
        except DataDirError as exc:
            return [Finding("queue", Level.FAIL, str(exc), "the services cannot queue or forward anything meanwhile")]
        if reads is None:
            return [Finding("queue", Level.OK, "outbox empty (not created yet)")]
        stats, held, oldest_item, refused = reads.stats, reads.held, reads.oldest_item, reads.refused
        counts = stats["counts"]
        held_for_doctor = reads.ecgs.held_for_doctor  # they wait for the doctor, not for the link
        waiting = counts.get("queued", 0) + counts.get("sending", 0) - held_for_doctor
        oldest = stats["oldest_waiting_s"]
        quarantined = stats["quarantined"]
        text = (
            f"{waiting} waiting, {counts.get('sent', 0)} awaiting commitment, "
            f"{counts.get('committed', 0)} committed, {len(quarantined)} quarantined"
        )
        if held_for_doctor:
            text += f"; {held_for_doctor} more ECG(s) held for the doctor ({DOCTOR_DECIDES})"
        if oldest is not None:
            text += f"; oldest waiting {_age(oldest)}"
        faults = [
            (name, f"{name}: {mask_server_text(value['fault'])}")
            for name, value in stats["statuses"].items()
            if isinstance(value, dict) and value.get("fault")
        ]
        stuck = None if oldest_item is None else max(0.0, now - oldest_item.created_at)
        if held and oldest is not None:  # the age the level is judged on: a meter's wait is not the link's
            text += (
                " (all held by metered links)" if stuck is None else f" ({_age(stuck)} of what no metered link holds)"
            )
        out = []
        # a record the peer refuses alone, however long: the others go out, so not "nothing has"
        if stuck is not None and stuck > WAITING_FAIL_S and refused is None:
            out.append(
                Finding(
                    "queue",
                    Level.FAIL,
                    text,
                    "nothing has gone out for a week: check the "
                    "reading-center and fhir lines above, then `lastmile queue`",
                    topic="link",
                )
            )
        elif stuck is not None and stuck > WAITING_WARN_S and refused is not None:
            out.append(Finding("queue", Level.WARN, text, _refused_alone_hint(refused), "refused-alone", topic="link"))
        elif stuck is not None and stuck > WAITING_WARN_S:
            out.append(
                Finding(
                    "queue",
                    Level.WARN,
                    text,
                    "items wait for more than a day: is the link down?",
                    advice_key="waiting",
                    topic="link",
                )
            )
        else:
            out.append(Finding("queue", Level.OK, text, topic="link"))
        # its own row: set aside items never hide what the link's finding says of the others
        if quarantined:
            out.append(
                Finding(
                    "queue",
                    Level.WARN,
                    f"{len(quarantined)} quarantined",
                    "`lastmile queue` shows why items are quarantined; `lastmile retry` "
                    "requeues them once the cause is fixed",
                    topic="set-aside",
                )
            )
        out += [self._metered_finding(w, now) for w in held]
        for name, fault in faults:
            out.append(
                Finding(
                    "queue",
                    Level.FAIL,
                    f"the forwarder reports: {fault}",
                    "the peer refuses our configuration; fix it and `systemctl reload lastmile-forward`",
                    advice_key="refused",  # the settings, not the network: the queue's FAIL advice says network
                    topic=f"refused-{name}",
                )
            )
        return out

    def _metered_finding(self, wait: MeteredWait, now: float) -> Finding:
        """Routine items a metered link holds now: what holds them and until when. Never a FAIL:
        the link works as configured. A WARN once they have waited a day: a budget or windows
        too small for the clinic's traffic keep a backlog that grows. The message, the hint and
        the console's advice (`advice_key`) name the same holder, and only settings the link has."""
        from lastmile.clock import clinic_time
        from lastmile.services.metered import SETTINGS

        assert wait.blocked is not None and wait.routine_waiting
        blocked = wait.blocked
        until = clinic_time(dt.datetime.fromtimestamp(blocked.until, dt.timezone.utc), minutes=True)
        age = max(0.0, now - wait.routine_since) if wait.routine_since is not None else 0.0
        level = Level.WARN if age > WAITING_WARN_S else Level.OK
        # blocked with today's budget left: a shut window holds them now
        holder = "send window"
        if wait.budget_spent_today:  # then a window shut at midnight, if any, is what it waits for last
            holder = "daily budget (used up today)" + (" and its send window" if blocked.reason == "window" else "")
        message = (
            f"{wait.routine_waiting} routine item(s) of {wait.what} held by its {holder} until {until} "
            f"(in {_age(max(0.0, blocked.until - now))}; {blocked.detail}), the oldest for {_age(age)}"
        )
        section = SETTINGS[wait.destination]  # "reading_center.metered"
        # the console's advice and the topic name the same holder
        advice_key, topic = ("metered-budget", "budget") if wait.budget_spent_today else ("metered-window", "window")
        if level is Level.WARN and wait.budget_bytes:
            # a window opens every day: what it held a day had a window open with the budget spent
            # (a window shut now only says when they go), and widening it would not cure that
            if not wait.budget_spent_today:  # not today's: the console must not say it is used up
                message += ", kept by its daily budget used up on the days before"
                advice_key, topic = "metered-budget-before", "budget"
            hint = f"the link works, but {section}.daily_budget_mb is too tight for this clinic's traffic: raise it"
        elif level is Level.WARN:
            hint = f"the link works, but {section}.windows are too tight for this clinic's traffic: widen them"
        else:
            settings = [f"raise {section}.daily_budget_mb"] if wait.budget_bytes else []
            settings += [f"widen {section}.windows"] if wait.windows else []
            hint = f"working as configured; if routine items wait days, {section} is too tight: {' or '.join(settings)}"
        return Finding(
            "queue",
            level,
            message + "; STAT goes anyway",
            hint,
            advice_key=advice_key,
            until=blocked.until,
            topic=f"{topic}-{wait.destination}",
        )

    def check_console(self) -> list[Finding]:
        return self._console_listen() + self._console_restart_needed()

    def _console_restart_needed(self) -> list[Finding]:
        """Settings changed and reloaded that the running console takes only when restarted."""
        from lastmile.console.pending_restart import RESTART_COMMAND, restart_needed

        with as_owner_of(self.config.data_dir):
            names = restart_needed(self.config.data_dir)
        if not names:
            return []
        settings = ", ".join(names)
        return [
            Finding(
                "console",
                Level.WARN,
                f"changed settings not in use until the console restarts: {settings}",
                RESTART_COMMAND,
                advice_key="restart-needed",
                topic="restart-needed",
                subject=settings,
            )
        ]

    def _console_listen(self) -> list[Finding]:
        """Where the doctor's console listens, and its certificate's fingerprint (the clinic
        compares it with what the browser shows the first time)."""
        from lastmile.config import ConfigError
        from lastmile.console.listen import parse_listen
        from lastmile.console.tls import existing_certificate

        try:
            listen = parse_listen(self.config)
        except ConfigError as exc:
            return [Finding("console", Level.FAIL, str(exc), "fix [console] listen / https")]
        if not self.config.console.https:
            return [Finding("console", Level.OK, f"plain HTTP on {listen.host}:{listen.port} (loopback only)")]
        with as_owner_of(self.config.data_dir):
            cert = existing_certificate(self.config.data_dir)
        if cert is None:
            return [
                Finding(
                    "console",
                    Level.WARN,
                    f"https on port {listen.port}: no certificate yet",
                    "it is made when lastmile-console first starts: systemctl status lastmile-console",
                )
            ]
        return [Finding("console", Level.OK, f"https on port {listen.port}, certificate SHA-256 {cert.fingerprint}")]

    def check_reports(self) -> list[Finding]:
        """Critical reports the doctor has not acknowledged (FAIL), and whether reports come back."""
        from lastmile.clinic.db import DB_NAME

        data = self.config.data_dir
        if self.config.reports.source == "off":
            return [Finding("reports", Level.SKIP, "not polled (reports.source = off)")]
        if not (data / DB_NAME).exists():
            return [Finding("reports", Level.OK, "no ECG sent yet")]
        from lastmile.reports.store import POLLER_STATUS as STATUS_NAME
        from lastmile.reports.store import RECORDER_STATUS, ReportStore

        now = dt.datetime.fromtimestamp(self.now(), dt.timezone.utc)
        with as_owner_of(data):
            store = ReportStore.open(data)
            try:
                critical = store.unacknowledged_critical()
                studies = store.studies(since=now - dt.timedelta(days=self.config.reports.window_days))
                reports = store.reports(current_only=True)
                status = store.status(STATUS_NAME) or {}
                recorder = store.status(RECORDER_STATUS) or {}
                patients = {s.study_uid: s for s in store.studies()}
            finally:
                store.close()
        out = []
        for r in critical:
            study = patients.get(r.study_uid)
            patient = study.patient_id if study else ""
            who = patient or "(unassigned)"
            ecg = study.ecg_time[:16].replace("T", " ") if study and study.ecg_time else "?"
            out.append(
                Finding(
                    "reports",
                    Level.FAIL,
                    f"CRITICAL report {r.id} (危急值) for patient {who}, ECG {ecg}: {r.critical[0]}",
                    f"read it now (`lastmile report show {r.id}`), act on it, then `lastmile report ack {r.id}`",
                    advice_key="critical",
                    topic="critical" if patient else "critical-unassigned",
                    subject=patient,
                )
            )
        with_report = {r.study_uid for r in reports}
        waiting = sum(s.study_uid not in with_report for s in studies)
        text = f"{len(studies)} ECG(s) sent in {self.config.reports.window_days:g} days: {waiting} waiting for a report"
        if status.get("last_success_at"):
            text += f"; reading center last asked {_age(max(0.0, self.now() - status['last_success_at']))} ago"
        failing_since = status.get("failing_since")
        if status.get("fault"):
            out.append(
                Finding(
                    "reports",
                    Level.FAIL,
                    f"{text}; the reading center refuses report queries: {status['fault']}",
                    "fix the reading_center / reports settings, then `systemctl reload lastmile-forward`",
                    advice_key="queries-refused",
                    topic="queries",
                )
            )
        elif failing_since and self.now() - failing_since > REPORTS_FAILING_WARN_S:
            out.append(
                Finding(
                    "reports",
                    Level.WARN,
                    f"{text}; cannot ask for reports for {_age(self.now() - failing_since)}: {status.get('error')}",
                    "is the link down? `lastmile echo` tests the reading center",
                    topic="queries",
                )
            )
        else:
            out.append(Finding("reports", Level.OK, text, topic="queries"))
        return out + self._recorder_findings(recorder)

    def check_visits(self) -> list[Finding]:
        """Home visits that do not reach the county platform: the open one damaged (it must be
        stopped), set aside (a damaged record), all of them (a damaged signing key: none can be
        signed), or closed and not queued for a day (the forward service queues them within a
        minute). Creates nothing (visits.db, the key)."""
        from lastmile.services.metrics_sources import iso_epoch
        from lastmile.visits.relay_link import DB_NAME

        data = self.config.data_dir
        if not (data / DB_NAME).exists():
            return [Finding("visits", Level.OK, "no home visits recorded")]
        try:
            read = _visits_read(data, self.visits_cache)
        except sqlite3.Error as exc:
            if not _is_damage(exc):
                raise
            return [_visits_db_damaged(data, exc)]
        total, queued, kept_aside, set_aside = read.total, read.queued, read.kept_aside, read.set_aside
        first_aside, unqueued = read.first_aside, read.unqueued_ended
        out = []
        if read.open_damaged is not None:
            out.append(read.open_damaged)
        # the key is read (cryptography: ~8 MB in the console, which runs this every minute)
        # only while closed visits wait for it
        with as_owner_of(data):
            key_fault = _signing_key_fault(data) if unqueued else None
        if key_fault:
            from lastmile.visits.chain import KEY_FILE

            out.append(
                Finding(
                    "visits",
                    Level.FAIL,
                    f"{key_fault}: no home visit can be signed nor sent to the county platform",
                    f"restore {KEY_FILE} from its backup; the visits wait and go once it is repaired",
                    topic="signing-key",
                )
            )
        if first_aside:
            visit_id, why = first_aside
            out.append(
                Finding(
                    "visits",
                    Level.WARN,
                    f"{set_aside} set aside, not sent to the county platform (a damaged record): "
                    f"visit {visit_id}: {why}",
                    "`lastmile visit list` shows them; once the record is repaired, `lastmile visit retry --all`",
                    topic="set-aside",
                )
            )
        ended = [t for t in (iso_epoch(r) for r in unqueued) if t is not None]
        late = [t for t in ended if self.now() - t > WAITING_WARN_S]
        if late:
            out.append(
                Finding(
                    "visits",
                    Level.WARN,
                    f"{len(late)} closed visit(s) not queued for the county platform, "
                    f"the oldest for {_age(self.now() - min(late))}",
                    "the forward service queues them within a minute: is it running? "
                    "systemctl status lastmile-forward; journalctl -u lastmile-forward",
                    topic="not-queued",
                )
            )
        if out:
            return out
        text = f"{total} home visit(s), {queued} queued for the county platform"
        if len(unqueued) > len(ended):  # stopped before any time was known (or its time is damaged)
            text += f"; {len(unqueued) - len(ended)} wait for a known time (GPS or NTP)"
        if kept_aside:
            text += f"; {kept_aside} damaged when stopped, kept aside (recorded again, never sent)"
        if self.config.visits.household_register:  # a wrong datum flags every visit outside-radius
            text += f"; household register read in {self.config.visits.register_datum} (visits.register_datum)"
        return [Finding("visits", Level.OK, text)]

    def _recorder_findings(self, recorder: dict[str, Any]) -> list[Finding]:
        """Sent ECGs clinic.db refused to record (lastmile.reports.sent): their reports are not
        asked for while they wait, and never once dropped."""
        out = []
        hint = "is clinic.db locked by another program, or the data partition full? journalctl -u lastmile-forward"
        if recorder.get("waiting"):
            since = recorder.get("failing_since")
            age = f" for {_age(max(0.0, self.now() - since))}" if since else ""
            out.append(
                Finding(
                    "reports",
                    Level.WARN,
                    f"{recorder['waiting']} sent ECG(s) not yet recorded: clinic.db refuses the records{age} "
                    f"({recorder.get('error')}); their reports are not asked for until then (retrying)",
                    hint,
                    advice_key="unrecorded",
                    topic="unrecorded",
                )
            )
        dropped_at = recorder.get("dropped_at")
        window_s = self.config.reports.window_days * 86400.0
        if recorder.get("dropped") and dropped_at and self.now() - dropped_at <= window_s:
            out.append(
                Finding(
                    "reports",
                    Level.FAIL,
                    f"{recorder['dropped']} sent ECG(s) could not be recorded (last {_age(max(0.0, self.now() - dropped_at))}"
                    " ago): their reports may never come back here",
                    f"ask the reading center for the reports of ECGs sent then; {hint}",
                    advice_key="lost-records",
                    topic="lost-records",
                )
            )
        return out

    def check_metrics(self) -> list[Finding]:
        """Where the county's Prometheus scrapes this gateway, and whether it answers."""
        import urllib.error
        import urllib.request

        from lastmile.config import metrics_listen

        listen = metrics_listen(self.config)
        url = listen.url("/metrics")
        try:
            with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as response:
                body = response.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return [
                Finding(
                    "metrics",
                    Level.WARN,
                    f"nothing answers on {url} ({reason}): the county cannot watch this gateway",
                    "systemctl enable --now lastmile-metrics; journalctl -u lastmile-metrics says why it stopped",
                )
            ]
        series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        where = (
            "loopback only: set [metrics] listen to the VPN address for the county"
            if listen.loopback
            else "for the county"
        )
        return [Finding("metrics", Level.OK, f"{url} answers ({series} series, {len(body)} bytes), {where}")]

    def check_update(self) -> list[Finding]:
        """The last update round (lastmile-update.timer): a refused bundle, a full card or a failed
        install is a FAIL the county must act on; a link that is down is a WARN."""
        from lastmile.services.update import (
            UPDATE_HINTS,
            Outcome,
            Rauc,
            describe_rollback,
            read_state,
            reboot_pending,
            retry_due,
            rolled_back,
        )

        u = self.config.update
        if not u.enabled:
            return [Finding("update", Level.OK, "updates are off (update.enabled = false)")]
        state = read_state(self.config.data_dir)
        if state is None or not state.last_result:
            return [
                Finding("update", Level.WARN, "no update round has run yet", "systemctl status lastmile-update.timer")
            ]
        findings = []
        installed = str(state.installed.get("version", ""))
        if retry_due(state):  # a rollback by power cuts: installed once more
            findings.append(
                Finding(
                    "update",
                    Level.WARN,
                    describe_rollback(state),
                    "a steady supply for the update's first boots (a UPS); `lastmile update status`",
                    topic="installed-version",
                )
            )
        elif rolled_back(state) is not None:  # the round saw it (from the slots, so also back to a new card's A)
            findings.append(
                Finding(
                    "update",
                    Level.FAIL,
                    describe_rollback(state),
                    "tell the county's release team; `journalctl -b -1 -u lastmile-mark-good` shows why (if that "
                    "boot's journal was kept)",
                    topic="installed-version",
                )
            )
        elif installed and not reboot_pending(state):
            booted = Rauc(u.rauc_conf, u.keyring).booted_version()
            if booted is not None and booted != installed:
                findings.append(
                    Finding(
                        "update",
                        Level.FAIL,
                        f"version {installed} was installed but this gateway runs {booted}: the new slot did "
                        "not come up healthy and U-Boot went back to the old one (it is not installed again)",
                        "tell the county's release team; `journalctl -b -1` shows why the new slot failed",
                        topic="installed-version",
                    )
                )
        outcome = Outcome(state.last_result["outcome"])
        age = _age(self.now() - float(state.last_result.get("at", 0)))
        message = f"last round {age} ago: {outcome.value}: {state.last_result.get('message', '')}"
        if outcome in (Outcome.UP_TO_DATE, Outcome.INSTALLED, Outcome.DEFERRED):
            return [*findings, Finding("update", Level.OK, message, topic="last-round")]
        level = Level.WARN if outcome in (Outcome.SOURCE_FAILED, Outcome.DOWNLOAD_FAILED) else Level.FAIL
        hint = UPDATE_HINTS.get(outcome, "lastmile update status")
        return [*findings, Finding("update", level, message, hint, topic="last-round")]


# -- helpers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    options: frozenset[str]
    source: str
    device: str  # its filesystem's "major:minor" (mountinfo's third field)


def _where_readable_records_are(original: Path, copies: list[Path]) -> str:
    """Where a damaged file's readable records are, as far as looking can tell. A start keeps them
    in the file itself until it has written them, then removes it (none readable: removed at
    once), so the file there means they wait for a start. Gone, they were written - but for one
    case no file shows, a copy an earlier version left (this one sets a file with readable records
    aside only once they are written): on a full disk its start that could neither rewrite the
    file nor rename it back left them in the copy only (its journal says so, "... only"), lost if
    that start failed."""
    if original.exists():
        return f"its readable records, unless a start wrote them since, wait in {original} for the next start"
    copy = copies[0] if len(copies) == 1 else "a copy"
    return (
        "its readable records, if any, were written - unless its start's journal says they are in "
        f"{copy} only (a full disk) and that start then failed: check journalctl"
    )


def _owner_alive(locks_dir: Path, token: str, mountinfo: Path) -> bool:
    """Whether the outbox owner `token` runs (its note is then no stop's); not known: said as a stop's.
    Only looked at: the doctor never takes an owner's lock nor removes its file (the outbox's own probe)."""
    from uploader.payload_files import OwnerLock

    device_is_stats = locks_named_by_stats_device(locks_dir, mountinfo)
    try:
        return OwnerLock.seen_held(locks_dir, token, device_is_stats=device_is_stats)
    except OSError:
        return False


def locks_named_by_stats_device(directory: Path, mountinfo: Path) -> bool:
    """Whether /proc/locks names a lock in `directory` by the device stat gives: a mount of that
    device is found and is no overlayfs (whose locks are on a layer's device). Found by device,
    not by path: where the two differ (a btrfs subvolume) the device is not to be trusted."""
    try:
        dev = directory.stat().st_dev
        mounts = parse_mountinfo(mountinfo.read_text())
    except OSError:
        return False
    device = f"{os.major(dev)}:{os.minor(dev)}"
    mount = next((m for m in mounts if m.device == device), None)
    return mount is not None and mount.fstype != "overlay"


def left_by_stop_files(data: Path) -> list[tuple[Path, str, str]]:
    """(directory, name prefix, what its records are) of each kind of file a stop leaves for the
    next start (uploader.unwritten_records)."""
    from lastmile.data_dir import SENT_STUDIES_UNWRITTEN
    from lastmile.services.serial_spill import CARDS_GIVEN_UP_NAME, ROWS_BEHIND_NAME
    from uploader.outbox import LOCKS_DIR
    from uploader.payload_files import STORED_PREFIX

    return [
        (data / LOCKS_DIR, STORED_PREFIX, "outbox item(s) the county stored that the sending could not record as sent"),
        (data, SENT_STUDIES_UNWRITTEN, "sent-study record(s) clinic.db did not take"),
        (data, ROWS_BEHIND_NAME, "device row(s) whose held readings' counts were not written"),
        (data, CARDS_GIVEN_UP_NAME, "card(s) scanned as the gateway stopped, maybe not checked in"),
    ]


def _unescape(field_text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return field_text.encode().decode("unicode_escape") if "\\" in field_text else field_text


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if " - " not in line or len(parts) < 10:
            continue
        sep = parts.index("-")
        mount_point = _unescape(parts[4])
        options = set(parts[5].split(",")) | set(parts[sep + 3].split(","))
        mounts.append(Mount(mount_point, parts[sep + 1], frozenset(options), parts[sep + 2], parts[2]))
    return mounts


def find_mount(mountinfo: Path, path: Path) -> Mount | None:
    """The mount holding `path` (the longest mount point that is a prefix of it)."""
    try:
        mounts = parse_mountinfo(mountinfo.read_text())
    except OSError:
        return None
    target = str(path.resolve()) if path.exists() else str(path)
    best = None
    for m in mounts:  # later lines shadow earlier ones on the same mount point
        mp = m.mount_point.rstrip("/") or "/"
        covers = target == mp or target.startswith(mp.rstrip("/") + "/") or mp == "/"
        if covers and (best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/")):
            best = m
    return best


@contextlib.contextmanager
def as_owner_of(path: Path) -> Iterator[None]:
    """Root: act with the effective uid/gid of `path`'s owner meanwhile (files we create are theirs)."""
    if os.geteuid() != 0 or not path.exists():
        yield
        return
    st = path.stat()
    if st.st_uid == 0:
        yield
        return
    os.setegid(st.st_gid)
    os.seteuid(st.st_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def listening_processes(port: int, proc_root: Path = Path("/proc")) -> list[tuple[int, list[str]]] | None:
    """(pid, argv) of each process holding a TCP socket that listens on `port` (this network
    namespace's); None when that cannot be told: the socket is there, its owner not readable."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = (proc_root / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # sl local_address rem_address st ... inode
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return []
    found, hidden = [], False
    for proc in proc_root.iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:  # another user's (not root), or gone meanwhile
            hidden = True
            continue
        if inodes.intersection(_link_targets(fds)):
            try:
                argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                argv = []
            found.append((int(proc.name), [a for a in argv if a]))
    return found if found or not hidden else None


def _link_targets(links: list[Path]) -> set[str]:
    targets = set()
    for link in links:
        try:
            targets.add(os.readlink(link))
        except OSError:  # closed meanwhile (our own scan's directory among them)
            continue
    return targets


def is_forward_service(argv: list[str]) -> bool:
    """Whether a process's argv is `lastmile forward` (the unit's, or `python -m lastmile ... forward`):
    the guess where systemd does not run the gateway (`Doctor.forward_pids`)."""
    return "forward" in argv[1:] and any(Path(a).name == "lastmile" for a in argv)


def _run_tool(cmd: list[str]) -> subprocess.CompletedProcess[str] | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None


@dataclass(frozen=True)
class VisitsRead:
    """What the home visits check reads of visits.db."""

    total: int
    queued: int
    kept_aside: int  # closed unread by `visit stop`, recorded again: never sent
    set_aside: int
    first_aside: tuple[str, str] | None  # its id and why
    unqueued_ended: tuple[str | None, ...]  # when each closed visit not queued yet ended
    open_damaged: Finding | None


@dataclass
class VisitsReadCache:
    """visits.db as the home visits check last read it, with its files' state then; owned by a
    caller that runs the doctor again and again on one data directory (the console, every
    minute): even a read-only look writes SQLite's shared-memory file on the SD card, and every
    commit changes the database or its WAL file."""

    files: tuple[Any, ...] | None = None
    read: VisitsRead | None = None


def _visits_read(data: Path, cache: VisitsReadCache | None) -> VisitsRead:
    """visits.db's counts; with a `cache`, read again only once its files changed."""
    from lastmile.visits.relay_link import file_state

    files = file_state(data) if cache is not None else None  # before reading: a commit during it is seen next time
    if cache is not None and cache.read is not None and cache.files == files:
        return cache.read
    with as_owner_of(data):
        read = _read_visits(data)
    if cache is not None:
        cache.files, cache.read = files, read
    return read


def _read_visits(data: Path) -> VisitsRead:
    from lastmile.data_dir import columns_of, read_only
    from lastmile.visits.relay_link import (
        CLOSED_UNQUEUED_SQL,
        DB_NAME,
        IS_STOPPED_DAMAGED,
        SET_ASIDE_SQL,
        fault_generation,
    )

    with read_only(data / DB_NAME) as conn:
        # a visits.db an older version made lacks the newer columns: read as NULL
        older = "".join(
            f", NULL AS {c}" for c in ("fhir_fault", "fhir_fault_version") if c not in columns_of(conn, "visits")
        )
        visits = f"WITH visits AS (SELECT rowid AS seq, *{older} FROM main.visits) "
        # one `visit stop` closed unread was recorded again, as it said: kept aside, no retry
        total, queued, kept_aside, set_aside, opened = conn.execute(
            visits + f"SELECT COUNT(*), COUNT(fhir_queued_at), COALESCE(SUM({IS_STOPPED_DAMAGED}), 0), "
            f"COALESCE(SUM({SET_ASIDE_SQL}), 0), COALESCE(SUM(state = 'open'), 0) FROM visits"
        ).fetchone()
        first_aside = (
            conn.execute(
                visits + f"SELECT id, fhir_fault FROM visits WHERE {SET_ASIDE_SQL} ORDER BY seq LIMIT 1"
            ).fetchone()
            if set_aside
            else None
        )
        # as the forward service finds them (one set aside by another version is retried)
        unqueued = conn.execute(
            visits + f"SELECT ended_at FROM visits WHERE id IN ({CLOSED_UNQUEUED_SQL})", [fault_generation()]
        ).fetchall()
        open_damaged = _open_visit_damage(conn) if opened else None
    return VisitsRead(
        total,
        queued,
        kept_aside,
        set_aside,
        tuple(first_aside) if first_aside else None,
        tuple(r[0] for r in unqueued),
        open_damaged,
    )


# SQLite's words for a visits.db that reads again by itself: another connection holds it, or no
# visit was ever started in it (not migrated: the relay reads it as no visits, holding nothing back)
_PASSING = ("SQLITE_BUSY", "SQLITE_LOCKED")
_NOT_MIGRATED = ("no such table", "no such column")


def _is_damage(exc: sqlite3.Error) -> bool:
    """Whether visits.db failing so is damage (not a database, cannot be opened, an I/O error):
    it stays until the county IT restores the file."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return not name.startswith(_PASSING) and not str(exc).startswith(_NOT_MIGRATED)


def _visits_db_damaged(data: Path, exc: sqlite3.Error) -> Finding:
    """visits.db cannot be read: the relay cannot tell whether a reading belongs to an open visit,
    so it puts every reading back each round (a duplicate at the county is worse than waiting)."""
    from lastmile.visits.relay_link import DB_NAME

    waiting = _readings_waiting(data)
    held = "readings held back" if waiting is None else f"{waiting} reading{'s' if waiting != 1 else ''} held back"
    return Finding(
        "visits",
        Level.FAIL,
        f"{DB_NAME} is damaged: readings and home visits wait ({held}): {exc}",
        f"restore {DB_NAME} from its backup (county IT); the readings and visits go once it is repaired",
        advice_key="visits-db-damaged",
    )


def _readings_waiting(data: Path) -> int | None:
    """How many readings wait in the outbox to be relayed; None when it cannot be read."""
    from lastmile.clinic.observations import OBSERVATION_KIND
    from lastmile.data_dir import OUTBOX_DB, read_only

    if not (data / OUTBOX_DB).exists():
        return 0
    try:
        with as_owner_of(data), read_only(data / OUTBOX_DB) as conn:
            (n,) = conn.execute(
                "SELECT COUNT(*) FROM items WHERE kind = ? AND state IN ('queued', 'sending')", [OBSERVATION_KIND]
            ).fetchone()
    except sqlite3.Error:
        return None
    return int(n)


def _open_visit_damage(conn: Any) -> Finding | None:
    """The open visit's row decoded as the book does: a damaged one can never be signed nor sent,
    and start and note refuse to go on until it is stopped (set aside) - the doctor must know."""
    from lastmile.visits.record import DamagedVisitError, open_row_damage

    cursor = conn.execute("SELECT * FROM visits WHERE state = 'open'")
    names = [d[0] for d in cursor.description]
    row = cursor.fetchone()
    if row is None:
        return None
    visit = dict(zip(names, row, strict=True))
    cause = open_row_damage(visit)
    if cause is not None:
        damaged = DamagedVisitError(visit["id"], visit["patient_id"], cause)
        return Finding(
            "visits",
            Level.FAIL,
            str(damaged),
            f"lastmile visit stop; then lastmile visit start --patient {visit['patient_id']}",
            advice_key="open-damaged",
            topic="open-damaged",
        )
    return None


def _signing_key_fault(data: Path) -> str | None:
    """Why the gateway's visit-signing key file cannot be used, or None (sound, or not made yet)."""
    from lastmile.visits.chain import SigningKeyError, load_key

    try:
        load_key(data)
    except SigningKeyError as exc:
        return str(exc)
    return None


def _platform_busy(url: str, retry_after: str | None) -> Finding:
    """The county platform answered 429: busy, not down and not a wrong address - it answers, and
    the forwarder sends what waits again by itself (Retry-After honoured). A WARN: nothing to fix."""
    from uploader.fhir_connection import retry_after_seconds

    wait = retry_after_seconds(retry_after)
    return Finding(
        "fhir",
        Level.WARN,
        f"{url}: HTTP 429: the platform is busy" + (f", asks to retry after {wait:.0f} s" if wait is not None else ""),
        "nothing to fix here: visits and readings wait in the queue and are sent again by themselves; "
        "if it stays busy for hours, tell the county platform",
        advice_key="busy",  # for `lastmile doctor --json`: the System page never runs this check (offline)
    )


def _county_platform_finding(platform: FhirPlatform, now: float) -> Finding | None:
    """What the forwarder's rounds found, when the platform takes nothing: the three ways the
    county's LastmileHealthPlatformDown alert names (docs/prometheus/lastmile-alerts.yml), in its
    words; busy is a WARN until it is down (`FhirPlatform.down`, as lastmile_link_state says)."""
    from lastmile.services.link_status import BUSY_DOWN_AFTER_S
    from uploader.fhir_link import Said

    since = platform.taking_nothing_since
    taken = "nothing taken since " + _since(since, now) if since is not None else "it has taken none yet"
    tell = "tell the county IT; visit records wait in the queue, nothing is lost (`lastmile queue` lists them)"
    if platform.said is Said.DOWN:
        route = "check the platform and the gateway's route to it; " + tell
        return Finding(
            "fhir", Level.FAIL, f"the county platform does not answer the forwarder: {taken}", route, topic="link"
        )
    if platform.said is Said.REFUSES_ALL:
        return Finding(
            "fhir", Level.FAIL, f"the county platform refuses every visit record: {taken}", tell, topic="link"
        )
    if platform.said is not Said.BUSY:
        return None
    if platform.down(now):
        text = f"the county platform has been busy (429) for {BUSY_DOWN_AFTER_S // 60} minutes or more: {taken}"
        return Finding("fhir", Level.FAIL, text, tell, topic="link")
    return Finding(
        "fhir",
        Level.WARN,
        f"the county platform is busy (429): {taken}",
        f"nothing to fix yet: it is sent again by itself; busy {BUSY_DOWN_AFTER_S // 60} minutes, it counts as down",
        advice_key="busy",  # for `lastmile doctor --json` (the System page's county row says busy itself)
        topic="link",
    )


def _since(when: float, now: float) -> str:
    return f"{_stamp(dt.datetime.fromtimestamp(when, dt.timezone.utc))} ({_age(max(0.0, now - when))} ago)"


# who refuses an item alone, by its outbox kind (uploader.outbox.Kind's values)
_PEERS = {"dicom": ("the reading center", "ECG"), "fhir-bundle": ("the county platform", "visit record")}


def _refused_alone_hint(item: OutboxItem) -> str:
    """What to do about the oldest waiting item when its peer refuses it alone (the link works)."""
    from uploader.masking import mask_server_text

    peer, what = _PEERS.get(item.kind, ("its peer", "item"))
    answer = mask_server_text(item.last_error or "no answer recorded")
    return (
        f"the link works: {peer} refuses this one {what} (last answer: {answer}) while it takes the others; "
        f"it is tried again by itself - `lastmile queue` shows it: ask {peer} why it refuses it"
    )


def _stamp(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def render_text(findings: list[Finding]) -> str:
    width = max((len(f.label) for f in findings), default=0)
    lines = []
    for f in findings:
        lines.append(f"{f.level.value:<4}  {f.label:<{width}}  {f.message}")
        if f.hint and f.level in (Level.WARN, Level.FAIL):
            lines.append(f"{'':<4}  {'':<{width}}  hint: {f.hint}")
    fails = sum(f.level is Level.FAIL for f in findings)
    warns = sum(f.level is Level.WARN for f in findings)
    lines.append(f"{fails} FAIL, {warns} WARN" if fails or warns else "all good")
    return "\n".join(lines)


def render_json(findings: list[Finding]) -> str:
    return json.dumps({"ok": exit_code(findings) == 0, "findings": [f.to_json() for f in findings]}, indent=2)


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.level is Level.FAIL for f in findings) else 0


def diagnose(
    config_path: str | None, *, offline: bool, data_dir: str | None = None, **overrides: object
) -> list[Finding]:
    """Load the configuration (a broken one is a FAIL, the rest runs on defaults) and check."""
    from lastmile.config import Config, ConfigError, load_config

    error = None
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        config, error = Config(), str(exc)
    if data_dir:
        config.set_data_dir(data_dir)
    return Doctor(config, config_error=error, offline=offline, **overrides).run_all()  # type: ignore[arg-type]
