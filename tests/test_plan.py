"""Pure planning functions: balanced contiguous layer splits and micro-batches."""

import itertools

import pytest

from cluster.plan import PlanError, plan_micro_batches, plan_stages, stage_bytes


def brute_force_best(layer_bytes, num_stages, embed):
    n = len(layer_bytes)
    best = None
    for cuts in itertools.combinations(range(1, n), num_stages - 1):
        bounds = [0, *cuts, n]
        stages = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        worst = max(stage_bytes(stages, layer_bytes, embed))
        best = worst if best is None else min(best, worst)
    return best


def test_even_layers_split_evenly():
    assert plan_stages([10] * 48, 2) == [range(0, 24), range(24, 48)]
    assert plan_stages([10] * 6, 3) == [range(0, 2), range(2, 4), range(4, 6)]


def test_embeddings_push_layers_off_stage_zero():
    stages = plan_stages([10] * 8, 2, embed_bytes=20)
    assert stages == [range(0, 3), range(3, 8)]


@pytest.mark.parametrize("seed", range(20))
def test_plan_is_contiguous_and_optimal(seed):
    import random

    rng = random.Random(seed)
    layer_bytes = [rng.randint(1, 100) for _ in range(rng.randint(2, 12))]
    num_stages = rng.randint(1, len(layer_bytes))
    embed = rng.randint(0, 200)
    stages = plan_stages(layer_bytes, num_stages, embed)
    assert len(stages) == num_stages and all(len(r) > 0 for r in stages)
    assert [i for r in stages for i in r] == list(range(len(layer_bytes)))
    assert max(stage_bytes(stages, layer_bytes, embed)) == brute_force_best(layer_bytes, num_stages, embed)


def test_more_stages_than_layers_is_refused():
    with pytest.raises(PlanError, match=r"pipeline.num_stages=5 but the model has 4 decoder layers"):
        plan_stages([1] * 4, 5)


def test_micro_batches_cover_every_sequence_once():
    assert plan_micro_batches(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    with pytest.raises(PlanError, match="micro_batch_size=0"):
        plan_micro_batches(10, 0)
