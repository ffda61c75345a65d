"""`lastmile demo`: the whole ECG path on embedded defaults, in under a minute.

A temporary data directory, an embedded reading center on loopback, ECGs made from the real
12-lead ECG that ships in pydicom's wheel (resampled to 500 Hz), an outage of the reading center
in the middle and its recovery. The summary is read back from the receiving side.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from devices.ecg.recording import EcgRecording
from devices.identity import DeviceIdentity, Patient, TimeSource
from lastmile.config import Config
from lastmile.data_dir import open_outbox
from lastmile.demo.cardiologist import DemoCardiologist
from lastmile.demo.loopback import free_port
from lastmile.demo.reading_center import EmbeddedReadingCenter
from lastmile.ecg.intake import enqueue_recording
from lastmile.reports.sent import SentStudyRecorder
from lastmile.reports.service import make_poller
from lastmile.reports.store import ReportStore
from lastmile.services.forward import forwarder_settings, peer_settings
from uploader.ecg_forwarder import EcgForwarder

Say = Callable[[str], None]

DEMO_PATIENTS = [
    Patient("DEMO-0001", "Wang^Fang", dt.date(1958, 3, 2), "F"),
    Patient("DEMO-0002", "Li^Wei", dt.date(1949, 11, 20), "M"),
    Patient("DEMO-0003", "Zhang^Min", dt.date(1967, 7, 14), "F"),
    Patient("DEMO-0004", "Liu^Yang", dt.date(1972, 1, 30), "M"),
]


@dataclass
class DemoSummary:
    recordings: int = 0
    received: int = 0
    studies: int = 0
    committed: int = 0
    purged: int = 0
    lost: int = 0
    duplicated: int = 0
    quarantined: int = 0
    outage_s: float = 0.0
    elapsed_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


def source_ecg() -> EcgRecording:
    """pydicom's real 12-lead ECG (Mortara, 1000 Hz), resampled to 500 Hz."""
    from pydicom.data import get_testdata_file

    from devices.ecg.formats import decode_ecg

    path = get_testdata_file("waveform_ecg.dcm")
    assert isinstance(path, str), "pydicom's wheel ships waveform_ecg.dcm"
    rec = decode_ecg(Path(path).read_bytes(), "waveform_ecg.dcm")
    if rec.sampling_rate_hz == 1000:
        # average pairs (a boxcar anti-alias filter) then keep every other sample
        s = rec.samples[:, : rec.n_samples // 2 * 2].astype(np.int32)
        half = np.rint((s[:, 0::2] + s[:, 1::2]) / 2).astype(np.int16)
        rec = replace(rec, samples=half, sampling_rate_hz=500.0, resampled_from_hz=1000.0)
    return rec


def demo_recordings(n: int, start: dt.datetime) -> list[EcgRecording]:
    base = source_ecg()
    cart = DeviceIdentity(manufacturer="Mortara", model="ELI 250c (demo)", serial="DEMO-CART-1", address="demo")
    out = []
    for i in range(n):
        out.append(
            replace(
                base,
                patient=DEMO_PATIENTS[i % len(DEMO_PATIENTS)],
                device=cart,
                acquired_at=start + dt.timedelta(minutes=7 * i),
                time_source=TimeSource.DEVICE_CLOCK,
                stat=(i == 1),
                source_format="dicom",
            )
        )
    return out


def run_demo(say: Say, *, n_recordings: int = 12, outage_s: float = 4.0, data_dir: Path | None = None) -> DemoSummary:
    t0 = time.monotonic()
    summary = DemoSummary(recordings=n_recordings, outage_s=outage_s)
    with tempfile.TemporaryDirectory(prefix="lastmile-demo-") as tmp:
        config = Config()
        config.gateway.id = "demo-gateway"
        config.gateway.institution = "Demo Village Clinic"
        config.set_data_dir(data_dir or Path(tmp) / "data")
        rc = config.reading_center
        rc.port, rc.listen_port = free_port(), free_port()
        rc.listen_host = "127.0.0.1"
        rc.called_ae, rc.calling_ae = "READING_CENTER", "LASTMILE"
        rc.associations, rc.batch_size = 2, 4
        rc.commitment_timeout_s, rc.timeout_s = 5.0, 5.0
        config.outbox.backoff_base_s, config.outbox.backoff_max_s = 0.3, 1.5
        config.outbox.min_free_mb = 1

        cardiologist = DemoCardiologist()
        center = EmbeddedReadingCenter(
            port=rc.port,
            gateway_port=rc.listen_port,
            ae_title=rc.called_ae,
            gateway_ae=rc.calling_ae,
            reader=cardiologist,
        )
        center.start()
        say(f"reading center (embedded) listening on 127.0.0.1:{rc.port} as {rc.called_ae}")
        outbox = open_outbox(config)
        reports = ReportStore.open(config.data_dir)
        recorder = SentStudyRecorder(outbox, reports)
        recorder.start()
        events = {"sent": 0, "retry": 0, "link-down": 0}

        def on_event(kind: str, info: dict) -> None:
            if kind in events:
                events[kind] += 1
            recorder.on_event(kind, info)

        forwarder = EcgForwarder(outbox, forwarder_settings(config), on_event=on_event)
        forwarder.start()
        stop = threading.Event()
        try:
            recordings = demo_recordings(n_recordings, dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2))
            half = n_recordings // 2
            for i, rec in enumerate(recordings[:half]):
                enqueue_recording(outbox, rec, config, key=f"demo-ecg-{i}")
            say(f"clinic recorded {half} ECGs (one STAT); forwarding ...")
            _pump(forwarder, outbox, stop, until=lambda: _count(outbox, "queued", "sending", "sent") == 0, limit_s=15)
            say(f"  sent {events['sent']}, committed {_count(outbox, 'committed', 'purged')}")

            say(f"reading center goes offline for {outage_s:.0f} s (link down) ...")
            center.stop()
            for i, rec in enumerate(recordings[half:], start=half):
                enqueue_recording(outbox, rec, config, key=f"demo-ecg-{i}")
            say(f"clinic recorded {n_recordings - half} more ECGs while offline")
            t_out = time.monotonic()
            while time.monotonic() - t_out < outage_s:
                forwarder.run_round(stop)
                time.sleep(0.2)
            say(
                f"  while offline: {_count(outbox, 'queued')} waiting safely in the outbox, "
                f"{events['link-down']} failed attempt(s), nothing lost"
            )
            center.start()
            say("reading center is back; forwarding the backlog ...")
            done = lambda: _count(outbox, "purged") + _count(outbox, "quarantined") >= n_recordings
            _pump(forwarder, outbox, stop, until=done, limit_s=30)
            recorder.stop()
            _reports_part(config, reports, center, cardiologist.read, say, summary)
        finally:
            forwarder.close()
            recorder.stop()
            center.stop()
            reports.close()

        counts = outbox.stats(time.time())["counts"]  # the ECGs' (the parts below queue no DICOM)
        _ble_part(config, say, summary)
        _field_part(config, Path(tmp), say, summary)
        outbox.close()
        uids = set(center.received)
        summary.received = len(uids)
        summary.studies = len({o.study_uid for o in center.received.values()})
        summary.committed = len(center.committed)
        summary.purged = counts.get("purged", 0)
        summary.quarantined = counts.get("quarantined", 0)
        summary.lost = n_recordings - summary.received
        # a recording that reached the PACS twice would be a second SOP Instance (and study)
        summary.duplicated = max(0, summary.received - n_recordings, summary.studies - n_recordings)
        summary.elapsed_s = round(time.monotonic() - t0, 2)
    return summary


