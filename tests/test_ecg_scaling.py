"""One integer unit for channels with their own scale and offset: exact, or refused.

Each test says what a reading cardiologist would get if the check were gone: a flat lead, a
wrapped sample (40,000 µV shown as -25,536 µV), a lead at the wrong amplitude.
"""

from __future__ import annotations

import numpy as np
import pytest

from devices.ecg.aecg import read_aecg
from devices.ecg.scaling import MAX_MULTIPLIER, Channel, to_common_unit
from devices.errors import UnsupportedFeatureError
from tests.conftest import shared_file


def _ch(values: list[int], scale: float, offset: float = 0.0) -> Channel:
    return Channel(raw=np.array(values, dtype=np.int64), uv_per_unit=scale, offset_uv=offset)


def _microvolts(samples: np.ndarray, unit: float) -> list[list[float]]:
    return (samples.astype(np.float64) * unit).tolist()


def test_one_microvolt_per_unit_is_kept_as_is() -> None:
    """A 1 µV/unit recording (common in DICOM ECGs): samples unchanged, unit 1 µV, int16."""
    samples, unit = to_common_unit([_ch([-3, 0, 7], 1.0), _ch([12, -1, 0], 1.0)], "test")
    assert unit == 1.0 and samples.dtype == np.int16
    assert samples.tolist() == [[-3, 0, 7], [12, -1, 0]]


def test_default_offset_is_zero_microvolts() -> None:
    samples, unit = to_common_unit([Channel(raw=np.array([5, -5]), uv_per_unit=1.0)], "test")
    assert (samples.tolist(), unit) == ([[5, -5]], 1.0)


def test_an_inverted_channel_keeps_its_sign() -> None:
    samples, unit = to_common_unit([_ch([100, -20], -1.0), _ch([1, 2], 1.0)], "test")
    assert unit == 1.0 and samples.tolist() == [[-100, 20], [1, 2]]


def test_whole_multiples_share_the_largest_common_unit() -> None:
    """5 and 10 µV/unit share 5 µV (not 1 µV: the stored numbers stay small)."""
    samples, unit = to_common_unit([_ch([1, -2], 5.0), _ch([3, 4], 10.0)], "test")
    assert unit == 5.0
    assert samples.tolist() == [[1, -2], [6, 8]]
    assert _microvolts(samples, unit) == [[5.0, -10.0], [30.0, 40.0]]


def test_fractional_scales_share_an_exact_unit() -> None:
    """2.5 µV and 5 µV/unit: unit 2.5 µV; 1.25 and 0.5: unit 0.25 µV."""
    samples, unit = to_common_unit([_ch([2, -1], 2.5), _ch([3, 1], 5.0)], "test")
    assert (unit, samples.tolist()) == (2.5, [[2, -1], [6, 2]])
    samples, unit = to_common_unit([_ch([4, 1], 1.25), _ch([3, -1], 0.5)], "test")
    assert (unit, samples.tolist()) == (0.25, [[20, 5], [6, -2]])


def test_offsets_are_added_in_the_common_unit() -> None:
    """A baseline of +7.5 µV on 2.5 µV/unit and -5 µV on 5 µV/unit: every µV value exact."""
    samples, unit = to_common_unit([_ch([0, 4], 2.5, offset=7.5), _ch([2, -2], 5.0, offset=-5.0)], "test")
    assert unit == 2.5
    assert _microvolts(samples, unit) == [[7.5, 17.5], [5.0, -15.0]]
    samples, unit = to_common_unit([_ch([1, 2], 10.0, offset=5.0)], "test")
    assert (unit, samples.tolist()) == (5.0, [[3, 5]])


def test_a_zero_scale_is_refused_not_a_flat_lead() -> None:
    """Sensitivity 0 would make every sample of the lead 0 µV: a flat line read as asystole."""
    with pytest.raises(UnsupportedFeatureError, match="zero scale"):
        to_common_unit([_ch([1, 2], 1.0), _ch([300, -300], 0.0)], "test")


def test_40000_microvolts_do_not_wrap_in_int16() -> None:
    """40,000 µV at 1 µV/unit needs 32 bits; as int16 it would read -25,536 µV."""
    samples, _unit = to_common_unit([_ch([0, 40_000, -5], 1.0)], "test")
    assert samples.dtype == np.int32 and samples.tolist() == [[0, 40_000, -5]]
    samples, _ = to_common_unit([_ch([0, -40_000], 1.0)], "test")
    assert samples.dtype == np.int32 and samples.tolist() == [[0, -40_000]]


