"""Load only the decoder layers [a, b) of a Hugging Face checkpoint.

A stage never materializes the whole model: we subclass the checkpoint's CausalLM
class and, before weights are loaded, swap every module the stage does not own for a
parameter-free placeholder: other stages' layers pass their input through, the token
embeddings off stage 0 become a stand-in of the right shape, the final norm and the
LM head are absent. `from_pretrained` then reads only the tensors that still have a
home, running transformers' own key conversions (fused expert weights, dequantization)
on them; the other tensors come back as "unexpected" and are never materialized.
Where the decoder and its parts live is the family's (actors/families.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from actors.allocator import transients_returned
from actors.families import Family, family_of
from actors.layers import carried, inner_model
from common.errors import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Quantized releases a stage loads dequantized: quant_method -> transformers config class.
DEQUANTIZABLE = {"fp8": "FineGrainedFP8Config", "mxfp4": "Mxfp4Config"}


def _plain_attributes(module: nn.Module) -> dict:
    """A module's own plain attributes (attention_type, layer_idx, ...): the model's forward
    may read them off a layer it iterates over, even one another stage owns."""
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and not isinstance(v, (nn.Module, torch.Tensor))}


class _Absent(nn.Module):
    """A module owned by another stage (or by no stage): no parameters, never called."""

    def __init__(self, original: nn.Module | None = None):
        super().__init__()
        if original is not None:
            vars(self).update(_plain_attributes(original))

    def forward(self, *args, **kwargs):  # pragma: no cover - a bug if reached
        raise RuntimeError("this module belongs to another pipeline stage")


class _PassThrough(_Absent):
    """A decoder layer another stage owns: returns what it was given, as the family's layers
    return it, so the forward goes on to the stage's own layers (whose first one receives
    the handed-off state instead)."""

    def __init__(self, original: nn.Module, carries: tuple, arity: int):
        super().__init__(original)
        self.carries, self.arity = carries, arity

    def forward(self, *args, **kwargs):
        state = carried(args, kwargs, self.carries)
        return state[0] if self.arity == 1 else (*state, *[None] * (self.arity - len(state)))


class StandInEmbedding(_Absent):
    """The token embeddings of a stage after the first: a tensor of the right shape, which
    the first layer's hand-off replaces. `fill` is "zeros", or "noise" to check that nothing
    downstream depends on it (actors/stage.py)."""

    def __init__(self, original: nn.Module, hidden_size: int):
        super().__init__(original)
        self.hidden_size = hidden_size
        self.dtype = torch.float32
        self.device = torch.device("cpu")
        self.fill = "zeros"

    @property
    def weight(self) -> torch.Tensor:
        """An empty weight of the right dtype and device, for forwards that ask the embedding's."""
        return torch.empty(0, self.hidden_size, dtype=self.dtype, device=self.device)

    def forward(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = (*input_ids.shape, self.hidden_size)
        if self.fill == "noise":
            gen = torch.Generator(device=input_ids.device).manual_seed(7)
            return torch.randn(shape, generator=gen, device=input_ids.device).to(self.dtype)
        return torch.zeros(shape, dtype=self.dtype, device=input_ids.device)


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


def shard_class(base: type, family: Family, layers: range, keep_embeddings: bool) -> type:
    """A subclass of `base` whose instances hold only `layers` (and embeddings if asked)."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        inner = inner_model(self, family)
        decoder = getattr(inner, family.layers)
        for i in range(len(decoder)):
            if i not in layers:
                decoder[i] = _PassThrough(decoder[i], family.carries, family.arity)
        if not keep_embeddings:
            setattr(inner, family.embed, StandInEmbedding(getattr(inner, family.embed), config.hidden_size))
        if isinstance(getattr(inner, family.norm, None), nn.Module):
            setattr(inner, family.norm, _Absent(getattr(inner, family.norm)))
        if isinstance(getattr(self, family.head, None), nn.Module):
            setattr(self, family.head, _Absent())

    attrs = {
        "__init__": __init__,
        # NOTE: transformers decides from the defining module's source whether a class may use
        # the grouped_mm experts kernel; our subclass inherits the answer of the class it extends
        # (an eager fallback would drift from a plain from_pretrained in the last bits, and dense
        # models refuse the flag).
        "_can_set_experts_implementation_cached_value": base._can_set_experts_implementation(),
        # Tied weights would point lm_head at the embeddings, which we may not hold.
        "_tied_weights_keys": None,
        # Other stages' tensors are expected to be left unread: keep the load report quiet.
        "_keys_to_ignore_on_load_unexpected": foreign_keys(family, layers, keep_embeddings),
        "__module__": base.__module__,
    }
    return type(f"{base.__name__}Shard", (base,), attrs)


def foreign_keys(family: Family, layers: range, keep_embeddings: bool) -> list[str]:
    """Regexes for checkpoint keys that belong to other stages."""
    owned = "|".join(str(i) for i in layers)
    keys = [rf"(^|\.){family.layers}\.(?!({owned})\.)\d+\.", rf"(^|\.){family.norm}\.", rf"^{family.head}\."]
    return keys if keep_embeddings else [*keys, rf"{family.embed}\."]


def load_shard(spec: ShardSpec, device: str | torch.device = "cpu") -> nn.Module:
    """The CausalLM for `spec.layers` only, in eval mode on `device`."""
    config = load_config(spec.model_path)
    n = text_config(config).num_hidden_layers
    if spec.layers.start < 0 or spec.layers.stop > n or len(spec.layers) == 0:
        raise ModelError(f"layers {spec.layers} outside the model's {n} layers")
    family = family_of(text_config(config).model_type)
    cls = shard_class(causal_lm_class(config), family, spec.layers, keep_embeddings=spec.layers.start == 0)
    with transients_returned():
        model, info = cls.from_pretrained(spec.model_path, output_loading_info=True, **load_kwargs(
            config, spec.dtype, spec.experts_implementation, spec.attn_implementation))
        if info["missing_keys"]:
            raise ModelError(
                f"{spec.model_path}: checkpoint lacks {sorted(info['missing_keys'])[:5]} for layers "
                f"{spec.layers.start}-{spec.layers.stop - 1}; is it complete?"
            )
        model = own_memory(model.to(device)).eval()
    embed = getattr(inner_model(model, family), family.embed)
    if isinstance(embed, StandInEmbedding):
        embed.dtype, embed.device = DTYPES[spec.dtype], torch.device(device)
    return model


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


def load_full(model_path: str, dtype: str = "auto", **kwargs) -> nn.Module:
    """The whole model, exactly as a plain `from_pretrained` builds it (the reference)."""
    from transformers import AutoModelForCausalLM

    config = load_config(model_path)
    if dtype == "auto":
        from actors.anatomy import checkpoint_dtype

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
