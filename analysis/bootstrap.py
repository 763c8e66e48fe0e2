"""How sure we are: bootstrap confidence intervals of each feature over sequences.

Sequences are resampled whole, with replacement (seeded; 1000 resamples by default): a
resample is a count per sequence, `weights` # [resamples, sequences]. A dim's share of
layers in a resample is the share of layers (or layer-sites) with an exceedance in any
drawn sequence; its share of tokens is the drawn exceeding tokens over the drawn tokens;
both are matrix products over the sequences where the dim exceeds, so 10,000 sequences
take seconds. `stability` is the share of resamples in which the dim passes every
criterion.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from analysis.criteria import SITES_PER_LAYER, Criteria
from common.layout import SITES


def resample_weights(num_sequences: int, resamples: int, seed: int) -> np.ndarray:
    """How often each sequence is drawn in each resample # [resamples, sequences]."""
    draws = np.random.default_rng(seed).integers(0, num_sequences, size=(resamples, num_sequences))
    flat = (np.arange(resamples)[:, None] * num_sequences + draws).ravel()
    return np.bincount(flat, minlength=resamples * num_sequences).reshape(resamples, num_sequences)


def bootstrap(exceedances: pl.DataFrame, sequences: pl.DataFrame, num_layers: int, criteria: Criteria,
              dims: list[int], resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[int, dict]:
    """{dim: {layer_fraction_ci, token_fraction_ci, stability}} for `dims`.

    `exceedances` holds the entries >= the criteria's threshold at the criteria's sites;
    `sequences` one row per sequence of the run: seq, tokens (its real tokens).
    """
    seqs = sequences["seq"].to_numpy()
    where = {int(s): i for i, s in enumerate(seqs)}
    weights = resample_weights(len(seqs), resamples, seed).astype(np.float64)
    drawn_tokens = weights @ sequences["tokens"].to_numpy().astype(np.float64)  # [resamples]
    by_site = criteria.layer_unit == "site"
    units = num_layers * (SITES_PER_LAYER if by_site else 1)
    site = pl.col("site").replace_strict({name: i for i, name in enumerate(SITES)}, return_dtype=pl.Int64)
    unit = pl.col("layer").cast(pl.Int64) * SITES_PER_LAYER + site if by_site else pl.col("layer").cast(pl.Int64)
    entries = exceedances.filter(pl.col("dim").is_in(dims)).with_columns(unit=unit)
    tails = ((1 - confidence) / 2, 1 - (1 - confidence) / 2)
    out = {}
    for dim in dims:
        part = entries.filter(pl.col("dim") == dim)
        rows = np.array([where[int(s)] for s in part["seq"].unique().sort().to_list()], dtype=np.int64)
        layer_share, token_share = _shares(part, rows, seqs, weights, units)
        token_share = token_share / drawn_tokens
        passes = (layer_share >= criteria.min_layer_fraction) & (token_share >= criteria.min_token_fraction) \
            & (token_share > 0)
        out[dim] = {
            "layer_fraction_ci": [float(v) for v in np.quantile(layer_share, tails)],
            "token_fraction_ci": [float(v) for v in np.quantile(token_share, tails)],
            "stability": float(passes.mean()),
        }
    return out


def _shares(part: pl.DataFrame, rows: np.ndarray, seqs: np.ndarray, weights: np.ndarray, units: int):
    """(share of units hit # [resamples], tokens hit # [resamples]) of one dim's entries."""
    if len(rows) == 0:
        return np.zeros(len(weights)), np.zeros(len(weights))
    local = {int(seqs[r]): i for i, r in enumerate(rows)}
    hits = np.zeros((len(rows), units))  # [dim's sequences, units]
    pairs = part.select("seq", "unit").unique()
    hits[[local[int(s)] for s in pairs["seq"]], pairs["unit"].to_numpy()] = 1
    tokens = part.group_by("seq").agg(pl.struct("pos").n_unique().alias("n"))
    exceeding = np.zeros(len(rows))
    exceeding[[local[int(s)] for s in tokens["seq"]]] = tokens["n"].to_numpy()
    drawn = weights[:, rows]  # [resamples, dim's sequences]
    return ((drawn @ hits) > 0).sum(axis=1) / units, drawn @ exceeding
