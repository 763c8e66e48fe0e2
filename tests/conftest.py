"""Shared fixtures: tiny checkpoints built locally, and a single-process reference forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.capture import Capture
from actors.shard import load_full
from cluster.tiny_model import Plant, TinySpec, build_tiny

# Small enough to load in well under a second; 6 layers so 3 stages get 2 each.
SMALL = dict(num_layers=6, hidden_size=64, num_experts=4, top_k=2, expert_size=32,
             num_heads=4, num_kv_heads=2, vocab_size=512, max_position=256)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_checkpoint(model_cache):
    """build(arch, **changes) -> local checkpoint dir of a small seeded model."""

    def build(arch: str = "qwen3_moe", **changes) -> str:
        return build_tiny(TinySpec(arch=arch, **{**SMALL, **changes}), model_cache)

    return build


@pytest.fixture(scope="session")
def planted_checkpoint(tiny_checkpoint):
    """Qwen3-MoE with dims 5 and 40 planted in layers 0-3 of 6; decoys 20 (one layer), 9 (weak)."""
    plants = (
        Plant(dim=5, layers=(0, 1, 2, 3), scale=40.0),
        Plant(dim=40, layers=(0, 1, 2, 3), scale=40.0),
        Plant(dim=20, layers=(3,), scale=40.0),
        Plant(dim=9, layers=tuple(range(6)), scale=1.5),
    )
    return tiny_checkpoint(plants=plants)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stages(model_path, dtype, out, ids, mask, num_layers=6, num_stages=2, micro_batch=2, **spec):
    """Capture every layer through in-process stages, micro-batch by micro-batch; returns them."""
    from actors.shard import ShardSpec
    from actors.stage import StageActor, StageSpec
    from actors.writer import MicroBatch
    from cluster.plan import plan_stages

    stages = [
        StageActor(StageSpec(i, ShardSpec(model_path, layers, dtype), str(out),
                             last=i == num_stages - 1, **spec))
        for i, layers in enumerate(plan_stages([1] * num_layers, num_stages))
    ]
    for index, start in enumerate(range(0, len(ids), micro_batch)):
        rows = slice(start, start + micro_batch)
        batch = MicroBatch(index, list(range(start, min(start + micro_batch, len(ids)))), ids[rows], mask[rows])
        for stage in stages:
            batch, _ = stage.forward(batch)
    for stage in stages:
        stage.flush()
    return stages


def token_batch(seed: int, batch: int, seq: int, vocab: int = 512, pad_last: int = 0):
    """Random token ids # [batch, seq] and a padding mask with the last row right-padded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    if pad_last:
        mask[-1, seq - pad_last:] = 0
    return ids, mask


def reference_activations(model_path: str, dtype: str, ids, mask, micro_batch: int) -> dict:
    """{(layer, site): float32 numpy # [batch, seq, hidden]} from a plain from_pretrained forward.

    NOTE: the forward runs on the same micro-batches as the pipeline. MoE expert kernels
    (grouped_mm, eager) round differently with the number of tokens an expert gets, so a
    token's last bits depend on which tokens share its batch; batched_mm does not.
    """
    model = load_full(model_path, dtype)
    capture = Capture(dict(enumerate(model.model.layers)))
    parts = []
    with torch.inference_mode():
        for start in range(0, len(ids), micro_batch):
            rows = slice(start, start + micro_batch)
            model(input_ids=ids[rows], attention_mask=mask[rows])
            parts.append(capture.pop())
    return {key: torch.cat([p[key] for p in parts]).float().numpy() for key in parts[0]}


def read_site(run_dir, layer: int, site: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seq, pos, act float32 # [rows, hidden]) of one layer-site, sorted by (seq, pos)."""
    import polars as pl

    frames = [
        pl.read_parquet(path).with_columns(pl.col("act").cast(pl.Array(pl.Float32, pl.read_parquet_schema(path)["act"].size)))
        for path in sorted((run_dir / "activations" / f"layer={layer}" / f"site={site}").glob("*.parquet"))
    ]
    table = pl.concat(frames).sort("seq", "pos")
    return table["seq"].to_numpy(), table["pos"].to_numpy(), table["act"].to_numpy()


def fault_config(model: str, output, num_sequences: int = 12) -> dict:
    """The run the fault tests break: 12 sequences x 32 tokens, 2 stages, micro-batches of 1."""
    return {
        "model": {"path": model, "dtype": "float32"},
        "data": {"source": "stdlib", "num_sequences": num_sequences, "seq_len": 32},
        "pipeline": {"num_stages": 2, "micro_batch_size": 1, "placement_timeout_s": 30},
        "storage": {"output": str(output)},
    }


@pytest.fixture(scope="session")
def fault_free_run(planted_checkpoint, tmp_path_factory):
    """Tables of `fault_config` from the same stages chained in-process: no Ray, no faults."""
    from actors.stage import StageActor
    from cluster.config import load_config
    from cluster.run import micro_batches, prepare, stage_specs

    output = tmp_path_factory.mktemp("fault_free") / "run"
    config = load_config(fault_config(planted_checkpoint, output))
    prepared = prepare(config)
    stages = [StageActor(spec) for spec in stage_specs(config, prepared, str(output))]
    for batch in micro_batches(prepared.tokens, config.pipeline.micro_batch_size, skip=set()):
        for stage in stages:
            batch, _ = stage.forward(batch)
    for stage in stages:
        stage.flush()
    return output


def pytest_sessionfinish(session, exitstatus):
    """Shut down any Ray a test left connected while pytest is still in charge.

    NOTE: left to the interpreter's exit handlers, Ray's core-worker threads can race
    finalization; a suite whose tests all passed once exited with SIGSEGV that way.
    """
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
