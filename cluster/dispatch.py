"""Which replica runs which micro-batch, and which micro-batches are committed: no Ray here.

A run has R replicas of one pipeline (the same layer split, N stages each). Each micro-batch
runs on one replica, all its stages; it is committed once every stage of that replica has
written its files. The tables do not depend on which replica ran a micro-batch: a stage's
files are named by micro-batch and layers only (common.layout).

The next micro-batch goes to the replica with the least work in flight (forwards whose last
stage has not returned), so a slow node takes fewer of them. A lost replica's micro-batches
that were not committed go back to the front of the queue, for whichever replica is free;
each micro-batch runs at most `retries` times more.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from common.errors import RunError


class StageLost(RunError):
    """Stages died and did not come back; committed micro-batches stay valid."""


class RetriesExhausted(StageLost):
    """A micro-batch failed more often than the run allows."""


@dataclass
class Replica:
    """One pipeline's bookkeeping: what runs on it, what each of its stages has written."""

    index: int
    num_stages: int
    running: set[int] = field(default_factory=set)    # submitted; the last stage has not returned
    unwritten: set[int] = field(default_factory=set)  # submitted; not committed yet
    written: list[set[int]] = field(default_factory=list)  # per stage: micro-batches on disk
    state: str = "up"                                 # up, down (being revived) or dropped
    tokens: int = 0                                   # tokens of the micro-batches it committed

    def __post_init__(self):
        self.written = [set() for _ in range(self.num_stages)]


class Dispatcher:
    """The queue of micro-batches and the replicas that take them."""

    def __init__(self, batches: list[int], num_replicas: int, num_stages: int, in_flight: int,
                 retries: int = 3, tokens: dict[int, int] | None = None):
        self.queue = deque(batches)
        self.todo = set(batches)
        self.replicas = [Replica(r, num_stages) for r in range(num_replicas)]
        self.in_flight = in_flight
        self.retries = retries
        self.attempts: dict[int, int] = {}
        self.tokens = tokens or {}
        self.committed: set[int] = set()

    @property
    def finished(self) -> bool:
        return self.todo <= self.committed

    def up(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == "up"]

    def take(self) -> tuple[int, int] | None:
        """(replica, micro-batch) to submit next, or None while every replica is full or the
        queue is empty: the replica with the fewest forwards running, lowest index first."""
        free = [r for r in self.up() if len(r.running) < self.in_flight]
        if not self.queue or not free:
            return None
        replica = min(free, key=lambda r: (len(r.running), r.index))
        index = self.queue.popleft()
        replica.running.add(index)
        replica.unwritten.add(index)
        return replica.index, index

    def returned(self, replica: int, index: int) -> None:
        """The last stage of `replica` has returned micro-batch `index`."""
        self.replicas[replica].running.discard(index)

    def written(self, replica: int, stage: int, indices: list[int]) -> list[int]:
        """Stage `stage` of `replica` has written `indices`; returns the newly committed ones."""
        owner = self.replicas[replica]
        owner.written[stage].update(indices)
        done = sorted(i for i in owner.unwritten if all(i in s for s in owner.written))
        for index in done:
            owner.unwritten.discard(index)
            owner.tokens += self.tokens.get(index, 0)
        done = [i for i in done if i not in self.committed]
        self.committed.update(done)
        return done

    def lost(self, replica: int) -> list[int]:
        """A stage of `replica` died: its uncommitted micro-batches go back to the queue's front;
        returns them. RetriesExhausted when one has already run `retries` times more."""
        owner = self.replicas[replica]
        owner.state = "down" if owner.state == "up" else owner.state
        again = sorted(owner.unwritten - self.committed)
        for index in again:
            self.attempts[index] = self.attempts.get(index, 0) + 1
            if self.attempts[index] > self.retries:
                raise RetriesExhausted(f"micro-batch {index} failed {self.retries + 1} times; giving up. "
                                       "Committed micro-batches are kept; rerun with --resume.")
        for stage in owner.written:
            stage.difference_update(again)
        owner.running.clear()
        owner.unwritten.clear()
        self.queue.extendleft(reversed([i for i in again if i not in self.queue]))
        return again

    def rejoin(self, replica: int) -> None:
        """Every stage of `replica` answers again: it takes micro-batches again."""
        self.replicas[replica].state = "up"

    def drop(self, replica: int) -> None:
        """`replica` is gone for good; the others finish the run."""
        self.lost(replica)
        self.replicas[replica].state = "dropped"
