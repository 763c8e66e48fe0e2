"""Where run files live: a local path or any pyarrow filesystem URI (s3://, gs://, ...).

Every file is written to a temporary name beside its target and then moved into
place, so a reader never sees half a file and a crash leaves only ignorable
`.tmp-*` debris.
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def float32_bar(threshold: float) -> np.float32:
    """The least float32 >= threshold: a stored float32 x has x >= bar exactly when x >= threshold.

    NOTE: numpy and torch compare float32 values with a Python float in float32, which would
    round a threshold such as 5.99 down and admit values below it. The exceedance writer
    (floor) and the scanner (threshold) both compare through this.
    """
    bar = np.float32(threshold)
    return bar if float(bar) >= threshold else np.nextafter(bar, np.float32(np.inf))


def absolute(uri: str) -> str:
    """A run directory as an absolute path, or the URI unchanged."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path inside it) for a run directory given as path or URI."""
    return pafs.FileSystem.from_uri(absolute(uri))


def _temp_beside(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}.tmp-{uuid.uuid4().hex[:8]}"


def _commit(fs: pafs.FileSystem, temp: str, path: str) -> None:
    fs.move(temp, path)  # local: rename(2), atomic; object stores: the object appears whole


def write_table(fs: pafs.FileSystem, path: str, table: pa.Table, **options) -> int:
    """Write `table` as Parquet at `path` atomically; returns the bytes written.

    `options` go to `pyarrow.parquet.write_table` (e.g. use_dictionary, write_statistics).
    """
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    temp = _temp_beside(path)
    pq.write_table(table, temp, filesystem=fs, **options)
    size = fs.get_file_info(temp).size
    _commit(fs, temp, path)
    return size


def write_json(fs: pafs.FileSystem, path: str, obj) -> None:
    """Write `obj` as indented JSON at `path` atomically."""
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    temp = _temp_beside(path)
    with fs.open_output_stream(temp) as out:
        out.write(json.dumps(obj, indent=2, sort_keys=False, default=str).encode())
    _commit(fs, temp, path)


def read_json(fs: pafs.FileSystem, path: str):
    with fs.open_input_stream(path) as src:
        return json.loads(src.read().decode())


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def remove_debris(fs: pafs.FileSystem, root: str) -> int:
    """Delete `.*.tmp-*` files an interrupted run left behind; returns how many."""
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    debris = [
        info.path for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File and info.base_name.startswith(".") and ".tmp-" in info.base_name
    ]
    for path in debris:
        fs.delete_file(path)
    return len(debris)


def batch_file(index: int) -> str:
    """The file name of micro-batch `index`: one name, so a re-run overwrites, never duplicates."""
    return f"mb-{index:06d}.parquet"


def batch_index(name: str) -> int | None:
    """The micro-batch a file name `batch_file` made belongs to; None for any other name."""
    match = re.fullmatch(r"mb-(\d+)\.parquet", name)
    return int(match[1]) if match else None


def remove_uncommitted(fs: pafs.FileSystem, root: str, committed: set[int]) -> int:
    """Delete the tables of micro-batches the ledger never committed; returns how many files.

    They are re-run on resume. A dense table would be overwritten under the same name, but
    an exceedance table lives in its stage's folder (`layers=<a>-<b>`): a resume with another
    stage split would leave the old one beside the new one, counted twice.
    """
    stale = []
    for kind in ("activations", "exceedances", "stats"):
        selector = pafs.FileSelector(f"{root}/{kind}", recursive=True, allow_not_found=True)
        stale += [info.path for info in fs.get_file_info(selector)
                  if info.type == pafs.FileType.File
                  and (index := batch_index(info.base_name)) is not None and index not in committed]
    for path in stale:
        fs.delete_file(path)
    return len(stale)


class LockedError(RuntimeError):
    """Another live run holds the run directory."""


class RunLock:
    """`RUN/.lock` while a run writes there, so two runs never write the same directory.

    The lock names its holder (host, pid). A lock left by a process that is gone (same
    host, pid not alive) is taken over, so a crashed run can be resumed at once.
    On object stores the check-then-write is best effort (they have no exclusive create).
    """

    def __init__(self, output: str):
        self.fs, root = resolve(output)
        self.path = f"{root}/.lock"
        self.output = output
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}

    def __enter__(self):
        self.fs.create_dir(self.path.rpartition("/")[0], recursive=True)
        for _ in range(2):
            if self._create():
                return self
            holder = self._holder()
            if holder and not self._stale(holder):
                raise LockedError(
                    f"storage.output={self.output!r} is in use by another run (pid {holder['pid']} "
                    f"on {holder['host']}). Wait for it to finish, or choose another --output."
                )
            self.fs.delete_file(self.path)  # stale: its writer is gone
        raise LockedError(f"could not lock {self.path}; remove it if no run is using {self.output!r}.")

    def __exit__(self, *exc):
        if self._holder() == self.me:
            self.fs.delete_file(self.path)

    def _create(self) -> bool:
        body = json.dumps(self.me).encode()
        if isinstance(self.fs, pafs.LocalFileSystem):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return True
        if exists(self.fs, self.path):
            return False
        with self.fs.open_output_stream(self.path) as out:
            out.write(body)
        return True

    def _holder(self) -> dict | None:
        try:
            return read_json(self.fs, self.path)
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") != self.me["host"]:
            return False  # cannot see other machines' processes: assume alive
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
