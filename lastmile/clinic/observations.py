"""Observations (BP, temperature, SpO2 ...) from any device -> durable storage, once each.

An observation whose patient is known goes into the outbox (kind "observation", the JSON below
as payload, its record key as the idempotency key), from where the visits/FHIR uploader sends
it. One with no patient is *held* in clinic.db, unassigned, until the doctor assigns it
(`lastmile patient assign`): it is never guessed, and the uploader never sees it.

Which patient: the one the observation already names, else the current patient of the clinic
session - but only if the reading was measured after that patient's session began. A reading
from before (a cuff's memory sent late, the previous patient's reading delivered after the
switch) is held instead; that can cost the doctor an assignment, never a wrong record. So is a
record from a device's memory whose time is unknown (flag STORED_TIME_UNKNOWN: a meter whose
clock was reset): its receipt time says nothing about when, or on whom, it was taken. A reading
a multi-user device says is of its user N (`device_user`) is that user's, whoever is checked in:
it goes where the doctor mapped that user; unmapped, user 1 (what most cuffs always send) is the
checked-in patient's and any other user's is held (lastmile.clinic.device_users).

Duplicates: a record key already in the outbox or held is not stored again, whatever the
current patient, so a device re-sending its memory neither duplicates nor re-assigns anything.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import sqlite3
from dataclasses import dataclass, replace
from typing import Any

import sqlite_utils

from devices.identity import STORED_TIME_UNKNOWN, DeviceIdentity, TimeSource
from devices.observation import Observation, Quantity
from lastmile.clinic.db import from_iso, iso, open_clinic_db, transaction
from lastmile.clinic.device_users import DeviceUsers, UserMapping, mapped_name
from lastmile.clinic.patients import PatientContext
from uploader.outbox import AddResult, Outbox, Priority
from uploader.sqlite_store import WaitGivenUp

log = logging.getLogger(__name__)

OBSERVATION_KIND = "observation"
TOUCH_EVERY = dt.timedelta(seconds=5)
SCHEMA = "lastmile.observation/1"
# an outbox item's meta key: the multi-user device's user whose mapping gave the reading its patient
MAPPED_USER = "mapped_user"


def observation_to_json(obs: Observation) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "kind": obs.kind,
        "quantities": [
            {
                "code": q.code,
                "value": q.value,
                "unit": q.unit,
                "sent_value": q.sent_value,
                "sent_unit": q.sent_unit,
                "special": q.special,
            }
            for q in obs.quantities
        ],
        "measured_at": obs.measured_at.isoformat(),
        "time_source": obs.time_source.value,
        "received_at": obs.received_at.isoformat(),
        "device": {
            "manufacturer": obs.device.manufacturer,
            "model": obs.device.model,
            "serial": obs.device.serial,
            "address": obs.device.address,
            "software_version": obs.device.software_version,
        },
        "record_key": obs.record_key,
        "patient_id": obs.patient_id,
        "flags": list(obs.flags),
        # only when sent: a single-user device's payload stays as it always was
        **({} if obs.device_user is None else {"device_user": obs.device_user}),
        # only when stamped (a serial device's): other payloads stay as they always were
        **({"registry_address": obs.registry_address} if obs.registry_address else {}),
    }


def observation_from_json(data: dict[str, Any]) -> Observation:
    """The one observation codec's reader (clinic.db held readings, visits.db visit items).
    Visit items written before the codec was shared carry no "schema"; their fields are these."""
    if data.get("schema", SCHEMA) != SCHEMA:
        raise ValueError(f"not a {SCHEMA} document: {data.get('schema')!r}")
    return Observation(
        kind=data["kind"],
        quantities=tuple(
            Quantity(q["code"], q["value"], q["unit"], q["sent_value"], q["sent_unit"], q["special"])
            for q in data["quantities"]
        ),
        measured_at=dt.datetime.fromisoformat(data["measured_at"]),
        time_source=TimeSource(data["time_source"]),
        received_at=dt.datetime.fromisoformat(data["received_at"]),
        device=DeviceIdentity(**data["device"]),
        record_key=data["record_key"],
        patient_id=data.get("patient_id"),
        flags=tuple(data.get("flags", ())),
        device_user=data.get("device_user"),
        registry_address=data.get("registry_address", ""),
    )


def observation_payload(obs: Observation) -> bytes:
    return json.dumps(observation_to_json(obs), sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


SUMMARY_SEPARATOR = ", "  # between the values of a `summary` (a page splits them to say them its way)


# the most decimals a value in its unit is shown with (UCUM, and the units devices send): a
# cuff's mmHg are whole, a thermometer's °C has two at most; a unit not listed keeps three
UNIT_DECIMALS = {
    "mm[Hg]": 0,
    "mmHg": 0,
    "/min": 0,
    "bpm": 0,
    "mg/dL": 1,
    "%": 1,
    "Cel": 2,
    "[degF]": 2,
    "kg": 2,
    "[lb_av]": 2,
    "mmol/L": 2,
    "kPa": 2,
    "m": 2,
}


# beyond this a number is no reading but a damaged one (a BLE FLOAT's exponent up to 127): its
# digits past float's ~16 are noise the device never sent, so it is said as more than this
PLAIN_NUMBER_MAX = 10**12
# a value nearer 0 than its unit's decimals show ("0 kg" for 0.004 kg) keeps this many
# significant digits; one nearer 0 than PLAIN_NUMBER_MIN is said as less than it
TINY_SIGNIFICANT_DIGITS = 7
PLAIN_NUMBER_MIN = 1e-6


def plain_number(value: float, unit: str) -> str:
    """`value` as a doctor reads it: never in scientific notation ("{:g}" wrote 11360000 mmHg as
    1.136e+07), rounded to its unit's decimals, no trailing zeros (36.5, 120, not 36.50, 120.0).
    A huge one is "> 1000000000000" (not 134 digits of float noise); a non-zero one its decimals
    would round to 0 keeps its significant digits (0.004 kg, not 0 kg)."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= PLAIN_NUMBER_MAX:
        return f"{'>' if value > 0 else '<'} {'' if value > 0 else '-'}{PLAIN_NUMBER_MAX}"
    decimals = UNIT_DECIMALS.get(unit, 3)
    if value != 0 and round(value, decimals) == 0:
        if abs(value) < PLAIN_NUMBER_MIN:
            return f"{'<' if value > 0 else '>'} {'' if value > 0 else '-'}{PLAIN_NUMBER_MIN:.6f}"
        # the first significant digit's place, and the digits after it
        decimals = -math.floor(math.log10(abs(value))) + TINY_SIGNIFICANT_DIGITS - 1
    text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def summary(obs: Observation) -> str:
    """One line for `lastmile devices` and logs, e.g. "120/80 mm[Hg], pulse-rate 72 /min"."""

    def fmt(q: Quantity) -> str:
        if q.value is not None:
            return plain_number(q.value, q.unit)
        if q.special == "implausible" and q.sent_value is not None:  # what the device said, marked
            return f"({q.special}: {plain_number(q.sent_value, q.sent_unit)} {q.sent_unit})"
        return f"({q.special})"

    sys_, dia = obs.quantity("systolic"), obs.quantity("diastolic")
    parts = []
    rest = list(obs.quantities)
    if sys_ and dia:
        parts.append(f"{fmt(sys_)}/{fmt(dia)} {sys_.unit}")
        rest = [q for q in rest if q.code not in ("systolic", "diastolic", "mean-arterial-pressure")]
    parts += [f"{q.code} {fmt(q)} {q.unit}" for q in rest[:3]]
    return SUMMARY_SEPARATOR.join(parts)


