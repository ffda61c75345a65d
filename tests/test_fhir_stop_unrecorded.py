"""Bundles the county platform took whose "sent" the forward service could not record before a stop
are NOT sent again by the next start: recorded taken (sent and committed) from the note beside the
owner's lock (`Outbox.remember_stored`), as an ECG the PACS stored is.

The FHIR twin of tests/test_forward_stop_unrecorded.py (an ECG the PACS stored). The real
`lastmile forward` process, the suite's FHIR test server (tests/fhir_server.py: it applies a
transaction's conditional creates as a platform does, `ifNoneExist` matched -> 200, not created
again) and Medplum, and a second connection holding the outbox's write lock from the moment the
platform has applied the transaction, through its 200, until the service has stopped: `mark_taken`
waits for the lock, SIGTERM comes, the stop gives the wait up, the settle and the close find the
lock held too. The claims are left to the next start.

That start sent the bundles again: harmless (every entry of a visit's and a reading's bundle is a
conditional create on the identifier minted at capture, uploader/fhir_bundle.py `_entry`: the
platform matched them and created nothing), but one more transaction's bytes on a metered link.
Now it records them taken and sends nothing: the platform got one transaction.

The lock taken one write later - between `mark_sent` and `mark_committed`, when the platform's
answer was recorded in two transactions - left the bundles "sent" for ever (never purged): now one
transaction (`Outbox.mark_taken`).
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from lastmile.config import load_config
from lastmile.data_dir import open_outbox
from tests.fhir_samples import NAMING, T0, blood_pressure, queue_visits
from tests.fhir_server import FhirTestServer
from tests.medplum_fhir_server import UPSTREAM_TIMEOUT_S, MedplumFhirServer
from tests.peers import free_port
from tests.service_harness import FHIR_TOKEN, fhir_token_file, start, stop
from tests.waiting import wait_for
from uploader.fhir_bundle import observation_key
from uploader.fhir_forwarder import enqueue_observation, forward_fhir_once
from uploader.fhir_sender import FhirSender, FhirSenderSettings
from uploader.outbox import DB_NAME, ItemState, Kind, Outbox

HOLD_AT_THE_PLATFORM_S = 60.0  # the platform waits at most this for the test's lock (never forever)


class AnswersWhenLocked:
    """The platform applying the first transaction at once, then holding its 200 until the test
    has the outbox's write lock (`may_answer`); later transactions are answered at once."""

    def __init__(self) -> None:
        super().__init__(token=FHIR_TOKEN)  # type: ignore[call-arg]  # the FHIR server it is mixed into
        self.applied_first = threading.Event()
        self.may_answer = threading.Event()

    def apply_transaction(self, bundle: dict) -> dict:
        result: dict = super().apply_transaction(bundle)  # type: ignore[misc]
        if not self.applied_first.is_set():
            self.applied_first.set()
            self.may_answer.wait(HOLD_AT_THE_PLATFORM_S)
        return result


class OursAnswersWhenLocked(AnswersWhenLocked, FhirTestServer):
    pass


class MedplumAnswersWhenLocked(AnswersWhenLocked, MedplumFhirServer):
    """Medplum's FhirRouter decides the conditional creates: someone else's reading of FHIR R4."""


def config_file(tmp_path: Path, platform: FhirTestServer, timeout_s: float) -> Path:
    """Readings and visits to `platform`; no reading center listens (no ECG here)."""
    path = tmp_path / "lastmile.toml"
    path.write_text(
        f"""
[gateway]
id = "{NAMING.gateway_id}"
data_dir = "{tmp_path / "data"}"
[reading_center]
host = "127.0.0.1"
port = {free_port()}
listen_port = {free_port()}
listen_host = "127.0.0.1"
storage_commitment = false
[fhir]
base_url = "{platform.base_url}"
token_file = "{fhir_token_file(tmp_path)}"
timeout_s = {timeout_s}
[outbox]
backoff_base_s = 0.1
backoff_max_s = 0.5
min_free_mb = 0
[reports]
source = "off"
"""
    )
    return path


def bundle_states(data_dir: Path) -> dict[str, str]:
    """The FHIR bundles' states by key, read as another process would."""
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / DB_NAME}?mode=ro", uri=True, timeout=30)) as conn:
        return dict(conn.execute("SELECT key, state FROM items WHERE kind = 'fhir-bundle'").fetchall())


