"""Shared storage: a run whose output is an s3:// URI, against a local S3 server on loopback.

moto's server (the `moto[server]` test extra) stands in for the object store. Stages
write their tables there, the analysis scans them there, and a resumed run fills in
what an interrupted one left out.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cluster.config import load_config
from cluster.run import execute
from analysis.scan import read_frame
from common import files
from common.layout import RunLayout, batch_file
from common.record import read_record, write_record
from tests.conftest import free_port, own_ray, run_config

REPO = Path(__file__).resolve().parent.parent
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with bucket `runs`; yields a function run name -> URI."""
    pytest.importorskip("moto")
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {key: os.environ.get(key) for key in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # before ray.init, so stage and scan workers inherit them
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http"
    try:
        _wait_for(port)
        fs, _ = pafs.FileSystem.from_uri(f"s3://runs?{query}&allow_bucket_creation=true")
        fs.create_dir("runs")
        yield lambda name: f"s3://runs/{name}?{query}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _wait_for(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"moto server did not listen on port {port}")


@pytest.fixture(scope="module")
def ray_cluster(s3):
    import ray

    own_ray(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def tables(uri: str) -> dict:
    """{relative path: pyarrow table} of every activation file in the run."""
    layout = RunLayout.of(uri)
    return {path.removeprefix(layout.root): read_frame(layout.fs, path).to_arrow() for path, _ in layout.batch_tables()}


def test_run_on_s3_equals_the_local_run_resumes_and_reanalyses(ray_cluster, s3, planted_checkpoint, tmp_path):
    uri = s3("planted")
    config = load_config(run_config(planted_checkpoint, uri))
    result = execute(config, quiet=True)
    local = execute(load_config(run_config(planted_checkpoint, tmp_path / "local")), quiet=True)
    assert [f["dim"] for f in result["summary"]["outlier_features"]] == [5, 40]
    assert result["summary"]["outlier_features"] == local["summary"]["outlier_features"]
    remote = tables(uri)
    assert len(remote) == 6 * 2 * 3  # layers x sites x micro-batches
    assert remote.keys() == tables(str(tmp_path / "local")).keys()
    for path, table in tables(str(tmp_path / "local")).items():
        assert table.equals(remote[path]), path
    layout = RunLayout.of(uri)
    assert read_record(layout).status == "complete"

    # Interrupt: micro-batch 1 never committed and its files gone; --resume redoes only it.
    record = read_record(layout)
    record.status, record.batches[1].status = "running", "pending"
    write_record(layout, record)
    lost = [p for p in remote if p.endswith(batch_file(1))]
    for path in lost:
        layout.fs.delete_file(layout.root + path)
    execute(config, resume=True, quiet=True)
    again = tables(uri)
    assert again.keys() == remote.keys()
    assert all(again[path].equals(remote[path]) for path in remote)
    record = read_record(layout)
    assert record.status == "complete" and record.committed() == set(record.batches)

    # Re-analysis from the command line scans the tables where they are.
    done = subprocess.run([sys.executable, "-m", "analysis", uri, "--threshold", "7"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 5 |" in done.stdout and "| 40 |" in done.stdout
    summary = json.loads(files.read_bytes(layout.fs, layout.summary))
    assert summary["criteria"]["threshold"] == 7
    assert [f["dim"] for f in summary["outlier_features"]] == [5, 40]
