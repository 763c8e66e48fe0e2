"""A node is lost mid-run (several raylets on one machine, one fake GPU each).

With a spare node, the lost stage's bundle and actor move there and the run ends with the
same tables as a fault-free run. Without one, the run stops with a clear message, its
committed micro-batches stay valid, and --resume finishes it once a node is back.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.run import execute
from common.errors import RunError
from common.layout import RunLayout
from tests.conftest import assert_same_tables, fault_config, raylets, stored_record, wait_for_commits

NODE = {"num_cpus": 1, "num_gpus": 1, "object_store_memory": 80 * 2**20}


@pytest.fixture
def cluster(tmp_path):
    """Head (CPU only) + 3 one-GPU nodes; stage 0 is slowed down so a kill lands mid-run."""
    slow = tmp_path / "slow.json"
    with raylets(slow, 0.3, [NODE] * 3) as (cluster, workers):
        yield cluster, workers, slow


def gpu_config(checkpoint, output) -> dict:
    config = fault_config(checkpoint, output)
    config["pipeline"].update(device="auto", placement="spread", placement_timeout_s=20)
    config["analysis"] = {"num_actors": 1}
    return config


def start_run(config) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = execute(config, quiet=True)
        except BaseException as err:  # handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def remove_stage_node(cluster, workers, output, stage: int):
    wait_for_commits(Path(RunLayout.of(str(output)).record), at_least=2, timeout_s=120)
    node_id = stored_record(output).plan[stage].node_id
    (node,) = [w for w in workers if w.node_id == node_id]
    cluster.remove_node(node)
    return node


def test_lost_node_moves_its_stage_to_a_spare(cluster, planted_checkpoint, fault_free_run, tmp_path):
    cluster, workers, slow = cluster
    output = tmp_path / "run"
    thread, outcome = start_run(load_config(gpu_config(planted_checkpoint, output)))
    removed = remove_stage_node(cluster, workers, output, stage=1)
    thread.join(timeout=240)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    record = stored_record(output)
    assert record.status == "complete"
    assert record.plan[1].node_id != removed.node_id  # the stage answered from elsewhere
    assert assert_same_tables(output, fault_free_run) == 12 * 32 * 12


def test_no_room_left_stops_clearly_and_resumes(cluster, planted_checkpoint, fault_free_run, tmp_path):
    cluster, workers, slow = cluster
    spare = workers[2]
    output = tmp_path / "run"
    config = load_config(gpu_config(planted_checkpoint, output))
    cluster.remove_node(spare)  # only the two stage nodes remain
    thread, outcome = start_run(config)
    remove_stage_node(cluster, workers[:2], output, stage=1)
    thread.join(timeout=240)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), RunError), outcome
    assert "could not be restarted within 20 s" in str(outcome["error"])
    assert "--resume" in str(outcome["error"])
    record = stored_record(output)
    assert record.status == "stopped" and 2 <= len(record.committed()) < 12

    cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    slow.write_text("[]")
    execute(config, resume=True, quiet=True)
    assert assert_same_tables(output, fault_free_run) == 12 * 32 * 12
