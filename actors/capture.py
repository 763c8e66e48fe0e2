"""Which activations we capture, and the hooks that capture them.

A site is the input of the module that plays a role in a decoder layer
(actors/families.py): `ln_attn` the attention block's, `ln_mlp` the MLP or MoE block's.
Forward pre-hooks keep that input as the model passes it, so what is stored is what the
block's projections, router and experts read. With `capture.residual`, a third site,
`resid`, is the decoder layer's output: the residual stream.

Each site must be seen exactly once per layer and forward, and must not change after it
was seen; anything else is a family this capture does not understand, and fails the
forward rather than store a wrong value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from actors.families import Family, site_modules
from common.layout import SITES
from common.errors import ModelError
from common.layout import RESIDUAL


@dataclass(frozen=True)
class CaptureConfig:
    """The `capture:` config section: what a stage records besides the two sites."""

    routing: bool = False
    """Every MoE layer's top-k routing of every token (layer, seq, pos, rank, expert, weight)."""
    experts: bool = False
    """Per (layer, expert): tokens routed, max |output| and where; per dim, outputs >= the floor."""
    residual: bool = False
    """A third site `resid`, the decoder layer's output, and a histogram of its |x| per layer."""


class CaptureError(ModelError):
    """A site was missed, seen twice, or changed in place by the model after capture: a family
    this capture does not understand."""


class Capture:
    """Pre-hooks that keep each site's input of the last forward pass.

    `taken[(layer, site)]` is the block input `# [batch, seq, hidden]`, detached and still
    on the model's device: moving to the CPU happens once, later, per batch.
    """

    def __init__(self, layers: dict[int, nn.Module], family: Family, model_type: str = "",
                 residual: bool = False):
        sites = [*SITES, RESIDUAL] if residual else list(SITES)
        self.expected = {(index, site) for index in layers for site in sites}
        self.taken: dict[tuple[int, str], torch.Tensor] = {}
        self._versions: dict[tuple[int, str], int] = {}
        self._errors: list[str] = []
        self._handles = [
            module.register_forward_pre_hook(self._input_of(index, site), with_kwargs=True)
            for index, layer in layers.items()
            for site, module in site_modules(family, layer, index, model_type).items()
        ]
        if residual:
            # NOTE: first among the layer's hooks: the stage's slice ends the forward in its own.
            self._handles += [layer.register_forward_hook(self._output_of(index), prepend=True)
                              for index, layer in layers.items()]

    def _input_of(self, layer: int, site: str):
        def hook(_module, args, kwargs):
            self._keep(layer, site, args[0] if args else kwargs.get("hidden_states"))

        return hook

    def _output_of(self, layer: int):
        def hook(_module, _args, output):
            self._keep(layer, RESIDUAL, output[0] if isinstance(output, (tuple, list)) else output)

        return hook

    def _keep(self, layer: int, site: str, value) -> None:
        if not isinstance(value, torch.Tensor):
            self._errors.append(f"layer {layer} {site}: the value is not a tensor")
        elif (layer, site) in self.taken:
            self._errors.append(f"layer {layer} {site}: the block ran twice in one forward")
        else:
            self.taken[(layer, site)] = value.detach()
            self._versions[(layer, site)] = _version(value)

    def pop(self) -> dict[tuple[int, str], torch.Tensor]:
        """The captures of the last forward; CaptureError if any site was not seen exactly once."""
        taken, errors, versions = self.taken, self._errors, self._versions
        self.taken, self._errors, self._versions = {}, [], {}
        missing = sorted(self.expected - set(taken))
        errors += [f"layer {layer} {site}: never ran" for layer, site in missing]
        # NOTE: a block input that the model later changes in place would be stored changed.
        errors += [f"layer {layer} {site}: changed in place after capture"
                   for (layer, site), tensor in taken.items() if _version(tensor) != versions[(layer, site)]]
        if errors:
            raise CaptureError("; ".join(errors[:4]))
        return taken

    def clear(self) -> None:
        self.taken, self._errors, self._versions = {}, [], {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter (-1 for inference tensors, which keep none)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1
