"""Cached Debian root filesystems for the system tests (debootstrap, built once, reused).

The cache key is a hash of suite, architecture and package list, so changing the list builds a
new tree and reruns are fast. Cache location: $LASTMILE_TEST_CACHE, else ~/.cache/lastmile-test.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# What the nspawn test needs: an init, Python with venv, udev for `udevadm test`.
NSPAWN_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "udev", "procps")


def cache_dir() -> Path:
    base = os.environ.get("LASTMILE_TEST_CACHE") or Path.home() / ".cache" / "lastmile-test"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def rootfs_key(arch: str, packages: tuple[str, ...], suite: str = SUITE) -> str:
    text = "\n".join([suite, arch, MIRROR, *sorted(packages)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def debian_rootfs(packages: tuple[str, ...] = NSPAWN_PACKAGES, arch: str = "amd64",
                  suite: str = SUITE) -> Path:
    """A debootstrapped minbase tree with `packages`, built on first use (a few minutes)."""
    target = cache_dir() / f"rootfs-{suite}-{arch}-{rootfs_key(arch, packages, suite)}"
    if (target / ".complete").exists():
        return target
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    began = time.monotonic()
    subprocess.run(["debootstrap", "--variant=minbase", f"--arch={arch}",
                    "--include=" + ",".join(packages), suite, str(building), MIRROR],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Smaller and quieter: no apt lists or archives kept in the cache.
    shutil.rmtree(building / "var/cache/apt/archives", ignore_errors=True)
    (building / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    (building / ".complete").write_text(f"built in {time.monotonic() - began:.0f} s\n")
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)
    return target


if __name__ == "__main__":
    print(debian_rootfs())
