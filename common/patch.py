"""The patch of a dense float16 table: the exact values of the few entries float16 rounds.

A bfloat16 layer-site is stored as float16 when float16 holds every value but a few tiny
ones: below 2^-14 float16 is subnormal and keeps fewer bits than bfloat16, and real
activations hold some values it rounds in nearly every file (12-20 in a normal(0, 1) site of
2048 x 2048), which would otherwise make every file float32, twice the bytes. Those entries'
exact values go into the table's schema metadata under `patch`: base64 of their flat indices
into [rows * hidden] (int64, little-endian) followed by their values (float32, little-endian).

Applied (`apply`: the analysis and the tests read through it), the values equal the model's bit
for bit. Ignored, as a plain Arrow reader does, a patched entry is off by at most 2^-25: the
half-step of float16 below 2^-14.
"""

from __future__ import annotations

import base64

import numpy as np

KEY = b"patch"
TINY = 2.0 ** -14  # float16's least normal value: only entries below it are patched
SHARE = 1 / 1024  # the most entries of a file a patch may hold; more and the file is float32


def patchable(values: np.ndarray, size: int) -> bool:
    """Whether the exact `values` float16 rounds (of a file of `size` entries) fit a patch:
    few enough, and all tiny (NaN, infinities and overflows are not)."""
    return len(values) <= size * SHARE and bool(np.all(np.abs(values) < TINY))


def pack(indices: np.ndarray, values: np.ndarray) -> bytes:
    """The metadata value for entries `indices` (flat) holding `values`."""
    raw = np.asarray(indices, "<i8").tobytes() + np.asarray(values, "<f4").tobytes()
    return base64.b64encode(raw)


def unpack(text: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices int64, values float32) of a packed patch."""
    raw = base64.b64decode(text)
    count = len(raw) // 12
    if count * 12 != len(raw):
        raise ValueError(f"a patch of {len(raw)} bytes is not a whole number of entries")
    return np.frombuffer(raw, "<i8", count).astype(np.int64), np.frombuffer(raw, "<f4", count, count * 8).astype(np.float32)


def apply(act: np.ndarray, metadata: dict | None) -> np.ndarray:
    """`act` # [rows, hidden] with the table's patch applied: a float32 copy, or `act` itself
    when the table has no patch."""
    if not metadata or KEY not in metadata:
        return act
    indices, values = unpack(metadata[KEY])
    if len(indices) and (indices.min() < 0 or indices.max() >= act.size):
        raise ValueError(f"a patch entry lies outside the table's {act.size} values")
    exact = act.astype(np.float32)
    exact.reshape(-1)[indices] = values
    return exact
