"""Real DICOM peers for tests: Orthanc, dcmtk's storescp, and a scripted pynetdicom SCP.

Use the classes directly, or the pytest fixtures at the bottom (conftest.py registers this module
with `pytest_plugins`, so `orthanc_factory`, `storescp_factory`, `scripted_scp_factory`,
`tls_material` and `ecg_sample` are available to every test).
Every peer listens on loopback only, on a free port, and is stopped by its fixture.
Orthanc listens on every interface: `OrthancServer.start()` requires the private network
namespace scripts/test.sh runs the suite in.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from lastmile.demo.loopback import free_port
from lastmile.demo.reading_center import commitment_item
from tests.conftest import require_private_netns, require_tool
from tests.tls_material import TlsMaterial, make_tls_material
from uploader.dicom_association import ECG_STORAGE_CLASSES, STORAGE_COMMITMENT_INSTANCE, stop_server

ALL_TRANSFER_SYNTAXES = (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
NO_SUCH_OBJECT_INSTANCE = 0x0112


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# -- test objects ---------------------------------------------------------------------------------

ECG_SAMPLE = "waveform_ecg.dcm"  # pydicom's 12-lead ECG (Explicit VR LE, 291 KB, private tags)


@dataclass(frozen=True)
class EcgPayload:
    data: bytes  # Explicit VR Little Endian Part-10 bytes, as the outbox stores them
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str


def ecg_payloads(n: int, *, study_uid: str | None = None, sop_class_uid: str | None = None) -> list[EcgPayload]:
    """`n` distinct ECG objects derived from pydicom's 12-lead waveform_ecg.dcm
    (`sop_class_uid` relabels them, e.g. as General ECG, for SOP-class negotiation tests)."""
    template = dcmread(get_testdata_file(ECG_SAMPLE))
    if sop_class_uid:
        template.SOPClassUID = sop_class_uid
        template.file_meta.MediaStorageSOPClassUID = sop_class_uid
    study = study_uid or generate_uid()
    series = generate_uid()
    out = []
    ds = template  # every field that varies is set on each pass: no need to copy the waveform
    for i in range(n):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = i + 1
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(EcgPayload(buf.getvalue(), str(ds.SOPClassUID), uid, study))
    return out


# -- Orthanc --------------------------------------------------------------------------------------

LOCK_DOWN: dict[str, Any] = {  # NOTES.md: with these an unknown calling AE is rejected
    "DicomCheckCalledAet": True,
    "DicomCheckModalityHost": True,
    "DicomAlwaysAllowEcho": False,
    "DicomAlwaysAllowStore": False,
    "RemoteAccessAllowed": False,
    "Plugins": [],
}

# Orthanc's /instances and /changes show an instance once however often it was stored (a re-send is
# "AlreadyStored"). Its Lua ReceivedInstanceFilter runs for every incoming instance, before the
# store: it appends one line per C-STORE (checked with Orthanc 1.10.1: 4 stores of one object, 4
# lines, 1 NewInstance change). Lua's io library is available in Orthanc's interpreter. A test's
# own Lua script (extra={"LuaScripts": [...]}) may define OnCStoreReceived(dicom): called there too,
# before Orthanc stores the object and answers the C-STORE (which waits for it).
C_STORE_COUNTER_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  if origin["RequestOrigin"] == "DicomProtocol" then
    local log = io.open("{path}", "a")
    log:write(tostring(dicom.SOPInstanceUID) .. "\\n")
    log:close()
    if OnCStoreReceived ~= nil then
      OnCStoreReceived(dicom)
    end
  end
  return true
end
"""


# A test's OnCStoreReceived (above): it says the object came, then waits (at most `wait_s`) until
# the test says go - the test takes another process's lock meanwhile - before Orthanc stores the
# object and answers.
WAIT_FOR_THE_TEST_LUA = """
function OnCStoreReceived(dicom)
  io.open("{received}", "w"):close()
  for i = 1, {polls} do
    local go = io.open("{go}", "r")
    if go ~= nil then
      go:close()
      return
    end
    os.execute("sleep 0.05")
  end
end
"""


