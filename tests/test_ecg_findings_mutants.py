"""What the cart concluded (devices/ecg/findings.py), checked on hand-made values: the mutation
bench's focused tests for the module (the real-file tests in test_ecg_findings.py decode whole
recordings and stay in the suite).

A bug here sends the reading center a cart's sentinel as a finding ("QT 0 ms"), drops a
plausible one, puts an interval on the wrong lead or on no lead, or loses a statement.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from devices.ecg.findings import (
    MEASUREMENT_KINDS,
    EcgMeasurement,
    EcgStatement,
    MedianBeats,
    StatementSource,
    findings_json,
    measurement,
)
from devices.errors import InvalidRecordingError

SOURCE = "scp:section7"
PER_LEAD_KINDS = {
    "lead-p-duration",
    "lead-pr-interval",
    "lead-qrs-duration",
    "lead-qt-interval",
    "lead-q-amplitude",
    "lead-r-amplitude",
    "lead-s-amplitude",
    "lead-j-amplitude",
}

# (kind, lowest plausible, highest plausible): one per unit ("ms", "/min", "deg", "uV")
BOUNDS = [
    ("qt-interval", 1.0, 10_000.0),
    ("heart-rate", 1.0, 600.0),
    ("qrs-axis", -360.0, 360.0),
]
AMPLITUDE_BOUNDS = ("lead-r-amplitude", -100_000.0, 100_000.0)


def test_per_lead_measurements_need_a_lead_and_global_ones_take_none() -> None:
    """A per-lead R amplitude with no lead (which lead is hypertrophied?) or a global QT put on a
    lead (an interval on the wrong lead) is refused."""
    assert {k for k, kind in MEASUREMENT_KINDS.items() if kind.per_lead} == PER_LEAD_KINDS
    for kind in MEASUREMENT_KINDS:
        if kind in PER_LEAD_KINDS:
            assert EcgMeasurement(kind, 80.0, SOURCE, lead="V5").lead == "V5"
            with pytest.raises(InvalidRecordingError, match="needs lead"):
                EcgMeasurement(kind, 80.0, SOURCE)
        else:
            assert EcgMeasurement(kind, 80.0, SOURCE).lead == ""
            with pytest.raises(InvalidRecordingError, match="takes no lead"):
                EcgMeasurement(kind, 80.0, SOURCE, lead="II")


def test_an_unknown_measurement_is_refused() -> None:
    with pytest.raises(InvalidRecordingError, match="unknown ECG measurement"):
        EcgMeasurement("st-elevation", 100.0, SOURCE)
    assert measurement("st-elevation", 100.0, SOURCE) is None


@pytest.mark.parametrize(("kind", "low", "high"), [*BOUNDS, AMPLITUDE_BOUNDS])
def test_values_at_the_plausible_bounds_are_kept_and_beyond_them_dropped(kind: str, low: float, high: float) -> None:
    """The bounds are inclusive: a real extreme (a 10 s pause, a -360 deg axis) is carried; a
    sentinel just outside (0 ms: 'not computed', 601 /min) is dropped, never sent as a finding."""
    lead = {"lead": "V2"} if kind in PER_LEAD_KINDS else {}
    for value in (low, high):
        m = measurement(kind, value, SOURCE, **lead)
        assert m is not None and m.value == value
    for value in (low - 1.0, high + 1.0, low - 0.5, high + 0.5, float("nan"), float("inf")):
        assert measurement(kind, value, SOURCE, **lead) is None
        with pytest.raises(InvalidRecordingError, match="not a plausible value"):
            EcgMeasurement(kind, value, SOURCE, **lead)


def test_a_cart_writing_zero_for_not_computed_sends_no_interval() -> None:
    assert measurement("pr-interval", 0, SOURCE) is None
    assert measurement("pr-interval", "164", SOURCE) == EcgMeasurement("pr-interval", 164.0, SOURCE)  # type: ignore[arg-type]


def test_a_qtc_formula_is_kept_only_on_a_qtc_and_only_when_known() -> None:
    """'QTc 440 ms (Bazett)' keeps its formula; a formula on a plain QT, or one we do not know, is
    refused rather than sent with a code that would mislead the cardiologist."""
    assert EcgMeasurement("qtc-interval", 440.0, SOURCE, method="bazett").method == "bazett"
    assert EcgMeasurement("qtc-interval", 440.0, SOURCE).method == ""
    with pytest.raises(InvalidRecordingError, match="unknown QTc formula"):
        EcgMeasurement("qt-interval", 400.0, SOURCE, method="bazett")
    with pytest.raises(InvalidRecordingError, match="unknown QTc formula"):
        EcgMeasurement("qtc-interval", 440.0, SOURCE, method="made-up")
    assert measurement("qtc-interval", 440.0, SOURCE, method="made-up") is None


def test_each_measurement_states_its_kind_s_unit() -> None:
    assert EcgMeasurement("qrs-axis", 60.0, SOURCE).unit == "deg"
    assert EcgMeasurement("heart-rate", 72.0, SOURCE).unit == "/min"
    assert EcgMeasurement("lead-r-amplitude", 1200.0, SOURCE, lead="V5").unit == "uV"


def test_a_statement_with_no_text_is_refused() -> None:
    """An empty 'statement' is not a finding to show the reading center."""
    for text in ("", "   \n"):
        with pytest.raises(InvalidRecordingError, match="needs text"):
            EcgStatement(text, StatementSource.DEVICE)
    assert EcgStatement(" Sinus rhythm ", StatementSource.DEVICE).text == " Sinus rhythm "


def median_beats(
    samples: object, names: tuple[str, ...] = ("I", "II"), rate: float = 500.0, scale: float = 5.0
) -> MedianBeats:
    return MedianBeats(samples, names, rate, scale)  # type: ignore[arg-type]


GOOD_BEATS = np.arange(12, dtype=np.int16).reshape(2, 6)


def test_median_beats_keep_their_leads_rate_and_scale() -> None:
    beats = median_beats(GOOD_BEATS)
    assert beats.n_samples == 6 and beats.lead_names == ("I", "II")
    assert median_beats(np.zeros((1, 1), dtype=np.int32), ("V1",), rate=0.001, scale=1e-6).n_samples == 1


@pytest.mark.parametrize(
    ("samples", "names", "match"),
    [
        pytest.param(GOOD_BEATS.astype(np.float64), ("I", "II"), "2-D integer", id="float samples"),
        pytest.param(GOOD_BEATS.tolist(), ("I", "II"), "2-D integer", id="a list"),
        pytest.param(GOOD_BEATS[0], ("I",), "2-D integer", id="one dimension"),
        pytest.param(GOOD_BEATS[None], ("I",), "2-D integer", id="three dimensions"),
        pytest.param(np.zeros((0, 6), dtype=np.int16), (), "names for shape", id="no leads"),
        pytest.param(np.zeros((2, 0), dtype=np.int16), ("I", "II"), "names for shape", id="no samples"),
        pytest.param(GOOD_BEATS, ("I",), "names for shape", id="fewer names than leads"),
        pytest.param(GOOD_BEATS, ("I", "II", "III"), "names for shape", id="more names than leads"),
        pytest.param(GOOD_BEATS, ("II", "II"), "repeat", id="a lead named twice"),
    ],
)
def test_median_beats_that_could_show_a_beat_on_the_wrong_lead_are_refused(
    samples: object, names: tuple[str, ...], match: str
) -> None:
    """Every lead has one name and every name one lead: a beat is never drawn under another lead."""
    with pytest.raises(InvalidRecordingError, match=match):
        median_beats(samples, names)


@pytest.mark.parametrize("bad", [0.0, -500.0, float("nan"), float("inf")])
def test_median_beats_with_no_usable_rate_or_scale_are_refused(bad: float) -> None:
    """A beat with no time axis or no µV scale cannot be drawn to scale."""
    with pytest.raises(InvalidRecordingError, match="bad rate"):
        median_beats(GOOD_BEATS, rate=bad)
    with pytest.raises(InvalidRecordingError, match="bad scale"):
        median_beats(GOOD_BEATS, scale=bad)


def test_findings_json_carries_every_field_and_leaves_out_only_the_empty_ones() -> None:
    """The JSON the CLI prints and the logs keep: code and unit per measurement; lead, method and
    note only when set (never an empty 'lead' that reads as a global value)."""
    ms = (
        EcgMeasurement("qtc-interval", 440.0, SOURCE, method="bazett", note="unit was s"),
        EcgMeasurement("lead-r-amplitude", 1200.0, SOURCE, lead="V5"),
        EcgMeasurement("heart-rate", 72.0, "aecg:annotation"),
    )
    ss = (
        EcgStatement("Sinus rhythm", StatementSource.DEVICE, "scp:section8", code="SR"),
        EcgStatement("Patient moved", StatementSource.COMMENT),
    )
    got = findings_json(ms, ss)
    assert got == {
        "measurements": [
            {
                "kind": "qtc-interval",
                "value": 440.0,
                "unit": "ms",
                "code": "MDC 2:15876",
                "source": SOURCE,
                "method": "bazett",
                "note": "unit was s",
            },
            {
                "kind": "lead-r-amplitude",
                "value": 1200.0,
                "unit": "uV",
                "code": "MDC 2:2048",
                "source": SOURCE,
                "lead": "V5",
            },
            {"kind": "heart-rate", "value": 72.0, "unit": "/min", "code": "MDC 2:16770", "source": "aecg:annotation"},
        ],
        "statements": [
            {"text": "Sinus rhythm", "source": "device", "origin": "scp:section8", "code": "SR"},
            {"text": "Patient moved", "source": "comment", "origin": ""},
        ],
    }
    assert json.loads(json.dumps(got)) == got
