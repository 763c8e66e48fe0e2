"""`compute` and `analyse`: a run's tables scanned, the criteria applied, the outputs written
(the package's docstring tells the steps)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import polars as pl

from analysis.criteria import feature_stats, outlier_features
from analysis.html import write_visual_report
from analysis.profile import median_abs
from analysis.report import build_summary, write_outputs
from analysis.pool import ScanPool, repays_actors
from analysis.scan import Partial, Scanner, check_complete, list_partitions
from analysis.settings import AnalysisConfig, Criteria, run_settings
from analysis.view import moe_view
from common.config import positive
from common.layout import RESIDUAL, SITES, RunLayout
from common.record import RunRecord, read_record
from common.runtime import ray_running


@dataclass
class Analysis:
    """What `compute` finds, nothing written: the summary's content and the frames it is made of."""

    layout: RunLayout
    record: RunRecord
    criteria: Criteria
    summary: dict
    per_dim: pl.DataFrame       # one row per dim: every criterion's inputs
    features: pl.DataFrame      # the dims that pass the criteria
    view: dict                  # the MoE view's parts (analysis.view)
    partial: Partial            # the scan's merged statistics
    partitions: list            # the (layer, site) partitions scanned


def compute(run_dir: str, criteria: Criteria | None = None, num_actors: int | None = None,
            allow_partial: bool = False, settings: AnalysisConfig | None = None,
            pool: ScanPool | None = None) -> Analysis:
    """Analyse the run at `run_dir` without writing anything.

    `settings` (the MoE view's rules, the scan actors' number) and `criteria` default to the
    run config's analysis section. The scan runs on `pool`'s actors (closed after), or, with Ray
    initialised and tables of at least `scan_actors_from_mb`, on `num_actors` new ones
    (`settings.num_actors` unless given); else in this process.
    `allow_partial` skips unreadable files and missing partitions with a warning instead of
    failing.
    """
    start = time.perf_counter()
    layout = RunLayout.of(str(run_dir))
    record = read_record(layout)
    settings = run_settings(record) if settings is None else settings
    num_actors = settings.num_actors if num_actors is None else num_actors
    positive("analysis.num_actors", num_actors)
    criteria = settings.criteria() if criteria is None else criteria
    found = list_partitions(layout, record)
    partitions = [p for p in found if p[1] in SITES]
    check_complete(partitions, record.num_layers, allow_partial)

    if pool is None and ray_running() and repays_actors(layout.table_bytes(), settings.scan_actors_from_mb):
        pool = ScanPool(num_actors)
    try:
        partial = _scan(layout, record, criteria.threshold, partitions, pool, allow_partial)
    finally:
        if pool is not None:
            pool.close()
    scanned = time.perf_counter()
    length = record.seq_len or record.section("data").get("seq_len") or int(partial.exceedances["pos"].max() or 0) + 1
    per_dim = feature_stats(partial.exceedances, partial.stats, record.num_layers, record.tokens, length)
    features = outlier_features(per_dim, criteria)
    view = moe_view(layout, record, settings, criteria, partial, features,
                    [p for p in found if p[1] == RESIDUAL])
    done = time.perf_counter()
    summary = build_summary(
        record, criteria, features, view, seq_len=length, partitions=len(partitions), skipped_files=partial.skipped,
        seconds={"scan": round(scanned - start, 3), "criteria": round(done - scanned, 3),
                 "total": round(done - start, 3)},
    )
    return Analysis(layout, record, criteria, summary, per_dim, features, view, partial, partitions)


def analyse(run_dir: str, criteria: Criteria | None = None, num_actors: int | None = None,
            allow_partial: bool = False, settings: AnalysisConfig | None = None,
            pool: ScanPool | None = None, on_summary: Callable[[dict], None] | None = None,
            visual: bool = True) -> dict:
    """`compute`, then write its outputs: the summary, the feature table and report.md, then (with
    `visual`) the plots and report.html. `on_summary` is called once summary.json is written,
    before the plots. Returns the summary dict."""
    result = compute(run_dir, criteria, num_actors, allow_partial, settings, pool)
    write_outputs(result.layout, result.summary, result.features)
    if on_summary:
        on_summary(result.summary)
    if visual:
        write_report(result)
    return result.summary


def write_report(result: Analysis) -> None:
    """The plots, the layer profile, report.html and report.md of an analysis (analysis.html)."""
    medians = median_abs(result.layout, result.record, result.partitions)
    write_visual_report(result.layout, result.summary, result.per_dim, result.partial.stats, medians,
                        result.view.get("experts"))



def _scan(layout: RunLayout, record: RunRecord, threshold: float, partitions: list, pool: ScanPool | None,
          allow_partial: bool) -> Partial:
    """Scan in-process, or on the pool's actors."""
    local = Scanner(layout, record, threshold, allow_partial)  # checks settings before actors run
    if pool is None:
        return local.scan(partitions)
    return pool.scan(layout, record, threshold, allow_partial, partitions)
