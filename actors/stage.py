"""One pipeline stage: a contiguous shard of decoder layers that captures as it runs.

`StageActor` is a plain class (Ray wraps it in `cluster/pipeline.py`): it loads its
layers in `__init__` and exposes one verb, `forward(micro_batch)`, which runs the
layers, hands the captured layer-norm outputs to a background writer and returns
the micro-batch with its new hidden states for the next stage.

Each stage rebuilds what its layers need from the micro-batch alone: position ids,
the 4-D attention mask (from the 2-D padding mask, which travels with the batch)
and the rotary embeddings (the rotary module holds no weights). This reproduces
the model's own forward bit for bit.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import torch

from actors import faults
from actors.capture import Capture
from actors.metrics import StageMetrics
from actors.shard import ShardSpec, load_shard
from actors.writer import BackgroundWriter, MicroBatch, make_writer


@dataclass(frozen=True)
class StageSpec:
    """Everything one stage needs, and nothing else."""

    index: int
    shard: ShardSpec
    output: str                  # run directory (path or filesystem URI)
    device: str = "auto"         # auto: the GPU Ray gave us, else the CPU
    write_depth: int = 2         # micro-batches queued for the writer before forward blocks
    num_threads: int | None = None  # torch CPU threads; None leaves torch's default
    last: bool = False           # the last stage passes no hidden states on
    warm_up: tuple[int, int] = (1, 8)  # [batch, seq] of the warm-up forward: a micro-batch's shape
    storage: str = "dense"       # dense activations, or exceedances (|x| >= floor) plus stats
    floor: float = 3.0           # smallest |x| kept in exceedances mode

    @property
    def name(self) -> str:
        """How the plan, the dashboard and the metrics call this stage."""
        return f"stage-{self.index} [layers {self.shard.layers.start}-{self.shard.layers.stop - 1}]"


def warm_up_ids(vocab_size: int, batch: int, seq: int) -> torch.Tensor:
    """The seeded random tokens of the warm-up forward # [batch, seq]; the bench warms its
    single-process baselines with the same ones, so every row starts equally cold."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def mask_kind(config, layer: int) -> str:
    """Attention kind of one layer: per-layer `layer_types`, else the model-wide window."""
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return kinds[layer]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def attention_masks(config, hidden, attention_mask, position_ids, kinds) -> dict:
    """The 4-D masks the model itself would build, one per attention kind in use."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    build = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    return {
        kind: build[kind](
            config=config, inputs_embeds=hidden, attention_mask=attention_mask,
            cache=None, position_ids=position_ids,
        )
        for kind in set(kinds)
    }


def halves(batch: MicroBatch) -> list[MicroBatch]:
    cut = len(batch.seqs) // 2
    return [
        MicroBatch(batch.index, batch.seqs[rows], batch.input_ids[rows], batch.attention_mask[rows],
                   None if batch.hidden is None else batch.hidden[rows])
        for rows in (slice(0, cut), slice(cut, None))
    ]


class StageActor:
    """Layers [a, b) of the model, capturing `ln_attn` and `ln_mlp` of each."""

    def __init__(self, spec: StageSpec):
        started = time.perf_counter()
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per stage only clutters the driver log
        self.spec = spec
        self.device = pick_device(spec.device)
        self.model = load_shard(spec.shard, self.device)
        self.config = self.model.config
        self.first = spec.shard.layers.start == 0
        self.layers = {i: self.model.model.layers[i] for i in spec.shard.layers}
        self.kinds = {i: mask_kind(self.config, i) for i in self.layers}
        self.capture = Capture(self.layers)
        self.warm_up()
        writer = make_writer(spec.output, spec.storage, spec.floor)
        self.writer = BackgroundWriter(writer, depth=spec.write_depth)
        self.load_s = time.perf_counter() - started
        self.busy_s = 0.0
        self.tokens = 0
        self.metrics = StageMetrics(spec.name)

    def warm_up(self) -> None:
        """One forward of a micro-batch's shape, captured and dropped, before any real one.

        NOTE: on the CPU, oneDNN JIT-compiles a matmul kernel for each new shape (~1.7 ms on the
        bench machine), and each micro-batch gives each expert a new row count: the first
        micro-batches of a fresh process run up to 2x slower. One forward here meets the
        attention shapes and some expert ones; sweeping every row count would cost more than
        it saves on short runs and is amortised on long ones (bench/RESULTS.md).
        """
        batch, seq = self.spec.warm_up
        ids = warm_up_ids(self.config.vocab_size, batch, seq)
        gen = torch.Generator().manual_seed(1)
        hidden = None if self.first else torch.randn(
            batch, seq, self.config.hidden_size, generator=gen).to(self.model.dtype)
        self.run_layers(MicroBatch(-1, list(range(batch)), ids, torch.ones_like(ids), hidden))
        self.capture.pop()

    @torch.inference_mode()
    def run_layers(self, batch: MicroBatch) -> torch.Tensor:
        """Hidden states after this stage's layers # [batch, seq, hidden]."""
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        if self.first:
            hidden = self.model.model.embed_tokens(ids)
        else:
            hidden = batch.hidden.to(self.device)
        position_ids = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)  # [1, seq]
        masks = attention_masks(self.config, hidden, mask, position_ids, self.kinds.values())
        rotary = self.model.model.rotary_emb(hidden, position_ids=position_ids)
        for index, layer in self.layers.items():
            hidden = layer(
                hidden, attention_mask=masks[self.kinds[index]],
                position_ids=position_ids, position_embeddings=rotary,
            )
            if isinstance(hidden, tuple):  # older layer classes return (hidden, ...)
                hidden = hidden[0]
        return hidden

    def forward(self, batch: MicroBatch) -> tuple[MicroBatch, list[int]]:
        """Run one micro-batch; returns it for the next stage, and micro-batches now committed."""
        started = time.perf_counter()
        faults.before_batch(self.spec.index, batch.index)
        hidden, captured = self.run_split(batch)
        self.writer.submit(batch, captured)
        # NOTE: the one device-to-host copy of the hidden states; the last stage skips it.
        onward = None if self.spec.last else hidden.cpu()
        out = MicroBatch(batch.index, batch.seqs, batch.input_ids, batch.attention_mask, onward)
        tokens, busy_s = int(batch.attention_mask.sum()), time.perf_counter() - started
        self.busy_s += busy_s
        self.tokens += tokens
        written = self.writer.committed()
        self._observe(tokens, busy_s, written)
        return out, written

    def run_split(self, batch: MicroBatch) -> tuple[torch.Tensor, dict]:
        """`run_layers` and its captures; on out-of-memory, the two halves one after the other.

        Rows of a batch do not interact: the values are those of the halves run as
        micro-batches, bit for bit the whole's with a batch-invariant expert kernel (batched_mm).
        """
        try:
            faults.before_layers(self.spec.index, len(batch.seqs))
            hidden = self.run_layers(batch)
            return hidden, self.capture.pop()
        except torch.OutOfMemoryError:
            self.capture.pop()
            if len(batch.seqs) == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"stage-{self.spec.index}: out of memory on micro-batch {batch.index} "
                  f"({len(batch.seqs)} sequences); running it in halves", flush=True)
            parts = [self.run_split(half) for half in halves(batch)]
            captured = {key: torch.cat([p[1][key] for p in parts]) for key in parts[0][1]}
            return torch.cat([p[0] for p in parts]), captured

    def flush(self) -> list[int]:
        """Block until every submitted micro-batch is written; returns those not yet reported."""
        written = self.writer.flush()
        self._observe(0, 0.0, written)
        return written

    def _observe(self, tokens: int, busy_s: float, written: list[int]) -> None:
        """Dashboard metrics (actors/metrics.py)."""
        self.metrics.observe(tokens, busy_s, len(written), self.writer.writer.bytes_written,
                             self.writer.depth())

    def info(self) -> dict:
        """Where this stage runs and what it holds, for the stored plan."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {
            "stage": self.spec.index,
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
        return {"busy_s": self.busy_s, "tokens": self.tokens, "bytes_written": self.writer.writer.bytes_written}


def _ray_node_id() -> str | None:
    """The Ray node this stage runs on (None outside Ray); matches the placement group's."""
    import sys

    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray and ray.is_initialized() else None
