"""The gateway's one TOML configuration file.

Every key is declared here with its type and default (the documentation of each key is the
comment next to it, rendered by `lastmile config --defaults`). Unknown keys and wrong types are
refused with the file, line and reason, so a county technician sees exactly what to fix.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from lastmile.visits.datum import DATUMS

if typing.TYPE_CHECKING:
    from devices.ascii_report import ReportProfile
    from uploader.fhir_bundle import FhirNaming

DEFAULT_CONFIG_PATH = Path("/etc/lastmile/lastmile.toml")


class ConfigError(Exception):
    """The configuration file cannot be used; the message says where and why."""


@dataclass
class GatewaySection:
    id: str = "lastmile-gateway"  # this gateway's id (FHIR Device, visit chain, DICOM Contributing Equipment serial)
    station_name: str = ""  # DICOM StationName (≤ 16 bytes); empty = the id, which must then fit
    institution: str = ""  # clinic name (DICOM InstitutionName, ≤ 64 bytes)
    data_dir: str = "/var/lib/lastmile"  # outbox database and payloads; on the data partition
    log_patient_data: bool = False  # debug only: allow patient names/IDs in logs

    @property
    def dicom_station_name(self) -> str:
        """What goes in DICOM StationName: `station_name`, else the id (checked to fit)."""
        return self.station_name or self.id


@dataclass
class TlsSection:
    enabled: bool = False  # DICOM TLS (PS3.15 Annex B) to the reading center and for its commitment reports
    ca_file: str = ""  # CA that signed the reading center's certificate
    cert_file: str = ""  # this gateway's client certificate (PEM)
    key_file: str = ""  # its private key (PEM)


@dataclass
class MeteredSection:
    daily_budget_mb: float = (
        0.0  # routine traffic to this destination per local day, in MB; 0: no budget (STAT always goes, and counts)
    )
    windows: list[str] = field(
        default_factory=list
    )  # local "HH:MM-HH:MM" times routine traffic may go, e.g. ["22:00-06:00"]; empty: any time


@dataclass
class ReadingCenterSection:
    host: str = "127.0.0.1"  # the reading center's PACS: host name or address
    port: int = 104  # its DICOM port
    called_ae: str = "READING_CENTER"  # the PACS's AE title
    calling_ae: str = "LASTMILE"  # this gateway's AE title
    listen_port: int = 11113  # where the PACS sends storage-commitment reports, and reports C-MOVEd to calling_ae
    listen_host: str = ""  # address for those reports; "": ours toward the reading center (loopback if it is)
    report_networks: list[str] = field(default_factory=list)  # CIDR networks besides `host` that may send reports
    associations: int = 2  # parallel associations while sending
    max_associations: int = 4  # ...more, up to this, where the link's round trip is long against an object's time
    batch_size: int = 50  # C-STOREs per association before it is released
    deflate: bool = True  # propose Deflated Explicit VR Little Endian first
    timeout_s: float = 30.0  # ACSE/DIMSE/network timeouts
    storage_commitment: bool = True  # ask the PACS to confirm it keeps what we sent
    commitment_timeout_s: float = 120.0  # no report by then: ask again with a new transaction
    no_commitment_policy: str = "keep"  # peer without commitment: "keep" local copies or "purge"
    stat_cuts_routine: bool = True  # a STAT ECG waiting cuts a routine transfer on the wire (resent later, uncharged)
    stat_cut_after_s: float = 0.05  # ...only a transfer expected to need longer than this (s), not one nearly done
    tls: TlsSection = field(default_factory=TlsSection)
    metered: MeteredSection = field(default_factory=MeteredSection)  # ECGs sent (C-STOREs)


@dataclass
class OutboxSection:
    retention_days: float = 0.0  # keep committed payloads this long before purging
    min_free_mb: int = 200  # refuse new items when the data partition has less free space
    backoff_base_s: float = 5.0  # first retry delay after a transient failure
    backoff_max_s: float = 900.0  # cap of the exponential backoff
    config_fault_retry_s: float = 300.0  # retry interval while the peer refuses our configuration
    max_interrupted_sends: int = 5  # sends cut short by a crash (OOM, kill) before the item is quarantined


@dataclass
class PatientSection:
    idle_timeout_s: float = 900.0  # current patient is cleared after this much inactivity
    id_kind: str = (
        ""  # "cn-resident-id" (GB 11643: check digit verified, birth date and sex derived), "clinic-mrn" or "" (any id)
    )
    id_issuer: str = ""  # who issues the patient IDs (DICOM Issuer of Patient ID), e.g. the county register
    unassigned_ecg_hold_s: float = (
        900.0  # a routine ECG with no patient, or under another name than the check-in's: held this long, then sent
    )


@dataclass
class EcgSection:
    quality_check: bool = True  # check every ECG at intake: electrode off, hum, tremor, wander, swapped arms
    re_record_hold_s: float = (
        600.0  # a 're-record' verdict waits this long for the doctor ('ecg release' / 'ecg discard'), then goes flagged
    )
    stat_name_hold_s: float = (
        120.0  # a STAT ECG under another name than the check-in's: held this long (<= the routine hold), then sent
    )


@dataclass
class LanReceiverSection:
    enabled: bool = False  # accept DICOM from carts on the clinic LAN
    host: str = "0.0.0.0"  # address to listen on: the clinic LAN interface's, or 0.0.0.0 for all
    port: int = 11112  # DICOM port carts on the clinic LAN send to
    ae_title: str = "LASTMILE"  # this gateway's AE title for the carts
    allowed_callers: list[str] = field(default_factory=list)  # calling AE titles allowed to store
    sop_classes: list[str] = field(default_factory=list)  # storage SOP class UIDs; empty = ECG classes
    max_object_mb: int = 16  # larger objects (as sent, or once inflated) are refused (0xA700)


@dataclass
class UsbImportSection:
    folders: list[str] = field(default_factory=list)  # watched folders (mount points of sticks/carts)


@dataclass
class BleSection:
    enabled: bool = True  # connect to allow-listed Bluetooth LE health devices ('lastmile ble pair')
    scan_interval_s: float = 10.0  # scan pass length; the allow-list is re-read after each pass
    connect_attempts: int = 4  # tries per connection before waiting for the next scan
    continuous_store_interval_s: float = 10.0  # continuous SpO2 streams: one observation per interval
    battery_poll_s: float = 600.0  # a connected device whose Battery Level cannot notify: re-read this often
    battery_refresh_s: float = 1800.0  # a level 1 point from the row's: written at most this often (SD card)


@dataclass
class SerialSection:
    enabled: bool = True  # read the serial devices listed below (bridges, monitors, card scanners)
    profiles_dir: str = ""  # extra ASCII-report profiles (TOML); built-in ones always available
    devices: list[dict] = field(default_factory=list)  # [{name, match = "VID:PID[:SERIAL]" or a path, profile}]
    patient_card_pattern: str = ""  # regex: a scanned code that names a patient
    doctor_badge_pattern: str = ""  # regex: a scanned code that names a doctor


@dataclass
class GpsSection:
    source: str = "gpsd"  # "gpsd", "nmea" (serial port) or "none"
    gpsd_host: str = "127.0.0.1"  # gpsd's address (source = "gpsd")
    gpsd_port: int = 2947  # gpsd's port
    nmea_port: str = ""  # serial port of an NMEA receiver (source = "nmea"), e.g. /dev/ttyACM0
    nmea_baud: int = 9600  # its speed


@dataclass
class VisitsSection:
    doctor_id: str = ""  # the family doctor on this gateway's field visits (practitioner id)
    radius_m: float = 200.0  # a visit further than this (plus fix error) from the household is flagged
    household_register: str = ""  # CSV: household_id, latitude, longitude
    # converted to the GPS fix's WGS-84 when the register is imported (lastmile/visits/datum.py)
    register_datum: str = "wgs84"  # the register's datum: wgs84 (GPS), gcj02 (Gaode/Tencent maps), bd09 (Baidu)
    track_max_points: int = 2000  # an open visit's GPS track is thinned evenly beyond this many points
    setting: str = "home"  # "home" (FHIR class HH) or "clinic" (AMB)
    max_eph_m: float = 100.0  # a best fix less accurate than this (95 %) is flagged
    stale_fix_s: float = 120.0  # a fix older than this at start/stop is flagged
    max_speed_mps: float = 60.0  # track jumps faster than this (beyond fix errors) are flagged
    time_disagreement_s: float = 60.0  # GPS and system clock further apart than this: flagged
    fix_wait_s: float = 10.0  # visit start/stop: how long to wait for a fix from the receiver


@dataclass
class FhirSection:
    base_url: str = ""  # county health platform FHIR R4 base, https://...
    token_file: str = ""  # bearer token; must be readable by its owner only
    ca_file: str = ""  # CA bundle that signs the platform's certificate
    timeout_s: float = 30.0  # connect/read timeout of one request
    batch_size: int = 20  # bundles merged into one transaction request
    patient_id_system: str = "urn:lastmile:patient-id"  # identifier system of patient ids (county register)
    practitioner_id_system: str = "urn:lastmile:practitioner-id"  # identifier system of doctor ids
    gzip: bool = True  # compress request bodies when the platform accepts it
    metered: MeteredSection = field(default_factory=MeteredSection)  # visit bundles sent


@dataclass
class ConsoleSection:
    listen: str = "0.0.0.0:8443"  # HOST:PORT of the doctor's console (web pages) on the clinic LAN
    https: bool = True  # TLS with a certificate made at first start; plain HTTP is allowed on loopback only
    language: str = "zh-CN"  # pages' language before a user picks one: "zh-CN" or "en"
    session_idle_s: float = 43200.0  # a login ends after this long without a page being opened
    max_login_failures: int = 5  # wrong passwords in a row before the account is locked
    lockout_s: float = 900.0  # how long a locked account stays locked


@dataclass
class ReportsSection:
    source: str = "dicom"  # where reports come back from: "dicom" (the PACS), "fhir" (county platform), "both", "off"
    window_days: float = 14.0  # look for reports on studies sent in the last this many days
    stat_poll_s: float = 25.0  # STAT studies: ask this often during their first stat_hurry_h hours
    stat_hurry_h: float = 1.0  # how long a STAT study is polled at stat_poll_s
    amendment_poll_h: float = 12.0  # after a final report, look for amended ones this often (0: stop)
    batch_size: int = 50  # studies per C-FIND / FHIR search
    keep_association_s: float = 28.0  # keep the C-FIND association open for a round due within this many seconds (a STAT study's hurry); below the PACS's idle timeout (Orthanc DicomScpTimeout: 30); 0: a new one each round
    move_ae: str = ""  # C-MOVE destination for a PACS that refuses C-GET: "" = this gateway's own AE (reading_center.calling_ae at reading_center.listen_port, which the PACS already knows for storage commitment); set only if the PACS must move reports to a separate AE
    move_port: int = 11114  # port of that separate move_ae's storage SCP (it listens only while a C-MOVE runs)
    move_host: str = ""  # address our C-MOVE storage SCP listens on while a move runs (when no commitment listener holds the port); "" = reading_center.listen_host, or every interface
    # default codes: STEMI, ventricular fibrillation, ventricular tachycardia, complete AV block
    critical_codes: list[str] = field(  # SCHEME:CODE of coded findings that make a report critical (危急值)
        default_factory=lambda: ["SCT:401303003", "SCT:71908006", "SCT:25569003", "SCT:27885002"]
    )
    critical_keywords: list[str] = field(default_factory=lambda: ["危急值", "critical result"])  # in report text
    critical_command: list[str] = field(default_factory=list)  # run (argv) on each new critical report: sound, LED
    retention_days: float = 30.0  # keep reports this long after the ECG was sent (unacknowledged critical stay)
    backoff_base_s: float = 30.0  # first retry delay after the reading center could not be asked
    backoff_max_s: float = 600.0  # cap of that backoff
    metered: MeteredSection = field(default_factory=MeteredSection)  # report polling (queries and reports fetched)


@dataclass
class MetricsSection:
    listen: str = "127.0.0.1:9560"  # HOST:PORT of the Prometheus endpoint (lastmile-metrics.service): the county's VPN/LAN address lets it scrape; no patient data


@dataclass
class UpdateSection:
    enabled: bool = False  # install county-signed RAUC bundles (A/B root slots) from `url` and USB sticks
    url: str = ""  # the county's update index, https://.../stable.json: {"version", "bundle", "sha256", "size"}
    ca_file: str = ""  # CA bundle that signs the update server's certificate; "" = the system's CAs
    poll_interval_h: float = 6.0  # ask `url` this often (an unchanged index costs one conditional GET)
    timeout_s: float = 30.0  # connect/read timeout of one request (a dropped download resumes next time)
    usb_bundles: bool = True  # also take lastmile-update-*.raucb from the top of a stick in usb_import.folders
    reboot_window: str = ""  # local "HH:MM-HH:MM" a new slot may be rebooted into, e.g. "02:00-05:00"; "": any time
    idle_before_reboot_s: float = 600.0  # ...and only once nothing was measured, sent or selected for this long
    rauc_conf: str = "/etc/rauc/system.conf"  # RAUC's system.conf (slots, keyring, compatible)
    keyring: str = ""  # county CA that signs bundles; "" = the keyring named in rauc_conf
    metered: MeteredSection = field(default_factory=MeteredSection)  # bundle downloads (resumed the next day or window)


@dataclass
class Config:
    gateway: GatewaySection = field(default_factory=GatewaySection)
    reading_center: ReadingCenterSection = field(default_factory=ReadingCenterSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    patient: PatientSection = field(default_factory=PatientSection)
    ecg: EcgSection = field(default_factory=EcgSection)
    lan_receiver: LanReceiverSection = field(default_factory=LanReceiverSection)
    usb_import: UsbImportSection = field(default_factory=UsbImportSection)
    ble: BleSection = field(default_factory=BleSection)
    serial: SerialSection = field(default_factory=SerialSection)
    gps: GpsSection = field(default_factory=GpsSection)
    visits: VisitsSection = field(default_factory=VisitsSection)
    fhir: FhirSection = field(default_factory=FhirSection)
    console: ConsoleSection = field(default_factory=ConsoleSection)

    reports: ReportsSection = field(default_factory=ReportsSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    update: UpdateSection = field(default_factory=UpdateSection)
    source: str = "<defaults>"  # where it was read from

    @property
    def data_dir(self) -> Path:
        """Where the gateway keeps its state (`gateway.data_dir`): the one spelling code reads."""
        return Path(self.gateway.data_dir)

    def set_data_dir(self, path: str | os.PathLike[str]) -> None:
        """Point the gateway at another state directory (`--data-dir`, the demo, tests)."""
        self.gateway.data_dir = os.fspath(path)


_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("reading_center", "no_commitment_policy"): ("keep", "purge"),
    ("gps", "source"): ("gpsd", "nmea", "none"),
    ("visits", "setting"): ("home", "clinic"),
    ("visits", "register_datum"): DATUMS,
    ("patient", "id_kind"): ("", "cn-resident-id", "clinic-mrn"),
    ("console", "language"): ("zh-CN", "en"),
    ("reports", "source"): ("dicom", "fhir", "both", "off"),
}


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")


def _line_of(text: str, dotted: str, item: int | None = None, *, exact: bool = False) -> int | None:
    """Best-effort line number of a key, for error messages: the key's own line in its table
    (the `item`-th `[[table]]` for arrays of tables), else the table's header line (not with
    `exact`: then None when the key is not written in the file)."""
    *tables, key = dotted.split(".")
    table = ".".join(tables)
    lines = text.splitlines()
    headers = [(i, m.group(2).replace(" ", ""), m.group(1)) for i, ln in enumerate(lines) if (m := _HEADER.match(ln))]
    bounds = [i for i, _, _ in headers] + [len(lines)]
    if not table:
        blocks = [(0, bounds[0])]
    else:
        blocks = [(i + 1, bounds[n + 1]) for n, (i, name, _) in enumerate(headers) if name == table]
        if item is not None:
            blocks = blocks[item : item + 1]
    key_line = re.compile(r"^\s*[\"']?" + re.escape(key) + r"[\"']?\s*=")
    for first, stop in blocks:
        for i in range(first, stop):
            if key_line.match(lines[i]):
                return i + 1
    if exact:
        return None
    if blocks and table:
        return blocks[0][0]  # the header
    if not table:  # a whole table: its header
        return next((i + 1 for i, name, _ in headers if name == key), None)
    if item is not None and len(tables) >= 1:
        return _inline_item_line(text, table, key, item)
    return None


def _inline_item_line(text: str, array: str, key: str, item: int) -> int | None:
    """`array = [{...}, {...}]` written inline in its parent table: the line of `key` in the
    item-th inline table, else the array's own line."""
    start = _line_of(text, array)
    if start is None:
        return None
    lines = text.splitlines()
    found = [i + 1 for i in range(start - 1, len(lines)) if re.search(r"\b" + re.escape(key) + r"\s*=", lines[i])]
    return found[item] if item < len(found) else start


