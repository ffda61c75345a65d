"""The Sent page's ECG studies after the outbox purged them: each shows its own patient and
report as `sent_studies` keeps them, also when outbox.sqlite was made anew (item ids from 1 again)."""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devices.identity import Patient
from firmware_bridge.dicom_receiver import DicomReceiver, ReceiverSettings
from lastmile.clinic.db import DB_NAME, MIGRATIONS
from lastmile.config import Config
from lastmile.data_dir import open_outbox
from lastmile.demo.cardiologist import ecg_report_sr
from lastmile.demo.reading_center import EmbeddedReadingCenter
from lastmile.ecg.intake import enqueue_recording, lan_object_store
from lastmile.reports.sent import SentStudyRecorder
from lastmile.reports.store import ReportStore
from lastmile.services.forward import ForwardService, forwarder_settings
from lastmile.services.link_status import READING_CENTER_STATUS
from tests.console_harness import DOCTOR, VALID_ID, Client, running_console, set_aside_outbox
from tests.ecg_factories import make_recording
from tests.peers import free_port
from tests.report_peers import gateway_config, poller_for, send_ecgs, to_read
from tests.waiting import wait_for
from uploader.dicom_association import PeerSettings
from uploader.dicom_ecg import StationInfo, mint_uids, recording_to_dicom_bytes
from uploader.dicom_store import StoreAssociation
from uploader.ecg_forwarder import EcgForwarder
from uploader.sqlite_store import open_database

OTHER_ID = "DEMO-0002"  # a clinic-issued ID (no resident card)
CART = "CART1"
BEFORE_ITEM_KEYS = "0029_sent_study_item_key"
BEFORE_REPORT_LINES = "0009_report_lines"


@pytest.fixture
def center() -> Iterator[EmbeddedReadingCenter]:
    """A reading center with storage commitment: what it commits, the gateway purges."""
    center = EmbeddedReadingCenter(port=free_port(), gateway_port=free_port(), gateway_ae="CLINIC01")
    center.start()
    yield center
    center.stop()


def clinic_config(tmp_path: Path, center: EmbeddedReadingCenter) -> Config:
    config = gateway_config(tmp_path, center.port, center.ae_title, listen_port=center.gateway_port)
    config.console.listen = f"127.0.0.1:{free_port()}"
    config.gps.source = "none"
    return config


def send_and_purge(config: Config, number: int, patient: Patient) -> None:
    """An ECG of `patient` sent for real, committed by the reading center, then purged (its patient
    and study UID erased from the outbox: the sent-study record is what is left)."""
    (study,) = [
        s for s in send_ecgs(config, [make_recording(number, patient=patient)]) if s.patient_id == patient.patient_id
    ]
    with open_outbox(config) as outbox:
        assert outbox.purge_due(time.time() + 1, 0.0) == 1
    assert study.outbox_item_id == 1  # a new outbox's first item: the same id each time


def journeys(page: str) -> list[str]:
    section = page.split('id="h-studies"', 1)[1].split("</section>", 1)[0]
    return section.split('<li class="card journey')[1:]


def test_after_the_outbox_is_made_anew_a_sent_ecg_shows_its_own_patient(
    tmp_path: Path, center: EmbeddedReadingCenter
) -> None:
    """sent_studies is found by outbox item id. A new outbox (the old one damaged and set aside)
    numbers its items from 1 again: 李伟's purged ECG was shown with 张三's record of item 1 -
    another patient, and the cardiologist's report on 张三's ECG linked from 李伟's."""
    config = clinic_config(tmp_path, center)
    send_and_purge(config, 5, Patient(VALID_ID, "Zhang^San=张^三"))
    with ReportStore.open(config.data_dir) as store:
        (old,) = store.studies()
        center.add_report(ecg_report_sr(to_read(old), findings=[], impression="窦性心律"))
        assert poller_for(config, store).run_round(force=True).stored == 1
        (report,) = store.reports()
    set_aside_outbox(config)
    send_and_purge(config, 6, Patient(OTHER_ID, "Li^Wei=李^伟"))
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        (journey,) = journeys(client.get("/sent").body)
    assert "李伟" in journey and OTHER_ID in journey, journey
    assert "张三" not in journey and VALID_ID not in journey, journey
    assert f'href="/reports/{report.id}"' not in journey, journey


