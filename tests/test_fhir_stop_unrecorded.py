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
import datetime as dt
import sqlite3
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from lastmile.clinic.db import DB_NAME as CLINIC_DB
from lastmile.clinic.observations import OBSERVATION_KIND, ObservationStore, observation_payload
from lastmile.config import load_config
from lastmile.data_dir import open_outbox
from lastmile.reports.store import ReportStore, SentStudy
from tests.fhir_reports import diagnostic_report
from tests.fhir_samples import NAMING, T0, blood_pressure, queue_visits
from tests.fhir_server import FhirTestServer
from tests.medplum_fhir_server import UPSTREAM_TIMEOUT_S, MedplumFhirServer
from tests.service_harness import (
    FHIR_TOKEN,
    errors_said,
    fhir_token_file,
    log_tail,
    no_reading_center_toml,
    run_until,
    service_running,
    sigterm_and_wait,
    write_locked,
)
from tests.waiting import wait_for
from uploader.fhir_bundle import observation_key
from uploader.fhir_forwarder import enqueue_observation, forward_fhir_once
from uploader.fhir_sender import FhirSender, FhirSenderSettings
from uploader.outbox import DB_NAME, ItemState, Kind, Outbox

MINUTE = dt.timedelta(minutes=1)
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
{no_reading_center_toml()}[fhir]
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


def stopped_saying_no_error(first: subprocess.Popen[bytes], log: Path) -> str:
    """SIGTERM to the forward service (a write of it waiting for another process's lock): it exits
    0 within 30 s, and says nothing at ERROR and no traceback - an ordinary stop. Its log."""
    assert sigterm_and_wait(first) == 0, log_tail(log)
    journal = log.read_text(errors="replace")
    assert errors_said(journal) == [], journal[-3000:]
    return journal


def bundle_states(data_dir: Path) -> dict[str, str]:
    """The FHIR bundles' states by key, read as another process would."""
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / DB_NAME}?mode=ro", uri=True, timeout=30)) as conn:
        return dict(conn.execute("SELECT key, state FROM items WHERE kind = 'fhir-bundle'").fetchall())


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

        with service_running(cfg, "forward", log=log, before_the_stop=platform.may_answer.set) as first:
            wait_for(
                lambda: platform.applied_first.is_set() or first.poll() is not None,
                patience_s,
                what="the platform applying the bundles",
            )
            assert first.poll() is None, log_tail(log)
            with write_locked(data / DB_NAME):  # another process: acquire storing a reading, `lastmile patient` ...
                platform.may_answer.set()  # 200: the service's mark_sent waits for the lock
                time.sleep(1.5)
                assert sigterm_and_wait(first) == 0, log_tail(log)
        assert platform.stats.transactions == 1
        # not recorded as sent: their claims left to the next start, which sends them again
        assert bundle_states(data) == dict.fromkeys(keys, "sending"), bundle_states(data)
        stored_once = {kind: len(platform.resources(kind)) for kind in ("Encounter", "Observation", "Provenance")}
        assert stored_once == {"Encounter": 1, "Observation": 8 + 2, "Provenance": 1}, stored_once

        run_until(  # then its rounds: nothing more goes
            cfg,
            "forward",
            log=log,
            until=lambda: set(bundle_states(data).values()) <= {"committed", "purged"},
            what="the bundles recorded as taken by the platform",
            timeout=patience_s,
            then_s=1.0,
        )
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


def readings_sent_at(data_dir: Path) -> list[str | None]:
    """The relayed readings' records (the Sent page's): when the platform took each, as clinic.db says."""
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / CLINIC_DB}?mode=ro", uri=True, timeout=30)) as conn:
        return [r[0] for r in conn.execute("SELECT sent_at FROM sent_readings ORDER BY outbox_item_id")]


def test_readings_taken_whose_sent_time_a_stop_gave_up_are_said_at_info_and_recorded_by_the_next_start(
    tmp_path: Path,
) -> None:
    """The platform took the readings' bundles (the outbox records it), then their records' sent
    time waited for clinic.db's write lock (the console saving a check-in) and SIGTERM gave the
    wait up: the forward service said it with a traceback at ERROR (journald, the county's log
    shipping) at an ordinary stop. Now one line at INFO, and nothing is lost: the next start
    records the sent time of each (its first round's catch-up), and sends nothing again."""
    with OursAnswersWhenLocked() as platform:
        cfg = config_file(tmp_path, platform, 60.0)
        config = load_config(cfg)
        data, log = config.data_dir, tmp_path / "forward.log"
        with open_outbox(config) as outbox:
            store = ObservationStore.open(data, outbox=outbox, idle_timeout_s=900)
            try:
                store.context.set_patient("P-0007", "Wang^Fang", now=T0)
                for n in range(3):
                    reading = blood_pressure(T0 + n * MINUTE, None, f"bp-{n}")  # on the patient checked in
                    assert store.record(reading, now=T0 + (n + 1) * MINUTE).outcome == "stored"
            finally:
                store.close()

        with service_running(cfg, "forward", log=log, before_the_stop=platform.may_answer.set) as first:
            wait_for(
                lambda: platform.applied_first.is_set() or first.poll() is not None, 60, what="the platform applying"
            )
            assert first.poll() is None, log_tail(log)
            assert readings_sent_at(data) == [None] * 3  # relayed and recorded, not taken yet
            with write_locked(data / CLINIC_DB):  # the console saving: the records' write waits for it
                platform.may_answer.set()
                wait_for(
                    lambda: set(bundle_states(data).values()) == {"committed"} or first.poll() is not None,
                    30,
                    what="the bundles recorded taken in the outbox",
                )
                time.sleep(0.5)  # the readings' sent time waiting for clinic.db's lock
                journal = stopped_saying_no_error(first, log)
        assert "stopping: readings taken by the county platform recorded as sent at the next start" in journal
        assert readings_sent_at(data) == [None] * 3  # not recorded: the stop gave the write up

        run_until(
            cfg,
            "forward",
            log=log,
            until=lambda: None not in readings_sent_at(data),
            what="the readings' sent time recorded by the next start",
        )
        assert None not in readings_sent_at(data), log.read_text(errors="replace")[-3000:]
        assert platform.stats.transactions == 1, platform.stats  # nothing sent again