def c_store_held_for_the_test(hook: Path, received: Path, go: Path, wait_s: float = 60.0) -> Path:
    """`hook` (for extra={"LuaScripts": [hook]}): each C-STORE touches `received`, then waits for `go`."""
    hook.write_text(
        WAIT_FOR_THE_TEST_LUA.replace("{received}", str(received))
        .replace("{go}", str(go))
        .replace("{polls}", str(int(wait_s * 20)))
    )
    return hook


def _count_lines(path: Path) -> collections.Counter[str]:
    try:
        return collections.Counter(line for line in path.read_text().splitlines() if line)
    except FileNotFoundError:
        return collections.Counter()


def forward_toml(
    path: Path,
    data_dir: Path,
    *,
    port: int,
    called_ae: str,
    listen_port: int,
    timeout_s: float = 30.0,
    commitment: bool = True,
    min_free_mb: int = 0,
    retention_days: float | None = None,
    reports: str = "off",
) -> Path:
    """`lastmile forward`'s configuration at `path`: the outbox in `data_dir`, ECGs to the reading center
    `called_ae` on 127.0.0.1:`port`, quick backoff. With `commitment`, storage commitment (listening on
    `listen_port`); without, what is sent is purged. `retention_days` 0 purges a committed ECG at once;
    `reports` is where reports come back from ("off": no report polling)."""
    retention = "" if retention_days is None else f"retention_days = {retention_days:g}\n"
    committed = (
        "commitment_timeout_s = 30.0\n"
        if commitment
        else 'storage_commitment = false\nno_commitment_policy = "purge"\n'
    )
    path.write_text(
        f"""
[gateway]
data_dir = "{data_dir}"
[reading_center]
host = "127.0.0.1"
port = {port}
called_ae = "{called_ae}"
calling_ae = "CLINIC01"
listen_port = {listen_port}
listen_host = "127.0.0.1"
timeout_s = {timeout_s:.1f}
{committed}[outbox]
backoff_base_s = 0.1
backoff_max_s = 0.5
min_free_mb = {min_free_mb}
{retention}[ecg]
re_record_hold_s = 0
[reports]
source = "{reports}"
"""
    )
    return path


def forward_to_orthanc_toml(
    tmp_path: Path, pacs: OrthancServer, listen_port: int, *, retention_days: float | None = None
) -> Path:
    """`lastmile forward`'s configuration to `pacs` with storage commitment (listening on
    `listen_port`), quick backoff, no report polling; `retention_days` 0 purges a committed ECG at once."""
    return forward_toml(
        tmp_path / "lastmile.toml",
        tmp_path / "data",
        port=pacs.dicom_port,
        called_ae=pacs.aet,
        listen_port=listen_port,
        retention_days=retention_days,
    )


def gateway_modality(ae_title: str, port: int, name: str = "gateway") -> dict[str, list]:
    """A DicomModalities entry for the gateway: where Orthanc sends commitment reports."""
    return {name: [ae_title, "127.0.0.1", port]}


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, always direct