def _reports_part(
    config: Config, store: ReportStore, center: EmbeddedReadingCenter, read: int, say: Say, summary: DemoSummary
) -> None:
    """结果回传: the county's reports come back to the village (C-FIND + C-GET)."""
    say(f"the county cardiologist read {read} ECGs (reports, some with a PDF, at the reading center)")
    poller = make_poller(config, store, peer_settings(config.reading_center))
    # the service polls on a schedule (STAT every `reports.stat_poll_s`); the demo asks at once
    result = poller.run_round(force=True)
    if result.error or result.fault:
        say(f"  could not ask the reading center: {result.error or result.fault}")
    current = store.reports(current_only=True)
    critical = store.unacknowledged_critical()
    pdfs = sum(r.kind == "pdf" for r in current)
    say(
        f"  gateway asked about {result.asked} studies in one query, brought back {result.stored} reports "
        f"({pdfs} PDF) with {result.retrieved_by or 'nothing'} ({result.bytes / 1024:.1f} KB on the wire)"
    )
    for report in critical:
        study = store.study(report.study_uid)
        who = study.patient_id if study else "?"
        say(
            f"  CRITICAL (危急值) report #{report.id} for patient {who}: {report.critical[0]} - "
            f"`lastmile doctor` shows FAIL until the doctor runs `lastmile report ack {report.id}`"
        )
    say("  the doctor now sees each patient's report: `lastmile report list`, `report show ID`, `report print ID`")
    summary.extra.update(
        {
            "reports_returned": len(current),
            "critical_reports": len(critical),
            "report_pdfs": pdfs,
            "report_round_bytes": result.bytes,
        }
    )


