"""Where run files live: a local path or any pyarrow filesystem URI (s3://, gs://, ...).

Every file is written to a temporary name beside its target and then moved into
place, so a reader never sees half a file and a crash leaves only ignorable
`.tmp-*` debris.
"""

from __future__ import annotations

import json
import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path inside it) for a run directory given as path or URI."""
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    return pafs.FileSystem.from_uri(uri)


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
