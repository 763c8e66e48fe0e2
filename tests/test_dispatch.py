"""The Dispatcher alone: which replica takes which micro-batch, what commits, what runs again."""

from __future__ import annotations

import pytest

from cluster.dispatch import Dispatcher, RetriesExhausted


def finish(d: Dispatcher, replica: int, index: int, stages: int) -> list[int]:
    """Every stage of `replica` writes `index` and its last stage returns it."""
    d.returned(replica, index)
    done = []
    for stage in range(stages):
        done += d.written(replica, stage, [index])
    return done


def test_the_replica_with_the_least_work_in_flight_takes_the_next_micro_batch():
    d = Dispatcher(list(range(10)), num_replicas=3, num_stages=2, in_flight=2)
    assert [d.take() for _ in range(3)] == [(0, 0), (1, 1), (2, 2)]  # one each, not all to r0
    finish(d, 1, 1, 2)  # r1 is fast: it is the one with room
    assert d.take() == (1, 3)
    assert [d.take() for _ in range(3)] == [(0, 4), (1, 5), (2, 6)]
    assert d.take() is None  # every replica holds in_flight=2


def test_a_slow_replica_takes_fewer_micro_batches():
    d = Dispatcher(list(range(40)), num_replicas=2, num_stages=1, in_flight=1)
    cost = {0: 1, 1: 3}  # r1 takes three times as long per micro-batch
    running, taken = {}, {0: 0, 1: 0}
    for tick in range(100):
        for replica, (index, end) in list(running.items()):
            if end == tick:
                finish(d, replica, index, 1)
                del running[replica]
        while job := d.take():
            running[job[0]] = (job[1], tick + cost[job[0]])
            taken[job[0]] += 1
        if d.finished:
            break
    assert d.finished and taken == {0: 30, 1: 10}
    assert [r.tokens for r in d.replicas] == [0, 0]  # no token counts given


def test_a_micro_batch_commits_once_every_stage_of_its_own_replica_wrote_it():
    d = Dispatcher([0, 1], num_replicas=2, num_stages=2, in_flight=1)
    assert (d.take(), d.take()) == ((0, 0), (1, 1))
    assert d.written(0, 0, [0]) == []
    assert d.written(1, 1, [0]) == []  # another replica's stage 1 does not complete r0's micro-batch 0
    assert d.written(0, 1, [0]) == [0]
    assert d.written(0, 1, [0]) == []  # reported again: counted once
    assert finish(d, 1, 1, 2) == [1] and d.finished


def test_a_lost_replica_gives_its_uncommitted_micro_batches_to_the_others_first():
    d = Dispatcher(list(range(6)), num_replicas=2, num_stages=2, in_flight=3, tokens=dict.fromkeys(range(6), 10))
    jobs = [d.take() for _ in range(4)]
    assert jobs == [(0, 0), (1, 1), (0, 2), (1, 3)]
    assert finish(d, 1, 1, 2) == [1]
    d.written(1, 0, [3])  # r1's stage 0 wrote 3, then r1 lost a stage
    assert d.lost(1) == [3] and d.replicas[1].state == "down"
    assert d.take() == (0, 3)  # the re-queued micro-batch comes first, and only to r0
    assert d.take() is None  # r0 is full, r1 is down
    for index in (0, 2, 3):
        finish(d, 0, index, 2)
    d.rejoin(1)
    assert [d.take(), d.take()] == [(0, 4), (1, 5)]  # r1 takes micro-batches again
    assert d.committed == {0, 1, 2, 3} and [r.tokens for r in d.replicas] == [30, 10]
    assert d.written(1, 1, [3]) == []  # a late report of the lost replica's stage commits nothing


def test_dropping_replicas_until_none_is_left_keeps_every_micro_batch_accounted_for():
    d = Dispatcher(list(range(4)), num_replicas=2, num_stages=1, in_flight=2)
    for _ in range(4):
        d.take()
    d.drop(0)
    assert sorted(d.queue) == [0, 2] and [r.state for r in d.replicas] == ["dropped", "up"]
    assert d.take() is None  # r1 holds its in_flight already
    assert set(d.queue) | d.replicas[1].unwritten == set(range(4)) - d.committed  # every one accounted for
    finish(d, 1, 1, 1), finish(d, 1, 3, 1)
    assert d.take() == (1, 0) and d.take() == (1, 2)


def test_a_micro_batch_lost_more_often_than_the_retries_stops_the_run():
    d = Dispatcher([0], num_replicas=1, num_stages=1, in_flight=1, retries=2)
    for _ in range(2):
        d.take()
        d.lost(0)
        d.rejoin(0)
    d.take()
    with pytest.raises(RetriesExhausted, match="micro-batch 0 failed 3 times.*--resume"):
        d.lost(0)
