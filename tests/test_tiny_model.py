"""Tests for cluster.tiny_model: spec validation, cached builds, planted weights."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster import tiny_model
from cluster.data import load_texts, pack_sequences
from cluster.plants import DEFAULT_OUTLIER_DIMS, DEFAULT_PLANTS, Plant
from cluster.tiny_model import TinySpec, build_tiny, spec_digest

STRONG = Plant(dim=7, layers=[0, 1, 2], scale=40.0)
LONE = Plant(dim=100, layers=[3], scale=40.0, sites=["ln_mlp"])
SMALL = TinySpec(num_layers=4, plants=(STRONG, LONE))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="module")
def small_path(cache_dir):
    return build_tiny(SMALL, cache_dir)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=-1, layers=[0], scale=2.0), r"dim=-1 .*integer >= 0"),
    (dict(dim=3, layers=[], scale=2.0), r"layers=\[\] .*non-empty"),
    (dict(dim=3, layers=[1, 1], scale=2.0), r"layers=\[1, 1\] .*repeat"),
    (dict(dim=3, layers=[0], scale=0.0), r"scale=0.0 .*non-zero"),
    (dict(dim=3, layers=[0], scale=float("inf")), r"scale=inf .*finite"),
    (dict(dim=3, layers=2, scale=2.0), r"layers=2 .*list"),
    (dict(dim=3, layers=[0], scale=2.0, sites="ln_mlp"), r"sites='ln_mlp' .*list"),
    (dict(dim=3, layers=[0], scale=2.0, sites=["ln_out"]), r"sites=\['ln_out'\] .*'ln_attn', 'ln_mlp'"),
])
def test_plant_validation_names_key_value_and_rule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Plant(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(arch="llamaa"), r"arch='llamaa' .*model_type of the installed transformers"),
    (dict(num_layers=0), r"num_layers=0 .*positive"),
    (dict(top_k=9), r"top_k=9 .*num_experts \(8\)"),
    (dict(num_heads=3), r"num_heads=3 .*hidden_size \(128\)"),
    (dict(num_kv_heads=3), r"num_kv_heads=3 .*num_heads \(4\)"),
    (dict(vocab_size=100), r"vocab_size=100 .*>= 512"),
    (dict(plants=(Plant(dim=128, layers=[0], scale=2.0),)), r"plants.dim=128 .*hidden_size \(128\)"),
    (dict(plants=(Plant(dim=1, layers=[0, 8], scale=2.0),)), r"plants.layers=\[0, 8\] .*num_layers \(8\)"),
])
def test_spec_validation_names_key_value_and_rule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TinySpec(**kwargs)


def test_config_builds_plants_and_rejects_unknown_keys():
    from cluster.config import ConfigError, build

    spec = build(TinySpec, {"num_layers": 4, "plants": [{"dim": 7, "layers": [0, 1, 2], "scale": 40.0}]})
    assert spec.plants == (STRONG,)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['layers'\] in tiny; valid keys: .*'num_layers'"):
        build(TinySpec, {"layers": 4}, "tiny")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['scal'\] in tiny.plants\[0\]; valid keys: .*'scale'"):
        build(TinySpec, {"plants": [{"dim": 1, "layers": [0], "scal": 2.0}]}, "tiny")


def test_spec_is_hashable_and_digest_tracks_content():
    from cluster.config import build

    assert hash(SMALL) == hash(build(TinySpec, SMALL.to_dict()))
    assert spec_digest(SMALL) == spec_digest(build(TinySpec, SMALL.to_dict()))
    assert spec_digest(SMALL) != spec_digest(TinySpec(num_layers=4, plants=(STRONG,), seed=1))


def test_default_plants_fit_the_default_spec():
    spec = TinySpec(plants=DEFAULT_PLANTS)
    assert {plant.dim for plant in spec.plants} >= set(DEFAULT_OUTLIER_DIMS)


# ---------------------------------------------------------------- build and cache

def test_build_is_cached(small_path, cache_dir, monkeypatch):
    def no_rebuild(spec, out_dir):
        raise AssertionError("the cached checkpoint should have been reused")

    monkeypatch.setattr(tiny_model, "_write_checkpoint", no_rebuild)
    assert build_tiny(SMALL, cache_dir) == small_path
    assert os.path.isfile(os.path.join(small_path, "model.safetensors"))


def test_failed_build_leaves_no_checkpoint(tmp_path, monkeypatch):
    def crash(spec, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny_model, "_write_checkpoint", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny(SMALL, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_build_keeps_the_first_finished_copy(tmp_path, monkeypatch):
    write = tiny_model._write_checkpoint
    target = tmp_path / f"tiny-qwen3_moe-{spec_digest(SMALL)}"

    def lose_the_race(spec, out_dir):
        write(spec, out_dir)
        target.mkdir()  # another process renamed its finished build into place meanwhile
        (target / "winner").write_text("")

    monkeypatch.setattr(tiny_model, "_write_checkpoint", lose_the_race)
    assert build_tiny(SMALL, tmp_path) == str(target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert (target / "winner").exists()


def test_planted_norm_weights_survive_save_and_load(small_path):
    model = AutoModelForCausalLM.from_pretrained(small_path)
    layers = model.model.layers
    for index in range(4):
        expected_attn = 40.0 if index in STRONG.layers else 1.0
        assert layers[index].input_layernorm.weight[7].item() == pytest.approx(expected_attn)
        assert layers[index].post_attention_layernorm.weight[7].item() == pytest.approx(expected_attn)
    assert layers[3].post_attention_layernorm.weight[100].item() == pytest.approx(40.0)
    assert layers[3].input_layernorm.weight[100].item() == pytest.approx(1.0)  # ln_mlp only
    unplanted = torch.cat([layer.input_layernorm.weight[:7] for layer in layers])
    assert torch.all(unplanted == 1.0)


def test_model_config_matches_spec_and_tokenizer(small_path):
    model = AutoModelForCausalLM.from_pretrained(small_path)
    tokenizer = AutoTokenizer.from_pretrained(small_path)
    config = model.config
    assert config.model_type == "qwen3_moe"
    assert (config.num_hidden_layers, config.hidden_size, config.num_experts) == (4, 128, 8)
    assert (config.num_experts_per_tok, config.moe_intermediate_size) == (2, 64)
    assert config.mlp_only_layers == [] and config.decoder_sparse_step == 1
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == \
        (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert len(tokenizer) == config.vocab_size == 1024


def test_tokenizer_round_trips_text(small_path):
    tokenizer = AutoTokenizer.from_pretrained(small_path)
    text = "Return a new list containing all items from the iterable."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text) / 2  # trained merges, not bytes
    assert tokenizer.decode(ids) == text


def test_planted_dim_is_an_outlier_in_a_forward_pass(small_path):
    tokenizer = AutoTokenizer.from_pretrained(small_path)
    model = AutoModelForCausalLM.from_pretrained(small_path)
    ids = pack_sequences(tokenizer, load_texts("stdlib"), 2, 64)  # [2, 64]
    outputs = []
    model.model.layers[0].input_layernorm.register_forward_hook(lambda m, i, o: outputs.append(o))
    with torch.no_grad():
        model(input_ids=ids)
    big = outputs[0].abs() >= 6  # [2, 64, hidden]
    assert big[..., 7].float().mean() > 0.5
    big[..., 7] = False
    assert not big.any()


def test_olmoe_builds_with_plants(cache_dir):
    spec = TinySpec(arch="olmoe", num_layers=2, plants=(Plant(dim=5, layers=[1], scale=3.0),))
    path = build_tiny(spec, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "olmoe"
    assert model.config.intermediate_size == spec.expert_size
    assert model.model.layers[1].input_layernorm.weight[5].item() == pytest.approx(3.0)
    assert model.model.layers[0].input_layernorm.weight[5].item() == pytest.approx(1.0)