def _check_type(value: object, hint: object) -> bool:
    origin = typing.get_origin(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint) or (object,)
        return isinstance(value, list) and all(item is object or _check_type(v, item) for v in value)
    if hint is dict:
        return isinstance(value, dict)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, h) for h in typing.get_args(hint))
    return True


_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", dict: "a table"}


def _build(cls: type, data: dict, prefix: str, text: str, where: str) -> object:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if not (cls is Config and f.name == "source")}
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            line = _line_of(text, dotted)
            options = ", ".join(sorted(known))
            raise ConfigError(f"{where}:{line or '?'}: unknown key '{dotted}' (known here: {options})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}:{_line_of(text, dotted) or '?'}: '{dotted}' must be a table")
            values[key] = _build(typing.cast(type, hint), value, dotted + ".", text, where)
            continue
        if not _check_type(value, hint):
            want = _TYPE_NAMES.get(hint, str(hint).replace("typing.", ""))
            raise ConfigError(f"{where}:{_line_of(text, dotted) or '?'}: '{dotted}' must be {want}, not {value!r}")
        choices = _CHOICES.get((prefix.rstrip("."), key))
        if choices and value not in choices:
            raise ConfigError(
                f"{where}:{_line_of(text, dotted) or '?'}: '{dotted}' must be one of "
                f"{', '.join(choices)}, not {value!r}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            # TOML allows nan and inf; no setting means either (an infinite timeout crashes a wait)
            raise ConfigError(
                f"{where}:{_line_of(text, dotted) or '?'}: '{dotted}' must be a finite number, not {value}"
            )
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{where}:{_line_of(text, dotted) or '?'}: '{dotted}' must not be negative")
        values[key] = float(value) if hint is float else value
    return cls(**values)


# -- meaning: every value checked for what it is used for, not only its type -------------------


class _Problems:
    """Mistakes found in one file, each with its line; reported together, in file order."""

    def __init__(self, text: str, where: str) -> None:
        self.text = text
        self.where = where
        self.found: list[tuple[int, str]] = []

    def add(self, dotted: str, message: str, *, item: int | None = None) -> None:
        line = _line_of(self.text, dotted, item)
        name = dotted if item is None else f"{dotted.rsplit('.', 1)[0]}[{item}].{dotted.rsplit('.', 1)[1]}"
        self.found.append((line or 0, f"{self.where}:{line or '?'}: '{name}' {message}"))

    def written(self, dotted: str) -> bool:
        """Whether the file sets this key itself (else it has its default)."""
        return _line_of(self.text, dotted, exact=True) is not None

    def raise_if_any(self) -> None:
        if self.found:
            raise ConfigError("\n".join(message for _, message in sorted(self.found, key=lambda f: f[0])))


@dataclass(frozen=True)
class _Range:
    low: float
    high: float
    what: str
    low_open: bool = False  # `low` itself is refused (a duration of 0 s means nothing)

    def problem(self, value: float) -> str | None:
        if value < self.low or (self.low_open and value == self.low) or value > self.high:
            if self.low_open:
                return f"must be {self.what} above {self.low:g} and at most {self.high:g}, not {value:g}"
            return f"must be {self.what} from {self.low:g} to {self.high:g}, not {value:g}"
        return None


_PORT = _Range(1, 65535, "a TCP port")  # 0 ("any free port") is no use: a peer must know it
_HOUR, _DAY, _YEAR = 3600.0, 86400.0, 365 * 86400.0
_NETWORK_TIMEOUT = _Range(0, 600, "a number of seconds", low_open=True)  # longer only hides a dead peer
_RANGES: dict[str, _Range] = {
    "reading_center.port": _PORT,
    "reading_center.listen_port": _PORT,
    "lan_receiver.port": _PORT,
    "gps.gpsd_port": _PORT,
    "reading_center.associations": _Range(1, 16, "a count of associations"),  # each is a thread and a socket
    "reading_center.max_associations": _Range(1, 16, "a count of associations"),
    "reading_center.batch_size": _Range(1, 10_000, "a count of C-STOREs"),
    "reading_center.timeout_s": _NETWORK_TIMEOUT,
    "reading_center.commitment_timeout_s": _Range(0, 7 * _DAY, "a number of seconds", low_open=True),
    "reading_center.stat_cut_after_s": _Range(0, _HOUR, "a number of seconds"),
    "outbox.retention_days": _Range(0, 3650, "a number of days"),
    "outbox.min_free_mb": _Range(0, 2**40, "a number of megabytes"),
    "outbox.backoff_base_s": _Range(0, _DAY, "a number of seconds", low_open=True),
    "outbox.backoff_max_s": _Range(0, 7 * _DAY, "a number of seconds", low_open=True),
    "outbox.config_fault_retry_s": _Range(0, _DAY, "a number of seconds", low_open=True),
    "patient.idle_timeout_s": _Range(0, 7 * _DAY, "a number of seconds", low_open=True),
    "patient.unassigned_ecg_hold_s": _Range(0, _DAY, "a number of seconds"),  # 0: never held
    "ecg.re_record_hold_s": _Range(0, _DAY, "a number of seconds"),  # 0: never held for quality
    # 0: a STAT ECG is never held for its name; more than an hour is no urgent read
    "ecg.stat_name_hold_s": _Range(0, _HOUR, "a number of seconds"),
    "ble.scan_interval_s": _Range(0, _HOUR, "a number of seconds", low_open=True),
    "ble.connect_attempts": _Range(1, 100, "a count of attempts"),
    "ble.continuous_store_interval_s": _Range(0, _DAY, "a number of seconds", low_open=True),
    "ble.battery_poll_s": _Range(0, _DAY, "a number of seconds", low_open=True),
    "ble.battery_refresh_s": _Range(0, 7 * _DAY, "a number of seconds", low_open=True),
    "gps.nmea_baud": _Range(300, 4_000_000, "a baud rate"),
    "visits.radius_m": _Range(0, 100_000, "a number of metres", low_open=True),
    "visits.track_max_points": _Range(1, 1_000_000, "a count of points"),
    "visits.max_eph_m": _Range(0, 100_000, "a number of metres", low_open=True),
    "visits.stale_fix_s": _Range(0, _DAY, "a number of seconds", low_open=True),
    "visits.max_speed_mps": _Range(0, 1000, "a speed in metres per second", low_open=True),
    "visits.time_disagreement_s": _Range(0, _YEAR, "a number of seconds", low_open=True),
    "visits.fix_wait_s": _Range(0, 600, "a number of seconds"),
    "fhir.timeout_s": _NETWORK_TIMEOUT,
    "fhir.batch_size": _Range(1, 1000, "a count of bundles"),
    # 0 would quarantine every item before its first send
    "outbox.max_interrupted_sends": _Range(1, 1000, "a count of interrupted sends"),
    # below 1 MB not even one ECG fits; above 1 GB one object outgrows a Pi's memory
    "lan_receiver.max_object_mb": _Range(1, 1024, "a number of megabytes"),
    "reports.window_days": _Range(0, 3650, "a number of days", low_open=True),
    "reports.stat_poll_s": _Range(0, _DAY, "a number of seconds", low_open=True),
    "reports.stat_hurry_h": _Range(0, 7 * 24, "a number of hours"),
    "reports.amendment_poll_h": _Range(0, 24 * 365, "a number of hours"),  # 0: stop
    "reports.batch_size": _Range(1, 1000, "a count of studies"),
    "reports.keep_association_s": _Range(0, 3600, "a number of seconds"),
    "reports.move_port": _PORT,
    "reports.retention_days": _Range(0, 3650, "a number of days"),
    "reports.backoff_base_s": _Range(0, _DAY, "a number of seconds", low_open=True),
    "reports.backoff_max_s": _Range(0, 7 * _DAY, "a number of seconds", low_open=True),
    "console.session_idle_s": _Range(0, 30 * _DAY, "a number of seconds", low_open=True),
    "console.max_login_failures": _Range(1, 1000, "a count of failed logins"),
    "console.lockout_s": _Range(0, 30 * _DAY, "a number of seconds", low_open=True),
    "update.poll_interval_h": _Range(0, 24 * 30, "a number of hours", low_open=True),
    "update.timeout_s": _NETWORK_TIMEOUT,
    "update.idle_before_reboot_s": _Range(0, _DAY, "a number of seconds"),
}

STATION_NAME_BYTES = 16  # DICOM SH, as dciodvfy counts it: bytes of the encoded value
INSTITUTION_BYTES = 64  # DICOM LO
GATEWAY_ID_BYTES = 64  # LO too: the full id goes in the DICOM Contributing Equipment's serial


@dataclass(frozen=True, slots=True)
class Listen:
    """A HOST:PORT a service of ours listens on (`console.listen`, `metrics.listen`)."""

    host: str
    port: int

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    def url(self, path: str = "") -> str:
        """Where a client on this machine reaches it (0.0.0.0 / :: are reached on loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}{path}" if ":" in host else f"http://{host}:{self.port}{path}"


def host_port(text: str) -> tuple[str, int] | None:
    """ "HOST:PORT" (IPv6 in brackets, "[::1]:9560") as host and port 1-65535; None if malformed."""
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or any(c.isspace() for c in host):
        return None
    return host, int(port)


def metrics_listen(config: Config) -> Listen:
    """`metrics.listen` as host and port (the configuration already refused a malformed one). Here,
    not in lastmile.services.metrics: `lastmile doctor` and the console's System page say where
    the endpoint is without importing prometheus_client (~5 MB of the console's RSS)."""
    parsed = host_port(config.metrics.listen)
    if parsed is None:
        raise ConfigError(f'{config.source}: metrics.listen = {config.metrics.listen!r}: write it as "HOST:PORT"')
    return Listen(*parsed)


def ae_title_problem(value: str) -> str | None:
    """Why `value` is not a DICOM AE title (PS3.5 6.2: ≤ 16 characters of the default
    repertoire, no backslash or control characters, not only spaces), or None."""
    if not value.strip(" "):
        return "must not be empty or only spaces"
    if len(value) > 16:
        return f"has {len(value)} characters: an AE title has at most 16"
    odd = next((ch for ch in value if not " " <= ch <= "~" or ch == "\\"), None)
    if odd is not None:
        return (
            f"contains {odd!r}: an AE title is ASCII letters, digits, spaces and punctuation "
            "(no backslash, no other alphabet), e.g. CLINIC01"
        )
    if value != value.strip(" "):
        return "has spaces at its start or end, which DICOM ignores: remove them"
    return None


def _text_problem(value: str, max_bytes: int, what: str) -> str | None:
    """A DICOM string value (SH/LO) that must go in whole: never cut, never altered."""
    if not value.strip():
        return "must not be empty"
    if value != value.strip():
        return "has spaces at its start or end: remove them"
    if "\\" in value or any(not ch.isprintable() for ch in value):
        return "must not contain a backslash or control characters (DICOM separates values with backslashes)"
    size = len(value.encode("utf-8"))
    if size > max_bytes:
        return f"is {size} bytes in UTF-8; {what} holds {max_bytes}"
    return None


def _uid_problem(value: str) -> str | None:
    if len(value) > 64 or not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", value):
        return "is not a DICOM UID (digits and dots, at most 64 characters, e.g. 1.2.840.10008.5.1.4.1.1.9.1.1)"
    return None


def network_problem(text: str) -> str | None:
    """Why `text` is not a usable CIDR network (e.g. 10.8.0.0/24) to trust reports from, or None."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return "is not a network in CIDR form, e.g. 10.8.0.0/24 or 192.168.1.20/32"
    if net.prefixlen == 0:
        return "is every address: anyone could send storage-commitment reports; name the reading center's network"
    try:
        ipaddress.ip_network(text.strip())
    except ValueError:  # 10.8.0.5/24: a host or its network? say both rather than guess
        host = text.strip().split("/")[0]
        return f"has host bits set: write {net} for the network, or {host}/{net.max_prefixlen} for one host"
    return None


def bind_address_problem(text: str) -> str | None:
    """Why `text` is not an address this gateway can listen on (an IP literal), or None."""
    if text == "localhost":
        return None
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return "must be an IP address of this gateway, e.g. 192.168.1.10 (or 0.0.0.0 for every interface)"
    return None


def _identifier_system_problem(value: str) -> str | None:
    if not re.fullmatch(r"(urn:[A-Za-z0-9][A-Za-z0-9-]*:\S+|https?://\S+)", value):
        return "must be a URI (urn:... or http(s)://...), e.g. urn:oid:2.16.156.10011.1.1 or https://county.example/ids"
    return None


def _regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"is not a valid regular expression: {exc}"
    return None


SERIAL_DEVICE_KEYS = ("name", "match", "profile", "baudrate", "forward_profile")
SERIAL_HANDLERS = ("bridge", "scanner")  # profiles built into the acquire service


def serial_device_problems(devices: list[dict], profiles: typing.Collection[str]) -> list[tuple[int, str, str]]:
    """(index, key, what is wrong) for each mistake in `serial.devices`, given the names of the
    ASCII-report profiles available."""
    from firmware_bridge.serial_link import PortMatch  # pyserial: only when devices are listed

    found: list[tuple[int, str, str]] = []
    names: set[str] = set()
    for i, entry in enumerate(devices):
        unknown = sorted(set(entry) - set(SERIAL_DEVICE_KEYS))
        if unknown:
            found.append(
                (i, unknown[0], f"unknown key(s) {', '.join(unknown)} (known: {', '.join(SERIAL_DEVICE_KEYS)})")
            )
        name, match, profile = entry.get("name"), entry.get("match"), entry.get("profile")
        for key, value in (("name", name), ("match", match), ("profile", profile)):
            if not isinstance(value, str) or not value:
                found.append((i, key, "is required: name, match and profile are required strings"))
        if isinstance(name, str) and name:
            if name in names:
                found.append((i, "name", f"device name {name!r} used twice"))
            names.add(name)
        if isinstance(match, str) and match:
            try:
                PortMatch.parse(match)
            except ValueError as exc:
                found.append((i, "match", str(exc)))
        if isinstance(profile, str) and profile and profile not in SERIAL_HANDLERS and profile not in profiles:
            known = ", ".join(sorted(profiles)) or "no ASCII profiles"
            found.append((i, "profile", f"unknown profile {profile!r} (bridge, scanner or one of {known})"))
        forward = entry.get("forward_profile", "")
        if forward and (profile != SERIAL_HANDLERS[0] or forward not in profiles):
            found.append((i, "forward_profile", "forward_profile needs profile = 'bridge' and a known ASCII profile"))
        baud = entry.get("baudrate")
        if baud is not None and (not isinstance(baud, int) or isinstance(baud, bool) or baud <= 0):
            found.append((i, "baudrate", "baudrate must be a positive whole number"))
    return found


def _check_metered(dotted: str, metered: MeteredSection, problems: _Problems) -> None:
    from uploader.metering import SendWindow

    problem = _Range(0, 2**30, "a number of megabytes").problem(metered.daily_budget_mb)
    if problem:
        problems.add(f"{dotted}.daily_budget_mb", problem)
    for text in metered.windows:
        try:
            SendWindow.parse(text)
        except ValueError as exc:
            problems.add(f"{dotted}.windows", f'entry {exc}: write local times like "22:00-06:00"')


def check_meaning(config: Config, problems: _Problems) -> None:
    """Every value checked for what it is used for; each mistake added to `problems`."""
    for dotted, allowed in _RANGES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        problem = allowed.problem(value)
        if problem:
            problems.add(dotted, problem)

    g = config.gateway
    problem = _text_problem(g.id, GATEWAY_ID_BYTES, "the DICOM serial number it goes in")
    if problem:
        problems.add("gateway.id", problem)
    elif not g.station_name:
        problem = _text_problem(g.id, STATION_NAME_BYTES, "DICOM StationName")
        if problem:
            problems.add(
                "gateway.id",
                f"does not fit DICOM StationName: it {problem}; set gateway.station_name to a short name "
                f"(at most {STATION_NAME_BYTES} bytes: 16 letters or digits, or 5 Chinese characters) — "
                "the full id is kept everywhere else",
            )
    if g.station_name:
        problem = _text_problem(g.station_name, STATION_NAME_BYTES, "DICOM StationName")
        if problem:
            problems.add("gateway.station_name", problem)
    if g.institution:
        problem = _text_problem(g.institution, INSTITUTION_BYTES, "DICOM InstitutionName")
        if problem:
            problems.add("gateway.institution", problem)
    if not g.data_dir.strip() or not os.path.isabs(g.data_dir):
        problems.add("gateway.data_dir", "must be an absolute path, e.g. /var/lib/lastmile")

    rc = config.reading_center
    for key in ("called_ae", "calling_ae"):
        problem = ae_title_problem(getattr(rc, key))
        if problem:
            problems.add(f"reading_center.{key}", problem)
    if not rc.host.strip():
        problems.add("reading_center.host", "must name the reading center's PACS (host name or address)")
    for net in rc.report_networks:
        problem = network_problem(net)
        if problem:
            problems.add("reading_center.report_networks", f"entry {net!r} {problem}")
    if rc.max_associations < rc.associations and problems.written("reading_center.max_associations"):
        problems.add(
            "reading_center.max_associations",
            f"({rc.max_associations}) is below reading_center.associations ({rc.associations}): "
            "it is the most associations a long round trip may add to those",
        )
    problem = bind_address_problem(rc.listen_host) if rc.listen_host else None
    if problem:
        problems.add("reading_center.listen_host", problem)
    tls = rc.tls
    if tls.enabled and not tls.ca_file:
        problems.add(
            "reading_center.tls.enabled",
            "is true but reading_center.tls.ca_file is empty: name the CA that signed the reading center's certificate",
        )
    if bool(tls.cert_file) != bool(tls.key_file):
        problems.add(
            "reading_center.tls.cert_file" if tls.cert_file else "reading_center.tls.key_file",
            "goes with its pair: set both cert_file and key_file, or neither",
        )

    for dotted, metered in (
        ("reading_center.metered", rc.metered),
        ("fhir.metered", config.fhir.metered),
        ("reports.metered", config.reports.metered),
        ("update.metered", config.update.metered),
    ):
        _check_metered(dotted, metered, problems)

    lan = config.lan_receiver
    problem = ae_title_problem(lan.ae_title)
    if problem:
        problems.add("lan_receiver.ae_title", problem)
    problem = bind_address_problem(lan.host)
    if problem:
        problems.add("lan_receiver.host", problem)
    for caller in lan.allowed_callers:
        problem = ae_title_problem(caller)
        if problem:
            problems.add("lan_receiver.allowed_callers", f"entry {caller!r} {problem}")
    for uid in lan.sop_classes:
        problem = _uid_problem(uid)
        if problem:
            problems.add("lan_receiver.sop_classes", f"entry {uid!r} {problem}")
    if lan.enabled and not lan.allowed_callers:
        problems.add(
            "lan_receiver.enabled",
            "is true but lan_receiver.allowed_callers is empty: list the AE titles of the carts allowed to send",
        )
    if lan.enabled and rc.storage_commitment and lan.port == rc.listen_port:
        problems.add(
            "lan_receiver.port" if problems.written("lan_receiver.port") else "reading_center.listen_port",
            f"({lan.port}) is the port of both the LAN receiver and the storage-commitment listener: "
            "two listeners cannot share a port",
        )

    for folder in config.usb_import.folders:
        if not os.path.isabs(folder):
            problems.add("usb_import.folders", f"entry {folder!r} must be an absolute path (a mount point)")

    serial = config.serial
    for key in ("patient_card_pattern", "doctor_badge_pattern"):
        pattern = getattr(serial, key)
        problem = _regex_problem(pattern) if pattern else None
        if problem:
            problems.add(f"serial.{key}", problem)
    if serial.devices:
        from firmware_bridge.profiles import profile_files

        profiles = profile_files(serial.profiles_dir or None)
        for i, key, message in serial_device_problems(serial.devices, profiles):
            problems.add(f"serial.devices.{key}", message, item=i)

    if config.gps.source == "nmea" and not config.gps.nmea_port:
        problems.add("gps.source", 'is "nmea" but gps.nmea_port is empty: name the receiver\'s serial port')
    if config.gps.source == "gpsd" and not config.gps.gpsd_host.strip():
        problems.add("gps.gpsd_host", 'must name gpsd\'s address (e.g. "127.0.0.1") when gps.source is "gpsd"')
    if serial.profiles_dir and not os.path.isabs(serial.profiles_dir):
        problems.add("serial.profiles_dir", "must be an absolute path, e.g. /etc/lastmile/profiles")

    _check_reports(config, problems)
    _check_console(config, problems)
    for key in ("patient_id_system", "practitioner_id_system"):
        problem = _identifier_system_problem(getattr(config.fhir, key))
        if problem:
            problems.add(f"fhir.{key}", problem)

    if host_port(config.metrics.listen) is None:
        problems.add(
            "metrics.listen",
            'must be "HOST:PORT" with a port from 1 to 65535, e.g. "127.0.0.1:9560" or the VPN address "10.8.0.12:9560"',
        )

    o = config.outbox
    if o.backoff_max_s < o.backoff_base_s:
        problems.add("outbox.backoff_max_s", f"({o.backoff_max_s:g}) must not be less than outbox.backoff_base_s")

    if config.fhir.base_url:
        from uploader.reachability import insecure_url_problem

        problem = insecure_url_problem(config.fhir.base_url)
        if problem:
            problems.add("fhir.base_url", problem)
    _check_update(config, problems)


def _check_update(config: Config, problems: _Problems) -> None:
    u = config.update
    if u.url:
        import urllib.parse

        parts = urllib.parse.urlsplit(u.url)
        if parts.scheme != "https" or not parts.hostname:
            # plain http would let anyone on the link point the gateway at an older signed bundle
            problems.add("update.url", f"{u.url!r} is not an https:// URL: the update index must come over TLS")
    if u.reboot_window:
        from uploader.metering import SendWindow

        try:
            SendWindow.parse(u.reboot_window)
        except ValueError as exc:
            problems.add("update.reboot_window", f'{exc}: write local times like "02:00-05:00"')
    if u.enabled and not u.url and not (u.usb_bundles and config.usb_import.folders):
        problems.add(
            "update.enabled",
            "is true but there is nowhere to get updates from: set update.url (the county's index) "
            "or usb_import.folders with update.usb_bundles",
        )
    for key in ("rauc_conf", "keyring", "ca_file"):
        value = getattr(u, key)
        if value and not os.path.isabs(value):
            problems.add(f"update.{key}", f"must be an absolute path, not {value!r}")


def _check_reports(config: Config, problems: _Problems) -> None:
    r = config.reports
    rc, lan = config.reading_center, config.lan_receiver
    if r.move_ae:
        problem = ae_title_problem(r.move_ae)
        if problem:
            problems.add("reports.move_ae", problem)
    if r.move_host:
        problem = bind_address_problem(r.move_host)
        if problem:
            problems.add("reports.move_host", problem)
    if r.move_ae.strip() and r.move_ae.strip() != rc.calling_ae.strip():
        # a separate AE needs a listener of its own: not on a port another listener holds
        move_port = r.move_port
        taken = {rc.listen_port: "the storage-commitment listener"} if rc.storage_commitment else {}
        if lan.enabled:
            taken[lan.port] = "the LAN receiver"
        if move_port in taken:
            problems.add(
                "reports.move_port" if problems.written("reports.move_port") else "reports.move_ae",
                f"is set and reports.move_port ({move_port}) is also the port of {taken[move_port]}: "
                "two listeners cannot share a port (leave reports.move_ae empty: the PACS then moves reports to "
                "the gateway's own AE, reading_center.calling_ae, on that listener)",
            )
    if 0 < r.keep_association_s < r.stat_poll_s:
        # said at the key the file sets (both, or neither: at keep_association_s)
        consequence = (
            "the association would never be kept between a STAT study's rounds; make keep_association_s a few "
            "seconds longer than stat_poll_s and below the PACS's idle timeout, or 0 for a new association each round"
        )
        if problems.written("reports.stat_poll_s") and not problems.written("reports.keep_association_s"):
            problems.add(
                "reports.stat_poll_s",
                f"({r.stat_poll_s:g} s) is longer than reports.keep_association_s ({r.keep_association_s:g} s): "
                + consequence,
            )
        else:
            problems.add(
                "reports.keep_association_s",
                f"({r.keep_association_s:g} s) is shorter than reports.stat_poll_s ({r.stat_poll_s:g} s): "
                + consequence,
            )
    for code in r.critical_codes:
        scheme, sep, value = code.partition(":")
        if not sep or not scheme.strip() or not value.strip():
            problems.add("reports.critical_codes", f"entry {code!r} is not SCHEME:CODE (e.g. SCT:401303003)")
    if r.critical_command and not os.path.isabs(r.critical_command[0]):
        problems.add(
            "reports.critical_command",
            f"starts with {r.critical_command[0]!r}: name the program by its absolute path, e.g. /usr/bin/aplay",
        )
    if r.backoff_max_s < r.backoff_base_s:
        problems.add("reports.backoff_max_s", f"({r.backoff_max_s:g}) must not be less than reports.backoff_base_s")


def _check_console(config: Config, problems: _Problems) -> None:
    c = config.console
    listen = host_port(c.listen)
    if listen is None:
        problems.add("console.listen", 'must be "HOST:PORT" with a port from 1 to 65535, e.g. "0.0.0.0:8443"')
        return
    problem = bind_address_problem(listen[0])
    if problem:
        problems.add("console.listen", f"host {listen[0]!r} {problem}")
    elif not c.https and listen[0] != "localhost" and not ipaddress.ip_address(listen[0]).is_loopback:
        problems.add(
            "console.https" if problems.written("console.https") else "console.listen",
            f"is false with console.listen on {listen[0]}: plain HTTP is allowed on loopback only (127.0.0.1); "
            "set https = true for the clinic LAN",
        )


def check_files(config: Config, text: str) -> None:
    """What `lastmile config check` adds to parsing: the files the settings name exist and are
    readable (the services find out only when they use them). ConfigError lists every miss."""
    problems = _Problems(text, config.source)
    named = [
        ("reading_center.tls.ca_file", config.reading_center.tls.ca_file if config.reading_center.tls.enabled else ""),
        (
            "reading_center.tls.cert_file",
            config.reading_center.tls.cert_file if config.reading_center.tls.enabled else "",
        ),
        (
            "reading_center.tls.key_file",
            config.reading_center.tls.key_file if config.reading_center.tls.enabled else "",
        ),
        ("fhir.ca_file", config.fhir.ca_file),
        ("update.ca_file", config.update.ca_file),
        ("update.keyring", config.update.keyring),
        ("update.rauc_conf", config.update.rauc_conf if config.update.enabled else ""),
        ("fhir.token_file", config.fhir.token_file),
        ("visits.household_register", config.visits.household_register),
    ]
    for dotted, path in named:
        if path and not os.path.isfile(path):
            problems.add(dotted, f"names {path}, which is not a file this user can see")
        elif path and not os.access(path, os.R_OK):
            problems.add(dotted, f"names {path}, which this user cannot read")
    if config.serial.profiles_dir and not os.path.isdir(config.serial.profiles_dir):
        problems.add("serial.profiles_dir", f"names {config.serial.profiles_dir}, which is not a directory")
    elif config.serial.enabled and config.serial.devices:  # when the acquire service loads them
        _check_serial_profiles(config, problems)
    problems.raise_if_any()


# A profile's mistake as devices.ascii_report words it: the key first ("field[2].pattern is not ...",
# "profile: unknown key(s) baudrat ..."), else no key ("a profile needs at least one [[field]]").
_PROFILE_KEY = re.compile(
    r"^(?P<key>(?:profile|framing|time|record|field)(?:\[(?P<item>\d+)\])?(?:\.[\w-]+)*):?\s+(?P<rest>.*)$", re.S
)
_UNKNOWN_KEY = re.compile(r"^unknown key\(s\) ([\w-]+)")
_TOML_LINE = re.compile(r"\(at line (\d+)")


def load_serial_profile(path: Path, name: str) -> ReportProfile:
    """One ASCII-report profile file as the acquire service loads it, and `lastmile config check`
    checks it: ConfigError "FILE:LINE: 'key' what is wrong" for anything the service refuses."""
    from devices.ascii_report import ProfileError, load_profile

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read profile: {exc}") from None
    try:
        profile = load_profile(text)
    except ProfileError as exc:
        raise ConfigError(_profile_problem(path, text, str(exc))) from None
    if profile.name != name:
        line = _line_of(text, "profile.name")
        raise ConfigError(
            f"{path}:{line or '?'}: 'profile.name' is {profile.name!r}; it must match the file name {name!r}"
        )
    return profile


def load_profiles_apart(config: Config) -> tuple[dict[str, ReportProfile], dict[str, str]]:
    """The ASCII-report profiles that load, and for each one that does not, what is wrong with it
    ("FILE:LINE: 'key' ..."): the acquire service leaves only the devices naming a bad one, and
    `lastmile config check` says so, earlier."""
    from firmware_bridge.profiles import profile_files

    profiles: dict[str, ReportProfile] = {}
    bad: dict[str, str] = {}
    for name, path in profile_files(config.serial.profiles_dir or None).items():
        try:
            profiles[name] = load_serial_profile(path, name)
        except ConfigError as exc:
            bad[name] = str(exc)
    return profiles, bad


def devices_naming(devices: typing.Sequence[object], names: typing.Collection[str]) -> list[tuple[int, str, str]]:
    """(index, key, profile name) of each `profile` / `forward_profile` of `[[serial.devices]]`
    that names one of `names`, in order (entries not yet checked are skipped, not trusted)."""
    return [
        (i, key, entry[key])
        for i, entry in enumerate(devices)
        if isinstance(entry, dict)
        for key in ("profile", "forward_profile")
        if isinstance(entry.get(key), str) and entry[key] in names
    ]


def _profile_problem(path: Path, text: str, message: str) -> str:
    """`message` (a ProfileError's) with the file and the line of the key it names."""
    m = _PROFILE_KEY.match(message)
    if m is None:
        toml = _TOML_LINE.search(message)  # tomllib says where the file stopped being TOML
        return f"{path}:{toml.group(1) if toml else '?'}: {message}"
    key, rest = m.group("key"), m.group("rest")
    item = None if m.group("item") is None else int(m.group("item"))
    parts = re.sub(r"\[\d+\]", "", key).split(".")
    unknown = _UNKNOWN_KEY.match(rest)
    if unknown:
        parts.append(unknown.group(1))
    if len(parts) == 1 and item is not None:
        parts.append("\0")  # no such key: the line of the item-th [[field]] header
    line = _line_of(text, ".".join(parts[:2]), item)
    return f"{path}:{line or '?'}: '{key}' {rest}"


def _check_serial_profiles(config: Config, problems: _Problems) -> None:
    """The acquire service loads every profile (built-in and serial.profiles_dir) when serial
    devices are configured, and does not start a device that names a bad one (the others run):
    say so here, where it is fixed, with the device that names it."""
    _profiles, bad = load_profiles_apart(config)
    named = set()
    for i, key, name in devices_naming(config.serial.devices, bad):
        named.add(name)
        problems.add(
            f"serial.devices.{key}",
            f"names profile {name!r}: the acquire service refuses it and does not start this device: {bad[name]}",
            item=i,
        )
    for name, message in bad.items():
        if name not in named:
            problems.add("serial.profiles_dir", f"holds profile {name!r}, which no device can use: {message}")


def check_config_file(path: str | os.PathLike[str] | None = None) -> Config:
    """`lastmile config check`: parse (every meaning check), then the files named exist."""
    config = load_config(path)
    if config.source != "<defaults>":
        check_files(config, config_text(Path(config.source)))
    else:
        check_files(config, "")
    return config


def parse_config(text: str, where: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    config = _build(Config, data, "", text, where)
    assert isinstance(config, Config)
    config.source = where
    problems = _Problems(text, where)
    check_meaning(config, problems)
    problems.raise_if_any()
    return config


def config_file(path: str | os.PathLike[str] | None = None) -> tuple[Path, bool]:
    """The configuration file read: `path`, else $LASTMILE_CONFIG, else the default; and whether
    it was named (a named file must exist)."""
    explicit = path is not None or "LASTMILE_CONFIG" in os.environ
    return Path(path if path is not None else os.environ.get("LASTMILE_CONFIG", DEFAULT_CONFIG_PATH)), explicit


def salvage_console_config(path: str | os.PathLike[str] | None = None) -> Config:
    """What the console needs to say that the configuration is refused (lastmile.console.refused):
    `console.listen`, `console.https`, `console.language` and `gateway.data_dir` (its certificate)
    from the refused file, each where it is itself valid; the defaults for the rest, and for all of
    them when the file is not even TOML. Plain HTTP stays loopback-only."""
    config = Config()
    p, _ = config_file(path)
    config.source = str(p)
    try:
        data = tomllib.loads(config_text(p))
    except (OSError, ConfigError, tomllib.TOMLDecodeError):
        return config

    def value(section: str, key: str, kind: type) -> typing.Any:
        table = data.get(section)
        found = table.get(key) if isinstance(table, dict) else None
        return found if isinstance(found, kind) else None

    data_dir = value("gateway", "data_dir", str)
    if data_dir and os.path.isabs(data_dir):
        config.gateway.data_dir = data_dir
    language = value("console", "language", str)
    if language in _CHOICES[("console", "language")]:
        config.console.language = language
    listen, https = value("console", "listen", str), value("console", "https", bool)
    console = ConsoleSection(
        listen=listen if listen is not None else config.console.listen,
        https=https if https is not None else config.console.https,
        language=config.console.language,
    )
    trial = Config(console=console)
    problems = _Problems("", config.source)
    _check_console(trial, problems)
    if not problems.found:
        config.console = console
    return config


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the configuration; with no path, $LASTMILE_CONFIG or /etc/lastmile/lastmile.toml.

    A missing default file gives the defaults (a fresh image); a missing named file is an error.
    """
    p, explicit = config_file(path)
    try:
        text = config_text(p)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{p}: no such configuration file") from None
        return Config()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from None
    return parse_config(text, str(p))


def config_text(path: Path) -> str:
    """The file's text: UTF-8, with or without the byte-order mark Windows Notepad writes (the
    clinic edits the file on the SD card's boot partition). A file saved as "ANSI" (GBK on a
    Chinese Windows) is refused at the line of its first such byte, saying how to save it."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}:{line}: is not UTF-8 text (saved as ANSI/GBK?): save the file as UTF-8 "
            "(Notepad: Save As, Encoding UTF-8)"
        ) from None


def render_defaults() -> str:
    """The documented default configuration, as TOML (`lastmile config --defaults`)."""
    import inspect
    import io
    import tokenize

    out: list[str] = ["# Lastmile configuration: every key, its default and what it means.", ""]

    def comments(cls: type) -> dict[str, str]:
        """Each field's `# comment`, wherever the formatter put it (same line or inside the
        parenthesised default that a long comment wraps into)."""
        source = inspect.getsource(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        found: dict[str, str] = {}
        current = None
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in fields:
                current = tok.string  # a field declaration at class-body indent
            elif tok.type == tokenize.COMMENT and current is not None and current not in found:
                found[current] = tok.string.lstrip("#").strip()
        return found

    def emit(cls: type, name: str) -> None:
        obj = cls()
        notes = comments(cls)
        out.append(f"[{name}]")
        nested = []
        for f in dataclasses.fields(cls):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                nested.append((type(v), f"{name}.{f.name}"))
                continue
            note = f"  # {notes[f.name]}" if f.name in notes else ""
            out.append(f"{f.name} = {_toml_value(v)}{note}")
        out.append("")
        for cls2, name2 in nested:
            emit(cls2, name2)

    for f in dataclasses.fields(Config):
        if f.name != "source":
            emit(typing.get_type_hints(Config)[f.name], f.name)
    return "\n".join(out)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def fhir_naming(config: Config) -> FhirNaming:
    """The identifier systems of the FHIR resources this gateway makes (visits, readings)."""
    from uploader.fhir_bundle import FhirNaming

    return FhirNaming(
        gateway_id=config.gateway.id,
        patient_system=config.fhir.patient_id_system,
        practitioner_system=config.fhir.practitioner_id_system,
    )
