"""What `bench/fuzz.py` drives: every decoder and network-facing parser, as fuzz targets.

A target turns fuzzer bytes into one call of the real parser, at the seam where untrusted bytes
enter (a BLE notification, a USB-stick file, a C-STORE data set, a form post ...), and checks its
contract: **decode, or raise the typed error of that layer, nothing else; no impossible value
passed on**. A `Target.run` raises `Implausible` when a decoded value cannot be true (NaN, a
latitude of 200°, a zero sampling rate); any exception outside `Target.typed` is a failure.

Seeds are the real files in ../shared (ECG files, GNSS logs), the captured bytes the tests name
as constants, and a few objects built here (an .npz, bridge messages): `Target.seeds()`.
Nothing here writes a file: parsers run on bytes in memory.
"""

from __future__ import annotations

import ast
import binascii
import dataclasses
import datetime as dt
import enum
import functools
import importlib.util
import io
import math
import os
import re
import struct
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
# ../shared beside the checkout (as tests/conftest.py finds it)
SHARED = Path(os.environ.get("LASTMILE_SHARED") or os.environ.get("LASTMILE_SHARED_DIR") or REPO.parent / "shared")
NOW = dt.datetime(2025, 3, 4, 9, 0, tzinfo=dt.timezone.utc)
EARLIEST_YEAR, LATEST_YEAR = 1900, 2200  # outside: a date no device or person can have written


class Implausible(AssertionError):
    """A parser passed on a value that cannot be true."""


@dataclass(frozen=True)
class Target:
    name: str
    what: str  # the seam, in a few words
    run: Callable[[bytes], None]
    typed: tuple[type[BaseException], ...]  # what the parser may raise for bad input
    seeds: Callable[[], list[bytes]]
    max_len: int = 4096  # longest input the fuzzer makes (seeds may be longer)
    skip: str = ""  # why the target cannot run here ("" = it can)


# -- plausibility: nothing impossible is passed on --------------------------------------------


@functools.cache
def _field_names(cls: type) -> tuple[str, ...] | None:
    """A dataclass's field names (None: not a dataclass), once per class: the walk below runs
    on every decoded object, and `dataclasses.fields` per object was a tenth of a fast target's time."""
    return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else None


