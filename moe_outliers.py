"""moe-outliers from Python: extract a run or open one, and read what it found as Polars frames.

    import moe_outliers

    run = moe_outliers.extract("configs/tiny_moe.yaml", executor="local", output="runs/tiny")
    run.features()                          # one row per outlier feature: dim, max_abs, ...
    run.features(threshold=8.0)             # other criteria, recomputed, nothing written
    run = moe_outliers.open_run("s3://bucket/runs/olmoe")
    run.activations(layer=3, site="ln_mlp").collect()

A thin layer over the packages: `extract` is `python -m cluster run` (cluster.run.execute),
the frames come from the analysis's own `compute` (analysis/__init__.py), which writes nothing;
only `Run.report` writes files. The command line (`moe-outliers run | analyse | compare |
explain`) is `main` here.
"""

from __future__ import annotations

import dataclasses
import sys
from functools import cached_property
from pathlib import Path

import polars as pl

from analysis.settings import run_settings
from analysis.steps import Analysis, compute, write_report
from analysis.criteria import Criteria
from analysis.report import FEATURE_KEYS, Summary
from common import files
from common.errors import ConfigError, RunError
from common import storage
from common.layout import RunLayout
from common.storage import ACTIVATIONS, EXCEEDANCES, ROUTING
from common.record import RunRecord, read_record

__all__ = ["Run", "extract", "open_run", "main"]

# The summary's entries (analysis.experts, analysis.massive), for frames of none.
SUPER_EXPERT_KEYS = ["layer", "expert", "max_abs", "dim", "seq", "pos", "tokens"]
MASSIVE_KEYS = ["dim", "first_layer", "last_layer", "positions", "token_ids", "count", "max_abs",
                "min_ratio_to_median", "layers", "layer_max"]


def extract(config: str | Path | dict, *, executor: str = "ray", resume: bool = False, quiet: bool = True,
            report: bool = False, **overrides) -> Run:
    """Run the extraction and analysis of `config` (a YAML path or a dict) on `executor` ("ray":
    the cluster of RAY_ADDRESS, the one running here, or a new local one; "local": this process,
    no Ray) and return the run. `overrides` are config keys: dotted (`**{"pipeline.num_stages": 2}`),
    with `__` for the dot (`pipeline__num_stages=2`), or the command line's flags (`output`,
    `model`, `data`, `num_sequences`, `seq_len`, `stages`, `replicas`). The plots and report.html
    are written only with `report=True`."""
    from cluster.__main__ import FLAGS
    from cluster.config import load_config
    from cluster.run import execute

    settings = {FLAGS.get(key, key.replace("__", ".")): value for key, value in overrides.items()}
    result = execute(load_config(config, settings=settings), resume=resume, quiet=quiet, executor=executor,
                     visual=report)
    return open_run(result["record"].output)


def open_run(path_or_uri: str | Path) -> Run:
    """The run an extraction wrote at a local path or an object-store URI (s3://, gs://)."""
    layout = RunLayout.of(str(path_or_uri))
    return Run(layout, read_record(layout))


