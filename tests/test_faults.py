"""Injected faults: a killed stage, a killed driver, out-of-memory. Nothing lost or duplicated."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from actors import faults
from actors.background import WriteError
from actors.shard import ShardSpec
from actors.stage import StageActor, StageSettings, StageSpec
from actors.handoff import MicroBatch
from cluster.config import load_config
from cluster.run import execute
from common.layout import RunLayout
from common.storage import StorageConfig
from tests.conftest import assert_same_tables, dense_tables, fault_config, own_ray, stored_record, token_batch, wait_for_commits

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def faults_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "faults.json"
    path.write_text("[]")
    return path


@pytest.fixture(scope="module")
def ray_cluster(faults_file):
    import ray

    own_ray(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR",
            runtime_env={"env_vars": {faults.ENV: str(faults_file)}})
    yield
    ray.shutdown()


def run_killed(faults_file: Path, config: dict, kill: dict) -> None:
    """`config` run with the `kill` fault armed, disarmed after; the stage must have been killed."""
    faults_file.write_text(json.dumps([kill]))
    try:
        execute(load_config(config), quiet=True)
    finally:
        faults_file.write_text("[]")
    assert Path(kill["once"]).exists(), "the stage was never killed"


def test_a_killed_stage_is_restarted_and_loses_nothing(ray_cluster, fault_free_run, planted_checkpoint, faults_file,
                                                      tmp_path, caplog):
    marker = tmp_path / "killed"
    run_killed(faults_file, fault_config(planted_checkpoint, tmp_path / "run"),
               {"kind": "kill", "stage": 1, "batch": 2, "once": str(marker)})
    assert "will run again" in caplog.text and "every stage answers again" in caplog.text
    record = stored_record(tmp_path / "run")
    assert record.status == "complete" and record.committed() == set(range(12))
    rows = assert_same_tables(tmp_path / "run", fault_free_run)
    assert rows == 12 * 32 * 12  # tokens x layer-sites


def test_a_stage_killed_in_one_replica_loses_nothing_and_the_other_replica_goes_on(
        ray_cluster, fault_free_run, planted_checkpoint, faults_file, tmp_path, caplog):
    marker = tmp_path / "killed"
    config = fault_config(planted_checkpoint, tmp_path / "run")
    config["pipeline"].update(num_replicas=2, cpus_per_stage=1)
    run_killed(faults_file, config, {"kind": "kill", "stage": 1, "replica": 1, "once": str(marker)})
    assert "r1: a stage was lost" in caplog.text and "will run again" in caplog.text
    record = stored_record(tmp_path / "run")
    assert record.status == "complete" and record.committed() == set(range(12))
    assert assert_same_tables(tmp_path / "run", fault_free_run) == 12 * 32 * 12
    assert record.stage_stats[0]["micro_batches"] > 0  # r0 ran micro-batches while r1 came back


def test_a_killed_driver_resumes_to_the_same_tables(fault_free_run, planted_checkpoint, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(fault_config(planted_checkpoint, tmp_path / "run")))
    slow = tmp_path / "slow.json"  # micro-batch 6 waits far longer than the test: at most 6 commit before the kill
    slow.write_text(json.dumps([{"kind": "delay", "stage": 0, "seconds": 0.25},
                                {"kind": "delay", "stage": 0, "batch": 6, "seconds": 600}]))
    command = [sys.executable, "-m", "cluster", "run", str(config)]
    # NOTE: RAY_ADDRESS=local: the driver starts its own cluster (inheriting the fault file),
    # never joining this module's.
    env = {**os.environ, faults.ENV: str(slow), "RAY_ADDRESS": "local"}
    driver = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = Path(RunLayout.of(str(tmp_path / "run")).record)
    try:
        committed = wait_for_commits(ledger, at_least=3, timeout_s=120)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    record = json.loads(ledger.read_text())
    assert record["status"] == "running" and 3 <= len(committed) <= 6

    refused = subprocess.run(command, cwd=REPO, env={**env, faults.ENV: ""}, capture_output=True, text=True)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr

    # The resume in one process (no cluster to start): what it reuses is the ledger's, either way.
    resumed = subprocess.run([*command, "--resume", "--executor", "local"], cwd=REPO, env={**env, faults.ENV: ""},
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(ledger.read_text())["status"] == "complete"
    assert assert_same_tables(tmp_path / "run", fault_free_run) == 12 * 32 * 12
    assert not list((tmp_path / "run").rglob(".*.tmp-*")), "partial files left behind"


def test_ctrl_c_stops_the_run_in_one_line_and_frees_the_output(planted_checkpoint, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(fault_config(planted_checkpoint, tmp_path / "run")))
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps([{"kind": "delay", "stage": 0, "seconds": 0.25}]))
    env = {**os.environ, faults.ENV: str(slow), "RAY_ADDRESS": "local"}
    driver = subprocess.Popen([sys.executable, "-m", "cluster", "run", str(config)], cwd=REPO, env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    layout = RunLayout.of(str(tmp_path / "run"))
    try:
        wait_for_commits(Path(layout.record), at_least=2, timeout_s=120)
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: ") and "--resume" in err
    assert not Path(f"{layout.root}/.lock").exists()  # the next run, or --resume, may start at once
    assert stored_record(tmp_path / "run").status == "running" and len(stored_record(tmp_path / "run").committed()) >= 2


def test_a_full_disk_stops_the_run_in_one_line_and_resume_completes_it(ray_cluster, fault_free_run, planted_checkpoint,
                                                                       faults_file, tmp_path):
    # Every stage fails to write micro-batch 5's files, as on a full disk. The run stops with the
    # stage's own one-line message, not Ray's traceback; what every stage wrote stays committed,
    # and --resume writes the rest: the tables of a fault-free run, none twice, no debris.
    faults_file.write_text(json.dumps([{"kind": "disk", "batch": 5}]))
    config = load_config(fault_config(planted_checkpoint, tmp_path / "run"))
    try:
        with pytest.raises(WriteError, match="micro-batch 5: .*no space left.* rerun with --resume") as raised:
            execute(config, quiet=True)
    finally:
        faults_file.write_text("[]")
    assert "ray::" not in str(raised.value) and "\n" not in str(raised.value)
    record = stored_record(tmp_path / "run")
    assert record.status == "stopped" and 5 not in record.committed() and len(record.committed()) < 12

    execute(config, resume=True, quiet=True)
    assert stored_record(tmp_path / "run").status == "complete"
    assert assert_same_tables(tmp_path / "run", fault_free_run) == 12 * 32 * 12
    assert not list((tmp_path / "run").rglob(".*.tmp-*")), "partial files left behind"


class FullDisk:
    """A writer whose disk is full from micro-batch `full` on."""

    def __init__(self, full: int):
        self.full, self.written = full, []

    def prepare(self, batch, captured, moe=None) -> list[int]:
        return [batch.index]

    def write(self, pieces: list[int]) -> None:
        if pieces[0] >= self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += pieces


@pytest.mark.parametrize("runner", ["inline", "background"])
def test_a_failed_write_is_never_reported_written_and_says_what_to_do(runner):
    # Inline, the failure ends the forward that wrote; on the writer's thread, the stage's next
    # call. Either way the micro-batch is never reported written, and the message is one line.
    from actors.background import ThreadRunner, InlineRunner

    writer = FullDisk(full=2)
    run = InlineRunner(writer) if runner == "inline" else ThreadRunner(writer, depth=1)
    ids = torch.zeros(1, 4, dtype=torch.long)
    reported = []
    with pytest.raises(WriteError, match="micro-batch 2: .*No space left on device.*rerun with --resume"):
        for index in range(4):
            run.submit(MicroBatch(index, [index], ids, torch.ones_like(ids)), {})
            reported += run.committed()
        reported += run.flush()
    assert writer.written == [0, 1] and set(reported) <= {0, 1}
    with pytest.raises(WriteError):  # and stays failed on the writer's thread: nothing after it is written
        run.flush() if runner == "background" else run.submit(MicroBatch(3, [3], ids, torch.ones_like(ids)), {})
    assert writer.written == [0, 1]
    if runner == "background":
        run.close()


def test_an_output_that_refuses_a_write_stops_the_run_with_its_own_message():
    from actors.background import InlineRunner
    from common.errors import RunError

    class ReadOnly(FullDisk):
        def write(self, pieces):
            raise RunError("cannot write /out/x: Permission denied; choose a writable output.")

    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(WriteError, match="micro-batch 0: cannot write /out/x: Permission denied; choose a writable "
                                         "output. Committed micro-batches are kept: rerun with --resume"):
        InlineRunner(ReadOnly(0)).submit(MicroBatch(0, [0], ids, torch.ones_like(ids)), {})


def test_a_cpu_stage_on_a_local_disk_writes_before_forward_returns(tiny_checkpoint, tmp_path):
    from actors.background import ThreadRunner, InlineRunner

    ids, mask = token_batch(seed=1, batch=2, seq=8)
    shard = ShardSpec(tiny_checkpoint("qwen3_moe"), range(0, 2))
    threaded = StageActor(StageSpec(0, shard, StorageConfig(str(tmp_path / "threaded")),
                                    pipeline=StageSettings(writer="thread")))
    assert isinstance(threaded.runner, ThreadRunner)  # as asked: `pipeline.writer: thread`
    threaded.close()
    stage = StageActor(StageSpec(0, shard, StorageConfig(str(tmp_path))))
    assert isinstance(stage.runner, InlineRunner)
    _, written = stage.forward(MicroBatch(0, [0, 1], ids, mask))
    assert written == [0] and len(RunLayout.of(str(tmp_path)).partition_files(0, "ln_attn")) == 1
    stats = stage.stats()
    assert stats["writer_wait_s"] == stats["write_s"] > 0  # the stage waited for its files, and only that
    stage.close()


def test_out_of_memory_splits_the_micro_batch(planted_checkpoint, tmp_path, monkeypatch, caplog):
    # NOTE: halves are bit-identical to the whole only with a batch-invariant expert kernel
    # (batched_mm); grouped_mm's rounding depends on how many tokens share an expert.
    path = planted_checkpoint
    ids, mask = token_batch(seed=3, batch=4, seq=16, pad_last=5)
    oom = tmp_path / "oom.json"
    oom.write_text(json.dumps([{"kind": "oom", "stage": 0, "max_rows": 1}]))
    results = {}
    for name, fault_file in (("clean", ""), ("oom", str(oom))):
        monkeypatch.setenv(faults.ENV, fault_file)
        shard = ShardSpec(path, range(0, 6), experts_implementation="batched_mm")
        stage = StageActor(StageSpec(0, shard, StorageConfig(str(tmp_path / name))))
        stage.forward(MicroBatch(0, [0, 1, 2, 3], ids, mask))
        stage.flush()
        results[name] = dense_tables(tmp_path / name)
    assert "running it in halves" in caplog.text
    for key, frame in results["clean"].items():
        assert results["oom"][key].equals(frame), key
