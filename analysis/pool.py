"""Scan actors: Ray processes that read a run's partitions in parallel (analysis.scan.Scanner).

A Ray actor costs a process start and the imports of polars and of this package: 1-2 s on
a small machine, more than the whole scan of a small run. So:
- a run whose tables are smaller than `analysis.scan_actors_from_mb` is scanned in the
  driver's process, with no actor at all (`repays_actors`);
- a larger run's actors are started by the driver while the last micro-batches run
  (cluster.run), so they are ready, imports done, when the extraction ends, if the cluster
  has a CPU the stages do not hold. Where the stages hold every core (a CPU machine), the
  start would slow them by more than it saves: on the 2-core bench, a float32 run's layers
  took 5.3-6.0 s with it, 4.2-4.5 s without (its dense tables pass the size; the bfloat16
  run's do not; bench/RESULTS.md).
  There the actors start once the extraction is done.

The actors take no CPU from Ray's accounting (`num_cpus=0`): started early they must not
wait for, or take, the CPUs the stages hold, and they work only once the stages are done.
"""

from __future__ import annotations

import logging
from typing import Callable

from analysis.scan import Partial, Scanner
from common import storage
from common.layout import RunLayout
from common.record import RunRecord

log = logging.getLogger(__name__)


class ScanWorker:
    """What one scan actor runs: a Scanner built per call, so the actor can start before the run
    it will scan is finished."""

    def ready(self) -> bool:
        return True

    def scan(self, layout: RunLayout, record: RunRecord, threshold: float, allow_partial: bool,
             partitions: list, share: tuple[int, int] = (0, 1)) -> Partial:
        return Scanner(layout, record, threshold, allow_partial).scan(partitions, share)


def repays_actors(table_bytes: int, actors_from_mb: float) -> bool:
    """Whether tables of `table_bytes` are worth scan actors (Ray being up is the caller's check)."""
    return table_bytes >= actors_from_mb * 2**20


class ScanPool:
    """`count` scan actors, started at once, used by `analysis.analyse` and killed after."""

    def __init__(self, count: int):
        import ray

        # NOTE: the module and the class reach the workers by reference (this package is on
        # every node), so a started actor has imported polars and analysis.scan already.
        remote = ray.remote(num_cpus=0)(ScanWorker)
        self.actors = [remote.options(name=f"scan-{i}").remote() for i in range(count)]
        self.started = [actor.ready.remote() for actor in self.actors]
        log.info("analysis: starting %d scan actors", count)

    def scan(self, layout: RunLayout, record: RunRecord, threshold: float, allow_partial: bool,
             partitions: list) -> Partial:
        """The partitions scanned across the actors: dense partitions round-robin (so depths and
        sites mix), a stored run's files shared out (each holds many partitions)."""
        import ray

        count = max(1, min(len(self.actors), len(partitions)))
        args = (layout, record, threshold, allow_partial)
        if storage.is_dense(record.storage_mode):
            jobs = [a.scan.remote(*args, partitions[i::count]) for i, a in enumerate(self.actors[:count])]
        else:
            jobs = [a.scan.remote(*args, partitions, (i, count)) for i, a in enumerate(self.actors[:count])]
        try:
            return Partial.merge(ray.get(jobs))
        except ray.exceptions.RayTaskError as err:
            # Callers catch UserError; surface the actor's own error, not Ray's wrapper.
            raise (err.cause or err) from None

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class EarlyStart:
    """Starts a run's scan actors while its last micro-batches run: once the extraction's
    estimated time left falls to `lead_s`, the actor start (imports included) overlaps it.

    `after` wraps the driver's commit callback, which checks after every commit; `pool` is then
    handed to analysis.analyse,
    or closed if the extraction fails.
    """

    def __init__(self, count: int, eta_s: Callable[[], float], lead_s: float = 5.0,
                 spare_cpus: Callable[[], float] | None = None):
        self.count = count
        self.eta_s = eta_s
        self.lead_s = lead_s
        self.spare_cpus = spare_cpus or _spare_cpus
        self.pool: ScanPool | None = None
        self.waived = False  # every core is a stage's: analyse starts the actors after the extraction

    def after(self, on_commit: Callable[[list[int]], None]) -> Callable[[list[int]], None]:
        """`on_commit` followed by the check, for the executors' run (cluster/executor.py)."""
        def commit(indices: list[int]) -> None:
            on_commit(indices)
            if self.pool is None and not self.waived and self.eta_s() <= self.lead_s:
                if self.spare_cpus() < 1:
                    self.waived = True
                    log.info("analysis: no CPU beside the stages; the scan actors start after the extraction")
                else:
                    self.pool = ScanPool(self.count)
        return commit

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def _spare_cpus() -> float:
    """CPUs of the cluster that no actor holds now (the stages hold theirs while they run)."""
    import ray

    return ray.available_resources().get("CPU", 0.0)