def receive_from_cart(config: Config, number: int, patient: Patient) -> None:
    """An ECG the cart sends over the clinic LAN, stored by the real receiver (keyed by its SOP
    Instance UID)."""
    ecg = recording_to_dicom_bytes(make_recording(number, patient=patient), mint_uids(), StationInfo("cart-1"))
    settings = ReceiverSettings(port=0, allowed_callers=(CART,), timeout_s=30)
    with open_outbox(config) as outbox, DicomReceiver(settings, lan_object_store(outbox)) as receiver:
        with StoreAssociation(PeerSettings("127.0.0.1", receiver.port, "LASTMILE", CART, timeout_s=60.0)) as cart:
            assert cart.store(ecg).status == 0x0000


def purge(config: Config) -> None:
    with open_outbox(config) as outbox:
        assert outbox.purge_due(time.time() + 1, 0.0) >= 1


def as_written_before(config: Config, migration: str) -> None:
    """clinic.db as a gateway before `migration` left it: a database made by the migrations before
    it, holding the sent studies and reports as they were recorded but for what it did not keep
    (the columns added since). The next open migrates it, as the upgrade does."""
    path = config.data_dir / DB_NAME
    recorded = path.rename(config.data_dir.parent / "recorded.db")
    db = open_database(path, tuple(m for m in MIGRATIONS if m.name < migration))
    try:
        db.conn.execute("ATTACH DATABASE ? AS recorded", (str(recorded),))
        for table in ("sent_studies", "reports"):
            columns = ", ".join(r["name"] for r in db.conn.execute(f"PRAGMA table_info({table})"))
            db.conn.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM recorded.{table}")
    finally:
        db.conn.close()


def test_sent_ecgs_recorded_before_item_keys_were_kept_show_their_patient_where_their_item_is_certain(
    tmp_path: Path, center: EmbeddedReadingCenter
) -> None:
    """A sent study recorded before clinic.db kept its item's key (0029) matched no item: the ECG
    showed 无患者 and no report link on the Sent page until retention dropped the record. Now the
    forward service's start gives such a record its item's key when the item is surely its own
    (the same study UID while the outbox holds it; purged, the same SOP instance for an object
    received on the LAN); the others stay without a patient, and an earlier outbox's record of a
    reused item id never lends its patient."""
    config = clinic_config(tmp_path, center)
    send_and_purge(config, 5, Patient(VALID_ID, "Zhang^San=张^三"))  # the earlier outbox's item 1
    set_aside_outbox(config)
    receive_from_cart(config, 6, Patient("DEMO-0003", "Wang^Fang=王^芳"))  # the new outbox's item 1
    send_ecgs(config, [])
    purge(config)
    send_ecgs(config, [make_recording(7, patient=Patient("DEMO-0004", "Liu^Yang=刘^洋"))])  # item 2
    purge(config)
    send_ecgs(config, [make_recording(8, patient=Patient(OTHER_ID, "Li^Wei=李^伟"))])  # item 3: not purged yet
    with ReportStore.open(config.data_dir) as store:
        wang = next(s for s in store.studies() if s.patient_id == "DEMO-0003")
        center.add_report(ecg_report_sr(to_read(wang), findings=[], impression="窦性心律"))
        assert poller_for(config, store).run_round(force=True).stored == 1
        (report,) = store.reports()
    as_written_before(config, BEFORE_ITEM_KEYS)

    # the upgraded forward service starts
    with open_outbox(config) as outbox, ReportStore.open(config.data_dir) as store:
        assert len(store.studies()) == 4
        SentStudyRecorder(outbox, store).backfill()
    purge(config)  # 李伟's ECG purged after the upgrade
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        li, liu, wang_fang = journeys(client.get("/sent").body)
    assert "王芳" in wang_fang and f'href="/reports/{report.id}"' in wang_fang, wang_fang
    assert "张三" not in wang_fang and VALID_ID not in wang_fang, wang_fang
    assert "无患者" in liu and "刘洋" not in liu, liu  # its item holds nothing to prove it is its own
    assert "李伟" in li and OTHER_ID in li, li


