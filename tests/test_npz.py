"""The .npz ECG layout: NumPy-written files, round trips, and malformed input."""

from __future__ import annotations

import datetime as dt
import io
import re
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.ecg.npz import MAX_ARRAY_BYTES, read_npz, write_npz
from devices.ecg.recording import STANDARD_12_LEADS, EcgRecording, SampleGap
from devices.errors import ProtocolError, UnsupportedFeatureError
from devices.identity import DeviceIdentity, Patient, TimeSource

SAMPLES = np.arange(12 * 50, dtype=np.int16).reshape(12, 50) - 300
MINIMAL = dict(
    samples=SAMPLES,
    lead_names=np.array(STANDARD_12_LEADS),
    sampling_rate_hz=np.float64(500.0),
    uv_per_unit=np.float64(4.88),
    acquired_at=np.array("2024-05-01T09:30:00+03:00"),
    time_source=np.array("device-clock"),
)


def savez(compressed: bool = False, **arrays: object) -> bytes:
    """Bytes as NumPy itself writes them (the third-party writer of this layout)."""
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def full_recording() -> EcgRecording:
    return EcgRecording(
        samples=SAMPLES.astype(np.int32) * 1000,
        lead_names=STANDARD_12_LEADS,
        sampling_rate_hz=257.5,
        uv_per_unit=0.001,
        acquired_at=dt.datetime(2024, 5, 1, 9, 30, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=-4, minutes=-30))),
        time_source=TimeSource.GPS,
        device=DeviceIdentity("Acme", "Cart 5", "SN-1", "AA:BB", "2.1"),
        patient=Patient("KE-1", "Mwangi^Wanjirũ", dt.date(1980, 1, 2), "F", "County"),
        derived_leads=frozenset({"III", "aVR"}),
        source_format="npz",
        resampled_from_hz=250.0,
        gaps=(SampleGap(3, 7), SampleGap(50, 1)),
        stat=True,
        flags=("patient-mismatch",),
    )


@pytest.mark.parametrize("compressed", [False, True])
def test_numpy_written_minimal_file_is_read(compressed: bool) -> None:
    rec = read_npz(savez(compressed, **MINIMAL))
    assert rec.lead_names == STANDARD_12_LEADS
    assert np.array_equal(rec.samples, SAMPLES) and rec.samples.dtype == np.int16
    assert (rec.sampling_rate_hz, rec.uv_per_unit) == (500.0, 4.88)
    assert rec.acquired_at == dt.datetime(2024, 5, 1, 6, 30, tzinfo=dt.timezone.utc)
    assert rec.time_source is TimeSource.DEVICE_CLOCK
    assert rec.patient is None and rec.gaps == () and not rec.stat
    assert rec.source_format == "npz" and rec.device == DeviceIdentity()


def test_numpy_written_file_with_every_optional_field() -> None:
    data = savez(
        **MINIMAL,
        format_version=1,
        device_manufacturer="Acme",
        device_serial="SN-1",
        patient_id="KE-1",
        patient_name="Doe^Jane",
        patient_birth_date="1980-01-02",
        patient_sex="F",
        patient_issuer="County",
        derived_leads=np.array(["III"]),
        resampled_from_hz=250,
        gaps=np.array([[10, 5]]),
        stat=True,
        flags=np.array(["patient-mismatch"]),
    )
    rec = read_npz(data)
    assert rec.device == DeviceIdentity(manufacturer="Acme", serial="SN-1")
    assert rec.patient == Patient("KE-1", "Doe^Jane", dt.date(1980, 1, 2), "F", "County")
    assert rec.derived_leads == {"III"} and rec.resampled_from_hz == 250.0
    assert rec.gaps == (SampleGap(10, 5),) and rec.stat and rec.flags == ("patient-mismatch",)


def test_write_then_read_round_trips_everything_and_is_reproducible() -> None:
    rec = full_recording()
    data = write_npz(rec)
    back = read_npz(data)
    assert np.array_equal(back.samples, rec.samples) and back.samples.dtype == rec.samples.dtype
    for name in (
        "lead_names",
        "sampling_rate_hz",
        "uv_per_unit",
        "acquired_at",
        "time_source",
        "device",
        "patient",
        "derived_leads",
        "source_format",
        "resampled_from_hz",
        "gaps",
        "stat",
        "flags",
    ):
        assert getattr(back, name) == getattr(rec, name), name
    assert write_npz(rec) == data


