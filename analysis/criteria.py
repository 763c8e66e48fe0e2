"""Which hidden dims are outlier features: per-dim statistics and the LLM.int8() criteria.

Everything here is a pure function of two tables a scan produces (see analysis.scan):

- exceedances: one row per (layer, site, seq, pos, dim) entry with |value| >= threshold;
- stats: one row per (layer, site, dim) with `max_abs` over every captured entry.

An outlier feature (Dettmers et al. 2022, "LLM.int8()") is a hidden dim whose magnitude
reaches the threshold in at least a quarter of the layers and at least 6% of the tokens.
"""

from __future__ import annotations

import polars as pl

from analysis.settings import Criteria

SITES_PER_LAYER = 2  # ln_attn and ln_mlp: the denominator of site_fraction is 2L


def feature_stats(
    exceedances: pl.DataFrame | pl.LazyFrame,
    stats: pl.DataFrame | pl.LazyFrame,
    num_layers: int,
    tokens: int,
    seq_len: int,
) -> pl.DataFrame:
    """One row per hidden dim: how large it gets, and where and how often it exceeds.

    `exceedances` must hold exactly the entries with |value| >= threshold; the
    fractions below are for that threshold. Columns:
      dim, max_abs, layers (sorted list), layer_fraction (= len(layers) / num_layers),
      site_fraction (distinct (layer, site) / 2L), token_fraction (distinct (seq, pos)
      / tokens), position_fraction (distinct pos over all seqs / seq_len), occurrences.
    """
    for name, value in (("num_layers", num_layers), ("tokens", tokens), ("seq_len", seq_len)):
        if value <= 0:
            raise ValueError(f"{name}={value}: must be > 0 to form fractions; check the run record.")
    where = (
        exceedances.lazy()
        .group_by("dim")
        .agg(
            layers=pl.col("layer").unique().sort(),
            sites=pl.struct("layer", "site").n_unique(),
            token_hits=_token_key().n_unique(),
            positions=pl.col("pos").n_unique(),
            occurrences=pl.len(),
            exceeding_max=pl.col("value").abs().max(),
        )
    )
    magnitude = stats.lazy().group_by("dim").agg(pl.col("max_abs").max())
    return (
        magnitude.join(where, on="dim", how="full", coalesce=True)
        .select(
            pl.col("dim").cast(pl.Int32),
            # NOTE: stats cover every entry; the exceedance max only matters if stats lack a dim.
            pl.max_horizontal("max_abs", "exceeding_max").cast(pl.Float64).alias("max_abs"),
            pl.col("layers").fill_null(pl.lit([], dtype=pl.List(pl.Int32))).cast(pl.List(pl.Int32)),
            _share(pl.col("layers").list.len(), num_layers).alias("layer_fraction"),
            _share(pl.col("sites"), SITES_PER_LAYER * num_layers).alias("site_fraction"),
            _share(pl.col("token_hits"), tokens).alias("token_fraction"),
            _share(pl.col("positions"), seq_len).alias("position_fraction"),
            pl.col("occurrences").fill_null(0).cast(pl.Int64),
        )
        .sort("dim")
        .collect()
    )


def _token_key() -> pl.Expr:
    """(seq, pos) as one int64, a distinct key per token: positions are in [0, 2^31) (int32,
    never negative), so seq * 2^31 + pos is one-to-one while |seq| < 2^32. Counting distinct
    int64s takes half the time of distinct structs."""
    return pl.col("seq").cast(pl.Int64) * (1 << 31) + pl.col("pos").cast(pl.Int64)


def _share(count: pl.Expr, total: int) -> pl.Expr:
    """count / total, exactly rounded, so 3 of 50 tokens meets a 0.06 bar."""
    # NOTE: Polars divides by a scalar as a multiply by its reciprocal, up to 1 ulp off
    # (polars#23741: 3 / 10 gives 0.30000000000000004); dividing by a column is exact.
    return count.fill_null(0) / (pl.int_range(pl.len(), dtype=pl.Int64) * 0 + total)


def outlier_features(per_dim: pl.DataFrame, criteria: Criteria) -> pl.DataFrame:
    """The dims of `per_dim` that meet the criteria, with a `classification` column."""
    share = pl.col(criteria.layer_column)
    systematic = (share >= criteria.systematic_layer_fraction) & (
        pl.col("token_fraction") >= criteria.systematic_token_fraction
    )
    return (
        per_dim.lazy()
        .filter(
            (pl.col("max_abs") >= criteria.threshold)
            & (share >= criteria.min_layer_fraction)
            & (pl.col("token_fraction") >= criteria.min_token_fraction)
        )
        .with_columns(
            classification=pl.when(systematic)
            .then(pl.lit("systematic"))
            .otherwise(pl.lit("probabilistic"))
        )
        .sort("dim")
        .collect()
    )
