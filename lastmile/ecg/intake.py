"""How an ECG recording enters the outbox: once, with its UIDs minted once, from every path.

The paths: a file (`lastmile import`, a USB stick's watched folder), the clinic-LAN DICOM
receiver, the serial bridge's streamed ECG. The DICOM object is built here, at intake, and
stored as the payload: a retry, a crash or a restart later sends the very same bytes (same
Study/Series/SOP Instance UIDs), so the reading center can never see one recording as two
studies. Every path describes its item with the one `ecg_item_meta` builder.

Patients: a file's patient ID is kept as every path keeps an entered one (`kept_patient_id`: runs of
spaces as one) and vetted against `[patient] id_kind` (`vetted_patient`; with any
kind of ID, one that looks like a resident ID is one, as on every path): a resident ID with a
wrong check digit is refused (the ECG stays unassigned, flagged "patient-id-refused"),
a valid one gives birth date and sex when the file has none, and a file that says otherwise is
flagged ("patient-id-conflict:birth-date" / ":sex") and held for the doctor as one held for its
name is ("patient-id-conflict", STAT ones too, as short): he sends it with the ID's sex and birth
date, or gives it to another patient; unanswered, it goes with both said in its Patient Comments
(`id_conflict_comment`), for the county reader; names get their pinyin group.

Holds: a routine ECG with no patient, or one naming another patient than the current one, is
added to the outbox *held* ("unassigned" / "patient-mismatch") for `patient.unassigned_ecg_hold_s`,
listed by `lastmile patient show`; `assign_held_ecg` rebuilds it for its patient under the same
UIDs (and Accession Number) and lets it go; when the hold runs out it goes as it is (placeholder
ID, flagged). STAT ECGs are not held for that. A file naming the checked-in patient's ID (or one
of his linked IDs) under another person's name (`same_person_name`: the cart kept the previous
patient's name, a mistyped ID that is someone else's number) is held "name-mismatch", STAT ones
too but shorter (`name_hold_s`): the doctor says whose it is on Today. Listing, releasing and discarding held ECGs need no
DICOM rebuild: they are in `lastmile.ecg.holds` (re-exported here), usable without pydicom.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import logging
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

from devices.ecg.quality import RE_RECORD, EcgQualityError, QualityReport, check_quality
from devices.ecg.recording import EcgRecording
from devices.identity import DEVICE_CLOCK_BACKWARDS, InvalidPatientIdError, Patient, ResidentId
from lastmile.clinic.names import dicom_person_name, has_ideographs, no_name, same_person_name
from lastmile.clinic.patient_ids import clinic_patient as clinic_patient  # re-exported: the commands' import
from lastmile.clinic.patient_ids import kept_patient_id
from lastmile.clinic.patients import StatSession
from lastmile.clock import local_zone
from lastmile.config import Config, EcgSection
from lastmile.ecg.holds import ASSIGNED_BY_DOCTOR as ASSIGNED_BY_DOCTOR  # re-exported: its users' import
from lastmile.ecg.holds import (
    DAMAGED,
    ID_CONFLICT,
    ID_CONFLICT_FLAGS,
    LAN_SOURCE_FORMAT,
    NAME_MISMATCH,
    PATIENT_MISMATCH,
    QUALITY_HOLD,
    UNASSIGNED_HOLD,
    DamagedEcgError,
    HeldEcgError,
)
from lastmile.ecg.holds import (  # re-exported: the holds' operations with the one that rebuilds
    DOCTOR_HOLDS as DOCTOR_HOLDS,
)
from lastmile.ecg.holds import discard_held_ecg as discard_held_ecg
from lastmile.ecg.holds import held_ecgs as held_ecgs
from lastmile.ecg.holds import release_held_ecg as release_held_ecg
from uploader.dicom_ecg import (
    StationInfo,
    StudyRequest,
    build_ecg_dataset,
    check_ecg_iod,
    choose_sop_class,
    mint_uids,
    reassign_patient,
)
from uploader.outbox import AddResult, Hold, ItemState, Kind, Outbox, OutboxItem, Priority, instance_key

if TYPE_CHECKING:
    from firmware_bridge.dicom_receiver import DicomReceiver, ReceivedObject
    from firmware_bridge.usb_import import FolderWatcher, ImportSummary

log = logging.getLogger(__name__)

PATIENT_ID_REFUSED = "patient-id-refused"

# the IDs that are the clinic session's current patient (`PatientContext.patient_ids`): empty, nobody
CurrentPatient = Callable[[], "frozenset[str]"]


def _no_current_patient() -> frozenset[str]:
    return frozenset()


# the name the clinic session knows for a patient ID, "" for none (`PatientContext.known_name`)
CheckedInName = Callable[[str], str]


def _no_checked_in_name(patient_id: str) -> str:
    return ""


# How long a STAT ECG waits for the doctor's answer on a name that is not the check-in's, at
# most. He recorded it a minute ago, with the patient in front of him, and Today shows it first:
# two minutes are enough to answer and short next to the reading center's STAT turnaround. If he
# does not answer, an urgent read is worth more than the wait: it goes as the cart wrote it, the
# ID the checked-in patient's, flagged "name-mismatch": in the object for the reader when the
# gateway built it (a file), only in the outbox record (`patient show`, `queue`) for a cart's LAN
# object, which is forwarded as the cart made it (`lan_object_store`). `ecg.stat_name_hold_s`; its default:
STAT_NAME_HOLD_S = EcgSection().stat_name_hold_s


def name_hold_s(stat: bool, patient_hold_s: float, stat_hold_s: float = STAT_NAME_HOLD_S) -> float:
    """How long an ECG whose file's name is not the check-in's waits for the doctor: a routine one
    as long as any ECG whose patient he must settle (`patient.unassigned_ecg_hold_s`, 0: never
    held), a STAT one `stat_hold_s` (`ecg.stat_name_hold_s`) at most, and never longer than a routine one."""
    return min(patient_hold_s, stat_hold_s) if stat else patient_hold_s


def names_differ(file_name: str, checked_in_name: str) -> bool:
    """The file names another person than the check-in did (`same_person_name`: 张三 is
    Zhang^San=张^三; 章三 is not). A file or a check-in without a name passes: many
    carts write none, and there is then nothing that says it is someone else. A placeholder is no
    name (`no_name`: "^^^^", "UNKNOWN", "-"): a cart whose name field was left so would have every
    ECG held, and "its name is right" would rename the patient "^^^^"."""
    if no_name(file_name) or no_name(checked_in_name):
        return False
    return not same_person_name(file_name, checked_in_name)


StatLookup = Callable[[], "StatSession | None"]


def _no_stat_session() -> StatSession | None:
    return None


def session_now(
    current_patient_ids: CurrentPatient, stat_session: StatLookup
) -> tuple[frozenset[str], StatSession | None]:
    """The current patient's IDs and his STAT session (None: not STAT), for one recording: one read
    of the session log, as a STAT session carries his IDs (the linked ones too)."""
    session = stat_session()
    return (session.patient_ids if session is not None else current_patient_ids()), session


def station_of(config: Config) -> StationInfo:
    """StationName is the configured short name (checked to fit 16 bytes by the configuration,
    never cut); the full gateway id goes with it as the converting equipment's serial number."""
    g = config.gateway
    return StationInfo(station_name=g.dicom_station_name, institution=g.institution, gateway_id=g.id)


# -- patients ----------------------------------------------------------------------------------------


def vetted_patient(recording: EcgRecording, config: Config) -> EcgRecording:
    """The file's patient checked against `[patient] id_kind` (see the module docstring)."""
    p = recording.patient
    if p is None:
        return recording
    flags = list(recording.flags)
    birth, sex = p.birth_date, p.sex
    try:  # the one rule of every entry path: a cart's loosely typed ID is the patient checked in
        number, resident = kept_patient_id(p.patient_id, config.patient.id_kind)
    except InvalidPatientIdError as exc:
        log.warning("ECG file's patient ID refused: %s", exc)
        return dataclasses.replace(recording, patient=None, flags=(*flags, PATIENT_ID_REFUSED))
    if resident is not None:
        flags += against_resident_id(sex, birth.isoformat() if birth else "", resident)[0]
        birth, sex = birth or resident.birth_date, sex or resident.sex
    patient = Patient(
        patient_id=number,
        name=dicom_person_name(p.name),
        birth_date=birth,
        sex=sex,
        issuer=p.issuer or config.patient.id_issuer,
    )
    return dataclasses.replace(recording, patient=patient, flags=tuple(dict.fromkeys(flags)))


