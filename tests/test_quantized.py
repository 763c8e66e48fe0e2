"""Quantized releases load dequantized: GPT-OSS in MXFP4, DeepSeek-V3 in block FP8.

The checkpoints are written by hand in the released layouts (tests/quantized.py). Split
into stages, they must equal the model's own forward of the same checkpoint bit for bit,
with weights that are exactly the quantized values; what cannot be dequantized right is
refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from actors.anatomy import anatomy
from common.layout import SITES
from actors.checkpoint import load_config, load_full
from common.errors import ModelError
from cluster.tiny_model import TinySpec, build_tiny
from tests.conftest import read_site, reference_activations, run_stages, token_batch
from tests.quantized import to_fp8, to_mxfp4

SIZES = dict(num_layers=4, hidden_size=64, num_experts=4, top_k=2, expert_size=32, num_heads=4,
             num_kv_heads=2, vocab_size=512, max_position=256)


def release(model_cache, tmp_path, arch: str, convert, **kwargs) -> tuple[Path, dict]:
    src = Path(build_tiny(TinySpec(arch=arch, **SIZES), model_cache))
    dst = tmp_path / f"{arch}-quantized"
    return dst, convert(src, dst, **kwargs)


@pytest.mark.parametrize("arch, convert, method", [("gpt_oss", to_mxfp4, "mxfp4"), ("deepseek_v3", to_fp8, "fp8")])
def test_quantized_release_runs_dequantized_and_equals_the_models_own_forward(
        model_cache, tmp_path, arch, convert, method):
    path, exact = release(model_cache, tmp_path, arch, convert)
    config = load_config(str(path))
    body = anatomy(str(path), config)
    assert body.quantization == method and body.dtype == "float32"

    # The weights a plain load holds are the quantized values, dequantized exactly: loading the
    # float tensors they stand for gives the same model.
    exact_dir = tmp_path / "exact"
    exact_dir.mkdir()
    for item in Path(build_tiny(TinySpec(arch=arch, **SIZES), model_cache)).iterdir():
        if item.suffix != ".safetensors":
            (exact_dir / item.name).write_bytes(item.read_bytes())
    save_file({k: v.contiguous() for k, v in exact.items()}, str(exact_dir / "model.safetensors"))
    plain, dequantized = load_full(str(exact_dir), "float32"), load_full(str(path), "float32")
    want, got = plain.state_dict(), dequantized.state_dict()
    assert list(got) == list(want)  # every tensor, none missing or extra, in the same order
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name

    ids, mask = token_batch(seed=5, batch=4, seq=16, pad_last=3)
    expected = reference_activations(str(path), "float32", ids, mask, micro_batch=2)
    run_stages(str(path), "float32", tmp_path / "run", ids, mask, num_layers=4, num_stages=2)
    for layer in range(4):
        for site in SITES:
            _, _, act = read_site(tmp_path / "run", layer, site)
            assert np.array_equal(act, expected[(layer, site)][mask.bool().numpy()]), (layer, site)


def test_fp8_with_partial_tiles_is_refused_in_one_line(model_cache, tmp_path):
    path, _ = release(model_cache, tmp_path, "deepseek_v3", to_fp8, block=(24, 24))
    with pytest.raises(ModelError, match=r"^the checkpoint is quantized with 'fp8' in 24x24 tiles, and "
                                             r"\S+ \[\d+, \d+\] ends in a partial tile.*bf16 weights[^\n]*$"):
        anatomy(str(path), load_config(str(path)))


def test_a_quantization_no_stage_can_dequantize_is_refused_in_one_line(model_cache, tmp_path):
    src = Path(build_tiny(TinySpec(arch="qwen3_moe", **SIZES), model_cache))
    dst = tmp_path / "gptq"
    dst.mkdir()
    for item in src.iterdir():
        dst.joinpath(item.name).write_bytes(item.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"^the checkpoint is quantized with 'gptq'.*unquantized \(bf16\) release"):
        anatomy(str(dst), load_config(str(dst)))
