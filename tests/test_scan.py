"""analysis.scan: dense and exceedance layouts read into the same two tables."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from analysis.criteria import feature_stats
from analysis.scan import Scanner, check_complete, list_partitions
from common.errors import ConfigError, RunError
from common.layout import RunLayout
from common.record import read_record, write_record
from common.threshold import exceeding, float32_bar
from tests.synthetic import SITES, full_mask, plant, random_activations, scan_tables, write_run

PARTITIONS = [(layer, site) for layer in range(4) for site in SITES]


def scanner(run, threshold: float, **kwargs) -> Scanner:
    layout = RunLayout.of(str(run))
    return Scanner(layout, read_record(layout), threshold, **kwargs)


def part(run, layer: int, site: str, index: int) -> Path:
    return Path(RunLayout.of(str(run)).dense(layer, site, index))


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
    found = scanner(tmp_path, threshold).scan(PARTITIONS)
    exceedances, stats = scan_tables(acts, mask, threshold)
    assert ordered_stats(found.stats).equals(ordered_stats(stats))
    assert ordered(found.exceedances).equals(ordered(exceedances))
    assert found.skipped == []


def test_float16_files_read_like_float32(tmp_path, run_data):
    acts, mask = run_data
    wide = write_run(tmp_path / "f32", acts, mask, parts=2)
    mixed = write_run(tmp_path / "mixed", acts, mask, parts=2, float16_parts=(0,))
    schema = pa.ipc.open_file(part(mixed, 0, "ln_attn", 0)).schema
    assert str(schema.field("act").type.value_type) == "halffloat"
    a, b = (scanner(run, 6.0).scan(PARTITIONS) for run in (wide, mixed))
    assert a.stats.equals(b.stats)
    assert ordered(a.exceedances).equals(ordered(b.exceedances))


@pytest.mark.parametrize("storage", ["dense", "exceedances"])
def test_threshold_is_inclusive_and_exact_against_float32_values(tmp_path, storage):
    acts = np.zeros((1, len(SITES), 1, 2, 3), dtype=np.float32)  # [layers, sites, seqs, len, dim]
    acts[0, 0, 0, 0] = [np.float32(5.99), 6.0, -6.0]  # float32(5.99) is just below 5.99
    write_run(tmp_path, acts, storage=storage, floor=1.0)
    for threshold in (5.99, 6.0):
        found = scanner(tmp_path, threshold).scan([(0, "ln_attn")])
        assert found.exceedances["dim"].to_list() == [1, 2]
        assert found.stats["count"].to_list() == [0, 1, 1]
    assert float(float32_bar(5.99)) >= 5.99 > float(np.nextafter(float32_bar(5.99), np.float32(0)))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("threshold", [0.0, 1e-6, 5.99, 6.0, 6.0039, 65504.0, 65505.0, 1e39])
def test_exceeding_on_bit_patterns_equals_float_arithmetic(dtype, threshold):
    rng = np.random.default_rng(7)
    special = np.array([0.0, -0.0, 5.99, -6.0, 6.0, 6.00390625, 65504.0, -np.inf, np.inf, np.nan,
                        1e-7, -6e-8, 3e38], dtype=np.float64)
    with np.errstate(over="ignore"):
        act = np.concatenate([rng.standard_normal((40, 6)) * 4, rng.choice(special, (20, 6))]).astype(dtype)
    act[:, 4] = np.clip(rng.standard_normal(60) * 4, -6.0, 6.0)  # its max sits on a threshold
    act[:, 5] = rng.standard_normal(60) * 4  # a dim with no NaN and no inf
    wide = np.abs(act.astype(np.float64))
    with np.errstate(invalid="ignore"):
        expected_rows, expected_dims = np.nonzero(wide >= threshold)  # NaN is never >=
    peak, rows, dims = exceeding(act, threshold)
    assert rows.tolist() == expected_rows.tolist() and dims.tolist() == expected_dims.tolist()
    assert peak.dtype == np.float32
    np.testing.assert_array_equal(peak, wide.max(axis=0).astype(np.float32))  # NaN where a dim holds one
    empty = exceeding(act[:0], threshold)
    assert empty[0].tolist() == [0.0] * 6 and len(empty[1]) == len(empty[2]) == 0


def test_arrow_values_read_as_numpy_keep_slices_and_nulls():
    from analysis.scan import _numpy

    for values in (np.arange(10, dtype=np.float16), np.arange(10, dtype=np.int64)):
        assert _numpy(pa.array(values).slice(3, 5)).tolist() == values[3:8].tolist()
    lists = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(12, dtype=np.float32)), 3).slice(1, 2)
    assert _numpy(lists.flatten()).tolist() == list(range(3, 9))
    assert np.isnan(_numpy(pa.array([1.0, None]))).tolist() == [False, True]


@pytest.mark.parametrize("threshold", [3.0, 4.5, 6.0, 9.0])
def test_exceedance_layout_gives_dense_results(tmp_path, run_data, threshold):
    acts, mask = run_data
    dense = write_run(tmp_path / "dense", acts, mask)
    stored = write_run(tmp_path / "stored", acts, mask, storage="exceedances", floor=3.0)
    a, b = (scanner(run, threshold).scan(PARTITIONS) for run in (dense, stored))
    assert ordered(a.exceedances).equals(ordered(b.exceedances))
    assert a.stats.sort("layer", "site", "dim").equals(b.stats.sort("layer", "site", "dim"))
    tokens = int(mask.sum())
    per_dim = [feature_stats(p.exceedances, p.stats, 4, tokens, 6) for p in (a, b)]
    assert per_dim[0].equals(per_dim[1])
    assert per_dim[0]["occurrences"].sum() > 0


def test_threshold_below_floor_is_refused(tmp_path, run_data):
    acts, mask = run_data
    write_run(tmp_path, acts, mask, storage="exceedances", floor=3.0)
    with pytest.raises(ConfigError, match=r"analysis.threshold=2.0: below the run's storage floor"):
        scanner(tmp_path, 2.0)


def test_partitions_and_run_info_are_read_from_disk(tmp_path, run_data):
    acts, mask = run_data
    write_run(tmp_path, acts, mask)
    layout = RunLayout.of(str(tmp_path))
    record = read_record(layout)
    assert (record.num_layers, record.hidden_size, record.tokens) == (4, 24, int(mask.sum()))
    assert list_partitions(layout, record) == sorted(PARTITIONS)
    # The same run through a filesystem URI reads the same tables.
    by_uri = scanner(f"file://{tmp_path}", 6.0).scan(PARTITIONS[:2])
    assert by_uri.stats.equals(scanner(tmp_path, 6.0).scan(PARTITIONS[:2]).stats)


def corrupt(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_file_is_named_or_skipped(tmp_path, run_data, caplog):
    acts, mask = run_data
    write_run(tmp_path, acts, mask, parts=2)
    bad = part(tmp_path, 2, "ln_mlp", 1)
    corrupt(bad)
    with pytest.raises(RunError, match=rf"{bad}: unreadable table .*--allow-partial"):
        scanner(tmp_path, 6.0).scan(PARTITIONS)
    found = scanner(tmp_path, 6.0, allow_partial=True).scan(PARTITIONS)
    assert f"skipping unreadable {bad}" in caplog.text
    assert found.skipped == [str(bad)]
    assert found.stats.height == len(PARTITIONS) * 24


def test_hidden_size_mismatch_is_explained(tmp_path, run_data):
    acts, mask = run_data
    write_run(tmp_path, acts, mask)
    layout = RunLayout.of(str(tmp_path))
    write_record(layout, dataclasses.replace(read_record(layout), hidden_size=32))
    with pytest.raises(RunError, match="act has shape .* hidden_size=32"):
        scanner(tmp_path, 6.0).scan(PARTITIONS[:1])


def test_missing_partition_fails_or_warns(tmp_path, run_data, caplog):
    acts, mask = run_data
    write_run(tmp_path, acts, mask)
    layout = RunLayout.of(str(tmp_path))
    shutil.rmtree(layout.dense_partition(3, "ln_mlp"))
    partitions = list_partitions(layout, read_record(layout))
    assert partitions == sorted(PARTITIONS[:-1])
    with pytest.raises(RunError, match=r"lacks partitions \[\(3, 'ln_mlp'\)\].*--allow-partial"):
        check_complete(partitions, 4, allow_partial=False)
    check_complete(partitions, 4, allow_partial=True)
    assert "analysing the rest" in caplog.text
