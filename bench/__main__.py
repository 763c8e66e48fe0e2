"""`python -m bench [--quick] [--rounds N] [--record]`: the performance table of the issue.

One run, one machine, one model, one set of tokens. Every round runs each row once, in the
same order, so machine noise hits all rows alike; figures are medians over rounds and
ratios are medians of per-round ratios. Prints the table, writes JSON (--json) and, with
--record, appends the table with machine, date and commit to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
from pathlib import Path

from bench import baselines, extract, report
from bench.workload import FLOOR, QUICK, Workload

HERE = Path(__file__).parent
PIPELINE_ROWS = [("c1", 1, "dense"), ("c2", 2, "dense"), ("c4", 4, "dense"),
                 ("d1", 1, "exceedances"), ("d2", 2, "exceedances")]


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 x 256 tokens, 1 round (~1 minute)")
    parser.add_argument("--rounds", type=int, help="rounds of every row (default 3; quick 1)")
    parser.add_argument("--json", default=str(HERE / "results.json"), help="where to write the figures")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--no-memory", action="store_true", help="skip the stage memory check")
    parser.add_argument("--sequences", type=int,
                        help="sequences of 512 tokens (default 8): more amortise each process's cold start")
    return parser.parse_args(argv)


def one_round(work: Workload, path: str, tokens, root: Path) -> tuple[dict, dict]:
    """Every row once: (seconds by row, pipeline details by row)."""
    fresh = baselines.in_fresh_process
    seconds = {"a": fresh(baselines.plain_forward, path, work.dtype, tokens, 1)["seconds"],
               "a_warm": fresh(baselines.plain_forward, path, work.dtype, tokens, 1, "tokens")["seconds"]}
    legacy = fresh(baselines.legacy, path, work.dtype, tokens, root / "legacy", 6.0, 1)
    seconds["b"] = legacy["seconds"]
    details = {"b": legacy}
    for key, stages, mode in PIPELINE_ROWS:
        details[key] = extract.run_rows(work, root, stages, mode, 1)
        seconds[key] = details[key]["extract_s"]
    return seconds, details


def rows(rounds: list[dict], details: list[dict], analysis: dict) -> dict:
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    last = details[-1]
    b = last["b"]
    table = {
        "a": {"name": "(a) plain forward, no capture", "seconds": med("a"),
              "notes": "fresh process, warmed like a stage"},
        "a_warm": {"name": "(a) plain forward, kernels warm on these tokens", "seconds": med("a_warm"),
                   "notes": "reference only: no fresh process has this"},
        "b": {"name": "(b) replaced: 6 full forwards, torch.save, Python loop", "seconds": med("b"),
              "bytes": b["bytes"], "notes": f"extract {b['extract_s']:.2f} s + analysis {b['analysis_s']:.2f} s"},
    }
    for key, stages, mode in PIPELINE_ROWS:
        bubble = statistics.median(d[key]["bubble"] for d in details if d[key]["bubble"] is not None)
        label = "dense" if mode == "dense" else f"exceedances >= {FLOOR:g}"
        table[key] = {"name": f"({key[0]}) pipeline, {stages} stage{'s' * (stages > 1)}, {label}",
                      "seconds": med(key), "bytes": last[key]["bytes"], "notes": f"bubble {bubble:.0%}"}
    for mode, figures in analysis.items():
        table[f"read-{mode}"] = {"name": f"Parquet read only ({mode} run): I/O floor",
                                 "seconds": figures["read_s"], "bytes": figures["bytes"]}
        table[f"analyse-{mode}"] = {"name": f"analysis ({mode} run), in-process",
                                    "seconds": figures["analysis_s"],
                                    "notes": f"scan + criteria; report writing +{figures['report_s']:.2f} s; "
                                             f"features {figures['features']}"}
    return table


def main(argv=None) -> int:
    args = parse(argv)
    work = QUICK if args.quick else Workload()
    if args.sequences:
        work = dataclasses.replace(work, num_sequences=args.sequences)
    count = args.rounds or (1 if args.quick else 3)
    result = {"machine": report.machine(), "workload": work.describe(), "rounds": count}
    path, tokens = extract_tokens(work)
    result["tokens"] = int(tokens.numel())
    root = Path(tempfile.mkdtemp(prefix="moe-outliers-bench-"))
    result["cluster_start_s"] = extract.start_ray(2)
    rounds, details = [], []
    for index in range(count):
        seconds, detail = one_round(work, path, tokens, root)
        rounds.append(seconds)
        details.append(detail)
        print(f"round {index + 1}/{count}: " + ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items()), flush=True)
        if index < count - 1:
            extract.cleanup(root, keep=set())
    import ray

    ray.shutdown()  # the analysis rows run in this process, as `python -m analysis` does
    analysis = {mode: extract.analysis_rows(details[-1][key]["run_dir"], max(3, count))
                for mode, key in (("dense", "c1"), ("exceedances", "d1"))}
    for r in rounds:
        r["c1_e2e"] = r["c1"] + analysis["dense"]["analysis_s"]
        r["d1_e2e"] = r["d1"] + analysis["exceedances"]["analysis_s"]
    result["load_s"] = statistics.median(d["c1"]["load_s"] for d in details)
    result["memory"] = None if args.no_memory or args.quick else _memory(work)
    result["rows"] = rows(rounds, details, analysis)
    result["targets"] = report.targets(rounds, analysis, result["memory"])
    result["per_round"], result["analysis"] = rounds, analysis
    result["load_average_end"] = os.getloadavg()
    print(report.table(result))
    Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    if args.record:
        with open(HERE / "RESULTS.md", "a") as out:
            out.write("\n" + report.results_entry(result))
    extract.cleanup(root, keep=set())
    return 0


def extract_tokens(work: Workload):
    from transformers.utils import logging as hf_logging

    from bench.workload import prepared

    hf_logging.disable_progress_bar()
    return prepared(work)


def _memory(work: Workload) -> dict:
    from bench.memory import run_in_subprocess

    figures = run_in_subprocess(os.path.expanduser(work.cache_dir))
    print("stage memory (MiB): " + ", ".join(
        f"{k.removesuffix('_bytes')} {v / 2**20:.0f}" for k, v in figures.items() if k.endswith("_bytes")))
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
