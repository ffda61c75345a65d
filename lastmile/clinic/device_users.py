"""Whose readings a multi-user device's users are: (device address, user index) -> patient.

A BP cuff or scale with user buttons keeps readings per user and says whose each one is
(Bluetooth "User ID"). Such a reading belongs to that user of the device, not to whoever is
checked in: user 2's reading put on the patient meant for user 1 is a value on the wrong
patient. So it gets a patient only through a row here, set by the doctor (`lastmile patient
map-user`): either one patient (a family's cuff), or "the checked-in patient" for the user the
clinic measures everyone as. Without a row it is held, unassigned, showing its user.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import sqlite_utils

from lastmile.clinic.db import iso, transaction
from lastmile.clinic.devices import normalise_address

log = logging.getLogger(__name__)

UNKNOWN_USER = 255  # Bluetooth "unknown user": nobody's index


@dataclass(frozen=True, slots=True)
class UserMapping:
    patient_id: str | None  # None: whoever is checked in when the reading is taken
    patient_name: str = ""


class DeviceUsers:
    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    def mapping(self, address: str, user_id: int) -> UserMapping | None:
        """Whose readings user `user_id` of the device at `address` are; None: nobody said."""
        row = self.db.conn.execute(
            "SELECT patient_id, patient_name FROM device_users WHERE address = ? AND user_id = ?",
            (normalise_address(address), user_id),
        ).fetchone()
        return None if row is None else UserMapping(row["patient_id"], row["patient_name"])

    def map_user(self, address: str, user_id: int, patient_id: str | None, *, now: dt.datetime, name: str = "") -> None:
        """From now on, readings of user `user_id` of this device are `patient_id`'s (None: the
        checked-in patient's, as for a single-user device)."""
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
