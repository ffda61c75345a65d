"""Readings recorded for a known patient reach the county platform, once, with their units.

Before the relay the outbox kept them (kind "observation") and nothing ever sent that kind:
every BLE and serial reading stayed on the gateway, silently (found by the soak).
"""

from __future__ import annotations

import collections
import datetime as dt
import signal
import textwrap
from pathlib import Path

from devices.identity import DeviceIdentity, TimeSource
from devices.observation import Observation, Quantity
from lastmile.clinic.observations import OBSERVATION_KIND, ObservationStore
from lastmile.services.observation_relay import relay_observations
from tests.fhir_server import FhirTestServer
from uploader.fhir_bundle import FhirNaming
from uploader.fhir_forwarder import forward_fhir_once
from uploader.fhir_sender import FhirSender, FhirSenderSettings
from uploader.outbox import ItemState, Kind, Outbox

T0 = dt.datetime(2026, 6, 1, 9, 0, tzinfo=dt.timezone.utc)
MIN = dt.timedelta(minutes=1)
NAMING = FhirNaming(gateway_id="relay-test-gw")
CUFF = DeviceIdentity("Acme", "BP-1", "42", "AA:BB:CC:DD:EE:01")


def bp(measured_at: dt.datetime, systolic: float) -> Observation:
    return Observation(
        kind="blood-pressure",
        quantities=(
            Quantity("systolic", systolic, "mm[Hg]", systolic, "mm[Hg]"),
            Quantity("diastolic", 80.0, "mm[Hg]", 80.0, "mm[Hg]"),
        ),
        measured_at=measured_at,
        time_source=TimeSource.DEVICE_CLOCK,
        received_at=measured_at + MIN,
        device=CUFF,
        record_key=f"relay-test:{measured_at.isoformat()}",
    )


def record_three(tmp_path: Path) -> tuple[Outbox, ObservationStore]:
    outbox = Outbox.open(tmp_path, min_free_bytes=0)
    store = ObservationStore.open(tmp_path, outbox=outbox, idle_timeout_s=900)
    store.context.set_patient("P-1", "Wang^Fang", now=T0)
    assert store.record(bp(T0 + MIN, 131), now=T0 + 2 * MIN).outcome == "stored"
    store.context.set_patient("P-2", "Li^Lei", now=T0 + 3 * MIN)
    assert store.record(bp(T0 + 4 * MIN, 152), now=T0 + 5 * MIN).outcome == "stored"
    assert store.record(bp(T0 + 6 * MIN, 118), now=T0 + 7 * MIN).outcome == "stored"
    return outbox, store


def systolic_by_patient(server: FhirTestServer) -> dict[str, list[float]]:
    """Systolic values per patient identifier, as the platform stored them (with their units)."""
    found: dict[str, list[float]] = {}
    for obs in sorted(server.resources("Observation"), key=lambda o: o["effectiveDateTime"]):
        for component in obs.get("component", []):
            if component["code"]["coding"][0]["code"] == "8480-6":  # LOINC systolic
                quantity = component["valueQuantity"]
                assert quantity["code"] == "mm[Hg]" and quantity["system"] == "http://unitsofmeasure.org"
                found.setdefault(obs["subject"]["identifier"]["value"], []).append(quantity["value"])
    return found


def test_readings_reach_the_platform_once_on_their_patients(tmp_path: Path) -> None:
    outbox, store = record_three(tmp_path)
    now = (T0 + 10 * MIN).timestamp()
    with FhirTestServer() as server, FhirSender(FhirSenderSettings(base_url=server.base_url)) as sender:
        assert relay_observations(outbox, NAMING, now) == 3
        assert relay_observations(outbox, NAMING, now) == 0  # nothing waits twice
        result = forward_fhir_once(outbox, sender, now)
        assert result.sent == 3 and not result.quarantined
        by_patient = systolic_by_patient(server)
        assert len(server.resources("Observation")) == 3
    assert by_patient == {"P-1": [131.0], "P-2": [152.0, 118.0]}, by_patient
    # the readings are done (committed: purged after retention like everything else)
    states = {i.state for i in outbox.items(kind=OBSERVATION_KIND)}
    assert states == {ItemState.COMMITTED}
    store.close()
    outbox.close()