def session_request(doctor: str | None, *, reason: str = "") -> StudyRequest:
    """What the referring doctor asks for: the doctor on duty (name with its pinyin group) and why."""
    return StudyRequest(referring_physician=dicom_person_name(doctor or ""), reason=" ".join(reason.split()))


def clinic_request(config: Config) -> StudyRequest:
    """The request of the moment from the clinic session: the doctor on duty and the reason given
    with the current patient (for files that arrive on their own, e.g. a cart's USB stick)."""
    from lastmile.clinic.patients import PatientContext

    now = dt.datetime.now(dt.timezone.utc)
    context = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
    try:
        current = context.current(now)
        return session_request(context.current_doctor(now), reason=current.reason if current else "")
    finally:
        context.close()


def quality_of(recording: EcgRecording, config: Config) -> QualityReport | None:
    """The quality gate's report (None when switched off or when the rate is outside what the
    analysis covers: the builder refuses such rates anyway). It never blocks an ECG."""
    if not config.ecg.quality_check:
        return None
    try:
        return check_quality(recording)
    except EcgQualityError as exc:
        log.warning("ECG quality not checked: %s", exc)
        return None


def quality_hold_until(
    recording: EcgRecording, config: Config, now: float, quality: QualityReport | None
) -> float | None:
    """Until when a 're-record' verdict keeps a routine ECG for the doctor (None: not held)."""
    if recording.stat or quality is None or quality.verdict != RE_RECORD or config.ecg.re_record_hold_s <= 0:
        return None
    return now + config.ecg.re_record_hold_s


def hold_for(recording: EcgRecording, config: Config, now: float, quality: QualityReport | None = None) -> Hold | None:
    """Routine ECGs the doctor must look at are held: a patient to settle, or a 're-record'
    verdict (record again while the patient is here, or send anyway). STAT ones only for a name
    that is not the check-in's, and shorter (`name_hold_s`): an urgent ECG with other problems
    is still sent, its problems marked. With two reasons, the patient's
    comes first and the hold lasts as long as the longer one."""
    patient_s = config.patient.unassigned_ecg_hold_s
    name_s = name_hold_s(recording.stat, patient_s, config.ecg.stat_name_hold_s)
    name_hold = Hold(NAME_MISMATCH, now + name_s) if name_s > 0 and NAME_MISMATCH in recording.flags else None
    if name_hold is None and name_s > 0 and id_conflict(recording.flags):
        # the file's sex or birth date is not its ID's: often the previous patient's, still typed
        # in the cart; a wrong sex or age changes how the ECG is read, as a wrong name does
        name_hold = Hold(ID_CONFLICT, now + name_s)
    if recording.stat:
        return name_hold  # another person's name or details: the wrong patient is worse than a short wait
    holds = []
    if patient_s > 0 and recording.patient is None:
        holds.append(Hold(UNASSIGNED_HOLD, now + patient_s))
    elif patient_s > 0 and PATIENT_MISMATCH in recording.flags:
        holds.append(Hold(PATIENT_MISMATCH, now + patient_s))
    elif name_hold is not None:
        holds.append(name_hold)
    until = quality_hold_until(recording, config, now, quality)
    if until is not None:
        holds.append(Hold(QUALITY_HOLD, until))
    if not holds:
        return None
    return Hold(holds[0].reason, max(h.until for h in holds))


def id_conflict(flags: Iterable[str]) -> bool:
    """The file's sex or birth date is not what its resident ID says (`vetted_patient`)."""
    return any(flag in ID_CONFLICT_FLAGS for flag in flags)


def against_resident_id(sex: str, born: str, resident: ResidentId | None) -> tuple[list[str], dict[str, str]]:
    """A file's or a cart's sex and birth date (`born`: YYYYMMDD or ISO, "" for none) against
    what its resident ID says: the conflict flags (`ID_CONFLICT_FLAGS`) and, with any, the ID's
    sex and birth date for Today's question (`id_sex`, `id_birth_date`); none without a resident ID.
    The one judgement of a file (`vetted_patient`, `id_conflict_meta`) and a cart's object (`lan_id_conflict`)."""
    if resident is None:
        return [], {}
    flags = []
    if sex and sex != resident.sex:
        flags.append(ID_CONFLICT_FLAGS[0])
    if born and born.replace("-", "") != resident.birth_date.strftime("%Y%m%d"):
        flags.append(ID_CONFLICT_FLAGS[1])
    if not flags:
        return [], {}
    return flags, {"id_sex": resident.sex, "id_birth_date": resident.birth_date.isoformat()}


def id_conflict_meta(recording: EcgRecording, config: Config) -> dict[str, str]:
    """What an ECG whose file contradicts its resident ID keeps in its meta for Today's question:
    the sex and birth date the ID says (the item's patient keeps the file's, `vetted_patient`)."""
    p = recording.patient
    if p is None or not id_conflict(recording.flags):
        return {}
    resident = kept_patient_id(p.patient_id, config.patient.id_kind)[1]
    return against_resident_id(p.sex, p.birth_date.isoformat() if p.birth_date else "", resident)[1]


SEX_WORDS = {"M": ("男", "M"), "F": ("女", "F"), "O": ("其他", "O")}  # Patient's Sex as the reader reads it


def id_conflict_comment(flags: Iterable[str], patient_id: str, sex: str, born: str, id_values: dict[str, str]) -> str:
    """The Patient Comments (0010,4000) of an ECG whose sex or birth date (`born`: YYYYMMDD or
    ISO) its resident ID contradicts (`id_values`, `against_resident_id`), as it goes when the
    doctor has not said which is right: the county reader sees both with the study, not only our
    outbox record. "" without a conflict. Chinese first, English after."""
    flags = list(flags)
    if not id_values or not id_conflict(flags):
        return ""
    which = [i for i, flag in enumerate(ID_CONFLICT_FLAGS) if flag in flags]
    what_zh = "/".join(("性别", "出生日期")[i] for i in which)
    what_en = "/".join(("sex", "birth date")[i] for i in which)
    born = f"{born[:4]}-{born[4:6]}-{born[6:]}" if len(born) == 8 and born.isdigit() else born

    def said(sex: str, born: str, language: int) -> str:
        return f"{SEX_WORDS.get(sex, (sex, sex))[language] or '-'}{'，' if language == 0 else ', '}{born or '-'}"

    ecg_zh, ecg_en = said(sex, born, 0), said(sex, born, 1)
    id_zh, id_en = (said(id_values["id_sex"], id_values["id_birth_date"], i) for i in (0, 1))
    return (
        f"心电图上的{what_zh}与身份证号不符，医生未确认：心电图上是 {ecg_zh}；身份证号 {patient_id} 是 {id_zh}。"
        f" / The ECG's {what_en} contradicts the resident ID, not confirmed by the doctor: the ECG says "
        f"{ecg_en}; ID {patient_id} says {id_en}."
    )


def recording_id_conflict_comment(
    recording: EcgRecording, config: Config, id_values: dict[str, str] | None = None
) -> str:
    """The Patient Comments (`id_conflict_comment`) of a vetted recording (`vetted_patient`) whose
    file's sex or birth date its resident ID contradicts, as the object built from it goes when
    nobody answered (the outbox's, `lastmile ecg to-dicom`'s); "" for none. `id_values`: its
    `id_conflict_meta` when the caller has it already (the ID is not parsed again)."""
    p = recording.patient
    if p is None:
        return ""
    born = p.birth_date.isoformat() if p.birth_date else ""
    values = id_conflict_meta(recording, config) if id_values is None else id_values
    return id_conflict_comment(recording.flags, p.patient_id, p.sex, born, values)


def name_mismatch_meta(flags: Iterable[str], file_name: str, checked_in_name: str) -> dict[str, str]:
    """What an ECG held for another name keeps in its meta: both names, for Today's question."""
    if NAME_MISMATCH not in flags:
        return {}
    return {"file_patient_name": file_name, "checked_in_name": checked_in_name}


