"""DICOM networking towards the reading center: C-ECHO, C-STORE, storage commitment.

This module sends bytes and reports outcomes; it knows nothing of the outbox. Failures are
typed (uploader.errors):

- `TransientError`: the link or the peer is unavailable now (refused, reset, timed out, aborted,
  rejected-transient, out of resources) — try again later;
- `ConfigurationFault`: the peer refuses *us* (association rejected permanently, e.g. calling AE
  unknown; TLS trust failure; none of our presentation contexts accepted) — keep items queued;
- per object, `StoreOutcome.category` says stored / retry / never (see uploader.dicom_status).

Payloads are stored as Explicit VR Little Endian Part-10 files. For each SOP class we propose one
presentation context per transfer syntax (Deflated Explicit VR LE first, then Explicit VR LE,
then Implicit VR LE) so the peer can pick; each object is sent in the best one it accepted.
Explicit and deflated are produced from the stored bytes directly (a slice, or zlib over it),
without decoding the data set: on a Pi that is most of the CPU a store costs.

Objects are not thread-safe; use one `StoreAssociation` per thread (each has its own AE).
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    AmbulatoryECGWaveformStorage,
    CardiacElectrophysiologyWaveformStorage,
    General32bitECGWaveformStorage,
    GeneralECGWaveformStorage,
    HemodynamicWaveformStorage,
    StorageCommitmentPushModel,
    TwelveLeadECGWaveformStorage,
    Verification,
)

from uploader.dicom_status import (
    SOP_CLASS_NOT_SUPPORTED,
    classify_status,
    is_refusal_of_us,
    status_meaning,
)
from uploader.errors import ConfigurationFault, PermanentError, TransientError

log = logging.getLogger(__name__)

ECG_STORAGE_CLASSES: tuple[str, ...] = (
    TwelveLeadECGWaveformStorage,
    GeneralECGWaveformStorage,
    AmbulatoryECGWaveformStorage,
    General32bitECGWaveformStorage,
    HemodynamicWaveformStorage,
    CardiacElectrophysiologyWaveformStorage,
)
STORAGE_COMMITMENT_PUSH: str = StorageCommitmentPushModel
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP instance (PS3.4 J.3.5)
COMMITMENT_REQUEST = 1  # N-ACTION Action Type ID
EVENT_ALL_COMMITTED = 1  # N-EVENT-REPORT Event Type IDs
EVENT_SOME_FAILED = 2

_STORE_SYNTAXES_DEFLATE = (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_STORE_SYNTAXES_PLAIN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_COMMITMENT_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
_MAX_CONTEXTS = 127  # odd context IDs 1..255
# N-ACTION statuses that mean "this peer does not do storage commitment"
_NO_COMMITMENT_STATUSES = frozenset({0x0118, 0x0122, 0x0123, 0x0211})


class CommitmentUnsupported(PermanentError):
    """The peer accepted no Storage Commitment Push Model context (or says it has none):
    the forwarder applies its no-commitment policy."""


class UnsendablePayload(PermanentError):
    """The payload is not a DICOM Part-10 file we can put on the wire (never will be)."""


@dataclass(frozen=True)
class TlsFiles:
    ca_file: str  # CA that signed the peer's certificate
    cert_file: str = ""  # our certificate (client cert; server cert for the listener)
    key_file: str = ""  # its private key


@dataclass(frozen=True)
class PeerSettings:
    host: str
    port: int
    called_ae: str
    calling_ae: str
    timeout_s: float = 30.0  # connection, ACSE, DIMSE and network timeouts
    deflate: bool = True  # propose Deflated Explicit VR Little Endian first
    tls: TlsFiles | None = None
    deflate_level: int = 4  # zlib level: as small as 6 on ECGs (0.42 vs 0.42) for a third of the CPU

    @property
    def where(self) -> str:
        return f"{self.called_ae}@{self.host}:{self.port}"


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    category: str  # "success" | "warning" | "transient" | "permanent"
    meaning: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str  # the one it travelled in
    wire_bytes: int = 0  # size of the data set as sent (after deflating)

    @property
    def stored(self) -> bool:
        return self.category in ("success", "warning")


@dataclass(frozen=True)
class CommitmentReport:
    transaction_uid: str
    committed: list[tuple[str, str]]  # (SOP class UID, SOP instance UID)
    failed: list[tuple[str, str, int]]  # (SOP class UID, SOP instance UID, FailureReason)
    calling_ae: str = ""  # who sent the report


# -- transport details ---------------------------------------------------------------------------

def _set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN: Nagle + delayed ACK stalled every C-STORE by 40-85 ms on loopback."""
    raw = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if raw is None:
        return
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # not TCP (tests on a socketpair) or already closed
        log.debug("cannot set TCP_NODELAY: %s", exc)


