"""Read a run's captured activations into the two tables the criteria work on.

A run directory (a local path or a pyarrow filesystem URI such as s3://bucket/run) holds
`run.json` and, per (layer, site), either dense activations or stored exceedances:

    activations/layer=<L>/site=<S>/<part>.parquet   seq, pos, token_id, act[hidden]
    exceedances/layers=<a>-<b>/<part>.parquet       layer, site, seq, pos, dim, value  (|value| >= floor)
    stats/layers=<a>-<b>/<part>.parquet             layer, site, dim, count, max_abs, sum, sum_sq

`Scanner.scan` turns either layout into the same `Partial`: the exceedance table
(layer, site, seq, pos, dim, value) at |value| >= threshold, and the stats table
(layer, site, dim, max_abs, count). Dense runs are split among scanners by partition;
stored runs, whose files each hold every layer-site of a stage, by file (`share`).
No Ray here: `analysis/__init__.py` wraps it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow.fs as pafs

from actors.storage import float32_bar, resolve

LAYOUTS = {"dense": "activations", "exceedances": "stats"}  # storage_mode -> dir naming partitions
PARTITION = re.compile(r"layer=(\d+)/site=([^/]+)$")

EXCEEDANCE_SCHEMA = {
    "layer": pl.Int32,
    "site": pl.String,
    "seq": pl.Int64,
    "pos": pl.Int32,
    "dim": pl.Int32,
    "value": pl.Float32,
}
STATS_SCHEMA = {
    "layer": pl.Int32,
    "site": pl.String,
    "dim": pl.Int32,
    "max_abs": pl.Float64,
    "count": pl.Int64,  # entries with |x| >= threshold
}


class RunError(Exception):
    """A run directory that cannot be analysed; the message names the problem and the fix."""


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


def read_run(run_dir: str | os.PathLike) -> dict:
    """The run's `run.json`, checked for the keys the analysis needs."""
    fs, root = resolve(os.fspath(run_dir))
    path = f"{root}/run.json"
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise RunError(
            f"{run_dir}: no run.json. Pass the directory an extraction run wrote "
            "(it holds run.json and activations/ or exceedances/)."
        )
    with fs.open_input_stream(path) as stream:
        try:
            info = json.loads(stream.read())
        except json.JSONDecodeError as err:
            raise RunError(f"{path}: not valid JSON ({err}); re-run extraction.") from None
    missing = [k for k in ("num_layers", "hidden_size", "tokens") if k not in info]
    mode = info.setdefault("storage_mode", "dense")
    if missing:
        raise RunError(f"{path}: lacks {missing}; the run did not finish. Re-run extraction.")
    if mode not in LAYOUTS:
        raise RunError(f"{path}: storage_mode={mode!r}; analysis reads one of {sorted(LAYOUTS)}.")
    if mode == "exceedances" and info.get("floor") is None:
        raise RunError(f"{path}: storage_mode='exceedances' needs 'floor'; re-run extraction.")
    return info


def seq_len(info: dict) -> int | None:
    """The sequence length from the run config (`data.seq_len`), if recorded."""
    return ((info.get("config") or {}).get("data") or {}).get("seq_len") or info.get("seq_len")


def list_partitions(run_dir: str | os.PathLike, info: dict) -> list[tuple[int, str]]:
    """The (layer, site) partitions present on disk, sorted."""
    fs, root = resolve(os.fspath(run_dir))
    base = f"{root}/{LAYOUTS[info['storage_mode']]}"
    if info["storage_mode"] == "dense":
        # Two shallow listings, not one recursive one: a run can hold a file per micro-batch.
        parts = {
            (int(match[1]), match[2])
            for layer_dir in _subdirs(fs, base)
            for site_dir in _subdirs(fs, layer_dir)
            if (match := PARTITION.search(site_dir))
        }
    else:
        # NOTE: a stage writes all of its layer-sites into every file of its folder: one
        # readable file per folder names them all.
        parts = set().union(*(_stored_partitions(fs, stored_files(fs, base, folder))
                              for folder in _subdirs(fs, base)))
    if not parts:
        raise RunError(
            f"{base}: no (layer, site) partitions, so nothing was captured. Re-run extraction."
        )
    return sorted(parts)


def stored_files(fs: pafs.FileSystem, base: str, *folders: str) -> list[str]:
    """The .parquet files in `folders`, or in every stage folder (`layers=<a>-<b>`) under `base`."""
    return sorted(
        e.path
        for folder in folders or _subdirs(fs, base)
        for e in fs.get_file_info(pafs.FileSelector(folder))
        if e.type == pafs.FileType.File and e.path.endswith(".parquet")
    )


