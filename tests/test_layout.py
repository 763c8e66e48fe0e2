"""common.layout and common.record: where a run's files live, and the run record."""

from __future__ import annotations

import json

import pytest

from common.errors import RunError
from common.layout import RunLayout, batch_file, batch_index
from common.record import VERSION, BatchRecord, RunRecord, StageRecord, read_record, write_record


def test_every_path_of_a_run(tmp_path):
    layout = RunLayout.of(str(tmp_path))
    root = str(tmp_path)
    assert layout.record == f"{root}/run.json"
    assert layout.dense(3, "ln_mlp", 7) == f"{root}/activations/layer=3/site=ln_mlp/mb-000007.arrow"
    assert layout.stage_table("exceedances", range(4, 8), 2) == f"{root}/exceedances/layers=4-7/mb-000002.parquet"
    assert layout.stage_table("stats", range(0, 1), 0) == f"{root}/stats/layers=0-0/mb-000000.parquet"
    assert (layout.summary, layout.features, layout.profile) == (
        f"{root}/analysis/summary.json", f"{root}/analysis/outlier_features.parquet",
        f"{root}/analysis/layer_profile.parquet")
    assert layout.plot("heatmap") == f"{root}/analysis/plots/heatmap.png"
    assert layout.plot_link("heatmap") == "analysis/plots/heatmap.png"
    assert (layout.report("md"), layout.report("html")) == (f"{root}/report.md", f"{root}/report.html")
    assert batch_file(12) == "mb-000012.parquet" and batch_index("mb-000012.parquet") == 12
    assert batch_file(12, "arrow") == "mb-000012.arrow" and batch_index("mb-000012.arrow") == 12
    assert batch_index("part-0.parquet") is None and batch_index(".mb-000001.parquet.tmp-ab") is None


def test_listing_and_removing_uncommitted_tables(tmp_path):
    layout = RunLayout.of(str(tmp_path))
    paths = [layout.dense(0, "ln_attn", 0), layout.dense(1, "ln_mlp", 1), layout.dense(1, "ln_attn", 1),
             layout.stage_table("exceedances", range(0, 2), 1), layout.stage_table("stats", range(0, 2), 0)]
    for path in paths:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x")
    assert layout.dense_partitions() == [(0, "ln_attn"), (1, "ln_attn"), (1, "ln_mlp")]
    assert layout.stage_files("stats") == [paths[4]]
    assert sorted(layout.batch_tables()) == sorted((p, batch_index(p.rsplit("/", 1)[1])) for p in paths)
    assert layout.remove_uncommitted({0}) == 3
    assert sorted(p for p, _ in layout.batch_tables()) == sorted([paths[0], paths[4]])


def test_a_record_round_trips(tmp_path):
    layout = RunLayout.of(str(tmp_path))
    record = RunRecord(num_layers=4, hidden_size=8, tokens=96, storage_mode="exceedances", floor=3.0,
                       config={"analysis": {"threshold": 7.0}},
                       plan=[StageRecord(stage=0, layers=[0, 4], param_bytes=10, node="n", pid=3)],
                       batches={0: BatchRecord(seqs=[0, 2], status="committed"), 1: BatchRecord(seqs=[2, 4])})
    write_record(layout, record)
    back = read_record(layout)
    assert back == record and back.version == VERSION and back.committed() == {0}
    assert json.loads((tmp_path / "run.json").read_text())["batches"]["1"] == {"seqs": [2, 4], "status": "pending"}


def test_a_record_of_the_previous_layout_is_read(tmp_path):
    # As the previous version wrote it: no version key, plan entries updated in place.
    (tmp_path / "run.json").write_text(json.dumps({
        "status": "complete", "config": {"data": {"seq_len": 32}}, "output": str(tmp_path),
        "model_path": "/ckpt", "model_type": "qwen3_moe", "num_layers": 6, "hidden_size": 64,
        "dtype": "float32", "storage_mode": "dense", "floor": None, "seq_len": 32, "num_sequences": 12,
        "tokens": 384, "plan": [{"stage": 0, "layers": [0, 6], "param_bytes": 5, "node": "vm", "pid": 9,
                                  "device": "cpu", "cuda_visible_devices": None, "node_id": "ab", "load_s": 1.0,
                                  "name": "stage-0 [layers 0-5]"}],
        "batches": {"0": {"seqs": [0, 12], "status": "committed"}}, "timings": {"extract_s": 1.5},
        "placement": {"strategy": "PACK", "bundle_nodes": ["ab"]}, "stage_stats": [{"busy_s": 1.0}]}))
    record = read_record(RunLayout.of(str(tmp_path)))
    assert (record.version, record.num_layers, record.committed(), record.plan[0].name) == (
        VERSION, 6, {0}, "stage-0 [layers 0-5]")


@pytest.mark.parametrize("content, message", [
    (None, r"no run record \(.*run.json\)\. Pass the directory an extraction run wrote\.$"),
    ("{not json", r"run.json: not valid JSON .*re-run extraction\.$"),
    ({"num_layers": 2}, r"run.json: lacks \['hidden_size', 'tokens'\]; the run did not finish"),
    ({"version": 99, "num_layers": 2}, r"run.json: record version 99, but this moe-outliers reads versions 1 and 2"),
    ({"num_layers": 1, "hidden_size": 2, "tokens": 3, "storage_mode": "sparse"}, r"storage_mode='sparse'"),
    ({"num_layers": 1, "hidden_size": 2, "tokens": 3, "storage_mode": "exceedances"}, r"needs 'floor'"),
])
def test_unusable_records_are_refused_in_one_line(tmp_path, content, message):
    if content is not None:
        (tmp_path / "run.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(RunError, match=message) as refused:
        read_record(RunLayout.of(str(tmp_path)))
    assert "\n" not in str(refused.value)


def test_a_write_the_disk_fails_leaves_no_half_file_and_says_what_to_do(tmp_path):
    import errno

    from common import files

    fs, root = files.resolve(str(tmp_path))

    def fills_the_disk(temp: str) -> None:
        with fs.open_output_stream(temp) as out:
            out.write(b"half a table")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunError, match=r"^cannot write .*/t\.arrow: No space left on device; free space or choose "
                                       r"another output\.$"):
        files._atomically(fs, f"{root}/t.arrow", fills_the_disk)
    assert list(tmp_path.iterdir()) == []
