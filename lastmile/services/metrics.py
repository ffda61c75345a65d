"""`lastmile metrics`: the Prometheus endpoint the county scrapes (lastmile-metrics.service).

A process of its own, not a thread in the forward service. Measured by bench/metrics.py (x86,
20k purged + 300 queued items): `lastmile metrics` holds 29-31 MB RSS, 17-19 MB of it private
(the rest is libpython and friends, shared with the other services); the same endpoint inside
the forward service would add 3-5 MB to its 63. On a 1 GB Pi the difference is ~1.5 % of RAM, and
it buys an observer that outlives what it watches: the forward service is the one most likely
to be restarted (watchdog, crashes), and from inside it a restart loop or a hang would silence
the very metrics that show it; a scrape would also wait on its GIL while it deflates and sends.
A scrape costs ~15 ms of CPU and 5.6 KB (1.6 KB gzip): at one a minute, nothing.

Each scrape reads the gateway's state afresh (`GatewayCollector.collect`, one at a time) from
the sources in `metrics_sources`: the outbox and clinic.db read-only, the units' cgroups and
/proc, the time daemon. No patient data is exported: counts, ages, states, sizes, and the
gateway's id. `[metrics] listen = "HOST:PORT"` (default loopback): set the address the county
reaches this gateway on (its VPN or LAN interface) to let it scrape.

Metric names (all gauges unless marked):
  lastmile_gateway_info{gateway,station,version}            1
  lastmile_queue_items{kind,state}                          outbox items (queued, sending, sent, committed, purged, quarantined)
  lastmile_queue_held_items{kind,reason}                    queued items held for the doctor (unassigned, re-record ...)
  lastmile_queue_oldest_waiting_seconds{kind}               age of the oldest item not yet accepted by its peer (0: none),
                                                            not one held for the doctor (that waits for him, not the link)
  lastmile_queue_oldest_stuck_seconds{kind}                 the same, leaving out routine items a metered link holds now
  lastmile_queue_uncommitted_bytes{kind}                    payload bytes the peer has not yet committed to
  lastmile_ecg_quality_items{verdict}                       ECGs in the outbox by the quality gate's verdict
  lastmile_link_state{destination,state}                    1 for the current state: up, down, refused, unknown
  lastmile_last_success_timestamp_seconds{destination}      dicom, fhir, reports
  lastmile_last_commit_timestamp_seconds{kind}              storage commitment (DICOM), 2xx (FHIR)
  lastmile_reports_critical_unacknowledged                  critical reports not opened at the clinic (issue 14)
  lastmile_reports_critical_oldest_seconds                  how long the oldest of them has waited
  lastmile_reports_awaited_studies{priority}                ECGs sent without a final report yet
  lastmile_reports_awaited_oldest_seconds
  lastmile_data_free_bytes / lastmile_data_size_bytes       the data partition
  lastmile_outbox_min_free_bytes                            below this the outbox refuses new items
  lastmile_clock_synchronized / lastmile_clock_plausible    1 or 0
  lastmile_clock_info{source,reference}                     1 (chrony / timesyncd / none)
  lastmile_clock_offset_seconds                             system clock minus the daemon's reference
  lastmile_clock_gps_offset_seconds                         system clock minus the GPS time lastmile saw this boot
  lastmile_clock_last_sync_timestamp_seconds
  lastmile_service_up{service}                              1 while active
  lastmile_service_resident_bytes{service}                  RSS of the unit's processes
  lastmile_service_start_time_seconds{service}              main process start: changes() counts restarts
  lastmile_service_restarts_total{service}                  counter: systemd's NRestarts (when systemctl answers)
  lastmile_source_up{source}                                1 when that source could be read this scrape
  lastmile_scrape_collect_seconds                           time this collection took
  process_*                                                 the exporter's own CPU, RSS, start time
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from socketserver import TCPServer, ThreadingMixIn
from typing import TYPE_CHECKING, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from lastmile import __version__
from lastmile.config import Config, Listen, metrics_listen
from lastmile.services import metrics_sources as sources
from lastmile.services.link_status import BUSY_DOWN_AFTER_S
from lastmile.services.update import RECORDED_OUTCOMES, UpdateState, reboot_pending, rolled_back
from lastmile.services.update import read_state as read_update_state

if TYPE_CHECKING:
    from lastmile.services.metrics_sources import OutboxSnapshot, Runner

log = logging.getLogger(__name__)

SERVICES = (
    "lastmile-acquire.service",
    "lastmile-ble.service",
    "lastmile-forward.service",
    "lastmile-console.service",
    "lastmile-metrics.service",
)
KINDS = ("dicom", "fhir-bundle")  # uploader.outbox.Kind (not imported: it brings sqlite-utils)
STATES = ("queued", "sending", "sent", "committed", "purged", "quarantined")  # uploader.outbox.ItemState
LINK_STATES = ("up", "down", "refused", "unknown")
VERDICTS = ("acceptable", "warn", "re-record", "unchecked")  # devices.ecg.quality verdicts, and none
REQUEST_TIMEOUT_S = 10.0  # a client that connects and sends nothing does not keep a thread
SELF_CHECK_S = 5.0  # how often the service checks its server thread (the watchdog sees the loop)

T = TypeVar("T")


class GatewayCollector:
    """A prometheus_client collector: every scrape reads the gateway's state afresh."""

    def __init__(
        self,
        config: Config,
        *,
        run: Runner = sources.run_tool,
        services: sources.ServiceProbe | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.run = run
        self.services = services or sources.ServiceProbe(SERVICES, run=run, cgroup_root=sources.cgroup2_mount())
        self.clock = clock
        self._lock = threading.Lock()  # one collection at a time: two scrapes never double the reads
        self._failing: dict[str, str] = {}  # source -> last error logged (logged once per change)

    def describe(self) -> list[Metric]:
        return []  # registering must not read the databases

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            began = time.monotonic()
            # a family with no sample is only HELP/TYPE noise in the scrape
            yield from (family for family in self._collect_all(self.clock()) if family.samples)
            took = GaugeMetricFamily("lastmile_scrape_collect_seconds", "Time this collection took.")
            took.add_metric([], time.monotonic() - began)
            yield took

    def _collect_all(self, now: float) -> Iterator[Metric]:
        config = self.config
        info = GaugeMetricFamily(
            "lastmile_gateway_info",
            "This gateway: its id, DICOM station name and software version.",
            labels=["gateway", "station", "version"],
        )
        info.add_metric([config.gateway.id, config.gateway.dicom_station_name, __version__], 1)
        yield info
        data_dir = config.data_dir
        up = GaugeMetricFamily("lastmile_source_up", "1 when the source could be read this scrape.", labels=["source"])

        outbox = self._read("outbox", up, lambda: sources.read_outbox(data_dir, now, config=config))
        yield from self._outbox_metrics(outbox)
        reports = self._read("reports", up, lambda: sources.read_reports(data_dir, now))
        yield from self._link_metrics(outbox, reports)
        if reports is not None:
            yield from self._report_metrics(reports)
        disk = self._read("disk", up, lambda: sources.read_disk(data_dir))
        yield from self._disk_metrics(disk)
        clock = self._read("clock", up, lambda: sources.read_clock(data_dir, run=self.run, now=now))
        if clock is not None:
            yield from self._clock_metrics(clock)
        services = self._read("services", up, self.services.read)
        yield from self._service_metrics(services or [])
        if config.update.enabled:
            update = self._read("update", up, lambda: read_update_state(data_dir))
            if update is not None:
                yield from self._update_metrics(update)
        yield up

    def _read(self, name: str, up: GaugeMetricFamily, read: Callable[[], T | None]) -> T | None:
        """One source; a failure is logged once (not every scrape: the SD card) and shows as
        lastmile_source_up{source} 0. A source that does not exist yet (None) is up."""
        try:
            value = read()
        except Exception as exc:  # noqa: BLE001 — one unreadable source must not blank the others
            text = f"{type(exc).__name__}: {exc}"
            if self._failing.get(name) != text:
                log.warning("metrics: cannot read %s: %s", name, text)
            self._failing[name] = text
            up.add_metric([name], 0)
            return None
        if self._failing.pop(name, None) is not None:
            log.info("metrics: %s readable again", name)
        up.add_metric([name], 1)
        return value

    # -- families ---------------------------------------------------------------------------------

    def _outbox_metrics(self, outbox: OutboxSnapshot | None) -> Iterator[Metric]:
        if outbox is None:
            return  # no outbox yet (or unreadable): nothing to count, and no zeros that would lie
        items = GaugeMetricFamily("lastmile_queue_items", "Outbox items by kind and state.", labels=["kind", "state"])
        for kind in _with_extra(KINDS, {k for k, _ in outbox.counts}):
            for state in _with_extra(STATES, {s for _, s in outbox.counts}):
                items.add_metric([kind, state], outbox.counts.get((kind, state), 0))
        yield items
        held = GaugeMetricFamily(
            "lastmile_queue_held_items",
            "Queued items held back now, by why: unassigned, patient-mismatch, name-mismatch, patient-id-conflict, re-record (the doctor decides).",
            labels=["kind", "reason"],
        )
        for (kind, reason), n in sorted(outbox.held.items()):
            held.add_metric([kind, reason], n)
        yield held
        oldest = GaugeMetricFamily(
            "lastmile_queue_oldest_waiting_seconds",
            "Age of the oldest item its peer has not accepted yet (queued or sending; 0 when none), "
            "not one held for the doctor: lastmile_queue_held_items counts those.",
            labels=["kind"],
        )
        pending = GaugeMetricFamily(
            "lastmile_queue_uncommitted_bytes", "Payload bytes not yet committed by the peer.", labels=["kind"]
        )
        stuck = GaugeMetricFamily(
            "lastmile_queue_oldest_stuck_seconds",
            "Age of the oldest item waiting that no metered link holds now (its send window shut or its "
            "daily budget spent hold routine items as configured): a stuck link (0 when none).",
            labels=["kind"],
        )
        for kind in KINDS:
            oldest.add_metric([kind], outbox.oldest_waiting_s.get(kind, 0.0))
            stuck.add_metric([kind], outbox.oldest_stuck_s.get(kind, 0.0))
            pending.add_metric([kind], outbox.uncommitted_bytes.get(kind, 0))
        yield oldest
        yield stuck
        yield pending
        quality = GaugeMetricFamily(
            "lastmile_ecg_quality_items",
            "ECGs in the outbox (until purged) by the quality gate's verdict; unchecked: no verdict.",
            labels=["verdict"],
        )
        for verdict in _with_extra(VERDICTS, set(outbox.quality)):
            quality.add_metric([verdict], outbox.quality.get(verdict, 0))
        yield quality
        committed = GaugeMetricFamily(
            "lastmile_last_commit_timestamp_seconds",
            "When the peer last committed to an item (DICOM storage commitment; FHIR 2xx).",
            labels=["kind"],
        )
        for kind, at in sorted(outbox.last_committed_at.items()):
            committed.add_metric([kind], at)
        yield committed

    def _link_metrics(self, outbox: OutboxSnapshot | None, reports: sources.ReportsSnapshot | None) -> Iterator[Metric]:
        links = dict(outbox.links) if outbox is not None else {}
        if reports is not None:
            links["reports"] = reports.link
        if not links:
            return
        state = GaugeMetricFamily(
            "lastmile_link_state",
            "1 for the destination's current state: up, down (last attempt failed; FHIR: the platform did not "
            "answer, refused every bundle (5xx), or was busy (429) taking nothing for "
            f"{BUSY_DOWN_AFTER_S // 60} minutes or more - busy for less, or refusing one bundle alone, it is up), "
            "refused (the peer refuses this gateway: "
            "configuration fault), unknown (nothing tried yet).",
            labels=["destination", "state"],
        )
        success = GaugeMetricFamily(
            "lastmile_last_success_timestamp_seconds",
            "When the destination last accepted something (DICOM C-STORE, FHIR transaction, report poll).",
            labels=["destination"],
        )
        for destination, link in links.items():
            for name in LINK_STATES:
                state.add_metric([destination, name], 1 if link.state == name else 0)
            if link.last_success_at is not None:
                success.add_metric([destination], link.last_success_at)
        yield state
        yield success

    @staticmethod
    def _report_metrics(reports: sources.ReportsSnapshot) -> Iterator[Metric]:
        critical = GaugeMetricFamily(
            "lastmile_reports_critical_unacknowledged", "Critical reports returned and not yet opened at the clinic."
        )
        critical.add_metric([], reports.critical_unacknowledged)
        yield critical
        critical_age = GaugeMetricFamily(
            "lastmile_reports_critical_oldest_seconds",
            "How long the oldest unopened critical report has waited (0 when none).",
        )
        critical_age.add_metric([], reports.critical_oldest_s or 0.0)
        yield critical_age
        awaited = GaugeMetricFamily(
            "lastmile_reports_awaited_studies", "ECGs sent whose final report has not come back.", labels=["priority"]
        )
        awaited.add_metric(["stat"], reports.awaited_stat)
        awaited.add_metric(["routine"], reports.awaited_studies - reports.awaited_stat)
        yield awaited
        awaited_age = GaugeMetricFamily(
            "lastmile_reports_awaited_oldest_seconds", "How long the oldest ECG sent has waited for its report."
        )
        awaited_age.add_metric([], reports.awaited_oldest_s or 0.0)
        yield awaited_age

    def _disk_metrics(self, disk: sources.DiskSnapshot | None) -> Iterator[Metric]:
        if disk is not None:
            yield _gauge(
                "lastmile_data_free_bytes", "Free bytes on the data partition (for the service user).", disk.free_bytes
            )
            yield _gauge("lastmile_data_size_bytes", "Size of the data partition.", disk.size_bytes)
        yield _gauge(
            "lastmile_outbox_min_free_bytes",
            "Below this much free space the outbox refuses new items (outbox.min_free_mb).",
            self.config.outbox.min_free_mb * 2**20,
        )

    @staticmethod
    def _clock_metrics(clock: sources.ClockSnapshot) -> Iterator[Metric]:
        yield _gauge(
            "lastmile_clock_synchronized",
            "1 when the time daemon (chrony, timesyncd) has a reference.",
            int(clock.synchronized),
        )
        yield _gauge(
            "lastmile_clock_plausible",
            "1 when the system clock is after 2020 (no RTC: boots in 1970).",
            int(clock.plausible),
        )
        info = GaugeMetricFamily(
            "lastmile_clock_info",
            "Where the time comes from: chrony (and its reference), timesyncd or none.",
            labels=["source", "reference"],
        )
        info.add_metric([clock.source, clock.reference], 1)
        yield info
        if clock.offset_s is not None:
            yield _gauge(
                "lastmile_clock_offset_seconds",
                "System clock minus the time daemon's reference (+: ahead).",
                clock.offset_s,
            )
        if clock.last_sync_at is not None:
            yield _gauge(
                "lastmile_clock_last_sync_timestamp_seconds",
                "When the time daemon last synchronised.",
                clock.last_sync_at,
            )
        if clock.gps_offset_s is not None:
            yield _gauge(
                "lastmile_clock_gps_offset_seconds",
                "System clock minus the GPS time lastmile learnt from a fix this boot (+: ahead).",
                clock.gps_offset_s,
            )

    @staticmethod
    def _service_metrics(services: Iterable[sources.ServiceSnapshot]) -> Iterator[Metric]:
        up = GaugeMetricFamily("lastmile_service_up", "1 while the unit is active.", labels=["service"])
        rss = GaugeMetricFamily(
            "lastmile_service_resident_bytes", "Resident memory of the unit's processes.", labels=["service"]
        )
        started = GaugeMetricFamily(
            "lastmile_service_start_time_seconds",
            "When the unit's main process started: changes() counts restarts, with or without D-Bus.",
            labels=["service"],
        )
        restarts = CounterMetricFamily(
            "lastmile_service_restarts", "Restarts by systemd (NRestarts), where systemctl answers.", labels=["service"]
        )
        for s in services:
            name = s.unit.removeprefix("lastmile-").removesuffix(".service")
            up.add_metric([name], int(s.active))
            if s.resident_bytes is not None:
                rss.add_metric([name], s.resident_bytes)
            if s.started_at is not None:
                started.add_metric([name], s.started_at)
            if s.restarts is not None:
                restarts.add_metric([name], s.restarts)
        yield from (up, rss, started, restarts)

    @staticmethod
    def _update_metrics(state: UpdateState) -> Iterator[Metric]:
        if state.last_result:
            outcome = str(state.last_result.get("outcome", ""))
            result = GaugeMetricFamily(
                "lastmile_update_last_result",
                "1 for what the last update round ended with (installed, up-to-date, source-failed, "
                "index-invalid, no-space, download-failed, refused, install-failed).",
                labels=["result"],
            )
            for value in _with_extra(tuple(o.value for o in RECORDED_OUTCOMES), {outcome}):
                result.add_metric([value], 1 if value == outcome else 0)
            yield result
            yield _gauge(
                "lastmile_update_last_round_timestamp_seconds",
                "When the last update round ended.",
                float(state.last_result.get("at", 0)),
            )
        if state.last_poll:
            yield _gauge(
                "lastmile_update_last_poll_timestamp_seconds",
                "When the county's index was last asked.",
                state.last_poll,
            )
        yield _gauge(
            "lastmile_update_reboot_pending",
            "1 while a new slot is installed and waits to be booted.",
            reboot_pending(state),
        )
        yield _gauge(
            "lastmile_update_rolled_back",
            "1 when the last version installed did not come up healthy and the gateway went back to the other slot.",
            rolled_back(state) is not None,
        )
        yield _gauge(
            "lastmile_update_refused_bundles", "Bundles refused and remembered (by sha256).", len(state.refused)
        )
        if state.installed.get("version"):
            installed = InfoMetricFamily("lastmile_update_installed", "The last version installed by an update round.")
            installed.add_metric([], {"version": str(state.installed["version"])})
            yield installed


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def _with_extra(known: tuple[str, ...], seen: set[str]) -> list[str]:
    """The values we always show (zeros included), then any the data has that we do not know."""
    return [*known, *sorted(seen - set(known))]


def make_registry(collector: GatewayCollector) -> CollectorRegistry:
    """Our collector and the exporter's own process figures; no GC/platform noise."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def service_probe(cgroup_root: Path | None = None) -> sources.ServiceProbe:
    """The probe of our units: in the cgroup v2 tree where it is mounted, or `cgroup_root` (a
    container that mounts the host's elsewhere, like node_exporter's --path.sysfs; a test)."""
    return sources.ServiceProbe(SERVICES, cgroup_root=cgroup_root or sources.cgroup2_mount())


def render_once(config: Config, *, cgroup_root: Path | None = None) -> str:
    """One scrape in the text format (`lastmile metrics --print`)."""
    from prometheus_client import generate_latest

    collector = GatewayCollector(config, services=service_probe(cgroup_root))
    return generate_latest(make_registry(collector)).decode("utf-8")


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S  # socket timeout: a silent client releases its thread

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every 30 s would fill the journal (and wear the card)."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the address's name (getfqdn): a VPN address with
        # no DNS reachable (a village link down) would hold the start for the resolver's timeouts
        TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self.setup_environ()


class MetricsServer:
    """The registry served over HTTP on its own thread; start() returns once it listens."""

    def __init__(self, listen: Listen, registry: CollectorRegistry) -> None:
        self.listen = listen
        self.registry = registry
        self._httpd: WSGIServer | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.listen.host else socket.AF_INET
        server_class = type("MetricsHTTPServer", (_ThreadingServer,), {"address_family": family})
        self._httpd = make_server(
            self.listen.host, self.listen.port, make_wsgi_app(self.registry), server_class, handler_class=_QuietHandler
        )
        self.thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        """The port it listens on (the configured one, or the one given for port 0 in tests)."""
        return self._httpd.server_address[1] if self._httpd is not None else self.listen.port

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self.thread is not None:
            self.thread.join(timeout=5.0)


class MetricsService:
    """The `Service` that `ServiceRuntime` drives: READY once the endpoint listens."""

    def __init__(self, config: Config, *, cgroup_root: Path | None = None) -> None:
        self.config = config
        self.collector = GatewayCollector(config, services=service_probe(cgroup_root))
        self.server = MetricsServer(metrics_listen(config), make_registry(self.collector))
        try:
            self.server.start()
        except OSError as exc:
            # e.g. the VPN address not up yet at boot: the runtime waits it out (READY, backoff)
            raise OSError(
                exc.errno, f"metrics.listen {config.metrics.listen!r} cannot be used: {exc.strerror}"
            ) from exc
        log.info("metrics on %s", self.server.listen.url("/metrics"))

    def step(self, stop: threading.Event) -> float:
        if not self.server.alive:
            raise RuntimeError("the metrics HTTP thread ended")  # a bug: exit, systemd restarts us
        return SELF_CHECK_S

    def reload(self, config: Config) -> None:
        if config.metrics.listen != self.config.metrics.listen:
            log.warning("metrics.listen changed: restart lastmile-metrics to listen there")
        self.collector.config = config
        self.config = config

    def close(self) -> None:
        self.server.stop()

    def status_line(self) -> str:
        return f"serving {self.server.listen.url('/metrics')}"
