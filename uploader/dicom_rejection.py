"""The peer's rejection of an association request, read even when pynetdicom loses it.

pynetdicom 3.0 negotiates as requestor in two threads. The DUL reactor connects, sends the
A-ASSOCIATE-RQ and, when the peer answers A-ASSOCIATE-RJ, queues the reject confirmation and
closes the socket (PS3.8 action AE-4). Meanwhile the association thread waits for the transport
to be ready and then checks `socket._is_connected` before reading the answer
(`acse._negotiate_as_requestor`). If the reactor got the rejection and closed the socket first —
a peer on loopback answers in well under a millisecond, so a busy CPU is enough — that check reads
"not connected": pynetdicom aborts, never reads the queued rejection, and the association looks
aborted (is_rejected False, acceptor.primitive None). Orthanc refusing an unknown calling AE was
mis-read like this in about 6 % of attempts under `stress-ng --cpu 2`.

The rejection is still in the DUL's queue for the service user: read it from there.
"""

from __future__ import annotations

from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE

REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02


def association_rejection(assoc: Association) -> A_ASSOCIATE | None:
    """The peer's A-ASSOCIATE-RJ answer to `assoc`'s request, or None if it sent none.

    Call only once the association is known not to be established: it drains primitives the
    service user never read.
    """
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        return assoc.acceptor.primitive
    # Only a rejection is taken from what was left unread: an A-ASSOCIATE-AC left there (accepted,
    # then the connection dropped) negotiated no contexts and still means "aborted".
    while (primitive := assoc.dul.receive_pdu(wait=False)) is not None:
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (REJECTED_PERMANENT, REJECTED_TRANSIENT):
            return primitive
    return None
