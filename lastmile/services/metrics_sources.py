"""What the metrics exporter reads, each source as a plain snapshot (no Prometheus types here).

Every read is cheap and leaves the gateway alone, because a county scrapes it every 30-60 s on
a Pi with an SD card:

- The databases are opened read-only (`mode=ro`, `query_only`), once per scrape, and read in
  one read transaction: a consistent snapshot, no write lock, nothing written (WAL readers do
  not block the services' writers). The outbox is read by SQL rather than through `Outbox.open`,
  which migrates, recovers interrupted sends and takes an owner lock: writes a scrape must
  never cause.
- The services are read from the kernel: the unit's cgroup (`cgroup.procs`) and /proc, which
  need no D-Bus. systemd's own restart counter (NRestarts) comes from `systemctl show` when it
  answers (as root over systemd's private socket, else over the system bus); where it does not,
  the main process's start time still counts restarts (`changes()` in PromQL).
- The clock: chrony's `chronyc -c -n tracking` (its command port, no privileges) when chrony
  runs, else systemd-timesyncd's flag file; and lastmile's own GPS anchor of this boot in
  visits.db (`lastmile.clock`): the gateway's guard when no time daemon has a reference.

Returned reports live in clinic.db (`reports`, `sent_studies`, `report_status`, written by
lastmile.reports.store); `read_reports` answers None until clinic.db exists, and also when its
columns do not match what is read here (a wrong number is worse than none).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devices.identity import EARLIEST_PLAUSIBLE
from lastmile.clock import read_boot_id
from lastmile.data_dir import CLINIC_DB, OUTBOX_DB, VISITS_DB, columns_of, read_only
from lastmile.ecg.holds import oldest_waiting
from lastmile.reports.unread_critical import UNACKNOWLEDGED_CRITICAL
from lastmile.services.link_status import (
    FHIR_STATUS,
    READING_CENTER_STATUS,
    StatusSnapshot,
    fhir_platform,
    link_down,
    number,
)
from uploader.fhir_link import LAST_ERROR_AT, Said

if TYPE_CHECKING:
    from lastmile.config import Config
    from uploader.outbox import MeterHold

log = logging.getLogger(__name__)

REPORT_POLLER_STATUS = "poller"  # lastmile.reports.poller.STATUS_NAME (issue 14)
UNCOMMITTED_STATES = ("queued", "sending", "sent")
KEPT_STATES = ("queued", "sending", "sent", "committed", "quarantined")  # all but purged (meta kept)
TIMESYNCD_FLAG = Path("/run/systemd/timesync/synchronized")  # touched by systemd-timesyncd at each sync
CGROUP_ROOT = Path("/sys/fs/cgroup")  # cgroup v2 as Debian 12 mounts it ("unified" below it in hybrid mode)
DEFAULT_SLICE = "system.slice"
TOOL_TIMEOUT_S = 5.0

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str] | None"]


def run_tool(cmd: Sequence[str]) -> subprocess.CompletedProcess[str] | None:
    """Run a small system tool; None when it is not installed or does not answer in time."""
    if not shutil.which(cmd[0]):
        return None
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


# -- the outbox ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkSnapshot:
    """What the senders last recorded about one destination."""

    last_success_at: float | None = None  # the last item it accepted
    last_failure_at: float | None = None  # the last transient failure (link down, peer busy)
    refused: bool = False  # the peer refuses this gateway: a configuration fault
    judged_down: bool | None = None  # the sender's own judgement, where it records one (FHIR)

    @property
    def state(self) -> str:
        """up / down / refused / unknown (nothing tried yet)."""
        if self.refused:
            return "refused"
        if link_down(self.last_success_at, self.last_failure_at) if self.judged_down is None else self.judged_down:
            return "down"
        return "up" if self.last_success_at is not None or self.judged_down is not None else "unknown"


@dataclass(frozen=True)
class OutboxSnapshot:
    counts: dict[tuple[str, str], int]  # (kind, state) -> items
    uncommitted_bytes: dict[str, int]  # kind -> payload bytes not yet committed by the peer
    oldest_waiting_s: dict[str, float]  # kind -> age of the oldest item not yet accepted (not held for the doctor)
    held: dict[tuple[str, str], int]  # (kind, hold reason) -> queued items held back now
    quality: dict[str, int]  # quality verdict -> ECGs in the outbox (not purged); "unchecked" without one
    last_committed_at: dict[str, float]  # kind -> the last commitment (DICOM storage commitment, FHIR 2xx)
    links: dict[str, LinkSnapshot]  # "dicom", "fhir" -> link
    # kind -> age of the oldest item waiting that no metered link holds now (a shut send window or
    # a spent daily budget holds routine items as configured): what a stuck link shows
    oldest_stuck_s: dict[str, float] = field(default_factory=dict)


def read_outbox(data_dir: Path, now: float, *, config: Config | None = None) -> OutboxSnapshot | None:
    """The outbox as it is now; None when it was never created. `config`: the gateway's, for
    what its metered links hold (none: nothing is held)."""
    path = data_dir / OUTBOX_DB
    if not path.is_file():
        return None
    with read_only(path) as conn:
        # Purged rows pile up for years: counted from the claim index alone (no row is read),
        # summed only where items are alive (an index seek), and scanned once in order for the
        # last send: about half the time of one GROUP BY over every row (50k items, bench/metrics.py).
        counts = {
            (kind, state): n
            for state, kind, n in conn.execute("SELECT state, kind, COUNT(*) FROM items GROUP BY state, kind")
        }
        uncommitted = dict(
            conn.execute(
                f"SELECT kind, COALESCE(SUM(size), 0) FROM items "
                f"WHERE state IN ({', '.join('?' * len(UNCOMMITTED_STATES))}) GROUP BY kind",
                UNCOMMITTED_STATES,
            )
        )
        oldest_created = oldest_waiting(conn, now)  # an ECG held for the doctor waits for him, not the link
        last_sent: dict[str, float] = {}
        last_committed: dict[str, float] = {}
        for kind, sent, committed in conn.execute(
            "SELECT kind, MAX(sent_at), MAX(committed_at) FROM items GROUP BY kind"
        ):
            if sent is not None:
                last_sent[kind] = sent
            if committed is not None:
                last_committed[kind] = committed
        held = {
            (kind, reason or "unspecified"): n
            for kind, reason, n in conn.execute(
                "SELECT kind, hold_reason, COUNT(*) FROM items WHERE state = 'queued' AND hold_until > ? "
                "GROUP BY kind, hold_reason",
                (now,),
            )
        }
        # the quality gate's verdict is in the ECG item's meta (issue 13); purged items have no meta
        quality = {
            verdict or "unchecked": n
            for verdict, n in conn.execute(
                f"SELECT json_extract(meta, '$.quality.verdict'), COUNT(*) FROM items "
                f"WHERE kind = 'dicom' AND state IN ({', '.join('?' * len(KEPT_STATES))}) GROUP BY 1",
                KEPT_STATES,
            )
        }
        statuses = {name: _json_object(value) for name, value in conn.execute("SELECT name, value FROM status")}
        oldest_stuck = dict(oldest_created)
        meter_held = {} if config is None else _held_since(config, StatusSnapshot(statuses), now)
        if meter_held:  # the routine items those meters hold (not STAT, not held for the doctor) left out
            from uploader.outbox import waiting_not_held_sql  # a metered gateway has the outbox module already

            oldest_stuck = oldest_waiting(conn, now, waiting_not_held_sql(now, meter_held))
    rc = statuses.get(READING_CENTER_STATUS, {})
    dicom_success = _latest(number(rc.get("last_success")), last_sent.get("dicom"))
    links = {
        "dicom": LinkSnapshot(dicom_success, number(rc.get(LAST_ERROR_AT)), refused=bool(rc.get("fault"))),
        "fhir": _fhir_link(statuses.get(FHIR_STATUS), last_sent.get("fhir-bundle"), now),
    }
    return OutboxSnapshot(
        counts=counts,
        uncommitted_bytes=uncommitted,
        oldest_waiting_s={kind: max(0.0, now - created) for kind, created in oldest_created.items()},
        held=held,
        quality=quality,
        last_committed_at=last_committed,
        links=links,
        oldest_stuck_s={kind: max(0.0, now - created) for kind, created in oldest_stuck.items()},
    )


def _fhir_link(status: dict[str, Any] | None, last_sent: float | None, now: float) -> LinkSnapshot:
    """The county platform's link as the FHIR sender judged it (`FhirPlatform.down`: refusing one
    bundle, or busy a while, it answers: up; refused: it refuses this gateway, `Said.FAULT` - kept
    by the rounds that send nothing, given up by the first the platform answers, whatever the items
    the refused round held back still say). Until a round judged it, never down, as the doctor and
    the System page say it: unknown, or up once a bundle went - never guessed from a queued item's
    failure (a round cut before it recorded what the platform said)."""
    platform = fhir_platform(status)
    if platform.said is None:
        return LinkSnapshot(last_sent)
    refused = platform.said is Said.FAULT
    return LinkSnapshot(last_sent, platform.down_since, refused=refused, judged_down=platform.down(now))


def _held_since(config: Config, statuses: StatusSnapshot, now: float) -> dict[str, MeterHold]:
    """Outbox kind -> what its meter holds of the routine items queued (only the meters that hold
    them now), as `lastmile doctor` judges it (lastmile.services.metered.metered_wait)."""
    from lastmile.services.metered import QUEUED_KINDS, meter_hold, meters

    held = {}
    for destination, meter in meters(config, statuses).items():
        if destination not in QUEUED_KINDS:
            continue
        hold = meter_hold(meter, now, meter.blocked(now))
        if hold is not None:
            held[QUEUED_KINDS[destination]] = hold
    return held


def _json_object(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _latest(*values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def iso_epoch(iso: object) -> float | None:
    """An ISO 8601 time as the gateway's databases store it (UTC when no offset is written: every
    writer writes UTC); None when unknown or unreadable (damaged)."""
    if not isinstance(iso, str) or not iso:
        return None
    try:
        value = dt.datetime.fromisoformat(iso)
    except ValueError:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


# -- returned reports -------------------------------------------------------------


@dataclass(frozen=True)
class ReportsSnapshot:
    critical_unacknowledged: int  # critical reports nobody at the clinic has opened yet
    critical_oldest_s: float | None  # how long the oldest of them has waited
    awaited_studies: int  # ECGs sent whose final report has not come back
    awaited_stat: int  # of which STAT
    awaited_oldest_s: float | None
    link: LinkSnapshot  # the report poller's last rounds


REPORT_TABLES = {
    "reports": {"critical", "acknowledged_at", "received_at", "superseded_by"},
    "sent_studies": {"final_at", "sent_at", "stat"},
    "report_status": {"name", "value"},
}


def read_reports(data_dir: Path, now: float) -> ReportsSnapshot | None:
    """The report store in clinic.db (lastmile/reports/store.py); None while clinic.db does not
    exist, and on a schema mismatch: never a wrong number."""
    path = data_dir / CLINIC_DB
    if not path.is_file():
        return None
    with read_only(path) as conn:
        for table, needed in REPORT_TABLES.items():
            if not needed <= columns_of(conn, table):
                return None
        critical, critical_first = conn.execute(
            f"SELECT COUNT(*), MIN(received_at) FROM reports WHERE {UNACKNOWLEDGED_CRITICAL}"  # as ReportStore's
        ).fetchone()
        awaited, awaited_stat, awaited_first = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(stat != 0), 0), MIN(sent_at) FROM sent_studies WHERE final_at IS NULL"
        ).fetchone()
        row = conn.execute("SELECT value FROM report_status WHERE name = ?", (REPORT_POLLER_STATUS,)).fetchone()
    poller = _json_object(row[0] if row else None)
    critical_at, awaited_at = iso_epoch(critical_first), iso_epoch(awaited_first)
    return ReportsSnapshot(
        critical_unacknowledged=critical,
        critical_oldest_s=None if critical_at is None else max(0.0, now - critical_at),
        awaited_studies=awaited,
        awaited_stat=awaited_stat,
        awaited_oldest_s=None if awaited_at is None else max(0.0, now - awaited_at),
        link=LinkSnapshot(
            number(poller.get("last_success_at")),
            number(poller.get("failing_since")) if poller.get("error") else None,
            refused=bool(poller.get("fault")),
        ),
    )


# -- disk -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskSnapshot:
    free_bytes: int  # available to the service user (what the outbox's min_free_mb is checked against)
    size_bytes: int


def read_disk(data_dir: Path) -> DiskSnapshot | None:
    """The partition the data directory is (or will be) on."""
    path = data_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return DiskSnapshot(free_bytes=st.f_bavail * st.f_frsize, size_bytes=st.f_blocks * st.f_frsize)


# -- the clock ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClockSnapshot:
    plausible: bool  # the system clock is after 2020 (a Pi without RTC boots in 1970)
    source: str  # "chrony", "timesyncd" or "none"
    synchronized: bool  # the time daemon has a reference now
    reference: str = ""  # chrony's reference: "GPS", "PPS", an NTP server's address
    offset_s: float | None = None  # system clock minus the reference (chrony's estimate); + = ahead
    last_sync_at: float | None = None  # the reference's last update (chrony) / last sync (timesyncd)
    gps_offset_s: float | None = None  # system clock minus the GPS time lastmile saw this boot


CHRONY_LOCAL_REFID = "7F7F0101"  # chrony's `local` directive: its own clock, no outside reference


@dataclass(frozen=True)
class ChronyTracking:
    refid: str
    reference: str
    stratum: int
    reference_time: float
    offset_s: float  # system clock minus true time
    leap_status: str

    @property
    def synchronized(self) -> bool:
        return (
            self.leap_status != "Not synchronised"
            and self.stratum not in (0, 16)
            and self.refid.upper() != CHRONY_LOCAL_REFID
        )


def parse_chrony_tracking(csv_line: str) -> ChronyTracking | None:
    """`chronyc -c tracking`: refid (hex), reference name or address (with -n), stratum,
    reference time, current correction (positive: the system clock is *slow*: chronyc prints
    "-0.0000016" where its text form says "0.0000016 seconds fast"), ..., leap status (last)."""
    fields = csv_line.strip().split(",")
    if len(fields) < 14:
        return None
    try:
        return ChronyTracking(
            refid=fields[0],
            reference=fields[1] or fields[0],
            stratum=int(fields[2]),
            reference_time=float(fields[3]),
            offset_s=-float(fields[4]),
            leap_status=fields[13],
        )
    except ValueError:
        return None


def read_clock(
    data_dir: Path, *, run: Runner = run_tool, now: float | None = None, timesyncd_flag: Path = TIMESYNCD_FLAG
) -> ClockSnapshot:
    wall = time.time() if now is None else now
    plausible = wall >= EARLIEST_PLAUSIBLE.timestamp()
    gps_offset = read_gps_offset(data_dir, wall)
    result = run(["chronyc", "-c", "-n", "tracking"])
    if result is not None and result.returncode == 0:
        tracking = parse_chrony_tracking(result.stdout.splitlines()[0] if result.stdout else "")
        if tracking is not None:
            synced = tracking.synchronized
            return ClockSnapshot(
                plausible,
                "chrony",
                synced,
                reference=tracking.reference if synced else "",
                offset_s=tracking.offset_s if synced else None,
                last_sync_at=tracking.reference_time if synced and tracking.reference_time > 0 else None,
                gps_offset_s=gps_offset,
            )
    try:
        flag = timesyncd_flag.stat()
    except OSError:
        return ClockSnapshot(plausible, "none", False, gps_offset_s=gps_offset)
    return ClockSnapshot(plausible, "timesyncd", True, last_sync_at=flag.st_mtime, gps_offset_s=gps_offset)


def read_gps_offset(data_dir: Path, wall: float) -> float | None:
    """System clock minus GPS time, from the anchor lastmile learnt from a fix in this boot
    (visits.db `clock_anchor`: UTC = monotonic + offset); None without a GPS fix this boot."""
    path = data_dir / VISITS_DB
    if not path.is_file():
        return None
    try:
        with read_only(path) as conn:
            if not {"boot_id", "offset", "source"} <= columns_of(conn, "clock_anchor"):
                return None
            row = conn.execute(
                "SELECT offset FROM clock_anchor WHERE boot_id = ? AND source = 'gps'", (read_boot_id(),)
            ).fetchone()
    except sqlite3.Error as exc:
        log.debug("visits.db not readable for the GPS anchor: %s", exc)
        return None
    return None if row is None else wall - (time.monotonic() + float(row[0]))


# -- the services ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceSnapshot:
    unit: str
    active: bool  # systemd says active, or (without systemd's answer) its cgroup holds a process
    resident_bytes: int | None = None  # RSS of every process in the unit's cgroup
    started_at: float | None = None  # when its main process started (epoch): changes on restart
    restarts: int | None = None  # systemd's NRestarts; None when systemctl does not answer
    processes: int = 0


@dataclass
class ServiceProbe:
    """Reads the units' cgroups and /proc; asks `systemctl show` for what only systemd knows."""

    units: Sequence[str]
    run: Runner = run_tool
    cgroup_root: Path = CGROUP_ROOT
    slice_dir: Path | None = None  # where the units' cgroups are; found from our own cgroup when None
    proc: Path = Path("/proc")
    _systemd_silent: bool = field(default=False, init=False)

    def read(self) -> list[ServiceSnapshot]:
        shown = self.systemd_properties()
        slice_dir = self.slice_dir or self.find_slice()
        out = []
        for unit in self.units:
            props = shown.get(unit, {})
            group = props.get("ControlGroup")
            cgroup = self.cgroup_root / group.lstrip("/") if group else slice_dir / unit
            pids = self.pids_in(cgroup)
            main = _int(props.get("MainPID")) or (min(pids, key=self.start_ticks_or_max) if pids else 0)
            rss = [self.rss_of(pid) for pid in pids]
            active = props["ActiveState"] == "active" if "ActiveState" in props else bool(pids)
            out.append(
                ServiceSnapshot(
                    unit=unit,
                    active=active,
                    resident_bytes=sum(r for r in rss if r is not None) if pids else None,
                    started_at=self.started_at(main) if main else None,
                    restarts=_int(props.get("NRestarts")),
                    processes=len(pids),
                )
            )
        return out

    def systemd_properties(self) -> dict[str, dict[str, str]]:
        """unit -> {property: value}; {} when systemctl cannot be asked (no systemd, no bus)."""
        if self._systemd_silent:
            return {}
        result = self.run(
            ["systemctl", "show", "--property=Id,LoadState,ActiveState,NRestarts,MainPID,ControlGroup", *self.units]
        )
        if result is None or result.returncode != 0:
            # not under systemd, or no way to reach it: the kernel's view is what we have
            self._systemd_silent = result is None or "not been booted with systemd" in (result.stderr or "")
            return {}
        shown: dict[str, dict[str, str]] = {}
        for block in result.stdout.split("\n\n"):
            props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            if props.get("Id"):
                shown[props["Id"]] = props
        return shown

    def find_slice(self) -> Path:
        """The cgroup directory our own unit sits in (system.slice under systemd)."""
        try:
            text = (self.proc / "self/cgroup").read_text()
        except OSError:
            return self.cgroup_root / DEFAULT_SLICE
        for line in text.splitlines():
            if line.startswith("0::"):
                own = line[3:].strip().lstrip("/")
                if own.endswith(".service") and "/" in own:
                    return self.cgroup_root / own.rsplit("/", 1)[0]
        return self.cgroup_root / DEFAULT_SLICE

    @staticmethod
    def pids_in(cgroup: Path) -> list[int]:
        try:
            return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def rss_of(self, pid: int) -> int | None:
        try:
            with open(self.proc / str(pid) / "status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None  # a zombie has no VmRSS

    def start_ticks(self, pid: int) -> int | None:
        try:
            with open(self.proc / str(pid) / "stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            return int(fields[19])  # field 22 of proc(5) (starttime), counted after "pid (comm)"
        except (OSError, ValueError, IndexError):
            return None

    def start_ticks_or_max(self, pid: int) -> int:
        ticks = self.start_ticks(pid)
        return ticks if ticks is not None else 2**63

    def started_at(self, pid: int) -> float | None:
        """Epoch seconds the process started: the same number at every scrape, or changes()
        would count the jitter of a computed boot time as restarts."""
        ticks = self.start_ticks(pid)
        if ticks is None:
            return None
        return self.boot_time() + ticks / os.sysconf("SC_CLK_TCK")

    def boot_time(self) -> float:
        """The kernel's boot time (btime, whole seconds; it moves only when the clock is stepped),
        else one computed from CLOCK_BOOTTIME, rounded to the second."""
        try:
            with open(self.proc / "stat", encoding="ascii") as f:
                for line in f:
                    if line.startswith("btime "):
                        return float(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return float(round(time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)))


def cgroup2_mount(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on a
    hybrid (v1 + v2) system, where systemd keeps the units' processes in the v2 tree too."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return CGROUP_ROOT
    for line in lines:
        head, sep, tail = line.partition(" - ")
        if sep and tail.split(" ", 1)[0] == "cgroup2":
            return Path(head.split()[4].replace("\\040", " "))
    return CGROUP_ROOT


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "", "[not set]") else None
    except ValueError:
        return None
