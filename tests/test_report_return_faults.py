"""Faults on the report return path ("the county reads, the result returns"), found by review
(2026-12-05): a malformed FHIR DiagnosticReport ended the poller thread; a correction arriving
before the report it corrects, or a preliminary listed after the final, left both current; an
object that did not arrive waited for the 12 h amendment poll; a sent-study record clinic.db
refused once was lost with its report. Each test failed on the code before its fix."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
import time

import pytest
from pydicom.uid import generate_uid

from lastmile.config import Config
from lastmile.demo.cardiologist import ecg_report_sr, part10, report_pdf
from lastmile.demo.reading_center import EmbeddedReadingCenter
from lastmile.reports.poller import PollerSettings, ReportPoller
from lastmile.reports.service import make_poller
from lastmile.reports.store import ReportStore, SentStudy
from lastmile.reports.views import study_lines
from tests.ecg_factories import make_recording
from tests.fhir_reports import TOKEN, diagnostic_report
from tests.fhir_server import FhirTestServer
from tests.peers import free_port
from tests.report_peers import NOW, add, gateway_config, poller_for, send_ecgs, sent, to_read
from uploader.dicom_query import FoundReport, RetrievedObject


@pytest.fixture
def store(tmp_path):
    with ReportStore.open(tmp_path / "data") as s:
        yield s


@pytest.fixture
def platform(tmp_path):
    with FhirTestServer(token=TOKEN) as server:
        config = Config()
        config.set_data_dir(tmp_path / "data")
        config.fhir.base_url = server.base_url
        config.fhir.token_file = str(token_file(tmp_path))
        config.reports.source = "fhir"
        with ReportStore.open(config.data_dir) as store:
            ours = generate_uid()
            store.record_sent(SentStudy(ours, dt.datetime.now(dt.timezone.utc), patient_id="P1"))
            poller = make_poller(config, store, None)
            yield server, store, poller, ours
            poller.fhir.close()


def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    os.chmod(path, 0o600)
    return path


@pytest.mark.parametrize(
    "malformed",
    [
        # a scalar where R4 has an array of CodeableConcepts' codings
        {"conclusionCode": [{"coding": 1}]},
        # an extra identifier whose value is a list (unhashable), before the study UID's
        {
            "identifier": [
                {"system": "urn:lastmile:accession", "value": ["A1", "A2"]},
                {"system": "urn:dicom:uid", "value": "urn:oid:{study}"},
            ]
        },
    ],
    ids=["coding-scalar", "identifier-value-list"],
)
def test_a_malformed_fhir_report_is_a_typed_problem_and_the_other_reports_still_come_back(platform, malformed):
    server, store, poller, ours = platform
    bad = diagnostic_report(ours, **malformed)
    if "identifier" in malformed:
        bad["identifier"][1]["value"] = f"urn:oid:{ours}"
    server.put_resource(bad)  # the platform serves it first
    server.put_resource(diagnostic_report(ours, conclusion="Atrial fibrillation"))
    try:
        poller.run_round(force=True)
    except Exception as exc:  # noqa: BLE001 — the point of the test
        pytest.fail(f"run_round crashed on a malformed DiagnosticReport: {type(exc).__name__}: {exc}")
    assert any("Atrial fibrillation" in r.text for r in store.reports()), "the good report was not kept"
    assert store.status("poller") is not None  # the round was recorded


# -- 2. an out-of-order amendment leaves the report it corrects current --------------------------------


def test_an_amendment_received_before_the_report_it_corrects_still_replaces_it(store) -> None:
    """Both come back in one round (the village link was down while the doctor corrected the
    report) or the original arrives a round later: the corrected report must stay the only
    current one."""
    study = sent(store)
    original = ecg_report_sr(study, findings=[], impression="Normal ECG")
    correction = ecg_report_sr(study, findings=[], impression="Acute inferior STEMI", amends=original)
    amended = add(store, correction)
    late = add(store, original)
    assert late.created
    current = store.reports(study_uid=study.study_uid, current_only=True)
    assert [r.id for r in current] == [amended.report.id], (
        f"current reports: {[(r.id, r.status, r.text.splitlines()[-3:]) for r in current]}"
    )


@pytest.fixture
def center(tmp_path):
    c = EmbeddedReadingCenter(port=free_port(), gateway_port=free_port(), gateway_ae="CLINIC01")
    c.start()
    yield c, gateway_config(tmp_path, c.port, c.ae_title, listen_port=c.gateway_port)
    c.stop()


def test_a_corrected_report_fetched_with_the_original_in_one_round_is_the_only_current_one(center) -> None:
    rc, config = center
    (study,) = send_ecgs(config, [make_recording(11)])
    original = ecg_report_sr(to_read(study), findings=["Sinus rhythm"], impression="Normal ECG")
    correction = ecg_report_sr(
        to_read(study), findings=["ST elevation II, III, aVF"], impression="Acute inferior STEMI", amends=original
    )
    # the PACS answers the C-FIND with the correction first (its order is the PACS's own)
    result, line = one_round_of(rc, config, correction, original)
    assert result.error is None and result.stored == 2
    shown = [(r.status, r.superseded_by) for r in line.reports]
    assert len(line.reports) == 1, f"the clinic sees {len(line.reports)} current reports: {shown}"


def test_a_preliminary_report_listed_after_the_final_one_is_not_left_current(center) -> None:
    """The village link was down while the cardiologist issued a preliminary and then the final
    report: both come back in one round, in the PACS's order (the final first here)."""
    rc, config = center
    (study,) = send_ecgs(config, [make_recording(13)])
    final_at = dt.datetime.now(dt.timezone.utc).astimezone()
    final = ecg_report_sr(to_read(study), findings=["Sinus rhythm"], impression="Normal ECG", when=final_at)
    preliminary = ecg_report_sr(
        to_read(study),
        findings=["Sinus rhythm"],
        impression="Normal ECG?",
        complete=False,
        when=final_at - dt.timedelta(minutes=20),  # written before the final, as the doctor read it
    )
    result, line = one_round_of(rc, config, final, preliminary)
    assert result.error is None and result.stored == 2
    assert [r.status for r in line.reports] == ["final"], [(r.status, r.superseded_by) for r in line.reports]


