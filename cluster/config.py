"""The run configuration: one typed, validated object built from YAML plus CLI overrides.

Every section is a frozen dataclass whose fields document themselves; `load_config`
rejects unknown keys (listing the valid ones) and wrong types (naming key, value and
expected type). Each worker receives only its own section.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from analysis.criteria import Criteria
from cluster.tiny_model import TinySpec


class ConfigError(ValueError):
    """A configuration problem; the message names the key, the value and the fix."""


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
        _choice("model.dtype", self.dtype, ["auto", "float32", "bfloat16", "float16"])
        if (self.path is None) == (self.tiny is None):
            raise ConfigError(
                "model: give exactly one of model.path (HF id or checkpoint dir) and model.tiny "
                f"(got path={self.path!r}, tiny={'set' if self.tiny else None})."
            )


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"
    """'stdlib' (standard-library docstrings), a local .txt/.jsonl/.json/.parquet, or an HF dataset id."""
    text_field: str = "text"
    """Record field holding the text (jsonl/json/parquet/HF datasets)."""
    split: str = "train"
    """HF dataset split."""
    num_sequences: int = 16
    """Sequences to run."""
    shuffle_seed: int | None = None
    """Shuffle documents (buffered, like HF streaming) with this seed; empty keeps source order."""
    seq_len: int = 2048
    """Tokens per packed sequence."""

    def __post_init__(self):
        _positive("data.num_sequences", self.num_sequences)
        _positive("data.seq_len", self.seq_len)


@dataclass(frozen=True)
class PipelineConfig:
    num_stages: int = 1
    """Pipeline stages, one Ray actor and one GPU each."""
    micro_batch_size: int = 1
    """Sequences per micro-batch (the unit of work and of commit)."""
    max_in_flight: int = 0
    """Micro-batches in the pipeline at once; 0 means num_stages + 1."""
    device: str = "auto"
    """auto (GPU when Ray gives one, else CPU), cuda or cpu."""
    cpus_per_stage: float = 1.0
    """CPU cores reserved for each stage actor."""
    threads_per_stage: int = 0
    """torch threads in a stage; 0 means cpus_per_stage."""
    write_depth: int = 2
    """Micro-batches queued for a stage's writer before the stage waits."""
    placement_timeout_s: float = 60.0
    """How long to wait for the cluster to fit the stages before giving up."""
    placement: str = "auto"
    """Placement group strategy: auto (pack when one node fits every stage, else spread),
    pack, spread or strict_spread (one stage per node)."""

    def __post_init__(self):
        _positive("pipeline.num_stages", self.num_stages)
        _positive("pipeline.micro_batch_size", self.micro_batch_size)
        _positive("pipeline.write_depth", self.write_depth)
        _choice("pipeline.device", self.device, ["auto", "cuda", "cpu"])
        _choice("pipeline.placement", self.placement, ["auto", "pack", "spread", "strict_spread"])
        if self.max_in_flight < 0:
            raise ConfigError(f"pipeline.max_in_flight={self.max_in_flight}: use 0 (auto) or more.")

    @property
    def in_flight(self) -> int:
        return self.max_in_flight or self.num_stages + 1


@dataclass(frozen=True)
class StorageConfig:
    output: str = "runs/latest"
    """Run directory: a local path or a pyarrow filesystem URI (s3://..., gs://...)."""
    mode: str = "dense"
    """dense: every activation; exceedances: entries with |x| >= floor plus per-dim stats."""
    floor: float = 3.0
    """Smallest |x| kept in exceedances mode; analysis thresholds must be >= floor."""

    def __post_init__(self):
        _choice("storage.mode", self.mode, ["dense", "exceedances"])


@dataclass(frozen=True)
class AnalysisConfig(Criteria):
    num_actors: int = 2
    """Polars scan actors; layer-sites are split between them."""

    def __post_init__(self):
        super().__post_init__()
        _positive("analysis.num_actors", self.num_actors)

    def criteria(self) -> Criteria:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Criteria)}
        return Criteria(**fields)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _positive(key: str, value) -> None:
    if value < 1:
        raise ConfigError(f"{key}={value}: must be at least 1.")


def _choice(key: str, value, choices: list) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: choose one of {choices}.")


def build(cls, data, key: str = ""):
    """Build dataclass `cls` from a mapping, checking keys and types on the way."""
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping of keys, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"in {key}" if key else "at the top level"
        raise ConfigError(f"unknown key(s) {unknown} {where}; valid keys: {sorted(fields)}.")
    missing = sorted(
        f.name for f in fields.values()
        if f.name not in data and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(f"missing key(s) {missing} in {key or 'the config'}.")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], value, _join(key, name)) for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key or 'config'}: {err}") from None


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _convert(hint, value, key: str):
    """`value` as type `hint`, or a ConfigError naming key, value and type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list.")
        item = args[0]
        items = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (
            hint is not bool and isinstance(value, bool))):
        raise ConfigError(f"{key}={value!r}: expected {hint.__name__}.")
    return value


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


def load_config(source: str | Path | dict, overrides: list[str] = ()) -> RunConfig:
    """Read YAML (or a dict), apply `key=value` overrides, validate."""
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; see configs/ for examples.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err}).") from None
    data = copy.deepcopy(data)
    for text in overrides:
        apply_override(data, *parse_override(text))
    return build(RunConfig, data)

