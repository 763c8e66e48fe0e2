"""`python -m bench.gpu_suite [--record]`: the whole GPU bench, unattended, in one command.

    python -m bench.gpu_suite --record      # on one H100/A100: ~8 minutes, appends to bench/RESULTS.md
    python -m bench.gpu_suite --small       # CPU-sized shapes: checks the suite runs anywhere

1. `bench/gpu.py`: (a) plain forward, (c) dense capture, (d) exceedances, at OLMoE-1B-7B's
   shape on the GPU, in a fresh process (no Ray).
2. The pipeline simulator's transport rows (`bench.simulate`) with states and captures on the
   device: N = 1, 2, 4 stages sharing the GPU, M = 32, T = 60 ms, hidden 2048 and 4096, each
   storage mode; the cost of one hand-off; the dense writer against a raw write to the disk.
Each part's table is printed as it finishes; --record appends both, with the device, the
machine and the commit, to bench/RESULTS.md. A part that fails is recorded as failed, with
its last lines, and the other still runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
SMALL_GPU = ["--small", "--sequences", "2", "--seq-len", "64"]


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes (a check, not a measurement)")
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="the file --record appends to")
    parser.add_argument("--dir", help="where the run files and the writer rows go (default: the temp dir)")
    return parser.parse_args(argv)


def gpu_rows(small: bool, directory: str) -> str:
    """bench/gpu.py in its own process; its printed table."""
    out = Path(tempfile.mkdtemp(prefix="moe-outliers-gpu-", dir=directory))
    command = [sys.executable, str(HERE / "gpu.py"), "--out", str(out), *(SMALL_GPU if small else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=420)
    if done.returncode != 0:
        raise RuntimeError(f"bench/gpu.py failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout.strip()


def simulator_rows(small: bool, directory: str) -> str:
    """The simulator's transport, hand-off and writer rows on the device; its printed table."""
    import torch

    from bench.simulate import MODES, simulate, table

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if small:
        result = simulate((256,), (1, 2), MODES, wait_s=0.01, micro_batches=4, device=device,
                          directory=directory, seq_len=64)
    else:
        result = simulate((2048, 4096), (1, 2, 4), MODES, micro_batches=32, device=device, directory=directory)
    return f"States and captures on: {device}\n\n" + table(result)


def part(name: str, fn, *args) -> tuple[str, str]:
    """(heading, body) of one part; a failure becomes its body, so the other part still runs."""
    start = time.perf_counter()
    try:
        body = fn(*args)
    except Exception as err:  # recorded: an unattended run must leave a trace of what broke
        body = f"FAILED: {type(err).__name__}: {err}"
    heading = f"{name} ({time.perf_counter() - start:.0f} s)"
    print(f"### {heading}\n\n{body}\n", flush=True)
    return heading, body


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"


def entry(parts: list[tuple[str, str]], small: bool) -> str:
    """A RESULTS.md section: device, machine, commit, then each part."""
    from bench.report import machine

    m = machine()
    lines = [f"## {m['date']} — commit {m['commit']}: GPU bench{' (--small check)' if small else ''}", "",
             f"Device: {device_name()}. Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; "
             f"Python {m['python']}. Command: `python -m bench.gpu_suite{' --small' if small else ''} --record`.", ""]
    for heading, body in parts:
        lines += [f"### {heading}", "", body, ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    directory = args.dir or tempfile.gettempdir()
    parts = [part("bench/gpu.py: plain forward, dense capture, exceedances", gpu_rows, args.small, directory),
             part("bench.simulate on the device: pipeline efficiency, hand-off, driver, writer",
                  simulator_rows, args.small, directory)]
    if args.record:
        with open(args.results, "a") as out:
            out.write("\n" + entry(parts, args.small))
    Path(directory, "gpu_suite.json").write_text(json.dumps(dict(parts)))
    return 1 if any(body.startswith("FAILED") for _, body in parts) else 0


if __name__ == "__main__":
    raise SystemExit(main())
