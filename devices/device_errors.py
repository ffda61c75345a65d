"""The errors our links write to a device's status (its row's `last_error`): their kind, and
the words they begin with.

The words are ours, never a device's: the writers (firmware_bridge's serial and BLE links,
lastmile's serial service) begin their errors with these, for the technician, and write the
error's kind (DeviceProblem) with it, which tells the doctor what to do: reworded or translated
words never change what a row's error is. Here, where every writer may import them.
"""

from __future__ import annotations

import enum


class DeviceProblem(enum.StrEnum):
    """What kind of problem a device row's error is, for what the doctor is told to do (the
    console's words per kind; the error's own text stays for the technician)."""

    UNPLUGGED = "unplugged"  # its port went away: the cable is out (or the device switched off)
    UNREADABLE = "unreadable"  # it sent a measurement that cannot be read: measure again
    NOT_A_RESULT = "not-a-result"  # it marks its readings demo/test/calibration: not stored
    CODE_NOT_RECOGNISED = "code-not-recognised"  # a scanned card or code matched no pattern
    # a patient card's resident ID whose check digit is wrong: a rescan reads the same digits (a
    # misprinted or misread card), so the doctor types the ID from the card instead
    CARD_CHECK_DIGIT = "card-check-digit"
    NOT_SAVED = "not-saved"  # the gateway could not store what it sent
    # it sent a report in which nothing was measured (every value "--": no probe on), none of it
    # required: no reading is stored, and the doctor, who pressed measure, is told so
    NOTHING_MEASURED = "nothing-measured"
    ECG_REFUSED = "ecg-refused"  # a recording that cannot become a DICOM ECG
    SETTINGS = "settings"  # its settings keep it from working: the county IT's to fix
    # a bridge forwards a device's lines and none of its settings reads them (no forward_profile):
    # kept on the bridge; not a refusal a start finds fixed (SETTINGS), so a restart keeps it
    FORWARD_NOT_READ = "forward-not-read"
    OTHER = "other"


DEVICE_GONE = "device gone"  # "device gone: <why>": its port went away (serial link)
MALFORMED = "malformed "  # "malformed 2A35 value: <why>": a value that cannot be decoded (BLE link)
NOT_A_RESULT = " readings not stored: device reports "  # "<kind> readings not stored: ..." (BLE link)
REPORT_REJECTED = "report rejected:"  # a report its profile cannot read (serial service)
CODE_NOT_RECOGNISED = "code not recognised:"  # a scanned code no rule matched (serial service)
CANNOT_STORE = "cannot store "  # "cannot store reading: <why>" (serial service)
ECG_REFUSED = "ECG refused:"  # a recording that cannot become a DICOM ECG (serial service)
NOT_STARTED = "not started: "  # its settings refused: the device is not read (serial service)
FORWARD_NOT_READ = "forwarded device lines not read:"  # a bridge without forward_profile (serial service)
