"""The one error family of `devices/`.

Callers catch `DeviceError` to survive anything a device or a file can throw at them;
bad device bytes only ever raise `ProtocolError` (or a subclass).
"""

from __future__ import annotations


class DeviceError(Exception):
    """Base of every error raised by `devices/`."""


class ProtocolError(DeviceError, ValueError):
    """The bytes do not follow the format or protocol they claim to follow."""


class UnsupportedFeatureError(ProtocolError):
    """The bytes are well-formed, but use a feature we refuse rather than decode wrongly."""


class NotAnEcgError(ProtocolError):
    """The bytes are a readable file of another kind (a cart's PDF report, a settings file): not an
    ECG, and not a damaged one - nothing to export again."""


class InvalidRecordingError(DeviceError, ValueError):
    """A recording or observation object was built with inconsistent values."""
