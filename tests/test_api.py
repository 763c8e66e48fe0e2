"""The Python API (`import moe_outliers`) and the `moe-outliers` console script."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import moe_outliers
from common.errors import ConfigError, RunError

REPO = Path(__file__).resolve().parent.parent
SMALL = {"num_sequences": 8, "seq_len": 64}  # the default job, fewer tokens


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


def test_the_readme_example_runs_with_no_ray(tmp_path):
    # A fresh interpreter: no Ray is imported, let alone started, by the local executor.
    code = readme_example().replace("runs/tiny_py", str(tmp_path / "run")).replace(
        "tiny_report.html", str(tmp_path / "report.html"))
    check = ("\nimport sys\nassert features['dim'].to_list() == [7, 77], features\n"
             "assert strict['dim'].to_list() == [7, 77] and strict['max_abs'].to_list() == features['max_abs'].to_list()\n"
             "assert 'ray' not in sys.modules, 'the local executor imported Ray'\n")
    done = subprocess.run([sys.executable, "-c", code + check], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[7, 77] 6.0 8" in done.stdout
    html = (tmp_path / "report.html").read_text()
    assert "<html" in html and "data:image/png;base64" in html
    assert not (tmp_path / "run" / "report.html").exists() and not (tmp_path / "run" / "analysis" / "plots").exists()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("api") / "run"
    return moe_outliers.extract("configs/tiny_moe.yaml", executor="local", output=str(output),
                                **SMALL, **{"capture.routing": True, "capture.experts": True},
                                capture__residual=True)


def test_features_are_recomputed_with_other_criteria_and_nothing_is_written(local_run):
    summary = Path(local_run.layout.summary)
    stored = summary.read_bytes()
    features = local_run.features()
    assert features["dim"].to_list() == [7, 77] == local_run.summary.dims
    assert {"dim", "max_abs", "layer_fraction", "token_fraction", "occurrences", "classification",
            "experts", "layer_fraction_ci", "stability"} <= set(features.columns)
    assert local_run.features(threshold=1000.0).height == 0  # empty, with the summary's columns
    assert {"dim", "max_abs", "classification"} <= set(local_run.features(threshold=1000.0).columns)
    # A layer share above the planted 6 of 8 layers: no feature passes.
    assert local_run.features(min_layer_fraction=0.9)["dim"].to_list() == []
    assert summary.read_bytes() == stored
    assert json.loads(stored)["outlier_features"] == local_run.summary.outlier_features
    with pytest.raises(ConfigError, match=r"criteria \['treshold'\]: choose among .*'threshold'"):
        local_run.features(treshold=8.0)


def test_moe_frames_and_activations(local_run):
    assert local_run.super_experts().columns == ["layer", "expert", "max_abs", "dim", "seq", "pos", "tokens"]
    routing = local_run.routing()
    assert set(routing.columns) >= {"layer", "seq", "pos", "rank", "expert", "weight"} and routing.height > 0
    assert isinstance(local_run.massive_activations(), pl.DataFrame)
    acts = local_run.activations(layer=3, site="ln_mlp")
    assert isinstance(acts, pl.LazyFrame)
    frame = acts.collect()
    assert frame.height == 8 * 64 and set(frame["layer"].to_list()) == {3} and set(frame["site"]) == {"ln_mlp"}
    assert local_run.activations().select(pl.len()).collect().item() == 8 * 64 * 8 * 3  # ln_attn, ln_mlp, resid
    assert local_run.record.storage_mode == "dense" and local_run.record.num_layers == 8


def test_a_run_without_a_capture_refuses_its_frame_in_one_line(tmp_path):
    run = moe_outliers.extract("configs/tiny_moe.yaml", executor="local", output=str(tmp_path / "run"),
                               **SMALL, **{"storage.mode": "exceedances"})
    with pytest.raises(RunError, match="captured no routing; extract it with capture.routing: true"):
        run.routing()
    with pytest.raises(RunError, match="no super_experts; extract it with capture.experts: true"):
        run.super_experts()
    entries = run.activations(layer=0).collect()
    assert set(entries.columns) == {"layer", "site", "seq", "pos", "dim", "value"}
    assert entries.height > 0 and entries["value"].abs().min() >= 3.0  # the floor


def test_open_run_on_a_ray_made_run_gives_the_same_frame(ray_cluster, local_run, tmp_path):
    made = moe_outliers.extract("configs/tiny_moe.yaml", output=str(tmp_path / "ray"), **SMALL,
                                **{"capture.routing": True, "capture.experts": True}, capture__residual=True)
    assert made.record.placement["executor"] == "ray"
    opened = moe_outliers.open_run(tmp_path / "ray")
    assert opened.features().equals(local_run.features())
    assert opened.features()["dim"].to_list() == [7, 77]


def test_the_console_script_runs_the_commands(local_run, tmp_path):
    script = shutil.which("moe-outliers") or str(Path(sys.executable).with_name("moe-outliers"))
    done = subprocess.run([script, "analyse", local_run.layout.uri, "--threshold", "8"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 outlier features" in done.stdout and "| 7 |" in done.stdout
    explained = subprocess.run([script, "explain", local_run.layout.uri, "--dim", "7"], capture_output=True,
                               text=True, timeout=300)
    assert explained.returncode == 0 and "dim 7" in explained.stdout.lower(), explained.stderr
    wrong = subprocess.run([script, "extract"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "usage: moe-outliers {run,analyse,compare,explain}" in wrong.stderr
    helped = subprocess.run([script, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: moe-outliers run "), helped.stdout
