"""Reports as FHIR R4 DiagnosticReports from the county platform (the loopback test FHIR server):
search by the ECG studies' UIDs, conditional reads, amendments, critical interpretation, faults."""

from __future__ import annotations

import base64
import datetime as dt
import os
import time

import pytest
from pydicom.uid import generate_uid

from lastmile.config import Config
from lastmile.console.stores import StoredReports
from lastmile.demo.cardiologist import minimal_pdf
from lastmile.reports.service import make_poller
from lastmile.reports.store import ReportStore, SentStudy
from lastmile.reports.views import printable, render_list, speaker_for, study_lines
from tests.console_harness import Client, console_config, running_console
from tests.fhir_reports import TOKEN, report_for
from tests.fhir_server import FhirTestServer
from tests.report_peers import critical_observation


@pytest.fixture
def platform(tmp_path):
    with FhirTestServer(token=TOKEN) as server:
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        os.chmod(token_file, 0o600)
        config = Config()
        config.set_data_dir(tmp_path / "data")
        config.fhir.base_url = server.base_url
        config.fhir.token_file = str(token_file)
        config.reports.source = "fhir"
        config.reports.backoff_base_s = 5.0
        with ReportStore.open(config.data_dir) as store:
            ours, other = generate_uid(), generate_uid()
            store.record_sent(SentStudy(ours, dt.datetime.now(dt.timezone.utc), patient_id="P1"))
            poller = make_poller(config, store, None)
            yield server, store, poller, ours, other
            poller.fhir.close()


def test_report_with_a_pdf_comes_back_and_others_are_ignored(platform) -> None:
    server, store, poller, ours, other = platform
    pdf = minimal_pdf(["Normal ECG"])
    server.put_resource(
        report_for(ours, presentedForm=[{"contentType": "application/pdf", "data": base64.b64encode(pdf).decode()}])
    )
    server.put_resource(report_for(other, conclusion="not for this village"))
    result = poller.run_round(force=True)
    assert result.error is None and result.fault is None
    assert (result.asked, result.stored, result.retrieved_by) == (1, 1, "FHIR")
    (kept,) = store.reports()
    assert (kept.kind, kept.source, kept.status, kept.study_uid) == ("fhir", "fhir", "final", ours)
    assert kept.observer == "Dr. Chen Jing" and "Normal ECG" in kept.text
    assert printable(store, kept) == (pdf, ".pdf")
    assert store.study(ours).final_at is not None


def test_preliminary_then_corrected_with_conditional_reads_between(platform) -> None:
    server, store, poller, ours, _other = platform
    first = server.put_resource(report_for(ours, status="preliminary", conclusion="Preliminary: sinus rhythm"))
    poller.run_round(force=True)
    (pre,) = store.reports()
    assert pre.status == "preliminary" and pre.version == "1"
    reads_before = server.stats.not_modified
    unchanged = poller.run_round(force=True)
    assert unchanged.stored == 0 and server.stats.not_modified == reads_before + 1  # 304: a few bytes
    server.put_resource({**first, "status": "corrected", "conclusion": "First-degree AV block"})
    result = poller.run_round(force=True)
    assert (result.stored, result.amended) == (1, 1)
    (current,) = store.reports(current_only=True)
    assert current.version == "2" and current.status == "amended" and "AV block" in current.text
    assert store.get(pre.id).superseded_by == current.id


def test_critical_interpretation_raises_the_alert(platform) -> None:
    server, store, poller, ours, _other = platform
    obs = critical_observation("rhythm", "Rhythm", "ventricular tachycardia")
    server.put_resource(report_for(ours, contained=[obs], result=[{"reference": "#rhythm"}]))
    result = poller.run_round(force=True)
    assert result.critical == 1
    (alert,) = store.unacknowledged_critical()
    assert alert.alerted_at is not None and "Rhythm" in alert.critical[0]


def test_platform_errors_back_off_and_bad_tokens_are_a_fault(platform, tmp_path) -> None:
    server, store, poller, ours, _other = platform
    server.put_resource(report_for(ours))
    server.faults.append("500")
    before = time.time()
    failed = poller.run_round(force=True)
    assert failed.error and "500" in failed.error and failed.stored == 0
    assert store.status("poller")["retry_at"] - before >= 2.5  # backs off (base 5 s, jittered)
    retried = poller.run_round(force=True)
    assert retried.stored == 1
    server.token = "rotated"
    refused = poller.run_round(force=True)
    assert refused.fault and "401" in refused.fault
    assert store.status("poller")["fault"]