def refused_patient_meta(flags: Iterable[str], written: Patient | None, config: Config) -> dict[str, str]:
    """What an ECG whose file's patient ID was refused (`vetted_patient`: no patient, so held
    "unassigned") keeps of its file: the name and ID as the cart wrote them, and the rule the ID
    broke (InvalidPatientIdError.reason). Today says them ("the ECG machine says 李建国 ...: its check
    digit is wrong") and offers nobody: without them the row read "no patient", the checked-in
    patient's ID typed in its Assign box, and one tap put another person's ECG under him."""
    if written is None or PATIENT_ID_REFUSED not in flags:
        return {}
    return _refused_id_meta(
        written.patient_id, written.name, id_problem(written.patient_id, config.patient.id_kind) or ""
    )


def _refused_id_meta(patient_id: str, name: str, problem: str) -> dict[str, str]:
    """The meta keys of an ECG whose cart's patient ID was refused, a file's or a LAN object's:
    the ID and name as the cart wrote them, the rule the ID broke."""
    return {
        "file_patient_id": " ".join(patient_id.split()),
        "file_patient_name": name.strip(),
        "file_patient_id_problem": problem,
    }


def id_problem(patient_id: str, id_kind: str) -> str | None:
    """The rule `patient_id` breaks under `id_kind` (InvalidPatientIdError.reason: "check-character",
    "length", ...); None for an ID the gateway keeps (a loosely written valid one too)."""
    try:
        kept_patient_id(patient_id, id_kind)
    except InvalidPatientIdError as exc:
        return exc.reason
    return None


# the rule a refused ID broke (`id_problem`), as the county reader reads it: Chinese, English
ID_PROBLEM_WORDS = {
    "check-character": ("身份证号校验位不对", "its check digit is wrong"),
    "length": ("身份证号位数不对", "it has the wrong number of digits"),
    "birth-date": ("身份证号里的出生日期不对", "its birth date is not a date"),
}


def refused_id_comment(meta: dict) -> str:
    """The Patient Comments (0010,4000) of an ECG whose cart wrote a patient ID the gateway refused
    (`refused_patient_meta`, `lan_refused_meta`), as it goes when the doctor has not said whose it
    is: the county reader sees whom the cart named, not only "no patient" (a file's) or an ID no
    one has (a cart's LAN object). "" for none. Chinese first, English after."""
    from lastmile.reports.report_text import display_name

    if "file_patient_id_problem" not in meta:
        return ""
    name = str(meta.get("file_patient_name") or "")
    who = " ".join(part for part in (display_name(name) or name, str(meta.get("file_patient_id") or "")) if part)
    zh, en = ID_PROBLEM_WORDS.get(
        str(meta["file_patient_id_problem"]), ("患者编号无效", "it is not a valid patient ID")
    )
    return (
        f"心电图机上写的患者是 {who or '-'}，{zh}，医生未确认是谁的心电图。"
        f" / The ECG machine named {who or '-'}, but {en}: the doctor has not confirmed whose ECG it is."
    )


def lan_refused_meta(patient: dict | None, id_kind: str) -> dict[str, str]:
    """A cart's object whose patient ID is refused (a resident ID with a wrong check digit, length
    or birth date), kept in its meta as a file's is (`refused_patient_meta`): the ID and name as the
    cart wrote them and the rule the ID broke. {} for an object naming nobody or a kept ID."""
    if not patient:
        return {}
    problem = id_problem(str(patient.get("patient_id") or ""), id_kind)
    if problem is None:
        return {}
    return _refused_id_meta(str(patient.get("patient_id") or ""), str(patient.get("name") or ""), problem)


def patient_fields(recording: EcgRecording) -> dict | None:
    p = recording.patient
    if p is None:
        return None
    return {
        "patient_id": p.patient_id,
        "name": p.name,
        "issuer": p.issuer,
        "sex": p.sex,
        "birth_date": p.birth_date.isoformat() if p.birth_date else None,
    }


def ecg_item_meta(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    study_uid: str,
    series_uid: str,
    source_format: str,
    flags: Iterable[str],
    unassigned: bool,
    **extra: object,
) -> dict:
    """The outbox meta of an ECG item, whatever path it came by: the routing UIDs, where it came
    from, the flags the doctor must see, whether a patient is known. `extra` carries what only
    one path knows (leads and rate of a decoded recording; transfer syntax and calling AE of an
    object received as it is)."""
    return {
        "sop_class_uid": sop_class_uid,
        "sop_instance_uid": sop_instance_uid,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "source_format": source_format,
        "flags": list(flags),
        "unassigned": unassigned,
        **extra,
    }


def deflated_part10(ds: Dataset) -> bytes:
    """The object as a Deflated Explicit VR Little Endian Part-10 file.

    Deflated once here, at intake: the SD card stores ~40 % fewer bytes, and the forwarder sends
    the stored bytes as they are to a PACS that accepts deflate (inflating only for one that
    does not), instead of compressing again at every send.
    """
    check_ecg_iod(ds)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def enqueue_recording(
    outbox: Outbox,
    recording: EcgRecording,
    config: Config,
    *,
    key: str,
    now: float | None = None,
    created_at: dt.datetime | None = None,
    request: StudyRequest | None = None,
    checked_in_name: str = "",
    file_patient: Patient | None = None,
) -> AddResult:
    """Build the DICOM object for `recording` and make it durable in the outbox under `key`
    (held for the doctor when its patient must be settled, see `hold_for`). `checked_in_name`:
    the name the check-in gave the file's ID, kept with an ECG held for another name (Today says
    both, and "it is his" sends it under this one). `file_patient`: the patient as the file wrote
    it, for a `recording` its caller vetted already (`file_enqueuer`): one refused is kept in the
    meta (`refused_patient_meta`).

    Idempotent: a key already in the outbox returns the existing item and builds nothing.
    """
    existing = outbox.find(key)
    if existing is not None:
        return AddResult(item=existing, created=False)
    now = time.time() if now is None else now
    request = request or StudyRequest()
    written = file_patient or recording.patient
    recording = vetted_patient(recording, config)
    quality = quality_of(recording, config)
    uids = mint_uids()
    ds = build_ecg_dataset(recording, uids, station_of(config), created_at=created_at, request=request, quality=quality)
    id_values = id_conflict_meta(recording, config)
    conflict_comment = recording_id_conflict_comment(recording, config, id_values)
    refused = refused_patient_meta(recording.flags, written, config)
    comment = conflict_comment or refused_id_comment(refused)  # a refused ID's file names nobody: never both
    if comment:  # the doctor's answer takes it away (`assign_held_ecg`); unanswered, it goes with the study
        with_comment(ds, comment)  # after the builder's UNASSIGNED words of a file naming nobody
    data = deflated_part10(ds)
    hold = hold_for(recording, config, now, quality)
    meta = ecg_item_meta(
        sop_class_uid=choose_sop_class(recording),
        sop_instance_uid=uids.sop_instance_uid,
        study_uid=uids.study_uid,
        series_uid=uids.series_uid,
        source_format=recording.source_format,
        flags=recording.flags,
        unassigned=recording.patient is None,
        leads=recording.n_leads,
        sampling_rate_hz=recording.sampling_rate_hz,
        accession_number=uids.accession_number,
        acquired_at=recording.acquired_at.isoformat(),  # shown with its report, after the purge
        device=recording.device.label(),
        duration_s=round(recording.duration_s, 1),
        stat=recording.stat,
        quality=quality.to_json() if quality is not None else None,
        quality_hold_until=quality_hold_until(recording, config, now, quality),
        **({"file_patient_id": recording.patient.patient_id} if recording.patient and hold else {}),
        **refused,
        **name_mismatch_meta(recording.flags, recording.patient.name if recording.patient else "", checked_in_name),
        **id_values,
        **({"id_conflict_comment": conflict_comment} if conflict_comment else {}),
    )
    result = outbox.add(
        Kind.DICOM,
        key,
        data,
        priority=Priority.STAT if recording.stat else Priority.ROUTINE,
        meta=meta,
        patient=patient_fields(recording),
        now=now,
        hold=hold,
    )
    if result.created:
        log.info(
            "ECG queued as item %d (%d leads, %.0f Hz, %d bytes%s%s)",
            result.item.id,
            recording.n_leads,
            recording.sampling_rate_hz,
            len(data),
            ", STAT" if recording.stat else "",
            f", held ({hold.reason}) for the doctor" if hold else "",
        )
    return result


