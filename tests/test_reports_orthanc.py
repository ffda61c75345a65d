"""Reports come back from Orthanc as the county's PACS: C-FIND + C-GET, C-MOVE back to our AE
where C-GET is refused. The ECGs are really forwarded first (their sent-study records come from
the forwarder's events); the reports are stored at Orthanc through its REST API, as a reading
center's reporting system would.

Orthanc runs inside the private network namespace scripts/test.sh creates.
"""

from __future__ import annotations

import datetime as dt
import io
import threading
import time

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lastmile.cli import main as cli
from lastmile.demo.cardiologist import SINUS_RHYTHM, STEMI, StudyToRead, ecg_report_sr, part10, report_pdf
from lastmile.reports.store import ReportStore
from lastmile.services.forward import ForwardService
from tests.ecg_factories import T0, make_recording
from tests.peers import OrthancServer, free_port
from tests.report_peers import GATEWAY_AE, MOVE_AE, gateway_config, poller_for, send_ecgs, to_read, write_config

pytestmark = pytest.mark.orthanc


def orthanc_with_gateway(factory, listen_port: int, *, allow_get: bool = True, move_port: int | None = None):
    modalities: dict = {"gateway": {"AET": GATEWAY_AE, "Host": "127.0.0.1", "Port": listen_port, "AllowGet": allow_get}}
    if move_port is not None:
        modalities["gateway-reports"] = [MOVE_AE, "127.0.0.1", move_port]
    return factory(modalities=modalities)


def post(orthanc: OrthancServer, ds: Dataset) -> None:
    answer = orthanc.rest("/instances", "POST", part10(ds))
    assert answer["Status"] == "Success", answer


@pytest.fixture
def site(tmp_path, orthanc_factory):
    """Orthanc (C-GET allowed), a gateway configured for it, two ECGs sent: one routine, one STAT."""
    listen = free_port()
    orthanc = orthanc_with_gateway(orthanc_factory, listen)
    config = gateway_config(tmp_path, orthanc.dicom_port, orthanc.aet, listen_port=listen)
    studies = send_ecgs(config, [make_recording(1), make_recording(2, stat=True)])
    assert len(studies) == 2 and {s.stat for s in studies} == {False, True}
    routine, stat = sorted(studies, key=lambda s: s.stat)
    return orthanc, config, (routine, stat)


def test_sr_and_pdf_of_one_study_come_back_by_c_get_and_others_wait(site) -> None:
    orthanc, config, (routine, stat) = site
    sr = ecg_report_sr(
        to_read(stat),
        findings=["Sinus tachycardia 104/min"],
        impression="ST elevation V1-V4",
        coded_findings=[STEMI],
        reader="Chen^Jing",
    )
    pdf = report_pdf(to_read(stat), ["Sinus tachycardia", "Anterior STEMI"])
    post(orthanc, sr)
    post(orthanc, pdf)
    with ReportStore.open(config.data_dir) as store:
        poller = poller_for(config, store)
        result = poller.run_round(force=True)
        assert result.error is None and result.fault is None
        assert (result.asked, result.found, result.stored, result.retrieved_by) == (2, 2, 2, "C-GET")
        reports = store.reports(study_uid=stat.study_uid)
        assert {r.kind for r in reports} == {"sr", "pdf"}
        kept_sr = next(r for r in reports if r.kind == "sr")
        assert kept_sr.status == "final" and kept_sr.observer == "Chen^Jing" and kept_sr.critical
        assert "ST elevation V1-V4" in kept_sr.text and not kept_sr.problems
        # stored as received: the very object Orthanc holds, PDF bytes untouched
        kept_pdf = next(r for r in reports if r.kind == "pdf")
        held = dcmread(io.BytesIO(store.data_of(kept_pdf.id) or b""))
        assert held.SOPInstanceUID == pdf.SOPInstanceUID
        assert held.EncapsulatedDocument == pdf.EncapsulatedDocument
        assert store.reports(study_uid=routine.study_uid) == []
        assert store.study(stat.study_uid).final_at is not None
        assert store.study(routine.study_uid).final_at is None
        # asking again finds the same two objects and keeps nothing twice
        again = poller.run_round(force=True)
        assert (again.found, again.stored) == (2, 0)
        assert len(store.reports()) == 2


