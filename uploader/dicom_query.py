"""Asking the reading center for reports: DIMSE C-FIND, C-GET, and C-MOVE back to our own AE.

- `QueryAssociation(peer)`: one association for a polling round. `find_reports(study_uids)` is a
  study-root C-FIND at IMAGE level for report objects (SR classes and Encapsulated PDF) in many
  studies at once (UID list matching), so 50 outstanding studies cost one request, not 50.
  With `retrieve=True` it also proposes C-GET and the report storage classes with SCP role
  selection: `get(found)` brings the objects back on the same association — no inbound port, so
  it works from behind the village's NAT.
- `KeptQueryAssociation(peer)`: the C-FIND association kept open *between* rounds while they come
  often (a STAT study's hurry): set-up and teardown cost more bytes than "nothing new" does.
  The caller says after each round how soon the next one comes (`keep_for`); the PACS may close
  it meanwhile (its idle timeout, a restart, a reset link): the next round opens a new one, and a
  query that meets a closing association is asked once more on a new one.
- `move_reports(peer, destination, receiver, found)`: C-MOVE to our own AE, for a PACS that only
  offers that; `ReportReceiver` is the storage SCP the PACS connects to meanwhile: its own
  listener while the move runs, or offered to the storage-commitment listener that already
  holds the gateway's AE and port at the PACS (`offer()`; uploader.dicom_commitment).
- Every object is kept as the bytes that arrived (Part-10 with the meta of the transfer syntax
  it came in): a report is stored as received, whatever we can read of it.
- Failures are typed like the sender's (uploader.errors): TransientError (unreachable, aborted,
  out of resources), ConfigurationFault (the peer refuses us), `RetrieveRefused` (this PACS will
  not do C-GET for us: the caller falls back to C-MOVE).
- `bytes_sent` / `bytes_received` count PDU bytes (EVT_DATA_SENT/RECV): what polling costs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import cast

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from uploader.dicom_association import PeerSettings, associate, release, set_nodelay, stop_server
from uploader.dicom_commitment import ExtraStorage
from uploader.dicom_status import is_refusal_of_us
from uploader.dicom_tls import server_tls_context
from uploader.errors import ConfigurationFault, PermanentError, TransientError
from uploader.report_reading import REPORT_SOP_CLASSES

log = logging.getLogger(__name__)

FIND = StudyRootQueryRetrieveInformationModelFind
GET = StudyRootQueryRetrieveInformationModelGet
MOVE = StudyRootQueryRetrieveInformationModelMove
RETRIEVE_SYNTAXES: list[str | UID] = [DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
# Implicit VR Little Endian alone: every SCP must accept it, and each extra syntax proposed costs
# bytes in every association request
QUERY_SYNTAXES: list[str | UID] = [ImplicitVRLittleEndian]
PENDING = frozenset({0xFF00, 0xFF01})
# C-FIND/C-GET/C-MOVE failures that say "not now" (PS3.4 C.4): out of resources
TRANSIENT_QR = frozenset({0xA700, 0xA701, 0xA702, 0xFE00})
# "this PACS will not do that for us": SOP class not supported, not authorised
REFUSED_QR = frozenset({0x0122, 0x0124})
MOVE_DESTINATION_UNKNOWN = 0xA801
# Only what a retrieval needs: every byte of a query that usually finds nothing is paid for
# (the report's own flags and times are read from the object once it is here).
FIND_RETURN_KEYS = ("SeriesInstanceUID", "SOPInstanceUID")


class RetrieveRefused(PermanentError):
    """The PACS refuses C-GET for us (context rejected, a refusal status, or it aborts the
    association on the request): retrieve with C-MOVE instead."""


@dataclass(frozen=True)
class FoundReport:
    """One report object a C-FIND matched."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class RetrievedObject:
    sop_instance_uid: str
    sop_class_uid: str
    data: bytes  # Part-10 bytes as they arrived (file meta of the transfer syntax used)


def report_query(study_uids: Sequence[str], sop_classes: Sequence[str] = REPORT_SOP_CLASSES) -> Dataset:
    """The C-FIND identifier: report objects (by SOP class) in any of `study_uids`."""
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = list(study_uids) if len(study_uids) > 1 else study_uids[0]
    q.SOPClassUID = list(sop_classes) if len(sop_classes) > 1 else sop_classes[0]
    for keyword in FIND_RETURN_KEYS:
        setattr(q, keyword, "")
    return q


def _status_of(status: Dataset | None) -> int | None:
    return int(status.Status) if status is not None and "Status" in status else None


