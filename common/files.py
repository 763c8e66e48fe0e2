"""Run files on a local disk or any pyarrow filesystem URI (s3://, gs://, ...).

Every file is written to a temporary name beside its target and then moved into place,
one implementation for Parquet, JSON, text and images alike, so a reader never sees half
a file and a crash leaves only `.tmp-*` debris that a resume removes. `RunLock` keeps two
runs from writing one directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from collections.abc import Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from common.errors import RunError

TEMP_MARK = ".tmp-"


def is_uri(uri: str) -> bool:
    """Whether `uri` names an object store (s3://...) rather than a local path: an existing
    local path is always that path, whatever it holds (colons, '://')."""
    return "://" in uri and not os.path.exists(os.path.expanduser(uri))


def absolute(uri: str) -> str:
    """A run directory as an absolute path, or the URI unchanged."""
    return uri if is_uri(uri) else os.path.abspath(os.path.expanduser(uri))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path inside it) for a directory given as path or URI."""
    uri = str(uri)
    if is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    # NOTE: a local path is never parsed as a URI: its colons and '?' are its own.
    return pafs.LocalFileSystem(), absolute(uri)


def _atomically(fs: pafs.FileSystem, path: str, write: Callable[[str], None]) -> int:
    """Run `write(temp)` for a temporary file beside `path`, then move it into place; its size."""
    head, _, tail = path.rpartition("/")
    temp = f"{head}/.{tail}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        fs.create_dir(head, recursive=True)
        write(temp)
        size = fs.get_file_info(temp).size
        fs.move(temp, path)  # local: rename(2), atomic; object stores: the object appears whole
    except OSError as err:  # read-only, full, over quota, unreachable: one line, no half file
        with contextlib.suppress(OSError):
            fs.delete_file(temp)
        fix = "choose a writable output" if isinstance(err, PermissionError) else "free space or choose another output"
        raise RunError(f"cannot write {path}: {err.strerror or err}; {fix}.") from None
    return size


def write_table(fs: pafs.FileSystem, path: str, table: pa.Table, **options) -> int:
    """`table` as Parquet at `path` (`options` go to pyarrow.parquet.write_table); its bytes."""
    return _atomically(fs, path, lambda temp: pq.write_table(table, temp, filesystem=fs, **options))


def write_ipc(fs: pafs.FileSystem, path: str, table: pa.Table) -> int:
    """`table` as an uncompressed Arrow IPC file (Feather v2) at `path`; its bytes."""

    def write(temp: str) -> None:
        with fs.open_output_stream(temp) as out:
            ipc_into(out, table)

    return _atomically(fs, path, write)


def ipc_into(out, table: pa.Table) -> None:
    """`table` as an Arrow IPC file into the open stream `out`."""
    with pa.ipc.new_file(out, table.schema) as writer:
        writer.write_table(table)


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> int:
    def write(temp: str) -> None:
        with fs.open_output_stream(temp) as out:
            out.write(data)

    return _atomically(fs, path, write)


def write_text(fs: pafs.FileSystem, path: str, text: str) -> int:
    return write_bytes(fs, path, text.encode())


def write_json(fs: pafs.FileSystem, path: str, obj) -> int:
    return write_text(fs, path, json.dumps(obj, indent=2, default=str))


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as src:
        return src.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def files(fs: pafs.FileSystem, folder: str, recursive: bool = False) -> list[pafs.FileInfo]:
    """The plain files under `folder` (none if it does not exist), sorted by path."""
    selector = pafs.FileSelector(folder, recursive=recursive, allow_not_found=True)
    return sorted((e for e in fs.get_file_info(selector) if e.type == pafs.FileType.File), key=lambda e: e.path)


def folders(fs: pafs.FileSystem, folder: str) -> list[str]:
    """The folders directly under `folder`, sorted."""
    entries = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(e.path for e in entries if e.type == pafs.FileType.Directory)


def remove_debris(fs: pafs.FileSystem, root: str) -> int:
    """Delete the temporary files an interrupted run left behind; returns how many."""
    debris = [e.path for e in files(fs, root, recursive=True)
              if e.base_name.startswith(".") and TEMP_MARK in e.base_name]
    for path in debris:
        fs.delete_file(path)
    return len(debris)


class LockedError(RunError):
    """Another live run holds the run directory."""


class RunLock:
    """A lock file (at `path`) while a run writes its directory, so two runs never write one.

    The lock names its holder (host, pid). A lock left by a process that is gone (same host,
    pid not alive) is taken over, so a crashed run can be resumed at once. On object stores
    the check-then-write is best effort (they have no exclusive create).
    """

    def __init__(self, fs: pafs.FileSystem, path: str, output: str):
        self.fs, self.path, self.output = fs, path, output
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}

    def __enter__(self):
        try:
            return self._acquire()
        except OSError as err:  # a file where the directory should be, a read-only or full disk
            raise RunError(f"storage.output={self.output!r} cannot hold a run: {err.strerror or err}; "
                           "choose a writable directory (--output).") from None

    def _acquire(self):
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
            return json.loads(read_bytes(self.fs, self.path))
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
