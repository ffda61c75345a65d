"""The doctor's console for tests: a real server on loopback over a data directory, and a small
HTTP client that logs in like a browser (cookies, the CSRF token of each page's forms)."""

from __future__ import annotations

import datetime as dt
import http.cookiejar
import json
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from devices.identity import DeviceIdentity, TimeSource
from devices.observation import Observation, Quantity
from lastmile.clinic.db import open_clinic_db
from lastmile.clinic.observations import StoreResult
from lastmile.config import Config
from lastmile.console.accounts import Accounts
from lastmile.console.service import ConsoleServer
from lastmile.console.sources import HeldEcgSource, ReportsSource, ReportView
from lastmile.data_dir import OUTBOX_DB
from lastmile.demo.loopback import free_port
from lastmile.reports.report_text import Reader

DOCTOR = ("王医生", "correct horse 1")
VALID_ID = "11010519491231002X"  # GB 11643's own example
ADMIN = ("admin", "battery staple 2")

CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


def held_ecg_row(page: str, item_id: int) -> str:
    """The words of held ECG E`item_id`'s row on Today, its tags gone and its spaces single."""
    found = re.search(rf'<li data-held-ecg="{item_id}">(.*?)</li>', page, re.S)
    assert found, f"E{item_id} is on Today"
    return " ".join(re.sub(r"<[^>]+>", " ", found.group(1)).split())


def csrf_of(page: str) -> str:
    """The page's form token."""
    found = CSRF_FIELD.search(page)
    assert found
    return found.group(1)


def console_config(data_dir: Path, *, https: bool = False, port: int | None = None) -> Config:
    config = Config()
    config.set_data_dir(data_dir)
    config.console.listen = f"127.0.0.1:{port or free_port()}"
    config.console.https = https
    config.gps.source = "none"
    config.outbox.min_free_mb = 1
    return config


def add_users(config: Config) -> None:
    db = open_clinic_db(config.data_dir)
    try:
        accounts = Accounts(db)
        now = dt.datetime.now(dt.timezone.utc)
        existing = {u.name for u in accounts.users()}
        if DOCTOR[0] not in existing:
            accounts.add_user(DOCTOR[0], "doctor", DOCTOR[1], now=now)
        if ADMIN[0] not in existing:
            accounts.add_user(ADMIN[0], "admin", ADMIN[1], now=now)
    finally:
        db.conn.close()


def set_aside_outbox(config: Config) -> None:
    """outbox.sqlite damaged and moved aside (the county IT; e2fsck's repair at boot): the next
    start makes a new, empty outbox whose item ids start at 1 again. clinic.db stays."""
    aside = config.data_dir.parent / "aside"
    aside.mkdir(exist_ok=True)
    for entry in config.data_dir.iterdir():
        if entry.name.startswith(OUTBOX_DB) or entry.name == "payloads":
            entry.rename(aside / entry.name)


@contextmanager
def running_console(
    config: Config, *, reports: ReportsSource | None = None, held_ecgs: HeldEcgSource | None = None
) -> Iterator[ConsoleServer]:
    add_users(config)
    server = ConsoleServer(config, reports=reports, held_ecgs=held_ecgs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class StaticReports:
    """Reports given in memory, behind the console's `ReportsSource` (the real one: the report store)."""

    items: list[ReportView] = field(default_factory=list)
    pdfs: dict[str, bytes] = field(default_factory=dict)

    def reports(self, limit: int = 200) -> list[ReportView]:
        return sorted(self.items, key=lambda r: r.received_at, reverse=True)[:limit]

    def report(self, report_id: str) -> ReportView | None:
        return next((r for r in self.items if r.report_id == report_id), None)

    def unacknowledged_critical(self) -> list[ReportView]:
        return [r for r in self.reports(len(self.items)) if r.critical and r.acknowledged_at is None]

    def acknowledge(self, report_id: str, by: str, now: dt.datetime) -> ReportView | None:
        found = self.report(report_id)
        if found is None or found.acknowledged_at is not None:
            return found
        done = replace(found, acknowledged_at=now, acknowledged_by=by)
        self.items[self.items.index(found)] = done
        return done

    def pdf(self, report_id: str) -> bytes | None:
        return self.pdfs.get(report_id)

    def print_job(self, report_id: str, reader: Reader) -> tuple[str, bytes] | None:
        # these screens' tests print nothing: the printouts are the report store's (StoredReports)
        found = self.report(report_id)
        return None if found is None else ("", found.text.encode("utf-8"))


@dataclass
class Reply:
    status: int
    body: str
    headers: dict[str, str]
    cookies: list[str]  # raw Set-Cookie headers

    @property
    def location(self) -> str:
        return self.headers.get("location", "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class _LoopbackIsSecure(http.cookiejar.DefaultCookiePolicy):
    """As browsers do: Secure cookies go to http://127.0.0.1 too (a potentially trustworthy origin)."""

    def return_ok_secure(self, cookie: http.cookiejar.Cookie, request: urllib.request.Request) -> bool:
        host = urllib.parse.urlsplit(request.full_url).hostname
        return host in ("127.0.0.1", "localhost", "::1") or super().return_ok_secure(cookie, request)


class Client:
    """A browser-like client: keeps cookies, never follows redirects (tests look at them)."""

    def __init__(self, base_url: str, *, language: str = "zh-CN") -> None:
        self.base = base_url
        self.jar = http.cookiejar.CookieJar(policy=_LoopbackIsSecure())
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), urllib.request.HTTPSHandler(context=context), _NoRedirect()
        )
        self.language = language
        self.csrf = ""

    def request(
        self, method: str, path: str, form: dict[str, str] | None = None, headers: dict[str, str] | None = None
    ) -> Reply:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Accept", "text/html")
        req.add_header("Accept-Language", self.language)
        if data is not None:
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            resp = self.opener.open(req, timeout=60)
        except urllib.error.HTTPError as err:
            resp = err
        body = resp.read().decode("utf-8", errors="replace")
        reply = Reply(
            resp.status, body, {k.lower(): v for k, v in resp.headers.items()}, resp.headers.get_all("set-cookie") or []
        )
        found = CSRF_FIELD.search(body)
        if found:
            self.csrf = found.group(1)
        return reply

    def get(self, path: str, **kw: object) -> Reply:
        return self.request("GET", path, **kw)  # type: ignore[arg-type]

    def post(self, path: str, form: dict[str, str] | None = None, *, csrf: bool = True, **kw: object) -> Reply:
        form = dict(form or {})
        if csrf:
            form.setdefault("csrf", self.csrf)
        return self.request("POST", path, form, **kw)  # type: ignore[arg-type]

    def login(self, user: tuple[str, str] = DOCTOR) -> Reply:
        self.get("/login")
        reply = self.post("/login", {"name": user[0], "password": user[1], "next": "/today"})
        assert reply.status == 303, (reply.status, reply.body[:500])
        self.get("/today")  # the login's own CSRF token
        return reply