class Run:
    """One extraction run: its record, its summary, and its tables and findings as frames."""

    def __init__(self, layout: RunLayout, record: RunRecord):
        self.layout = layout
        self.record = record
        self._analyses: dict[Criteria, Analysis] = {}

    def __repr__(self) -> str:
        return f"Run({self.layout.uri!r}, {self.record.model_type}, {self.record.tokens} tokens, {self.record.status})"

    @property
    def criteria(self) -> Criteria:
        """The criteria the run's config records."""
        return run_settings(self.record).criteria()

    def analysis(self, **criteria) -> Analysis:
        """The analysis under the recorded criteria changed by `criteria` (computed once per
        criteria, written nowhere)."""
        try:
            wanted = dataclasses.replace(self.criteria, **criteria)
        except TypeError:
            valid = [f.name for f in dataclasses.fields(Criteria)]
            raise ConfigError(f"criteria {sorted(criteria)}: choose among {valid}.") from None
        if wanted not in self._analyses:
            self._analyses[wanted] = compute(self.layout.uri, wanted, settings=run_settings(self.record))
        return self._analyses[wanted]

    @cached_property
    def summary(self) -> Summary:
        """The summary under the recorded criteria: the stored one, else computed (not written)."""
        if files.exists(self.layout.fs, self.layout.summary):
            import json

            return Summary.of(json.loads(files.read_bytes(self.layout.fs, self.layout.summary)))
        return Summary.of(self.analysis().summary)

    def features(self, **criteria) -> pl.DataFrame:
        """One row per outlier feature (`dim` and the summary's columns, with the MoE view's and the
        intervals where the run has them), under the recorded criteria changed by `criteria`
        (threshold, min_layer_fraction, min_token_fraction, layer_unit, ...)."""
        result = self.analysis(**criteria)
        rows = result.summary["outlier_features"]
        if not rows:
            return result.features.select(FEATURE_KEYS).clear()
        return pl.DataFrame(rows, infer_schema_length=None)

    def super_experts(self) -> pl.DataFrame:
        """Su et al. 2025's super experts: layer, expert, max_abs, dim, seq, pos, tokens."""
        return self._part("super_experts", "capture.experts", SUPER_EXPERT_KEYS)

    def massive_activations(self) -> pl.DataFrame:
        """Sun et al. 2024's massive activations, grouped by dim."""
        return self._part("massive_activations", "capture.residual", MASSIVE_KEYS)

    def routing(self) -> pl.DataFrame:
        """Every real token's top-k in every MoE layer: layer, seq, pos, rank, expert, weight."""
        from analysis.scan import read_kind

        table = read_kind(self.layout, ROUTING)
        if table is None:
            raise RunError(f"{self.layout.uri}: the run captured no routing; extract it with capture.routing: true.")
        return table

    def activations(self, layer: int | None = None, site: str | None = None) -> pl.LazyFrame:
        """The stored activations as a LazyFrame, filtered to `layer` and `site` where given (the
        filters prune the files). Dense runs: seq, pos, token_id, act (an Array of hidden floats),
        layer, site; a bfloat16 run's float16 files read here without their patch of tiny values
        (off by at most 2^-25: analysis.scan.read_dense reads them exactly). Exceedance runs:
        layer, site, seq, pos, dim, value of every |x| >= the run's floor."""
        dense = storage.is_dense(self.record.storage_mode)
        kind = ACTIVATIONS if dense else EXCEEDANCES
        if self.layout.local:  # Polars' own scan: memory-mapped Arrow, the hive folders as columns
            scan = pl.scan_ipc if dense else pl.scan_parquet
            frame = scan(f"{self.layout.kind(kind)}/**/*.{'arrow' if dense else 'parquet'}", hive_partitioning=dense)
        else:  # an object store, through the run's own pyarrow filesystem
            import pyarrow.dataset as ds

            frame = pl.scan_pyarrow_dataset(ds.dataset(self.layout.kind(kind), filesystem=self.layout.fs,
                                                       format="ipc" if dense else "parquet",
                                                       partitioning="hive" if dense else None))
        if layer is not None:
            frame = frame.filter(pl.col("layer") == layer)
        if site is not None:
            frame = frame.filter(pl.col("site") == site)
        return frame

    def report(self, path: str | Path | None = None) -> str:
        """Write the HTML report (its plots embedded) to `path`, or with no path the run's own
        report: report.html, report.md and the plots beside the run record. Returns where."""
        result = self.analysis()
        if path is None:
            write_report(result)
            return self.layout.report("html")
        from analysis.html import render
        from analysis.profile import median_abs

        medians = median_abs(result.layout, result.record, result.partitions)
        _, _, page = render(result.summary, result.per_dim, result.partial.stats, medians, result.view.get("experts"))
        Path(path).write_text(page)
        return str(path)

    def _part(self, key: str, capture: str, columns: list[str]) -> pl.DataFrame:
        summary = self.analysis().summary
        if key not in summary:
            raise RunError(f"{self.layout.uri}: the run has no {key}; extract it with {capture}: true.")
        rows = summary[key]
        return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame({c: [] for c in columns})


COMMANDS = {"run": "cluster.__main__", "analyse": "analysis.__main__", "analyze": "analysis.__main__",
            "compare": "analysis.__main__", "explain": "analysis.__main__"}


def main(argv: list[str] | None = None) -> int:
    """`moe-outliers run | analyse | compare | explain ...`: the `python -m cluster` and
    `python -m analysis` commands under one name."""
    import importlib

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: moe-outliers {run,analyse,compare,explain} ...  (see moe-outliers COMMAND --help)",
              file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[command])
    if command == "run":
        return module.main(["run", *rest], prog="moe-outliers")
    if command in ("analyse", "analyze"):
        return module.main(rest, prog="moe-outliers analyse")
    return module.main([command, *rest])

if __name__ == "__main__":
    sys.exit(main())
