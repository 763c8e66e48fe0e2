"""Shared fixtures: tiny checkpoints built locally, and a single-process reference forward."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from actors import faults
from actors.families import SITE_ROLES, family_of
from common import files
from common.layout import RunLayout
from common.storage import DENSE, StorageConfig
from common.record import RunRecord, read_record, write_record
from actors.families import inner_model
from actors.checkpoint import load_full
from cluster.plants import Plant
from cluster.tiny_model import TinySpec, build_tiny

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


@pytest.fixture(autouse=True)
def log_records_reach_pytest():
    """Undo what a command line's `logs.configure` did, so later tests see log records."""
    import logging

    yield
    for name in ("actors", "analysis", "cluster", "common", "bench"):
        logger = logging.getLogger(name)
        logger.handlers[:], logger.propagate = [], True
        logger.setLevel(logging.NOTSET)


@pytest.fixture
def ray_cluster():
    """The suite's shared local cluster (4 CPUs): started at first use, kept until the session
    ends. Modules that need a cluster of their own take it with `own_ray`."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    return ray


def own_ray(**kwargs) -> None:
    """Start a cluster with `kwargs` for one module, stopping the shared one first."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(**kwargs)


@contextlib.contextmanager
def raylets(slow: Path, delay_s: float, nodes: list[dict]):
    """A CPU-only head and one raylet per entry of `nodes` on this machine, joined; stage 0 slowed
    by `delay_s` per micro-batch (the fault file `slow`, armed for the raylets started here),
    so a fault lands mid-run. Yields (cluster, workers)."""
    import ray
    from ray.cluster_utils import Cluster

    slow.write_text(json.dumps([{"kind": "delay", "stage": 0, "seconds": delay_s}]))
    os.environ[faults.ENV] = str(slow)  # inherited by the raylets started below
    if ray.is_initialized():
        ray.shutdown()  # the suite's shared cluster: the module needs its own nodes
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "object_store_memory": 80 * 2**20, "include_dashboard": False})
    workers = [cluster.add_node(**node) for node in nodes]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop(faults.ENV, None)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stages(model_path, dtype, out, ids, mask, num_layers=6, num_stages=2, micro_batch=2,
               storage=DENSE, floor=3.0, **spec):
    """Capture every layer through stages chained in this process (the local executor),
    micro-batch by micro-batch, in storage mode `storage`; returns the stages."""
    from actors.shard import ShardSpec
    from actors.stage import StageSpec
    from actors.handoff import MicroBatch
    from cluster.executor import run_chain
    from cluster.plan import plan_micro_batches, plan_stages

    section = StorageConfig(str(out), storage, floor)
    specs = [StageSpec(i, ShardSpec(model_path, layers, dtype), section, **spec)
             for i, layers in enumerate(plan_stages([1] * num_layers, num_stages))]
    batches = [MicroBatch(index, list(rows), ids[rows.start:rows.stop], mask[rows.start:rows.stop])
               for index, rows in enumerate(plan_micro_batches(len(ids), micro_batch))]
    return run_chain(specs, batches).stages


