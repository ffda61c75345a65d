"""devices/ecg/order_statistics.py gives numpy's own results without importing numpy.ma: compared
with np.median / np.percentile / np.unique value for value (and type for type) on real ECGs and
on the edge cases (even and odd lengths, one value, NaN, infinities, ints, float32)."""

from __future__ import annotations

import datetime as dt
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from devices.ecg import order_statistics as stats
from devices.ecg.formats import decode_ecg
from tests.conftest import shared_file
from tests.import_probe import run_probe

REAL_ECGS = (
    ("scp", "ecgtoolkit_Example.scp"),
    ("scp", "abtahi_ECG_20170504_163507_123456789.SCP"),
    ("contec", "0000037.ECG"),
)


def same(ours: Any, numpys: Any) -> None:
    """Equal value for value (NaN where numpy has NaN), of the same type, shape and dtype."""
    assert type(ours) is type(numpys)
    assert np.shape(ours) == np.shape(numpys)
    assert np.asarray(ours).dtype == np.asarray(numpys).dtype
    assert np.array_equal(np.asarray(ours), np.asarray(numpys), equal_nan=True)


def check_median(a: np.ndarray) -> None:
    axes: list[int | None] = [None, *range(-a.ndim, a.ndim)]
    for axis in axes:
        for keepdims in (False, True):
            same(stats.median(a, axis=axis, keepdims=keepdims), np.median(a, axis=axis, keepdims=keepdims))


def check_percentile(a: np.ndarray, q: float) -> None:
    for axis in range(-a.ndim, a.ndim):
        if a.shape[axis]:
            same(stats.percentile(a, q, axis=axis), np.percentile(a, q, axis=axis))


@pytest.mark.parametrize(("folder", "name"), REAL_ECGS)
def test_the_same_medians_and_percentiles_as_numpy_on_real_ecgs(folder: str, name: str) -> None:
    path = shared_file("ecg", folder, name)
    recording = decode_ecg(path.read_bytes(), path.name, received_at=dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc))
    samples = np.asarray(recording.samples)
    x_uv = samples * recording.uv_per_unit
    for a in (samples, x_uv, np.abs(x_uv), x_uv[:, :-1], x_uv[:1]):  # ints and floats; even and odd lengths
        check_median(a)
        for q in (0, 1, 50, 60.0, 99, 99.9, 100):
            check_percentile(a, q)
    steps = np.diff(np.flatnonzero(np.abs(samples[1]) > np.abs(samples[1]).max() * 0.5))
    same(stats.sorted_unique(steps), np.unique(steps))
    same(stats.sorted_unique(samples), np.unique(samples))