def assign_held_ecg(outbox: Outbox, item_id: int, patient: Patient, *, now: dt.datetime, by: str = "") -> OutboxItem:
    """Give a held ECG its patient: the stored object is rebuilt under the same UIDs for
    `patient` and released to the forwarder. HeldEcgError when it is no ECG of ours or was
    already sent (then the reading center must correct the study)."""
    import pydicom

    item = outbox.get(item_id)
    if item is None or item.kind != Kind.DICOM:
        raise HeldEcgError(f"no ECG E{item_id} held at this gateway")
    if item.meta.get("source_format") == LAN_SOURCE_FORMAT:
        # a cart's object is forwarded as the cart made it: only the doctor's answer to a name is written into it
        # or held with its ID refused (`lan_refused_meta`): the doctor's ID written in, the cart's kept as another
        lan_holds = (
            NAME_MISMATCH,
            ID_CONFLICT,
            *((UNASSIGNED_HOLD,) if "file_patient_id_problem" in item.meta else ()),
        )
        if not (item.held(now.timestamp()) and item.hold_reason in lan_holds):
            raise HeldEcgError(f"no ECG E{item_id} held at this gateway")
        return assign_lan_object(outbox, item, patient, now=now, by=by)
    if item.attempts or item.state != ItemState.QUEUED:
        raise HeldEcgError(
            f"ECG E{item_id} was already sent (state {item.state.value}) as "
            f"{'UNASSIGNED' if item.meta.get('unassigned') else 'its file patient'}: ask the reading center to "
            "correct the study's patient"
        )
    settled_on = (item.patient or {}).get("patient_id")
    if ASSIGNED_BY_DOCTOR in item.meta.get("flags", []):
        if settled_on != patient.patient_id:  # a second screen or doctor: the first decision stands
            raise HeldEcgError(f"ECG E{item_id} was assigned to patient {settled_on} already")
    elif not (
        item.meta.get("unassigned")
        or PATIENT_MISMATCH in item.meta.get("flags", [])
        or NAME_MISMATCH in item.meta.get("flags", [])
        or id_conflict(item.meta.get("flags", []))
        or (item.held(now.timestamp()) and item.hold_reason in DOCTOR_HOLDS)
    ):
        # its patient is settled (the file's, the current one's): a mistyped E<n> must not move it
        raise HeldEcgError(f"ECG E{item_id} is not held for a patient: it is patient {settled_on}'s")
    patient = as_on_file(item, patient)
    # "its name is right" on a file whose sex or birth date its ID also contradicts: Today asked
    # the name only, so the file's values go on, flagged, and it waits for the ID's question
    id_still_open = file_name_confirmed(item, patient) and id_conflict(item.meta.get("flags", []))
    ds = pydicom.dcmread(io.BytesIO(outbox.read_payload(item)))
    when = now.astimezone(local_zone()).isoformat(timespec="seconds")
    note = f"Patient assigned at the gateway on {when}" + (f" by {by}" if by else "")
    if file_name_confirmed(item, patient):  # "its name is right": the file's own patient
        note = f"Patient name confirmed at the gateway on {when}" + (f" by {by}" if by else "")
    elif item.meta.get("unassigned"):
        note += ": the ECG named no patient"
    elif item.meta.get("file_patient_name"):
        note += f": the ECG file named patient {item.meta.get('file_patient_id', '')} {item.meta['file_patient_name']}"
    elif item.meta.get("file_patient_id"):
        note += f": the ECG file named patient {item.meta['file_patient_id']}"
    if id_conflict(item.meta.get("flags", [])):
        kept = item.patient or {}
        note += f" (the ECG file gave sex {kept.get('sex') or '-'}, birth date {kept.get('birth_date') or '-'})"
    rebuilt = reassign_patient(ds, patient, note)  # without the file's Patient Comments
    if id_still_open and item.meta.get("id_conflict_comment"):  # the ID's question still open: the reader is told
        rebuilt.PatientComments = item.meta["id_conflict_comment"]
    data = deflated_part10(rebuilt)
    meta = {**item.meta, "unassigned": False, "flags": answered_flags(item, id_still_open)}
    fields = {
        "patient_id": patient.patient_id,
        "name": patient.name,
        "issuer": patient.issuer,
        "sex": patient.sex,
        "birth_date": patient.birth_date.isoformat() if patient.birth_date else None,
    }
    # a 're-record' verdict still waits for the doctor's decision on the recording itself
    quality_until = item.meta.get("quality_hold_until")
    quality_hold = None
    if quality_until is not None and quality_until > now.timestamp():
        quality_hold = Hold(QUALITY_HOLD, float(quality_until))
    keep = hold_after_answer(item, id_still_open, now, quality_hold)
    if not outbox.replace_held_payload(
        item_id, data, now.timestamp(), meta=meta, patient=fields, hold=keep, replacing_sha256=item.sha256
    ):
        raise HeldEcgError(
            f"ECG E{item_id} was claimed for sending or assigned meanwhile: see 'lastmile patient show' "
            "(if it was sent, ask the reading center to correct it)"
        )
    log.info("held ECG E%d assigned%s", item_id, f" (still held: {keep.reason})" if keep else " and released")
    updated = outbox.get(item_id)
    assert updated is not None
    return updated


# What pydicom raises reading or writing back a cart's object cut short or malformed (measured on
# the real cart ECG cut at every offset of its data set: OSError "no tag to read", struct.error,
# BytesLengthException; EOFError, InvalidDicomError; a multi-byte character cut: UnicodeError).
# Nothing broader: a bug of ours is not told to the doctor as the cart's damaged file.
CART_OBJECT_DAMAGED: tuple[type[BaseException], ...] = (
    BytesLengthException,
    InvalidDicomError,
    EOFError,
    struct.error,
    OSError,
    UnicodeError,
)


def assign_lan_object(
    outbox: Outbox, item: OutboxItem, patient: Patient, *, now: dt.datetime, by: str = ""
) -> OutboxItem:
    """The doctor's answer on a cart's object held for its name (NAME_MISMATCH): its patient is
    `patient` - the check-in's name for the same ID, or another patient. Only the patient is
    written into the object, as the cart sent it (its transfer syntax, its UIDs: a resend is the
    same instance); the cart's name is kept in Other Patient Names, its ID, if another, in Other
    Patient IDs (`with_patient_id`). Another ID, or the same ID under another name than the
    cart's (`given_another_name`), gets none of the cart's birth date and sex: only `patient`'s.
    An object pydicom cannot read or write back (the cart's file cut short, kept as written at
    intake, `as_forwarded`) cannot carry the answer: it is set aside, never sent (DamagedEcgError:
    sent as the cart wrote it, it would go as the patient the doctor just said it is not, next to
    the one he records again) - unless his answer is "its name is right", which it says already."""
    received = outbox.read_payload(item)
    ds: Dataset | None = None
    try:
        ds, id_still_open, own_details, written = answer_written(item, patient, received)
    except CART_OBJECT_DAMAGED as exc:  # the cart's own malformed elements: its object cannot carry the answer
        if file_name_confirmed(item, patient) and not item.meta.get("id_conflict_comment"):
            # "its name is right": the cart's object says it already, nothing of ours in it to take out
            log.warning("held LAN ECG E%d not readable (%s): its name confirmed, it goes as written", item.id, exc)
            id_still_open, own_details, written = id_conflict(item.meta.get("flags", [])), False, received
        else:
            log.warning("held LAN ECG E%d not rewritten (%s): set aside, not sent", item.id, exc)
            discard_held_ecg(outbox, item.id, now.timestamp(), by=by, why=DAMAGED)
            raise DamagedEcgError(
                f"ECG E{item.id}: the cart's file is damaged ({type(exc).__name__}), it cannot be given patient "
                f"{patient.patient_id}: it was set aside, not sent (see 'lastmile queue'); record the ECG again"
            ) from exc
    keep = hold_after_answer(item, id_still_open, now)
    received_sha256 = item.meta.get("received_sha256") or item.sha256  # the cart's resend of its own bytes is this item
    meta = {**item.meta, "flags": answered_flags(item, id_still_open), "received_sha256": received_sha256}
    kept = item.patient or {}
    fields = {
        "patient_id": patient.patient_id,
        "name": str(ds.PatientName) if ds is not None else kept.get("name", ""),
        "issuer": str(ds.get("IssuerOfPatientID", "") or "") if ds is not None else kept.get("issuer", ""),
        "sex": (patient.sex or "") if own_details else kept.get("sex", ""),
        "birth_date": (
            (patient.birth_date.isoformat() if patient.birth_date else None) if own_details else kept.get("birth_date")
        ),
    }
    if not outbox.replace_held_payload(
        item.id, written, now.timestamp(), meta=meta, patient=fields, hold=keep, replacing_sha256=item.sha256
    ):
        raise HeldEcgError(f"ECG E{item.id} was claimed for sending or assigned meanwhile: see 'lastmile patient show'")
    log.info("held LAN ECG E%d given its patient%s and released", item.id, f" by {by}" if by else "")
    updated = outbox.get(item.id)
    assert updated is not None
    return updated