class _TracingSSLSocket(ssl.SSLSocket):
    """pynetdicom only logs why a connection failed; keep TLS errors so a trust failure
    (ConfigurationFault) can be told from an outage (TransientError)."""

    def _note(self, exc: OSError) -> None:
        failures = getattr(self.context, "failures", None)
        if failures is not None:
            failures.append(exc)

    def connect(self, addr: object) -> None:  # type: ignore[override]
        try:
            super().connect(addr)  # type: ignore[arg-type]
        except OSError as exc:
            self._note(exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        # TLS 1.3: the server judges our certificate after our handshake "succeeded"; its
        # verdict arrives as an alert on the first read.
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            self._note(exc)
            raise


class _TracingContext(ssl.SSLContext):
    sslsocket_class = _TracingSSLSocket
    failures: list[OSError]


def _tls_problem(tls: TlsFiles, exc: Exception) -> ConfigurationFault:
    return ConfigurationFault(f"TLS files unusable (ca {tls.ca_file!r}, cert {tls.cert_file!r}, "
                              f"key {tls.key_file!r}): {exc}")


def client_tls_context(tls: TlsFiles) -> ssl.SSLContext:
    """Verify the peer against our CA (and its name), present our certificate if we have one."""
    ctx = _TracingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.failures = []
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195
    try:
        ctx.load_verify_locations(cafile=tls.ca_file)
        if tls.cert_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise _tls_problem(tls, exc) from None
    return ctx


def server_tls_context(tls: TlsFiles) -> ssl.SSLContext:
    """Our certificate for peers that call us; their certificates must chain to our CA."""
    if not tls.cert_file:
        raise ConfigurationFault("a TLS listener needs cert_file and key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
        ctx.load_verify_locations(cafile=tls.ca_file)
    except (OSError, ValueError) as exc:
        raise _tls_problem(tls, exc) from None
    return ctx


def _is_trust_failure(exc: OSError) -> bool:
    # A closed connection is an outage; any other TLS error during set-up is a certificate,
    # CA, protocol-version or cipher mismatch: configuration, not weather.
    return isinstance(exc, ssl.SSLError) and not isinstance(
        exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLWantReadError, ssl.SSLWantWriteError))


def _describe_tls(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"peer certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"TLS handshake failed: {exc.reason.replace('_', ' ').lower()}"
    return f"TLS handshake failed: {exc}"


def _new_ae(peer: PeerSettings) -> AE:
    try:
        ae = AE(ae_title=peer.calling_ae)
    except ValueError as exc:
        raise ConfigurationFault(f"calling AE title {peer.calling_ae!r} is not valid: {exc}") from None
    ae.acse_timeout = peer.timeout_s
    ae.dimse_timeout = peer.timeout_s
    ae.network_timeout = peer.timeout_s
    ae.connection_timeout = peer.timeout_s
    return ae


def _associate(peer: PeerSettings, contexts: list[PresentationContext],
               handlers: list[tuple[evt.EventType, Callable]]) -> Association:
    """Open an association or raise the typed reason it could not be opened."""
    ae = _new_ae(peer)
    tls_args = None
    ctx: ssl.SSLContext | None = None
    if peer.tls is not None:
        ctx = client_tls_context(peer.tls)
        tls_args = (ctx, peer.host)
    connected = threading.Event()

    def on_open(event: evt.Event) -> None:
        _set_nodelay(event)
        connected.set()

    started = time.monotonic()
    try:
        assoc = ae.associate(peer.host, peer.port, contexts, ae_title=peer.called_ae,
                             tls_args=tls_args, evt_handlers=[(evt.EVT_CONN_OPEN, on_open), *handlers])
    except ValueError as exc:  # e.g. a called AE title pynetdicom refuses to encode
        raise ConfigurationFault(f"cannot ask {peer.where} for an association: {exc}") from None
    if assoc.is_established:
        return assoc
    _raise_not_established(peer, assoc, getattr(ctx, "failures", []), connected.is_set(),
                           time.monotonic() - started)


def _raise_not_established(peer: PeerSettings, assoc: Association, tls_failures: Sequence[OSError],
                           connected: bool, elapsed_s: float) -> NoReturn:
    where, us = peer.where, peer.calling_ae
    answer = assoc.acceptor.primitive
    if assoc.is_rejected and answer is not None:
        why = f"{answer.reason_str} ({answer.source_str})"
        if answer.result == 0x01:
            raise ConfigurationFault(f"{where} permanently rejected an association from {us}: {why}")
        raise TransientError(f"{where} rejected an association from {us} for now: {why}")
    trust = [exc for exc in tls_failures if _is_trust_failure(exc)]
    if trust:
        raise ConfigurationFault(f"TLS with {where} failed: {_describe_tls(trust[0])}")
    if answer is not None and answer.result == 0x00 and not assoc.accepted_contexts:
        rejected = sorted({UID(cx.abstract_syntax).name for cx in assoc.rejected_contexts})
        raise ConfigurationFault(f"{where} accepted none of the presentation contexts {us} "
                                 f"proposed ({', '.join(rejected)})")
    if tls_failures:
        raise TransientError(f"cannot reach {where}: {tls_failures[0]} during the TLS handshake "
                             "(does the peer speak TLS on that port?)")
    if not connected:
        how = "timed out" if elapsed_s >= 0.9 * peer.timeout_s else "refused or unreachable"
        raise TransientError(f"cannot connect to {where}: {how}")
    if answer is None and elapsed_s >= 0.9 * peer.timeout_s:  # pynetdicom aborts on ACSE timeout
        raise TransientError(f"{where} did not answer the association request within {peer.timeout_s:g} s")
    raise TransientError(f"{where} aborted the association during negotiation")


def _release(assoc: Association) -> None:
    try:
        if assoc.is_established:
            assoc.release()
        elif not (assoc.is_aborted or assoc.is_released or assoc.is_rejected):
            assoc.abort()
    except Exception:  # noqa: BLE001 — tearing down a dead link must not mask the real error
        log.debug("error while closing the association", exc_info=True)


# -- C-ECHO --------------------------------------------------------------------------------------

def echo(peer: PeerSettings) -> float:
    """C-ECHO round trip in seconds (association set-up not included).

    Raises TransientError (unreachable, aborted, no answer) or ConfigurationFault (refused).
    """
    assoc = _associate(peer, [build_context(Verification)], [])
    try:
        started = time.perf_counter()
        status = assoc.send_c_echo()
        rtt = time.perf_counter() - started
    finally:
        _release(assoc)
    if "Status" not in status:
        raise TransientError(f"{peer.where} did not answer the C-ECHO (aborted or timed out)")
    code = int(status.Status)
    if code != 0x0000:
        message = f"{peer.where} answered the C-ECHO with 0x{code:04X} {status_meaning(code)}"
        if is_refusal_of_us(code):
            raise ConfigurationFault(message)
        raise TransientError(message)
    return rtt


# -- Part-10 payloads ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Part10:
    data: bytes
    sop_class_uid: UID
    sop_instance_uid: UID
    transfer_syntax: UID
    dataset_offset: int  # where the data set starts, after the file meta information

    def dataset_bytes(self) -> bytes:
        return self.data[self.dataset_offset:]


def _outside_group_2(tag: int, vr: str | None, length: int) -> bool:
    return tag >> 16 != 0x0002


def _past_sop_uids(tag: int, vr: str | None, length: int) -> bool:
    return tag > 0x00080018


# Digits and dots: carts in the field write malformed UIDs (trailing dots, leading zeros);
# we forward objects as received and let the PACS's answer decide.
_UID_TEXT = re.compile(r"[0-9.]*[0-9][0-9.]*\Z")


def _uid_of(ds: Dataset, tag: int, what: str) -> UID:
    elem = ds.get_item(tag)  # raw element: no pydicom conversion (or warnings) for a peek
    if elem is None or elem.value is None:
        raise UnsendablePayload(f"payload has no {what}")
    value = elem.value
    text = value.rstrip(b"\x00 ").decode("ascii") if isinstance(value, bytes) else str(value)
    if len(text) > 64 or not _UID_TEXT.match(text):
        raise UnsendablePayload(f"payload's {what} {text[:80]!r} is not a valid UID")
    return UID(text)


def parse_part10(data: bytes) -> _Part10:
    """File meta and the data set's SOP class/instance UIDs, without decoding the rest."""
    if len(data) < 144 or data[128:132] != b"DICM":
        raise UnsendablePayload("payload is not a DICOM Part-10 file (no DICM prefix)")
    fp = BytesIO(data)
    fp.seek(132)
    try:
        meta = read_dataset(fp, False, True, stop_when=_outside_group_2)
        offset = fp.tell()
        ts = _uid_of(meta, 0x00020010, "Transfer Syntax UID")
        if ts.is_deflated:  # rare for a stored payload: inflate and look at the result
            head = dcmread(BytesIO(data))
        else:
            head = read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian, stop_when=_past_sop_uids)
        sop_class = _uid_of(head, 0x00080016, "SOP Class UID")
        sop_instance = _uid_of(head, 0x00080018, "SOP Instance UID")
    except UnsendablePayload:
        raise
    except Exception as exc:  # noqa: BLE001 — pydicom raises many types on damaged bytes
        raise UnsendablePayload(f"payload has no readable file meta / SOP UIDs: "
                                f"{type(exc).__name__}: {exc}") from None
    return _Part10(data, sop_class, sop_instance, ts, offset)


def _deflate(raw: bytes, level: int) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate (PS3.5 A.5)
    out = compressor.compress(raw) + compressor.flush()
    return out + b"\x00" if len(out) % 2 else out


def encode_for(obj: _Part10, syntax: UID, deflate_level: int = 4) -> bytes:
    """The data set encoded in `syntax`; cheap (no decoding) from Explicit VR LE."""
    source = obj.transfer_syntax
    if source == syntax:
        return obj.dataset_bytes()
    if source == ExplicitVRLittleEndian and syntax == DeflatedExplicitVRLittleEndian:
        return _deflate(obj.dataset_bytes(), deflate_level)
    if source == DeflatedExplicitVRLittleEndian and syntax == ExplicitVRLittleEndian:
        try:
            return zlib.decompress(obj.dataset_bytes(), -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise UnsendablePayload(f"deflated payload does not inflate: {exc}") from None
    uncompressed = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                    ExplicitVRBigEndian}
    if source not in uncompressed or syntax not in uncompressed:
        raise UnsendablePayload(f"cannot convert {source.name} to {syntax.name}")
    try:
        ds = dcmread(BytesIO(obj.data))
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        raise UnsendablePayload(f"payload does not decode: {exc}") from None
    encoded = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    if encoded is None:
        raise UnsendablePayload(f"payload cannot be encoded as {syntax.name}")
    return encoded


# -- C-STORE (+ N-ACTION) association ---------------------------------------------------------------

def store_contexts(sop_class_uids: Sequence[str], *, deflate: bool,
                   commitment: bool) -> list[PresentationContext]:
    syntaxes = _STORE_SYNTAXES_DEFLATE if deflate else _STORE_SYNTAXES_PLAIN
    # one context per transfer syntax: the peer accepts each it can read, we pick the best
    contexts = [build_context(uid, [ts]) for uid in sop_class_uids for ts in syntaxes]
    if commitment:
        contexts.append(build_context(STORAGE_COMMITMENT_PUSH, _COMMITMENT_SYNTAXES))
    if len(contexts) > _MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts; an association allows {_MAX_CONTEXTS}")
    return contexts


def _fast_send_available(assoc: Association) -> bool:
    return all(hasattr(assoc, name) for name in (
        "_reactor_checkpoint", "_is_paused", "_handle_no_response", "_check_received_status"))


class StoreAssociation:
    """One association for many C-STOREs (and, with commitment=True, the N-ACTION after them).

    `with StoreAssociation(peer) as a: a.store(bytes)`; opening raises TransientError or
    ConfigurationFault. `on_report` receives an N-EVENT-REPORT if the peer sends it on this
    association (most send it on a new one, to the CommitmentListener).
    """

    def __init__(self, peer: PeerSettings, sop_class_uids: Sequence[str] = ECG_STORAGE_CLASSES, *,
                 commitment: bool = False,
                 on_report: Callable[[CommitmentReport], None] | None = None) -> None:
        self.peer = peer
        self.sop_class_uids = tuple(sop_class_uids)
        self.commitment = commitment
        self._on_report = on_report
        self._assoc: Association | None = None
        self._message_id = 0
        self._preference = _STORE_SYNTAXES_DEFLATE if peer.deflate else _STORE_SYNTAXES_PLAIN
        self._contexts_by_class: dict[str, list[PresentationContext]] = {}
        self._broken = False  # a request went unanswered: never use (or politely release) it again
        self.stores = 0

    # -- lifecycle --
    def open(self) -> None:
        if self._assoc is not None:
            raise RuntimeError("association already opened")
        self._broken = False
        self._contexts_by_class = {}
        contexts = store_contexts(self.sop_class_uids, deflate=self.peer.deflate,
                                  commitment=self.commitment)
        handlers: list[tuple[evt.EventType, Callable]] = []
        if self._on_report is not None:
            handlers.append((evt.EVT_N_EVENT_REPORT, _report_handler(self._on_report)))
        self._assoc = _associate(self.peer, contexts, handlers)
        rank = {ts: i for i, ts in enumerate(self._preference)}
        for cx in self._assoc.accepted_contexts:
            ts = UID(cx.transfer_syntax[0])
            if cx.abstract_syntax in self.sop_class_uids and cx.as_scu and ts in rank:
                self._contexts_by_class.setdefault(str(cx.abstract_syntax), []).append(cx)
        for found in self._contexts_by_class.values():
            found.sort(key=lambda cx: rank[UID(cx.transfer_syntax[0])])
        if self.sop_class_uids and not self._contexts_by_class:
            # e.g. only commitment accepted: every object would bounce; that is the PACS's
            # configuration, not the objects' fault
            self.close()
            names = ", ".join(sorted(UID(u).name for u in self.sop_class_uids))
            raise ConfigurationFault(f"{self.peer.where} accepts none of the storage SOP classes "
                                     f"{self.peer.calling_ae} sends ({names})")
        log.debug("association with %s: %s", self.peer.where, {
            UID(k).name: [UID(c.transfer_syntax[0]).name for c in v]
            for k, v in self._contexts_by_class.items()})

    def close(self) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is None:
            return
        if self._broken:
            if assoc.is_established:
                assoc.abort()
            return
        _release(assoc)

    def abort(self) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is not None and assoc.is_established:
            assoc.abort()

    def __enter__(self) -> StoreAssociation:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def is_alive(self) -> bool:
        a = self._assoc
        return (a is not None and not self._broken and a.is_established
                and not a.is_aborted and not a.is_released)

    @property
    def accepted_transfer_syntaxes(self) -> dict[str, list[str]]:
        """SOP class UID -> accepted transfer syntaxes, best first."""
        return {k: [str(c.transfer_syntax[0]) for c in v] for k, v in self._contexts_by_class.items()}

    def _require_alive(self) -> Association:
        if not self.is_alive:
            raise TransientError(f"the association with {self.peer.where} is no longer open")
        assert self._assoc is not None
        return self._assoc

    def _next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    # -- C-STORE --
    def store(self, payload: bytes | Path) -> StoreOutcome:
        """Send one Part-10 object. Returns the peer's verdict; raises TransientError if the
        association died (nothing is known about this object), ConfigurationFault if the peer
        says the gateway is not authorised, UnsendablePayload for bytes that are not DICOM."""
        assoc = self._require_alive()
        if isinstance(payload, Path):
            try:
                payload = payload.read_bytes()
            except OSError as exc:
                raise UnsendablePayload(f"cannot read payload {payload}: {exc}") from None
        obj = parse_part10(payload)
        candidates = self._contexts_by_class.get(str(obj.sop_class_uid), [])
        if not candidates:
            why = ("the peer accepted no presentation context for it"
                   if obj.sop_class_uid in self.sop_class_uids else "it was not proposed")
            return StoreOutcome(SOP_CLASS_NOT_SUPPORTED, "permanent",
                                f"{status_meaning(SOP_CLASS_NOT_SUPPORTED)}: "
                                f"{obj.sop_class_uid.name} ({why})",
                                str(obj.sop_instance_uid), str(obj.sop_class_uid), "")
        cx = candidates[0]
        syntax = UID(cx.transfer_syntax[0])
        data = encode_for(obj, syntax, self.peer.deflate_level)
        status = self._send_store(assoc, cx, obj, data)
        if "Status" not in status:
            self._broken = True
            raise TransientError(f"the association with {self.peer.where} died during a C-STORE "
                                 "(aborted, reset or timed out)")
        code = int(status.Status)
        category, meaning = classify_status(code)
        if is_refusal_of_us(code):
            raise ConfigurationFault(f"{self.peer.where} refuses C-STOREs from {self.peer.calling_ae}: "
                                     f"0x{code:04X} {meaning}")
        comment = status.get("ErrorComment")
        if comment:
            meaning = f"{meaning} ({comment})"
        self.stores += 1
        return StoreOutcome(code, category, meaning, str(obj.sop_instance_uid),
                            str(obj.sop_class_uid), str(syntax), len(data))

    def _send_store(self, assoc: Association, cx: PresentationContext, obj: _Part10,
                    data: bytes) -> Dataset:
        if not _fast_send_available(assoc):
            return self._send_store_decoded(assoc, cx, obj)
        req = C_STORE()
        req.MessageID = self._next_message_id()
        req.AffectedSOPClassUID = obj.sop_class_uid
        req.AffectedSOPInstanceUID = obj.sop_instance_uid
        req.Priority = 2  # low: the default every SCP handles
        req.DataSet = BytesIO(data)
        # Mirrors Association.send_c_store() after its encoding step (pynetdicom 3.0): pause the
        # reactor so it does not take our response off the queue, send, wait, resume.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(req, int(cx.context_id))  # type: ignore[arg-type]
            _cx_id, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        if rsp is None:
            assoc._handle_no_response()
            return Dataset()
        return assoc._check_received_status(rsp)

    def _send_store_decoded(self, assoc: Association, cx: PresentationContext,
                            obj: _Part10) -> Dataset:
        """Public-API path (decode, let pynetdicom encode) if its internals ever change."""
        syntax = UID(cx.transfer_syntax[0])
        try:
            ds = dcmread(BytesIO(obj.data))
            if syntax != ImplicitVRLittleEndian:  # exact match picks our context; implicit converts
                ds.file_meta.TransferSyntaxUID = syntax
            return assoc.send_c_store(ds, msg_id=self._next_message_id())
        except (AttributeError, ValueError, InvalidDicomError, EOFError) as exc:
            raise UnsendablePayload(f"cannot encode the payload as {syntax.name}: {exc}") from None

    # -- storage commitment (N-ACTION) --
    def request_commitment(self, transaction_uid: str, refs: Sequence[tuple[str, str]]) -> None:
        """Ask the peer to commit to (SOP class, SOP instance) pairs. The answer comes later as
        an N-EVENT-REPORT (to the CommitmentListener). Raises CommitmentUnsupported if the peer
        has no storage commitment, TransientError if it failed now."""
        if not self.commitment:
            raise ValueError("open the StoreAssociation with commitment=True to request commitment")
        if not refs:
            raise ValueError("no instances to ask commitment for")
        assoc = self._require_alive()
        accepted = [cx for cx in assoc.accepted_contexts
                    if cx.abstract_syntax == STORAGE_COMMITMENT_PUSH and cx.as_scu]
        if not accepted:
            raise CommitmentUnsupported(f"{self.peer.where} does not offer Storage Commitment "
                                        "Push Model (presentation context rejected)")
        request = Dataset()
        request.TransactionUID = transaction_uid
        items = []
        for sop_class, sop_instance in refs:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            items.append(item)
        request.ReferencedSOPSequence = items
        status, _reply = assoc.send_n_action(request, COMMITMENT_REQUEST, STORAGE_COMMITMENT_PUSH,
                                             STORAGE_COMMITMENT_INSTANCE,
                                             msg_id=self._next_message_id())
        if "Status" not in status:
            self._broken = True
            raise TransientError(f"no answer from {self.peer.where} to the storage commitment request "
                                 "(aborted or timed out)")
        code = int(status.Status)
        category, meaning = classify_status(code)
        if category in ("success", "warning"):
            log.debug("commitment requested: %s (%d instances)", transaction_uid, len(refs))
            return
        message = f"{self.peer.where} refused the storage commitment request: 0x{code:04X} {meaning}"
        if code in _NO_COMMITMENT_STATUSES:
            raise CommitmentUnsupported(message)
        if is_refusal_of_us(code):
            raise ConfigurationFault(message)
        raise TransientError(message)


# -- N-EVENT-REPORT (storage commitment result) ----------------------------------------------------

class MalformedReport(ValueError):
    """An N-EVENT-REPORT we cannot read as a storage commitment result."""


def _refs(seq: object, *, with_reason: bool) -> list:
    out = []
    for item in seq or []:  # type: ignore[attr-defined]
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "")
        sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if not sop_instance:
            raise MalformedReport("a referenced SOP item has no ReferencedSOPInstanceUID")
        if with_reason:
            reason = item.get("FailureReason")
            out.append((sop_class, sop_instance, int(reason) if reason is not None else 0x0110))
        else:
            out.append((sop_class, sop_instance))
    return out


