"""The long-running services in tests: what the serial devices send them, systemd's notification
socket, `lastmile acquire` as systemd starts it, `lastmile doctor` with the system-wide bits
injected, a FHIR token file, waiting for what a service does, another process's write lock and a
stop that meets it, the name the check-in knows for a patient."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from lastmile.clinic.devices import DeviceRegistry
from lastmile.clinic.patients import PatientContext
from lastmile.config import Config, parse_config
from lastmile.demo.loopback import free_port
from lastmile.doctor import Doctor, Finding, Level
from tests.conftest import REPO
from tests.serial_pty import PtyDevice
from tests.waiting import wait_for

LASTMILE = [sys.executable, "-m", "lastmile"]
FHIR_TOKEN = "s3cret-token"  # what tests.fhir_server.FhirTestServer(token=...) is given

# -- what devices on the serial ports send ---------------------------------------------------------

# A report as the example monitor prints it (CR LF line ends, a banner before it).
VITALS_REPORT = (
    b"VM-100 ready\r\n"
    b"===== VITALS REPORT =====\r\n"
    b"DEVICE VM-100  SN 004211\r\n"
    b"DATE 2025-03-04  TIME 09:41:07\r\n"
    b"RECORD 0172\r\n"
    b"NIBP   121/79 (93) mmHg\r\n"
    b"PULSE  72 bpm\r\n"
    b"SPO2   97 %\r\n"
    b"TEMP   98.6 F\r\n"
    b"===== END =====\r\n"
)


def report_printed(now: dt.datetime) -> bytes:
    """The monitor's report of three readings, printed at `now` (its clock: UTC+1)."""
    printed = (now + dt.timedelta(hours=1)).strftime("DATE %Y-%m-%d  TIME %H:%M:%S").encode()
    return VITALS_REPORT.replace(b"DATE 2025-03-04  TIME 09:41:07", printed)


# What a 2D scanner in USB-CDC mode sends: the code, then CR LF (some models: CR only).
PATIENT_CARD_SCAN = b"80276001234567890123\r\n"  # an EHIC-style card number (20 digits)
DOCTOR_BADGE_SCAN = b"DR-004711\r"

# The example ASCII-report profile shipped for the vitals monitor above.
EXAMPLE_PROFILE = REPO / "firmware_bridge" / "profiles" / "example-vitals-monitor.toml"

# -- systemd ----------------------------------------------------------------------------------------


