"""Two ways to run a run's stages behind one interface: in this process, or as Ray actors.

Both build the same `StageActor` from the same `StageSpec`s and commit through the same
Dispatcher (cluster/dispatch.py), so their tables are the same, bit for bit:

- `LocalExecutor`: one pipeline, its stages chained in this process, no Ray. The tests, the
  benches and the Python API's `executor="local"` use it.
- `RayExecutor`: R replicas x N stage actors, one placement group per replica
  (cluster/placement.py), driven by cluster/drive.py.

The verbs, in order: `hardware()` (GPUs and their memory, for the plan), `place(num_stages)`
(how many replicas, reserved), `start(specs)` (load; returns each actor's info), `run(batches,
on_commit)`, `finish()` (infos and stats at the end), `close()` (always).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from actors.stage import StageActor, StageSpec
from cluster.dispatch import Dispatcher
from cluster.pipeline import PipelineConfig
from common.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hardware:
    """What the plan needs to know of where it runs."""

    gpus: int                   # GPUs the stages can use (0: CPU stages)
    gpu_bytes: int | None       # memory of one GPU, when known
    one_device: bool = False    # every stage on the same device (the local executor)


def make_executor(kind: str, pipeline: PipelineConfig):
    """The executor called `kind` ("ray" or "local")."""
    if kind == "ray":
        return RayExecutor(pipeline)
    if kind == "local":
        return LocalExecutor(pipeline)
    raise ConfigError(f"executor={kind!r}: choose 'ray' (stage actors on a Ray cluster) or 'local' "
                      "(one pipeline in this process, no Ray).")


def gib_setting(pipeline: PipelineConfig) -> int | None:
    return None if pipeline.gpu_memory_gib is None else int(pipeline.gpu_memory_gib * 2**30)


class LocalExecutor:
    """One pipeline in this process: the stages called one after the other per micro-batch."""

    kind = "local"

    def __init__(self, pipeline: PipelineConfig):
        if pipeline.num_replicas not in ("auto", 1):
            raise ConfigError(f"pipeline.num_replicas={pipeline.num_replicas}: the local executor runs one "
                              "pipeline in this process; use the Ray executor for replicas, or num_replicas=1.")
        self.pipeline = pipeline
        self.stages: list[StageActor] = []
        self.placement = {"executor": "local"}

    def hardware(self, need_memory: bool = False) -> Hardware:
        import torch

        gpu = self.pipeline.device != "cpu" and torch.cuda.is_available()
        if self.pipeline.device == "cuda" and not gpu:
            raise ConfigError("pipeline.device=cuda but torch sees no GPU in this process; use pipeline.device=auto "
                              "or cpu, or the Ray executor on a cluster with GPUs.")
        memory = gib_setting(self.pipeline)
        if gpu and memory is None:
            memory = torch.cuda.get_device_properties(0).total_memory
        return Hardware(gpus=1 if gpu else 0, gpu_bytes=memory, one_device=True)

    def place(self, num_stages: int, batches: int) -> int:
        return 1

    def start(self, replicas: list[list[StageSpec]]) -> list[dict]:
        self.stages = [StageActor(spec) for spec in replicas[0]]
        return [stage.info() for stage in self.stages]

    def in_flight(self, num_stages: int) -> int:
        return 1  # one call at a time: a micro-batch goes through every stage before the next

    def run(self, batches: list, dispatcher: Dispatcher, on_commit) -> None:
        self.forward_all(batches, dispatcher, on_commit)
        self.flush_all(dispatcher, on_commit)

    def forward_all(self, batches: list, dispatcher: Dispatcher, on_commit) -> None:
        """Every micro-batch through every stage, in order; what their writers report commits."""
        for batch in batches:
            _, index = dispatcher.take()
            assert index == batch.index, (index, batch.index)
            for stage_index, stage in enumerate(self.stages):
                batch, written = stage.forward(batch)
                self._report(dispatcher, stage_index, written, on_commit)
            dispatcher.returned(0, index)

    def flush_all(self, dispatcher: Dispatcher, on_commit=None) -> None:
        """Wait for every stage's writer: the last micro-batches commit."""
        for stage_index, stage in enumerate(self.stages):
            self._report(dispatcher, stage_index, stage.flush(), on_commit or (lambda done: None))

    @staticmethod
    def _report(dispatcher: Dispatcher, stage: int, written: list[int], on_commit) -> None:
        if done := dispatcher.written(0, stage, written):
            on_commit(done)

    def run_all(self, batches: list, on_commit=None, flush: bool = True) -> Dispatcher:
        """`run` with a Dispatcher of its own: every micro-batch of `batches`, and (with `flush`)
        every file written."""
        tokens = {b.index: int(b.attention_mask.sum()) for b in batches}
        dispatcher = Dispatcher(list(tokens), 1, len(self.stages), 1, tokens=tokens)
        self.forward_all(batches, dispatcher, on_commit or (lambda done: None))
        if flush:
            self.flush_all(dispatcher, on_commit)
        return dispatcher

    def finish(self) -> tuple[list[dict], list[dict]]:
        for stage in self.stages:
            stage.close()
        return [s.info() for s in self.stages], [s.stats() for s in self.stages]

    def close(self) -> None:
        self.stages = []


