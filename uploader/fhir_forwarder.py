"""Outbox → FHIR platform: one round of sending queued transaction Bundles.

`forward_fhir_once(outbox, sender, now)` claims due `fhir-bundle` items (oldest first), sends them
in merged transactions of up to `batch_size` bundles, and settles each item:

- a transaction-response with a 2xx for every entry sent → sent and committed at once (it *is*
  the commitment); any other 2xx answer is a TransientError (`FhirSender`), never "sent";
- the platform down or busy (no answer, a gateway's 502/503/504, 429: `Unavailable`) → the batch's
  items back to the queue with backoff (Retry-After honoured; a batch the platform got and did not
  answer in time, at least the client's timeout: it may still be applying it), the rest of this round released
  uncharged: don't hammer it. The round records when the platform failed so (`last_error_at`), even
  after it took others this round: what failed then waits for the platform, never "refused alone";
- the platform refusing a merged batch (PermanentError, or any other TransientError: a 500, an
  entry answered 5xx) → split in halves until the bundle at fault is alone, so one bundle does not
  hold its batch-mates; alone, it is quarantined with the server's OperationOutcome text (shown by
  `lastmile queue`) or, a TransientError, backs off; the others go (a second bundle refused for
  now stops the round: the platform refuses everything, don't hammer it - what that batch did not
  send alone is released uncharged, the refusals were the two bundles', and the next round sends
  merged batches unsplit, as before splitting, until one goes);
- ConfigurationFault (bad token, TLS trust, a base URL that takes no transactions) → everything
  released uncharged, fault reported.

Order per patient: once one of a patient's bundles could not go, that patient's later bundles
wait for the next round instead of overtaking it. Re-sending is always safe: every entry is a
conditional create, so the platform never stores a visit twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from devices.observation import Observation
from uploader.errors import ConfigurationFault, CorruptPayloadError, PermanentError, TransientError
from uploader.fhir_bundle import (
    FhirNaming,
    bundle_bytes,
    merge_transactions,
    observation_bundle,
    observation_key,
)
from uploader.fhir_connection import NoAnswer, NotConnected, PlatformDown, Unavailable
from uploader.fhir_link import LAST_ERROR_AT, Said, recorded_failure, recorded_judgement
from uploader.fhir_sender import FhirSender
from uploader.metering import Meter
from uploader.outbox import ItemState, Kind, Outbox, OutboxItem, Priority

log = logging.getLogger(__name__)

STATUS_NAME = "fhir"


def enqueue_bundle(
    outbox: Outbox,
    bundle: dict[str, Any],
    key: str,
    *,
    patient_id: str | None,
    meta: dict[str, Any] | None = None,
    now: float | None = None,
) -> bool:
    """Queue one transaction Bundle under an idempotency key; False if it was already queued."""
    result = outbox.add(
        Kind.FHIR_BUNDLE,
        key,
        bundle_bytes(bundle),
        priority=Priority.ROUTINE,
        meta=meta or {},
        patient={"patient_id": patient_id} if patient_id else None,
        now=now,
    )
    return result.created


def enqueue_observation(
    outbox: Outbox,
    obs: Observation,
    naming: FhirNaming,
    *,
    meta: dict[str, Any] | None = None,
    now: float | None = None,
) -> bool:
    """Queue a reading's own bundle (outside any visit), keyed by its FHIR identifier: queued
    again (a relay or a release cut short), it is absorbed; False then."""
    return enqueue_bundle(
        outbox,
        observation_bundle(obs, naming),
        observation_key(obs, naming),
        patient_id=obs.patient_id,
        meta={"type": "observation", "record_key": obs.record_key, **(meta or {})},
        now=now,
    )


@dataclass
class FhirRoundResult:
    """What one round did; the forward service logs it, `lastmile queue` shows the last one."""

    claimed: int = 0
    sent: int = 0  # accepted by the platform (and so committed: FHIR has no later confirmation)
    transient: int = 0  # failed for now: backoff
    quarantined: int = 0
    deferred: int = 0  # released unsent (behind an earlier bundle of the patient, or the round stopped)
    requests: int = 0
    refused_everything: bool = False  # stopped by a second bundle refused for now: the next round does not split
    fault: str | None = None  # the platform refuses this gateway (token, TLS): nothing sent
    errors: list[str] = field(default_factory=list)
    # the keys of the bundles the platform took (the Sent page's records say so by key, no rescan);
    # not in the status row: up to a round's 200 keys rewritten each round on the SD card
    taken: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What the status row keeps of the round (`lastmile queue`, the next round's `unsplit`)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "taken"}


@dataclass
class _Round:
    outbox: Outbox
    sender: FhirSender
    now: float
    # the last round found the platform refusing everything: merged batches go unsplit, as before
    # splitting, and the first refusal stops this round too - until a batch goes
    unsplit: bool = False
    said: Said = Said.NOTHING
    retry_after: float | None = None  # the stopping answer's Retry-After
    counts: FhirRoundResult = field(default_factory=FhirRoundResult)
    blocked: set[str] = field(default_factory=set)

    @property
    def stop(self) -> bool:
        return self.said.stops

    def release(self, items: Sequence[OutboxItem], why: str, delay_s: float) -> None:
        if items:
            self.outbox.release([i.id for i in items], why, self.now, delay_s)
            self.counts.deferred += len(items)

    def send(self, batch: list[tuple[OutboxItem, bytes]]) -> list[tuple[OutboxItem, bytes]]:
        """Send a batch; returns what is left unsent when the round has to stop."""
        if len(batch) == 1:
            body = batch[0][1]
        else:
            body = bundle_bytes(merge_transactions([json.loads(p) for _, p in batch]))
        ids = [item.id for item, _ in batch]
        self.counts.requests += 1
        try:
            self.sender.post_transaction(body)
        except TransientError as exc:
            refused = not isinstance(exc, Unavailable)  # the platform answered
            if len(batch) > 1 and refused and not self.unsplit:
                return self.split(batch)  # maybe one bundle's, not its batch-mates'
            self.fail([item for item, _ in batch], exc, self._resend_after(exc))
            self.counts.errors.append(str(exc))
            self.said = self._after_failure(exc, refused=refused)
            self.retry_after = exc.retry_after
            return []
        except ConfigurationFault as exc:
            self.counts.fault = str(exc)
            self.said = Said.FAULT
            return batch
        except PermanentError as exc:
            self._heard()
            if len(batch) > 1:
                return self.split(batch)
            item = batch[0][0]
            self.outbox.quarantine(item.id, str(exc), self.now)
            self.counts.quarantined += 1
            self.counts.errors.append(str(exc))
            log.error("FHIR bundle %s quarantined: %s", item.key, exc)
            return []
        self._heard()
        try:
            # one transaction: a write lock refusing a second one left them "sent", never purged
            self.outbox.mark_taken(ids, self.now)
        except (sqlite3.Error, OSError):
            # the platform has them whatever kept us from recording it (another process's write
            # lock at a stop, a full disk): recorded taken later, by this process or the next
            # start - not sent again (harmless, conditional creates, but bytes on a metered link)
            self.outbox.remember_stored(ids, taken=True)
            raise
        self.counts.sent += len(batch)
        self.counts.taken.extend(item.key for item, _ in batch)
        return []

    def _heard(self) -> None:
        if self.said is Said.NOTHING:
            self.said = Said.ANSWERED

    def _after_failure(self, exc: TransientError, *, refused: bool) -> Said:
        if refused:  # one bundle refused for now: the others go on (a second: refuses all)
            return Said.REFUSES_ALL if self.unsplit or self.said is Said.REFUSED_ONE else Said.REFUSED_ONE
        # Unavailable is about the platform, not this bundle, even after it took others this round: no
        # answer (a bundle too big for a flaky 2G link), a gateway's 5xx, a 429 right after an outage
        return Said.DOWN if isinstance(exc, PlatformDown) else Said.BUSY

    def _resend_after(self, exc: TransientError) -> float | None:
        """At least how long before a failed batch goes again. One the platform got and did not
        answer in time (a read timeout, a dropped connection; not one never connected) it may still
        be applying: a copy sent after the short backoff piles up on it, each paid on a metered link
        - it gets the client's timeout again first."""
        if isinstance(exc, NoAnswer) and not isinstance(exc, NotConnected):
            return max(exc.retry_after or 0.0, self.sender.settings.timeout_s)
        return exc.retry_after

    def fail(self, items: Sequence[OutboxItem], exc: TransientError, retry_after: float | None = None) -> None:
        """Back to the queue with a backoff (at least `retry_after`, else the answer's Retry-After);
        the patients' later bundles wait for them."""
        for item in items:
            self.outbox.mark_transient_failure(item.id, str(exc), self.now, retry_after or exc.retry_after)
            self._block(item)
        self.counts.transient += len(items)

    def split(self, batch: list[tuple[OutboxItem, bytes]]) -> list[tuple[OutboxItem, bytes]]:
        """Send a refused merged batch in halves, until the bundle at fault is alone: one bundle
        the platform refuses must not hold the others, whether for ever (4xx) or for now (5xx)."""
        half = len(batch) // 2
        left = self.send(batch[:half])
        if self.stop:
            return left + batch[half:]
        return self.send(batch[half:])

    def _block(self, item: OutboxItem) -> None:
        patient = (item.patient or {}).get("patient_id")
        if patient:
            self.blocked.add(patient)


