"""analyse() end to end: planted dims found and nothing else, the output files, the CLI, Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from analysis import Criteria, analyse
from analysis.report import FEATURE_KEYS, feature_table
from common.layout import RunLayout
from common.record import read_record, write_record
from tests.conftest import stored_summary
from tests.synthetic import (
    full_mask,
    plant,
    random_activations,
    reference_outliers,
    reference_per_dim,
    write_run,
)

ROOT = Path(__file__).resolve().parents[1]
HEADER = "| Feature | Max magnitude | % layers | % tokens | Occurrences |"
PLANTED = {3: "systematic", 7: "probabilistic", 9: "probabilistic"}
EXACT_KEYS = [k for k in FEATURE_KEYS if k not in ("dim", "max_abs", "classification")]


def planted_activations():
    """Noise that never reaches 6, plus planted dims; `# [4, 2, 4, 6, 16]` and its mask."""
    rng = np.random.default_rng(11)
    acts = random_activations(rng, 4, num_seqs=4, seq_len=6, hidden=16, spike_scale=5.5)
    plant(acts, 3, layers=range(4), token_share=0.75, value=30.0, rng=rng)  # everywhere
    plant(acts, 7, layers=[1, 2], token_share=0.1, value=-9.0, rng=rng)  # half the layers
    plant(acts, 9, layers=[0], token_share=0.5, value=8.0, rng=rng)  # exactly 25% of layers
    plant(acts, 11, layers=range(4), token_share=0.04, value=50.0)  # 1 token: under 6%
    plant(acts, 12, layers=range(4), token_share=1.0, value=5.9, rng=rng)  # never reaches 6
    mask = full_mask(acts)
    mask[3, 4:] = False
    return acts, mask


@pytest.fixture
def run(tmp_path):
    acts, mask = planted_activations()
    return write_run(tmp_path / "run", acts, mask, parts=2, float16_parts=(1,)), acts, mask


def cli(*args):
    command = [sys.executable, "-m", "analysis", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_planted_dims_are_found_and_nothing_else(run):
    path, acts, mask = run
    summary = analyse(str(path))
    found = {row["dim"]: row["classification"] for row in summary["outlier_features"]}
    assert found == PLANTED
    assert found == reference_outliers(reference_per_dim(acts, mask, 6.0))


def test_summary_numbers_match_brute_force(run):
    path, acts, mask = run
    summary = analyse(str(path), Criteria(min_layer_fraction=0.0, min_token_fraction=0.0))
    written = stored_summary(path)
    assert written == summary
    facts = (written["num_layers"], written["tokens"], written["seq_len"])
    assert facts == (4, int(mask.sum()), 6)
    reference = reference_per_dim(acts, mask, 6.0)
    assert [row["dim"] for row in written["outlier_features"]] == [3, 7, 9, 11]
    for row in written["outlier_features"]:
        expected = reference[row["dim"]]
        for key in EXACT_KEYS:
            assert row[key] == expected[key], (row["dim"], key)
        assert row["max_abs"] == pytest.approx(expected["max_abs"])
    assert set(written["seconds"]) == {"scan", "criteria", "total"}


def test_parquet_and_report_hold_the_same_features(run):
    path, _, _ = run
    summary = analyse(str(path))
    layout = RunLayout.of(str(path))
    table = pl.read_parquet(layout.features)
    assert table.columns == [*FEATURE_KEYS, "layer_fraction_ci", "token_fraction_ci", "stability"]
    assert table.to_dicts() == summary["outlier_features"]
    report = Path(layout.report("md")).read_text()
    assert HEADER in report and "max |x| >= 6.0" in report
    for dim in PLANTED:
        assert f"\n| {dim} | " in report


def test_criteria_default_to_the_run_config(tmp_path):
    acts, mask = planted_activations()
    settings = {"threshold": 10.0, "num_actors": 3}
    path = write_run(tmp_path / "run", acts, mask, analysis=settings, seq_len=False)
    summary = analyse(str(path))
    assert summary["criteria"]["threshold"] == 10.0
    assert summary["seq_len"] == 6  # max pos + 1 when the config lacks data.seq_len
    assert [row["dim"] for row in summary["outlier_features"]] == [3]


def test_exceedance_run_gives_the_dense_summary(tmp_path):
    acts, mask = planted_activations()
    dense = analyse(str(write_run(tmp_path / "dense", acts, mask)))
    stored = analyse(str(write_run(tmp_path / "stored", acts, mask, storage="exceedances", floor=4)))
    assert stored["storage_mode"] == "exceedances"
    assert stored["outlier_features"] == dense["outlier_features"]


def test_reports_open_with_the_model_the_data_and_the_date(run):
    path, _, _ = run
    layout = RunLayout.of(str(path))
    record = read_record(layout)
    record.config.update(model={"path": "org/some-moe"}, data={"source": "corpus.jsonl", "split": "train",
                                                               "num_sequences": 4, "seq_len": 6})
    record.model_type, record.dtype, record.created = "qwen3_moe", "bfloat16", "2026-11-28T12:00:00+00:00"
    write_record(layout, record)
    analyse(str(path))
    head = Path(layout.report("md")).read_text().splitlines()[:5]
    assert head == ["# Outlier features", "",
                    "- model: `org/some-moe` (qwen3_moe, bfloat16)",
                    "- data: `corpus.jsonl`, 4 x 6 tokens",
                    "- run made: 2026-11-28T12:00:00+00:00"]
    page = Path(layout.report("html")).read_text()
    assert "<title>Outlier features: org/some-moe</title>" in page and "corpus.jsonl, 4 x 6 tokens" in page


def test_feature_table_formats_rows_and_empty_tables():
    row = {"dim": 4, "max_abs": 12.345, "layer_fraction": 0.5, "token_fraction": 0.0625}
    row["occurrences"] = 9
    assert feature_table([row]).splitlines()[0] == HEADER
    assert feature_table([row]).splitlines()[2] == "| 4 | 12.35 | 50.0 | 6.2 | 9 |"
    assert "(none)" in feature_table([])


def test_cli_prints_the_table_and_flags_override_config(run):
    path, _, _ = run
    done = cli(path)
    assert done.returncode == 0, done.stderr
    assert HEADER in done.stdout and "| 3 | 30.00 | 100.0 |" in done.stdout
    done = cli(path, "--threshold", 40, "--layer-unit", "site")
    assert done.returncode == 0, done.stderr
    assert "0 outlier features" in done.stdout and "(none)" in done.stdout
    assert stored_summary(path)["criteria"]["layer_unit"] == "site"


def test_cli_missing_run_is_one_line_and_exit_2(tmp_path):
    done = cli(tmp_path / "nowhere")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no run record" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_bad_flag_value_names_the_key(run):
    path, _, _ = run
    done = cli(path, "--min-token-fraction", 1.5)
    assert done.returncode == 2
    assert "analysis.min_token_fraction=1.5" in done.stderr and "Traceback" not in done.stderr


def test_cli_corrupt_file_named_or_skipped_with_allow_partial(run):
    path, _, _ = run
    bad = Path(RunLayout.of(str(path)).dense(1, "ln_attn", 0))
    bad.write_bytes(bad.read_bytes()[:100])
    done = cli(path)
    assert done.returncode == 2 and str(bad) in done.stderr and "Traceback" not in done.stderr
    done = cli(path, "--allow-partial")
    assert done.returncode == 0, done.stderr
    assert "warning: skipping unreadable" in done.stderr and HEADER in done.stdout
    assert stored_summary(path)["skipped_files"] == [str(bad)]


def test_ray_actors_give_the_brute_force_summary(ray_cluster, tmp_path):
    from analysis.pool import ScanPool

    acts, mask = planted_activations()
    path = write_run(tmp_path / "run", acts, mask)
    reference = reference_per_dim(acts, mask, 6.0)
    pools = [ScanPool(2)]
    first = analyse(str(path), pool=pools[0])
    pools.append(ScanPool(3))  # the actor names are free again after a run
    again = analyse(str(path), pool=pools[1])
    for summary in (first, again):
        assert summary["partitions"] == 8
        assert {row["dim"]: row["classification"] for row in summary["outlier_features"]} == PLANTED
        for row in summary["outlier_features"]:
            assert row["layers"] == reference[row["dim"]]["layers"]
            assert row["occurrences"] == reference[row["dim"]]["occurrences"]
    assert all(not pool.actors for pool in pools)
    assert not [name for name in ray_cluster.util.list_named_actors() if name.startswith("scan-")]


def test_small_runs_scan_in_process_and_large_ones_on_actors(ray_cluster, tmp_path, monkeypatch):
    from analysis import steps
    from analysis.pool import ScanPool

    acts, mask = planted_activations()
    path = write_run(tmp_path / "run", acts, mask)
    started = []
    monkeypatch.setattr(steps, "ScanPool", lambda count: started.append(count) or ScanPool(count))
    small = analyse(str(path), num_actors=2)
    assert started == []
    size = RunLayout.of(str(path)).table_bytes()
    assert size > 0
    settings = steps.run_settings(read_record(RunLayout.of(str(path))))
    from dataclasses import replace

    large = analyse(str(path), num_actors=2, settings=replace(settings, scan_actors_from_mb=size / 2**20))
    assert started == [2]
    assert small["outlier_features"] == large["outlier_features"]
    # Without num_actors, the recorded analysis.num_actors says how many.
    analyse(str(path), settings=replace(settings, scan_actors_from_mb=size / 2**20, num_actors=3))
    assert started == [2, 3]
