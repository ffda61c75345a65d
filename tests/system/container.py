"""A booted Debian container for system tests: systemd-nspawn -b over an overlay of a cached rootfs.

The cached tree (tests/system/rootfs.py) stays pristine: each test writes into an overlay upper
directory that is thrown away. Commands run inside with nsenter into the container's namespaces
(--register=no means no machinectl). --private-network: the container has only its own loopback,
so its services never collide with ports on the host.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path


class Container:
    def __init__(self, lower: Path, work: Path) -> None:
        self.lower = lower
        self.work = work
        self.upper = work / "upper"
        self.root = work / "merged"
        self._ovl = work / "ovlwork"
        self.proc: subprocess.Popen[bytes] | None = None
        self.console = work / "console.log"
        self._mounted = False

    # -- the file system ---------------------------------------------------------------------------

    def mount(self) -> None:
        for d in (self.upper, self.root, self._ovl):
            d.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={self.lower},upperdir={self.upper},workdir={self._ovl}",
                str(self.root),
            ],
            check=True,
        )
        self._mounted = True

    def unmount(self) -> None:
        if self._mounted:
            subprocess.run(["umount", "-l", str(self.root)], check=False)
            self._mounted = False
        shutil.rmtree(self.work, ignore_errors=True)

    def write(self, path: str, text: str, mode: int = 0o644) -> Path:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
        return target

    def run_offline(self, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run a command in the (not booted) container, e.g. to install software."""
        return subprocess.run(
            [
                "systemd-nspawn",
                "-q",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "-D",
                str(self.root),
                "--pipe",
                "--",
                *cmd,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    # -- booting ------------------------------------------------------------------------------------

    def boot(self, timeout: float = 120) -> float:
        """Boot it; returns seconds until `systemctl is-system-running --wait` answered."""
        began = time.monotonic()
        log = self.console.open("wb")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-q", "-b", "--register=no", "--keep-unit", "--private-network", "-D", str(self.root)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}: {self.console.read_text()[-3000:]}")
            if self.leader() is not None:
                r = self.exec(
                    "systemctl",
                    "is-system-running",
                    "--wait",
                    timeout=max(1.0, deadline - time.monotonic()),
                    check=False,
                )
                if r.stdout.strip() in ("running", "degraded"):
                    return time.monotonic() - began
            time.sleep(0.2)
        raise TimeoutError("the container did not boot in time")

    def leader(self) -> int | None:
        """PID (on the host) of the container's init."""
        if self.proc is None:
            return None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        for pid in children:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except OSError:
                continue
        return None

    def exec(
        self, *cmd: str, timeout: float = 60, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        leader = self.leader()
        if leader is None:
            raise RuntimeError("container not running")
        r = subprocess.run(
            [
                "nsenter",
                "-t",
                str(leader),
                "-m",
                "-u",
                "-i",
                "-n",
                "-p",
                "-C",
                "--root",
                "--wd=/",
                "--",
                "/usr/bin/env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
                *cmd,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"{cmd} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def show(self, unit: str, *props: str) -> dict[str, str]:
        r = self.exec("systemctl", "show", unit, "-p", ",".join(props))
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def wait_for(self, what: str, predicate, timeout: float = 60, interval: float = 0.3):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out waiting for {what} (last: {last!r})")

    def journal(self, unit: str) -> str:
        return self.exec("journalctl", "-u", unit, "--no-pager", "-o", "cat", check=False).stdout

    def poweroff(self, timeout: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # nspawn turns SIGTERM into an orderly shutdown of the container's systemd.
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
