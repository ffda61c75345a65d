"""A slower CPU for one sender: its processes get a share of one core (a CPU cgroup's quota).

A Raspberry-Pi-class gateway runs Python several times slower than the machine the benchmarks run
on. Giving the sender a quarter of a core (`--cpu-share 0.25`) is the nearest this machine comes:
the same code, the same link, the same peer, with the sender's CPU the scarce thing. The quota is
counted over short periods (10 ms), so a throttled process waits milliseconds, not a whole
scheduler period, as a slow CPU would keep it waiting. Not a Pi: no slower memory or SD card, and
the peer (Orthanc) and the link relay keep the whole machine.

    with CpuShare(0.25, "lastmile") as share:
        subprocess.run(share.wrap(["storescu", ...]))

Needs root and a writable CPU controller (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

PERIOD_US = 10_000
CGROUP_ROOT = Path("/sys/fs/cgroup")


class CpuShare:
    def __init__(self, share: float, name: str) -> None:
        if not 0.01 <= share <= 64:
            raise ValueError(f"a CPU share of {share} cores")
        self.share = share
        self.name = f"lastmile-bench-{name}-{os.getpid()}"
        self.path: Path | None = None

    def __enter__(self) -> CpuShare:
        quota = max(1000, int(self.share * PERIOD_US))
        if (CGROUP_ROOT / "cgroup.controllers").exists():  # cgroup v2
            if "cpu" not in (CGROUP_ROOT / "cgroup.subtree_control").read_text().split():
                (CGROUP_ROOT / "cgroup.subtree_control").write_text("+cpu")
            self.path = CGROUP_ROOT / self.name
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        elif (CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us").exists():  # cgroup v1
            self.path = CGROUP_ROOT / "cpu" / self.name
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            raise RuntimeError("no writable CPU cgroup controller here: --cpu-share cannot be given")
        return self

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run inside the share from its first instruction (its threads and children too)."""
        assert self.path is not None, "use CpuShare as a context manager"
        procs = self.path / "cgroup.procs"
        sh = shutil.which("sh") or "/bin/sh"
        return [sh, "-c", f'echo $$ > {procs} && exec "$@"', "sh", *argv]

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            # processes left in it (a killed sender's): moved out, or the group cannot be removed
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    (self.path.parent / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            self.path.rmdir()
            self.path = None
