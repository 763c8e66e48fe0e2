"""Outlier features planted in a tiny checkpoint's weights, so tests know what must be found.

- `kind: norm` scales, at `dim`, the weight of the norm whose output a site's block
  reads (found by running the model once), in chosen layers and sites. RMSNorm returns
  ``x / rms(x) * weight``; in a random-init model ``x / rms(x)`` is close to N(0, 1) per
  dim, so with ``weight[d] = 40`` the output has |x| >= 6 whenever |N(0, 1)| >= 0.15,
  at about 88% of tokens, while unplanted dims reach 6 with probability about 2e-9. A
  plant in one layer, or a small scale such as 1.5, makes a negative control.
- `kind: embedding` sets column `dim` of the token embeddings to ±`scale`: a value that
  the residual stream carries through every layer, so the dim exceeds at both sites of
  every layer in any family, pre-norm or not (after an RMSNorm over h dims a lone large
  dim comes out near sqrt(h): 8 at h = 64).
- `kind: expert` scales by `scale` the weights with which routed expert `expert` of each
  of `layers` writes output dim `dim` (its down_proj row): a super expert, whose output at
  `dim` becomes a massive activation of the residual stream from that layer on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from actors.families import family_of, site_modules
from actors.families import inner_model
from actors.moe import moe_blocks
from common.errors import ConfigError
from common.layout import SITES

KINDS = ("norm", "embedding", "expert")


def _fail(key: str, value, rule: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: {rule}")


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class Plant:
    """An outlier feature at `dim`: a norm weight scaled by `scale` in `layers` at `sites`
    (kind norm), the token embeddings' column set to ±scale (kind embedding), or the output
    weights of routed expert `expert` in `layers` scaled by `scale` (kind expert).

    `layers` and `sites` accept lists or tuples and are stored as tuples so specs hash.
    """

    dim: int
    layers: tuple[int, ...] = ()
    scale: float = 40.0
    sites: tuple[str, ...] = SITES
    kind: str = "norm"
    expert: int = 0

    def __post_init__(self) -> None:
        for key in ("layers", "sites"):
            value = getattr(self, key)
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, range)):
                _fail(key, value, "must be a list")
            object.__setattr__(self, key, tuple(value))
        if self.kind not in KINDS:
            _fail("kind", self.kind, f"must be one of {list(KINDS)}")
        if not _is_index(self.dim):
            _fail("dim", self.dim, "must be an integer >= 0")
        if self.kind in ("norm", "expert") and (not self.layers or not all(_is_index(i) for i in self.layers)):
            _fail("layers", list(self.layers), "must be a non-empty list of integers >= 0")
        if len(set(self.layers)) != len(self.layers):
            _fail("layers", list(self.layers), "must not repeat a layer")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) \
                or not math.isfinite(self.scale) or self.scale == 0:
            _fail("scale", self.scale, "must be a finite non-zero number")
        if not self.sites or not set(self.sites) <= set(SITES) or len(set(self.sites)) != len(self.sites):
            _fail("sites", list(self.sites), f"must be a non-empty subset of {list(SITES)}")


def default_plants(num_layers: int = 8, hidden_size: int = 128) -> tuple[Plant, ...]:
    """Two true outliers and two negative controls for a model of this size.

    True outliers: two dims at scale 40 in the first three quarters of the
    layers, both sites (far above the 25%-of-layers and 6%-of-tokens bars).
    Controls: one dim at scale 40 in a single layer (fails the layer bar when
    num_layers > 4) and one at scale 1.5 in every layer. The weak dim peaks
    near 1.5 x 4.8 (the largest normalized value over a few thousand tokens),
    so it may touch 6 at a handful of tokens, but never near 6% of them.
    For the default 8 x 128 model these are dims 7 and 77 (true), 100 and 33.
    """
    strong_layers = tuple(range(max(1, math.ceil(num_layers * 3 / 4))))
    strong_a, strong_b, lone, weak = (hidden_size * d // 128 for d in (7, 77, 100, 33))
    return (
        Plant(dim=strong_a, layers=strong_layers, scale=40.0),
        Plant(dim=strong_b, layers=strong_layers, scale=40.0),
        Plant(dim=lone, layers=(num_layers // 2,), scale=40.0),
        Plant(dim=weak, layers=tuple(range(num_layers)), scale=1.5),
    )


DEFAULT_PLANTS = default_plants()
# The dims of DEFAULT_PLANTS that meet the outlier criteria in the default spec.
DEFAULT_OUTLIER_DIMS = tuple(plant.dim for plant in DEFAULT_PLANTS[:2])  # (7, 77)


def plant_weights(model, plants: tuple[Plant, ...]) -> None:
    """Apply each plant to the model's weights (see the module docstring)."""
    norms = feeding_norms(model) if any(p.kind == "norm" for p in plants) else {}
    family = family_of(model.config.model_type)
    with torch.no_grad():
        for plant in plants:
            if plant.kind == "embedding":
                embed = getattr(inner_model(model, family), family.embed).weight  # [vocab, hidden]
                sign = torch.where(embed[:, plant.dim] < 0, -1.0, 1.0)
                embed[:, plant.dim] = sign.to(embed.dtype) * plant.scale
                continue
            if plant.kind == "expert":
                plant_expert(model, family, plant)
                continue
            for index in plant.layers:
                for site in plant.sites:
                    norms[(index, site)].weight[plant.dim] *= plant.scale


