"""The forward service: outbox → reading center (DICOM) and county platform (FHIR), and the
reports coming back (lastmile.reports: its own thread, its own backoff).

A full data partition is waited out here, not by exiting: the outbox's reserve file
(uploader/space_reserve.py) gives the first writes room; once it is spent and SQLite still
finds no room, a step cannot record progress: claiming fails first, so nothing is sent (a store
that succeeded but could not be recorded is remembered and recorded when there is room, not
sent again - by the next start if this one stops first: `Outbox.remember_stored`). The service then logs one line saying so, shows the fault in its status,
and tries again soon - every FULL_DISK_RETRY_MAX_S at most - so that the moment any room
appears (a log rotated, the county IT freeing space) it sends and purges, which frees far more.
`lastmile queue` shows the full partition without writing to it."""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from lastmile.config import Config, ReadingCenterSection, fhir_naming
from lastmile.data_dir import open_outbox
from lastmile.services.metered import meter_of, meter_policy
from lastmile.services.process_tuning import GLIBC_MALLOC, MALLOC_ARENAS, MMAP_THRESHOLD, TRIM_EVERY_S
from lastmile.services.runtime import FAULT, is_operational
from lastmile.visits.relay_link import VisitNotices
from uploader.dicom_association import PeerSettings
from uploader.dicom_tls import TlsFiles
from uploader.ecg_forwarder import EcgForwarder, ForwarderSettings
from uploader.outbox import is_disk_full

if TYPE_CHECKING:
    from lastmile.reports.sent_readings import SentReading
    from lastmile.reports.service import ReportService
    from lastmile.services.observation_relay import Relayed
    from lastmile.visits.relay_link import VisitQueue
    from uploader.fhir_sender import FhirSender
    from uploader.sqlite_store import StopWaits

log = logging.getLogger(__name__)

FULL_DISK_RETRY_FIRST_S = 1.0
FULL_DISK_RETRY_MAX_S = 15.0  # short: a retry on a full disk costs a failed write, nothing more


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
        max_associations=max(rc.associations, rc.max_associations),
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
        stat_cut_after_s=rc.stat_cut_after_s if rc.stat_cuts_routine else None,
        meter=meter_policy(rc.metered),
    )


