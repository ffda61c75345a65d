"""Reports from the county platform as FHIR R4 `DiagnosticReport`s (requests), failures typed.

On the same `FhirConnection` as `fhir_sender` (token, https only, same origin, CA, error mapping):
- `search(study_uids, since)`: DiagnosticReports whose identifier is one of the ECG studies' UIDs
  (`urn:dicom:uid|urn:oid:<uid>`, several per request, comma = OR), changed after `since`
  (`_lastUpdated=gt...`), following `next` links;
- `read(id, version)`: a conditional read (`If-None-Match: W/"version"`): None when unchanged
  (304), so watching a preliminary report for its final version costs a few hundred bytes.
Network errors, 408/429/5xx → TransientError; 401/403, TLS trust → ConfigurationFault; other 4xx
→ PermanentError with the server's OperationOutcome text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import requests

from uploader.errors import PermanentError, TransientError
from uploader.fhir_connection import FhirConnection
from uploader.report_reading import dicom_uid_identifier

log = logging.getLogger(__name__)

MAX_PAGES = 20  # a search answering more pages than this is cut short (logged)


class FhirReportClient(FhirConnection):
    def __enter__(self) -> FhirReportClient:
        return self

    def _get(self, url: str, params: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Any:
        return self.request("GET", url, headers or {}, params=params)  # counted there, both ways

    def _check(self, response: requests.Response) -> None:
        self.raise_for_refusal(response, "the request")

    def _json(self, response: requests.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            raise TransientError(f"FHIR server answered {response.status_code} without a JSON body") from None
        if not isinstance(body, dict):
            raise PermanentError("FHIR server answered something that is not a resource")
        return body

    def search(self, study_uids: Sequence[str], since: str | None = None) -> list[dict[str, Any]]:
        """DiagnosticReports for any of `study_uids` (changed after `since`, an ISO instant)."""
        if not study_uids:
            return []
        params = {
            "identifier": ",".join("|".join(dicom_uid_identifier(uid)) for uid in study_uids),
            "_count": "100",
        }
        if since:
            params["_lastUpdated"] = f"gt{since}"
        url: str | None = self.url("DiagnosticReport")
        found: list[dict[str, Any]] = []
        pages = 0
        query: dict[str, str] | None = params
        while url:
            response = self._get(url, query)
            self._check(response)
            bundle = self._json(response)
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if isinstance(resource, dict) and resource.get("resourceType") == "DiagnosticReport":
                    found.append(resource)
            pages += 1
            url = next(
                (
                    link.get("url")
                    for link in bundle.get("link") or []
                    if isinstance(link, dict) and link.get("relation") == "next"
                ),
                None,
            )
            query = None  # the next link carries the whole query
            if url and pages >= MAX_PAGES:
                log.warning("DiagnosticReport search cut short after %d pages", pages)
                break
        return found

    def read(self, report_id: str, version: str = "") -> dict[str, Any] | None:
        """The DiagnosticReport, or None when it still is `version` (304 Not Modified)."""
        headers = {"If-None-Match": f'W/"{version}"'} if version else None
        response = self._get(self.url(f"DiagnosticReport/{report_id}"), None, headers)
        if response.status_code == 304:
            return None
        self._check(response)
        return self._json(response)
