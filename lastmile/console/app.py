"""The console's web application: pages, forms, the event stream, and what guards them.

Server-rendered (Starlette + Jinja2); one small script of our own (`static/console.js`) swaps
the live panels that the event stream (`/events`, server-sent events) sends. Every page works
without it: forms post and redirect.

Guards, on every request:
- nothing but the login page and static files without a live login (pages redirect to the
  login, everything else answers 401), checked against clinic.db;
- every POST carries the login's CSRF token (or, for the login form, the pre-login cookie's)
  and, when the browser sends one, an Origin of this very host;
- plain HTTP only from loopback, with a loopback Host (no DNS rebinding);
- pages are never cached (patient data), framed or allowed to load anything from elsewhere
  (Content-Security-Policy: 'self' only, no inline script).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import gzip
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

import jinja2
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from devices.ble.sfloat import NAN, NEGATIVE_INFINITY, NRES, POSITIVE_INFINITY, RESERVED
from devices.identity import Patient
from devices.plausibility import IMPLAUSIBLE
from lastmile import __version__
from lastmile.clinic.observations import SUMMARY_SEPARATOR, plain_number
from lastmile.clinic.patients import SameName
from lastmile.config import Config
from lastmile.console import views
from lastmile.console.accounts import LANGUAGES, AccountError, Login, LoginRefused
from lastmile.console.ecg_analysis import EcgAnalyses
from lastmile.console.flag_words import flag_badge, flag_badges
from lastmile.console.i18n import LANGUAGE_NAMES, N_, Localizer, negotiate
from lastmile.console.live import Broker
from lastmile.console.sources import (
    ClinicData,
    ConsoleInputError,
    CountyLink,
    EcgAssigned,
    EcgAssignFailed,
    EcgDamaged,
    county_row,
    person_name,
    row_number,
)
from lastmile.reports.printing import lp_command, print_behind_note
from lastmile.reports.report_text import concept_name, shown_critical, shown_page_text, unassigned_note
from uploader.errors import OutboxFullError
from uploader.outbox import ItemState, is_storage_full

if TYPE_CHECKING:
    from lastmile.doctor import Finding

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "lastmile_session"
PRE_LOGIN_COOKIE = "lastmile_prelogin"
LANGUAGE_COOKIE = "lastmile_lang"
MAX_FORM_BYTES = 16 * 1024
LOGIN_FAILURES_PER_CLIENT = 20  # per LOGIN_WINDOW_S from one address, whatever the names tried
LOGIN_WINDOW_S = 600.0
HEARTBEAT_S = 15.0
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
T = TypeVar("T")


class LoginRequired(Exception):
    """No live login: pages redirect to the login page, everything else gets 401. `next`: the page
    a refused form came from, where logging in again leads."""

    def __init__(self, next_page: str = "/today") -> None:
        super().__init__(next_page)
        self.next_page = next_page


# Why a form was refused, as the refusal page says it: from another site ("foreign"), from a page
# opened before the doctor's last login ("stale"), from a login page whose token this browser no
# longer holds ("login-page": a visitor who never logged in, e.g. the browser was closed), over
# MAX_FORM_BYTES ("too-large": what was typed must be shorter) or not a urlencoded form as the
# console's pages send ("not-a-form": a file upload, a program).
Refusal = Literal["foreign", "stale", "login-page", "too-large", "not-a-form"]


class Forbidden(Exception):
    """A POST without the right CSRF token or from another origin, or an admin-only action."""

    def __init__(self, reason: str, *, refusal: Refusal = "foreign") -> None:
        super().__init__(reason)
        self.refusal: Refusal = refusal


@dataclass
class ConsoleState:
    """What every request shares. `data` is used on the database thread only (`run_db`)."""

    config: Config
    data: ClinicData
    https: bool
    zone: dt.tzinfo
    broker: Broker = field(default_factory=Broker)
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="console-db")
    )
    analyses: EcgAnalyses | None = None
    fingerprint: str = ""
    login_failures: dict[str, collections.deque[float]] = field(default_factory=dict)
    doctor_runs: views.DoctorRuns = field(default_factory=views.DoctorRuns)  # the System page's checks
    # what the last form action of each login did, for the page it redirects to to say (whose
    # check-in ended, to whom a reading went): kept here, not in the address (names, IDs)
    notices: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    shutting_down: asyncio.Event | None = None

    async def run_db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


@dataclass(frozen=True)
class Context:
    """One request's view: who, in which language, with which CSRF token."""

    login: Login | None
    localizer: Localizer
    csrf: str

    @property
    def user(self) -> str:
        return self.login.user.name if self.login else ""


def state_of(request: Request) -> ConsoleState:
    state: ConsoleState = request.app.state.console
    return state


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# -- the security layer ----------------------------------------------------------------------------


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class SecurityHeaders:
    """Headers on every response; refuses plain HTTP from anything but loopback."""

    def __init__(self, app: ASGIApp, *, https: bool) -> None:
        self.app = app
        self.https = https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        if scope.get("scheme") == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            host_name = urlsplit(f"//{host}").hostname if host else None
            if not is_loopback(client[0] if client else None) or not is_loopback(host_name):
                response = PlainTextResponse("HTTPS only / 仅限 HTTPS", status_code=403)
                await response(scope, receive, send)
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                present = {k.lower() for k, _ in headers}
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
                ]
                if b"content-security-policy" not in present:
                    extra.append((b"content-security-policy", CSP.encode()))
                if b"cache-control" not in present:
                    extra.append((b"cache-control", b"no-store"))
                if self.https:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                headers.extend(extra)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def cookie_flags(state: ConsoleState) -> dict[str, Any]:
    # Secure even on loopback HTTP: browsers treat 127.0.0.1 and localhost as secure origins.
    return {"httponly": True, "secure": True, "samesite": "strict", "path": "/"}


async def context_for(request: Request, *, required: bool = True) -> Context:
    state = state_of(request)
    token = request.cookies.get(SESSION_COOKIE)
    login = await state.run_db(lambda: state.data.accounts.login_for(token, now=now_utc())) if token else None
    if login is None and required:
        raise LoginRequired()
    csrf = login.csrf_token if login else request.cookies.get(PRE_LOGIN_COOKIE, "")
    return Context(login, page_localizer(request, login.user.language if login else ""), csrf)


def page_localizer(request: Request, chosen: str = "") -> Localizer:
    """The user's own language, else the language cookie's, else the browser's, else the configured one."""
    state = state_of(request)
    language = (
        chosen
        or request.cookies.get(LANGUAGE_COOKIE, "")
        or negotiate(request.headers.get("accept-language"), state.config.console.language)
    )
    if language not in LANGUAGES:
        language = state.config.console.language
    return Localizer(language, state.zone)


