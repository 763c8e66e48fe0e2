"""The private parts of transformers this project relies on, named in one place.

A stage's shard class (actors/shard.py) and the planner's meta-device model (actors/anatomy.py)
use a few internals that transformers may move in any release; pyproject.toml pins the range
they were checked against. An upgrade that moves one fails here, with its name and its user,
before any test of a stage fails for reasons harder to read.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel

ROOT = Path(__file__).resolve().parent.parent


def _model_mapping() -> bool:
    config = transformers.CONFIG_MAPPING["qwen3_moe"]
    return AutoModelForCausalLM._model_mapping[config].__name__ == "Qwen3MoeForCausalLM"


def _experts_flag_is_cached_on_the_class() -> bool:
    source = inspect.getsource(PreTrainedModel._can_set_experts_implementation)
    return '"_can_set_experts_implementation_cached_value"' in source


def _load_report_attributes() -> bool:
    return all(hasattr(PreTrainedModel, name) for name in ("_tied_weights_keys", "_keys_to_ignore_on_load_unexpected"))


def _from_config() -> bool:
    import torch

    config = transformers.Qwen3MoeConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=32,
                                         moe_intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                                         num_experts=2, num_experts_per_tok=1, vocab_size=64)
    with torch.device("meta"):
        model = AutoModelForCausalLM._model_mapping[type(config)]._from_config(config, dtype=torch.bfloat16)
    return next(model.parameters()).dtype == torch.bfloat16


def _dequantizing_configs() -> bool:
    from actors.checkpoint import DEQUANTIZABLE

    return all("dequantize" in inspect.signature(getattr(transformers, name)).parameters
               for name in DEQUANTIZABLE.values())


INTERNALS = [
    ("AutoModelForCausalLM._model_mapping[config class]", "actors/checkpoint.py causal_lm_class", _model_mapping),
    ("PreTrainedModel._can_set_experts_implementation and its cached class attribute",
     "actors/shard.py shard_class, actors/checkpoint.py has_experts", _experts_flag_is_cached_on_the_class),
    ("PreTrainedModel._tied_weights_keys, _keys_to_ignore_on_load_unexpected", "actors/shard.py shard_class",
     _load_report_attributes),
    ("PreTrainedModel._from_config(config, dtype=...)", "actors/anatomy.py _meta_model", _from_config),
    ("FineGrainedFP8Config / Mxfp4Config(dequantize=True)", "actors/checkpoint.py dequantize_kwargs",
     _dequantizing_configs),
]


def moved(present) -> str | None:
    """None when the check holds; else why not (an internal gone often raises on the way)."""
    try:
        return None if present() else "changed"
    except Exception as err:  # noqa: BLE001 - whatever the upgrade broke
        return f"{type(err).__name__}: {err}"


def test_the_transformers_internals_we_use_are_where_they_were():
    moved_ones = [f"{name} (used by {user}: {why})" for name, user, present in INTERNALS if (why := moved(present))]
    assert not moved_ones, (f"transformers {transformers.__version__} moved {'; '.join(moved_ones)}. "
                            "Adapt those users, then widen the transformers pin in pyproject.toml.")


def test_the_installed_transformers_is_the_pinned_one():
    pin = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    version = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    low, high = (tuple(int(p) for p in bound.split(".")[:2]) for bound in pin.groups())
    assert low <= version < high, f"transformers {transformers.__version__} is outside the pin {pin.group(0)}"