def test_readings_go_on_when_their_sent_record_is_refused_and_are_recorded_later(tmp_path: Path) -> None:
    """The Sent page's record of the readings (clinic.db) refused - busy past its timeout - holds
    nothing back: their bundles are queued. But the readings were marked done without it: the Sent
    page said 已发送 before the platform took them, and once the outbox purged them it listed them
    no more. They wait, unmarked, for a later round that writes their record."""
    import sqlite3

    from lastmile.reports.sent_readings import sent_reading_of
    from lastmile.reports.store import ReportStore
    from lastmile.services.observation_relay import RELAY_RETRY_S, Relayed
    from uploader.fhir_bundle import observation_key

    def refused(relayed: list[Relayed], now: float) -> None:
        raise sqlite3.OperationalError("database is locked")

    outbox, store = record_three(tmp_path)
    reports = ReportStore.open(tmp_path)

    def written(relayed: list[Relayed], now: float) -> None:  # as the forward service writes them
        reports.record_sent_readings(
            [sent_reading_of(i, o, now, "https://county", observation_key(o, NAMING), v) for i, o, v in relayed]
        )

    now = (T0 + 10 * MIN).timestamp()
    assert relay_observations(outbox, NAMING, now, record=refused) == 3
    assert len(outbox.items(kind=Kind.FHIR_BUNDLE)) == 3  # they go
    assert {i.state for i in outbox.items(kind=OBSERVATION_KIND)} == {ItemState.QUEUED}  # not marked sent unrecorded
    assert relay_observations(outbox, NAMING, now + RELAY_RETRY_S, record=written) == 3
    assert len(reports.recent_sent_readings(10)) == 3
    assert {i.state for i in outbox.items(kind=OBSERVATION_KIND)} == {ItemState.COMMITTED}
    assert len(outbox.items(kind=Kind.FHIR_BUNDLE)) == 3  # queued once
    reports.close()
    store.close()
    outbox.close()


def test_a_relay_cut_short_queues_nothing_twice(tmp_path: Path) -> None:
    outbox, store = record_three(tmp_path)
    now = (T0 + 10 * MIN).timestamp()
    # As if killed after queueing the bundles but before marking the readings: put them back.
    claimed = outbox.claim(OBSERVATION_KIND, 10, now)
    relay_observations_with(outbox, claimed, now)
    outbox.release([i.id for i in claimed], "killed", now, 0.0)
    assert relay_observations(outbox, NAMING, now) == 3
    bundles = outbox.items(kind=Kind.FHIR_BUNDLE)
    assert len(bundles) == 3, "a bundle was queued twice for one reading"
    with FhirTestServer() as server, FhirSender(FhirSenderSettings(base_url=server.base_url)) as sender:
        assert forward_fhir_once(outbox, sender, now).sent == 3
        assert len(server.resources("Observation")) == 3
    store.close()
    outbox.close()


def relay_observations_with(outbox: Outbox, claimed: list, now: float) -> None:
    """The first half of a relay: the bundles queued, the readings not yet marked."""
    import json

    from lastmile.clinic.observations import observation_from_json
    from uploader.fhir_bundle import observation_bundle, observation_identifier
    from uploader.fhir_forwarder import enqueue_bundle

    for item in claimed:
        obs = observation_from_json(json.loads(outbox.read_payload(item, now)))
        enqueue_bundle(
            outbox,
            observation_bundle(obs, NAMING),
            f"fhir:obs:{observation_identifier(obs, NAMING)}",
            patient_id=obs.patient_id,
            now=now,
        )


