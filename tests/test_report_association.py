"""The C-FIND association kept between polling rounds (issue 14: "keep the association").

While a STAT study is polled every few seconds the association stays open (counted at Orthanc,
in its own log, and at a scripted pynetdicom peer); it is released once polling slows; a PACS
that closes it (its idle timeout's A-ABORT, a power cut) costs a new association on the next
round, never a report lost or doubled, and no error in the log.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedSRStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association

from lastmile.config import ConfigError, parse_config
from lastmile.demo.cardiologist import ecg_report_sr, part10
from lastmile.reports.poller import ReportPoller
from lastmile.reports.store import ReportStore, SentStudy
from lastmile.services.forward import ForwardService
from tests.ecg_factories import make_recording
from tests.peers import OrthancServer, free_port
from tests.report_peers import GATEWAY_AE, gateway_config, poller_for, send_ecgs, to_read
from tests.waiting import wait_for
from uploader.dicom_association import PeerSettings, stop_server
from uploader.dicom_query import FIND, KeptQueryAssociation
from uploader.errors import TransientError


def verbose(orthanc: OrthancServer) -> None:
    """Orthanc logs each association and each C-FIND it receives only at the verbose level."""
    orthanc.rest("/tools/log-level", "PUT", b"verbose")


def at_orthanc(orthanc: OrthancServer, what: str) -> int:
    """Lines of Orthanc's log about our gateway: "Association Received", "Incoming Find request"."""
    text = orthanc.log_path.read_text(errors="replace")
    return sum(what in line and f"AET {GATEWAY_AE}" in line for line in text.splitlines())


def orthanc_for_gateway(factory: Callable[..., OrthancServer], listen_port: int, **extra: object) -> OrthancServer:
    modalities = {"gateway": {"AET": GATEWAY_AE, "Host": "127.0.0.1", "Port": listen_port, "AllowGet": True}}
    return factory(modalities=modalities, extra=extra)


def stat_site(tmp_path: Path, factory: Callable[..., OrthancServer], **extra: object):
    listen = free_port()
    orthanc = orthanc_for_gateway(factory, listen, **extra)
    config = gateway_config(tmp_path, orthanc.dicom_port, orthanc.aet, listen_port=listen)
    (stat,) = send_ecgs(config, [make_recording(5, stat=True)])
    return orthanc, config, stat


def on_simulated_clock(poller: ReportPoller) -> list[float]:
    now = [time.time()]
    poller.clock = lambda: now[0]
    return now


def next_round(poller: ReportPoller, now: list[float]):
    """Jump the poller's clock to its next due round and run it."""
    wait = poller.next_due_in()
    assert wait is not None
    now[0] += wait
    result = poller.run_round()
    assert result.error is None and result.fault is None, result
    return result


@pytest.mark.orthanc
def test_stat_rounds_share_one_association_at_orthanc_released_once_polling_slows(tmp_path, orthanc_factory) -> None:
    orthanc, config, stat = stat_site(tmp_path, orthanc_factory)
    verbose(orthanc)
    assoc0, finds0 = at_orthanc(orthanc, "Association Received"), at_orthanc(orthanc, "Incoming Find request")
    with ReportStore.open(config.data_dir) as store, poller_for(config, store) as poller:
        now = on_simulated_clock(poller)
        assert poller.queries is not None
        for _ in range(6):  # 6 STAT rounds, 25 s apart on the poller's clock
            assert next_round(poller, now).asked == 1
            assert poller.queries.is_open  # the next round comes within keep_association_s
        wait_for(
            lambda: at_orthanc(orthanc, "Incoming Find request") - finds0 >= 6,
            60,
            what="6 C-FINDs at Orthanc",
            interval=0.05,
        )
        assert at_orthanc(orthanc, "Incoming Find request") - finds0 == 6
        assert at_orthanc(orthanc, "Association Received") - assoc0 == 1  # one association for all six
        assert (poller.queries.opened, poller.queries.reused) == (1, 5)

        # the report comes (C-GET on an association of its own), the study is final: polling
        # slows to the amendment schedule and the kept association is released at once
        sr = ecg_report_sr(to_read(stat), findings=["VT"], impression="Ventricular tachycardia")
        assert orthanc.rest("/instances", "POST", part10(sr))["Status"] == "Success"
        result = next_round(poller, now)
        assert (result.stored, result.retrieved_by) == (1, "C-GET")
        assert not poller.queries.is_open
        assert at_orthanc(orthanc, "Association Received") - assoc0 == 2  # + the C-GET's
        assert len(store.reports()) == 1

    # the same rounds without keeping: one association each (what it cost before)
    config.reports.keep_association_s = 0
    with ReportStore.open(config.data_dir) as store, poller_for(config, store) as poller:
        store.record_sent(SentStudy(generate_uid(), stat.sent_at, stat=True))
        now = on_simulated_clock(poller)
        now[0] = stat.sent_at.timestamp() + 1
        base = at_orthanc(orthanc, "Association Received")
        for _ in range(3):
            next_round(poller, now)
            assert poller.queries is not None and not poller.queries.is_open
        wait_for(
            lambda: at_orthanc(orthanc, "Association Received") - base >= 3, 60, what="3 associations", interval=0.05
        )
        assert at_orthanc(orthanc, "Association Received") - base == 3


