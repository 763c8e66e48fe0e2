"""The one rule for comparing stored float values with a threshold given as a Python float."""

from __future__ import annotations

import numpy as np


def float32_bar(threshold: float) -> np.float32:
    """The least float32 >= threshold: a stored float32 x has x >= bar exactly when x >= threshold.

    NOTE: numpy and torch compare float32 values with a Python float in float32, which would
    round a threshold such as 5.99 down and admit values below it. The exceedance writer
    (floor) and the scanner (threshold) both compare through this.
    """
    return least_at_least(threshold, np.float32)


def least_at_least(threshold: float, dtype) -> np.floating:
    """The least value of the float `dtype` that is >= threshold (inf when no finite one is)."""
    kind = np.dtype(dtype).type
    with np.errstate(over="ignore"):
        bar = kind(threshold)
        return bar if float(bar) >= threshold else np.nextafter(bar, kind(np.inf))


def exceeding(act: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of `act` # [rows, hidden]: the max |x| per dim (float32), and the (rows, dims) where
    |x| >= threshold, row-major, exactly as in float32 arithmetic (NaN is never >=; it is the
    max of a dim that holds one).

    Works on IEEE bit patterns: clearing the sign bit gives |x|, and non-negative floats
    order as their bits do, so the passes over the data are integer ones (numpy has no
    float16 arithmetic, and widening to float32 first cost more than the rest). Only the dims
    whose max reaches the threshold are searched for rows.
    """
    if not len(act):
        return np.zeros(act.shape[1], np.float32), np.zeros(0, np.intp), np.zeros(0, np.intp)
    if act.dtype.kind != "f" or act.dtype.itemsize not in (2, 4, 8):
        act = act.astype(np.float32)
    uint = np.dtype(f"u{act.dtype.itemsize}").type
    sign = uint(1 << (8 * act.dtype.itemsize - 1))
    magnitude = act.view(uint) & ~sign  # [rows, hidden]: the bits of |x|
    peak = magnitude.max(axis=0)  # [hidden]; a NaN's bits exceed inf's
    bar = least_at_least(threshold, act.dtype).view(uint)
    inf = np.array(np.inf, act.dtype).view(uint)
    dims = np.flatnonzero(peak >= bar)
    part = magnitude[:, dims]  # [rows, dims that reach the bar]
    rows, columns = np.nonzero((part >= bar) & (part <= inf))
    return peak.view(act.dtype).astype(np.float32), rows, dims[columns]
