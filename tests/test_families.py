"""Every family of actors/families.py: stages split anywhere equal the model's own forward.

For each family a tiny random-init checkpoint is built here (no hub), with the family's
non-default scale fields set and one outlier planted in the token embeddings. Split into
1, 2 and 3 in-process stages, every stored `ln_attn`/`ln_mlp` value must equal, bit for
bit in float32, what a plain `from_pretrained` forward feeds the first weight of each
block (tests/conftest.py:FirstReader), and the planted dim must be exactly the outlier
feature found. A few families also run through Ray end to end.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import transformers

from actors.anatomy import anatomy
from actors.capture import CaptureConfig
from actors.families import inner_model
from actors.families import FAMILIES, support_table
from common.layout import SITES
from actors.checkpoint import load_config
from analysis.criteria import Criteria, feature_stats, outlier_features
from analysis.scan import Scanner
from cluster.plan import stage_bytes
from cluster.plants import Plant
from cluster.tiny_model import TinySpec, build_tiny
from common.layout import RunLayout
from common.record import RunRecord
from tests.conftest import read_site, reference_activations, run_stages, stored_record, token_batch

SUPPORTED = sorted(t for t, f in FAMILIES.items() if not f.refuse)
REFUSED = sorted(t for t, f in FAMILIES.items() if f.refuse)
PLANTED = 37  # the dim planted in every family's embeddings
LAYERS, BATCH, SEQ, PAD = 6, 4, 24, 7


def family_spec(model_type: str) -> TinySpec:
    family = FAMILIES[model_type]
    return TinySpec(arch=model_type, num_layers=LAYERS, hidden_size=64, num_experts=4, top_k=2,
                    expert_size=32, num_heads=4, num_kv_heads=2, vocab_size=512, max_position=256,
                    plants=(Plant(dim=PLANTED, kind="embedding", scale=10.0),), config=family.scales)


@pytest.fixture(scope="module")
def family_checkpoint(model_cache):
    return lambda model_type: build_tiny(family_spec(model_type), model_cache)


# NOTE: after an RMSNorm over 64 dims a lone large dim comes out near sqrt(64) = 8 times the
# norm's weight, and some families start their norm weights at 0.5: 4, under LLM.int8()'s 6.
THRESHOLD = 3.0


def planted_feature(run_dir: Path, tokens: int) -> dict:
    """The planted dim's row of the outlier features (LLM.int8() criteria at THRESHOLD), and
    whether it is the largest dim of all."""
    layout = RunLayout.of(str(run_dir))
    record = RunRecord(num_layers=LAYERS, hidden_size=64, tokens=tokens)
    partial = Scanner(layout, record, THRESHOLD).scan([(layer, site) for layer in range(LAYERS) for site in SITES])
    per_dim = feature_stats(partial.exceedances, partial.stats, LAYERS, tokens, SEQ)
    found = outlier_features(per_dim, Criteria(threshold=THRESHOLD)).filter(dim=PLANTED).to_dicts()
    largest = per_dim.sort("max_abs", descending=True)["dim"][0]
    return {**(found[0] if found else {}), "largest": largest == PLANTED}


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_stages_equal_the_models_own_forward(family_checkpoint, tmp_path, model_type):
    path = family_checkpoint(model_type)
    ids, mask = token_batch(seed=3, batch=BATCH, seq=SEQ, pad_last=PAD)
    expected = reference_activations(path, "float32", ids, mask, micro_batch=2)
    keep = mask.bool().numpy()
    body = anatomy(path, load_config(path))
    routed = reference_routing(path, ids, mask) if FAMILIES[model_type].routed else {}
    for num_stages in (1, 2, 3):
        out = tmp_path / f"stages-{num_stages}"
        # The 2-stage run also captures routing and experts: the sites must not change.
        capture = CaptureConfig(routing=True, experts=True) if routed and num_stages == 2 else CaptureConfig()
        stages = run_stages(path, "float32", out, ids, mask, num_layers=LAYERS, num_stages=num_stages, micro_batch=2,
                            capture=capture)
        held = [sum(p.numel() * p.element_size() for p in stage.model.parameters()) for stage in stages]
        plan = stage_bytes([s.spec.shard.layers for s in stages], list(body.layer_bytes), body.embed_bytes,
                           body.shared_bytes)
        assert held == plan, "the plan's bytes are not what the stages hold"
        for layer in range(LAYERS):
            for site in SITES:
                _, _, act = read_site(out, layer, site)
                want = expected[(layer, site)][keep]
                assert np.array_equal(act, want), (
                    f"{num_stages} stages, layer {layer} {site}: max diff {np.abs(act - want).max()}")
    if routed:
        assert_routing_and_experts(tmp_path / "stages-2", routed, keep)
    # Planted in the embeddings, the dim is carried by the residual stream: it exceeds at every
    # token of every layer (random-init dims may cross the low threshold too, but less far).
    found = planted_feature(tmp_path / "stages-3", int(keep.sum()))
    assert (found.get("layer_fraction"), found.get("token_fraction"), found["largest"]) == (1.0, 1.0, True)


def reference_routing(path: str, ids, mask) -> dict[int, tuple]:
    """{layer: (top_k_index, top_k_weights) # [tokens, k], shared experts} as a plain forward calls
    each experts module."""
    import torch

    from actors.moe import moe_blocks
    from actors.checkpoint import load_full

    model = load_full(path, "float32")
    family = FAMILIES[model.config.model_type]
    blocks = moe_blocks(dict(enumerate(getattr(inner_model(model, family), family.layers))), family)
    calls: dict = {}
    for index, (experts, _) in blocks.items():
        experts.register_forward_pre_hook(
            lambda _m, args, kwargs, index=index: calls.setdefault(index, []).append(
                (args + tuple(kwargs.values()))[1:3]), with_kwargs=True)
    with torch.inference_mode():
        for rows in (slice(0, 2), slice(2, 4)):
            model(input_ids=ids[rows], attention_mask=mask[rows])
    return {i: (*(torch.cat([c[j] for c in found]) for j in (0, 1)), len(blocks[i][1])) for i, found in calls.items()}


def assert_routing_and_experts(run, routed: dict, keep) -> None:
    """The routing table is the experts calls' routing, and each layer's experts table counts it."""
    from analysis.scan import read_kind
    from common.storage import EXPERTS, ROUTING

    layout = RunLayout.of(str(run))
    routing = read_kind(layout, ROUTING).sort("layer", "seq", "pos", "rank")
    summary = read_kind(layout, EXPERTS)
    real = keep.reshape(-1)
    assert sorted(routing["layer"].unique().to_list()) == sorted(routed)
    for layer, (index, weights, shared) in routed.items():
        mine = routing.filter(layer=layer)
        assert np.array_equal(mine["expert"].to_numpy(), index.numpy()[real].reshape(-1)), layer
        assert np.array_equal(mine["weight"].to_numpy(), weights.float().numpy()[real].reshape(-1)), layer
        counted = summary.filter(pl.col("layer") == layer, pl.col("expert") >= 0)["tokens"].sum()
        assert counted == index[real].numel(), layer
        # A shared expert (-1) sees every real token.
        assert summary.filter(layer=layer, expert=-1)["tokens"].sum() == int(real.sum()) * shared, layer


@pytest.mark.parametrize("model_type", sorted(t for t, f in FAMILIES.items() if f.ray))
def test_ray_runs_equal_the_models_own_forward(ray_cluster, family_checkpoint, tmp_path, model_type):
    import torch
    from transformers import AutoTokenizer

    from cluster.config import load_config
    from cluster.data import load_texts, pack_sequences
    from cluster.run import execute

    path = family_checkpoint(model_type)
    config = load_config({
        "model": {"path": path}, "data": {"source": "stdlib", "num_sequences": 4, "seq_len": 32},
        "pipeline": {"num_stages": 3, "micro_batch_size": 2}, "storage": {"output": str(tmp_path / "run")},
        "analysis": {"threshold": THRESHOLD, "num_actors": 1}})
    result = execute(config, quiet=True)
    record = stored_record(tmp_path / "run")
    assert record.dtype == "float32" and len(record.plan) == 3  # `auto`: the checkpoint's float32
    tokens = pack_sequences(AutoTokenizer.from_pretrained(path), load_texts("stdlib"), 4, 32)
    expected = reference_activations(path, "float32", tokens, torch.ones_like(tokens), micro_batch=2)
    for layer in range(LAYERS):
        for site in SITES:
            seq, pos, act = read_site(tmp_path / "run", layer, site)
            assert np.array_equal(act, expected[(layer, site)][seq, pos]), (layer, site)
    assert PLANTED in [f["dim"] for f in result["summary"]["outlier_features"]]


@pytest.mark.parametrize("model_type", REFUSED)
def test_refused_families_fail_in_one_line_before_the_cluster_starts(family_checkpoint, tmp_path, capsys,
                                                                      model_type):
    from cluster.__main__ import main

    config = Path(__file__).resolve().parent.parent / "configs" / "tiny_moe.yaml"
    code = main(["run", str(config), "--set", f"model.tiny.arch={model_type}", "--set", "model.tiny.plants=[]",
                 "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and model_type in err, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_every_moe_family_of_the_installed_transformers_is_in_the_table():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # Decoder-only configs: a multimodal one (with a text_config) is its text model's family.
    moe = sorted(
        model_type for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if "text_config" not in (transformers.CONFIG_MAPPING[model_type].sub_configs or {})
        and _defines_experts(model_type)
    )
    assert moe, "no MoE family found: the scan itself is broken"
    assert sorted(set(moe) - set(FAMILIES)) == []


def _defines_experts(model_type: str) -> bool:
    """Whether the family's modeling file defines a routed-experts module."""
    import importlib

    name = transformers.models.auto.configuration_auto.model_type_to_module_name(model_type)
    try:
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:
        return False
    return any(cls.endswith(("Experts", "SparseMoeBlock", "MoE", "Moe")) for cls in vars(module))


def test_readme_lists_the_tables_families():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert support_table() in readme
    printed = subprocess.run([sys.executable, "-m", "actors.families"], capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == support_table()


# A multimodal release keeps its text decoder beside a vision tower; tiny towers for two of them.
VISION = {
    "llama4": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
               "vision_output_dim": 32, "image_size": 28, "patch_size": 14, "projector_input_dim": 32,
               "projector_output_dim": 32},
    "qwen3_5_moe": {"hidden_size": 32, "intermediate_size": 64, "depth": 1, "num_heads": 2,
                    "out_hidden_size": 64, "num_position_embeddings": 64},
}


@pytest.mark.parametrize("model_type, text_type", [("llama4", "llama4_text"), ("qwen3_5_moe", "qwen3_5_moe_text")])
def test_a_multimodal_release_runs_its_text_decoder(tmp_path, model_type, text_type):
    import torch
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from cluster.small_config import small_config

    text = small_config(text_type, extra={**FAMILIES[text_type].scales, "eos_token_id": 2, "pad_token_id": 0})
    config = transformers.CONFIG_MAPPING[model_type](
        text_config=text.to_dict(), vision_config=VISION[model_type], image_token_index=500, image_token_id=500)
    torch.manual_seed(0)
    full = getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])._from_config(
        config, dtype=torch.float32)
    path = str(tmp_path / "release")
    full.save_pretrained(path)
    body = anatomy(path, load_config(path))
    assert (body.model_type, body.family, body.num_layers) == (model_type, FAMILIES[text_type].name, LAYERS)
    ids, mask = token_batch(seed=4, batch=BATCH, seq=SEQ, pad_last=PAD, vocab=400)
    expected = reference_activations(path, "float32", ids, mask, micro_batch=2)
    run_stages(path, "float32", tmp_path / "run", ids, mask, num_layers=LAYERS, num_stages=2, micro_batch=2)
    for layer in range(LAYERS):
        for site in SITES:
            _, _, act = read_site(tmp_path / "run", layer, site)
            assert np.array_equal(act, expected[(layer, site)][mask.bool().numpy()]), (layer, site)
