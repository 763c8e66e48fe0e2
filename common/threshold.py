"""The one rule for comparing stored float32 values with a threshold given as a Python float."""

from __future__ import annotations

import numpy as np


def float32_bar(threshold: float) -> np.float32:
    """The least float32 >= threshold: a stored float32 x has x >= bar exactly when x >= threshold.

    NOTE: numpy and torch compare float32 values with a Python float in float32, which would
    round a threshold such as 5.99 down and admit values below it. The exceedance writer
    (floor) and the scanner (threshold) both compare through this.
    """
    bar = np.float32(threshold)
    return bar if float(bar) >= threshold else np.nextafter(bar, np.float32(np.inf))
