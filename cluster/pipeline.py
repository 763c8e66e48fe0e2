"""Ray wiring of the pipeline: stage actors in their bundles, micro-batches flowing through.

A stage computes one micro-batch at a time, in submission order, so submitting
micro-batch m to stage 0 while m-1 is still in stage 1 keeps both busy: the
pipeline is the chain of ObjectRefs built in `drive`. At most `in_flight`
micro-batches are in the pipeline at once, which bounds memory in every stage.
A stage takes two calls at once (`Serial`): Ray fetches the next micro-batch's state
and stores the last one's while the stage computes, not between its computes.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from actors.stage import StageActor, StageSpec
from actors.batch import MicroBatch
from common import logs
from common.config import choice, positive
from common.errors import ConfigError, RunError, UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    """The `pipeline:` config section: stages, micro-batches and where the stages run."""

    num_stages: int = 1
    """Pipeline stages, one Ray actor and one GPU each."""
    micro_batch_size: int = 1
    """Sequences per micro-batch (the unit of work and of commit)."""
    max_in_flight: int = 0
    """Micro-batches in the pipeline at once; 0 means num_stages + 1."""
    device: str = "auto"
    """auto (GPU when Ray gives one, else CPU), cuda or cpu."""
    cpus_per_stage: float = 1.0
    """CPU cores reserved for each stage actor."""
    threads_per_stage: int = 0
    """torch threads in a stage; 0 means cpus_per_stage."""
    write_depth: int = 2
    """Micro-batches queued for a stage's writer before the stage waits."""
    writer: str = "auto"
    """Where a stage writes its files: auto (inline on a CPU stage writing to a local path, else
    a thread of its own), thread or inline (actors/background.py)."""
    placement_timeout_s: float = 60.0
    """How long to wait for the cluster to fit the stages before giving up."""
    placement: str = "auto"
    """Placement group strategy: auto (pack when one node fits every stage, else spread),
    pack, spread or strict_spread (one stage per node)."""

    def __post_init__(self):
        positive("pipeline.num_stages", self.num_stages)
        positive("pipeline.micro_batch_size", self.micro_batch_size)
        positive("pipeline.write_depth", self.write_depth)
        choice("pipeline.writer", self.writer, ["auto", "thread", "inline"])
        choice("pipeline.device", self.device, ["auto", "cuda", "cpu"])
        choice("pipeline.placement", self.placement, ["auto", "pack", "spread", "strict_spread"])
        if self.max_in_flight < 0:
            raise ConfigError(f"pipeline.max_in_flight={self.max_in_flight}: use 0 (auto) or more.")

    @property
    def in_flight(self) -> int:
        return self.max_in_flight or self.num_stages + 1


CALLS_AT_ONCE = 2
"""A stage actor's `max_concurrency`: one call computes while the next one's arguments are
fetched and the last one's result is stored (8-32 MiB each way at GPU shapes)."""


class Serial:
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


class RayStage(Serial, StageActor):
    """A stage as a Ray actor: its worker's log records carry the stage's name."""

    def __init__(self, spec: StageSpec):
        logs.for_stage(spec.name)
        super().__init__(spec)


def start_stages(specs: list[StageSpec], group, bundles: list[dict], max_restarts: int = 3) -> list:
    """One StageActor per bundle of `group`, named like the plan, loading in parallel."""
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


class StageLost(RunError):
    """A stage died and did not come back; committed micro-batches stay valid."""


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


def await_stages(stages: list, timeout_s: float) -> None:
    """Return once every stage answers; StageLost if one is dead or not back in time."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    for index, stage in enumerate(stages):
        while True:
            left = deadline - time.monotonic()
            ready, _ = ray.wait([ping := stage.info.remote()], timeout=max(left, 0))
            try:
                if ready:
                    ray.get(ping)
                    break
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again shortly
                time.sleep(0.2)
            except ray.exceptions.RayError as err:
                raise StageLost(f"stage-{index} died for good ({type(err).__name__}): {err}. "
                                "Committed micro-batches are kept; rerun with --resume.") from None
            if time.monotonic() >= deadline:
                raise StageLost(
                    f"stage-{index} died and could not be restarted within {timeout_s:g} s; the "
                    f"cluster has {ray.cluster_resources()}. Committed micro-batches are kept: "
                    "free or add resources and rerun with --resume."
                )


def drive(stages: list, batches: list[MicroBatch], in_flight: int,
          on_commit: Callable[[list[int]], None], retries: int = 3,
          revive_timeout_s: float = 60.0) -> None:
    """Push `batches` through `stages`, at most `in_flight` at once, until all are committed.

    A micro-batch is committed when every stage has written its files. If a stage dies,
    Ray restarts it in its bundle; the micro-batches it had not written are run again
    (their files are rewritten in place, never duplicated), each at most `retries` times.
    """
    commits = Commits(len(stages))
    attempts: dict[int, int] = {}
    todo = list(batches)
    while todo:
        failed = _round(stages, todo, in_flight, commits, on_commit)
        failed |= _flush(stages, commits, on_commit)
        todo = [b for b in batches if b.index not in commits.reported]
        if todo and not failed:
            raise RuntimeError(f"micro-batches {[b.index for b in todo]} were not written by every stage")
        for batch in todo:
            attempts[batch.index] = attempts.get(batch.index, 0) + 1
            if attempts[batch.index] > retries:
                raise StageLost(f"micro-batch {batch.index} failed {retries + 1} times; giving up.")
        if todo:
            await_stages(stages, revive_timeout_s)
            log.warning("re-running micro-batches %s after a stage failure", [b.index for b in todo])


def _round(stages, batches, in_flight, commits, on_commit) -> bool:
    """Submit every batch once; returns whether any stage failed along the way."""
    import ray

    pending: dict = {}  # last stage's ref -> (micro-batch index, per-stage commit refs)
    failed = False
    queue = list(batches)
    while queue or pending:
        while queue and len(pending) < in_flight:
            batch = queue.pop(0)
            ref, written = batch, []
            for stage in stages:
                ref, done = stage.forward.options(num_returns=2).remote(ref)
                written.append(done)
            pending[ref] = (batch.index, written)
        ready, _ = ray.wait(list(pending), num_returns=1, fetch_local=False)
        index, written = pending.pop(ready[0])
        failed |= _settle([ready[0], *written], index, commits, on_commit)
    return failed


def _settle(refs, index, commits, on_commit) -> bool:
    """Record the commits a finished micro-batch reports; True if a stage was lost on it."""
    import ray

    lost = False
    for stage, ref in enumerate(refs[1:]):
        try:
            _report(commits, stage, ray.get(ref), on_commit)
        except ray.exceptions.RayError as err:
            if not lost_stage(err):
                raise_stage_error(err)
            lost = True
    if lost:
        log.warning("micro-batch %d: a stage was lost; it will be run again", index)
    return lost


def _flush(stages, commits, on_commit) -> bool:
    """Wait for every stage's writer; True if a stage was lost meanwhile."""
    import ray

    lost = False
    for stage, handle in enumerate(stages):
        try:
            _report(commits, stage, ray.get(handle.flush.remote()), on_commit)
        except ray.exceptions.RayError as err:
            if not lost_stage(err):
                raise_stage_error(err)
            log.warning("stage-%d was lost before its writer finished", stage)
            lost = True
    return lost


def _report(commits: Commits, stage: int, written: list[int], on_commit) -> None:
    if done := commits.add(stage, written):
        on_commit(done)
