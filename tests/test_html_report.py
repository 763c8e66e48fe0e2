"""report.html, the plots, the layer profile and `python -m analysis compare` on synthetic runs.

Files must be valid (PNGs decode, the HTML parses) and their numbers must be those of
the summary and of a brute-force computation over the planted activations.
"""

from __future__ import annotations

import base64
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from analysis import analyse
from analysis.html import HEADER, TITLES
from common.layout import RunLayout
from tests.conftest import stored_summary
from tests.pages import Page, decode
from tests.synthetic import plant, random_activations, write_run

ROOT = Path(__file__).resolve().parents[1]


def activations(seed: int, big_dim: int):
    """4 layers of noise; `big_dim` planted everywhere at 30, dim 7 in two layers at -9."""
    rng = np.random.default_rng(seed)
    acts = random_activations(rng, 4, num_seqs=4, seq_len=6, hidden=16, spike_scale=5.5)
    plant(acts, big_dim, layers=range(4), token_share=0.75, value=30.0, rng=rng)
    plant(acts, 7, layers=[1, 2], token_share=0.5, value=-9.0, rng=rng)
    return acts


@pytest.fixture
def run(tmp_path):
    acts = activations(11, big_dim=3)
    root = write_run(tmp_path / "run", acts, parts=1)
    return root, analyse(str(root)), acts


def test_plots_decode_and_html_embeds_them(run):
    root, _, _ = run
    layout = RunLayout.of(str(root))
    page = Page()
    page.feed(Path(layout.report("html")).read_text())
    assert set(page.images) == set(TITLES)
    for name in TITLES:
        png = Path(layout.plot(name)).read_bytes()
        assert decode(png).size[0] > 100
        assert page.images[name] == "data:image/png;base64," + base64.b64encode(png).decode()
    markdown = Path(layout.report("md")).read_text()
    assert all(f"({layout.plot_link(name)})" in markdown and (root / layout.plot_link(name)).is_file()
               for name in TITLES)


def test_html_numbers_are_those_of_the_summary(run):
    root, _, _ = run
    summary = stored_summary(root)
    page = Page()
    page.feed(Path(RunLayout.of(str(root)).report("html")).read_text())
    header, *rows = page.tables["features"]
    assert header == HEADER
    assert [int(r[0]) for r in rows] == [f["dim"] for f in summary["outlier_features"]] == [3, 7]
    for cells, feature in zip(rows, summary["outlier_features"]):
        assert float(cells[1]) == pytest.approx(feature["max_abs"], abs=0.005)
        assert float(cells[2]) == pytest.approx(100 * feature["layer_fraction"], abs=0.05)
        assert float(cells[3]) == pytest.approx(100 * feature["token_fraction"], abs=0.05)
        assert int(cells[4]) == feature["occurrences"] and cells[5] == feature["classification"]
    facts = dict(page.tables["facts"])
    assert int(facts["outlier features"]) == summary["num_outlier_features"] == 2
    assert int(facts["tokens per layer-site"]) == summary["tokens"]
    criteria = dict(page.tables["criteria"])
    assert float(criteria["threshold"]) == summary["criteria"]["threshold"]


def test_layer_profile_is_the_brute_force_top_k_and_median(run):
    root, _, acts = run
    profile = pl.read_parquet(RunLayout.of(str(root)).profile)
    assert profile["layer"].to_list() == [0, 1, 2, 3]
    for layer, row in enumerate(profile.iter_rows(named=True)):
        per_dim = np.abs(acts[layer]).max(axis=(0, 1, 2))  # [hidden], both sites
        order = np.argsort(-per_dim, kind="stable")
        assert [row["top1"], row["top2"], row["top3"]] == pytest.approx(per_dim[order[:3]].tolist())
        assert row["top1_dim"] == 3
        assert row["median_abs"] == pytest.approx(float(np.median(np.abs(acts[layer]))))


def test_exceedance_run_reports_without_a_median(tmp_path):
    root = write_run(tmp_path / "stored", activations(5, big_dim=3), storage="exceedances", floor=4)
    analyse(str(root))
    layout = RunLayout.of(str(root))
    profile = pl.read_parquet(layout.profile)
    assert profile["median_abs"].null_count() == 4 and profile["top1"].min() == 30
    plot = decode(Path(layout.plot("massive")).read_bytes())
    assert plot.format == "PNG" and min(plot.size) > 100


def test_compare_builds_one_table_and_plot_across_runs(run, tmp_path):
    first, summary, _ = run
    second = write_run(tmp_path / "other", activations(12, big_dim=9), parts=1)
    # `second` was never analysed: compare analyses it first.
    done = subprocess.run([sys.executable, "-m", "analysis", "compare", str(first), str(second),
                           "--output", str(tmp_path / "cmp")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    assert [r["run"] for r in rows] == [str(first), str(second)]
    for row, path in zip(rows, (first, second)):
        expected = stored_summary(path)
        assert int(row["outlier features"]) == expected["num_outlier_features"]
        assert int(row["tokens"]) == expected["tokens"]
    assert rows[0]["top dims"] == "3, 7" and rows[1]["top dims"] == "9, 7"
    assert float(rows[0]["max abs"]) == pytest.approx(30.0)
    assert decode((tmp_path / "cmp" / "compare.png").read_bytes()).size[0] > 100
    assert "| run | model |" in done.stdout
    assert (tmp_path / "cmp" / "compare.md").read_text().count("\n| ") == 3  # header and 2 runs


def test_compare_of_a_missing_run_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "analysis", "compare", str(tmp_path / "none")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error:") and "no run record" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
