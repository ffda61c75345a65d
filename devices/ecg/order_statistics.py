"""Medians, percentiles and sorted unique values, as numpy computes them, without numpy.ma.

numpy's `median` (of floats), `percentile` and `unique` each look for a masked array with
`np.ma`, which imports numpy.ma (~0.4 MB of modules, more in a fragmented heap) the first time
an ECG is checked: found by bench/soak.py with the acquire service over its 64 MB goal. These
do the same arithmetic in the same order (partition, then numpy's own mean and interpolation),
so the results are identical to numpy's, NaN included (a NaN in a slice makes its result NaN);
tests/test_order_statistics.py compares them with numpy's on real ECGs and edge cases.
"""

from __future__ import annotations

import numpy as np


def _can_hold_nan(a: np.ndarray) -> bool:
    return bool(np.issubdtype(a.dtype, np.inexact) or a.dtype.kind in "Mm")


def median(a: np.ndarray, axis: int | None = None, keepdims: bool = False) -> np.ndarray:
    """`np.median(a, axis=axis, keepdims=keepdims)` for one axis or all of them."""
    a = np.asarray(a)
    ndim = a.ndim
    if axis is None:
        flat, along = a.ravel(), 0
    else:
        flat, along = a, axis + ndim if axis < 0 else axis  # out of range: np.partition says so
    size = flat.shape[along]
    kth = [size // 2 - 1, size // 2] if size % 2 == 0 else [(size - 1) // 2]
    nan_possible = _can_hold_nan(flat)
    if nan_possible:
        kth.append(-1)  # a NaN sorts last: partitioned there, it is seen below
    part = np.partition(flat, kth, axis=along)
    middle = part.shape[along] // 2
    indexer = [slice(None)] * part.ndim
    indexer[along] = slice(middle, middle + 1) if part.shape[along] % 2 else slice(middle - 1, middle + 1)
    result = np.mean(part[tuple(indexer)], axis=along)
    if nan_possible and size > 0:
        last = part.take(-1, axis=along)
        has_nan = np.isnan(last)
        if has_nan.any():
            if isinstance(result, np.generic):
                result = last
            else:
                np.copyto(result, last, where=has_nan)
    if keepdims:
        result = np.asarray(result).reshape((1,) * ndim) if axis is None else np.expand_dims(result, along)
    return result  # type: ignore[no-any-return]


def percentile(a: np.ndarray, q: float, axis: int = -1) -> np.ndarray:
    """`np.percentile(a, q, axis=axis)` for one percentile (0-100), numpy's default 'linear' method."""
    a = np.asarray(a)
    if not 0 <= q <= 100:
        raise ValueError("Percentiles must be in the range [0, 100]")
    weak_q = type(q) in (int, float)  # numpy: a Python number does not widen the result's type
    quantile = np.asarray(np.true_divide(q, 100))
    arr = np.moveaxis(a, axis, 0)
    count = arr.shape[0]
    virtual = np.asarray((count - 1) * quantile)
    previous = np.array(np.floor(virtual))
    following = np.array(previous + 1)
    if virtual >= count - 1:  # numpy's bounds: the last value (q >= 0, so never below the first)
        previous[...], following[...] = -1, -1
    lo, hi = int(previous), int(following)
    part = np.partition(arr, sorted({0, count - 1, lo % count, hi % count}), axis=0)
    gamma_array = np.asarray(virtual - previous.astype(np.intp), dtype=virtual.dtype)
    gamma: float | np.ndarray = float(gamma_array) if weak_q else gamma_array
    low, high = part[lo], part[hi]
    difference = high - low
    result = np.asarray(np.add(low, difference * gamma))  # an array even for one value: written below
    np.subtract(
        high, difference * (1 - gamma), out=result, where=gamma >= 0.5, casting="unsafe", dtype=type(result.dtype)
    )
    if result.ndim == 0:
        result = result[()]
    if _can_hold_nan(part):
        has_nan = np.isnan(part[-1, ...])
        if np.any(has_nan):
            if np.ndim(result) == 0:
                result = part[-1]
            else:
                np.copyto(result, part[-1, ...], where=has_nan)
    return result


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """`np.unique(a)`: the distinct values of `a`, flattened, in ascending order."""
    ordered = np.sort(np.asarray(a), axis=None)
    if ordered.size == 0:
        return ordered
    first = np.empty(ordered.shape, dtype=bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    if ordered.dtype.kind in "cfmM" and np.isnan(ordered[-1]):  # numpy: the NaNs count as one value
        first_nan = int(np.searchsorted(ordered, ordered[-1], side="left"))
        first[first_nan] = True
        first[first_nan + 1 :] = False
    return ordered[first]