def one_round_of(rc: EmbeddedReadingCenter, config: Config, *objects) -> tuple:
    """The reading center holds `objects` (listed in this order); one forced poll round; the
    round's result and the study's line as the clinic sees it."""
    for ds in objects:
        rc.add_report(ds)
    with ReportStore.open(config.data_dir) as store:
        with poller_for(config, store) as poller:
            result = poller.run_round(force=True)
        (line,) = study_lines(store)
    return result, line


# -- 3. a found object that did not arrive waits for the amendment poll once another is final ----------


class FoundOnly:
    """The kept C-FIND association, answering what the PACS holds (no network)."""

    def __init__(self, found: list[FoundReport]) -> None:
        self.found = found

    def find_reports(self, uids, *, batch_size=50):
        return [f for f in self.found if f.study_uid in uids]

    def take_bytes(self) -> int:
        return 0

    def keep_for(self, _s) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_report_object_that_did_not_arrive_is_asked_for_again_at_the_next_routine_round(store) -> None:
    """The C-FIND found an SR and the PDF of one study; the C-GET brought the SR only (0xB000,
    a sub-operation failed). The log says "asking again next round", but the SR made the study
    final, so the PDF is not asked for before the amendment poll (12 h; never with 0)."""
    study = sent(store, at=NOW)
    sr = ecg_report_sr(study, findings=["Sinus rhythm"], impression="Normal ECG")
    pdf = report_pdf(study, ["Normal ECG"])
    objects = {str(ds.SOPInstanceUID): ds for ds in (sr, pdf)}
    found = [
        FoundReport(study.study_uid, str(ds.SeriesInstanceUID), uid, str(ds.SOPClassUID)) for uid, ds in objects.items()
    ]
    clock = [NOW + 300.0]
    poller = ReportPoller(store, PollerSettings(source="dicom"), peer=object(), clock=lambda: clock[0])  # type: ignore[arg-type]
    poller.queries = FoundOnly(found)  # type: ignore[assignment]
    arrives = [{str(sr.SOPInstanceUID)}, set(objects)]  # round 1: the SR only; later: both

    def retrieve(new, result):
        allowed = arrives.pop(0) if arrives else set(objects)
        return [
            RetrievedObject(f.sop_instance_uid, f.sop_class_uid, part10(objects[f.sop_instance_uid]))
            for f in new
            if f.sop_instance_uid in allowed
        ]

    poller._retrieve = retrieve  # type: ignore[method-assign]
    first = poller.run_round()
    assert (first.asked, first.found, first.stored) == (1, 2, 1)
    # an hour later: the routine interval of a young study (5 min) has passed many times
    clock[0] = NOW + 300.0 + 3600.0
    second = poller.run_round()
    assert second.asked == 1, "the study whose PDF did not arrive was not asked about again"
    assert len(store.reports(study_uid=study.study_uid)) == 2


