"""Read a run's captured activations into the two tables the criteria work on.

A run (common.layout) holds, per (layer, site), either dense activations or, per stage and
micro-batch, stored exceedances with per-dim statistics (the storage modes and their columns:
common/storage.py).

`Scanner.scan` turns either mode into the same `Partial`: the exceedance table
(layer, site, seq, pos, dim, value) at |value| >= threshold, and the stats table
(layer, site, dim, max_abs, count). Dense runs are split among scanners by partition;
stored runs, whose files each hold every layer-site of a stage, by file (`share`).
No Ray here: `analysis.analyse` wraps it.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs

from common import patch, storage
from common.errors import ConfigError, RunError
from common.layout import RunLayout
from common.storage import EXCEEDANCES, STATS
from common.record import RunRecord
from common.threshold import exceeding

log = logging.getLogger(__name__)

EXCEEDANCE_SCHEMA = dict(pl.from_arrow(storage.SCHEMAS[EXCEEDANCES].empty_table()).schema)
DENSE_COLUMNS = ["seq", "pos", "act"]  # of storage.dense_schema: what the criteria need
STATS_SCHEMA = {  # a Partial's, not the stored table's: the count is at the scan's threshold
    "layer": pl.Int32,
    "site": pl.String,
    "dim": pl.Int32,
    "max_abs": pl.Float64,
    "count": pl.Int64,  # entries with |x| >= threshold
}


@dataclass
class Partial:
    """What a scan of some (layer, site) partitions found; partials merge by concatenation."""

    exceedances: pl.DataFrame  # one row per entry with |value| >= threshold
    stats: pl.DataFrame  # one row per (layer, site, dim)
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (allow_partial)

    @classmethod
    def merge(cls, partials: list["Partial"]) -> "Partial":
        """One Partial; stats rows of the same (layer, site, dim) from different shares of
        files combine (max of max_abs, sum of count)."""
        stats = _concat([p.stats for p in partials], STATS_SCHEMA)
        if len(partials) > 1:
            stats = (stats.group_by("layer", "site", "dim")
                     .agg(pl.col("max_abs").max(), pl.col("count").sum())
                     .select(STATS_SCHEMA.keys()).cast(STATS_SCHEMA).sort("layer", "site", "dim"))
        return cls(
            exceedances=_concat([p.exceedances for p in partials], EXCEEDANCE_SCHEMA),
            stats=stats,
            skipped=sorted(path for p in partials for path in p.skipped),
        )


def _concat(tables: list[pl.DataFrame], schema: dict) -> pl.DataFrame:
    return pl.concat(tables) if tables else pl.DataFrame(schema=schema)


def list_partitions(layout: RunLayout, record: RunRecord) -> list[tuple[int, str]]:
    """The (layer, site) partitions present on disk, sorted."""
    if storage.is_dense(record.storage_mode):
        parts = set(layout.dense_partitions())
    else:
        # NOTE: a stage writes all of its layer-sites into every file of its folder: one
        # readable stats file per folder names them all.
        parts = set().union(*(_stored_partitions(layout, layout.stage_files(STATS, folder))
                              for folder in layout.stage_folders(STATS)))
    if not parts:
        raise RunError(f"{layout.uri}: no (layer, site) tables, so nothing was captured. Re-run extraction.")
    return sorted(parts)


def _stored_partitions(layout: RunLayout, paths: list[str]) -> set[tuple[int, str]]:
    """The (layer, site) pairs in the first readable stats file; unreadable ones are left to the scan."""
    for path in paths:
        try:
            with layout.fs.open_input_file(path) as handle:
                keys = pl.read_parquet(handle, columns=["layer", "site"]).unique()
        except (Exception, pl.exceptions.PanicException):  # reported, or skipped, by Scanner
            continue
        return set(zip(keys["layer"].to_list(), keys["site"].to_list()))
    return set()


def check_complete(partitions: list[tuple[int, str]], num_layers: int, allow_partial: bool) -> None:
    """Fail (or warn, with allow_partial) when a layer lacks a site the others have."""
    sites = sorted({site for _, site in partitions})
    missing = sorted({(layer, s) for layer in range(num_layers) for s in sites} - set(partitions))
    if not missing:
        return
    shown = f"{missing[:6]}{' ...' if len(missing) > 6 else ''}"
    message = f"run lacks partitions {shown} of {num_layers} layers x {sites}"
    if not allow_partial:
        raise RunError(f"{message}. Re-run extraction, or pass --allow-partial to analyse what is there.")
    log.warning("%s; analysing the rest", message)


class Scanner:
    """Reads (layer, site) partitions of one run and keeps what exceeds `threshold`.

    One verb, `scan`, so a Ray actor can wrap the class unchanged.
    """

    def __init__(self, layout: RunLayout, record: RunRecord, threshold: float, allow_partial: bool = False):
        self.layout = layout
        self.record = record
        self.threshold = float(threshold)
        self.allow_partial = allow_partial
        self.skipped: list[str] = []
        if not storage.is_dense(record.storage_mode) and self.threshold < record.floor:
            raise ConfigError(
                f"analysis.threshold={threshold}: below the run's storage floor {record.floor}, so "
                f"smaller entries were never stored. Use threshold >= {record.floor}, or re-extract "
                "with a lower floor."
            )

    def scan(self, partitions: list[tuple[int, str]], share: tuple[int, int] = (0, 1)) -> Partial:
        """What `partitions` hold; of a stored run, only every share[1]-th file from share[0]."""
        self.skipped = []
        if not storage.is_dense(self.record.storage_mode):
            return self._stored(partitions, share)
        # NOTE: numpy and pyarrow release the GIL, so the partitions are read in threads, one per core.
        with ThreadPoolExecutor(max(1, min(len(partitions), os.cpu_count() or 1))) as pool:
            pieces = list(pool.map(lambda key: self._dense(*key), partitions))
        return Partial(
            exceedances=_concat([p[0] for p in pieces], EXCEEDANCE_SCHEMA),
            stats=_concat([p[1] for p in pieces], STATS_SCHEMA),
            skipped=sorted(self.skipped),
        )

    # -- dense: find exceedances and per-dim maxima in the full activations --

    def _dense(self, layer: int, site: str) -> tuple[pl.DataFrame, pl.DataFrame]:
        hidden = self.record.hidden_size
        max_abs = np.zeros(hidden, dtype=np.float32)
        count = np.zeros(hidden, dtype=np.int64)
        paths = self.layout.partition_files(layer, site)
        if not paths:
            raise RunError(f"{self.layout.dense_partition(layer, site)}: no tables. Re-run extraction "
                           f"for layer {layer} site {site}.")
        found = [
            self._exceeding(path, table, max_abs, count)
            for path in paths
            if (table := self._read(path, DENSE_COLUMNS, read_dense)) is not None
        ]
        # NOTE: one frame per partition from numpy, not a Polars concat of a frame per file (5x).
        entries = {name: np.concatenate([f[name] for f in found]) if found else np.zeros(0)
                   for name in ("seq", "pos", "dim", "value")}
        stats = {"dim": np.arange(hidden), "max_abs": max_abs, "count": count}
        return _frame(entries, layer, site, EXCEEDANCE_SCHEMA), _frame(stats, layer, site, STATS_SCHEMA)

    def _exceeding(self, path: str, table: dict, max_abs, count) -> dict[str, np.ndarray]:
        """One file's entries with |x| >= threshold; folds its per-dim max and count in."""
        hidden = len(max_abs)
        # NOTE: float16 and float32 files may share a partition; both compare and widen exactly.
        act = table["act"]  # [rows, hidden]
        if act.ndim != 2 or act.shape[1] != hidden:
            raise RunError(
                f"{path}: act has shape {act.shape}, but the run record says hidden_size={hidden}. "
                "Re-run extraction."
            )
        peak, rows, dims = exceeding(act, self.threshold)
        np.maximum(max_abs, peak, out=max_abs)
        count += np.bincount(dims, minlength=hidden)
        return {"seq": table["seq"][rows], "pos": table["pos"][rows], "dim": dims,
                "value": act[rows, dims].astype(np.float32)}

    # -- exceedances: read back what extraction stored, at a threshold >= floor --

    def _stored(self, partitions: list[tuple[int, str]], share: tuple[int, int]) -> Partial:
        first, step = share
        among = _among(partitions)
        kept = among & (pl.col("value").abs().cast(pl.Float64) >= self.threshold)

        def read(kind: str, columns: list[str], schema: dict) -> pl.DataFrame:
            paths = self.layout.stage_files(kind)[first::step]
            chosen = kept if kind == EXCEEDANCES else among
            return _concat([t.filter(chosen).cast(schema) for t in self._read_all(paths, columns)], schema)

        exceedances = read(EXCEEDANCES, list(EXCEEDANCE_SCHEMA), EXCEEDANCE_SCHEMA)
        magnitude = {k: STATS_SCHEMA[k] for k in ("layer", "site", "dim", "max_abs")}
        # Stored counts are at the floor; the count at this threshold comes from the exceedances.
        # NOTE: one lazy plan for the stats: Polars fuses the cast, grouping and join (25% less).
        count = exceedances.lazy().group_by("layer", "site", "dim").agg(count=pl.len())
        stats = (
            read(STATS, list(magnitude), magnitude)
            .lazy()
            .group_by("layer", "site", "dim")
            .agg(pl.col("max_abs").max())
            .join(count, on=["layer", "site", "dim"], how="left")
            .with_columns(pl.col("count").fill_null(0))
            .select(STATS_SCHEMA.keys())
            .cast(STATS_SCHEMA)
            .sort("layer", "site", "dim")
            .collect()
        )
        return Partial(exceedances, stats, list(self.skipped))

    # -- files --

    def _read_all(self, paths: list[str], columns: list[str]) -> list[pl.DataFrame]:
        """Local files in one call (Polars reads them in parallel); file by file, to name or
        skip an unreadable one, when that fails or the files are remote."""
        if paths and isinstance(self.layout.fs, pafs.LocalFileSystem):
            try:
                return [pl.read_parquet(paths, columns=columns, hive_partitioning=False)]
            except (Exception, pl.exceptions.PanicException):
                pass
        return [t for path in paths if (t := self._read(path, columns)) is not None]

    def _read(self, path: str, columns: list[str], reader=None):
        """One table file (`reader`, default read_frame), or None when it is unreadable and
        allow_partial skips it."""
        try:
            return (reader or read_frame)(self.layout.fs, path, columns)
        # NOTE: Polars reports some corrupt files as PanicException, a BaseException.
        except (Exception, pl.exceptions.PanicException) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if not self.allow_partial:
                raise RunError(
                    f"{path}: unreadable table ({reason}). Re-run extraction for this "
                    "partition, or pass --allow-partial to skip the file."
                ) from None
            log.warning("skipping unreadable %s (%s)", path, reason)
            self.skipped.append(path)
            return None


