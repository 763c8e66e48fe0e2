"""Which experts write the outliers, and whether routing follows them.

From a run's expert and routing tables (actors.moe):

- super experts (Su et al. 2025, "Unveiling Super Experts in Mixture-of-Experts Large
  Language Models", arXiv 2507.23279): expert e of layer l is one when its largest
  |down_proj output| a(l, e) exceeds the P99.5 of all a(l, e) of routed experts, exceeds a
  tenth of the largest a, and l lies in the first three quarters of the layers (the
  authors' code: l < 0.75 L). All three numbers are settings;
- attribution: for a hidden dim, the (layer, expert) pairs whose outputs reach the
  threshold there, ranked by how many outputs reach the storage floor;
- routing lift: for the tokens where a dim exceeds at `ln_mlp` of a layer (the input
  the router reads), how much more often than its base rate in that layer each expert
  is chosen.
"""

from __future__ import annotations

import numpy as np
import polars as pl

SHARED = -1


def expert_maxima(experts: pl.DataFrame) -> pl.DataFrame:
    """Per (layer, expert) over the run: tokens, max_abs and where (dim, seq, pos) it was."""
    return (
        experts.sort("max_abs", descending=True)
        .group_by("layer", "expert", maintain_order=True)
        .agg(pl.col("tokens").sum(), pl.col("max_abs", "dim", "seq", "pos").first())
        .sort("layer", "expert")
    )


def super_experts(maxima: pl.DataFrame, num_layers: int, percentile: float = 99.5,
                  fraction: float = 0.1, layer_share: float = 0.75) -> list[dict]:
    """The super experts of `maxima` (routed experts only), by the rule above."""
    routed = maxima.filter(pl.col("expert") != SHARED)
    if routed.is_empty():
        return []
    values = routed["max_abs"].to_numpy().astype(np.float64)
    bar = max(float(np.percentile(values, percentile)), float(values.max()) * fraction)
    chosen = routed.filter((pl.col("max_abs").cast(pl.Float64) > bar) & (pl.col("layer") < layer_share * num_layers))
    return chosen.select("layer", "expert", "max_abs", "dim", "seq", "pos", "tokens").sort(
        "max_abs", descending=True).to_dicts()


def attribution(expert_dims: pl.DataFrame, dims: list[int], threshold: float, top: int = 5) -> dict[int, list]:
    """{dim: [{layer, expert, count, max_abs}]}: pairs whose outputs reach `threshold` at the dim,
    most outputs >= floor first."""
    found = (
        expert_dims.filter(pl.col("dim").is_in(dims))
        .group_by("dim", "layer", "expert").agg(pl.col("count").sum(), pl.col("max_abs").max())
        .filter(pl.col("max_abs") >= threshold)
        .sort(["dim", "count", "max_abs"], descending=[False, True, True])
    )
    out = {dim: [] for dim in dims}
    for row in found.iter_rows(named=True):
        if len(out[row["dim"]]) < top:
            out[row["dim"]].append({k: row[k] for k in ("layer", "expert", "count", "max_abs")})
    return out


def routing_lift(routing: pl.DataFrame, exceedances: pl.DataFrame, dims: list[int], top: int = 5) -> dict[int, list]:
    """{dim: [{layer, expert, lift, hits, chosen}]}: for tokens where the dim exceeds at `ln_mlp`
    of a layer, how often each expert is chosen (hits, of `chosen` times in the layer) against
    its base rate there; highest lift first."""
    base = routing.group_by("layer", "expert").agg(chosen=pl.len())
    tokens = routing.group_by("layer").agg(pl.struct("seq", "pos").n_unique().alias("tokens"))
    hot = exceedances.filter(pl.col("site") == "ln_mlp", pl.col("dim").is_in(dims)).select(
        "dim", "layer", "seq", "pos").unique()
    hot_tokens = hot.group_by("dim", "layer").agg(hot=pl.len())
    hits = hot.join(routing.select("layer", "seq", "pos", "expert"), on=["layer", "seq", "pos"]).group_by(
        "dim", "layer", "expert").agg(hits=pl.len())
    lifted = (
        hits.join(hot_tokens, on=["dim", "layer"]).join(base, on=["layer", "expert"]).join(tokens, on="layer")
        .with_columns(lift=(pl.col("hits") / pl.col("hot")) / (pl.col("chosen") / pl.col("tokens")))
        .sort(["dim", "lift", "hits"], descending=[False, True, True])
    )
    out = {dim: [] for dim in dims}
    for row in lifted.iter_rows(named=True):
        if len(out[row["dim"]]) < top:
            out[row["dim"]].append({"layer": row["layer"], "expert": row["expert"], "lift": round(row["lift"], 3),
                                    "hits": row["hits"], "of": row["hot"], "chosen": row["chosen"]})
    return out
