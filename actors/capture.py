"""Which activations we capture, and the hooks that capture them.

A capture site is named by the module it reads, relative to a decoder layer. All
supported architectures (Llama, Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, DeepSeek-V3)
use the same names; adding a site or an architecture touches only this table.
"""

from __future__ import annotations

import torch
from torch import nn

SITES = {"ln_attn": "input_layernorm", "ln_mlp": "post_attention_layernorm"}


class Capture:
    """Forward hooks that keep each site's output of the last forward pass.

    `taken[(layer, site)]` is the norm output `# [batch, seq, hidden]`, detached and
    still on the model's device: moving to the CPU happens once, later, per batch.
    """

    def __init__(self, layers: dict[int, nn.Module]):
        self.taken: dict[tuple[int, str], torch.Tensor] = {}
        self._handles = [
            getattr(layer, module).register_forward_hook(self._keep(index, site))
            for index, layer in layers.items()
            for site, module in SITES.items()
        ]

    def _keep(self, layer: int, site: str):
        def hook(_module, _inputs, output):
            self.taken[(layer, site)] = output.detach()

        return hook

    def pop(self) -> dict[tuple[int, str], torch.Tensor]:
        taken, self.taken = self.taken, {}
        return taken

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
