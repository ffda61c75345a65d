"""A rejection of our association request is read even when pynetdicom loses it (uploader.dicom_rejection).

pynetdicom's race is forced every time (tests/acse_race.py), not waited for under load.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from tests.acse_race import Handlers, answered_before_the_requestor_looks
from tests.peers import OrthancServer, RawAcsePeer
from uploader.dicom_rejection import REJECTED_PERMANENT, REJECTED_TRANSIENT, association_rejection

PACS_AE = "READING_CENTER"


def associate(
    port: int, *, calling_ae: str = "STRANGER", called_ae: str = PACS_AE, handlers: Handlers | None = None
) -> Association:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 30
    return ae.associate("127.0.0.1", port, ae_title=called_ae, evt_handlers=handlers or [])


@pytest.fixture(scope="module")
def orthanc_knowing_nobody(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), aet=PACS_AE, modalities={})
    server.start()
    yield server
    server.stop()


def test_pynetdicom_loses_orthancs_rejection_when_the_reactor_is_first(orthanc_knowing_nobody: OrthancServer) -> None:
    # The defect this module works around: if this starts failing after a pynetdicom upgrade,
    # the race is fixed upstream and uploader/dicom_rejection.py can go.
    assoc = associate(orthanc_knowing_nobody.dicom_port, handlers=answered_before_the_requestor_looks())
    assert (assoc.is_rejected, assoc.is_aborted, assoc.acceptor.primitive) == (False, True, None)


def test_orthancs_rejection_is_read_when_pynetdicom_lost_it(orthanc_knowing_nobody: OrthancServer) -> None:
    assoc = associate(orthanc_knowing_nobody.dicom_port, handlers=answered_before_the_requestor_looks())
    rejection = association_rejection(assoc)
    assert rejection is not None
    assert (rejection.result, rejection.reason_str) == (REJECTED_PERMANENT, "Calling AE title not recognised")


@pytest.mark.parametrize(
    ("calling_ae", "called_ae", "reason"),
    [
        ("STRANGER", PACS_AE, "Calling AE title not recognised"),
        ("STRANGER", "NOT_THE_PACS", "Called AE title not recognised"),
    ],
)
def test_orthancs_rejection_read_the_ordinary_way(
    orthanc_knowing_nobody: OrthancServer, calling_ae: str, called_ae: str, reason: str
) -> None:
    assoc = associate(orthanc_knowing_nobody.dicom_port, calling_ae=calling_ae, called_ae=called_ae)
    rejection = association_rejection(assoc)
    assert rejection is not None and (rejection.result, rejection.reason_str) == (REJECTED_PERMANENT, reason)


@pytest.mark.parametrize(
    ("reply", "result"),
    [(RawAcsePeer.REJECT_TRANSIENT, REJECTED_TRANSIENT), (RawAcsePeer.REJECT_PERMANENT_CALLED_AE, REJECTED_PERMANENT)],
)
def test_a_lost_rejection_keeps_its_result(reply: bytes, result: int) -> None:
    with RawAcsePeer(reply) as peer:
        assoc = associate(peer.port, handlers=answered_before_the_requestor_looks())
    assert not assoc.is_rejected  # pynetdicom lost it ...
    rejection = association_rejection(assoc)
    assert rejection is not None and rejection.result == result  # ... and it is read all the same


def test_an_abort_is_not_taken_for_a_rejection() -> None:
    with RawAcsePeer(RawAcsePeer.ABORT) as peer:
        assoc = associate(peer.port, handlers=answered_before_the_requestor_looks())
    assert assoc.is_aborted and association_rejection(assoc) is None