def _stored_partitions(fs: pafs.FileSystem, paths: list[str]) -> set[tuple[int, str]]:
    """The (layer, site) pairs in the first readable stats file; unreadable ones are left to the scan."""
    for path in paths:
        try:
            with fs.open_input_file(path) as handle:
                keys = pl.read_parquet(handle, columns=["layer", "site"]).unique()
        except (Exception, pl.exceptions.PanicException):  # reported, or skipped, by Scanner
            continue
        return set(zip(keys["layer"].to_list(), keys["site"].to_list()))
    return set()


def _subdirs(fs: pafs.FileSystem, path: str) -> list[str]:
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [e.path for e in entries if e.type == pafs.FileType.Directory]


def check_complete(partitions: list[tuple[int, str]], num_layers: int, allow_partial: bool) -> None:
    """Fail (or warn, with allow_partial) when a layer lacks a site the others have."""
    sites = sorted({site for _, site in partitions})
    missing = sorted({(layer, s) for layer in range(num_layers) for s in sites} - set(partitions))
    if not missing:
        return
    shown = f"{missing[:6]}{' ...' if len(missing) > 6 else ''}"
    message = f"run lacks partitions {shown} of {num_layers} layers x {sites}"
    if not allow_partial:
        raise RunError(
            f"{message}. Re-run extraction, or pass --allow-partial to analyse what is there."
        )
    warnings.warn(f"{message}; analysing the rest", stacklevel=2)