def enqueue_ecg(config: Config, *, lead_off: bool) -> None:
    """An ECG for VALID_ID arrives, as from a cart (V3 electrode off: a "re-record" verdict)."""
    from dataclasses import replace

    import numpy as np

    from devices.identity import Patient
    from lastmile.data_dir import open_outbox
    from lastmile.demo.runner import source_ecg
    from lastmile.ecg.intake import enqueue_recording
    from tests.ecg_faults import electrode_off

    rec = replace(source_ecg(), patient=Patient(VALID_ID, "Zhang^San"), acquired_at=dt.datetime.now(dt.timezone.utc))
    if lead_off:
        rec, _fault = electrode_off(rec, np.random.default_rng(1), "V3", "blank")
    with open_outbox(config) as outbox:
        enqueue_recording(outbox, rec, config, key=f"test-ecg-{lead_off}")


def bp_reading(measured_at: dt.datetime, key: str, time_source: TimeSource = TimeSource.DEVICE_CLOCK) -> Observation:
    """A cuff's BP reading (131/84 mmHg) measured at `measured_at`."""
    return Observation(
        kind="blood-pressure",
        quantities=(
            Quantity("systolic", 131.0, "mm[Hg]", 131.0, "mm[Hg]"),
            Quantity("diastolic", 84.0, "mm[Hg]", 84.0, "mm[Hg]"),
        ),
        measured_at=measured_at,
        time_source=time_source,
        received_at=measured_at,
        device=DeviceIdentity("Acme", "BP-1", "42", "AA:BB:CC:DD:EE:01"),
        record_key=key,
    )


def record_readings(config: Config, *readings: Observation, now: dt.datetime | None = None) -> list[StoreResult]:
    """`readings` arriving as the acquire service records them (clinic.db and the outbox): what
    became of each (stored for the checked-in patient, or held with nobody checked in)."""
    from lastmile.clinic.observations import ObservationStore
    from lastmile.data_dir import open_outbox

    at = now or dt.datetime.now(dt.timezone.utc)
    with open_outbox(config) as outbox:
        store = ObservationStore.open(config.data_dir, outbox=outbox, idle_timeout_s=900)
        try:
            return [store.record(r, now=at) for r in readings]
        finally:
            store.close()


def hold_readings(config: Config, *readings: Observation) -> list[int]:
    """Readings arriving with nobody checked in: held unassigned (their held ids)."""
    results = record_readings(config, *readings)
    assert [r.outcome for r in results] == ["held"] * len(readings), results
    return [r.held_id for r in results if r.held_id is not None]


def record_receipt_timed_bp(config: Config, key: str) -> None:
    """A BP reading from a cuff without a usable clock arrives for the checked-in patient: its
    time is when the gateway received it (time_source gateway-receipt)."""
    now = dt.datetime.now(dt.timezone.utc)
    [result] = record_readings(config, bp_reading(now, key, TimeSource.GATEWAY_RECEIPT), now=now)
    assert result.outcome == "stored", result.outcome