@contextlib.contextmanager
def write_locked(data_dir: Path) -> Iterator[None]:
    """Another process's write transaction on outbox.sqlite (acquire storing a reading, `lastmile
    patient` ...), held for as long as the block runs."""
    conn = sqlite3.connect(data_dir / DB_NAME, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


@pytest.mark.parametrize("server_class", [OursAnswersWhenLocked, MedplumAnswersWhenLocked], ids=["ours", "medplum"])
def test_bundles_the_platform_took_whose_taking_a_stop_could_not_record_are_not_sent_again(
    tmp_path: Path, server_class: type[OursAnswersWhenLocked | MedplumAnswersWhenLocked]
) -> None:
    # Medplum's in-memory search makes a transaction take seconds (~50 s at load 30: tests/medplum_fhir_server.py)
    patience_s = 60.0 if server_class is OursAnswersWhenLocked else UPSTREAM_TIMEOUT_S
    with server_class() as platform:
        cfg = config_file(tmp_path, platform, patience_s)
        config = load_config(cfg)
        reading = blood_pressure(T0, "P-0007", "bp-own")
        with open_outbox(config) as outbox:
            [visit_id] = queue_visits(outbox, range(1))  # a home visit: Encounter, 8 Observations, Provenance ...
            enqueue_observation(outbox, reading, NAMING)  # a reading on its own: its BP panel and pulse rate
        keys = {f"fhir:visit:{visit_id}", observation_key(reading, NAMING)}
        data, log = config.data_dir, tmp_path / "forward.log"

        first = start(cfg, "forward", log=log)
        try:
            wait_for(
                lambda: platform.applied_first.is_set() or first.poll() is not None,
                patience_s,
                what="the platform applying the bundles",
            )
            assert first.poll() is None, log.read_text(errors="replace")[-3000:]
            with write_locked(data):
                platform.may_answer.set()  # 200: the service's mark_sent waits for the lock
                time.sleep(1.5)
                first.send_signal(signal.SIGTERM)
                stopped_by = time.monotonic() + 30
                while first.poll() is None and time.monotonic() < stopped_by:
                    time.sleep(0.1)
                assert first.poll() == 0, log.read_text(errors="replace")[-3000:]
        finally:
            platform.may_answer.set()
            stop(first)
        assert platform.stats.transactions == 1
        # not recorded as sent: their claims left to the next start, which sends them again
        assert bundle_states(data) == dict.fromkeys(keys, "sending"), bundle_states(data)
        stored_once = {kind: len(platform.resources(kind)) for kind in ("Encounter", "Observation", "Provenance")}
        assert stored_once == {"Encounter": 1, "Observation": 8 + 2, "Provenance": 1}, stored_once

        second = start(cfg, "forward", log=log)
        try:
            wait_for(
                lambda: set(bundle_states(data).values()) <= {"committed", "purged"} or second.poll() is not None,
                patience_s,
                what="the bundles recorded as taken by the platform",
            )
            time.sleep(1.0)  # rounds of the new process: nothing more goes
        finally:
            stop(second)
        journal = log.read_text(errors="replace")
        assert set(bundle_states(data).values()) <= {"committed", "purged"}, (bundle_states(data), journal[-3000:])
        # recorded taken from the note the first process left, not sent again: one transaction
        assert platform.stats.transactions == 1, (platform.stats, journal[-3000:])
        assert platform.applied[visit_id] == 1, platform.applied
        assert "2 item(s) the peer stored before the last stop recorded as sent, not sent again" in journal
        assert {kind: len(platform.resources(kind)) for kind in stored_once} == stored_once
        assert platform.identifiers("Encounter") == [visit_id]
        observation_ids = platform.identifiers("Observation")
        assert len(set(observation_ids)) == len(observation_ids), observation_ids


class LockedOnceWritten(Outbox):
    """The outbox, and another process (acquire storing a reading, a sqlite3 shell) taking its
    write lock right after the platform's answer was first written: between `mark_sent` and
    `mark_committed`, when they were two transactions. Held until `unlock`."""

    other: sqlite3.Connection | None = None
    unlocked = False  # once: the next start's rounds write freely

    def mark_sent(self, item_ids: Sequence[int], now: float) -> None:
        super().mark_sent(item_ids, now)
        self._then_locked()

    def mark_taken(self, item_ids: Sequence[int], now: float) -> None:
        super().mark_taken(item_ids, now)
        self._then_locked()

    def _then_locked(self) -> None:
        if self.other is None and not self.unlocked:
            self.other = sqlite3.connect(self.data_dir / DB_NAME, timeout=30, isolation_level=None)
            self.other.execute("BEGIN IMMEDIATE")

    def unlock(self) -> None:
        if self.other is not None:
            self.other.close()  # its transaction rolled back
            self.other = None
        self.unlocked = True


def test_bundles_the_platform_took_never_stay_sent_for_ever_when_a_lock_cuts_their_recording(tmp_path: Path) -> None:
    """The platform's 200 was recorded in two transactions: `mark_sent`, then `mark_committed`.
    Another process's write lock taken between them, a stop: the second was given up, and the
    bundles stayed "sent" - a state nothing moves a FHIR bundle out of (no commitment comes for
    it, recovery and claim take only sending and queued items): never purged (the visit's patient
    data kept on the SD card past its retention), for ever. Now one transaction (`mark_taken`)."""
    data = tmp_path / "data"
    outbox = LockedOnceWritten.open(data, min_free_bytes=0)
    [visit_id] = queue_visits(outbox, range(1))
    enqueue_observation(outbox, blood_pressure(T0, "P-0007", "bp-own"), NAMING, now=1500.0)
    stopping = threading.Event()
    outbox.give_up_waits_on(stopping)
    stopping.set()  # SIGTERM came while the platform was applying the transaction
    try:
        with FhirTestServer() as platform, FhirSender(FhirSenderSettings(base_url=platform.base_url)) as sender:
            with pytest.raises(sqlite3.OperationalError):  # a write after the lock was taken: given up
                forward_fhir_once(outbox, sender, 2000.0)
            outbox.close()  # the stop
            outbox.unlock()

            with Outbox.open(data, min_free_bytes=0) as again:  # the next start
                for now in (3000.0, 3001.0, 3002.0):
                    forward_fhir_once(again, sender, now)
                again.purge_due(3003.0, 0.0)
                states = {i.key: i.state for i in again.items(kind=Kind.FHIR_BUNDLE)}
            assert set(states.values()) == {ItemState.PURGED}, states
            assert platform.identifiers("Encounter") == [visit_id]
    finally:
        outbox.unlock()
