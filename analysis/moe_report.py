"""The MoE view in the reports: super experts, the layer x expert map, massive activations and,
per outlier feature, the experts that write it and where routing sends it.

Every number comes from the summary (analysis.view), except the layer x expert map, drawn
from the per-expert maxima the analysis writes beside it. Sections of parts the run did
not capture are left out.
"""

from __future__ import annotations

import html

import polars as pl

from analysis import plots

TITLES = {"experts": "max |expert output| per layer and expert", "massive_depth": "massive activations over depth"}
SUPER_HEADER = ["Layer", "Expert", "Max |output|", "Dim", "Seq", "Pos", "Tokens"]
MASSIVE_HEADER = ["Dim", "First layer", "Last layer", "Positions", "Token ids", "Max |x|", "Min ratio to median"]


def moe_figures(summary: dict, maxima: pl.DataFrame | None) -> dict[str, bytes]:
    images = {}
    if maxima is not None and maxima.height:
        images["experts"] = plots.expert_heatmap(maxima, summary["num_layers"])
    if summary.get("massive_activations"):
        images["massive_depth"] = plots.massive_depth(summary["residual_medians"], summary["massive_activations"])
    return images


def super_rows(summary: dict) -> list[list[str]]:
    return [[str(s["layer"]), str(s["expert"]), f"{s['max_abs']:.2f}", str(s["dim"]), str(s["seq"]), str(s["pos"]),
             str(s["tokens"])] for s in summary.get("super_experts", [])]


def massive_rows(summary: dict) -> list[list[str]]:
    return [[str(m["dim"]), str(m["first_layer"]), str(m["last_layer"]), _short(m["positions"]),
             _short(m["token_ids"]), f"{m['max_abs']:.1f}", f"{m['min_ratio_to_median']:.0f}"]
            for m in summary.get("massive_activations", [])]


def attribution_rows(summary: dict) -> list[list[str]]:
    """Per feature: the experts writing it (layer:expert count) and the experts routing prefers."""
    rows = []
    for f in summary["outlier_features"]:
        if "experts" not in f and "routing_lift" not in f:
            continue
        writes = ", ".join(f"{e['layer']}:{e['expert']} ({e['count']})" for e in f.get("experts", [])) or "-"
        lift = ", ".join(f"{r['layer']}:{r['expert']} x{r['lift']:.2f}" for r in f.get("routing_lift", [])) or "-"
        rows.append([str(f["dim"]), writes, lift])
    return rows


def _short(values: list, limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" (+{len(values) - limit})" if len(values) > limit else "")


def _table(name: str, header: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    return (f'<table id="{name}"><tr>' + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")


def moe_sections(summary: dict, images: dict[str, str]) -> list[str]:
    """HTML parts; `images`: {name: data URI}."""
    parts = []
    if "super_experts" in summary:
        parts += ["<h2>Super experts (Su et al. 2025)</h2>",
                  _table("super_experts", SUPER_HEADER, super_rows(summary) or [["(none)"] + [""] * 6])]
    if "experts" in images:
        parts.append(f'<img id="experts" alt="{TITLES["experts"]}" src="{images["experts"]}">')
    if "massive_activations" in summary:
        parts += ["<h2>Massive activations (Sun et al. 2024)</h2>",
                  _table("massive_activations", MASSIVE_HEADER, massive_rows(summary) or [["(none)"] + [""] * 6])]
    if "massive_depth" in images:
        parts.append(f'<img id="massive_depth" alt="{TITLES["massive_depth"]}" src="{images["massive_depth"]}">')
    if rows := attribution_rows(summary):
        parts += ["<h2>Which experts write each feature, and where routing sends it</h2>",
                  _table("attribution", ["Feature", "Written by layer:expert (outputs >= floor)",
                                         "Routed to layer:expert (lift)"], rows)]
    return parts


def moe_markdown(summary: dict) -> str:
    lines = []
    for title, key, header, rows in (("Super experts", "super_experts", SUPER_HEADER, super_rows(summary)),
                                     ("Massive activations", "massive_activations", MASSIVE_HEADER,
                                      massive_rows(summary))):
        if key in summary:
            lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows] or ["| (none) |" + " |" * (len(header) - 1)]
    return "\n".join(lines) + ("\n" if lines else "")
