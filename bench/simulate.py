"""`python -m bench.simulate`: the pipeline at GPU shapes, its layers' compute replaced by a wait.

The driver is the real one (`cluster.drive.drive`) and every stage is a real
`StageActor` in its own Ray actor: the same `forward`, hand-off (`MicroBatch` wire bytes
through the object store), writer queue and commits. Only two parts stand in:
- the layers: a core-free wait of T per micro-batch (what a GPU's compute is to the CPU),
  handing on a state of the real shape # [1, seq, hidden] bf16;
- the files: writers do the real encoding (dense: bf16 -> fp16 check, Arrow arrays, IPC
  serialisation; exceedances: selection, statistics, Parquet) into a byte-counting sink, so
  the figures are the pipeline's own. The disk is measured apart (`writer_rows`).

Figures:
  efficiency  (M + N - 1) * T / measured time of `drive`, for N stages and M micro-batches
  hand-off    one more stage at T = 0 with one micro-batch in flight: an actor call plus the
              state's transfer, per micro-batch
  driver      CPU seconds of the driver process per micro-batch
  writer      the dense writer to disk (prepare + write + sync) against a raw sequential write
              of the same bytes to the same directory; dense mode is writer-bound below
              T* = the writer's seconds per micro-batch
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from actors.handoff import MicroBatch
from common.layout import SITES
from actors.shard import ShardSpec
from actors.stage import StageActor, StageSettings, StageSpec, pick_device
from actors.writer import DenseTables, ExceedanceTables
from common.storage import DENSE, EXCEEDANCES, StorageConfig

MODES = ("none", DENSE, EXCEEDANCES)


@dataclass(frozen=True)
class Case:
    """One simulated pipeline."""

    stages: int
    mode: str = DENSE          # none (no captures), dense or exceedances
    hidden: int = 2048
    wait_s: float = 0.060        # T: a stage's layer compute per micro-batch
    micro_batches: int = 32      # M
    seq_len: int = 2048
    layers: int = 1              # captured layers per stage (two sites each)
    in_flight: int = 0           # 0: the pipeline's default, stages + 1
    device: str = "cpu"
    replicas: int = 1            # R pipelines side by side, sharing the M micro-batches

    @property
    def ideal_s(self) -> float:
        return (-(-self.micro_batches // self.replicas) + self.stages - 1) * self.wait_s

    def name(self) -> str:
        copies = f"R={self.replicas} " if self.replicas > 1 else ""
        return (f"{copies}N={self.stages} M={self.micro_batches} T={self.wait_s * 1000:g}ms {self.mode} "
                f"[1, {self.seq_len}, {self.hidden}] bf16, {self.layers} layer(s) captured per stage")


class WaitSlice:
    """In place of `actors.handoff.LayerSlice`: waits T without using a core, and hands on
    the state it received (stage 0: one of the real shape)."""

    def __init__(self, state: torch.Tensor, wait_s: float, first: bool, last: bool):
        self.state, self.wait_s, self.first, self.last = state, wait_s, first, last
        self.carries, self.arity, self.arities = ("hidden_states",), 1, {1}

    def run(self, input_ids, attention_mask, state):
        time.sleep(self.wait_s)
        if self.last:
            return None
        return (self.state,) if state is None else state

    def remove(self) -> None:
        pass


class StandInCapture:
    """In place of `actors.capture.Capture`: the same stand-in activations every micro-batch,
    normal(0, 1) in bf16, so the encoding and the selection see realistic values."""

    def __init__(self, sites: dict):
        self.sites = sites

    def pop(self) -> dict:
        return dict(self.sites)

    def clear(self) -> None:
        pass

    def remove(self) -> None:
        pass


class Sink:
    """Serialises each table as the real writer does, counts its bytes and drops them."""

    def write(self, pieces) -> None:
        self.bytes_written += self.rehearse(pieces)


class DenseSink(Sink, DenseTables):
    pass


class ExceedanceSink(Sink, ExceedanceTables):
    pass


class NoTables:
    """Mode `none`: nothing captured, nothing written (the pipeline's transport alone)."""

    bytes_written = 0

    def prepare(self, batch, captured, moe=None) -> list:
        return []

    def write(self, pieces) -> None:
        pass


class SimStage(StageActor):
    """A `StageActor` whose layers and files stand in (see the module docstring)."""

    def __init__(self, spec: StageSpec, case: Case):
        started = time.perf_counter()
        torch.set_num_threads(1)
        self.spec, self.device = spec, pick_device(spec.pipeline.device)
        gen = torch.Generator().manual_seed(spec.index)
        shape = (1, case.seq_len, case.hidden)  # [batch, seq, hidden]
        self.config = SimpleNamespace(hidden_size=case.hidden, model_type="simulated")
        state = torch.randn(*shape, generator=gen).to(torch.bfloat16).to(self.device)
        self.slice = WaitSlice(state, case.wait_s, spec.index == 0, spec.index == case.stages - 1)
        layers = spec.shard.layers if case.mode != "none" else range(0)
        self.capture = StandInCapture({(layer, site): torch.randn(*shape, generator=gen).to(torch.bfloat16)
                                      .to(self.device) for layer in layers for site in SITES})
        self.moe, self.unchecked, self.model = None, False, torch.nn.Module()  # no weights
        writer = {"none": NoTables, DENSE: lambda: DenseSink(spec.storage.output),
                  EXCEEDANCES: lambda: ExceedanceSink(spec.storage.output, spec.storage.floor)}[case.mode]()
        self.start_writing(writer, started)


def stage_specs(case: Case, replica: int = 0) -> list[StageSpec]:
    return [StageSpec(i, ShardSpec("simulated", range(i * case.layers, (i + 1) * case.layers), "bfloat16"),
                      StorageConfig("/nonexistent", EXCEEDANCES if case.mode == EXCEEDANCES else DENSE),
                      # a GPU stage's writes, on their own thread, whatever the device
                      pipeline=StageSettings(device=case.device, writer="thread"), replica=replica)
            for i in range(case.stages)]


def batches(case: Case, count: int, first: int = 0) -> list[MicroBatch]:
    ids = torch.zeros(1, case.seq_len, dtype=torch.long)
    return [MicroBatch(first + i, [first + i], ids, torch.ones_like(ids)) for i in range(count)]


def sim_drive(replicas: list[list], batches: list[MicroBatch], in_flight: int) -> None:
    """The real driver (cluster.drive) over `replicas`, as cluster.run gives it its Dispatcher."""
    from cluster.dispatch import Dispatcher
    from cluster.drive import drive

    tokens = {b.index: int(b.attention_mask.sum()) for b in batches}
    dispatcher = Dispatcher(list(tokens), len(replicas), len(replicas[0]), in_flight, tokens=tokens)
    drive(replicas, batches, dispatcher, lambda done: None)


def run_case(case: Case, warm: int = 2) -> dict:
    """Start the stages, drive `warm` micro-batches per replica, then time M of them; the stages' figures."""
    import ray

    from cluster.pipeline import CALLS_AT_ONCE, OneComputeThread

    actors = case.stages * case.replicas
    gpus = 1 / actors if case.device == "cuda" else 0
    cpus = min(1.0, len(os.sched_getaffinity(0)) / (actors + 1))
    # NOTE: the stages' Ray options as `cluster.pipeline.start_stages` gives them.
    remote = ray.remote(type("SimRayStage", (OneComputeThread, SimStage), {})).options(
        num_cpus=cpus, num_gpus=gpus, max_concurrency=CALLS_AT_ONCE)
    replicas = [[remote.remote(spec, case) for spec in stage_specs(case, r)] for r in range(case.replicas)]
    stages = [stage for replica in replicas for stage in replica]
    try:
        ray.get([s.info.remote() for s in stages])
        in_flight = case.in_flight or case.stages + 1
        sim_drive(replicas, batches(case, warm * case.replicas), in_flight)
        before = ray.get([s.stats.remote() for s in stages])
        cpu, start, machine = time.process_time(), time.perf_counter(), busy_ticks()
        sim_drive(replicas, batches(case, case.micro_batches, warm * case.replicas), in_flight)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        machine = [after - before for before, after in zip(machine, busy_ticks())]
        after = ray.get([s.stats.remote() for s in stages])
    finally:
        for stage in stages:
            ray.kill(stage)
    mbs = [a["micro_batches"] - b["micro_batches"] for a, b in zip(after, before)]
    per_mb = lambda key: [(a[key] - b[key]) / max(n, 1) for a, b, n in zip(after, before, mbs)]  # noqa: E731
    busy = per_mb("busy_s")[:case.stages]
    return {"case": case.name(), "stages": case.stages, "replicas": case.replicas, "mode": case.mode,
            "hidden": case.hidden, "seconds": wall, "ideal_s": case.ideal_s,
            "efficiency": case.ideal_s / wall if case.wait_s else None,
            "driver_cpu_ms": 1000 * cpu / case.micro_batches,
            "cores_busy": machine[0] / machine[1] * len(os.sched_getaffinity(0)) if machine[1] else None,
            "stage_overhead_ms": [round(1000 * (b - case.wait_s), 2) for b in busy],
            "tables_ms": [round(1000 * t, 2) for t in per_mb("tables_s")[:case.stages]],
            "replica_micro_batches": mbs[::case.stages],
            "bytes_per_stage": after[0]["bytes_written"] - before[0]["bytes_written"]}


def busy_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far (/proc/stat; zeros elsewhere): every
    process counts, Ray's own included, so `cores_busy` says whether the cores ran out."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return 0, 0
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def handoff_ms(hidden: int, device: str, micro_batches: int = 32, seq_len: int = 2048) -> float:
    """One hand-off: the time per micro-batch that a second stage adds at T = 0, one in flight."""
    one, two = (run_case(Case(n, "none", hidden, 0.0, micro_batches, seq_len, in_flight=1, device=device))
                for n in (1, 2))
    return 1000 * (two["seconds"] - one["seconds"]) / micro_batches


def writer_rows(directory: str, hidden: int = 2048, seq_len: int = 2048, layers: int = 4,
                micro_batches: int = 8) -> dict:
    """The real dense writer to disk against a raw sequential write of the same bytes.

    Both end with `os.sync()`, so each figure is the time until the bytes are on the disk,
    not only in the page cache. `prepare` (the stage's thread) is reported apart from `write`.
    """
    case = Case(1, DENSE, hidden, 0.0, micro_batches, seq_len, layers)
    gen = torch.Generator().manual_seed(0)
    sites = {(layer, site): torch.randn(1, seq_len, hidden, generator=gen).to(torch.bfloat16)
             for layer in range(layers) for site in SITES}
    root = tempfile.mkdtemp(prefix="moe-outliers-writer-", dir=directory)
    try:
        writer = DenseTables(root)
        os.sync()
        prepare_s = write_s = 0.0
        for batch in batches(case, micro_batches):
            start = time.perf_counter()
            pieces = writer.prepare(batch, sites)
            prepare_s += time.perf_counter() - start
            start = time.perf_counter()
            writer.write(pieces)
            write_s += time.perf_counter() - start
        start = time.perf_counter()
        os.sync()
        write_s += time.perf_counter() - start
        total = writer.bytes_written
        raw_s = raw_write(os.path.join(root, "raw.bin"), total, total // (micro_batches * len(sites)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    per_mb = total / micro_batches
    return {"bytes_per_mb": per_mb, "prepare_ms_per_mb": 1000 * prepare_s / micro_batches,
            "write_ms_per_mb": 1000 * write_s / micro_batches, "writer_mb_s": total / write_s / 1e6,
            "raw_mb_s": total / raw_s / 1e6, "writer_vs_raw": raw_s / write_s,
            "writer_bound_below_ms": 1000 * write_s / micro_batches,
            "shape": f"{layers} layers x 2 sites of [1, {seq_len}, {hidden}] bf16 per micro-batch"}


def raw_write(path: str, total: int, chunk: int) -> float:
    """Seconds to write `total` bytes sequentially in `chunk`-sized writes, then sync."""
    block = os.urandom(min(chunk, 1 << 20)) * max(1, chunk // (1 << 20))
    start = time.perf_counter()
    with open(path, "wb") as out:
        left = total
        while left > 0:
            left -= out.write(block[:left])
    os.sync()
    return time.perf_counter() - start


def simulate(hiddens=(2048, 4096), stage_counts=(1, 2, 4), modes=MODES, wait_s: float = 0.060,
             micro_batches: int = 32, device: str = "cpu", directory: str | None = None,
             seq_len: int = 2048) -> dict:
    """Every figure of the module docstring, in one Ray session of its own."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        cases = [run_case(Case(n, mode, hidden, wait_s, micro_batches, seq_len, device=device))
                 for hidden in hiddens for mode in modes for n in stage_counts]
        handoffs = {hidden: handoff_ms(hidden, device, micro_batches, seq_len) for hidden in hiddens}
    finally:
        if started_here:
            ray.shutdown()
    writer = writer_rows(directory or tempfile.gettempdir(), hiddens[0], seq_len)
    return {"cases": cases, "handoff_ms": handoffs, "writer": writer, "seq_len": seq_len}


def table(result: dict) -> str:
    cores = len(os.sched_getaffinity(0))
    lines = ["| Case | Seconds | Ideal (M+N-1)T | Efficiency | Driver CPU ms/mb | Stage forward ms/mb beyond T "
             f"| of which tables | Cores busy (of {cores}) |",
             "|------|--------:|---------------:|-----------:|-----------------:|--------------------------|"
             "-----------------|------:|"]
    for c in result["cases"]:
        eff = "" if c["efficiency"] is None else f"{c['efficiency']:.3f}"
        busy = "" if c.get("cores_busy") is None else f"{c['cores_busy']:.2f}"
        lines.append(f"| {c['case']} | {c['seconds']:.3f} | {c['ideal_s']:.3f} | {eff} | "
                     f"{c['driver_cpu_ms']:.1f} | {', '.join(f'{x:.1f}' for x in c['stage_overhead_ms'])} | "
                     f"{', '.join(f'{x:.1f}' for x in c['tables_ms'])} | {busy} |")
    lines += ["", "One hand-off (actor call + state transfer, one micro-batch in flight): " + ", ".join(
        f"[1, {result['seq_len']}, {h}] bf16 {ms:.1f} ms" for h, ms in result["handoff_ms"].items())]
    w = result["writer"]
    lines += [f"Dense writer to disk ({w['shape']}, {w['bytes_per_mb'] / 2**20:.0f} MiB): "
              f"{w['writer_mb_s']:.0f} MB/s against a raw sequential write of {w['raw_mb_s']:.0f} MB/s "
              f"({w['writer_vs_raw']:.2f}x); prepare {w['prepare_ms_per_mb']:.1f} ms/mb on the stage's thread; "
              f"writer-bound when T < {w['writer_bound_below_ms']:.0f} ms for this many bytes per micro-batch"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hidden 2048 only, 8 micro-batches")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: states and captures on the GPU")
    parser.add_argument("--wait-ms", type=float, default=60.0, help="T, a stage's compute per micro-batch")
    parser.add_argument("--dir", help="where the writer rows write (default: the temp dir)")
    args = parser.parse_args(argv)
    hiddens = (2048,) if args.quick else (2048, 4096)
    result = simulate(hiddens, wait_s=args.wait_ms / 1000, micro_batches=8 if args.quick else 32,
                      device=args.device, directory=args.dir)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
