"""How our links begin the errors they write to a device's status (its row's `last_error`).

The words are ours, never a device's: the writers (firmware_bridge's serial and BLE links,
lastmile's serial service) begin their errors with these, and lastmile.clinic.devices.problem_kind
reads them back to tell the doctor what to do. Here, where every writer may import them.
"""

from __future__ import annotations

DEVICE_GONE = "device gone"  # "device gone: <why>": its port went away (serial link)
MALFORMED = "malformed "  # "malformed 2A35 value: <why>": a value that cannot be decoded (BLE link)
NOT_A_RESULT = " readings not stored: device reports "  # "<kind> readings not stored: ..." (BLE link)
REPORT_REJECTED = "report rejected:"  # a report its profile cannot read (serial service)
CODE_NOT_RECOGNISED = "code not recognised:"  # a scanned code no rule matched (serial service)
CANNOT_STORE = "cannot store "  # "cannot store reading: <why>" (serial service)
ECG_REFUSED = "ECG refused:"  # a recording that cannot become a DICOM ECG (serial service)
NOT_STARTED = "not started: "  # its settings refused: the device is not read (serial service)
FORWARD_NOT_READ = "forwarded device lines not read:"  # a bridge without forward_profile (serial service)