class OrthancServer:
    """Orthanc 1.10 as the reading center, with its own storage under `workdir`.

    `modalities` lists the AEs it knows (our gateway, with the port of its CommitmentListener);
    with none, it refuses every calling AE. `restart(modalities=...)` keeps the storage.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "READING_CENTER",
        modalities: Mapping[str, Sequence[Any]] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.extra = dict(extra or {})
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.storage = workdir / "storage"
        self.log_path = workdir / "orthanc.log"
        self.c_store_log = workdir / "c-stores.log"
        self._proc: subprocess.Popen | None = None

    def config(self) -> dict[str, Any]:
        counter = self.workdir / "count-c-stores.lua"
        counter.write_text(C_STORE_COUNTER_LUA.replace("{path}", str(self.c_store_log)))
        return {
            "Name": "lastmile-test-reading-center",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "DicomModalities": self.modalities,
            **LOCK_DOWN,
            **self.extra,
            "LuaScripts": [str(counter), *self.extra.get("LuaScripts", [])],
        }

    def start(self, timeout_s: float = 30.0) -> OrthancServer:
        require_private_netns()
        binary = require_tool("Orthanc")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        env = {**os.environ, "TCP_NODELAY": "1"}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                self.rest("/system")
                wait_for_port(self.dicom_port, max(0.1, deadline - time.monotonic()), self._proc)
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer on {self.http_port}:\n{self.log_tail()}")

    def stop(self) -> None:
        """Clean stop (takes a few seconds: its HTTP and DICOM servers poll)."""
        proc, self._proc = self._proc, None
        stop_process(proc)

    def kill(self) -> None:
        """Die like a power cut: the association in progress is reset."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def restart(
        self, *, modalities: Mapping[str, Sequence[Any]] | None = None, extra: Mapping[str, Any] | None = None
    ) -> OrthancServer:
        """Stop, change the configuration, start again on the same storage and ports."""
        self.stop()
        if modalities is not None:
            self.modalities = dict(modalities)
        if extra is not None:
            self.extra = dict(extra)
        return self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # REST (what really arrived)
    def rest(self, path: str, method: str = "GET", body: bytes | None = None) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        with _NO_PROXY.open(req, timeout=10) as rsp:
            raw = rsp.read()
        return json.loads(raw) if raw else None

    def instances(self) -> list[str]:
        return list(self.rest("/instances"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.rest(f"/instances/{instance_id}/simplified-tags"))

    def instance_metadata(self, instance_id: str, name: str) -> str:
        url = f"http://127.0.0.1:{self.http_port}/instances/{instance_id}/metadata/{name}"
        with _NO_PROXY.open(url, timeout=10) as rsp:
            return rsp.read().decode()

    def instance_file(self, instance_id: str) -> bytes:
        with _NO_PROXY.open(f"http://127.0.0.1:{self.http_port}/instances/{instance_id}/file", timeout=10) as rsp:
            return rsp.read()

    def c_stores(self) -> collections.Counter[str]:
        """SOP Instance UID -> how many C-STOREs of it Orthanc received, over all its restarts."""
        return _count_lines(self.c_store_log)

    def sop_instance_uids(self) -> set[str]:
        expanded = self.rest("/instances?expand")
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in expanded}

    def instance_id_of(self, sop_instance_uid: str) -> str | None:
        found = self.rest("/tools/lookup", "POST", sop_instance_uid.encode())
        return next((f["ID"] for f in found if f["Type"] == "Instance"), None)

    def study_uids(self) -> set[str]:
        return {s["MainDicomTags"]["StudyInstanceUID"] for s in self.rest("/studies?expand")}

    def statistics(self) -> dict[str, Any]:
        return dict(self.rest("/statistics"))

    def delete_instance(self, instance_id: str) -> None:
        self.rest(f"/instances/{instance_id}", "DELETE")


# -- dcmtk storescp -------------------------------------------------------------------------------


