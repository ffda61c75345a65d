"""ID-card and health-card scanners: 2D scanners in USB-CDC serial mode send the code, then CR/LF.

`ScanRules` tell a patient's card from a doctor's badge by configurable regular expressions
(`serial.patient_card_pattern`, `serial.doctor_badge_pattern`); a pattern's named group `id`,
if it has one, is the identifier, otherwise the whole code is. A code must match one pattern
entirely (`fullmatch`): a code matching neither or both is reported as unrecognised, never
guessed into a patient. With `patient_id_kind` "cn-resident-id" a patient identifier must be a
valid resident identity number (GB 11643 check digit): it is normalised (spaces, lower-case x)
and one that fails is reported as unrecognised with the reason, never passed on. With any kind
of ID (""), so must one that looks like a resident ID (`resident_id_required`), as everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from devices.errors import DeviceError
from devices.identity import InvalidPatientIdError, parse_resident_id, resident_id_required

MAX_CODE_LENGTH = 1024  # a 2D code on a card is far shorter; longer input is noise


class ScanRuleError(DeviceError, ValueError):
    """A scanner rule (regular expression) cannot be used."""


@dataclass(frozen=True, slots=True)
class PatientScanned:
    patient_id: str


@dataclass(frozen=True, slots=True)
class DoctorScanned:
    doctor_id: str


@dataclass(frozen=True, slots=True)
class CodeUnrecognised:
    """A scanned code that is neither (or both); `length` only, since the code may be personal data."""

    reason: str
    length: int
    rule: str = ""  # the resident-ID rule the card's number broke (InvalidPatientIdError.reason), "" for none


ScanEvent = PatientScanned | DoctorScanned | CodeUnrecognised


def _compile(pattern: str, what: str) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ScanRuleError(f"{what} is not a valid regular expression: {exc}") from None


@dataclass(frozen=True, slots=True)
class ScanRules:
    patient: re.Pattern[str] | None = None
    doctor: re.Pattern[str] | None = None
    patient_id_kind: str = ""  # "cn-resident-id": patient identifiers must pass GB 11643

    @classmethod
    def from_patterns(cls, patient_pattern: str, doctor_pattern: str, patient_id_kind: str = "") -> ScanRules:
        return cls(
            _compile(patient_pattern, "serial.patient_card_pattern"),
            _compile(doctor_pattern, "serial.doctor_badge_pattern"),
            patient_id_kind,
        )

    def _patient(self, ident: str, length: int) -> ScanEvent:
        if not resident_id_required(ident, self.patient_id_kind):
            return PatientScanned(ident)
        try:
            return PatientScanned(parse_resident_id(ident).number)
        except InvalidPatientIdError as exc:
            return CodeUnrecognised(str(exc), length, exc.reason)

    @staticmethod
    def _identifier(m: re.Match[str]) -> str:
        if "id" in m.re.groupindex and m.group("id") is not None:
            return m.group("id").strip()
        return m.group(0).strip()

    def classify(self, code: str) -> ScanEvent:
        if self.patient is None and self.doctor is None:
            return CodeUnrecognised("no scanner rules configured", len(code))
        p = self.patient.fullmatch(code) if self.patient is not None else None
        d = self.doctor.fullmatch(code) if self.doctor is not None else None
        if p and d:
            return CodeUnrecognised("matches both the patient and the doctor rule", len(code))
        if p:
            ident = self._identifier(p)
            return self._patient(ident, len(code)) if ident else CodeUnrecognised("empty patient id", len(code))
        if d:
            ident = self._identifier(d)
            return DoctorScanned(ident) if ident else CodeUnrecognised("empty doctor id", len(code))
        return CodeUnrecognised("matches no rule", len(code))


class ScannerDecoder:
    """Bytes from a scanner -> scan events, one per CR/LF-terminated code."""

    def __init__(self, rules: ScanRules) -> None:
        self.rules = rules
        self._buf = bytearray()
        self._too_long = False

    def feed(self, data: bytes) -> list[ScanEvent]:
        events: list[ScanEvent] = []
        for byte_line in self._split(bytes(data)):
            if byte_line is None:
                events.append(CodeUnrecognised("code too long", MAX_CODE_LENGTH))
                continue
            code = byte_line.decode("utf-8", errors="replace")
            # Some scanners prefix control characters (AIM ids come as text, kept as such).
            code = "".join(ch for ch in code if ch.isprintable()).strip()
            if code:
                events.append(self.rules.classify(code))
        return events

    def _split(self, data: bytes) -> list[bytes | None]:
        out: list[bytes | None] = []
        start = 0
        for i, b in enumerate(data):
            if b in (0x0A, 0x0D):
                self._append(data[start:i])
                if self._too_long:
                    out.append(None)
                elif self._buf:
                    out.append(bytes(self._buf))  # CR LF: the empty line between is skipped
                self._buf.clear()
                self._too_long = False
                start = i + 1
        self._append(data[start:])
        return out

    def _append(self, chunk: bytes) -> None:
        if self._too_long or not chunk:
            return
        if len(self._buf) + len(chunk) > MAX_CODE_LENGTH:
            self._too_long = True
            self._buf.clear()
            return
        self._buf.extend(chunk)
