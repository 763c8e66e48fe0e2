"""Load only the decoder layers [a, b) of a Hugging Face checkpoint.

A stage never materializes the whole model: we subclass the checkpoint's
CausalLM class and, before weights are loaded, swap every module the stage
does not own (other layers, embeddings off stage 0, final norm, lm_head) for a
parameter-free placeholder. `from_pretrained` then reads only the tensors that
still have a home, running transformers' own key conversions (fused expert
weights included); the other tensors come back as "unexpected" and are never
materialized.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from actors.capture import SITES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A checkpoint that cannot be used, with a message saying how to fix it."""


class _Absent(nn.Module):
    """Placeholder for a module owned by another stage: no parameters, never called."""

    def forward(self, *args, **kwargs):  # pragma: no cover - a bug if reached
        raise RuntimeError("this module belongs to another pipeline stage")


@dataclass(frozen=True)
class ShardSpec:
    """What one stage loads: a local checkpoint dir and its layer range."""

    model_path: str
    layers: range
    dtype: str = "float32"
    experts_implementation: str | None = None  # None: what from_pretrained picks
    attn_implementation: str | None = None  # None: what from_pretrained picks (sdpa)


def load_config(model_path: str):
    """The checkpoint's config, with a clear error when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"model.path={model_path!r} could not be loaded: {first_line(err)}. "
            "Give a local checkpoint directory (with config.json and *.safetensors), "
            "or a Hugging Face id that is cached locally or reachable over the network."
        ) from None


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def causal_lm_class(config):
    """The CausalLM class `AutoModelForCausalLM` would build for this config."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ModelLoadError(
            f"model_type={config.model_type!r} has no causal-LM class in transformers; "
            "pick a decoder-only checkpoint."
        ) from None


def shard_class(base: type, layers: range, keep_embeddings: bool) -> type:
    """A subclass of `base` whose instances hold only `layers` (and embeddings if asked)."""

    def __init__(self, config):
        base.__init__(self, config)
        inner = self.model
        for i in range(len(inner.layers)):
            if i not in layers:
                inner.layers[i] = _Absent()
        if not keep_embeddings:
            inner.embed_tokens = _Absent()
        inner.norm = _Absent()
        self.lm_head = _Absent()

    attrs = {
        "__init__": __init__,
        # NOTE: transformers allows grouped_mm experts only for classes defined in its
        # own modeling files; without this flag our subclass silently runs `eager`
        # experts and its results drift from a plain from_pretrained in the last bits.
        "_can_set_experts_implementation_cached_value": True,
        # Tied weights would point lm_head at embed_tokens, which we may not hold.
        "_tied_weights_keys": None,
        # Other stages' tensors are expected to be left unread: keep the load report quiet.
        "_keys_to_ignore_on_load_unexpected": foreign_keys(layers, keep_embeddings),
        "__module__": base.__module__,
    }
    return type(f"{base.__name__}Shard", (base,), attrs)


def foreign_keys(layers: range, keep_embeddings: bool) -> list[str]:
    """Regexes for checkpoint keys that belong to other stages."""
    owned = "|".join(str(i) for i in layers)
    keys = [rf"(^|\.)layers\.(?!({owned})\.)\d+\.", r"(^|\.)norm\.", r"^lm_head\."]
    return keys if keep_embeddings else [*keys, r"embed_tokens\."]


