"""What a DIMSE status from the PACS means for an outbox item: stored, retry later, or never.

Categories (`StoreOutcome.category`):
- "success"   0x0000;
- "warning"   0x0001, 0x0107, 0x0116, 0xBxxx (coercion, element discarded ...): the PACS kept it;
- "transient" 0xA7xx out of resources, 0x0110 processing failure, 0x0213 resource limitation,
              0x0210 duplicate invocation, 0xFE00 cancel: the same bytes may be accepted later;
- "permanent" 0xA9xx data set does not match SOP class, 0xCxxx cannot understand and every other
              failure, including codes we do not know: these bytes will never be accepted.

0x0124 "Refused: Not Authorised" is about the gateway, not the item: `is_refusal_of_us` lets the
sender raise a configuration fault instead of quarantining a good ECG.
"""

from __future__ import annotations

import enum

from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS


class Category(enum.StrEnum):
    """What a status means for the item (see the module docstring)."""

    SUCCESS = "success"
    WARNING = "warning"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


SUCCESS, WARNING, TRANSIENT, PERMANENT = Category.SUCCESS, Category.WARNING, Category.TRANSIENT, Category.PERMANENT
STORED_CATEGORIES = frozenset({SUCCESS, WARNING})

NOT_AUTHORISED = 0x0124
SOP_CLASS_NOT_SUPPORTED = 0x0122

# Failures that say "not now" rather than "not this object": a PACS-side processing error
# or a resource limit goes away; quarantining an ECG for it would lose a good recording.
_TRANSIENT_CODES = frozenset({0x0110, 0x0210, 0x0213, 0xFE00})
_WARNING_CODES = frozenset({0x0001, 0x0107, 0x0116})

# (first, last, category, meaning) for the ranges PS3.4 B.2.3 reserves per service.
_RANGES: tuple[tuple[int, int, Category, str], ...] = (
    (0xA700, 0xA7FF, TRANSIENT, "Refused: Out of Resources"),
    (0xA900, 0xA9FF, PERMANENT, "Error: Data Set Does Not Match SOP Class"),
    (0xB000, 0xBFFF, WARNING, "Warning"),
    (0xC000, 0xCFFF, PERMANENT, "Error: Cannot Understand"),
)


def status_meaning(status: int) -> str:
    """The standard's text for a C-STORE/N-ACTION status (pynetdicom's tables), or the range's."""
    entry = STORAGE_SERVICE_CLASS_STATUS.get(status) or GENERAL_STATUS.get(status)
    if entry and entry[1]:
        return entry[1]
    if status == 0x0000:
        return "Success"
    if status == 0x0001:
        return "Warning: Requested optional attributes are not supported"
    for first, last, _category, meaning in _RANGES:
        if first <= status <= last:
            return meaning
    if status == 0xFE00:
        return "Cancelled"
    return "Unrecognised status"


def classify_status(status: int) -> tuple[Category, str]:
    """(category, meaning) of a C-STORE response status; see the module docstring."""
    if not 0 <= status <= 0xFFFF:
        raise ValueError(f"a DIMSE status is 16 bits, not {status!r}")
    meaning = status_meaning(status)
    if status == 0x0000:
        return SUCCESS, meaning
    if status in _WARNING_CODES:
        return WARNING, meaning
    if status in _TRANSIENT_CODES:
        return TRANSIENT, meaning
    for first, last, category, _meaning in _RANGES:
        if first <= status <= last:
            return category, meaning
    return PERMANENT, meaning


def is_refusal_of_us(status: int) -> bool:
    """The PACS refuses the calling gateway itself, whatever the object."""
    return status == NOT_AUTHORISED
