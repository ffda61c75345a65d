"""A reading center's reports as the report-text tests read them: the study they answer, the county's
critical-result rules (in Chinese and English), and an SR with every kind of content line."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import TwelveLeadECGWaveformStorage

from lastmile.demo.cardiologist import STEMI, StudyToRead, content_item, ecg_report_sr
from uploader.report_reading import CriticalRules

STUDY = StudyToRead("1.2.826.0.1.3680043.8.498.77", patient_id="P0077", patient_name="Zhang^San=张^三")
RULES = CriticalRules.parse(["SCT:401303003"], ["危急值", "Critical Result"])


def everything_sr() -> Dataset:
    """An amended, critical SR with every kind of content line the gateway must label: a NUM
    without a value, a reference to the ECG, coordinates, an item with no concept name."""
    first = ecg_report_sr(STUDY, findings=["窦性心律"], impression="正常心电图")
    sr = ecg_report_sr(
        STUDY,
        findings=["ST 段抬高 V1-V4", "Sinus rhythm, 88/min"],
        impression="急性前壁心肌梗死，危急值，请立即转诊",
        coded_findings=[STEMI],
        reader="李^明",
        amends=first,
    )
    waveform = content_item("CONTAINS", "WAVEFORM", ("122170", "DCM", "心电波形"))
    reference = Dataset()
    reference.ReferencedSOPClassUID = TwelveLeadECGWaveformStorage
    reference.ReferencedSOPInstanceUID = "1.2.3.4"
    waveform.ReferencedSOPSequence = [reference]
    unnamed = Dataset()
    unnamed.RelationshipType = "CONTAINS"
    unnamed.ValueType = "TEXT"
    unnamed.TextValue = "备注：复查"
    sr.ContentSequence += [
        content_item("CONTAINS", "NUM", ("8867-4", "LN", "心率")),
        waveform,
        content_item("CONTAINS", "SCOORD", ("111030", "DCM", "Image Region")),
        unnamed,
    ]
    return sr