def read_dense(fs: pafs.FileSystem, path: str, columns: list[str]) -> dict[str, np.ndarray]:
    """`columns` of one dense table (Arrow IPC) as numpy arrays, `act` as [rows, hidden] in its
    stored dtype (float32 where the file has a patch, applied: common.patch): no conversion
    on the way otherwise, 10x faster than a DataFrame of fixed-size lists."""
    # NOTE: the whole file in one read, then parsed from memory: the IPC reader's many small
    # reads of an open file cost 5x more. The arrays view that memory and outlive the handle.
    with fs.open_input_file(path) as handle:
        table = pa.ipc.open_file(handle.read_buffer()).read_all()
    metadata, table = table.schema.metadata, table.select(columns)
    out = {}
    for name in columns:
        chunks = table.column(name)
        column = chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()  # no copy of one
        if isinstance(column, pa.FixedSizeListArray):
            if column.null_count:
                raise ValueError(f"{name} has {column.null_count} null rows")
            size = column.type.list_size
            values = column.values.slice(column.offset * size, len(column) * size)  # [rows * hidden]
            out[name] = _numpy(values).reshape(len(column), size)
            if name == "act":
                out[name] = patch.apply(out[name], metadata)
        else:
            out[name] = _numpy(column)
    return out


def _numpy(array: pa.Array) -> np.ndarray:
    """A primitive Arrow array's values as numpy, without a copy when it has no nulls.

    NOTE: `Array.to_numpy` imports pandas on first use (0.4-0.6 s); the buffer view does not.
    """
    if array.null_count or not pa.types.is_primitive(array.type) or pa.types.is_boolean(array.type):
        return array.to_numpy(zero_copy_only=False)
    dtype = np.dtype(array.type.to_pandas_dtype())
    return np.frombuffer(array.buffers()[1], dtype, len(array), array.offset * dtype.itemsize)


