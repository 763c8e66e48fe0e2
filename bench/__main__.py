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
from bench.workload import CORES, FLOOR, QUICK, Workload
from common.storage import DENSE, EXCEEDANCES

HERE = Path(__file__).parent
# key, stages, storage mode, captures: the rows, then the MoE view's capture costs
PIPELINE_ROWS = [("c1", 1, DENSE, {}), ("c2", 2, DENSE, {}),
                 ("d1", 1, EXCEEDANCES, {}), ("d2", 2, EXCEEDANCES, {}),
                 ("r1", 1, DENSE, {"routing": True}), ("x1", 1, DENSE, {"experts": True}),
                 ("p2", 1, DENSE, {"replicas": 2})]  # 2 replicas of 1 stage, 1 CPU each


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 x 256 tokens, 1 round, short simulation")
    parser.add_argument("--rounds", type=int, help="rounds of every row (default 3; quick 1)")
    parser.add_argument("--json", default=str(HERE / "results.json"), help="where to write the figures")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--no-memory", action="store_true", help="skip the stage memory check")
    parser.add_argument("--no-simulation", action="store_true", help="skip the pipeline simulator's rows")
    parser.add_argument("--sequences", type=int, help="sequences of 512 tokens (default 32)")
    return parser.parse_args(argv)


def one_round(work: Workload, path: str, tokens, root: Path) -> tuple[dict, dict]:
    """Every row once: (seconds by row, pipeline details by row)."""
    fresh = baselines.in_fresh_process
    seconds = {"a": fresh(baselines.plain_forward, path, work.dtype, tokens, 1, CORES)["seconds"],
               "a1": fresh(baselines.plain_forward, path, work.dtype, tokens, 1, 1)["seconds"]}
    legacy = fresh(baselines.legacy, path, work.dtype, tokens, root / "legacy", 6.0, 1, CORES)
    seconds["b"] = legacy["seconds"]
    details = {"b": legacy}
    for key, stages, mode, capture in PIPELINE_ROWS:
        details[key] = extract.run_rows(work, root, stages, mode, 1, capture)  # capture may hold "replicas"
        seconds[key] = details[key]["extract_s"]
        seconds[key + "_analysis"] = details[key]["analysis_s"]
    return seconds, details


def rows(rounds: list[dict], details: list[dict], analysis: dict) -> dict:
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    last = details[-1]
    b = last["b"]
    table = {
        "a": {"name": f"(a) plain forward, {CORES} threads: the floor", "seconds": med("a"),
              "notes": "fresh process, warmed like a stage"},
        "a1": {"name": "(a) plain forward, 1 thread", "seconds": med("a1")},
        "b": {"name": "(b) replaced: 6 full forwards, torch.save, Python loop", "seconds": med("b"),
              "bytes": b["bytes"], "notes": f"extract {b['extract_s']:.2f} s + analysis {b['analysis_s']:.2f} s"},
    }
    for key, stages, mode, capture in PIPELINE_ROWS:
        bubble = statistics.median(d[key]["bubble"] for d in details if d[key]["bubble"] is not None)
        label = DENSE if mode == DENSE else f"exceedances >= {FLOOR:g}"
        label += "".join(f", capture.{name}" for name in capture if name != "replicas")
        replicas = capture.get("replicas", 1)
        actors = stages * replicas
        cpus = f"{CORES // actors} CPU{'s' * (CORES // actors > 1)} each" if actors > 1 else f"{CORES} CPUs"
        copies = f"{replicas} replicas x " if replicas > 1 else ""
        table[key] = {"name": f"({key[0]}) pipeline, {copies}{stages} stage{'s' * (stages > 1)} ({cpus}), {label}",
                      "seconds": med(key), "bytes": last[key]["bytes"],
                      "notes": f"bubble {bubble:.0%}; its analysis_s {med(key + '_analysis'):.2f} s"}
    for mode, figures in analysis.items():
        table[f"read-{mode}"] = {"name": f"table read only ({mode} run): I/O floor",
                                 "seconds": figures["read_s"], "bytes": figures["bytes"]}
        table[f"analyse-{mode}"] = {"name": f"analysis ({mode} run), in-process",
                                    "seconds": figures["analysis_s"],
                                    "notes": f"scan + criteria; plots and report.html +{figures['report_s']:.2f} s; "
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
    result["cluster_start_s"] = extract.start_ray(CORES)
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
                for mode, key in ((DENSE, "c1"), (EXCEEDANCES, "d1"))}
    for r in rounds:
        for key in ("c1", "d1", "c2", "d2"):
            r[key + "_e2e"] = r[key] + r[key + "_analysis"]
    result["default_job"] = None if args.quick else extract.default_job(root)
    result["simulation"] = None if args.no_simulation else _simulation(args.quick)
    result["load_s"] = statistics.median(d["c1"]["load_s"] for d in details)
    result["memory"] = None if args.no_memory or args.quick else _memory(work)
    result["rows"] = rows(rounds, details, analysis)
    result["micro_batches"] = work.num_sequences  # micro_batch_size 1
    result["profiles"] = {key: median_round(rounds, details, key)["profile"] for key, *_ in PIPELINE_ROWS}
    result["targets"] = report.targets(rounds, analysis, result["memory"], result["default_job"],
                                       result["simulation"])
    result["per_round"], result["analysis"] = rounds, analysis
    result["load_average_end"] = os.getloadavg()
    print(report.table(result))
    print(report.profile_table(result))
    Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    if args.record:
        with open(HERE / "RESULTS.md", "a") as out:
            out.write("\n" + report.results_entry(result))
    extract.cleanup(root, keep=set())
    return 0


def median_round(rounds: list[dict], details: list[dict], key: str) -> dict:
    """The details of row `key` in the round where its time was the median."""
    order = sorted(range(len(rounds)), key=lambda i: rounds[i][key])
    return details[order[len(order) // 2]][key]


def extract_tokens(work: Workload):
    from transformers.utils import logging as hf_logging

    from bench.workload import prepared

    hf_logging.disable_progress_bar()
    return prepared(work)


def _simulation(quick: bool) -> dict:
    """The simulator's rows at N = 4, T = 60 ms, hidden 2048 (bench.simulate), on this machine."""
    from bench.simulate import MODES, simulate


    from bench.replicas import scaling

    result = simulate((2048,), (4,), MODES, micro_batches=8 if quick else 32)
    result["replicas"] = scaling(per_replica=4 if quick else 16)
    print(report.simulated(result))
    return result


def _memory(work: Workload) -> dict:
    from bench.memory import run_in_subprocess

    figures = run_in_subprocess(os.path.expanduser(work.cache_dir))
    print("stage memory (MiB): " + ", ".join(
        f"{k.removesuffix('_bytes')} {v / 2**20:.0f}" for k, v in figures.items() if k.endswith("_bytes")))
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