def answer_written(item: OutboxItem, patient: Patient, received: bytes) -> tuple[Dataset, bool, bool, bytes]:
    """The cart's object `received` (held item `item`) with the doctor's answer `patient` written
    in (`assign_lan_object`): its data set, whether the ID's question is still open, whether it
    carries `patient`'s own birth date and sex, and its bytes. Raises what pydicom raises for an
    object it cannot read or write back."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(received))
    cart_name = str(ds.get("PatientName", "") or "")
    other_id = patient.patient_id != str(ds.get("PatientID", "") or "")
    if other_id:
        with_patient_id(ds, patient.patient_id)
        if patient.issuer:
            ds.IssuerOfPatientID = patient.issuer
    # "the ID is right" (held for the ID only): the ID's sex and birth date, a number alone too (`as_on_file`)
    id_answer = not other_id and held_for_its_id_only(item)
    if id_answer:
        patient = as_on_file(item, patient)
    # "its name is right" on an object its ID also contradicts: the cart's values stay, flagged,
    # and it waits for the ID's question (as a file does, `assign_held_ecg`)
    id_still_open = not other_id and id_conflict(item.meta.get("flags", [])) and file_name_confirmed(item, patient)
    own_details = other_id or given_another_name(item, patient) or id_answer  # the cart's were another person's
    if own_details:
        ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d") if patient.birth_date else ""
        ds.PatientSex = patient.sex or ""
        if "PatientAge" in ds:  # the cart's age of that other person
            del ds.PatientAge
    if patient.name and not same_person_name(patient.name, cart_name):
        if cart_name:
            ds.OtherPatientNames = cart_name
        with_patient_name(ds, dicom_person_name(patient.name))
    if not id_still_open:  # the doctor answered the ID's question: our comment on it goes
        without_comment(ds, str(item.meta.get("id_conflict_comment") or ""))
    without_comment(ds, str(item.meta.get("refused_id_comment") or ""))  # he said whose it is
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return ds, id_still_open, own_details, out.getvalue()


def answered_flags(item: OutboxItem, id_still_open: bool) -> list[str]:
    """The held ECG's flags once the doctor gave it its patient: without those his answer settled
    (another patient, another name; the ID's sex and birth date unless that question is still
    open), marked ASSIGNED_BY_DOCTOR once."""
    settled: tuple[str, ...] = (PATIENT_MISMATCH, NAME_MISMATCH, ASSIGNED_BY_DOCTOR)
    if not id_still_open:
        settled += ID_CONFLICT_FLAGS
    return [*(f for f in item.meta.get("flags", []) if f not in settled), ASSIGNED_BY_DOCTOR]


def hold_after_answer(
    item: OutboxItem, id_still_open: bool, now: dt.datetime, other: Hold | None = None
) -> Hold | None:
    """What still holds the ECG after the doctor's answer: the ID's question when it is still open
    and its hold has not run out (Today shows it next), as long as `other` (a 're-record' verdict's)
    lasts too; else `other`."""
    if id_still_open and item.hold_until is not None and item.hold_until > now.timestamp():
        return Hold(ID_CONFLICT, max(item.hold_until, other.until if other else 0.0))
    return other


def held_for_its_id_only(item: OutboxItem) -> bool:
    """Held for its sex and birth date against its resident ID, not for its name: the doctor's
    answer for its own ID is "the ID is right" (`as_on_file`). With its name also in question,
    "its name is right" answers the name only."""
    flags = item.meta.get("flags", [])
    return id_conflict(flags) and NAME_MISMATCH not in flags


def file_name_of(item: OutboxItem) -> str:
    """The name the held ECG's file gave (its patient's before any assignment)."""
    return str(item.meta.get("file_patient_name") or (item.patient or {}).get("name") or "")


def given_another_name(item: OutboxItem, patient: Patient) -> bool:
    """The ECG held for its name (NAME_MISMATCH) is given its ID under another name than its
    file's: the doctor said it is the checked-in patient's, not the file's person's."""
    return NAME_MISMATCH in item.meta.get("flags", []) and names_differ(file_name_of(item), patient.name)


def file_name_confirmed(item: OutboxItem, patient: Patient) -> bool:
    """The ECG held for its name is given its file's own patient ("the ECG's name is right")."""
    kept = item.patient or {}
    return (
        NAME_MISMATCH in item.meta.get("flags", [])
        and kept.get("patient_id") == patient.patient_id
        and not given_another_name(item, patient)
    )


def as_on_file(item: OutboxItem, patient: Patient) -> Patient:
    """`patient` with what the held ECG already says of that same ID (its file's patient, or an
    earlier assignment): a number typed alone must not blank the birth date and sex the reading
    center reads the ECG by. The file's birth date and sex stand, as at intake (`vetted_patient`);
    a name or issuer given stands. Another ID gets nothing of the file's: it is another person.
    Nor does the same ID given another name than a file held for its name (`given_another_name`):
    mostly the cart kept the previous patient's entry, his birth date and sex with his name, and
    age and sex change how an ECG is read - it goes with what `patient` says (a resident ID's),
    or none. Nor the file's birth date and sex its resident ID contradicts (`id_conflict`): the
    doctor answered that the ID's are right (`patient`'s, from the ID)."""
    kept = item.patient or {}
    if kept.get("patient_id") != patient.patient_id:
        return patient
    if given_another_name(item, patient):
        return dataclasses.replace(patient, issuer=patient.issuer or str(kept.get("issuer") or ""))
    if held_for_its_id_only(item):
        # a number typed alone: what the ID says (`id_conflict_meta`). Not on an ECG held for its
        # name too: "its name is right" answers the name only, the file's values stand (`assign_held_ecg`)
        id_born = item.meta.get("id_birth_date")
        return dataclasses.replace(
            patient,
            name=patient.name or str(kept.get("name") or ""),
            issuer=patient.issuer or str(kept.get("issuer") or ""),
            birth_date=patient.birth_date or (dt.date.fromisoformat(id_born) if id_born else None),
            sex=patient.sex or str(item.meta.get("id_sex") or ""),
        )
    born = kept.get("birth_date")
    return dataclasses.replace(
        patient,
        name=patient.name or str(kept.get("name") or ""),
        issuer=patient.issuer or str(kept.get("issuer") or ""),
        birth_date=dt.date.fromisoformat(born) if born else patient.birth_date,
        sex=str(kept.get("sex") or "") or patient.sex,
    )


def with_patient_check(
    recording: EcgRecording, current_patient_ids: frozenset[str], checked_in_name: str = ""
) -> EcgRecording:
    """The file's patient is kept; if the gateway's current patient is another one (none of his
    IDs, `PatientContext.patient_ids`), the recording is flagged for the doctor (never
    re-assigned). A file without a patient stays unassigned: a stick may hold ECGs of many patients.
    One of his IDs under another person's name than `checked_in_name` (the name the check-in gave
    that ID; `names_differ`) is flagged NAME_MISMATCH: the ID alone does not make it his. Under
    the check-in's name in letters only (a cart without an input method: "Zhang Xiulan" for
    张秀兰), it goes under the check-in's name, its characters with it (`named_as_checked_in`)."""
    p = recording.patient
    if not current_patient_ids or p is None:
        return recording
    if p.patient_id not in current_patient_ids:
        flag = PATIENT_MISMATCH
    elif names_differ(p.name, checked_in_name):
        flag = NAME_MISMATCH
    else:
        return named_as_checked_in(recording, checked_in_name)
    if flag in recording.flags:
        return recording
    return dataclasses.replace(recording, flags=recording.flags + (flag,))


