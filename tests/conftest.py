"""Shared test plumbing: third-party files in ../shared, external tools, private network namespace."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout; LASTMILE_SHARED points elsewhere (a git worktree has no ../shared)
SHARED = Path(os.environ.get("LASTMILE_SHARED") or os.environ.get("LASTMILE_SHARED_DIR") or REPO.parent / "shared")
IN_CI = os.environ.get("CI", "").lower() == "true"


def _worker_port_slice() -> None:
    """Parallel workers (pytest-xdist) share one network namespace: each picks its servers' ports
    from its own slice of the free range (lastmile.demo.loopback.port_range), so a port one worker
    picked is never picked by another while its server restarts (seen once: a forward service
    killed and restarted 22 times found its commitment port taken)."""
    from lastmile.demo.loopback import FREE_PORT_RANGE

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or "LASTMILE_PORT_RANGE" in os.environ:
        return
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    index = int(worker[2:]) % count
    width = (FREE_PORT_RANGE[1] - FREE_PORT_RANGE[0] + 1) // count
    low = FREE_PORT_RANGE[0] + index * width
    os.environ["LASTMILE_PORT_RANGE"] = f"{low}-{low + width - 1}"


_worker_port_slice()


def missing(reason: str, *, module: bool = False) -> None:
    """Skip locally, fail in CI: CI must run everything. The only skip in the suite
    (tests/test_suite_hygiene.py checks): `module=True` skips a whole test module."""
    if IN_CI:
        pytest.fail(f"required under CI: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        missing(f"third-party test file {path} is absent (../shared not checked out beside the repo)")
    return path


def require_tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        missing(f"{name} is not installed (run scripts/test.sh, which installs it)")
    assert found
    return found


def on_private_tmpfs(mnt: Path, size: str, script: str, *args: str) -> list[str]:
    """The command running `python -c script mnt *args` in a private mount namespace with a
    tmpfs of `size` (e.g. "16m") on `mnt`: a real partition to fill. Missing where no tmpfs can be
    mounted (not root, or root without the right to mount)."""
    require_tool("unshare")
    if os.geteuid() != 0:
        missing("mounting a private tmpfs needs root")
    # root is not enough: a container without CAP_SYS_ADMIN (or with mounts denied) refuses it
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        missing(f"cannot mount tmpfs here: {probe.stderr.strip()}")
    mount = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh", size, str(mnt)] + [
        sys.executable,
        "-c",
        script,
        str(mnt),
        *args,
    ]


def run_on_private_tmpfs(
    mnt: Path, size: str, script: str, *args: str, timeout_s: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """`on_private_tmpfs`'s command run from the repository, to its end."""
    return subprocess.run(
        on_private_tmpfs(mnt, size, script, *args),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout_s,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def run_python(script: str, *args: object, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """`python -c script *args` from the repository, to its end (or its death: a SIGKILL the
    script sends itself at the moment under test shows as returncode -9)."""
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def fill_to_the_last_block(path: Path, *, leave: int = 0) -> None:
    """Write the file `path` until its partition has not one block left (ENOSPC), or only about
    `leave` bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            st = os.statvfs(path)
            if leave and st.f_bavail * st.f_frsize <= leave:
                return
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)


def require_module(name: str, reason: str) -> None:
    """Skip locally (fail in CI) when an optional extra such as bumble is not installed."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        missing(f"{name} is not installed: {reason}")


def in_private_netns() -> bool:
    """True when the only network interface is loopback (scripts/test.sh runs pytest under unshare -n)."""
    import socket

    # if_nameindex asks the current namespace (sysfs may still show the host's interfaces)
    try:
        return {name for _i, name in socket.if_nameindex()} <= {"lo"}
    except OSError:
        return False


def require_private_netns() -> None:
    if not in_private_netns():
        missing(
            "Orthanc listens on every interface: run the tests through scripts/test.sh (a private network namespace)"
        )


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        missing("../shared (third-party ECG and GNSS files) is absent")
    return SHARED


@pytest.fixture(autouse=True)
def restored_logging() -> Iterator[None]:
    """`lastmile.cli.main()` (and a service's `configure_logging`) points the root logger at the
    captured stderr of the test that ran it, closed once that test ends: every later record from any
    thread then failed with "--- Logging error ---" (on the real stderr when it fell between two
    tests). For every test: drop such a handler left by an earlier one (pytest's own are
    subclasses), and put the root logger back as it was afterwards."""
    import logging

    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if type(h) is not logging.StreamHandler]
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One headless Chromium (tests/console_browser.py) for a test module's page tests: starting
    one takes seconds on two busy cores, so the module's tests share it."""
    from tests.console_browser import chromium  # it imports this module

    with chromium() as driver:
        yield driver


# Real DICOM peers (Orthanc, storescp, scripted SCP) as fixtures for every test module.
pytest_plugins = ["tests.peers"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """Report a failure even when pytest cannot render it.

    CPython 3.11 before 3.11.8 can raise `SystemError: AST constructor recursion depth mismatch` from
    the `ast.parse` pytest runs to show a failing test's source (cpython#106905): the whole run then
    ends in INTERNALERROR and the failing test is never named. Fall back to a plain traceback.
    """
    try:
        return (yield)
    except SystemError as exc:
        if "recursion depth mismatch" not in str(exc):
            raise
        error = call.excinfo.value if call.excinfo else exc
        frames = traceback.extract_tb(error.__traceback__)  # no source parsing, unlike format_tb
        text = "\n".join(f"  {f.filename}:{f.lineno} in {f.name}" for f in frames)
        longrepr = f"{text}\n{type(error).__name__}: {error}\n(pytest could not render this failure: {exc})"
        return pytest.TestReport(
            item.nodeid,
            item.location,
            dict.fromkeys(item.keywords, 1),
            "failed",
            longrepr,
            call.when,
            duration=call.duration,
            start=call.start,
            stop=call.stop,
        )
