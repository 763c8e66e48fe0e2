"""`pipeline.num_stages: auto` and the replica count, on real model sizes built on the meta device.

The checkpoints here are a config.json each and no weights: the plan reads the bytes of every
layer off the model built on the meta device (actors/anatomy.py), as it does for any checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.anatomy import anatomy
from actors.checkpoint import load_config as checkpoint_config
from cluster.config import load_config
from cluster.executor import Hardware
from cluster.placement import count_replicas, targets
from cluster.plan import PlanError
from cluster.run import Prepared, plan_shape
from cluster.shape import GIB, Activations, fewest_stages, fixed_shape

GPU = {"GPU": 1, "CPU": 1}


@pytest.fixture(scope="module")
def real_sizes(tmp_path_factory):
    """name -> a directory holding only the config.json of a released model."""
    from transformers import DeepseekV3Config, Qwen3MoeConfig

    configs = {
        "qwen3_30b_a3b": Qwen3MoeConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
            num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
            num_experts_per_tok=8, moe_intermediate_size=768, max_position_embeddings=40960,
            tie_word_embeddings=False, dtype="bfloat16"),
        "deepseek_v3": DeepseekV3Config(
            vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
            num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
            n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3, kv_lora_rank=512,
            q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
            topk_group=4, max_position_embeddings=163840, dtype="bfloat16"),
    }
    # The FP8 release: block-quantized weights, loaded dequantized to bfloat16 (actors/shard.py).
    configs["deepseek_v3"].quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
                                                  "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    paths = {}
    for name, config in configs.items():
        paths[name] = tmp_path_factory.mktemp(name)
        config.save_pretrained(paths[name])
        assert [p.name for p in Path(paths[name]).iterdir()] == ["config.json"]  # no weights
    return paths


def shape_for(path, hardware: Hardware, num_stages="auto", gpu_memory_gib=None, seq_len=2048):
    config = load_config({"model": {"path": str(path)}, "data": {"seq_len": seq_len},
                          "pipeline": {"num_stages": num_stages, "gpu_memory_gib": gpu_memory_gib}})
    model_config = checkpoint_config(str(path))
    body = anatomy(str(path), model_config, config.model.dtype)
    return plan_shape(config, Prepared(str(path), model_config, body, tokens=None), hardware), body


def test_qwen3_30b_a3b_in_bf16_takes_one_80_gib_gpu_per_replica(real_sizes):
    shape, body = shape_for(real_sizes["qwen3_30b_a3b"], Hardware(gpus=8, gpu_bytes=80 * GIB))
    assert body.dtype == "bfloat16" and 55 * GIB < sum(shape.weights) < 58 * GIB
    assert [len(r) for r in shape.stages] == [48] and shape.needs[0] <= 80 * GIB
    assert count_replicas("auto", len(shape.stages), GPU, {"GPU": 8, "CPU": 64}) == 8  # every GPU busy
    # On 40 GiB GPUs the fewest stages that fit are two, each within one GPU.
    half, _ = shape_for(real_sizes["qwen3_30b_a3b"], Hardware(gpus=8, gpu_bytes=40 * GIB))
    assert len(half.stages) == 2 and max(half.needs) <= 40 * GIB
    assert count_replicas("auto", 2, GPU, {"GPU": 8, "CPU": 64}) == 4
    # The memory the user gives wins over none read (a CPU-only driver planning for GPUs).
    given, _ = shape_for(real_sizes["qwen3_30b_a3b"], Hardware(gpus=0, gpu_bytes=40 * GIB))
    assert given.stages == half.stages


def test_deepseek_v3_fp8_does_not_fit_8_x_80_gib_and_says_by_how_much(real_sizes):
    with pytest.raises(PlanError) as refused:
        shape_for(real_sizes["deepseek_v3"], Hardware(gpus=8, gpu_bytes=80 * GIB))
    message = str(refused.value)
    assert "\n" not in message
    assert "cluster has 8 GPUs (640.0 GiB)" in message and "TiB in all" in message
    assert "loaded dequantized to bfloat16" in message
    # Three nodes of 8 such GPUs hold one replica; the stages are the fewest that fit.
    shape, body = shape_for(real_sizes["deepseek_v3"], Hardware(gpus=24, gpu_bytes=80 * GIB))
    assert body.quantization == "fp8" and sum(shape.weights) > 2**40  # dequantized: over 1 TiB
    assert max(shape.needs) <= 80 * GIB and 16 <= len(shape.stages) <= 24
    fewer = fixed_shape(list(body.layer_bytes), body.embed_bytes, body.shared_bytes, len(shape.stages) - 1,
                        Activations(per_layer=0, working=0))
    assert max(fewer.needs) > 80 * GIB  # one stage fewer does not fit, even without activations
    assert count_replicas("auto", len(shape.stages), GPU, {"GPU": 24, "CPU": 192}) == 1


def test_a_model_that_fits_no_gpu_is_refused_in_one_line(real_sizes):
    with pytest.raises(PlanError, match=r"fits no GPU of 8\.0 GiB: even at one layer per stage, stage \d+ needs "
                                        r"[\d.]+ GiB \([\d.]+ GiB of weights"):
        shape_for(real_sizes["deepseek_v3"], Hardware(gpus=64, gpu_bytes=8 * GIB))
    with pytest.raises(PlanError, match=r"pipeline.num_stages=1: stage 0 needs [\d.]+ GiB .* a GPU has 40.0 GiB"):
        shape_for(real_sizes["qwen3_30b_a3b"], Hardware(gpus=8, gpu_bytes=40 * GIB), num_stages=1)


def test_auto_without_a_gpu_memory_to_read_asks_for_it(real_sizes):
    with pytest.raises(PlanError, match="set pipeline.gpu_memory_gib"):
        shape_for(real_sizes["qwen3_30b_a3b"], Hardware(gpus=2, gpu_bytes=None))
    cpu, _ = shape_for(real_sizes["qwen3_30b_a3b"], Hardware(gpus=0, gpu_bytes=None))
    assert len(cpu.stages) == 1  # CPU stages: one process holds the model, as a plain forward would


def test_fewest_stages_is_the_smallest_count_that_fits():
    layers = [10, 40, 10, 10, 30, 20]
    headroom = Activations(per_layer=1, working=0)
    for budget in (200, 130, 80, 70, 55, 45, 41):
        shape = fewest_stages(layers, 0, 0, budget * 1 + GIB, headroom)
        assert max(shape.needs) <= budget + GIB
        if len(shape.stages) > 1:  # every split into one stage fewer has a stage over budget
            fewer = fixed_shape(layers, 0, 0, len(shape.stages) - 1, headroom)
            assert max(fewer.needs) > budget + GIB


@pytest.mark.parametrize("rooms, stages, replicas, expected", [
    ({"a": 2, "b": 2, "c": 2, "d": 2}, 2, 4, ["a", "b", "c", "d"]),    # one replica per node
    ({"a": 8, "b": 8}, 1, 4, ["a", "b", "a", "b"]),                    # spread, not packed
    ({"a": 3, "b": 3, "c": 3}, 2, 4, ["a", "b", "c", None]),           # the fourth spans nodes
    ({"a": 1, "b": 1}, 2, 1, [None]),                                  # no node holds a replica
])
def test_replicas_spread_over_the_nodes_that_hold_them(rooms, stages, replicas, expected):
    assert targets(rooms, stages, replicas) == expected


def test_the_local_executor_holds_every_stage_on_its_one_gpu(real_sizes):
    one = Hardware(gpus=1, gpu_bytes=80 * GIB, one_device=True)
    shape, _ = shape_for(real_sizes["qwen3_30b_a3b"], one, num_stages=2)  # two stages, one GPU: fits 80 GiB
    assert len(shape.stages) == 2
    auto, _ = shape_for(real_sizes["qwen3_30b_a3b"], one)
    assert len(auto.stages) == 1  # on one device more stages fit no better
    with pytest.raises(PlanError, match=r"holds every stage on one GPU: they need [\d.]+ GiB .* the GPU has 40.0 GiB"):
        shape_for(real_sizes["qwen3_30b_a3b"], Hardware(gpus=1, gpu_bytes=40 * GIB, one_device=True), num_stages=2)
