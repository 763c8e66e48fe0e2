"""Pure planning: which stage owns which layers, and how sequences form micro-batches.

Nothing here touches a model, a GPU or Ray; the functions take sizes and return ranges.
"""

from __future__ import annotations

from functools import lru_cache

from common.errors import ConfigError


class PlanError(ConfigError):
    """A plan that cannot be made, with the fix in the message."""


def plan_stages(layer_bytes: list[int], num_stages: int, embed_bytes: int = 0) -> list[range]:
    """Split layers into `num_stages` contiguous ranges with the smallest largest stage.

    Stage 0 also carries the embeddings (`embed_bytes`), so it tends to get fewer layers.
    Ties prefer earlier stages to be no larger than later ones.
    """
    n = len(layer_bytes)
    if num_stages < 1:
        raise PlanError(f"pipeline.num_stages={num_stages}: need at least 1 stage.")
    if num_stages > n:
        raise PlanError(
            f"pipeline.num_stages={num_stages} but the model has {n} decoder layers. "
            f"Use at most {n} stages."
        )
    prefix = [0]
    for size in layer_bytes:
        prefix.append(prefix[-1] + size)

    def cost(start: int, stop: int) -> int:
        return prefix[stop] - prefix[start] + (embed_bytes if start == 0 else 0)

    @lru_cache(maxsize=None)
    def best(start: int, stages: int) -> tuple[int, tuple[int, ...]]:
        # (largest stage bytes, cut points) for layers [start, n) over `stages` stages
        if stages == 1:
            return cost(start, n), ()
        options = []
        for cut in range(start + 1, n - stages + 2):
            rest, cuts = best(cut, stages - 1)
            options.append((max(cost(start, cut), rest), -cut, (cut, *cuts)))
        largest, _, cuts = min(options)
        return largest, cuts

    _, cuts = best(0, num_stages)
    bounds = [0, *cuts, n]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def plan_micro_batches(num_sequences: int, micro_batch_size: int) -> list[range]:
    """Consecutive global sequence indices, `micro_batch_size` at a time (last may be short)."""
    if micro_batch_size < 1:
        raise PlanError(f"pipeline.micro_batch_size={micro_batch_size}: need at least 1.")
    return [
        range(start, min(start + micro_batch_size, num_sequences))
        for start in range(0, num_sequences, micro_batch_size)
    ]


def stage_bytes(stages: list[range], layer_bytes: list[int], embed_bytes: int, shared_bytes: int = 0) -> list[int]:
    """Parameter bytes each stage holds under the plan (`shared_bytes`: held by every stage)."""
    return [
        sum(layer_bytes[i] for i in layers) + (embed_bytes if layers.start == 0 else 0) + shared_bytes
        for layers in stages
    ]