def _session_start(since: dt.datetime, source: TimeSource) -> dt.datetime:
    """A session's start at the resolution of a reading's time stamp (device clocks: whole seconds)."""
    return since if source is TimeSource.GATEWAY_RECEIPT else since.replace(microsecond=0)


def measured_since(obs: Observation, since: dt.datetime) -> bool:
    """True when `obs` was measured at or after `since` (a session's start), as far as its time
    stamp can tell: a stored record whose time is unknown was measured at no known time."""
    return STORED_TIME_UNKNOWN not in obs.flags and obs.measured_at >= _session_start(since, obs.time_source)


def _after_mapping(obs: Observation, mapping: UserMapping) -> bool:
    """Whether `obs` was measured once its device user's mapping stood (as a session's readings
    are those measured after check-in)."""
    if mapping.set_at is None:
        return True  # the default user, mapped by nobody: the session rule below decides
    return measured_since(obs, mapping.set_at)


@dataclass(frozen=True, slots=True)
class StoreResult:
    outcome: str  # "stored" (in the outbox), "held" (unassigned), "duplicate" (already known)
    patient_id: str | None = None
    item_id: int | None = None  # outbox item
    held_id: int | None = None  # held_observations row


@dataclass(frozen=True, slots=True)
class HeldObservation:
    held_id: int
    observation: Observation
    held_at: dt.datetime


