"""Every device the clinic knows (BLE now, serial later): allow-list, identity and status.

`lastmile ble pair ADDRESS` puts a BLE device on the allow-list; the acquire service connects
only to those, and reports here whether each is connected, its last reading and its last
error, for `lastmile devices`. Rows live in clinic.db.

A device taken away (unpaired; a serial entry, or a bridge's `forward_profile`, no longer in the
configuration) keeps its row: its last reading and error are its history, and it comes back as
it was if added again. It is listed `removed`, never as a current device or a current fault.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, fields

import sqlite_utils

from devices.ble.battery import LOW_BATTERY_PERCENT
from devices.device_errors import DeviceProblem
from devices.identity import DeviceIdentity
from lastmile.clinic.db import from_iso, iso, open_clinic_db, transaction
from lastmile.config import Config


class HeldReadings(enum.StrEnum):
    """Where the readings waiting for space are (the full outbox refused them): a status of its
    own, never the row's error, so a later error (unplugged ...) neither hides it nor is cleared
    when they are stored."""

    NONE = ""
    DISK = "disk"  # in the spill file (lastmile.services.serial_spill)
    MEMORY = "memory"  # lost if the power fails: `lastmile doctor` FAILs


# How a device row's waiting words (DeviceRecord.waiting) say where its waiting readings are, for
# people: readers go by the row's own status (HeldReadings), never by these words
KEPT_ON_DISK = "kept on disk"
MEMORY_ONLY = "held in memory only: lost if the power fails"
# The held cause of readings whose store the gateway's stop gave up (another process held the
# outbox's lock): no fault and not space - the next start stores them (from the spill file)
HELD_AT_STOP = "the gateway was stopping: stored at its next start"

# How long `lastmile doctor` (and the System page) FAILs for what a stop lost from memory, from the
# restart that found it: nothing can bring it back and no one acknowledges it, so it ends by
# itself, as sent ECGs that could not be recorded do (reports.window_days); a week, so that a
# doctor who looks on any day of it sees it.
LOST_SAID_FOR = dt.timedelta(days=7)
# how long a device's fresh error is said on Today, where the doctor measures: a card refused, a
# report unreadable, while he still waits for it (the Devices page keeps saying it after)
PROBLEM_SAID_ON_TODAY_FOR = dt.timedelta(minutes=10)
# What a scanner read, on a row's card not checked in at a stop (DeviceRecord.card_kind)
CARD_PATIENT = "patient"
CARD_DOCTOR = "doctor"


def end_card_notices(conn: sqlite3.Connection, kind: str | None, *, card_on: tuple[str, str] | None = None) -> None:
    """Inside clinic.db's write transaction of a check-in of `kind` (CARD_PATIENT, CARD_DOCTOR;
    None: both, the session's end): the cards of that kind a stop did not check in are said no more;
    `card_on` (address, card ID): only that card on that scanner's row (scanned again: done).
    The notice warns that the previous patient (doctor) may still be current; once another check-in
    (typed or scanned) or the session's end changed that, it would only tempt the doctor to scan
    the old card to clear it - making that patient current over the real one. Every notice of the
    kind, not only those scanned before `now`: the Pi's clock may be behind after the restart, and
    the notice is written at the start, before any check-in this clears. Its record's id stays (a
    start reading it again skips it)."""
    which, args = ["card_kind IS NOT NULL"], []
    if kind is not None:
        which.append("card_kind = ?")
        args.append(kind)
    if card_on is not None:
        which.append("address = ? AND card_id = ?")
        args.extend(card_on)
    conn.execute(
        "UPDATE devices SET card_kind = NULL, card_id = NULL, card_scanned_at = NULL, card_time_source = NULL, "
        f"card_found_at = NULL WHERE {' AND '.join(which)}",
        args,
    )


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    address: str
    transport: str
    name: str
    allowed: bool
    pair_required: bool
    added_at: dt.datetime | None
    manufacturer: str
    model: str
    serial: str
    software_version: str
    connected: bool
    last_seen_at: dt.datetime | None
    last_connected_at: dt.datetime | None
    last_reading_at: dt.datetime | None
    last_reading: str
    last_error: str
    last_error_at: dt.datetime | None
    last_sequence: int | None
    removed: bool = False  # unpaired, or no longer configured: history, not a current device
    held_readings: HeldReadings = HeldReadings.NONE  # until they are stored, whatever its later errors
    held_reading_count: int = 0  # what waits there: readings (an ASCII monitor's) ...
    held_ecg_count: int = 0  # ... and streamed ECGs (a bridge's)
    memory_reading_count: int = 0  # of those, held in memory only (the spill file keeps the rest) ...
    memory_ecg_count: int = 0  # ... (0, 0 with held_readings MEMORY: all of them)
    lost_reading_count: int = 0  # what a stop lost of what was held: readings ...
    lost_ecg_count: int = 0  # ... and streamed ECGs
    # of those, kept on disk but not given back by a missing or damaged spill file (the rest was
    # held in memory only): readings, streamed ECGs, and the file (its damage, its .bad copy)
    lost_disk_reading_count: int = 0
    lost_disk_ecg_count: int = 0
    lost_damage: str = ""
    held_at: dt.datetime | None = None  # when its held status was last written
    lost_after: dt.datetime | None = None  # the row's last word on them before the stop
    lost_at: dt.datetime | None = None  # the restart that found them gone (LOST_SAID_FOR from then)
    # why what waits was not stored at its last try, when not space (its "cannot store" error then:
    # locked, damaged ...), kept whatever later errors say; "" (space, or nothing waits)
    held_cause: str = ""
    # why they waited, when not space: the row's `held_cause` then ("": space); of stops' losses
    # said at once, each cause other than space, once (`lost_causes`)
    lost_cause: str = ""
    # the newest generation of the readings' and the ECGs' spill files when the held status was
    # written (None: unknown, or no spill file): a whole copy saved after it holds all that waited
    held_spill_generations: tuple[int | None, int | None] = (None, None)
    # the id of the last stop's word (lastmile.services.serial_spill.RowBehind) whose loss this row counted
    lost_word_id: str = ""
    # a card (badge) this scanner read as the gateway stopped, whose check-in the stop gave up and the
    # restart did not find done (`card_not_checked_in`): CARD_PATIENT or CARD_DOCTOR ("": none), the
    # ID scanned, when (the gateway's clock: `card_time_source`), and the restart that found it
    card_kind: str = ""
    card_id: str = ""
    card_scanned_at: dt.datetime | None = None
    card_time_source: str = ""
    card_found_at: dt.datetime | None = None
    card_word_id: str = ""  # the id of the stop's record said (a start reading it again skips it)
    # when the gateway stored its last reading (its own clock; last_reading_at is the device's)
    reading_received_at: dt.datetime | None = None
    services: tuple[int, ...] = ()  # SIG services (16-bit UUIDs) the BLE link saw it advertise or offer
    sends_users: bool = False  # it sent a reading naming its user (a multi-user device)
    advertised_name: str = ""  # what a BLE device calls itself (`name`: the one given at pairing, else this)
    battery_level: int | None = None  # percent, the last a BLE device reported (None: never read)
    battery_at: dt.datetime | None = None  # when it was read
    # the kind of its `last_error`, as its writer said (never read from the error's words), for
    # what to tell the doctor; OTHER when there is none
    problem: DeviceProblem = DeviceProblem.OTHER

    @property
    def waits_for_space(self) -> bool:
        """Readings (streamed ECGs) the full outbox refused wait, on disk or in memory only."""
        return self.held_readings is not HeldReadings.NONE

    @property
    def held_at_stop(self) -> bool:
        """What waits is held because the gateway's stop gave its store up: stored at the next start."""
        return self.held_cause == HELD_AT_STOP

    @property
    def lost_at_stop(self) -> bool:
        """What a stop lost was held only for that stop (no fault, no want of space): nothing to
        repair, the doctor measures again."""
        return self.lost_cause == HELD_AT_STOP

    @property
    def held_in_memory_only(self) -> bool:
        """What waits for space is lost if the power fails: `lastmile doctor` FAILs."""
        return self.held_readings is HeldReadings.MEMORY

    @property
    def held_words(self) -> str:
        """What waits for space, for people ("3 reading(s), 2 ECG(s)"; "readings" for a row held
        before the counts were kept)."""
        return held_words(self.held_reading_count, self.held_ecg_count) or "readings"

    @property
    def in_memory_only(self) -> tuple[int, int]:
        """How many readings and streamed ECGs of what waits are held in memory only, lost if the
        power fails (with held_readings MEMORY; all that waits unless the spill file keeps some)."""
        counts = (self.memory_reading_count, self.memory_ecg_count)
        return counts if any(counts) else (self.held_reading_count, self.held_ecg_count)

    @property
    def some_kept_on_disk(self) -> bool:
        """Held in memory only, but not all of it: the spill file keeps the rest."""
        return self.held_in_memory_only and self.in_memory_only != (self.held_reading_count, self.held_ecg_count)

    @property
    def memory_words(self) -> str:
        """What is held in memory only, for people (as `held_words`)."""
        return held_words(*self.in_memory_only) or "readings"

    @property
    def waiting(self) -> str:
        """What waits and where, in the words of its status and cause ("" when nothing waits)."""
        if not self.waits_for_space:
            return ""
        return waiting_message(self.held_words, self.held_readings, self.memory_words, self.held_cause)

    @property
    def lost_words(self) -> str:
        """What a stop lost, for people ("1 ECG(s)"; "" when nothing)."""
        return held_words(self.lost_reading_count, self.lost_ecg_count)

    @property
    def lost_from_memory(self) -> tuple[int, int]:
        """Readings and streamed ECGs a stop lost that were held in memory only."""
        return (
            max(0, self.lost_reading_count - self.lost_disk_reading_count),
            max(0, self.lost_ecg_count - self.lost_disk_ecg_count),
        )

    @property
    def lost_from_disk(self) -> tuple[int, int]:
        """Readings and streamed ECGs a stop lost that were kept on disk: the spill file did not give them back."""
        return (self.lost_disk_reading_count, self.lost_disk_ecg_count)

    @property
    def battery_low(self) -> bool:
        """Its last Battery Level is at or below LOW_BATTERY_PERCENT: the doctor is told to replace
        or charge its batteries before it dies mid-measurement."""
        return self.battery_level is not None and self.battery_level <= LOW_BATTERY_PERCENT

    def battery_current(self, now: dt.datetime, refresh_s: float) -> bool:
        """Its Battery Level may be said as now's: it is connected (the link keeps the level
        current) or the level was read within 2 x `refresh_s` (`[ble] battery_refresh_s`: a device
        that connects is written at least that often). Else it is the level it had when last read."""
        if self.removed or self.battery_at is None:
            return False
        return self.connected or now - self.battery_at <= dt.timedelta(seconds=2 * refresh_s)

    def lost_said_until(self, now: dt.datetime) -> dt.datetime | None:
        """Until when what a stop lost from memory is said (None: nothing lost, or said its
        LOST_SAID_FOR by `now`)."""
        return _said_until(bool(self.lost_words), self.lost_at, now)

    def card_said_until(self, now: dt.datetime) -> dt.datetime | None:
        """Until when the card a stop did not check in is said, as what a stop lost
        (LOST_SAID_FOR from the restart that found it; None: none, or said long enough)."""
        return _said_until(bool(self.card_kind), self.card_found_at, now)

    def problem_said_on_today(self, now: dt.datetime) -> bool:
        """Whether its last error is news for Today (`PROBLEM_SAID_ON_TODAY_FOR`): not yet
        followed by a reading (a card read well after a refused one), nor, for one unplugged, by
        its coming back; a held row's error is said by the held words instead."""
        if not self.last_error or self.last_error_at is None or self.held_cause:
            return False
        if now - self.last_error_at > PROBLEM_SAID_ON_TODAY_FOR:
            return False
        # by when the gateway got it, not when it was measured: a monitor's clock may be slow, and
        # a cuff sends a reading from its memory after the failed connection that kept it there
        received = self.reading_received_at or self.last_reading_at  # a row stored before 0039: as it was
        if received is not None and received > self.last_error_at:
            return False
        return not (self.problem is DeviceProblem.UNPLUGGED and self.connected)

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.isoformat() if isinstance(v, dt.datetime) else v.value if isinstance(v, enum.Enum) else v
        return out


