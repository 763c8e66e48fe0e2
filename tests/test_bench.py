"""The GPU benchmark script runs on CPU (`--small`) without Ray or Polars installed.

No timing is asserted: only that every row ran and exceedance mode wrote fewer bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BLOCKED = "import sys; sys.modules['ray'] = None; sys.modules['polars'] = None; "


def test_gpu_bench_runs_small_without_ray_or_polars(tmp_path):
    script = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"
    run = (f"{BLOCKED}sys.argv = ['gpu.py', '--small', '--sequences', '2', '--seq-len', '64', "
           f"'--out', {str(tmp_path)!r}, '--keep']; import runpy; "
           f"runpy.run_path({str(script)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]
    dense, sparse = rows["(c) capture, dense"], rows["(d) capture, exceedances >= 3"]
    assert 0 < sparse["bytes"] < dense["bytes"]
    from common.layout import STATS, RunLayout

    assert RunLayout.of(str(tmp_path / "exceedances")).stage_files(STATS)
