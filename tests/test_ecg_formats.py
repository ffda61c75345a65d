"""Format detection, the decode_ecg entry point over every shared file, the SCP/aECG/DICOM triad,
and the lead helpers (name normalisation, derivation and its rounding)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.ecg.formats import decode_ecg, detect_format
from devices.ecg.leads import derive_limb_leads, normalise_lead_name, standard_order
from devices.errors import ProtocolError
from devices.identity import TimeSource
from tests.conftest import shared_file

SHARED_FILES = {
    ("scp", "ecgtoolkit_Example.scp"): "scp",
    ("scp", "abtahi_ECG_20170504_163507_123456789.SCP"): "scp",
    ("scp", "healforce_62.SCP"): "scp",
    ("aecg", "fda_hl7_Example_aECG.xml"): "aecg",
    ("aecg", "fda_minimum_aecg.xml"): "aecg",
    ("aecg", "fda_empty.xml"): "aecg",
    ("dicom", "ecgtoolkit_Example.dcm"): "dicom",
    ("contec", "0000050.ECG"): "contec",
    ("contec", "0000037.ECG"): "contec",
}
REFUSED = {"healforce_62.SCP", "fda_empty.xml"}


@pytest.mark.parametrize("where,expected", list(SHARED_FILES.items()), ids=[k[1] for k in SHARED_FILES])
def test_detects_and_decodes_every_shared_file(where: tuple[str, str], expected: str) -> None:
    data = shared_file("ecg", *where).read_bytes()
    assert detect_format(data, where[1]) == expected
    if where[1] in REFUSED:
        with pytest.raises(ProtocolError):
            decode_ecg(data, where[1])
    else:
        assert decode_ecg(data, where[1]).source_format == expected


@pytest.mark.parametrize(
    "where",
    [
        ("scp", "ecgtoolkit_Example.scp"),
        ("aecg", "fda_minimum_aecg.xml"),
        ("dicom", "ecgtoolkit_Example.dcm"),
        ("contec", "0000037.ECG"),
    ],
)
def test_detection_does_not_need_the_file_name(where: tuple[str, str]) -> None:
    data = shared_file("ecg", *where).read_bytes()
    assert detect_format(data) == SHARED_FILES[where]
    assert detect_format(data, "renamed.bin") == SHARED_FILES[where]


def test_triad_gives_identical_samples() -> None:
    scp = decode_ecg(shared_file("ecg", "scp", "ecgtoolkit_Example.scp").read_bytes())
    aecg = decode_ecg(shared_file("ecg", "aecg", "fda_hl7_Example_aECG.xml").read_bytes())
    dicom = decode_ecg(shared_file("ecg", "dicom", "ecgtoolkit_Example.dcm").read_bytes())
    assert scp.lead_names == aecg.lead_names == dicom.lead_names
    assert scp.sampling_rate_hz == aecg.sampling_rate_hz == dicom.sampling_rate_hz == 500.0
    for other in (aecg, dicom):
        np.testing.assert_array_equal(other.microvolts(), scp.microvolts())
        np.testing.assert_array_equal(other.samples, scp.samples)
    assert scp.acquired_at == aecg.acquired_at == dicom.acquired_at
    assert scp.patient is not None and aecg.patient is not None and dicom.patient is not None
    assert scp.patient.patient_id == aecg.patient.patient_id == dicom.patient.patient_id == "SBJ-123"


@pytest.mark.parametrize(
    "data,name",
    [
        (b"", ""),
        (b"hello world" * 10, "notes.txt"),
        (b"%PDF-1.4" + bytes(200), "ecg.pdf"),
        (b"PK\x03\x04" + bytes(100), "archive.zip"),
    ],
)
def test_unknown_files_are_refused(data: bytes, name: str) -> None:
    with pytest.raises(ProtocolError, match="not an ECG file"):
        detect_format(data, name)


@settings(deadline=None, max_examples=300)
@given(data=st.binary(max_size=300), name=st.sampled_from(["", "x.scp", "x.ECG", "x.xml", "x.dcm", "x.bin"]))
def test_fuzz_random_bytes(data: bytes, name: str) -> None:
    try:
        decode_ecg(data, name)
    except ProtocolError:
        pass


@pytest.mark.parametrize(
    "raw,name",
    [
        ("MDC_ECG_LEAD_AVR", "aVR"),
        ("MDC_ECG_LEAD_I", "I"),
        ("Lead I (Einthoven)", "I"),
        ("LEAD_III", "III"),
        ("avl", "aVL"),
        ("V3R", "V3R"),
        ("v7", "V7"),
        ("Lead aVF, augmented", "aVF"),
        ("-aVR", "-aVR"),
        ("MDC_ECG_LEAD_V4R", "V4R"),
        ("Respiration", "Respiration"),
    ],
)
def test_lead_names(raw: str, name: str) -> None:
    assert normalise_lead_name(raw) == name


def test_standard_order_keeps_unusual_leads_after() -> None:
    names = ["V3R", "II", "V1", "I", "V7"]
    assert [names[i] for i in standard_order(names)] == ["I", "II", "V1", "V3R", "V7"]


@settings(deadline=None, max_examples=200)
@given(st.lists(st.tuples(st.integers(-4000, 4000), st.integers(-4000, 4000)), min_size=1, max_size=50))
def test_derivation_is_within_half_a_unit_and_exact_for_iii(pairs: list[tuple[int, int]]) -> None:
    i, ii = (np.array(v, dtype=np.int16) for v in zip(*pairs))
    for rounding in ("toward-zero", "contec"):
        samples, names, derived = derive_limb_leads(np.stack([i, ii]), ("I", "II"), rounding=rounding)
        assert names == ("I", "II", "III", "aVR", "aVL", "aVF") and derived == {"III", "aVR", "aVL", "aVF"}
        got = dict(zip(names, samples.astype(float)))
        fi, fii = i.astype(float), ii.astype(float)
        np.testing.assert_array_equal(got["III"], fii - fi)
        for lead, exact in (("aVR", -(fi + fii) / 2), ("aVL", fi - fii / 2), ("aVF", fii - fi / 2)):
            assert np.all(np.abs(got[lead] - exact) <= 0.5), (rounding, lead)


def test_derivation_from_ii_and_iii_and_nothing_from_one_lead() -> None:
    ii, iii = np.array([[10, -7]], dtype=np.int16), np.array([[3, -2]], dtype=np.int16)
    samples, names, derived = derive_limb_leads(np.concatenate([ii, iii]), ("II", "III"), rounding="contec")
    got = dict(zip(names, samples.tolist()))
    assert got["I"] == [7, -5] and got["aVR"] == [1 - 10, -1 + 7] and got["aVF"] == [6, -4]
    _one, names, derived = derive_limb_leads(ii, ("II",))
    assert names == ("II",) and derived == frozenset()


@pytest.mark.parametrize(
    "name,expected",
    [
        ("REC.SCP", "scp"),
        ("rec.Ecg", "contec"),
        ("x.DCM", "dicom"),
        ("x.dicom", "dicom"),
    ],
)
def test_an_unrecognised_body_with_a_telling_name_goes_to_that_decoder(name: str, expected: str) -> None:
    """A damaged .SCP (or .ECG, .DCM) is handed to its decoder, which says what is wrong with it,
    rather than the vague "not an ECG file"; an .xml or .npz name alone proves nothing."""
    assert detect_format(b"\x01\x02garbage" * 20, name) == expected
    with pytest.raises(ProtocolError):
        decode_ecg(b"\x01\x02garbage" * 20, name)
    for weak in ("x.xml", "x.npz", "x.txt", ""):
        with pytest.raises(ProtocolError, match=f"{weak or 'the file'} is not an ECG file"):
            detect_format(b"\x01\x02garbage" * 20, weak)


def test_a_gateway_npz_is_recognised_by_zip_signature_and_name() -> None:
    from devices.ecg.npz import write_npz

    recording = decode_ecg(shared_file("ecg", "scp", "ecgtoolkit_Example.scp").read_bytes())
    data = write_npz(recording)
    assert detect_format(data, "stored.NPZ") == "npz"
    assert decode_ecg(data, "stored.npz").samples.tolist() == recording.samples.tolist()
    with pytest.raises(ProtocolError, match="not an ECG file"):
        detect_format(data, "stored.zip")  # any zip is not ours


def test_the_time_zone_and_receipt_time_reach_the_decoder() -> None:
    import datetime as dt

    data = shared_file("ecg", "contec", "0000037.ECG").read_bytes()
    utc = decode_ecg(data, "0000037.ECG")
    east8 = decode_ecg(data, "0000037.ECG", local_tz=dt.timezone(dt.timedelta(hours=8)))
    assert utc.acquired_at - east8.acquired_at == dt.timedelta(hours=8)  # a cart on Beijing time


def test_a_format_s_reader_is_loaded_only_when_a_file_of_it_comes() -> None:
    """The acquire service (goal: 64 MB) of a clinic whose cart sends DICOM never loads the aECG
    reader's XML parser nor the SCP reader: a fresh interpreter decodes a DICOM ECG, then an SCP."""
    from tests.import_probe import run_probe

    dicom = shared_file("ecg", "dicom", "ecgtoolkit_Example.dcm")
    scp = shared_file("ecg", "scp", "ecgtoolkit_Example.scp")
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from devices.ecg.formats import decode_ecg\n"
        "def loaded():\n"
        "    return ','.join(m.split('.')[-1] for m in ('devices.ecg.aecg', 'devices.ecg.scp', 'xml.etree') if m in sys.modules)\n"
        f"decode_ecg(Path({str(dicom)!r}).read_bytes(), 'a.dcm')\n"
        "print(loaded() or '-')\n"
        f"decode_ecg(Path({str(scp)!r}).read_bytes(), 'a.scp')\n"
        "print(loaded() or '-')\n"
    )
    assert run_probe(probe).split() == ["-", "scp"]