def _said_until(said: bool, found_at: dt.datetime | None, now: dt.datetime) -> dt.datetime | None:
    """Until when what a stop left (`said`: there is some), found by the restart at `found_at`, is
    said: LOST_SAID_FOR from then (None: nothing, or said long enough by `now`)."""
    if not said or found_at is None:
        return None
    until = found_at + LOST_SAID_FOR
    return until if until > now else None


def held_words(readings: int, ecgs: int) -> str:
    """The readings and streamed ECGs waiting for space, in words ("" when none)."""
    words = [f"{readings} reading(s)"] if readings else []
    return ", ".join(words + ([f"{ecgs} ECG(s)"] if ecgs else []))


def waiting_message(words: str, held: HeldReadings, in_memory: str = "", cause: str = "") -> str:
    """What a device row says of `words` (`held_words`) waiting `held` there, for space or, with a
    `cause` (`DeviceRecord.held_cause`), for that; with `held` MEMORY, `in_memory` words the part
    of them held in memory only ("" or `words`: all)."""
    if held is not HeldReadings.MEMORY:
        where = KEPT_ON_DISK
    elif in_memory and in_memory != words:
        where = f"{in_memory} of them {MEMORY_ONLY}; the rest {KEPT_ON_DISK}"
    else:
        where = MEMORY_ONLY
    if cause:
        return f"{words} waiting to be stored ({where}): {cause}"
    return f"{words} waiting for space on the data partition ({where})"