def store_returned_reports(config: Config) -> tuple[int, int]:
    """Two ECGs sent for this clinic and the county's reports on them, in the real report store
    (as the poller stores them): (critical report id, routine report id)."""
    from pydicom.uid import generate_uid

    from lastmile.demo.cardiologist import STEMI, StudyToRead, ecg_report_sr, part10
    from lastmile.reports.store import ReportStore, SentStudy
    from uploader.report_reading import CriticalRules, read_dicom_report

    rules = CriticalRules.parse(["SCT:401303003"], [])
    now = dt.datetime.now(dt.timezone.utc)
    ids = []
    with ReportStore.open(config.data_dir) as store:
        for patient, name, stat, verdict, impression, coded in (
            (VALID_ID, "Zhang^San=张^三", True, "acceptable", "急性下壁心肌梗死，请立即转诊", [STEMI]),
            ("DEMO-0002", "Li^Wei=李^伟", False, "warn", "窦性心律，心电图正常", []),
        ):
            uid = generate_uid()
            store.record_sent(
                SentStudy(
                    uid,
                    now - dt.timedelta(hours=2),
                    stat=stat,
                    patient_id=patient,
                    patient_name=name,
                    ecg_time=(now - dt.timedelta(hours=2)).isoformat(),
                    quality_verdict=verdict,
                )
            )
            sr = ecg_report_sr(
                StudyToRead(uid, patient, name), findings=[], impression=impression, coded_findings=coded
            )
            data = part10(sr)
            ids.append(store.add_report(read_dicom_report(data, rules), data, "dicom", now).report.id)
    return ids[0], ids[1]


def store_unassigned_ecg_report(config: Config, *, as_pdf: bool = False) -> tuple[int, str]:
    """An ECG recorded with no patient (held unassigned at the gateway, then sent as it was) and
    the county's critical report on it naming a patient the county typed (张三, VALID_ID), in the
    real report store as the forwarder and the poller keep them: (report id, the ECG's device).
    `as_pdf`: the county's report is an Encapsulated PDF (its own page, naming 张三) instead."""
    from lastmile.data_dir import open_outbox
    from lastmile.demo.cardiologist import STEMI, StudyToRead, ecg_report_sr, part10, report_pdf
    from lastmile.ecg.intake import enqueue_recording
    from lastmile.reports.sent import sent_study_of
    from lastmile.reports.store import ReportStore
    from tests.ecg_factories import make_recording
    from uploader.report_reading import CriticalRules, read_dicom_report

    now = dt.datetime.now(dt.timezone.utc)
    with open_outbox(config) as outbox:
        item = enqueue_recording(outbox, make_recording(4, patient=None), config, key="unassigned").item
    study = sent_study_of(item, {}, now)
    assert study is not None and not study.patient_id, study
    with ReportStore.open(config.data_dir) as store:
        store.record_sent(study)
        named = StudyToRead(study.study_uid, VALID_ID, "Zhang^San=张^三")
        sr = (
            report_pdf(named, ["Acute inferior STEMI: refer now"])
            if as_pdf
            else ecg_report_sr(named, findings=[], impression="急性下壁心肌梗死，请立即转诊", coded_findings=[STEMI])
        )
        data = part10(sr)
        rules = CriticalRules.parse(["SCT:401303003"], [])
        report_id = store.add_report(read_dicom_report(data, rules), data, "dicom", now).report.id
    return report_id, str(item.meta["device"])


def stand_in_lp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, refuse: bool = False) -> Path:
    """An `lp` that keeps its stdin in `spool` and its arguments in spool.args (the last job's),
    and every job's stdin in order as spool.1, spool.2 ... (`printed_jobs`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    spool = tmp_path / "spool"
    lp = bin_dir / "lp"
    lp.write_text(
        f'#!/bin/sh\necho "$@" > {spool}.args\ncat > {spool}\n'
        f"n=$(ls {spool}.[0-9]* 2>/dev/null | wc -l); cp {spool} {spool}.$((n + 1))\n"
        + (
            "echo 'lp: Error - no default destination available.' >&2; exit 1\n"
            if refuse
            else "echo 'request id is clinic-7 (0 file(s))'\n"
        )
    )
    lp.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return spool


def printed_jobs(spool: Path) -> list[bytes]:
    """What the stand-in `lp` was given, job by job, in order."""
    jobs = sorted(spool.parent.glob(f"{spool.name}.[0-9]*"), key=lambda p: int(p.suffix[1:]))
    return [job.read_bytes() for job in jobs]


def panel_events(client: Client) -> Iterator[dict[str, str]]:
    """The stream's panel events, as the browser's EventSource gets them."""
    request = urllib.request.Request(client.base + "/events", headers={"Accept": "text/event-stream"})
    with client.opener.open(request, timeout=120) as stream:
        event = ""
        for raw in stream:
            line = raw.decode("utf-8").rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event == "panel":
                yield json.loads(line[len("data: ") :])
            elif not line:
                event = ""