def test_an_aecg_whose_root_element_ends_at_byte_4096_is_still_recognised() -> None:
    """Detection reads the first 4 KiB whole: an aECG with a long XML prologue is not refused as
    an unknown file (an ECG lost) because its root element's last letter is byte 4096."""
    assert detect_format(b" " * 4083 + b"<AnnotatedECG xmlns='urn:hl7-org:v3'/>") == "aecg"


def test_a_file_time_after_the_file_arrived_is_not_believed() -> None:
    """A cart whose clock runs ahead dates its files in the future: the ECG went to the PACS as
    acquired days from now, under "the time the device wrote", and a worklist of today's studies
    never showed it. Like every other device path, a time ahead of receipt (beyond the clock
    tolerance) gives way to the receipt time, and the device's time is kept as a flag."""
    import datetime as dt

    data = shared_file("ecg", "contec", "0000037.ECG").read_bytes()  # written 2020-11-15 12:59:50
    east8 = dt.timezone(dt.timedelta(hours=8))
    received = dt.datetime(2020, 11, 14, 9, 0, tzinfo=dt.timezone.utc)
    r = decode_ecg(data, "0000037.ECG", local_tz=east8, received_at=received)
    assert (r.acquired_at, r.time_source) == (received, TimeSource.GATEWAY_RECEIPT)
    assert "device-time-ahead:2020-11-15T12:59:50+08:00" in r.flags
    on_time = decode_ecg(data, "0000037.ECG", local_tz=east8, received_at=dt.datetime(2020, 11, 15, 5, tzinfo=dt.UTC))
    assert on_time.time_source is TimeSource.FILE and not any(f.startswith("device-time") for f in on_time.flags)


