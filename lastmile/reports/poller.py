"""Bringing the county's reports back: one polling round at a time, with its own backoff.

A round (`run_round`) takes the studies the policy says are due (lastmile.reports.policy), asks
the reading center about all of them at once and keeps what is new:

- DICOM: one association with only the C-FIND context (the usual answer is "nothing new", and
  that should cost a few hundred bytes), kept open for the next round while rounds come within
  `keep_association_s` (a STAT study's hurry) and released otherwise (uploader.dicom_query
  KeptQueryAssociation); only when something new was found, a second one with
  C-GET and the storage contexts brings it back. A PACS that refuses C-GET gets a C-MOVE to
  the gateway's own AE (the one the PACS already knows, with the storage-commitment listener's
  port, which then takes the C-STOREs too; or our own storage SCP on that port while the move
  runs), or to a separate `reports.move_ae`; C-GET is tried again a day later.
- FHIR: DiagnosticReport search by the studies' UIDs (changed since the last look), then
  conditional reads of the preliminary reports we hold.

Each object is stored as received with its readable text (lastmile.reports.store); a malformed one
is stored too, flagged, and its study stays polled. New critical reports are announced
(lastmile.reports.alerts). Failures back off on their own (capped exponential, jittered) without
ever touching the forwarder: the poller runs on its own thread (`PollerThread`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lastmile.reports.alerts import CriticalAlerter
from lastmile.reports.policy import DAY, PollPolicy, StudyClock
from lastmile.reports.store import POLLER_STATUS, ReportStore, SentStudy, filed_under
from uploader.dicom_association import PeerSettings
from uploader.dicom_query import (
    FoundReport,
    KeptQueryAssociation,
    QueryAssociation,
    ReportReceiver,
    RetrievedObject,
    RetrieveRefused,
    move_reports,
)
from uploader.errors import ConfigurationFault, PermanentError, TransientError, UploadError
from uploader.metering import Meter
from uploader.outbox import backoff_delay, gave_up_at_stop
from uploader.report_lines import LineKind, ReportLine
from uploader.report_reading import (
    REPORT_SR_CLASSES,
    CriticalRules,
    ReportContent,
    UnreadableReport,
    read_dicom_report,
    read_fhir_report,
    unreadable_fhir_report,
)

if TYPE_CHECKING:
    from uploader.fhir_reports import FhirReportClient  # requests: only where FHIR is configured

log = logging.getLogger(__name__)

STATUS_NAME = POLLER_STATUS
GET_REFUSED_RETRY_S = DAY  # after a PACS refused C-GET, use C-MOVE this long before trying C-GET again
FHIR_SINCE_MARGIN_S = 600.0  # clocks differ: look back this much further than the last look


@dataclass(frozen=True)
class PollerSettings:
    source: str = "dicom"  # "dicom", "fhir", "both"
    policy: PollPolicy = field(default_factory=PollPolicy)
    batch_size: int = 50
    keep_association_s: float = 28.0  # keep the C-FIND association for a round due within this; 0: never
    move_ae: str = ""  # C-MOVE destination; "": no C-MOVE
    move_port: int = 11114
    move_host: str = "0.0.0.0"
    backoff_base_s: float = 30.0
    backoff_max_s: float = 600.0
    config_fault_retry_s: float = 300.0

    @property
    def dicom(self) -> bool:
        return self.source in ("dicom", "both")

    @property
    def fhir(self) -> bool:
        return self.source in ("fhir", "both")


@dataclass
class PollRound:
    """What one round did (the service logs it, the bench and the demo count it)."""

    asked: int = 0  # studies asked about
    found: int = 0  # report objects the reading center has for them
    stored: int = 0  # new report objects kept
    amended: int = 0  # earlier reports replaced
    critical: int = 0  # new critical reports
    malformed: int = 0  # stored with problems
    retrieved_by: str = ""  # "C-GET", "C-MOVE", "FHIR"
    bytes: int = 0  # DIMSE PDU / HTTP bytes both ways
    error: str | None = None
    fault: str | None = None
    study_uids: list[str] = field(default_factory=list)
    # DICOM: per study asked about, the report objects listed that have not arrived ([]: none)
    awaiting: dict[str, list[str]] = field(default_factory=dict)

    @property
    def did_work(self) -> bool:
        return bool(self.asked)


class ReportPoller:
    def __init__(
        self,
        store: ReportStore,
        settings: PollerSettings,
        *,
        peer: PeerSettings | None = None,
        fhir: FhirReportClient | None = None,
        rules: CriticalRules | None = None,
        alerter: CriticalAlerter | None = None,
        clock: Callable[[], float] = time.time,
        meter: Meter | None = None,
        receiver: ReportReceiver | None = None,
    ) -> None:
        if settings.dicom and peer is None:
            raise ValueError("DICOM polling needs the reading center's PeerSettings")
        if settings.fhir and fhir is None:
            raise ConfigurationFault("reports.source includes fhir but fhir.base_url is not configured")
        self.store = store
        self.settings = settings
        self.peer = peer
        self.fhir = fhir
        self.rules = rules or CriticalRules()
        self.alerter = alerter or CriticalAlerter(store)
        self.clock = clock
        self.meter = meter  # while it is shut, only STAT studies are asked about
        # where C-MOVEd reports arrive: offered to the commitment listener, or listening on its own
        self.receiver = receiver or ReportReceiver(
            settings.move_ae, settings.move_port, host=settings.move_host, peer=peer
        )
        self._rng = random.Random()
        self._failures = 0
        self._retry_at = 0.0
        self._get_refused_until = 0.0
        self.bytes_total = 0
        self.rounds = 0
        self.queries = (
            KeptQueryAssociation(peer, idle_limit_s=settings.keep_association_s, clock=lambda: self.clock())
            if peer is not None
            else None
        )

    def close(self) -> None:
        """Release the kept association (the service stops, a test ends)."""
        if self.queries is not None:
            self.queries.close()

    def __enter__(self) -> ReportPoller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scheduling ---------------------------------------------------------------------------
    def _clocks(self, now: float) -> list[tuple[SentStudy, StudyClock]]:
        since = dt.datetime.fromtimestamp(now - self.settings.policy.window_s, dt.timezone.utc)
        return [
            (
                s,
                StudyClock(
                    s.study_uid,
                    s.sent_at.timestamp(),
                    s.stat,
                    # final, unless an object the reading center listed has still to arrive
                    s.final_at is not None and not s.awaiting,
                    s.last_polled_at.timestamp() if s.last_polled_at else None,
                ),
            )
            for s in self.store.studies(since=since)
        ]

    def next_due_in(self) -> float | None:
        """Seconds until this poller wants its next round; None: nothing outstanding."""
        now = self.clock()
        due = self.settings.policy.next_due_in([c for _s, c in self._clocks(now)], now)
        if due is None:
            return None
        return max(due, self._retry_at - now, 0.0)

    # -- one round ----------------------------------------------------------------------------
    def run_round(self, *, force: bool = False) -> PollRound:
        """Ask about the due studies (every outstanding one with `force`) and keep what is new."""
        result = PollRound()
        now = self.clock()
        if not force and now < self._retry_at:
            return result
        clocks = self._clocks(now)
        policy = self.settings.policy
        if force:
            uids = [c.study_uid for _s, c in clocks if policy.interval(c, now) is not None]
        else:
            uids = policy.round([c for _s, c in clocks], now)
            if self.meter is not None and uids and self.meter.blocked(now) is not None:
                stat = {c.study_uid for _s, c in clocks if c.stat}
                uids = [u for u in uids if u in stat]
        studies = {s.study_uid: s for s, _c in clocks if s.study_uid in set(uids)}
        if uids:
            result.asked = len(uids)
            result.study_uids = list(uids)
            self._ask(uids, studies, result, now, keep=not force)
        self.alerter.alert_pending()
        return result

    def _ask(
        self, uids: list[str], studies: dict[str, SentStudy], result: PollRound, now: float, *, keep: bool
    ) -> None:
        try:
            if self.settings.dicom:
                self._dicom_round(uids, result)
            if self.settings.fhir:
                self._fhir_round(uids, studies, result)
        except (TransientError, PermanentError) as exc:
            self._failures += 1
            delay = backoff_delay(self._failures, self.settings.backoff_base_s, self.settings.backoff_max_s, self._rng)
            retry_after = getattr(exc, "retry_after", None)
            if retry_after:
                delay = max(delay, float(retry_after))
            self._retry_at = now + delay
            result.error = str(exc)
            log.warning("reports: cannot ask the reading center now (%s); again in %.0f s", exc, delay)
        except ConfigurationFault as exc:
            self._failures += 1
            self._retry_at = now + self.settings.config_fault_retry_s
            result.fault = str(exc)
            log.error("reports: the reading center refuses this gateway: %s", exc)
        else:
            self._failures = 0
            self._retry_at = 0.0
        self.rounds += 1
        self.bytes_total += result.bytes
        if self.meter is not None:
            self.meter.spend(result.bytes, now)
        polled = [] if (result.error or result.fault) else uids
        # one transaction per round (the SD card): the studies asked about and the status
        self.store.mark_polled(
            polled,
            self._utc(now),
            status=(STATUS_NAME, self._status(result, now)),
            awaiting={} if (result.error or result.fault) else result.awaiting,
        )
        if self.queries is not None:
            # kept only while the next round comes soon (a STAT study's hurry), released otherwise;
            # a forced round (`lastmile report poll`, the demo) is a one-off: released at once
            self.queries.keep_for(self.next_due_in() if keep else None)

    def _status(self, result: PollRound, now: float) -> dict[str, object]:
        previous = self.store.status(STATUS_NAME) or {}
        status = {
            **previous,
            "last_round_at": now,
            "asked": result.asked,
            "stored": result.stored,
            "bytes": result.bytes,
            "bytes_total": previous.get("bytes_total", 0) + result.bytes,
            "error": result.error,
            "fault": result.fault,
            "retry_at": self._retry_at or None,
            "c_move": self._get_refused_until > now,
        }
        if result.error or result.fault:
            status["failing_since"] = previous.get("failing_since") or now
        else:
            status["failing_since"] = None
            status["last_success_at"] = now
        return status

    @staticmethod
    def _utc(now: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(now, dt.timezone.utc)

    # -- DICOM ----------------------------------------------------------------------------------
    def _dicom_round(self, uids: Sequence[str], result: PollRound) -> None:
        assert self.queries is not None
        try:
            found = self.queries.find_reports(uids, batch_size=self.settings.batch_size)
        finally:
            result.bytes += self.queries.take_bytes()
        result.found += len(found)
        new = [f for f in found if not self.store.has_object(f.sop_instance_uid)]
        result.awaiting.update({uid: [] for uid in uids})
        if not new:
            return
        log.info("reports: %d new report object(s) at the reading center", len(new))
        objects = self._retrieve(new, result)
        by_uid = {f.sop_instance_uid: f for f in new}
        read = [
            (self._read_dicom(o, by_uid[o.sop_instance_uid]), o.data) for o in objects if o.sop_instance_uid in by_uid
        ]
        # preliminary ones first: a final report replaces the preliminary ones already stored,
        # and the PACS lists a study's objects in its own order (a preliminary kept after the
        # final stayed current beside it)
        for content, data in sorted(read, key=lambda r: r[0].final):
            self._keep(content, data, "dicom", result)
        missing = set(by_uid) - {o.sop_instance_uid for o in objects}
        for uid in sorted(missing):
            result.awaiting.setdefault(by_uid[uid].study_uid, []).append(uid)
        if missing:
            # their studies are not done (the amendment poll's 12 h) until they have arrived
            log.warning("reports: %d found object(s) did not arrive; asking again next round", len(missing))

    def _retrieve(self, new: list[FoundReport], result: PollRound) -> list[RetrievedObject]:
        assert self.peer is not None
        now = self.clock()
        if now >= self._get_refused_until or not self.settings.move_ae:
            try:
                # C-FIND proposed too: a PACS without C-GET then still accepts the association
                # and says so by rejecting that one context (RetrieveRefused, not a fault)
                with QueryAssociation(self.peer, retrieve=True) as q:
                    try:
                        objects = q.get(new)
                    finally:
                        result.bytes += q.bytes_sent + q.bytes_received
                result.retrieved_by = "C-GET"
                return objects
            except RetrieveRefused as exc:
                if not self.settings.move_ae:
                    raise ConfigurationFault(f"{exc}; and no C-MOVE destination is configured") from None
                log.warning("reports: %s; retrieving with C-MOVE to %s", exc, self.settings.move_ae)
                refused = True
        else:
            refused = False
        objects, cost = move_reports(self.peer, self.settings.move_ae, self.receiver, new)
        result.bytes += cost
        result.retrieved_by = "C-MOVE"
        if refused:  # C-MOVE worked where C-GET did not: the PACS refuses C-GET, not the link
            self._get_refused_until = now + GET_REFUSED_RETRY_S
        return objects

    def _read_dicom(self, obj: RetrievedObject, found: FoundReport) -> ReportContent:
        try:
            content = read_dicom_report(obj.data, self.rules)
        except UnreadableReport as exc:
            kind = "sr" if obj.sop_class_uid in REPORT_SR_CLASSES else "pdf"
            return ReportContent(
                kind=kind,
                object_uid=obj.sop_instance_uid,
                study_uid=found.study_uid,
                series_uid=found.series_uid,
                sop_class_uid=obj.sop_class_uid,
                title="Unreadable report",
                lines=(ReportLine(LineKind.UNREADABLE), ReportLine(LineKind.PROBLEM, value=str(exc))),
                problems=(str(exc),),
            )
        return filed_under(content, found.study_uid)

    def _keep(self, content: ReportContent, data: bytes, source: str, result: PollRound) -> None:
        try:
            added = self.store.add_report(content, data, source, self._utc(self.clock()))
        except KeyError:
            log.info("reports: ignored a report for a study this gateway did not send")
            return
        if not added.created:
            return
        result.stored += 1
        result.amended += len(added.superseded)
        result.critical += bool(added.report.critical)
        result.malformed += bool(added.report.problems)
        log.info(
            "report %d stored: %s %s%s%s",
            added.report.id,
            added.report.kind,
            added.report.status,
            ", CRITICAL" if added.report.critical else "",
            f", replaces {list(added.superseded)}" if added.superseded else "",
        )

    # -- FHIR -----------------------------------------------------------------------------------
    def _fhir_round(self, uids: Sequence[str], studies: dict[str, SentStudy], result: PollRound) -> None:
        assert self.fhir is not None
        client = self.fhir
        before = client.bytes_sent + client.bytes_received
        try:
            size = max(1, self.settings.batch_size)
            for start in range(0, len(uids), size):
                batch = list(uids[start : start + size])
                polled = [studies[u].last_polled_at for u in batch if u in studies]
                since = None
                if polled and len(polled) == len(batch) and all(polled):
                    oldest = min(p for p in polled if p is not None)
                    since = (oldest - dt.timedelta(seconds=FHIR_SINCE_MARGIN_S)).isoformat()
                for resource in client.search(batch, since):
                    self._keep_fhir(resource, batch, result)
            known = [r for r in self.store.reports(current_only=True) if r.source == "fhir" and r.study_uid in studies]
            for report in known:
                if report.status != "preliminary":
                    continue
                changed = client.read(report.object_uid.split("/", 1)[1], report.version)
                if changed is not None:
                    self._keep_fhir(changed, [report.study_uid], result)
        finally:
            result.bytes += client.bytes_sent + client.bytes_received - before
        result.retrieved_by = result.retrieved_by or "FHIR"

    def _keep_fhir(self, resource: dict[str, object], batch: Sequence[str], result: PollRound) -> None:
        try:
            content = read_fhir_report(resource, self.rules, batch)
        except UnreadableReport as exc:
            kept = unreadable_fhir_report(resource, str(exc), batch)
            if kept is None:
                log.warning("reports: skipped a FHIR resource: %s", exc)
                return
            log.warning("reports: an unreadable report for study %s: %s", kept.study_uid, exc)
            content = kept  # kept flagged (like an unreadable DICOM object): the study stays polled
        if content.study_uid not in batch:
            log.info("reports: ignored a DiagnosticReport for a study not asked about")
            return
        result.found += 1
        if self.store.has_object(content.object_uid, content.version):
            return
        data = json.dumps(resource, ensure_ascii=False, sort_keys=True).encode()
        self._keep(content, data, "fhir", result)


class PollerThread:
    """Runs a ReportPoller on its own thread, so a slow or absent reading center never holds up
    the forwarder's C-STOREs. `wake()` when a study was sent (a STAT one is due in 25 s)."""

    def __init__(
        self, poller: ReportPoller, *, idle_s: float = 300.0, on_round: Callable[[PollRound], None] | None = None
    ) -> None:
        self.poller = poller
        self.idle_s = idle_s
        self.on_round = on_round or (lambda r: None)
        self.last_round: PollRound | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="report-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                result = self.poller.run_round()
                self.last_round = result
                if result.did_work:
                    self.on_round(result)
                delay = self.poller.next_due_in()
            except UploadError as exc:  # typed failures are handled in run_round; this is a bug
                log.exception("report poller: unexpected %s", type(exc).__name__)
                delay = self.idle_s
            except (sqlite3.OperationalError, OSError) as exc:
                delay = self.idle_s
                if gave_up_at_stop(exc):  # the service's stop (another process held clinic.db's lock): no fault
                    # nothing stored or marked asked: the next start asks again (its stop() ends the wait below)
                    log.info("report poller: stopping: what this round found is asked for again at the next start")
                else:
                    # a full or read-only data partition: waited out, never the end of the thread
                    # (the forward service would exit with it and stop draining the disk)
                    log.error("report poller: cannot write its state (%s); retrying in %g s", exc, self.idle_s)
            except Exception as exc:  # the thread must not die silently: the service checks `alive`
                self.error = exc
                log.exception("report poller crashed")
                return
            wait = self.idle_s if delay is None else min(max(delay, 1.0), self.idle_s)
            self._wake.wait(wait)
            self._wake.clear()
