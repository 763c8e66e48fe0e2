"""The numbers behind the report's plots: per-layer maxima, top dims and the massive-activation profile.

All of it comes from what the scan already produced (the per-(layer, site, dim) `stats`
and the per-dim table of `criteria.feature_stats`), except the median |x| of a layer,
which needs the activations themselves: `median_abs` reads a bounded sample of each
dense partition (its first file, at most `max_rows` tokens). Exceedance runs keep no
small values, so their profile has no median.

The massive-activation view follows Sun et al. 2024 ("Massive activations in LLMs"):
per layer, the largest magnitudes against the median magnitude. Here "top-k" are the
k largest per-dim maxima of the layer (both sites), so top-1 is the layer's max |x|
and top-2/3 come from other dims.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from analysis.scan import read_frame
from common import storage
from common.layout import RunLayout
from common.record import RunRecord

TOP_K = 3


def top_dims(per_dim: pl.DataFrame, outlier_dims: list[int], count: int = 16) -> list[int]:
    """The outlier dims, then the largest other dims by max |x|, `count` in all, sorted."""
    others = per_dim.filter(~pl.col("dim").is_in(outlier_dims)).sort("max_abs", descending=True)
    extra = max(0, count - len(outlier_dims))
    return sorted([*outlier_dims, *others["dim"].head(extra).to_list()])


def layer_maxima(stats: pl.DataFrame) -> pl.DataFrame:
    """max |x| per (layer, dim) over both sites: columns layer, dim, max_abs."""
    return stats.group_by("layer", "dim").agg(pl.col("max_abs").max()).sort("layer", "dim")


def layer_profile(stats: pl.DataFrame, medians: pl.DataFrame | None) -> pl.DataFrame:
    """Per layer: top1..top3 per-dim max |x|, the dim of top1, and median |x| (null if unknown)."""
    ranked = layer_maxima(stats).sort("max_abs", descending=True).group_by("layer", maintain_order=True)
    profile = ranked.agg(
        *[pl.col("max_abs").get(k).alias(f"top{k + 1}") for k in range(TOP_K)],
        pl.col("dim").first().alias("top1_dim"),
    )
    if medians is None:
        medians = pl.DataFrame(schema={"layer": pl.Int32, "median_abs": pl.Float64})
    return (
        profile.with_columns(pl.col("layer").cast(pl.Int32))
        .join(medians, on="layer", how="left")
        .sort("layer")
    )


def median_abs(layout: RunLayout, record: RunRecord, partitions: list[tuple[int, str]],
               max_rows: int = 4096) -> pl.DataFrame | None:
    """Median |x| per layer over a sample of its dense activations; None for exceedance runs."""
    if not storage.is_dense(record.storage_mode):
        return None
    samples: dict[int, list[np.ndarray]] = {}
    for layer, site in partitions:
        if (values := _sample(layout, layer, site, max_rows)) is not None:
            samples.setdefault(layer, []).append(values)
    layers = sorted(samples)
    return pl.DataFrame(
        {
            "layer": pl.Series(layers, dtype=pl.Int32),
            "median_abs": [float(np.median(np.abs(np.concatenate(samples[k])))) for k in layers],
        }
    )


def _sample(layout: RunLayout, layer: int, site: str, max_rows: int) -> np.ndarray | None:
    """Up to `max_rows` tokens of the partition's first file, flattened to float32 values."""
    paths = layout.partition_files(layer, site)
    if not paths:
        return None
    try:
        act = read_frame(layout.fs, paths[0], ["act"])["act"]
    except (Exception, pl.exceptions.PanicException):  # NOTE: a plot must not fail a run the scan could analyse
        return None
    # NOTE: a float16 file's patch (common.patch) is not applied: it moves values below 2^-14
    # by at most 2^-25, nothing a plotted median of |x| can show.
    return np.asarray(act.head(max_rows).to_numpy(), dtype=np.float32).reshape(-1)