def quiet_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Warnings and errors of ours or pynetdicom's (an expected idle close must not make any)."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.split(".")[0] in ("lastmile", "uploader", "pynetdicom")
    ]


@pytest.mark.orthanc
def test_orthanc_closing_the_idle_association_costs_a_new_one_not_a_report(
    tmp_path, orthanc_factory, caplog: pytest.LogCaptureFixture
) -> None:
    # Orthanc aborts an association idle for DicomScpTimeout: 2 s here, while the gateway would keep it 60 s
    orthanc, config, stat = stat_site(tmp_path, orthanc_factory, DicomScpTimeout=2)
    config.reports.keep_association_s = 60
    with ReportStore.open(config.data_dir) as store, poller_for(config, store) as poller:
        now = on_simulated_clock(poller)
        assert poller.queries is not None
        next_round(poller, now)
        assert poller.queries.is_open
        wait_for(
            lambda: not poller.queries.is_open, 60, what="Orthanc's A-ABORT of the idle association", interval=0.05
        )

        sr = ecg_report_sr(to_read(stat), findings=["VT"], impression="Ventricular tachycardia")
        assert orthanc.rest("/instances", "POST", part10(sr))["Status"] == "Success"
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            result = next_round(poller, now)
        assert (result.stored, result.retrieved_by) == (1, "C-GET")
        assert (poller.queries.opened, poller.queries.closed_by_peer) == (2, 1)
        assert quiet_records(caplog) == []
        assert any("closed the kept association" in r.getMessage() for r in caplog.records)  # said, at DEBUG

        again = poller.run_round(force=True)  # asked again: the same object, nothing doubled
        assert (again.found, again.stored) == (1, 0)
        assert [r.object_uid for r in store.reports()] == [sr.SOPInstanceUID]


@pytest.mark.orthanc
def test_a_pacs_power_cut_between_rounds_costs_a_new_association_not_a_report(tmp_path, orthanc_factory) -> None:
    orthanc, config, stat = stat_site(tmp_path, orthanc_factory)
    with ReportStore.open(config.data_dir) as store, poller_for(config, store) as poller:
        now = on_simulated_clock(poller)
        assert poller.queries is not None
        next_round(poller, now)
        assert poller.queries.is_open
        orthanc.kill()  # its end of the TCP connection goes with it
        wait_for(lambda: not poller.queries.is_open, 60, what="the dropped connection to be seen", interval=0.05)
        orthanc.start()
        sr = ecg_report_sr(to_read(stat), findings=["AF"], impression="Atrial fibrillation")
        assert orthanc.rest("/instances", "POST", part10(sr))["Status"] == "Success"
        result = next_round(poller, now)
        assert (result.stored, poller.queries.opened) == (1, 2)
        assert [r.object_uid for r in store.reports()] == [sr.SOPInstanceUID]


# -- a scripted peer: the association ends under the query ----------------------------------------


