"""The hand-off between stages: what a stage receives and sends (`MicroBatch`, and its wire
format), how the model's own forward is entered at layer a and left after layer b-1
(`LayerSlice`), and the stand-ins for the modules a stage does not hold.

A stage never rebuilds a model's forward by hand: whatever the family's `forward` does
(embedding scales, masks per layer kind, rotary variants, anything added later) happens
as in a single-process run. The shard (actors/shard.py) puts the stand-ins here in place
of the layers it does not own, of the embeddings past stage 0, of the final norm and the
LM head; two hooks turn the full forward into a slice of it:

- a pre-hook on layer a swaps the state received from the previous stage in for the
  layer's arguments that one layer passes to the next: the hidden states, and whatever
  else the family carries (`Family.carries`, e.g. a router state or top-k indices);
- a pre-hook on layer b (a placeholder) takes those same arguments as the state to hand
  on, and stops the forward; the last stage stops after its last layer instead.

The hand-off is thus exactly what layer b would receive in a single-process forward.
Two checks guard families the table does not describe right: every real layer must
return as many values as the family carries (`arity`), and the stage's results must not
depend on the stand-in embeddings (`noise_in`, used by actors/stage.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from actors.families import Family, inner_model
from common.errors import ModelError

State = tuple  # the leading positional arguments of a decoder layer: tensors (or None)


class _Leave(BaseException):
    """Ends the model's forward once the slice is done (BaseException: no model code catches it)."""

    def __init__(self, state: State | None):
        super().__init__()
        self.state = state


class HandoffError(ModelError):
    """The family's layers depend on more than the state a stage hands on."""


class LayerSlice:
    """The model's own forward over layers [a, b) of a shard."""

    def __init__(self, model: nn.Module, family: Family, layers: range, num_layers: int):
        self.inner = inner_model(model, family)
        decoder = getattr(self.inner, family.layers)
        self.layers = layers
        self.carries, self.arity = family.carries, family.arity
        self.first = layers.start == 0
        self.last = layers.stop == num_layers
        self._incoming: State | None = None
        self.arities: set[int] = set()  # how many values the real layers returned
        self._handles = [decoder[layers.start].register_forward_pre_hook(self._enter, with_kwargs=True)]
        self._handles += [decoder[i].register_forward_hook(self._returned) for i in layers]
        if self.last:
            self._handles.append(decoder[layers.stop - 1].register_forward_hook(self._done))
        else:
            self._handles.append(decoder[layers.stop].register_forward_pre_hook(self._leave, with_kwargs=True))

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: State | None) -> State | None:
        """The state after layer b-1 # leading [batch, seq, ...]; None from the last stage.

        `state` is what the previous stage handed on; without it (stage 0, or a warm-up) layer a
        gets what the forward brings it.
        """
        self._incoming = state
        try:
            self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Leave as leave:
            return leave.state
        finally:
            self._incoming = None
        raise RuntimeError(f"the model's forward returned before leaving layer {self.layers.stop - 1}")

    def _enter(self, _module, args, kwargs):
        if self._incoming is None:  # stage 0, or a warm-up: layer a takes what the forward brings
            return None
        return swapped(args, kwargs, self.carries, self._incoming)

    def _leave(self, _module, args, kwargs):
        raise _Leave(carried(args, kwargs, self.carries))

    def _returned(self, _module, _args, output):
        self.arities.add(len(output) if isinstance(output, (tuple, list)) else 1)

    @staticmethod
    def _done(_module, _args, _output):
        raise _Leave(None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def carried(args: tuple, kwargs: dict, slots: tuple) -> State:
    """What a layer receives from the one before: the arguments in `slots` (a position, or a
    keyword name; position 0 may come as the `hidden_states` keyword)."""
    return tuple(_slot(args, kwargs, slot) for slot in slots)


def _slot(args: tuple, kwargs: dict, slot):
    if isinstance(slot, str):
        return kwargs.get(slot)
    if slot < len(args):
        return args[slot]
    if slot == 0 and "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise HandoffError(f"a decoder layer was called with {len(args)} positional arguments, but its "
                       f"family carries argument {slot} from layer to layer")


def swapped(args: tuple, kwargs: dict, slots: tuple, state: State) -> tuple[tuple, dict]:
    """`args` and `kwargs` with the values in `slots` replaced by `state`."""
    args, kwargs = list(args), dict(kwargs)
    for slot, value in zip(slots, state):
        if isinstance(slot, str) or (slot == 0 and not args):
            kwargs["hidden_states" if slot == 0 else slot] = value
        else:
            args[slot] = value
    return tuple(args), kwargs


