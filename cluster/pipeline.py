"""Ray wiring of the pipeline: stage actors in their bundles, micro-batches flowing through.

Ray runs an actor's calls one at a time in submission order, so submitting
micro-batch m to stage 0 while m-1 is still in stage 1 keeps both busy: the
pipeline is the chain of ObjectRefs built in `drive`. At most `in_flight`
micro-batches are in the pipeline at once, which bounds memory in every stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from actors.stage import StageActor, StageSpec
from actors.writer import MicroBatch


def stage_name(spec: StageSpec) -> str:
    layers = spec.shard.layers
    return f"stage-{spec.index} [layers {layers.start}-{layers.stop - 1}]"


def start_stages(specs: list[StageSpec], group, bundles: list[dict]) -> list:
    """One StageActor per bundle of `group`, named like the plan, loading in parallel."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    remote = ray.remote(StageActor)
    return [
        remote.options(
            name=stage_name(spec),
            num_cpus=bundle.get("CPU", 0),
            num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=spec.index
            ),
        ).remote(spec)
        for spec, bundle in zip(specs, bundles)
    ]


@dataclass
class Commits:
    """Which micro-batches every stage has fully written: those are committed."""

    num_stages: int
    per_stage: list[set] = field(default_factory=list)
    reported: set = field(default_factory=set)

    def __post_init__(self):
        self.per_stage = [set() for _ in range(self.num_stages)]

    def add(self, stage: int, indices: list[int]) -> list[int]:
        """Record a stage's newly written micro-batches; return the newly committed ones."""
        self.per_stage[stage].update(indices)
        done = set.intersection(*self.per_stage) - self.reported
        self.reported |= done
        return sorted(done)


def drive(stages: list, batches: list[MicroBatch], in_flight: int,
          on_commit: Callable[[list[int]], None]) -> None:
    """Push `batches` through `stages`, at most `in_flight` at once; report commits."""
    import ray

    commits = Commits(len(stages))
    pending: dict = {}  # last stage's ref -> this micro-batch's per-stage commit refs

    def settle(ref) -> None:
        ray.get(ref)  # raises if any stage failed on this micro-batch
        for stage, written in enumerate(ray.get(pending.pop(ref))):
            if done := commits.add(stage, written):
                on_commit(done)

    for batch in batches:
        while len(pending) >= in_flight:
            ready, _ = ray.wait(list(pending), num_returns=1, fetch_local=False)
            settle(ready[0])
        ref, written = batch, []
        for stage in stages:
            ref, done = stage.forward.options(num_returns=2).remote(ref)
            written.append(done)
        pending[ref] = written
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, fetch_local=False)
        settle(ready[0])
    for stage, written in enumerate(ray.get([s.flush.remote() for s in stages])):
        if done := commits.add(stage, written):
            on_commit(done)
