"""uploader.whole_file.replace_whole: the one way a small file is replaced whole (update state, the console's
certificate and key, the settings waiting for a console restart), with each file's mode kept."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lastmile.console.pending_restart import RESTART_NEEDED_FILE, restart_needed, save_restart_needed
from lastmile.console.tls import ensure_certificate
from lastmile.services.update import UpdateState
from uploader.whole_file import replace_whole


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Sets the process umask for the test; the old one back afterwards."""
    old = os.umask(0o022)

    def set_umask(mask: int) -> None:
        os.umask(mask)

    yield set_umask
    os.umask(old)


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_the_consoles_key_and_certificate_stay_readable_by_their_owner_only(
    tmp_path: Path, umask: Callable[[int], None]
) -> None:
    """Whatever the umask the console starts under, its private key is 0600."""
    umask(0)
    cert = ensure_certificate(tmp_path)
    assert mode_of(cert.key_path) == 0o600 and mode_of(cert.cert_path) == 0o600
    assert b"PRIVATE KEY" in cert.key_path.read_bytes()
    assert sorted(p.name for p in cert.key_path.parent.iterdir()) == ["cert.pem", "key.pem"]  # no temporary file left


def test_a_leftover_temporary_file_does_not_lend_its_mode(tmp_path: Path) -> None:
    """A power cut left the temporary file of an earlier write, world-readable: the key written
    through it is 0600 all the same."""
    path = tmp_path / "key.pem"
    leftover = tmp_path / ".key.pem.tmp"
    leftover.write_bytes(b"torn")
    leftover.chmod(0o644)
    replace_whole(path, b"secret", mode=0o600)
    assert path.read_bytes() == b"secret" and mode_of(path) == 0o600
    assert not leftover.exists()


def test_the_update_state_is_world_readable_whatever_the_umask(tmp_path: Path, umask: Callable[[int], None]) -> None:
    umask(0o077)
    path = tmp_path / "state.json"
    UpdateState(refused={"ab": "bad signature"}).save(path)
    assert mode_of(path) == 0o644
    assert UpdateState.load(path).refused == {"ab": "bad signature"}


def test_the_settings_waiting_for_a_restart_are_written_as_the_umask_says(
    tmp_path: Path, umask: Callable[[int], None]
) -> None:
    umask(0o027)
    save_restart_needed(tmp_path, ["ble", "console.listen"])
    assert mode_of(tmp_path / RESTART_NEEDED_FILE) == 0o640
    assert json.loads((tmp_path / RESTART_NEEDED_FILE).read_text()) == ["ble", "console.listen"]
    assert restart_needed(tmp_path) == ["ble", "console.listen"]
    save_restart_needed(tmp_path, [])
    assert restart_needed(tmp_path) == [] and not (tmp_path / RESTART_NEEDED_FILE).exists()


def test_a_write_that_fails_leaves_the_old_copy(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        replace_whole(path, "not bytes", mode=0o644)  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