def read_frame(fs: pafs.FileSystem, path: str, columns: list[str] | None = None) -> pl.DataFrame:
    """One table file of a run: Arrow IPC (dense tables, memory-mapped when local) or Parquet."""
    read = pl.read_ipc if path.endswith(".arrow") else partial(pl.read_parquet, hive_partitioning=False)
    if isinstance(fs, pafs.LocalFileSystem):
        return read(path, columns=columns)
    with fs.open_input_file(path) as handle:
        return read(handle, columns=columns)


def read_kind(layout: RunLayout, kind: str, columns: list[str] | None = None) -> pl.DataFrame | None:
    """Every table of a stage kind (routing, experts, ...) as one frame; None if the run has none."""
    paths = layout.stage_files(kind)
    if not paths:
        return None
    if isinstance(layout.fs, pafs.LocalFileSystem):
        return pl.read_parquet(paths, columns=columns, hive_partitioning=False)
    frames = []
    for path in paths:
        with layout.fs.open_input_file(path) as handle:
            frames.append(pl.read_parquet(handle, columns=columns, hive_partitioning=False))
    return pl.concat(frames)


def _among(partitions: list[tuple[int, str]]) -> pl.Expr:
    """Rows whose (layer, site) is one of `partitions` (a filter, not a join on a string key)."""
    layers: dict[str, list[int]] = {}
    for layer, site in partitions:
        layers.setdefault(site, []).append(layer)
    if not layers:
        return pl.lit(False)
    return pl.any_horizontal(
        [(pl.col("site") == site) & pl.col("layer").is_in(ls) for site, ls in layers.items()]
    )


def _frame(columns: dict[str, np.ndarray], layer: int, site: str, schema: dict) -> pl.DataFrame:
    """One partition's columns with its layer and site, in `schema`'s order and types."""
    return (
        pl.DataFrame(columns)
        .with_columns(layer=pl.lit(layer), site=pl.lit(site))
        .select(schema.keys())
        .cast(schema)
    )