class Manager:
    """A stand-in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line in m.split("\n") for m in self.messages):
                return self.messages
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        raise AssertionError(f"{line!r} never arrived; got {self.messages}")

    def drain_queued(self) -> list[str]:
        """Whatever was sent before now, without waiting."""
        got = []
        self.sock.setblocking(False)
        try:
            while True:
                got.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        self.messages += got
        return got

    def drain(self, seconds: float) -> list[str]:
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                got.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        self.messages += got
        return got


def start_acquire(config: Path, manager: Manager, *, watchdog_usec: int) -> subprocess.Popen[str]:
    """`lastmile acquire` as systemd starts it: notify socket, watchdog; its output on stdout."""
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(manager.path),
        "WATCHDOG_USEC": str(watchdog_usec),
        "PYTHONPATH": str(REPO),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "lastmile", "-c", str(config), "acquire"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def status_with(manager: Manager, *words: str, timeout: float = 60.0) -> str:
    """The first STATUS= the service sent that holds every one of `words`."""
    deadline = time.monotonic() + timeout
    while True:
        for message in manager.messages:
            for line in message.split("\n"):
                if line.startswith("STATUS=") and all(w in line for w in words):
                    return line.removeprefix("STATUS=")
        if time.monotonic() > deadline:
            said = [ln for m in manager.messages for ln in m.split("\n") if ln.startswith("STATUS=")]
            raise AssertionError(f"no STATUS with {words} within {timeout} s; got {said}")
        manager.drain(0.5)


def start(config: Path, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """`lastmile -c config ARGS...` as its own process (a service, as systemd would run it), its
    output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen([*LASTMILE, "-c", str(config), *args], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop it as systemd does: SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def service_running(
    config: Path, *args: str, log: Path, before_the_stop: Callable[[], object] = lambda: None
) -> Iterator[subprocess.Popen[bytes]]:
    """`start`ed for the block, `stop`ped after it, whatever happened in it; `before_the_stop`
    first (a test server holding its answer lets it go: the stop is not held by it)."""
    proc = start(config, *args, log=log)
    try:
        yield proc
    finally:
        before_the_stop()
        stop(proc)


def run_until(
    config: Path,
    *args: str,
    log: Path,
    until: Callable[[], object],
    what: str,
    timeout: float = 60.0,
    then_s: float = 0.0,
) -> None:
    """`lastmile -c config ARGS...` (the next start) run until `until()` holds or it exits, then
    `then_s` more (its rounds in which nothing more may happen), then stopped."""
    with service_running(config, *args, log=log) as proc:
        wait_for(lambda: until() or proc.poll() is not None, timeout, what=what)
        time.sleep(then_s)


def sigterm_and_wait(proc: subprocess.Popen[bytes], within_s: float = 30.0) -> int | None:
    """SIGTERM, as systemd sends it at a stop; the exit code once it exits within `within_s`
    (None: still running - no SIGKILL here, the test says how that went)."""
    proc.send_signal(signal.SIGTERM)
    stopped_by = time.monotonic() + within_s
    while proc.poll() is None and time.monotonic() < stopped_by:
        time.sleep(0.1)
    return proc.poll()


def log_tail(log: Path) -> str:
    """The end of a service's log: what a failed assertion shows."""
    return log.read_text(errors="replace")[-3000:]


def errors_said(journal: str) -> list[str]:
    """The lines of a service's log at ERROR, and tracebacks: none at an ordinary stop."""
    return [line for line in journal.splitlines() if " ERROR " in line or "Traceback" in line]


def waiting_in_a_sleep(pid: int) -> bool:
    """Whether a thread of process `pid` sleeps in nanosleep: a device service (acquire, ble)
    otherwise sleeps in select, epoll and futex waits only, so that is SQLite's busy wait for a
    write lock another process holds."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if "nanosleep" in (task / "wchan").read_text():
                return True
    return False


def stop_child(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.kill()
    out, _ = proc.communicate(timeout=10)
    return out


def no_tools(cmd: list[str]) -> None:
    return None


def doctor(tmp_path: Path, toml: str = "", **kw: object) -> Doctor:
    """`lastmile doctor` on `toml`, its data partition an ext4 mount of `tmp_path`, no tools, no devices."""
    config = parse_config(f'[gateway]\ndata_dir = "{tmp_path}"\n' + toml, "test.toml")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"22 1 179:2 / / ro shared:1 - ext4 /dev/root ro\n"
        f"30 22 179:3 / {tmp_path} rw,noatime shared:9 - ext4 /dev/p3 rw,commit=60\n"
    )
    defaults = dict(mountinfo=mountinfo, run=no_tools, device_links=tmp_path / "no-dev", journald_paths=())
    return Doctor(config, **{**defaults, **kw})  # type: ignore[arg-type]


def levels(findings: list[Finding], check: str) -> list[Level]:
    """The levels (OK, WARN, FAIL ...) of the doctor's findings for `check`."""
    return [f.level for f in findings if f.check == check]


def fhir_token_file(directory: Path) -> str:
    """A private file holding FHIR_TOKEN, as `[fhir] token_file` names it."""
    path = directory / "fhir.token"
    path.write_text(FHIR_TOKEN + "\n")
    path.chmod(0o600)
    return str(path)


def no_reading_center_toml() -> str:
    """`[reading_center]` of a gateway whose reading center does not listen (no ECG goes there):
    free loopback ports, no storage commitment."""
    return (
        f'[reading_center]\nhost = "127.0.0.1"\nport = {free_port()}\nlisten_port = {free_port()}\n'
        'listen_host = "127.0.0.1"\nstorage_commitment = false\n'
    )


# -- a stop of `lastmile acquire` -------------------------------------------------------------------

STOP_WITHIN_S = 5.0  # the goal is ~2 s; TimeoutStopSec=45 is systemd's own limit


def acquire_toml(tmp_path: Path, monitor: PtyDevice) -> Path:
    """`lastmile acquire`'s configuration: the monitor on its pty, nothing else."""
    head = f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[ble]\nenabled = false\n[gps]\nsource = "none"\n'
    entry = f'name = "monitor"\nmatch = "{monitor.link_path}"\nprofile = "example-vitals-monitor"\n'
    (config := tmp_path / "lastmile.toml").write_text(f"{head}[[serial.devices]]\n{entry}")
    return config


# -- another process's write lock, and a stop that meets it ----------------------------------------


@contextlib.contextmanager
def write_locked(database: Path) -> Iterator[None]:
    """Another process's write transaction on `database` (the console saving a check-in, acquire
    storing a reading, `lastmile patient`, a sqlite3 shell left open), held for as long as the
    block runs."""
    conn = sqlite3.connect(database, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def sigterm_once_a_write_waits(
    proc: subprocess.Popen[str] | subprocess.Popen[bytes], waiting: str, *, timeout: float = 120.0
) -> tuple[float, str]:
    """SIGTERM once a thread of `proc` sleeps in SQLite's busy wait (`waiting`: the write that waits
    for another process's lock). The seconds from SIGTERM to its exit, and what it printed on its
    text pipe ("": its output goes to a log)."""
    wait_for(lambda: waiting_in_a_sleep(proc.pid), timeout=30, what=f"{waiting} waiting for the lock")
    proc.send_signal(signal.SIGTERM)
    began = time.monotonic()
    out, _ = proc.communicate(timeout=timeout)
    return time.monotonic() - began, out or ""


class AcquireStopped(NamedTuple):
    took: float  # seconds from SIGTERM to exit
    out: str  # what the service printed
    config: Path
    data: Path
    returncode: int


def acquire_stopped_under_a_lock(tmp_path: Path, monitor: PtyDevice, database: str, *, patient: bool) -> AcquireStopped:
    """The real `lastmile acquire` with `monitor` on its pty (a patient checked in, or none: its
    readings held unassigned); another process holds `database`'s write lock (clinic.db,
    outbox.sqlite) as the monitor prints its report; SIGTERM once a write sleeps in SQLite's busy
    wait. The monitor stays plugged in: the caller unplugs it."""
    config, data = acquire_toml(tmp_path, monitor), tmp_path / "data"
    manager = Manager(tmp_path / "notify")
    proc = start_acquire(config, manager, watchdog_usec=20_000_000)
    try:
        manager.wait_for("READY=1", timeout=60)
        with contextlib.closing(DeviceRegistry.open(data)) as registry:
            wait_for(lambda: (r := registry.get("serial:monitor")) is not None and r.connected, timeout=30)
        now = dt.datetime.now(dt.timezone.utc)
        if patient:
            with contextlib.closing(PatientContext.open(data, idle_timeout_s=900)) as patients:
                patients.set_patient("P-9", now=now - dt.timedelta(minutes=1))
        with write_locked(data / database):
            monitor.write(report_printed(now))
            took, out = sigterm_once_a_write_waits(proc, f"a {database} write of its report", timeout=180)
    finally:
        stop_child(proc)
        manager.sock.close()
    return AcquireStopped(took, out, config, data, proc.returncode)


def known_name(config: Config, patient_id: str) -> str:
    """The name the gateway's check-in knows for `patient_id` now (as a doctor's correction left it)."""
    with contextlib.closing(PatientContext.open(config.data_dir, config.patient.idle_timeout_s)) as context:
        return context.known_name(patient_id, dt.datetime.now(dt.timezone.utc))