class ForwardService:
    """One `step()` forwards DICOM, then FHIR; the runtime pings the watchdog between steps and,
    during a long round, as objects are stored (`alive`)."""

    def __init__(
        self, config: Config, *, alive: Callable[[], None] | None = None, stop: threading.Event | None = None
    ) -> None:
        """`alive`: called as a step makes progress (an object stored, ...; the runtime's
        `ServiceRuntime.alive`): a round with a long backlog on a slow link keeps the watchdog fed.
        `stop`: the runtime's (SIGTERM): once set, the outbox's and clinic.db's writes stop waiting
        for another process's write lock within a second (`Outbox.give_up_waits_on`,
        sqlite_store.StopWaits, one for both), so a step or a record's writer waiting for it ends."""
        from uploader.sqlite_store import StopWaits

        self._alive = alive
        # as in acquire: big buffers (a payload, its inflated and encoded copies: ~100-250 KB per
        # store) mapped and unmapped rather than left in the heap, and free heap pages given back
        # (`step`): reports and FHIR rounds left the soak's forward process above 60 MB
        GLIBC_MALLOC.tune(arenas=MALLOC_ARENAS, mmap_threshold=MMAP_THRESHOLD)
        self._trimmed = time.monotonic()
        self.config = config
        waits = self._stop_waits = StopWaits(stop) if stop is not None else None
        self.outbox = open_outbox(config, stop=waits)
        try:
            self.reports = self._make_reports(config, waits)
            try:
                self.ecg = self._make_ecg(config)
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
        self._fhir_meter = meter_of(config, self.outbox, "fhir")
        self._full_disk_delay = 0.0  # > 0 while the data partition is too full to record progress
        # a round cut short by a database/disk fault left sends unrecorded or items claimed: settled
        # before the next round (claim takes only queued items: a claim left behind is never sent)
        self._unsettled = False
        self._visits: VisitQueue | None = None  # made at the first FHIR round
        # what the relay and the visit queue said once (a damaged key, a damaged open visit)
        self._visit_notices = VisitNotices()
        # the sent-reading records may lag the outbox's bundles: a new process (the last one's
        # write may have been refused), clinic.db refused this one's, a round cut short by a fault
        # after the platform took bundles: caught up by one scan (`_catch_up_taken`)
        self._records_behind = True

    def _make_ecg(self, config: Config) -> EcgForwarder:
        # the commitment listener also takes reports C-MOVEd to our AE (the PACS knows one port)
        settings = replace(forwarder_settings(config), also_store=self.reports.move_storage)
        ecg = EcgForwarder(self.outbox, settings, on_event=self._on_event)
        ecg.start()
        return ecg

    def _on_event(self, kind: str, info: dict[str, Any]) -> None:
        """The forwarder's events (its send threads'): each is progress, and the sent ones are
        the sent-study records'."""
        if self._alive is not None:
            self._alive()
        self.reports.recorder.on_event(kind, info)

    def _make_reports(self, config: Config, stop: StopWaits | None) -> ReportService:
        from lastmile.reports.service import ReportService

        reports = ReportService(config, self.outbox, peer_settings(config.reading_center), stop=stop)
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
        try:
            delay = self._step(stop)
        except (sqlite3.OperationalError, OSError) as exc:
            self._unsettled = True
            if not is_disk_full(exc):
                self._settle_after_fault()
                raise  # the runtime waits out other operational faults, then steps us again
            return self._wait_for_space(exc)
        except Exception as exc:
            if is_operational(exc):
                self._unsettled = True
                self._settle_after_fault()
            raise
        if self._full_disk_delay:
            log.warning("data partition has room again: sending and purging (was full)")
            self._full_disk_delay = 0.0
        now = time.monotonic()
        if now - self._trimmed >= TRIM_EVERY_S:
            self._trimmed = now
            GLIBC_MALLOC.trim()
        return delay

    def _wait_for_space(self, exc: BaseException) -> float:
        first = not self._full_disk_delay
        self._full_disk_delay = min(FULL_DISK_RETRY_MAX_S, max(FULL_DISK_RETRY_FIRST_S, self._full_disk_delay * 2))
        free = _free_kb(self.config)
        line = (
            f"data partition full ({free} KB free, reserve spent): cannot record what is sent, so nothing is "
            f"sent until some space is freed; nothing is lost; retrying every {self._full_disk_delay:g} s ({exc})"
        )
        if first:
            log.error("%s", line)
        else:
            log.debug("%s", line)
        self._last = f"{FAULT} data partition full ({free} KB free): waiting for space to send and purge"
        return self._full_disk_delay

    def _settle_after_fault(self) -> None:
        """Right after a round failed on a database fault that is not a full disk (a disk I/O error,
        "database is locked" past the busy timeout): settle now if the database answers again,
        else the next step does (`_settle`). The runtime steps this same service again: nothing
        else would ever release the round's claims before the process ends."""
        try:
            self._settle()
        except (sqlite3.Error, OSError) as exc:
            log.warning("claims of the failed round not settled yet (next step settles them): %s", exc)

    def _settle(self) -> None:
        """A round cut short by a fault: what the peer has is recorded as sent (not sent again,
        its commitment asked), then what it left claimed goes back to the queue."""
        if not self._unsettled:
            return
        self._records_behind = True  # what the platform took before the fault: its readings' records
        recorded = self.ecg.record_unrecorded_sends()
        if recorded:
            log.info("%d item(s) stored at the reading center during a database fault recorded as sent", recorded)
        released = self.outbox.release_claims(time.time())
        if released:
            log.info("%d item(s) claimed by the round the fault cut short put back in the queue", released)
        self._unsettled = False

    def _step(self, stop: threading.Event) -> float:
        self._settle()
        self.reports.check()
        self.reports.prune(time.time())
        result = self.ecg.run_round(stop)
        waits = [0.0 if result.did_work else self.ecg.next_due_in()]
        if self._fhir is not None and not stop.is_set():
            from lastmile.services.observation_relay import relay_observations
            from lastmile.visits.relay_link import visit_link
            from uploader.fhir_forwarder import forward_fhir_once

            link = visit_link(self.config.data_dir, self.config.gateway.id, self._visit_notices, self._stop_waits)
            relay_observations(
                self.outbox, fhir_naming(self.config), time.time(), visit_link=link, record=self._record_relayed
            )
            self._queue_visits()

            now = time.time()  # the taken bundles' sent time (Outbox.mark_taken)
            fhir = forward_fhir_once(
                self.outbox,
                self._fhir,
                now,
                batch_size=self.config.fhir.batch_size,
                config_fault_retry_s=self.config.outbox.config_fault_retry_s,
                meter=self._fhir_meter,
            )
            if fhir.sent or fhir.quarantined:
                log.info("FHIR round: sent %d, quarantined %d", fhir.sent, fhir.quarantined)
            self._record_taken(fhir.taken, now)
            waits.append(0.0 if fhir.claimed and not fhir.fault else self.ecg.next_due_in())
        self._last = (
            f"sent {result.sent}, committed {result.committed}, retry {result.transient}, "
            f"quarantined {result.quarantined}" + (f", {FAULT} {result.fault}" if result.fault else "")
        )
        if result.did_work:
            log.info("forward round: %s", self._last)
        return min(waits)

    def _record_relayed(self, relayed: list[Relayed], now: float) -> None:
        """The relayed readings' records (clinic.db, one transaction): the Sent page lists them
        after the outbox has purged them."""
        from lastmile.reports.sent_readings import sent_reading_of
        from uploader.fhir_bundle import observation_key

        destination, naming = self.config.fhir.base_url, fhir_naming(self.config)
        records = [
            sent_reading_of(item, obs, now, destination, observation_key(obs, naming), visit)
            for item, obs, visit in relayed
        ]
        self.reports.store.record_sent_readings(records)
        # a record clinic.db refused at the relay is written rounds later (observation_relay), maybe
        # after the platform took its bundle: no round's keys would name it again
        try:
            self._record_taken_of(records)
        except Exception as exc:  # noqa: BLE001 - written; the Sent page reads the bundles meanwhile
            self._taken_not_recorded(exc)

    def _record_taken(self, taken: list[str], at: float) -> None:
        """The readings whose bundles the platform took this round (`taken`, at `at`) get their
        records' sent time: one update by bundle key, no read (the records of refused bundles, kept
        to retention, are never read again); nothing in a round that took nothing. Records that may
        lag are caught up from the outbox first (`_catch_up_taken`)."""
        if not taken and not self._records_behind:
            return
        try:
            if self._records_behind:
                self._catch_up_taken()  # this round's taken too: the outbox has them committed
                self._records_behind = False
            else:
                self.reports.store.record_bundles_taken(taken, dt.datetime.fromtimestamp(at, dt.timezone.utc))
        except Exception as exc:  # noqa: BLE001 - the Sent page reads the bundles meanwhile: never stop the round
            self._taken_not_recorded(exc)

    def _taken_not_recorded(self, exc: Exception) -> None:
        """The readings' sent time not written (clinic.db refused it): caught up from the outbox at
        the next round, or the next start's first (`_catch_up_taken`). A write the stop gave up
        (another process held clinic.db's lock) is the stop, no fault: no trace at ERROR."""
        from uploader.sqlite_store import gave_up_at_stop

        self._records_behind = True
        if gave_up_at_stop(exc):
            log.info("stopping: readings taken by the county platform recorded as sent at the next start")
        else:
            log.error(
                "readings taken by the county platform not recorded as sent yet (tried again next round)", exc_info=exc
            )

    def _catch_up_taken(self) -> None:
        """Every record with no sent time whose bundle the outbox says was taken gets that time (one
        transaction): at the first round of a process, after clinic.db refused a round's update or
        a fault cut a round short. Reads each such record's bundle: then, never each round."""
        self._record_taken_of(self.reports.store.untaken_sent_readings())

    def _record_taken_of(self, records: list[SentReading]) -> None:
        """`records` whose bundle the outbox says the platform took get that time (one transaction,
        none if no bundle was): their bundles read in one statement per 500 keys."""
        from lastmile.reports.sent_readings import carrying_bundle, carrying_keys, taken_at

        bundles = self.outbox.find_many([key for r in records for key in carrying_keys(r)])
        taken = {r.outbox_item_id: taken_at(carrying_bundle(bundles.get, r)) for r in records}
        self.reports.store.record_readings_taken({item_id: at for item_id, at in taken.items() if at is not None})

    def _queue_visits(self) -> None:
        """Closed home visits not queued yet (signed after their stop, or a stop cut short) go
        into this round; a passing fault leaves them for the next, never stops the round."""
        from lastmile.services.observation_relay import DATA_ERRORS, PASSING_FAULTS
        from lastmile.visits.relay_link import UNQUEUED_RETRY_S, VisitQueue

        if self._visits is None:
            self._visits = VisitQueue(
                self.config.data_dir, self.config.gateway.id, notices=self._visit_notices, waits=self._stop_waits
            )
        try:
            self._visits.queue(self.outbox, fhir_naming(self.config))
        except PASSING_FAULTS as exc:
            from uploader.sqlite_store import gave_up_at_stop

            if gave_up_at_stop(exc):  # the stop's (another process held visits.db's lock), no fault
                log.info("stopping: closed home visits queued for the county platform at the next start")
            else:
                log.warning("closed home visits not queued now (tried again in %g s): %s", UNQUEUED_RETRY_S, exc)
        except DATA_ERRORS:  # a visit record that cannot be a bundle: readings and ECGs still go
            log.exception("a closed home visit cannot be queued for the county platform")

    def reload(self, config: Config) -> None:
        self.ecg.close()
        self.reports.close()
        if self._fhir is not None:
            self._fhir.close()
        self.config = config
        self._visits = None  # the data directory or gateway id may have changed
        self.reports = self._make_reports(config, self._stop_waits)
        # as at start: without the reports' storage a reload left the listener refusing every
        # report C-MOVEd to our AE (the result no longer came back to the village)
        self.ecg = self._make_ecg(config)
        self._fhir = self._make_fhir(config)
        self._fhir_meter = meter_of(config, self.outbox, "fhir")

    def close(self) -> None:
        self.ecg.close()
        self.reports.close()
        if self._fhir is not None:
            self._fhir.close()
        self.outbox.close()

    def status_line(self) -> str:
        return f"{self._last}; {self.reports.status_line()}"


def _free_kb(config: Config) -> str:
    try:
        st = os.statvfs(config.data_dir)
    except OSError:
        return "?"
    return str(st.f_bavail * st.f_frsize // 1024)
