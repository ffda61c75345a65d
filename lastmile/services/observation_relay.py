"""Readings recorded for a known patient go on to the county platform as FHIR bundles.

The clinic keeps each reading as an outbox item of kind "observation" (its JSON record: what
the console shows, what `patient assign` moves). Nothing sends that kind itself: the forward
service turns each into a FHIR transaction bundle (kind "fhir-bundle", keyed by the reading's
FHIR identifier), which the FHIR forwarder sends, and then marks the reading done.

Crash-safe in any order: the bundle is queued (durable) before the reading is marked, and the
bundle's key is derived from the reading, so a relay cut short queues nothing twice; the
platform's conditional create on the same identifier makes a visit bundle carrying the same
reading store it once too. A reading taken during an open home visit of its patient is linked to
that visit instead (`visit_link`): the visit's bundle carries it with its Encounter, and it is
not sent on its own first. A reading a visit released (`_released_by_visit`) goes on its own,
read as visits.db holds it now.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable

from devices.observation import Observation
from lastmile.clinic.observations import OBSERVATION_KIND, observation_from_json
from lastmile.data_dir import DataDirError
from lastmile.visits.record import quarantined_reading_reason
from lastmile.visits.relay_link import released_record
from uploader.errors import CorruptPayloadError, OutboxFullError, TransientError
from uploader.fhir_bundle import FhirNaming
from uploader.fhir_forwarder import enqueue_observation
from uploader.outbox import ItemState, Outbox, OutboxItem, gave_up_at_stop

log = logging.getLogger(__name__)

RELAY_BATCH = 50
RELAY_RETRY_S = 60.0  # a reading put back by a passing fault waits this long before the next try

# What a stored reading that cannot be decoded or made a bundle raises: quarantined, it never will.
# (InvalidObjectError, JSON and Unicode decode errors are ValueErrors.)
DATA_ERRORS: tuple[type[Exception], ...] = (ValueError, KeyError, TypeError)
# What passes with time and is no fault of the reading: the data partition full, a database busy,
# the file system refusing for now.
PASSING_FAULTS: tuple[type[Exception], ...] = (OutboxFullError, TransientError, sqlite3.Error, OSError, DataDirError)


VisitLink = Callable[[Observation, str], "str | None"]  # (reading, its outbox key) -> the visit it joined
# a reading relayed: its item, the reading, the home visit whose bundle carries it (None: its own bundle)
Relayed = tuple[OutboxItem, Observation, "str | None"]
# (the readings relayed, when) -> their sent-reading records written (lastmile.reports.sent_readings)
RecordRelayed = Callable[[list[Relayed], float], None]


def relay_observations(
    outbox: Outbox,
    naming: FhirNaming,
    now: float,
    *,
    limit: int = RELAY_BATCH,
    visit_link: VisitLink | None = None,
    record: RecordRelayed | None = None,
) -> int:
    """Queue a FHIR bundle for each waiting reading (up to `limit`), or link it to the open visit
    it was taken during; returns how many were relayed either way. `record` writes what the Sent
    page shows of them once the outbox has purged them, before they are marked sent."""
    # Every forward round calls this: a read first, so an idle round takes no write lock.
    if not outbox.items(kind=OBSERVATION_KIND, state=ItemState.QUEUED, limit=1):
        return 0
    claimed = outbox.claim(OBSERVATION_KIND, limit, now)
    done: list[Relayed] = []
    for n, item in enumerate(claimed):
        obs: Observation | None = None
        released: tuple[int, str] | None = None
        try:
            released = _released_by_visit(item)
            obs = _reading(outbox, item, now, released)
            # a reading a visit released goes on its own, never into another (open) visit
            visit_id = visit_link(obs, item.key) if visit_link is not None and released is None else None
            if visit_id is not None:
                log.info("reading #%d goes with home visit %s", item.id, visit_id)
                done.append((item, obs, visit_id))
                continue
            enqueue_observation(outbox, obs, naming, meta={"reading_item": item.id}, now=now)
        except CorruptPayloadError as exc:  # the outbox quarantined it already
            log.error("reading #%d cannot be sent to the county platform: %s", item.id, exc)
            continue
        except PASSING_FAULTS as exc:
            # Not the reading's fault (a full disk, visits.db busy): it and the rest of this round
            # go back to the queue, uncharged, for a later round.
            rest = [i.id for i in claimed[n:]]
            if gave_up_at_stop(exc):  # the stop's (visits.db locked by another process): the next start's
                log.info("stopping: %d reading(s) relayed at the next start", len(rest))
                outbox.release(rest, "relay to the county platform cut short by a stop", now, 0.0)
                break
            log.warning("relaying readings paused (%d put back for %g s): %s", len(rest), RELAY_RETRY_S, exc)
            outbox.release(rest, f"relay to the county platform paused: {exc}", now, RELAY_RETRY_S)
            break
        except DATA_ERRORS as exc:  # this reading can never be made a bundle; the others go on
            log.error("reading #%d cannot be sent to the county platform: %s", item.id, exc)
            outbox.quarantine(item.id, _quarantine_reason(item, released, exc, decoded=obs is not None), now)
            continue
        except Exception as exc:  # a bug met on one record never stops the others
            log.exception("reading #%d: unexpected error relaying it to the county platform", item.id)
            outbox.quarantine(item.id, f"unexpected error making it a FHIR bundle: {type(exc).__name__}: {exc}", now)
            continue
        done.append((item, obs, None))
    if done:
        ids = [item.id for item, _obs, _visit in done]
        retry_in = _record(record, done, now) if record is not None else None
        if retry_in is not None:
            outbox.release(ids, "relayed; its Sent page record not written yet (clinic.db)", now, retry_in)
            return len(done)
        outbox.mark_taken(ids, now)  # durable, one transaction: the bundle carries the reading from here
        log.info("%d reading(s) queued for the county platform", len(done))
    return len(done)


def _record(record: RecordRelayed, done: list[Relayed], now: float) -> float | None:
    """Written before the readings are marked sent: a relay cut short between the two records
    them again (absorbed), never marks them sent unrecorded. A record clinic.db refuses does not
    hold the readings back - their bundles are queued (or their visit's carries them) and go - but
    their items are put back, unmarked, as a relay cut short: marked sent unrecorded, the Sent page
    said 已发送 before the platform took them, and lost them at the purge. None: written; else
    in how many seconds they are relayed again (at once after a stop: the next start's first round)."""
    try:
        record(done, now)
        return None
    except Exception as exc:  # a record (clinic.db busy or full, a bug) must never stop the readings
        if gave_up_at_stop(exc):  # the stop's (another process held clinic.db's lock), no fault
            log.info("stopping: %d reading(s) relayed, their sent record written at the next start", len(done))
            return 0.0
        log.exception(
            "%d reading(s) relayed without their sent record: written at a later round (in %g s)",
            len(done),
            RELAY_RETRY_S,
        )
        return RELAY_RETRY_S


def _released_by_visit(item: OutboxItem) -> tuple[int, str] | None:
    """(visit item, visit) of a reading a home visit released, quarantined on its own as
    VisitBook._quarantine_reading adds it (its meta names both); None for any other reading."""
    visit_item, visit_id = item.meta.get("visit_item"), item.meta.get("visit_id")
    if visit_item is None or visit_id is None:
        return None
    return int(visit_item), str(visit_id)


def _reading(outbox: Outbox, item: OutboxItem, now: float, released: tuple[int, str] | None) -> Observation:
    """The stored reading (ValueError if it is not one a bundle can be made of). One a home visit
    `released` (quarantined, its record damaged on the SD card) is read as visits.db holds it now:
    restored there from a backup and retried (`lastmile retry`), it goes; the outbox's payload
    is a copy of the damaged bytes, and stays damaged."""
    if released is not None:
        record: str | bytes = released_record(outbox.data_dir, *released)
    else:
        record = outbox.read_payload(item, now)
    data = json.loads(record)
    if not isinstance(data, dict):
        raise ValueError(f"the stored record is a JSON {type(data).__name__}, not a reading")
    obs = observation_from_json(data)
    if obs.patient_id is None:  # held readings never reach the outbox; be sure
        raise ValueError("the reading names no patient")
    return obs


def _quarantine_reason(item: OutboxItem, released: tuple[int, str] | None, exc: Exception, *, decoded: bool) -> str:
    """Why a reading is quarantined: one a home visit `released` (retried) in the visit's words,
    as the book first quarantined it (the visit, "measure the patient again", `lastmile retry N`
    for a damaged record)."""
    if released is None:
        return f"cannot be made a FHIR bundle: {exc}"
    return quarantined_reading_reason(released[1], item.id, exc, decoded=decoded)
