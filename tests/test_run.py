"""Whole runs through Ray: tables equal the single-process forward, planted dims recovered exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.layout import SITES
from cluster.config import load_config
from cluster.run import execute
from common.errors import RunError
from common.layout import RunLayout, batch_file
from common.storage import EXCEEDANCES, STAGE_KINDS
from common.record import read_record, write_record
from tests.conftest import read_site, reference_activations, run_config, stored_record, stored_summary


def packed_tokens(path: str, config):
    from transformers import AutoTokenizer

    from cluster.data import load_texts, pack_sequences

    return pack_sequences(AutoTokenizer.from_pretrained(path), load_texts("stdlib"),
                          config.data.num_sequences, config.data.seq_len)


@pytest.mark.parametrize("num_stages, dtype", [(1, "float32"), (3, "float32"), (2, "bfloat16")])
def test_ray_run_equals_single_forward(ray_cluster, planted_checkpoint, tmp_path, num_stages, dtype):
    import torch

    config = load_config(run_config(planted_checkpoint, tmp_path / "run",
                                    model={"dtype": dtype}, pipeline={"num_stages": num_stages}))
    result = execute(config, quiet=True)
    record = stored_record(tmp_path / "run")
    assert record.status == "complete" and len(record.plan) == num_stages
    assert record.committed() == set(record.batches) == {0, 1, 2}
    assert set(record.timings) >= {"cluster_start_s", "load_s", "extract_s", "analysis_s", "total_s"}

    tokens = packed_tokens(planted_checkpoint, config)
    expected = reference_activations(planted_checkpoint, dtype, tokens, torch.ones_like(tokens),
                                     micro_batch=config.pipeline.micro_batch_size)
    for layer in range(6):
        for site in SITES:
            seq, pos, act = read_site(tmp_path / "run", layer, site)
            assert len(seq) == tokens.numel()
            assert np.array_equal(act, expected[(layer, site)][seq, pos]), (layer, site)
    assert result["record"].tokens == tokens.numel()


def test_planted_dims_are_exactly_the_features_found(ray_cluster, planted_checkpoint, tmp_path):
    result = execute(load_config(run_config(planted_checkpoint, tmp_path / "run")), quiet=True)
    features = {f["dim"]: f for f in result["summary"]["outlier_features"]}
    assert set(features) == {5, 40}  # not 20 (one layer of six) nor 9 (scale 1.5)
    for feature in features.values():
        assert feature["layers"] == [0, 1, 2, 3]
        assert feature["layer_fraction"] == pytest.approx(4 / 6)
    assert [f["dim"] for f in stored_summary(tmp_path / "run")["outlier_features"]] == [5, 40]
    assert "| 5 |" in Path(RunLayout.of(str(tmp_path / "run")).report("md")).read_text()


@pytest.mark.parametrize("actors_from_mb", [0.0, 1e6])
def test_scan_actors_start_during_extraction_only_for_large_runs(ray_cluster, planted_checkpoint, tmp_path,
                                                                monkeypatch, actors_from_mb):
    import analysis.pool

    events = []

    class Recorded(analysis.pool.ScanPool):
        def __init__(self, count):
            events.append(("started", count))
            super().__init__(count)

        def scan(self, *args):
            events.append(("scanned", len(self.actors)))
            return super().scan(*args)

    monkeypatch.setattr(analysis.pool, "ScanPool", Recorded)
    config = load_config(run_config(planted_checkpoint, tmp_path / "run", analysis={"scan_actors_from_mb": actors_from_mb}))
    result = execute(config, quiet=True)
    assert [f["dim"] for f in result["summary"]["outlier_features"]] == [5, 40]
    # large: started by the driver's early start (analyse, passed the pool, starts none), then used
    assert events == ([("started", 2), ("scanned", 2)] if actors_from_mb == 0 else [])
    timings = result["record"].timings
    assert 0 < timings["analysis_s"] and 0 < timings["report_s"]
    assert timings["total_s"] >= timings["extract_s"] + timings["analysis_s"] + timings["report_s"]


@pytest.mark.parametrize("spare, started", [(0.0, []), (0.5, []), (1.0, [2])])
def test_scan_actors_start_early_only_beside_a_free_cpu(monkeypatch, spare, started):
    # Where the stages hold every core, an actor's start (imports, ~1.5 s of CPU) slows them.
    import analysis.pool

    pools, asked = [], []
    monkeypatch.setattr(analysis.pool, "ScanPool", lambda count: pools.append(count) or object())
    early = analysis.pool.EarlyStart(2, eta_s=lambda: 3.0, spare_cpus=lambda: asked.append(1) or spare)
    commit = early.after(lambda indices: None)
    for index in range(3):
        commit([index])
    assert pools == started and len(asked) == 1  # decided once, at the lead time
    assert (early.pool is None) == (not started)


def test_a_model_without_plants_has_no_outlier_features(ray_cluster, tiny_checkpoint, tmp_path):
    result = execute(load_config(run_config(tiny_checkpoint("qwen3_moe"), tmp_path / "run")), quiet=True)
    assert result["summary"]["outlier_features"] == []


def test_output_holding_another_run_is_refused(ray_cluster, tiny_checkpoint, tmp_path):
    config = load_config(run_config(tiny_checkpoint("qwen3_moe"), tmp_path / "run",
                                    data={"num_sequences": 4}))
    execute(config, quiet=True)
    with pytest.raises(RunError, match="already holds a run.*--resume"):
        execute(config, quiet=True)


def test_stage_actors_are_named_like_the_plan(ray_cluster, tiny_checkpoint, tmp_path):
    import ray

    from cluster.executor import RayExecutor
    from cluster.run import prepare, stage_specs

    config = load_config(run_config(tiny_checkpoint("qwen3_moe"), tmp_path / "run",
                                    pipeline={"num_stages": 3, "num_replicas": 2, "cpus_per_stage": 0.5}))
    prepared = prepare(config)
    runner = RayExecutor(config.pipeline)
    try:
        runner.hardware()
        assert runner.place(3, batches=3) == 2
        infos = runner.start([stage_specs(config, prepared, str(tmp_path / "run"), r) for r in range(2)])
        names = sorted(n for n in ray.util.list_named_actors() if "/stage-" in n)
        assert names == sorted(info["name"] for info in infos) == [
            f"r{r}/stage-{s} [layers {2 * s}-{2 * s + 1}]" for r in range(2) for s in range(3)]
    finally:
        runner.close()


def test_exceedance_run_resumed_with_another_split_counts_nothing_twice(ray_cluster, planted_checkpoint, tmp_path):
    import polars as pl

    run = tmp_path / "run"

    def config(num_stages: int):
        return load_config(run_config(planted_checkpoint, run, pipeline={"num_stages": num_stages},
                                      storage={"mode": "exceedances", "floor": 3.0},
                                      capture={"routing": True, "experts": True, "residual": True}))

    layout = RunLayout.of(str(run))

    def stored(kind: str) -> pl.DataFrame:
        return pl.read_parquet(layout.stage_files(kind)).sort(pl.all())

    first = execute(config(2), quiet=True)
    want = {kind: stored(kind) for kind in STAGE_KINDS}
    assert len(want[EXCEEDANCES]) > 0
    # Interrupt: micro-batch 1 was written by both stages but never committed.
    record = read_record(layout)
    record.status, record.batches[1].status = "running", "pending"
    write_record(layout, record)

    resumed = execute(config(3), resume=True, quiet=True)
    for kind, table in want.items():
        assert stored(kind).equals(table), kind
    redone = sorted(path for path in layout.stage_files(EXCEEDANCES) if path.endswith(batch_file(1)))
    assert redone == [layout.stage_table(EXCEEDANCES, layers, 1) for layers in (range(0, 2), range(2, 4), range(4, 6))]
    assert resumed["summary"]["outlier_features"] == first["summary"]["outlier_features"]
    assert [f["dim"] for f in first["summary"]["outlier_features"]] == [5, 40]
