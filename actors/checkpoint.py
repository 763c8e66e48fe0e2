"""A checkpoint before any layer loads: where it is, its config, its dtype, how it is quantized,
and the whole model as a plain `from_pretrained` builds it (the reference the stages must equal)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from common.errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Quantized releases a stage loads dequantized: quant_method -> transformers config class.
DEQUANTIZABLE = {"fp8": "FineGrainedFP8Config", "mxfp4": "Mxfp4Config"}


def load_config(model_path: str):
    """The checkpoint's config, with a clear error when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(
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
        raise ModelError(
            f"model_type={config.model_type!r} has no causal-LM class in transformers; "
            "pick a decoder-only checkpoint."
        ) from None


def text_config(config):
    """The decoder's own config: the `text_config` of a multimodal checkpoint, else `config`."""
    try:
        return config.get_text_config()
    except (AttributeError, ValueError):
        return config


def has_experts(config) -> bool:
    """Whether the family's experts take `experts_implementation` (dense models refuse it)."""
    return causal_lm_class(config)._can_set_experts_implementation()


def load_kwargs(config, dtype: str, experts_implementation: str | None = None,
                attn_implementation: str | None = None) -> dict:
    """from_pretrained's keyword arguments for a stage (and for the reference it must equal)."""
    kwargs = {"dtype": DTYPES[dtype], **dequantize_kwargs(config)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    return kwargs


def quant_method(config) -> str | None:
    """The `quant_method` of a quantized release's config (None: not quantized)."""
    quantized = getattr(config, "quantization_config", None)
    if not quantized:
        return None
    method = quantized.get("quant_method") if isinstance(quantized, dict) else quantized.quant_method
    return str(getattr(method, "value", method))


def dequantize_kwargs(config) -> dict:
    """`quantization_config` that loads a quantized release dequantized, or ModelError."""
    method = quant_method(config)
    if method is None:
        return {}
    if method not in DEQUANTIZABLE:
        raise ModelError(
            f"the checkpoint is quantized with {method!r}, which a stage cannot dequantize; outliers "
            "are measured on the model's own weights: give the unquantized (bf16) release, or one "
            f"quantized with {sorted(DEQUANTIZABLE)} (loaded dequantized)."
        )
    import transformers

    return {"quantization_config": getattr(transformers, DEQUANTIZABLE[method])(dequantize=True)}


def load_full(model_path: str, dtype: str = "auto", **kwargs) -> nn.Module:
    """The whole model, exactly as a plain `from_pretrained` builds it (the reference)."""
    from transformers import AutoModelForCausalLM

    config = load_config(model_path)
    if dtype == "auto":
        dtype = checkpoint_dtype(model_path, config)
    return AutoModelForCausalLM.from_pretrained(model_path, **{**load_kwargs(config, dtype), **kwargs}).eval()


def checkpoint_dir(model_path: str) -> str:
    """A local directory for a checkpoint: as given, or the local HF cache snapshot."""
    if Path(model_path).expanduser().is_dir():
        return str(Path(model_path).expanduser().resolve())
    if model_path.startswith(("/", ".", "~")) or Path(model_path).exists():
        raise ModelError(
            f"model.path={model_path!r}: no checkpoint directory there. Give a directory holding "
            "config.json and *.safetensors, or a Hugging Face id like 'allenai/OLMoE-1B-7B-0924'."
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as err:  # hub errors come in many classes
        raise ModelError(
            f"model.path={model_path!r} is not a local directory and could not be fetched from "
            f"the Hugging Face hub ({first_line(err)}). Without network access, download it "
            "elsewhere and pass the local checkpoint directory."
        ) from None


def checkpoint_dtype(model_path: str, config) -> str:
    """The dtype `from_pretrained(dtype="auto")` picks: the config's, else the first floating
    tensor's in the checkpoint."""
    dtype = getattr(config, "dtype", None)
    if dtype is None:
        dtype = _first_float_dtype(model_path)
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ModelError(
            f"{model_path}: the checkpoint's dtype is {name}; set model.dtype to one of {sorted(DTYPES)}."
        )
    return name


_SAFETENSORS_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _first_float_dtype(model_path: str) -> str:
    for path in sorted(Path(model_path).glob("*.safetensors")):
        for name, meta in safetensors_header(path).items():
            if name != "__metadata__" and meta["dtype"] in _SAFETENSORS_FLOATS:
                return _SAFETENSORS_FLOATS[meta["dtype"]]
    return "float32"


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))
