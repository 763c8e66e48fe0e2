"""The residual stream's |x| per layer as a histogram: its median, over any number of tokens.

A float32 |x| falls in the bin of its top 16 bits: the bfloat16 value it truncates to.
Bins are 2^-7 apart in relative terms (about 0.8%) over the whole float range, and each
bfloat16 value has a bin of its own, so for a bfloat16 model the histogram holds the exact
values and its median is exact; for float32 and float16 models the median is the middle
of its bin, within 0.4% of the exact one. Stages count bins on the device (actors.writer);
analysis adds the counts of every micro-batch and reads the median off them.
"""

from __future__ import annotations

import numpy as np

SHIFT = 16
BINS = 1 << (32 - SHIFT - 1)  # the sign bit of |x| is 0


def lower_edge(bins: np.ndarray) -> np.ndarray:
    """The least |x| of each bin (a bfloat16 value), as float64."""
    return (np.asarray(bins, dtype=np.uint32) << SHIFT).view(np.float32).astype(np.float64)


def median(bins: np.ndarray, counts: np.ndarray, exact_bins: bool) -> float:
    """The median |x| of the values counted; `exact_bins`: the values are the bins' own (bfloat16)."""
    order = np.argsort(bins)
    bins, counts = np.asarray(bins)[order], np.asarray(counts)[order]
    total = int(counts.sum())
    if total == 0:
        return float("nan")
    cumulative = np.cumsum(counts)
    middle = [np.searchsorted(cumulative, (total + 1) // 2), np.searchsorted(cumulative, total // 2 + 1)]
    low = lower_edge(bins[middle])
    values = low if exact_bins else (low + lower_edge(bins[middle] + 1)) / 2
    return float(values.mean())
