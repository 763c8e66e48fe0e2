"""One pipeline stage: a contiguous shard of decoder layers that captures as it runs.

`StageActor` is a plain class (Ray wraps it in `cluster/pipeline.py`): it loads its
layers in `__init__` and exposes one verb, `forward(micro_batch)`, which runs the
layers, hands the captured block inputs to its writer (on a thread of its own, or inline
on a CPU stage: actors/background.py) and returns the micro-batch with its new hidden
states for the next stage.

The layers run inside the model's own forward (actors/handoff.py), fed the micro-batch's
token ids and 2-D padding mask: masks, positions and rotary embeddings are the model's
own, so the results equal a single-process forward bit for bit.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, fields

import torch

from actors import faults
from actors.capture import Capture, CaptureConfig, CaptureError
from actors.moe import MoeProbe, moe_blocks
from actors.families import family_of, inner_model
from actors.handoff import HandoffError, LayerSlice, MicroBatch, join_states, noise_in, same_state
from actors.metrics import StageMetrics
from actors.shard import ShardSpec, load_shard
from actors.background import WRITE_DEPTH, InlineRunner, ThreadRunner
from actors.writer import tables_for
from common.config import choice, positive
from common.runtime import ray_running
from common.storage import StorageConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSettings:
    """The part of the `pipeline:` config section a stage reads (PipelineConfig extends it)."""

    device: str = "auto"
    """auto (GPU when Ray gives one, else CPU), cuda or cpu."""
    write_depth: int = WRITE_DEPTH
    """Micro-batches queued for a stage's writes before the stage waits."""
    writer: str = "auto"
    """Where a stage writes its files: auto (inline on a CPU stage writing to a local path, else
    a thread of its own), thread or inline (actors/background.py)."""

    def __post_init__(self):
        positive("pipeline.write_depth", self.write_depth)
        choice("pipeline.writer", self.writer, ["auto", "thread", "inline"])
        choice("pipeline.device", self.device, ["auto", "cuda", "cpu"])

    def stage_part(self) -> StageSettings:
        """These settings alone, without the rest of a PipelineConfig."""
        return StageSettings(**{f.name: getattr(self, f.name) for f in fields(StageSettings)})


@dataclass(frozen=True)
class StageSpec:
    """Everything one stage needs, and nothing else."""

    index: int                   # the stage's place in its pipeline
    shard: ShardSpec
    storage: StorageConfig       # the run's `storage:` section: output, mode, floor
    capture: CaptureConfig = CaptureConfig()  # the run's `capture:` section: routing, experts, residual
    pipeline: StageSettings = StageSettings()  # the run's `pipeline:` section, the part a stage reads
    replica: int = 0             # which of the run's pipelines (cluster/dispatch.py)
    num_threads: int | None = None  # torch CPU threads; None leaves torch's default
    warm_up: tuple[int, int] = (1, 8)  # [batch, seq] of the warm-up forward: a micro-batch's shape

    @property
    def name(self) -> str:
        """How the plan, the dashboard and the metrics call this stage: `r1/stage-0 [layers 0-23]`."""
        return f"r{self.replica}/stage-{self.index} [layers {self.shard.layers.start}-{self.shard.layers.stop - 1}]"


