"""ServiceRuntime: readiness, signals, the progress-gated watchdog and patient-data-free logs.

Signal behaviour is checked in a real child process (real SIGTERM/SIGHUP, a real notify socket);
the loop's logic in-process without signal handlers.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devices.identity import Patient
from lastmile.config import Config, ConfigError, parse_config
from lastmile.logs import JournalFormatter, PatientDataFilter, configure_logging
from lastmile.services.runtime import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_RESTART,
    RestartRequested,
    ServiceRuntime,
)
from lastmile.services.sdnotify import SystemdNotifier
from tests.service_harness import Manager, start_acquire, stop_child
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]

# A service whose step "writes" (begin ... end). Mode "held": write 1 is the test's to end - it
# notes when the stop request reaches the step, then ends when a line comes on stdin.
CHILD = textwrap.dedent("""
    import sys, time, threading
    from pathlib import Path
    from lastmile.config import load_config
    from lastmile.services.runtime import ServiceRuntime

    out = Path(sys.argv[2])
    mode = sys.argv[3]

    class Writer:
        def __init__(self, config):
            self.n = 0
            self.config = config
        def step(self, stop):
            if mode == "hang" and self.n >= 2:
                with out.open("a") as f:
                    f.write("wedged\\n"); f.flush()
                time.sleep(3600)  # a wedged loop: no more progress
            with out.open("a") as f:
                f.write(f"begin {self.n}\\n"); f.flush()
                if mode == "held" and self.n == 1:
                    if stop.wait(30):
                        f.write("stop requested\\n"); f.flush()
                    sys.stdin.readline()
                else:
                    time.sleep(0.3)
                f.write(f"end {self.n}\\n")
            self.n += 1
            return 0.05
        def reload(self, config):
            with out.open("a") as f:
                f.write(f"reload {config.gateway.id}\\n")
            self.config = config
        def close(self):
            with out.open("a") as f:
                f.write("closed\\n")
        def status_line(self):
            return f"{self.n} written"

    rt = ServiceRuntime("writer", load_config=lambda: load_config(sys.argv[1]))
    sys.exit(rt.run(Writer))