def test_a_purged_lan_ecg_that_two_old_records_name_gives_its_key_to_neither(
    tmp_path: Path, center: EmbeddedReadingCenter
) -> None:
    """A cart that sent the same instance again under another study UID left two records of one
    purged item, both naming its SOP instance: which is its cannot be known, neither is given it."""
    config = clinic_config(tmp_path, center)
    receive_from_cart(config, 9, Patient("DEMO-0003", "Wang^Fang=王^芳"))
    (study,) = send_ecgs(config, [])
    purge(config)
    with open_outbox(config) as outbox, ReportStore.open(config.data_dir) as store:
        store.db.conn.execute("UPDATE sent_studies SET item_key = NULL")  # as written before 0029
        store.db.conn.execute(
            "INSERT INTO sent_studies (study_uid, outbox_item_id, sop_instance_uid, patient_id, patient_name, "
            "sent_at, stat, polls) VALUES ('2.25.9', ?, ?, 'DEMO-0005', 'Zhao^Liu=赵^六', ?, 0, 0)",
            (study.outbox_item_id, study.sop_instance_uid, study.sent_at.isoformat()),
        )
        assert SentStudyRecorder(outbox, store).give_keys_to_old_records() == 0
        assert store.studies_of_items([outbox.get(1)]) == {}


def report_text_shown(config: Config, report_id: int) -> str:
    """The report's text as the Reports page shows it to the doctor (in Chinese)."""
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        page = client.get(f"/reports/{report_id}").body
    return html.unescape(page.split('<pre class="report-text">', 1)[1].split("</pre>", 1)[0])


def test_a_report_stored_before_report_lines_is_shown_in_the_doctors_language(
    tmp_path: Path, center: EmbeddedReadingCenter
) -> None:
    """A report stored before clinic.db kept its lines (0009) had only its English text: the
    Reports page showed a doctor reading Chinese "Read by ...", "Findings" and the county's
    headings in English. The upgrade reads its lines again from the SR it keeps as received: it
    reads as the same report received now."""
    config = clinic_config(tmp_path, center)
    send_and_purge(config, 5, Patient(VALID_ID, "Zhang^San=张^三"))
    with ReportStore.open(config.data_dir) as store:
        (study,) = store.studies()
        center.add_report(ecg_report_sr(to_read(study), findings=["窦性心律"], impression="心电图正常"))
        assert poller_for(config, store).run_round(force=True).stored == 1
        (report,) = store.reports()
        # an old row whose object cannot be read again (damaged on the SD card): it keeps its text
        store.db.conn.execute(
            "INSERT INTO reports (study_uid, source, kind, object_uid, status, text, received_at, data) "
            "SELECT study_uid, source, kind, '1.2.3.4', 'preliminary', text, received_at, X'00' FROM reports"
        )
    received_now = report_text_shown(config, report.id)
    assert "诊断医生" in received_now and "Read by" not in received_now, received_now

    as_written_before(config, BEFORE_REPORT_LINES)
    # the upgraded forward service starts: it reads them again after its start, not the console
    service = ForwardService(config)
    try:
        wait_for(lambda: not_read_yet(config) == 0, what="the old reports read again by the forward service")
    finally:
        service.close()
    assert report_text_shown(config, report.id) == received_now
    with ReportStore.open(config.data_dir) as store:
        upgraded, damaged = sorted(store.reports(), key=lambda r: r.id)
    assert upgraded.lines is not None and upgraded.text == report.text  # the English text stays as stored
    assert damaged.lines is None and damaged.text == report.text


def not_read_yet(config: Config) -> int:
    """Reports stored before lines that the forward service has neither read again nor marked."""
    with ReportStore.open(config.data_dir) as store:
        return int(
            store.db.conn.execute(
                "SELECT count(*) FROM reports WHERE lines IS NULL AND lines_not_read IS NULL"
            ).fetchone()[0]
        )


