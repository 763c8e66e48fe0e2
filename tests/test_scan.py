"""analysis/scan.py: dense and exceedance layouts read into the same two tables."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from actors.storage import float32_bar
from analysis.criteria import feature_stats
from analysis.scan import (
    RunError,
    Scanner,
    check_complete,
    list_partitions,
    read_run,
)
from tests.synthetic import SITES, full_mask, plant, random_activations, scan_tables, write_run

PARTITIONS = [(layer, site) for layer in range(4) for site in SITES]


@pytest.fixture(scope="module")
def run_data():
    """`# [layers, sites, seqs, seq_len, hidden]` activations and their `# [seqs, seq_len]` mask."""
    rng = np.random.default_rng(3)
    acts = random_activations(rng, 4, num_seqs=5, seq_len=6, hidden=24, spike_density=0.03)
    plant(acts, dim=5, layers=range(4), token_share=0.5, value=-15.0, rng=rng)
    mask = full_mask(acts)
    mask[0, 3:] = mask[4, 1:] = False  # padding
    return acts, mask


def ordered(exceedances):
    """Exceedances in one row order and dtype, to compare tables from different sources."""
    keys = pl.col("layer", "seq", "pos", "dim").cast(pl.Int64)
    table = exceedances.select(keys, "site", pl.col("value").cast(pl.Float32))
    return table.sort("layer", "site", "seq", "pos", "dim")


def ordered_stats(stats):
    types = {"layer": pl.Int64, "dim": pl.Int64, "max_abs": pl.Float64, "count": pl.Int64}
    columns = stats.select("layer", "site", "dim", "max_abs", "count").cast(types)
    return columns.sort("layer", "site", "dim")


@pytest.mark.parametrize("threshold", [2.5, 6.0, 11.0])
def test_dense_scan_matches_numpy(tmp_path, run_data, threshold):
    acts, mask = run_data
    write_run(tmp_path, acts, mask, parts=3)
    found = Scanner(str(tmp_path), threshold).scan(PARTITIONS)
    exceedances, stats = scan_tables(acts, mask, threshold)
    assert ordered_stats(found.stats).equals(ordered_stats(stats))
    assert ordered(found.exceedances).equals(ordered(exceedances))
    assert found.skipped == []


def test_float16_files_read_like_float32(tmp_path, run_data):
    acts, mask = run_data
    wide = write_run(tmp_path / "f32", acts, mask, parts=2)
    mixed = write_run(tmp_path / "mixed", acts, mask, parts=2, float16_parts=(0,))
    schema = pq.read_schema(mixed / "activations/layer=0/site=ln_attn/part-0.parquet")
    assert str(schema.field("act").type.value_type) == "halffloat"
    a, b = (Scanner(str(run), 6.0).scan(PARTITIONS) for run in (wide, mixed))
    assert a.stats.equals(b.stats)
    assert ordered(a.exceedances).equals(ordered(b.exceedances))


@pytest.mark.parametrize("storage", ["dense", "exceedances"])
def test_threshold_is_inclusive_and_exact_against_float32_values(tmp_path, storage):
    acts = np.zeros((1, len(SITES), 1, 2, 3), dtype=np.float32)  # [layers, sites, seqs, len, dim]
    acts[0, 0, 0, 0] = [np.float32(5.99), 6.0, -6.0]  # float32(5.99) is just below 5.99
    write_run(tmp_path, acts, storage=storage, floor=1.0)
    for threshold in (5.99, 6.0):
        found = Scanner(str(tmp_path), threshold).scan([(0, "ln_attn")])
        assert found.exceedances["dim"].to_list() == [1, 2]
        assert found.stats["count"].to_list() == [0, 1, 1]
    assert float(float32_bar(5.99)) >= 5.99 > float(np.nextafter(float32_bar(5.99), np.float32(0)))


@pytest.mark.parametrize("threshold", [3.0, 4.5, 6.0, 9.0])
def test_exceedance_layout_gives_dense_results(tmp_path, run_data, threshold):
    acts, mask = run_data
    dense = write_run(tmp_path / "dense", acts, mask)
    stored = write_run(tmp_path / "stored", acts, mask, storage="exceedances", floor=3.0)
    a, b = (Scanner(str(run), threshold).scan(PARTITIONS) for run in (dense, stored))
    assert ordered(a.exceedances).equals(ordered(b.exceedances))
    assert a.stats.sort("layer", "site", "dim").equals(b.stats.sort("layer", "site", "dim"))
    tokens = int(mask.sum())
    per_dim = [feature_stats(p.exceedances, p.stats, 4, tokens, 6) for p in (a, b)]
    assert per_dim[0].equals(per_dim[1])
    assert per_dim[0]["occurrences"].sum() > 0


def test_threshold_below_floor_is_refused(tmp_path, run_data):
    acts, mask = run_data
    write_run(tmp_path, acts, mask, storage="exceedances", floor=3.0)
    with pytest.raises(ValueError, match=r"analysis.threshold=2.0: below the run's storage floor"):
        Scanner(str(tmp_path), 2.0)


def test_partitions_and_run_info_are_read_from_disk(tmp_path, run_data):
    acts, mask = run_data
    write_run(tmp_path, acts, mask)
    info = read_run(tmp_path)
    assert (info["num_layers"], info["hidden_size"], info["tokens"]) == (4, 24, int(mask.sum()))
    assert list_partitions(tmp_path, info) == sorted(PARTITIONS)
    # The same run through a filesystem URI reads the same tables.
    by_uri = Scanner(f"file://{tmp_path}", 6.0).scan(PARTITIONS[:2])
    assert by_uri.stats.equals(Scanner(str(tmp_path), 6.0).scan(PARTITIONS[:2]).stats)


def corrupt(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_file_is_named_or_skipped(tmp_path, run_data):
    acts, mask = run_data
    write_run(tmp_path, acts, mask, parts=2)
    bad = tmp_path / "activations/layer=2/site=ln_mlp/part-1.parquet"
    corrupt(bad)
    with pytest.raises(RunError, match=rf"{bad}: unreadable Parquet .*--allow-partial"):
        Scanner(str(tmp_path), 6.0).scan(PARTITIONS)
    with pytest.warns(UserWarning, match="skipping unreadable"):
        found = Scanner(str(tmp_path), 6.0, allow_partial=True).scan(PARTITIONS)
    assert found.skipped == [str(bad)]
    assert found.stats.height == len(PARTITIONS) * 24


def test_missing_or_incomplete_run_json_is_explained(tmp_path, run_data):
    with pytest.raises(RunError, match="no run.json"):
        read_run(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"num_layers": 2}))
    with pytest.raises(RunError, match=r"lacks \['hidden_size', 'tokens'\]"):
        read_run(tmp_path)


def test_hidden_size_mismatch_is_explained(tmp_path, run_data):
    acts, mask = run_data
    write_run(tmp_path, acts, mask)
    info = json.loads((tmp_path / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps({**info, "hidden_size": 32}))
    with pytest.raises(RunError, match="act has shape .* hidden_size=32"):
        Scanner(str(tmp_path), 6.0).scan(PARTITIONS[:1])


def test_missing_partition_fails_or_warns(tmp_path, run_data):
    acts, mask = run_data
    write_run(tmp_path, acts, mask)
    shutil.rmtree(tmp_path / "activations/layer=3/site=ln_mlp")
    partitions = list_partitions(tmp_path, read_run(tmp_path))
    assert partitions == sorted(PARTITIONS[:-1])
    with pytest.raises(RunError, match=r"lacks partitions \[\(3, 'ln_mlp'\)\].*--allow-partial"):
        check_complete(partitions, 4, allow_partial=False)
    with pytest.warns(UserWarning, match="analysing the rest"):
        check_complete(partitions, 4, allow_partial=True)
