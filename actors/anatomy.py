"""What a checkpoint is made of, read without loading its weights.

Before the cluster starts, the driver builds the model on the meta device (no memory,
no weights) and learns from it everything a plan needs: the family and the module that
plays each role in every layer (refusing, in one line, what cannot be captured), the
bytes each layer and the embeddings will take once loaded (dense and MoE layers mixed,
shared experts, dequantized releases), and the dtype `auto` stands for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from actors.checkpoint import (
    DTYPES, causal_lm_class, checkpoint_dtype, dequantize_kwargs, has_experts, quant_method, safetensors_header,
    text_config)
from actors.families import family_of, inner_model, site_modules
from actors.moe import moe_blocks
from common.errors import ModelError


@dataclass(frozen=True)
class Anatomy:
    """The facts of one checkpoint a plan is made from."""

    model_type: str
    family: str
    num_layers: int
    hidden_size: int
    dtype: str                  # what the stages load: model.dtype, `auto` resolved
    layer_bytes: tuple[int, ...]  # per decoder layer, at `dtype`
    embed_bytes: int            # the token embeddings, held by stage 0 only
    shared_bytes: int           # what every stage holds besides its layers (rotary, per-layer tables, ...)
    experts: bool               # the model has routed experts (experts_implementation applies)
    quantization: str | None    # quant_method of a quantized release (loaded dequantized)


def anatomy(model_path: str, config, dtype: str = "auto", experts_implementation: str | None = None,
            capture=None) -> Anatomy:
    """Inspect the checkpoint at `model_path` (config already read) on the meta device."""
    text = text_config(config)
    family = family_of(text.model_type)
    if family.refuse:
        raise ModelError(f"model_type={text.model_type!r} ({family.name}) is not supported: {family.refuse}")
    quantization = quant_method(config)
    dequantize_kwargs(config)  # refuses what cannot be dequantized
    if quantization == "fp8":
        _check_fp8_tiles(model_path, config)
    resolved = checkpoint_dtype(model_path, config) if dtype == "auto" else dtype
    experts = has_experts(config)
    if experts_implementation and not experts:
        raise ModelError(
            f"model.experts_implementation={experts_implementation!r}, but {config.model_type!r} "
            "has no experts kernel to choose; leave model.experts_implementation empty."
        )
    model = _meta_model(config, text, DTYPES[resolved])
    try:
        inner = inner_model(model, family)
    except AttributeError:
        inner = None
    layers = getattr(inner, family.layers, None)
    if layers is None:
        raise ModelError(
            f"model_type={config.model_type!r}: {type(model).__name__} has no "
            f"{family.inner}.{family.layers}; map its decoder in actors/families.py:FAMILIES."
        )
    for index, layer in enumerate(layers):
        site_modules(family, layer, index, text.model_type)
    if capture is not None and (capture.routing or capture.experts):
        _check_routing(family, dict(enumerate(layers)), text.model_type)
    layer_bytes = tuple(_bytes(layer) for layer in layers)
    embed_bytes = _bytes(getattr(inner, family.embed, None))
    placed = {id(p) for part in (layers, getattr(inner, family.embed, None), getattr(inner, family.norm, None),
                                 getattr(model, family.head, None)) if part is not None for p in part.parameters()}
    shared = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in placed)
    return Anatomy(
        model_type=config.model_type, family=family.name, num_layers=len(layers),
        hidden_size=text.hidden_size, dtype=resolved, layer_bytes=layer_bytes, embed_bytes=embed_bytes,
        shared_bytes=shared, experts=experts, quantization=quantization,
    )


def _check_routing(family, layers: dict, model_type: str) -> None:
    """Refuse routing and expert captures where no layer routes through a standard experts call."""
    wanted = "capture.routing / capture.experts"
    if not family.routed:
        raise ModelError(f"{wanted}: model_type={model_type!r} ({family.name}) {family.routed_refusal}; "
                         "turn them off for this family.")
    if not moe_blocks(layers, family):
        raise ModelError(f"{wanted}: model_type={model_type!r} has no layer with a routed experts module "
                         f"(looked for mlp.{family.experts}); turn them off for this model.")


_FP8 = ("F8_E4M3", "F8_E5M2")


def _check_fp8_tiles(model_path: str, config) -> None:
    """Refuse block-FP8 weights whose shape is not whole tiles: transformers derives the tile
    from the scale grid, so a partial tile is dequantized wrongly or not at all."""
    quantized = config.quantization_config
    block = (quantized.get("weight_block_size") if isinstance(quantized, dict)
             else getattr(quantized, "weight_block_size", None)) or (128, 128)
    for path in sorted(Path(model_path).glob("*.safetensors")):
        for name, meta in safetensors_header(path).items():
            shape = meta.get("shape", []) if name != "__metadata__" else []
            if meta.get("dtype") in _FP8 and len(shape) == 2 and (shape[0] % block[0] or shape[1] % block[1]):
                raise ModelError(
                    f"the checkpoint is quantized with 'fp8' in {block[0]}x{block[1]} tiles, and {name} "
                    f"{shape} ends in a partial tile, which transformers dequantizes wrongly; give the "
                    "bf16 weights (e.g. a copy converted with the model's own fp8-to-bf16 script)."
                )


def _meta_model(config, text, dtype: torch.dtype):
    """The causal LM's modules with meta tensors: shapes without memory."""
    import copy

    plain = copy.deepcopy(text)
    if hasattr(plain, "quantization_config"):
        del plain.quantization_config  # the stages hold the dequantized modules
    cls = causal_lm_class(config)
    with torch.device("meta"):
        try:
            return cls._from_config(plain, dtype=dtype)
        except Exception as err:  # noqa: BLE001 - any family's constructor
            raise ModelError(
                f"model_type={config.model_type!r}: transformers could not build the model from its "
                f"config ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
            ) from None


def _bytes(module) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())