""")


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(tmp_path / "notify")
    yield m
    m.sock.close()


def start_child(
    tmp_path: Path, manager: Manager, mode: str = "normal", watchdog_usec: int | None = None
) -> tuple[subprocess.Popen[str], Path, Path]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    config = tmp_path / "lastmile.toml"
    config.write_text('[gateway]\nid = "first"\n')
    out = tmp_path / "writes.txt"
    env = {**os.environ, "NOTIFY_SOCKET": str(manager.path), "PYTHONPATH": str(REPO)}
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(config), str(out), mode],
        env=env,
        stdin=subprocess.PIPE,  # mode "held": a line ends the held write
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, config, out


def wait_for_line(out: Path, line: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while line not in (out.read_text().splitlines() if out.exists() else []):
        assert time.monotonic() < deadline, f"{line!r} never written; got {out.read_text() if out.exists() else ''!r}"
        time.sleep(0.02)


def test_sigterm_finishes_the_write_in_hand_then_closes(tmp_path: Path, manager: Manager) -> None:
    proc, _, out = start_child(tmp_path, manager, mode="held")
    assert proc.stdin is not None
    try:
        msgs = manager.wait_for("READY=1")
        assert any("STATUS=" in m for m in msgs)
        wait_for_line(out, "begin 1")  # write 1 is in hand, and stays so until the test ends it
        proc.send_signal(signal.SIGTERM)
        wait_for_line(out, "stop requested")  # the signal reached the step while it was writing
        assert proc.poll() is None, "the process ended in the middle of a write"
        assert "end 1" not in out.read_text().splitlines()
        proc.stdin.write("\n")  # the write may finish now
        proc.stdin.flush()
        assert proc.wait(timeout=10) == EXIT_OK
        manager.wait_for("STOPPING=1")
    finally:
        log = stop_child(proc)
    lines = out.read_text().splitlines()
    assert lines[-1] == "closed", log
    assert lines[-2] == "end 1", "the write in hand was not finished (or another began after the stop)"
    assert sum(ln.startswith("begin") for ln in lines) == sum(ln.startswith("end") for ln in lines)
    assert "ready after" in log


def test_sighup_reloads_and_a_bad_file_keeps_the_running_config(tmp_path: Path, manager: Manager) -> None:
    proc, config, out = start_child(tmp_path, manager)
    try:
        manager.wait_for("READY=1")
        config.write_text('[gateway]\nid = "second"\n')
        manager.messages.clear()
        proc.send_signal(signal.SIGHUP)
        manager.wait_for("RELOADING=1")
        manager.wait_for("READY=1")
        config.write_text('[gateway]\nidd = "typo"\n')
        manager.messages.clear()
        proc.send_signal(signal.SIGHUP)
        msgs = manager.wait_for("READY=1")
        assert any("reload refused" in m for m in msgs)
        assert proc.poll() is None  # still running on the old configuration
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == EXIT_OK
    finally:
        log = stop_child(proc)
    assert out.read_text().count("reload ") == 1
    assert "reload second" in out.read_text()
    assert "unknown key 'gateway.idd'" in log


def test_watchdog_pings_stop_when_the_loop_stops_making_progress(tmp_path: Path, manager: Manager) -> None:
    proc, _, out = start_child(tmp_path, manager, mode="hang", watchdog_usec=400_000)
    try:
        manager.wait_for("READY=1")
        manager.wait_for("WATCHDOG=1")
        # The event: the step has wedged (the child says so from inside it). Every ping the loop
        # sent before is already queued on the socket (a datagram is queued when sent): take them.
        deadline = time.monotonic() + 60
        while "wedged" not in (out.read_text() if out.exists() else ""):
            assert time.monotonic() < deadline, "the step never wedged"
            time.sleep(0.02)
        manager.drain_queued()
        later = manager.drain(1.2)  # three watchdog periods of a wedged step: not one ping
        assert not any("WATCHDOG=1" in m for m in later), later
    finally:
        stop_child(proc)


# -- in-process: the loop's logic ------------------------------------------------------------------


class Recorder:
    def __init__(self, config: Config, fail_at: int | None = None) -> None:
        self.config = config
        self.steps = 0
        self.fail_at = fail_at
        self.closed = False
        self.reloaded: list[str] = []

    def step(self, stop: threading.Event) -> float:
        self.steps += 1
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RuntimeError("device link broke")
        return 0.01

    def reload(self, config: Config) -> None:
        self.reloaded.append(config.gateway.id)

    def close(self) -> None:
        self.closed = True

    def status_line(self) -> str:
        return f"{self.steps} steps"


def runtime(manager: Manager | None, load=lambda: Config(), **kw: object) -> ServiceRuntime:
    env = {"NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": "200000"} if manager else {}
    return ServiceRuntime(
        "t",
        load_config=load,
        notifier=SystemdNotifier(environ=env),
        install_signal_handlers=False,
        configure_logging=False,
        **kw,
    )


def test_a_failing_step_exits_non_zero_after_closing(manager: Manager) -> None:
    made: list[Recorder] = []
    rt = runtime(manager)
    code = rt.run(lambda c: made.append(Recorder(c, fail_at=3)) or made[-1])
    assert code == EXIT_FAILURE
    assert made[0].closed and made[0].steps == 3
    manager.wait_for("STOPPING=1")


def test_a_refused_configuration_exits_78_without_ready(manager: Manager) -> None:
    def bad() -> Config:
        raise ConfigError("lastmile.toml:3: unknown key 'x'")

    rt = runtime(manager, load=bad)
    assert rt.run(lambda c: Recorder(c)) == EXIT_CONFIG
    msgs = manager.drain(0.2)
    assert not any("READY=1" in m for m in msgs)
    assert any("ERRNO=78" in m for m in msgs)


class RefusedPage(Recorder):
    """What runs instead while the configuration is refused (the console's page): ends itself
    with RestartRequested at `restart_at` steps (the file was fixed)."""

    def __init__(self, error: ConfigError, restart_at: int | None = None) -> None:
        super().__init__(Config())
        self.error = error
        self.restart_at = restart_at

    def step(self, stop: threading.Event) -> float:
        self.steps += 1
        if self.restart_at is not None and self.steps >= self.restart_at:
            raise RestartRequested("configuration accepted")
        if self.steps >= 5:
            stop.set()
        return 0.01

    def status_line(self) -> str:
        return f"configuration refused: {self.error}; the page says so"


def test_a_refused_configuration_runs_what_the_service_gives_instead(manager: Manager) -> None:
    def bad() -> Config:
        raise ConfigError("lastmile.toml:3: unknown key 'x'")

    made: list[RefusedPage] = []
    rt = runtime(manager, load=bad)
    setups: list[Config] = []
    code = rt.run(
        lambda c: setups.append(c) or Recorder(c), on_config_refused=lambda e: made.append(RefusedPage(e)) or made[-1]
    )
    assert code == EXIT_OK and not setups  # stopped (SIGTERM): 0
    assert made[0].steps == 5 and made[0].closed and "unknown key 'x'" in str(made[0].error)
    msgs = manager.drain(0.2)
    assert any("ERRNO=78" in m for m in msgs)
    ready = next(m for m in msgs if "READY=1" in m)
    assert "STATUS=configuration refused: lastmile.toml:3: unknown key 'x'" in ready, ready


def test_a_configuration_refused_at_setup_runs_it_too(manager: Manager) -> None:
    def setup(c: Config) -> Recorder:
        raise ConfigError("console.listen: cannot be used")

    made: list[RefusedPage] = []
    code = runtime(manager).run(setup, on_config_refused=lambda e: made.append(RefusedPage(e)) or made[-1])
    assert code == EXIT_OK and made[0].steps == 5


def test_what_runs_instead_asks_for_a_restart_once_the_file_is_fixed(manager: Manager) -> None:
    def bad() -> Config:
        raise ConfigError("x")

    made: list[RefusedPage] = []
    rt = runtime(manager, load=bad)
    code = rt.run(
        lambda c: Recorder(c), on_config_refused=lambda e: made.append(RefusedPage(e, restart_at=2)) or made[-1]
    )
    assert code == EXIT_RESTART and made[0].closed and made[0].steps == 2
    manager.wait_for("STOPPING=1")


def test_when_that_cannot_start_either_the_exit_is_78(manager: Manager) -> None:
    def bad() -> Config:
        raise ConfigError("x")

    def fallback(error: ConfigError) -> RefusedPage:
        raise OSError(98, "Address already in use")

    assert runtime(manager, load=bad).run(lambda c: Recorder(c), on_config_refused=fallback) == EXIT_CONFIG
    assert not any("READY=1" in m for m in manager.drain(0.2))


def test_a_good_configuration_never_calls_it(manager: Manager) -> None:
    called: list[ConfigError] = []
    rt = runtime(manager)
    code = rt.run(lambda c: Recorder(c, fail_at=2), on_config_refused=lambda e: called.append(e) or RefusedPage(e))
    assert code == EXIT_FAILURE and not called


def test_setup_failure_from_a_bug_is_exit_1_and_never_ready(manager: Manager) -> None:
    def setup(c: Config) -> Recorder:
        raise KeyError("a bug, not the machine")

    assert runtime(manager).run(setup) == EXIT_FAILURE
    assert not any("READY=1" in m for m in manager.drain(0.2))


def test_an_unusable_data_dir_at_start_is_waited_out_with_backoff_not_exit(
    manager: Manager, caplog: pytest.LogCaptureFixture
) -> None:
    """The data partition not writable yet: READY with the fault in STATUS, retried with a
    growing delay, one ERROR line (no traceback); starts normally once it is fixed."""
    from lastmile.data_dir import DataDirError

    attempts: list[float] = []
    made: list[Recorder] = []

    def setup(c: Config) -> Recorder:
        attempts.append(time.monotonic())
        if len(attempts) <= 3:
            raise DataDirError("/var/lib/lastmile is on a read-only file system")
        made.append(Recorder(c))
        return made[-1]

    rt = runtime(manager, fault_backoff_s=(0.05, 0.2))
    stop_after(rt, lambda: manager.wait_for("READY=1"), lambda: wait_for(lambda: made and made[0].steps > 2, 60))
    with caplog.at_level(logging.INFO, logger="lastmile.services.runtime"):
        assert rt.run(setup) == EXIT_OK
    assert len(attempts) == 4 and made[0].steps > 2 and made[0].closed
    ready = next(m for m in manager.messages if "READY=1" in m)
    assert "STATUS=FAULT t: cannot start: /var/lib/lastmile is on a read-only file system; retrying in 0.05 s" in ready
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None  # said once, no traceback
    assert "retrying in 0.1 s" in caplog.text and "retrying in 0.2 s" in caplog.text  # the delay grows
    assert "working again" in caplog.text


def test_an_operational_fault_in_a_step_backs_off_instead_of_exiting(
    manager: Manager, caplog: pytest.LogCaptureFixture
) -> None:
    class DiskTrouble(Recorder):
        def step(self, stop: threading.Event) -> float:
            self.steps += 1
            if 2 <= self.steps <= 4:
                raise OSError(30, "Read-only file system", "/var/lib/lastmile/outbox.sqlite")
            return 0.01

    made: list[Recorder] = []
    rt = runtime(manager, fault_backoff_s=(0.05, 1.0))
    stop_after(rt, lambda: wait_for(lambda: made and made[0].steps > 6, 60))
    with caplog.at_level(logging.INFO, logger="lastmile.services.runtime"):
        assert rt.run(lambda c: made.append(DiskTrouble(c)) or made[-1]) == EXIT_OK
    statuses = [m for m in manager.messages + manager.drain(0.1) if "Read-only file system" in m]
    assert (
        statuses
        and "STATUS=FAULT t: step failed: Read-only file system: /var/lib/lastmile/outbox.sqlite" in statuses[0]
    )
    assert sum(r.levelno >= logging.ERROR for r in caplog.records) == 1
    assert rt.fault is None  # cleared once a step worked again


def stop_after(rt: ServiceRuntime, *waits: Callable[[], object]) -> None:
    """Stops `rt` from a thread once `waits` returned, in turn. Always: one that times out fails
    in that thread, and the test (blocked in rt.run) still ends and says what it lacks."""

    def wait_then_stop() -> None:
        try:
            for wait in waits:
                wait()
        finally:
            rt.request_stop()

    threading.Thread(target=wait_then_stop).start()


def test_stop_and_reload_requests_from_another_thread(manager: Manager) -> None:
    configs = iter([parse_config('[gateway]\nid="a"\n'), parse_config('[gateway]\nid="b"\n')])
    rt = runtime(manager, load=lambda: next(configs))
    made: list[Recorder] = []

    def drive() -> None:
        manager.wait_for("READY=1")
        rt.request_reload()
        manager.wait_for("RELOADING=1")
        # the reload is over when READY=1 comes again (sd_notify's protocol), not after some time
        deadline = time.monotonic() + 60
        while sum("READY=1" in m.split("\n") for m in manager.messages) < 2:
            assert time.monotonic() < deadline, manager.messages
            manager.drain(0.05)
        rt.request_stop()

    t = threading.Thread(target=drive)
    t.start()
    code = rt.run(lambda c: made.append(Recorder(c)) or made[-1])
    t.join()
    assert code == EXIT_OK
    assert made[0].reloaded == ["b"] and made[0].closed
    assert rt.ready_after is not None
    assert any("WATCHDOG=1" in m for m in manager.messages + manager.drain(0.1))


def test_long_waits_between_steps_still_feed_the_watchdog(manager: Manager) -> None:
    class Idle(Recorder):
        def step(self, stop: threading.Event) -> float:
            self.steps += 1
            return 60.0  # nothing to do for a minute

    rt = runtime(manager)
    made: list[Idle] = []

    def stop_after_four_pings() -> None:
        # The event is the pings themselves: stop once four arrived (or give up after a minute).
        deadline = time.monotonic() + 60
        while sum("WATCHDOG=1" in m for m in manager.messages) < 4 and time.monotonic() < deadline:
            manager.drain(0.05)
        rt.request_stop()

    t = threading.Thread(target=stop_after_four_pings)
    t.start()
    assert rt.run(lambda c: made.append(Idle(c)) or made[-1]) == EXIT_OK
    t.join()
    pings = sum("WATCHDOG=1" in m for m in manager.messages)
    assert pings >= 4 and made[0].steps == 1  # fed during the minute-long wait, not by new steps


def test_a_long_step_that_makes_progress_feeds_the_watchdog_and_one_that_makes_none_does_not(
    manager: Manager,
) -> None:
    """A forward round with a backlog on EDGE takes minutes: each object stored (`alive()`, from a
    send thread) feeds the watchdog meanwhile. The same step making no progress - hung on a peer -
    sends no ping however long it takes: the hang is still seen."""
    rt = runtime(manager)  # WatchdogSec 0.2 s: pings at most every 0.05 s, needed every 0.1 s
    hung, progressing, released = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, list[str]] = {}

    class Long(Recorder):
        def step(self, stop: threading.Event) -> float:
            self.steps += 1
            if self.steps == 1:  # hung: no progress until the test releases it
                hung.set()
                released.wait(60)
                return 0.0
            progressing.set()
            sender = threading.Thread(target=self._send, args=(stop,))
            sender.start()
            sender.join()
            return 60.0

        def _send(self, stop: threading.Event) -> None:  # a send thread storing an object every 20 ms
            while not stop.is_set():
                rt.alive()
                time.sleep(0.02)

    def drive() -> None:
        assert hung.wait(60)
        manager.drain_queued()  # READY=1 and the ping after it, sent before the step began
        seen["hung"] = manager.drain(0.6)  # three watchdog periods of a step making no progress
        released.set()
        assert progressing.wait(60)
        manager.drain_queued()  # the ping after the first step, sent before the second began
        manager.messages.clear()
        deadline = time.monotonic() + 60
        while sum("WATCHDOG=1" in m for m in manager.messages) < 4 and time.monotonic() < deadline:
            manager.drain(0.05)
        seen["progressing"] = list(manager.messages)
        rt.request_stop()

    t = threading.Thread(target=drive)
    t.start()
    made: list[Long] = []
    assert rt.run(lambda c: made.append(Long(c)) or made[-1]) == EXIT_OK
    t.join()
    assert not any("WATCHDOG=1" in m for m in seen["hung"]), seen["hung"]
    assert sum("WATCHDOG=1" in m for m in seen["progressing"]) >= 4, seen["progressing"]
    assert made[0].steps == 2  # the pings came during the second step, not from new steps


def test_without_systemd_it_still_runs() -> None:
    rt = runtime(None)
    threading.Timer(0.2, rt.request_stop).start()
    assert rt.run(lambda c: Recorder(c)) == EXIT_OK


# -- logging -----------------------------------------------------------------------------------------


def record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("t", logging.INFO, __file__, 1, msg, args, None)


def test_patient_identifiers_are_masked_by_default() -> None:
    flt = PatientDataFilter(parse_config('[serial]\npatient_card_pattern = "PC-[0-9]{6}"\n'))
    cases = [
        record("assigned %s to ECG", Patient("MRN-0042", name="Doe^Jane")),
        record("stored ECG for PatientID=MRN-0042 name DOE^JANE^Q"),
        record("scanned card %s", "PC-123456"),
        record("patient_id: 'MRN-0042' birth_date=1970-01-02"),
    ]
    for r in cases:
        flt.filter(r)
        text = r.getMessage()
        for secret in ("MRN-0042", "DOE^JANE", "Doe^Jane", "PC-123456", "1970-01-02"):
            assert secret not in text, text
        assert "<patient:" in text
    # The same identifier gives the same token within one process, so lines can be correlated.
    a, b = record("patient_id=X1"), record("patient=X1")
    flt.filter(a), flt.filter(b)
    assert a.getMessage().split("=")[1] == b.getMessage().split("=")[1]


def test_remembered_values_and_exception_text_are_masked() -> None:
    flt = PatientDataFilter(None)
    flt.remember("Nakato Achieng")
    try:
        raise ValueError("no study for Nakato Achieng")
    except ValueError:
        r = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed for %s", ("Nakato Achieng",), sys.exc_info())
    flt.filter(r)
    assert "Nakato" not in r.getMessage() and "Nakato" not in (r.exc_text or "")


def test_log_patient_data_turns_masking_off() -> None:
    flt = PatientDataFilter(parse_config("[gateway]\nlog_patient_data = true\n"))
    r = record("PatientID=MRN-0042")
    flt.filter(r)
    assert r.getMessage() == "PatientID=MRN-0042"


def test_ordinary_messages_pass_unchanged() -> None:
    flt = PatientDataFilter(None)
    r = record("sent %d objects to %s:%d in %.1f s", 12, "pacs.county", 104, 2.5)
    flt.filter(r)
    assert r.getMessage() == "sent 12 objects to pacs.county:104 in 2.5 s"


def test_service_logging_goes_to_stdout_with_journal_priorities(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(None, stream=buf, level=logging.INFO)
        logging.getLogger("lastmile.x").warning("PatientID=%s rejected", "MRN-1")
        assert "MRN-1" not in buf.getvalue() and "rejected" in buf.getvalue()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    fmt = JournalFormatter(journal=True)
    line = fmt.format(logging.LogRecord("a", logging.ERROR, __file__, 1, "x\ny", None, None))
    assert line == "<3>a: x\n<3>y"


# -- the acquire service's composition ----------------------------------------------------------------


def test_a_failed_part_is_restarted_with_backoff_and_a_silent_one_is_wedged() -> None:
    from lastmile.services.parts import Wedged, WorkerPart

    now = [100.0]
    runs: list[int] = []
    proceed = threading.Event()

    def flaky(stop: threading.Event, beat: object) -> None:
        runs.append(1)
        if len(runs) == 1:
            raise OSError("BlueZ is not up yet")
        proceed.wait(5)  # second run: alive, never beats

    part = WorkerPart("ble", flaky, stale_after=20.0, clock=lambda: now[0])
    part.check(now[0])
    part.thread.join(5)  # type: ignore[union-attr]
    assert "down (OSError: BlueZ is not up yet)" in part.status()
    part.check(now[0] + 1)  # within the backoff: not restarted yet
    assert len(runs) == 1
    now[0] += 6
    part.check(now[0])
    assert part.running and len(runs) == 2
    now[0] += 21
    with pytest.raises(Wedged, match="ble made no progress for 21 s"):
        part.check(now[0])
    proceed.set()
    part.close()


def test_acquire_reaches_ready_without_devices_and_stops_cleanly(tmp_path: Path, manager: Manager) -> None:
    inbox = tmp_path / "usb"
    inbox.mkdir()
    config = tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n[ble]\nenabled = false\n[usb_import]\nfolders = ["{inbox}"]\n'
    )
    proc = start_acquire(config, manager, watchdog_usec=2_000_000)
    try:
        msgs = manager.wait_for("READY=1")
        assert any("usb-import up" in m for m in msgs)
        manager.wait_for("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == EXIT_OK
    finally:
        out = stop_child(proc)
    assert "acquire: usb-import" in out and "acquire stopped" in out
    assert (tmp_path / "data" / "outbox.sqlite").exists()


def test_acquire_refuses_a_bad_receiver_configuration_with_78(tmp_path: Path) -> None:
    config = tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{tmp_path}"\n[ble]\nenabled = false\n[lan_receiver]\nenabled = true\nport = 11112\n'
    )  # no allowed_callers
    proc = subprocess.run(
        [sys.executable, "-m", "lastmile", "-c", str(config), "acquire"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EXIT_CONFIG, proc.stdout + proc.stderr
    assert "allowed_callers" in proc.stdout + proc.stderr