def test_amended_sr_replaces_the_earlier_one(site) -> None:
    orthanc, config, (routine, _stat) = site
    study = to_read(routine)
    preliminary = ecg_report_sr(
        study, findings=["Sinus rhythm"], impression="Probably normal", complete=False, verified=False
    )
    post(orthanc, preliminary)
    with ReportStore.open(config.data_dir) as store:
        poller = poller_for(config, store)
        poller.run_round(force=True)
        (first,) = store.reports(study_uid=routine.study_uid)
        assert first.status == "preliminary" and store.study(routine.study_uid).final_at is None

        final = ecg_report_sr(study, findings=["Sinus rhythm", "Normal intervals"], impression="Normal ECG")
        post(orthanc, final)
        poller.run_round(force=True)
        second = next(r for r in store.reports(study_uid=routine.study_uid) if r.object_uid == final.SOPInstanceUID)
        assert second.status == "final" and store.get(first.id).superseded_by == second.id

        amended = ecg_report_sr(
            study,
            findings=["Sinus rhythm", "First-degree AV block (PR 220 ms)"],
            impression="Borderline ECG: first-degree AV block",
            amends=final,
        )
        post(orthanc, amended)
        result = poller.run_round(force=True)
        assert (result.stored, result.amended) == (1, 1)
        current = store.reports(study_uid=routine.study_uid, current_only=True)
        assert [r.object_uid for r in current] == [amended.SOPInstanceUID]
        assert current[0].status == "amended" and "AMENDED" in current[0].text
        assert store.get(second.id).superseded_by == current[0].id


def test_a_report_for_a_study_we_did_not_send_is_ignored(site) -> None:
    orthanc, config, (routine, _stat) = site
    stranger = StudyToRead(generate_uid(), patient_id="OTHER-VILLAGE-7", patient_name="Zhao^Lei")
    post(orthanc, ecg_report_sr(stranger, findings=["Atrial fibrillation"], impression="AF"))
    post(orthanc, ecg_report_sr(to_read(routine), findings=["Sinus rhythm"], impression="Normal"))
    with ReportStore.open(config.data_dir) as store:
        result = poller_for(config, store).run_round(force=True)
        assert (result.found, result.stored) == (1, 1)
        assert {r.study_uid for r in store.reports()} == {routine.study_uid}
        assert all("OTHER-VILLAGE" not in r.text for r in store.reports())


def test_reading_center_offline_then_back(site) -> None:
    orthanc, config, (routine, _stat) = site
    post(orthanc, ecg_report_sr(to_read(routine), findings=["Sinus rhythm"], impression="Normal"))
    orthanc.stop()
    with ReportStore.open(config.data_dir) as store:
        poller = poller_for(config, store)
        now = [time.time()]
        poller.clock = lambda: now[0]
        down = poller.run_round(force=True)
        assert down.error and down.stored == 0
        assert store.status("poller")["error"] and store.study(routine.study_uid).polls == 0
        wait = poller.next_due_in()
        assert wait is not None and wait >= config.reports.backoff_base_s / 2  # backs off, no hot loop
        assert poller.run_round().asked == 0  # inside the backoff: not even tried
        orthanc.start()
        now[0] += wait
        back = poller.run_round(force=True)
        assert back.error is None and back.stored == 1
        assert store.status("poller")["failing_since"] is None
        assert store.study(routine.study_uid).polls == 1


def test_pacs_refusing_c_get_falls_back_to_c_move_to_the_gateways_own_ae(tmp_path, orthanc_factory) -> None:
    """The PACS knows the gateway as one AE (the storage-commitment entry): reports are moved there.
    (With the forward service running, the commitment listener takes them: test_report_association.)"""
    listen = free_port()
    orthanc = orthanc_with_gateway(orthanc_factory, listen, allow_get=False)
    config = gateway_config(tmp_path, orthanc.dicom_port, orthanc.aet, listen_port=listen)
    assert config.reports.move_ae == ""  # nothing configured for C-MOVE
    (study,) = send_ecgs(config, [make_recording(3)])
    post(orthanc, ecg_report_sr(to_read(study), findings=["Sinus rhythm"], impression="Normal"))
    with ReportStore.open(config.data_dir) as store:
        poller = poller_for(config, store)
        moved = poller.run_round(force=True)
        assert moved.error is None and moved.fault is None
        assert (moved.stored, moved.retrieved_by) == (1, "C-MOVE")
        # remembered: the next report goes straight to C-MOVE
        post(orthanc, report_pdf(to_read(study), ["Normal ECG"]))
        later = poller.run_round(force=True)
        assert (later.stored, later.retrieved_by) == (1, "C-MOVE")
        assert {r.kind for r in store.reports()} == {"sr", "pdf"}
        assert store.status("poller")["c_move"] is True