def valid_with(**changes: object) -> bytes:
    arrays = dict(MINIMAL)
    arrays.update(changes)
    return savez(**{k: v for k, v in arrays.items() if v is not None})


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "not a readable npz"),
        (b"PK\x03\x04garbage", "not a readable npz"),
        (savez(**MINIMAL)[:-30], "not a readable npz"),
        (valid_with(samples=None), "lacks samples"),
        (valid_with(time_source=None), "lacks time_source"),
        (valid_with(samples=SAMPLES.astype(np.float32)), "integer"),
        (valid_with(samples=SAMPLES[0]), "2-D"),
        (valid_with(samples=np.zeros((12, 0), np.int16)), "inconsistent"),
        (valid_with(samples=np.zeros((65, 2), np.int16)), "65 leads"),
        (valid_with(lead_names=np.array(STANDARD_12_LEADS[:11])), "inconsistent"),
        (valid_with(lead_names=np.array(["I"] * 12)), "inconsistent"),
        (valid_with(lead_names=np.arange(12)), "string array"),
        (valid_with(sampling_rate_hz=np.float64("nan")), "positive finite"),
        (valid_with(sampling_rate_hz=np.array([500.0, 250.0])), "single value"),
        (valid_with(uv_per_unit=np.array("4.88")), "number"),
        (valid_with(uv_per_unit=-1.0), "positive finite"),
        (valid_with(acquired_at=np.array("2024-05-01T09:30:00")), "no time zone"),
        (valid_with(acquired_at=np.array("yesterday")), "ISO-8601"),
        (valid_with(time_source=np.array("sundial")), "time_source"),
        (valid_with(patient_name=np.array("Doe^Jane")), "without patient_id"),
        (valid_with(patient_id=np.array("")), "inconsistent"),
        (valid_with(patient_id=np.array("P1"), patient_sex=np.array("X")), "inconsistent"),
        (valid_with(patient_id=np.array("P1"), patient_birth_date=np.array("01/02/1980")), "ISO date"),
        (valid_with(derived_leads=np.array(["V9"])), "inconsistent"),
        (valid_with(gaps=np.array([[0, -1]])), "inconsistent"),
        (valid_with(gaps=np.array([1, 2])), "gaps must be"),
        (valid_with(stat=np.array(1)), "boolean"),
        (valid_with(device_model=np.array("x" * 300)), "longer than"),
    ],
)
def test_malformed_files_raise_protocol_error(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        read_npz(data)


def test_unknown_keys_and_versions_are_unsupported_not_guessed() -> None:
    with pytest.raises(UnsupportedFeatureError, match="does not know: comment"):
        read_npz(valid_with(comment=np.array("hello")))
    with pytest.raises(UnsupportedFeatureError, match="format_version"):
        read_npz(valid_with(format_version=2))


def test_pickled_objects_are_refused() -> None:
    with pytest.raises(ProtocolError, match="objects"):
        read_npz(valid_with(lead_names=np.array(list(STANDARD_12_LEADS), dtype=object)))


def test_a_plain_npy_is_not_an_npz() -> None:
    buffer = io.BytesIO()
    np.save(buffer, SAMPLES)
    with pytest.raises(ProtocolError):
        read_npz(buffer.getvalue())


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def test_a_zip_bomb_is_refused_before_it_is_unpacked() -> None:
    bomb = zipped({"samples.npy": bytes(MAX_ARRAY_BYTES + 1)})
    assert len(bomb) < 200_000
    with pytest.raises(ProtocolError, match="unpacks to"):
        read_npz(bomb)


def test_an_npy_header_claiming_more_data_than_present_is_refused() -> None:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<i8", "fortran_order": False, "shape": (10**6, 10**6)})
    with pytest.raises(ProtocolError, match="declares"):
        read_npz(zipped({"samples.npy": buffer.getvalue() + bytes(16)}))


def test_non_npy_members_are_refused() -> None:
    with pytest.raises(ProtocolError, match=r"not a \.npy"):
        read_npz(zipped({"readme.txt": b"hello"}))


@settings(deadline=None, max_examples=200)
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    try:
        read_npz(data)
    except ProtocolError:
        pass


VALID = write_npz(full_recording())


@settings(deadline=None, max_examples=300)
@given(
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, len(VALID)),
)
def test_fuzz_corrupted_valid_file_decodes_or_raises_protocol_error(edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(VALID)
    for position, value in edits:
        data[position] = value
    try:
        read_npz(bytes(data[:cut]) if cut < len(VALID) // 2 else bytes(data))
    except ProtocolError:
        pass


@settings(deadline=None, max_examples=100)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "samples",
                "lead_names",
                "sampling_rate_hz",
                "uv_per_unit",
                "acquired_at",
                "time_source",
                "gaps",
                "stat",
                "patient_id",
                "derived_leads",
            ]
        ),
        st.one_of(
            st.integers(-(2**63), 2**63 - 1),
            st.floats(),
            st.text(max_size=20),
            st.booleans(),
            st.lists(st.integers(-1000, 1000), max_size=6),
            st.lists(st.lists(st.integers(-5, 5), min_size=2, max_size=2), max_size=3),
            st.lists(st.text(max_size=4), max_size=4),
        ),
    )
)
def test_fuzz_wrong_values_under_right_keys_decode_or_raise_protocol_error(arrays: dict) -> None:
    try:
        data = savez(**{k: np.asarray(v) for k, v in arrays.items()})
    except (ValueError, OverflowError):
        return  # numpy cannot even write it
    try:
        read_npz(data)
    except ProtocolError:
        pass


