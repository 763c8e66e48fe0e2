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
    weights = resample_weights(len(seqs), resamples, seed).astype(np.float64)
    drawn_tokens = weights @ sequences["tokens"].to_numpy().astype(np.float64)  # [resamples]
    by_site = criteria.layer_unit == "site"
    units = num_layers * (SITES_PER_LAYER if by_site else 1)
    site = pl.col("site").replace_strict({name: i for i, name in enumerate(SITES)}, return_dtype=pl.Int64)
    unit = pl.col("layer").cast(pl.Int64) * SITES_PER_LAYER + site if by_site else pl.col("layer").cast(pl.Int64)
    entries = exceedances.lazy().filter(pl.col("dim").is_in(dims)).with_columns(unit=unit)
    # NOTE: one grouping for every dim, then numpy per dim: a Polars call per dim costs
    # milliseconds whatever its size. Both groupings in one call share the filter and run at once.
    pairs, tokens = pl.collect_all([
        entries.select("dim", "seq", "unit").unique(),  # a unit hit in a sequence
        entries.group_by("dim", "seq").agg(pl.col("pos").n_unique().alias("n")),  # tokens hit
    ])
    pair_dim, pair_row = pairs["dim"].to_numpy(), _rows(seqs, pairs["seq"].to_numpy())
    pair_unit = pairs["unit"].to_numpy()
    token_dim, token_row, token_n = tokens["dim"].to_numpy(), _rows(seqs, tokens["seq"].to_numpy()), tokens["n"].to_numpy()
    tails = ((1 - confidence) / 2, 1 - (1 - confidence) / 2)
    out = {}
    for dim in dims:
        hit, counted = pair_dim == dim, token_dim == dim
        layer_share, token_share = _shares(pair_row[hit], pair_unit[hit], token_row[counted], token_n[counted],
                                           weights, units)
        token_share = token_share / drawn_tokens
        passes = (layer_share >= criteria.min_layer_fraction) & (token_share >= criteria.min_token_fraction) \
            & (token_share > 0)
        out[dim] = {
            "layer_fraction_ci": [float(v) for v in np.quantile(layer_share, tails)],
            "token_fraction_ci": [float(v) for v in np.quantile(token_share, tails)],
            "stability": float(passes.mean()),
        }
    return out


def _rows(seqs: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The index in `seqs` of each of `wanted` (every one of which is there)."""
    order = np.argsort(seqs, kind="stable")
    at = order[np.searchsorted(seqs, wanted, sorter=order).clip(max=len(seqs) - 1)]
    if len(wanted) and not np.array_equal(seqs[at], wanted):
        raise ValueError("exceedances name sequences the run does not have")
    return at


def _shares(pair_rows: np.ndarray, pair_units: np.ndarray, token_rows: np.ndarray, token_counts: np.ndarray,
            weights: np.ndarray, units: int):
    """(share of units hit # [resamples], tokens hit # [resamples]) of one dim: the sequence rows
    and units of its (sequence, unit) hits, and the rows and counts of its exceeding tokens."""
    rows = np.unique(pair_rows)  # the dim's sequences
    if len(rows) == 0:
        return np.zeros(len(weights)), np.zeros(len(weights))
    hits = np.zeros((len(rows), units))  # [dim's sequences, units]
    hits[np.searchsorted(rows, pair_rows), pair_units] = 1
    exceeding = np.zeros(len(rows))
    exceeding[np.searchsorted(rows, token_rows)] = token_counts
    drawn = weights[:, rows]  # [resamples, dim's sequences]
    return ((drawn @ hits) > 0).sum(axis=1) / units, drawn @ exceeding