def test_a_separate_move_ae_gets_the_reports_where_the_pacs_needs_one(tmp_path, orthanc_factory) -> None:
    listen, move_port = free_port(), free_port()
    orthanc = orthanc_with_gateway(orthanc_factory, listen, allow_get=False, move_port=move_port)
    config = gateway_config(tmp_path, orthanc.dicom_port, orthanc.aet, listen_port=listen)
    (study,) = send_ecgs(config, [make_recording(3)])
    post(orthanc, ecg_report_sr(to_read(study), findings=["Sinus rhythm"], impression="Normal"))
    config.reports.move_ae, config.reports.move_port = MOVE_AE, move_port
    with ReportStore.open(config.data_dir) as store:
        moved = poller_for(config, store).run_round(force=True)
        assert moved.error is None and moved.fault is None
        assert (moved.stored, moved.retrieved_by) == (1, "C-MOVE")


def malformed_sr(study: StudyToRead) -> Dataset:
    ds = ecg_report_sr(study, findings=["Sinus rhythm"], impression="Normal", coded_findings=[SINUS_RHYTHM])
    del ds.ConceptNameCodeSequence  # no document title
    findings = ds.ContentSequence[2]
    del findings.ContentSequence[0].TextValue  # a TEXT item without its text
    findings.ContentSequence[1].ValueType = "BOGUS"  # an unknown value type
    odd = Dataset()
    odd.RelationshipType = "CONTAINS"  # an item with neither value type nor concept
    ds.ContentSequence.append(odd)
    ds.VerificationFlag = "MAYBE"
    return ds


def test_malformed_sr_is_stored_as_received_flagged_and_polling_goes_on(site, capsys) -> None:
    orthanc, config, (routine, _stat) = site
    bad = malformed_sr(to_read(routine))
    post(orthanc, bad)
    with ReportStore.open(config.data_dir) as store:
        result = poller_for(config, store).run_round(force=True)
        assert result.error is None and (result.stored, result.malformed) == (1, 1)
        (kept,) = store.reports()
        assert kept.object_uid == bad.SOPInstanceUID and kept.status == "preliminary"
        problems = " ".join(kept.problems)
        for expected in ("no title", "no TextValue", "BOGUS", "no ValueType", "VerificationFlag"):
            assert expected in problems
        assert dcmread(io.BytesIO(store.data_of(kept.id) or b"")).SOPInstanceUID == bad.SOPInstanceUID
        assert store.study(routine.study_uid).final_at is None  # still waiting for a readable one
    assert cli(["report", "show", str(kept.id), "--data-dir", str(config.data_dir)]) == 0
    out = capsys.readouterr().out
    assert "Problems:" in out and "BOGUS" in out


def test_forward_service_polls_on_its_own_thread_stat_first(tmp_path, orthanc_factory) -> None:
    """The real forward service: the STAT study's report is fetched by the poller thread, on the
    STAT schedule, while the forwarder keeps its own loop."""
    listen = free_port()
    orthanc = orthanc_with_gateway(orthanc_factory, listen)
    config = gateway_config(tmp_path, orthanc.dicom_port, orthanc.aet, listen_port=listen)
    config.reports.stat_poll_s = 1.0
    (stat,) = send_ecgs(config, [make_recording(4, stat=True)])
    service = ForwardService(config)
    stop = threading.Event()
    try:
        post(
            orthanc,
            ecg_report_sr(
                to_read(stat),
                findings=["VF"],
                impression="Ventricular fibrillation",
                coded_findings=[("71908006", "SCT", "Ventricular fibrillation")],
            ),
        )
        deadline = time.monotonic() + 60
        while not service.reports.store.reports():
            assert time.monotonic() < deadline, service.status_line()
            time.sleep(min(service.step(stop), 0.2))
        (report,) = service.reports.store.reports()
        assert report.critical and "Ventricular fibrillation" in report.critical[0]
        assert service.reports.thread is not None and service.reports.thread.alive
    finally:
        service.close()


def test_report_list_after_a_real_round(site, tmp_path, capsys) -> None:
    orthanc, config, (routine, stat) = site
    post(orthanc, ecg_report_sr(to_read(routine), findings=["Sinus rhythm"], impression="Normal ECG"))
    cfg = write_config(config, tmp_path / "lastmile.toml")
    assert cli(["-c", str(cfg), "report", "poll"]) == 0
    data = ["--data-dir", str(config.data_dir)]
    assert "1 new" in capsys.readouterr().out
    assert cli(["report", "list", *data]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[1]: ln for ln in out.splitlines()[1:]}
    assert "received" in lines[routine.patient_id] and "Chen Jing" in lines[routine.patient_id]
    assert "waiting" in lines[stat.patient_id] and "STAT" in lines[stat.patient_id]
    # the ECG's own acquisition time, read from the object we sent (not when it was sent)
    acquired = T0 + dt.timedelta(minutes=2)
    assert dt.datetime.fromisoformat(stat.ecg_time) == acquired
    assert acquired.strftime("%Y-%m-%d %H:%M") in lines[stat.patient_id]
