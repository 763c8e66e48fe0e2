"""Dashboard metrics and driver progress.

A run on a local head exports the stage metrics on the node's Prometheus endpoint
(`_metrics_export_port`, what `ray start --metrics-export-port` sets); the progress
line counts tokens, rate and ETA from commits.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.config import load_config
from cluster.progress import Progress, duration
from cluster.run import execute
from common.storage import DENSE, EXCEEDANCES
from tests.conftest import free_port, own_ray, run_config, run_stages, token_batch

NAMES = ("tokens_total", "micro_batches_total", "bytes_written_total", "busy_seconds_total",
         "layers_seconds_total", "tables_seconds_total", "write_seconds_total", "write_queue_depth")
SAMPLE = re.compile(r'^ray_moe_outliers_(\w+)\{(.*)\} (\S+)$')


@pytest.fixture(scope="module")
def metrics_head():
    """A local head exporting Prometheus metrics every second; yields the endpoint URL."""
    import ray

    port = free_port()
    own_ray(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR", _metrics_export_port=port,
            _system_config={"metrics_report_interval_ms": 1000})
    yield f"http://127.0.0.1:{port}/metrics"
    ray.shutdown()


def scrape(url: str) -> dict:
    """{metric: {stage: value}} for our metrics, summed over workers."""
    found: dict = defaultdict(lambda: defaultdict(float))
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in text.splitlines():
        if match := SAMPLE.match(line):
            name, labels, value = match.groups()
            stage = re.search(r'stage="([^"]*)"', labels).group(1)
            replica = re.search(r'replica="(\d+)"', labels).group(1)
            assert stage.startswith(f"r{replica}/"), (stage, replica)  # the replica tag names the actor's
            found[name][stage] += float(value)
    return found


def test_stage_metrics_reach_the_prometheus_endpoint(metrics_head, tiny_checkpoint, tmp_path):
    config = load_config(run_config(tiny_checkpoint("qwen3_moe"), tmp_path / "run",
                                    data={"num_sequences": 8}))
    record = execute(config, quiet=True)["record"]
    stages = [entry.name for entry in record.plan]
    deadline, found = time.monotonic() + 60, {}
    while time.monotonic() < deadline:  # exported every report interval, not at once
        found = scrape(metrics_head)
        if all(set(found.get(n, {})) == set(stages) for n in NAMES[:-1]) and \
                found["micro_batches_total"][stages[-1]] == 2:
            break
        time.sleep(1)
    assert set(found) == set(NAMES)
    for stage, stats in zip(stages, record.stage_stats):
        assert found["tokens_total"][stage] == 8 * 32  # every token through every stage
        assert found["micro_batches_total"][stage] == 2  # micro_batch_size 4
        assert found["bytes_written_total"][stage] == stats["bytes_written"] > 0
        assert found["busy_seconds_total"][stage] == pytest.approx(stats["busy_s"], rel=1e-3) and stats["busy_s"] > 0
        assert found["layers_seconds_total"][stage] == pytest.approx(stats["layers_s"], rel=1e-3)
        assert found["tables_seconds_total"][stage] == pytest.approx(stats["tables_s"], rel=1e-3)
        assert found["write_seconds_total"][stage] == pytest.approx(stats["write_s"], rel=1e-3)
        assert found["write_queue_depth"][stage] == 0  # the stage's last report: its writer drained


def test_stage_metrics_are_a_no_op_without_ray_and_never_import_it():
    # A fresh interpreter: the GPU bench machine runs stages without Ray installed.
    code = ("import sys; from actors.metrics import StageMetrics; m = StageMetrics('stage-0'); "
            "m.observe(10, 1, {}, 0); assert m.metrics is None; assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("storage", [DENSE, EXCEEDANCES])
def test_stage_stats_put_each_part_of_forward_in_its_own_counter(tiny_checkpoint, tmp_path, storage, monkeypatch):
    # The bench's per-stage profile. A clock that only the parts move, each by its own amount
    # per micro-batch: the counters must hold exactly each part's time, and forward their sum.
    from actors import background, stage as stage_module
    from actors.stage import StageActor, StageSettings, profile
    from actors.writer import DenseTables, ExceedanceTables, Tables

    clock = Clock()
    monkeypatch.setattr(stage_module, "time", SimpleNamespace(perf_counter=clock))
    monkeypatch.setattr(background, "time", SimpleNamespace(perf_counter=clock))

    def taking(method, seconds):
        def timed(*args, **kwargs):
            result = method(*args, **kwargs)
            clock.now += seconds
            return result
        return timed

    monkeypatch.setattr(StageActor, "run_split", taking(StageActor.run_split, 1.0))
    for tables in (DenseTables, ExceedanceTables):
        monkeypatch.setattr(tables, "prepare", taking(tables.prepare, 0.125))
    monkeypatch.setattr(Tables, "write", taking(Tables.write, 0.0625))
    ids, mask = token_batch(seed=1, batch=6, seq=16, pad_last=3)
    stages = run_stages(tiny_checkpoint("qwen3_moe"), "float32", tmp_path, ids, mask, num_layers=4,
                        num_stages=2, micro_batch=2, storage=storage, pipeline=StageSettings(writer="inline"))
    for stage in stages:
        stats = stage.stats()
        assert stats["micro_batches"] == 3 and stats["tokens"] == int(mask.sum()) and stats["bytes_written"] > 0
        assert [stats[k] for k in ("layers_s", "tables_s", "write_s", "writer_wait_s", "busy_s")] == [
            3.0, 0.375, 0.1875, 0.1875, 3.5625]  # inline: the stage waits for its files, and only that
        assert profile(stats) == {"forward": 1187.5, "layers": 1000.0, "tables": 125.0, "writer_wait": 62.5,
                                  "other": 0.0, "files": 62.5}


def test_progress_prints_rate_and_eta_at_most_every_interval_and_at_the_end():
    import io

    clock, out = Clock(), io.StringIO()  # not a terminal: plain lines
    progress = Progress({0: 100, 1: 100, 2: 100, 3: 100}, stream=out, every_s=5.0, clock=clock)
    commit = progress.wrap(lambda indices: None)
    clock.now = 1.0
    commit([0])
    clock.now = 2.0
    commit([1])  # within 5 s of the last line: not shown
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "1/4 micro-batches  100/400 tokens  100 tokens/s  ETA 0:03" in lines[0]
    clock.now = 4.0
    commit([2, 3])  # the end is always shown
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "100.0%" in lines[1] and "4/4 micro-batches  400/400 tokens  100 tokens/s  ETA 0:00" in lines[1]
    quiet = io.StringIO()
    Progress({0: 100}, quiet=True, stream=quiet).update([0])
    assert quiet.getvalue() == ""


def test_duration_formats_minutes_and_hours():
    assert duration(65) == "1:05" and duration(3725) == "1:02:05"