def lost_message(words: str, cause: str = "") -> str:
    """What a stop lost of `words` (`held_words`) held in memory only, for people (the journal,
    `lastmile doctor`): waiting for space or, with a `cause` (`DeviceRecord.held_cause`), for that."""
    waiting = f"waiting to be stored: {cause}" if cause else "waiting for space"
    if cause == HELD_AT_STOP:  # "stored at its next start" is what did not happen
        waiting = "not stored yet when the gateway stopped"
    return f"{words} held in memory only ({waiting}) were lost when the gateway stopped"


def lost_on_disk_message(words: str, damage: str) -> str:
    """What a stop kept of `words` (`held_words`) on disk and the spill file did not give back at
    the restart (`damage`: the file, why, its .bad copy: `DeviceRecord.lost_damage`), for people."""
    return f"{words} kept on disk could not be read back at the restart from {damage}: lost when the gateway stopped"


# how long the causes of losses said at once may grow (a cause is at most 200 characters: two of them)
LOST_CAUSES_CHARS = 402


def lost_causes(said: str, cause: str) -> str:
    """The causes losses said at once waited for: `said` (the row's, "" for space) with `cause`
    added unless it is space or said already, bounded (LOST_CAUSES_CHARS). Space with a stop's own
    cause (HELD_AT_STOP), in either order, is space: the stop's is no fault and asks nothing, the
    space's advice (keep the gateway powered while readings wait) is what the doctor must hear."""
    if {said, cause} == {"", HELD_AT_STOP}:
        return ""
    if not cause or cause in said:
        return said
    return f"{said}; {cause}"[:LOST_CAUSES_CHARS] if said else cause