class FindPeer:
    """A pynetdicom Study Root C-FIND SCP that answers one report object per study asked about,
    counts associations, and aborts an association on its `abort_on`-th C-FIND (2: a PACS whose
    idle timeout fires just as the next round's query arrives)."""

    def __init__(self, *, abort_on: int = 0) -> None:
        self.abort_on = abort_on
        self.associations = 0
        self.finds = 0
        self._per_assoc: dict[int, int] = {}
        self._open: list[Association] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="FINDPEER")
        ae.add_supported_context(FIND)
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_ESTABLISHED, self._established), (evt.EVT_C_FIND, self._find)],
        )

    def _established(self, event: evt.Event) -> None:
        with self._lock:
            self.associations += 1
            self._open.append(event.assoc)

    def reset_connections(self) -> None:
        """Drop every connection with a TCP reset (RST, no A-RELEASE or A-ABORT): a NAT or a
        4G link forgetting it."""
        with self._lock:
            opened, self._open = self._open, []
        for assoc in opened:
            raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
            if raw is not None:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                raw.close()

    def _find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        with self._lock:
            self.finds += 1
            n = self._per_assoc[id(event.assoc)] = self._per_assoc.get(id(event.assoc), 0) + 1
        if n == self.abort_on:
            event.assoc.abort()
            return
        uids = event.identifier.StudyInstanceUID
        for study in [uids] if isinstance(uids, str) else list(uids):
            match = Dataset()
            match.QueryRetrieveLevel = "IMAGE"
            match.StudyInstanceUID = study
            match.SeriesInstanceUID = generate_uid(entropy_srcs=[study, "series"])
            match.SOPInstanceUID = generate_uid(entropy_srcs=[study, "report"])
            match.SOPClassUID = EnhancedSRStorage
            yield 0xFF00, match
        yield 0x0000, None


@pytest.fixture
def find_peer() -> Iterator[Callable[..., FindPeer]]:
    made: list[FindPeer] = []

    def make(**kwargs: int) -> FindPeer:
        made.append(FindPeer(**kwargs))
        return made[-1]

    yield make
    for peer in made:
        stop_server(peer.server)


def peer_of(find_peer: FindPeer) -> PeerSettings:
    return PeerSettings("127.0.0.1", find_peer.port, "FINDPEER", GATEWAY_AE, timeout_s=10.0)


def test_the_kept_association_is_reused_at_the_peer(find_peer) -> None:
    peer = find_peer()
    kept = KeptQueryAssociation(peer_of(peer), idle_limit_s=30.0)
    try:
        studies = [generate_uid() for _ in range(3)]
        for study in studies:
            (found,) = kept.find_reports([study])
            assert found.study_uid == study
            kept.keep_for(25.0)
        assert (peer.associations, peer.finds) == (1, 3)
        assert (kept.opened, kept.reused) == (1, 2)
        spent = kept.take_bytes()
        kept.keep_for(3600.0)  # polling slows: released now
        assert not kept.is_open and kept.take_bytes() > 0  # the A-RELEASE, counted in the next round
        assert spent > 0 and kept.take_bytes() == 0
    finally:
        kept.close()


def test_an_association_ended_under_the_query_is_asked_again_on_a_new_one(find_peer, caplog) -> None:
    peer = find_peer(abort_on=2)
    kept = KeptQueryAssociation(peer_of(peer), idle_limit_s=30.0)
    try:
        first, second = generate_uid(), generate_uid()
        assert [f.study_uid for f in kept.find_reports([first])] == [first]
        kept.keep_for(25.0)
        with caplog.at_level(logging.INFO, logger="uploader.dicom_query"):
            # the peer aborts this association on its second C-FIND: asked once more on a new one
            assert [f.study_uid for f in kept.find_reports([second])] == [second]
        assert (peer.associations, peer.finds) == (2, 3)
        assert (kept.opened, kept.closed_by_peer) == (2, 1)
        assert any("asking on a new one" in r.getMessage() for r in caplog.records)
        assert all(r.levelno < logging.WARNING for r in caplog.records if r.name.startswith("uploader"))
    finally:
        kept.close()


