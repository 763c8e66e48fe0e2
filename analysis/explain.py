"""One feature, all it is: `python -m analysis explain RUN --dim D`.

Prints, for hidden dim D of an analysed run: where it exceeds the threshold, by layer and
site; the experts that write it and the experts routing sends its tokens to (when the run
captured them); the tokens at which it is largest, decoded with the run's tokenizer when
the checkpoint is at hand; and its confidence intervals.
"""

from __future__ import annotations

import argparse
import json

import polars as pl

from analysis.criteria import SITES_PER_LAYER
from common import files, logs
from common.errors import RunError, UserError, report
from common.layout import RunLayout
from common.record import RunRecord, read_record


def explain(run_dir: str, dim: int, top: int = 8) -> str:
    """The explanation of `dim`, as printed."""
    from analysis.settings import run_criteria
    from analysis.steps import analyse
    from analysis.scan import Scanner, list_partitions

    layout = RunLayout.of(run_dir)
    record = read_record(layout)
    if not 0 <= dim < record.hidden_size:
        raise RunError(f"--dim {dim}: the run's hidden size is {record.hidden_size}; choose 0-{record.hidden_size - 1}.")
    if not files.exists(layout.fs, layout.summary):
        analyse(run_dir)
    summary = json.loads(files.read_bytes(layout.fs, layout.summary))
    criteria = run_criteria(record)
    sites = [p for p in list_partitions(layout, record) if p[1] != "resid"]
    entries = Scanner(layout, record, summary["criteria"]["threshold"]).scan(sites).exceedances.filter(dim=dim)
    feature = next((f for f in summary["outlier_features"] if f["dim"] == dim), None)
    lines = [f"dim {dim} of {record.model_path or run_dir}: "
             + ("an outlier feature (" + feature["classification"] + ")" if feature else "not an outlier feature")
             + f" at |x| >= {summary['criteria']['threshold']:g} ({criteria.layer_unit} unit)"]
    lines += _where(entries, record)
    if feature:
        lines += _view(feature)
    lines += _tokens(entries, layout, record, top)
    return "\n".join(lines)


def _where(entries: pl.DataFrame, record: RunRecord) -> list[str]:
    if entries.is_empty():
        return ["never reaches the threshold"]
    by = entries.group_by("layer", "site").agg(hits=pl.len(), max_abs=pl.col("value").abs().max()).sort("layer", "site")
    lines = [f"exceeds in {by['layer'].n_unique()} of {record.num_layers} layers, {by.height} of "
             f"{SITES_PER_LAYER * record.num_layers} layer-sites:", "  layer  site      entries  max |x|"]
    lines += [f"  {r['layer']:>5}  {r['site']:<8} {r['hits']:>8}  {r['max_abs']:.2f}" for r in by.iter_rows(named=True)]
    return lines


def _view(feature: dict) -> list[str]:
    lines = []
    if "layer_fraction_ci" in feature:
        low, high = feature["layer_fraction_ci"]
        t_low, t_high = feature["token_fraction_ci"]
        lines.append(f"95% intervals over sequences: layers {100 * low:.1f}-{100 * high:.1f}%, tokens "
                     f"{100 * t_low:.1f}-{100 * t_high:.1f}%; passes in {100 * feature['stability']:.0f}% of resamples")
    if feature.get("experts"):
        lines.append("written by (layer:expert, outputs >= floor): " + ", ".join(
            f"{e['layer']}:{e['expert']} ({e['count']}, max {e['max_abs']:.1f})" for e in feature["experts"]))
    if feature.get("routing_lift"):
        lines.append("its tokens are routed to (layer:expert, lift): " + ", ".join(
            f"{r['layer']}:{r['expert']} x{r['lift']:.2f} ({r['hits']} of {r['of']})" for r in feature["routing_lift"]))
    return lines


def _tokens(entries: pl.DataFrame, layout: RunLayout, record: RunRecord, top: int) -> list[str]:
    if entries.is_empty() or not files.exists(layout.fs, layout.tokens):
        return []
    with layout.fs.open_input_file(layout.tokens) as handle:
        tokens = pl.read_parquet(handle)
    largest = (entries.group_by("seq", "pos").agg(max_abs=pl.col("value").abs().max())
               .join(tokens, on=["seq", "pos"]).sort("max_abs", descending=True).head(top))
    decode = _decoder(record)
    return ["largest at (seq, pos, token):"] + [
        f"  {r['seq']:>5} {r['pos']:>6}  {decode(r['token_id'])!r:<20} |x| {r['max_abs']:.2f}"
        for r in largest.iter_rows(named=True)]


def _decoder(record: RunRecord):
    """token id -> text with the run's tokenizer, or the id itself when it is not at hand."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(record.model_path, local_files_only=True)
        return lambda token: tokenizer.decode([token])
    except Exception:  # noqa: BLE001 - any reason the checkpoint is not here
        return lambda token: f"#{token}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis explain", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="an analysed run directory or URI")
    parser.add_argument("--dim", type=int, required=True, help="the hidden dim to explain")
    parser.add_argument("--top", type=int, default=8, help="how many of its largest tokens to show")
    logs.add_flags(parser)
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.quiet)
    try:
        print(explain(args.run, args.dim, args.top))
    except UserError as err:
        return report(err)
    return 0