# -- 4. a sent-study record the recorder could not write is lost for good ------------------------------


def test_a_sent_study_whose_record_failed_once_is_still_recorded(center, monkeypatch) -> None:
    """clinic.db busy (the console's or `lastmile report ack`'s write past the busy timeout) or
    briefly full when the recorder writes a batch: the record must not be lost, or the report
    for that ECG is never asked for (outbox.retention_days 0: the item is purged at commitment,
    so `backfill` at the next start finds nothing)."""
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.intake import enqueue_recording
    from lastmile.reports.sent import SentStudyRecorder
    from lastmile.services.forward import forwarder_settings
    from uploader.ecg_forwarder import EcgForwarder

    rc, config = center
    stop = threading.Event()
    with open_outbox(config) as outbox, ReportStore.open(config.data_dir) as store:
        real = store.record_sent_many
        calls = []

        def busy_once(studies):
            calls.append(len(studies))
            if len(calls) == 1 and studies:
                raise sqlite3.OperationalError("database is locked")
            return real(studies)

        monkeypatch.setattr(store, "record_sent_many", busy_once)
        recorder = SentStudyRecorder(outbox, store)
        recorder.start()
        enqueue_recording(outbox, make_recording(12), config, key="ecg-12")
        deadline = time.monotonic() + 60
        with EcgForwarder(outbox, forwarder_settings(config), on_event=recorder.on_event) as fwd:
            while True:
                counts = outbox.stats(time.time())["counts"]
                if counts.get("queued", 0) + counts.get("sending", 0) + counts.get("sent", 0) == 0:
                    break
                assert time.monotonic() < deadline, counts
                time.sleep(min(fwd.step(stop), 0.1))
            # the service goes on: more rounds (commitments noted, the purge)
            time.sleep(0.5)
            fwd.step(stop)
        recorder.stop()
        assert calls and calls[0] == 1, f"the failing write was not the sent record: {calls}"
        (ecg_study,) = {o.study_uid for o in rc.received.values()}
    # the next start: backfill from the outbox
    with open_outbox(config) as outbox, ReportStore.open(config.data_dir) as store:
        SentStudyRecorder(outbox, store).backfill()
        assert store.study(ecg_study) is not None, (
            "the ECG was sent and committed, but its sent-study record is gone: its report will never be asked for"
        )


def test_a_malformed_fhir_report_does_not_end_the_poller_thread(platform) -> None:
    """What the crash means in the service: the poller thread ends, ReportService.check()
    raises, the forward service exits, systemd restarts it, the same resource ends it again."""
    from lastmile.reports.poller import PollerThread

    server, store, _poller, _ours = platform
    due = generate_uid()  # sent ten minutes ago: due for its routine round now
    store.record_sent(SentStudy(due, dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10), patient_id="P1"))
    server.put_resource(diagnostic_report(due, conclusionCode=[{"coding": 1}]))
    thread = PollerThread(_poller, idle_s=0.2)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while thread.alive and thread.last_round is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert thread.alive, f"the report poller thread died: {thread.error!r}"
    finally:
        thread.stop(5)
