"""The coded concepts a returned report carries, worded in the reader's language.

A county's SR names its headings and findings with DICOM's English concept names (Findings,
Observer Type, Acute ST segment elevation myocardial infarction): a village doctor reads Chinese.
The concepts the gateway knows - the headings of the reports it receives (TID 3700 ECG Report,
TID 1002 observer context) and the critical findings it is configured for (config
reports.critical_codes) - are keyed here by their code, never by the words, and translated
through the console's catalog (`scripts/i18n.sh` extracts this module). Any other concept is
shown as the county wrote it.
"""

from __future__ import annotations

from lastmile.console.i18n import N_

# "SCHEME CODE" (as `uploader.report_reading.concept_key` keeps it) -> the concept in English
HEADINGS = {
    "LN 28010-7": N_("ECG report"),
    "LN 11524-6": N_("ECG report"),  # EKG study: a FHIR DiagnosticReport's code
    "LN 8867-4": N_("Heart rate"),
    "DCM 121005": N_("Observer Type"),
    "DCM 121006": N_("Person"),  # an Observer Type's values
    "DCM 121007": N_("Device"),
    "DCM 121008": N_("Person Observer Name"),
    "DCM 121009": N_("Person Observer's Organization Name"),
    "DCM 121010": N_("Person Observer's Role in the Organization"),
    "DCM 121011": N_("Person Observer's Role in this Procedure"),
    "DCM 121070": N_("Findings"),
    "DCM 121071": N_("Finding"),
    "DCM 121072": N_("Impressions"),
    "DCM 121073": N_("Impression"),
}
# the critical findings of the default reports.critical_codes (and the demo's sinus rhythm)
FINDINGS = {
    "SCT 401303003": N_("Acute ST segment elevation myocardial infarction"),
    "SCT 71908006": N_("Ventricular fibrillation"),
    "SCT 25569003": N_("Ventricular tachycardia"),
    "SCT 27885002": N_("Complete atrioventricular block"),
    "SCT 426783006": N_("Sinus rhythm"),
}
# a FHIR result's HL7 interpretation flags: AA, HH, LL (which make a report critical) and their
# milder kin, by HL7's display names (what Chinese lab reports print beside a value in zh_CN)
INTERPRETATIONS = {
    "V3-OBSINT AA": N_("Critical abnormal"),
    "V3-OBSINT HH": N_("Critical high"),
    "V3-OBSINT LL": N_("Critical low"),
    "V3-OBSINT A": N_("Abnormal"),
    "V3-OBSINT H": N_("High"),
    "V3-OBSINT L": N_("Low"),
}
KNOWN = {**HEADINGS, **FINDINGS, **INTERPRETATIONS}
# other words that are only a known concept's standard name (its code system's display, the usual
# abbreviation): our term may stand in for them, as for the concept's English above
SYNONYMS = {"LN 11524-6": ("EKG study",), "SCT 401303003": ("STEMI",)}


def known_concept(concept: str) -> str | None:
    """The English msgid of a coded concept the gateway knows ("" or unknown: None)."""
    return KNOWN.get(concept) if concept else None


def standard_names(concept: str) -> tuple[str, ...]:
    """A known concept's standard names: its English above and its synonyms (() when unknown)."""
    return tuple(n for n in (KNOWN.get(concept, ""), *SYNONYMS.get(concept, ())) if n)


def standard_words(words: str, concept: str) -> bool:
    """Whether a county's words for a known concept are only its standard name (any case), nothing
    of the county's own (a detail, a revision) that our term would lose."""
    return bool(concept) and words.casefold() in {n.casefold() for n in standard_names(concept)}


# every known concept by its standard names, the first code of a shared name ("ECG report") kept
_BY_NAME = {name.casefold(): concept for concept in reversed(KNOWN) for name in standard_names(concept)}


def named_concept(words: str) -> str:
    """The known concept whose standard name `words` are ("" if none): a line stored before the
    gateway kept the county's codes ("Findings", "Person" without DCM 121070, DCM 121006) is known
    by its words, by the same rule as `standard_words` - no rescan of the stored reports."""
    return _BY_NAME.get(words.casefold(), "")
