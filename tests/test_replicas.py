"""Replicas through Ray on one machine (fractional CPUs): the tables do not depend on R or N.

Every run here must store the same files, byte for byte, as the local executor's one pipeline
(the same micro-batch indices, rows and values), and find the planted dims.
"""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.run import execute
from common.errors import UserError
from common.layout import RunLayout
from common.record import read_record, write_record
from tests.conftest import fault_config, stored_record, stored_summary


def files_of(run: Path) -> dict[str, Path]:
    """Relative path -> file, for every table a run wrote (not its record or analysis)."""
    layout = RunLayout.of(str(run))
    return {os.path.relpath(path, run): Path(path) for path, _ in layout.batch_tables()}


def assert_same_files(run: Path, reference: Path) -> int:
    ours, theirs = files_of(run), files_of(reference)
    assert sorted(ours) == sorted(theirs)
    different = [name for name in ours if not filecmp.cmp(ours[name], theirs[name], shallow=False)]
    assert not different, different[:5]
    return len(ours)


def replica_config(checkpoint, output, replicas, stages, **pipeline) -> dict:
    config = fault_config(checkpoint, output)  # 12 sequences x 32 tokens, float32, micro-batches of 1
    config["pipeline"].update(num_stages=stages, num_replicas=replicas, cpus_per_stage=0.5,
                              threads_per_stage=1, **pipeline)
    config["analysis"] = {"num_actors": 1}
    return config


@pytest.fixture(scope="module")
def one_pipeline(planted_checkpoint, tmp_path_factory):
    """The local executor's run: one pipeline of 2 stages in this process."""
    output = tmp_path_factory.mktemp("local") / "run"
    result = execute(load_config(replica_config(planted_checkpoint, output, 1, 2)), quiet=True, executor="local")
    assert result["record"].placement["executor"] == "local"
    return output, result


@pytest.mark.parametrize("replicas, stages", [(1, 2), (2, 1), (3, 2)])  # 1, 2 and 3 replicas; 1 and 2 stages
def test_replicas_store_the_tables_of_one_pipeline(ray_cluster, planted_checkpoint, one_pipeline, tmp_path,
                                                   replicas, stages):
    reference, local = one_pipeline
    output = tmp_path / "run"
    result = execute(load_config(replica_config(planted_checkpoint, output, replicas, stages)), quiet=True)
    record = result["record"]
    assert record.status == "complete" and record.committed() == set(range(12))
    assert assert_same_files(output, reference) == 12 * 6 * 2  # micro-batches x layer-sites
    assert [f["dim"] for f in result["summary"]["outlier_features"]] == [5, 40]
    assert result["summary"]["outlier_features"] == local["summary"]["outlier_features"]
    # The plan: replicas x stages, each actor's node and name; every replica took work.
    assert [(s.replica, s.stage) for s in record.plan] == [(r, s) for r in range(replicas) for s in range(stages)]
    assert all(s.node_id and s.pid for s in record.plan)
    assert [s.name.split(" ")[0] for s in record.plan] == [f"r{r}/stage-{s}" for r in range(replicas)
                                                          for s in range(stages)]
    per_replica = [record.stage_stats[r * stages]["micro_batches"] for r in range(replicas)]
    assert sum(per_replica) == 12 and min(per_replica) > 0, per_replica
    assert len(record.placement["replicas"]) == replicas


def test_auto_is_one_replica_without_gpus_and_too_many_are_refused_in_one_line(ray_cluster, planted_checkpoint,
                                                                               tmp_path):
    config = replica_config(planted_checkpoint, tmp_path / "run", "auto", 2)
    record = execute(load_config(config), quiet=True)["record"]
    assert len({s.replica for s in record.plan}) == 1  # a CPU-only cluster: auto means 1
    config = replica_config(planted_checkpoint, tmp_path / "refused", 5, 2)  # 5 x 2 x 0.5 CPUs of 4
    with pytest.raises(UserError, match=r"^pipeline.num_replicas=5 x num_stages=2 needs 5 CPU but the cluster "
                                        r"has 0 GPUs \(CPU: 4"):
        execute(load_config(config), quiet=True)
    assert not (tmp_path / "refused" / "run.json").exists()  # refused before any record is written
    with pytest.raises(UserError, match="the local executor runs one pipeline"):
        execute(load_config(replica_config(planted_checkpoint, tmp_path / "local", 2, 2)), executor="local")
    with pytest.raises(UserError, match="pipeline.device=cuda but torch sees no GPU in this process"):
        execute(load_config(replica_config(planted_checkpoint, tmp_path / "gpu", 1, 2, device="cuda")), executor="local")


@pytest.mark.parametrize("first, then, mode", [((1, 2), (3, 1), "exceedances"), ((2, 1), (1, 3), "dense")])
def test_resume_with_other_replicas_and_stages_counts_nothing_twice(ray_cluster, planted_checkpoint, one_pipeline,
                                                                    tmp_path, first, then, mode):
    reference, _ = one_pipeline
    run = tmp_path / "run"
    config = replica_config(planted_checkpoint, run, *first)
    config["storage"].update(mode=mode, floor=3.0)
    execute(load_config(config), quiet=True)
    layout = RunLayout.of(str(run))
    record = read_record(layout)
    record.status = "running"
    for index in (1, 5, 6):  # written by every stage, never committed: interrupted
        record.batches[index].status = "pending"
    write_record(layout, record)
    redone = ("000001.parquet", "000005.parquet", "000006.parquet")
    before = {name: path.read_bytes() for name, path in files_of(run).items() if not name.endswith(redone)}
    config = replica_config(planted_checkpoint, run, *then)
    config["storage"].update(mode=mode, floor=3.0)
    resumed = execute(load_config(config), resume=True, quiet=True)["record"]
    assert resumed.status == "complete" and resumed.committed() == set(range(12))
    assert len({s.replica for s in resumed.plan}) == then[0]
    found = files_of(run)
    if mode == "dense":
        assert assert_same_files(run, reference) == 12 * 6 * 2
    else:  # each micro-batch's tables once: the redone ones under the new split only
        assert len([name for name in found if name.endswith(redone[0]) and "exceedances" in name]) == then[1]
        assert len([name for name in found if "exceedances" in name]) == 9 * first[1] + 3 * then[1]
    kept = [name for name in before if name in found]
    assert len(kept) == (len(before) if mode == "dense" else 9 * 2 * first[1])  # exceedances and stats
    assert all(found[name].read_bytes() == before[name] for name in kept)
    assert [f["dim"] for f in stored_summary(run)["outlier_features"]] == [5, 40]


def test_the_progress_line_and_the_record_carry_each_replica(ray_cluster, planted_checkpoint, tmp_path, capsys):
    config = replica_config(planted_checkpoint, tmp_path / "run", 2, 1)
    execute(load_config(config), quiet=False)
    out = capsys.readouterr().out
    line = [line for line in out.splitlines() if line.startswith("extract ")][-1]
    assert "12/12 micro-batches" in line and " (r0 " in line and " r1 " in line and line.endswith(")")
    record = stored_record(tmp_path / "run")
    assert record.placement["executor"] == "ray" and len(record.placement["bundle_nodes"]) == 2
