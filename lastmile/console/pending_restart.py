"""The settings a console reload left waiting for a restart, kept in a file of the data directory.

The console (`lastmile.console.service`) writes it; `lastmile doctor` and the System page (other
processes) read it. Its own small module so that the doctor reads one file without importing the
console's server (asyncio, ssl).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from uploader.whole_file import replace_whole

log = logging.getLogger(__name__)

RESTART_NEEDED_FILE = "console-restart-needed.json"
RESTART_COMMAND = "systemctl restart lastmile-console"


def save_restart_needed(data_dir: Path, names: list[str]) -> None:
    path = Path(data_dir) / RESTART_NEEDED_FILE
    if not names:
        path.unlink(missing_ok=True)
        return
    replace_whole(path, json.dumps(names).encode())


def restart_needed(data_dir: Path) -> list[str]:
    """The changed settings the running console has not taken (none when it was restarted since)."""
    try:
        names = json.loads((Path(data_dir) / RESTART_NEEDED_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:  # not a setting name: the next console start rewrites it
        log.warning("cannot read %s, taken as no setting waiting for a restart: %s", RESTART_NEEDED_FILE, exc)
        return []
    return [str(n) for n in names] if isinstance(names, list) else []