class Scanner:
    """Reads (layer, site) partitions of one run and keeps what exceeds `threshold`.

    One verb, `scan`, so a Ray actor can wrap the class unchanged.
    """

    def __init__(self, run_dir: str, threshold: float, allow_partial: bool = False):
        self.run_dir = run_dir
        self.fs, self.root = resolve(os.fspath(run_dir))
        self.info = read_run(run_dir)
        self.threshold = float(threshold)
        self.bar = float32_bar(self.threshold)
        self.allow_partial = allow_partial
        self.skipped: list[str] = []
        floor = self.info.get("floor")
        if self.info["storage_mode"] == "exceedances" and self.threshold < floor:
            raise ValueError(
                f"analysis.threshold={threshold}: below the run's storage floor {floor}, so "
                f"smaller entries were never stored. Use threshold >= {floor}, or re-extract "
                "with a lower floor."
            )

    def scan(self, partitions: list[tuple[int, str]], share: tuple[int, int] = (0, 1)) -> Partial:
        """What `partitions` hold; of a stored run, only every share[1]-th file from share[0]."""
        self.skipped = []
        if self.info["storage_mode"] != "dense":
            return self._stored(partitions, share)
        pieces = [self._dense(layer, site) for layer, site in partitions]
        return Partial(
            exceedances=_concat([p[0] for p in pieces], EXCEEDANCE_SCHEMA),
            stats=_concat([p[1] for p in pieces], STATS_SCHEMA),
            skipped=list(self.skipped),
        )

    # -- dense: find exceedances and per-dim maxima in the full activations --

    def _dense(self, layer: int, site: str) -> tuple[pl.DataFrame, pl.DataFrame]:
        hidden = self.info["hidden_size"]
        max_abs = np.zeros(hidden, dtype=np.float32)
        count = np.zeros(hidden, dtype=np.int64)
        found = [
            self._exceeding(path, table, max_abs, count)
            for path in self._files(layer, site)
            if (table := self._read(path, ["seq", "pos", "act"])) is not None
        ]
        stats = pl.DataFrame(
            {"dim": np.arange(hidden, dtype=np.int32), "max_abs": max_abs, "count": count}
        )
        return _tag(found, layer, site, EXCEEDANCE_SCHEMA), _tag([stats], layer, site, STATS_SCHEMA)

    def _exceeding(self, path: str, table: pl.DataFrame, max_abs, count) -> pl.DataFrame:
        """One file's entries with |x| >= threshold; folds its per-dim max and count in."""
        hidden = len(max_abs)
        # NOTE: float16 and float32 files may share a partition; both widen exactly.
        act = np.asarray(table["act"].to_numpy(), dtype=np.float32)  # [rows, hidden]
        if act.ndim != 2 or act.shape[1] != hidden:
            raise RunError(
                f"{path}: act has shape {act.shape}, but run.json says hidden_size={hidden}. "
                "Re-run extraction."
            )
        magnitude = np.abs(act)  # [rows, hidden]
        if len(act):
            np.maximum(max_abs, magnitude.max(axis=0), out=max_abs)
        hit = magnitude >= self.bar  # [rows, hidden]
        count += hit.sum(axis=0)
        rows, dims = np.nonzero(hit)
        return pl.DataFrame(
            {
                "seq": table["seq"].to_numpy()[rows],
                "pos": table["pos"].to_numpy()[rows],
                "dim": dims.astype(np.int32),
                "value": act[rows, dims],
            }
        )

    # -- exceedances: read back what extraction stored, at a threshold >= floor --

    def _stored(self, partitions: list[tuple[int, str]], share: tuple[int, int]) -> Partial:
        first, step = share
        wanted = _among(partitions)
        kept = wanted & (pl.col("value").abs().cast(pl.Float64) >= self.threshold)

        def read(kind: str, columns: list[str], schema: dict) -> pl.DataFrame:
            paths = stored_files(self.fs, f"{self.root}/{kind}")[first::step]
            chosen = kept if kind == "exceedances" else wanted
            return _concat([t.filter(chosen).cast(schema) for t in self._read_all(paths, columns)], schema)

        exceedances = read("exceedances", list(EXCEEDANCE_SCHEMA), EXCEEDANCE_SCHEMA)
        magnitude = {k: STATS_SCHEMA[k] for k in ("layer", "site", "dim", "max_abs")}
        # Stored counts are at the floor; the count at this threshold comes from the exceedances.
        count = exceedances.group_by("layer", "site", "dim").agg(count=pl.len())
        stats = (
            read("stats", list(magnitude), magnitude)
            .group_by("layer", "site", "dim")
            .agg(pl.col("max_abs").max())
            .join(count, on=["layer", "site", "dim"], how="left")
            .with_columns(pl.col("count").fill_null(0))
            .select(STATS_SCHEMA.keys())
            .cast(STATS_SCHEMA)
            .sort("layer", "site", "dim")
        )
        return Partial(exceedances, stats, list(self.skipped))

    # -- files --

    def _files(self, layer: int, site: str) -> list[str]:
        """The dense files of one partition; there must be some."""
        base = f"{self.root}/activations/layer={layer}/site={site}"
        entries = self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        paths = sorted(
            e.path for e in entries if e.type == pafs.FileType.File and e.path.endswith(".parquet")
        )
        if not paths:
            raise RunError(
                f"{base}: no .parquet files. Re-run extraction for layer {layer} site {site}."
            )
        return paths

    def _read_all(self, paths: list[str], columns: list[str]) -> list[pl.DataFrame]:
        """Local files in one call (Polars reads them in parallel); file by file, to name or
        skip an unreadable one, when that fails or the files are remote."""
        if paths and isinstance(self.fs, pafs.LocalFileSystem):
            try:
                return [pl.read_parquet(paths, columns=columns, hive_partitioning=False)]
            except (Exception, pl.exceptions.PanicException):
                pass
        return [t for path in paths if (t := self._read(path, columns)) is not None]

    def _read(self, path: str, columns: list[str]) -> pl.DataFrame | None:
        """One Parquet file, or None when it is unreadable and allow_partial skips it."""
        try:
            if isinstance(self.fs, pafs.LocalFileSystem):
                return pl.read_parquet(path, columns=columns, hive_partitioning=False)
            with self.fs.open_input_file(path) as handle:
                return pl.read_parquet(handle, columns=columns, hive_partitioning=False)
        # NOTE: Polars reports some corrupt files as PanicException, a BaseException.
        except (Exception, pl.exceptions.PanicException) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if not self.allow_partial:
                raise RunError(
                    f"{path}: unreadable Parquet ({reason}). Re-run extraction for this "
                    "partition, or pass --allow-partial to skip the file."
                ) from None
            warnings.warn(f"skipping unreadable {path} ({reason})", stacklevel=2)
            self.skipped.append(path)
            return None


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


def _tag(tables: list[pl.DataFrame], layer: int, site: str, schema: dict) -> pl.DataFrame:
    """Concatenate one partition's tables and add its layer and site columns."""
    if not tables:
        return pl.DataFrame(schema=schema)
    columns = [t.select(c for c in schema if c in t.columns) for t in tables]
    return (
        pl.concat(columns, how="vertical_relaxed")
        .with_columns(layer=pl.lit(layer), site=pl.lit(site))
        .select(schema.keys())
        .cast(schema)
    )
