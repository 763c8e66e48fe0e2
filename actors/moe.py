"""What only a Mixture-of-Experts layer has: its routing, and what each expert writes.

In transformers 5 an MoE block calls its fused experts module as
`experts(hidden_states, top_k_index, top_k_weights)`: the routing exactly as the router
computed it, and every expert's weights in one module. `MoeProbe` watches that call:

- routing: the top-k of every token (`top_k_index`, `top_k_weights` # [tokens, k]);
- experts: the output of each routed (token, expert) pair before its routing weight,
  got by calling the module's own forward with one expert per row and a weight of 1 (the
  same pairs, so the same per-expert groups: bit for bit what the fused kernel computes
  inside), and of each shared expert (expert -1, a plain MLP beside the routed ones). It is
  reduced on the device to per-expert counts and maxima; no per-token output leaves it.

The block's output is then made from those pair outputs as the fused kernels make it
(`combine`), so the experts run once. The first call of each layer proves that: it also
runs the module's own call and compares the two bit for bit; a layer whose module combines
otherwise (an eager loop accumulating in bf16, say) keeps its own call from then on, and
pays for the experts twice.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from actors.families import Family
from common import storage
from common.errors import ModelError
from common.storage import EXPERTS, EXPERT_DIMS, ROUTING

SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
SHARED = -1  # the expert id of a shared expert

log = logging.getLogger(__name__)


def moe_blocks(layers: dict[int, nn.Module], family: Family) -> dict[int, tuple[nn.Module, list[nn.Module]]]:
    """{layer: (routed experts module, shared expert modules)} of the layers that route tokens."""
    blocks = {}
    for index, layer in layers.items():
        mlp = family.role_module(layer, "mlp")
        experts = getattr(mlp, family.experts, None)
        if isinstance(experts, nn.Module):
            shared = [m for owner in (mlp, layer) for name in SHARED_NAMES
                      if isinstance(m := getattr(owner, name, None), nn.Module)]
            blocks[index] = (experts, shared)
    return blocks


def num_experts(experts: nn.Module) -> int:
    count = getattr(experts, "num_experts", None)
    if not isinstance(count, int):
        raise ModelError(f"{type(experts).__name__} does not say how many experts it holds (num_experts)")
    return count


class MoeProbe:
    """Hooks on the MoE blocks of a stage's layers; `pop()` after each forward."""

    def __init__(self, blocks: dict[int, tuple[nn.Module, list[nn.Module]]], routing: bool, experts: bool,
                 floor: float):
        self.routing, self.experts, self.floor = routing, experts, floor
        self.keep: torch.Tensor | None = None  # [batch, seq] the real tokens; None: all are
        self.taken: dict = {}
        self.exact: dict[int, bool] = {}  # layer: its module's output is `combine` of the pairs'
        self._handles = []
        self._wrapped: list[nn.Module] = []
        for index, (module, shared) in blocks.items():
            if routing:
                self._handles.append(module.register_forward_hook(self._routing(index), with_kwargs=True))
            if experts:
                module.forward = self._experts(index, module.forward, num_experts(module))
                self._wrapped.append(module)
                self._handles += [m.register_forward_hook(self._shared(index)) for m in shared]

    def _routing(self, layer: int):
        def hook(module, args, kwargs, _output):
            _, index, weights = _routing_call(args, kwargs)
            self.taken.setdefault(layer, {})["routing"] = (index.detach(), weights.detach())

        return hook

    def _experts(self, layer: int, own, size: int):
        """The experts module's forward, its pairs' outputs reduced on the way (module docstring)."""

        def forward(*args, **kwargs):
            hidden, index, weights = _routing_call(args, kwargs)
            pairs = per_pair(own, hidden, index)  # [tokens * k, hidden]
            self.taken.setdefault(layer, {})["experts"] = self._reduce(pairs, index.reshape(-1), size,
                                                                       index.shape[-1])
            if self.exact.get(layer) is False:
                return own(*args, **kwargs)
            out = combine(pairs, weights, hidden)
            if layer not in self.exact:
                expected = own(*args, **kwargs)
                self.exact[layer] = (out.dtype == expected.dtype and out.shape == expected.shape
                                     and torch.equal(out, expected))
                if not self.exact[layer]:
                    log.info("layer %d: its experts combine their outputs otherwise; computing them twice", layer)
                    return expected
            return out

        return forward

    def _shared(self, layer: int):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            out = out.reshape(-1, out.shape[-1])  # [tokens, hidden]
            ids = torch.zeros(len(out), dtype=torch.long, device=out.device)
            self.taken.setdefault(layer, {})["shared"] = self._reduce(out, ids, 1, 1)

        return hook

    def _reduce(self, out: torch.Tensor, expert: torch.Tensor, size: int, k: int) -> dict:
        """Per-expert statistics of outputs # [pairs, hidden] of `expert` # [pairs], real tokens only."""
        device = out.device
        magnitude = out.abs().float()  # [pairs, hidden]; abs only clears the sign bit: exact
        if self.keep is None:  # no padding: every pair is real, nothing to gather
            token = torch.arange(len(out), device=device) // k
        else:
            real = self.keep.reshape(-1).to(device).repeat_interleave(k)  # [pairs]
            magnitude, expert, token = magnitude[real], expert[real], real.nonzero().squeeze(1) // k
        rows = len(magnitude)
        stats = {
            "tokens": torch.bincount(expert, minlength=size),
            "count": torch.zeros(size, out.shape[1], dtype=torch.long, device=device).index_add_(
                0, expert, (magnitude >= self.floor).long()),
            "dim_max": torch.zeros(size, out.shape[1], device=device).scatter_reduce_(
                0, expert.unsqueeze(1).expand(-1, out.shape[1]), magnitude, "amax"),
        }
        if rows == 0:
            none = torch.full((size,), -1, dtype=torch.long, device=device)
            return {**stats, "max_abs": torch.zeros(size, device=device), "dim": none, "token": none}
        peak, dim = magnitude.max(dim=1)  # [rows]
        best = torch.zeros(size, device=device).scatter_reduce(0, expert, peak, "amax")
        # The first row that reaches its expert's maximum says where the maximum is.
        order = torch.arange(rows, device=device)
        first = torch.full((size,), rows, device=device).scatter_reduce(
            0, expert, torch.where(peak == best[expert], order, rows), "amin")
        found, at = first < rows, first.clamp(max=rows - 1)
        return {**stats, "max_abs": best, "dim": torch.where(found, dim[at], -1),
                "token": torch.where(found, token[at], -1)}

    def pop(self) -> dict:
        taken, self.taken = self.taken, {}
        return taken

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._wrapped:
            del module.forward  # the class's own forward again
        self._handles, self._wrapped = [], []