def named_as_checked_in(recording: EcgRecording, checked_in_name: str) -> EcgRecording:
    """`recording`, whose file names its patient in letters only, under the check-in's name in
    characters when they are one name (`same_person_name`): his readings go to the county as
    "Zhang^Xiulan=张^秀兰", so his ECG goes as "Zhang Xiulan=张^秀兰" (the cart's
    letters, the check-in's characters), not as "Zhang Xiulan" with no Chinese name. A file
    in characters already keeps its own (one name, the same characters: `same_person_name`)."""
    p = recording.patient
    if p is None:
        return recording
    name = with_checked_in_characters(p.name, checked_in_name)
    if name is None:
        return recording
    return dataclasses.replace(recording, patient=dataclasses.replace(p, name=name))


def with_checked_in_characters(file_name: str, checked_in_name: str) -> str | None:
    """A DICOM PN written in letters only (`file_name`) with the check-in's characters as its
    ideographic group, when they are one name (`same_person_name`); None otherwise (a name in
    characters already, another name, no name). The cart's own letters stay (her reading: 张乐
    written "Zhang Yue", not the dictionary's Zhang^Le)."""
    if no_name(file_name) or has_ideographs(file_name) or not has_ideographs(checked_in_name):
        return None
    if not same_person_name(file_name, checked_in_name):
        return None
    alphabetic, _, other_groups = file_name.partition("=")
    phonetic = other_groups.partition("=")[2]
    ideographic = dicom_person_name(checked_in_name).partition("=")[2]
    return f"{alphabetic}={ideographic}" + (f"={phonetic}" if phonetic else "")


# -- files: `lastmile import` and the watched USB folders -----------------------------------------


def read_ecg_file(path: str | Path) -> EcgRecording:
    """Decode a file from disk (read-only); the receipt time stands in when the file has none."""
    from devices.ecg.formats import decode_ecg

    path = Path(path)
    return decode_ecg(path.read_bytes(), path.name, local_tz=local_zone(), received_at=dt.datetime.now(dt.timezone.utc))


def file_enqueuer(
    outbox: Outbox,
    config: Config,
    current_patient_ids: CurrentPatient = _no_current_patient,
    request: Callable[[], StudyRequest] = StudyRequest,
    stat: bool = False,
    stat_session: StatLookup = _no_stat_session,
    checked_in_name: CheckedInName = _no_checked_in_name,
) -> Callable[[EcgRecording, str], bool]:
    """(recording, key) -> created, for firmware_bridge.usb_import: builds the DICOM object (UIDs
    minted once) and stores it; a recording no DICOM ECG can hold is refused (FileRefused).
    `request`: the doctor and reason of the moment; `stat`: every file is urgent (`import --stat`);
    `stat_session`: files of the patient the doctor checked in as STAT, recorded since, are urgent;
    `checked_in_name`: the name the session knows for an ID (a file's name is compared with it)."""
    from firmware_bridge.errors import FileRefused
    from uploader.errors import InvalidObjectError

    default_stat = stat

    def enqueue(recording: EcgRecording, key: str) -> bool:
        current, session = session_now(current_patient_ids, stat_session)
        written = recording.patient
        recording = vetted_patient(recording, config)
        patient_id = recording.patient.patient_id if recording.patient else None
        known = checked_in_name(patient_id) if patient_id is not None and patient_id in current else ""
        recording = with_patient_check(recording, current, known)
        if session is not None and session.covers(patient_id, recording.acquired_at):
            stat = True
        else:
            stat = default_stat
        if stat and not recording.stat:
            recording = dataclasses.replace(recording, stat=True)
        try:
            return enqueue_recording(
                outbox, recording, config, key=key, request=request(), checked_in_name=known, file_patient=written
            ).created
        except InvalidObjectError as exc:
            raise FileRefused(f"cannot become a DICOM ECG: {exc}") from None

    return enqueue


def import_files(
    outbox: Outbox,
    config: Config,
    roots: Iterable[str | Path],
    *,
    current_patient_ids: CurrentPatient = _no_current_patient,
    progress: Callable | None = None,
    request: Callable[[], StudyRequest] = StudyRequest,
    stat: bool = False,
    stat_session: StatLookup = _no_stat_session,
    checked_in_name: CheckedInName = _no_checked_in_name,
) -> ImportSummary:
    """Import every ECG file under `roots`, each once (by content hash)."""
    from firmware_bridge.usb_import import import_paths

    return import_paths(
        roots,
        is_known=lambda key: outbox.find(key) is not None,
        enqueue=file_enqueuer(outbox, config, current_patient_ids, request, stat, stat_session, checked_in_name),
        local_tz=local_zone(),
        now=lambda: dt.datetime.now(dt.timezone.utc),
        progress=progress,
    )


def usb_import_watcher(
    config: Config,
    outbox: Outbox,
    current_patient_ids: CurrentPatient = _no_current_patient,
    stat_session: StatLookup = _no_stat_session,
    checked_in_name: CheckedInName = _no_checked_in_name,
) -> FolderWatcher:
    """A FolderWatcher over `usb_import.folders`; call its poll() every few seconds (or on a
    udev 'add' event for a mass-storage device mounted there)."""
    from firmware_bridge.usb_import import FolderWatcher

    def run(roots: Iterable[str | Path]) -> ImportSummary:
        summary = import_files(
            outbox,
            config,
            roots,
            current_patient_ids=current_patient_ids,
            request=lambda: clinic_request(config),
            stat_session=stat_session,
            checked_in_name=checked_in_name,
        )
        record_stick_outcomes(config, summary)
        return summary

    return FolderWatcher(config.usb_import.folders, run)


def record_stick_outcomes(config: Config, summary: ImportSummary) -> None:
    """The stick's refused files, kept in clinic.db for Today (`lastmile.clinic.stick_files`): a
    journal line alone is a silent failure for the doctor, who pulls the stick believing every ECG
    came in. The import itself is done: clinic.db unusable is said here, and never undoes it."""
    import sqlite3

    from firmware_bridge.usb_import import REFUSED
    from lastmile.clinic.db import open_clinic_db
    from lastmile.clinic.stick_files import RefusedStickFiles, StickFileOutcome, StickTrouble

    outcomes = [
        StickFileOutcome(
            o.path,
            refused=o.status == REFUSED,
            trouble=(
                StickTrouble.UNREADABLE if o.unreadable else StickTrouble.NOT_ECG if o.not_ecg else StickTrouble.DAMAGED
            ),
            reason=o.reason,
            key=o.key,
        )
        for o in summary.outcomes
    ]
    if not outcomes:
        return
    try:
        db = open_clinic_db(config.data_dir)  # only when the stick changed: not worth a kept connection
        try:
            new = RefusedStickFiles(db).record(outcomes, now=dt.datetime.now(dt.timezone.utc))
        finally:
            db.conn.close()
    except (sqlite3.Error, OSError) as exc:
        log.error("USB import: the refused files could not be kept for the console (Today): %s", exc)
        return
    if new:
        log.info("USB import: %d refused file(s) said on Today", new)


# -- the clinic-LAN receiver: objects stored as received ------------------------------------------