def plant_expert(model, family, plant: Plant) -> None:
    """Scale what expert `plant.expert` writes to `plant.dim`: its row of the fused down_proj."""
    layers = getattr(inner_model(model, family), family.layers)
    blocks = moe_blocks(dict(enumerate(layers)), family)
    for index in plant.layers:
        if index not in blocks:
            _fail("plants.layers", list(plant.layers), f"layer {index} has no routed experts")
        down = blocks[index][0].down_proj  # [experts, hidden, intermediate] ([experts, intermediate, hidden] transposed)
        if getattr(blocks[index][0], "is_transposed", False):
            down[plant.expert, :, plant.dim] *= plant.scale
        else:
            down[plant.expert, plant.dim, :] *= plant.scale


def feeding_norms(model) -> dict[tuple[int, str], torch.nn.Module]:
    """{(layer, site): the child of the layer whose output is exactly what the site's block reads}.

    Found by one forward with hooks; a site no child feeds directly (post-norm layers) is
    refused for norm plants, in one line.
    """
    family = family_of(model.config.model_type)
    layers = getattr(inner_model(model, family), family.layers)
    outputs: dict[int, tuple] = {}  # id -> (module, output): outputs are kept, so ids stay unique
    inputs: dict[tuple[int, str], torch.Tensor] = {}

    def output_of(module, _args, out):
        if isinstance(out, torch.Tensor):
            outputs[id(out)] = (module, out)

    def input_of(key):
        def hook(_module, args, kwargs):
            inputs.setdefault(key, args[0] if args else kwargs["hidden_states"])
        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles += [child.register_forward_hook(output_of) for child in layer.children()]
        handles += [module.register_forward_pre_hook(input_of((index, site)), with_kwargs=True)
                    for site, module in site_modules(family, layer, index, model.config.model_type).items()]
    ids = torch.arange(16).remainder(model.config.vocab_size).unsqueeze(0)  # [1, 16]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    found = {key: outputs[id(value)][0] if outputs.get(id(value), (None, None))[1] is value else None
             for key, value in inputs.items()}
    for key, norm in found.items():
        if norm is None or not isinstance(getattr(norm, "weight", None), torch.Tensor):
            raise ConfigError(f"{model.config.model_type}: no norm feeds layer {key[0]} {key[1]} directly "
                              "(not a pre-norm layer); plant kind 'embedding' instead")
    return found