class StorescpServer:
    """dcmtk's storescp: a storage SCP without storage commitment.

    accept: "default" (explicit/implicit, no deflate), "deflated" (+xd: prefers deflated),
    "implicit" (+xi: implicit VR only). tls: (material, require client certificate).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        ae_title: str = "STORESCP",
        accept: str = "default",
        tls: TlsMaterial | None = None,
        require_client_cert: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.ae_title = ae_title
        self.accept = accept
        self.tls = tls
        self.require_client_cert = require_client_cert
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.output_dir = workdir / "received"
        self.log_path = workdir / "storescp.log"
        self.c_store_log = workdir / "c-stores.log"
        self._proc: subprocess.Popen | None = None

    def command(self, binary: str) -> list[str]:
        cmd = [
            binary,
            "-aet",
            self.ae_title,
            "-od",
            str(self.output_dir),
            "-ta",
            "10",
            "-td",
            "30",
            # one line per received object (#f: its file name, modality prefix + SOP Instance UID):
            # a re-send overwrites the file, the line stays; -xs: written before the C-STORE-RSP
            "-xcr",
            f"echo #f >> {self.c_store_log}",
            "-xs",
        ]
        cmd += {"default": [], "deflated": ["+xd"], "implicit": ["+xi"]}[self.accept]
        if self.tls is not None:
            cmd += [
                "+tls",
                str(self.tls.server_key),
                str(self.tls.server_cert),
                "+cf",
                str(self.tls.ca_cert),
                "-rc" if self.require_client_cert else "-vc",
            ]
        return [*cmd, *self.extra_args, str(self.port)]

    def start(self, timeout_s: float = 10.0) -> StorescpServer:
        binary = require_tool("storescp")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TCP_NODELAY": "1"}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(binary), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )
        try:
            wait_for_port(self.port, timeout_s, self._proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"storescp did not start: {exc}\n{self.log_tail()}") from None
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, 5.0)

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def received_files(self) -> list[Path]:
        return sorted(p for p in self.output_dir.iterdir() if p.is_file())

    def c_stores(self) -> collections.Counter[str]:
        """SOP Instance UID -> how many C-STOREs of it storescp received."""
        return collections.Counter({name.split(".", 1)[1]: n for name, n in _count_lines(self.c_store_log).items()})

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> StorescpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- scripted pynetdicom SCP ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedStore:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    calling_ae: str
    status: int
    dataset: Dataset | None  # decoded (keep_datasets=True)


@dataclass
class ScriptedStoreSCP:
    """A pynetdicom storage SCP that answers what the test chose.

    - `statuses[sop_instance_uid]`: statuses for successive stores of that instance (the last
      one repeats), e.g. [0xA700, 0x0000] = out of resources, then stored;
    - `sequence`: statuses for successive stores whatever the instance, then `default_status`;
    - `reject="permanent"`: reject every association (calling AE not recognised);
    - `abort_after`: abort the association when this many stores have been answered;
    - `delay_s`: wait before answering each store (DIMSE timeout tests);
    - `hold`: instances whose stores are never answered while the SCP runs (the sender stays
      mid-send: tests kill it there); `arrivals` lists every store as it arrives;
    - `commitment`: accept Storage Commitment; N-ACTION answered `commitment_status`; with
      `report_to=(host, port, ae)` the report follows on a new association (SCP role), with
      `report_on_same_association` on the requesting one. Instances it never stored are
      reported failed with 0x0112.
    """

    ae_title: str = "SCRIPTED"
    statuses: dict[str, list[int]] = field(default_factory=dict)
    sequence: list[int] = field(default_factory=list)
    default_status: int = 0x0000
    reject: str | None = None
    abort_after: int | None = None
    delay_s: float = 0.0
    hold: frozenset[str] = frozenset()
    transfer_syntaxes: Sequence[str] = ALL_TRANSFER_SYNTAXES
    sop_classes: Sequence[str] = ECG_STORAGE_CLASSES
    commitment: bool = False
    commitment_status: int = 0x0000
    report_to: tuple[str, int, str] | None = None
    report_on_same_association: bool = False
    report_delay_s: float = 0.05
    report_before_response: bool = False  # send the report (report_to) before answering the N-ACTION
    report_tls_args: tuple[Any, str] | None = None  # (ssl.SSLContext, server name) for report_to
    keep_datasets: bool = False
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    received: list[ReceivedStore] = field(default_factory=list)
    actions: list[Dataset] = field(default_factory=list)
    reports_sent: list[tuple[int, Dataset, int]] = field(default_factory=list)  # (type, info, status)
    associations: int = 0
    arrivals: list[str] = field(default_factory=list)
    _released: threading.Event = field(default_factory=threading.Event)
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> ScriptedStoreSCP:
        ae = AE(ae_title=self.ae_title)
        for uid in self.sop_classes:
            ae.add_supported_context(uid, list(self.transfer_syntaxes))
        ae.add_supported_context(Verification)
        if self.commitment:
            ae.add_supported_context(StorageCommitmentPushModel)
        if self.reject == "permanent":
            ae.require_calling_aet = ["NOBODY_KNOWN"]
        elif self.reject is not None:
            raise ValueError(f"reject must be 'permanent' (see RawAcsePeer for others), not {self.reject!r}")
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_ACTION, self._on_action),
            (evt.EVT_ESTABLISHED, self._on_established),
        ]
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        self._released.set()
        server, self._server = self._server, None
        if server is not None:
            stop_server(server)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> ScriptedStoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def received_uids(self) -> list[str]:
        with self._lock:
            return [r.sop_instance_uid for r in self.received]

    def _on_established(self, event: evt.Event) -> None:
        with self._lock:
            self.associations += 1

    def _next_status(self, uid: str) -> int:
        queue = self.statuses.get(uid)
        if queue:
            return queue.pop(0) if len(queue) > 1 else queue[0]
        if self.sequence:
            return self.sequence.pop(0)
        return self.default_status

    def _on_store(self, event: evt.Event) -> int:
        req = event.request
        uid = str(req.AffectedSOPInstanceUID)
        with self._lock:
            self.arrivals.append(uid)
        if uid in self.hold:
            self._released.wait(300)
            return 0xA700
        if self.delay_s:
            time.sleep(self.delay_s)
        dataset = event.dataset if self.keep_datasets else None  # decodes (inflates) it
        with self._lock:
            status = self._next_status(uid)
            self.received.append(
                ReceivedStore(
                    uid,
                    str(req.AffectedSOPClassUID),
                    str(event.context.transfer_syntax),
                    str(event.assoc.requestor.ae_title).strip(),
                    status,
                    dataset,
                )
            )
            answered = len(self.received)
        if self.abort_after is not None and answered >= self.abort_after:
            event.assoc.abort()
        return status

    def _on_action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        request = event.action_information
        with self._lock:
            self.actions.append(request)
            stored = {r.sop_instance_uid for r in self.received if r.status in (0x0000, 0x0001, 0xB000, 0xB006, 0xB007)}
        if self.commitment_status != 0x0000:
            return self.commitment_status, None
        info = Dataset()
        info.TransactionUID = request.TransactionUID
        ok, failed = [], []
        for ref in request.get("ReferencedSOPSequence", []):
            sop_class, sop_instance = str(ref.ReferencedSOPClassUID), str(ref.ReferencedSOPInstanceUID)
            if sop_instance in stored:
                ok.append(commitment_item(sop_class, sop_instance))
            else:
                failed.append(commitment_item(sop_class, sop_instance, NO_SUCH_OBJECT_INSTANCE))
        if ok:
            info.ReferencedSOPSequence = ok
        if failed:
            info.FailedSOPSequence = failed
        event_type = 2 if failed else 1
        if self.report_on_same_association:
            target: Callable[[], None] = lambda: self._report_same(event.assoc, event_type, info)
        elif self.report_to is not None and self.report_before_response:
            self._report_new(event_type, info)  # the report overtakes the N-ACTION's response
            return 0x0000, None
        elif self.report_to is not None:
            target = lambda: self._report_new(event_type, info)
        else:
            return 0x0000, None
        t = threading.Thread(target=target, name="scripted-commitment-report", daemon=True)
        self._threads.append(t)
        t.start()
        return 0x0000, None

    def _report_same(self, assoc: Any, event_type: int, info: Dataset) -> None:
        time.sleep(self.report_delay_s)
        status, _ = assoc.send_n_event_report(info, event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
        self.reports_sent.append((event_type, info, int(status.get("Status", -1))))

    def _report_new(self, event_type: int, info: Dataset) -> None:
        time.sleep(self.report_delay_s)
        assert self.report_to is not None
        host, port, ae_title = self.report_to
        ae = AE(ae_title=self.ae_title)
        role = build_role(StorageCommitmentPushModel, scp_role=True)
        assoc = ae.associate(
            host,
            port,
            [build_context(StorageCommitmentPushModel)],
            ae_title=ae_title,
            ext_neg=[role],
            tls_args=self.report_tls_args,
        )
        status_code = -1
        if assoc.is_established:
            status, _ = assoc.send_n_event_report(
                info, event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
            )
            status_code = int(status.get("Status", -1))
            assoc.release()
        self.reports_sent.append((event_type, info, status_code))


class RawAcsePeer:
    """Answers every A-ASSOCIATE-RQ with fixed PDU bytes, or never (`reply=None`): the answers a
    pynetdicom SCP cannot be made to give (rejected-transient, A-ABORT, silence)."""

    REJECT_TRANSIENT = bytes([0x03, 0, 0, 0, 0, 4, 0, 0x02, 0x01, 0x01])  # transient, user, no reason
    REJECT_PERMANENT_CALLED_AE = bytes([0x03, 0, 0, 0, 0, 4, 0, 0x01, 0x01, 0x07])
    ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x00, 0x00])  # A-ABORT from the service user

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.port = free_port()
        self.requests = 0
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="raw-acse-peer", daemon=True)

    def start(self) -> RawAcsePeer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def __enter__(self) -> RawAcsePeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(0.1)
                header = b""
                while len(header) < 6 and not self._stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        chunk = conn.recv(6 - len(header))
                        if not chunk:
                            break
                        header += chunk
                self.requests += 1
                if self.reply is not None:
                    conn.sendall(self.reply)
                while not self._stop.is_set():  # hold the connection until the caller closes it
                    try:
                        if not conn.recv(65536):
                            break
                    except TimeoutError:
                        continue
                    except OSError:
                        break


# -- pytest fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def ecg_sample() -> list[EcgPayload]:
    """Twenty distinct ECG payloads (build more with `ecg_payloads(n)`)."""
    return ecg_payloads(20)


@pytest.fixture
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., OrthancServer]]:
    """`make(modalities=..., start=True, **kw)`: every server made is stopped afterwards."""
    made: list[OrthancServer] = []

    def make(*, start: bool = True, **kwargs: Any) -> OrthancServer:
        server = OrthancServer(tmp_path_factory.mktemp("orthanc"), **kwargs)
        made.append(server)
        return server.start() if start else server

    yield make
    # each clean stop takes seconds of polling: stop them side by side
    stoppers = [threading.Thread(target=server.stop) for server in made]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join()


@pytest.fixture
def storescp_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., StorescpServer]]:
    made: list[StorescpServer] = []

    def make(*, start: bool = True, **kwargs: Any) -> StorescpServer:
        server = StorescpServer(tmp_path_factory.mktemp("storescp"), **kwargs)
        made.append(server)
        return server.start() if start else server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def scripted_scp_factory() -> Iterator[Callable[..., ScriptedStoreSCP]]:
    made: list[ScriptedStoreSCP] = []

    def make(**kwargs: Any) -> ScriptedStoreSCP:
        scp = ScriptedStoreSCP(**kwargs).start()
        made.append(scp)
        return scp

    yield make
    for scp in made:
        scp.stop()


__all__ = [
    "ALL_TRANSFER_SYNTAXES",
    "EcgPayload",
    "OrthancServer",
    "RawAcsePeer",
    "ReceivedStore",
    "ScriptedStoreSCP",
    "StorescpServer",
    "TlsMaterial",
    "ecg_payloads",
    "ecg_sample",
    "free_port",
    "gateway_modality",
    "orthanc_factory",
    "scripted_scp_factory",
    "storescp_factory",
    "tls_material",
    "wait_for_port",
]