def _text(ds: Dataset | None, keyword: str) -> str:
    if ds is None:
        return ""
    try:
        value = ds.get(keyword, "")
    except Exception:  # noqa: BLE001 — an odd value in a response is skipped, not fatal
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return ""  # a response names one value; a list here is the query echoed back
    return str(value or "").strip()


def storage_handler(
    received: list[RetrievedObject], lock: threading.Lock, accept: set[str] | None = None
) -> Callable[[evt.Event], int]:
    """EVT_C_STORE handler keeping the bytes as sent; with `accept`, only those SOP instances."""

    def on_store(event: evt.Event) -> int:
        req = cast(C_STORE, event.request)
        uid = str(req.AffectedSOPInstanceUID)
        if accept is not None and uid not in accept:
            log.warning("refused an unsolicited object %s from %s", uid, event.assoc.requestor.ae_title)
            return 0xC000  # cannot understand: not something we asked for
        try:
            data = event.encoded_dataset(include_meta=True)
        except (AttributeError, ValueError) as exc:
            log.warning("cannot take the object %s: %s", uid, exc)
            return 0xC000
        with lock:
            received.append(RetrievedObject(uid, str(req.AffectedSOPClassUID), data))
        return 0x0000

    return on_store


class QueryAssociation:
    """One association for C-FIND (and, with `retrieve=True`, C-GET) of report objects.

    `with QueryAssociation(peer) as q: found = q.find_reports(uids)`. Opening raises
    TransientError or ConfigurationFault (uploader.dicom_association.associate).
    """

    def __init__(
        self,
        peer: PeerSettings,
        *,
        retrieve: bool = False,
        sop_classes: Sequence[str] = REPORT_SOP_CLASSES,
        find: bool = True,
        move: bool = False,
    ) -> None:
        self.peer = peer
        self.retrieve = retrieve
        self.find = find
        self.move = move
        self.sop_classes = tuple(sop_classes)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.list_matching = True  # UID lists in one query; off if this PACS refuses them
        self._assoc: Association | None = None
        self._received: list[RetrievedObject] = []
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        """Opened and not released or aborted since (by us or by the peer)."""
        assoc = self._assoc
        return assoc is not None and assoc.is_established

    def contexts(self) -> list[PresentationContext]:
        contexts = []
        if self.find:
            contexts.append(build_context(FIND, QUERY_SYNTAXES))
        if self.retrieve:
            contexts.append(build_context(GET, QUERY_SYNTAXES))
            contexts += [build_context(uid, RETRIEVE_SYNTAXES) for uid in self.sop_classes]
        if self.move:
            contexts.append(build_context(MOVE, QUERY_SYNTAXES))
        return contexts

    def open(self, *, idle_timeout_s: float | None = None) -> None:
        """`idle_timeout_s`: how long the open association may sit without a PDU before
        pynetdicom aborts it (default: the peer's timeout)."""
        if self._assoc is not None:
            raise RuntimeError("association already opened")
        handlers: list[EventHandlerType] = [
            (evt.EVT_DATA_SENT, self._count_sent),
            (evt.EVT_DATA_RECV, self._count_received),
        ]
        if self.retrieve:
            handlers.append((evt.EVT_C_STORE, storage_handler(self._received, self._lock)))
        roles = [build_role(uid, scp_role=True) for uid in self.sop_classes] if self.retrieve else []
        self._assoc = associate(self.peer, self.contexts(), handlers, ext_neg=roles)
        if idle_timeout_s is not None:
            self._assoc.network_timeout = idle_timeout_s

    def close(self) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is not None:
            release(assoc)

    def __enter__(self) -> QueryAssociation:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _count_sent(self, event: evt.Event) -> None:
        self.bytes_sent += len(event.data)

    def _count_received(self, event: evt.Event) -> None:
        self.bytes_received += len(event.data)

    def _accepted(self, abstract_syntax: str) -> bool:
        assoc = self._require()
        return any(cx.abstract_syntax == abstract_syntax and cx.as_scu for cx in assoc.accepted_contexts)

    def _require(self) -> Association:
        assoc = self._assoc
        if assoc is None or not assoc.is_established:
            raise TransientError(f"the association with {self.peer.where} is no longer open")
        return assoc

    # -- C-FIND --
    def find_reports(self, study_uids: Sequence[str], *, batch_size: int = 50) -> list[FoundReport]:
        """Report objects in `study_uids` (only those studies, only report classes: a PACS that
        ignores part of the query is filtered here too)."""
        if not study_uids:
            return []
        if not self._accepted(FIND):
            raise ConfigurationFault(f"{self.peer.where} does not accept Study Root C-FIND from {self.peer.calling_ae}")
        wanted = set(study_uids)
        found: dict[str, FoundReport] = {}
        size = max(1, batch_size) if self.list_matching else 1
        pending = list(dict.fromkeys(study_uids))
        while pending:
            batch, pending = pending[:size], pending[size:]
            try:
                matches = self._find(batch)
            except PermanentError:
                if len(batch) == 1:
                    raise
                # this PACS cannot match UID lists: one study per request from now on
                log.info("%s refuses UID list matching; asking one study at a time", self.peer.where)
                self.list_matching = False
                size = 1
                pending = batch + pending
                continue
            for f in matches:
                if f.study_uid in wanted and f.sop_class_uid in self.sop_classes and f.sop_instance_uid:
                    found[f.sop_instance_uid] = f
        return list(found.values())

    def _find(self, batch: Sequence[str]) -> list[FoundReport]:
        assoc = self._require()
        out = []
        for status, identifier in assoc.send_c_find(report_query(batch, self.sop_classes), FIND):
            code = _status_of(status)
            if code is None:
                raise TransientError(f"{self.peer.where} aborted or did not answer the C-FIND")
            if code in PENDING:
                if identifier is not None:
                    out.append(
                        FoundReport(
                            study_uid=_text(identifier, "StudyInstanceUID"),
                            series_uid=_text(identifier, "SeriesInstanceUID"),
                            sop_instance_uid=_text(identifier, "SOPInstanceUID"),
                            sop_class_uid=_text(identifier, "SOPClassUID"),
                        )
                    )
                continue
            if code == 0x0000:
                return out
            self._raise_for(code, "C-FIND", status)
        raise TransientError(f"{self.peer.where} ended the C-FIND without a final status")

    def _raise_for(self, code: int, what: str, status: Dataset | None) -> None:
        comment = _text(status, "ErrorComment")
        message = f"{self.peer.where} answered the {what} with 0x{code:04X}" + (f" ({comment})" if comment else "")
        if code in TRANSIENT_QR:
            raise TransientError(message)
        if is_refusal_of_us(code):
            raise ConfigurationFault(message)
        raise PermanentError(message)

    # -- C-GET --
    def get(self, found: Iterable[FoundReport]) -> list[RetrievedObject]:
        """C-GET the objects (one request per series) on this association; returns what arrived.
        Raises RetrieveRefused if this PACS will not do C-GET for us."""
        if not self.retrieve:
            raise ValueError("open the QueryAssociation with retrieve=True to C-GET")
        if not self._accepted(GET):
            raise RetrieveRefused(f"{self.peer.where} does not accept Study Root C-GET (presentation context rejected)")
        accepted_storage = {
            str(cx.abstract_syntax) for cx in self._require().accepted_contexts if cx.as_scp and cx.abstract_syntax
        }
        by_series: dict[tuple[str, str], list[FoundReport]] = {}
        for f in found:
            if f.sop_class_uid not in accepted_storage:
                log.warning(
                    "%s accepted no storage context (SCP role) for %s: cannot C-GET %s",
                    self.peer.where,
                    UID(f.sop_class_uid).name,
                    f.sop_instance_uid,
                )
                continue
            by_series.setdefault((f.study_uid, f.series_uid), []).append(f)
        with self._lock:
            self._received.clear()
        for (study, series), items in by_series.items():
            self._get_one(study, series, [f.sop_instance_uid for f in items])
        with self._lock:
            return list(self._received)

    def _get_one(self, study: str, series: str, sop_uids: Sequence[str]) -> None:
        assoc = self._require()
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study
        q.SeriesInstanceUID = series
        q.SOPInstanceUID = list(sop_uids) if len(sop_uids) > 1 else sop_uids[0]
        final: int | None = None
        for status, _identifier in assoc.send_c_get(q, GET):
            code = _status_of(status)
            if code is None:
                # Orthanc answers a C-GET it is configured to refuse by aborting the association
                raise RetrieveRefused(f"{self.peer.where} aborted the association on a C-GET")
            if code in PENDING:
                continue
            final = code
        if final is None:
            raise TransientError(f"{self.peer.where} ended the C-GET without a final status")
        if final in (0x0000, 0xB000):
            if final == 0xB000:
                log.warning("%s: C-GET completed with failed sub-operations", self.peer.where)
            return
        if final in REFUSED_QR:
            raise RetrieveRefused(f"{self.peer.where} refuses C-GET: 0x{final:04X}")
        self._raise_for(final, "C-GET", None)

    # -- C-MOVE --
    def move_to(self, destination_ae: str, found: Iterable[FoundReport]) -> None:
        """C-MOVE the objects (one request per series) to `destination_ae`."""
        if not self._accepted(MOVE):
            raise ConfigurationFault(f"{self.peer.where} does not accept Study Root C-MOVE from {self.peer.calling_ae}")
        by_series: dict[tuple[str, str], list[str]] = {}
        for f in found:
            by_series.setdefault((f.study_uid, f.series_uid), []).append(f.sop_instance_uid)
        assoc = self._require()
        for (study, series), uids in by_series.items():
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID = study
            q.SeriesInstanceUID = series
            q.SOPInstanceUID = uids if len(uids) > 1 else uids[0]
            final: int | None = None
            for status, _identifier in assoc.send_c_move(q, destination_ae, MOVE):
                code = _status_of(status)
                if code is None:
                    raise TransientError(f"{self.peer.where} aborted or did not answer the C-MOVE")
                if code not in PENDING:
                    final = code
            if final == MOVE_DESTINATION_UNKNOWN:
                raise ConfigurationFault(
                    f"{self.peer.where} does not know the move destination {destination_ae!r}: add it to the "
                    "PACS's modalities with this gateway's address and port (reading_center.listen_port, "
                    "or reports.move_port for a separate reports.move_ae)"
                )
            if final is None:
                raise TransientError(f"{self.peer.where} ended the C-MOVE without a final status")
            if final not in (0x0000, 0xB000):
                self._raise_for(final, "C-MOVE", None)