def same_state(a: State | None, b: State | None) -> bool:
    """Whether two states (or captures) hold the same values (shapes, and values to 1e-3)."""
    if a is None or b is None:
        return a is b
    if len(a) != len(b):
        return False
    return all(_close(x, y) for x, y in zip(a, b))


def _close(x, y) -> bool:
    if x is None or y is None:
        return x is y
    if x.shape != y.shape:
        return False
    x, y = x.double(), y.double()
    # NOTE: relative to the norm, not bit for bit: GPU kernels may sum in another order.
    return bool((x - y).norm() <= 1e-3 * (x.norm() + 1e-30))


def _plain_attributes(module: nn.Module) -> dict:
    """A module's own plain attributes (attention_type, layer_idx, ...): the model's forward
    may read them off a layer it iterates over, even one another stage owns."""
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and not isinstance(v, (nn.Module, torch.Tensor))}


class Absent(nn.Module):
    """A module owned by another stage (or by no stage): no parameters, never called."""

    def __init__(self, original: nn.Module | None = None):
        super().__init__()
        if original is not None:
            vars(self).update(_plain_attributes(original))

    def forward(self, *args, **kwargs):  # pragma: no cover - a bug if reached
        raise RuntimeError("this module belongs to another pipeline stage")


class PassThrough(Absent):
    """A decoder layer another stage owns: returns what it was given, as the family's layers
    return it, so the forward goes on to the stage's own layers (whose first one receives
    the handed-off state instead)."""

    def __init__(self, original: nn.Module, carries: tuple, arity: int):
        super().__init__(original)
        self.carries, self.arity = carries, arity

    def forward(self, *args, **kwargs):
        state = carried(args, kwargs, self.carries)
        return state[0] if self.arity == 1 else (*state, *[None] * (self.arity - len(state)))


class StandInEmbedding(Absent):
    """The token embeddings of a stage after the first: a tensor of the right shape, which
    the first layer's hand-off replaces. `fill` is "zeros", or "noise" (`noise_in`) to check
    that nothing downstream depends on it."""

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


@contextlib.contextmanager
def noise_in(embed: nn.Module):
    """Stand-in embeddings (if `embed` is one) of seeded noise instead of zeros, for the block:
    what the first layer's hand-off replaces must not change the stage's results."""
    if not isinstance(embed, StandInEmbedding):
        yield
        return
    embed.fill = "noise"
    try:
        yield
    finally:
        embed.fill = "zeros"


def join_states(states: list[tuple | None]) -> tuple | None:
    """The states of consecutive row ranges as one, row-wise (None stays None)."""
    if states[0] is None:
        return None
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*states))


@dataclass
class MicroBatch:
    """What travels from stage to stage: token metadata plus the state between layers."""

    index: int                   # micro-batch number, the unit of commit
    seqs: list[int]              # global sequence index of each row
    input_ids: torch.Tensor      # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq] 1 = token, 0 = padding
    # What one decoder layer passes to the next: the hidden states # [batch, seq, hidden],
    # and whatever else the family passes (actors/handoff.py); None before stage 0.
    hidden: tuple[torch.Tensor | None, ...] | None = None

    # NOTE: Ray pickles a torch tensor by copying its bytes into the pickle stream; a numpy
    # array goes out of band, straight into the object store and back without a copy. The
    # hidden states therefore travel as their raw bytes in numpy: 8 MiB of bf16 [1, 2048, 2048]
    # took 13-30 ms per hand-off as a tensor, ~7.5 ms as bytes (`python -m bench.transport`).
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.hidden is not None:
            state["hidden"] = tuple(None if t is None else to_wire(t) for t in self.hidden)
        return state

    def __setstate__(self, state: dict) -> None:
        if state.get("hidden") is not None:
            state["hidden"] = tuple(None if t is None else from_wire(*t) for t in state["hidden"])
        self.__dict__.update(state)

    def rows(self, rows: slice) -> "MicroBatch":
        """The micro-batch of some of its sequences."""
        hidden = None if self.hidden is None else tuple(None if t is None else t[rows] for t in self.hidden)
        return MicroBatch(self.index, self.seqs[rows], self.input_ids[rows], self.attention_mask[rows], hidden)


def to_wire(tensor: torch.Tensor) -> tuple[np.ndarray, str, tuple[int, ...]]:
    """A host tensor as (its bytes as a numpy array, dtype name, shape)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy(), str(flat.dtype).removeprefix("torch."), tuple(tensor.shape)


def from_wire(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor `to_wire` described; copied once when the bytes are read-only (object store)."""
    raw = raw if raw.flags.writeable else raw.copy()
    return torch.from_numpy(raw).view(getattr(torch, dtype)).reshape(shape)