def lan_object_store(
    outbox: Outbox,
    current_patient_ids: CurrentPatient = _no_current_patient,
    stat_session: StatLookup = _no_stat_session,
    id_kind: str = "",
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
    checked_in_name: CheckedInName = _no_checked_in_name,
    patient_hold_s: float = 0.0,
    stat_name_hold_s: float = STAT_NAME_HOLD_S,
) -> Callable[[ReceivedObject], None]:
    """ReceivedObject -> durable outbox item, for firmware_bridge.dicom_receiver: the object is
    stored as received (its bytes, but for a loosely written patient ID; its UIDs); the SOP
    Instance UID is the key, so a cart that sends the same object again gets Success without a
    second item. A patient other than the
    gateway's current one is flagged in the item's meta (the object itself is not touched); one
    of the patient the doctor checked in as STAT goes first (the cart sends as it records).
    The object's patient ID is compared normalised (`comparable_patient_id`), as the checked-in
    one was when the doctor entered it, and forwarded so (`with_patient_id`): one resident, one ID
    at the county, whichever path his ECGs came by. Its acquisition time is judged against `now`
    (the gateway's clock) by the rule every path follows (`devices.ecg.formats.judged_time`): a
    reset cart clock is flagged for the doctor and marked not believed in the object. A cart on
    the LAN sends each ECG as it records it, so one dated long before the newest it sent before
    is a reset clock too (`NewestFromCart`); files imported from a stick are not judged so.
    An object naming one of the checked-in patient's IDs under another name than
    `checked_in_name` gives it is held "name-mismatch" for `name_hold_s` (of `patient_hold_s`,
    `patient.unassigned_ecg_hold_s`, and `stat_name_hold_s`, `ecg.stat_name_hold_s`), and so is one
    whose sex or birth date its resident ID contradicts ("patient-id-conflict", `lan_id_conflict`):
    the kinds of LAN object held, as only the doctor knows whose it is and which is right
    (`assign_held_ecg` writes his answer into the cart's object). One naming him in letters
    only, the check-in's name, gets the check-in's characters added, as a file does
    (`as_forwarded`). Unanswered, it goes as the cart made it when the hold runs out: "name-mismatch" is then flagged in its
    outbox record (`lastmile patient show`, `queue`), not in the object - the gateway writes into a
    cart's object only what the doctor answered, and, for the reader, a sex or birth date its
    resident ID contradicts, in its Patient Comments until the doctor answers (`id_conflict_comment`)."""
    newest = NewestFromCart(outbox)

    def store(obj: ReceivedObject) -> None:
        key = instance_key(obj.sop_instance_uid)
        received_sha256 = hashlib.sha256(obj.data).hexdigest()
        kept = outbox.find(key)
        if kept is not None and received_sha256 in (kept.sha256, kept.meta.get("received_sha256")):
            return  # sent again as it was (a cart's retry): the item kept answers it, nothing parsed
        current, session = session_now(current_patient_ids, stat_session)
        patient_id = comparable_patient_id(obj.patient["patient_id"], id_kind) if obj.patient else None
        file_name = str((obj.patient or {}).get("name") or "")
        known = checked_in_name(patient_id) if patient_id is not None and patient_id in current else ""
        other_name = names_differ(file_name, known)
        id_flags, id_values = lan_id_conflict(obj.patient, id_kind)
        cart = obj.patient or {}
        conflict_comment = id_conflict_comment(
            id_flags, patient_id or "", str(cart.get("sex") or ""), str(cart.get("birth_date") or ""), id_values
        )
        # an ID refused names nobody the gateway can match: the doctor says whose it is, as for a
        # file (`refused_patient_meta`); unanswered, the reader is told whom the cart named
        refused = lan_refused_meta(obj.patient, id_kind)
        comment = conflict_comment or refused_id_comment(refused)  # a refused ID has no conflict: never both
        forwarded = as_forwarded(
            obj,
            patient_id,
            now(),
            # his pinyin on the cart: his characters with it, as for a file
            name=with_checked_in_characters(file_name, known),
            comment=comment,
            newest_from=lambda device: newest.time(obj.calling_ae, device),
        )
        rewritten = (
            {"received_sha256": received_sha256} if forwarded.obj.data != obj.data else {}
        )  # what the cart sends again
        obj = forwarded.obj
        sha256 = hashlib.sha256(obj.data).hexdigest() if rewritten else received_sha256
        # during a STAT check-in, an ECG whose ID is refused is most likely that patient's: urgent
        stat = session is not None and (session.covers(patient_id, None) or bool(refused))
        mismatch = bool(current and patient_id is not None and patient_id not in current) and not refused
        asked = other_name or id_flags or refused
        hold_s = name_hold_s(stat, patient_hold_s, stat_name_hold_s) if asked else 0.0
        # the name's question first, as for a file (`hold_for`); the ID's after it (`assign_lan_object`)
        reason = UNASSIGNED_HOLD if refused else NAME_MISMATCH if other_name else ID_CONFLICT
        hold = Hold(reason, time.time() + hold_s) if hold_s > 0 else None
        flags = (
            ([PATIENT_MISMATCH] if mismatch else [])
            + ([NAME_MISMATCH] if other_name else [])
            + id_flags
            + ([PATIENT_ID_REFUSED] if refused else [])
        )
        meta = ecg_item_meta(
            sop_class_uid=obj.sop_class_uid,
            sop_instance_uid=obj.sop_instance_uid,
            study_uid=obj.study_uid,
            series_uid=obj.series_uid,
            source_format=LAN_SOURCE_FORMAT,
            flags=flags + list(forwarded.flags),
            unassigned=obj.patient is None,
            transfer_syntax=obj.transfer_syntax,
            calling_ae=obj.calling_ae,
            stat=stat,
            **forwarded.described,
            **rewritten,
            **name_mismatch_meta(flags, file_name, known),
            **id_values,
            **({"id_conflict_comment": conflict_comment} if forwarded.commented and conflict_comment else {}),
            **({"refused_id_comment": comment} if forwarded.commented and refused else {}),
            **refused,
        )
        newest.saw(obj.calling_ae, forwarded)
        if kept is None:
            added = outbox.add(
                Kind.DICOM,
                key,
                obj.data,
                priority=Priority.STAT if stat else Priority.ROUTINE,
                meta=meta,
                patient=obj.patient,
                hold=hold,
            )
            if added.created:
                return
            kept = added.item  # another association stored the same instance meanwhile
        # the key is the instance: sent again as it was, the item kept answers it
        if kept.sha256 != sha256:
            replace_lan_object(outbox, kept, obj, meta, hold)

    return store


def lan_id_conflict(patient: dict | None, id_kind: str) -> tuple[list[str], dict[str, str]]:
    """A cart's object whose sex or birth date its resident ID contradicts, judged as a file is
    (`against_resident_id`): the conflict flags, and the ID's values for Today's question. None for
    an object without them or without a valid resident ID."""
    if not patient:
        return [], {}
    try:
        resident = kept_patient_id(str(patient.get("patient_id") or ""), id_kind)[1]
    except InvalidPatientIdError:
        return [], {}
    return against_resident_id(str(patient.get("sex") or ""), str(patient.get("birth_date") or ""), resident)


def comparable_patient_id(patient_id: str, id_kind: str) -> str:
    """`patient_id` as an entered one is kept (`kept_patient_id`), so a cart's loosely typed ID is
    the patient checked in. A malformed resident ID is left as written (spaces as one): it
    matches no checked-in patient, and the item is flagged."""
    try:
        return kept_patient_id(patient_id, id_kind)[0]
    except InvalidPatientIdError:
        return " ".join(patient_id.split())


@dataclasses.dataclass(frozen=True)
class ForwardedObject:
    """A LAN object as the gateway forwards it (`as_forwarded`)."""

    obj: ReceivedObject
    flags: tuple[str, ...] = ()  # the time judgement's, for the doctor
    described: dict = dataclasses.field(default_factory=dict)  # acquired_at, device: item meta
    commented: bool = False  # the comment asked for is in the object (`id_conflict_comment`)


# how far back the outbox is read for a cart's newest ECG at start: as far as an older one counts as a clock gone back
NEWEST_LOOKBACK_S = DEVICE_CLOCK_BACKWARDS.total_seconds()
NEWEST_LOOKBACK_ITEMS = 5000  # and at most this many ECG items (a clinic records tens a day)


