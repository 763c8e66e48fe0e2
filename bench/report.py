"""Turn the measured rows into ratios, target verdicts, a printed table and a RESULTS.md entry."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess


def machine() -> dict:
    """What ran the bench: CPU model, cores, memory, load, commit, date."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo")
                  if line.startswith("MemTotal"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(memory / 2**30, 1),
            "python": platform.python_version(), "commit": commit + ("+dirty" if dirty else ""),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_average_start": os.getloadavg()}


def median_ratio(rounds: list[dict], top: str, bottom: str) -> float:
    """Median over rounds of rounds[i][top] / rounds[i][bottom] (noise hits both alike)."""
    return statistics.median(r[top] / r[bottom] for r in rounds)


def targets(rounds: list[dict], analysis: dict, memory: dict | None) -> list[dict]:
    """Each target of the issue: the measured value, the bar and whether it is met."""
    rows = [
        ("extraction (c, 1 stage) / plain forward (a)", median_ratio(rounds, "c1", "a"), "<=", 1.15),
        ("(b) end to end / ours (c1 extract + analysis)", median_ratio(rounds, "b", "c1_e2e"), ">=", 5.0),
        ("(b) end to end / ours, exceedance mode (d1 extract + analysis)",
         median_ratio(rounds, "b", "d1_e2e"), ">=", 5.0),
        ("throughput 2 stages / 1 stage (c2 vs c1)", median_ratio(rounds, "c1", "c2"), ">=", 1.6),
        ("analysis / Parquet read throughput (dense)", analysis["dense"]["read_s"] / analysis["dense"]["analysis_s"], ">=", 0.5),
        ("analysis / Parquet read throughput (exceedances)",
         analysis["exceedances"]["read_s"] / analysis["exceedances"]["analysis_s"], ">=", 0.5),
    ]
    if memory:
        rows.append(("stage peak RSS / stated bound", memory["peak_bytes"] / memory["bound_bytes"], "<=", 1.0))
        rows.append(("stage peak RSS while running micro-batches / stated bound",
                     memory["run_peak_bytes"] / memory["bound_bytes"], "<=", 1.0))
    return [{"target": name, "value": round(value, 3), "bar": f"{op} {bar}",
             "met": value <= bar if op == "<=" else value >= bar} for name, value, op, bar in rows]


def table(result: dict) -> str:
    """The Markdown table of rows (tokens/s, seconds, bytes) and of targets."""
    rows, tokens = result["rows"], result["tokens"]
    lines = ["| Row | Seconds (median) | Tokens/s | vs plain (a) | Bytes written | Notes |",
             "|-----|-----------------:|---------:|-------------:|--------------:|-------|"]
    plain = rows["a"]["seconds"]
    for key, row in rows.items():
        seconds = row["seconds"]
        size = f"{row['bytes']:,}" if row.get("bytes") else ""
        lines.append(f"| {row['name']} | {seconds:.3f} | {tokens / seconds:,.0f} | "
                     f"{seconds / plain:.2f}x | {size} | {row.get('notes', '')} |")
    lines += ["", "| Target | Measured | Bar | Met |", "|--------|---------:|-----|-----|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['value']} | {t['bar']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def results_entry(result: dict) -> str:
    """A RESULTS.md section: machine, date, commit, workload, the table."""
    m = result["machine"]
    return "\n".join([
        f"## {m['date']} — commit {m['commit']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}; "
        f"load average at start {tuple(round(x, 2) for x in m['load_average_start'])}, "
        f"at end {tuple(round(x, 2) for x in result['load_average_end'])}.",
        f"Workload: {result['workload']}; {result['rounds']} interleaved rounds, medians; "
        f"Ray cluster start {result['cluster_start_s']:.1f} s (once), "
        f"stage load {result['load_s']:.1f} s (median, 1 stage), not in any row.",
        "",
        table(result),
        "",
    ])
