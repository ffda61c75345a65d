"""A clinic day on loopback, shared by bench/soak.py and bench/kill_campaign.py.

The gateway runs as its real services (`lastmile acquire` with the clinic-LAN receiver,
`lastmile forward` with report retrieval, `lastmile console`), each its own process, restarted
when it dies as systemd would. Orthanc is the reading center (private network namespace only).
The clinic is driven the way its users drive it, through the CLI: `lastmile patient set/clear`,
`lastmile import` of a USB stick's folder, `lastmile patient assign E<n>` for an ECG that named
no patient; the ECG cart also sends over the LAN (C-STORE to the acquire service).

The truth travels in a side channel the gateway never reads: every ECG carries a serial number
in its first two waveform samples (all leads), and `Truth` maps that number to the patient it
was really taken from. At the end the reading center's copies are read back (Orthanc REST,
the stored files) and compared with the truth.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import datetime as dt
import errno
import io
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GATEWAY_AE = "CLINIC01"
CART_AE = "CART01"
DOCTOR = ("王医生", "correct horse 1")
FAMILY_DOCTOR = "D-SOAK-01"  # the practitioner id on the field visits
# how the ECGs of the day come in, in turn: USB stick, the cart over the LAN, the cart behind the
# serial bridge, a stick file naming nobody
CHANNELS = ("usb", "lan", "bridge", "usb", "unassigned", "lan")
ECG_CHANNELS = frozenset(CHANNELS)
FIELD_VISIT = "field-visit"  # a family doctor's home visit, synced to the county platform
NOTE_PREFIX = "soak truth serial "  # a field visit's note: the platform's copy says which visit it was
SERVICES = ("acquire", "forward", "console", "ble")
DB_SUFFIXES = (".sqlite", ".db")
FHIR_KIND = "fhir-bundle"
from lastmile.demo.loopback import free_port

__all__ = ["free_port"]


def in_private_netns() -> bool:
    return {n for _i, n in socket.if_nameindex()} <= {"lo"}


def reexec_in_private_netns() -> None:
    """Orthanc listens on every interface: run the whole bench where only loopback exists."""
    if in_private_netns():
        return
    if os.geteuid() != 0:
        sys.exit("run as root (the bench puts itself and Orthanc in a private network namespace)")
    argv = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, *sys.argv]
    os.execvp("unshare", argv)


# -- the ECGs and their truth -----------------------------------------------------------------------


@dataclass
class Truth:
    """Serial number of each ECG -> the patient it was taken from (never shown to the gateway)."""

    patient_of: dict[int, str] = field(default_factory=dict)
    channel_of: dict[int, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new(self, patient_id: str, channel: str) -> int:
        with self.lock:
            serial = len(self.patient_of) + 1
            self.patient_of[serial] = patient_id
            self.channel_of[serial] = channel
            return serial


class EcgCart:
    """Makes 12-lead ECG files from pydicom's real Mortara ECG, each marked with its serial."""

    def __init__(self) -> None:
        from pydicom import dcmread
        from pydicom.data import get_testdata_file

        self.template = dcmread(get_testdata_file("waveform_ecg.dcm"))
        del self.template.WaveformSequence[1:]  # the rhythm group only: a smaller object
        self.base = np.frombuffer(self.template.WaveformSequence[0].WaveformData, dtype="<i2").copy()
        self.lock = threading.Lock()

    def ecg_bytes(self, serial: int, patient_id: str | None, name: str, taken: float) -> tuple[bytes, str]:
        """Part-10 bytes and the SOP Instance UID; patient_id None: a file that names no patient."""
        from pydicom.uid import generate_uid

        with self.lock:
            ds = self.template
            channels = int(ds.WaveformSequence[0].NumberOfWaveformChannels)
            samples = self.base.reshape(-1, channels).copy()
            samples[0, :] = serial % 30000
            samples[1, :] = serial // 30000
            ds.WaveformSequence[0].WaveformData = samples.astype("<i2").tobytes()
            uid = generate_uid()
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.StudyInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            ds.PatientID = patient_id or ""
            ds.PatientName = name if patient_id else ""
            stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(taken))
            ds.AcquisitionDateTime = stamp
            ds.ContentDate, ds.ContentTime = stamp[:8], stamp[8:]
            ds.StudyDate, ds.StudyTime = stamp[:8], stamp[8:]
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            return buf.getvalue(), uid


class BridgeCart:
    """An ECG cart behind the serial bridge: the firmware's own BridgeCore on the master side of a
    pty pair, whose slave the acquire service opens as it would /dev/serial/by-id/... The cart
    streams each recording (start, blocks, end); ECG_END is ACKed once the gateway made it
    durable. A recording the gateway refused or never confirmed (acquire killed mid-stream: the
    bridge cannot resend a stream) is taken again, as the nurse would when the cart says so."""

    def __init__(self, link_path: Path) -> None:
        from firmware_bridge.firmware.bridge_core import BridgeCore
        from tests.serial_pty import PtyDevice

        self.device = PtyDevice(link_path)
        self.core = BridgeCore("BR-SOAK-ECG", boot_id=1, capabilities=("ecg", "time-sync"))
        self.lock = threading.Lock()  # the core is the board's single loop: one caller at a time
        self.acked: set[int] = set()
        self.refused: set[int] = set()
        self.recording_id = 0
        self.retaken = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="bridge-cart")

    def start(self) -> None:
        with self.lock:
            hello = self.core.hello(self.clock_ms())
        self.device.write(hello)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        self.device.unplug()

    @staticmethod
    def clock_ms() -> int:
        return int(time.monotonic() * 1000)

    def _run(self) -> None:
        from devices.bridge import codec

        reader = codec.FrameReader()  # the cart's own view of ACK/NACK (the core just forgets)
        while not self.stop_event.is_set():
            data = self.device.read_available(0.05)
            with self.lock:
                now = self.clock_ms()
                out = self.core.receive(data, now) if data else b""
                out += self.core.poll(now)
            for item in reader.feed(data) if data else ():
                if not isinstance(item, codec.Frame):
                    continue
                try:
                    msg = codec.decode_message(item)
                except codec.ProtocolError:
                    continue
                if isinstance(msg, codec.Ack):
                    self.acked.add(msg.seq)
                elif isinstance(msg, codec.Nack):
                    self.refused.add(msg.seq)
            if out:
                self.device.write(out)  # blocks while acquire is down and the pty is full: as a USB link

    def record(self, serial: int, samples: int = 1000) -> bool:
        """One 2-s 12-lead recording carrying `serial` in its first two samples; True once ACKed."""
        from devices.bridge import codec
        from devices.ecg.recording import STANDARD_12_LEADS
        from firmware_bridge.bridge_simulator import ecg_samples

        signal_ = ecg_samples(0, samples)
        signal_[0, :] = serial % 30000
        signal_[1, :] = serial // 30000
        for _attempt in range(5):
            with self.lock:
                self.recording_id += 1
                rid, now = self.recording_id, self.clock_ms()
                flags, device_ms = self.core.time_stamp(now)
                frames = [
                    self.core.send(
                        codec.EcgStart(rid, flags, device_ms, 500, 2.5, STANDARD_12_LEADS), now, reliable=False
                    )
                ]
                for first in range(0, samples, 25):
                    block = signal_[first : first + 25].astype("<i2").tobytes()
                    frames.append(self.core.send(codec.EcgBlock(rid, first, 12, block), now, reliable=False))
                frames.append(self.core.send(codec.EcgEnd(rid, samples), now))
                end_seq = self.core.pending_seqs()[-1]
            self.device.write(b"".join(frames))
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and end_seq not in self.acked and end_seq not in self.refused:
                time.sleep(0.05)
            if end_seq in self.acked:
                return True
            self.retaken += 1
        return False