def test_a_tcp_reset_of_the_kept_association_costs_a_new_one_quietly(find_peer, caplog) -> None:
    peer = find_peer()
    kept = KeptQueryAssociation(peer_of(peer), idle_limit_s=30.0)
    try:
        kept.find_reports([generate_uid()])
        kept.keep_for(25.0)
        assert kept.is_open
        peer.reset_connections()
        wait_for(lambda: not kept.is_open, 60, what="the reset to be seen", interval=0.05)
        study = generate_uid()
        with caplog.at_level(logging.DEBUG):
            assert [f.study_uid for f in kept.find_reports([study])] == [study]
        assert (peer.associations, kept.opened, kept.closed_by_peer) == (2, 2, 1)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("uploader")]
    finally:
        kept.close()


def test_a_new_association_failing_is_not_asked_twice(find_peer) -> None:
    """Only a *kept* association gets a second chance: a new one failing is the PACS's answer
    (the round fails and backs off)."""
    peer = find_peer(abort_on=1)
    kept = KeptQueryAssociation(peer_of(peer), idle_limit_s=30.0)
    try:
        with pytest.raises(TransientError):
            kept.find_reports([generate_uid()])
        assert (peer.associations, peer.finds, kept.opened) == (1, 1, 1)
        assert not kept.is_open
    finally:
        kept.close()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "[reports]\nkeep_association_s = 10\n",
            "'reports.keep_association_s' (10 s) is shorter than reports.stat_poll_s",
        ),
        ("[reports]\nstat_poll_s = 40\n", "'reports.stat_poll_s' (40 s) is longer than reports.keep_association_s"),
        ("[reports]\nkeep_association_s = -1\n", "'reports.keep_association_s' must not be negative"),
    ],
)
def test_keep_association_s_is_checked_against_the_stat_interval(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert words in str(err.value)


def test_keeping_off_or_longer_than_the_stat_interval_passes() -> None:
    parse_config("[reports]\nkeep_association_s = 0\nstat_poll_s = 40\n")
    parse_config("[reports]\nkeep_association_s = 45\nstat_poll_s = 40\n")
    assert parse_config("").reports.keep_association_s > parse_config("").reports.stat_poll_s


# -- C-MOVE to the gateway's one AE, received by the storage-commitment listener ------------------


@pytest.mark.orthanc
@pytest.mark.parametrize("reloaded", [False, True], ids=["started", "after-reload"])
def test_c_move_goes_to_the_gateways_own_ae_on_its_commitment_listener(tmp_path, orthanc_factory, reloaded) -> None:
    """Orthanc knows the gateway as one AE (its storage-commitment entry) and refuses C-GET: the
    real forward service's poller moves the STAT report to that AE, and the commitment listener
    (already bound on that port) takes it; no second listener, no second AE to configure. Also
    after a reload (SIGHUP), whose new listener once took only commitment reports."""
    listen = free_port()
    modalities = {"gateway": {"AET": GATEWAY_AE, "Host": "127.0.0.1", "Port": listen, "AllowGet": False}}
    orthanc = orthanc_factory(modalities=modalities)
    config = gateway_config(tmp_path, orthanc.dicom_port, orthanc.aet, listen_port=listen)
    config.reports.stat_poll_s, config.reports.keep_association_s = 1.0, 5.0
    assert config.reports.move_ae == "" and config.reading_center.storage_commitment
    (stat,) = send_ecgs(config, [make_recording(6, stat=True)])
    service = ForwardService(config)
    stop = threading.Event()
    try:
        if reloaded:
            service.reload(config)
        assert service.reports.poller is not None and service.reports.poller.receiver.hosted
        assert service.ecg.listener_address == ("127.0.0.1", listen)
        sr = ecg_report_sr(to_read(stat), findings=["VT"], impression="Ventricular tachycardia")
        assert orthanc.rest("/instances", "POST", part10(sr))["Status"] == "Success"
        deadline = time.monotonic() + 90
        # the round stores the report, then records how it was retrieved: wait for that round's record
        while not (service.reports.store.status("poller") or {}).get("stored"):
            assert time.monotonic() < deadline, service.status_line()
            time.sleep(min(service.step(stop), 0.2))
        (report,) = service.reports.store.reports()
        assert report.object_uid == sr.SOPInstanceUID
        assert service.reports.store.status("poller")["c_move"] is True
    finally:
        service.close()
