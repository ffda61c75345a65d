"""Whose readings a multi-user device's users are: (device address, user index) -> patient.

A BP cuff or scale with user buttons keeps readings per user and says whose each one is
(Bluetooth "User ID"). Such a reading belongs to that user of the device, not to whoever is
checked in: user 2's reading put on the patient meant for user 1 is a value on the wrong
patient. A row here (`lastmile patient map-user`) says whose a user is: one patient (a
family's cuff), or "the checked-in patient".

Without a row, user 1 is the checked-in patient's: most cuffs send User ID 1 always (one
user, or user buttons nobody presses), and a village doctor has no CLI to say so. Any other
user (2, 3 ...) without a row is held, unassigned, showing its user: it is certainly not the
default user, so whoever is checked in is a guess. A row for user 1 overrides the default.
"Unknown user" (0xFF) claims no user at all: the decoder leaves it None, the reading follows
the checked-in patient like a single-user device's.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import sqlite_utils

from devices.ble.measurement import UNKNOWN_USER  # Bluetooth "unknown user": nobody's index (0xFF)
from devices.ble.uuids import BLOOD_PRESSURE, USER_DATA, WEIGHT_SCALE
from devices.identity import Patient
from lastmile.clinic.db import from_iso, iso, transaction
from lastmile.clinic.devices import DeviceRecord, is_bluetooth_address, normalise_address
from lastmile.clinic.names import same_person_name
from lastmile.clinic.patients import PatientContext

log = logging.getLogger(__name__)

DEFAULT_USER = 1  # the user a cuff without user buttons (or with one nobody presses) always sends
# a BP cuff as it is called: the name it was paired with (血压计 1 号), the one it advertises
# (BP7000, "Blood Pressure"), or its model; "bp" alone, not in "bpm" (a pulse)
CUFF_NAME = re.compile(r"血压|blood.?pressure|sphygmo|cuff|(?<![a-z])bp(?![a-z])", re.IGNORECASE)
# a reading's summary (lastmile.clinic.observations.summary) names millimetres of mercury for a pressure only
PRESSURE_UNIT = "mm[Hg]"
# services whose devices keep readings per user: a BP cuff's, a scale's, and the users' own (User Data)
MULTI_USER_SERVICES = frozenset({BLOOD_PRESSURE, WEIGHT_SCALE, USER_DATA})


@dataclass(frozen=True, slots=True)
class UserMapping:
    patient_id: str | None  # None: whoever is checked in when the reading is taken
    patient_name: str = ""
    set_at: dt.datetime | None = None  # when the doctor said so; None: the default, never said


CHECKED_IN = UserMapping(None)


def mapped_name(mapping: UserMapping, context: PatientContext, now: dt.datetime) -> str:
    """`mapped_names` of one mapping."""
    return mapped_names([mapping], context, now)[0]


def mapped_names(mappings: Sequence[UserMapping], context: PatientContext, now: dt.datetime) -> list[str]:
    """The name each mapped user's reading goes under: what the session knows for the ID
    (`PatientContext.known_names`, the owner), else the name stored with the mapping (a check-in
    older than NAME_KEPT, or one typed with `map-user --name` for a patient never checked in);
    "" for whoever is checked in. One question to the session for all of them."""
    known = context.known_names([m.patient_id for m in mappings if m.patient_id is not None], now)
    return ["" if m.patient_id is None else known.get(m.patient_id) or m.patient_name for m in mappings]


@dataclass(frozen=True, slots=True)
class DeviceUser:
    """One mapping the doctor made: user `user_id` of the device at `address` is `mapping`'s."""

    address: str
    user_id: int
    mapping: UserMapping


def may_have_users(device: DeviceRecord, mapped: Collection[str]) -> bool:
    """Whether a paired device can have users (buttons), so whose they are means something: one
    whose users were mapped already (`mapped`: their addresses), one that sent a reading naming
    its user (a scale's weight as a cuff's pressure), one the BLE link saw advertise or offer a
    multi-user service (Blood Pressure, Weight Scale, User Data: a cuff or scale named by its model
    number, "UA-651BLE", before its first reading), one that sent a blood-pressure reading, or
    one called a BP cuff. Pairing records an address and a name only (`lastmile ble pair`, the
    console's form): until the link has seen it, a thermometer or an oximeter is told apart by
    its name. A device nothing says has users gets no users' form."""
    if normalise_address(device.address) in mapped or device.sends_users or PRESSURE_UNIT in device.last_reading:
        return True
    if MULTI_USER_SERVICES.intersection(device.services):
        return True
    return any(CUFF_NAME.search(text) for text in (device.name, device.model))