def parse_commitment_report(event_type: int | None, info: Dataset, calling_ae: str = "") -> CommitmentReport:
    """Event Information of a Storage Commitment N-EVENT-REPORT -> CommitmentReport."""
    if event_type not in (EVENT_ALL_COMMITTED, EVENT_SOME_FAILED):
        raise MalformedReport(f"unknown storage commitment event type {event_type!r}")
    try:
        txn = str(info.get("TransactionUID", "") or "")
        committed = _refs(info.get("ReferencedSOPSequence"), with_reason=False)
        failed = _refs(info.get("FailedSOPSequence"), with_reason=True)
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise MalformedReport(f"unreadable event information: {exc}") from None
    if not txn:
        raise MalformedReport("no TransactionUID")
    if event_type == EVENT_SOME_FAILED and not failed:
        raise MalformedReport("event type 2 (some failed) without a FailedSOPSequence")
    return CommitmentReport(txn, committed, failed, calling_ae.strip())


def _report_handler(on_report: Callable[[CommitmentReport], None]) -> Callable:
    def handle(event: evt.Event) -> tuple[int, Dataset | None]:
        if event.request.AffectedSOPClassUID != STORAGE_COMMITMENT_PUSH:
            return 0x0118, None  # no such SOP class
        calling = str(event.assoc.requestor.ae_title)
        try:
            report = parse_commitment_report(event.event_type, event.event_information, calling)
        except (MalformedReport, InvalidDicomError, ValueError, EOFError) as exc:
            log.warning("unreadable storage commitment report from %s: %s", calling, exc)
            return 0x0110, None
        log.info("storage commitment report %s from %s: %d committed, %d failed",
                 report.transaction_uid, calling, len(report.committed), len(report.failed))
        try:
            on_report(report)
        except Exception:  # noqa: BLE001 — tell the peer we could not process it, keep serving
            log.exception("storage commitment report %s could not be processed", report.transaction_uid)
            return 0x0110, None
        return 0x0000, None
    return handle


