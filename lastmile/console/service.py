"""`lastmile console`: the doctor's console as a systemd service (lastmile-console.service).

`ConsoleServer` runs uvicorn (h11, asyncio) on a thread of its own with the change watcher
beside it; `ConsoleService` is the `Service` that `ServiceRuntime` drives (READY=1 once the
socket listens, the watchdog fed only while the server's event loop answers, SIGHUP, SIGTERM).

Listening: `[console] listen = "HOST:PORT"`. HTTPS with the certificate made at first start
(`lastmile.console.tls`); `https = false` is accepted only for a loopback address (a demo, the
tests, an SSH tunnel): a clinic LAN never sees a login or a patient in clear text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from dataclasses import fields
from typing import TYPE_CHECKING

from lastmile.config import Config, ConfigError, Listen
from lastmile.console.listen import parse_listen
from lastmile.console.pending_restart import RESTART_COMMAND, save_restart_needed

if TYPE_CHECKING:
    from collections.abc import Callable

    import uvicorn
    from starlette.types import ASGIApp

    from lastmile.console.app import ConsoleState
    from lastmile.console.sources import HeldEcgSource, ReportsSource
    from lastmile.console.tls import Certificate

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
LOOP_CHECK_TIMEOUT_S = 10.0  # the event loop must answer within this (WatchdogSec=30)


M_MMAP_THRESHOLD = -3  # mallopt(3)
MMAP_THRESHOLD_BYTES = 1 << 20


def prepare_console_process() -> None:
    """Call first thing in the console process; both measured by bench/console.py.

    - numpy stays out: sqlite-utils imports it when it can (to map numpy column types, which we
      never store), and numpy alone is ~15 MB of RSS and 0.2 s of start. The ECG worker, a
      separate process, has it.
    - A fixed mmap threshold: glibc otherwise raises it after the first argon2 hash (12 MiB) is
      freed, so every later hash is carved from the heap and its 12 MiB stay resident.
    """
    import ctypes
    import ctypes.util
    import sys

    sys.modules.setdefault("numpy", None)  # type: ignore[arg-type]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        log.debug("mallopt not available (not glibc): argon2 buffers may stay resident")


def bind(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((listen.host, listen.port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def served_url(sock: socket.socket, https: bool) -> str:
    """Where a browser on this machine reaches `sock` (0.0.0.0 is reached on loopback)."""
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host == "0.0.0.0" else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"{'https' if https else 'http'}://{shown}:{port}"


def uvicorn_server(app: ASGIApp, certificate: Certificate | None) -> uvicorn.Server:
    """uvicorn as both console pages run it: h11 on asyncio, our logging, no access log (no patient
    IDs in URLs or logs), TLS with the console's certificate when there is one."""
    import uvicorn

    return uvicorn.Server(
        uvicorn.Config(
            app,
            http="h11",
            loop="asyncio",
            ws="none",
            lifespan="off",
            log_config=None,  # ours (lastmile.logs) stays in charge
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=3,
            ssl_certfile=str(certificate.cert_path) if certificate else None,
            ssl_keyfile=str(certificate.key_path) if certificate else None,
        )
    )


