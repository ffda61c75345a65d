"""What the senders record about their links in the outbox's status table, read one way by the
doctor, the console, the metrics exporter and the metered-link judgement (lastmile.services.metered).
Imports nothing of ours but uploader.fhir_link (which imports nothing): the metrics exporter and the
forward process both read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uploader.fhir_link import BUSY_SINCE, DOWN_SINCE, LAST_ERROR_AT, LAST_SENT_AT, SAID, Said

READING_CENTER_STATUS = "reading_center"  # uploader.ecg_forwarder.STATUS_NAME (no DICOM import here)
FHIR_STATUS = "fhir"  # uploader.fhir_forwarder.STATUS_NAME: the last FHIR round that claimed anything
# busy (429) this long, taking nothing, the county platform is as good as down: nothing reaches it
BUSY_DOWN_AFTER_S = 30 * 60


def number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def link_down(last_success_at: float | None, last_failure_at: float | None) -> bool:
    """A link failed since it last succeeded (or failed and never succeeded)."""
    return last_failure_at is not None and (last_success_at is None or last_failure_at > last_success_at)


def reading_center_down(status: dict[str, Any] | None) -> bool:
    """What the reading center's forwarder recorded (`READING_CENTER_STATUS`): its link is down."""
    status = status or {}
    return link_down(number(status.get("last_success")), number(status.get(LAST_ERROR_AT)))


def fhir_link_worked(status: dict[str, Any] | None) -> bool:
    """Whether the county platform's link worked since it last failed, as the FHIR sender recorded
    it (`FHIR_STATUS`): its rounds are all its attempts, so every failure recorded before the last
    one that heard it answer is older than a success. Judged as the metrics and the System page
    judge it (`FhirPlatform`): one bundle refused alone, it answers. Nothing judged yet: unknown."""
    return fhir_platform(status).said in (Said.ANSWERED, Said.REFUSED_ONE)


def fhir_link_failing(status: dict[str, Any] | None) -> bool:
    """Whether the county platform took nothing in the FHIR sender's last rounds that heard it, or
    missed it (`FHIR_STATUS`): not answering, busy, or refusing every bundle - not one refused alone.
    Nothing judged yet: unknown."""
    return fhir_platform(status).said in (Said.DOWN, Said.BUSY, Said.REFUSES_ALL)


@dataclass(frozen=True)
class FhirPlatform:
    """The county platform as the FHIR sender judged it in its last round that heard it, or missed
    it (`FHIR_STATUS`, uploader.fhir_link): refusing one bundle, or busy for a while, it answers -
    not down; not answering, refusing every bundle, or busy past `BUSY_DOWN_AFTER_S`, nothing
    reaches it - down."""

    said: Said | None  # None: no round since the upgrade recorded it
    down_since: float | None  # the rounds find it not answering since then
    last_sent_at: float | None  # the last round it took a bundle in
    busy_since: float | None = None  # the rounds find it busy since then

    def down(self, now: float) -> bool:
        if self.said in (Said.DOWN, Said.REFUSES_ALL):
            return True
        since = self.taking_nothing_since
        return self.said is Said.BUSY and since is not None and now - since >= BUSY_DOWN_AFTER_S

    @property
    def taking_nothing_since(self) -> float | None:
        """Since when it took nothing, as judged (None: it takes records, or it never took any and
        no spell says since when): not answering since the spell's first round; busy since the
        later of the spell's first round and the last bundle it took; refusing all since the last
        bundle it took."""
        if self.said is Said.DOWN:
            return self.down_since
        if self.said is Said.REFUSES_ALL:
            return self.last_sent_at
        if self.said is Said.BUSY:
            known = [t for t in (self.busy_since, self.last_sent_at) if t is not None]
            return max(known) if known else None
        return None


def fhir_platform(status: dict[str, Any] | None) -> FhirPlatform:
    """What the FHIR sender recorded of the platform (`FHIR_STATUS`); read, never guessed."""
    status = status or {}
    judged = next((said for said in Said if said == status.get(SAID)), None)  # damaged: not judged
    return FhirPlatform(
        judged,
        number(status.get(DOWN_SINCE)) if judged is Said.DOWN else None,
        number(status.get(LAST_SENT_AT)),
        number(status.get(BUSY_SINCE)) if judged is Said.BUSY else None,
    )


@dataclass(frozen=True)
class StatusSnapshot:
    """Status rows read once, as a `uploader.metering.StatusStore` a `Meter` can ask what it spent
    (each day, each window) without reading the row again; writing is not this reader's business."""

    values: dict[str, dict[str, Any]]

    def status(self, name: str) -> dict[str, Any] | None:
        return self.values.get(name)

    def record_status(self, name: str, value: dict[str, Any], now: float) -> None:
        raise PermissionError("a status snapshot is read-only")