class DeviceUsers:
    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    def _mapping(self, address: str, user_id: int) -> UserMapping | None:
        """Whose readings user `user_id` of the device at `address` are; None: nobody said."""
        row = self.db.conn.execute(
            "SELECT patient_id, patient_name, set_at FROM device_users WHERE address = ? AND user_id = ?",
            (normalise_address(address), user_id),
        ).fetchone()
        if row is None:
            return None
        return UserMapping(row["patient_id"], row["patient_name"], from_iso(row["set_at"]))

    def whose(self, address: str, user_id: int) -> UserMapping | None:
        """Where a reading of user `user_id` of this device goes: its mapping, else the checked-in
        patient for the default user; None: held (nobody said whose this user is)."""
        mapping = self._mapping(address, user_id)
        if mapping is None and user_id == DEFAULT_USER:
            return CHECKED_IN
        return mapping

    def mappings(self) -> list[DeviceUser]:
        """Every mapping the doctor made, by device and user."""
        rows = self.db.conn.execute(
            "SELECT address, user_id, patient_id, patient_name, set_at FROM device_users ORDER BY address, user_id"
        ).fetchall()
        return [
            DeviceUser(
                r["address"], r["user_id"], UserMapping(r["patient_id"], r["patient_name"], from_iso(r["set_at"]))
            )
            for r in rows
        ]

    def mapped_otherwise(self, patient_id: str, name: str) -> list[DeviceUser]:
        """The users mapped to `patient_id` under another person's name than `name`
        (`same_person_name`; a mapping kept without a name names nobody): checked in as `name`,
        their readings would go to the county under it, unasked - one of the two names is wrong,
        and only the doctor knows which. None (empty) for a check-in typed without a name."""
        if not name.strip():
            return []
        return [
            user
            for user in self.mappings()
            if user.mapping.patient_id == patient_id.strip()
            and user.mapping.patient_name
            and not same_person_name(user.mapping.patient_name, name)
        ]

    def map_patient(
        self,
        address: str,
        user_id: int,
        patient: Patient | None,
        *,
        context: PatientContext,
        now: dt.datetime,
        correct_name: bool = False,
    ) -> Patient | None:
        """`lastmile patient map-user` and the console's form: user `user_id` of the Bluetooth device
        at `address` is `patient` (checked by `clinic_patient`, the one patient-ID rule) from now
        on; None: whoever is checked in. A patient given without a name is named as check-in
        named it; one given with another name than check-in's is refused (NameConflict), unless
        `correct_name` says the check-in's was wrong (`PatientContext.given_name`): corrected in the
        mapping's transaction, so a mapping refused corrects nothing (`context` on this clinic.db).
        Returns the patient as mapped. ValueError: not a Bluetooth address, or no such user."""
        if not is_bluetooth_address(address):
            raise ValueError(f"{address!r} is not a Bluetooth address (like C0:26:DA:01:02:03)")
        if patient is not None:
            patient = context.given_name(patient, now, correct=correct_name)
        if patient is None:
            self.map_user(address, user_id, None, now=now)
        else:
            corrects = context if correct_name else None
            self.map_user(address, user_id, patient.patient_id, now=now, name=patient.name, correcting=corrects)
        return patient

    def map_user(
        self,
        address: str,
        user_id: int,
        patient_id: str | None,
        *,
        now: dt.datetime,
        name: str = "",
        correcting: PatientContext | None = None,
    ) -> None:
        """From now on, readings of user `user_id` of this device are `patient_id`'s (None: the
        checked-in patient's, as for a single-user device). `correcting`: `name` is right, the name
        that session (on this clinic.db) knows for `patient_id` is corrected in the same transaction."""
        if patient_id is not None and not patient_id.strip():
            raise ValueError("a patient needs a non-empty identifier")
        if not 0 <= user_id < UNKNOWN_USER:
            raise ValueError(f"a device user is 0-254, not {user_id}")
        with transaction(self.db) as conn:
            conn.execute(
                "INSERT INTO device_users (address, user_id, patient_id, patient_name, set_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(address, user_id) DO UPDATE SET patient_id = excluded.patient_id, "
                "patient_name = excluded.patient_name, set_at = excluded.set_at",
                (normalise_address(address), user_id, patient_id and patient_id.strip(), name, iso(now)),
            )
            if correcting is not None and patient_id is not None:
                correcting.correct_name_in(conn, patient_id.strip(), name, now=now)
        log.info(
            "device %s user %d mapped to %s",
            normalise_address(address),
            user_id,
            "the checked-in patient" if patient_id is None else "a patient",
        )

    def unmap_user(self, address: str, user_id: int) -> bool:
        with transaction(self.db) as conn:
            cur = conn.execute(
                "DELETE FROM device_users WHERE address = ? AND user_id = ?", (normalise_address(address), user_id)
            )
        return cur.rowcount > 0
