"""Quantized releases written by hand: transformers cannot write them without a GPU.

`to_mxfp4` turns a saved GPT-OSS checkpoint into the layout openai/gpt-oss-* ships
(experts as MXFP4 blocks and scales), `to_fp8` a DeepSeek-V3 checkpoint into the block-FP8
layout of deepseek-ai/DeepSeek-V3. Each returns the float tensors the quantized ones stand
for exactly, so a test can check what a stage dequantized.

    MXFP4:  <experts>.{gate_up,down}_proj_blocks  uint8 [E, out, in/32, 16]  two e2m1 values a byte
            <experts>.{gate_up,down}_proj_scales  uint8 [E, out, in/32]      exponents, bias 127
    FP8:    <linear>.weight            float8_e4m3fn [out, in]
            <linear>.weight_scale_inv  float32 [out/bm, in/bn]               one scale per tile
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
FP8_KEPT = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "e_score_correction_bias")


def _copy(src: Path, dst: Path, tensors: dict, quantization: dict) -> None:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, dst / path.name)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}, indent=2))


def mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., K] -> (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32])."""
    *lead, k = weight.shape
    groups = weight.float().reshape(*lead, k // 32, 32)
    peak = groups.abs().amax(-1, keepdim=True)
    exponent = torch.where(peak > 0, torch.ceil(torch.log2(peak / 6.0)), torch.zeros_like(peak)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)
    index = (scaled.abs().unsqueeze(-1) - FP4_VALUES[:8]).abs().argmin(-1) + 8 * (scaled < 0).long()
    index = index.to(torch.uint8)
    return (index[..., 0::2] | (index[..., 1::2] << 4)).contiguous(), (exponent.squeeze(-1) + 127).to(torch.uint8)


def from_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    low, high = (blocks & 15).long(), (blocks >> 4).long()
    values = torch.stack([FP4_VALUES[low], FP4_VALUES[high]], -1).reshape(*blocks.shape[:-1], 32)
    return (values * torch.exp2(scales.float() - 127).unsqueeze(-1)).reshape(*blocks.shape[:-2], -1)


def to_mxfp4(src: Path, dst: Path) -> dict:
    """A float GPT-OSS checkpoint as released in MXFP4; returns the float tensors it stands for."""
    tensors, exact = {}, {}
    for name, value in load_file(str(src / "model.safetensors")).items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            blocks, scales = mxfp4(value.transpose(1, 2))  # stored [E, out, in]
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
            exact[name] = from_mxfp4(blocks, scales).transpose(1, 2).contiguous()
        else:
            tensors[name] = exact[name] = value
    _copy(src, dst, tensors, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    return exact


def fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (fp8 [out, in], scale_inv float32 [ceil(out/bm), ceil(in/bn)])."""
    bm, bn = block
    rows, cols = math.ceil(weight.shape[0] / bm), math.ceil(weight.shape[1] / bn)
    padded = torch.zeros(rows * bm, cols * bn)
    padded[: weight.shape[0], : weight.shape[1]] = weight.float()
    tiles = padded.reshape(rows, bm, cols, bn)
    peak = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(peak > 0, peak / FP8_MAX, torch.ones_like(peak))
    quantized = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized.reshape(rows * bm, cols * bn)[: weight.shape[0], : weight.shape[1]].contiguous(), scale


def to_fp8(src: Path, dst: Path, block: tuple[int, int] = (8, 8)) -> dict:
    """A float DeepSeek-V3 checkpoint as released in block FP8; returns the float tensors it stands for."""
    tensors, exact = {}, {}
    for name, value in load_file(str(src / "model.safetensors")).items():
        if name.endswith(".weight") and value.ndim == 2 and not any(k in name for k in FP8_KEPT):
            quantized, scale = fp8(value, block)
            tensors[name], tensors[name.removesuffix("weight") + "weight_scale_inv"] = quantized, scale
            exact[name] = quantized.float() * scale.repeat_interleave(block[0], 0).repeat_interleave(
                block[1], 1)[: value.shape[0], : value.shape[1]]
        else:
            tensors[name] = exact[name] = value
    _copy(src, dst, tensors, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                              "weight_block_size": list(block)})
    return exact
