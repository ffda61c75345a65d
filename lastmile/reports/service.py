"""The reports part of the forward service: record what was sent, poll for what comes back.

`ReportService(config, outbox)` owns its clinic.db connection, the sent-study recorder (whose
`on_event` the forward service hands to the ECG forwarder) and the poller thread. The forward
service's step only checks that the thread is alive: polling never holds up a C-STORE.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from typing import TYPE_CHECKING

from lastmile.config import Config
from lastmile.reports.alerts import CriticalAlerter
from lastmile.reports.old_lines import OldReportLines, has_old_reports
from lastmile.reports.policy import DAY, HOUR, PollPolicy
from lastmile.reports.poller import PollerSettings, PollerThread, PollRound, ReportPoller
from lastmile.reports.sent import UNWRITTEN_NAME, SentStudyRecorder
from lastmile.reports.store import ReportStore
from lastmile.services.metered import meter_of
from uploader.dicom_association import PeerSettings
from uploader.dicom_commitment import ExtraStorage
from uploader.dicom_query import ReportReceiver
from uploader.metering import Meter
from uploader.report_reading import CriticalRules
from uploader.sqlite_store import StopWaits, give_up_waits_on

if TYPE_CHECKING:
    from uploader.fhir_reports import FhirReportClient
    from uploader.outbox import Outbox

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 3600.0  # the sent records' retention is in days: an hour late costs nothing


def move_destination(config: Config) -> tuple[str, int, bool]:
    """Where a C-MOVE sends reports: (AE title, port, whether it is the gateway's own AE).

    The PACS knows the gateway as one AE title with one address and port (reading_center
    calling_ae and listen_port: its storage-commitment reports go there), so that is the
    destination unless a separate reports.move_ae is configured (then on reports.move_port)."""
    r, rc = config.reports, config.reading_center
    own = not r.move_ae.strip() or r.move_ae.strip() == rc.calling_ae.strip()
    if own:
        return rc.calling_ae, rc.listen_port, True
    return r.move_ae, r.move_port, False


def poller_settings(config: Config) -> PollerSettings:
    r = config.reports
    move_ae, move_port, _own = move_destination(config)
    return PollerSettings(
        source=r.source,
        policy=PollPolicy(
            stat_poll_s=max(1.0, r.stat_poll_s),
            stat_hurry_s=r.stat_hurry_h * HOUR,
            amendment_poll_s=r.amendment_poll_h * HOUR,
            window_s=r.window_days * DAY,
        ),
        batch_size=max(1, r.batch_size),
        keep_association_s=r.keep_association_s,
        move_ae=move_ae,
        move_port=move_port,
        move_host=r.move_host or config.reading_center.listen_host or "0.0.0.0",
        backoff_base_s=r.backoff_base_s,
        backoff_max_s=r.backoff_max_s,
        config_fault_retry_s=config.outbox.config_fault_retry_s,
    )


def critical_rules(config: Config) -> CriticalRules:
    from lastmile.config import ConfigError

    try:
        return CriticalRules.parse(config.reports.critical_codes, config.reports.critical_keywords)
    except ValueError as exc:
        raise ConfigError(f"reports.critical_codes: {exc}") from None


def fhir_report_client(config: Config) -> FhirReportClient | None:
    if not config.fhir.base_url:
        return None
    from uploader.fhir_reports import FhirReportClient
    from uploader.fhir_sender import FhirSenderSettings

    f = config.fhir
    return FhirReportClient(
        FhirSenderSettings(base_url=f.base_url, token_file=f.token_file, ca_file=f.ca_file, timeout_s=f.timeout_s)
    )


def make_poller(
    config: Config,
    store: ReportStore,
    peer: PeerSettings | None,
    meter: Meter | None = None,
    receiver: ReportReceiver | None = None,
) -> ReportPoller:
    settings = poller_settings(config)
    return ReportPoller(
        store,
        settings,
        peer=peer if settings.dicom else None,
        fhir=fhir_report_client(config) if settings.fhir else None,
        rules=critical_rules(config),
        alerter=CriticalAlerter(store, config.reports.critical_command),
        meter=meter,
        receiver=receiver,
    )


class ReportService:
    def __init__(self, config: Config, outbox: Outbox, peer: PeerSettings, *, stop: StopWaits | None = None) -> None:
        """`stop`: the forward service's (its outbox's too): at a stop, the writes of its clinic.db
        connection (sent records, reports received, the relayed readings' records) wait at most a
        second more for another process's lock (WaitGivenUp), each kept for its next try."""
        self.enabled = config.reports.source != "off"
        self._retention_days = config.reports.retention_days
        self._window_days = config.reports.window_days
        self._pruned_at: float | None = None
        self._data_dir = config.data_dir
        self._old_lines: OldReportLines | None = None
        self.store = ReportStore.open(config.data_dir)
        if stop is not None:
            give_up_waits_on(self.store.db, stop)
        # reports C-MOVEd to the gateway's own AE arrive at the storage-commitment listener (the
        # port the PACS knows for that AE): the forwarder's listener takes them (`move_storage`)
        self.move_storage: ExtraStorage | None = None
        receiver = None
        _ae, _port, own = move_destination(config)
        if self.enabled and config.reports.source != "fhir" and own and config.reading_center.storage_commitment:
            settings = poller_settings(config)
            receiver = ReportReceiver(settings.move_ae, settings.move_port, host=settings.move_host, peer=peer)
            self.move_storage = receiver.offer()
        try:
            meter = meter_of(config, outbox, "reports")
            self.poller = make_poller(config, self.store, peer, meter, receiver) if self.enabled else None
        except BaseException:
            self.store.close()
            raise
        self.thread = PollerThread(self.poller, on_round=self._log_round) if self.poller else None
        wake = self.thread.wake if self.thread else None
        # studies are recorded even with polling off: turning it on later finds them
        self.recorder = SentStudyRecorder(
            outbox, self.store, on_new_study=wake, unwritten_file=config.data_dir / UNWRITTEN_NAME
        )

    def start(self) -> None:
        self.recorder.write_left_by_last_stop()  # first: with retention_days 0 backfill finds none of them
        self.recorder.backfill()
        if has_old_reports(self.store.db):  # one index lookup: none on a gateway set up since 0009
            self._old_lines = OldReportLines(self._data_dir)
            self._old_lines.start()
        self.recorder.start()
        if self.thread is not None:
            self.thread.start()

    def check(self) -> None:
        """Raise if the poller thread died (the service then exits and systemd restarts it)."""
        if self.thread is not None and not self.thread.alive:
            raise RuntimeError(f"the report poller stopped: {self.thread.error!r}")

    def prune(self, now: float) -> None:
        """Sent studies (with their reports) and sent readings past reports.retention_days
        deleted, at most once an hour. The forward service's housekeeping, not the poller's:
        with reports.source "off" no poller runs, and clinic.db kept a row per ECG and per
        reading forever on the SD card."""
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        at = dt.datetime.fromtimestamp(now, dt.timezone.utc)
        try:
            purged = self.store.purge_expired(at, self._retention_days, self._window_days)
        except (sqlite3.Error, OSError) as exc:  # housekeeping: sending goes on, tried again later
            log.warning("old sent records not deleted now (tried again in %g min): %s", PRUNE_EVERY_S / 60, exc)
            return
        if purged:
            log.info("%d old stud(ies) and their reports deleted (retention)", purged)

    def close(self) -> None:
        if self._old_lines is not None:
            self._old_lines.stop()
        if self.thread is not None:
            self.thread.stop()
        if self.poller is not None:
            self.poller.close()  # the kept association, released rather than dropped
        self.recorder.stop()
        if self.poller is not None and self.poller.fhir is not None:
            self.poller.fhir.close()
        self.store.close()

    def status_line(self) -> str:
        return self._poller_status() + self._recorder_status()

    def _poller_status(self) -> str:
        if self.thread is None or self.thread.last_round is None:
            return "reports: waiting" if self.enabled else "reports: off"
        r = self.thread.last_round
        return f"reports: asked {r.asked}, stored {r.stored}" + (
            f", ERROR {r.error or r.fault}" if r.error or r.fault else ""
        )

    def _recorder_status(self) -> str:
        """Sent studies clinic.db refused to record (kept, retried): their reports are not asked for."""
        r = self.recorder
        text = f"; ERROR {r.waiting} sent stud(ies) not recorded: {r.last_error}" if r.waiting else ""
        return text + (f"; {r.dropped} sent-study record(s) DROPPED" if r.dropped else "")

    @staticmethod
    def _log_round(result: PollRound) -> None:
        log.info(
            "report round: asked %d, found %d, stored %d (critical %d), %d bytes%s",
            result.asked,
            result.found,
            result.stored,
            result.critical,
            result.bytes,
            f", {result.error or result.fault}" if result.error or result.fault else "",
        )
