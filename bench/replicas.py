"""`python -m bench.replicas`: how replicas scale, in the pipeline simulator at GPU shapes.

Each shape R x N runs R replicas of N simulated stages (bench.simulate: the real driver,
Dispatcher and StageActors, the layers a core-free wait T = 60 ms, states [1, 2048, 2048]
bf16, no captures) over R x M micro-batches, against one replica of N stages over M. With
perfect scaling R replicas do R times the work in the same time:

  scaling    = (R x M / seconds of R replicas) / (R x M / seconds of one) = seconds of one / of R
  driver     CPU ms of the driver process per micro-batch, at R x N actors
  cores busy how many of the machine's cores were busy (all processes): where it reaches the
             cores, the actors' own work (hand-offs, pickling) is the limit, not the driver
  beyond T   each stage of replica 0: its forward's time per micro-batch beyond the wait T
             (receiving and sending the state, the writer's queue): the actors' share

Target: scaling >= 0.9 at every shape.
"""

from __future__ import annotations

import argparse
import os

from bench.simulate import Case, run_case

SHAPES = ((8, 1), (4, 2), (2, 4), (16, 2))  # (R, N): 8, 8, 8 and 32 actors
TARGET = 0.9


def scaling(shapes=SHAPES, per_replica: int = 16, wait_s: float = 0.060, hidden: int = 2048,
            seq_len: int = 2048, device: str = "cpu") -> list[dict]:
    """One row per shape: R replicas against one, at the same per-replica work."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rows, singles = [], {}
    try:
        for replicas, stages in shapes:
            if stages not in singles:
                singles[stages] = run_case(Case(stages, "none", hidden, wait_s, per_replica, seq_len, device=device))
            many = run_case(Case(stages, "none", hidden, wait_s, per_replica * replicas, seq_len, device=device,
                                 replicas=replicas))
            one = singles[stages]
            rows.append({"replicas": replicas, "stages": stages, "actors": replicas * stages,
                         "micro_batches": per_replica * replicas, "seconds": many["seconds"],
                         "one_seconds": one["seconds"], "scaling": one["seconds"] / many["seconds"],
                         "driver_cpu_ms": many["driver_cpu_ms"], "cores_busy": many["cores_busy"],
                         "per_replica": many["replica_micro_batches"],
                         "stage_overhead_ms": many["stage_overhead_ms"]})
    finally:
        if started_here:
            ray.shutdown()
    return rows


def table(rows: list[dict]) -> str:
    cores = len(os.sched_getaffinity(0))
    lines = ["| R x N (actors) | micro-batches | seconds | one replica's seconds (M / R) | scaling (target "
             f">= {TARGET}) | driver CPU ms/mb | cores busy (of {cores}) | micro-batches per replica "
             "| r0's stages: forward ms/mb beyond T |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        met = "met" if r["scaling"] >= TARGET else "missed"
        busy = "" if r["cores_busy"] is None else f"{r['cores_busy']:.2f}"
        lines.append(f"| {r['replicas']} x {r['stages']} ({r['actors']}) | {r['micro_batches']} | {r['seconds']:.2f} | "
                     f"{r['one_seconds']:.2f} | {r['scaling']:.3f} {met} | {r['driver_cpu_ms']:.2f} | {busy} | "
                     f"{min(r['per_replica'])}-{max(r['per_replica'])} | "
                     f"{', '.join(f'{x:.1f}' for x in r['stage_overhead_ms'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.splitlines()[0])
    parser.add_argument("--per-replica", type=int, default=16, help="M: micro-batches per replica")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: states on the GPU")
    args = parser.parse_args(argv)
    print(table(scaling(per_replica=args.per_replica, device=args.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