class RayExecutor:
    """R replicas x N stage actors on the Ray cluster this process joins (or starts)."""

    kind = "ray"

    def __init__(self, pipeline: PipelineConfig):
        self.pipeline = pipeline
        self.groups: list[tuple] = []
        self.replicas: list[list] = []
        self.names: list[list[str]] = []
        self.placement: dict = {}
        self.bundle: dict | None = None
        self.dispatcher: Dispatcher | None = None

    def hardware(self, need_memory: bool = False) -> Hardware:
        """Join or start the cluster; the GPU's memory is read off a GPU node when it is needed."""
        import ray

        from cluster import placement

        how = placement.connect()
        log.info("ray: %s a cluster with %s", how, placement.describe_resources(ray.cluster_resources()))
        self.bundle = placement.stage_bundle(self.pipeline.cpus_per_stage, self.pipeline.device)
        gpus = int(ray.cluster_resources().get("GPU", 0)) if "GPU" in self.bundle else 0
        memory = gib_setting(self.pipeline)
        if gpus and memory is None and need_memory:
            memory = placement.probe_gpu_memory(self.pipeline.placement_timeout_s)
        return Hardware(gpus=gpus, gpu_bytes=memory)

    def place(self, num_stages: int, batches: int) -> int:
        """Reserve one placement group per replica; returns how many."""
        import ray

        from cluster import placement

        count = placement.count_replicas(self.pipeline.num_replicas, num_stages, self.bundle, ray.cluster_resources())
        if count > batches > 0:
            log.info("pipeline: %d replicas would fit, but the run has %d micro-batches to run", count, batches)
            count = batches
        self.groups = placement.reserve_replicas(count, num_stages, self.bundle, self.pipeline.placement,
                                                 self.pipeline.placement_timeout_s)
        replicas = [{"replica": r, "strategy": strategy, "target_node": target,
                     "bundle_nodes": placement.bundle_nodes(group)}
                    for r, (group, strategy, target) in enumerate(self.groups)]
        self.placement = {"executor": "ray", "placement": self.pipeline.placement, "replicas": replicas,
                          "strategy": ",".join(sorted({r["strategy"] for r in replicas})),
                          "bundle_nodes": [node for r in replicas for node in r["bundle_nodes"]]}
        return count

    def start(self, replicas: list[list[StageSpec]]) -> list[dict]:
        from cluster.pipeline import loaded, start_stages

        self.names = [[spec.name for spec in specs] for specs in replicas]
        for (group, _, _), specs in zip(self.groups, replicas):
            self.replicas.append(start_stages(specs, group, [self.bundle] * len(specs)))
        flat = [spec for specs in replicas for spec in specs]
        return loaded([actor for actors in self.replicas for actor in actors], flat)

    def in_flight(self, num_stages: int) -> int:
        return self.pipeline.in_flight(num_stages)

    def run(self, batches: list, dispatcher: Dispatcher, on_commit) -> None:
        from cluster.drive import drive

        self.dispatcher = dispatcher
        drive(self.replicas, batches, dispatcher, on_commit, self.pipeline.placement_timeout_s, self.names)

    def finish(self) -> tuple[list[dict], list[dict]]:
        """Every live stage's info and stats (stages restarted after a fault may live elsewhere now)."""
        import ray

        # NOTE: a replica still being revived when the run ended may not answer: only live ones are asked.
        gone = {r.index for r in self.dispatcher.replicas if r.state != "up"} if self.dispatcher else set()
        actors = [actor for r, actors in enumerate(self.replicas) if r not in gone for actor in actors]
        infos, stats = [], []
        for actor in actors:
            try:
                ray.get(actor.close.remote())
                infos.append(ray.get(actor.info.remote()))
                stats.append(ray.get(actor.stats.remote()))
            except ray.exceptions.RayError:  # a replica dropped after a lost node
                continue
        return infos, stats

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actors in self.replicas:
            for actor in actors:
                ray.kill(actor)
        for group, _, _ in self.groups:
            remove_placement_group(group)
        self.replicas, self.groups = [], []


def run_chain(specs: list[StageSpec], batches: list) -> LocalExecutor:
    """`specs` loaded and chained in this process, every micro-batch of `batches` run and written;
    returns the executor, its stages still loaded (tests and benches read them)."""
    executor = LocalExecutor(PipelineConfig())
    executor.start([specs])
    executor.run_all(batches)
    return executor