# -- the limits, at the limit -------------------------------------------------------------------
# Each limit keeps a hostile or broken file from taking the gateway's memory (a Pi with 512 MB);
# each must let through what a real recording needs.


def test_the_limits_themselves() -> None:
    import devices.ecg.npz as npz

    assert (npz.MAX_FILE_BYTES, npz.MAX_ARRAY_BYTES) == (64 * 1024 * 1024, 64 * 1024 * 1024)
    assert (npz.MAX_LEADS, npz.MAX_TEXT, npz.MAX_GAPS) == (64, 256, 65536)


@pytest.mark.parametrize(
    "limit,key,value,needle",
    [
        ("MAX_LEADS", "lead_names", None, "leads (1-"),
        ("MAX_TEXT", "device_model", "x", "longer than"),
        ("MAX_TEXT", "flags", ["x"], "too many or too long"),
        ("MAX_GAPS", "gaps", [[1, 1]], "gaps (at most"),
    ],
)
def test_each_count_limit_is_inclusive(
    monkeypatch: pytest.MonkeyPatch, limit: str, key: str, value: object, needle: str
) -> None:
    import devices.ecg.npz as npz

    if limit == "MAX_LEADS":
        monkeypatch.setattr(npz, "MAX_LEADS", 12)
        assert read_npz(savez(**MINIMAL)).n_leads == 12  # exactly the limit
        monkeypatch.setattr(npz, "MAX_LEADS", 11)
        with pytest.raises(ProtocolError, match=re.escape(needle)):
            read_npz(savez(**MINIMAL))
        return
    size = 40 if limit == "MAX_TEXT" else 3  # 40: longer than every other text of MINIMAL
    arrays = dict(MINIMAL)
    if key == "device_model":
        arrays[key] = np.array("x" * size)
    elif key == "flags":
        arrays[key] = np.array(["x" * size])
    else:
        arrays[key] = np.array([[1, 1]] * size)
    monkeypatch.setattr(npz, limit, size)
    read_npz(savez(**arrays))  # exactly the limit
    monkeypatch.setattr(npz, limit, size - 1)
    with pytest.raises(ProtocolError, match=re.escape(needle)):
        read_npz(savez(**arrays))


def test_too_many_lead_names_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import devices.ecg.npz as npz

    monkeypatch.setattr(npz, "MAX_LEADS", 11)
    with pytest.raises(ProtocolError, match="too many or too long entries"):
        read_npz(savez(**{**MINIMAL, "samples": np.zeros((1, 10), dtype=np.int16)}))  # 1 lead, 12 names


def test_samples_need_at_least_one_lead() -> None:
    with pytest.raises(ProtocolError, match=re.escape("0 leads (1-64 allowed)")):
        read_npz(
            savez(**{**MINIMAL, "samples": np.zeros((0, 5), dtype=np.int16), "lead_names": np.array([], dtype=str)})
        )
    one = read_npz(savez(**{**MINIMAL, "samples": SAMPLES[:1], "lead_names": np.array(["II"])}))
    assert one.lead_names == ("II",)


