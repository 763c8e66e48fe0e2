"""One table and one plot across analysed runs: `python -m analysis compare RUN1 RUN2 ... [--output DIR]`.

Each RUN is an analysed run directory (local path or URI). Writes, into DIR (its own layout):

    compare.md    one row per run: model, layers, hidden, tokens, features, max abs, top dims
    compare.csv   the same rows
    compare.png   max and median |x| per layer against relative depth, one colour per run

and prints the table. Runs analysed before layer profiles existed are re-analysed first.
"""

from __future__ import annotations

import argparse
import json

import polars as pl

from analysis import plots
from common import files, logs
from common.errors import UserError, report
from common.layout import RunLayout
from common.record import RunRecord, read_record

COLUMNS = ["run", "model", "layers", "hidden", "tokens", "outlier features", "systematic",
           "probabilistic", "max abs", "top dims", "super experts", "massive dims"]


def load(run_dir: str) -> tuple[RunRecord, dict, pl.DataFrame]:
    """(record, summary, layer profile) of one analysed run; analysed first if it never was."""
    layout = RunLayout.of(run_dir)
    record = read_record(layout)
    if not all(files.exists(layout.fs, p) for p in (layout.summary, layout.profile)):
        from analysis.steps import analyse

        analyse(run_dir)
    summary = json.loads(files.read_bytes(layout.fs, layout.summary))
    with layout.fs.open_input_file(layout.profile) as handle:
        profile = pl.read_parquet(handle)
    return record, summary, profile


def label(record: RunRecord, run_dir: str) -> str:
    """A short name for the run: the model id, else the run directory's last part."""
    return record.section("model").get("path") or run_dir.rstrip("/").split("?")[0].rsplit("/", 1)[-1]


def row(run_dir: str, record: RunRecord, summary: dict, profile: pl.DataFrame) -> dict:
    features = summary["outlier_features"]
    top = sorted(features, key=lambda f: -f["max_abs"])[:3]
    return dict(zip(COLUMNS, [
        run_dir, label(record, run_dir), summary["num_layers"], summary["hidden_size"],
        summary["tokens"], summary["num_outlier_features"],
        summary["by_classification"].get("systematic", 0),
        summary["by_classification"].get("probabilistic", 0),
        round(float(profile["top1"].max()), 2), ", ".join(str(f["dim"]) for f in top),
        # layer:expert; "-" where the run did not capture what the column needs
        ", ".join(f"{s['layer']}:{s['expert']}" for s in summary["super_experts"]) if "super_experts" in summary
        else "-",
        ", ".join(str(m["dim"]) for m in summary["massive_activations"]) if "massive_activations" in summary
        else "-",
    ]))


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def compare(runs: list[str], output: str) -> list[dict]:
    """Build and write the comparison; returns its rows."""
    loaded = [(run, *load(run)) for run in runs]
    rows = [row(run, record, summary, profile) for run, record, summary, profile in loaded]
    names = _unique([r["model"] for r in rows])
    figure = plots.compare({name: profile for name, (*_, profile) in zip(names, loaded)})
    fs, root = files.resolve(output)
    files.write_text(fs, f"{root}/compare.md", "# Outlier features across runs\n\n" + markdown(rows)
                     + "\n![max and median |x| per layer](compare.png)\n")
    files.write_text(fs, f"{root}/compare.csv", pl.DataFrame(rows).write_csv())
    files.write_bytes(fs, f"{root}/compare.png", figure)
    return rows


def _unique(names: list[str]) -> list[str]:
    """Legend names: a repeated model gets #2, #3 so its lines stay apart."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis compare",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="analysed run directories or URIs")
    parser.add_argument("--output", default="compare", help="where compare.md/.csv/.png go")
    logs.add_flags(parser)
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.quiet)
    try:
        rows = compare(args.runs, args.output)
    except UserError as err:
        return report(err)
    print(markdown(rows))
    print(f"written: {args.output}/compare.md, compare.csv, compare.png")
    return 0
