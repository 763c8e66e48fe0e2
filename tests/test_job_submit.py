"""Integration: `ray job submit` against a `ray start --head` cluster on loopback.

Ray 2.60 enables token auth by default: the head writes ~/.ray/auth_token, and the
job CLI and dashboard API need `RAY_AUTH_MODE=token` (they then read that token).
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, stored_record, stored_summary

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head node on loopback with a token of its own (RAY_AUTH_TOKEN_PATH: never this machine's
    ~/.ray/auth_token); yields (dashboard address, environment), stops the cluster after."""
    import secrets

    port, dashboard = free_port(), free_port()
    token = tmp_path_factory.mktemp("auth") / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_TOKEN_PATH": str(token)}
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    "--num-cpus=4", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_dashboard_api_requires_the_token(head):
    head, env = head
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{head}/api/jobs/", timeout=10)
    assert refused.value.code == 401
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{head}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    assert urllib.request.urlopen(request, timeout=10).status == 200


def test_job_submit_runs_the_default_config(head, tmp_path):
    head, env = head
    output = tmp_path / "run"
    env = {**env, "RAY_AUTH_MODE": "token"}
    job = subprocess.run(
        [RAY, "job", "submit", "--address", head, "--working-dir", str(REPO), "--",
         "python", "-m", "cluster", "run", "configs/tiny_moe.yaml",
         "--output", str(output), "--num-sequences", "8"],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "| 7 |" in job.stdout and "| 77 |" in job.stdout
    assert [f["dim"] for f in stored_summary(output)["outlier_features"]] == [7, 77]
    record = stored_record(output)
    assert record.status == "complete" and record.tokens == 8 * 128
