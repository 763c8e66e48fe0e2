"""A stage materializes only its own layers: by parameter names, by bytes, by peak memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from actors.anatomy import anatomy
from actors.shard import ShardSpec, load_shard
from actors.checkpoint import load_config
from common.errors import ModelError
from cluster.tiny_model import TinySpec, build_tiny


def parameter_bytes(path: str) -> tuple[list[int], int]:
    """Bytes per layer and of the embeddings, from the checkpoint's safetensors headers."""
    from safetensors import safe_open

    layers, embed = {}, 0
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        for name in f.keys():
            size = f.get_slice(name).get_shape()
            nbytes = 4 * (1 if not size else __import__("math").prod(size))
            parts = name.split(".")
            if "layers" in parts:
                index = int(parts[parts.index("layers") + 1])
                layers[index] = layers.get(index, 0) + nbytes
            elif "embed_tokens" in parts:
                embed += nbytes
    return [layers[i] for i in sorted(layers)], embed


def test_stage_holds_only_its_layers(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe")
    layer_bytes, embed_bytes = parameter_bytes(path)
    body = anatomy(path, load_config(path))
    assert (list(body.layer_bytes), body.embed_bytes) == (layer_bytes, embed_bytes)
    for layers in (range(0, 2), range(2, 4), range(4, 6)):
        model = load_shard(ShardSpec(path, layers))
        names = [name for name, _ in model.named_parameters()]
        owned = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        assert owned == set(layers)
        assert ("model.embed_tokens.weight" in names) == (layers.start == 0)
        assert not any(n.startswith(("lm_head", "model.norm")) for n in names)
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        assert held == sum(layer_bytes[i] for i in layers) + (embed_bytes if layers.start == 0 else 0)


def test_a_cpu_shard_keeps_no_view_of_the_checkpoint_file(tiny_checkpoint):
    # A view would keep the whole memory-mapped file mapped, its read pages counted in RSS.
    model = load_shard(ShardSpec(tiny_checkpoint("qwen3_moe"), range(0, 2)))
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.untyped_storage().resizable() for t in tensors)


PEAK_SCRIPT = """
import json, sys, threading, time
from actors.shard import ShardSpec, load_shard
from actors.checkpoint import load_full

def anon_mib():  # resident anonymous memory: what loading allocates, not mapped file pages
    return int(open('/proc/self/status').read().split('RssAnon:')[1].split()[0]) / 1024

path, what = sys.argv[1], sys.argv[2]
base, peak, loading = anon_mib(), [0.0], [True]
def sample():
    while loading[0]:
        peak[0] = max(peak[0], anon_mib())
        time.sleep(0.005)
sampler = threading.Thread(target=sample)
sampler.start()
model = load_full(path) if what == 'full' else load_shard(ShardSpec(path, range(14, 16)))
loading[0] = False
sampler.join()
print(json.dumps({"peak_mib": max(peak[0], anon_mib()) - base}))
"""


def peak_above_baseline(path: str, what: str) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, path, what],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def test_loading_a_shard_peaks_well_under_the_whole_checkpoint(model_cache):
    # ~820 MB float32 checkpoint of 16 layers (~51 MB each); the shard is 2 layers.
    path = build_tiny(TinySpec(num_layers=16, hidden_size=512, num_experts=16, expert_size=512,
                               num_heads=8, num_kv_heads=4, vocab_size=1024), model_cache)
    layer_bytes, embed_bytes = parameter_bytes(path)
    checkpoint = (sum(layer_bytes) + embed_bytes) / 2**20
    shard_weights = (layer_bytes[14] + layer_bytes[15]) / 2**20
    shard = peak_above_baseline(path, "shard")
    full = peak_above_baseline(path, "full")
    print(f"checkpoint {checkpoint:.0f} MiB; 2-layer shard {shard_weights:.0f} MiB of weights "
          f"peaked {shard:.0f} MiB; full model peaked {full:.0f} MiB")
    assert shard < 0.4 * checkpoint
    assert shard < 0.4 * full


def test_what_a_load_frees_goes_back_to_the_system_and_the_forward_keeps_its_blocks():
    # In a fresh process: a 16 MiB block freed inside `transients_returned` leaves the resident
    # memory as it was, though glibc's own threshold would have kept it on the heap; freed after
    # it, the heap keeps it for the next forward.
    script = """
import numpy as np
from actors.allocator import transients_returned

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

def grown_by_a_freed_block():
    before = rss()
    block = np.ones(2 << 20)  # 16 MiB, written
    del block
    return rss() - before

grown_by_a_freed_block()  # as a load's first transient: glibc's own threshold now passes 16 MiB
with transients_returned():
    loading = grown_by_a_freed_block()
print(loading, grown_by_a_freed_block())
"""
    if not sys.platform.startswith("linux") or "glibc" not in " ".join(__import__("platform").libc_ver()):
        pytest.skip("glibc only")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loading, running = map(int, done.stdout.split())
    assert loading < 2**20 and running >= 15 * 2**20


def test_a_missing_checkpoint_says_how_to_fix_it(tmp_path):
    with pytest.raises(ModelError, match=r"model.path='.*nope' could not be loaded.*local checkpoint directory"):
        load_config(str(tmp_path / "nope"))


def test_a_decoder_the_table_cannot_map_is_refused_in_one_line(tmp_path):
    from transformers import MambaConfig

    config = MambaConfig(num_hidden_layers=1, hidden_size=32, vocab_size=64)
    with pytest.raises(ModelError, match=r"^model_type='mamba': MambaForCausalLM has no model.layers; "
                                             r"map its decoder in actors/families.py:FAMILIES.$"):
        anatomy(str(tmp_path), config, "float32")


def test_plans_balance_the_real_bytes_of_mixed_layers_and_tied_embeddings(model_cache):
    from cluster.plan import plan_stages, stage_bytes

    # DeepSeek-V3 with three dense layers before three MoE layers: the dense ones are lighter.
    path = build_tiny(TinySpec(arch="deepseek_v3", num_layers=6, hidden_size=64, num_experts=8, expert_size=32,
                               config={"first_k_dense_replace": 3, "intermediate_size": 32}), model_cache)
    body = anatomy(path, load_config(path))
    dense, moe = body.layer_bytes[:3], body.layer_bytes[3:]
    assert len(set(dense)) == 1 and len(set(moe)) == 1 and moe[0] > 2 * dense[0]
    stages = plan_stages(list(body.layer_bytes), 2, body.embed_bytes)
    assert len(stages[0]) > len(stages[1])  # more of the light layers share a stage
    for layers, want in zip(stages, stage_bytes(stages, list(body.layer_bytes), body.embed_bytes, body.shared_bytes)):
        model = load_shard(ShardSpec(path, layers))
        assert sum(p.numel() * p.element_size() for p in model.parameters()) == want

    # Tied embeddings: held once, by stage 0; the LM head is nobody's.
    tied = build_tiny(TinySpec(arch="qwen3", num_layers=4, hidden_size=64, config={"tie_word_embeddings": True}),
                      model_cache)
    body = anatomy(tied, load_config(tied))
    assert body.embed_bytes == 1024 * 64 * 4 and body.shared_bytes == 0  # vocab x hidden x fp32
    last = load_shard(ShardSpec(tied, range(2, 4)))
    assert sum(p.numel() for p in last.parameters()) * 4 == sum(body.layer_bytes[2:])
