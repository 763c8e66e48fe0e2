"""The report people look at: report.html (self-contained), the plots as PNG files, and
report.md with links to them (paths in common.layout).

    report.html     facts, criteria, outlier table, the four plots (embedded)
    report.md       the markdown of analysis.report plus links to the plots
    plots           the same plots, for papers and notebooks
    layer profile   per layer: top1..top3 max |x|, top1 dim, median |x|
                    (what `python -m analysis compare` plots across runs)

Every number in the HTML is formatted from the summary dict the summary file holds.
"""

from __future__ import annotations

import base64
import html

import polars as pl

from analysis import plots
from analysis.moe_report import TITLES as MOE_TITLES
from analysis.moe_report import moe_figures, moe_markdown, moe_sections
from analysis.profile import layer_maxima, layer_profile, top_dims
from analysis.report import _ranges, markdown
from common import files
from common.layout import RunLayout

TITLES = {
    "heatmap": "max |x| per layer and dim",
    "layer_coverage": "per-dim layer coverage",
    "token_coverage": "per-dim token coverage",
    "massive": "massive activations: top-k |x| vs median per layer",
}
ALL_TITLES = {**TITLES, **MOE_TITLES}


def figures(summary: dict, per_dim: pl.DataFrame, stats: pl.DataFrame,
            profile: pl.DataFrame) -> dict[str, bytes]:
    """{name: PNG} for the four report plots."""
    c = summary["criteria"]
    dims = top_dims(per_dim, [f["dim"] for f in summary["outlier_features"]])
    layer_column = "layer_fraction" if c["layer_unit"] == "layer" else "site_fraction"
    return {
        "heatmap": plots.heatmap(layer_maxima(stats), dims, summary["num_layers"], c["threshold"]),
        "layer_coverage": plots.coverage(per_dim, dims, layer_column, c["min_layer_fraction"],
                                         f"share of layers with |x| >= {c['threshold']:g}"),
        "token_coverage": plots.coverage(per_dim, dims, "token_fraction", c["min_token_fraction"],
                                         f"share of tokens with |x| >= {c['threshold']:g}"),
        "massive": plots.massive(profile),
    }


def render(summary: dict, per_dim: pl.DataFrame, stats: pl.DataFrame, medians: pl.DataFrame | None,
           maxima: pl.DataFrame | None = None) -> tuple[pl.DataFrame, dict[str, bytes], str]:
    """The layer profile, the plots ({name: PNG}) and report.html's text, nothing written;
    `maxima`: the per-expert maxima of the MoE view, when the run captured experts."""
    profile = layer_profile(stats, medians)
    images = {**figures(summary, per_dim, stats, profile), **moe_figures(summary, maxima)}
    return profile, images, page(summary, images)


def write_visual_report(layout: RunLayout, summary: dict, per_dim: pl.DataFrame, stats: pl.DataFrame,
                        medians: pl.DataFrame | None, maxima: pl.DataFrame | None = None) -> None:
    """Write the layer profile, the plots, report.html and report.md with plot links (`render`)."""
    profile, images, html_text = render(summary, per_dim, stats, medians, maxima)
    files.write_table(layout.fs, layout.profile, profile.to_arrow())
    if maxima is not None:
        files.write_table(layout.fs, layout.experts, maxima.to_arrow())
    for name, png in images.items():
        files.write_bytes(layout.fs, layout.plot(name), png)
    files.write_text(layout.fs, layout.report("html"), html_text)
    links = "\n".join(f"![{ALL_TITLES[n]}]({layout.plot_link(n)})\n" for n in images)
    files.write_text(layout.fs, layout.report("md"), markdown(summary) + moe_markdown(summary)
                     + "\n## Plots\n\n" + links)


def feature_rows(summary: dict) -> list[list[str]]:
    """The outlier table's cells, formatted as report.md formats them, with the bootstrap intervals."""
    return [
        [str(f["dim"]), f"{f['max_abs']:.2f}", f"{100 * f['layer_fraction']:.1f}",
         f"{100 * f['token_fraction']:.1f}", str(f["occurrences"]), f["classification"],
         _ranges(f["layers"]), _interval(f.get("layer_fraction_ci")), _interval(f.get("token_fraction_ci")),
         "" if f.get("stability") is None else f"{f['stability']:.2f}"]
        for f in sorted(summary["outlier_features"], key=lambda f: f["dim"])
    ]


def _interval(ci: list | None) -> str:
    return "" if ci is None else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}"


HEADER = ["Feature", "Max magnitude", "% layers", "% tokens", "Occurrences", "Classification", "Layers",
          "% layers CI", "% tokens CI", "Stability"]
STYLE = ("body{font-family:system-ui,sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;"
         "text-align:right}img{max-width:100%;display:block;margin:1em 0}")


def page(summary: dict, images: dict[str, bytes]) -> str:
    """report.html: one file, images embedded as data URIs so it can be mailed or downloaded."""
    c = summary["criteria"]
    esc = html.escape
    run = summary["run"]
    facts = {
        "model": f"{run['model']} ({run['model_type']}, {run['dtype']})",
        "data": f"{run['data']}, {run['sequences']} x {run['seq_len']} tokens",
        "run made": run["created"] or "unknown",
        "layers": summary["num_layers"], "hidden size": summary["hidden_size"],
        "tokens per layer-site": summary["tokens"], "storage": summary["storage_mode"],
        "outlier features": summary["num_outlier_features"],
        **{k: v for k, v in summary["by_classification"].items()},
    }
    rows = feature_rows(summary) or [["(none)"] + [""] * (len(HEADER) - 1)]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Outlier features: {esc(str(run['model']))}</title>", f"<style>{STYLE}</style></head><body>",
        "<h1>Outlier features</h1>",
        '<table id="facts">' + "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>"
                                       for k, v in facts.items()) + "</table>",
        "<h2>Criteria (LLM.int8(), Dettmers et al. 2022)</h2>",
        '<table id="criteria">' + "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>"
                                          for k, v in c.items()) + "</table>",
        f"<h2>Found: {summary['num_outlier_features']} outlier features</h2>",
        '<table id="features"><tr>' + "".join(f"<th>{h}</th>" for h in HEADER) + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in rows)
        + "</table>",
    ]
    uris = {name: "data:image/png;base64," + base64.b64encode(png).decode() for name, png in images.items()}
    parts += moe_sections(summary, uris)
    for name in TITLES:
        if name in uris:
            parts += [f"<h2>{esc(TITLES[name])}</h2>", f'<img id="{name}" alt="{esc(TITLES[name])}" src="{uris[name]}">']
    return "\n".join(parts + ["</body></html>", ""])
