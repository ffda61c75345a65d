"""Opening and closing DICOM associations towards the reading center, and C-ECHO.

Failures are typed (uploader.errors):

- `TransientError`: the link or the peer is unavailable now (refused, reset, timed out, aborted,
  rejected-transient, out of resources) — try again later;
- `ConfigurationFault`: the peer refuses *us* (association rejected permanently, e.g. calling AE
  unknown; TLS trust failure; none of our presentation contexts accepted) — keep items queued.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from pydicom.uid import (
    UID,
    AmbulatoryECGWaveformStorage,
    CardiacElectrophysiologyWaveformStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    General32bitECGWaveformStorage,
    GeneralECGWaveformStorage,
    HemodynamicWaveformStorage,
    ImplicitVRLittleEndian,
    TwelveLeadECGWaveformStorage,
)
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext

from uploader.dicom_reactor import drop_log_formatting, wait_for_traffic
from uploader.dicom_rejection import REJECTED_PERMANENT, association_rejection
from uploader.dicom_status import is_refusal_of_us, status_meaning
from uploader.dicom_tls import TlsFiles, client_tls_context, describe_tls, is_trust_failure
from uploader.errors import ConfigurationFault, TransientError

log = logging.getLogger(__name__)

ECG_STORAGE_CLASSES: tuple[str, ...] = (
    TwelveLeadECGWaveformStorage,
    GeneralECGWaveformStorage,
    AmbulatoryECGWaveformStorage,
    General32bitECGWaveformStorage,
    HemodynamicWaveformStorage,
    CardiacElectrophysiologyWaveformStorage,
)
VERIFICATION = UID("1.2.840.10008.1.1")
STORAGE_COMMITMENT_PUSH = UID("1.2.840.10008.1.20.1")  # Storage Commitment Push Model SOP Class
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP instance (PS3.4 J.3.5)

STORE_SYNTAXES_DEFLATE = (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
STORE_SYNTAXES_PLAIN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
COMMITMENT_SYNTAXES: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


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
    tcp_nodelay: bool = True  # off only to measure what Nagle costs (bench/dicom_send.py)

    @property
    def where(self) -> str:
        return f"{self.called_ae}@{self.host}:{self.port}"


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN: Nagle + delayed ACK stalled every C-STORE by 40-85 ms on loopback."""
    raw = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if raw is None:
        return
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # not TCP (tests on a socketpair) or already closed
        log.debug("cannot set TCP_NODELAY: %s", exc)


def new_ae(peer: PeerSettings) -> AE:
    try:
        ae = AE(ae_title=peer.calling_ae)
    except ValueError as exc:
        raise ConfigurationFault(f"calling AE title {peer.calling_ae!r} is not valid: {exc}") from None
    ae.acse_timeout = peer.timeout_s
    ae.dimse_timeout = peer.timeout_s
    ae.network_timeout = peer.timeout_s
    ae.connection_timeout = peer.timeout_s
    return ae


def associate(
    peer: PeerSettings,
    contexts: list[PresentationContext],
    handlers: list[EventHandlerType],
    *,
    ext_neg: Sequence[Any] = (),
) -> Association:
    """Open an association or raise the typed reason it could not be opened. `ext_neg`: extended
    negotiation items, e.g. SCP/SCU role selection for the storage contexts of a C-GET."""
    ae = new_ae(peer)
    tls_args = None
    ctx: ssl.SSLContext | None = None
    if peer.tls is not None:
        ctx = client_tls_context(peer.tls)
        tls_args = (ctx, peer.host)
    connected = threading.Event()

    def on_open(event: evt.Event) -> None:
        if peer.tcp_nodelay:
            set_nodelay(event)
        # before negotiation starts: the reactor's polling and per-PDU log formatting were a
        # third of a study's CPU (uploader/dicom_reactor.py)
        wait_for_traffic(event.assoc)
        drop_log_formatting(event.assoc)
        connected.set()

    started = time.monotonic()
    try:
        assoc = ae.associate(
            peer.host,
            peer.port,
            contexts,
            ae_title=peer.called_ae,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open), *handlers],
            ext_neg=list(ext_neg) or None,
        )
    except ValueError as exc:  # e.g. a called AE title pynetdicom refuses to encode
        raise ConfigurationFault(f"cannot ask {peer.where} for an association: {exc}") from None
    except OSError as exc:  # pynetdicom resolves the host itself: DNS down, or a name that does not exist
        raise TransientError(f"cannot resolve {peer.host!r} for {peer.where}: {exc.strerror or exc}") from None
    if assoc.is_established:
        return assoc
    raise_not_established(peer, assoc, getattr(ctx, "failures", []), connected.is_set(), time.monotonic() - started)


