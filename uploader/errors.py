"""How a send can fail: the class decides what happens to the item."""

from __future__ import annotations


class UploadError(Exception):
    """Base of every error raised by `uploader/`."""


class TransientError(UploadError):
    """Try again later (capped exponential backoff with jitter)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(UploadError):
    """This item will never be accepted as it is: quarantine it with the reason."""


class ConfigurationFault(UploadError):
    """The peer refuses *us* (unknown AE, bad token, TLS trust): keep every item queued,
    report the fault, retry slowly."""


class OutboxFullError(UploadError):
    """The data partition is too full to accept a new item safely."""


class CorruptPayloadError(PermanentError):
    """A stored payload no longer matches its content hash."""


class InvalidObjectError(UploadError, ValueError):
    """A builder was given something it cannot turn into a valid object."""