def stop_server(server: object) -> None:
    """Shut a pynetdicom server down without waiting out socketserver's 0.5 s poll: connections
    wake its select() once the shutdown flag is set."""
    stopper = threading.Thread(target=server.shutdown, name="dicom-server-stop", daemon=True)  # type: ignore[attr-defined]
    stopper.start()
    host, port = server.server_address[:2]  # type: ignore[attr-defined]
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1" if host != "::" else "::1"
    while stopper.is_alive():
        try:
            socket.create_connection((host, port), timeout=0.2).close()
        except OSError:
            pass  # already closed: the stopper is about to finish
        stopper.join(0.05)


class CommitmentListener:
    """Our AE in the SCP role for N-EVENT-REPORTs: the PACS opens a new association to us
    (role selection: it is the Storage Commitment SCP) and reports what it committed."""

    def __init__(self, ae_title: str, port: int, on_report: Callable[[CommitmentReport], None], *,
                 host: str = "127.0.0.1", allowed_peers: Sequence[str] | None = None,
                 tls: TlsFiles | None = None, timeout_s: float = 30.0) -> None:
        self.ae_title = ae_title
        self.port = port
        self.host = host
        self.on_report = on_report
        self.allowed_peers = tuple(allowed_peers or ())
        self.tls = tls
        self.timeout_s = timeout_s
        self._server: object | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        server = self._server
        if server is not None:
            return server.server_address[:2]  # type: ignore[attr-defined]
        return self.host, self.port

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            try:
                ae = AE(ae_title=self.ae_title)
            except ValueError as exc:
                raise ConfigurationFault(f"AE title {self.ae_title!r} is not valid: {exc}") from None
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
            ae.require_called_aet = True
            if self.allowed_peers:
                ae.require_calling_aet = list(self.allowed_peers)
            # the reporting PACS is the Storage Commitment SCP: accept it in that role
            ae.add_supported_context(STORAGE_COMMITMENT_PUSH, _COMMITMENT_SYNTAXES,
                                     scu_role=False, scp_role=True)
            ae.add_supported_context(Verification)
            ssl_context = server_tls_context(self.tls) if self.tls is not None else None
            handlers = [(evt.EVT_CONN_OPEN, _set_nodelay),
                        (evt.EVT_N_EVENT_REPORT, _report_handler(self.on_report))]
            try:
                self._server = ae.start_server((self.host, self.port), block=False,
                                               evt_handlers=handlers, ssl_context=ssl_context)
            except OSError as exc:
                raise ConfigurationFault(f"cannot listen for storage commitment reports on "
                                         f"{self.host}:{self.port}: {exc}") from None
            log.info("listening for storage commitment reports as %s on %s:%d",
                     self.ae_title, *self.address)

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            stop_server(server)

    def __enter__(self) -> CommitmentListener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
