"""Massive activations in the residual stream (Sun et al. 2024, "Massive activations in large
language models", arXiv 2402.17762).

A residual value (a decoder layer's output, site `resid`) is massive when |x| > 100 and
|x| >= 1000 x the median |x| of its layer's residual stream over the run; both numbers
are settings. The medians come from the per-layer histograms the stages count (exact for
bfloat16 models, within 0.4% otherwise: common.histogram). Massive values are grouped by
dim: from which layer to which they appear, at which positions and tokens.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from common import histogram


def layer_medians(histograms: pl.DataFrame, exact_bins: bool) -> dict[int, float]:
    """{layer: median |x| of its residual stream} from the run's histogram tables."""
    counted = histograms.group_by("layer", "bin").agg(pl.col("count").sum())
    return {layer: histogram.median(part["bin"].to_numpy(), part["count"].to_numpy(), exact_bins)
            for (layer,), part in counted.group_by("layer")}


def massive_activations(residual: pl.DataFrame, medians: dict[int, float], tokens: pl.DataFrame | None,
                        threshold: float = 100.0, ratio: float = 1000.0) -> list[dict]:
    """[{dim, first_layer, last_layer, positions, token_ids, count, max_abs, min_ratio_to_median, layers,
    layer_max}] (`layer_max`: the dim's largest |x| in each of `layers`)
    from residual entries (layer, seq, pos, dim, value) with |value| >= threshold."""
    if residual.is_empty() or not medians:
        return []
    median = pl.DataFrame({"layer": list(medians), "median": list(medians.values())},
                          schema={"layer": pl.Int32, "median": pl.Float64})
    found = (
        residual.with_columns(magnitude=pl.col("value").abs().cast(pl.Float64))
        .join(median, on="layer")
        .with_columns(ratio_to_median=pl.col("magnitude") / pl.col("median"))
        .filter((pl.col("magnitude") > threshold) & (pl.col("ratio_to_median") >= ratio))
    )
    if tokens is not None:
        found = found.join(tokens, on=["seq", "pos"], how="left")
    else:
        found = found.with_columns(token_id=pl.lit(None, pl.Int32))
    per_layer = found.group_by("dim", "layer").agg(pl.col("magnitude").max()).sort("dim", "layer").group_by(
        "dim", maintain_order=True).agg(layers=pl.col("layer"), layer_max=pl.col("magnitude"))
    grouped = found.group_by("dim").agg(
        first_layer=pl.col("layer").min(), last_layer=pl.col("layer").max(),
        positions=pl.col("pos").unique().sort(),
        token_ids=pl.col("token_id").drop_nulls().unique().sort(), count=pl.len(),
        max_abs=pl.col("magnitude").max(), min_ratio_to_median=pl.col("ratio_to_median").min(),
    )
    return grouped.join(per_layer, on="dim").sort("max_abs", descending=True).to_dicts()


def profile_medians(medians: dict[int, float], num_layers: int) -> list[float | None]:
    """The medians layer by layer (None where a layer has none), for plots."""
    return [None if np.isnan(v := medians.get(layer, float("nan"))) else v for layer in range(num_layers)]
