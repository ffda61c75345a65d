"""The one error family of `firmware_bridge/`: a link, a source or an import that cannot go on.

Callers catch `BridgeError` to survive anything a transport can throw at them; bad bytes inside
a transport are `devices.errors.ProtocolError`, never these.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error raised by `firmware_bridge/`."""


class LinkConfigError(BridgeError, ValueError):
    """A link cannot start with these settings (the message says what to fix)."""


class ReceiverConfigError(LinkConfigError):
    """The LAN receiver cannot start with these settings."""


class GnssError(BridgeError):
    """The GNSS source cannot be used (gpsd not running, port missing ...)."""


class GnssBusyError(GnssError):
    """The NMEA receiver's port is held by another process (the acquire service owns it)."""


class FileRefused(BridgeError):
    """Raised by an `enqueue` callable when this one file cannot be taken (e.g. its recording
    cannot become a valid DICOM object); the import goes on with the next file."""


class ObjectRefused(BridgeError):
    """Raised by the LAN receiver's `store` callable for an object it will not keep as sent, and
    sending it again would not change that: answered with this failure `status` (not 0xA700,
    which tells the cart to retry) and the reason as the comment."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class SessionEnded(BridgeError):
    """A BLE session ended before its work was done (link lost, device hung up)."""