def forward_fhir_once(
    outbox: Outbox,
    sender: FhirSender,
    now: float,
    *,
    batch_size: int = 20,
    max_items: int = 200,
    config_fault_retry_s: float = 300.0,
    meter: Meter | None = None,
) -> FhirRoundResult:
    """One round: claim due bundles, send them merged in batches, settle each. With a `meter`,
    routine bundles wait while it is shut (outside its windows, the day's budget spent)."""
    shut = meter.blocked(now) if meter is not None else None
    items = outbox.claim(Kind.FHIR_BUNDLE, max_items, now, priority=Priority.STAT if shut else None)
    previous = (outbox.status(STATUS_NAME) or {}) if items else {}  # an idle round reads nothing
    rnd = _Round(outbox, sender, now, unsplit=bool((previous.get("last_round") or {}).get("refused_everything")))
    rnd.counts.claimed = len(items)
    # A patient's bundle still waiting out a backoff must not be overtaken by a later one.
    waiting: dict[str, OutboxItem] = {}
    if items:
        for queued in outbox.items(state=ItemState.QUEUED, kind=Kind.FHIR_BUNDLE):
            patient = (queued.patient or {}).get("patient_id")
            if patient and patient not in waiting:
                waiting[patient] = queued
    pending = []
    spent_before = sender.bytes_on_wire
    for item in items:
        earlier = waiting.get((item.patient or {}).get("patient_id") or "")
        if earlier is not None and (earlier.created_at, earlier.id) < (item.created_at, item.id):
            rnd.release(
                [item], "waiting for an earlier bundle of the same patient", max(0.0, earlier.next_attempt_at - now)
            )
        else:
            pending.append(item)
    while pending and not rnd.stop:
        if meter is not None:
            meter.spend(sender.bytes_on_wire - spent_before, now)
            spent_before = sender.bytes_on_wire
            routine = [i for i in pending if i.priority != Priority.STAT]
            shut = meter.blocked(now)
            if shut is not None and routine:
                rnd.release(routine, f"metered link: {shut.detail}", 0.0)
                pending = [i for i in pending if i.priority == Priority.STAT]
                continue
        batch: list[tuple[OutboxItem, bytes]] = []
        while pending and len(batch) < max(1, batch_size):
            item = pending.pop(0)
            patient = (item.patient or {}).get("patient_id")
            if patient and patient in rnd.blocked:
                rnd.release([item], "waiting for an earlier bundle of the same patient", 0.0)
                continue
            try:
                batch.append((item, outbox.read_payload(item, now)))
            except CorruptPayloadError as exc:  # the outbox quarantined it already
                rnd.counts.quarantined += 1
                rnd.counts.errors.append(str(exc))
            except TransientError as exc:  # not read now (e.g. out of file descriptors): this item later
                rnd.fail([item], exc)  # the patient's later bundles wait for it, as after a failed send
                rnd.counts.errors.append(str(exc))
        leftover = rnd.send(batch) if batch else []
        if rnd.stop:
            # what the stopped batch left unsent went only merged with the bundles refused alone, whose
            # refusal it was: released uncharged, and the next round sends it merged, unsplit (the
            # platform refusing everything gets one request per batch, not the split again)
            rest = [i for i, _ in leftover] + pending
            if rnd.counts.fault:
                rnd.release(rest, f"configuration fault: {rnd.counts.fault}", config_fault_retry_s)
            else:
                rnd.release(rest, "FHIR server unavailable; sent in a later round", rnd.retry_after or 0.0)
            pending = []
    if meter is not None:
        meter.spend(sender.bytes_on_wire - spent_before, now)
    rnd.counts.refused_everything = rnd.said is Said.REFUSES_ALL
    if rnd.counts.claimed:
        # only a round that did something: an idle one (every 2 s, all day) would rewrite and
        # fsync this row ~43,000 times a day on the SD card, and wipe the last fault it showed
        status: dict[str, Any] = {"last_round": rnd.counts.summary(), "at": now}
        # when a round last found the platform unavailable: uploader.fhir_link
        status[LAST_ERROR_AT] = recorded_failure(previous, now, unavailable=rnd.said.unavailable)
        # what it judged of the platform: the metrics exporter's link state, the console's System page
        status.update(recorded_judgement(previous, now, rnd.said, sent=bool(rnd.counts.sent)))
        outbox.record_status(STATUS_NAME, status, now)
    return rnd.counts
