"""Config loading: typed sections, unknown keys and bad values rejected with clear messages."""

from pathlib import Path

import pytest
import yaml

from cluster.config import load_config
from cluster.tiny_model import TinySpec
from common.errors import ConfigError

CONFIGS = Path(__file__).parent.parent / "configs"


def within(given, built, key=""):
    """Every value the YAML gives is the value the built config holds (lists as lists)."""
    if isinstance(given, dict):
        for name, value in given.items():
            within(value, built[name], f"{key}.{name}")
    elif isinstance(given, list):
        assert len(given) == len(built), key
        for i, (a, b) in enumerate(zip(given, built)):
            within(a, b, f"{key}[{i}]")
    else:
        assert given == built, f"{key}: {given!r} became {built!r}"


@pytest.mark.parametrize("name", ["tiny_moe.yaml", "olmoe_1b_7b.yaml", "qwen3_30b_a3b.yaml"])
def test_shipped_configs_load_with_every_value_they_give(name):
    given = yaml.safe_load((CONFIGS / name).read_text())
    within(given, load_config(CONFIGS / name).to_dict())


def test_default_config_builds_a_planted_tiny_model():
    config = load_config(CONFIGS / "tiny_moe.yaml")
    assert isinstance(config.model.tiny, TinySpec) and config.model.path is None
    assert {p.dim for p in config.model.tiny.plants} == {7, 77, 100, 33}


def test_flags_and_set_override(tmp_path):
    config = load_config(CONFIGS / "tiny_moe.yaml", [
        "pipeline.num_stages=3", "data.seq_len=64", "storage.output=/tmp/x", "analysis.threshold=5",
    ])
    assert config.pipeline.num_stages == 3 and config.data.seq_len == 64
    assert config.storage.output == "/tmp/x" and config.analysis.threshold == 5.0


def test_model_path_override_replaces_the_tiny_model():
    config = load_config(CONFIGS / "tiny_moe.yaml", ['model.path="/ckpt/qwen"'])
    assert config.model.path == "/ckpt/qwen" and config.model.tiny is None


@pytest.mark.parametrize("overrides, message", [
    (["pipline.num_stages=2"], r"unknown key\(s\) \['pipline'\] at the top level; valid keys: \['analysis', 'capture', 'data', 'model', 'pipeline', 'storage'\]"),
    (["pipeline.num_stage=2"], r"unknown key\(s\) \['num_stage'\] in pipeline; valid keys: .*'num_stages'"),
    (["pipeline.num_stages=two"], r"pipeline.num_stages='two': give a whole number, or 'auto'"),
        (["pipeline.num_replicas=1.5"], r"pipeline.num_replicas=1.5: expected int or str"),
    (["pipeline.num_stages=0"], r"pipeline.num_stages=0: must be at least 1"),
    (["data.seq_len=true"], r"data.seq_len=True: expected int"),
    (["model.dtype=fp8"], r"model.dtype='fp8': choose one of \['auto', 'float32', 'bfloat16', 'float16'\]"),
    (["storage.mode=sparse"], r"storage.mode='sparse': choose one of \['dense', 'exceedances'\]"),
    (["pipeline.writer=async"], r"pipeline.writer='async': choose one of \['auto', 'thread', 'inline'\]"),
    (["analysis.layer_unit=token"], r"layer_unit='token'"),
    (["model.tiny.hidden_size=100", "model.tiny.num_heads=3"], r"num_heads"),
    (["model.tiny.plants=[{dim: 1, layers: [0], scale: 2, color: red}]"], r"unknown .*color"),
    (["pipeline"], r"--set 'pipeline': expected key=value"),
])
def test_bad_values_name_key_value_and_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny_moe.yaml", overrides)


def test_model_needs_path_or_tiny(tmp_path):
    with pytest.raises(ConfigError, match="give exactly one of model.path"):
        load_config({"model": {"dtype": "float32"}})
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['model'\]"):
        load_config({})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_round_trips_through_its_dict():
    config = load_config(CONFIGS / "tiny_moe.yaml")
    assert load_config(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config