@pytest.mark.parametrize(
    "values,dtype",
    [
        ([-32768, 32767], np.int16),
        ([-32769, 0], np.int32),
        ([0, 32768], np.int32),
        ([-32768, 0], np.int16),
        ([0, 32767], np.int16),
    ],
)
def test_int16_is_used_exactly_when_every_sample_fits(values: list[int], dtype: type) -> None:
    samples, _ = to_common_unit([_ch(values, 1.0)], "test")
    assert samples.dtype == dtype and samples.tolist() == [values]


@pytest.mark.parametrize("values", [[-(2**31), 2**31 - 1], [-(2**31), 0], [0, 2**31 - 1]])
def test_the_whole_32_bit_range_is_kept(values: list[int]) -> None:
    samples, _ = to_common_unit([_ch(values, 1.0)], "test")
    assert samples.dtype == np.int32 and samples.tolist() == [values]


@pytest.mark.parametrize("values", [[0, 2**31], [-(2**31) - 1, 0], [0, 2**33]])
def test_samples_beyond_32_bits_are_refused_not_wrapped(values: list[int]) -> None:
    """Past 32 bits the DICOM waveform cannot hold the value: refuse rather than wrap it."""
    with pytest.raises(UnsupportedFeatureError, match="32-bit"):
        to_common_unit([_ch(values, 1.0)], "test")


def test_scaling_up_that_overflows_32_bits_is_refused() -> None:
    """2**30 stored at 4 µV/unit next to a 1 µV/unit lead is 2**32 units of 1 µV."""
    with pytest.raises(UnsupportedFeatureError, match="32-bit"):
        to_common_unit([_ch([2**30], 4.0), _ch([0], 1.0)], "test")


def test_the_largest_practical_multiplier_is_accepted() -> None:
    samples, unit = to_common_unit([_ch([1], 1.0), _ch([1], float(MAX_MULTIPLIER))], "test")
    assert unit == 1.0 and samples.tolist() == [[1], [MAX_MULTIPLIER]]
    assert MAX_MULTIPLIER == 1024


def test_scales_with_no_practical_common_unit_are_refused() -> None:
    """1 µV and 1,025 µV/unit (or 1 µV and 1.0001 µV) have no practical common unit: refuse
    rather than round one lead's amplitude."""
    with pytest.raises(UnsupportedFeatureError, match="no practical common unit"):
        to_common_unit([_ch([1], 1.0), _ch([1], float(MAX_MULTIPLIER + 1))], "test")
    with pytest.raises(UnsupportedFeatureError, match="no practical common unit"):
        to_common_unit([_ch([1], 1.0), _ch([1], 1.0001)], "test")


def test_a_micro_microvolt_scale_is_read_exactly() -> None:
    """Scales are read as fractions with denominators up to 10**6: 10**-6 µV is 1/1,000,000."""
    samples, unit = to_common_unit([_ch([3], 1e-6)], "test")
    assert unit == 1e-6 and samples.tolist() == [[3]]


def test_channels_without_samples_give_an_empty_matrix() -> None:
    samples, unit = to_common_unit([_ch([], 2.5), _ch([], 5.0)], "test")
    assert samples.shape == (2, 0) and unit == 2.5


def test_channels_of_different_lengths_are_refused() -> None:
    """A lead one sample short would shift every later beat against the others."""
    with pytest.raises(UnsupportedFeatureError, match="different lengths"):
        to_common_unit([_ch([1, 2, 3], 1.0), _ch([1, 2], 1.0)], "test")
    with pytest.raises(UnsupportedFeatureError, match="no channel"):
        to_common_unit([], "test")


def test_an_aecg_at_one_microvolt_per_unit_decodes_unchanged() -> None:
    """The FDA minimum aECG rewritten to 1 µV/unit: every digit is its µV value."""
    doc = shared_file("ecg", "aecg", "fda_minimum_aecg.xml").read_bytes()
    doc = doc.replace(b'<scale value="2.5" unit="uV"/>', b'<scale value="1" unit="uV"/>')
    r = read_aecg(doc)
    assert r.uv_per_unit == 1.0
    np.testing.assert_array_equal(r.microvolts()[0], r.samples[0])
    assert r.samples[0].tolist() == [-2, -2, -2, -2, -3, -4, -3, -5, -5, -4, -6, -9, -9]
