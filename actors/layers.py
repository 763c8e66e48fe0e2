"""Run decoder layers [a, b) by running the model's own forward, entered at a and left at b.

A stage never rebuilds a model's forward by hand: whatever the family's `forward` does
(embedding scales, masks per layer kind, rotary variants, anything added later) happens
as in a single-process run. The shard holds placeholders for the layers it does not own
(actors/shard.py); two hooks turn the full forward into a slice of it:

- a pre-hook on layer a swaps the state received from the previous stage in for the
  layer's arguments that one layer passes to the next: the hidden states, and whatever
  else the family carries (`Family.carries`, e.g. a router state or top-k indices);
- a pre-hook on layer b (a placeholder) takes those same arguments as the state to hand
  on, and stops the forward; the last stage stops after its last layer instead.

The hand-off is thus exactly what layer b would receive in a single-process forward.
Two checks guard families the table does not describe right: every real layer must
return as many values as the family carries (`arity`), and the stage's results must not
depend on the stand-in embeddings (actors/stage.py).
"""

from __future__ import annotations

import torch
from torch import nn

from actors.families import Family
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
        self.arrived: State | None = None  # what reached layer a when no state was swapped in
        self.arities: set[int] = set()  # how many values the real layers returned
        self._handles = [decoder[layers.start].register_forward_pre_hook(self._enter, with_kwargs=True)]
        self._handles += [decoder[i].register_forward_hook(self._returned) for i in layers]
        if self.last:
            self._handles.append(decoder[layers.stop - 1].register_forward_hook(self._done))
        else:
            self._handles.append(decoder[layers.stop].register_forward_pre_hook(self._leave, with_kwargs=True))

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: State | None) -> State | None:
        """The state after layer b-1 # leading [batch, seq, ...]; None from the last stage.

        `state` is what the previous stage handed on; without it (stage 0, or a probe) layer a
        gets what the forward brings it, kept as `arrived`.
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
        incoming = self._incoming
        if incoming is None:
            if not self.first:  # a probe: keep what reached layer a
                self.arrived = carried(args, kwargs, self.carries)
            return None
        return swapped(args, kwargs, self.carries, incoming)

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


def inner_model(model: nn.Module, family: Family) -> nn.Module:
    """The module whose forward runs the decoder (`model.model` in most families)."""
    for name in family.inner.split("."):
        model = getattr(model, name)
    return model


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