class SearchAnsweredWhenLocked(FhirTestServer):
    """The platform answering the report poller's first search only once the test has clinic.db's
    write lock (`may_answer`): the report it finds waits for the lock to be stored."""

    def __init__(self) -> None:
        super().__init__(token=FHIR_TOKEN)
        self.searched = threading.Event()
        self.may_answer = threading.Event()

    def search(self, kind: str, query: dict[str, list[str]]) -> dict:
        result = super().search(kind, query)
        if not self.searched.is_set():
            self.searched.set()
            self.may_answer.wait(HOLD_AT_THE_PLATFORM_S)
        return result


def stored_report_texts(data_dir: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / CLINIC_DB}?mode=ro", uri=True, timeout=30)) as conn:
        return [r[0] for r in conn.execute("SELECT text FROM reports")]


def test_a_report_whose_store_a_stop_gave_up_is_said_at_info_and_stored_by_the_next_start(tmp_path: Path) -> None:
    """The report poller found the county's report, and its store waited for clinic.db's write lock
    (the console saving a check-in) when SIGTERM gave the wait up: the poller said "ERROR report
    poller: cannot write its state (database is locked)" at an ordinary stop. Now one line at INFO,
    and nothing is lost: the next start asks again and stores the report."""
    study = "1.2.826.0.1.3680043.8.498.4242"
    with SearchAnsweredWhenLocked() as platform:
        cfg = config_file(tmp_path, platform, 60.0)
        cfg.write_text(cfg.read_text().replace('source = "off"', 'source = "fhir"'))
        data, log = load_config(cfg).data_dir, tmp_path / "forward.log"
        with ReportStore.open(data) as store:  # an ECG sent ten minutes ago: due for its routine round
            store.record_sent(SentStudy(study, dt.datetime.now(dt.timezone.utc) - 10 * MINUTE, patient_id="P1"))
        platform.put_resource(diagnostic_report(study))

        with service_running(cfg, "forward", log=log, before_the_stop=platform.may_answer.set) as first:
            wait_for(lambda: platform.searched.is_set() or first.poll() is not None, 60, what="the poller asking")
            assert first.poll() is None, log_tail(log)
            with write_locked(data / CLINIC_DB):  # the console saving: the report's store waits for it
                platform.may_answer.set()
                time.sleep(1.0)  # the report found, its store waiting for clinic.db's lock
                journal = stopped_saying_no_error(first, log)
        assert "report poller: stopping: what this round found is asked for again at the next start" in journal
        assert stored_report_texts(data) == []  # the stop gave its store up

        run_until(cfg, "forward", log=log, until=lambda: stored_report_texts(data), what="the report stored")
        assert [("Sinus rhythm" in text) for text in stored_report_texts(data)] == [True], log.read_text()[-3000:]


def observation_states(data_dir: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / DB_NAME}?mode=ro", uri=True, timeout=30)) as conn:
        return [r[0] for r in conn.execute("SELECT state FROM items WHERE kind = ? ORDER BY id", (OBSERVATION_KIND,))]


def test_readings_relayed_whose_record_a_stop_gave_up_are_said_at_info_and_recorded_by_the_next_start(
    tmp_path: Path,
) -> None:
    """Readings stored (acquire) while the console held clinic.db's write lock: the forward service
    relayed them, their Sent page records waited for the lock and SIGTERM gave the wait up - said
    with a traceback at ERROR at an ordinary stop. Now at INFO, and nothing is lost: the readings
    are put back (not marked relayed) and the next start relays them again (their bundles
    absorbed: sent once) and records each, with the time the platform took it."""
    with FhirTestServer(token=FHIR_TOKEN) as platform:
        cfg = config_file(tmp_path, platform, 60.0)
        config = load_config(cfg)
        data, log = config.data_dir, tmp_path / "forward.log"
        with service_running(cfg, "forward", log=log) as first:
            wait_for(lambda: "forward ready after" in log.read_text(errors="replace") or first.poll() is not None, 60)
            assert first.poll() is None, log_tail(log)
            with write_locked(data / CLINIC_DB):  # the console saving a check-in
                with open_outbox(config) as outbox:  # acquire storing three readings meanwhile
                    for n in range(3):
                        obs = blood_pressure(T0 + n * MINUTE, "P-0007", f"bp-{n}")
                        outbox.add(OBSERVATION_KIND, obs.record_key, observation_payload(obs), meta={"kind": obs.kind})
                wait_for(
                    lambda: "sending" in observation_states(data) or first.poll() is not None,
                    30,
                    what="the readings taken for the relay",
                )
                time.sleep(0.5)  # their records waiting for clinic.db's lock
                journal = stopped_saying_no_error(first, log)
        assert "stopping: 3 reading(s) relayed, their sent record written at the next start" in journal, journal[-3000:]
        assert readings_sent_at(data) == []  # no record: the stop gave the write up

        run_until(
            cfg,
            "forward",
            log=log,
            until=lambda: len(readings_sent_at(data)) == 3 and None not in readings_sent_at(data),
            what="the readings recorded, taken by the platform",
        )
        assert len(readings_sent_at(data)) == 3 and None not in readings_sent_at(data), log.read_text()[-3000:]
        assert platform.stats.transactions == 1, platform.stats  # the bundles the first took: absorbed