def analysed(panel: str) -> str | None:
    """The panel once the console's worker made the ECG's preview (and the intake's heart rate shows)."""
    return panel if "心率" in panel and "preview.svg" in panel else None


def ecg_panel(client: Client) -> str:
    return client.get("/today").body.split('id="panel-ecg"', 1)[1].split("</section>", 1)[0]


def test_todays_ecg_of_the_checked_in_patient_stays_on_today_after_the_county_confirmed_it(
    tmp_path: Path, center: EmbeddedReadingCenter
) -> None:
    """Once the county confirmed an ECG (seconds on a good link) the outbox purges it, patient and
    all: Today then said of 张三, checked in, "该患者 12 小时内没有心电图" - and the doctor
    recorded again, a second study at the county. It shows his ECG still, with the heart rate
    and preview made before the purge, the patient taken from what sent_studies recorded."""
    config = clinic_config(tmp_path, center)
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        assert client.post("/today/check-in", {"patient_id": VALID_ID, "name": "张三"}).status == 303
        with open_outbox(config) as outbox:
            enqueue_recording(
                outbox, make_recording(5, patient=Patient(VALID_ID, "Zhang^San=张^三")), config, key="ecg-5"
            )
        before = wait_for(lambda: analysed(ecg_panel(client)), what="the ECG's preview")
        (study,) = send_ecgs(config, [])  # the real forwarder, the reading center commits it
        assert study.patient_id == VALID_ID
        purge(config)
        after = ecg_panel(client)
        preview = client.get(f"/ecg/{study.outbox_item_id}/preview.svg")
        # his check-in ended: the ECG stored last is still said to be his, not "无患者"
        assert client.post("/today/end-session", {"patient_id": VALID_ID}).status == 303
        nobody_checked_in = ecg_panel(client)
    assert "张三" in before and VALID_ID in before, before
    assert "没有心电图" not in after and "无患者" not in after, after
    assert "张三" in after and VALID_ID in after, after
    heart_rate = before.split("心率", 1)[1].split("</p>", 1)[0]
    assert heart_rate in after, (heart_rate, after)  # the verdict and rate worked out before the purge
    assert f"/ecg/{study.outbox_item_id}/preview.svg" in after, after
    assert preview.status == 200 and "<svg" in preview.body, preview.status
    assert "张三" in nobody_checked_in and "无患者" not in nobody_checked_in, nobody_checked_in


def test_a_study_the_link_refuses_is_said_in_plain_words_and_a_patient_with_no_name_once(tmp_path: Path) -> None:
    """The reading center does not answer: the Sent page said why in the sender's English, bold in
    the study's card on a Chinese page ("cannot connect to READING_CENTER@...: refused or
    unreachable"); now a sentence the doctor reads, that text folded away for the technician. And
    a patient checked in with no name was shown by the ID twice: "(no name)" and the ID now."""
    config = gateway_config(tmp_path, free_port(), "READING_CENTER")  # nothing listens on its port
    config.console.listen = f"127.0.0.1:{free_port()}"
    config.gps.source = "none"
    stop = threading.Event()
    with open_outbox(config) as outbox:
        item = enqueue_recording(outbox, make_recording(7, patient=Patient(VALID_ID, "")), config, key="ecg-7").item
        with EcgForwarder(outbox, forwarder_settings(config)) as forwarder:
            deadline = time.monotonic() + 60
            while not (outbox.get(item.id).attempts and outbox.status(READING_CENTER_STATUS)):
                assert time.monotonic() < deadline, "no attempt failed"
                time.sleep(min(forwarder.step(stop), 0.2))
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        page = client.get("/sent").body
    (journey,) = journeys(page)
    link = page.split('id="h-link"', 1)[1].split("</section>", 1)[0]
    for card in (journey, link):
        said, technician = card.split('<details class="problem-details">', 1)
        assert "refused or unreachable" not in said, said
        assert '<span lang="en">cannot connect to READING_CENTER@127.0.0.1:' in technician, technician
        assert "技术人员查看的详细信息" in technician
    assert "已失败 1 次，正在重试" in journey and "网络自" in link
    assert f'<strong>（未填姓名）</strong> <span class="id">{VALID_ID}</span>' in journey, journey
    assert journey.count(VALID_ID) == 1, journey


