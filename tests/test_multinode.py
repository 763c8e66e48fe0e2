"""Several raylets on one machine (`ray.cluster_utils.Cluster`), one fake GPU each.

A 3-stage run must land one stage per node (the plan records where), and its tables
must equal, bit for bit, those of a 1-stage run on a single node of the same cluster.
"""

from __future__ import annotations

import numpy as np
import pytest

from common.layout import SITES
from cluster.config import load_config
from cluster.run import execute
from tests.conftest import read_site, run_config, stored_record, stored_summary

NODE = {"num_cpus": 1, "num_gpus": 1, "object_store_memory": 80 * 2**20}


@pytest.fixture(scope="module")
def three_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the suite's shared cluster: this module needs its own nodes
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def run(checkpoint: str, output, num_stages: int, num_replicas: int | str = "auto") -> dict:
    config = load_config(run_config(checkpoint, output, pipeline={"num_stages": num_stages, "num_replicas": num_replicas},
                                    analysis={"num_actors": 1}))
    return execute(config, quiet=True)["record"]


def test_three_stages_spread_one_per_node_and_match_one_node(three_nodes, planted_checkpoint, tmp_path):
    import ray

    spread = run(planted_checkpoint, tmp_path / "spread", 3)  # auto: 3 GPUs hold one replica of 3 stages
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 3
    assert spread.placement["strategy"] == "SPREAD"  # no node holds the 3 stages
    placed = [stage.node_id for stage in spread.plan]
    assert set(placed) == nodes  # one stage on each node
    assert placed == spread.placement["bundle_nodes"]  # where the plan said
    assert [stage.cuda_visible_devices for stage in spread.plan] == ["0", "0", "0"]
    assert [stage.name for stage in spread.plan] == [
        "r0/stage-0 [layers 0-1]", "r0/stage-1 [layers 2-3]", "r0/stage-2 [layers 4-5]"]
    assert stored_record(tmp_path / "spread") == spread

    single = run(planted_checkpoint, tmp_path / "single", 1, num_replicas=1)
    assert single.placement["strategy"] == "STRICT_PACK" and len(single.plan) == 1
    for layer in range(6):
        for site in SITES:
            ours, theirs = read_site(tmp_path / "spread", layer, site), read_site(tmp_path / "single", layer, site)
            for a, b in zip(ours, theirs):
                assert np.array_equal(a, b), (layer, site)
    summaries = [stored_summary(tmp_path / name) for name in ("spread", "single")]
    assert summaries[0]["outlier_features"] == summaries[1]["outlier_features"]
    assert [f["dim"] for f in summaries[0]["outlier_features"]] == [5, 40]


def test_strict_spread_beyond_the_nodes_times_out_with_the_resources(three_nodes):
    from cluster import placement

    bundles = [{"CPU": 0.1}] * 4
    with pytest.raises(placement.PlacementError, match="STRICT_SPREAD.*nodes: 3"):
        placement.reserve(bundles, 3, placement.strategy_for("strict_spread", None))