class NewestFromCart:
    """The time of the newest believed ECG each cart (calling AE and device) sent over the LAN,
    read from the outbox's recent ECG items once, then kept up to date as objects arrive."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._newest: dict[str, dt.datetime] | None = None

    def time(self, calling_ae: str, device: str) -> dt.datetime | None:
        if self._newest is None:
            self._newest = self._from_outbox()
        return self._newest.get(f"{calling_ae} {device}")

    def saw(self, calling_ae: str, forwarded: ForwardedObject) -> None:
        """`forwarded` came from the cart `calling_ae`: its time, if believed, may be the newest."""
        from devices.identity import device_clock_wrong

        when, device = forwarded.described.get("acquired_at"), forwarded.described.get("device")
        if when is None or device is None or device_clock_wrong(forwarded.flags):
            return
        self._note(f"{calling_ae} {device}", dt.datetime.fromisoformat(when))

    def _note(self, cart: str, when: dt.datetime) -> None:
        assert self._newest is not None
        if cart not in self._newest or when > self._newest[cart]:
            self._newest[cart] = when

    def _from_outbox(self) -> dict[str, dt.datetime]:
        from devices.identity import device_clock_wrong

        self._newest = {}
        since = time.time() - NEWEST_LOOKBACK_S
        for item in self.outbox.newest(Kind.DICOM, since=since, limit=NEWEST_LOOKBACK_ITEMS):
            meta = item.meta
            if meta.get("source_format") != LAN_SOURCE_FORMAT or "acquired_at" not in meta:
                continue
            if not device_clock_wrong(meta.get("flags", ())):
                self._note(
                    f"{meta.get('calling_ae', '')} {meta.get('device', '')}",
                    dt.datetime.fromisoformat(meta["acquired_at"]),
                )
        return self._newest


def as_forwarded(
    obj: ReceivedObject,
    patient_id: str | None,
    received_at: dt.datetime,
    *,
    name: str | None = None,
    comment: str = "",
    newest_from: Callable[[str], dt.datetime | None] = lambda device: None,
) -> ForwardedObject:
    """`obj` as forwarded: the cart's object as it sent it, read once, written again only for what
    the gateway must correct - a loosely written patient ID (`with_patient_id`), a time the
    gateway does not believe (Time Source "DEVICE UNTRUSTED", Acquisition Time Synchronized N;
    the time itself as the cart wrote it, `uploader.dicom_ecg.mark_time_untrusted`) and `name`,
    the cart's letters-only name with the check-in's characters (`with_checked_in_characters`;
    None: the name as the cart wrote it), and `comment`, what the reader must know of its patient
    (`id_conflict_comment`), after the cart's own Patient Comments. Values changed in the data
    set, not a new object: its UIDs stay the cart's, so a cart's resend is the same instance and
    the PACS holds one study; an annotation or new elements would be more of the cart's object
    rewritten for what the Time Source already says. `newest_from`: the time of the newest ECG the device (by its label)
    sent before, for `judged_time`. An object pydicom cannot read or write back is forwarded as
    written, not lost: a store that raised would leave the cart answered "out of resources" for
    every resend of it."""
    import pydicom

    from devices.ecg.dicom_input import acquired_at_of, device_of
    from devices.ecg.formats import judged_time
    from devices.identity import TimeSource
    from uploader.dicom_ecg import mark_time_untrusted

    try:
        ds = pydicom.dcmread(io.BytesIO(obj.data))
        acquired_at = acquired_at_of(ds, local_zone())
        device = device_of(ds).label()
    except Exception as exc:  # noqa: BLE001 - the cart's own malformed elements: forwarded as it sent them
        log.warning("LAN object %s not read (%s): forwarded as written, its time not judged", obj.sop_instance_uid, exc)
        return ForwardedObject(obj)
    described: dict = {"device": device}
    flags: tuple[str, ...] = ()
    if acquired_at is not None:
        judged = judged_time(acquired_at, TimeSource.FILE, received_at, newest_from_device=newest_from(device))
        described["acquired_at"] = judged.acquired_at.isoformat()
        flags = judged.flags
    new_id = patient_id if obj.patient is not None and patient_id not in (None, obj.patient["patient_id"]) else None
    if new_id is None and not flags and name is None and not comment:
        return ForwardedObject(obj, flags, described)
    try:
        if name is not None:
            with_patient_name(ds, name)
        if comment:
            with_comment(ds, comment)
        if new_id is not None:
            with_patient_id(ds, new_id)
        if flags:
            mark_time_untrusted(ds)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - the cart's own malformed elements: its object goes
        log.warning("LAN object %s not rewritten (%s): forwarded as written", obj.sop_instance_uid, exc)
        return ForwardedObject(obj, flags, described)
    patient = obj.patient
    if patient is not None and (new_id is not None or name is not None):
        patient = {**patient, **({"patient_id": new_id} if new_id else {}), **({"name": name} if name else {})}
    forwarded = dataclasses.replace(obj, data=out.getvalue(), patient=patient)
    return ForwardedObject(forwarded, flags, described, commented=bool(comment))


def with_patient_name(ds: Dataset, name: str) -> None:
    """`ds` under the Patient's Name `name`, in UTF-8 if it is not ASCII (`in_utf8`)."""
    if not name.isascii():
        in_utf8(ds)
    ds.PatientName = name


def with_comment(ds: Dataset, comment: str) -> None:
    """`comment` added to `ds`'s Patient Comments, after the cart's own, in UTF-8 (`in_utf8`)."""
    in_utf8(ds)
    own = str(ds.get("PatientComments", "") or "").rstrip()
    ds.PatientComments = f"{own}\n{comment}" if own else comment


def without_comment(ds: Dataset, comment: str) -> None:
    """`ds`'s Patient Comments without `comment` (`with_comment`'s): the cart's own stay."""
    own = str(ds.get("PatientComments", "") or "")
    if not comment or comment not in own:
        return
    rest = own.replace(comment, "").rstrip()
    if rest:
        ds.PatientComments = rest
    else:
        del ds.PatientComments


def in_utf8(ds: Dataset) -> None:
    """`ds` to be written in UTF-8: the cart's text read in its own character set, to be written
    again in UTF-8 with the gateway's."""
    if "ISO_IR 192" not in (ds.get("SpecificCharacterSet") or ""):
        ds.decode()
        ds.SpecificCharacterSet = "ISO_IR 192"


def with_patient_id(ds: Dataset, patient_id: str) -> None:
    """`ds` under `patient_id` (its normalised spelling), the Patient ID as the cart wrote it kept
    in Other Patient IDs: the rest of the data set, its transfer syntax included, as received. The
    same bytes in give the same bytes out (a cart sending it again is no "other content")."""
    other = Dataset()
    other.PatientID = ds.PatientID
    if ds.get("IssuerOfPatientID"):
        other.IssuerOfPatientID = ds.IssuerOfPatientID
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [*(ds.get("OtherPatientIDsSequence") or []), other]
    ds.PatientID = patient_id


def replace_lan_object(
    outbox: Outbox, existing: OutboxItem, obj: ReceivedObject, meta: dict, hold: Hold | None = None
) -> None:
    """The cart sent an instance again with other content (e.g. the patient corrected on the cart):
    the version it holds now is the one to forward while the first has not gone out; once it has,
    the cart is told so (ObjectRefused), never answered Success for content dropped here."""
    from firmware_bridge.dicom_receiver import CANNOT_UNDERSTAND
    from firmware_bridge.errors import ObjectRefused

    if outbox.replace_held_payload(existing.id, obj.data, time.time(), meta=meta, patient=obj.patient, hold=hold):
        log.warning(
            "LAN object %s received again with other content: item %d replaced", obj.sop_instance_uid, existing.id
        )
        return
    log.error(
        "LAN object %s received again with other content after item %d was sent: refused",
        obj.sop_instance_uid,
        existing.id,
    )
    raise ObjectRefused(CANNOT_UNDERSTAND, "instance already forwarded with other content")


def lan_receiver(
    config: Config,
    outbox: Outbox,
    current_patient_ids: CurrentPatient = _no_current_patient,
    stat_session: StatLookup = _no_stat_session,
    checked_in_name: CheckedInName = _no_checked_in_name,
) -> DicomReceiver | None:
    """The clinic-LAN storage SCP from `lan_receiver.*`, checked (LinkConfigError) but not yet
    listening; None when disabled."""
    from firmware_bridge.dicom_receiver import DicomReceiver, settings_from

    section = config.lan_receiver
    if not section.enabled:
        return None
    return DicomReceiver(
        settings_from(
            section.ae_title,
            section.port,
            section.allowed_callers,
            section.sop_classes,
            host=section.host,
            timeout_s=config.reading_center.timeout_s,
            max_object_bytes=max(1, section.max_object_mb) * 2**20,
        ),
        lan_object_store(
            outbox,
            current_patient_ids,
            stat_session,
            config.patient.id_kind,
            checked_in_name=checked_in_name,
            patient_hold_s=config.patient.unassigned_ecg_hold_s,
            stat_name_hold_s=config.ecg.stat_name_hold_s,
        ),
    )
