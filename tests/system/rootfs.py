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


def rootfs_path(packages: tuple[str, ...] = NSPAWN_PACKAGES, arch: str = "amd64", suite: str = SUITE) -> Path:
    """Where the tree for these packages is cached (complete when it holds `.complete`)."""
    return cache_dir() / f"rootfs-{suite}-{arch}-{rootfs_key(arch, packages, suite)}"


def debian_rootfs(packages: tuple[str, ...] = NSPAWN_PACKAGES, arch: str = "amd64", suite: str = SUITE) -> Path:
    """A debootstrapped minbase tree with `packages`, built on first use (a few minutes, and the
    network: tests/system/assets.py fetches it before the suite's private network namespace)."""
    target = rootfs_path(packages, arch, suite)
    if (target / ".complete").exists():
        return target
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    began = time.monotonic()
    done = subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--arch={arch}",
            "--include=" + ",".join(packages),
            suite,
            str(building),
            MIRROR,
        ],
        check=False,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if done.returncode != 0:  # say why: "exit status 1" alone sent people hunting
        tail = "\n".join(done.stdout.splitlines()[-15:])
        raise RuntimeError(f"debootstrap {suite} {arch} failed ({done.returncode}):\n{tail}")
    # Smaller and quieter: no apt lists or archives kept in the cache.
    shutil.rmtree(building / "var/cache/apt/archives", ignore_errors=True)
    (building / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    (building / ".complete").write_text(f"built in {time.monotonic() - began:.0f} s\n")
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)
    return target


if __name__ == "__main__":
    print(debian_rootfs())
