"""The analysis outputs: the summary, the feature table, report.md, the printed table.

All of them sit in the run directory (common.layout): the summary holds the criteria, run
facts, timings and the outlier features by dim; the feature table the same features as
Parquet; report.md the criteria and the features, for people.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import polars as pl

from analysis.criteria import Criteria
from common import files
from common.layout import RunLayout
from common.record import RunRecord

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


def build_summary(record: RunRecord, criteria: Criteria, features: pl.DataFrame, view: dict | None = None,
                  **extra) -> dict:
    """The summary's content: the features with their MoE view (analysis.view) merged in; `extra`
    adds run facts such as timings and skipped files."""
    view = view or {}
    per_feature = view.get("per_feature", {})
    rows = [{**row, **per_feature.get(row["dim"], {})} for row in features.select(FEATURE_KEYS).sort("dim").to_dicts()]
    kinds = [row["classification"] for row in rows]
    parts = {key: view[key] for key in ("super_experts", "massive_activations", "residual_medians") if key in view}
    return {
        "run": run_facts(record),
        "criteria": criteria.as_dict(),
        "num_layers": record.num_layers,
        "hidden_size": record.hidden_size,
        "tokens": record.tokens,
        "storage_mode": record.storage_mode,
        "num_outlier_features": len(rows),
        "by_classification": {kind: kinds.count(kind) for kind in CLASSES},
        **parts,
        **extra,
        "outlier_features": rows,
    }


@dataclass(frozen=True)
class Summary:
    """The summary (summary.json) typed: its criteria and counts as fields, its lists as they are."""

    criteria: Criteria
    num_layers: int
    hidden_size: int
    tokens: int
    storage_mode: str
    num_outlier_features: int
    by_classification: dict[str, int]
    outlier_features: list[dict]
    run: dict
    super_experts: list[dict] | None = None
    massive_activations: list[dict] | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the whole summary, every key

    @classmethod
    def of(cls, data: dict) -> Summary:
        known = {f.name for f in fields(cls)} - {"criteria", "raw"}
        return cls(criteria=Criteria(**data["criteria"]), raw=data,
                   **{key: data[key] for key in known if key in data})

    @property
    def dims(self) -> list[int]:
        """The outlier features' dims, in order."""
        return [row["dim"] for row in self.outlier_features]


def run_facts(record: RunRecord) -> dict:
    """What tells two reports apart: the model, the data and when the run was made."""
    model, data = record.section("model"), record.section("data")
    tiny = model.get("tiny")
    name = model.get("path") or (f"tiny {tiny.get('arch')} (seed {tiny.get('seed')})" if tiny else None)
    return {
        "model": name or record.model_path,
        "model_type": record.model_type,
        "dtype": record.dtype,
        "data": data.get("source"),
        "split": data.get("split"),
        "sequences": record.num_sequences or data.get("num_sequences"),
        "seq_len": record.seq_len or data.get("seq_len"),
        "created": record.created,
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
        lines += ["", f"Skipped unreadable files: {skipped} (listed in the summary)."]
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


def write_outputs(layout: RunLayout, summary: dict, features: pl.DataFrame) -> None:
    """The summary and the feature table (each written atomically, the table with the summary's
    per-feature MoE view), then report.md."""
    files.write_json(layout.fs, layout.summary, summary)
    rows = summary["outlier_features"]
    table = pl.DataFrame(rows) if rows else features.select(FEATURE_KEYS)
    files.write_table(layout.fs, layout.features, table.to_arrow())
    files.write_text(layout.fs, layout.report("md"), markdown(summary))
