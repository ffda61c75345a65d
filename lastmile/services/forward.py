"""The forward service: outbox → reading center (DICOM) and county platform (FHIR), and the
reports coming back (lastmile.reports: its own thread, its own backoff)."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from lastmile.config import Config, ReadingCenterSection
from lastmile.data_dir import open_outbox
from uploader.dicom_association import PeerSettings
from uploader.dicom_tls import TlsFiles
from uploader.ecg_forwarder import EcgForwarder, ForwarderSettings

if TYPE_CHECKING:
    from lastmile.reports.service import ReportService
    from uploader.fhir_sender import FhirSender

log = logging.getLogger(__name__)


def peer_settings(
    rc: ReadingCenterSection, *, host: str | None = None, port: int | None = None, called_ae: str | None = None
) -> PeerSettings:
    tls = None
    if rc.tls.enabled:
        tls = TlsFiles(ca_file=rc.tls.ca_file, cert_file=rc.tls.cert_file, key_file=rc.tls.key_file)
    return PeerSettings(
        host=host or rc.host,
        port=port or rc.port,
        called_ae=called_ae or rc.called_ae,
        calling_ae=rc.calling_ae,
        timeout_s=rc.timeout_s,
        deflate=rc.deflate,
        tls=tls,
    )


def forwarder_settings(config: Config) -> ForwarderSettings:
    rc = config.reading_center
    return ForwarderSettings(
        peer=peer_settings(rc),
        associations=rc.associations,  # ≥ 1: lastmile/config.py refuses anything else
        batch_size=rc.batch_size,
        storage_commitment=rc.storage_commitment,
        listen_port=rc.listen_port,
        listen_host=rc.listen_host,
        report_networks=tuple(rc.report_networks),
        commitment_timeout_s=rc.commitment_timeout_s,
        no_commitment_policy=rc.no_commitment_policy,
        config_fault_retry_s=config.outbox.config_fault_retry_s,
        retention_s=config.outbox.retention_days * 86400.0,
        max_interrupted_sends=max(1, config.outbox.max_interrupted_sends),
    )


class ForwardService:
    """One `step()` forwards DICOM, then FHIR; the runtime pings the watchdog between steps."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.outbox = open_outbox(config)
        try:
            self.reports = self._make_reports(config)
            try:
                self.ecg = EcgForwarder(
                    self.outbox, forwarder_settings(config), on_event=self.reports.recorder.on_event
                )
                self.ecg.start()
                try:
                    self._fhir = self._make_fhir(config)
                except BaseException:
                    self.ecg.close()
                    raise
            except BaseException:
                self.reports.close()
                raise
        except BaseException:
            # the runtime retries a start that failed on an operational fault: leave no
            # listener bound and no database open behind
            self.outbox.close()
            raise
        self._last = "starting"

    def _make_reports(self, config: Config) -> ReportService:
        from lastmile.reports.service import ReportService

        reports = ReportService(config, self.outbox, peer_settings(config.reading_center))
        reports.start()
        return reports

    @staticmethod
    def _make_fhir(config: Config) -> FhirSender | None:
        if not config.fhir.base_url:
            return None
        from uploader.fhir_sender import FhirSender, FhirSenderSettings

        f = config.fhir
        # a token file others can read is refused here, before READY: systemd shows why
        return FhirSender(
            FhirSenderSettings(
                base_url=f.base_url,
                token_file=f.token_file,
                ca_file=f.ca_file,
                timeout_s=f.timeout_s,
                gzip="auto" if f.gzip else "never",
            )
        )

    def step(self, stop: threading.Event) -> float:
        self.reports.check()
        result = self.ecg.run_round(stop)
        waits = [0.0 if result.did_work else self.ecg.next_due_in()]
        if self._fhir is not None and not stop.is_set():
            from uploader.fhir_forwarder import forward_fhir_once

            fhir = forward_fhir_once(
                self.outbox,
                self._fhir,
                time.time(),
                batch_size=self.config.fhir.batch_size,
                config_fault_retry_s=self.config.outbox.config_fault_retry_s,
            )
            if fhir.sent or fhir.quarantined:
                log.info("FHIR round: sent %d, quarantined %d", fhir.sent, fhir.quarantined)
            waits.append(0.0 if fhir.claimed and not fhir.fault else self.ecg.next_due_in())
        self._last = (
            f"sent {result.sent}, committed {result.committed}, retry {result.transient}, "
            f"quarantined {result.quarantined}" + (f", FAULT {result.fault}" if result.fault else "")
        )
        if result.did_work:
            log.info("forward round: %s", self._last)
        return min(waits)

    def reload(self, config: Config) -> None:
        self.ecg.close()
        self.reports.close()
        if self._fhir is not None:
            self._fhir.close()
        self.config = config
        self.reports = self._make_reports(config)
        self.ecg = EcgForwarder(self.outbox, forwarder_settings(config), on_event=self.reports.recorder.on_event)
        self.ecg.start()
        self._fhir = self._make_fhir(config)

    def close(self) -> None:
        self.ecg.close()
        self.reports.close()
        if self._fhir is not None:
            self._fhir.close()
        self.outbox.close()

    def status_line(self) -> str:
        return f"{self._last}; {self.reports.status_line()}"