# how long the damaged spill files of losses said at once may grow: each names its path and its
# .bad copy's, whole (the county IT goes by them), so older ones are left out, never cut
LOST_DAMAGE_CHARS = 1200


def lost_damages(said: str, damage: str) -> str:
    """The damaged spill files of losses said at once: `said` (the row's) with `damage` (this
    stop's: `DeviceRecord.lost_damage`) added unless said already; past LOST_DAMAGE_CHARS the
    older ones are left out ("…" says so), so no path is ever cut."""
    if not damage or damage in said:
        return said
    if not said:
        return damage
    both = f"{said}; {damage}"
    return both if len(both) <= LOST_DAMAGE_CHARS else f"…; {damage}"


def services_text(services: Iterable[int]) -> str:
    """How a device row keeps its services: sorted hex 16-bit UUIDs, "180A,1810"."""
    return ",".join(f"{u:04X}" for u in sorted(set(services)))


def parse_services(text: str | None) -> tuple[int, ...]:
    """A row's services column (`services_text`) read back; NULL or "": none seen."""
    return tuple(int(u, 16) for u in (text or "").split(",") if u)


def normalise_address(address: str) -> str:
    return address.strip().upper()


def is_bluetooth_address(address: str) -> bool:
    """Six hex byte pairs, like C0:26:DA:01:02:03 (either case)."""
    parts = address.split(":")
    return len(parts) == 6 and all(len(x) == 2 and all(c in "0123456789abcdefABCDEF" for c in x) for x in parts)


def serial_address(name: str) -> str:
    """The registry address of the serial device `name` (`[[serial.devices]]`)."""
    return f"serial:{name}"


def forwarded_name(bridge: str) -> str:
    """The device a bridge forwards (its RS-232 port, read with `forward_profile`): its own entry
    in the device registry, so its fault is not hidden by the bridge's own status."""
    return f"{bridge}:forwarded"