class KeptQueryAssociation:
    """A C-FIND association (QueryAssociation) kept open between polling rounds.

    `find_reports(uids)` uses the open association, or opens one. After each round the caller
    says when the next one comes (`keep_for(seconds)`): sooner than `idle_limit_s` keeps the
    association, later releases it now. `idle_limit_s` stays below the PACS's idle timeout
    (Orthanc's DicomScpTimeout: 30 s), so the PACS rarely closes it under us; when it does
    (A-RELEASE, A-ABORT, a TCP reset), that is expected, not an error: the next round opens a new
    one, and a C-FIND that meets a closing association is asked again once on a new one (a C-FIND
    changes nothing at the PACS, so asking twice cannot double anything).
    """

    def __init__(self, peer: PeerSettings, *, idle_limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.peer = peer
        self.idle_limit_s = idle_limit_s
        self.clock = clock
        self.opened = 0  # associations opened (the bench and tests count them)
        self.reused = 0  # rounds that found the association still open
        self.closed_by_peer = 0  # kept associations the PACS released or aborted
        self._query: QueryAssociation | None = None
        self._idle_since = 0.0
        self._bytes_done = 0  # of associations already closed
        self._bytes_taken = 0

    @property
    def is_open(self) -> bool:
        return self._query is not None and self._query.is_open

    def take_bytes(self) -> int:
        """PDU bytes both ways since the last call (a release after a round counts in the next)."""
        total = self._bytes_done
        if self._query is not None:
            total += self._query.bytes_sent + self._query.bytes_received
        taken, self._bytes_taken = total - self._bytes_taken, total
        return taken

    def find_reports(self, study_uids: Sequence[str], *, batch_size: int = 50) -> list[FoundReport]:
        query, reused = self._ready()
        try:
            return query.find_reports(study_uids, batch_size=batch_size)
        except TransientError as exc:
            if not reused:
                self.close()
                raise
            # the PACS closed the kept association as we asked (its idle timeout, a restart)
            log.info("the kept association with %s ended under a query (%s); asking on a new one", self.peer.where, exc)
            self.closed_by_peer += 1
            self.close()
            query, _reused = self._ready()
            try:
                return query.find_reports(study_uids, batch_size=batch_size)
            except BaseException:
                self.close()
                raise
        except BaseException:
            self.close()
            raise
        finally:
            self._idle_since = self.clock()

    def _ready(self) -> tuple[QueryAssociation, bool]:
        """The open association and True, or a new one and False."""
        query = self._query
        if query is not None:
            idle = self.clock() - self._idle_since
            if not query.is_open:
                # the PACS's idle timeout came first: expected, said quietly
                log.debug("%s closed the kept association after %.0f s idle", self.peer.where, idle)
                self.closed_by_peer += 1
                self.close()
            elif idle > self.idle_limit_s:
                # the round came later than planned: the PACS may be closing it right now
                log.debug("releasing the association with %s idle for %.0f s", self.peer.where, idle)
                self.close()
            else:
                self.reused += 1
                return query, True
        query = QueryAssociation(self.peer)
        # pynetdicom's network timeout would abort it while it waits for the next round (with an
        # ERROR in its log); the idle limit closes it instead, the timeout only backs that up
        query.open(idle_timeout_s=self.idle_limit_s + self.peer.timeout_s)
        self.opened += 1
        self._query = query
        return query, False

    def keep_for(self, next_round_in: float | None) -> None:
        """After a round: keep the association for a next round due within the idle limit,
        else release it now. None: no round planned."""
        if next_round_in is None or next_round_in > self.idle_limit_s:
            self.close()

    def close(self) -> None:
        query, self._query = self._query, None
        if query is not None:
            query.close()
            self._bytes_done += query.bytes_sent + query.bytes_received


class ReportReceiver:
    """Our storage SCP for C-MOVE: accepts report classes only, and only the SOP instances we
    asked for (`expect`). It listens on its own while a move runs, unless `offer()`ed to another
    listener of ours (the storage-commitment listener: the PACS knows one port for our AE)."""

    def __init__(
        self,
        ae_title: str,
        port: int,
        *,
        host: str = "127.0.0.1",
        sop_classes: Sequence[str] = REPORT_SOP_CLASSES,
        peer: PeerSettings | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.port = port
        self.host = host
        self.sop_classes = tuple(sop_classes)
        self.peer = peer
        self.received: list[RetrievedObject] = []
        self._expected: set[str] = set()
        self._lock = threading.Lock()
        self._server: object | None = None
        self.hosted = False  # offered to another listener: never listens itself

    def offer(self) -> ExtraStorage:
        """What another listener must accept for us; from now on this receiver never binds a port."""
        self.hosted = True
        return ExtraStorage(
            self.sop_classes,
            tuple(str(ts) for ts in RETRIEVE_SYNTAXES),
            storage_handler(self.received, self._lock, self._expected),
        )

    def expect(self, sop_instance_uids: Iterable[str]) -> None:
        # mutated in place: the running server's handler holds these very objects
        with self._lock:
            self._expected.clear()
            self._expected.update(sop_instance_uids)
            self.received.clear()

    def take(self) -> list[RetrievedObject]:
        with self._lock:
            out = list(self.received)
            self.received.clear()
            return out

    @property
    def running(self) -> bool:
        return self._server is not None or self.hosted

    def start(self) -> None:
        if self._server is not None or self.hosted:
            return
        try:
            ae = AE(ae_title=self.ae_title)
        except ValueError as exc:
            raise ConfigurationFault(f"move destination AE title {self.ae_title!r} is not valid: {exc}") from None
        timeout = self.peer.timeout_s if self.peer else 30.0
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.require_called_aet = True
        for uid in self.sop_classes:
            ae.add_supported_context(uid, RETRIEVE_SYNTAXES)
        tls = self.peer.tls if self.peer else None
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_C_STORE, storage_handler(self.received, self._lock, self._expected)),
        ]
        try:
            self._server = ae.start_server(
                (self.host, self.port),
                block=False,
                evt_handlers=handlers,
                ssl_context=server_tls_context(tls) if tls else None,
            )
        except OSError as exc:
            raise ConfigurationFault(f"cannot listen for C-MOVE on {self.host}:{self.port}: {exc}") from None

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            stop_server(server)

    def __enter__(self) -> ReportReceiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def move_reports(
    peer: PeerSettings, destination_ae: str, receiver: ReportReceiver, found: Sequence[FoundReport]
) -> tuple[list[RetrievedObject], int]:
    """C-MOVE `found` to our `receiver` (started here if it is not running); returns what arrived
    and the bytes it cost: the move association's PDUs and the objects, which came on the PACS's
    own association to ours (a report PDF is most of a round's bytes on a metered link)."""
    receiver.expect(f.sop_instance_uid for f in found)
    started_here = not receiver.running
    receiver.start()
    try:
        with QueryAssociation(peer, find=False, move=True) as q:
            q.move_to(destination_ae, found)
            cost = q.bytes_sent + q.bytes_received
    finally:
        if started_here:
            receiver.stop()
    objects = receiver.take()
    return objects, cost + sum(len(o.data) for o in objects)