def test_todays_sent_studies_of_its_ecgs_are_found_by_index_after_the_upgrade(tmp_path: Path) -> None:
    """Today looks up the sent studies of its ECGs (`studies_of_items`) on every live-panel push.
    A gateway after three years holds ~30,000 of them: the lookup scanned them all (REV-G 5), under
    clinic.db's lock. The upgrade's migration indexes them by item, quickly, and the lookup
    searches the index."""
    config = Config()
    config.set_data_dir(tmp_path / "data")
    config.outbox.min_free_mb = 1
    config.data_dir.mkdir(parents=True)
    db = open_database(
        config.data_dir / DB_NAME, tuple(m for m in MIGRATIONS if m.name < "0038_sent_studies_item_index")
    )
    try:
        with db.conn:
            db.conn.executemany(
                "INSERT INTO sent_studies (study_uid, outbox_item_id, item_key, sent_at) VALUES (?, ?, ?, ?)",
                ((f"1.2.3.{n}", n, f"key-{n}", "2026-01-01T00:00:00+00:00") for n in range(1, 30_001)),
            )
    finally:
        db.conn.close()
    with open_outbox(config) as outbox:
        enqueue_recording(outbox, make_recording(5, patient=Patient(VALID_ID, "张三")), config, key="today")
        (item,) = outbox.items()
        started = time.monotonic()
        with ReportStore.open(config.data_dir) as store:
            migrated_s = time.monotonic() - started
            traced: list[str] = []
            store.db.conn.set_trace_callback(traced.append)
            try:
                store.studies_of_items([item])
            finally:
                store.db.conn.set_trace_callback(None)
            (query,) = [sql for sql in traced if sql.lstrip().upper().startswith("SELECT")]
            plan = [row[3] for row in store.db.conn.execute("EXPLAIN QUERY PLAN " + query)]
    assert not any(step.startswith("SCAN sent_studies") for step in plan), plan
    assert migrated_s < 5.0, f"the upgrade took {migrated_s:.1f} s"  # ~0.1 s here: no table rewrite


def test_a_purged_ecg_of_a_reused_item_id_is_not_shown_to_another_checked_in_patient(
    tmp_path: Path, center: EmbeddedReadingCenter
) -> None:
    """Today finds a purged ECG's patient in sent_studies by its item id and its item's key. The
    outbox made anew numbers its items from 1 again: 李伟's record of the earlier outbox's item 1
    must never make 张三's purged ECG (the new item 1) his - 李伟, checked in, would be shown
    张三's ECG, and a re-record skipped. Also while 张三's own record is not written yet (the
    recorder retries a batch clinic.db refused; the purge at commitment does not wait for it)."""
    config = clinic_config(tmp_path, center)
    send_and_purge(config, 6, Patient(OTHER_ID, "Li^Wei=李^伟"))  # the earlier outbox's item 1
    set_aside_outbox(config)
    send_and_purge(config, 5, Patient(VALID_ID, "Zhang^San=张^三"))  # the new outbox's item 1
    with running_console(config) as server:
        client = Client(server.url)
        client.login(DOCTOR)
        assert client.post("/today/check-in", {"patient_id": OTHER_ID, "name": "李伟"}).status == 303
        with_own_record = ecg_panel(client)
        with ReportStore.open(config.data_dir) as store:  # 张三's record as not yet written
            assert store.db.conn.execute("DELETE FROM sent_studies WHERE patient_id = ?", (VALID_ID,)).rowcount == 1
        without_own_record = ecg_panel(client)
        assert client.post("/today/end-session", {"patient_id": OTHER_ID}).status == 303
        nobody_checked_in = ecg_panel(client)
    for panel in (with_own_record, without_own_record):
        assert "没有心电图" in panel and "张三" not in panel and VALID_ID not in panel, panel
    # the ECG stored last, with nobody checked in: nobody's until its record comes, never 李伟's
    assert "无患者" in nobody_checked_in and "李伟" not in nobody_checked_in, nobody_checked_in