def raise_not_established(
    peer: PeerSettings, assoc: Association, tls_failures: Sequence[OSError], connected: bool, elapsed_s: float
) -> NoReturn:
    where, us = peer.where, peer.calling_ae
    answer = assoc.acceptor.primitive
    # Not assoc.is_rejected: pynetdicom can report a rejection it received as an abort (a race
    # between its threads, see uploader/dicom_rejection.py); the rejection is read all the same.
    rejection = association_rejection(assoc)
    if rejection is not None:
        why = f"{rejection.reason_str} ({rejection.source_str})"
        if rejection.result == REJECTED_PERMANENT:
            raise ConfigurationFault(f"{where} permanently rejected an association from {us}: {why}")
        raise TransientError(f"{where} rejected an association from {us} for now: {why}")
    trust = [exc for exc in tls_failures if is_trust_failure(exc)]
    if trust:
        raise ConfigurationFault(f"TLS with {where} failed: {describe_tls(trust[0])}")
    if answer is not None and answer.result == 0x00 and not assoc.accepted_contexts:
        rejected = sorted({UID(cx.abstract_syntax or "").name for cx in assoc.rejected_contexts})
        raise ConfigurationFault(
            f"{where} accepted none of the presentation contexts {us} proposed ({', '.join(rejected)})"
        )
    if tls_failures:
        raise TransientError(
            f"cannot reach {where}: {tls_failures[0]} during the TLS handshake (does the peer speak TLS on that port?)"
        )
    if not connected:
        how = "timed out" if elapsed_s >= 0.9 * peer.timeout_s else "refused or unreachable"
        raise TransientError(f"cannot connect to {where}: {how}")
    if answer is None and elapsed_s >= 0.9 * peer.timeout_s:  # pynetdicom aborts on ACSE timeout
        raise TransientError(f"{where} did not answer the association request within {peer.timeout_s:g} s")
    raise TransientError(f"{where} aborted the association during negotiation")


def release(assoc: Association) -> None:
    try:
        if assoc.is_established:
            assoc.release()
        elif not (assoc.is_aborted or assoc.is_released or assoc.is_rejected):
            assoc.abort()
    except Exception:
        log.debug("error while closing the association", exc_info=True)


# -- C-ECHO --------------------------------------------------------------------------------------


def echo(peer: PeerSettings) -> float:
    """C-ECHO round trip in seconds (association set-up not included).

    Raises TransientError (unreachable, aborted, no answer) or ConfigurationFault (refused).
    """
    assoc = associate(peer, [build_context(VERIFICATION)], [])
    try:
        started = time.perf_counter()
        status = assoc.send_c_echo()
        rtt = time.perf_counter() - started
    finally:
        release(assoc)
    if "Status" not in status:
        raise TransientError(f"{peer.where} did not answer the C-ECHO (aborted or timed out)")
    code = int(status.Status)
    if code != 0x0000:
        message = f"{peer.where} answered the C-ECHO with 0x{code:04X} {status_meaning(code)}"
        if is_refusal_of_us(code):
            raise ConfigurationFault(message)
        raise TransientError(message)
    return rtt


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
