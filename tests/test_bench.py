"""The benches run, small, on the CPU: every row and case measured, and what can be known
exactly (bytes, counts, which cases ran) is checked. No timing is asserted, and no formula a
bench computes is computed again here: how a stage's time is split is checked exactly, with
a clock of its own, in tests/test_metrics.py.
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
    for row in (dense, sparse):  # the stage's profile, every part measured
        assert set(row["profile"]) == {"forward", "layers", "tables", "writer_wait", "other", "files"}
        assert all(row["profile"][part] > 0 for part in ("layers", "tables", "files"))
    from common.layout import RunLayout
    from common.storage import STATS

    assert RunLayout.of(str(tmp_path / "exceedances")).stage_files(STATS)


def test_pipeline_simulator_runs_every_case_through_the_real_driver(ray_cluster, tmp_path):
    from bench.simulate import MODES, simulate, table

    result = simulate((64,), (1, 2), MODES, wait_s=0.001, micro_batches=3, directory=str(tmp_path), seq_len=32)
    cases = {(c["stages"], c["mode"]): c for c in result["cases"]}
    assert set(cases) == {(n, mode) for n in (1, 2) for mode in MODES}
    for (stages, mode), case in cases.items():
        assert case["ideal_s"] > 0 and case["efficiency"] > 0
        assert len(case["stage_overhead_ms"]) == len(case["tables_ms"]) == stages
        assert mode == "none" or min(case["tables_ms"]) > 0
    # dense writes every value of 2 sites of [1, 32, 64] per micro-batch: at least 2 bytes each
    dense, sparse = cases[(2, "dense")]["bytes_per_stage"], cases[(2, "exceedances")]["bytes_per_stage"]
    assert dense >= 3 * 2 * 32 * 64 * 2 and 0 < sparse < dense and cases[(2, "none")]["bytes_per_stage"] == 0
    writer = result["writer"]
    assert writer["bytes_per_mb"] >= 4 * 2 * 32 * 64 * 2 and writer["writer_mb_s"] > 0 and writer["raw_mb_s"] > 0
    assert set(result["handoff_ms"]) == {64}
    assert "N=2 M=3" in table(result)


def test_replica_scaling_runs_replicas_through_the_real_driver(ray_cluster):
    from bench.replicas import scaling, table

    rows = scaling(shapes=((2, 1), (2, 2)), per_replica=3, wait_s=0.001, hidden=64, seq_len=32)
    assert [(r["replicas"], r["stages"], r["actors"], r["micro_batches"]) for r in rows] == [(2, 1, 2, 6), (2, 2, 4, 6)]
    for row in rows:
        assert sum(row["per_replica"]) == 6 and min(row["per_replica"]) > 0  # both replicas took work
        assert row["scaling"] > 0 and row["driver_cpu_ms"] > 0
    assert "| 2 x 2 (4) | 6 |" in table(rows)


def test_gpu_suite_runs_small_and_records_both_parts(tmp_path):
    results = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--small", "--record", "--results", str(results),
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = results.read_text()
    assert "GPU bench (--small check)" in text and "FAILED" not in text
    assert "| (c) capture, dense |" in text and "N=2 M=4 T=10ms exceedances" in text
