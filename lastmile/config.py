"""The gateway's one TOML configuration file.

Every key is declared here with its type and default (the documentation of each key is the
comment next to it, rendered by `lastmile config --defaults`). Unknown keys and wrong types are
refused with the file, line and reason, so a county technician sees exactly what to fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONFIG_PATH = Path("/etc/lastmile/lastmile.toml")


class ConfigError(Exception):
    """The configuration file cannot be used; the message says where and why."""


@dataclass
class GatewaySection:
    id: str = "lastmile-gateway"  # station name of this gateway (DICOM StationName, FHIR source)
    institution: str = ""  # clinic name (DICOM InstitutionName)
    data_dir: str = "/var/lib/lastmile"  # outbox database and payloads; on the data partition
    log_patient_data: bool = False  # debug only: allow patient names/IDs in logs


@dataclass
class TlsSection:
    enabled: bool = False
    ca_file: str = ""  # CA that signed the reading center's certificate
    cert_file: str = ""  # this gateway's client certificate (PEM)
    key_file: str = ""  # its private key (PEM)


@dataclass
class ReadingCenterSection:
    host: str = "127.0.0.1"
    port: int = 104
    called_ae: str = "READING_CENTER"  # the PACS's AE title
    calling_ae: str = "LASTMILE"  # this gateway's AE title
    listen_port: int = 11113  # where the PACS sends storage-commitment reports
    listen_host: str = ""  # address for those reports; "": ours toward the reading center (loopback if it is)
    report_networks: list[str] = field(default_factory=list)  # CIDR networks besides `host` that may send reports
    associations: int = 2  # parallel associations while sending
    batch_size: int = 50  # C-STOREs per association before it is released
    deflate: bool = True  # propose Deflated Explicit VR Little Endian first
    timeout_s: float = 30.0  # ACSE/DIMSE/network timeouts
    storage_commitment: bool = True  # ask the PACS to confirm it keeps what we sent
    commitment_timeout_s: float = 120.0  # no report by then: ask again with a new transaction
    no_commitment_policy: str = "keep"  # peer without commitment: "keep" local copies or "purge"
    tls: TlsSection = field(default_factory=TlsSection)


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


@dataclass
class LanReceiverSection:
    enabled: bool = False  # accept DICOM from carts on the clinic LAN
    host: str = "0.0.0.0"  # address to listen on: the clinic LAN interface's, or 0.0.0.0 for all
    port: int = 11112
    ae_title: str = "LASTMILE"
    allowed_callers: list[str] = field(default_factory=list)  # calling AE titles allowed to store
    sop_classes: list[str] = field(default_factory=list)  # storage SOP class UIDs; empty = ECG classes
    max_object_mb: int = 16  # larger objects (as sent, or once inflated) are refused (0xA700)


@dataclass
class UsbImportSection:
    folders: list[str] = field(default_factory=list)  # watched folders (mount points of sticks/carts)


@dataclass
class BleSection:
    enabled: bool = True
    scan_interval_s: float = 10.0  # scan pass length; the allow-list is re-read after each pass
    connect_attempts: int = 4
    continuous_store_interval_s: float = 10.0  # continuous SpO2 streams: one observation per interval


@dataclass
class SerialSection:
    enabled: bool = True
    profiles_dir: str = ""  # extra ASCII-report profiles (TOML); built-in ones always available
    devices: list[dict] = field(default_factory=list)  # [{name, match = "VID:PID[:SERIAL]" or a path, profile}]
    patient_card_pattern: str = ""  # regex: a scanned code that names a patient
    doctor_badge_pattern: str = ""  # regex: a scanned code that names a doctor


@dataclass
class GpsSection:
    source: str = "gpsd"  # "gpsd", "nmea" (serial port) or "none"
    gpsd_host: str = "127.0.0.1"
    gpsd_port: int = 2947
    nmea_port: str = ""
    nmea_baud: int = 9600


@dataclass
class VisitsSection:
    doctor_id: str = ""
    radius_m: float = 200.0  # a visit further than this (plus fix error) from the household is flagged
    household_register: str = ""  # CSV: household_id, latitude, longitude
    track_max_points: int = 2000
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
    timeout_s: float = 30.0
    batch_size: int = 20
    patient_id_system: str = "urn:lastmile:patient-id"  # identifier system of patient ids (county register)
    practitioner_id_system: str = "urn:lastmile:practitioner-id"  # identifier system of doctor ids
    gzip: bool = True  # compress request bodies when the platform accepts it


@dataclass
class Config:
    gateway: GatewaySection = field(default_factory=GatewaySection)
    reading_center: ReadingCenterSection = field(default_factory=ReadingCenterSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    patient: PatientSection = field(default_factory=PatientSection)
    lan_receiver: LanReceiverSection = field(default_factory=LanReceiverSection)
    usb_import: UsbImportSection = field(default_factory=UsbImportSection)
    ble: BleSection = field(default_factory=BleSection)
    serial: SerialSection = field(default_factory=SerialSection)
    gps: GpsSection = field(default_factory=GpsSection)
    visits: VisitsSection = field(default_factory=VisitsSection)
    fhir: FhirSection = field(default_factory=FhirSection)
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
}


def _line_of(text: str, dotted: str) -> int | None:
    """Best-effort line number of a key, for error messages."""
    *tables, key = dotted.split(".")
    lines = text.splitlines()
    start = 0
    if tables:
        header = re.compile(r"^\s*\[+\s*" + re.escape(".".join(tables)) + r"\s*\]+")
        start = next((i for i, ln in enumerate(lines) if header.match(ln)), 0)
    pat = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
    for i in range(start, len(lines)):
        if pat.match(lines[i]):
            return i + 1
    return start + 1 if tables else None


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
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{where}:{_line_of(text, dotted) or '?'}: '{dotted}' must not be negative")
        values[key] = float(value) if hint is float else value
    return cls(**values)


def parse_config(text: str, where: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    config = _build(Config, data, "", text, where)
    assert isinstance(config, Config)
    config.source = where
    return config


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the configuration; with no path, $LASTMILE_CONFIG or /etc/lastmile/lastmile.toml.

    A missing default file gives the defaults (a fresh image); a missing named file is an error.
    """
    explicit = path is not None or "LASTMILE_CONFIG" in os.environ
    p = Path(path if path is not None else os.environ.get("LASTMILE_CONFIG", DEFAULT_CONFIG_PATH))
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{p}: no such configuration file") from None
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from None
    return parse_config(text, str(p))


def render_defaults() -> str:
    """The documented default configuration, as TOML (`lastmile config --defaults`)."""
    import inspect

    out: list[str] = ["# Lastmile configuration: every key, its default and what it means.", ""]

    def comments(cls: type) -> dict[str, str]:
        found = {}
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s*(\w+):.*?#\s*(.+)$", line)
            if m:
                found[m.group(1)] = m.group(2)
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