def test_an_older_preliminary_arriving_a_round_after_the_final_stays_history(platform) -> None:
    """The platform files the reading doctor's earlier draft (a DiagnosticReport of its own,
    preliminary, issued before the final) only after the final was fetched: the next round brings
    it. The final must stay the study's current report everywhere the doctor looks (the console's
    list, `lastmile report list`), the draft kept as history behind it, not listed above it."""
    server, store, poller, ours, _other = platform
    server.put_resource(report_for(ours, conclusion="First-degree AV block", issued="2026-11-02T11:00:00+08:00"))
    assert poller.run_round(force=True).stored == 1
    (final,) = store.reports(current_only=True)
    assert final.status == "final"
    server.put_resource(
        report_for(
            ours, status="preliminary", conclusion="Preliminary: sinus rhythm", issued="2026-11-02T10:00:00+08:00"
        )
    )
    later = poller.run_round(force=True)
    assert later.error is None and later.stored == 1
    current = store.reports(current_only=True)
    assert [(r.id, r.status) for r in current] == [(final.id, "final")], [(r.id, r.status, r.text) for r in current]
    (draft,) = [r for r in store.reports() if r.id != final.id]
    assert draft.status == "preliminary" and draft.superseded_by == final.id
    assert [r.report_id for r in StoredReports(store).reports()] == [str(final.id)]
    (line,) = study_lines(store)
    assert (line.reports, line.status) == ((final,), "received")
    assert store.study(ours).final_at is not None


def test_a_report_the_platform_withdraws_is_shown_withdrawn_and_its_study_asked_about_again(platform, tmp_path) -> None:
    """The county marks its final report entered-in-error (read on the wrong ECG, for the wrong
    patient). The doctor must see it withdrawn, in Chinese, not as a "preliminary" report whose
    conclusion still reads "Normal ECG"; and the study is asked about again at its routine pace
    for the report that will replace it, not at the 12-hourly amendment pace."""
    server, store, poller, ours, _other = platform
    first = server.put_resource(report_for(ours, conclusion="Sinus rhythm. Normal ECG."))
    poller.run_round(force=True)
    assert store.study(ours).final_at is not None
    server.put_resource({**first, "status": "entered-in-error"})
    assert poller.run_round(force=True).stored == 1
    (current,) = store.reports(current_only=True)
    assert (current.version, current.status) == ("2", "withdrawn"), (current.status, current.text)
    assert [v.status for v in StoredReports(store).reports()] == ["withdrawn"]
    assert [line.status for line in study_lines(store)] == ["withdrawn"]
    assert store.study(ours).final_at is None  # polled as a study still waiting for its report
    with running_console(console_config(tmp_path / "data")) as console:
        client = Client(console.url)
        client.login()
        page = client.get(f"/reports/{current.id}").body
    assert "县里已撤回此报告" in page and "初步报告" not in page, page


STEMI_CONCLUSION = [{"coding": [{"system": "http://snomed.info/sct", "code": "401303003", "display": "STEMI"}]}]


def test_a_critical_draft_issued_after_the_final_is_shown_and_alerted(platform) -> None:
    """The county sends a normal final (10:00), then, two hours later, a preliminary reading a STEMI
    (another reading doctor, a second look). It was filed behind the final as history: the console
    showed only "Normal ECG", no alert went out, yet `doctor` failed "read the critical report now"
    with nothing on the console to read, and retention kept the study for ever."""
    server, store, poller, ours, _other = platform
    server.put_resource(report_for(ours, issued="2026-11-02T10:00:00+08:00"))
    poller.run_round(force=True)
    server.put_resource(
        report_for(
            ours,
            status="preliminary",
            conclusion="Preliminary: acute inferior STEMI",
            conclusionCode=STEMI_CONCLUSION,
            issued="2026-11-02T12:00:00+08:00",
        )
    )
    later = poller.run_round(force=True)
    assert later.stored == 1 and later.critical == 1
    (draft,) = [r for r in store.reports() if r.status == "preliminary"]
    assert draft.critical and draft.superseded_by is None, (draft.superseded_by, draft.critical)
    assert str(draft.id) in [r.report_id for r in StoredReports(store).reports()]
    assert draft.alerted_at is not None  # the round announced it
    assert [r.id for r in store.unacknowledged_critical()] == [draft.id]


def test_a_new_draft_after_a_withdrawn_final_is_shown(platform) -> None:
    """final -> entered-in-error -> the county's new preliminary: the console showed only the
    withdrawn one (the draft was filed behind it as if it were a final), the new reading hidden."""
    server, store, poller, ours, _other = platform
    first = server.put_resource(report_for(ours))
    poller.run_round(force=True)
    server.put_resource({**first, "status": "entered-in-error"})
    poller.run_round(force=True)
    server.put_resource(report_for(ours, status="preliminary", conclusion="Preliminary: first-degree AV block"))
    (withdrawn,) = [r for r in store.reports() if r.status == "withdrawn"]
    assert poller.run_round(force=True).stored == 1
    shown = [v.status for v in StoredReports(store).reports()]
    assert "preliminary" in shown, shown
    # one current report per study: the new reading replaces the withdrawn one, as a final would
    assert shown == ["preliminary"], shown
    (draft,) = store.reports(current_only=True)
    assert store.get(withdrawn.id).superseded_by == draft.id
    assert [line.status for line in study_lines(store)] == ["preliminary"]


