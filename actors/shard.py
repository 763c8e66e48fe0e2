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

import torch
from torch import nn

from actors.allocator import transients_returned
from actors.checkpoint import DTYPES, causal_lm_class, load_config, load_kwargs, text_config
from actors.families import Family, family_of, inner_model
from actors.handoff import Absent, PassThrough, StandInEmbedding
from common.errors import ModelError


@dataclass(frozen=True)
class ShardSpec:
    """What one stage loads: a local checkpoint dir and its layer range."""

    model_path: str
    layers: range
    dtype: str = "float32"
    experts_implementation: str | None = None  # None: what from_pretrained picks
    attn_implementation: str | None = None  # None: what from_pretrained picks (sdpa)


def shard_class(base: type, family: Family, layers: range, keep_embeddings: bool) -> type:
    """A subclass of `base` whose instances hold only `layers` (and embeddings if asked)."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        inner = inner_model(self, family)
        decoder = getattr(inner, family.layers)
        for i in range(len(decoder)):
            if i not in layers:
                decoder[i] = PassThrough(decoder[i], family.carries, family.arity)
        if not keep_embeddings:
            setattr(inner, family.embed, StandInEmbedding(getattr(inner, family.embed), config.hidden_size))
        if isinstance(getattr(inner, family.norm, None), nn.Module):
            setattr(inner, family.norm, Absent(getattr(inner, family.norm)))
        if isinstance(getattr(self, family.head, None), nn.Module):
            setattr(self, family.head, Absent())

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


