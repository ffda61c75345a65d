"""Metered links from the configuration: one `Meter` per destination (uploader/metering.py)."""

from __future__ import annotations

from lastmile.clock import local_zone
from lastmile.config import Config, MeteredSection
from uploader.metering import Meter, MeterPolicy, SendWindow, StatusStore

# destination → (what `lastmile queue` calls it, where its settings are)
DESTINATIONS = {
    "dicom": "ECGs to the reading center (reading_center.metered)",
    "fhir": "visit records to the county platform (fhir.metered)",
    "reports": "report polling (reports.metered)",
}


def meter_policy(section: MeteredSection) -> MeterPolicy | None:
    """None when the destination is not metered (no budget, no windows)."""
    policy = MeterPolicy(
        daily_budget_bytes=int(section.daily_budget_mb * 2**20),
        windows=tuple(SendWindow.parse(w) for w in section.windows),  # checked by check_meaning
        zone=local_zone(),
    )
    return policy if policy.limited else None


def sections(config: Config) -> dict[str, MeteredSection]:
    return {
        "dicom": config.reading_center.metered,
        "fhir": config.fhir.metered,
        "reports": config.reports.metered,
    }


def meters(config: Config, store: StatusStore) -> dict[str, Meter]:
    """The metered destinations only."""
    found = {}
    for name, section in sections(config).items():
        policy = meter_policy(section)
        if policy is not None:
            found[name] = Meter(name, policy, store)
    return found
