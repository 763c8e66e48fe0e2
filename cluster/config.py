"""The run configuration: one typed, validated object built from YAML plus CLI overrides.

Each section is a frozen dataclass kept by the code that owns it, and written once, defaults
included: ModelConfig here, DataConfig in cluster.data, PipelineConfig in cluster.pipeline,
StorageConfig in common.storage, CaptureConfig in actors.capture, AnalysisConfig in
analysis.settings. `load_config` builds them with common.config, which rejects unknown keys
(listing the valid ones) and wrong types (naming key, value and expected type).

What each worker receives: a stage actor its StageSpec (actors/stage.py), which holds the
storage and capture sections as they are and, of the pipeline section, the values that
concern a stage (device, writer, write_depth, its threads, the warm-up's shape); the scan
actors the analysis section's thresholds. Loading a config imports neither Polars,
matplotlib nor Ray (tests/test_imports.py).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from actors.capture import CaptureConfig
from common.storage import StorageConfig
from analysis.settings import AnalysisConfig
from cluster.data import DataConfig
from cluster.pipeline import PipelineConfig
from cluster.tiny_model import TinySpec
from common.config import build, choice
from common.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None
    """Hugging Face id or local checkpoint directory. Leave empty to build `tiny`."""
    tiny: TinySpec | None = None
    """Build (once, cached) a small random-init checkpoint with planted outliers."""
    dtype: str = "auto"
    """Weights and activations dtype: auto (the checkpoint's own), float32, bfloat16 or float16."""
    experts_implementation: str | None = None
    """MoE expert kernel; empty keeps what from_pretrained picks (grouped_mm)."""
    attn_implementation: str | None = None
    """Attention kernel; empty keeps what from_pretrained picks (sdpa)."""
    cache_dir: str = "~/.cache/moe-outliers"
    """Where built tiny checkpoints are kept."""

    def __post_init__(self):
        choice("model.dtype", self.dtype, ["auto", "float32", "bfloat16", "float16"])
        if (self.path is None) == (self.tiny is None):
            raise ConfigError(
                "model: give exactly one of model.path (HF id or checkpoint dir) and model.tiny "
                f"(got path={self.path!r}, tiny={'set' if self.tiny else None})."
            )


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if self.model.tiny is not None:
            data["model"]["tiny"] = self.model.tiny.to_dict()
        return data


def parse_override(text: str) -> tuple[list[str], object]:
    """'pipeline.num_stages=2' -> (['pipeline', 'num_stages'], 2), values parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. pipeline.num_stages=2.")
    return key.split("."), yaml.safe_load(raw) if raw else None


def apply_override(data: dict, path: list[str], value) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part} is not a section.")
    node[path[-1]] = value
    if path == ["model", "path"] and value is not None:
        node.pop("tiny", None)  # a checkpoint given on the command line replaces the built one


def load_config(source: str | Path | dict, overrides: list[str] = (), settings: dict | None = None) -> RunConfig:
    """Read YAML (or a dict), apply `key=value` overrides, then `settings` ({dotted key: value}),
    validate."""
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; see configs/ for examples.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())}).") from None
    data = copy.deepcopy(data)
    for text in overrides:
        apply_override(data, *parse_override(text))
    for key, value in (settings or {}).items():
        apply_override(data, key.split("."), value)
    return build(RunConfig, data)
