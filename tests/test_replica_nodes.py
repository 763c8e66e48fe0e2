"""Replicas over several raylets on one machine (`ray.cluster_utils.Cluster`, fake GPUs):
4 nodes of 2 GPUs and 2 stages make 4 replicas, one per node; a node lost mid-run leaves the
run finished by the other three, with the fault-free tables.
"""

from __future__ import annotations

import json
import os
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from actors import faults
from cluster.config import load_config
from cluster.run import execute
from common.layout import RunLayout
from tests.conftest import assert_same_tables, fault_config, raylets, stored_record, wait_for_commits

NODE = {"num_cpus": 1, "num_gpus": 2, "object_store_memory": 80 * 2**20}


@pytest.fixture(scope="module")
def four_nodes(tmp_path_factory):
    """Head (CPU only) + 4 two-GPU nodes; stage 0 is slowed so a node loss lands mid-run."""
    with raylets(tmp_path_factory.mktemp("slow") / "slow.json", 1.0, [NODE] * 4) as nodes:
        yield nodes


def replica_config(checkpoint, output, num_sequences: int = 12) -> dict:
    config = fault_config(checkpoint, output, num_sequences)
    config["pipeline"].update(device="auto", cpus_per_stage=0.25, placement_timeout_s=4)
    config["analysis"] = {"num_actors": 1}
    return config


def test_auto_runs_one_replica_per_node(four_nodes, planted_checkpoint, fault_free_run, tmp_path):
    _, workers = four_nodes
    record = execute(load_config(replica_config(planted_checkpoint, tmp_path / "run")), quiet=True)["record"]
    nodes = defaultdict(set)
    for stage in record.plan:
        nodes[stage.replica].add(stage.node_id)
    assert len(nodes) == 4 and all(len(held) == 1 for held in nodes.values())  # a replica's stages share a node
    assert {node for held in nodes.values() for node in held} == {w.node_id for w in workers}  # spread
    assert {r["strategy"] for r in record.placement["replicas"]} == {"STRICT_PACK"}
    assert sorted(s.cuda_visible_devices for s in record.plan if s.replica == 0) in (["0", "1"], ["1", "0"])
    assert assert_same_tables(tmp_path / "run", fault_free_run) == 12 * 32 * 12


def hold_survivors(slow: Path, held_s: float) -> None:
    """Each surviving replica sleeps `held_s` once more, at its next micro-batch, so the run
    outlasts the loss's detection plus the 4 s revival timeout: the drop is always reached."""
    armed = [{"kind": "delay", "stage": 0, "seconds": 1.0}]
    armed += [{"kind": "delay", "stage": 0, "replica": r, "seconds": held_s, "once": str(slow.parent / f"held-{r}")}
               for r in (0, 1, 3)]
    fresh = slow.with_suffix(".next")
    fresh.write_text(json.dumps(armed))
    os.replace(fresh, slow)  # at once: a stage reads the file before every micro-batch


def test_a_lost_node_leaves_the_run_to_the_other_replicas(four_nodes, planted_checkpoint, tmp_path, caplog,
                                                          monkeypatch):
    cluster, workers = four_nodes
    output = tmp_path / "run"
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = execute(load_config(replica_config(planted_checkpoint, output, 24)), quiet=True)
        except BaseException as err:  # handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    wait_for_commits(Path(RunLayout.of(str(output)).record), at_least=1, timeout_s=180)
    lost = stored_record(output).plan[2 * 2].node_id  # r2's node
    hold_survivors(Path(os.environ[faults.ENV]), held_s=8.0)
    cluster.remove_node(next(w for w in workers if w.node_id == lost))
    thread.join(timeout=240)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    record = stored_record(output)
    assert record.status == "complete" and record.committed() == set(range(24))
    assert record.placement["dropped"] == [2]
    assert "could not be restarted within 4 s; going on with 3 replica(s): r0, r1, r3" in caplog.text
    assert len(record.stage_stats) == 6  # the three replicas that finished
    monkeypatch.delenv(faults.ENV)  # the fault-free tables, in this process, not slowed down
    execute(load_config(replica_config(planted_checkpoint, tmp_path / "clean", 24)), quiet=True, executor="local")
    assert assert_same_tables(output, tmp_path / "clean") == 24 * 32 * 12
