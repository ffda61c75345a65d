"""Operational faults: one clear line and a non-zero exit, never a traceback (issue 10, item 7).

Unusable data directories are real: a read-only bind mount (`unshare -m`) and a directory of
another user entered by root without its capabilities (`setpriv`), each in a child process.
Name resolution and routing faults are real too, inside the suite's private network namespace.
`lastmile demo --json` printing only the JSON object on stdout: tests/test_demo.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lastmile.cli import main as cli
from lastmile.config import parse_config
from lastmile.services.forward import ForwardService
from tests.conftest import REPO, missing, require_private_netns, require_tool

# Each writing command with what it needs; `{file}` is an existing file to import.
WRITERS = {
    "queue": ["queue"],
    "patient set": ["patient", "set", "P-1001"],
    "import": ["import", "{file}"],
    "visit start": ["visit", "start", "--patient", "P-1001", "--no-gps"],
}


def _config(tmp_path: Path, data_dir: Path, extra: str = "") -> Path:
    config = tmp_path / "lastmile.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{data_dir}"\n[visits]\ndoctor_id = "DR-1"\n[gps]\nsource = "none"\n{extra}'
    )
    return config


def _argv(tmp_path: Path, config: Path, command: str) -> list[str]:
    some_file = tmp_path / "recording.txt"
    some_file.write_text("not an ECG, never read: the data directory is refused first\n")
    return ["-c", str(config), *(a.replace("{file}", str(some_file)) for a in WRITERS[command])]


def _one_clear_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("lastmile:")]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


def _run(prefix: list[str], argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "lastmile", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _prepare_data_dir(data: Path) -> None:
    """A data directory with its databases, as the services leave it."""
    config = parse_config(f'[gateway]\ndata_dir = "{data}"\n')
    from lastmile.clinic.patients import PatientContext
    from lastmile.data_dir import open_outbox
    from lastmile.visits.book import VisitBook

    open_outbox(config).close()
    PatientContext.open(data, 900).close()
    VisitBook.open(data, gateway_id="gw").close()


# -- the data directory ------------------------------------------------------------------------


def _read_only_mount(data: Path) -> list[str]:
    """Run the command with `data` bind-mounted read-only in a private mount namespace."""
    require_tool("unshare")
    mount = f'mount --bind {data} {data} && mount -o remount,bind,ro {data} {data} && exec "$@"'
    return ["unshare", "-m", "sh", "-c", mount, "sh"]


def _owned_by_nobody(data: Path) -> list[str]:
    """nobody's directory, mode 0700, entered by root without CAP_DAC_OVERRIDE: permission denied."""
    require_tool("setpriv")
    os.chown(data, 65534, 65534)
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]


UNUSABLE = {
    "read-only": (_read_only_mount, ("read-only file system",)),
    "another user's": (_owned_by_nobody, ("no permission", "uid 65534", "run the command as the service user")),
}


@pytest.mark.parametrize("command", sorted(WRITERS))
@pytest.mark.parametrize("fault", sorted(UNUSABLE))
def test_an_unusable_data_dir_is_one_line_and_exit_1(tmp_path: Path, fault: str, command: str) -> None:
    if os.geteuid() != 0:
        missing("read-only mounts and dropping capabilities need root (the suite runs as root in CI)")
    data = tmp_path / "data"
    _prepare_data_dir(data)
    make_unusable, words = UNUSABLE[fault]
    prefix = make_unusable(data)
    proc = _run(prefix, _argv(tmp_path, _config(tmp_path, data), command))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = _one_clear_line(proc.stderr)
    assert all(w in line for w in words), line


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_a_data_dir_that_is_a_file_is_one_line_and_exit_1(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.write_text("someone wrote a file where the data directory belongs\n")
    assert cli(_argv(tmp_path, _config(tmp_path, data), command)) == 1
    assert "is not a directory" in _one_clear_line(capsys.readouterr().err)
    assert data.read_text().startswith("someone wrote")


def test_queue_on_a_fresh_machine_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "var" / "lib" / "lastmile"
    config = _config(tmp_path, data)
    assert cli(["-c", str(config), "queue"]) == 0
    captured = capsys.readouterr()
    assert "outbox: queued 0" in captured.out and "no outbox in" in captured.err
    assert cli(["-c", str(config), "queue", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["queued"] == 0
    for read_only in (["devices"], ["patient", "show"], ["echo", "127.0.0.1", "1"], ["doctor", "--offline"]):
        cli(["-c", str(config), *read_only])
    assert not (tmp_path / "var").exists()  # not even the parents


# -- names, routes and ports: `lastmile echo` says when the fault is this gateway's -------------


def test_echo_to_a_name_that_does_not_resolve(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["echo", "nosuchhost.invalid", "104"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "cannot resolve 'nosuchhost.invalid'" in captured.out
    assert "LOCAL FAULT (this gateway, not the reading center)" in captured.out
    assert "DNS" in captured.out


def test_echo_to_a_closed_port_of_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port certainly closed: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert cli(["echo", "127.0.0.1", str(port)]) == 1
    out = capsys.readouterr().out
    assert f"LOCAL FAULT (this gateway, not the reading center): nothing listens on port {port}" in out


def test_echo_without_a_route(capsys: pytest.CaptureFixture[str]) -> None:
    require_private_netns()  # only loopback here: 192.0.2.1 (TEST-NET-1) has no route, nothing is sent
    assert cli(["echo", "192.0.2.1", "104"]) == 1
    out = capsys.readouterr().out
    assert "LOCAL FAULT" in out and "no route from this gateway" in out


def test_echo_to_a_live_peer_that_refuses_us_is_not_called_local(
    scripted_scp_factory, capsys: pytest.CaptureFixture[str]
) -> None:
    scp = scripted_scp_factory(reject="permanent")
    assert cli(["echo", "127.0.0.1", str(scp.port), "-aec", scp.ae_title]) == 1
    out = capsys.readouterr().out
    assert "refuses this gateway" in out and "LOCAL" not in out


# -- the forward service with a reading center whose name does not resolve ---------------------


def test_forward_with_an_unresolvable_host_keeps_the_item_and_backs_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    config_file = _config(
        tmp_path, data, '[reading_center]\nhost = "nosuchhost.invalid"\nport = 104\nstorage_commitment = false\n'
    )
    config = parse_config(config_file.read_text(), str(config_file))
    from lastmile.data_dir import open_outbox

    with open_outbox(config) as outbox:
        outbox.add("dicom", "study-1", b"DICM-ish payload: never read, the association fails first")
    assert cli(["-c", str(config_file), "forward", "--once"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err and "retry 1" in captured.out
    # the service: several steps, never an exception, the item still queued with the reason
    service = ForwardService(config)
    try:
        for _ in range(3):
            service.step(threading.Event())
    finally:
        service.close()
    with open_outbox(config) as outbox:
        item = outbox.find("study-1")
    assert (
        item is not None
        and item.state.value == "queued"
        and "cannot resolve 'nosuchhost.invalid'" in (item.last_error or "")
    )