def check_values(value: object, where: str = "result", depth: int = 0, *, dates: bool = False) -> None:
    """Walk a decoded object: every float finite, every float array finite, and with `dates`
    every date/time in a possible year (not for raw device clocks, which the gateway's clock
    check judges later: devices/ble/clock.py). Quantities may carry None (with the reason),
    never NaN."""
    if depth > 12 or value is None or isinstance(value, (str, bytes, bool, int, enum.Enum)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Implausible(f"{where} = {value!r}")
    elif isinstance(value, (dt.datetime, dt.date)):
        if dates and not EARLIEST_YEAR <= value.year <= LATEST_YEAR:
            raise Implausible(f"{where} = {value.isoformat()}")
    elif isinstance(value, np.ndarray):
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise Implausible(f"{where}: array with NaN or infinity")
    elif isinstance(value, np.generic):
        check_values(value.item(), where, depth + 1, dates=dates)
    elif not isinstance(value, type) and (names := _field_names(type(value))) is not None:
        for name in names:
            check_values(getattr(value, name), f"{where}.{name}", depth + 1, dates=dates)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_values(v, f"{where}[{k!r}]", depth + 1, dates=dates)
    elif isinstance(value, (list, tuple, frozenset, set)):
        for i, v in enumerate(value):
            check_values(v, f"{where}[{i}]", depth + 1, dates=dates)


def check_recording(rec: object) -> None:
    """An EcgRecording as every builder downstream assumes it (checked independently)."""
    from devices.ecg.recording import EcgRecording

    if not isinstance(rec, EcgRecording):
        raise Implausible(f"decoder returned {type(rec).__name__}, not an EcgRecording")
    s = rec.samples
    if s.ndim != 2 or s.dtype.kind not in "iu" or 0 in s.shape:
        raise Implausible(f"samples {s.dtype} {s.shape}")
    if not (math.isfinite(rec.sampling_rate_hz) and rec.sampling_rate_hz > 0):
        raise Implausible(f"sampling rate {rec.sampling_rate_hz!r}")
    if not (math.isfinite(rec.uv_per_unit) and rec.uv_per_unit > 0):
        raise Implausible(f"scale {rec.uv_per_unit!r} µV per unit")
    if rec.acquired_at.tzinfo is None:
        raise Implausible("acquisition time without a zone")
    check_values(rec, "recording", dates=True)


def check_observation_like(obs: object) -> None:
    """Quantities: a finite, plausible number or None with the reason; aware times."""
    check_values(obs, type(obs).__name__, dates=hasattr(obs, "measured_at"))
    from devices.observation import Observation
    from devices.plausibility import implausibility

    for q in getattr(obs, "quantities", ()):
        if q.value is None and not q.special:
            raise Implausible(f"{q.code}: no value and no reason")
        # an Observation (what is stored and sent) holds no value outside its plausible range
        # (devices/plausibility.py): such a one is kept as "no value", flagged; a decoder's raw
        # Measurement may, it is screened when it becomes an Observation
        if isinstance(obs, Observation) and q.value is not None and implausibility(q.code, q.value, q.unit):
            raise Implausible(f"{q.code} = {q.value} {q.unit} passed on as a value")
    for name in ("measured_at", "received_at"):
        when = getattr(obs, name, None)
        if isinstance(when, dt.datetime) and when.tzinfo is None:
            raise Implausible(f"{name} without a zone")


# -- seeds ---------------------------------------------------------------------------------------


def shared_files(*patterns: str) -> list[bytes]:
    """Third-party files from ../shared (absent: no seeds from there)."""
    out = []
    for pattern in patterns:
        out += [p.read_bytes() for p in sorted(SHARED.glob(pattern)) if p.is_file()]
    return out


def _bytes_value(node: ast.expr) -> bytes | None:
    """A module constant written as b"..." (concatenated) or bytes.fromhex("...")."""
    if isinstance(node, ast.Constant) and isinstance(node.value, bytes):
        return node.value
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "fromhex"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "bytes"
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return bytes.fromhex(node.args[0].value)
    return None


def constants_in_tests(*test_files: str) -> list[bytes]:
    """Captured bytes the tests name as module constants (read from the source, not imported)."""
    out = []
    for name in test_files:
        path = TESTS / name
        if not path.exists():
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            found = _bytes_value(value) if value is not None else None
            if found:
                out.append(found)
    return out


# -- ECG files -------------------------------------------------------------------------------------


def _ecg(decode: Callable[..., object]) -> Callable[[bytes], None]:
    def run(data: bytes) -> None:
        check_recording(decode(data, received_at=NOW))

    return run


def _run_scp(data: bytes) -> None:
    from devices.ecg.scp import parse_scp

    scp = parse_scp(data, received_at=NOW)
    check_recording(scp.rhythm)
    if scp.reference_beats is not None:
        check_recording(scp.reference_beats)


def _run_aecg(data: bytes) -> None:
    from devices.ecg.aecg import read_aecg

    check_recording(read_aecg(data, received_at=NOW))


def _run_dicom_ecg(data: bytes) -> None:
    from devices.ecg.dicom_input import read_dicom_ecg

    check_recording(read_dicom_ecg(data, received_at=NOW))


def _run_contec(data: bytes) -> None:
    from devices.ecg.contec import read_contec

    check_recording(read_contec(data, received_at=NOW))


def _run_npz(data: bytes) -> None:
    from devices.ecg.npz import read_npz

    check_recording(read_npz(data))


ECG_FILE_NAMES = ("", "ecg.scp", "ecg.xml", "ecg.dcm", "0000001.ECG", "ecg.npz", "ECG.BIN")


def _run_any_ecg(data: bytes) -> None:
    """What a USB-stick import does: detect the format (bytes first, the name breaks ties)."""
    from devices.ecg.formats import decode_ecg

    name = ECG_FILE_NAMES[data[0] % len(ECG_FILE_NAMES)] if data else ""
    check_recording(decode_ecg(data[1:], name, received_at=NOW))


def _small_contec() -> list[bytes]:
    """The shared ECG90A files, and a short cut of each (header + 400 rows + footer): the fuzzer
    mutates a small file much faster than a 600 KB one."""
    out = []
    for data in shared_files("ecg/contec/*.ECG"):
        out += [data[:43] + data[43 : 43 + 400 * 16] + data[-37:], data]
    return out


def _small_dicom(annotations: int | None = None, channels: int | None = None) -> list[bytes]:
    """The shared DICOM ECG, and before it a copy cut to 0.2 s per multiplex group, keeping only
    the first `annotations` annotation items and `channels` channels per group if given. Each
    element costs pydicom time on every input: the shrunk copy is what makes a target fast (the
    file's three kinds of annotation item are all among its first 14)."""
    out = []
    for data in shared_files("ecg/dicom/*.dcm"):
        out.append(data)
        try:
            import pydicom

            ds = pydicom.dcmread(io.BytesIO(data))
            for group in ds.WaveformSequence:
                keep = max(1, int(float(group.SamplingFrequency) * 0.2))
                count = group.NumberOfWaveformChannels
                samples = np.frombuffer(group.WaveformData, dtype="<i2")[: keep * count].reshape(keep, count)
                count = min(count, channels or count)
                group.WaveformData = samples[:, :count].tobytes()
                group.NumberOfWaveformSamples = keep
                group.NumberOfWaveformChannels = count
                group.ChannelDefinitionSequence = group.ChannelDefinitionSequence[:count]
            if annotations is not None:
                ds.WaveformAnnotationSequence = ds.WaveformAnnotationSequence[:annotations]
            buffer = io.BytesIO()
            ds.save_as(buffer)
            out.insert(0, buffer.getvalue())
        except Exception:  # noqa: BLE001 — a seed we could not shrink: the whole file still seeds
            pass
    return out


def npz_seeds() -> list[bytes]:
    from devices.ecg.npz import write_npz
    from devices.ecg.recording import EcgRecording
    from devices.identity import DeviceIdentity, Patient, TimeSource

    t = np.arange(250) / 250.0
    beat = (800 * np.exp(-(((t % 0.8) - 0.2) ** 2) / 0.0004)).astype(np.int16)
    rec = EcgRecording(
        samples=np.stack([beat, beat // 2, -beat]),
        lead_names=("I", "II", "V1"),
        sampling_rate_hz=250.0,
        uv_per_unit=1.0,
        acquired_at=NOW,
        time_source=TimeSource.DEVICE_CLOCK,
        device=DeviceIdentity("Acme", "ECG-1", "SN1"),
        patient=Patient("P00001", "Test^Patient", dt.date(1960, 1, 1), "F"),
        source_format="test",
    )
    return [write_npz(rec)]


def any_ecg_seeds() -> list[bytes]:
    out = []
    for index, name in enumerate(ECG_FILE_NAMES):
        ext = name.rsplit(".", 1)[-1].lower() if name else ""
        pattern = {"scp": "ecg/scp/*.SCP", "xml": "ecg/aecg/fda_minimum*.xml", "ecg": "ecg/contec/*.ECG"}.get(ext)
        if pattern:
            out += [bytes([index]) + d for d in shared_files(pattern)[:2]]
    out += [bytes([ECG_FILE_NAMES.index("ecg.npz")]) + d for d in npz_seeds()]
    return out


# -- BLE characteristics -----------------------------------------------------------------------


@functools.cache
def _ble_uuids() -> list[int]:
    from devices.ble.registry import DECODERS

    return sorted(DECODERS)


def _run_ble(data: bytes) -> None:
    """First byte picks the characteristic (as the link knows it), the rest is its value."""
    from devices.ble.measurement import Measurement, to_observation
    from devices.ble.registry import decode, to_jsonable
    from devices.identity import DeviceIdentity, TimeSource

    if not data:
        return
    uuids = _ble_uuids()
    value = decode(uuids[data[0] % len(uuids)], data[1:])
    check_observation_like(value)
    to_jsonable(value)  # what `ble decode --json` and the logs do with it
    # ... and what the link makes of it (firmware_bridge/ble/link.py: a record without a value is skipped)
    if isinstance(value, Measurement) and value.quantities:
        check_observation_like(
            to_observation(
                value,
                device=DeviceIdentity(address="AA:BB:CC:DD:EE:FF"),
                measured_at=NOW,
                time_source=TimeSource.GATEWAY_RECEIPT,
                received_at=NOW,
                key="fuzz",
            )
        )


def ble_seeds() -> list[bytes]:
    """Each captured value behind every characteristic index (the fuzzer finds its own match)."""
    from devices.ble.registry import decode

    uuids = _ble_uuids()
    out = []
    for value in constants_in_tests("test_ble_decoders.py", "test_ble_protocol.py"):
        for i, uuid in enumerate(uuids):
            try:
                decode(uuid, value)
            except Exception:  # noqa: BLE001 — only keep the pairs that decode: good seeds
                continue
            out.append(bytes([i]) + value)
    return out


def _run_racp(data: bytes) -> None:
    """A glucose meter's record transfer: our request, then what the meter indicates."""
    from devices.ble.racp import RacpClient

    client = RacpClient()
    step = data[0] % 3 if data else 0
    (client.report_records_after, client.report_number_of_records, client.delete_all_records)[step](
        *((None,) if step == 0 else ())
    )
    rest = data[1:]
    while rest:
        n, rest = rest[0] % 24, rest[1:]
        chunk, rest = rest[:n], rest[n:]
        if chunk and chunk[0] == 0xFF:
            client.on_record(int.from_bytes(chunk[1:3], "little"))
            continue
        result = client.on_indication(chunk)
        check_values(result, "racp")
        if result.number_of_records is not None and result.number_of_records < 0:
            raise Implausible(f"number of records {result.number_of_records}")


def racp_seeds() -> list[bytes]:
    out = []
    for value in constants_in_tests("test_ble_protocol.py"):
        if len(value) < 24:
            out += [bytes([step, len(value)]) + value for step in range(3)]
    return out


# -- GNSS ------------------------------------------------------------------------------------------


def nmea_checksummed(body: bytes) -> bytes:
    """`$body*XX`: a sentence whose checksum is right, so the fuzzer reaches the field parsers."""
    body = body.replace(b"*", b"").replace(b"\r", b"").replace(b"\n", b"").replace(b"$", b"")
    check = 0
    for b in body:
        check ^= b
    return b"$" + body + b"*%02X" % check


def _check_fix(event: object) -> None:
    from devices.gps.fix import Fix

    check_values(event, type(event).__name__)
    if isinstance(event, Fix):
        if event.latitude is not None and not -90 <= event.latitude <= 90:
            raise Implausible(f"latitude {event.latitude}")
        if event.longitude is not None and not -180 <= event.longitude <= 180:
            raise Implausible(f"longitude {event.longitude}")
        if event.time is not None and event.time.tzinfo is None:
            raise Implausible("fix time without a zone")
        for name in ("satellites_used", "satellites_visible"):
            count = getattr(event, name)
            if count is not None and count < 0:
                raise Implausible(f"{name} {count}")
        if event.speed_mps is not None and event.speed_mps < 0:
            raise Implausible(f"speed {event.speed_mps}")


def _run_nmea_sentence(data: bytes) -> None:
    from devices.gps.nmea import parse_sentence

    check_values(parse_sentence(nmea_checksummed(data)), "sentence")


def _run_nmea_stream(data: bytes) -> None:
    """A receiver's byte stream in two pieces (a split sentence); with an odd first byte every
    line's checksum is corrected first (the fix assembler is reached, not just the checksum)."""
    from devices.gps.stream import NmeaStreamDecoder

    if data and data[0] & 1:
        data = b"\r\n".join(nmea_checksummed(line) if line.startswith(b"$") else line for line in data[1:].split(b"\n"))
    decoder = NmeaStreamDecoder()
    cut = len(data) // 2
    for event in decoder.receive_data(data[:cut]) + decoder.receive_data(data[cut:]) + decoder.flush():
        _check_fix(event)


def nmea_sentence_seeds() -> list[bytes]:
    out = []
    for capture in constants_in_tests("test_gps_nmea.py") + shared_files("gps/*.log"):
        for line in capture.splitlines()[:400]:
            if line.startswith(b"$") and b"*" in line:
                out.append(line[1 : line.rindex(b"*")])
    return sorted(set(out))[:600]


def nmea_stream_seeds() -> list[bytes]:
    out = [b"\x00" + c for c in constants_in_tests("test_gps_nmea.py")]
    for log in shared_files("gps/*.log"):
        out += [b"\x00" + log[:4000], b"\x01" + log[:4000]]
    return out


# -- bridge --------------------------------------------------------------------------------------


def _run_bridge_frames(data: bytes) -> None:
    """Raw serial bytes from a bridge microcontroller into the framing layer."""
    from devices.bridge.protocol import BridgeProtocol

    protocol = BridgeProtocol(window=64)
    cut = len(data) // 3
    for piece in (data[:cut], data[cut:]):
        for event in protocol.receive_data(piece):
            check_values(event, "bridge")
    protocol.data_to_send()


def messages_in(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """Fuzzer bytes as messages: type:u8 seq:u8 length:u16le payload ..."""
    while len(data) >= 4:
        msg_type, seq, length = data[0], data[1], int.from_bytes(data[2:4], "little")
        yield msg_type, seq, data[4 : 4 + length]
        data = data[4 + length :]


@functools.cache
def _plain_cobs() -> Any:
    """devices/bridge/cobs.py loaded a second time, under a name atheris does not instrument: the
    harness frames its messages with it, so the encoder's edges do not count as the target's
    coverage (the target is the decoding side) and encoding runs at plain-Python speed."""
    spec = importlib.util.spec_from_file_location("fuzz_plain_cobs", REPO / "devices/bridge/cobs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plain_frame(msg_type: int, seq: int, payload: bytes) -> bytes:
    """One frame as devices/bridge/codec.py `encode_frame` writes it (a test checks they agree)."""
    from devices.bridge.codec import HEADER_FORMAT, VERSION

    body = struct.pack(HEADER_FORMAT, VERSION, msg_type, seq) + payload
    return bytes(_plain_cobs().encode(body + struct.pack("<I", binascii.crc32(body)))) + b"\x00"


def _run_bridge_messages(data: bytes) -> None:
    """Well-framed messages (valid COBS and CRC, so the message decoder and the session are
    reached) into a BridgeSession, acknowledged as the service does once a thing is durable."""
    from devices.bridge import codec
    from devices.bridge.session import BridgeSession, ObservationReady, RecordingReady

    session = BridgeSession("bridge-fuzz", max_ecg_seconds=30.0)
    session.connection_made(NOW)
    stream = b"".join(plain_frame(t, s, p[: codec.MAX_PAYLOAD]) for t, s, p in messages_in(data))
    cut = len(stream) // 2
    for piece in (stream[:cut], stream[cut:]):
        for event in session.receive_data(piece, NOW):
            if isinstance(event, RecordingReady):
                check_recording(event.recording)
            elif isinstance(event, ObservationReady):
                check_observation_like(event.observation)
            else:
                check_values(event, type(event).__name__)
            seq = getattr(event, "seq", None)
            if isinstance(event, (RecordingReady, ObservationReady)) and seq is not None:
                session.acknowledge(seq)
    for event in session.connection_lost(NOW):
        if isinstance(event, RecordingReady):
            check_recording(event.recording)
    session.data_to_send()


def bridge_message_seeds() -> list[bytes]:
    from devices.bridge import codec

    def framed(*messages: codec.Message) -> bytes:
        out = b""
        for seq, m in enumerate(messages):
            payload = m.encode_payload()
            out += struct.pack("<BBH", m.TYPE, seq, len(payload)) + payload
        return out

    ms = int((NOW - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)).total_seconds() * 1000)
    hello = codec.Hello("BR-1", "bridge", "1.0", 7)
    block = struct.pack("<3h", 100, 200, -50) * 40
    return [
        framed(
            hello,
            codec.Measurement(
                "blood-pressure",
                "r1",
                codec.TIME_DEVICE_CLOCK,
                ms - 60000,
                [
                    codec.MeasuredValue("systolic", 120.0, "mm[Hg]"),
                    codec.MeasuredValue("diastolic", None, "mm[Hg]", "nres"),
                ],
            ),
        ),
        framed(
            hello,
            codec.EcgStart(1, codec.TIME_SYNCED, ms, 500, 2.5, ["I", "II", "V1"]),
            codec.EcgBlock(1, 0, 3, block),
            codec.EcgBlock(1, 40, 3, block),
            codec.EcgEnd(1, 80),
        ),
        framed(
            codec.TimeSync(ms),
            codec.Log(2, "boot"),
            codec.SerialData(1, b"NIBP 120/80\r\n"),
            codec.Ack(3),
            codec.Nack(4, codec.NACK_MALFORMED, "bad"),
        ),
    ] + constants_in_tests("test_bridge_codec.py")


# -- serial text devices ---------------------------------------------------------------------------


def _example_profile() -> object:
    from devices.ascii_report import load_profile

    return load_profile((REPO / "firmware_bridge/profiles/example-vitals-monitor.toml").read_text(encoding="utf-8"))


_PROFILE: list[object] = []


def _run_ascii_report(data: bytes) -> None:
    from devices.ascii_report import ReportParsed, ReportParser
    from devices.identity import DeviceIdentity

    if not _PROFILE:
        _PROFILE.append(_example_profile())
    parser = ReportParser(_PROFILE[0], DeviceIdentity(model="VM-100", address="/dev/ttyUSB0"))  # type: ignore[arg-type]
    cut = len(data) // 2
    events = parser.feed(data[:cut], NOW) + parser.feed(data[cut:], NOW) + parser.flush(NOW + dt.timedelta(seconds=30))
    for event in events:
        if isinstance(event, ReportParsed):
            for obs in event.observations:
                check_observation_like(obs)


def _run_ascii_profile(data: bytes) -> None:
    from devices.ascii_report import load_profile

    check_values(load_profile(data.decode("utf-8", errors="replace")), "profile")


def _run_scanner(data: bytes) -> None:
    """A barcode/card scanner's keystrokes; the first byte picks the rules (with or without a
    GB 11643 resident-ID check), the rest arrives in two reads."""
    from devices.scanner import PatientScanned, ScannerDecoder

    kind = "cn-resident-id" if data[:1] and data[0] & 1 else ""
    decoder = ScannerDecoder(_scan_rules(kind))
    cut = len(data) // 2
    for event in decoder.feed(data[1:cut]) + decoder.feed(data[cut:]):
        if isinstance(event, PatientScanned) and (not event.patient_id or not event.patient_id.isprintable()):
            raise Implausible(f"patient id {event.patient_id!r}")


@functools.cache
def _scan_rules(kind: str) -> Any:
    """The rules once per kind, not compiled again for every input (frozen: nothing carries over)."""
    from devices.scanner import ScanRules

    return ScanRules.from_patterns(r"(?:PAT:)?(?P<id>[0-9X]{15,20})", r"DR-(?P<id>\d{3,8})", kind)


def scanner_seeds() -> list[bytes]:
    return [
        bytes([k]) + c
        for c in constants_in_tests("service_harness.py") + [b"PAT:110101199003077578\r\n"]
        for k in (0, 1)
    ]


# -- configuration and console -----------------------------------------------------------------


def _run_config(data: bytes) -> None:
    from lastmile.config import parse_config

    parse_config(data.decode("utf-8", errors="replace"), "fuzz.toml")


def config_seeds() -> list[bytes]:
    from lastmile.config import render_defaults

    return [
        render_defaults().encode(),
        b'[gateway]\nid = "clinic-7"\n[reading_center]\nhost = "127.0.0.1"\nport = 11112\n',
        b'[[serial.devices]]\npath = "/dev/ttyUSB0"\nprofile = "example-vitals-monitor"\n',
    ]


def has_control_characters(text: str) -> bool:
    """Controls, format characters, unassigned code points, line/paragraph separators: nothing
    a person types into a name or an ID, and nothing DICOM LO/PN or a FHIR string may carry."""
    return any(unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp") for ch in text)


@functools.cache
def _console_configs() -> tuple[Any, ...]:
    """A configuration for each `[patient] id_kind` (what the ID check depends on)."""
    from lastmile.config import Config

    configs = []
    for kind in ("", "cn-resident-id", "clinic-mrn"):
        config = Config()
        config.patient.id_kind = kind
        configs.append(config)
    return tuple(configs)


def _run_console_forms(data: bytes) -> None:
    """A form post and the headers/query a browser sends, through every input check the
    console runs on them (lastmile/console: patient identifier, names, reasons, account names
    and passwords, Accept-Language, the `next` redirect target, DICOM person names)."""
    from urllib.parse import parse_qs

    from lastmile.console.accounts import AccountError, check_name, check_password
    from lastmile.console.app import local_path, person_name
    from lastmile.console.i18n import negotiate
    from lastmile.console.sources import MAX_NAME_LENGTH, ConsoleInputError, checked_patient, short_text

    text = data.decode("utf-8", errors="replace")
    fields = {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}
    # the check-in form as posted (ID and name together), then every value as an ID alone
    typed = [(fields.get("patient_id", ""), fields.get("name", ""))]
    typed += [(value, "") for value in [*fields.values(), text]]
    for config in _console_configs():
        for value, name in typed:
            try:
                patient = checked_patient(value, name, config)
            except ConsoleInputError:
                continue
            ident = patient.patient_id
            if not ident or len(ident) > MAX_NAME_LENGTH or has_control_characters(ident) or ident != ident.strip():
                raise Implausible(f"patient identifier {ident!r} accepted (id_kind {config.patient.id_kind!r})")
            if has_control_characters(patient.name):
                raise Implausible(f"patient name {patient.name!r} accepted")
            check_values(patient, "patient", dates=True)
    for value in [*fields.values(), text]:
        try:
            short = short_text(value)
            if len(short) > MAX_NAME_LENGTH or has_control_characters(short):
                raise Implausible(f"short text {short!r} accepted")
        except ConsoleInputError:
            pass
        for check in (check_name, check_password):
            try:
                check(value)
            except AccountError:
                pass
        target = local_path(value)
        if not target.startswith("/") or target.startswith("//") or "\\" in target:
            raise Implausible(f"redirect target {target!r} leaves the console")
        person_name(value)
    if negotiate(text) not in ("zh-CN", "en"):
        raise Implausible("negotiated a language we do not have")


def console_seeds() -> list[bytes]:
    return [
        b"csrf=abc&patient_id=110101199003077571&name=%E5%BC%A0%E4%B8%89&reason=fever",  # a valid resident ID
        b"csrf=abc&patient_id=C-00042&name=Zhang%5ESan%3D%E5%BC%A0%5E%E4%B8%89&next=/patients",
        b"name=doctor+li&password=correct-horse-battery&next=//evil.example",
        b"zh-CN,zh;q=0.9,en;q=0.8",
        "patient_id=11010119900307757X&reason=复诊".encode(),
    ]


# -- DICOM network input -------------------------------------------------------------------------


TRANSFER_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99")
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"


def _fake_assoc(calling: str = "CART01") -> SimpleNamespace:
    return SimpleNamespace(
        requestor=SimpleNamespace(ae_title=calling, address="127.0.0.1"), acceptor=SimpleNamespace(ae_title="LASTMILE")
    )


def _run_commitment(data: bytes) -> None:
    """An N-EVENT-REPORT from the reading center as pynetdicom hands it to our handler: first
    byte the event type, the rest the Event Information (Implicit VR LE). The handler must
    answer a status, never raise."""
    from pydicom.uid import UID
    from pynetdicom import evt
    from pynetdicom.dimse_primitives import N_EVENT_REPORT
    from pynetdicom.events import Event
    from pynetdicom.presentation import PresentationContextTuple

    from uploader.dicom_commitment import report_handler

    if not data:
        return
    request = N_EVENT_REPORT()
    request.AffectedSOPClassUID = STORAGE_COMMITMENT_PUSH
    request.AffectedSOPInstanceUID = "1.2.840.10008.1.20.1.1"
    request.EventTypeID = data[0] % 4
    request.EventInformation = io.BytesIO(data[1:])
    context = PresentationContextTuple(1, UID(STORAGE_COMMITMENT_PUSH), UID(TRANSFER_SYNTAXES[0]))
    event = Event(_fake_assoc("ORTHANC"), evt.EVT_N_EVENT_REPORT, {"request": request, "context": context})  # type: ignore[arg-type]
    reports: list[object] = []
    # the listener's handler, trust checks included (the sender is the reading center)
    status, reply = report_handler(reports.append, _report_senders())(event)
    if status not in (0x0000, 0x0110) or reply is not None:
        raise Implausible(f"handler answered {status:#06x}")
    for report in reports:
        check_values(report, "report")
        if not getattr(report, "transaction_uid", ""):
            raise Implausible("report without a transaction UID")


@functools.cache
def _report_senders() -> Any:
    """Built once (frozen; its networks parsed once), not per input."""
    from uploader.dicom_commitment import ReportSenders

    return ReportSenders(ae_titles=("ORTHANC",), networks=("127.0.0.0/8",))


def commitment_seeds() -> list[bytes]:
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from lastmile.demo.reading_center import commitment_item as ref

    def encoded(ds: Dataset) -> bytes:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, True
        write_dataset(buffer, ds)
        return buffer.getvalue()

    ok = Dataset()
    ok.TransactionUID = "1.2.826.0.1.3680043.8.498.1"
    ok.ReferencedSOPSequence = [ref("1.2.840.10008.5.1.4.1.1.9.1.1", "1.2.3.4.5")]
    some = Dataset()
    some.TransactionUID = "1.2.826.0.1.3680043.8.498.2"
    some.ReferencedSOPSequence = [ref("1.2.840.10008.5.1.4.1.1.9.1.1", "1.2.3.4.5")]
    some.FailedSOPSequence = [ref("1.2.840.10008.5.1.4.1.1.9.1.1", "1.2.3.4.6", 0x0112)]
    return [b"\x01" + encoded(ok), b"\x02" + encoded(some)]


# the harness receiver's object cap: above the seeds (14 KB), small enough that inflating a bomb to
# it under atheris' instrumentation costs milliseconds, not the 0.3 s a 1 MiB cap took
LAN_CAP = 64 * 1024
LAN_INSTANCE = "1.2.826.0.1.3680043.8.498.7"  # the harness cart's C-STORE announces it; the seeds carry it


def _run_lan_receiver(data: bytes) -> None:
    """A C-STORE from a cart on the clinic LAN: first byte the transfer syntax, the rest the
    data set as it came off the wire, into the receiver's real handler."""
    from pydicom.uid import UID
    from pynetdicom import evt
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event
    from pynetdicom.presentation import PresentationContextTuple

    from firmware_bridge.dicom_receiver import DicomReceiver, ReceivedObject, ReceiverSettings

    if not data:
        return
    kept: list[ReceivedObject] = []
    # a small cap, so that a deflated input inflating past it (a bomb) is reachable
    receiver = DicomReceiver(ReceiverSettings(allowed_callers=("CART01",), max_object_bytes=LAN_CAP), kept.append)
    request = C_STORE()
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.9.1.1"
    request.AffectedSOPInstanceUID = LAN_INSTANCE
    request.DataSet = io.BytesIO(data[1:])
    syntax = TRANSFER_SYNTAXES[data[0] % len(TRANSFER_SYNTAXES)]
    context = PresentationContextTuple(1, UID(request.AffectedSOPClassUID), UID(syntax))
    event = Event(_fake_assoc(), evt.EVT_C_STORE, {"request": request, "context": context})  # type: ignore[arg-type]
    answer = receiver.handle_store(event)
    # a status, or a refusal data set (0xA700 with a comment: a deflated object inflating past the cap)
    status = answer if isinstance(answer, int) else int(getattr(answer, "Status", -1))
    if status not in (0x0000, 0xA700, 0xA900, 0xC000) or (status == 0x0000) != bool(kept):
        raise Implausible(f"receiver answered {status:#06x} with {len(kept)} objects kept")
    if status == 0xA700 and (isinstance(answer, int) or "inflates" not in str(answer.ErrorComment)):
        raise Implausible(f"receiver answered 0xA700 without saying the object inflates too far: {answer}")
    for obj in kept:
        if not obj.data.startswith(b"\x00" * 128 + b"DICM"):
            raise Implausible("kept object is not a Part-10 file")
        for value in (obj.study_uid, obj.series_uid, *(obj.patient or {}).values()):
            if value is not None and not isinstance(value, str):
                raise Implausible(f"{value!r} is not text")


def lan_receiver_seeds() -> list[bytes]:
    """The (shortened) shared DICOM ECG's data set as a cart sends it: Implicit, Explicit and
    Deflated Explicit VR LE."""
    import warnings

    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the receiver reads the whole data set but judges only its header: one with two
        # channels and no annotations (~90 elements, not ~570) gives the fuzzer 4x the inputs
        for data in _small_dicom(annotations=0, channels=2)[:1]:
            ds = pydicom.dcmread(io.BytesIO(data))
            del ds.file_meta
            ds.SOPInstanceUID = LAN_INSTANCE  # the one the C-STORE announces: seeds are kept
            for index in (0, 1):
                buffer = DicomBytesIO()
                buffer.is_little_endian, buffer.is_implicit_VR = True, index == 0
                write_dataset(buffer, ds)
                out.append(bytes([index]) + buffer.getvalue())
    # Deflated Explicit VR LE (index 3): the cart's object, and a bomb (128 KiB of zeros in 150
    # bytes) that must be refused past the harness receiver's cap, never inflated whole
    out += [b"\x03" + _raw_deflate(out[1][1:]), b"\x03" + _raw_deflate(bytes(2 * LAN_CAP))]
    return out


def _raw_deflate(data: bytes) -> bytes:
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


# -- report objects coming back (issue 14) -------------------------------------------------------


REPORT_DATE = re.compile(r"\s*(\d{4})-?\d{2}")  # a report time that reads as a date: its year


@functools.cache
def _report_rules() -> object:
    from uploader.report_reading import CriticalRules

    return CriticalRules.parse(["SCT:401303003", "SCT:71908006"], ["危急值", "Critical Result"])


def _run_report_objects(data: bytes) -> None:
    """A report coming back from the reading center (issue 14): first byte even, the rest a
    Part-10 SR or Encapsulated PDF (uploader/report_reading.py read_dicom_report); odd, a FHIR
    DiagnosticReport as JSON (read_fhir_report, after the client's own JSON check). Odd content
    goes to `problems`; only bytes that are no DICOM at all raise UnreadableReport."""
    import json

    from uploader.report_lines import LineKind, ReportLine
    from uploader.report_reading import MAX_TEXT_CHARS, ReportContent, read_dicom_report, read_fhir_report

    CONTENT_TREE = {LineKind.CONTAINER, LineKind.ITEM, LineKind.NO_VALUE, LineKind.REFERENCE, LineKind.COORDINATES}

    if not data:
        return
    rules = _report_rules()
    if data[0] % 2 == 0:
        content = read_dicom_report(data[1:], rules)  # type: ignore[arg-type]
    else:
        try:
            resource = json.loads(data[1:])
        except ValueError:  # FhirReportClient refuses a body that is no JSON before reading it
            return
        if not isinstance(resource, dict):
            return  # ... and one that is not a resource
        content = read_fhir_report(resource, rules, ["1.2.826.0.1.3680043.8.498.1"])  # type: ignore[arg-type]
    if not isinstance(content, ReportContent) or content.kind not in ("sr", "pdf", "fhir"):
        raise Implausible(f"reader returned {content!r:.80}")
    if not content.object_uid:
        raise Implausible("report without an object uid")
    texts = (content.object_uid, content.study_uid, content.patient_id, content.title, content.observer)
    words = [w for line in content.lines for w in (line.name, line.value, line.code)]
    if not all(
        isinstance(t, str) for t in (*texts, *words, *content.findings, *content.impressions, *content.problems)
    ):
        raise Implausible("a report field that is not text")
    if not all(isinstance(line, ReportLine) and isinstance(line.kind, LineKind) for line in content.lines):
        raise Implausible("a report line of no known kind")
    tree = sum(len(line.name) + len(line.value) for line in content.lines if line.kind in CONTENT_TREE)
    if data[0] % 2 == 0 and tree > MAX_TEXT_CHARS:  # an SR's content tree is cut there
        raise Implausible(f"report content tree of {tree} chars")
    # a time that reads as a date must be a possible one (odd text is passed on as it is, by design)
    match = REPORT_DATE.match(content.report_time)
    if match and not EARLIEST_YEAR <= int(match.group(1)) <= LATEST_YEAR:
        raise Implausible(f"report time = {content.report_time}")
    if content.document is not None and not isinstance(content.document, bytes):
        raise Implausible("a document that is not bytes")
    check_values(content, "report")


def report_seeds() -> list[bytes]:
    """Reports as the demo cardiologist writes them (an SR, an amended critical SR, a PDF) and a
    FHIR DiagnosticReport with a PDF attached."""
    import base64
    import json

    from lastmile.demo.cardiologist import (
        SINUS_RHYTHM,
        STEMI,
        StudyToRead,
        ecg_report_sr,
        minimal_pdf,
        part10,
        report_pdf,
    )

    # fixed UIDs and times: the same seeds every run (the builders would draw new ones)
    study = StudyToRead("1.2.826.0.1.3680043.8.498.1", patient_id="P0042", patient_name="Wang^Fang")
    when = dt.datetime(2026, 11, 2, 10, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))

    def fixed(ds: Any, n: int) -> Any:
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.1.{n}"
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.1.9{n}"
        return ds

    normal = fixed(
        ecg_report_sr(
            study,
            findings=["Sinus rhythm, 72/min"],
            impression="Normal ECG",
            coded_findings=[SINUS_RHYTHM],
            reader="Chen^Jing",
            when=when,
        ),
        1,
    )
    critical = fixed(
        ecg_report_sr(
            study,
            findings=["ST elevation V1-V4", "危急值"],
            impression="Acute anterior STEMI",
            coded_findings=[STEMI],
            reader="Chen^Jing",
            when=when,
            amends=normal,
        ),
        2,
    )
    # preliminary, unverified: its time comes from Content Date/Time, not the verifier's
    preliminary = fixed(
        ecg_report_sr(
            study, findings=["Sinus rhythm"], impression="Normal ECG", when=when, complete=False, verified=False
        ),
        3,
    )
    pdf = fixed(report_pdf(study, ["Normal ECG"], when=when), 4)
    fhir = {
        "resourceType": "DiagnosticReport",
        "id": "dr-1",
        "meta": {"versionId": "3"},
        "status": "amended",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study.study_uid}"}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "11524-6", "display": "EKG study"}]},
        "subject": {"identifier": {"system": "urn:lastmile:patient-id", "value": "P0042"}},
        "issued": "2026-11-02T10:00:00+08:00",
        "resultsInterpreter": [{"display": "Dr. Chen Jing"}],
        "conclusion": "Sinus rhythm. Normal ECG.",
        "conclusionCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "401303003"}]}],
        "presentedForm": [{"contentType": "application/pdf", "data": base64.b64encode(minimal_pdf(["ok"])).decode()}],
    }
    return [
        b"\x00" + part10(normal),
        b"\x00" + part10(critical),
        b"\x00" + part10(preliminary),
        b"\x00" + part10(pdf),
        b"\x01" + json.dumps(fhir, ensure_ascii=False).encode(),
    ]


# -- the registry -----------------------------------------------------------------------------------


def _targets() -> list[Target]:
    from devices.errors import ProtocolError

    device = (ProtocolError,)
    return [
        Target(
            "scp",
            "SCP-ECG file (devices/ecg/scp.py)",
            _run_scp,
            device,
            lambda: shared_files("ecg/scp/*.SCP", "ecg/scp/*.scp") + constants_in_tests("test_ecg_scp.py"),
            40_000,
        ),
        Target(
            "aecg",
            "HL7 aECG XML (devices/ecg/aecg.py)",
            _run_aecg,
            device,
            lambda: (
                shared_files("ecg/aecg/fda_minimum*.xml", "ecg/aecg/fda_empty.xml")
                + shared_files("ecg/aecg/fda_hl7*.xml")
            ),
            8_000,
        ),
        Target(
            "dicom_ecg",
            "DICOM ECG file (devices/ecg/dicom_input.py)",
            _run_dicom_ecg,
            device,
            lambda: _small_dicom(annotations=14),
            20_000,
        ),
        Target("contec", "Contec ECG90A .ECG (devices/ecg/contec.py)", _run_contec, device, _small_contec, 8_000),
        Target("npz", "gateway .npz ECG (devices/ecg/npz.py)", _run_npz, device, npz_seeds, 12_000),
        Target(
            "ecg_any",
            "USB-stick file: format detection + decoder (devices/ecg/formats.py)",
            _run_any_ecg,
            device,
            any_ecg_seeds,
            12_000,
        ),
        Target(
            "ble", "BLE characteristic values (devices/ble/registry.py, every decoder)", _run_ble, device, ble_seeds, 64
        ),
        Target(
            "ble_racp", "Record Access Control Point transfer (devices/ble/racp.py)", _run_racp, device, racp_seeds, 256
        ),
        Target(
            "nmea_sentence",
            "one NMEA sentence, checksum made right (devices/gps/nmea.py)",
            _run_nmea_sentence,
            device,
            nmea_sentence_seeds,
            200,
        ),
        Target(
            "nmea_stream",
            "GNSS receiver byte stream (devices/gps/stream.py)",
            _run_nmea_stream,
            device,
            nmea_stream_seeds,
            2048,
        ),
        Target(
            "bridge_frames",
            "bridge serial bytes: COBS/CRC framing (devices/bridge/protocol.py)",
            _run_bridge_frames,
            device,
            lambda: bridge_frame_seeds(),
            4096,
        ),
        Target(
            "bridge_messages",
            "valid frames into the bridge session (codec, session, ecg_stream)",
            _run_bridge_messages,
            device,
            bridge_message_seeds,
            2048,
        ),
        Target(
            "ascii_report",
            "ASCII report stream (devices/ascii_report.py, example profile)",
            _run_ascii_report,
            device,
            lambda: constants_in_tests("service_harness.py"),
            2048,
        ),
        Target(
            "ascii_profile",
            "ASCII report profile TOML (devices/ascii_report.py load_profile)",
            _run_ascii_profile,
            _ascii_profile_errors(),
            lambda: [_example_profile_text()],
            4096,
        ),
        Target(
            "scanner", "barcode/card scanner keystrokes (devices/scanner.py)", _run_scanner, device, scanner_seeds, 256
        ),
        Target(
            "config",
            "configuration file (lastmile/config.py parse_config)",
            _run_config,
            _config_errors(),
            config_seeds,
            8192,
        ),
        Target(
            "console_forms",
            "console form posts, headers, redirect target (lastmile/console)",
            _run_console_forms,
            (),
            console_seeds,
            512,
        ),
        Target(
            "commitment_report",
            "storage-commitment N-EVENT-REPORT (uploader/dicom_commitment.py)",
            _run_commitment,
            (),
            commitment_seeds,
            1024,
        ),
        Target(
            "lan_receiver",
            "clinic-LAN C-STORE data set (firmware_bridge/dicom_receiver.py)",
            _run_lan_receiver,
            (),
            lan_receiver_seeds,
            20_000,
        ),
        Target(
            "report_objects",
            "SR/PDF/FHIR report objects (uploader/report_reading.py)",
            _run_report_objects,
            _report_errors(),
            report_seeds,
            8192,
        ),
    ]


def bridge_frame_seeds() -> list[bytes]:
    from devices.bridge import codec

    out = []
    for messages in bridge_message_seeds()[:3]:
        out.append(b"\x00" + b"".join(codec.encode_frame(t, s, p) for t, s, p in messages_in(messages)))
    return out + constants_in_tests("test_bridge_codec.py")


def _example_profile_text() -> bytes:
    return (REPO / "firmware_bridge/profiles/example-vitals-monitor.toml").read_bytes()


def _ascii_profile_errors() -> tuple[type[BaseException], ...]:
    from devices.ascii_report import ProfileError

    return (ProfileError,)


def _report_errors() -> tuple[type[BaseException], ...]:
    from uploader.report_reading import UnreadableReport

    return (UnreadableReport,)


def _config_errors() -> tuple[type[BaseException], ...]:
    from lastmile.config import ConfigError

    return (ConfigError,)


def all_targets() -> dict[str, Target]:
    return {t.name: t for t in _targets()}