def per_pair(forward, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each routed (token, expert) pair's output before its weight # [tokens * k, hidden], from
    the experts' `forward` called with one expert per row and a weight of 1."""
    k = index.shape[-1]
    rows = hidden.reshape(-1, hidden.shape[-1]).repeat_interleave(k, dim=0)  # [tokens * k, hidden]
    one = index.reshape(-1, 1)
    out = forward(rows, one, torch.ones(one.shape, dtype=hidden.dtype, device=hidden.device))
    return out.reshape(len(rows), -1)


def combine(pairs: torch.Tensor, weights: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The experts' output # [tokens, hidden] from the pairs' outputs, as transformers' batched_mm
    and grouped_mm kernels make it: weighted, summed over k in the product's dtype, cast back."""
    tokens, k = hidden.reshape(-1, hidden.shape[-1]).shape[0], weights.shape[-1]
    weighted = pairs * weights.reshape(-1).unsqueeze(-1)  # [tokens * k, hidden]
    return weighted.view(tokens, k, -1).sum(dim=1).to(hidden.dtype)


def _routing_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states, top_k_index, top_k_weights) of an experts call, positional or by name."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = [*args, *[kwargs[n] for n in names[len(args):] if n in kwargs]]
    if len(values) < 3 or not all(isinstance(v, torch.Tensor) for v in values[:3]):
        raise ModelError("the experts module was not called with (hidden_states, top_k_index, top_k_weights)")
    return values[0], values[1], values[2]


def moe_tables(parts: list[tuple[list[int], torch.Tensor, dict]]) -> dict[str, pa.Table]:
    """The routing and expert tables of one micro-batch, from (seqs, real-token mask # [batch, seq],
    `MoeProbe.pop()`) of each forward that ran it (two when it was split in halves); made on the host.

    routing      one row per real token and rank
    experts      one row per expert (shared: -1): tokens routed, the largest |output| and where
    expert_dims  per expert and dim, the outputs >= floor, where any
    (their columns: common/storage.py)
    """
    rows = {ROUTING: [], EXPERTS: [], EXPERT_DIMS: []}
    for seqs, keep, taken in parts:
        where, seq_len = torch.as_tensor(seqs, dtype=torch.long), keep.shape[1]
        real = keep.reshape(-1).cpu()  # [batch * seq]
        tokens = {}  # k: the columns every layer's routing shares
        for layer, found in sorted(taken.items()):
            if "routing" in found:
                index, weights = found["routing"]
                if index.shape[-1] not in tokens:
                    tokens[index.shape[-1]] = _token_columns(where, real, seq_len, index.shape[-1])
                rows[ROUTING].append(_routing_rows(layer, index, weights, real, tokens[index.shape[-1]]))
            for name, first in (("experts", 0), ("shared", SHARED)):
                if name in found:
                    summary, dims = _expert_rows(layer, found[name], first, where, seq_len)
                    rows[EXPERTS].append(summary)
                    rows[EXPERT_DIMS].append(dims)
    return {kind: pa.concat_tables(tables) for kind, tables in rows.items() if tables}


def _token_columns(seqs: torch.Tensor, real: torch.Tensor, seq_len: int, k: int) -> dict:
    """seq, pos and rank of every real token's k routing rows # [real tokens * k], as numpy arrays."""
    token = real.nonzero().squeeze(1).repeat_interleave(k)  # [real tokens * k]
    return {"seq": seqs[token // seq_len].numpy(), "pos": (token % seq_len).int().numpy(),
            "rank": torch.arange(k, dtype=torch.int32).repeat(len(token) // k).numpy()}


def _routing_rows(layer: int, index: torch.Tensor, weights: torch.Tensor, real: torch.Tensor, columns: dict):
    index, weights = index.cpu()[real], weights.float().cpu()[real]  # [real tokens, k]
    return storage.table(ROUTING, layer=np.full(index.numel(), layer, np.int32), **columns,
                         expert=index.reshape(-1).numpy(), weight=weights.reshape(-1).numpy())


def _expert_rows(layer: int, stats: dict, first: int, seqs: torch.Tensor, seq_len: int):
    """(summary table, per-dim table); expert ids start at `first` (-1: the shared expert)."""
    stats = {k: v.cpu() for k, v in stats.items()}
    size = len(stats["tokens"])
    ids = torch.arange(size) + first if first >= 0 else torch.full((size,), SHARED)
    token = stats["token"].clamp(min=0)
    summary = storage.table(
        EXPERTS, layer=np.full(size, layer), expert=ids.numpy(), tokens=stats["tokens"].numpy(),
        max_abs=stats["max_abs"].numpy(), dim=stats["dim"].numpy(),
        seq=torch.where(stats["token"] >= 0, seqs[token // seq_len], -1).numpy(),
        pos=torch.where(stats["token"] >= 0, token % seq_len, -1).numpy())
    expert, dim = stats["count"].nonzero(as_tuple=True)
    dims = storage.table(EXPERT_DIMS, layer=np.full(len(expert), layer), expert=ids[expert].numpy(),
                         dim=dim.numpy(), count=stats["count"][expert, dim].numpy(),
                         max_abs=stats["dim_max"][expert, dim].numpy())
    return summary, dims
