"""Find LLM.int8() outlier features in a finished extraction run.

    summary = analyse("runs/olmoe-wiki")          # or s3://bucket/runs/olmoe-wiki

reads the run's captured layer-norm outputs (`analysis/scan.py`), forms per-dim
statistics and applies the criteria (`analysis/criteria.py`), and writes
summary.json, outlier_features.parquet and report.md (`analysis/report.py`).
With Ray initialised, the (layer, site) partitions are scanned by Ray actors.
"""

from __future__ import annotations

import sys
import time

from analysis.criteria import Criteria, feature_stats, outlier_features
from analysis.html import write_visual_report
from analysis.profile import median_abs
from analysis.report import build_summary, feature_table, write_outputs
from analysis.scan import (
    Partial,
    RunError,
    Scanner,
    check_complete,
    list_partitions,
    read_run,
    seq_len,
)

__all__ = ["Criteria", "RunError", "Scanner", "analyse", "feature_table", "run_criteria"]


def run_criteria(info: dict) -> Criteria:
    """The criteria recorded in the run's config (`config.analysis`), defaults elsewhere."""
    return Criteria.from_dict((info.get("config") or {}).get("analysis"))


def analyse(
    run_dir: str,
    criteria: Criteria | None = None,
    num_actors: int = 2,
    allow_partial: bool = False,
) -> dict:
    """Analyse the run at `run_dir`, write its outputs, and return the summary dict.

    `criteria` defaults to the run config's analysis section. `num_actors` is used only
    when Ray is initialised; `allow_partial` skips unreadable files and missing
    partitions with a warning instead of failing.
    """
    start = time.perf_counter()
    if num_actors < 1:
        raise ValueError(f"analysis.num_actors={num_actors}: choose at least 1")
    run_dir = str(run_dir)
    info = read_run(run_dir)
    criteria = run_criteria(info) if criteria is None else criteria
    partitions = list_partitions(run_dir, info)
    check_complete(partitions, info["num_layers"], allow_partial)

    partial = _scan(run_dir, criteria.threshold, partitions, num_actors, allow_partial)
    scanned = time.perf_counter()
    length = seq_len(info) or int(partial.exceedances["pos"].max() or 0) + 1
    per_dim = feature_stats(
        partial.exceedances, partial.stats, info["num_layers"], info["tokens"], length
    )
    features = outlier_features(per_dim, criteria)
    done = time.perf_counter()

    summary = build_summary(
        info,
        criteria,
        features,
        seq_len=length,
        partitions=len(partitions),
        skipped_files=partial.skipped,
        seconds={
            "scan": round(scanned - start, 3),
            "criteria": round(done - scanned, 3),
            "total": round(done - start, 3),
        },
    )
    write_outputs(run_dir, summary, features)
    # Plots, layer profile and report.html (analysis/html.py); report.md gains plot links.
    medians = median_abs(run_dir, info, partitions)
    write_visual_report(run_dir, summary, per_dim, partial.stats, medians)
    return summary


def _scan(
    run_dir: str, threshold: float, partitions: list, num_actors: int, allow_partial: bool
) -> Partial:
    """Scan in-process, or across Ray actors when Ray is initialised."""
    # NOTE: Ray cannot be initialised unless imported, so the CLI never pays for importing it.
    ray = sys.modules.get("ray")
    local = Scanner(run_dir, threshold, allow_partial)  # checks settings before actors start
    if ray is None or not ray.is_initialized():
        return local.scan(partitions)
    # NOTE: each actor reserves one CPU; more actors than cluster CPUs would never start.
    count = max(1, min(num_actors, len(partitions), int(ray.cluster_resources().get("CPU", 1))))
    remote = ray.remote(num_cpus=1)(Scanner)
    actors = [
        remote.options(name=f"scan-{i}").remote(run_dir, threshold, allow_partial)
        for i in range(count)
    ]
    try:
        if local.info["storage_mode"] == "dense":
            # Round-robin: each actor gets every count-th partition, so depths and sites mix.
            jobs = [actor.scan.remote(partitions[i::count]) for i, actor in enumerate(actors)]
        else:  # each stored file holds many partitions: actors share the files instead
            jobs = [actor.scan.remote(partitions, (i, count)) for i, actor in enumerate(actors)]
        return Partial.merge(ray.get(jobs))
    except ray.exceptions.RayTaskError as err:
        # Callers catch RunError/ValueError; surface the actor's own error, not Ray's wrapper.
        raise (err.cause or err) from None
    finally:
        for actor in actors:
            ray.kill(actor)