BLE_CUFF, BLE_THERMOMETER, BLE_OXIMETER = "ble-cuff", "ble-thermometer", "ble-oximeter"
BLE_CHANNELS = (BLE_CUFF, BLE_THERMOMETER, BLE_OXIMETER)


def reading_key(quantities: list[dict[str, Any]]) -> tuple[float, ...]:
    """What identifies a reading among its device's readings of the day: its values."""
    return tuple(sorted(round(float(q["value"]), 2) for q in quantities if q.get("value") is not None))


class BleDevices:
    """The clinic's side of bench/ble_room.py: a reading is written into its device's memory file
    (the device's flash). Each reading of a device has values no other of its readings has: they
    carry the truth's serial (`code_of`) to the gateway's stored observation."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.code_of: dict[tuple[str, tuple[float, ...]], int] = {}  # (channel, values) -> serial
        self.count: collections.Counter[str] = collections.Counter()
        self.uploads = 0
        self.oximeter_generation = 0

    def _remember(self, channel: str, values: tuple[float, ...], serial: int) -> None:
        self.code_of[(channel, tuple(sorted(round(v, 2) for v in values)))] = serial

    @staticmethod
    def _append(path: Path, record: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    @staticmethod
    def device_now() -> str:
        """The device's clock (set by the gateway over CTS): UTC here, to the second."""
        return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0).isoformat()

    def cuff_reading(self, serial: int) -> None:
        """Taken and stored in the cuff, out of the gateway's range: sent when it next uploads."""
        k = self.count[BLE_CUFF]
        self.count[BLE_CUFF] += 1
        systolic, diastolic, pulse = 90 + k % 60, 55 + (k // 60) % 30, 70
        mean = round((systolic + 2 * diastolic) / 3)
        self._remember(BLE_CUFF, (systolic, diastolic, mean, pulse), serial)
        record = {"systolic": systolic, "diastolic": diastolic, "mean": mean, "pulse": pulse}
        self._append(self.directory / "cuff.jsonl", {**record, "taken_at": self.device_now()})

    def cuff_upload(self) -> None:
        """The cuff comes into range: everything it stored goes to the gateway."""
        self.uploads += 1
        (self.directory / "cuff.upload").write_text(str(self.uploads))

    def thermometer_reading(self, serial: int) -> tuple[str, tuple[float, ...]]:
        k = self.count[BLE_THERMOMETER]
        self.count[BLE_THERMOMETER] += 1
        celsius = round(35.5 + 0.01 * (k % 300), 2)
        self._remember(BLE_THERMOMETER, (celsius,), serial)
        self._append(self.directory / "thermometer.jsonl", {"celsius": celsius, "taken_at": self.device_now()})
        return BLE_THERMOMETER, (celsius,)

    def oximeter_on(self, serial: int) -> tuple[str, tuple[float, ...]]:
        k = self.count[BLE_OXIMETER]
        self.count[BLE_OXIMETER] += 1
        spo2, pulse = 94 + k % 6, 50 + (k // 6) % 120
        self._remember(BLE_OXIMETER, (spo2, pulse), serial)
        self._oximeter({"on": True, "spo2": spo2, "pulse": pulse})
        return BLE_OXIMETER, (spo2, pulse)

    def oximeter_off(self, limit_s: float = 60.0) -> bool:
        """The finger out of the clip; True once the room has hung up (nothing more will come)."""
        generation = self._oximeter({"on": False})
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                if int((self.directory / "oximeter.done").read_text()) >= generation:
                    return True
            time.sleep(0.1)
        return False

    def _oximeter(self, state: dict[str, Any]) -> int:
        self.oximeter_generation += 1
        tmp = self.directory / "oximeter.json.new"
        tmp.write_text(json.dumps({"generation": self.oximeter_generation, **state}))
        tmp.replace(self.directory / "oximeter.json")  # atomic: the room never reads half a state
        return self.oximeter_generation

    def serial_of(self, observation: dict[str, Any]) -> int | None:
        channel = {
            "blood-pressure": BLE_CUFF,
            "body-temperature": BLE_THERMOMETER,
            "temperature": BLE_THERMOMETER,
        }.get(str(observation.get("kind")), BLE_OXIMETER)
        return self.code_of.get((channel, reading_key(observation.get("quantities", []))))


def stored_observations(data_dir: Path, *, unsent_only: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """Every BLE observation the gateway keeps: ('outbox', JSON) with its patient, or ('held', JSON)
    with its held id in "held_id" (read-only, as the judge). `unsent_only`: not those already
    relayed to the county platform (the judge counts those there)."""
    out: list[tuple[str, dict[str, Any]]] = []
    outbox = data_dir / "outbox.sqlite"
    if outbox.exists():
        conn = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=30)
        try:  # small payloads live in the database (table payloads), not in payload files
            relayed = " AND i.state NOT IN ('committed', 'purged')" if unsent_only else ""
            rows = conn.execute(
                "SELECT p.data FROM items i JOIN payloads p ON p.item_id = i.id WHERE i.kind = 'observation'" + relayed
            ).fetchall()
        except sqlite3.OperationalError:
            rows = []
        finally:
            conn.close()
        for (data,) in rows:
            with contextlib.suppress(ValueError):
                out.append(("outbox", json.loads(data)))
    clinic_db = data_dir / "clinic.db"
    if clinic_db.exists():
        conn = sqlite3.connect(f"file:{clinic_db}?mode=ro", uri=True, timeout=30)
        try:
            held = conn.execute("SELECT id, observation FROM held_observations ORDER BY id").fetchall()
        except sqlite3.OperationalError:
            held = []
        finally:
            conn.close()
        out += [("held", {**json.loads(text), "held_id": int(i)}) for i, text in held]
    return out


def platform_readings(platform: Any) -> list[tuple[str, dict[str, Any]]]:
    """The device readings the county platform stored, in the gateway's JSON shape (kind, values,
    patient): a reading's Observations share one identifier up to '#' (a BP's pulse is its own)."""
    groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for obs in platform.resources("Observation"):
        if str(obs.get("valueString", "")).startswith(NOTE_PREFIX):
            continue  # a field visit's note, judged by judge_platform
        groups[identifier_of(obs).split("#", 1)[0]].append(obs)
    readings = []
    for parts in groups.values():
        codes = {c.get("code") for o in parts for c in o["code"].get("coding", [])}
        values = [o["valueQuantity"] for o in parts if "valueQuantity" in o]
        values += [c["valueQuantity"] for o in parts for c in o.get("component", []) if "valueQuantity" in c]
        kind = "blood-pressure" if "85354-9" in codes else "body-temperature" if "8310-5" in codes else "other"
        subjects = {subject_of(o) for o in parts}
        patient = subjects.pop() if len(subjects) == 1 else f"split between {sorted(subjects)}"
        readings.append(("platform", {"kind": kind, "quantities": values, "patient_id": patient}))
    return readings


def judge_ble(data_dir: Path, ble: BleDevices, truth: Truth, platform: Any) -> dict[str, Any]:
    """The BLE readings, compared with the truth where they are: at the county platform, or still
    on the gateway (not yet sent, or held): each once (the oximeter streams: several per clip-on
    are expected), on its patient; none held at the end."""
    seen: collections.Counter[int] = collections.Counter()
    at_platform: set[int] = set()
    misattributed = held = unknown = 0
    for where, observation in stored_observations(data_dir, unsent_only=True) + platform_readings(platform):
        serial = ble.serial_of(observation)
        if serial is None:
            unknown += 1
            continue
        seen[serial] += 1
        if where == "platform":
            at_platform.add(serial)
        if where == "held":
            held += 1
        elif observation.get("patient_id") != truth.patient_of.get(serial):
            misattributed += 1
    expected = {s for s, channel in truth.channel_of.items() if channel in BLE_CHANNELS}
    once_each = {s for s in expected if truth.channel_of[s] != BLE_OXIMETER}
    return {
        "ble_readings": len(expected),
        "ble_lost": len(expected - set(seen)),
        "ble_duplicated": sum(seen[s] - 1 for s in once_each if seen[s] > 1),
        "ble_duplicates": sorted(f"{s}: {truth.channel_of[s]}, seen {seen[s]}" for s in once_each if seen[s] > 1),
        "ble_misattributed": misattributed,
        "ble_held": held,
        "ble_unknown": unknown,
        "ble_at_platform": len(at_platform & expected),
        "ble_by_device": dict(collections.Counter(truth.channel_of[s] for s in expected)),
    }


def serial_of(part10: bytes) -> int:
    """The serial the cart wrote into the first two samples (the same on every lead)."""
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(part10))
    group = ds.WaveformSequence[0]
    rows = np.frombuffer(group.WaveformData, dtype="<i2").reshape(-1, int(group.NumberOfWaveformChannels))
    low = collections.Counter(rows[0].tolist()).most_common(1)[0][0]
    high = collections.Counter(rows[1].tolist()).most_common(1)[0][0]
    return int(high) * 30000 + int(low)


# -- the gateway, as its services --------------------------------------------------------------------


@dataclass
class Ports:
    reading_center: int
    listen: int
    lan: int
    console: int
    county_platform: int


def write_config(path: Path, data_dir: Path, ports: Ports, orthanc_ae: str, bridge_link: Path) -> Path:
    path.write_text(
        f"""
[gateway]
id = "soak-gateway"
institution = "Soak Village Clinic"
data_dir = "{data_dir}"
[reading_center]
host = "127.0.0.1"
port = {ports.reading_center}
called_ae = "{orthanc_ae}"
calling_ae = "{GATEWAY_AE}"
listen_port = {ports.listen}
listen_host = "127.0.0.1"
associations = 2
batch_size = 8
timeout_s = 10.0
commitment_timeout_s = 6.0
[outbox]
backoff_base_s = 0.5
backoff_max_s = 3.0
min_free_mb = 1
config_fault_retry_s = 2.0
[patient]
unassigned_ecg_hold_s = 86400.0
[ecg]
re_record_hold_s = 0
[lan_receiver]
enabled = true
host = "127.0.0.1"
port = {ports.lan}
ae_title = "{GATEWAY_AE}"
allowed_callers = ["{CART_AE}"]
[ble]
# lastmile-ble's link (bench/ble_room.py: `lastmile ble run` over the emulated radio); acquire
# has no BLE part
enabled = true
[serial]
enabled = true
devices = [{{ name = "ecg-bridge", match = "{bridge_link}", profile = "bridge" }}]
[gps]
source = "none"
[console]
listen = "127.0.0.1:{ports.console}"
https = false
[fhir]
base_url = "http://127.0.0.1:{ports.county_platform}/fhir"
timeout_s = 10.0
batch_size = 5
[visits]
doctor_id = "{FAMILY_DOCTOR}"
[reports]
stat_poll_s = 5.0
backoff_base_s = 2.0
backoff_max_s = 10.0
"""
    )
    return path


def lastmile(config: Path, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lastmile", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
    )


def ble_emulation_mb() -> float:
    """What the emulated radio and its three devices add to the RSS of the process that carries
    them (bench/ble_room.py: the "ble" service, `lastmile ble run`): a process with the BLE
    service's modules loaded and them started, less one with the same modules and nothing
    started. A gateway holds neither: its BLE service talks to BlueZ."""

    def rss(mode: str) -> float:
        script = str(REPO / "bench" / "ble_room.py")
        out = subprocess.run([sys.executable, script, mode], capture_output=True, text=True, timeout=120, cwd=REPO)
        return float(out.stdout.split()[-1])

    return round(rss("--emulation-only") - rss("--bare"), 1)


def poll_failure(proc: subprocess.CompletedProcess[str], *, link_down: bool) -> str:
    """Why a `lastmile report poll` failed, in a few words. While the link is down the command
    must say so on its last line (expected: "link down, said so"); anything else, a traceback or
    a failure with the link up (a lock, a refusal), is a real error, shown with its message."""
    said = proc.stderr.strip()
    last = said.splitlines()[-1].removeprefix("lastmile report poll: ") if said else f"exit {proc.returncode}, silent"
    if "Traceback" in said:
        return f"exception: {last[:160]}"
    if link_down and last.startswith("cannot connect to "):
        return "link down, said so"
    return f"{'link down' if link_down else 'link up'}: {last[:160]}"


class Supervisor:
    """Keeps each service running, as systemd's Restart=always would; samples RSS and fds."""

    def __init__(self, config: Path, log_dir: Path, ble_devices: Path) -> None:
        self.config = config
        self.log_dir = log_dir
        self.ble_devices = ble_devices
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: collections.Counter[str] = collections.Counter()
        self.unexpected_exits: list[str] = []
        self.samples: dict[str, list[tuple[float, float, int, float]]] = collections.defaultdict(
            list
        )  # t, RSS, fds, PSS
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="supervisor")

    def start(self) -> None:
        atexit.register(self.stop)  # a bench that fails leaves no service behind
        for name in SERVICES:
            self._spawn(name)
        self.thread.start()

    def command(self, name: str) -> list[str]:
        if name == "ble":  # `lastmile ble run` with the emulated radio as its link (bench/ble_room.py)
            return [sys.executable, str(REPO / "bench" / "ble_room.py"), str(self.config), str(self.ble_devices)]
        return [sys.executable, "-m", "lastmile", "-c", str(self.config), name]

    def _spawn(self, name: str) -> None:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                self.command(name),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    def pid(self, name: str) -> int | None:
        with self.lock:
            proc = self.procs.get(name)
            return proc.pid if proc is not None and proc.poll() is None else None

    def kill(self, name: str) -> bool:
        """SIGKILL the service (the OOM killer, a power cut for that process); the watcher restarts it."""
        with self.lock:
            proc = self.procs[name]
            if proc.poll() is not None:
                return False
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            self.restarts[name] += 1
            self._spawn(name)
            return True

    def _watch(self) -> None:
        while not self.stop_event.wait(0.5):
            now = time.monotonic()
            with self.lock:
                for name, proc in list(self.procs.items()):
                    if proc.poll() is not None:
                        # systemd's RestartSec: a service that keeps failing is not spun
                        self.unexpected_exits.append(f"{name} exited {proc.returncode}")
                        if len(self.unexpected_exits) > 20:
                            raise SystemExit(f"services keep failing: {self.unexpected_exits[-3:]}")
                        time.sleep(1.0)
                        self._spawn(name)
                        continue
                    sample = rss_and_fds(proc.pid)
                    if sample is not None:
                        self.samples[name].append((now, *sample))

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(5)
        with self.lock:
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in self.procs.values():
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def rss_and_fds(pid: int) -> tuple[float, int, float] | None:
    """RSS (MB), open fds, and PSS (MB): RSS counts every shared library page in full in each
    service (libpython, numpy's, OpenSSL's: ~20 MB each here); PSS shares them out, as the Pi's
    RAM does."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    pss = next((int(line.split()[1]) / 1024 for line in rollup.splitlines() if line.startswith("Pss:")), 0.0)
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024, fds, pss
    return None


# -- the outbox, read as the kill campaign's judge (read-only) --------------------------------------


def database_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.rglob("*") if p.is_file() and p.suffix in DB_SUFFIXES)


def integrity_problems(data_dir: Path) -> list[str]:
    """PRAGMA integrity_check on every real database file (read-only: the services keep writing)."""
    bad = []
    for path in database_files(data_dir):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            result = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        except sqlite3.DatabaseError as exc:
            result = [str(exc)]
        finally:
            conn.close()
        if result != ["ok"]:
            bad.append(f"{path.name}: {'; '.join(result[:3])}")
    return bad


def outbox_states(data_dir: Path, kind: str = "dicom") -> dict[str, int]:
    """Items of one kind by state ('held' counted apart from queued)."""
    path = data_dir / "outbox.sqlite"
    if not path.exists():
        return {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute(
            "SELECT CASE WHEN state = 'queued' AND hold_until > ? THEN 'held' ELSE state END, COUNT(*) "
            "FROM items WHERE kind = ? GROUP BY 1",
            (time.time(), kind),
        ).fetchall()
    except sqlite3.OperationalError:  # created, its tables not yet (the service is starting)
        return {}
    finally:
        conn.close()
    return {str(state): int(n) for state, n in rows}


def held_ecg_ids(data_dir: Path) -> list[tuple[int, str]]:
    """(item id, key) of ECGs held for the doctor."""
    path = data_dir / "outbox.sqlite"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute(
            "SELECT id, key FROM items WHERE kind = 'dicom' AND state = 'queued' AND hold_until > ? ORDER BY id",
            (time.time(),),
        ).fetchall()
    except sqlite3.OperationalError:  # created, its tables not yet
        return []
    finally:
        conn.close()
    return [(int(i), str(k)) for i, k in rows]


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


# -- the clinic ---------------------------------------------------------------------------------------


@dataclass
class ClinicStats:
    patients: int = 0
    usb: int = 0
    lan: int = 0
    bridge: int = 0
    unassigned: int = 0
    assigned: int = 0
    imports_failed: int = 0
    lan_retries: int = 0
    console_pages: int = 0
    console_errors: int = 0
    field_visits: int = 0
    readings_assigned: int = 0  # held BLE readings the doctor assigned
    ecgs_held_then_assigned: int = 0  # ECGs naming a patient but dated before the session began
    ble_waits_timed_out: int = 0
    console_actions: int = 0  # check-ins, check-outs and assignments done on the console
    console_problems: list[str] = field(default_factory=list)  # what the console errors were
    cli_errors: list[str] = field(default_factory=list)


class Clinic:
    """The village doctor's day: patients one after another, ECGs by USB stick and LAN."""

    def __init__(self, config: Path, work: Path, ports: Ports, truth: Truth, seed: int) -> None:
        self.config = config
        self.work = work
        self.ports = ports
        self.truth = truth
        self.rng = random.Random(seed)
        self.cart = EcgCart()
        self.stats = ClinicStats()
        self.pending_assign: dict[str, tuple[int, str]] = {}  # outbox key -> (serial, true patient)
        self.ecgs_taken = 0
        self.field_visit_every = 3  # every third patient is also seen at home (0: none)
        self.ble_every = 1  # the BLE devices are used on every n-th patient
        self.lock = threading.Lock()  # the doctor does one thing at a time
        self.browser: Any = None  # tests/console_harness.Client, logged in as the doctor
        self.bridge: BridgeCart | None = None  # the ECG cart on the serial bridge
        self.ble: BleDevices | None = None  # the cuff, thermometer and oximeter (bench/ble_room.py)

    def add_doctor(self) -> None:
        """The doctor's console account (before the console starts)."""
        result = subprocess.run(
            [sys.executable, "-m", "lastmile", "-c", str(self.config), "user", "add", DOCTOR[0], "--role", "doctor"],
            input=DOCTOR[1] + "\n",
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        if result.returncode != 0:
            raise RuntimeError(f"lastmile user add: {result.stderr}")

    def console_post(self, path: str, form: dict[str, str]) -> bool:
        """One action on the console as the doctor's browser does it; False if it did not take."""
        from tests.console_harness import Client

        try:
            if self.browser is None:
                browser = Client(f"http://127.0.0.1:{self.ports.console}")
                browser.login(DOCTOR)
                self.browser = browser
            reply = self.browser.get("/today")
            if reply.status != 200:  # logged out (or a console just restarted): log in again
                self.browser = None
                self.console_problem(f"GET /today: {reply.status}")
                return False
            reply = self.browser.post(path, form)
        except (OSError, AssertionError) as exc:
            self.browser = None
            self.console_problem(f"POST {path}: {type(exc).__name__} {str(exc)[:80]}")
            return False
        ok = reply.status == 303 and "too-late" not in reply.location
        if ok:
            self.stats.console_actions += 1
        else:
            self.console_problem(f"POST {path}: {reply.status} {reply.location}")
        return ok

    def console_problem(self, what: str) -> None:
        self.stats.console_errors += 1
        if len(self.stats.console_problems) < 5:
            self.stats.console_problems.append(what)

    def _cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = lastmile(self.config, *args)
        if result.returncode != 0:
            self.stats.cli_errors.append(f"{' '.join(args[:2])}: rc {result.returncode} {result.stderr.strip()[-200:]}")
        return result

    def visit(self, index: int, ecgs: int) -> None:
        """One patient: checked in, ECGs taken (USB, LAN, or a file naming nobody), checked out."""
        patient_id = f"P{index:05d}"
        name = f"Soak^Patient{index}"
        on_console = index % 2 == 0  # every other patient is checked in on the console
        with self.lock:
            if not (on_console and self.console_post("/today/check-in", {"patient_id": patient_id, "name": name})):
                self._cli("patient", "set", patient_id, "--name", name)
            session_began = time.time()  # the session's start is at or before this
            self.stats.patients += 1
            stick = self.work / "sticks" / f"visit-{index:05d}"
            stick.mkdir(parents=True, exist_ok=True)
            on_stick = 0
            for _ in range(ecgs):
                channel = CHANNELS[self.ecgs_taken % len(CHANNELS)]
                self.ecgs_taken += 1
                serial = self.truth.new(patient_id, channel)
                data, uid = self.cart.ecg_bytes(
                    serial, None if channel == "unassigned" else patient_id, name, time.time() - 60
                )
                if channel == "lan":
                    self.lan_store(data, uid)
                    self.stats.lan += 1
                elif channel == "bridge":
                    # the bridge's clock is synced, not exact: a stream begun in the first
                    # seconds of the session could be dated before it (and rightly held)
                    time.sleep(max(0.0, session_began + 2.0 - time.time()))
                    if self.bridge is None or not self.bridge.record(serial):
                        self.stats.cli_errors.append(f"bridge ECG {serial}: never ACKed")
                    self.stats.bridge += 1
                else:
                    (stick / f"ECG{serial:06d}.dcm").write_bytes(data)
                    on_stick += 1
                    if channel == "unassigned":
                        self.stats.unassigned += 1
                        self.pending_assign[f"serial:{serial}"] = (serial, patient_id)
                    else:
                        self.stats.usb += 1
            if on_stick:
                self.import_stick(stick)
            if self.ble is not None and index % self.ble_every == 0:
                self.ble_readings(index, patient_id, session_began)
            self.assign_held(patient_id, name, on_console=on_console)
            self.assign_held_readings()
            if not (on_console and self.console_post("/today/end-session", {})):
                self._cli("patient", "clear")
            if self.field_visit_every and index % self.field_visit_every == 0:
                self.field_visit(patient_id)  # the family doctor sees the patient at home, too

    def ble_readings(self, index: int, patient_id: str, session_began: float) -> None:
        """The cuff (stored, uploaded every third patient), the thermometer, and for every other
        patient the oximeter's clip; the live ones waited for, so they land in this session."""
        assert self.ble is not None
        # device clocks count whole seconds: a reading stamped in the second the session began
        # would be before it (and rightly held for the doctor)
        time.sleep(max(0.0, session_began + 1.2 - time.time()))
        self.ble.cuff_reading(self.truth.new(patient_id, BLE_CUFF))
        if index % 3 == 0:
            self.ble.cuff_upload()
        self.wait_stored(self.ble.thermometer_reading(self.truth.new(patient_id, BLE_THERMOMETER)))
        if index % 2:
            self.wait_stored(self.ble.oximeter_on(self.truth.new(patient_id, BLE_OXIMETER)))
            if not self.ble.oximeter_off():
                self.stats.cli_errors.append("oximeter: never hung up")

    def wait_stored(self, reading: tuple[str, tuple[float, ...]], limit_s: float = 60.0) -> None:
        """Until the gateway made the reading durable (the doctor sees it on the console)."""
        assert self.ble is not None
        serial = self.ble.code_of[(reading[0], tuple(sorted(round(v, 2) for v in reading[1])))]
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if any(self.ble.serial_of(o) == serial for _w, o in stored_observations(self.work / "data")):
                return
            time.sleep(0.2)
        self.stats.ble_waits_timed_out += 1

    def assign_held_readings(self) -> None:
        """The doctor gives each held reading its patient (she knows whose it was: the truth)."""
        if self.ble is None:
            return
        for where, observation in stored_observations(self.work / "data"):
            serial = self.ble.serial_of(observation)
            if where != "held" or serial is None:
                continue
            patient_id = self.truth.patient_of[serial]
            if self._cli("patient", "assign", str(observation["held_id"]), patient_id).returncode == 0:
                self.stats.readings_assigned += 1

    def field_visit(self, patient_id: str) -> None:
        """A home visit by the CLI (no GPS here): started, a note, stopped and queued for the county.
        The note carries the truth's serial: the platform's copy names it and the patient."""
        serial = self.truth.new(patient_id, FIELD_VISIT)
        self.stats.field_visits += 1
        self._cli("visit", "start", "--patient", patient_id, "--no-gps")
        self._cli("visit", "note", f"{NOTE_PREFIX}{serial}")
        self.stop_visit()

    def stop_visit(self) -> None:
        """`lastmile visit stop` until it succeeds (a stop killed part-way is run again)."""
        for _ in range(20):
            result = lastmile(self.config, "visit", "stop", "--no-gps")
            if result.returncode == 0:
                return
            if "no visit is open" in result.stderr + result.stdout:
                return  # the killed stop had got as far as closing it
            time.sleep(0.5)
        self.stats.cli_errors.append("visit stop: never succeeded")

    def import_stick(self, stick: Path) -> None:
        """`lastmile import` until it succeeds (a killed import is run again, as the doctor would)."""
        for _ in range(20):
            if lastmile(self.config, "import", "-q", str(stick)).returncode == 0:
                return
            self.stats.imports_failed += 1
            time.sleep(0.5)
        self.stats.cli_errors.append(f"import {stick.name}: never succeeded")

    def lan_store(self, data: bytes, uid: str) -> None:
        """The cart's C-STORE to the acquire service; a cart retries until it gets Success."""
        from pydicom import dcmread
        from pynetdicom import AE

        ds = dcmread(io.BytesIO(data))
        for attempt in range(60):
            ae = AE(ae_title=CART_AE)
            ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
            assoc = ae.associate("127.0.0.1", self.ports.lan, ae_title=GATEWAY_AE)
            if assoc.is_established:
                try:
                    status = assoc.send_c_store(ds)
                    if status is not None and status.get("Status") == 0x0000:
                        return
                finally:
                    assoc.release()
            if attempt:
                self.stats.lan_retries += 1
            time.sleep(0.5)
        self.stats.cli_errors.append(f"LAN store of {uid}: never succeeded")

    def assign_held(self, patient_id: str, name: str, *, on_console: bool = False) -> None:
        """The doctor assigns each held ECG of this patient (matched by file name in the key)."""
        for _ in range(40):
            mine = [s for s, p in list(self.pending_assign.values()) if p == patient_id]
            if not mine:
                return
            held = held_ecg_ids(Path(self.work / "data"))
            by_serial = {}
            for item_id, _key in held:
                serial = self.serial_of_item(item_id)
                if serial is not None:
                    by_serial[serial] = item_id
            for serial in list(mine):
                item_id = by_serial.get(serial)
                if item_id is None:
                    continue
                form = {"item_id": str(item_id), "patient_id": patient_id, "name": name}
                if (on_console and self.console_post("/today/assign-ecg", form)) or lastmile(
                    self.config, "patient", "assign", f"E{item_id}", patient_id, "--name", name
                ).returncode == 0:
                    self.pending_assign.pop(f"serial:{serial}", None)
                    self.stats.assigned += 1
            time.sleep(0.25)

    def assign_held_all(self) -> None:
        """At the end of the day: the cuff brought into range, and whatever is still waiting for
        the doctor assigned."""
        if self.ble is not None:
            self.ble.cuff_upload()
            cuff = [s for s, channel in self.truth.channel_of.items() if channel == BLE_CUFF]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                stored = {self.ble.serial_of(o) for _w, o in stored_observations(self.work / "data")}
                if stored >= set(cuff):
                    break
                time.sleep(0.5)
        self.assign_held_readings()
        for patient_id in sorted({p for _s, p in list(self.pending_assign.values())}):
            self.assign_held(patient_id, "")
        # any other ECG held for her (dated before its session began): she knows whose it was
        for item_id, _key in held_ecg_ids(self.work / "data"):
            serial = self.serial_of_item(item_id)
            if serial is not None and serial in self.truth.patient_of:
                patient_id = self.truth.patient_of[serial]
                if lastmile(self.config, "patient", "assign", f"E{item_id}", patient_id).returncode == 0:
                    self.stats.ecgs_held_then_assigned += 1

    def serial_of_item(self, item_id: int) -> int | None:
        """Which ECG an outbox item is (read from its payload, as the judge: never by the gateway)."""
        path = self.work / "data" / "outbox.sqlite"
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            row = conn.execute("SELECT payload_file FROM items WHERE id = ?", (item_id,)).fetchone()
        except sqlite3.OperationalError:
            row = None
        finally:
            conn.close()
        if not row or not row[0]:
            return None
        try:
            return serial_of((self.work / "data" / "payloads" / str(row[0])).read_bytes())
        except (OSError, ValueError, AttributeError):
            return None

    def look_at_console(self) -> None:
        """The console open all day: its pages asked for now and then."""
        from tests.console_harness import Client

        try:
            if self.browser is None:
                browser = Client(f"http://127.0.0.1:{self.ports.console}")
                browser.login(DOCTOR)
                self.browser = browser
            for page in ("/today", "/sent", "/reports"):
                status = self.browser.get(page).status
                if status == 200:
                    self.stats.console_pages += 1
                else:
                    self.console_problem(f"GET {page}: {status}")
        except (OSError, AssertionError) as exc:
            self.browser = None
            self.console_problem(f"pages: {type(exc).__name__} {str(exc)[:80]}")


# -- the county cardiologist ----------------------------------------------------------------------


WAVEFORM_CLASSES = "1.2.840.10008.5.1.4.1.1.9."


def ecg_instances(orthanc: Any) -> list[str]:
    """Orthanc ids of the ECGs it holds (the reports the cardiologist adds are not ECGs)."""
    out = []
    for series in orthanc.rest("/series?expand"):
        if series["MainDicomTags"].get("Modality") == "ECG":
            out += series["Instances"]
    return out


class Cardiologist:
    """Reads each ECG that reaches the reading center and files the report there (an SR, and a
    PDF for every third), as the county does; the gateway's report retrieval brings them back."""

    def __init__(self, orthanc: Any) -> None:
        from lastmile.demo.cardiologist import DemoCardiologist

        self.orthanc = orthanc
        self.reader = DemoCardiologist()
        self.read: dict[str, str] = {}  # study UID -> the patient the ECG named
        self.failures = 0

    def round(self) -> None:
        from lastmile.demo.cardiologist import StudyToRead, part10

        if not self.orthanc.running:
            return
        try:
            for instance_id in ecg_instances(self.orthanc):
                tags = self.orthanc.instance_tags(instance_id)
                study_uid = str(tags.get("StudyInstanceUID", ""))
                if study_uid in self.read:
                    continue
                study = StudyToRead(
                    study_uid=study_uid,
                    patient_id=str(tags.get("PatientID", "")),
                    patient_name=str(tags.get("PatientName", "")),
                    accession=str(tags.get("AccessionNumber", "")),
                    description=str(tags.get("StudyDescription", "")),
                    ecg_sop_class_uid=str(tags.get("SOPClassUID", "")),
                    ecg_sop_instance_uid=str(tags.get("SOPInstanceUID", "")),
                    ecg_series_uid=str(tags.get("SeriesInstanceUID", "")),
                )
                for report in self.reader(study):
                    self.orthanc.rest("/instances", "POST", part10(report))
                self.read[study_uid] = study.patient_id
        except (OSError, ValueError):
            self.failures += 1  # the reading center went down under us: next round

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(3.0):
            self.round()


def judge_reports(data_dir: Path, orthanc: Any, truth: Truth) -> dict[str, int]:
    """The reports the gateway brought back, each on the patient its ECG was really taken from."""
    from lastmile.reports.store import ReportStore

    study_truth: dict[str, str] = {}
    for instance_id in ecg_instances(orthanc):
        tags = orthanc.instance_tags(instance_id)
        with contextlib.suppress(ValueError, KeyError, AttributeError):
            serial = serial_of(orthanc.instance_file(instance_id))
            study_truth[str(tags["StudyInstanceUID"])] = truth.patient_of.get(serial, "?")
    store = ReportStore.open(data_dir)
    try:
        current = store.reports(current_only=True)
        wrong = 0
        for report in current:
            sent = store.study(report.study_uid)
            shown_on = {report.patient_id, sent.patient_id if sent else "?"}
            if shown_on != {study_truth.get(report.study_uid)}:
                wrong += 1
        studies_back = {r.study_uid for r in current}
    finally:
        store.close()
    return {
        "reports_returned": len(current),
        "studies_reported": len(studies_back),
        "reports_misattributed": wrong,
        "reports_missing": len(set(study_truth) - studies_back),
    }


# -- the county health platform ------------------------------------------------------------------


def county_platform_class() -> type[Any]:
    """The county FHIR platform: tests/fhir_server's receiver (every resource validated with
    fhir.resources, conditional create, atomic transactions) on a fixed port, whose link goes down
    and comes back, and which answers each transaction a little late (a kill lands in between)."""
    from http.server import ThreadingHTTPServer

    from tests.fhir_server import FhirTestServer

    class QuietHttpServer(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: object, client_address: object) -> None:
            pass  # a killed forwarder leaves a broken pipe: expected here

    class CountyPlatform(FhirTestServer):
        def __init__(self, port: int) -> None:
            super().__init__(response_delay_s=0.3)
            self.port = port
            self.running = False
            self.applied_unanswered = threading.Event()  # a transaction applied, its answer not yet sent
            self._httpd.server_close()  # bound to an ephemeral port: listen on ours instead
            self._httpd = self._listen()

        @property
        def base_url(self) -> str:
            return f"http://127.0.0.1:{self.port}/fhir"

        def _listen(self, patience_s: float = 30.0) -> QuietHttpServer:
            """Listen on our port. A soak rehearsal once found it taken at the instant the link
            came back (Errno 98; what held it was not recorded): wait for it, and say who holds it."""
            deadline = time.monotonic() + patience_s
            while True:
                try:
                    return QuietHttpServer(("127.0.0.1", self.port), self._handler())
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                        holders = subprocess.run(
                            ["ss", "-tanp", f"( sport = :{self.port} or dport = :{self.port} )"],
                            capture_output=True,
                            text=True,
                            check=False,
                        ).stdout
                        raise OSError(
                            exc.errno, f"county platform port {self.port}: {exc}; held by:\n{holders}"
                        ) from exc
                    time.sleep(0.2)

        def start(self) -> None:
            if not self.running:
                if self._httpd is None:  # stopped: the port was given back
                    self._httpd = self._listen()
                server = self._httpd
                threading.Thread(target=server.serve_forever, name="county-platform", daemon=True).start()
                self.running = True

        def stop(self) -> None:
            if self.running:
                self._httpd.shutdown()
                self.running = False
            if self._httpd is not None:
                self._httpd.server_close()
                self._httpd = None

        def close(self) -> None:
            self.stop()

        def apply_transaction(self, bundle: dict) -> dict:
            result = super().apply_transaction(bundle)
            self.applied_unanswered.set()  # the answer follows response_delay_s later
            return result

    return CountyPlatform


@contextlib.contextmanager
def county_platform(port: int) -> Iterator[Any]:
    platform = county_platform_class()(port)
    platform.start()
    try:
        yield platform
    finally:
        platform.close()


def identifier_of(resource: dict) -> str:
    idents = resource.get("identifier") or []
    return str(idents[0].get("value", "")) if idents else ""


def subject_of(resource: dict) -> str:
    return str(((resource.get("subject") or {}).get("identifier") or {}).get("value", ""))


def judge_platform(platform: Any, truth: Truth) -> dict[str, Any]:
    """The county platform's resources, compared with the truth: each field visit once (its
    Encounter, its note, its Provenance), on its patient; no resource stored twice."""
    encounters = {f"Encounter/{r['id']}": r for r in platform.resources("Encounter")}
    seen: collections.Counter[int] = collections.Counter()
    misattributed = 0
    for obs in platform.resources("Observation"):
        text = str(obs.get("valueString", ""))
        if not text.startswith(NOTE_PREFIX):
            continue
        serial = int(text.removeprefix(NOTE_PREFIX))
        seen[serial] += 1
        encounter = encounters.get(str((obs.get("encounter") or {}).get("reference", "")), {})
        if {subject_of(obs), subject_of(encounter)} != {truth.patient_of.get(serial)}:
            misattributed += 1
    duplicated_resources = 0
    twice: list[str] = []  # which ones, to find the kill that did it
    for kind in ("Encounter", "Observation", "Provenance", "Device", "Location"):
        counts = collections.Counter(identifier_of(r) for r in platform.resources(kind) if identifier_of(r))
        duplicated_resources += sum(n - 1 for n in counts.values() if n > 1)
        twice += [f"{kind} {ident}: {n}" for ident, n in counts.items() if n > 1]
    # one Provenance per visit bundle (the signed chain record): more means a visit applied twice
    duplicated_resources += max(0, len(platform.resources("Provenance")) - len(encounters))
    expected = {s for s, channel in truth.channel_of.items() if channel == FIELD_VISIT}
    return {
        "visits": len(expected),
        "visits_received": sum(seen.values()),
        "visits_lost": len(expected - set(seen)),
        "visits_duplicated": sum(n - 1 for n in seen.values() if n > 1) + len(set(seen) - expected),
        "visits_misattributed": misattributed,
        "fhir_resources": sum(len(platform.resources(k)) for k in ("Encounter", "Observation", "Provenance")),
        "fhir_resources_duplicated": duplicated_resources,
        "fhir_resends_absorbed": sum(platform.applied.values()) - len(platform.applied),
        "fhir_duplicates": sorted(twice)
        + [f"visit {s}: {n}" for s, n in seen.items() if n > 1 or s not in expected]
        + (
            [f"Provenance: {len(platform.resources('Provenance'))} for {len(encounters)} visits"]
            if len(platform.resources("Provenance")) > len(encounters)
            else []
        ),
    }


# -- the judge ----------------------------------------------------------------------------------------


@dataclass
class Verdict:
    measurements: int
    received: int
    lost: int
    duplicated: int
    misattributed: int
    unreadable: int
    by_channel: dict[str, int]
    duplicates: list[str]  # which ECGs (serial: channel, times held), to find the kill that did it


def judge(orthanc: Any, truth: Truth) -> Verdict:
    """What the reading center holds, compared with the truth: each ECG once, on its patient."""
    seen: collections.Counter[int] = collections.Counter()
    misattributed = unreadable = 0
    ids = ecg_instances(orthanc)
    for instance_id in ids:
        tags = orthanc.instance_tags(instance_id)
        try:
            serial = serial_of(orthanc.instance_file(instance_id))
        except (ValueError, KeyError, AttributeError):
            unreadable += 1
            continue
        seen[serial] += 1
        if truth.patient_of.get(serial) != tags.get("PatientID"):
            misattributed += 1
    expected = {s for s, channel in truth.channel_of.items() if channel in ECG_CHANNELS}
    return Verdict(
        measurements=len(expected),
        received=len(ids),
        lost=len(expected - set(seen)),
        duplicated=sum(n - 1 for n in seen.values() if n > 1) + len(set(seen) - expected),
        misattributed=misattributed,
        unreadable=unreadable,
        by_channel=dict(collections.Counter(c for c in truth.channel_of.values() if c in ECG_CHANNELS)),
        duplicates=sorted(
            f"{s}: {truth.channel_of.get(s, 'not made')}, held {n}"
            for s, n in seen.items()
            if n > 1 or s not in expected
        ),
    )


def rss_figures(samples: dict[str, list[tuple[float, float, int, float]]], simulated_h: float) -> dict[str, Any]:
    """Peak RSS (and PSS) per service; growth from the first quarter's median to the last
    quarter's, per simulated hour (a restarted service starts again from its baseline, so only
    rises count); the same from the second quarter (after warm-up); the median of each tenth."""
    out: dict[str, Any] = {
        "rss_max_mb": {},
        "pss_max_mb": {},
        "rss_growth_mb_per_h": {},
        "rss_growth_after_warmup_mb_per_h": {},
        "rss_mb_by_tenth": {},
        "fds_growth": {},
    }
    for name, rows in samples.items():
        if not rows:
            continue
        out["rss_max_mb"][name] = round(max(r[1] for r in rows), 1)
        out["pss_max_mb"][name] = round(max(r[3] for r in rows), 1)
        q = max(1, len(rows) // 4)
        first, second, last = rows[:q], rows[q : 2 * q] or rows[:q], rows[-q:]
        rss_rise = float(np.median([r[1] for r in last]) - np.median([r[1] for r in first]))
        # the quarters' middles are three quarters of the day apart
        out["rss_growth_mb_per_h"][name] = round(rss_rise / (simulated_h * 0.75), 2) if simulated_h else 0.0
        # warm-up (first ECG decoded, first association, caches filled) against a leak: the rise
        # from the second quarter to the last, over the half-day between their middles
        steady_rise = float(np.median([r[1] for r in last]) - np.median([r[1] for r in second]))
        out["rss_growth_after_warmup_mb_per_h"][name] = (
            round(steady_rise / (simulated_h / 2), 2) if simulated_h else 0.0
        )
        # the curve itself: the median RSS of each tenth of the day
        tenth = max(1, len(rows) // 10)
        out["rss_mb_by_tenth"][name] = [
            round(float(np.median([r[1] for r in rows[i : i + tenth]])), 1) for i in range(0, tenth * 10, tenth)
        ][:10]
        out["fds_growth"][name] = int(np.median([r[2] for r in last]) - np.median([r[2] for r in first]))
    return out


@contextlib.contextmanager
def reading_center(work: Path, listen_port: int) -> Iterator[Any]:
    """Orthanc (tests/peers.py) knowing the gateway's AE and its commitment listener."""
    from tests.peers import OrthancServer, gateway_modality

    orthanc = OrthancServer(work / "orthanc", modalities=gateway_modality(GATEWAY_AE, listen_port))
    orthanc.start()
    try:
        yield orthanc
    finally:
        orthanc.stop()


UNFINISHED = ("queued", "sending", "sent", "committed")


def wait_drained(data_dir: Path, limit_s: float) -> dict[str, int]:
    """Until every DICOM item is purged (or quarantined), every reading relayed and every FHIR
    bundle delivered, or the limit passes; the DICOM states, with the readings not yet relayed as
    'observations_unrelayed' and the FHIR bundles still unsent as 'fhir_unsent'."""
    deadline = time.monotonic() + limit_s
    while True:
        states = outbox_states(data_dir)
        # a reading assigned in the day's last minutes is relayed (made a FHIR bundle) by the
        # forward service's next round: the bundles can all be sent before it is even queued
        readings = outbox_states(data_dir, "observation")
        states["observations_unrelayed"] = sum(readings.get(s, 0) for s in ("queued", "sending", "held"))
        fhir = outbox_states(data_dir, FHIR_KIND)
        states["fhir_unsent"] = sum(fhir.get(s, 0) for s in ("queued", "sending", "held"))
        states["fhir_quarantined"] = fhir.get("quarantined", 0)
        waiting = (
            any(states.get(s, 0) for s in (*UNFINISHED, "held"))
            or states["observations_unrelayed"]
            or states["fhir_unsent"]
        )
        if not waiting or time.monotonic() >= deadline:
            return states
        time.sleep(1.0)


# -- the day's set-up, shared by the soak and the kill campaign ---------------------------------------


@dataclass
class Day:
    work: Path
    data_dir: Path
    config: Path
    orthanc: Any
    platform: Any
    truth: Truth
    clinic: Clinic
    services: Supervisor


@contextlib.contextmanager
def clinic_day(prefix: str, seed: int) -> Iterator[Day]:
    """A working directory, the reading center and the county platform, the gateway's services
    running and the doctor's console account made; everything stopped and removed at the end."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        data_dir = work / "data"
        (work / "logs").mkdir()
        ports = Ports(*(free_port() for _ in range(5)))
        with reading_center(work, ports.listen) as orthanc, county_platform(ports.county_platform) as platform:
            ports.reading_center = orthanc.dicom_port
            bridge = BridgeCart(work / "usb-ecg-bridge")
            config = write_config(work / "lastmile.toml", data_dir, ports, orthanc.aet, bridge.device.link_path)
            truth = Truth()
            clinic = Clinic(config, work, ports, truth, seed)
            clinic.bridge = bridge
            clinic.ble = BleDevices(work / "ble-devices")
            clinic.add_doctor()
            services = Supervisor(config, work / "logs", clinic.ble.directory)
            services.start()
            bridge.start()
            try:
                yield Day(work, data_dir, config, orthanc, platform, truth, clinic, services)
            finally:
                services.stop()
                bridge.stop()


def verdict_figures(day: Day, states: dict[str, int]) -> dict[str, Any]:
    """The issue's figures over every kind of measurement (ECGs at the reading center, field
    visits at the county platform), and each kind's own."""
    ecg = judge(day.orthanc, day.truth)
    visits = judge_platform(day.platform, day.truth)
    assert day.clinic.ble is not None
    ble = judge_ble(day.data_dir, day.clinic.ble, day.truth, day.platform)
    return {
        "measurements": ecg.measurements + visits["visits"] + ble["ble_readings"],
        "lost": ecg.lost + visits["visits_lost"] + ble["ble_lost"],
        "duplicated": ecg.duplicated
        + visits["visits_duplicated"]
        + visits["fhir_resources_duplicated"]
        + ble["ble_duplicated"],
        "misattributed": ecg.misattributed + visits["visits_misattributed"] + ble["ble_misattributed"],
        "ecgs": ecg.measurements,
        "received": ecg.received,
        "unreadable": ecg.unreadable,
        "by_channel": ecg.by_channel,
        "ecg_duplicates": ecg.duplicates,
        **visits,
        **ble,
        # BLE readings in the outbox that nothing sends on (kind "observation" has no sender)
        "observations_unsent": outbox_states(day.data_dir, "observation").get("queued", 0),
        "ble_readings_assigned": day.clinic.stats.readings_assigned,
        "ecgs_held_then_assigned": day.clinic.stats.ecgs_held_then_assigned,
        "ble_waits_timed_out": day.clinic.stats.ble_waits_timed_out,
        "bridge_ecgs_retaken": day.clinic.bridge.retaken if day.clinic.bridge else 0,
        "held_unassigned": states.get("held", 0) + ble["ble_held"],
        "stuck": sum(states.get(s, 0) for s in UNFINISHED)
        + states.get("observations_unrelayed", 0)
        + states.get("fhir_unsent", 0),
        "quarantined": states.get("quarantined", 0) + states.get("fhir_quarantined", 0),
    }
