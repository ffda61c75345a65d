"""Critical results (危急值): an alert the doctor cannot miss.

Every critical report is (1) logged at ERROR (the journal), (2) a FAIL line of `lastmile doctor`
until the doctor acknowledges it (`lastmile report ack ID`), and (3) announced once through the
appliance's hook: `reports.critical_command` (an argv: a buzzer, an LED, a notifier) run with
LASTMILE_REPORT_ID and LASTMILE_CRITICAL_REASON in its environment — no patient identifiers.
The hook runs detached (it never holds up polling) and is killed if it outlives HOOK_TIMEOUT_S.
A report is marked alerted only after its hook was started, so a restart in between announces it
again rather than never.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from collections.abc import Sequence

from lastmile.clinic.db import utc_now
from lastmile.reports.store import ReportStore, StoredReport

log = logging.getLogger(__name__)

HOOK_TIMEOUT_S = 120.0


class CriticalAlerter:
    def __init__(self, store: ReportStore, command: Sequence[str] = ()) -> None:
        self.store = store
        self.command = list(command)
        self.hooks_started = 0

    def alert_pending(self) -> list[StoredReport]:
        """Announce every critical report not announced yet; returns them."""
        announced = []
        for report in self.store.not_alerted():
            reason = report.critical[0] if report.critical else "critical"
            log.error("CRITICAL report %d: %s (lastmile report show %d)", report.id, reason, report.id)
            self.run_hook(report, reason)
            self.store.mark_alerted(report.id, utc_now())
            announced.append(report)
        return announced

    def run_hook(self, report: StoredReport, reason: str) -> None:
        if not self.command:
            return
        env = {**os.environ, "LASTMILE_REPORT_ID": str(report.id), "LASTMILE_CRITICAL_REASON": reason[:200]}
        try:
            proc = subprocess.Popen(
                self.command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            log.error("critical-report hook %s could not start: %s", self.command[0], exc)
            return
        self.hooks_started += 1
        threading.Thread(target=_reap, args=(proc, self.command[0]), name="critical-hook", daemon=True).start()


def _reap(proc: subprocess.Popen[bytes], name: str) -> None:
    try:
        _out, err = proc.communicate(timeout=HOOK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        log.warning("critical-report hook %s ran longer than %.0f s: killed", name, HOOK_TIMEOUT_S)
        return
    if proc.returncode:
        log.warning("critical-report hook %s exited %d: %s", name, proc.returncode, err[-300:].decode(errors="replace"))