def warm_up_ids(vocab_size: int, batch: int, seq: int) -> torch.Tensor:
    """The seeded random tokens of the warm-up forward # [batch, seq]; the bench warms its
    single-process baselines with the same ones, so every row starts equally cold."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class StageActor:
    """Layers [a, b) of the model, capturing `ln_attn` and `ln_mlp` of each."""

    def __init__(self, spec: StageSpec):
        started = time.perf_counter()
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per stage only clutters the driver log
        self.spec = spec
        self.device = pick_device(spec.pipeline.device)
        self.model = load_shard(spec.shard, self.device)
        self.config = self.model.config
        family = family_of(self.config.model_type)
        decoder = getattr(inner_model(self.model, family), family.layers)
        self.slice = LayerSlice(self.model, family, spec.shard.layers, len(decoder))
        self.embed = getattr(inner_model(self.model, family), family.embed)
        layers = {i: decoder[i] for i in spec.shard.layers}
        self.capture = Capture(layers, family, self.config.model_type, residual=spec.capture.residual)
        wanted = spec.capture.routing or spec.capture.experts
        self.moe = MoeProbe(moe_blocks(layers, family), spec.capture.routing, spec.capture.experts,
                            spec.storage.floor) if wanted else None
        self.unchecked = not self.slice.first  # the hand-off is checked on the first micro-batch
        tables = tables_for(spec.storage.output, spec.storage.mode, spec.storage.floor)
        self.warm_up(tables)
        self.start_writing(tables, started)

    def start_writing(self, tables, started: float) -> None:
        """The runner of the tables' writes (actors/background.py) and the counters; the stage is
        ready once this returns. With `writer: auto`, a CPU stage writing to a local path writes inline."""
        where = self.spec.pipeline.writer
        inline = where == "inline" or (where == "auto" and self.device.type == "cpu" and tables.layout.local)
        self.runner = InlineRunner(tables) if inline else ThreadRunner(tables, depth=self.spec.pipeline.write_depth)
        self.load_s = time.perf_counter() - started
        self.busy_s = self.layers_s = 0.0
        self.tokens = self.micro_batches = 0
        self.metrics = StageMetrics(self.spec.name, self.spec.replica)

    def warm_up(self, tables=None) -> None:
        """One forward of a micro-batch's shape before any real one, its tables prepared and
        serialised by `tables` into nowhere (Tables.rehearse).

        Past stage 0 it runs on what the model's forward brings layer a from stand-in
        embeddings of noise; families whose layers carry more than the hidden states need
        an earlier stage's state and are not warmed up.

        NOTE: on the CPU, oneDNN JIT-compiles a matmul kernel for each new shape (~1.7 ms on the
        bench machine), and each micro-batch gives each expert a new row count: the first
        micro-batches of a fresh process run up to 2x slower. One forward here meets the
        attention shapes and some expert ones; sweeping every row count would cost more than
        it saves on short runs and is amortised on long ones (bench/RESULTS.md). The tables'
        first serialisation imports pyarrow's Parquet and pandas modules (~0.7 s on the bench
        machine), paid here rather than by the first micro-batch.
        """
        if not self.slice.first and len(self.slice.carries) > 1:
            return
        batch, seq = self.spec.warm_up
        ids = warm_up_ids(self.config.vocab_size, batch, seq)
        rehearsal = MicroBatch(-1, list(range(batch)), ids, torch.ones_like(ids))
        try:
            with noise_in(self.embed):
                _, captured, moe = self.run_layers(rehearsal)
        except Exception as err:
            if self.slice.first or isinstance(err, (HandoffError, CaptureError)):
                raise
            raise HandoffError(
                f"model_type={self.config.model_type!r}: layers {self.spec.shard.layers.start}-"
                f"{self.spec.shard.layers.stop - 1} could not run on the hidden states alone ({err}); "
                "its layers may pass more to each other: set `carries` for the family in actors/families.py."
            ) from None
        self.check_arity()
        if tables is not None:
            tables.rehearse(tables.prepare(rehearsal, captured, moe))

    def check_handoff(self, batch: MicroBatch, state, captured: dict) -> None:
        """Past stage 0, once: the first micro-batch run again over stand-in embeddings of noise
        must give the same results, or the family's layers read something the hand-off does
        not carry (values the model derives from the embeddings before its first layer)."""
        with noise_in(self.embed):
            again, recaptured, _ = self.run_layers(batch)
        if not same_state(state, again) or any(
                not same_state((captured[k],), (recaptured[k],)) for k in captured):
            raise HandoffError(
                f"model_type={self.config.model_type!r}: its decoder layers read more than the state "
                "one layer passes to the next (something the model derives from the embeddings "
                "before its first layer), so its layers cannot be split; use pipeline.num_stages=1."
            )
        self.check_arity()

    def check_arity(self) -> None:
        """Refuse a family whose layers return another number of values than it carries."""
        if self.slice.arities != {self.slice.arity}:
            raise HandoffError(
                f"model_type={self.config.model_type!r}: its decoder layers return "
                f"{sorted(self.slice.arities)} values, but actors/families.py says {self.slice.arity}; "
                "set `carries` (and `returns`) for the family there."
            )

    @torch.no_grad()
    def run_layers(self, batch: MicroBatch) -> tuple[tuple | None, dict, list]:
        """The state after this stage's layers (None on the last stage), the site captures, and
        the MoE captures as [(seqs, real-token mask, MoeProbe.pop())]."""
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        incoming = None if batch.hidden is None else tuple(
            None if t is None else t.to(self.device) for t in batch.hidden)
        if self.moe:
            # NOTE: asked of the host's mask, so a GPU stage never waits on the device for it.
            self.moe.keep = None if bool(batch.attention_mask.all()) else mask.bool()
        try:
            onward = self.slice.run(ids, mask, incoming)
        except BaseException:
            self.capture.clear()
            if self.moe:
                self.moe.pop()
            raise
        # NOTE: some blocks take their input flattened to [batch * seq, hidden].
        captured = {key: value.reshape(*ids.shape, -1) for key, value in self.capture.pop().items()}
        wrong = [key for key, value in captured.items() if value.shape[-1] != self.config.hidden_size]
        if wrong:
            raise CaptureError(f"model_type={self.config.model_type!r}: layer {wrong[0][0]} {wrong[0][1]} is "
                               f"{tuple(captured[wrong[0]].shape)}, not [batch, seq, {self.config.hidden_size}] "
                               "(several residual streams?); turn capture.residual off for this family.")
        return onward, captured, [(batch.seqs, batch.attention_mask.bool(), self.moe.pop())] if self.moe else []

    def forward(self, batch: MicroBatch) -> tuple[MicroBatch, list[int]]:
        """Run one micro-batch; returns it for the next stage, and micro-batches now committed."""
        started = time.perf_counter()
        faults.before_batch(self.spec.index, batch.index, self.spec.replica)
        state, captured, moe = self.run_split(batch)
        if self.device.type == "cuda":
            # NOTE: so `layers_s` is the layers' time, not their launch: the tables' copy to the
            # host waits for them right after anyway.
            torch.cuda.synchronize(self.device)
        self.layers_s += time.perf_counter() - started
        if self.unchecked:
            self.check_handoff(batch, state, captured)
            self.unchecked = False
        self.runner.submit(batch, captured, moe)
        # NOTE: the one device-to-host copy of the hidden states; the last stage has none.
        onward = None if state is None else tuple(None if t is None else t.cpu() for t in state)
        out = MicroBatch(batch.index, batch.seqs, batch.input_ids, batch.attention_mask, onward)
        tokens, busy_s = int(batch.attention_mask.sum()), time.perf_counter() - started
        self.busy_s += busy_s
        self.tokens += tokens
        self.micro_batches += 1
        written = self.runner.committed()
        self._observe(tokens, written)
        return out, written

    def run_split(self, batch: MicroBatch) -> tuple[tuple | None, dict, list]:
        """`run_layers` and its captures; on out-of-memory, the two halves one after the other.

        Rows of a batch do not interact: the values are those of the halves run as
        micro-batches, bit for bit the whole's with a batch-invariant expert kernel (batched_mm).
        """
        try:
            faults.before_layers(self.spec.index, len(batch.seqs))
            return self.run_layers(batch)
        except torch.OutOfMemoryError:
            if len(batch.seqs) == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("out of memory on micro-batch %d (%d sequences); running it in halves",
                        batch.index, len(batch.seqs))
            cut = len(batch.seqs) // 2
            parts = [self.run_split(batch.rows(rows)) for rows in (slice(0, cut), slice(cut, None))]
            captured = {key: torch.cat([p[1][key] for p in parts]) for key in parts[0][1]}
            return join_states([p[0] for p in parts]), captured, parts[0][2] + parts[1][2]

    def flush(self) -> list[int]:
        """Block until every submitted micro-batch is written; returns those not yet reported."""
        written = self.runner.flush()
        self._observe(0, written)
        return written

    def close(self) -> list[int]:
        """Write what is queued, stop the writer and take the hooks out; returns the micro-batches
        written since last reported."""
        written = self.flush()
        self.runner.close()
        self.capture.remove()
        self.slice.remove()
        if self.moe:
            self.moe.remove()
        return written

    def _observe(self, tokens: int, written: list[int]) -> None:
        """Dashboard metrics (actors/metrics.py)."""
        self.metrics.observe(tokens, len(written), self.stats(), self.runner.depth())

    def info(self) -> dict:
        """Where this stage runs and what it holds, for the stored plan."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {
            "stage": self.spec.index,
            "replica": self.spec.replica,
            "name": self.spec.name,
            "layers": [self.spec.shard.layers.start, self.spec.shard.layers.stop],
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.device),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "node_id": _ray_node_id(),
            "param_bytes": params,
            "load_s": round(self.load_s, 3),
        }

    def stats(self) -> dict:
        """Counters since load. Of `busy_s` (seconds in `forward`): `layers_s` ran the layers,
        `tables_s` prepared the tables, `writer_wait_s` waited for the writer (room in its queue,
        or the files themselves when it runs inline); `write_s` is the time writing files."""
        runner = self.runner
        return {"busy_s": self.busy_s, "tokens": self.tokens, "micro_batches": self.micro_batches,
                "bytes_written": runner.tables.bytes_written, "layers_s": self.layers_s,
                "tables_s": runner.prepare_s, "writer_wait_s": runner.wait_s, "write_s": runner.write_s}


def profile(after: dict, before: dict | None = None) -> dict:
    """ms per micro-batch between two `StageActor.stats` (since load without `before`): `forward`
    and its parts (layers, tables, writer_wait, other), and `files`: the time writing them, beside
    `forward` on a writer thread, or inside its writer_wait when the stage writes inline."""
    before = before or dict.fromkeys(after, 0)
    count = after["micro_batches"] - before["micro_batches"]
    per = lambda key: 1000 * (after[key] - before[key]) / count  # noqa: E731
    parts = {"layers": per("layers_s"), "tables": per("tables_s"), "writer_wait": per("writer_wait_s")}
    return {"forward": per("busy_s"), **parts, "other": per("busy_s") - sum(parts.values()), "files": per("write_s")}


def _ray_node_id() -> str | None:
    """The Ray node this stage runs on (None outside Ray); matches the placement group's."""
    if not ray_running():
        return None
    import ray

    return ray.get_runtime_context().get_node_id()
