"""ECGs held for the doctor in the outbox, and the doctor's decisions that need no DICOM rebuild.

Listing the held ECGs, "send anyway" (release) and "recorded again" (discard) touch only the
outbox, so they live apart from `lastmile.ecg.intake` (which builds DICOM objects with pydicom):
the console process (64 MB budget) uses them without loading pydicom. Assigning a patient
rebuilds the object: `lastmile.ecg.intake.assign_held_ecg`.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the metrics exporter reads the rule below by SQL, without loading uploader.outbox
    from uploader.outbox import Outbox, OutboxItem

log = logging.getLogger(__name__)

PATIENT_MISMATCH = "patient-mismatch"
UNASSIGNED_HOLD = "unassigned"
QUALITY_HOLD = "re-record"  # the quality gate's verdict: the doctor may record again, or send anyway
# the file names the checked-in patient's ID under another person's name (`same_person_name`):
# whose ECG it is, only the doctor knows - STAT ones too (`lastmile.ecg.intake.name_hold_s`)
NAME_MISMATCH = "name-mismatch"
# the file's sex or birth date is not what its resident ID says (the cart kept the previous
# patient's, or the ID was mistyped): held as one held for its name, the doctor says which is right
ID_CONFLICT = "patient-id-conflict"
ID_CONFLICT_FLAGS = (f"{ID_CONFLICT}:sex", f"{ID_CONFLICT}:birth-date")  # `vetted_patient`'s, in the object too
DOCTOR_HOLDS = (UNASSIGNED_HOLD, PATIENT_MISMATCH, QUALITY_HOLD, NAME_MISMATCH, ID_CONFLICT)
LAN_SOURCE_FORMAT = "dicom-lan"
ASSIGNED_BY_DOCTOR = "patient-assigned-by-doctor"  # an item's flag: the doctor gave it its patient
RE_RECORDED = "recorded again at the gateway: the doctor kept this ECG from being sent"  # its quarantine reason
# a cart's object the doctor's answer could not be written into (`DamagedEcgError`): its quarantine reason
DAMAGED = "damaged: the cart's file could not be changed to the patient the doctor gave; set aside, not sent"


# An item held for the doctor at the first parameter (now), then DOCTOR_HOLDS: 1 or 0, never NULL
# (an item with no hold has hold_until NULL). The one rule of every place that says how many ECGs
# wait to be sent, or for how long (the Sent and System pages, `lastmile doctor`, `lastmile queue`,
# the metrics): those held wait for the doctor, not for the link.
_HELD_FOR_DOCTOR = (
    f"IFNULL(state = 'queued' AND hold_until > ? AND hold_reason IN ({','.join('?' * len(DOCTOR_HOLDS))}), 0)"
)
WAITING: tuple[str, Sequence[Any]] = ("state IN ('queued', 'sending')", ())  # not yet accepted by the peer


def held_for_doctor(now: float) -> tuple[str, tuple[Any, ...]]:
    """The rule above as a condition on `items` and its parameters, at `now`: for the outbox's
    own queries that leave those items out (`Outbox.oldest_waiting_item(leaving_out=...)`;
    uploader knows no hold of the doctor's)."""
    return _HELD_FOR_DOCTOR, (now, *DOCTOR_HOLDS)


@dataclass(frozen=True, slots=True)
class EcgsWaiting:
    """The ECGs not sent yet: those waiting for the link, and those held for the doctor."""

    waiting: int  # queued or on the wire for the reading center: not those held for the doctor
    oldest: float | None  # when the oldest of those was queued (epoch seconds); None: none waits
    held_for_doctor: int  # waiting for the doctor's decision (Today, `lastmile patient show`)


def ecgs_waiting(conn: sqlite3.Connection, now: float) -> EcgsWaiting:
    """How many ECGs the outbox (`conn`: outbox.sqlite, read in one statement) holds for the
    reading center, and since when the oldest has waited; and how many are held for the doctor
    instead. The outbox's own counts are of every kind: readings waiting for the health platform
    are not studies waiting for the reading center."""
    sql = (
        "SELECT COUNT(*) FILTER (WHERE NOT held), MIN(created_at) FILTER (WHERE NOT held), SUM(held) "
        f"FROM (SELECT created_at, {_HELD_FOR_DOCTOR} AS held FROM items "
        "WHERE kind = ? AND state IN ('queued', 'sending'))"
    )
    count, oldest, held = conn.execute(sql, (now, *DOCTOR_HOLDS, "dicom")).fetchone()  # Kind.DICOM
    return EcgsWaiting(int(count), None if oldest is None else float(oldest), int(held or 0))


def oldest_waiting(
    conn: sqlite3.Connection, now: float, waiting: tuple[str, Sequence[Any]] = WAITING
) -> dict[str, float]:
    """Per outbox kind, when the oldest item waiting for its link was queued (epoch seconds): of
    the items `waiting` takes (a condition on `items` and its parameters; by default those queued
    or on the wire), not those held for the doctor. `conn`: outbox.sqlite, read in one statement
    (the outbox's, or a read-only one: the metrics exporter, `lastmile queue` on a full disk)."""
    where, params = waiting
    held, held_params = held_for_doctor(now)
    sql = f"SELECT kind, MIN(created_at) FROM items WHERE ({where}) AND NOT {held} GROUP BY kind"
    return {kind: float(created) for kind, created in conn.execute(sql, (*params, *held_params))}


def oldest_wait_s(conn: sqlite3.Connection, now: float) -> float | None:
    """How long the oldest item of any kind has waited for its link (`oldest_waiting`); None: none
    waits. Never negative (a clock set back)."""
    oldest = oldest_waiting(conn, now)
    return None if not oldest else max(0.0, now - min(oldest.values()))


class HeldEcgError(LookupError):
    """The ECG cannot be assigned (unknown, not an ECG, or already sent); the message says why."""


class DamagedEcgError(HeldEcgError):
    """A cart's ECG the doctor's answer cannot be written into: its file is damaged (cut short, an
    element pydicom cannot read or write back). It was set aside (quarantined, DAMAGED), not sent:
    under the patient the cart wrote, it would go as the one the doctor just said it is not; he
    records it again for the right patient."""


def held_ecgs(outbox: Outbox, now: float) -> list[OutboxItem]:
    """ECGs waiting for the doctor (unassigned, naming another patient or another name, or to be
    recorded again): STAT ones first (an urgent read waits on the doctor's answer), then oldest
    first."""
    from uploader.outbox import Kind

    held = [item for item in outbox.held_items(now, kind=Kind.DICOM) if item.hold_reason in DOCTOR_HOLDS]
    return sorted(held, key=lambda item: not item.meta.get("stat"))  # stable: oldest first within each


def held_ecg(outbox: Outbox, item_id: int, now: float) -> OutboxItem:
    """The ECG `item_id` if it is held now; HeldEcgError otherwise."""
    from uploader.outbox import Kind

    item = outbox.get(item_id)
    if item is None or item.kind != Kind.DICOM or not item.held(now):
        raise HeldEcgError(f"no ECG E{item_id} is held at this gateway (see 'lastmile patient show')")
    return item


def re_recorded(item: OutboxItem) -> bool:
    """The doctor's "recorded again" kept `item` back (`discard_held_ecg`): it is not sent."""
    from uploader.outbox import ItemState

    return item.state == ItemState.QUARANTINED and (item.quarantine_reason or "").startswith(RE_RECORDED)


def set_aside_damaged(item: OutboxItem) -> bool:
    """`item` is a cart's ECG set aside because the doctor's answer could not be written into its
    damaged file (`DamagedEcgError`): kept here, not sent, not refused by the county."""
    from uploader.outbox import ItemState

    return item.state == ItemState.QUARANTINED and (item.quarantine_reason or "").startswith(DAMAGED)


def release_held_ecg(outbox: Outbox, item_id: int, now: float, *, by: str = "") -> OutboxItem:
    """The doctor's "send anyway": a held ECG goes now, as it is (its problems marked in it).
    A patient still to settle stays: an ECG with no patient goes under a placeholder only when
    its hold runs out, or at once if the doctor releases it knowingly."""
    item = held_ecg(outbox, item_id, now)
    if not outbox.release_hold(item_id, now):
        raise HeldEcgError(f"ECG E{item_id} was taken for sending meanwhile")
    log.info("held ECG E%d (%s) released for sending%s", item_id, item.hold_reason, f" by {by}" if by else "")
    released = outbox.get(item_id)
    assert released is not None
    return released


def discard_held_ecg(outbox: Outbox, item_id: int, now: float, *, by: str = "", why: str = RE_RECORDED) -> OutboxItem:
    """The doctor recorded again (`why`: another reason it is set aside): this one is never sent.
    It is kept, quarantined with the reason (`lastmile retry E<n>` would still send it), never
    deleted: it is patient data."""
    item = held_ecg(outbox, item_id, now)
    reason = why + (f" ({by})" if by else "")
    outbox.quarantine(item_id, reason, now)
    log.info("held ECG E%d (%s) discarded: %s", item_id, item.hold_reason, why)
    discarded = outbox.get(item_id)
    assert discarded is not None
    return discarded
