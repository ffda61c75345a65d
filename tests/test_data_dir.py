"""The data directory and every file in it are private (0700/0600) whatever the umask (issue 10, item 4)."""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from lastmile.clinic.patients import PatientContext
from lastmile.config import parse_config
from lastmile.data_dir import OWN_ENTRIES, DataDirError, ensure_data_dir, open_outbox
from lastmile.visits.book import VisitBook


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)  # the worst case: whatever a process would create is world-readable
    yield
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def _use_every_store(data: Path) -> None:
    """What the services and commands write: outbox rows and a payload file, clinic.db, visits.db,
    the signing key; databases kept open so their -wal and -shm files exist when looked at."""
    config = parse_config(f'[gateway]\ndata_dir = "{data}"\n[outbox]\nmin_free_mb = 0\n')
    now = dt.datetime.now(dt.timezone.utc)
    with open_outbox(config) as outbox:
        outbox.add("dicom", "big", os.urandom(64 * 1024))  # above the inline limit: a payload file
        outbox.add("fhir-bundle", "small", b"{}")
        context = PatientContext.open(data, 900)
        context.set_patient("P-1", "Zhang^San", now=now)
        with VisitBook.open(data, gateway_id="gw") as book:
            assert book.signing_key is not None
            modes = _modes(data)
        context.close()
    names = set(modes)
    assert {"outbox.sqlite-wal", "outbox.sqlite-shm", "clinic.db-wal", "visits.db-wal", "locks"} <= names
    assert any(n.startswith("payloads/") and n.endswith(".bin") for n in names)  # the check is not vacuous
    loose = {name: f"{mode:04o}" for name, mode in modes.items() if mode & 0o077}
    assert not loose, f"readable by others: {loose}"


def test_every_file_is_private_even_with_umask_0(tmp_path: Path, open_umask: None) -> None:
    _use_every_store(tmp_path / "var" / "lib" / "lastmile")


def test_an_existing_data_dir_left_open_is_made_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    _use_every_store(data)  # creates everything
    for name in ("clinic.db", "outbox.sqlite", "payloads", "gateway_ed25519.pem"):
        os.chmod(data / name, 0o755 if (data / name).is_dir() else 0o644)
    os.chmod(data, 0o755)
    ensure_data_dir(data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert {
        n: stat.S_IMODE((data / n).stat().st_mode)
        for n in ("clinic.db", "outbox.sqlite", "payloads", "gateway_ed25519.pem")
    } == {"clinic.db": 0o600, "outbox.sqlite": 0o600, "payloads": 0o700, "gateway_ed25519.pem": 0o600}


def test_a_fresh_data_partition_root_is_made_private(tmp_path: Path) -> None:
    data = tmp_path / "lm-data"  # what mkfs.ext4 leaves: root 0755 with lost+found
    (data / "lost+found").mkdir(parents=True)
    os.chmod(data, 0o755)
    config = parse_config(f'[gateway]\ndata_dir = "{data}"\n[outbox]\nmin_free_mb = 0\n')
    open_outbox(config).close()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


def test_a_directory_that_is_not_ours_keeps_its_mode(tmp_path: Path) -> None:
    shared = tmp_path / "srv"
    shared.mkdir()
    os.chmod(shared, 0o755)
    (shared / "somebody-elses.txt").write_text("x")
    ensure_data_dir(shared)  # usable, but a mistyped data_dir must not take a system directory's permissions
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755


def test_a_world_writable_directory_is_refused(tmp_path: Path) -> None:
    tmp_like = tmp_path / "tmp"
    tmp_like.mkdir()
    os.chmod(tmp_like, 0o1777)
    with pytest.raises(DataDirError, match="shared with every user"):
        ensure_data_dir(tmp_like)


def test_own_entries_name_what_the_stores_create() -> None:
    from lastmile.clinic.db import DB_NAME as CLINIC_DB
    from lastmile.visits.book import DB_NAME as VISITS_DB
    from lastmile.visits.chain import KEY_FILE
    from uploader.outbox import DB_NAME as OUTBOX_DB
    from uploader.outbox import LOCKS_DIR, PAYLOAD_DIR

    assert set(OWN_ENTRIES) == {OUTBOX_DB, PAYLOAD_DIR, LOCKS_DIR, CLINIC_DB, VISITS_DB, KEY_FILE}
