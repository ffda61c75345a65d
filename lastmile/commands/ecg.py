"""`lastmile ecg decode | to-dicom`: read ECG files the way carts deliver them.

Formats: SCP-ECG, HL7 aECG XML, DICOM ECG, Contec ECG90A .ECG and the gateway's .npz.
Decoders never resample: `decode` writes the samples exactly as stored (µV), and `to-dicom`
refuses rates the DICOM ECG IODs do not allow (200-1000 Hz) rather than alter the signal.

`to-dicom` checks what the forward path checks before sending (`lastmile.ecg.intake.hold_for`):
a file it writes may be carried to the county by hand, so what the gateway would hold it for (no
patient, another patient or another name than the check-in, a 're-record' quality verdict) is
said on stderr, and the file is not written without `--force`. Exit codes: TO_DICOM_EXIT_CODES.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from lastmile.commands.common import DATA_DIR

if TYPE_CHECKING:
    from devices.ecg.quality import QualityReport
    from devices.ecg.recording import EcgRecording
    from lastmile.config import Config

HELD_EXIT = 3  # `to-dicom`: the forward path would hold this ECG for the doctor; nothing written
TO_DICOM_EXIT_CODES = f"""exit codes:
  0  written
  1  not written: the file cannot be read or converted, a wrong --patient-id, the output cannot be written
  2  wrong arguments
  {HELD_EXIT}  not written: the gateway would hold this ECG for the doctor (stderr says why); --force writes it,
     flagged as the gateway would send it when the hold runs out
  78 not written: the settings file has a mistake (`lastmile config check` names it)"""

FORMAT_NAMES = {
    "scp": "SCP-ECG",
    "aecg": "HL7 aECG",
    "dicom": "DICOM ECG",
    "contec": "Contec ECG90A",
    "npz": "gateway npz",
}


def register(sub: argparse._SubParsersAction) -> None:
    ecg = sub.add_parser(
        "ecg", help="decode ECG files (SCP-ECG, HL7 aECG, DICOM, Contec .ECG) or convert them to DICOM"
    )
    ecg_sub = ecg.add_subparsers(dest="ecg_command", metavar="ACTION")

    p = ecg_sub.add_parser("decode", help="decode an ECG file: one-line summary, samples to CSV")
    p.add_argument("input", metavar="INPUT", help="ECG file")
    p.add_argument(
        "--csv", metavar="OUT", help="write the samples in µV, one column per lead (header row of lead names)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object: the summary and the cart's findings")
    p.set_defaults(func=_decode)

    p = ecg_sub.add_parser(
        "to-dicom",
        help="convert an ECG file to a DICOM 12-lead / General ECG object",
        parents=[DATA_DIR],
        epilog=TO_DICOM_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="ECG file")
    p.add_argument("output", metavar="OUTPUT", help="DICOM file to write")
    p.add_argument("--patient-id", default="", help="the patient, for a file that names none (checked per id_kind)")
    p.add_argument("--patient-name", default="", help='the patient\'s name, e.g. "张三" (a pinyin group is added)')
    _triage_options(p)
    p.add_argument(
        "--override-patient",
        action="store_true",
        help="use --patient-id even though the file names another patient (the object is flagged)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write it even though the gateway would hold it for the doctor (no patient, another name, re-record)",
    )
    p.set_defaults(func=_to_dicom)

    p = ecg_sub.add_parser(
        "check", help="is this ECG good enough to send? verdict, heart rate, and what to fix (electrodes, hum ...)"
    )
    p.add_argument("input", metavar="INPUT", help="ECG file")
    p.add_argument("--json", action="store_true", help="one JSON object: verdict, heart_rate_bpm, problems")
    p.set_defaults(func=_check)

    p = ecg_sub.add_parser(
        "preview", help="the standard 12-lead print layout (25 mm/s, 10 mm/mV) as SVG, problems marked"
    )
    p.add_argument("input", metavar="INPUT", help="ECG file")
    p.add_argument("output", metavar="OUT.svg", help="SVG file to write")
    p.set_defaults(func=_preview)

    p = ecg_sub.add_parser(
        "release",
        help="send a held ECG now (the doctor's 'send anyway'; see 'lastmile patient show')",
        parents=[DATA_DIR],
    )
    p.add_argument("held_id", metavar="E12", help="the held ECG's number")
    p.set_defaults(func=_release)

    p = ecg_sub.add_parser(
        "discard",
        help="never send a held ECG: it was recorded again (kept locally, quarantined)",
        parents=[DATA_DIR],
    )
    p.add_argument("held_id", metavar="E12", help="the held ECG's number")
    p.set_defaults(func=_discard)
    ecg.set_defaults(func=lambda args: (ecg.print_help(), 2)[1])

    p = sub.add_parser(
        "import",
        help="import ECG files from a USB stick or folder into the outbox (each file once; the stick is only read)",
        parents=[DATA_DIR],
    )
    p.add_argument("paths", metavar="PATH", nargs="+", help="files or folders (e.g. the stick's mount point)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, only the summary")
    p.add_argument("--stat", action="store_true", help="urgent: these ECGs are read first, never held")
    p.add_argument("--reason", default="", metavar="TEXT", help='why the ECGs were taken, e.g. "胸痛 chest pain"')
    p.set_defaults(func=_import)


def _triage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--doctor", default="", help="the referring doctor (name or id)")
    p.add_argument("--stat", action="store_true", help="urgent read requested")
    p.add_argument("--reason", default="", metavar="TEXT", help='why the ECG was taken, e.g. "胸痛 chest pain"')


def summary(name: str, recording: EcgRecording) -> str:
    r = recording
    leads = ", ".join(r.lead_names)
    derived = f"; derived {', '.join(n for n in r.lead_names if n in r.derived_leads)}" if r.derived_leads else ""
    from lastmile.clock import clinic_time

    patient = f"patient {r.patient.patient_id}" if r.patient else "patient unassigned"
    device = r.device.label()
    flags = f", flags: {' '.join(r.flags)}" if r.flags else ""
    findings = ""
    if r.measurements or r.statements:
        found = [m for m in r.measurements if not m.lead]
        findings = ", cart findings: " + "; ".join(
            [f"{m.kind} {m.value:g} {m.unit}" for m in found] + [f'"{st.text}"' for st in r.statements]
        )
    return (
        f"{name}: {FORMAT_NAMES.get(r.source_format, r.source_format)}, {r.n_leads} leads ({leads}{derived}), "
        f"{r.n_samples} samples at {r.sampling_rate_hz:g} Hz ({r.duration_s:.1f} s), "
        f"{r.uv_per_unit:g} µV/unit, acquired {clinic_time(r.acquired_at)} ({r.time_source.value}), "
        f"{patient}, {device}{flags}{findings}"
    )


def recording_json(name: str, r: EcgRecording) -> dict:
    """`ecg decode --json`: what the file holds besides its samples."""
    from devices.ecg.findings import findings_json

    median = r.median_beats
    return {
        "file": name,
        "format": r.source_format,
        "leads": list(r.lead_names),
        "derived_leads": [n for n in r.lead_names if n in r.derived_leads],
        "samples": r.n_samples,
        "sampling_rate_hz": r.sampling_rate_hz,
        "uv_per_unit": r.uv_per_unit,
        "acquired_at": r.acquired_at.isoformat(),
        "time_source": r.time_source.value,
        "patient": None
        if r.patient is None
        else {
            "patient_id": r.patient.patient_id,
            "name": r.patient.name,
            "birth_date": r.patient.birth_date.isoformat() if r.patient.birth_date else None,
            "sex": r.patient.sex,
            "issuer": r.patient.issuer,
        },
        "device": r.device.label(),
        "stat": r.stat,
        "flags": list(r.flags),
        **findings_json(r.measurements, r.statements),
        "median_beats": None
        if median is None
        else {
            "leads": list(median.lead_names),
            "samples": median.n_samples,
            "sampling_rate_hz": median.sampling_rate_hz,
            "source": median.source,
        },
    }


def _fail(message: str) -> int:
    print(f"lastmile ecg: {message}", file=sys.stderr)
    return 1


def write_csv(recording: EcgRecording, out) -> None:
    """µV, one column per lead; values are exact (shortest decimal that round-trips)."""
    out.write(",".join(recording.lead_names) + "\n")
    uv = recording.microvolts().T
    for row in uv.tolist():
        out.write(",".join(repr(v) for v in row) + "\n")


def _decode(args: argparse.Namespace) -> int:
    from devices.errors import DeviceError
    from lastmile.ecg.intake import read_ecg_file

    try:
        recording = read_ecg_file(args.input)
    except OSError as exc:
        return _fail(f"cannot read {args.input}: {exc.strerror or exc}")
    except DeviceError as exc:
        return _fail(f"{args.input}: {exc}")
    if args.csv:
        try:
            with open(args.csv, "w", encoding="utf-8", newline="") as out:
                write_csv(recording, out)
        except OSError as exc:
            return _fail(f"cannot write {args.csv}: {exc.strerror or exc}")
    if args.json:
        import json

        print(json.dumps(recording_json(Path(args.input).name, recording), ensure_ascii=False, indent=2))
        return 0
    print(summary(Path(args.input).name, recording))
    return 0


def _to_dicom(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from devices.errors import DeviceError
    from lastmile.commands.common import config_from_args
    from lastmile.ecg.holds import ID_CONFLICT_FLAGS
    from lastmile.ecg.intake import (
        clinic_patient,
        read_ecg_file,
        recording_id_conflict_comment,
        session_request,
        station_of,
        vetted_patient,
    )
    from uploader.dicom_ecg import choose_sop_class, mint_uids, recording_to_dicom_bytes
    from uploader.errors import UploadError

    if args.patient_name and not args.patient_id:
        _fail("--patient-name needs --patient-id")
        return 2  # wrong arguments, as the help says (TO_DICOM_EXIT_CODES)
    try:
        recording = read_ecg_file(args.input)
    except OSError as exc:
        return _fail(f"cannot read {args.input}: {exc.strerror or exc}")
    except DeviceError as exc:
        return _fail(f"{args.input}: {exc}")
    config = config_from_args(args)
    recording = vetted_patient(recording, config)
    if args.patient_id:
        try:
            patient = clinic_patient(args.patient_id, args.patient_name, config)
        except ValueError as exc:
            return _fail(str(exc))
        named = recording.patient
        if named is not None and named.patient_id != patient.patient_id:
            if not args.override_patient:
                return _fail(
                    f"{args.input} names patient {named.patient_id}, not {patient.patient_id}: check the file, "
                    "or give --override-patient to use yours (the object is then flagged)"
                )
            recording = dataclasses.replace(
                recording, flags=(*recording.flags, f"patient-overridden:file-named-{named.patient_id}")
            )
        # the doctor's patient (the sex and birth date its resident ID gives): the file's
        # contradiction is answered, as `patient assign` answers it (`answered_flags`)
        answered = tuple(f for f in recording.flags if f not in ID_CONFLICT_FLAGS)
        recording = dataclasses.replace(recording, patient=patient, flags=answered)
    if args.stat:
        recording = dataclasses.replace(recording, stat=True)
    recording, checked_in = _as_forwarded(recording, config, doctor_named=bool(args.patient_id))
    held = _forward_would_hold(recording, config, checked_in, time.time())
    for line in held.lines:
        print(f"lastmile ecg to-dicom: {line}", file=sys.stderr)
    if held.reasons and not args.force:
        print(
            f"lastmile ecg to-dicom: {args.output} not written: the gateway would hold this ECG for the doctor "
            f"({', '.join(held.reasons)}); settle it as said above, or give --force to write it anyway",
            file=sys.stderr,
        )
        return HELD_EXIT
    request = session_request(args.doctor, reason=args.reason)
    try:
        data = recording_to_dicom_bytes(
            recording,
            mint_uids(),
            station_of(config),
            request=request,
            quality=held.quality,
            # a sex or birth date its resident ID contradicts: said to the reader, as the gateway sends it unanswered
            patient_comments=recording_id_conflict_comment(recording, config),
        )
        sop_class = choose_sop_class(recording)
    except UploadError as exc:
        return _fail(f"{args.input} cannot become a DICOM ECG: {exc}")
    try:
        Path(args.output).write_bytes(data)
    except OSError as exc:
        return _fail(f"cannot write {args.output}: {exc.strerror or exc}")
    if held.reasons:
        print(
            f"lastmile ecg to-dicom: written anyway (--force), as the gateway would send it when the hold runs out "
            f"({', '.join(held.reasons)}): whoever carries it to the county must know",
            file=sys.stderr,
        )
    kind = "12-lead ECG" if sop_class.endswith(".9.1.1") else "General ECG"
    print(summary(Path(args.input).name, recording) + f" -> {args.output} (DICOM {kind}, {len(data)} bytes)")
    return 0


@dataclass(frozen=True, slots=True)
class CheckedIn:
    """The clinic session as the forward path's intake sees it when it takes in this ECG."""

    patient_ids: frozenset[str]  # the checked-in patient's IDs; empty: nobody checked in
    name: str  # the name the check-in gave the ECG's patient ID, "" for none