class UnknownObservationError(LookupError):
    pass


class ObservationStore:
    def __init__(self, outbox: Outbox, db: sqlite_utils.Database, context: PatientContext) -> None:
        self.outbox = outbox
        self.db = db
        self.context = context
        self.device_users = DeviceUsers(db)

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], *, outbox: Outbox, idle_timeout_s: float) -> ObservationStore:
        db = open_clinic_db(data_dir)
        return cls(outbox, db, PatientContext(db, idle_timeout_s))

    def close(self) -> None:
        """Closes clinic.db (the outbox belongs to the caller)."""
        self.db.conn.close()

    # -- storing ----------------------------------------------------------------------------
    def known(self, key: str) -> bool:
        if self.outbox.find(key) is not None:
            return True
        return self.db.conn.execute("SELECT 1 FROM held_observations WHERE key = ?", (key,)).fetchone() is not None

    def record(self, obs: Observation, *, now: dt.datetime) -> StoreResult:
        """Store `obs` durably (outbox or held) unless its record key is already known."""
        if self.known(obs.record_key):
            return StoreResult("duplicate")
        if obs.implausible:
            log.warning(
                "%s from %s: %s outside the plausible range; stored flagged, not as a value",
                obs.kind,
                obs.device.label(),
                ", ".join(q.code for q in obs.implausible),
            )
        patient_id, name = obs.patient_id, ""
        current = None
        mapped_user = None  # the device user whose mapping named the patient (Today says where it went)
        if patient_id is None and obs.device_user is not None:
            # One user's reading on a multi-user device: the checked-in patient may be another user.
            mapping = self.device_users.whose(obs.device.address, obs.device_user)
            if mapping is None:
                return self._hold(obs, now, f"device user {obs.device_user} is mapped to no patient")
            if not _after_mapping(obs, mapping):
                # A cuff's memory synced after a remap: this reading was the user's before it.
                return self._hold(obs, now, f"measured before device user {obs.device_user} was mapped")
            patient_id, name = mapping.patient_id, mapped_name(mapping, self.context, now)
            mapped_user = obs.device_user if patient_id is not None else None
        if patient_id is None and STORED_TIME_UNKNOWN in obs.flags:
            # Taken earlier, we cannot tell when: the current patient is a guess.
            return self._hold(obs, now, "a stored record whose time is unknown")
        if patient_id is None:
            current = self.context.current(now)
            # Device time stamps have whole seconds: compare at that resolution. The gateway's
            # receipt time is as fine as the session's start: a reading received just before
            # the next card was scanned, in the same second, stays off the new session.
            if current is not None and measured_since(obs, current.since):
                patient_id, name = current.patient_id, current.name
        if patient_id is None:
            return self._hold(obs, now, "no current patient" if current is None else "measured before the session")
        result = self._enqueue(replace(obs, patient_id=patient_id), name, now, mapped_user=mapped_user)
        # A reading is activity in the session; one write per TOUCH_EVERY is enough for that.
        if current is not None and now - current.last_activity >= TOUCH_EVERY:
            try:
                self.context.touch(now=now)
            except WaitGivenUp:  # the reading is stored: a stop does not make it "not stored"
                log.info("stopping: the session's activity not recorded (clinic.db locked by another process)")
        return StoreResult("stored" if result.created else "duplicate", patient_id, result.item.id)

    def _enqueue(
        self, obs: Observation, patient_name: str, now: dt.datetime, *, mapped_user: int | None = None
    ) -> AddResult:
        meta: dict[str, object] = {
            "kind": obs.kind,
            "device": obs.device.label(),
            "measured_at": obs.measured_at.isoformat(),
            "time_source": obs.time_source.value,
            "flags": list(obs.flags),
        }
        if mapped_user is not None:
            meta[MAPPED_USER] = mapped_user
        return self.outbox.add(
            OBSERVATION_KIND,
            obs.record_key,
            observation_payload(obs),
            priority=Priority.ROUTINE,
            meta=meta,
            patient={"patient_id": obs.patient_id, "name": patient_name},
            now=now.timestamp(),
        )

    def _hold(self, obs: Observation, now: dt.datetime, why: str) -> StoreResult:
        with transaction(self.db) as conn:
            cur = conn.execute(
                "INSERT INTO held_observations (key, kind, measured_at, device, observation, held_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO NOTHING",
                (
                    obs.record_key,
                    obs.kind,
                    iso(obs.measured_at),
                    obs.device.label(),
                    observation_payload(obs).decode(),
                    iso(now),
                ),
            )
            if cur.rowcount == 0:
                return StoreResult("duplicate")
            held_id = int(cur.lastrowid or 0)
        log.info("%s observation held unassigned (%s): #%d", obs.kind, why, held_id)
        return StoreResult("held", None, None, held_id)

    # -- unassigned observations ------------------------------------------------------------
    def held(self, limit: int = 200) -> list[HeldObservation]:
        """The newest `limit` held observations, oldest first: held ones never expire (never
        guessed, never dropped), so after months of them today's must still be among those listed."""
        rows = self.db.conn.execute(
            "SELECT * FROM (SELECT * FROM held_observations ORDER BY id DESC LIMIT ?) ORDER BY id", (limit,)
        ).fetchall()
        return [_held(r) for r in self._still_held(rows)]

    def get_held(self, held_id: int) -> HeldObservation | None:
        row = self.db.conn.execute("SELECT * FROM held_observations WHERE id = ?", (held_id,)).fetchone()
        return _held(row) if row and self._still_held([row]) else None

    def _still_held(self, rows: list[sqlite3.Row]) -> list[sqlite3.Row]:
        """The rows whose reading is not in the outbox. One that is was assigned by a process that
        died (power cut) between the outbox's commit and the held row's DELETE: it is on its way
        to the county for the patient it was given, so its held copy is forgotten now, not shown
        to the doctor as still waiting for a patient (and assignable to another one)."""
        in_outbox = self.outbox.present_keys([r["key"] for r in rows])  # one query for the whole page
        assigned = [r for r in rows if r["key"] in in_outbox]
        if assigned:
            with transaction(self.db) as conn:
                conn.executemany("DELETE FROM held_observations WHERE id = ?", [(r["id"],) for r in assigned])
            log.warning(
                "%d held observation(s) already in the outbox (an assignment was cut short): no longer held",
                len(assigned),
            )
        gone = {r["id"] for r in assigned}
        return [r for r in rows if r["id"] not in gone]

    def assign(
        self, held_id: int, patient_id: str, *, now: dt.datetime, name: str = "", correct_name: bool = False
    ) -> StoreResult:
        """Give a held observation its patient: it moves to the outbox (the doctor's decision).
        `correct_name`: `name` is right, the name the session knows for `patient_id` was wrong - it
        is corrected with the held copy's removal (one clinic.db transaction), once the
        assignment is made: one refused corrects nothing."""
        patient_id = patient_id.strip()
        if not patient_id:
            raise ValueError("a patient needs a non-empty identifier")
        held = self.get_held(held_id)
        if held is None:
            raise UnknownObservationError(f"no unassigned observation #{held_id}")
        # Outbox first, then forget the held copy: a crash in between leaves a held row whose
        # key is in the outbox, which `_still_held` removes at the next look.
        result = self._enqueue(replace(held.observation, patient_id=patient_id), name, now)
        given = (result.item.patient or {}).get("patient_id")
        # another process assigned it a moment ago (to someone else): this assignment was not made
        taken = not result.created and given != patient_id
        with transaction(self.db) as conn:
            conn.execute("DELETE FROM held_observations WHERE id = ?", (held_id,))
            if correct_name and not taken:
                self.context.correct_name_in(conn, patient_id, name, now=now)
        if taken:
            # say whose it is, never "assigned to" this one
            raise UnknownObservationError(f"observation #{held_id} was already assigned to {given}")
        log.info("observation #%d assigned (outbox item %d)", held_id, result.item.id)
        return StoreResult("stored", patient_id, result.item.id)

    def counts(self) -> dict[str, int]:
        held = self.db.conn.execute("SELECT COUNT(*) FROM held_observations").fetchone()[0]
        stored = len(self.outbox.items(kind=OBSERVATION_KIND))
        return {"stored": stored, "held": int(held)}


def _held(row: sqlite3.Row) -> HeldObservation:
    held_at = from_iso(row["held_at"])
    assert held_at is not None
    return HeldObservation(int(row["id"]), observation_from_json(json.loads(row["observation"])), held_at)