def configured_serial(config: Config) -> frozenset[str]:
    """The registry addresses of the serial devices `config` has the acquire service read: each
    `[[serial.devices]]` entry and, for one naming a `forward_profile`, the device it forwards."""
    if not config.serial.enabled:
        return frozenset()
    found = set()
    for entry in config.serial.devices:
        name = str(entry.get("name", ""))  # a nameless entry is the config check's to refuse, not a crash here
        found.add(serial_address(name))
        if entry.get("forward_profile"):
            found.add(serial_address(forwarded_name(name)))
    return frozenset(normalise_address(a) for a in found)


@dataclass(frozen=True)
class SerialNames:
    """What the pages call the serial devices a config sets up, by their registry address
    (normalised): their settings names, never their ports. Read from the config once (`of`): the
    console's Today is redrawn every few seconds, its config only changes with a restart."""

    # each device's and, of each, the device it would forward: (its settings name, whether it is
    # the forwarded one), so a header says "cart" and the device a bridge forwards "the device on cart"
    devices: dict[str, tuple[str, bool]]
    # the name a reading stamped with the address (`Observation.registry_address`) is shown by: its
    # device's own; none for a bridge's (a blood pressure is no ECG cart's) nor for the device a
    # bridge forwards (its maker and model say it)
    readings: dict[str, str]

    @classmethod
    def of(cls, config: Config) -> SerialNames:
        devices: dict[str, tuple[str, bool]] = {}
        readings: dict[str, str] = {}
        for entry in config.serial.devices:
            name = str(entry.get("name", ""))
            own = normalise_address(serial_address(name))
            devices[own] = (name, False)
            devices[normalise_address(serial_address(forwarded_name(name)))] = (name, True)
            if entry.get("profile") != "bridge":
                readings[own] = name
        return cls(devices, readings)

    def of_reading(self, registry_address: str) -> str:
        """The settings name of the device a reading stamped with `registry_address` came from;
        "" for a bridge's, one it forwarded, one no longer set up, or one not stamped."""
        return self.readings.get(normalise_address(registry_address), "") if registry_address else ""


# the row's counts of what waits for space (all, in memory only) and what a stop lost, read as they are
_COUNTS = (
    "held_reading_count",
    "held_ecg_count",
    "memory_reading_count",
    "memory_ecg_count",
    "lost_reading_count",
    "lost_ecg_count",
    "lost_disk_reading_count",
    "lost_disk_ecg_count",
)


def _record(row: sqlite3.Row, serial: frozenset[str] | None = None) -> DeviceRecord:
    """`serial`: the configured serial addresses (None: not known, none is judged removed)."""
    transport, allowed = row["transport"], bool(row["allowed"])
    return DeviceRecord(
        address=row["address"],
        transport=transport,
        name=row["name"] or row["advertised_name"] or "",  # the name given at pairing wins
        allowed=allowed,
        pair_required=bool(row["pair_required"]),
        added_at=from_iso(row["added_at"]),
        manufacturer=row["manufacturer"] or "",
        model=row["model"] or "",
        serial=row["serial"] or "",
        software_version=row["software_version"] or "",
        connected=bool(row["connected"]),
        last_seen_at=from_iso(row["last_seen_at"]),
        last_connected_at=from_iso(row["last_connected_at"]),
        last_reading_at=from_iso(row["last_reading_at"]),
        last_reading=row["last_reading"] or "",
        last_error=row["last_error"] or "",
        last_error_at=from_iso(row["last_error_at"]),
        last_sequence=row["last_sequence"],
        held_readings=HeldReadings(row["held_readings"] or ""),
        **{count: row[count] for count in _COUNTS},
        held_at=from_iso(row["held_at"]),
        lost_after=from_iso(row["lost_after"]),
        lost_at=from_iso(row["lost_at"]),
        held_cause=(row["held_cause"] or "") if row["held_readings"] else "",
        lost_cause=row["lost_cause"] or "",
        lost_damage=row["lost_damage"] or "",
        held_spill_generations=(row["held_spill_generation"], row["held_ecg_spill_generation"]),
        lost_word_id=row["lost_word_id"] or "",
        card_kind=row["card_kind"] or "",
        card_id=row["card_id"] or "",
        card_scanned_at=from_iso(row["card_scanned_at"]),
        card_time_source=row["card_time_source"] or "",
        card_found_at=from_iso(row["card_found_at"]),
        card_word_id=row["card_word_id"] or "",
        reading_received_at=from_iso(row["reading_received_at"]),
        services=parse_services(row["services"]),
        sends_users=bool(row["sends_users"]),
        advertised_name=row["advertised_name"] or "",
        battery_level=row["battery_level"],
        battery_at=from_iso(row["battery_at"]),
        problem=_problem(row["last_error_kind"]),
        removed=(transport == "ble" and not allowed)
        or (transport == "serial" and serial is not None and row["address"] not in serial),
    )