async def read_form(request: Request, ctx: Context) -> dict[str, str]:
    """The posted form, after the CSRF and Origin checks."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise Forbidden("form posts only", refusal="not-a-form")
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise Forbidden("cross-origin post")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise Forbidden("form too large", refusal="too-large")
    fields = {k: v[0] for k, v in parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True).items()}
    sent = fields.get("csrf", "")
    if not ctx.csrf or not hmac.compare_digest(sent.encode(), ctx.csrf.encode()):
        raise wrong_token(request, ctx, fields)
    return fields


def wrong_token(request: Request, ctx: Context, fields: dict[str, str]) -> Exception:
    """Why a form's token did not match, as the doctor can act on it: with a live login, a page
    opened before it; without one, a form of the login page (its token lost with the browser's
    cookies), or else a page whose login has since ended (the language button on Today left
    open overnight) - that one says the login expired and leads to the login, back to its page."""
    if ctx.login is not None:
        return Forbidden("missing or wrong CSRF token", refusal="stale")
    page = local_path(fields.get("next"), default="")  # the language form's own page
    if request.url.path == "/login" or urlsplit(page).path == "/login":
        return Forbidden("missing or wrong CSRF token", refusal="login-page")
    return LoginRequired(page or "/today")


def local_path(target: str | None, default: str = "/today") -> str:
    """Only paths on this console (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


# -- rendering -------------------------------------------------------------------------------------


# Codes and UCUM units in reading summaries ("118/76 mm[Hg], pulse-rate 64 /min"), as people read them.
QUANTITY_LABELS = {
    "mean-arterial-pressure": N_("mean pressure"),
    "pulse-rate": N_("pulse"),
    "body-temperature": N_("temperature"),
    "body-weight": N_("weight"),
    "body-mass-index": N_("BMI"),
    "spo2": N_("SpO2"),
    "glucose": N_("glucose"),
    "cuff-pressure": N_("cuff pressure"),
}
# `lastmile doctor`'s check names (lastmile/doctor.py Doctor.checks) as the System page heads them;
# the finding itself stays in the technician's English, under its heading.
CHECK_LABELS = {
    "config": N_("Settings"),
    "data": N_("Data storage"),
    "root": N_("System partition"),
    "journal": N_("System log"),
    "clock": N_("Clock"),
    "services": N_("Background services"),
    "reading-center": N_("Reading center"),
    "commitment": N_("Storage commitment"),
    "fhir": N_("Health platform"),
    "devices": N_("Devices"),
    "queue": N_("Sending queue"),
    "console": N_("Console"),
    "reports": N_("Reports"),
    "metrics": N_("County monitoring"),
    "update": N_("Software update"),
    "bluetooth": N_("Bluetooth"),
    "visits": N_("Home visits"),
}
# What in its check a finding is about (doctor.Finding.topic, doctor.TOPICS) when the check gives
# several: each row says which it is (数据存储 · 剩余空间 beside 数据存储 · SD卡), never the same
# heading twice, one OK and one warning.
TOPIC_LABELS = {
    "restart-needed": N_("changed settings waiting for a restart: %(subject)s"),
    "space": N_("free space"),
    "sd-card": N_("SD card"),
    "acquire": N_("device readings"),
    "ble": N_("Bluetooth devices"),
    "forward": N_("sending"),
    "console": N_("this console"),
    "link": N_("connection"),
    "set-aside": N_("items set aside"),
    "window-dicom": N_("send window for ECGs"),
    "budget-dicom": N_("data allowance for ECGs"),
    "window-fhir": N_("send window for visits and readings"),
    "budget-fhir": N_("data allowance for visits and readings"),
    "refused-reading_center": N_("refused by the reading center"),
    "refused-fhir": N_("refused by the health platform"),
    "critical": N_("critical result, patient %(subject)s"),
    "critical-unassigned": N_("critical result, no patient assigned yet"),
    "queries": N_("asking the reading center"),
    "unrecorded": N_("ECGs not yet recorded"),
    "lost-records": N_("ECGs that could not be recorded"),
    "installed-version": N_("installed version"),
    "last-round": N_("last check for updates"),
    "signing-key": N_("signing key"),
    "not-queued": N_("closed visits not yet queued"),
    "open-damaged": N_("the open visit"),
    "ecg-clock": N_("clock of ECG cart %(subject)s"),
    "stick-file": N_("ECG file on the USB stick: %(subject)s"),
    "battery": N_("battery of %(subject)s"),
    "left-by-stop": N_("records kept when the gateway stopped"),
    "damaged-copy": N_("damaged file set aside: %(subject)s"),
}
# What each check's warning or problem means for the village doctor, and what to do: the check's
# own message (English, technical) stays below it for the county's technician.
CHECK_ADVICE: dict[str, dict[str, str]] = {
    "config": {"FAIL": N_("The gateway's settings have a mistake: please call the county IT.")},
    "data": {
        "WARN": N_("Storage is getting full: tell the county IT."),
        "sd-card": N_("The SD card's settings need a look (they may wear it out sooner): tell the county IT."),
        # what a stop could not save, kept in a file for the next start (doctor._left_by_last_stop)
        "left-by-stop": N_(
            "When the gateway last stopped, some records could not be saved: they are kept and saved when it "
            "starts again. If this is still here after a restart, tell the county IT."
        ),
        "damaged-copy": N_(
            "A damaged file was put aside when the gateway started: some records in it may be lost. Tell the county IT."
        ),
        "FAIL": N_("Storage problem: new measurements may not be saved. Call the county IT now."),
    },
    "root": {"WARN": N_("The system partition is writable: a power cut could damage it. Tell the county IT.")},
    "journal": {"WARN": N_("The system log may fill the SD card: tell the county IT.")},
    "clock": {
        "WARN": N_("The clock is not synchronised, times may drift: connect the network or the GPS receiver."),
        "FAIL": N_("The clock is wrong, measurements would get wrong times: connect the network or the GPS receiver."),
    },
    "services": {
        "WARN": N_("A background service keeps restarting: tell the county IT."),
        "FAIL": N_("A background service has stopped: restart the gateway; if that does not help, call the county IT."),
    },
    # network checks: the System page runs the doctor offline (its unit reaches only the LAN), so they
    # are only ever skipped there; the link's own row says how it is
    "reading-center": {
        "offline": N_(
            "This page does not test the network: the row “Link to the reading center” below says how the link is."
        ),
    },
    "commitment": {
        "WARN": N_("The reading center cannot confirm receipt yet: ECGs stay here until it does."),
        "FAIL": N_("The reading center cannot confirm receipt: ECGs stay here. Tell the county IT."),
    },
    "fhir": {
        "offline": N_(
            "This page does not test the network: the row “Link to the county health platform” below says how the "
            "link is."
        ),
    },
    "devices": {
        "WARN": N_("A device is not connected or reports a problem: check its cable, power or pairing."),
        # the finding's own: which devices (subject), each on the Devices page
        "device-failing": N_(
            "Not connected or reporting a problem: %(subject)s. Check its cable, power or pairing; the Devices "
            "page shows each device."
        ),
        "ecg-clock": N_("The ECG cart's clock is wrong, so its ECGs have no true time: set the cart's date and time."),
        "stick-file-damaged": N_(
            "The ECG file %(subject)s on the USB stick is damaged and was not imported: export it again on the ECG "
            "machine."
        ),
        "stick-file-unreadable": N_(
            "The ECG file %(subject)s on the USB stick could not be read and was not imported: plug the stick in "
            "again; if it still fails, export it again on the ECG machine."
        ),
        "battery-low": N_(
            "Its battery is low: please replace or charge the batteries soon, before it stops during a measurement."
        ),
        "FAIL": N_(
            "Readings are waiting for storage space: they are kept and saved once there is room. Call the county IT."
        ),
        "memory-only": N_(
            "Readings are waiting for storage space and are not saved yet: do not switch the gateway off, they "
            "would be lost. Call the county IT now to free space."
        ),
        # the finding's own (doctor.Finding.advice_key): ECGs from a bridge, not readings
        "ecgs-kept": N_(
            "ECGs are waiting for storage space: they are kept and saved once there is room. Call the county IT."
        ),
        "memory-only-ecgs": N_(
            "ECGs are waiting for storage space and are not saved yet: do not switch the gateway off, they "
            "would be lost. Call the county IT now to free space."
        ),
        # both held in memory (doctor.by_what): a doctor told of ECGs only would not know his readings wait too
        "memory-only-readings-and-ecgs": N_(
            "Readings and ECGs are waiting for storage space and are not saved yet: do not switch the gateway off, "
            "they would be lost. Call the county IT now to free space."
        ),
        # held for another cause than space (doctor.NOT_STORED): freeing space would not help
        "readings-kept-not-stored": N_(
            "Readings are waiting to be saved: the gateway cannot write its data just now (not for want of "
            "space). They are kept and saved once it can. If this lasts, call the county IT."
        ),
        "ecgs-kept-not-stored": N_(
            "ECGs are waiting to be saved: the gateway cannot write its data just now (not for want of "
            "space). They are kept and saved once it can. If this lasts, call the county IT."
        ),
        "memory-only-not-stored": N_(
            "Readings are waiting to be saved and are not saved yet: the gateway cannot write its data just now "
            "(not for want of space). Do not switch the gateway off, they would be lost. Call the county IT now."
        ),
        "memory-only-ecgs-not-stored": N_(
            "ECGs are waiting to be saved and are not saved yet: the gateway cannot write its data just now "
            "(not for want of space). Do not switch the gateway off, they would be lost. Call the county IT now."
        ),
        "memory-only-readings-and-ecgs-not-stored": N_(
            "Readings and ECGs are waiting to be saved and are not saved yet: the gateway cannot write its data just "
            "now (not for want of space). Do not switch the gateway off, they would be lost. Call the county IT now."
        ),
        # held because the gateway stopped before it stored them (doctor.AT_STOP): stored when it starts again
        "readings-kept-at-stop": N_(
            "Readings were not saved yet when the gateway stopped: they are kept and saved when the gateway "
            "starts again. Nothing to measure again."
        ),
        "ecgs-kept-at-stop": N_(
            "ECGs were not saved yet when the gateway stopped: they are kept and saved when the gateway starts "
            "again. Nothing to record again."
        ),
        # in memory only at a stop: the row says so from the stop's last try, after which nothing
        # stores them (the process ends), until the next start counts them lost - lost, not "may be"
        "memory-only-at-stop": N_(
            "Readings were not saved yet when the gateway stopped, and were not kept on the SD card: they are "
            "lost. Nothing is broken. Measure again if the patient is still here."
        ),
        "memory-only-ecgs-at-stop": N_(
            "ECGs were not saved yet when the gateway stopped, and were not kept on the SD card: they are "
            "lost. Nothing is broken. Record the ECG again if the patient is still here."
        ),
        "memory-only-readings-and-ecgs-at-stop": N_(
            "Readings and ECGs were not saved yet when the gateway stopped, and were not kept on the SD card: they "
            "are lost. Nothing is broken. Measure again and record the ECG again if the patient is still here."
        ),
        # held in memory only when the gateway lost its power: gone for good; %(since)s is when it started
        # again and found them gone, %(time)s when this stops showing
        "lost-readings": N_(
            "Some readings were lost when the gateway was switched off or lost its power (found when it started "
            "again, %(since)s): they were waiting for storage space and not saved yet. Measure again if the "
            "patient is still here, and tell the county IT. This shows until %(time)s."
        ),
        "lost-ecgs": N_(
            "Some ECGs were lost when the gateway was switched off or lost its power (found when it started "
            "again, %(since)s): they were waiting for storage space and not saved yet. Record the ECG again if "
            "the patient is still here, and tell the county IT. This shows until %(time)s."
        ),
        "lost-readings-and-ecgs": N_(
            "Some readings and ECGs were lost when the gateway was switched off or lost its power (found when it "
            "started again, %(since)s): they were waiting for storage space and not saved yet. Measure again and "
            "record the ECG again if the patient is still here, and tell the county IT. This shows until %(time)s."
        ),
        # the same, lost while they waited for another cause than space (the data store locked, damaged)
        "lost-readings-not-stored": N_(
            "Some readings were lost when the gateway was switched off or lost its power (found when it started "
            "again, %(since)s): the gateway could not save its data then (not for want of space). Measure again if "
            "the patient is still here, and call the county IT. This shows until %(time)s."
        ),
        "lost-readings-and-ecgs-not-stored": N_(
            "Some readings and ECGs were lost when the gateway was switched off or lost its power (found when it "
            "started again, %(since)s): the gateway could not save its data then (not for want of space). Measure "
            "again and record the ECG again if the patient is still here, and call the county IT. This shows until "
            "%(time)s."
        ),
        # held at a stop in memory only (doctor.LOST_AT_STOP, LOST_ECGS_AT_STOP), gone with it: nothing is broken, the
        # county IT can bring nothing back; %(what)s how many, %(subject)s which device
        "lost-at-stop": N_(
            "Lost: %(what)s from %(subject)s. They were taken just before the gateway stopped and were not saved "
            "yet (found when it started again, %(since)s). Nothing is broken. Measure again if the patient is "
            "still here. This shows until %(time)s."
        ),
        "lost-ecgs-at-stop": N_(
            "Lost: %(what)s from %(subject)s. They were taken just before the gateway stopped and were not saved "
            "yet (found when it started again, %(since)s). Nothing is broken. Record the ECG again if the patient "
            "is still here. This shows until %(time)s."
        ),
        # a card (a doctor's badge) scanned as the gateway stopped, whose check-in the stop gave up
        # (doctor.CARD_NOT_CHECKED_IN, BADGE_NOT_TAKEN); %(since)s when it was scanned: Today names it
        "card-not-checked-in": N_(
            "A patient card scanned as the gateway stopped (%(since)s) was not checked in: Today says which. "
            "If the patient is still here, scan the card again. This shows until %(time)s."
        ),
        "badge-not-taken": N_(
            "A doctor's badge scanned as the gateway stopped (%(since)s) did not take effect: Today says whose. "
            "If that doctor is on duty, scan the badge again. This shows until %(time)s."
        ),
        "lost-readings-and-ecgs-at-stop": N_(
            "Lost: %(what)s from %(subject)s. They were taken just before the gateway stopped and were not saved "
            "yet (found when it started again, %(since)s). Nothing is broken. Measure again and record the ECG again "
            "if the patient is still here. This shows until %(time)s."
        ),
        # kept on the SD card, and the file holding them did not give them back at the restart (damaged)
        "lost-readings-damaged-file": N_(
            "Some readings saved on the SD card could not be read back when the gateway started again "
            "(%(since)s): the file holding them is damaged or missing, so they are lost. Measure again if the patient is "
            "still here, and call the county IT. This shows until %(time)s."
        ),
        "lost-ecgs-damaged-file": N_(
            "Some ECGs saved on the SD card could not be read back when the gateway started again (%(since)s): "
            "the file holding them is damaged or missing, so they are lost. Record the ECG again if the patient is still "
            "here, and call the county IT. This shows until %(time)s."
        ),
        "lost-readings-and-ecgs-damaged-file": N_(
            "Some readings and ECGs saved on the SD card could not be read back when the gateway started again "
            "(%(since)s): the file holding them is damaged or missing, so they are lost. Measure again and record "
            "the ECG again if the patient is still here, and call the county IT. This shows until %(time)s."
        ),
        "lost-ecgs-not-stored": N_(
            "Some ECGs were lost when the gateway was switched off or lost its power (found when it started "
            "again, %(since)s): the gateway could not save its data then (not for want of space). Record the ECG "
            "again if the patient is still here, and call the county IT. This shows until %(time)s."
        ),
    },
    "queue": {
        "WARN": N_("Some items could not be sent and were set aside: tell the county IT."),
        "FAIL": N_("Nothing has been sent for a long time: check the network, then call the county IT."),
        "refused": N_(
            "The county refuses this gateway's settings, so nothing goes there: everything is kept here and sent "
            "once they are fixed. Call the county IT."
        ),
        # keys of a finding's own advice (doctor.Finding.advice_key): what holds items, and until when
        "waiting": N_(
            "Some items have waited more than a day to be sent: check the network; if it works, tell the county IT."
        ),
        # the oldest waiting item is refused alone by the county side while the others go (doctor)
        "refused-alone": N_(
            "One item is refused by the county side for now while the others are sent: the network works. "
            "It is tried again by itself; if this lasts, tell the county IT."
        ),
        "metered-window": N_(
            "Routine items have waited more than a day for the send window (cheaper data): they go from %(time)s. "
            "STAT ECGs go at once. If this shows every day, tell the county IT."
        ),
        "metered-budget": N_(
            "The daily data allowance is used up and routine items have waited more than a day: they go from "
            "%(time)s. STAT ECGs go at once. If this shows every day, tell the county IT: the allowance is too small."
        ),
        # a window shut now, today's allowance not used up: the allowance ran out on the days before
        "metered-budget-before": N_(
            "Routine items have waited more than a day: the daily data allowance was not enough on the days before. "
            "Today's is not used up yet: they go from %(time)s, when the send window opens. STAT ECGs go at once. "
            "If this shows every day, tell the county IT: the allowance is too small."
        ),
    },
    "console": {
        "WARN": N_("This page's security certificate is not ready yet: tell the county IT."),
        "FAIL": N_("This page's settings have a mistake: tell the county IT."),
        "restart-needed": N_(
            "Some changed settings are not in use yet: restart the gateway (switch it off and on; measurements "
            "are safe) or ask the county IT to run: systemctl restart lastmile-console"
        ),
    },
    "reports": {
        "WARN": N_("Reports cannot be fetched from the reading center now: they come when the link is back."),
        "FAIL": N_("Open Reports now: a critical report may be waiting, or report queries are refused."),
        # each finding's own (doctor.Finding.advice_key): a critical result is not a refused query
        "critical": N_("A critical result has come back: open Reports now, read it and confirm that you saw it."),
        "queries-refused": N_("The reading center refuses to send reports back: tell the county IT."),
        "unrecorded": N_(
            "Some ECGs that were sent could not be noted here yet, so their reports are not asked for: the gateway "
            "keeps trying. If this stays, tell the county IT."
        ),
        "lost-records": N_(
            "Some ECGs that were sent could not be noted here: their reports may not come back to this gateway. "
            "Tell the county IT."
        ),
    },
    "metrics": {"WARN": N_("The county cannot watch this gateway right now: tell the county IT.")},
    "update": {
        "WARN": N_(
            "Software updates were not checked yet or cannot be fetched now: nothing to do, they come by themselves."
        ),
        "FAIL": N_("The last software update failed and the gateway went back to the old version: tell the county IT."),
    },
    "bluetooth": {
        "WARN": N_(
            "Readings from the Bluetooth devices (cuff, oximeter ...) cannot arrive: check that the Bluetooth "
            "adapter is plugged into the gateway; if it is, tell the county IT."
        )
    },
    "visits": {
        "WARN": N_("Some home visits have not reached the county platform: they are kept here. Tell the county IT."),
        "FAIL": N_(
            "Home visits cannot be signed or sent: the gateway's signing key is damaged. The visits are kept; "
            "call the county IT to restore the key."
        ),
        # the finding's own (doctor.Finding.advice_key): what `visit start` and `visit note` say of it
        "open-damaged": N_(
            "The open home visit's record is damaged on the SD card: it cannot be sent. Stop it "
            "(lastmile visit stop: it is kept aside), then start the visit again. Tell the county IT."
        ),
        # the finding's own: visits.db unreadable, every reading waits (the relay cannot tell a visit's)
        "visits-db-damaged": N_(
            "The home visits file (visits.db) is damaged on the SD card: measurements and home visits are kept "
            "here but not sent. Call the county IT to restore visits.db from its backup."
        ),
    },
}
UNSURE_ADVICE = N_("Please tell the county IT.")


def county_row_text(county: CountyLink, localizer: Localizer) -> str:
    """The county row's words in the page's language (lastmile.console.sources.COUNTY_ROW)."""
    row = county_row(county.said)
    if county.when is None:
        return localizer.gettext(row.without_time, time="")
    return localizer.gettext(row.with_time, time=localizer.when(county.when))


def advice_for(check: str, level: str, key: str = "") -> str:
    """The (untranslated) advice shown for a check's WARN or FAIL: the finding's own (`key`, when
    the check says what holds it), else its level's, else the other level's when a check has only
    one (a check that can only warn says the same if it ever fails)."""
    advice = CHECK_ADVICE.get(check, {})
    return (key and advice.get(key)) or advice.get(level) or advice.get("FAIL") or advice.get("WARN") or UNSURE_ADVICE


def finding_label(finding: Finding, localizer: Localizer) -> str:
    """A finding's heading on the System page: its check, and what in it the finding is about."""
    check = CHECK_LABELS.get(finding.check)
    label = localizer.gettext(check) if check else finding.check
    if not finding.topic:
        return label
    topic = TOPIC_LABELS.get(finding.topic)  # one unknown here still says which it is, in English
    about = localizer.gettext(topic, subject=finding.subject) if topic else finding.topic
    return f"{label} · {about}"


def advice_text(finding: Finding, localizer: Localizer) -> str:
    """A finding's advice in the page's language, with when what holds it lets go (and when what
    it reports was found, for an advice that says so)."""
    advice = advice_for(finding.check, finding.level.value, finding.advice_key)
    times = {"time": finding.until, "since": finding.since}
    values = {
        k: localizer.when(dt.datetime.fromtimestamp(t, dt.timezone.utc)) for k, t in times.items() if t is not None
    }
    if finding.subject:  # which one it is about (the devices' names), for an advice that names it
        values["subject"] = finding.subject
    if finding.counts is not None:  # how many readings and ECGs, in words, as the Devices page says them
        values["what"] = counted_words(*finding.counts, localizer)
    return localizer.gettext(advice, **values)


def counted_words(readings: int, ecgs: int, localizer: Localizer) -> str:
    """ "3 readings and 1 ECG" in the page's language (devices.html's `counted`, for an advice)."""
    words = [localizer.ngettext("%(n)d reading", "%(n)d readings", readings, n=readings)] if readings else []
    words += [localizer.ngettext("%(n)d ECG", "%(n)d ECGs", ecgs, n=ecgs)] if ecgs else []
    if len(words) == 2:
        return localizer.gettext("%(readings)s and %(ecgs)s", readings=words[0], ecgs=words[1])
    return words[0] if words else localizer.gettext("readings")


# What a 404 says, in the page's language (a report link from an old alert, a purged ECG).
NO_SUCH_REPORT = N_("This report is not here (any more).")
NO_REPORT_PDF = N_("The reading center sent no PDF for this report.")
NO_PREVIEW = N_("The ECG picture is not ready (yet).")
NO_SUCH_ECG = N_("This ECG is not here (any more).")
NO_SUCH_PAGE = N_("There is no page at this address: the link may be old or mistyped.")


def asks_for_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def not_found(request: Request, ctx: Context, message: str, *, status: int = 404) -> Response:
    """What is not here, said on a page with the menu and a way back to Today (a picture or a
    script asking gets the sentence alone)."""
    if not asks_for_html(request):
        return PlainTextResponse(ctx.localizer.gettext(message), status_code=status)
    return render(request, ctx, "not_found.html", status=status, message=ctx.localizer.gettext(message), alerts=[])


# UCUM units as the page shows them, in its language: a pulse in words (次/分, as the ECG's heart
# rate beside it); the others, not in the catalogue, the same in every language
UNIT_DISPLAY = {" mm[Hg]": "mmHg", " Cel": "°C", " [degF]": "°F", " [lb_av]": "lb", " /min": N_("/min")}
# between a reading's values (`summary` joins them with SUMMARY_SEPARATOR), in the page's language:
# Chinese pages separate them with a full-width comma (U+FF0C), not the ASCII one
VALUE_SEPARATOR = N_(", ")


# a value the device sent as none (`devices.observation.Quantity.special`, as `summary` writes it:
# "(nres)"; "--" on a monitor's report, a BLE SFLOAT's NaN or NRes), said as the doctor reads it;
# the reasons are sfloat's own names, which every decoder writes (a new one is said here too)
NO_VALUE = re.compile(
    r"\((?:" + "|".join(re.escape(s) for s in (NAN, NRES, POSITIVE_INFINITY, NEGATIVE_INFINITY, RESERVED)) + r")\)"
)
NO_RESULT = N_("no result")
# a value outside what a body can measure, kept as the device sent it (`summary` writes
# "(implausible: 26251 Cel)", or "(implausible)" when the device sent none): said as impossible
IMPLAUSIBLE_VALUE = re.compile(r"\(" + re.escape(IMPLAUSIBLE) + r"(?:: ([^)]*))?\)")
IMPOSSIBLE_SENT = N_("impossible value (the device said %(value)s)")
IMPOSSIBLE = N_("impossible value")


def _no_value_worded(part: str, localizer: Localizer) -> str:
    """One value of a summary with the device's "no value" or impossible value in words; with no
    number left outside them, its unit goes too (血压 无结果/无结果, not 无结果/无结果 mmHg)."""
    if not NO_VALUE.search(part) and not IMPLAUSIBLE_VALUE.search(part):
        return part
    if not any(c.isdigit() for c in IMPLAUSIBLE_VALUE.sub("", NO_VALUE.sub("", part))) and " " in part:
        part = part.rsplit(" ", 1)[0]
    part = NO_VALUE.sub(localizer.gettext(NO_RESULT), part)
    return IMPLAUSIBLE_VALUE.sub(
        lambda m: (
            localizer.gettext(IMPOSSIBLE_SENT, value=_plain_sent(m[1])) if m[1] else localizer.gettext(IMPOSSIBLE)
        ),
        part,
    )


def _plain_sent(sent: str) -> str:
    """What the device sent ("1.136e+07 mm[Hg]") with its number plain: a summary kept from
    before `summary` wrote plain numbers (a device row's last reading, a Sent record) has "{:g}"'s."""
    number, _, unit = sent.partition(" ")
    try:
        return f"{plain_number(float(number), unit)} {unit}".rstrip()
    except ValueError:
        return sent


def reading_text(summary: str, localizer: Localizer, kind: str = "") -> str:
    """A reading's summary (`lastmile.clinic.observations.summary`) in the page's words. Shown after
    its kind's name (`kind`), the quantity named as the kind is not named again: 体温 37.2 °C, not
    体温 体温 37.2 °C."""
    parts = summary.split(SUMMARY_SEPARATOR)
    if kind:
        parts = [part.removeprefix(kind + " ") for part in parts]
    parts = [_no_value_worded(part, localizer) for part in parts]
    summary = localizer.gettext(VALUE_SEPARATOR).join(parts)
    for code in sorted(QUANTITY_LABELS, key=len, reverse=True):
        summary = summary.replace(code + " ", localizer.gettext(QUANTITY_LABELS[code]) + " ")
    for unit, shown in UNIT_DISPLAY.items():
        summary = summary.replace(unit, " " + localizer.gettext(shown))
    return summary


def birth_date_shown(value: str) -> str:
    """A birth date as the pages show one, 1971-01-01: a cart's object over the LAN keeps its
    DICOM form (19710101), a file's and an ID's are ISO already; anything else as it came."""
    if len(value) == 8 and value.isdigit():
        try:
            return dt.date(int(value[:4]), int(value[4:6]), int(value[6:])).isoformat()
        except ValueError:
            return value
    return value


def make_templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["pn"] = person_name
    env.filters["shown_birth_date"] = birth_date_shown
    return env


TEMPLATES = make_templates()


def page_vars(request: Request, ctx: Context, **values: Any) -> dict[str, Any]:
    loc = ctx.localizer
    state = state_of(request)
    return {
        "_": loc.gettext,
        "ngettext": loc.ngettext,
        "reading_text": lambda text, kind="": reading_text(text, loc, kind),
        "flag_badges": lambda flags: flag_badges(flags, loc),
        "flag_badge": lambda flag: flag_badge(flag, loc),
        # as a patient may read it (the page and its printout): the page says the critical reason above it
        "report_text": lambda report: shown_page_text(report.lines, report.text, loc),
        "critical_reasons": lambda report: shown_critical(report.lines, report.critical_reasons, loc),
        # a report's conclusion and findings lists are its words without their codes: a known
        # concept's standard name ("Acute ST segment elevation ...") in the reader's language
        "county_words": lambda words: [concept_name(w, "", loc) for w in words],
        # report_text's words (the printouts'), a line each: why no patient, whom the county named
        "unassigned_note": lambda report: unassigned_note(report.county_patient, loc).splitlines(),
        "fmt": loc,
        "lang": loc.language,
        "languages": LANGUAGE_NAMES,
        "csrf": ctx.csrf,
        "login": ctx.login,
        "path": request.url.path,
        "version": __version__,
        "https": state.https,
        "alerts_stream": ALERTS_STREAM,
        **values,
    }


def render(request: Request, ctx: Context, template: str, *, status: int = 200, **values: Any) -> HTMLResponse:
    html = TEMPLATES.get_template(template).render(page_vars(request, ctx, **values))
    return HTMLResponse(html, status_code=status)


def render_fragment(template: str, ctx: Context, request: Request, **values: Any) -> str:
    return TEMPLATES.get_template(template).render(page_vars(request, ctx, **values))


async def page_model(
    request: Request, ctx: Context, build: Callable[..., dict[str, Any]], *args: Any
) -> dict[str, Any]:
    """A page's data from the database thread, plus the critical-report alert every page shows."""
    state = state_of(request)
    now = now_utc()
    model = await state.run_db(build, state.data, now, *args)
    model["alerts"] = await state.run_db(views.critical_alerts, state.data)
    # live on every such page: its stream sends the banner alone (ALERTS_STREAM), Today's with its panels
    model["alerts_panel"] = alerts_panel(request, ctx, model["alerts"])
    return model


# -- login -----------------------------------------------------------------------------------------


def client_address(request: Request) -> str:
    return request.client.host if request.client else "?"


def too_many_failures(state: ConsoleState, address: str) -> bool:
    window = state.login_failures.get(address)
    if not window:
        return False
    cutoff = time.monotonic() - LOGIN_WINDOW_S
    while window and window[0] < cutoff:
        window.popleft()
    return len(window) >= LOGIN_FAILURES_PER_CLIENT


def note_failure(state: ConsoleState, address: str) -> None:
    state.login_failures.setdefault(address, collections.deque()).append(time.monotonic())
    if len(state.login_failures) > 1000:  # bounded: a scan of many addresses cannot grow it forever
        state.login_failures.pop(next(iter(state.login_failures)))


async def login_page(request: Request) -> Response:
    ctx = await context_for(request, required=False)
    if ctx.login is not None:
        return RedirectResponse(local_path(request.query_params.get("next")), status_code=303)
    return login_response(request, ctx, status=200, error="")


def refusal(ctx: Context, exc: LoginRefused) -> str:
    """Why the login was refused, for a doctor: whom to ask when locked (the command to unlock is
    for the technician, under their details), and how many tries are left before it locks."""
    _ = ctx.localizer.gettext
    if exc.locked_until is not None:
        return _(
            "This account is locked until %(time)s after too many wrong passwords. "
            "Ask the administrator (the county IT office) to unlock it.",
            time=ctx.localizer.when(exc.locked_until),
        )
    if exc.attempts_left:
        return _("Wrong name or password. Tries left before this account locks: %(left)s.", left=exc.attempts_left)
    return _("Wrong name or password.")


def login_response(
    request: Request,
    ctx: Context,
    *,
    status: int,
    error: str,
    name: str = "",
    locked: dt.datetime | None = None,
) -> Response:
    token = ctx.csrf or secrets.token_urlsafe(24)
    ctx = Context(None, ctx.localizer, token)
    response = render(
        request,
        ctx,
        "login.html",
        status=status,
        error=error,
        name=name,
        locked=locked is not None,
        next=local_path(request.query_params.get("next")),
    )
    response.set_cookie(PRE_LOGIN_COOKIE, token, **cookie_flags(state_of(request)))
    return response


async def login_submit(request: Request) -> Response:
    state = state_of(request)
    ctx = await context_for(request, required=False)
    fields = await read_form(request, ctx)
    address = client_address(request)
    _ = ctx.localizer.gettext
    if too_many_failures(state, address):
        return login_response(
            request, ctx, status=429, error=_("Too many failed logins from this device. Wait 10 minutes.")
        )
    name, password = fields.get("name", ""), fields.get("password", "")
    now = now_utc()
    try:
        user = await state.run_db(lambda: state.data.accounts.authenticate(name, password, now=now))
    except LoginRefused as exc:
        note_failure(state, address)
        await state.run_db(
            lambda: state.data.audit.record(name[:64] or "?", "login-failed", now=now, detail={"from": address})
        )
        return login_response(request, ctx, status=401, error=refusal(ctx, exc), name=name, locked=exc.locked_until)
    token = await state.run_db(lambda: state.data.accounts.start_login(user, now=now))
    await state.run_db(lambda: state.data.audit.record(user.name, "login", now=now, detail={"from": address}))
    response = RedirectResponse(local_path(fields.get("next")), status_code=303)
    response.set_cookie(SESSION_COOKIE, token, **cookie_flags(state))
    response.delete_cookie(PRE_LOGIN_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


async def logout(request: Request) -> Response:
    """Log out; with a patient checked in, first ask whether their check-in ends too (it would
    go on taking readings, whoever logs in next, until its idle timeout)."""
    state = state_of(request)
    ctx = await context_for(request)
    fields = await read_form(request, ctx)
    now = now_utc()
    session = await state.run_db(state.data.session, now)
    choice = fields.get("check_in", "")
    if session is not None and choice not in ("end", "keep"):
        return render(request, ctx, "logout.html", session=session, error="", alerts=[])
    if session is not None and choice == "end":
        shown = fields.get("patient_id", "")
        try:
            await state.run_db(lambda: state.data.end_session(ctx.user, now=now, shown_patient_id=shown))
        except ConsoleInputError as exc:  # another patient checked in since: ask again about that one
            error = ctx.localizer.gettext(exc.message, **exc.values)
            return render(request, ctx, "logout.html", status=400, session=session, error=error, alerts=[])
        state.broker.publish()
    token = request.cookies.get(SESSION_COOKIE, "")
    await state.run_db(lambda: state.data.accounts.end_login(token))
    await state.run_db(lambda: state.data.audit.record(ctx.user, "logout", now=now_utc()))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return response


async def set_language(request: Request) -> Response:
    state = state_of(request)
    ctx = await context_for(request, required=False)
    fields = await read_form(request, ctx)
    language = fields.get("language", "")
    if language not in LANGUAGES:
        raise Forbidden("unknown language")
    if ctx.login is not None:
        user = ctx.user
        await state.run_db(lambda: state.data.accounts.set_language(user, language))
        await state.run_db(
            lambda: state.data.audit.record(user, "language", now=now_utc(), detail={"language": language})
        )
    response = RedirectResponse(local_path(fields.get("next")), status_code=303)
    response.set_cookie(LANGUAGE_COOKIE, language, max_age=10 * 365 * 86400, **cookie_flags(state))
    return response


# -- Today -----------------------------------------------------------------------------------------


async def today_model(request: Request, ctx: Context) -> dict[str, Any]:
    state = state_of(request)
    model = await page_model(request, ctx, views.today)
    ecg = model.get("ecg")
    model["analysis"] = None
    model["analysis_pending"] = False
    if ecg is not None and state.analyses is not None:
        # purged once the county confirmed it: the preview made before is still shown (in memory)
        analysis = state.analyses.result(ecg.sha256)
        if analysis is None and ecg.payload_available:
            item_id = ecg.item_id
            state.analyses.request(ecg.sha256, lambda: state.run_db(state.data.ecg_payload, item_id))
            model["analysis_pending"] = True
        model["analysis"] = analysis
    return model


async def today(request: Request) -> Response:
    ctx = await context_for(request)
    model = await today_model(request, ctx)
    live = live_panels(request, ctx, model)
    done = request.query_params.get("done", "")
    notice = take_notice(request, done)
    if done in TOLD_WITH_NOTICE and not notice:
        done = ""  # a reload: its notice was said once; without it the sentence would say the wrong thing
    return render(request, ctx, "today.html", done=done, notice=notice, error="", form={}, live=live, **model)


# what Today says only with the action's own details (whose, what changed): a reload says nothing
TOLD_WITH_NOTICE = frozenset({"check-in", "check-in-again", "check-in-corrected", "check-in-other-id", "assigned"})


Done = str | tuple[str, dict[str, Any]] | None  # what a form action did, and the details to say about it
Asker = Callable[[Context, dict[str, str]], Awaitable[Response | None]]  # a confirmation page, or None: go on


def keep_notice(request: Request, done: Done) -> str:
    """The action's `done` code; its details kept for the next page this login shows."""
    state = state_of(request)
    token = request.cookies.get(SESSION_COOKIE, "")
    if not isinstance(done, tuple):
        state.notices.pop(token, None)
        return done or ""
    code, details = done
    state.notices[token] = (code, details)
    if len(state.notices) > 1000:  # bounded: logins that never come back for theirs
        state.notices.pop(next(iter(state.notices)))
    return code


def take_notice(request: Request, done: str) -> dict[str, Any]:
    """The details of what this login's last action did, if the page is its answer (`done`)."""
    kept = state_of(request).notices.pop(request.cookies.get(SESSION_COOKIE, ""), None)
    return kept[1] if kept is not None and kept[0] == done else {}


async def form_action(
    request: Request,
    action: Callable[[Context, dict[str, str], dt.datetime], Done],
    page: str,
    model_of: Callable[[Context], Awaitable[dict[str, Any]]],
    ask_first: Asker | None = None,
) -> Response:
    """Run a form's action; success redirects back to `page` (saying what was done) and tells the
    live pages, a refused input shows `page` again with the message and what was typed.
    `ask_first`: a page asking the doctor to confirm the action, if it answers one (else it runs)."""
    state = state_of(request)
    ctx = await context_for(request)
    fields = await read_form(request, ctx)
    question = None if ask_first is None else await ask_first(ctx, fields)
    if question is not None:
        return question
    try:
        done = await state.run_db(action, ctx, fields, now_utc())
    except ConsoleInputError as exc:
        error = ctx.localizer.gettext(exc.message, **exc.values)
        model = await model_of(ctx)
        return render(request, ctx, f"{page}.html", status=400, done="", notice={}, error=error, form=fields, **model)
    state.broker.publish()
    return RedirectResponse(f"/{page}?done={quote(keep_notice(request, done))}", status_code=303)


async def today_action(
    request: Request, action: Callable[[Context, dict[str, str], dt.datetime], Done], ask_first: Asker | None = None
) -> Response:
    async def model_of(ctx: Context) -> dict[str, Any]:
        model = await today_model(request, ctx)
        return {**model, "live": live_panels(request, ctx, model)}

    return await form_action(request, action, "today", model_of, ask_first)


STAT_FIELD = {"on": True, "off": False}  # the box ticked, the "not urgent" button; absent: as it is


async def check_in(request: Request) -> Response:
    def action(ctx: Context, f: dict[str, str], now: dt.datetime) -> Done:
        done = state_of(request).data.check_in(
            ctx.user,
            f.get("patient_id", ""),
            f.get("name", ""),
            f.get("doctor", ""),
            STAT_FIELD.get(f.get("stat", "")),
            f.get("reason", ""),
            now=now,
            shown_patient_id=f.get("shown_patient_id"),  # a page's, else whom `ask_whose_id` saw
            # the session's 清除 buttons; the check-in form has no "clear": its empty fields keep
            clear_name=f.get("clear") == "name",
            clear_reason=f.get("clear") == "reason",
            same_name=same_name_answer(f),
            correct_name=f.get("correct_name") == "yes",  # the answer on `ask_which_name`'s page
        )
        session = done.session
        who = {"patient": session.patient_name or session.patient_id, "ended": done.ended}
        if f.get("correct_name") == "yes":
            who |= {"renamed": session.patient_name}
        if done.again and f.get("clear") in CLEARABLE:
            return f"{f['clear']}-cleared"  # said as what was cleared, not as a check-in again
        if done.again:
            return "check-in-again", who | {"changed": done.changed, "session": session}
        answer = same_name_answer(f)
        if answer in (SameName.CORRECTED, SameName.OTHER_ID):  # the same patient goes on: none ended
            ids = {"replaced": f.get("shown_patient_id", ""), "id": session.patient_id}
            return f"check-in-{answer.value}", {"patient": who["patient"], "renamed": who.get("renamed")} | ids
        return "check-in", who

    askers = asking(ask_before_clearing(request), ask_whose_id(request), ask_which_name(request))
    return await today_action(request, action, askers)


def same_name_answer(fields: dict[str, str]) -> SameName | None:
    """The doctor's answer on the page `ask_whose_id` shows (its buttons' values: `SameName`'s);
    None if none, or not one of them."""
    try:
        return SameName(fields.get("same_name", ""))
    except ValueError:
        return None


def asking(*askers: Asker) -> Asker:
    """The first of `askers` that has a question for this form, else none."""

    async def ask(ctx: Context, fields: dict[str, str]) -> Response | None:
        for asker in askers:
            question = await asker(ctx, fields)
            if question is not None:
                return question
        return None

    return ask


def ask_whose_id(request: Request) -> Asker:
    """A check-in of another ID under the checked-in patient's own name asks the doctor whether it
    corrects a mistyped ID or is the same patient's other ID (ID card and clinic number are both
    valid): never guessed from the words. The answer comes back with the form's fields and the
    patient the page showed (`shown_patient_id`: refused if another was checked in since).
    Nothing to ask: the check-in expects whom the ask saw (`shown_patient_id`, unless a page's),
    so a card read meanwhile is refused in its transaction, never taken for a number corrected."""

    async def ask(ctx: Context, fields: dict[str, str]) -> Response | None:
        if same_name_answer(fields) is not None:
            return None
        state = state_of(request)
        now = now_utc()
        seen, session = await state.run_db(
            lambda: state.data.same_name_replaced(fields.get("patient_id", ""), fields.get("name", ""), now)
        )
        if session is None:
            fields.setdefault("shown_patient_id", seen)  # "": nobody was checked in
            return None
        return render(request, ctx, "confirm_other_id.html", session=session, form=fields, alerts=[])

    return ask


def ask_which_name(request: Request) -> Asker:
    """A check-in under another name than a device user mapped to its ID (map-user --name 张三,
    checked in as 张山) asks the doctor which is right: else the cuff's readings went to the
    county under the check-in's name, unasked, and back under the mapping's a day later. One
    answer checks in under the mapping's name, the other corrects the mapping for good. Asked
    after `ask_whose_id` (whose answer, and the patient it saw, its page carries on)."""

    async def ask(ctx: Context, fields: dict[str, str]) -> Response | None:
        if fields.get("correct_name") == "yes" or fields.get("clear"):
            return None
        state = state_of(request)
        mapped = await state.run_db(
            lambda: state.data.mapped_otherwise(fields.get("patient_id", ""), fields.get("name", ""))
        )
        if mapped is None:
            return None
        return render(request, ctx, "confirm_which_name.html", mapped=mapped, form=fields, alerts=[])

    return ask


CLEARABLE = ("name", "reason")  # the session's 清除姓名 / 清除原因 buttons (field "clear")


def ask_before_clearing(request: Request) -> Asker:
    """A clear asks first, as logging out with a patient checked in does: on a phone the button is
    a thumb's slip from 不急了. Only when the page's patient still has that name or reason: else
    the check-in refuses it, or there is nothing to lose."""

    async def ask(ctx: Context, fields: dict[str, str]) -> Response | None:
        which = fields.get("clear", "")
        if which not in CLEARABLE or fields.get("confirmed") == "yes":
            return None
        state = state_of(request)
        session = await state.run_db(state.data.session, now_utc())
        if session is None or session.patient_id != fields.get("shown_patient_id"):
            return None
        if not (session.patient_name if which == "name" else session.reason):
            return None
        return render(request, ctx, "confirm_clear.html", session=session, clear=which, alerts=[])

    return ask


async def end_session(request: Request) -> Response:
    def action(ctx: Context, f: dict[str, str], now: dt.datetime) -> str:
        # the patient the page showed: a stale page must not end the session of one checked in since
        ended = state_of(request).data.end_session(ctx.user, now=now, shown_patient_id=f.get("patient_id", ""))
        return "end-session" if ended else ""

    return await today_action(request, action)


def _int(text: str) -> int:
    number = row_number(text)
    if number is None:
        raise ConsoleInputError(N_("That is not a valid number."))
    return number


class NotFound(Exception):
    """An address naming a row that cannot exist (a number beyond SQLite's INTEGER): 404."""


def path_number(request: Request, name: str) -> int:
    # the {…:int} route takes any run of digits; SQLite overflows past 2**63-1
    number = row_number(str(request.path_params[name]))
    if number is None:
        raise NotFound(name)
    return number


async def assign_reading(request: Request) -> Response:
    def action(ctx: Context, f: dict[str, str], now: dt.datetime) -> Done:
        data = state_of(request).data
        patient = data.assign_reading(ctx.user, _int(f.get("held_id", "")), f.get("patient_id", ""), now=now)
        return assigned_to(patient)

    return await today_action(request, action)


def assigned_to(patient: Patient, *, waits_for_quality: bool = False) -> Done:
    """What Today says after a held reading or ECG is assigned: whose it now is (ID, and name if
    known), and whether it still waits for the doctor's decision on its quality (not sent yet)."""
    return "assigned", {"patient_id": patient.patient_id, "name": patient.name, "re_record": waits_for_quality}


def assign_failed(exc: EcgAssignFailed) -> Done:
    """What Today says when a held ECG's assign could not be done: try again; failed on it before
    (a worker that fails every time), whom to call too."""
    return ("assign-failed", {"again": True}) if exc.again else "assign-failed"


async def assign_ecg(request: Request) -> Response:
    def action(ctx: Context, f: dict[str, str], now: dt.datetime) -> Done:
        data = state_of(request).data
        try:
            assigned = data.assign_ecg(ctx.user, _int(f.get("item_id", "")), f.get("patient_id", ""), now=now)
        except EcgAssignFailed as exc:
            return assign_failed(exc)  # still held: not "too late", which would make him stop trying
        except EcgDamaged:
            return "assign-damaged"  # set aside: record it again, not "try again"
        if assigned is None:
            return "too-late"
        return assigned_to(assigned.patient, waits_for_quality=assigned.waits_for_quality)

    return await today_action(request, action)


def map_user_action(request: Request) -> Callable[[Context, dict[str, str], dt.datetime], str]:
    """The "this cuff's user N is ..." form's action (`lastmile patient map-user`), on Today and Devices."""

    def action(ctx: Context, f: dict[str, str], now: dt.datetime) -> str:
        state_of(request).data.map_device_user(
            ctx.user,
            f.get("address", ""),
            f.get("device_user", ""),
            f.get("patient_id", ""),
            checked_in=f.get("whose") == "checked-in",
            now=now,
        )
        return "mapped"

    return action


async def map_device_user(request: Request) -> Response:
    """A held reading's "this cuff's user N is ..."."""
    return await today_action(request, map_user_action(request))


async def re_record(request: Request) -> Response:
    def action(ctx: Context, f: dict[str, str], now: dt.datetime) -> str:
        item_id = path_number(request, "item_id")  # after the login and CSRF checks
        # kept back now, already, not here, or on its way: the page says which
        return state_of(request).data.re_record(ctx.user, item_id, now=now)

    return await today_action(request, action)


async def stick_file_seen(request: Request) -> Response:
    def action(ctx: Context, f: dict[str, str], now: dt.datetime) -> str:
        file_id = path_number(request, "file_id")  # after the login and CSRF checks
        state_of(request).data.stick_file_seen(ctx.user, file_id, now=now)
        return "stick-file-seen"  # seen here or already (another tablet): it is off the list either way

    return await today_action(request, action)


async def send_anyway(request: Request) -> Response:
    def action(ctx: Context, f: dict[str, str], now: dt.datetime) -> str:
        item_id = path_number(request, "item_id")  # after the login and CSRF checks
        return "sending" if state_of(request).data.send_anyway(ctx.user, item_id, now=now) else "too-late"

    return await today_action(request, action)


def held_for_name_answer(
    decide: Callable[[ClinicData, str, int, dt.datetime], EcgAssigned | None],
    said: Callable[[EcgAssigned], Done],
) -> Handler:
    """The doctor's answer on an ECG held for its name (/today/ecg/N/...): `decide` (the user, the
    ECG, now) does it, Today says `said` of what it did; "too-late" when the ECG is no longer held
    for its name (sent already, or decided on another screen); "assign-failed" when it could not be
    done and still waits; "assign-damaged" when the cart's file could not carry it (set aside)."""

    async def answer(request: Request) -> Response:
        def action(ctx: Context, f: dict[str, str], now: dt.datetime) -> Done:
            item_id = path_number(request, "item_id")  # after the login and CSRF checks
            try:
                assigned = decide(state_of(request).data, ctx.user, item_id, now)
            except EcgAssignFailed as exc:
                return assign_failed(exc)
            except EcgDamaged:
                return "assign-damaged"
            return "too-late" if assigned is None else said(assigned)

        return await today_action(request, action)

    return answer


# "it is the checked-in patient's": sent under the check-in's name
ecg_is_checked_in_patients = held_for_name_answer(
    lambda data, user, item_id, now: data.ecg_is_checked_in_patients(user, item_id, now=now),
    lambda assigned: assigned_to(assigned.patient, waits_for_quality=assigned.waits_for_quality),
)
# "the ECG's name is right": the check-in's name corrected, the ECG sent (held for its quality
# too: not sent yet)
ecg_name_right = held_for_name_answer(
    lambda data, user, item_id, now: data.ecg_name_right(user, item_id, now=now),
    lambda assigned: ("name-corrected", {"re_record": assigned.waits_for_quality}),
)
# "the ID number is right": its sex and birth date go instead of the ECG file's
ecg_with_id_values = held_for_name_answer(
    lambda data, user, item_id, now: data.ecg_with_id_values(user, item_id, now=now),
    lambda assigned: assigned_to(assigned.patient, waits_for_quality=assigned.waits_for_quality),
)


async def ecg_preview(request: Request) -> Response:
    state = state_of(request)
    ctx = await context_for(request)
    item_id = path_number(request, "item_id")
    ecg = await state.run_db(state.data.ecg, item_id)
    analysis = state.analyses.result(ecg.sha256) if ecg is not None and state.analyses else None
    if analysis is None or analysis.svg_gzip is None:
        # an ECG not here (none by that number, or purged) is not "not ready yet": it never will be
        gone = ecg is None or ecg.state == ItemState.PURGED.value
        return not_found(request, ctx, NO_SUCH_ECG if gone else NO_PREVIEW)
    headers = {
        "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'",
        "cache-control": "private, no-store",
    }
    if "gzip" in request.headers.get("accept-encoding", ""):
        headers["content-encoding"] = "gzip"
        return Response(analysis.svg_gzip, media_type="image/svg+xml", headers=headers)
    return Response(gzip.decompress(analysis.svg_gzip), media_type="image/svg+xml", headers=headers)


# "alerts": the critical-result banner (base.html), so a result that comes back while Today is open
# shows within seconds, not at the next reload; its data is in every page's model already (page_model)
LIVE_PANELS = ("session", "readings", "ecg", "held", "alerts")


@dataclass(frozen=True)
class LivePanel:
    """A live panel as rendered, and its version: the page and the event stream render it the same
    way, so the page swaps a panel in only when its version changed (a swap on every connect would
    pull elements from under the doctor's eyes and make screen readers announce every panel)."""

    html: Markup
    version: str

    @classmethod
    def of(cls, html: str) -> LivePanel:
        return cls(Markup(html), hashlib.sha256(html.encode()).hexdigest()[:16])


def alerts_panel(request: Request, ctx: Context, alerts: list[views.Alert]) -> LivePanel:
    return LivePanel.of(render_fragment("panel_alerts.html", ctx, request, alerts=alerts))


# the stream of a page other than Today: the critical-result banner alone, at the cost of its one query
ALERTS_STREAM = "/events?panels=alerts"


def live_panels(request: Request, ctx: Context, model: dict[str, Any]) -> dict[str, LivePanel]:
    """Today's live panels from its model; the banner is the one `page_model` rendered already."""
    return {
        name: model["alerts_panel"]
        if name == "alerts"
        else LivePanel.of(render_fragment(f"panel_{name}.html", ctx, request, **model))
        for name in LIVE_PANELS
    }


async def events(request: Request) -> Response:
    """Server-sent events: the Today page's live panels, each sent again when it changed; with
    ?panels=alerts (the other pages: ALERTS_STREAM) the critical-result banner alone."""
    state = state_of(request)
    ctx = await context_for(request)
    alerts_only = request.query_params.get("panels") == "alerts"
    wake = state.broker.subscribe()
    token = request.cookies.get(SESSION_COOKIE)

    async def stream() -> AsyncIterator[str]:
        sent: dict[str, str] = {}
        try:
            yield "retry: 3000\n\n"
            while True:
                login = await state.run_db(lambda: state.data.accounts.login_for(token, now=now_utc()))
                if login is None:
                    yield "event: logout\ndata: {}\n\n"
                    return
                if alerts_only:
                    alerts = await state.run_db(views.critical_alerts, state.data)
                    panels = {"alerts": alerts_panel(request, ctx, alerts)}
                else:
                    panels = live_panels(request, ctx, await today_model(request, ctx))
                for name, panel in panels.items():
                    if sent.get(name) != panel.version:
                        sent[name] = panel.version
                        data = {"id": f"panel-{name}", "html": str(panel.html), "version": panel.version}
                        yield f"event: panel\ndata: {json.dumps(data)}\n\n"
                try:
                    await asyncio.wait_for(wake.wait(), HEARTBEAT_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                wake.clear()
                if state.shutting_down is not None and state.shutting_down.is_set():
                    return
                if await request.is_disconnected():
                    return
        finally:
            state.broker.unsubscribe(wake)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"cache-control": "no-store", "x-accel-buffering": "no"}
    )


# -- the other pages -------------------------------------------------------------------------------


async def sent_page(request: Request) -> Response:
    ctx = await context_for(request)
    return render(request, ctx, "sent.html", **await page_model(request, ctx, views.sent))


async def reports_page(request: Request) -> Response:
    ctx = await context_for(request)
    return render(request, ctx, "reports.html", **await page_model(request, ctx, views.reports))


async def report_page(request: Request) -> Response:
    ctx = await context_for(request)
    model = await page_model(request, ctx, views.report, request.path_params["report_id"], ctx.user)
    if model["report"] is None:
        return not_found(request, ctx, NO_SUCH_REPORT)
    model["clinic_printer"] = lp_command() is not None  # CUPS on this gateway (the image has it)
    model["printed"] = request.query_params.get("printed")
    return render(request, ctx, "report.html", **model)


async def report_pdf(request: Request) -> Response:
    state = state_of(request)
    ctx = await context_for(request)
    report_id = request.path_params["report_id"]
    pdf = await state.run_db(state.data.reports.pdf, report_id)
    if pdf is None:
        found = await state.run_db(state.data.reports.report, report_id)  # gone, or no PDF: said apart
        return not_found(request, ctx, NO_SUCH_REPORT if found is None else NO_REPORT_PDF)
    return Response(
        pdf,
        media_type="application/pdf",
        headers={"content-disposition": "inline", "content-security-policy": "default-src 'none'"},
    )


async def print_report(request: Request) -> Response:
    """The report on the clinic's printer through CUPS (the county's PDF as sent, behind a note if
    a newer version replaced it; else its text); the page says whether the scheduler took it. The browser's own Print stays the fallback."""
    state = state_of(request)
    ctx = await context_for(request)
    await read_form(request, ctx)
    report_id = request.path_params["report_id"]
    # what the county's PDF cannot say (replaced; sent without a patient), the page and the text
    # printout do: the note goes first, on a page of its own
    job = await state.run_db(state.data.reports.print_job, report_id, ctx.localizer)
    if job is None:
        return not_found(request, ctx, NO_SUCH_REPORT)
    note, document = job
    outcome = await asyncio.to_thread(print_behind_note, note, document, f"ECG report {report_id}")
    log.info("report %s printed by %s: %s", report_id, ctx.user, outcome.message)
    return RedirectResponse(f"/reports/{quote(report_id)}?printed={int(outcome.sent)}", status_code=303)


async def acknowledge_report(request: Request) -> Response:
    state = state_of(request)
    ctx = await context_for(request)
    fields = await read_form(request, ctx)
    report_id = request.path_params["report_id"]
    await state.run_db(views.acknowledge, state.data, ctx.user, report_id, now_utc())
    state.broker.publish()
    return RedirectResponse(local_path(fields.get("next"), "/reports"), status_code=303)


async def devices_page(request: Request) -> Response:
    ctx = await context_for(request)
    return render(
        request,
        ctx,
        "devices.html",
        error="",
        form={},
        done=request.query_params.get("done", ""),
        **await page_model(request, ctx, views.devices),
    )


async def devices_action(request: Request, action: Callable[[Context, dict[str, str], dt.datetime], str]) -> Response:
    """A Devices form's action (a mapping made there changes Today's held readings too: told live)."""
    return await form_action(request, action, "devices", lambda ctx: page_model(request, ctx, views.devices))


async def pair_device(request: Request) -> Response:
    def action(ctx: Context, f: dict[str, str], now: dt.datetime) -> str:
        state_of(request).data.pair_device(ctx.user, f.get("address", ""), f.get("name", ""), now=now)
        return "paired"

    return await devices_action(request, action)


async def unpair_device(request: Request) -> Response:
    def action(ctx: Context, f: dict[str, str], now: dt.datetime) -> str:
        state_of(request).data.unpair_device(ctx.user, f.get("address", ""), now=now)
        return "unpaired"

    return await devices_action(request, action)


async def map_device_user_on_devices(request: Request) -> Response:
    """Devices: a paired cuff's "user N is ..." before any reading of user N is held."""
    return await devices_action(request, map_user_action(request))


async def unmap_device_user(request: Request) -> Response:
    """Devices: forget whose a device's user is (`lastmile patient map-user ... --remove`)."""

    def action(ctx: Context, f: dict[str, str], now: dt.datetime) -> str:
        state_of(request).data.unmap_device_user(ctx.user, f.get("address", ""), f.get("device_user", ""), now=now)
        return "unmapped"

    return await devices_action(request, action)


async def visits_page(request: Request) -> Response:
    ctx = await context_for(request)
    return render(request, ctx, "visits.html", **await page_model(request, ctx, views.visits))


async def system_page(request: Request) -> Response:
    state = state_of(request)
    ctx = await context_for(request)
    model = await page_model(request, ctx, views.system, ctx.login.user.is_admin if ctx.login else False)
    model["findings"] = await state.doctor_runs.findings(state.config)
    model["finding_label"] = lambda finding: finding_label(finding, ctx.localizer)
    model["advice_text"] = lambda finding: advice_text(finding, ctx.localizer)
    model["county_row_text"] = lambda county: county_row_text(county, ctx.localizer)
    model["fingerprint"] = state.fingerprint
    return render(request, ctx, "system.html", **model)


async def home(request: Request) -> Response:
    await context_for(request)
    return RedirectResponse("/today", status_code=303)


# -- errors ----------------------------------------------------------------------------------------


async def on_login_required(request: Request, exc: Exception) -> Response:
    if request.method == "GET" and asks_for_html(request):
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
    if asks_for_html(request):
        # a form from a page left open after its login ended: a page that says so, still a 401
        # (no Referer to return to: referrer-policy no-referrer), then Today
        ctx = Context(None, page_localizer(request), "")
        page = exc.next_page if isinstance(exc, LoginRequired) else "/today"
        return render(request, ctx, "login_expired.html", status=401, next=page, alerts=[])
    return PlainTextResponse("login required / 请先登录", status_code=401)


async def on_forbidden(request: Request, exc: Exception) -> Response:
    """A form with the wrong token (a page opened before the last login, in another tab; a login
    page whose token the browser lost) or from elsewhere: the doctor reads which, that it was not
    saved and how to do it again, not a bare refusal."""
    log.warning("refused %s %s: %s", request.method, request.url.path, exc)
    if not asks_for_html(request):
        return PlainTextResponse("refused / 已拒绝", status_code=403)
    refusal = exc.refusal if isinstance(exc, Forbidden) else "foreign"
    ctx = await error_page_context(request)
    return render(request, ctx, "forbidden.html", status=403, alerts=[], refusal=refusal)


async def on_not_found(request: Request, exc: Exception) -> Response:
    return await no_such_page(request)


async def no_such_page(request: Request, *, status: int = 404) -> Response:
    """An address nothing answers. A picture or a script asking (the browser's /favicon.ico on
    every page) gets the sentence alone, without looking up the login: a read, and a session
    write on the SD card, for nobody to see."""
    if not asks_for_html(request):
        return PlainTextResponse(page_localizer(request).gettext(NO_SUCH_PAGE), status_code=status)
    return not_found(request, await error_page_context(request), NO_SUCH_PAGE, status=status)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own: an address no route has (an old bookmark), or one asked in a way it does not
    answer (405: a form's address is POST, or GET leading to its page): the not-found page;
    anything else as Starlette says it."""
    assert isinstance(exc, HTTPException)
    if exc.status_code in (404, 405):
        response = await no_such_page(request, status=exc.status_code)
        response.headers.update(exc.headers or {})
        return response
    return PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)


async def on_account_error(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(str(exc), status_code=400)


async def error_page_context(request: Request) -> Context:
    """An error page's context: the login, unless even reading it fails (its touch is a write, on a
    full partition); then the browser's language and no login."""
    try:
        return await context_for(request, required=False)
    except sqlite3.Error:
        return Context(None, page_localizer(request), "")


async def on_storage_fault(request: Request, exc: Exception) -> Response:
    """clinic.db (check-in, audit trail, acknowledgements) or the outbox (a held reading or ECG
    assigned) on a full data partition: the doctor reads that nothing was recorded, that what was
    stored is safe, what to do, and has a way back to Today - not an Internal Server Error. Other
    database faults stay server errors."""
    if not is_storage_full(exc):
        raise exc
    log.error("%s %s not recorded: the data partition is full (%s)", request.method, request.url.path, exc)
    ctx = await error_page_context(request)
    return render(request, ctx, "storage_full.html", status=507, alerts=[])


# -- the application -------------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


def form(path: str, action: Handler, page: str) -> list[Route]:
    """A form's address: its action on POST; opened as a page (a refresh after the POST, a bookmark,
    the back button) it leads to `page`, the page the form is on - never the action again."""
    return [Route(path, action, methods=["POST"]), Route(path, back_to(page), methods=["GET"])]


def back_to(page: str) -> Handler:
    """A redirect to `page`, its {path parameters} those of the address opened; after the login
    check, as for every page (no login: the login page, then here again)."""

    async def redirect(request: Request) -> Response:
        await context_for(request)
        params = {name: quote(str(value), safe="") for name, value in request.path_params.items()}
        return RedirectResponse(page.format(**params), status_code=303)

    return redirect


def routes() -> list[Route | Mount]:
    return [
        Route("/", home),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_submit, methods=["POST"]),
        *form("/logout", logout, "/today"),
        *form("/language", set_language, "/today"),
        Route("/today", today),
        *form("/today/check-in", check_in, "/today"),
        *form("/today/end-session", end_session, "/today"),
        *form("/today/assign-reading", assign_reading, "/today"),
        *form("/today/assign-ecg", assign_ecg, "/today"),
        *form("/today/map-user", map_device_user, "/today"),
        *form("/today/ecg/{item_id:int}/re-record", re_record, "/today"),
        *form("/today/ecg/{item_id:int}/send-anyway", send_anyway, "/today"),
        *form("/today/stick-file/{file_id:int}/seen", stick_file_seen, "/today"),
        *form("/today/ecg/{item_id:int}/checked-in-name", ecg_is_checked_in_patients, "/today"),
        *form("/today/ecg/{item_id:int}/name-right", ecg_name_right, "/today"),
        *form("/today/ecg/{item_id:int}/id-values", ecg_with_id_values, "/today"),
        Route("/ecg/{item_id:int}/preview.svg", ecg_preview),
        Route("/events", events),
        Route("/sent", sent_page),
        Route("/reports", reports_page),
        Route("/reports/{report_id}", report_page),
        Route("/reports/{report_id}/pdf", report_pdf),
        *form("/reports/{report_id}/acknowledge", acknowledge_report, "/reports/{report_id}"),
        *form("/reports/{report_id}/print", print_report, "/reports/{report_id}"),
        Route("/devices", devices_page),
        *form("/devices/pair", pair_device, "/devices"),
        *form("/devices/unpair", unpair_device, "/devices"),
        *form("/devices/map-user", map_device_user_on_devices, "/devices"),
        *form("/devices/unmap-user", unmap_device_user, "/devices"),
        Route("/visits", visits_page),
        Route("/system", system_page),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]


# Reachable without a login: the login form itself, the language switch of that form, static files.
PUBLIC_PATHS = ("/login", "/language", "/static")


def build_app(state: ConsoleState) -> ASGIApp:
    app = Starlette(
        routes=routes(),
        exception_handlers={
            LoginRequired: on_login_required,
            Forbidden: on_forbidden,
            AccountError: on_account_error,
            NotFound: on_not_found,
            HTTPException: on_http_exception,
            sqlite3.OperationalError: on_storage_fault,
            OutboxFullError: on_storage_fault,
        },
    )
    app.state.console = state
    return SecurityHeaders(app, https=state.https)
