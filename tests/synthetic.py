"""Synthetic runs for tests: activations with planted outlier dims, written as a run dir.

`random_activations` gives `# [layers, sites, seqs, seq_len, hidden]` values that are exact
in float16, so dense files of either float width hold the same numbers. `write_run` writes
them in the layout extraction produces (a run record and hive-partitioned tables: Arrow IPC dense or Parquet
exceedances), and `reference_per_dim` is the brute-force answer to compare against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from analysis.criteria import Criteria
from common.layout import RunLayout
from common.storage import EXCEEDANCES, STATS
from common.record import RunRecord, write_record

SITES = ("ln_attn", "ln_mlp")


def random_activations(
    rng, num_layers=4, num_seqs=3, seq_len=8, hidden=16, spike_density=0.02, spike_scale=12.0
):
    """Unit-normal noise with sparse large spikes; values rounded to the float16 grid."""
    shape = (num_layers, len(SITES), num_seqs, seq_len, hidden)
    acts = rng.standard_normal(shape).astype(np.float32)  # [layers, sites, seqs, seq_len, hidden]
    spikes = rng.random(shape) < spike_density
    acts[spikes] = rng.uniform(-spike_scale, spike_scale, size=int(spikes.sum()))
    return acts.astype(np.float16).astype(np.float32)


def plant(acts, dim, layers, token_share, value=20.0, rng=None):
    """Set `dim` to `value` at both sites of `layers` in a `token_share` of the (seq, pos)
    slots: the first ones, or random ones when `rng` is given."""
    _, _, num_seqs, seq_len, _ = acts.shape
    flat = np.zeros(num_seqs * seq_len, dtype=bool)
    flat[: int(round(token_share * flat.size))] = True
    if rng is not None:
        rng.shuffle(flat)
    hit = flat.reshape(num_seqs, seq_len)  # [seqs, seq_len]
    for layer in layers:
        acts[layer, :, :, :, dim][:, hit] = value
    return acts


def full_mask(acts):
    """Every token is real (no padding): `# [seqs, seq_len]`."""
    return np.ones(acts.shape[2:4], dtype=bool)


def write_run(
    root,
    acts,
    mask=None,
    *,
    storage="dense",
    floor=None,
    parts=2,
    float16_parts=(),
    analysis=None,
    seq_len=True,
):
    """Write `acts` (rows where `mask`) as a run directory at `root`; returns its Path.

    float16_parts: indices of the dense part files stored as float16 (the rest float32).
    seq_len=False leaves `data.seq_len` out of the config.
    """
    root = Path(root)
    layout = RunLayout.of(str(root))
    mask = full_mask(acts) if mask is None else mask
    num_layers, _, _, length, hidden = acts.shape
    seqs, poss = np.nonzero(mask)  # the non-padding tokens, in (seq, pos) order
    for layer in range(num_layers):
        by_site = {site: acts[layer, s][mask] for s, site in enumerate(SITES)}  # [tokens, hidden] each
        if storage != "dense":
            _write_exceedances(layout, layer, seqs, poss, by_site, parts, floor)
            continue
        for site, rows in by_site.items():
            _write_dense(layout, layer, site, seqs, poss, rows, parts, float16_parts)
    config = {"data": {"seq_len": int(length)} if seq_len else {}, "analysis": analysis or {}}
    write_record(layout, RunRecord(
        num_layers=int(num_layers), hidden_size=int(hidden), tokens=int(mask.sum()), storage_mode=storage,
        floor=None if storage == "dense" else float(floor), config=config))
    return root


def _write_dense(layout, layer, site, seqs, poss, rows, parts, float16_parts):
    folder = Path(layout.dense_partition(layer, site))
    folder.mkdir(parents=True, exist_ok=True)
    hidden = rows.shape[1]
    for i, chunk in enumerate(np.array_split(np.arange(len(rows)), parts)):
        dtype = np.float16 if i in float16_parts else np.float32
        values = pa.array(rows[chunk].astype(dtype).reshape(-1))
        table = pa.table(
            {
                "seq": pa.array(seqs[chunk], pa.int64()),
                "pos": pa.array(poss[chunk], pa.int32()),
                "token_id": pa.array((seqs[chunk] * 31 + poss[chunk]) % 1000, pa.int32()),
                "act": pa.FixedSizeListArray.from_arrays(values, hidden),
            }
        )
        feather.write_feather(table, layout.dense(layer, site, i), compression="uncompressed")


def _write_exceedances(layout, layer, seqs, poss, by_site, parts, floor):
    """The writer's layout with one stage per layer: each file holds every site of the layer,
    for one `parts`-th of the tokens (as a micro-batch would)."""
    for i, chunk in enumerate(np.array_split(np.arange(len(seqs)), parts)):
        kept, stats = [], []
        for site, all_rows in by_site.items():
            rows = all_rows[chunk]  # [tokens, hidden]
            kept_rows, dims = np.nonzero(np.abs(rows) >= floor)
            tags = lambda n: {"layer": pa.array([layer] * n, pa.int32()), "site": pa.array([site] * n, pa.string())}  # noqa: E731,B023
            kept.append(pa.table({
                **tags(len(kept_rows)),
                "seq": pa.array(seqs[chunk][kept_rows], pa.int64()),
                "pos": pa.array(poss[chunk][kept_rows], pa.int32()),
                "dim": pa.array(dims, pa.int32()),
                "value": pa.array(rows[kept_rows, dims], pa.float32()),
            }))
            wide = rows.astype(np.float64)  # [tokens, hidden]
            stats.append(pa.table({
                **tags(rows.shape[1]),
                "dim": pa.array(np.arange(rows.shape[1]), pa.int32()),
                "count": pa.array((np.abs(rows) >= floor).sum(axis=0), pa.int64()),
                "max_abs": pa.array(np.abs(wide).max(axis=0) if len(rows) else np.zeros(rows.shape[1]), pa.float64()),
                "sum": pa.array(wide.sum(axis=0), pa.float64()),
                "sum_sq": pa.array((wide**2).sum(axis=0), pa.float64()),
            }))
        for kind, tables in ((EXCEEDANCES, kept), (STATS, stats)):
            path = Path(layout.stage_table(kind, range(layer, layer + 1), i))
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.concat_tables(tables), path)


def reference_per_dim(acts, mask, threshold, seq_len=None):
    """Brute force: per dim, the statistics of `analysis.criteria.feature_stats`, as dicts."""
    num_layers, num_sites, _, length, hidden = acts.shape
    seq_len = seq_len or length
    tokens = int(mask.sum())
    entries = np.argwhere(np.broadcast_to(mask, (num_layers, num_sites) + mask.shape))  # [n, 4]
    result = {}
    for dim in range(hidden):
        layers, sites, hit_tokens, positions, occurrences = set(), set(), set(), set(), 0
        max_abs = 0.0
        for layer, site, seq, pos in entries.tolist():
            x = abs(float(acts[layer, site, seq, pos, dim]))
            max_abs = max(max_abs, x)
            if x >= threshold:
                layers.add(layer)
                sites.add((layer, site))
                hit_tokens.add((seq, pos))
                positions.add(pos)
                occurrences += 1
        result[dim] = {
            "dim": dim,
            "max_abs": max_abs,
            "layers": sorted(layers),
            "layer_fraction": len(layers) / num_layers,
            "site_fraction": len(sites) / (num_sites * num_layers),
            "token_fraction": len(hit_tokens) / tokens,
            "position_fraction": len(positions) / seq_len,
            "occurrences": occurrences,
        }
    return result


def reference_outliers(per_dim, criteria=None):
    """Brute force: {dim: classification} for the dims meeting `criteria` (a Criteria)."""
    c = criteria or Criteria()
    found = {}
    for dim, row in per_dim.items():
        share, tokens = row[f"{c.layer_unit}_fraction"], row["token_fraction"]
        big = row["max_abs"] >= c.threshold
        if big and share >= c.min_layer_fraction and tokens >= c.min_token_fraction:
            systematic = (
                share >= c.systematic_layer_fraction and tokens >= c.systematic_token_fraction
            )
            found[dim] = "systematic" if systematic else "probabilistic"
    return found


def scan_tables(acts, mask, threshold):
    """What a scan should find, built straight from the arrays: (exceedances, stats).

    exceedances: layer, site, seq, pos, dim, value for |value| >= threshold (compared in
    float64); stats: layer, site, dim, max_abs, count.
    """
    valid = acts[:, :, mask]  # [layers, sites, tokens, hidden]
    magnitude = np.abs(valid).astype(np.float64)
    seqs, poss = np.nonzero(mask)
    layer, site, token, dim = np.nonzero(magnitude >= threshold)
    exceedances = pl.DataFrame(
        {
            "layer": layer,
            "site": np.array(SITES)[site],
            "seq": seqs[token],
            "pos": poss[token],
            "dim": dim,
            "value": valid[layer, site, token, dim],
        }
    )
    num_layers, num_sites, _, hidden = valid.shape
    grid = np.indices((num_layers, num_sites, hidden)).reshape(3, -1)  # [3, layers*sites*hidden]
    stats = pl.DataFrame(
        {
            "layer": grid[0],
            "site": np.array(SITES)[grid[1]],
            "dim": grid[2],
            "max_abs": magnitude.max(axis=2).reshape(-1),
            "count": (magnitude >= threshold).sum(axis=2).reshape(-1),
        }
    )
    return exceedances, stats
