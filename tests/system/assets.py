"""What the system tests need from the network, fetched before the suite enters its private
network namespace (scripts/test.sh runs pytest under `unshare -n`: no DNS, no mirror, no PyPI).

- the nspawn test's Debian root filesystem (rootfs.py: debootstrap, cached);
- the wheels Lastmile is installed from inside the container: its dependencies for amd64
  (image/wheelhouse.py's cache) and the build requirements of our own wheel
  (pyproject.toml [build-system]), so the wheelhouse is built in the namespace with `--no-index`.

    python -m tests.system.assets        (root; scripts/fetch-test-assets runs it)

Everything is cached (rootfs.cache_dir(), image/wheelhouse.py's cache_root()): a warm run takes
well under a second and touches no network.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import ModuleType

from tests.system.rootfs import NSPAWN_PACKAGES, cache_dir, debian_rootfs, rootfs_path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
WHEELHOUSE_SCRIPT = REPO / "image" / "wheelhouse.py"
ARCH = "amd64"  # the nspawn container runs on the host's architecture


def _wheelhouse_module() -> ModuleType:
    # image/ is a folder of build scripts, not a package: load the script as a module
    spec = importlib.util.spec_from_file_location("lastmile_image_wheelhouse", WHEELHOUSE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_requirements() -> list[str]:
    return list(tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"])


def build_requirements_dir() -> Path:
    key = hashlib.sha256("\n".join(sorted(build_requirements())).encode()).hexdigest()[:16]
    return cache_dir() / f"build-requirements-{key}"


def fetch_build_requirements() -> Path:
    target = build_requirements_dir()
    if (target / ".complete").exists():
        return target
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--dest",
            str(building),
            *build_requirements(),
        ],
        check=True,
    )
    (building / ".complete").write_text("\n".join(build_requirements()) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)
    return target


def offline_pip_env() -> dict[str, str]:
    """Environment for image/wheelhouse.py inside the namespace: wheels from the caches only."""
    return {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(build_requirements_dir())}


def rootfs_cached() -> bool:
    return (rootfs_path(NSPAWN_PACKAGES, ARCH) / ".complete").exists()


def fetch() -> dict[str, float]:
    """Fetch (or find cached) everything above; seconds each part took.

    Several checkouts on one machine share the caches: one fetches, the others wait for it
    (each builder first clears its half-built directory, so two at once would undo each other)."""
    took: dict[str, float] = {}
    with open(cache_dir() / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, step in (
            ("nspawn rootfs", lambda: debian_rootfs(NSPAWN_PACKAGES, ARCH)),
            ("dependency wheels", lambda: _wheelhouse_module().dependency_wheels(ARCH, [sys.executable, "-m", "pip"])),
            ("build requirements", fetch_build_requirements),
        ):
            began = time.monotonic()
            step()
            took[name] = time.monotonic() - began
    return took


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if os.geteuid() != 0:
        log.info("fetch-test-assets: not root: no nspawn rootfs (the system tests need root anyway)")
        return 0
    if shutil.which("debootstrap") is None:
        log.error("fetch-test-assets: debootstrap is missing (scripts/setup.sh --test installs it)")
        return 1
    took = fetch()
    log.info(
        "fetch-test-assets: system test assets ready: %s",
        ", ".join(f"{name} {seconds:.1f} s" for name, seconds in took.items()),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
