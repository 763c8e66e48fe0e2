"""The MoE view of an analysed run: super experts, massive activations, and for each outlier
feature the experts that write it, where routing sends it, and how sure we are of it.

Each part reads only what its capture wrote (actors.capture), and is absent from the
summary when the run did not capture it: `super_experts` and per-feature `experts` need
`capture.experts`, `routing_lift` needs `capture.routing`, `massive_activations` needs
`capture.residual`. Confidence intervals need nothing more than the site tables.
"""

from __future__ import annotations

import polars as pl

from analysis import bootstrap, experts, massive
from analysis.criteria import Criteria
from analysis.scan import Partial, Scanner, read_kind
from common import files
from common.layout import RESIDUAL, RunLayout
from common.storage import EXPERTS, EXPERT_DIMS, HISTOGRAMS, ROUTING
from common.record import RunRecord


def sequences(layout: RunLayout, record: RunRecord, seen: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """(seq, tokens) of every sequence of the run, and the run's tokens (seq, pos, token_id).

    Runs written before the tokens table existed have sequences of equal share (packed runs
    do), as many as recorded, or as `seen` (entries with a seq column) shows.
    """
    if files.exists(layout.fs, layout.tokens):
        with layout.fs.open_input_file(layout.tokens) as handle:
            tokens = pl.read_parquet(handle)
        return tokens.group_by("seq").agg(tokens=pl.len()).sort("seq"), tokens
    count = record.num_sequences or record.section("data").get("num_sequences") \
        or (int(seen["seq"].max()) + 1 if seen.height else 1)
    return pl.DataFrame({"seq": range(count), "tokens": [record.tokens / count] * count}), None


def moe_view(layout: RunLayout, record: RunRecord, settings, criteria: Criteria, partial: Partial,
             features: pl.DataFrame, residual: list[tuple[int, str]]) -> dict:
    """The view's parts, as summary entries; per-feature parts keyed by dim under `per_feature`."""
    dims = features["dim"].to_list()
    per_sequence, tokens = sequences(layout, record, partial.exceedances)
    view: dict = {"per_feature": {dim: {} for dim in dims}}
    intervals = bootstrap.bootstrap(partial.exceedances, per_sequence, record.num_layers, criteria, dims,
                                    settings.bootstrap_resamples, settings.bootstrap_seed, settings.confidence)
    for dim, values in intervals.items():
        view["per_feature"][dim].update(values)
    if (table := read_kind(layout, EXPERTS)) is not None:
        maxima = experts.expert_maxima(table)
        view["experts"] = maxima
        view["super_experts"] = experts.super_experts(
            maxima, record.num_layers, settings.super_expert_percentile, settings.super_expert_fraction,
            settings.super_expert_layers)
        found = experts.attribution(read_kind(layout, EXPERT_DIMS), dims, criteria.threshold)
        for dim in dims:
            view["per_feature"][dim]["experts"] = found[dim]
    if (routing := read_kind(layout, ROUTING)) is not None:
        for dim, lift in experts.routing_lift(routing, partial.exceedances, dims).items():
            view["per_feature"][dim]["routing_lift"] = lift
    if residual and (histograms := read_kind(layout, HISTOGRAMS)) is not None:
        medians = massive.layer_medians(histograms, exact_bins=record.dtype == "bfloat16")
        entries = Scanner(layout, record, settings.massive_threshold).scan(residual).exceedances
        view["residual_medians"] = massive.profile_medians(medians, record.num_layers)
        view["massive_activations"] = massive.massive_activations(
            entries.filter(pl.col("site") == RESIDUAL), medians, tokens, settings.massive_threshold,
            settings.massive_ratio)
    return view
