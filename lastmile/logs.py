"""The one logging set-up of Lastmile's entry points, and what keeps patients out of logs.

Services log to stdout, which systemd connects to the journal (`<priority>` prefixes, no time
stamps: journald adds them); commands log to stderr with time stamps. Either way every record
passes `PatientDataFilter`, which masks patient names and identifiers unless
`gateway.log_patient_data` is set. Modules only ever call `logging.getLogger(__name__)`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import sys
from typing import TYPE_CHECKING

from uploader.masking import mask_patterns

if TYPE_CHECKING:
    from lastmile.config import Config

log = logging.getLogger(__name__)

_SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class PatientDataFilter(logging.Filter):
    """Masks patient names and identifiers in log records unless gateway.log_patient_data is set.

    Masks: `devices.identity.Patient` arguments; values registered with `remember()`; text
    matching `serial.patient_card_pattern`; `patient_id=...`-style pairs and DICOM person names.
    A masked value becomes `<patient:xxxxxx>`, a keyed hash that lets one process's log lines be
    correlated without revealing (or allowing a dictionary attack on) the identifier.
    """

    def __init__(self, config: Config | None = None) -> None:
        super().__init__()
        self._key = secrets.token_bytes(16)
        self._known: dict[str, None] = {}  # insertion-ordered, bounded
        self.enabled = True
        self._extra: list[re.Pattern[str]] = []
        self.configure(config)

    def configure(self, config: Config | None) -> None:
        self.enabled = not (config is not None and config.gateway.log_patient_data)
        self._extra = []
        pattern = config.serial.patient_card_pattern if config is not None else ""
        if pattern:
            try:
                self._extra.append(re.compile(f"(?P<v>{pattern})"))
            except re.error:
                log.warning("serial.patient_card_pattern is not a valid regular expression")

    def remember(self, *values: str) -> None:
        """Mask these exact strings from now on (a patient id, a name the service just handled)."""
        for v in values:
            if v and len(v) >= 2:
                self._known[v] = None
        while len(self._known) > 1000:
            self._known.pop(next(iter(self._known)))

    def token(self, value: str) -> str:
        digest = hashlib.blake2s(value.encode(), key=self._key, digest_size=3).hexdigest()
        return f"<patient:{digest}>"

    def mask(self, text: str) -> str:
        if not self.enabled or not text:
            return text
        for known in sorted(self._known, key=len, reverse=True):
            if known in text:
                text = text.replace(known, self.token(known))
        return mask_patterns(text, self.token, self._extra)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.enabled:
            return True
        args = record.args
        if args:
            record.args = tuple(_patient_arg(a, self) for a in args) if isinstance(args, tuple) else args
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 — let the handler report the broken format call
            return True
        record.msg = self.mask(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.mask(logging.Formatter().formatException(record.exc_info))
        return True


def _patient_arg(arg: object, flt: PatientDataFilter) -> object:
    from devices.identity import Patient

    if isinstance(arg, Patient):
        return flt.token(arg.patient_id)
    return arg


def describe_fault(exc: BaseException) -> str:
    """An operational fault in one line, for a person: `Permission denied: /var/lib/lastmile/x`
    rather than `[Errno 13] ...` and a traceback."""
    if isinstance(exc, OSError) and exc.strerror:
        names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
        return f"{exc.strerror}: {' -> '.join(names)}" if names else f"{exc.strerror} ({type(exc).__name__})"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def mask_patient_data(text: str, flt: PatientDataFilter | None) -> str:
    return flt.mask(text) if flt is not None else text


class JournalFormatter(logging.Formatter):
    """`<priority>logger: message` when stdout is the journal (it adds time and unit itself)."""

    def __init__(self, journal: bool) -> None:
        fmt = "%(name)s: %(message)s" if journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journal:
            return text
        prio = _SYSLOG_PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        # Every line of a traceback keeps the priority, so it stays together in `journalctl -p`.
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def stdout_is_journal(stream: object = None) -> bool:
    """True if stdout is connected to journald ($JOURNAL_STREAM names its device:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat((stream or sys.stdout).fileno())  # type: ignore[union-attr]
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def configure_logging(
    config: Config | None, *, level: int | None = None, stream: object = None, verbosity: int = 0
) -> PatientDataFilter:
    """The one logging set-up of every entry point (services and CLI): one handler on `stream`
    (stdout for a service, which systemd connects to the journal; stderr for a command) with
    journal priorities when it is the journal, through the patient-data filter. Returns the filter.
    """
    out = stream if stream is not None else sys.stdout
    handler = logging.StreamHandler(out)  # type: ignore[arg-type]
    handler.setFormatter(JournalFormatter(stdout_is_journal(out)))
    flt = PatientDataFilter(config)
    handler.addFilter(flt)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    if level is not None:
        root.setLevel(level)
    elif root.level == logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    if verbosity < 2:
        # pynetdicom logs every refused connection as ERROR; our typed messages say it better
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    if not flt.enabled:
        log.warning("gateway.log_patient_data is on: patient names and IDs will appear in the logs")
    return flt
