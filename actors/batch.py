"""What travels from stage to stage: a micro-batch's tokens and the state between layers.

Hidden states cross the object store as their raw bytes (`to_wire`), out of band, so Ray
moves them without a copy into the pickle stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MicroBatch:
    """What travels from stage to stage: token metadata plus the state between layers."""

    index: int                   # micro-batch number, the unit of commit
    seqs: list[int]              # global sequence index of each row
    input_ids: torch.Tensor      # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq] 1 = token, 0 = padding
    # What one decoder layer passes to the next: the hidden states # [batch, seq, hidden],
    # and whatever else the family passes (actors/layers.py); None before stage 0.
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