def test_file_and_member_size_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    import devices.ecg.npz as npz

    data = savez(**MINIMAL)
    monkeypatch.setattr(npz, "MAX_FILE_BYTES", len(data))
    read_npz(data)  # exactly the limit
    monkeypatch.setattr(npz, "MAX_FILE_BYTES", len(data) - 1)
    with pytest.raises(ProtocolError, match="is larger than"):
        read_npz(data)
    monkeypatch.undo()
    biggest = max(info.file_size for info in zipfile.ZipFile(io.BytesIO(data)).infolist())
    monkeypatch.setattr(npz, "MAX_ARRAY_BYTES", biggest)
    read_npz(data)
    monkeypatch.setattr(npz, "MAX_ARRAY_BYTES", biggest - 1)
    with pytest.raises(ProtocolError, match="unpacks to"):
        read_npz(data)


def test_a_member_longer_than_its_directory_entry_says_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The zip directory may lie about a member's size: only what it declares is read (never past
    the limit it was checked against), and the member's CRC then refuses the short read."""
    import devices.ecg.npz as npz

    data = savez(**MINIMAL)
    biggest = max(info.file_size for info in zipfile.ZipFile(io.BytesIO(data)).infolist())

    real_infolist = zipfile.ZipFile.infolist

    def lying(self: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
        infos = real_infolist(self)
        for info in infos:
            info.file_size = min(info.file_size, 1)  # the directory claims tiny members
        return infos

    monkeypatch.setattr(zipfile.ZipFile, "infolist", lying)
    monkeypatch.setattr(npz, "MAX_ARRAY_BYTES", biggest - 1)
    with pytest.raises(ProtocolError, match=r"^not a readable npz file: Bad CRC-32 for file"):
        read_npz(data)


def test_duplicate_members_and_npy_versions() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("samples.npy", b"x")
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("samples.npy", b"x")
    with pytest.raises(ProtocolError, match="duplicate members"):
        read_npz(buffer.getvalue())
    v2 = io.BytesIO()
    np.lib.format.write_array(v2, np.array("device-clock"), version=(2, 0))
    arrays = {k + ".npy": _npy_bytes(v) for k, v in MINIMAL.items() if k != "time_source"}
    arrays["time_source.npy"] = v2.getvalue()
    assert read_npz(zipped(arrays)).time_source is TimeSource.DEVICE_CLOCK  # .npy version 2.0 is read
    v3 = io.BytesIO()
    np.lib.format.write_array(v3, np.array("device-clock"), version=(3, 0))
    arrays["time_source.npy"] = v3.getvalue()
    with pytest.raises(ProtocolError, match=r"uses .npy version \(3, 0\)"):
        read_npz(zipped(arrays))


def _npy_bytes(value: object) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asanyarray(value))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("device_model", np.array(5), "must be a string"),
        ("sampling_rate_hz", np.float64(0.0), "positive finite number, not 0.0"),
        ("uv_per_unit", np.float64(-0.0), "positive finite number"),
        ("acquired_at", np.array("2024-05-01T09:30:00"), "no time zone"),
    ],
)
def test_field_type_refusals(key: str, value: object, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        read_npz(savez(**{**MINIMAL, key: value}))


def test_written_files_are_reproducible_zip_entries() -> None:
    """Fixed 1980-01-01 time stamps (the zip epoch) in every entry: the same recording, the same bytes."""
    data = write_npz(full_recording())
    infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in infos)


def test_impossible_dates_and_non_matrix_samples_are_refused() -> None:
    """An ECG dated 1899, a patient born in 1899 (a garbled clock or form) or samples that are not a
    leads x samples integer matrix are refused, never filed a century off or read as other leads."""
    cases = [
        (valid_with(acquired_at=np.array("1899-12-31T23:00:00+00:00")), "is no date an ECG was taken"),
        (valid_with(patient_id=np.array("P1"), patient_birth_date=np.array("1899-01-01")), "is no date of birth"),
        (valid_with(samples=SAMPLES.astype(np.float32)), "2-D integer array"),
        (valid_with(samples=SAMPLES[0]), "2-D integer array"),
    ]
    for data, needle in cases:
        with pytest.raises(ProtocolError, match=needle):
            read_npz(data)
