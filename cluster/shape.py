"""How many stages a run gets: a fixed number, or (`pipeline.num_stages: auto`) the fewest whose
shards fit one GPU. Pure: sizes in, layer ranges out.

A stage needs its parameters (the real bytes of the model built on the meta device:
actors/anatomy.py) plus headroom for one micro-batch: the device's own reserve (CUDA context,
allocator slack), the hidden states it receives and sends, the captures of all its layers
(held until its tables are made), the widest MLP or experts' intermediate and one layer's
attention scores. The plan is refused in one line, before any weights load, when a stage
cannot fit a GPU or the stages cannot fit the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.plan import PlanError, plan_stages, stage_bytes

GIB = 2**30
DEVICE_RESERVE = GIB  # CUDA context and allocator slack, per GPU
ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Activations:
    """What one micro-batch occupies on a stage, per layer it holds and in all."""

    per_layer: int   # captures of one layer (every site), kept until the tables are made
    working: int     # states in and out, the widest intermediate, one layer's attention scores

    def of(self, layers: int) -> int:
        return DEVICE_RESERVE + self.working + layers * self.per_layer


def activations(text_config, dtype: str, micro_batch: int, seq_len: int, sites: int) -> Activations:
    """The headroom one micro-batch of [micro_batch, seq_len] tokens needs on a stage of `dtype`."""
    element = ELEMENT[dtype]
    tokens = micro_batch * seq_len
    hidden = text_config.hidden_size
    dense = getattr(text_config, "intermediate_size", 0) or 0
    routed = (getattr(text_config, "moe_intermediate_size", 0) or 0) * (
        getattr(text_config, "num_experts_per_tok", 0) or getattr(text_config, "top_k", 0) or 1)
    heads = getattr(text_config, "num_attention_heads", 1) or 1
    working = element * tokens * (4 * hidden + 3 * max(dense, routed)) + element * micro_batch * heads * seq_len**2
    return Activations(per_layer=element * tokens * hidden * sites, working=working)


@dataclass(frozen=True)
class Shape:
    """The stages of one pipeline: layers, parameter bytes and bytes needed on the device."""

    stages: list[range]
    weights: list[int]
    needs: list[int]
    gpu_bytes: int | None = None  # the memory of the GPU the stages were fitted to, if any

    @property
    def total(self) -> int:
        return sum(self.needs)


def fixed_shape(layer_bytes: list[int], embed_bytes: int, shared_bytes: int, num_stages: int,
                headroom: Activations) -> Shape:
    stages = plan_stages(layer_bytes, num_stages, embed_bytes)
    weights = stage_bytes(stages, layer_bytes, embed_bytes, shared_bytes)
    return Shape(stages, weights, [w + headroom.of(len(r)) for w, r in zip(weights, stages)])


def fewest_stages(layer_bytes: list[int], embed_bytes: int, shared_bytes: int, gpu_bytes: int,
                  headroom: Activations) -> Shape:
    """The fewest contiguous stages whose every stage fits `gpu_bytes`; PlanError in one line when
    even one layer per stage does not."""
    shape = None
    for count in range(1, len(layer_bytes) + 1):
        shape = fixed_shape(layer_bytes, embed_bytes, shared_bytes, count, headroom)
        if max(shape.needs) <= gpu_bytes:
            return shape
    worst = max(range(len(shape.needs)), key=shape.needs.__getitem__)
    raise PlanError(
        f"pipeline.num_stages=auto: the model fits no GPU of {gib(gpu_bytes)}: even at one layer per stage, "
        f"stage {worst} needs {gib(shape.needs[worst])} ({gib(shape.weights[worst])} of weights + "
        f"{gib(shape.needs[worst] - shape.weights[worst])} of activations and captures); use GPUs with more "
        "memory, a smaller pipeline.micro_batch_size or data.seq_len, or a narrower model.dtype."
    )


def check_fits(shape: Shape, gpu_bytes: int | None, gpus: int, auto: bool, weights: str = "weights",
               one_device: bool = False) -> None:
    """Refuse, in one line naming the bytes, a shape a stage of which exceeds one GPU, or whose
    stages outnumber the cluster's GPUs (`weights`: what the weights are, for the message). With
    `one_device` every stage shares one GPU, which must hold them all."""
    if one_device:
        together = shape.total - (len(shape.stages) - 1) * DEVICE_RESERVE
        if gpus and gpu_bytes is not None and together > gpu_bytes:
            raise PlanError(f"the local executor holds every stage on one GPU: they need {gib(together)} "
                            f"({gib(sum(shape.weights))} of {weights}) but the GPU has {gib(gpu_bytes)}; "
                            "use the Ray executor on more GPUs.")
        return
    if gpu_bytes is not None and max(shape.needs) > gpu_bytes:
        worst = max(range(len(shape.needs)), key=shape.needs.__getitem__)
        raise PlanError(
            f"pipeline.num_stages={len(shape.stages)}: stage {worst} needs {gib(shape.needs[worst])} "
            f"({gib(shape.weights[worst])} of {weights} + activations and captures) but a GPU has "
            f"{gib(gpu_bytes)}; use more stages (or pipeline.num_stages=auto)."
        )
    if gpus and len(shape.stages) > gpus:
        have = f"{gpus} GPUs" + (f" ({gib(gpus * gpu_bytes)})" if gpu_bytes else "")
        raise PlanError(
            f"pipeline.num_stages={'auto' if auto else len(shape.stages)}: the model needs "
            f"{len(shape.stages)} stages of one GPU each, {gib(shape.total)} in all "
            f"({gib(sum(shape.weights))} of {weights}), but the cluster has {have}; add GPUs "
            "or use GPUs with more memory."
        )


def gib(count: float) -> str:
    """Bytes as people read them: `61.2 GiB`, `1.25 TiB`."""
    if count >= 2**40:
        return f"{count / 2**40:.2f} TiB"
    return f"{count / GIB:.1f} GiB"


def describe(shape: Shape, replicas: int) -> str:
    """The plan as printed at the start of a run: replicas x stages, then each stage's bytes."""
    lines = [f"plan: {replicas} replica(s) x {len(shape.stages)} stage(s)"]
    for index, (layers, weights, need) in enumerate(zip(shape.stages, shape.weights, shape.needs)):
        fit = f"  (needs {gib(need)} of a {gib(shape.gpu_bytes)} GPU)" if shape.gpu_bytes else ""
        lines.append(f"stage-{index} [layers {layers.start}-{layers.stop - 1}]  {weights / 2**20:8.1f} MiB{fit}")
    return "\n".join(lines)