def _issued(resource: dict, issued: str | None) -> dict:
    """The report with `issued` as the platform wrote it (not always a valid instant). None: left
    out, as some platforms do: the reader falls back to effectiveDateTime, the ECG's own time."""
    if issued is None:
        return {k: v for k, v in resource.items() if k != "issued"} | {"effectiveDateTime": "2026-11-02T08:30:00+08:00"}
    return {**resource, "issued": issued}


@pytest.mark.parametrize(
    "issued",
    [  # the same time as the withdrawn final: test_a_new_draft_after_a_withdrawn_final_is_shown
        None,  # effectiveDateTime, the ECG's time, is no time the draft was written
        "2026-11-02",  # a date only: the withdrawn report's day
        "2026-11-02T09:00:00",  # no zone: no true order with the withdrawn 10:00+08:00
    ],
    ids=["no issued", "date only", "no zone"],
)
def test_a_new_draft_not_known_older_than_the_withdrawn_final_is_shown(platform, issued: str | None) -> None:
    """Behind a withdrawn report a draft is history only when it is known to be older: a draft
    whose time does not say so was filed behind it, and the doctor saw only "withdrawn"."""
    server, store, poller, ours, _other = platform
    first = server.put_resource(report_for(ours, issued="2026-11-02T10:00:00+08:00"))
    poller.run_round(force=True)
    server.put_resource({**first, "status": "entered-in-error"})
    poller.run_round(force=True)
    draft = report_for(ours, status="preliminary", conclusion="Preliminary: first-degree AV block")
    server.put_resource(_issued(draft, issued))
    assert poller.run_round(force=True).stored == 1
    shown = [v.status for v in StoredReports(store).reports()]
    assert shown == ["preliminary"], shown
    assert [line.status for line in study_lines(store)] == ["preliminary"]


@pytest.mark.parametrize("draft_arrives", ["after the withdrawal", "before the withdrawal"])
def test_a_draft_written_before_the_withdrawn_final_stays_history(platform, draft_arrives: str) -> None:
    """final (10:00) -> entered-in-error, and a preliminary written at 09:00, before that final,
    arriving late (a round later, the platform's order). Arriving after the withdrawal it became
    the current report: the doctor read the draft of the reading the county took back. It predates
    the withdrawn report: history, as behind a final; the study still waits for its report."""
    server, store, poller, ours, _other = platform
    first = server.put_resource(report_for(ours, issued="2026-11-02T10:00:00+08:00"))
    poller.run_round(force=True)
    early_draft = report_for(
        ours, status="preliminary", conclusion="Preliminary: sinus rhythm", issued="2026-11-02T09:00:00+08:00"
    )
    steps = [
        lambda: server.put_resource({**first, "status": "entered-in-error"}),
        lambda: server.put_resource(early_draft),
    ]
    for put in steps if draft_arrives == "after the withdrawal" else steps[::-1]:
        put()
        assert poller.run_round(force=True).stored == 1
    (draft,) = [r for r in store.reports() if r.status == "preliminary"]
    (current,) = store.reports(current_only=True)
    assert current.status == "withdrawn", (current.status, current.text)
    assert store.current_of(draft.id) == current.id
    assert [v.status for v in StoredReports(store).reports()] == ["withdrawn"]
    assert [line.status for line in study_lines(store)] == ["withdrawn"]
    assert store.study(ours).final_at is None  # still asked about, at its routine pace


def test_a_new_final_after_a_withdrawn_one_replaces_it(platform, tmp_path) -> None:
    """final -> entered-in-error -> the county's new final: both were listed, and the withdrawn
    one's page still said a new report would be shown there when it came - it had come."""
    server, store, poller, ours, _other = platform
    first = server.put_resource(report_for(ours))
    poller.run_round(force=True)
    server.put_resource({**first, "status": "entered-in-error"})
    poller.run_round(force=True)
    (withdrawn,) = store.reports(current_only=True)
    server.put_resource(report_for(ours, conclusion="First-degree AV block"))
    assert poller.run_round(force=True).stored == 1
    (current,) = store.reports(current_only=True)
    # a plain final: "amended" says it changed a final that still stands, and none does
    assert current.status == "final" and "AV block" in current.text, current.status
    assert store.get(withdrawn.id).superseded_by == current.id
    assert [v.status for v in StoredReports(store).reports()] == ["received"]  # the page: no "amended" badge


