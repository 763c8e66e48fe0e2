"""The Ray executor's loop: micro-batches through R replicas of N stage actors each.

Each micro-batch is a chain of ObjectRefs through one replica's stages (the replica the
Dispatcher picks), so every stage of every replica computes at once. When a stage dies, its
replica's uncommitted micro-batches go to whichever replica is free, and the replica is
pinged until Ray has restarted its stages; one that is not back within `revive_timeout_s` is
dropped, said in one line, and the others finish the run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from actors.handoff import MicroBatch
from cluster.dispatch import Dispatcher, StageLost
from cluster.pipeline import lost_stage, raise_stage_error

log = logging.getLogger(__name__)

PING_EVERY_S = 0.2  # how often a restarting stage is asked again


@dataclass
class Revival:
    """A lost replica being waited for: one ping per stage not yet answered."""

    deadline: float
    pings: dict = field(default_factory=dict)   # ref -> stage index
    again: dict = field(default_factory=dict)   # stage index -> when to ping again
    back: set = field(default_factory=set)      # stages that answered


def drive(replicas: list[list], batches: list[MicroBatch], dispatcher: Dispatcher,
          on_commit: Callable[[list[int]], None], revive_timeout_s: float = 60.0,
          names: list[list[str]] | None = None) -> None:
    """Push `batches` through `replicas` (each a list of stage actors) as `dispatcher` assigns
    them, until all are committed."""
    names = names or [[f"r{r}/stage-{s}" for s in range(len(stages))] for r, stages in enumerate(replicas)]
    Driver(replicas, dispatcher, {b.index: b for b in batches}, on_commit, revive_timeout_s, names).run()


class Driver:
    """The state of one `drive`: forwards in flight and replicas being revived."""

    def __init__(self, replicas, dispatcher: Dispatcher, batches: dict, on_commit, revive_timeout_s, names):
        self.replicas, self.dispatcher, self.batches = replicas, dispatcher, batches
        self.on_commit, self.revive_timeout_s, self.names = on_commit, revive_timeout_s, names
        self.pending: dict = {}   # last stage's ref -> (replica, micro-batch, per-stage written refs)
        self.revivals: dict[int, Revival] = {}

    def run(self) -> None:
        d = self.dispatcher
        while not d.finished:
            self.submit()
            if self.pending:
                self.wait()
            elif d.queue:  # work waits for a replica that is being revived
                if not self.revivals:
                    raise AssertionError(f"micro-batches {list(d.queue)} queued with no replica to take them")
                self.wait()
            else:  # nothing left to run: the writers' last reports commit the rest
                self.flush()
                if not d.finished and not d.queue:
                    raise RuntimeError(f"micro-batches {sorted(d.todo - d.committed)} were not written by every stage")

    def submit(self) -> None:
        while job := self.dispatcher.take():
            replica, index = job
            ref, written = self.batches[index], []
            for stage in self.replicas[replica]:
                ref, done = stage.forward.options(num_returns=2).remote(ref)
                written.append(done)
            self.pending[ref] = (replica, index, written)

    def wait(self) -> None:
        import ray

        pings = {ref: replica for replica, revival in self.revivals.items() for ref in revival.pings}
        timeout = PING_EVERY_S if self.revivals else None
        ready, _ = ray.wait([*self.pending, *pings], num_returns=1, timeout=timeout, fetch_local=False)
        for ref in ready:
            if ref in self.pending:
                self.settle(ref)
            elif pings[ref] in self.revivals:
                self.answered(pings[ref], ref)
        self.tend_revivals()

    def settle(self, ref) -> None:
        """Record what a finished micro-batch's stages report; on a lost stage, lose the replica."""
        import ray

        replica, index, written = self.pending.pop(ref)
        self.dispatcher.returned(replica, index)
        lost = False
        for stage, done in enumerate(written):
            try:
                self.report(replica, stage, ray.get(done))
            except ray.exceptions.RayError as err:
                if not lost_stage(err):
                    raise_stage_error(err)
                lost = True
        if lost:
            self.lose(replica, f"micro-batch {index}")

    def report(self, replica: int, stage: int, indices: list[int]) -> None:
        if done := self.dispatcher.written(replica, stage, indices):
            self.on_commit(done)

    def flush(self) -> None:
        """Wait for every replica's writers; what they report may commit the last micro-batches."""
        import ray

        calls = [(r, s, stage.flush.remote()) for r in [x.index for x in self.dispatcher.up()]
                 for s, stage in enumerate(self.replicas[r])]
        lost = set()
        for replica, stage, call in calls:
            try:
                self.report(replica, stage, ray.get(call))
            except ray.exceptions.RayError as err:
                if not lost_stage(err):
                    raise_stage_error(err)
                lost.add(replica)
        for replica in sorted(lost):
            self.lose(replica, "its writers' flush")

    def lose(self, replica: int, during: str) -> None:
        """A stage of `replica` died: its uncommitted micro-batches are queued again, and the
        replica is pinged until its stages answer."""
        again = self.dispatcher.lost(replica)
        self.pending = {ref: job for ref, job in self.pending.items() if job[0] != replica}
        log.warning("r%d: a stage was lost during %s; micro-batches %s will run again", replica, during, again)
        if replica not in self.revivals:
            revival = Revival(deadline=time.monotonic() + self.revive_timeout_s)
            self.revivals[replica] = revival
            for stage in range(len(self.replicas[replica])):
                self.ping(replica, stage)

    def ping(self, replica: int, stage: int) -> None:
        self.revivals[replica].pings[self.replicas[replica][stage].info.remote()] = stage

    def answered(self, replica: int, ref) -> None:
        import ray

        revival = self.revivals[replica]
        stage = revival.pings.pop(ref, None)
        if stage is None:  # a ping of an earlier revival of this replica
            return
        try:
            ray.get(ref)
            revival.back.add(stage)
        except ray.exceptions.ActorUnavailableError:  # restarting: ask again shortly
            revival.again[stage] = time.monotonic() + PING_EVERY_S
        except ray.exceptions.RayError as err:
            self.give_up(replica, f"{self.names[replica][stage]} died for good ({type(err).__name__}: {err})")
            return
        if len(revival.back) == len(self.replicas[replica]):
            del self.revivals[replica]
            self.dispatcher.rejoin(replica)
            log.warning("r%d: every stage answers again; it takes micro-batches again", replica)

    def tend_revivals(self) -> None:
        """Ping again what was restarting; give up on replicas past their deadline."""
        now = time.monotonic()
        for replica, revival in list(self.revivals.items()):
            for stage, at in list(revival.again.items()):
                if at <= now:
                    del revival.again[stage]
                    self.ping(replica, stage)
            if now >= revival.deadline:
                missing = sorted(set(range(len(self.replicas[replica]))) - revival.back)
                self.give_up(replica, f"{self.names[replica][missing[0]]} died and could not be restarted "
                                      f"within {self.revive_timeout_s:g} s")

    def give_up(self, replica: int, why: str) -> None:
        """Drop `replica`; StageLost when no replica is left to finish the run."""
        import ray

        self.revivals.pop(replica, None)
        self.dispatcher.drop(replica)
        left = [r.index for r in self.dispatcher.replicas if r.state != "dropped"]
        if not left:
            raise StageLost(f"{why}; the cluster has {ray.cluster_resources()}. Committed micro-batches are "
                            "kept: free or add resources and rerun with --resume.")
        log.warning("%s; going on with %d replica(s): %s", why, len(left), ", ".join(f"r{r}" for r in left))
