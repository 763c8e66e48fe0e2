"""One table and one plot across analysed runs: `python -m analysis compare RUN1 RUN2 ... [--output DIR]`.

Each RUN is an analysed run directory (local path or URI). Writes, into DIR:

    compare.md    one row per run: model, layers, hidden, tokens, features, max abs, top dims
    compare.csv   the same rows
    compare.png   max and median |x| per layer against relative depth, one colour per run

and prints the table. Runs analysed before layer profiles existed are re-analysed first.
"""

from __future__ import annotations

import argparse
import json
import sys

import polars as pl

from actors.storage import resolve
from analysis import plots
from analysis.report import _write_text
from analysis.scan import RunError, read_run

COLUMNS = ["run", "model", "layers", "hidden", "tokens", "outlier features", "systematic",
           "probabilistic", "max abs", "top dims"]


def load(run_dir: str) -> tuple[dict, dict, pl.DataFrame]:
    """(run.json, summary.json, layer profile) of one analysed run."""
    info = read_run(run_dir)
    fs, root = resolve(run_dir)
    paths = [f"{root}/analysis/summary.json", f"{root}/analysis/layer_profile.parquet"]
    if any(fs.get_file_info(p).type.name == "NotFound" for p in paths):
        from analysis import analyse

        analyse(run_dir)
    with fs.open_input_stream(paths[0]) as stream:
        summary = json.loads(stream.read())
    with fs.open_input_file(paths[1]) as handle:
        profile = pl.read_parquet(handle)
    return info, summary, profile


def label(info: dict, run_dir: str) -> str:
    """A short name for the run: the model id, else the run directory's last part."""
    model = (info.get("config") or {}).get("model") or {}
    return model.get("path") or run_dir.rstrip("/").split("?")[0].rsplit("/", 1)[-1]


def row(run_dir: str, info: dict, summary: dict, profile: pl.DataFrame) -> dict:
    features = summary["outlier_features"]
    top = sorted(features, key=lambda f: -f["max_abs"])[:3]
    return dict(zip(COLUMNS, [
        run_dir, label(info, run_dir), summary["num_layers"], summary["hidden_size"],
        summary["tokens"], summary["num_outlier_features"],
        summary["by_classification"].get("systematic", 0),
        summary["by_classification"].get("probabilistic", 0),
        round(float(profile["top1"].max()), 2), ", ".join(str(f["dim"]) for f in top),
    ]))


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def compare(runs: list[str], output: str) -> list[dict]:
    """Build and write the comparison; returns its rows."""
    loaded = [(run, *load(run)) for run in runs]
    rows = [row(run, info, summary, profile) for run, info, summary, profile in loaded]
    names = _unique([r["model"] for r in rows])
    figure = plots.compare({name: profile for name, (*_, profile) in zip(names, loaded)})
    fs, root = resolve(output)
    fs.create_dir(root, recursive=True)
    _write_text(fs, f"{root}/compare.md", "# Outlier features across runs\n\n" + markdown(rows)
                + "\n![max and median |x| per layer](compare.png)\n")
    _write_text(fs, f"{root}/compare.csv", pl.DataFrame(rows).write_csv())
    with fs.open_output_stream(f"{root}/compare.png") as out:
        out.write(figure)
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
    args = parser.parse_args(argv)
    try:
        rows = compare(args.runs, args.output)
    except (RunError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown(rows))
    print(f"written: {args.output}/compare.md, compare.csv, compare.png")
    return 0