def _problem(kind: str | None) -> DeviceProblem:
    """A row's error kind read back: none (no error) or one this version does not know (a newer
    one wrote it) is OTHER, never a crash."""
    try:
        return DeviceProblem(kind or DeviceProblem.OTHER)
    except ValueError:
        return DeviceProblem.OTHER


class DeviceRegistry:
    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str]) -> DeviceRegistry:
        return cls(open_clinic_db(data_dir))

    def close(self) -> None:
        self.db.conn.close()

    def _ensure(self, conn: sqlite3.Connection, address: str, transport: str, now: dt.datetime) -> None:
        conn.execute(
            "INSERT INTO devices (address, transport, updated_at) VALUES (?, ?, ?) ON CONFLICT(address) DO NOTHING",
            (address, transport, iso(now)),
        )

    # -- allow-list -------------------------------------------------------------------------
    def allow(
        self, address: str, *, now: dt.datetime, name: str = "", pair_required: bool = False, transport: str = "ble"
    ) -> DeviceRecord:
        address = normalise_address(address)
        with transaction(self.db) as conn:
            self._ensure(conn, address, transport, now)
            conn.execute(
                "UPDATE devices SET allowed = 1, pair_required = MAX(pair_required, ?), "
                "name = COALESCE(NULLIF(?, ''), name), added_at = COALESCE(added_at, ?), updated_at = ? "
                "WHERE address = ?",
                (int(pair_required), name, iso(now), iso(now), address),
            )
        record = self.get(address)
        assert record is not None
        return record

    def disallow(self, address: str, *, now: dt.datetime) -> bool:
        with transaction(self.db) as conn:
            cur = conn.execute(
                "UPDATE devices SET allowed = 0, updated_at = ? WHERE address = ? AND allowed = 1",
                (iso(now), normalise_address(address)),
            )
            return cur.rowcount > 0

    def allowed(self, transport: str = "ble") -> dict[str, DeviceRecord]:
        rows = self.db.conn.execute(
            "SELECT * FROM devices WHERE allowed = 1 AND transport = ?", (transport,)
        ).fetchall()
        return {r["address"]: _record(r) for r in rows}

    def is_allowed(self, address: str) -> bool:
        row = self.db.conn.execute(
            "SELECT allowed FROM devices WHERE address = ?", (normalise_address(address),)
        ).fetchone()
        return bool(row and row["allowed"])

    # -- status -----------------------------------------------------------------------------
    def update_status(
        self,
        address: str,
        *,
        now: dt.datetime,
        transport: str = "ble",
        connected: bool | None = None,
        seen: bool = False,
        error: str | None = None,
        problem: DeviceProblem = DeviceProblem.OTHER,
        error_at: dt.datetime | None = None,
        held: HeldReadings | None = None,
        held_cause: str = "",
        held_counts: tuple[int, int] = (0, 0),
        memory_counts: tuple[int, int] = (0, 0),
        spill_generations: tuple[int | None, int | None] = (None, None),
        identity: DeviceIdentity | None = None,
        reading: str | None = None,
        reading_at: dt.datetime | None = None,
        name: str | None = None,
        advertised_name: str | None = None,
        services: Iterable[int] = (),
        sends_users: bool = False,
        battery_level: int | None = None,
        card: tuple[str, str] | None = None,
    ) -> None:
        """Record what just happened to a device; only the given facts change (`error` with its
        kind `problem`, what the doctor is told: "" clears both; `error_at`: when it happened, if
        before `now` (written late); `held`: where
        the readings waiting for space are, `held_cause` why they are not stored when not for space,
        `held_counts` how many readings and streamed ECGs,
        `memory_counts` how many of them are held in memory only, `spill_generations` the spill
        files' newest generations then; they stay, whatever later errors
        say, until given again; `services` are added to those seen before: a later advertisement
        names fewer than the connection found; `sends_users`: a reading named its user, for good;
        `advertised_name`: what a BLE device calls itself, never over the name given at pairing;
        `battery_level`: the percentage it reported now; `card`: the card (kind, ID) a scanner has
        just checked in - the one a stop did not check in is no longer said if it is that one)."""
        address = normalise_address(address)
        sets: dict[str, object] = {"updated_at": iso(now)}
        if connected is not None:
            sets["connected"] = int(connected)
            if connected:
                sets["last_connected_at"] = iso(now)
        if seen:
            sets["last_seen_at"] = iso(now)
        if error is not None:
            sets["last_error"], sets["last_error_kind"] = error, problem.value if error else ""
            sets["last_error_at"] = iso(error_at or now)
        if held is not None:
            sets["held_readings"], sets["held_at"] = held.value, iso(now)
            sets["held_cause"] = held_cause if held is not HeldReadings.NONE else ""
            sets["held_reading_count"], sets["held_ecg_count"] = held_counts
            sets["memory_reading_count"], sets["memory_ecg_count"] = memory_counts
            sets["held_spill_generation"], sets["held_ecg_spill_generation"] = spill_generations
        if identity is not None:
            for f in ("manufacturer", "model", "serial", "software_version"):
                if getattr(identity, f):
                    sets[f] = getattr(identity, f)
        if reading is not None:
            sets["last_reading"] = reading
            sets["last_reading_at"] = iso(reading_at or now)
            sets["reading_received_at"] = iso(now)
        if name:
            sets["name"] = name
        if advertised_name:
            sets["advertised_name"] = advertised_name
        if sends_users:
            sets["sends_users"] = 1
        if battery_level is not None:
            sets["battery_level"], sets["battery_at"] = battery_level, iso(now)
        with transaction(self.db) as conn:
            self._ensure(conn, address, transport, now)
            if services:
                sets["services"] = services_text({*services, *self._services(conn, address)})
            assignments = ", ".join(f"{k} = ?" for k in sets)
            conn.execute(f"UPDATE devices SET {assignments} WHERE address = ?", (*sets.values(), address))
            if card is not None:  # scanned again: done
                end_card_notices(conn, card[0], card_on=(address, card[1]))

    def clear_error(self, address: str, problem: DeviceProblem, *, now: dt.datetime) -> None:
        """Clear the row's error if it is still one of kind `problem` (a later one, unplugged ...,
        stays): what it said is over."""
        with transaction(self.db) as conn:
            conn.execute(
                "UPDATE devices SET last_error = '', last_error_kind = '', last_error_at = ?, updated_at = ? "
                "WHERE address = ? AND last_error_kind = ?",
                (iso(now), iso(now), normalise_address(address), problem.value),
            )

    @staticmethod
    def _services(conn: sqlite3.Connection, address: str) -> tuple[int, ...]:
        row = conn.execute("SELECT services FROM devices WHERE address = ?", (address,)).fetchone()
        return parse_services(row[0] if row else None)

    def record_lost(
        self,
        record: DeviceRecord,
        counts: tuple[int, int],
        *,
        now: dt.datetime,
        cause: str | None = None,
        on_disk: tuple[int, int] = (0, 0),
        damage: str = "",
        word_id: str = "",
    ) -> None:
        """Readings and streamed ECGs (`counts`) a stop lost of what `record` (the row the restart
        found) held after its last word on them, found gone at `now`: said for LOST_SAID_FOR from
        now, with a loss still said before added in; their cause is what the row said they waited
        for then (`held_cause`), unless the loss said before had another than space: that one stays
        (its readings are still lost, and its advice is the county IT's), and another one is said
        beside it. `cause`: theirs when not the row's held cause. `on_disk`: of `counts`, those kept
        on disk that the spill file did not give back, `damage` says which file and why. `word_id`: the
        stop's word these come from, kept in the same write (a start reading it again skips it)."""
        readings, ecgs = counts
        disk_readings, disk_ecgs = on_disk
        after = record.held_at or record.last_error_at  # a row an older version held: its error said it
        cause = record.held_cause if cause is None else cause
        if record.lost_said_until(now) is not None:
            readings, ecgs = readings + record.lost_reading_count, ecgs + record.lost_ecg_count
            disk_readings, disk_ecgs = (
                disk_readings + record.lost_disk_reading_count,
                disk_ecgs + record.lost_disk_ecg_count,
            )
            after, cause = record.lost_after, lost_causes(record.lost_cause, cause)
            damage = lost_damages(record.lost_damage, damage)
        with transaction(self.db) as conn:
            conn.execute(
                "UPDATE devices SET lost_reading_count = ?, lost_ecg_count = ?, lost_disk_reading_count = ?, "
                "lost_disk_ecg_count = ?, lost_damage = ?, lost_after = ?, lost_at = ?, lost_cause = ?, "
                "lost_word_id = COALESCE(?, lost_word_id), updated_at = ? WHERE address = ?",
                (
                    readings,
                    ecgs,
                    disk_readings,
                    disk_ecgs,
                    damage,
                    after and iso(after),
                    iso(now),
                    cause,
                    word_id or None,
                    iso(now),
                    record.address,
                ),
            )

    def word_applied(self, address: str, word_id: str, *, now: dt.datetime) -> None:
        """The stop's word `word_id` on the row at `address` was applied with no loss to count: a
        start that reads it again skips it too."""
        with transaction(self.db) as conn:
            conn.execute(
                "UPDATE devices SET lost_word_id = ?, updated_at = ? WHERE address = ?",
                (word_id, iso(now), normalise_address(address)),
            )

    def card_not_checked_in(
        self,
        address: str,
        kind: str,
        card_id: str,
        *,
        scanned_at: dt.datetime,
        time_source: str,
        word_id: str,
        now: dt.datetime,
    ) -> None:
        """A card (`kind`: CARD_PATIENT, CARD_DOCTOR) the scanner at `address` read at `scanned_at`
        as the gateway stopped was not checked in, found at the restart `now`: said from now for
        LOST_SAID_FOR (over one said before: the newest is the one to scan again). `word_id`: the
        stop's record it comes from, in the same write (a start reading it again skips it)."""
        address = normalise_address(address)
        with transaction(self.db) as conn:
            self._ensure(conn, address, "serial", now)
            conn.execute(
                "UPDATE devices SET card_kind = ?, card_id = ?, card_scanned_at = ?, card_time_source = ?, "
                "card_found_at = ?, card_word_id = ?, updated_at = ? WHERE address = ?",
                (kind, card_id, iso(scanned_at), time_source, iso(now), word_id, iso(now), address),
            )

    def mark_all_disconnected(self, *, now: dt.datetime, transport: str = "ble") -> None:
        """At service start: nothing is connected yet, whatever a crash left behind."""
        with transaction(self.db) as conn:
            conn.execute(
                "UPDATE devices SET connected = 0, updated_at = ? WHERE transport = ? AND connected = 1",
                (iso(now), transport),
            )

    def set_pair_required(self, address: str, *, now: dt.datetime) -> None:
        with transaction(self.db) as conn:
            conn.execute(
                "UPDATE devices SET pair_required = 1, updated_at = ? WHERE address = ?",
                (iso(now), normalise_address(address)),
            )

    # -- record sequence numbers (RACP) -------------------------------------------------------
    def last_sequence(self, address: str) -> int | None:
        row = self.db.conn.execute(
            "SELECT last_sequence FROM devices WHERE address = ?", (normalise_address(address),)
        ).fetchone()
        return None if row is None else row["last_sequence"]

    def set_last_sequence(self, address: str, sequence: int, *, now: dt.datetime) -> None:
        """Remember the highest stored sequence (never moves back: a re-sent old record is not news)."""
        address = normalise_address(address)
        with transaction(self.db) as conn:
            self._ensure(conn, address, "ble", now)
            conn.execute(
                "UPDATE devices SET last_sequence = MAX(COALESCE(last_sequence, -1), ?), updated_at = ? "
                "WHERE address = ?",
                (sequence, iso(now), address),
            )

    # -- reading ----------------------------------------------------------------------------
    def get(self, address: str) -> DeviceRecord | None:
        """One device (`removed` here is BLE unpairing only: `all(config)` judges serial devices)."""
        row = self.db.conn.execute("SELECT * FROM devices WHERE address = ?", (normalise_address(address),)).fetchone()
        return _record(row) if row else None

    def all(self, config: Config | None = None) -> list[DeviceRecord]:
        """Every device; with `config` (what a reader that shows them always gives), a serial
        device it no longer names is `removed` (a BLE device is when unpaired)."""
        serial = None if config is None else configured_serial(config)
        rows = self.db.conn.execute("SELECT * FROM devices ORDER BY transport, address").fetchall()
        return [_record(r, serial) for r in rows]