def check_sites(config, model_path: str) -> None:
    """Fail early when the decoder layers lack the layer norms we capture."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        probe = AutoModelForCausalLM.from_config(_one_layer(config))
    layers = getattr(getattr(probe, "model", None), "layers", None)
    layer = layers[0] if layers is not None else None
    missing = [name for name in SITES.values() if not hasattr(layer, name)]
    if missing:
        where = type(layer).__name__ if layer is not None else f"{type(probe).__name__} (no model.layers)"
        raise ModelLoadError(
            f"{model_path}: decoder layers of {where} have no {missing}. "
            f"Supported: decoders with model.layers[i].{{{', '.join(SITES.values())}}} "
            "(Llama, Mistral, Mixtral, Qwen2/3(-MoE), OLMoE, GPT-OSS, DeepSeek-V3, ...). "
            "To add an architecture, map its module names in actors/capture.py:SITES."
        )


def _one_layer(config):
    import copy

    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    if getattr(small, "layer_types", None):
        small.layer_types = small.layer_types[:1]
    return small


def load_shard(spec: ShardSpec, device: str | torch.device = "cpu") -> nn.Module:
    """The CausalLM for `spec.layers` only, in eval mode on `device`."""
    config = load_config(spec.model_path)
    n = config.num_hidden_layers
    if spec.layers.start < 0 or spec.layers.stop > n or len(spec.layers) == 0:
        raise ModelLoadError(f"layers {spec.layers} outside the model's {n} layers")
    cls = shard_class(causal_lm_class(config), spec.layers, keep_embeddings=spec.layers.start == 0)
    kwargs = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    if spec.experts_implementation:
        kwargs["experts_implementation"] = spec.experts_implementation
    model, info = cls.from_pretrained(
        spec.model_path, dtype=DTYPES[spec.dtype], output_loading_info=True, **kwargs
    )
    if info["missing_keys"]:
        raise ModelLoadError(
            f"{spec.model_path}: checkpoint lacks {sorted(info['missing_keys'])[:5]} for layers "
            f"{spec.layers.start}-{spec.layers.stop - 1}; is it complete?"
        )
    return own_memory(model.to(device)).eval()


def own_memory(model: nn.Module) -> nn.Module:
    """Copy into process memory the tensors that are still views of the checkpoint file.

    NOTE: from_pretrained leaves tensors that need no dtype conversion as views of the
    memory-mapped safetensors file, which then stays mapped whole: every page the load read
    counts in the stage's RSS (bench: 206 MiB of file pages kept for 14 MiB of such tensors).
    Such storages are the non-resizable ones; the copies let the mapping go.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and not tensor.untyped_storage().resizable():
                tensor.data = tensor.data.clone()
    return model


def load_full(model_path: str, dtype: str = "float32", **kwargs) -> nn.Module:
    """The whole model, exactly as a plain `from_pretrained` builds it (the reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype], **kwargs).eval()


def checkpoint_dir(model_path: str) -> str:
    """A local directory for a checkpoint: as given, or the local HF cache snapshot."""
    if Path(model_path).expanduser().is_dir():
        return str(Path(model_path).expanduser().resolve())
    if model_path.startswith(("/", ".", "~")) or Path(model_path).exists():
        raise ModelLoadError(
            f"model.path={model_path!r}: no checkpoint directory there. Give a directory holding "
            "config.json and *.safetensors, or a Hugging Face id like 'allenai/OLMoE-1B-7B-0924'."
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as err:  # hub errors come in many classes
        raise ModelLoadError(
            f"model.path={model_path!r} is not a local directory and could not be fetched from "
            f"the Hugging Face hub ({first_line(err)}). Without network access, download it "
            "elsewhere and pass the local checkpoint directory."
        ) from None


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def parameter_bytes(model_path: str, num_layers: int) -> tuple[list[int], int]:
    """Bytes per decoder layer and of the embeddings, read from safetensors headers only."""
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{model_path} holds no *.safetensors files; re-save the checkpoint with "
            "save_pretrained(safe_serialization=True)."
        )
    layers, embed = [0] * num_layers, 0
    for name, size in (item for f in files for item in _tensor_sizes(f)):
        parts = name.split(".")
        if "layers" in parts:
            index = int(parts[parts.index("layers") + 1])
            if index < num_layers:  # e.g. DeepSeek's multi-token-prediction layers
                layers[index] += size
        elif "embed_tokens" in parts:
            embed += size
    return layers, embed


def _tensor_sizes(path: Path):
    import json
    import math

    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    for name, meta in header.items():
        if name != "__metadata__":
            yield name, math.prod(meta["shape"]) * _DTYPE_BYTES.get(meta["dtype"], 4)
