"""Bad input ends in one line naming the problem and the fix: exit status 2, no traceback, no hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.layout import RunLayout
from cluster.__main__ import main
from cluster.config import load_config
from common.errors import ConfigError

DEFAULT = str(Path(__file__).resolve().parent.parent / "configs" / "tiny_moe.yaml")


def fails_with(capsys, args: list[str], message: str) -> str:
    capsys.readouterr()  # drop what earlier steps printed
    assert main(["run", DEFAULT, *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: "), err
    assert message in err, err
    return err


@pytest.mark.parametrize("args, message", [
    (["--set", "pipline.num_stages=2"], "unknown key(s) ['pipline'] at the top level; valid keys:"),
    (["--set", "pipeline.micro_batch_size=big"], "pipeline.micro_batch_size='big': expected int"),
    (["--model", "/nonexistent/checkpoint"], "no checkpoint directory there"),
    (["--model", "nonexistent-org/no-such-model"], "Without network access, download it elsewhere"),
    (["--stages", "9"], "pipeline.num_stages=9 but the model has 8 decoder layers"),
    (["--seq-len", "5000"], "data.seq_len=5000 exceeds the model's max_position_embeddings=4096"),
])
def test_input_errors_before_any_work(capsys, tmp_path, args, message):
    fails_with(capsys, [*args, "--output", str(tmp_path / "run")], message)
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_an_output_that_is_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    fails_with(capsys, ["--output", str(tmp_path / "taken")], "cannot hold a run: ")
    fails_with(capsys, ["--output", str(tmp_path / "taken" / "run")], "choose a writable directory (--output)")


def test_empty_and_too_short_datasets(capsys, tmp_path):
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("")
    short.write_text("One short document.\n")
    fails_with(capsys, ["--data", str(empty), "--output", str(tmp_path / "a")], "gave only 0 tokens")
    err = fails_with(capsys, ["--data", str(short), "--output", str(tmp_path / "b")], "lower num_sequences")
    assert "32 * 128 = 4096 are needed" in err
    fails_with(capsys, ["--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "c")],
               "missing.jsonl")


def test_a_decoder_whose_blocks_the_table_cannot_map_is_refused(capsys, tmp_path):
    from transformers import XGLMConfig, XGLMForCausalLM

    config = XGLMConfig(num_layers=2, d_model=32, attention_heads=2, ffn_dim=32, vocab_size=64)
    XGLMForCausalLM(config).save_pretrained(tmp_path / "xglm")
    err = fails_with(capsys, ["--model", str(tmp_path / "xglm"), "--output", str(tmp_path / "run")],
                     "model_type='xglm': decoder layer 0 (XGLMDecoderLayer) has no module for ln_mlp")
    assert "actors/families.py:FAMILIES" in err and err.count("\n") == 1


def test_more_stages_than_the_cluster_holds(capsys, tmp_path, ray_cluster):
    fails_with(capsys, ["--stages", "5", "--output", str(tmp_path / "a")],
               "pipeline.num_stages=5 needs 5 CPU but the cluster has 0 GPUs (CPU: 4")
    fails_with(capsys, ["--set", "pipeline.device=cuda", "--output", str(tmp_path / "b")],
               "pipeline.device=cuda but the cluster has 0 GPUs")


def test_busy_cluster_times_out_instead_of_hanging(capsys, tmp_path, ray_cluster):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    hog = placement_group([{"CPU": 3}])
    ray.get(hog.ready())
    try:
        fails_with(capsys, ["--set", "pipeline.placement_timeout_s=3", "--output", str(tmp_path / "run")],
                   "could not fit 1 replica(s) of 2 stage bundles")
    finally:
        remove_placement_group(hog)


def test_a_second_run_on_the_same_output_is_refused(capsys, tmp_path):
    other = subprocess.Popen(["sleep", "60"])  # a live process standing for the other run
    try:
        (tmp_path / "run").mkdir()
        lock = Path(RunLayout.of(str(tmp_path / "run")).lock().path)
        lock.write_text(json.dumps({"host": os.uname().nodename, "pid": other.pid}))
        fails_with(capsys, ["--output", str(tmp_path / "run")],
                   f"is in use by another run (pid {other.pid}")
    finally:
        other.kill()
        other.wait()


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    layout = RunLayout.of(str(tmp_path))
    held = layout.lock()
    Path(held.path).write_text(json.dumps({"host": os.uname().nodename, "pid": gone.pid}))
    with held as lock:
        assert json.loads(Path(held.path).read_text())["pid"] == lock.me["pid"] == os.getpid()
    assert not Path(held.path).exists()


# Random YAML-like values: the loader must answer with a RunConfig or a ConfigError, nothing else.
leaves = st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8)
keys = st.sampled_from(["model", "data", "pipeline", "storage", "analysis", "path", "tiny", "dtype",
                        "num_stages", "seq_len", "plants", "threshold", "mode", "layer_unit", "x"])
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=5))
def test_config_loader_only_raises_config_errors(data):
    try:
        load_config(data)
    except ConfigError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["pipeline.num_stages", "data.seq_len", "storage.floor", "model.dtype",
                        "analysis.threshold", "model.tiny.seed", "model.tiny.plants"]), values)
def test_overrides_only_raise_config_errors(key, value):
    try:
        load_config(DEFAULT, [f"{key}={json.dumps(value)}"])
    except ConfigError:
        pass
    except ValueError as err:  # json.dumps of NaN is YAML '.nan'-incompatible text
        raise AssertionError(f"{key}={value!r} raised {err!r}")


@pytest.mark.parametrize("command", [
    ["-m", "cluster", "run", "configs/tiny_moe.yaml"],
    ["-m", "analysis", "runs/anything"],
])
def test_a_bug_ends_in_a_traceback_and_exit_1_not_a_user_error(command):
    # A deliberate internal error: the layer every command goes through divides by zero.
    code = ("import sys, runpy, common.layout as layout; "
            "layout.RunLayout.of = classmethod(lambda cls, uri: 1 / 0); "
            f"sys.argv = ['x', *{command[2:]!r}]; runpy.run_module({command[1]!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(DEFAULT).parent.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" in done.stderr and "ZeroDivisionError" in done.stderr and "error: " not in done.stderr