def wait_started(server: uvicorn.Server, thread: threading.Thread, what: str, error: Callable[[], object]) -> None:
    """Return once `server` (run on `thread`) accepts connections; RuntimeError if it never will."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if error() is not None or not thread.is_alive():
            raise RuntimeError(f"{what} did not start: {error()!r}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in time")
        time.sleep(0.01)


class ConsoleServer:
    """The app on its own thread and event loop; start() returns once it accepts connections."""

    def __init__(
        self,
        config: Config,
        *,
        reports: ReportsSource | None = None,
        held_ecgs: HeldEcgSource | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.listen = parse_listen(config)
        self._reports = reports
        self._held_ecgs = held_ecgs
        self._sock = sock
        self.state: ConsoleState | None = None
        self.server: uvicorn.Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        assert self._sock is not None
        return served_url(self._sock, self.config.console.https)

    def start(self) -> None:
        from lastmile.clock import local_zone
        from lastmile.console.app import ConsoleState, build_app
        from lastmile.console.sources import ClinicData
        from lastmile.console.tls import ensure_certificate

        if self._sock is None:
            try:
                self._sock = bind(self.listen)
            except OSError as exc:
                raise ConfigError(
                    f"{self.config.source}: console.listen {self.config.console.listen!r} cannot be used: {exc.strerror}"
                ) from None
        https = self.config.console.https
        certificate = ensure_certificate(self.config.data_dir, self.listen.host) if https else None
        data = ClinicData(self.config, reports=self._reports, held_ecgs=self._held_ecgs)
        state = ConsoleState(
            config=self.config,
            data=data,
            https=https,
            zone=local_zone(),
            fingerprint=certificate.fingerprint if certificate else "",
        )
        self.state = state
        self.server = uvicorn_server(build_app(state), certificate)
        self.thread = threading.Thread(target=self._run, name="console-http", daemon=True)
        self.thread.start()
        wait_started(self.server, self.thread, "the console", lambda: self.error)
        log.info("console serving on %s", self.url)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
            log.exception("console server failed")

    async def _main(self) -> None:
        from lastmile.console.ecg_analysis import EcgAnalyses
        from lastmile.console.live import ChangeWatcher

        assert self.server is not None and self.state is not None and self._sock is not None
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        state = self.state
        state.shutting_down = self._stop
        state.analyses = EcgAnalyses(state.broker.publish)
        watcher = ChangeWatcher(state.data.watched_files(), state.broker)
        watch = asyncio.create_task(watcher.run(self._stop))
        try:
            await self.server.serve(sockets=[self._sock])
        finally:
            self._stop.set()
            state.broker.publish()  # event streams see the stop and end
            await watch
            await state.analyses.close()

    def alive(self) -> bool:
        """The server thread runs and its event loop answers."""
        if self.thread is None or not self.thread.is_alive() or self.loop is None:
            return False
        future = asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop)
        try:
            future.result(LOOP_CHECK_TIMEOUT_S)
        except Exception:  # noqa: BLE001 — any failure to answer is a dead loop
            return False
        return True

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            if self.loop is not None and self._stop is not None:
                with contextlib.suppress(RuntimeError):
                    self.loop.call_soon_threadsafe(self._stop.set)
                    self.loop.call_soon_threadsafe(self.state.broker.publish if self.state else (lambda: None))
        if self.thread is not None:
            self.thread.join(timeout=15)
        if self.state is not None:
            self.state.executor.submit(self.state.data.close).result(timeout=15)
            self.state.executor.shutdown(wait=True)
        if self._sock is not None:
            self._sock.close()


# What the console takes on reload (`ConsoleService.reload`); any other change waits for a restart.
TAKEN_ON_RELOAD = {"serial", "console.language", "console.max_login_failures", "source"}


def changes_needing_restart(running: Config, reloaded: Config) -> list[str]:
    """The sections (or console keys) that differ between `running` and `reloaded` and that a
    reload does not take: the console goes on showing the old ones until it is restarted."""
    changed = []
    for section in fields(Config):
        old, new = getattr(running, section.name), getattr(reloaded, section.name)
        if section.name in TAKEN_ON_RELOAD or old == new:
            continue
        if section.name == "console":
            keys = [f"console.{f.name}" for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]
            changed += [k for k in keys if k not in TAKEN_ON_RELOAD]
        else:
            changed.append(section.name)
    return changed


class ConsoleService:
    """The `Service` of `lastmile console`."""

    def __init__(self, server: ConsoleServer) -> None:
        self.server = server
        self.restart_needed: list[str] = []  # settings changed by a reload that need a restart

    @classmethod
    def start(cls, config: Config) -> ConsoleService:
        server = ConsoleServer(config)
        server.start()
        save_restart_needed(config.data_dir, [])  # this start takes every setting
        return cls(server)

    def step(self, stop: threading.Event) -> float:
        if not self.server.alive():
            raise RuntimeError(f"the console's server stopped answering ({self.server.error!r})")
        return 5.0

    def reload(self, config: Config) -> None:
        # Only TAKEN_ON_RELOAD applies from the next request; the rest (console.listen too) waits for a
        # restart, compared against what runs: a change reverted in the file before the restart needs none
        self.restart_needed = sorted(changes_needing_restart(self.server.config, config))
        if self.restart_needed:
            log.warning(
                "reload: the console shows these changed settings only after a restart (%s): %s",
                RESTART_COMMAND,
                ", ".join(self.restart_needed),
            )
        try:
            save_restart_needed(self.server.config.data_dir, self.restart_needed)
        except OSError as exc:  # a full partition: the journal and STATUS= still say it
            log.error("cannot note the settings waiting for a restart for lastmile doctor: %s", exc)
        self.server.config.console.language = config.console.language
        # the serial devices: a device row they no longer name is shown removed, not as a fault
        self.server.config.serial = config.serial
        if self.server.state is not None:
            self.server.state.doctor_runs.forget()  # the System page shows it now, not in a minute
            accounts = self.server.state.data.accounts
            accounts.max_failures = config.console.max_login_failures

    def close(self) -> None:
        self.server.stop()

    def status_line(self) -> str:
        state = self.server.state
        pages = state.broker.subscribers if state else 0
        restart = f"; restart needed for {', '.join(self.restart_needed)}" if self.restart_needed else ""
        return f"console on {self.server.url}, {pages} live page(s){restart}"