def test_a_free_text_reading_doctor_is_shown_as_the_platform_wrote_it_everywhere(platform, tmp_path) -> None:
    """A FHIR report's reading doctor is free text ("李明=Li Ming, 主任" as a county doctor typed
    it), not a DICOM PN: the report's text, `lastmile report list`, the printout and the console's
    pages took its "=" for a PN's groups and showed "Li Ming, 主任" or "李明 (Li Ming, 主任)"."""
    server, store, poller, ours, _other = platform
    typed = "李明=Li Ming, 主任"
    server.put_resource(report_for(ours, resultsInterpreter=[{"display": typed}]))
    poller.run_round(force=True)
    (kept,) = store.reports()
    printed = printable(store, kept, speaker_for("zh-CN"))[0].decode()
    assert f"诊断医生：{typed}，" in printed and f"诊断医生：{typed}\n" in printed, printed
    assert typed in render_list(study_lines(store))
    with running_console(console_config(tmp_path / "data")) as console:
        client = Client(console.url)
        client.login()
        for path in ("/reports", f"/reports/{kept.id}"):
            page = client.get(path).body
            assert typed in page, f"{path}: {page}"


def coded_observation(obs_id: str, code: tuple[str, str, str], **value) -> dict:
    """A contained Observation coded as a county platform codes it (LOINC), with its value."""
    system, number, display = code
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "status": "final",
        "code": {"coding": [{"system": system, "code": number, "display": display}]},
        **value,
    }


def test_a_fhir_reports_known_codes_read_in_chinese_as_an_srs_do(platform) -> None:
    """Issue s37-R2: over FHIR the report's title, its results' names and coded values and its
    coded conclusion stayed as the platform's English displays (EKG study, Heart rate, Sinus
    rhythm, STEMI) on a Chinese printout, where the same concepts in an SR read in Chinese."""
    server, store, poller, ours, _other = platform
    rate = coded_observation(
        "hr", ("http://loinc.org", "8867-4", "Heart rate"), valueQuantity={"value": 72, "unit": "/min"}
    )
    rhythm = coded_observation(
        "rhythm",
        ("http://loinc.org", "8884-9", "Heart rate rhythm"),
        valueCodeableConcept={
            "coding": [{"system": "http://snomed.info/sct", "code": "426783006", "display": "Sinus rhythm"}]
        },
    )
    server.put_resource(
        report_for(
            ours,
            contained=[rate, rhythm],
            result=[{"reference": "#hr"}, {"reference": "#rhythm"}],
            conclusionCode=STEMI_CONCLUSION,
        )
    )
    poller.run_round(force=True)
    (kept,) = store.reports()
    zh = printable(store, kept, speaker_for("zh-CN"))[0].decode().splitlines()
    assert "心电图报告" in zh and "心率：72 /min" in zh, zh
    assert "Heart rate rhythm：窦性心律" in zh and "编码诊断：急性ST段抬高型心肌梗死" in zh, zh  # unknown: as written
    en = printable(store, kept, speaker_for("en"))[0].decode().splitlines()
    assert "EKG study" in en and "Heart rate: 72 /min" in en and "Coded conclusion: STEMI" in en, en


def test_a_fhir_reports_own_words_are_printed_though_coded(platform) -> None:
    """A Holter report titled "Holter 24h report - REVISED" whose rhythm reads "Sinus rhythm with
    first-degree AV block" printed as 心电图报告 / 窦性心律 because both were coded: the revision
    and the AV block were not on the paper. The county's words are printed as written."""
    server, store, poller, ours, _other = platform
    rhythm = coded_observation(
        "rhythm",
        ("http://loinc.org", "8884-9", "Heart rate rhythm"),
        valueCodeableConcept={
            "text": "Sinus rhythm with first-degree AV block",
            "coding": [{"system": "http://snomed.info/sct", "code": "426783006", "display": "Sinus rhythm"}],
        },
    )
    holter = {
        "text": "Holter 24h report - REVISED",
        "coding": [{"system": "http://loinc.org", "code": "11524-6", "display": "EKG study"}],
    }
    server.put_resource(report_for(ours, code=holter, contained=[rhythm], result=[{"reference": "#rhythm"}]))
    poller.run_round(force=True)
    (kept,) = store.reports()
    zh = printable(store, kept, speaker_for("zh-CN"))[0].decode().splitlines()
    assert "Holter 24h report - REVISED" in zh and "心电图报告" not in zh, zh
    assert "Heart rate rhythm：Sinus rhythm with first-degree AV block" in zh, zh
