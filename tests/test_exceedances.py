"""Exceedance mode: the same outlier features as dense mode, from far fewer bytes.

A real tiny model runs twice through in-process stages on the same tokens (one row
padded), once per storage mode; the analysis of both runs must agree for every
threshold >= floor, and the stored entries must equal the dense values bit for bit.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from actors.select import BLOCK, BlockSelector, select_torch
from actors.writer import ExceedanceTables
from analysis import analyse
from analysis.criteria import Criteria, feature_stats
from analysis.scan import Scanner, list_partitions, read_frame
from common.errors import ConfigError
from common.layout import RunLayout
from common.storage import EXCEEDANCES, STATS
from common.record import read_record
from common.threshold import float32_bar
from tests.conftest import in_process_run, token_batch

FLOOR = 3.0
THRESHOLDS = [3.0, 4.5, 6.0, 10.0]
BATCH, SEQ, PAD, LAYERS = 4, 32, 5, 6


def extract(model_path, dtype, mode, out, ids, mask, num_stages=2, micro_batch=2) -> dict:
    """Run in-process stages over the tokens, write the run record; returns {'bytes': ...}."""
    stages = in_process_run(model_path, dtype, out, ids, mask, num_layers=LAYERS, num_stages=num_stages,
                            micro_batch=micro_batch, storage=mode, floor=FLOOR)
    return {"bytes": sum(s.stats()["bytes_written"] for s in stages)}


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def runs(request, planted_checkpoint, tmp_path_factory):
    """(dense run dir, exceedance run dir, bytes by mode) for one dtype."""
    ids, mask = token_batch(seed=3, batch=BATCH, seq=SEQ, pad_last=PAD)
    dirs, sizes = {}, {}
    for mode in ("dense", "exceedances"):
        dirs[mode] = tmp_path_factory.mktemp(f"{mode}-{request.param}")
        sizes[mode] = extract(planted_checkpoint, request.param, mode, dirs[mode], ids, mask)["bytes"]
    print(f"\n{request.param}: bytes written dense {sizes['dense']:,}, "
          f"exceedances {sizes['exceedances']:,} ({sizes['dense'] / sizes['exceedances']:.1f}x fewer)")
    return dirs["dense"], dirs["exceedances"], sizes


def scanned(run_dir, threshold):
    layout = RunLayout.of(str(run_dir))
    record = read_record(layout)
    partial = Scanner(layout, record, threshold).scan(list_partitions(layout, record))
    keys = ["layer", "site", "seq", "pos", "dim"]
    return partial.exceedances.sort(keys), partial.stats.sort("layer", "site", "dim")


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_same_exceedances_and_stats_as_dense(runs, threshold):
    dense, stored, _ = runs
    want_rows, want_stats = scanned(dense, threshold)
    got_rows, got_stats = scanned(stored, threshold)
    assert len(want_rows) > 0
    # Bit for bit: the stored value is the dense value at the same (layer, site, seq, pos, dim).
    assert got_rows.equals(want_rows)
    assert got_stats.equals(want_stats)
    per_dim = [feature_stats(e, s, LAYERS, BATCH * SEQ - PAD, SEQ) for e, s in
               (scanned(dense, threshold), scanned(stored, threshold))]
    assert per_dim[0].equals(per_dim[1])


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_same_outlier_features_as_dense(runs, threshold):
    dense, stored, _ = runs
    criteria = Criteria(threshold=threshold, min_token_fraction=0.06)
    want = analyse(str(dense), criteria)["outlier_features"]
    got = analyse(str(stored), criteria)["outlier_features"]
    assert got == want
    if threshold == 6.0:  # the planted dims 5 and 40, and nothing else (tests/test_run.py)
        assert {f["dim"] for f in want} == {5, 40}


def test_stored_stats_are_those_of_every_real_token(runs):
    dense, stored, _ = runs
    dense_layout = RunLayout.of(str(dense))
    acts = pl.concat([read_frame(dense_layout.fs, p) for p in dense_layout.partition_files(2, "ln_mlp")])
    x = np.asarray(acts["act"].to_numpy(), dtype=np.float64)  # [tokens, hidden]
    assert len(x) == BATCH * SEQ - PAD  # padding positions never written
    layout = RunLayout.of(str(stored))
    stats = (pl.read_parquet(layout.stage_files(STATS)).filter(layer=2, site="ln_mlp")
             .group_by("dim").agg(pl.col("count", "sum", "sum_sq").sum(), pl.col("max_abs").max())
             .sort("dim"))
    np.testing.assert_array_equal(stats["count"], (np.abs(x) >= FLOOR).sum(0))
    np.testing.assert_array_equal(stats["max_abs"], np.abs(x).max(0))
    np.testing.assert_allclose(stats["sum"], x.sum(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats["sum_sq"], (x**2).sum(0), rtol=1e-9)
    rows = pl.read_parquet(layout.stage_files(EXCEEDANCES)).filter(layer=2, site="ln_mlp")
    assert len(rows) == int(stats["count"].sum())
    assert rows.filter((pl.col("seq") == BATCH - 1) & (pl.col("pos") >= SEQ - PAD)).is_empty()


def test_exceedances_take_fewer_bytes(runs):
    _, _, sizes = runs
    assert 0 < sizes["exceedances"] < sizes["dense"]


def test_below_floor_threshold_is_refused(runs):
    _, stored, _ = runs
    layout = RunLayout.of(str(stored))
    with pytest.raises(ConfigError, match="below the run's storage floor 3.0"):
        Scanner(layout, read_record(layout), 2.5)


def test_floor_is_compared_as_a_real_number(tmp_path):
    # 3.1 has no float32: the nearest one lies below 3.1 and must not be kept; the next one up must.
    below = np.float32(3.1)
    above = np.nextafter(below, np.float32(np.inf))
    writer = ExceedanceTables(str(tmp_path), 3.1)
    (site, token, dim, value), stats = writer.select([torch.tensor([[below, -3.5, 1.0, above]])])
    assert float(below) < 3.1 <= float(float32_bar(3.1)) == float(above)
    assert dim.tolist() == [1, 3] and value.tolist() == [-3.5, float(above)]
    assert stats["count"].tolist() == [[0, 1, 0, 1]]


@pytest.mark.parametrize("rows", [0, 1, 37, 2 * BLOCK // 64 + 5])
def test_numpy_and_torch_selections_agree(rows):
    # The CPU path (numpy, in blocks of rows; the last case takes three, the last one short) and
    # the GPU path (torch, here on the CPU) must keep the same entries in the same order, with
    # the same counts and maxima, NaN included; float64 sums agree to rounding.
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(3, rows, 64, generator=gen) * 2).to(torch.bfloat16).float()
    x[..., 5] = 7.0 if rows else x[..., 5]
    if rows > 1:
        x[1, rows - 1, 9] = float("nan")
    bar = float32_bar(3.1)
    selector = BlockSelector(bar)
    kept_np, stats_np = selector(list(x.to(torch.bfloat16)))
    kept_torch, stats_torch = select_torch(x, float(bar))
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(kept_np, kept_torch))
    assert len(kept_np[0]) >= 3 * rows
    for key in ("count", "max_abs"):
        assert stats_np[key].dtype == stats_torch[key].dtype
        np.testing.assert_array_equal(stats_np[key], stats_torch[key])
    for key in ("sum", "sum_sq"):
        np.testing.assert_allclose(stats_np[key], stats_torch[key], rtol=1e-12, atol=1e-12)
    first = [column.clone() for column in kept_np]
    selector(list((x * 2).to(torch.bfloat16)))  # the buffers are reused: nothing kept may change
    assert all(torch.equal(a, b) for a, b in zip(kept_np, first))
