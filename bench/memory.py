"""Stage memory: peak RSS of one stage against its shard's weights + in-flight data + overhead.

Runs in a fresh process (`python -m bench.memory OUT.json`) so the peak is the stage's own:
the StageActor class the Ray actor wraps, loaded with half the layers of a checkpoint of a
few hundred MB, then fed micro-batches with dense capture. Linux only (reads /proc).

The bound we state:  peak <= weights + in_flight + FIXED_OVERHEAD, where
  weights   = parameter bytes of the shard,
  in_flight = (write_depth + 2) micro-batches of captured activations (queued, being
              written, being captured) + 2 hidden-state tensors (in and out),
  overhead  = the process after importing torch, transformers and our modules (measured)
              + FIXED_SLACK for allocator caches and the from_pretrained load path.
Through Ray a stage also holds the next micro-batch's incoming state while it computes
(`cluster.pipeline.OneComputeThread`): one more hidden-state tensor, not measured here.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

FIXED_SLACK = 256 * 2**20  # bytes; the stated part of the fixed overhead
SPEC = dict(arch="qwen3_moe", num_layers=8, hidden_size=512, num_experts=16, top_k=2,
            expert_size=512, num_heads=8, num_kv_heads=4, vocab_size=1024, seed=0)
SEQ, BATCHES, MICRO_BATCH = 512, 6, 2


def status(key: str) -> int:
    """A /proc/self/status figure (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # NOTE: resets VmHWM to the current RSS


def measure(cache_dir: str) -> dict:
    import torch

    from actors.shard import ShardSpec
    from actors.stage import StageSpec
    from common.storage import StorageConfig
    from cluster.executor import LocalExecutor
    from cluster.pipeline import PipelineConfig
    from actors.handoff import MicroBatch
    from cluster.tiny_model import TinySpec, build_tiny

    torch.set_num_threads(1)
    path = build_tiny(TinySpec(**SPEC), cache_dir)
    checkpoint = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    reset_peak()
    base = status("VmRSS")  # the process with every module imported: fixed overhead
    out = tempfile.mkdtemp(prefix="bench-memory-")
    spec = StageSpec(0, ShardSpec(path, range(0, SPEC["num_layers"] // 2), "float32"), StorageConfig(out),
                     num_threads=1)
    executor = LocalExecutor(PipelineConfig())  # the local executor: the stage in this process
    with Sampler() as sampled:
        executor.start([[spec]])
    stage = executor.stages[0]
    load_peak, after_load = status("VmHWM"), status("VmRSS")
    weights = sum(p.numel() * p.element_size() for p in stage.model.parameters())
    reset_peak()
    start = time.perf_counter()
    ids = torch.randint(0, SPEC["vocab_size"], (MICRO_BATCH, SEQ))
    executor.run_all([MicroBatch(index, list(range(MICRO_BATCH)), ids, torch.ones_like(ids))
                      for index in range(BATCHES)])
    run_peak = status("VmHWM")
    hidden = MICRO_BATCH * SEQ * SPEC["hidden_size"] * 4  # float32 [batch, seq, hidden]
    in_flight = (spec.pipeline.write_depth + 2) * 2 * len(spec.shard.layers) * hidden + 2 * hidden
    bound = weights + in_flight + base + FIXED_SLACK
    return {
        "checkpoint_bytes": checkpoint, "shard_weight_bytes": weights, "in_flight_bytes": in_flight,
        "import_baseline_bytes": base, "fixed_slack_bytes": FIXED_SLACK, "bound_bytes": bound,
        "load_peak_bytes": load_peak, "after_load_bytes": after_load, "run_peak_bytes": run_peak,
        "peak_bytes": max(load_peak, run_peak), "run_s": time.perf_counter() - start,
        "load_anon_peak_bytes": sampled.anon, "load_file_peak_bytes": sampled.file,
    }


class Sampler:
    """The largest anonymous and file-backed RSS seen while the block runs, sampled every 2 ms.

    Explains the load peak: file-backed pages are the memory-mapped checkpoint's, which the
    kernel can drop at any time; anonymous ones are the process's own. Sampled, so a lower
    bound of each true peak; the bound's check uses VmHWM, which is exact.
    """

    def __enter__(self):
        import threading

        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.anon, self.file = max(self.anon, status("RssAnon")), max(self.file, status("RssFile"))

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()


def run_in_subprocess(cache_dir: str, timeout: float = 300) -> dict:
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "bench.memory", out.name, cache_dir],
                       check=True, timeout=timeout, capture_output=True)
        return json.loads(Path(out.name).read_text())


if __name__ == "__main__":
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    Path(sys.argv[1]).write_text(json.dumps(measure(sys.argv[2])))
