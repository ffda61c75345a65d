"""Printing a report on the clinic's printer through CUPS (`lp`), when the gateway has it.

The image installs CUPS with a queue `clinic` for the USB printer that is plugged in (image/files/
lastmile-printer) and the Noto CJK fonts, so a report's Chinese text prints from the gateway
itself. Where there is no `lp` or no printer, callers fall back: `lastmile report print` writes a
file, the console's page keeps the browser's own Print button.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)

LP_TIMEOUT_S = 60  # `lp` only hands the job to the local scheduler; the printing itself is CUPS's


@dataclass(frozen=True)
class PrintOutcome:
    sent: bool  # the scheduler accepted the job (it prints, or waits for the printer, on its own)
    message: str  # lp's answer ("request id is clinic-3 (1 file(s))") or why not


def lp_command() -> str | None:
    """The path of CUPS's `lp`, or None where CUPS is not installed."""
    return shutil.which("lp")


def print_document(data: bytes, title: str, printer: str | None = None) -> PrintOutcome:
    """Hand `data` (a PDF, or UTF-8 text) to CUPS; `printer` None means the default destination.
    The document goes on stdin: nothing with patient data is written to a file here."""
    lp = lp_command()
    if lp is None:
        return PrintOutcome(False, "CUPS `lp` is not installed")
    cmd = [lp, "-t", title] + (["-d", printer] if printer else [])
    try:
        done = subprocess.run(cmd, input=data, capture_output=True, timeout=LP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("lp failed: %s", exc)
        return PrintOutcome(False, f"lp failed: {exc}")
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        log.warning("lp refused the job %r: %s", title, why)
        return PrintOutcome(False, why)
    answer = done.stdout.decode(errors="replace").strip()
    log.info("printed %r: %s", title, answer)
    return PrintOutcome(True, answer)


def print_behind_note(note: str, document: bytes, title: str, printer: str | None = None) -> PrintOutcome:
    """`document` (the county's PDF, which cannot be written on) behind a page of its own saying
    `note` (a replaced report: do not act on it). The note is a job of its own, sent first; if the
    scheduler refuses it the document is not sent either: never the PDF without its note.
    No note (`note` empty): the document alone."""
    if not note:
        return print_document(document, title, printer)
    first = print_document(note.encode("utf-8") + b"\n", f"{title}: note", printer)
    return print_document(document, title, printer) if first.sent else first