def _as_forwarded(recording: EcgRecording, config: Config, *, doctor_named: bool) -> tuple[EcgRecording, CheckedIn]:
    """`recording` flagged and made urgent as the gateway's intake would (`file_enqueuer`) against
    the clinic session in the data directory, when it has one and it can be read: else (an offline
    laptop, a user who may not read the gateway's data) stderr says it was not compared with a
    check-in, and it is converted as it is. `doctor_named`: --patient-id says whose it is (as
    `patient assign`): only its name is compared with the check-in's, not its ID with the
    checked-in patient's."""
    import dataclasses
    import sqlite3

    from lastmile.clinic.db import DB_NAME
    from lastmile.clinic.patients import PatientContext
    from lastmile.data_dir import DataDirError
    from lastmile.ecg.holds import NAME_MISMATCH
    from lastmile.ecg.intake import names_differ, with_patient_check

    nobody = CheckedIn(frozenset(), "")
    path = config.data_dir / DB_NAME
    now = dt.datetime.now(dt.timezone.utc)
    try:
        if not path.is_file():
            _not_compared(f"no {path}")
            return recording, nobody
        patients = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)
        try:
            session = patients.stat_session(now)
            current = session.patient_ids if session is not None else patients.patient_ids(now)
            patient_id = recording.patient.patient_id if recording.patient else None
            known = patients.known_name(patient_id, now) if patient_id is not None and patient_id in current else ""
        finally:
            patients.close()
    # the gateway's data directory is its service user's (0700): converting needs none of it
    except (OSError, sqlite3.Error, DataDirError) as exc:
        _not_compared(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
        return recording, nobody
    if not doctor_named:
        recording = with_patient_check(recording, current, known)
    elif (
        recording.patient is not None
        and names_differ(recording.patient.name, known)
        and NAME_MISMATCH not in recording.flags
    ):
        recording = dataclasses.replace(recording, flags=(*recording.flags, NAME_MISMATCH))
    if session is not None and session.covers(patient_id, recording.acquired_at) and not recording.stat:
        recording = dataclasses.replace(recording, stat=True)
    return recording, CheckedIn(current, known)


def _not_compared(why: str) -> None:
    """Says that what is written was not compared with a check-in (`why`): whoever carries it must
    know that no other patient's or name's hold was looked for."""
    print(
        f"lastmile ecg to-dicom: not compared with a check-in ({why}): no hold for another patient or name "
        "than the check-in's was looked for",
        file=sys.stderr,
    )


@dataclass(frozen=True, slots=True)
class ForwardHold:
    """What the forward path would hold an ECG for (`hold_for`), and the lines that say so."""

    reasons: tuple[str, ...]  # hold reasons (lastmile.ecg.holds); empty: it would be sent
    lines: tuple[str, ...]  # for stderr: each reason and what to do, and the quality problems
    quality: QualityReport | None  # the quality gate's report, kept in the object as at intake


def _forward_would_hold(recording: EcgRecording, config: Config, checked_in: CheckedIn, now: float) -> ForwardHold:
    from lastmile.commands.common import quality_lines
    from lastmile.ecg.holds import ID_CONFLICT, NAME_MISMATCH, PATIENT_MISMATCH, QUALITY_HOLD, UNASSIGNED_HOLD
    from lastmile.ecg.intake import PATIENT_ID_REFUSED, hold_for, quality_hold_until, quality_of
    from lastmile.reports.report_text import display_name

    quality = quality_of(recording, config)
    hold = hold_for(recording, config, now, quality)
    reasons = [hold.reason] if hold is not None else []
    if quality_hold_until(recording, config, now, quality) is not None and QUALITY_HOLD not in reasons:
        reasons.append(QUALITY_HOLD)
    patient = recording.patient
    lines: list[str] = []
    for reason in reasons:
        if reason == UNASSIGNED_HOLD:
            refused = PATIENT_ID_REFUSED in recording.flags  # vetted_patient: not a valid ID of [patient] id_kind
            lines.append(
                (
                    "the file's patient ID is not a valid one, so it names no patient"
                    if refused
                    else "the file names no patient"
                )
                + ": the gateway would hold it for the doctor to say whose it is (`lastmile patient assign`); "
                "give --patient-id (and --patient-name)"
            )
        elif reason == PATIENT_MISMATCH and patient is not None:
            others = ", ".join(sorted(checked_in.patient_ids))
            lines.append(
                f"the file names patient {patient.patient_id}, but {others} is checked in: the gateway would hold "
                f"it for the doctor to say whose it is; give --patient-id with the doctor's answer"
            )
        elif reason == NAME_MISMATCH and patient is not None:
            lines.append(
                f"the file names patient {patient.patient_id} {display_name(patient.name)}, but "
                f"{patient.patient_id} is checked in as {display_name(checked_in.name)}: another person's ECG, or "
                "the cart kept the previous patient's name; the gateway would hold it for the doctor to say "
                "whose it is; ask him, then give --patient-id and --patient-name with his answer"
            )
        elif reason == ID_CONFLICT and patient is not None:
            lines.append(
                f"the file gives sex {patient.sex or '-'}, born {patient.birth_date or '-'}, which its resident ID "
                f"{patient.patient_id} contradicts (often the previous patient's details left in the cart): the "
                "gateway would hold it for the doctor to say which is right; ask him before sending it"
            )
        elif reason == QUALITY_HOLD:
            lines.append(
                "the quality check says record it again: the gateway would hold it for the doctor to record "
                "again or send anyway (`lastmile ecg check` says what to fix)"
            )
    if quality is not None:
        lines += quality_lines(quality.to_json())
    return ForwardHold(tuple(reasons), tuple(lines), quality)


def _read_for_check(path: str) -> tuple[EcgRecording | None, int]:
    from devices.errors import DeviceError
    from lastmile.ecg.intake import read_ecg_file

    try:
        return read_ecg_file(path), 0
    except OSError as exc:
        return None, _fail(f"cannot read {path}: {exc.strerror or exc}")
    except DeviceError as exc:
        return None, _fail(f"{path}: {exc}")


def _check(args: argparse.Namespace) -> int:
    from devices.ecg.quality import EcgQualityError, check_quality

    recording, code = _read_for_check(args.input)
    if recording is None:
        return code
    try:
        report = check_quality(recording)
    except EcgQualityError as exc:
        return _fail(f"{args.input}: {exc}")
    if args.json:
        print(json.dumps(report.to_json(), ensure_ascii=False))
        return 0
    rate = f"{report.heart_rate_bpm:.0f} bpm" if report.heart_rate_bpm is not None else "no heart rate"
    print(f"{Path(args.input).name}: {report.verdict} ({rate}, {report.duration_s:.1f} s)")
    for problem in report.problems:
        print(f"  {problem.message_zh}")
        print(f"  {problem.message_en}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from devices.ecg.quality import EcgQualityError
    from lastmile.ecg.preview import render_preview_svg

    recording, code = _read_for_check(args.input)
    if recording is None:
        return code
    try:
        svg = render_preview_svg(recording)
    except EcgQualityError as exc:
        return _fail(f"{args.input}: {exc}")
    try:
        Path(args.output).write_text(svg, encoding="utf-8")
    except OSError as exc:
        return _fail(f"cannot write {args.output}: {exc.strerror or exc}")
    print(f"{Path(args.input).name} -> {args.output} ({len(svg.encode())} bytes)")
    return 0


def _held_number(text: str) -> int:
    text = text.strip()
    return int(text[1:] if text[:1] in ("E", "e") else text)


def _release(args: argparse.Namespace) -> int:
    return _decide(args, release=True)


def _discard(args: argparse.Namespace) -> int:
    return _decide(args, release=False)


def _decide(args: argparse.Namespace, *, release: bool) -> int:
    import time

    from lastmile.commands.common import config_from_args
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.holds import HeldEcgError, discard_held_ecg, release_held_ecg

    try:
        number = _held_number(args.held_id)
    except ValueError:
        print(f"lastmile ecg: {args.held_id!r} is not a held ECG's number (E12)", file=sys.stderr)
        return 2
    with open_outbox(config_from_args(args)) as outbox:
        try:
            if release:
                release_held_ecg(outbox, number, time.time())
            else:
                discard_held_ecg(outbox, number, time.time())
        except HeldEcgError as exc:
            return _fail(str(exc))
    print(f"ECG E{number} " + ("released: it is sent now" if release else "discarded: it will not be sent"))
    return 0


class ProgressBar:
    """A one-line progress bar on a terminal; plain lines (one per file) otherwise."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr  # the one in use now, not at import
        self.width = width
        self.tty = self.stream.isatty()

    def __call__(self, done: int, total: int, outcome) -> None:
        name = Path(outcome.path).name
        if self.tty:
            filled = self.width * done // max(total, 1)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r[{bar}] {done}/{total} {outcome.status:13} {name[:40]:40}")
            if done == total:
                self.stream.write("\n")
        else:
            self.stream.write(f"{done}/{total} {outcome.status}: {name}\n")
        self.stream.flush()


def _import(args: argparse.Namespace) -> int:
    from lastmile.clinic.patients import PatientContext
    from lastmile.commands.common import config_from_args
    from lastmile.data_dir import open_outbox
    from lastmile.ecg.intake import import_files, session_request
    from uploader.dicom_ecg import StudyRequest

    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        return _fail(f"no such file or folder: {', '.join(missing)}")

    config = config_from_args(args)
    outbox = open_outbox(config)
    patients = PatientContext.open(config.data_dir, config.patient.idle_timeout_s)

    def current_patient_ids() -> frozenset[str]:
        return patients.patient_ids(dt.datetime.now(dt.timezone.utc))

    def request() -> StudyRequest:
        now = dt.datetime.now(dt.timezone.utc)
        current = patients.current(now)
        reason = args.reason or (current.reason if current else "")
        return session_request(patients.current_doctor(now), reason=reason)

    try:
        summary = import_files(
            outbox,
            config,
            args.paths,
            current_patient_ids=current_patient_ids,
            progress=None if args.quiet else ProgressBar(),
            request=request,
            stat=args.stat,
            # as the watched USB folder: the STAT patient's ECGs recorded since check-in go first
            stat_session=lambda: patients.stat_session(dt.datetime.now(dt.timezone.utc)),
            # a file naming the checked-in patient's ID under another name is held for the doctor
            checked_in_name=lambda patient_id: patients.known_name(patient_id, dt.datetime.now(dt.timezone.utc)),
        )
    finally:
        patients.close()
        outbox.close()
    for outcome in summary.refused:
        print(f"refused: {outcome.path}: {outcome.reason}")
    print(summary.line())
    return 1 if summary.refused else 0  # scripts notice refused files; the good ones are in