def _reset_cart_files() -> list[tuple[str, bytes]]:
    """A cart whose clock was reset dates its files years before the gateway's (trusted) clock:
    the Contec cart's own export re-stamped 2000-01-01 (what a flat RTC battery gives), and the
    shared SCP / aECG / DICOM examples, all written 2002-11-22."""
    contec = (
        shared_file("ecg", "contec", "0000037.ECG").read_bytes().replace(b"2020-11-15 12:59:50", b"2000-01-01 00:00:00")
    )
    return [
        ("0000037.ECG", contec),
        ("ecgtoolkit_Example.scp", shared_file("ecg", "scp", "ecgtoolkit_Example.scp").read_bytes()),
        ("fda_minimum_aecg.xml", shared_file("ecg", "aecg", "fda_minimum_aecg.xml").read_bytes()),
        ("ecgtoolkit_Example.dcm", shared_file("ecg", "dicom", "ecgtoolkit_Example.dcm").read_bytes()),
    ]


@pytest.mark.parametrize("name,data", _reset_cart_files(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_reset_cart_clock_is_kept_but_not_believed(name: str, data: bytes) -> None:
    """The ECG went out with 2000-01-01 as its acquisition time "written into the file by the
    device", as if true. The cart's time is kept (no time is invented) but its source says it is
    not believed, and the recording is flagged for the doctor: the cart's clock needs setting."""
    import datetime as dt

    received = dt.datetime(2026, 12, 6, 9, 0, tzinfo=dt.timezone.utc)
    file_time = decode_ecg(data, name, local_tz=dt.timezone.utc).acquired_at
    r = decode_ecg(data, name, local_tz=dt.timezone.utc, received_at=received)
    assert (r.acquired_at, r.time_source) == (file_time, TimeSource.DEVICE_CLOCK_UNTRUSTED)
    assert file_time.year in (2000, 2002)
    assert "device-clock-reset" in r.flags


def test_old_files_from_a_stick_and_an_unset_gateway_clock_are_not_judged() -> None:
    """A stick brought in with last year's recordings is a genuine import: its times are believed.
    A gateway whose own clock is not set yet (a Pi without RTC boots in 1970) judges nothing:
    the cart's time stands as the file's."""
    import datetime as dt

    data = shared_file("ecg", "contec", "0000037.ECG").read_bytes()  # written 2020-11-15 12:59:50
    east8 = dt.timezone(dt.timedelta(hours=8))
    old = decode_ecg(data, "0000037.ECG", local_tz=east8, received_at=dt.datetime(2026, 12, 6, tzinfo=dt.UTC))
    assert old.time_source is TimeSource.FILE and not any(f.startswith("device-") for f in old.flags)
    unset = decode_ecg(data, "0000037.ECG", local_tz=east8, received_at=dt.datetime(1970, 1, 1, 0, 2, tzinfo=dt.UTC))
    assert (unset.acquired_at, unset.time_source) == (old.acquired_at, TimeSource.FILE)
    assert not any(f.startswith("device-") for f in unset.flags)


def test_a_cart_clock_gone_back_to_a_date_after_2020_is_judged_by_its_newest_ecg_only_where_given() -> None:
    """A cart reset to 2021-01-01 is after the 2020 floor, so the reset rule alone believed it. Where
    the path knows the newest ECG the cart sent before (the clinic LAN, ECGs sent as recorded), a
    time more than DEVICE_CLOCK_BACKWARDS (90 days) before it is a clock gone back: kept, not believed, flagged like a reset.
    Without it (a stick's files, whose old recordings are legitimate) the time stands."""
    import datetime as dt

    from devices.ecg.formats import JudgedTime, judged_time

    data = (
        shared_file("ecg", "contec", "0000037.ECG").read_bytes().replace(b"2020-11-15 12:59:50", b"2021-01-01 00:00:05")
    )
    east8 = dt.timezone(dt.timedelta(hours=8))
    received = dt.datetime(2026, 12, 6, 9, 0, tzinfo=dt.timezone.utc)
    rec = decode_ecg(data, "0000037.ECG", local_tz=east8, received_at=received)
    assert (rec.acquired_at, rec.time_source) == (dt.datetime(2021, 1, 1, 0, 0, 5, tzinfo=east8), TimeSource.FILE)
    newest = received - dt.timedelta(hours=2)
    gone_back = judged_time(rec.acquired_at, rec.time_source, received, newest_from_device=newest)
    assert gone_back == JudgedTime(rec.acquired_at, TimeSource.DEVICE_CLOCK_UNTRUSTED, ("device-clock-reset",))
    a_moment_before = judged_time(newest - dt.timedelta(hours=3), TimeSource.FILE, received, newest_from_device=newest)
    assert a_moment_before.time_source is TimeSource.FILE and a_moment_before.flags == ()
    # a cart back on the LAN after days away sends today's ECG, then its backlog (or the doctor sends
    # last week's again to have it read): a right clock, believed - not "set the cart's clock"
    backlog = judged_time(newest - dt.timedelta(days=12), TimeSource.FILE, received, newest_from_device=newest)
    assert backlog.time_source is TimeSource.FILE and backlog.flags == (), backlog
