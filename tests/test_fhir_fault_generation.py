"""FHIR_FAULT_GENERATION (lastmile.visits.relay_link) is bumped by hand when the code that turns a
stored visit into a FHIR bundle changes: a visit set aside (fhir_fault) by another generation is
tried once more. Forgotten, a visit set aside by a fault the update mended stayed aside for good.
This test keeps the digest of that code per generation: a change to it fails here until the
generation is bumped and its digest recorded."""

from __future__ import annotations

import hashlib
import inspect

from lastmile.visits import record, relay_link
from lastmile.visits.book import VisitBook
from uploader import fhir_bundle

# the book's methods that read a stored visit (`observations`: which readings its bundle carries),
# make its bundle and sign it: read as source, by name (the test hashes their text; it calls none)
BOOK_BUNDLE_CODE = tuple(
    getattr(VisitBook, name)
    for name in (
        "_stored_for_bundle",
        "observations",
        "_finish_releases",
        "_decoded_or_quarantined",
        "_sendable_reading",
        "_bundle",
        "_chain",
    )
)

# generation -> sha256 of the bundle code (`bundle_code_digest`) it was set to; 1 recorded again
# when lastmile.visits.record joined the digest (no bundle code changed: same generation), and again
# when VisitBook.observations joined it (released readings left out: no visit set aside before
# then had a reading released when it is retried, so none is built differently: same generation);
# 2 when VisitBook._finish_releases joined it and began quarantining a damaged reading on its own:
# a visit set aside for one is built without it now (wrongly judged "not built differently" at 1);
# 3 when VisitBook._own_reading joined it: a reading that decodes but cannot be a bundle (a time
# UTC cannot say: fhir_bundle._instant) is quarantined on its own too; 3 recorded again when
# stored_reading and the readings' quarantine reasons moved into lastmile.visits.record (the same
# code, moved: no visit is built differently), and again when _finish_releases' loop became
# VisitBook._decoded_or_quarantined (shared with release_unsent; the same readings carried), and
# again when _own_reading became _sendable_reading (quarantining itself) and the readings' reasons
# one function offering a restore from backup only for a damaged record (reasons only: the same
# readings carried), and again when the visit bundle's outbox key (visit_bundle_key,
# visit_of_bundle_key) moved into uploader.fhir_bundle (a key, no bundle built differently), and
# again when a reading's bundle key (observation_key) moved there too (the Sent page looks it up)
BUNDLE_CODE_DIGESTS = {
    1: "c93859cc41a0483f1b5fe9ec6392d8ac2b76cee7eda6c7b09ea82640f7488f62",
    2: "fcb867eb2dfaf174294fe3950060638131874dec724edc39045dd89c7b808914",
    3: "3d2dc23b26c3e80dd0b38b2c87003a0b76ad89bfce1b9114eed1c5b17cb5e423",
}


def bundle_code_digest() -> str:
    """The visit-to-bundle code relay_link's comment names: the row decoding (the whole of
    lastmile.visits.record), the book's (BOOK_BUNDLE_CODE) and the whole of uploader.fhir_bundle."""
    parts = [record, *BOOK_BUNDLE_CODE, fhir_bundle]
    return hashlib.sha256("".join(inspect.getsource(part) for part in parts).encode()).hexdigest()


def test_the_fhir_fault_generation_is_bumped_whenever_the_bundle_code_changes() -> None:
    generation = relay_link.FHIR_FAULT_GENERATION
    assert BUNDLE_CODE_DIGESTS.get(generation) == bundle_code_digest(), (
        f"the code that makes a visit's FHIR bundle changed: bump FHIR_FAULT_GENERATION to {generation + 1} "
        f"and record {generation + 1}: {bundle_code_digest()!r} here"
    )
