"""Ray wiring of the pipelines: the `pipeline:` section, stage actors in their bundles.

A run holds R replicas of one pipeline of N stages (cluster/dispatch.py says which replica
runs which micro-batch; cluster/drive.py pushes them through). A stage computes one
micro-batch at a time, in submission order, so submitting micro-batch m to stage 0 while
m-1 is still in stage 1 keeps both busy. A stage takes two calls at once (`OneComputeThread`): Ray
fetches the next micro-batch's state and stores the last one's while the stage computes,
not between its computes.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from actors.stage import StageActor, StageSettings, StageSpec
from actors.handoff import MicroBatch
from common import logs
from common.config import choice, positive
from common.errors import ConfigError, RunError, UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig(StageSettings):
    """The `pipeline:` config section: replicas, stages, micro-batches and where they run (and,
    from StageSettings, what each stage reads: device, writer, write_depth)."""

    num_stages: int | str = 1
    """Pipeline stages, one Ray actor and one GPU each; `auto`: the fewest whose shards fit one
    GPU (cluster/shape.py)."""
    num_replicas: int | str = "auto"
    """Whole pipelines side by side; `auto`: as many as the cluster's GPUs hold, 1 without GPUs."""
    gpu_memory_gib: float | None = None
    """Memory of one GPU for `num_stages: auto`; empty: read off a GPU of the cluster."""
    micro_batch_size: int = 1
    """Sequences per micro-batch (the unit of work and of commit)."""
    max_in_flight: int = 0
    """Micro-batches in each replica at once; 0 means num_stages + 1."""
    cpus_per_stage: float = 1.0
    """CPU cores reserved for each stage actor."""
    threads_per_stage: int = 0
    """torch threads in a stage; 0 means cpus_per_stage."""
    placement_timeout_s: float = 60.0
    """How long to wait for the cluster to fit the stages, or for a lost stage to come back."""
    placement: str = "auto"
    """Where each replica's stages go: auto (all on one node where one node fits them, the
    replicas spread over the nodes; else across nodes), pack, spread or strict_spread (one
    stage per node), as Ray's strategies of one placement group per replica."""

    def __post_init__(self):
        super().__post_init__()
        for key in ("num_stages", "num_replicas"):
            value = getattr(self, key)
            if isinstance(value, str) and value != "auto":
                raise ConfigError(f"pipeline.{key}={value!r}: give a whole number, or 'auto'.")
            if value != "auto":
                positive(f"pipeline.{key}", value)
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ConfigError(f"pipeline.gpu_memory_gib={self.gpu_memory_gib}: give a GPU's memory in GiB, "
                              "or leave it empty to read it off the GPU.")
        if self.cpus_per_stage <= 0:
            raise ConfigError(f"pipeline.cpus_per_stage={self.cpus_per_stage}: must be more than 0.")
        positive("pipeline.micro_batch_size", self.micro_batch_size)
        choice("pipeline.placement", self.placement, ["auto", "pack", "spread", "strict_spread"])
        if self.max_in_flight < 0:
            raise ConfigError(f"pipeline.max_in_flight={self.max_in_flight}: use 0 (auto) or more.")

    def in_flight(self, num_stages: int) -> int:
        """Micro-batches one replica of `num_stages` stages holds at once."""
        return self.max_in_flight or num_stages + 1


CALLS_AT_ONCE = 2
"""A stage actor's `max_concurrency`: one call computes while the next one's arguments are
fetched and the last one's result is stored (8-32 MiB each way at GPU shapes)."""


class OneComputeThread:
    """Mixin for a stage actor that Ray runs with CALLS_AT_ONCE threads: the stage itself is
    built and computes on one thread of its own, one call at a time, in the order they came
    (with two threads at most one call waits).

    NOTE: always the same thread, not a lock: torch's OpenMP keeps a team of worker threads
    per thread that starts parallel work, and on a CPU two teams spin against each other (2x
    slower on 2 cores).
    """

    def __init__(self, *args, **kwargs):
        self.computer = ThreadPoolExecutor(1, thread_name_prefix="stage")
        self.computer.submit(super().__init__, *args, **kwargs).result()

    def forward(self, batch: MicroBatch):
        return self.computer.submit(super().forward, batch).result()


class RayStage(OneComputeThread, StageActor):
    """A stage as a Ray actor: its worker's log records carry the stage's name."""

    def __init__(self, spec: StageSpec):
        logs.for_stage(spec.name)
        super().__init__(spec)


def start_stages(specs: list[StageSpec], group, bundles: list[dict], max_restarts: int = 3) -> list:
    """One StageActor per bundle of `group` (one replica's), named like the plan, loading in parallel."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    remote = ray.remote(RayStage)
    return [
        remote.options(
            name=spec.name,
            # A dead stage is restarted in its bundle (reloading its shard); the driver
            # re-runs the micro-batches it lost, so Ray must not replay calls by itself.
            max_restarts=max_restarts,
            max_task_retries=0,
            max_concurrency=CALLS_AT_ONCE,
            num_cpus=bundle.get("CPU", 0),
            num_gpus=bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=spec.index
            ),
        ).remote(spec)
        for spec, bundle in zip(specs, bundles)
    ]


class StageStartError(RunError):
    """A stage could not load its shard; the message is the stage's own one-line reason."""


def loaded(stages: list, specs: list[StageSpec]) -> list[dict]:
    """Each stage's `info()` once it has loaded; StageStartError naming the first that failed."""
    import ray

    infos = []
    for stage, spec in zip(stages, specs):
        try:
            infos.append(ray.get(stage.info.remote()))
        except ray.exceptions.ActorDiedError as err:
            if not getattr(err, "actor_init_failed", False):
                raise
            raise StageStartError(f"{spec.name} could not start: {init_error(err)}") from None
    return infos


def init_error(err) -> str:
    """The exception line ('Type: message') an actor's failed `__init__` ended with."""
    lines = [line.strip() for line in (getattr(err, "error_msg", "") or str(err)).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def lost_stage(err: BaseException) -> bool:
    """Whether `err` means a stage process or its node died (worth a re-run)."""
    import ray.exceptions as rex

    lost = (rex.ActorDiedError, rex.ActorUnavailableError, rex.ObjectLostError, rex.OwnerDiedError)
    return isinstance(err, lost) or isinstance(getattr(err, "cause", None), lost)


def raise_stage_error(err: BaseException) -> None:
    """Re-raise a stage's failure: its own UserError as that one line (a full disk, a family
    the hand-off check refuses), not wrapped in Ray's remote traceback; anything else as it is."""
    if isinstance(getattr(err, "cause", None), UserError):
        raise err.cause from None
    raise err
