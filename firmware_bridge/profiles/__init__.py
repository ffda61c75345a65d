"""Built-in ASCII-report profiles (TOML), shipped with the package.

Profiles in `serial.profiles_dir` add to (and may override) these; `lastmile serial profiles`
lists them all.
"""

from __future__ import annotations

from pathlib import Path

PROFILES_DIR = Path(__file__).resolve().parent


def profile_files(extra_dir: str | Path | None = None) -> dict[str, Path]:
    """Profile name (file stem) -> file; an extra directory overrides a built-in of the same name."""
    found = {p.stem: p for p in sorted(PROFILES_DIR.glob("*.toml"))}
    if extra_dir:
        found.update({p.stem: p for p in sorted(Path(extra_dir).glob("*.toml"))})
    return found
