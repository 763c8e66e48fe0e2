"""Find LLM.int8() outlier features in a finished extraction run.

    summary = analyse("runs/olmoe-wiki")          # or s3://bucket/runs/olmoe-wiki

reads the run's captured block inputs (analysis.scan), forms per-dim statistics and applies
the criteria (analysis.criteria), and writes the summary, the feature table and report.md
(analysis.report), then the plots and report.html (analysis.html). `compute` does the same
without writing anything (the Python API's frames). With Ray initialised and
a run large enough to repay their start, the (layer, site) partitions are scanned by Ray
actors (analysis.pool); smaller runs are scanned in this process.
"""

from __future__ import annotations

import importlib

from analysis.settings import AnalysisConfig, Criteria, run_criteria, run_settings

__all__ = ["Analysis", "AnalysisConfig", "Criteria", "analyse", "compute", "feature_table", "run_criteria",
           "run_settings", "write_report"]
_LAZY = {"Analysis": "steps", "analyse": "steps", "compute": "steps", "write_report": "steps",
         "feature_table": "report"}


def __getattr__(name: str):
    """The analysis itself on first use, so that a config's `analysis:` section (analysis.settings)
    loads without Polars and matplotlib."""
    if name not in _LAZY:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(f"analysis.{_LAZY[name]}"), name)