def _ble_part(config: Config, say: Say, summary: DemoSummary) -> None:
    """An emulated BP cuff and thermometer through the real BLE path (bleak over bumble)."""
    try:
        from lastmile.services.ble_devices import run_emulated_clinic
    except ImportError as exc:  # bumble is the optional `emulation` extra
        say(f"BLE part skipped: emulation not installed ({exc}); pip install 'lastmile[emulation]'")
        return
    patient = DEMO_PATIENTS[0]
    say(
        f"patient {patient.patient_id} is with the doctor; an emulated BP cuff and thermometer "
        "connect over BLE (real bleak API, bumble radio) ..."
    )
    ble = run_emulated_clinic(config, patient_id=patient.patient_id, patient_name=patient.name)
    say(
        f"  {ble.observations} observations: {ble.stored} on {patient.patient_id}, "
        f"{ble.held} older cuff readings held unassigned for the doctor, "
        f"{ble.duplicates} re-sent records recognised"
    )
    summary.extra.update(
        {
            "ble_observations": ble.observations,
            "ble_stored": ble.stored,
            "ble_held": ble.held,
            "ble_duplicates": ble.duplicates,
        }
    )


def _field_part(config: Config, work_dir: Path, say: Say, summary: DemoSummary) -> None:
    """A family doctor's field day: GPS-tagged visits along a replayed NMEA track with the link
    down, then FHIR R4 sync to an embedded county platform when it returns. Recorded in the demo's
    own data dir, so the console's Visits page lists them (its sync sends FHIR bundles only)."""
    from lastmile.demo.field_day import run_field_day

    say("field visits: the doctor visits 3 households along a replayed GPS track, no signal ...")
    day = run_field_day(work_dir, visits=3, gateway_id=config.gateway.id, data_dir=config.data_dir)
    say(
        f"  {day['visits']} visits ({day['readings']} readings) signed into the gateway's chain "
        f"(verified: {day['chain_verified']}); {day['link_down_attempts']} sync attempt(s) "
        f"failed while offline"
    )
    say(
        f"  link back: {day['visits_synced']} visits and {day['observations_synced']} observations "
        f"synced to the county platform (FHIR R4); {day['visits_flagged']} visit(s) flagged "
        f"for review (e.g. recorded 2 km from the household)"
    )
    summary.extra.update(
        {
            "visits": day["visits"],
            "visits_synced": day["visits_synced"],
            "visits_flagged": day["visits_flagged"],
            "observations_synced": day["observations_synced"],
            "chain_verified": day["chain_verified"],
        }
    )


def _count(outbox, *states: str) -> int:
    counts = outbox.stats(time.time())["counts"]
    return sum(counts.get(s, 0) for s in states)


def _pump(forwarder: EcgForwarder, outbox, stop: threading.Event, *, until: Callable[[], bool], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not until() and time.monotonic() < deadline:
        wait = forwarder.step(stop)
        time.sleep(min(wait, 0.2))
