"""The golden test: split-pipeline captures equal a single-process forward, bit for bit.

Stages run in-process here (the local executor: the same StageActor classes chained in one
process); the same comparison through Ray and the CLI lives in tests/test_run.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from common.layout import SITES
from actors.shard import ShardSpec
from actors.stage import StageActor, StageSpec
from common.layout import RunLayout
from common.storage import StorageConfig
from tests.conftest import read_site, reference_activations, run_stages, token_batch

BATCH, SEQ, PAD = 4, 24, 7


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_split_equals_single_forward(tiny_checkpoint, tmp_path, arch, dtype, num_stages):
    path = tiny_checkpoint(arch)
    ids, mask = token_batch(seed=1, batch=BATCH, seq=SEQ, pad_last=PAD)
    expected = reference_activations(path, dtype, ids, mask, micro_batch=2)
    run_stages(path, dtype, tmp_path, ids, mask, num_stages=num_stages, micro_batch=2)

    keep = mask.bool().numpy()  # [batch, seq]
    want_seq, want_pos = np.nonzero(keep)
    for layer in range(6):
        for site in SITES:
            seq, pos, act = read_site(tmp_path, layer, site)
            np.testing.assert_array_equal(seq, want_seq)  # padding positions never written
            np.testing.assert_array_equal(pos, want_pos)
            ref = expected[(layer, site)][keep]  # [rows, hidden]
            assert act.dtype == np.float32
            assert np.array_equal(act, ref), f"layer {layer} {site}: max diff {np.abs(act - ref).max()}"


@pytest.mark.parametrize("spoiler", [None, "tiny", "many tiny", "huge", "nan"])
@pytest.mark.parametrize("where", [0, -1])
def test_bf16_encoding_in_chunks_decides_as_the_whole_tensor_does(spoiler, where, monkeypatch):
    """Several chunks of the CPU check, with a value float16 cannot hold in the first or the
    last chunk: a tiny one is patched (common.patch); too many tiny ones, a huge one or NaN make
    the whole tensor float32. The chunks decide as one whole-tensor check does, and the values
    read back exact."""
    import torch

    from actors import writer
    from common import patch

    gen = torch.Generator().manual_seed(3)
    acts = (torch.rand(3 * writer.CHUNK // 256 + 1, 256, generator=gen) * 200 - 100).to(torch.bfloat16)
    acts[acts.abs() < 2.0**-14] = 1.0  # every value a normal float16 one
    tiny = 2.0**-22 * (1 + 2.0**-7)  # a bfloat16 value with bits below float16's subnormal step
    if spoiler == "many tiny":  # spread over every chunk: only all of them together are too many
        acts.view(-1)[::acts.numel() // (int(acts.numel() * patch.SHARE) + 2)] = tiny
    elif spoiler:
        acts.view(-1)[where] = {"tiny": tiny, "huge": 70000.0, "nan": float("nan")}[spoiler]
    chunked = writer.encode(acts)
    monkeypatch.setattr(writer, "CHUNK", acts.numel())  # one whole-tensor check
    whole = writer.encode(acts)
    assert chunked[1:] == whole[1:] and np.array_equal(chunked[0], whole[0], equal_nan=True)
    values, kind, packed = chunked
    assert kind == ("float16" if spoiler in (None, "tiny") else "float32")
    assert (packed is not None) == (spoiler == "tiny")
    assert values.shape == tuple(acts.shape)
    wide = acts.float().numpy()
    exact = patch.apply(values, None if packed is None else {patch.KEY: packed})
    assert np.array_equal(exact.astype(np.float32), wide, equal_nan=True)
    if packed is not None:  # unpatched, only the tiny entry is off, and by less than 2^-25
        off = values.astype(np.float32) != wide
        assert off.sum() == 1 and np.abs(values.astype(np.float32) - wide).max() <= 2.0**-25


def test_a_patched_file_reads_back_bit_for_bit(tmp_path):
    # A bf16 layer-site with one value float16 rounds: written float16 with a patch, and read
    # back by the analysis's reader exactly.
    import pyarrow as pa
    import torch

    from actors.handoff import MicroBatch
    from actors.writer import DenseTables
    from analysis.scan import read_dense
    from common import patch

    acts = torch.randn(1, 600, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    acts[acts.abs() < 2.0**-14] = 0.5  # every value a normal float16 one ...
    acts[0, 5, 3] = 2.0**-22 * (1 + 2.0**-7)  # ... but this one
    ids = torch.zeros(1, 600, dtype=torch.long)
    writer = DenseTables(str(tmp_path))
    writer.write(writer.prepare(MicroBatch(0, [0], ids, torch.ones_like(ids)), {(0, "ln_attn"): acts}))
    layout = RunLayout.of(str(tmp_path))
    [path] = layout.partition_files(0, "ln_attn")
    stored = pa.ipc.open_file(path).read_all()
    assert stored["act"].type.value_type == "halffloat" and patch.KEY in stored.schema.metadata
    act = read_dense(layout.fs, path, ["act"])["act"]
    assert act.dtype == np.float32 and np.array_equal(act, acts[0].float().numpy())


def test_rounded_entries_are_found_alike_on_the_host_and_on_a_device():
    import torch

    from actors.writer import rounded, rounded_on_device

    wide = torch.tensor([[1.5, 2.0**-22 * (1 + 2.0**-7), float("nan")], [70000.0, 0.0, -3.0]])
    narrow = wide.to(torch.float16)
    assert rounded(narrow, wide).tolist() == rounded_on_device(narrow, wide).tolist() == [1, 2, 3]
    assert rounded(narrow[1:, 1:], wide[1:, 1:]).tolist() == rounded_on_device(narrow[1:, 1:], wide[1:, 1:]).tolist() == []


def test_bf16_encoding_is_float16_when_exact_or_patched_else_float32(tiny_checkpoint, tmp_path):
    import pyarrow as pa
    import torch

    from actors.writer import encode
    from common import patch

    values, kind, packed = encode(torch.tensor([[1.5, -2.0**-14, 0.0, 59904.0]], dtype=torch.bfloat16))
    assert kind == "float16" and values.dtype == np.float16 and packed is None
    values, kind, packed = encode(torch.tensor([[1.5, 2.0**-20, 70000.0]], dtype=torch.bfloat16))
    assert kind == "float32" and packed is None
    assert values.tolist() == torch.tensor([[1.5, 2.0**-20, 70000.0]], dtype=torch.bfloat16).float().tolist()
    acts = torch.full((4, 512), 1.5, dtype=torch.bfloat16)
    acts[2, 7] = -2.0**-20 * (1 + 2.0**-7)  # float16 rounds it: the patch holds it
    values, kind, packed = encode(acts)
    assert kind == "float16" and patch.unpack(packed)[0].tolist() == [2 * 512 + 7]
    assert np.array_equal(patch.apply(values, {patch.KEY: packed}), acts.float().numpy())

    path = tiny_checkpoint("qwen3_moe")
    ids, mask = token_batch(seed=2, batch=2, seq=8)
    run_stages(path, "bfloat16", tmp_path, ids, mask, num_stages=1)
    layout = RunLayout.of(str(tmp_path))
    for layer, site in layout.dense_partitions():
        values = pa.ipc.open_file(layout.partition_files(layer, site)[0]).read_all()
        narrow = values["act"].type.value_type == "halffloat"
        meta = values.schema.metadata
        assert meta[b"model_dtype"] == b"bfloat16" and meta[b"encoding"] == (b"float16" if narrow else b"float32")
        act = np.stack(values["act"].to_numpy(zero_copy_only=False))
        wide = torch.from_numpy(patch.apply(act, meta).astype(np.float32))
        rounded = wide[wide.to(torch.float16).float() != wide].numpy()
        # float16 exactly when every value survives bf16 -> fp16 or the rest fit a patch
        assert narrow == (len(rounded) == 0 or patch.patchable(rounded, wide.numel()))
        assert (patch.KEY in meta) == (narrow and len(rounded) > 0)


def test_stage_uses_the_expert_kernel_of_from_pretrained(tiny_checkpoint, tmp_path):
    from actors.checkpoint import load_full

    path = tiny_checkpoint("qwen3_moe")
    plain = load_full(path, "float32").config._experts_implementation
    stage = StageActor(StageSpec(0, ShardSpec(path, range(0, 3)), StorageConfig(str(tmp_path))))
    assert stage.config._experts_implementation == plain == "grouped_mm"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_hidden_states_cross_between_stages_out_of_band_and_exact(dtype):
    import pickle

    import torch

    from actors.handoff import MicroBatch

    hidden = torch.randn(2, 9, 16).to(getattr(torch, dtype))[:, ::2]  # [batch, seq, hidden], strided
    hidden[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
    ids = torch.arange(10).reshape(2, 5)
    router = torch.arange(6).reshape(2, 3)  # a second tensor a family may pass between layers
    batch = MicroBatch(4, [7, 8], ids, torch.ones_like(ids), (hidden, None, router))
    buffers = []
    data = pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
    # As Ray does: the hidden states leave the pickle stream, to be read back read-only.
    assert [b.raw().nbytes for b in buffers] == [hidden.numel() * hidden.element_size(), router.numel() * 8]
    store = [bytes(b.raw()) for b in buffers]  # the object store's copy, read-only to readers
    back = pickle.loads(data, buffers=[memoryview(b) for b in store])
    got, none, got_router = back.hidden
    assert got.dtype == hidden.dtype and got.shape == hidden.shape and none is None
    same = got.contiguous().view(torch.uint8).equal(hidden.contiguous().view(torch.uint8))
    assert same and got_router.equal(router), "hidden states changed in transit"
    got.add_(1)  # a stage may write to what it received, never into the store
    assert store[0] == hidden.contiguous().view(torch.uint8).numpy().tobytes()
    assert (back.index, back.seqs) == (4, [7, 8]) and back.input_ids.equal(ids)


def test_dtype_auto_runs_a_checkpoint_in_its_own_dtype(tiny_checkpoint, tmp_path):
    import pyarrow as pa
    import torch

    from cluster.config import load_config
    from cluster.ledger import new_record
    from cluster.executor import run_chain
    from cluster.run import micro_batches, prepare, stage_specs

    path = tiny_checkpoint("qwen3_moe", dtype="bfloat16")
    settings = {"model": {"path": path}, "data": {"num_sequences": 2, "seq_len": 16},
                "pipeline": {"num_stages": 2, "micro_batch_size": 2}, "storage": {"output": str(tmp_path)}}
    config = load_config(settings)
    assert config.model.dtype == "auto"
    prepared = prepare(config)
    assert prepared.anatomy.dtype == "bfloat16" and new_record(config, prepared).dtype == "bfloat16"
    run_chain(stage_specs(config, prepared, str(tmp_path), local=True), micro_batches(prepared.tokens, 2, skip=set()))
    expected = reference_activations(path, "auto", prepared.tokens, torch.ones_like(prepared.tokens), 2)
    for layer in range(6):
        for site in SITES:
            _, _, act = read_site(tmp_path, layer, site)
            assert np.array_equal(act, expected[(layer, site)].reshape(act.shape)), (layer, site)
    layout = RunLayout.of(str(tmp_path))
    meta = pa.ipc.open_file(layout.partition_files(0, "ln_attn")[0]).schema.metadata
    assert meta[b"model_dtype"] == b"bfloat16"
    # An explicit dtype still wins over the checkpoint's.
    override = prepare(load_config({**settings, "model": {"path": path, "dtype": "float32"}}))
    assert override.anatomy.dtype == "float32"
