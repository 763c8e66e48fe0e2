"""(c) and (d): this project's runs through Ray, and the analysis against the Parquet read floor.

Each repeat is a whole `cluster.run.execute` into a fresh run directory; we keep its own
timings: cluster start and stage load apart from extraction. The bubble is the share of
the extraction wall time a stage spent not computing, averaged over stages.
"""

from __future__ import annotations

import io
import os
import shutil
import statistics
import time
from pathlib import Path

from actors.stage import profile
from bench.baselines import timed


def start_ray(num_cpus: int = 2) -> float:
    """A fresh local Ray cluster of `num_cpus` (never someone else's); returns seconds taken."""
    import ray

    # NOTE: Ray renices its workers to 15, so on a busy machine the stages would lose the CPU
    # to the plain forward (a) and (b) running in this process at 0; the rows compare alike.
    os.environ.setdefault("RAY_worker_niceness", "0")
    start = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    return time.perf_counter() - start


def tables(run_dir: Path) -> list[Path]:
    """The run's captured tables (activations, or exceedances and stats)."""
    from common.layout import RunLayout

    return [Path(path) for path, _ in RunLayout.of(str(run_dir)).batch_tables()]


def data_bytes(run_dir: Path) -> int:
    """Bytes of the run's captured tables."""
    return sum(path.stat().st_size for path in tables(run_dir))


def run_rows(workload, root: Path, num_stages: int, mode: str, repeats: int, capture: dict | None = None) -> dict:
    """Median figures of `repeats` runs of one (stages, mode, captures) configuration."""
    from cluster.config import load_config
    from cluster.run import execute

    runs = []
    for i in range(repeats):
        out = root / f"{mode}-{num_stages}-{'-'.join(capture or ['plain'])}-{i}"
        shutil.rmtree(out, ignore_errors=True)
        captures = {k: v for k, v in (capture or {}).items() if k != "replicas"}
        config = workload.config(str(out), num_stages, mode, captures, replicas=(capture or {}).get("replicas", 1))
        record = execute(load_config(config), quiet=True)["record"]
        timings, stats = record.timings, record.stage_stats
        busy = [s["busy_s"] for s in stats if "busy_s" in s]
        runs.append({
            "extract_s": timings["extract_s"], "load_s": timings["load_s"], "analysis_s": timings["analysis_s"],
            "cluster_start_s": timings["cluster_start_s"],
            "bubble": 1 - statistics.mean(busy) / timings["extract_s"] if busy else None,
            "bytes": data_bytes(out), "tokens": record.tokens, "run_dir": str(out),
            "profile": [profile(s) for s in stats if s.get("micro_batches")],
        })
    middle = sorted(runs, key=lambda r: r["extract_s"])[len(runs) // 2]  # the median run itself
    return {**middle, "extract_runs": [r["extract_s"] for r in runs],
            "bubble_runs": [r["bubble"] for r in runs]}


def default_job(root: Path) -> dict:
    """The README's default job (configs/tiny_moe.yaml), once: its own timings."""
    from cluster.config import load_config
    from cluster.run import execute

    config = load_config(str(Path(__file__).parent.parent / "configs" / "tiny_moe.yaml"),
                         [f"storage.output={root / 'default-job'}"])
    return dict(execute(config, quiet=True)["record"].timings)


def read_floor(run_dir: Path) -> float:
    """Seconds to read every captured Parquet file of a run into memory, nothing else."""
    import polars as pl

    paths = tables(run_dir)
    for path in paths:
        # NOTE: the bytes read first, not memory-mapped: a mapping would defer the reading to
        # whoever touches it.
        pl.read_ipc(io.BytesIO(path.read_bytes())) if path.suffix == ".arrow" else pl.read_parquet(path)
    return len(paths)


def analysis_rows(run_dir: str, repeats: int) -> dict:
    """Median analysis time (in-process) against the median time to only read its files.

    `analysis_s` is the scan and the criteria (the summary's own `seconds.total`); writing
    the report (tables, plots) is a fixed cost per run, reported apart as `report_s`.
    """
    from analysis import analyse

    read_s, read_runs = timed(lambda: read_floor(Path(run_dir)), repeats)
    walls, computes, summary = [], [], None
    for _ in range(repeats):
        start = time.perf_counter()
        summary = analyse(run_dir)
        walls.append(time.perf_counter() - start)
        computes.append(summary["seconds"]["total"])
    analysis_s, wall_s = statistics.median(computes), statistics.median(walls)
    return {"read_s": read_s, "analysis_s": analysis_s, "report_s": wall_s - analysis_s,
            "bytes": data_bytes(Path(run_dir)), "read_runs": read_runs, "analysis_runs": computes,
            "features": [f["dim"] for f in summary["outlier_features"]]}


def cleanup(root: Path, keep: set[str]) -> None:
    """Remove run directories except those still needed (they can be large)."""
    for path in root.iterdir():
        if path.is_dir() and str(path) not in keep:
            shutil.rmtree(path, ignore_errors=True)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
