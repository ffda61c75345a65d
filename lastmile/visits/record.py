"""A visit's row as visits.db stores it, decoded: light (no signing code), so that the doctor,
which runs every minute in the console, can tell a damaged open visit as the book does."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from devices.gps.fix import Fix
from devices.observation import Observation
from lastmile.clock import Stamp

# What decoding a damaged stored visit, or building its bundle or canonical record from it,
# raises (InvalidObjectError - no doctor, an unassigned reading, a time without zone - and JSON
# decode errors are ValueErrors): trying it again will not help. The signing key is loaded
# before any visit is tried, outside these: a damaged key (SigningKeyError) sets no visit aside.
BUNDLE_ERRORS: tuple[type[Exception], ...] = (ValueError, KeyError, TypeError)


def fault_text(cause: Exception | str) -> str:
    """What a visit's fault says ("Type: message"): the error, or the fault already stored."""
    return cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"


def quarantined_reading_reason(visit_id: str, item_id: int, exc: Exception, *, decoded: bool) -> str:
    """Why a visit's reading is quarantined on its own, outbox item `item_id` (the book's at its
    release, the relay's at each retry). Its record damaged on the SD card: a record restored in
    visits.db from a backup is what a retry sends. One that decodes but cannot be said in FHIR
    (`decoded`): the same record restored would fail the same, so no restore is offered."""
    if decoded:
        return (
            f"a reading of home visit {visit_id} cannot be made a FHIR bundle for the county "
            f"platform ({fault_text(exc)}); measure the patient again"
        )
    return (
        f"a reading of home visit {visit_id} is damaged on the SD card and cannot be sent "
        f"to the county platform ({fault_text(exc)}); measure the patient again, or have the county IT "
        f"restore its record in visits.db from a backup: `lastmile retry {item_id}` then sends it"
    )


class VisitError(Exception):
    """A visit command that cannot be done as asked (no open visit, one already open ...)."""


class DamagedVisitError(VisitError):
    """The open visit's stored row cannot be read (damaged on the SD card): it can never be
    signed nor sent. `closed`: `stop` closed it and set it aside, so the doctor can go on."""

    def __init__(self, visit_id: str, patient_id: str, cause: Exception | str, *, closed: bool = False) -> None:
        """`cause`: the error, or the fault a repair pass stored on the visit ("Type: message")."""
        self.visit_id, self.patient_id, self.cause, self.closed = visit_id, patient_id, cause, closed
        damage = f"the open visit {visit_id} of patient {patient_id} is damaged on the SD card ({fault_text(cause)})"
        if closed:
            what_now = (
                "it cannot be signed nor sent to the county platform; it is closed and kept aside "
                "(`lastmile visit list`), the other visits are safe. Record this visit again: "
                f"lastmile visit start --patient {patient_id}; and tell the county IT (the SD card may be failing)"
            )
        else:
            what_now = "`lastmile visit stop` closes it and keeps it aside; then start the visit again"
        super().__init__(f"{damage}: {what_now}")


@dataclass(frozen=True)
class FixRecord:
    """A fix as the gateway received it (the reception stamp tells how fresh it was)."""

    fix: Fix
    received: Stamp

    def to_json(self) -> str:
        return json.dumps({"fix": self.fix.to_json(), "received": self.received.to_json()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> FixRecord | None:
        if not text:
            return None
        data = json.loads(text)
        return cls(Fix.from_json(data["fix"]), Stamp.from_json(data["received"]))


def decode_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The stamps, fixes and flags of a visits row (the book's Visit fields); one of
    BUNDLE_ERRORS when the row is damaged."""
    return {
        "start": Stamp.from_json(json.loads(row["start_stamp"])),
        "end": Stamp.from_json(json.loads(row["end_stamp"])) if row["end_stamp"] else None,
        "start_fix": FixRecord.from_json(row["start_fix"]),
        "end_fix": FixRecord.from_json(row["end_fix"]),
        "flags": json.loads(row["flags"]),
    }


def open_row_damage(row: Mapping[str, Any]) -> Exception | str | None:
    """Why the open visit's row can never be sent, or None: the fault a repair pass stored (a note
    of it damaged, its row reading well) first, else the error decoding the row. The book (start,
    note) and the doctor both ask here, so they name the same cause."""
    if row["fhir_fault"] is not None:
        return str(row["fhir_fault"])
    try:
        decode_row(row)
    except BUNDLE_ERRORS as exc:
        return exc
    return None


def stored_reading(record: str | None) -> Observation:
    """A visit item's stored reading; one of BUNDLE_ERRORS when its record is damaged (the book
    then quarantines it in the outbox instead of sending it)."""
    from lastmile.clinic.observations import observation_from_json

    # a record blanked on the SD card is NULL: json.loads(None) raises TypeError, one of
    # BUNDLE_ERRORS, so it is quarantined as damaged like any other unreadable record
    return observation_from_json(json.loads(record))  # type: ignore[arg-type]
