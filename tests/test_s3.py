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
import pyarrow.parquet as pq
import pytest

from cluster.config import load_config
from cluster.run import execute
from tests.test_run import run_config
from tests.conftest import free_port, own_ray

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
    fs, root = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/activations", recursive=True))
    return {
        info.path.removeprefix(root): pq.read_table(info.path, filesystem=fs)
        for info in infos if info.path.endswith(".parquet")
    }


def read_json(uri: str, name: str) -> dict:
    fs, root = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(f"{root}/{name}") as stream:
        return json.loads(stream.read())


def test_run_on_s3_equals_the_local_run_resumes_and_reanalyses(ray_cluster, s3, planted_checkpoint, tmp_path):
    uri = s3("planted")
    config = load_config(run_config(planted_checkpoint, uri))
    result = execute(config, log=lambda *_: None)
    local = execute(load_config(run_config(planted_checkpoint, tmp_path / "local")), log=lambda *_: None)
    assert [f["dim"] for f in result["summary"]["outlier_features"]] == [5, 40]
    assert result["summary"]["outlier_features"] == local["summary"]["outlier_features"]
    remote = tables(uri)
    assert len(remote) == 6 * 2 * 3  # layers x sites x micro-batches
    assert remote.keys() == tables(str(tmp_path / "local")).keys()
    for path, table in tables(str(tmp_path / "local")).items():
        assert table.equals(remote[path]), path
    assert read_json(uri, "run.json")["status"] == "complete"

    # Interrupt: micro-batch 1 never committed and its files gone; --resume redoes only it.
    fs, root = pafs.FileSystem.from_uri(uri)
    record = read_json(uri, "run.json")
    record["status"], record["batches"]["1"]["status"] = "running", "pending"
    with fs.open_output_stream(f"{root}/run.json") as out:
        out.write(json.dumps(record).encode())
    lost = [p for p in remote if p.endswith("mb-000001.parquet")]
    for path in lost:
        fs.delete_file(root + path)
    execute(config, resume=True, log=lambda *_: None)
    again = tables(uri)
    assert again.keys() == remote.keys()
    assert all(again[path].equals(remote[path]) for path in remote)
    record = read_json(uri, "run.json")
    assert record["status"] == "complete"
    assert all(batch["status"] == "committed" for batch in record["batches"].values())

    # Re-analysis from the command line scans the tables where they are.
    done = subprocess.run([sys.executable, "-m", "analysis", uri, "--threshold", "7"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 5 |" in done.stdout and "| 40 |" in done.stdout
    summary = read_json(uri, "analysis/summary.json")
    assert summary["criteria"]["threshold"] == 7
    assert [f["dim"] for f in summary["outlier_features"]] == [5, 40]