def in_process_run(model_path, dtype, out, ids, mask, num_layers=6, num_stages=2, micro_batch=2, **spec):
    """`run_stages`, then the run record and the tokens table analysis reads; returns the stages."""
    import pyarrow as pa

    stages = run_stages(model_path, dtype, out, ids, mask, num_layers=num_layers, num_stages=num_stages,
                        micro_batch=micro_batch, **spec)
    layout = RunLayout.of(str(out))
    mode, floor = spec.get("storage", "dense"), spec.get("floor", 3.0)
    write_record(layout, RunRecord(
        num_layers=num_layers, hidden_size=stages[0].config.hidden_size, tokens=int(mask.sum()),
        storage_mode=mode, floor=floor if mode == "exceedances" else None, seq_len=ids.shape[1],
        num_sequences=len(ids), dtype=str(stages[0].model.dtype).removeprefix("torch."),
        config={"data": {"seq_len": ids.shape[1]}, "analysis": {}}))
    seq, pos = mask.bool().nonzero(as_tuple=True)
    files.write_table(layout.fs, layout.tokens, pa.table({
        "seq": pa.array(seq.numpy()), "pos": pa.array(pos.int().numpy()),
        "token_id": pa.array(ids[mask.bool()].int().numpy())}))
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

    What is kept is what the first weight-holding module inside each role's block reads
    (q/k/v or the linear-attention projection; the router, or the dense MLP's first
    projection), found by hooks on every submodule: a definition of the sites that does
    not go through actors/capture.py.

    NOTE: the forward runs on the same micro-batches as the pipeline. MoE expert kernels
    (grouped_mm, eager) round differently with the number of tokens an expert gets, so a
    token's last bits depend on which tokens share its batch; batched_mm does not.
    """
    model = load_full(model_path, dtype)
    reader = FirstReader(model)
    parts = []
    with torch.inference_mode():
        for start in range(0, len(ids), micro_batch):
            rows = slice(start, start + micro_batch)
            model(input_ids=ids[rows], attention_mask=mask[rows])
            # NOTE: MoE blocks flatten tokens before their router: [batch * seq, hidden].
            parts.append({k: v.reshape(*ids[rows].shape, -1) for k, v in reader.pop().items()})
    reader.remove()
    return {key: torch.cat([p[key] for p in parts]).float().numpy() for key in parts[0]}


class FirstReader:
    """Per (layer, site): the input of the first module with parameters that runs inside the block."""

    def __init__(self, model):
        family = family_of(model.config.model_type)
        layers = getattr(inner_model(model, family), family.layers)
        self.taken: dict = {}
        self.handles = []
        for index, layer in enumerate(layers):
            for site, role in SITE_ROLES.items():
                block = family.role_module(layer, role)
                for module in block.modules():
                    if next(module.parameters(recurse=False), None) is not None:
                        self.handles.append(module.register_forward_pre_hook(self.keep((index, site)), with_kwargs=True))

    def keep(self, key):
        def hook(_module, args, kwargs):
            value = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            self.taken.setdefault(key, value.detach().clone())
        return hook

    def pop(self) -> dict:
        taken, self.taken = self.taken, {}
        return taken

    def remove(self):
        for handle in self.handles:
            handle.remove()


def read_site(run_dir, layer: int, site: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seq, pos, act float32 # [rows, hidden]) of one layer-site, sorted by (seq, pos), read as
    the analysis reads it (float16 files widened, their patches applied)."""
    from analysis.scan import read_dense

    layout = RunLayout.of(str(run_dir))
    parts = [read_dense(layout.fs, path, ["seq", "pos", "act"]) for path in layout.partition_files(layer, site)]
    seq, pos = (np.concatenate([part[name] for part in parts]) for name in ("seq", "pos"))
    act = np.concatenate([part["act"].astype(np.float32) for part in parts])
    order = np.lexsort((pos, seq))
    return seq[order], pos[order], act[order]


def stored_record(run) -> RunRecord:
    """The run record of the run at `run`."""
    return read_record(RunLayout.of(str(run)))


def stored_summary(run) -> dict:
    """The analysis summary of the run at `run`."""
    import json

    layout = RunLayout.of(str(run))
    return json.loads(files.read_bytes(layout.fs, layout.summary))


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
    """Tables of `fault_config` from the local executor: one process, no Ray, no faults."""
    from cluster.config import load_config
    from cluster.run import execute

    output = tmp_path_factory.mktemp("fault_free") / "run"
    execute(load_config(fault_config(planted_checkpoint, output)), quiet=True, executor="local")
    return output


def dense_tables(run: Path) -> dict:
    """{(layer, site): DataFrame sorted by (seq, pos)}, checking no row appears twice."""
    import polars as pl

    from analysis.scan import read_frame

    layout = RunLayout.of(str(run))
    out = {}
    for layer, site in layout.dense_partitions():
        frame = pl.concat([read_frame(layout.fs, p) for p in layout.partition_files(layer, site)])
        assert frame.select("seq", "pos").is_duplicated().sum() == 0, (layer, site)
        out[(layer, site)] = frame.sort("seq", "pos")
    return out


def assert_same_tables(run: Path, clean: Path) -> int:
    """Every table of `run` equals the fault-free `clean` one; returns the rows compared."""
    got, want = dense_tables(run), dense_tables(clean)
    assert got.keys() == want.keys() and len(got) == 6 * len(SITE_ROLES)
    rows = 0
    for key, frame in want.items():
        assert got[key]["seq"].to_list() == frame["seq"].to_list(), key
        assert got[key]["pos"].to_list() == frame["pos"].to_list(), key
        assert np.array_equal(got[key]["act"].to_numpy(), frame["act"].to_numpy()), key
        rows += len(frame)
    return rows


def wait_for_commits(ledger: Path, at_least: int, timeout_s: float) -> list[str]:
    """The committed micro-batches of the run record `ledger` once at least `at_least` are."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ledger.exists():
            batches = json.loads(ledger.read_text())["batches"]
            committed = [i for i, b in batches.items() if b["status"] == "committed"]
            if len(committed) >= at_least:
                return committed
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} micro-batches committed within {timeout_s} s")


def run_config(path: str, output, **sections) -> dict:
    config = {
        "model": {"path": path, "dtype": "float32"},
        "data": {"source": "stdlib", "num_sequences": 12, "seq_len": 32},
        "pipeline": {"num_stages": 2, "micro_batch_size": 4},
        "storage": {"output": str(output)},
        "analysis": {"num_actors": 2},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def pytest_sessionfinish(session, exitstatus):
    """Shut down any Ray a test left connected while pytest is still in charge.

    NOTE: left to the interpreter's exit handlers, Ray's core-worker threads can race
    finalization; a suite whose tests all passed once exited with SIGSEGV that way.
    """
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