@pytest.mark.parametrize(
    "values",
    [
        [3.0],
        [2.0, 1.0],
        [5.0, 1.0, 4.0],
        [1.0, 2.0, 3.0, 4.0],
        [1.0, np.nan, 3.0],
        [np.nan, np.nan],
        [np.inf, -np.inf, 1.0],
        [np.inf, 1.0, 2.0, np.inf],
        [-0.0, 0.0],
        [7, 3, 9, 1],
        [2, 2, 2],
    ],
)
def test_the_same_results_as_numpy_on_the_edge_cases(values: list[float]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # inf - inf: numpy warns as we do
        for dtype in (np.float64, np.float32) if any(isinstance(v, float) for v in values) else (np.int64, np.int16):
            a = np.asarray(values, dtype=dtype)
            check_median(a)
            check_median(np.stack([a, a[::-1]]))
            for q in (0, 25, 50, 60.0, 99, 100, np.float64(37.5)):
                check_percentile(a, q)
                check_percentile(np.stack([a, a[::-1]]), q)
            same(stats.sorted_unique(a), np.unique(a))


# A NaN that np.partition leaves short of the last place unless asked to put the largest there:
# a lead with a dropped sample (NaN) must give a NaN median, not a number that hides the gap.
NAN_NOT_PARTITIONED_LAST = [1.0, 1.0, 6.0, 5.0, np.nan, 2.0]


@pytest.mark.parametrize(
    "values",
    [NAN_NOT_PARTITIONED_LAST, NAN_NOT_PARTITIONED_LAST[::-1], [np.nan, 1.0, np.nan], [3.0, np.nan, 1.0, np.nan, 2.0]],
)
def test_a_nan_anywhere_gives_numpys_nan(values: list[float]) -> None:
    a = np.asarray(values)
    check_median(a)
    check_median(np.stack([a, a[::-1]]))
    for q in (0, 10, 50, 60.0, 90, 100):
        check_percentile(a, q)
    same(stats.sorted_unique(a), np.unique(a))  # the NaNs count as one value


def test_zero_dimensional_times_and_text_as_numpy() -> None:
    for scalar in (np.array(3.0), np.float64(3.0), np.array(7)):
        for keepdims in (False, True):
            same(stats.median(scalar, keepdims=keepdims), np.median(scalar, keepdims=keepdims))
    for seconds in ([4, 1, 3, 2], [4, "NaT", 3, 2], ["NaT", 1, 2]):  # NaT: numpy's NaN of times
        durations = np.array(seconds, dtype="m8[s]")
        same(stats.median(durations), np.median(durations))
        same(stats.sorted_unique(durations), np.unique(durations))
    for text in (["V2", "I", "V2"], ["aVR"]):  # lead names: no NaN to look for
        ours, numpys = stats.sorted_unique(np.array(text)), np.unique(np.array(text))
        assert ours.dtype == numpys.dtype and ours.tolist() == numpys.tolist()


def test_a_percentile_without_an_axis_is_taken_along_the_last() -> None:
    leads = np.arange(24.0).reshape(3, 8) ** 2
    same(stats.percentile(leads, 90), np.percentile(leads, 90, axis=-1))


def test_an_empty_slice_gives_numpys_nan_and_warning() -> None:
    empty = np.zeros((3, 0))
    with pytest.warns(RuntimeWarning):
        ours = stats.median(empty, axis=-1)
    with pytest.warns(RuntimeWarning):
        same(ours, np.median(empty, axis=-1))
    same(stats.sorted_unique(np.array([], dtype=np.int64)), np.unique(np.array([], dtype=np.int64)))


@pytest.mark.parametrize("q", [-1, -0.5, 100.5, 101, np.nan])
def test_a_percentile_outside_0_to_100_is_refused(q: float) -> None:
    with pytest.raises(ValueError, match="range"):
        stats.percentile(np.arange(5.0), q)


@settings(max_examples=300, deadline=None)
@given(
    a=hnp.arrays(
        dtype=st.sampled_from([np.float64, np.float32, np.int32]),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9),
        elements={"allow_infinity": False},
    ),
    q=st.one_of(st.integers(0, 100), st.floats(0, 100)),
)
def test_the_same_results_as_numpy_on_any_array(a: np.ndarray, q: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        check_median(a)
        check_percentile(a, q)
        same(stats.sorted_unique(a), np.unique(a))


def test_checking_a_real_ecgs_quality_leaves_numpy_ma_unimported() -> None:
    """Found by the soak (acquire over its 64 MB goal): np.median of floats, np.percentile and
    np.unique each imported numpy.ma on the first ECG the quality gate checked. A fresh
    interpreter decodes real ECGs, checks their quality and finds their beats' median beat."""
    files = [str(shared_file("ecg", folder, name)) for folder, name in REAL_ECGS]
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from devices.ecg.formats import decode_ecg\n"
        "from devices.ecg.quality import check_quality\n"
        f"for path in map(Path, {files!r}):\n"
        "    report = check_quality(decode_ecg(path.read_bytes(), path.name))\n"
        "    assert report.beats, path\n"
        "print('numpy.ma' in sys.modules, 'numpy' in sys.modules)\n"
    )
    assert run_probe(probe).split() == ["False", "True"]
