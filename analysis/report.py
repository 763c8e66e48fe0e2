"""The analysis outputs: summary.json, outlier_features.parquet, report.md, the printed table.

All of them sit in the run directory (local path or pyarrow URI):

    RUN/analysis/summary.json              criteria, run facts, timings, outlier features by dim
    RUN/analysis/outlier_features.parquet  the same features as a table
    RUN/report.md                          criteria and the features, for people
"""

from __future__ import annotations

import polars as pl
import pyarrow.fs as pafs

from actors.storage import resolve, write_json, write_table
from analysis.criteria import Criteria

CLASSES = ("systematic", "probabilistic")
FEATURE_KEYS = [
    "dim",
    "max_abs",
    "layer_fraction",
    "site_fraction",
    "token_fraction",
    "position_fraction",
    "occurrences",
    "layers",
    "classification",
]


def build_summary(info: dict, criteria: Criteria, features: pl.DataFrame, **extra) -> dict:
    """The summary.json content; `extra` adds run facts such as timings and skipped files."""
    rows = features.select(FEATURE_KEYS).sort("dim").to_dicts()
    kinds = [row["classification"] for row in rows]
    return {
        "run": run_facts(info),
        "criteria": criteria.as_dict(),
        "num_layers": info["num_layers"],
        "hidden_size": info["hidden_size"],
        "tokens": info["tokens"],
        "storage_mode": info["storage_mode"],
        "num_outlier_features": len(rows),
        "by_classification": {kind: kinds.count(kind) for kind in CLASSES},
        **extra,
        "outlier_features": rows,
    }


def run_facts(info: dict) -> dict:
    """What tells two reports apart: the model, the data and when the run was made."""
    config = info.get("config") or {}
    model, data = config.get("model") or {}, config.get("data") or {}
    tiny = model.get("tiny")
    name = model.get("path") or (f"tiny {tiny.get('arch')} (seed {tiny.get('seed')})" if tiny else None)
    return {
        "model": name or info.get("model_path"),
        "model_type": info.get("model_type"),
        "dtype": info.get("dtype"),
        "data": data.get("source"),
        "split": data.get("split"),
        "sequences": info.get("num_sequences", data.get("num_sequences")),
        "seq_len": info.get("seq_len", data.get("seq_len")),
        "created": info.get("created"),
    }


def headline(facts: dict) -> list[str]:
    """The report's first lines: model, data, date."""
    data = facts["data"] if facts.get("split") in (None, "train") else f"{facts['data']} ({facts['split']})"
    return [
        f"- model: `{facts['model']}` ({facts['model_type']}, {facts['dtype']})",
        f"- data: `{data}`, {facts['sequences']} x {facts['seq_len']} tokens",
        f"- run made: {facts['created'] or 'unknown'}",
    ]


def feature_table(features: list[dict]) -> str:
    """Feature rows (summary["outlier_features"]) as a Markdown table:
    Feature | Max magnitude | % layers | % tokens | Occurrences."""
    lines = [
        "| Feature | Max magnitude | % layers | % tokens | Occurrences |",
        "|--------:|--------------:|---------:|---------:|------------:|",
    ]
    for row in sorted(features, key=lambda r: r["dim"]):
        lines.append(
            f"| {row['dim']} | {row['max_abs']:.2f} | {100 * row['layer_fraction']:.1f} "
            f"| {100 * row['token_fraction']:.1f} | {row['occurrences']} |"
        )
    if not features:
        lines.append("| (none) | | | | |")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    """report.md: what was asked, of what run, and what was found."""
    c = summary["criteria"]
    unit = "layers" if c["layer_unit"] == "layer" else "layer-sites (of 2L)"
    lines = [
        "# Outlier features",
        "",
        *headline(summary["run"]),
        "",
        f"Run: {summary['num_layers']} layers, hidden size {summary['hidden_size']}, "
        f"{summary['tokens']} tokens per layer-site, storage `{summary['storage_mode']}`.",
        "",
        "## Criteria (LLM.int8(), Dettmers et al. 2022)",
        "",
        f"- magnitude: max |x| >= {c['threshold']}",
        f"- layers: |x| >= {c['threshold']} in >= {100 * c['min_layer_fraction']:g}% of {unit}",
        f"- tokens: |x| >= {c['threshold']} in >= {100 * c['min_token_fraction']:g}% of tokens",
        f"- systematic: >= {100 * c['systematic_layer_fraction']:g}% of {unit} and "
        f">= {100 * c['systematic_token_fraction']:g}% of tokens; otherwise probabilistic",
        "",
        f"## Found: {summary['num_outlier_features']} outlier features ("
        + ", ".join(f"{n} {kind}" for kind, n in summary["by_classification"].items())
        + ")",
        "",
        feature_table(summary["outlier_features"]),
        "",
        "| Feature | Classification | % layer-sites | % positions | Layers |",
        "|--------:|----------------|--------------:|------------:|--------|",
    ]
    for row in summary["outlier_features"]:
        lines.append(
            f"| {row['dim']} | {row['classification']} | {100 * row['site_fraction']:.1f} "
            f"| {100 * row['position_fraction']:.1f} | {_ranges(row['layers'])} |"
        )
    if summary.get("skipped_files"):
        skipped = len(summary["skipped_files"])
        lines += ["", f"Skipped unreadable files: {skipped} (listed in summary.json)."]
    return "\n".join(lines) + "\n"


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5': keeps long layer lists readable."""
    spans: list[list[int]] = []
    for layer in layers:
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def write_outputs(run_dir: str, summary: dict, features: pl.DataFrame) -> list[str]:
    """Write the three output files (each atomically); returns their paths."""
    fs, root = resolve(str(run_dir))
    paths = [f"{root}/analysis/summary.json", f"{root}/analysis/outlier_features.parquet"]
    write_json(fs, paths[0], summary)
    write_table(fs, paths[1], features.select(FEATURE_KEYS).to_arrow())
    paths.append(f"{root}/report.md")
    _write_text(fs, paths[2], markdown(summary))
    return paths


def _write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    # NOTE: write then move, as actors/storage.py does, so readers never see half a report.
    staging = f"{path}.tmp"
    with fs.open_output_stream(staging) as stream:
        stream.write(text.encode())
    fs.move(staging, path)