# The relay's two writes, in separate databases: the readings' Sent page records (clinic.db), then
# the readings marked sent (the outbox). The forward process dies before the second of them,
# whichever comes second (a swapped order is cut there too): SIGKILL, nothing flushed or closed.
KILLED_BETWEEN_THE_TWO_WRITES = textwrap.dedent("""
    import os, signal, sys, threading
    from lastmile.config import load_config
    from lastmile.reports.store import ReportStore
    from lastmile.services.forward import ForwardService
    from uploader.outbox import Outbox

    written = []

    def killed_before_the_second(cls, name):
        write = getattr(cls, name)
        def cut(self, *args, **kwargs):
            if written:  # the other write is done: the process dies before this one
                print(f"killed after {written[0]}, before {name}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            done = write(self, *args, **kwargs)
            written.append(name)
            return done
        setattr(cls, name, cut)

    killed_before_the_second(ReportStore, "record_sent_readings")
    killed_before_the_second(Outbox, "mark_taken")
    service = ForwardService(load_config(sys.argv[1]))
    for _round in range(100):
        service.step(threading.Event())
    sys.exit("the relay never made its two writes")
""")


def forward_toml(tmp_path: Path, platform: FhirTestServer) -> Path:
    """The forward service of a clinic whose readings go to `platform` (no reading center listens)."""
    from tests.service_harness import no_reading_center_toml

    path = tmp_path / "lastmile.toml"
    data_dir = tmp_path / "data"
    path.write_text(
        f'[gateway]\nid = "{NAMING.gateway_id}"\ndata_dir = "{data_dir}"\n{no_reading_center_toml()}'
        f'[fhir]\nbase_url = "{platform.base_url}"\n[outbox]\nmin_free_mb = 0\n[reports]\nsource = "off"\n'
    )
    return path


class ReadingsCounted(FhirTestServer):
    """The platform counting the Observations of every transaction it is sent, by identifier: one
    sent twice is stored once (conditional create), and counted twice here."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: collections.Counter[str] = collections.Counter()

    def receive(self, bundle: dict) -> None:
        super().receive(bundle)
        for entry in bundle["entry"]:
            if entry["resource"]["resourceType"] == "Observation":
                self.sent.update(i["value"] for i in entry["resource"]["identifier"])


def test_a_forward_process_killed_between_the_relays_two_writes_loses_and_sends_nothing_twice(tmp_path: Path) -> None:
    """The readings' Sent page records are written before the readings are marked sent: a process
    killed between the two records them again at the next start (absorbed: one record each), and
    their bundles, keyed by the reading, are queued and sent once. Marked first, the readings were
    done without a record: the Sent page lost them at the purge."""
    import subprocess
    import sys
    import threading

    from lastmile.config import load_config
    from lastmile.reports.store import ReportStore
    from lastmile.services.forward import ForwardService
    from tests.waiting import wait_for

    with ReadingsCounted() as platform:
        config_path = forward_toml(tmp_path, platform)
        outbox, store = record_three(tmp_path / "data")
        readings = sorted(i.id for i in outbox.items(kind=OBSERVATION_KIND))
        store.close()
        outbox.close()
        killed = subprocess.run(
            [sys.executable, "-c", KILLED_BETWEEN_THE_TWO_WRITES, str(config_path)],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stdout, killed.stderr[-3000:])
        assert "killed after" in killed.stdout, killed.stdout  # at the cut, after one of the two writes
        assert not platform.resources("Observation")  # killed before the round that sends

        def all_sent(outbox: Outbox) -> bool:
            states = {i.state for i in outbox.items(kind=OBSERVATION_KIND)} | {
                b.state for b in outbox.items(kind=Kind.FHIR_BUNDLE)
            }
            return states <= {ItemState.COMMITTED, ItemState.PURGED} and len(platform.resources("Observation")) == 3

        service = ForwardService(load_config(config_path))  # the next start
        try:
            stop = threading.Event()
            wait_for(lambda: (service.step(stop), all_sent(service.outbox))[1], 60.0, what="the readings sent")
            bundles = service.outbox.items(kind=Kind.FHIR_BUNDLE)
        finally:
            service.close()
        by_patient = systolic_by_patient(platform)
    assert by_patient == {"P-1": [131.0], "P-2": [152.0, 118.0]}, by_patient
    assert len(bundles) == 3, bundles  # queued once
    assert len(platform.sent) == 3 and set(platform.sent.values()) == {1}, platform.sent  # sent once
    with ReportStore.open(tmp_path / "data") as reports:
        records = reports.recent_sent_readings(10)
    assert sorted(r.outbox_item_id for r in records) == readings, "a reading is missing from the Sent page"
    assert all(r.sent_at is not None for r in records), records  # each says 已发送


def test_a_record_that_cannot_be_a_bundle_is_quarantined_alone(tmp_path: Path) -> None:
    outbox, store = record_three(tmp_path)
    now = (T0 + 10 * MIN).timestamp()
    outbox.add(OBSERVATION_KIND, "broken", b"{not json", now=now)
    assert relay_observations(outbox, NAMING, now) == 3
    (broken,) = outbox.items(kind=OBSERVATION_KIND, state=ItemState.QUARANTINED)
    assert broken.key == "broken" and "FHIR bundle" in (broken.quarantine_reason or "")
    store.close()
    outbox.close()


def test_a_reading_taken_during_a_home_visit_goes_with_the_visit(tmp_path: Path) -> None:
    """A reading of the visit's patient taken while the visit is open is linked to it: the
    visit's bundle carries it with its Encounter, and the relay does not send it on its own first
    (conditional create would then have kept the copy without the Encounter). A reading of the
    same patient from before the visit began (a cuff's memory) is not the visit's: sent alone."""
    from lastmile.clock import GatewayClock
    from lastmile.visits.book import VisitBook
    from lastmile.visits.relay_link import visit_link

    outbox, store = record_three(tmp_path)  # P-2's readings at T0+4 and T0+6 min
    wall = [(T0 + 5 * MIN).timestamp()]
    clock = GatewayClock(lambda: wall[0], lambda: wall[0] - T0.timestamp() + 100.0, lambda: "boot-1")
    with VisitBook.open(tmp_path, gateway_id="gw-1", clock=clock) as book:
        visit = book.start("P-2", doctor_id="DOC-1")
        now = (T0 + 10 * MIN).timestamp()
        assert relay_observations(outbox, NAMING, now, visit_link=visit_link(tmp_path, "gw-1", set())) == 3
        assert len(outbox.items(kind=Kind.FHIR_BUNDLE)) == 2  # P-1's, and P-2's from before the visit
        assert [o.quantities[0].value for o in book.observations(visit.id)] == [118.0]
        wall[0] = (T0 + 20 * MIN).timestamp()
        book.stop()
        assert book.queue_closed(outbox, NAMING, now) == 1
    with FhirTestServer() as server, FhirSender(FhirSenderSettings(base_url=server.base_url)) as sender:
        assert forward_fhir_once(outbox, sender, now).sent == 3
        observations = server.resources("Observation")
        by_value = {
            c["valueQuantity"]["value"]: o
            for o in observations
            for c in o.get("component", [])
            if c["code"]["coding"][0]["code"] == "8480-6"
        }
        assert len(observations) == 3, "a reading reached the platform twice"
        assert sorted(by_value) == [118.0, 131.0, 152.0]
        assert "encounter" in by_value[118.0]  # with the visit
        assert "encounter" not in by_value[152.0] and "encounter" not in by_value[131.0]
    assert {i.state for i in outbox.items(kind=OBSERVATION_KIND)} == {ItemState.COMMITTED}
    store.close()
    outbox.close()


def test_asking_about_visits_costs_the_forward_process_no_signing_code(tmp_path: Path) -> None:
    """The relay asks the visit book for every reading; the book signs visits (cryptography, ~8 MB
    of the forward process's 64). Asking must not import it while no visit of the patient is open."""
    import subprocess
    import sys

    from lastmile.visits import book, relay_link

    assert relay_link.DB_NAME == book.DB_NAME
    with book.VisitBook.open(tmp_path, gateway_id="gw-1") as visits:
        visits.start("P-OTHER", doctor_id="DOC-1")  # a visit is open, of another patient
    probe = (
        "import sys, pathlib, dataclasses\n"
        "from lastmile.visits.relay_link import visit_link\n"
        "from tests.test_observation_relay import bp, T0\n"
        "reading = dataclasses.replace(bp(T0, 120), patient_id='P-1')\n"
        "assert visit_link(pathlib.Path(sys.argv[1]), 'gw-1', set())(reading, 'k') is None\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cryptography', 'bcrypt')))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
