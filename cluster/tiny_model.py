"""Seeded, cached tiny MoE checkpoints with planted outlier features.

Tests and the default job need a real Hugging Face checkpoint directory
(config, safetensors weights, tokenizer) without network access. `build_tiny`
makes one from a `TinySpec`: a random-init Qwen3-MoE or OLMoE model whose
RMSNorm weights are scaled at chosen hidden dims ("plants"), plus a byte-level
BPE tokenizer trained locally on standard-library docstrings.

Why a plant makes an outlier: RMSNorm returns ``x / rms(x) * weight``. In a
random-init model the normalized vector ``x / rms(x)`` is close to N(0, 1) per
dim, so the norm output at dim ``d`` is about ``weight[d] * N(0, 1)``. With
``weight[d] = 40`` the output has |x| >= 6 whenever |N(0, 1)| >= 0.15, i.e. at
about 88% of tokens, while unplanted dims (weight 1) reach 6 with probability
about 2e-9. Planting in most layers satisfies the layer criterion; a plant in
one layer, or a small scale such as 1.5, does not, which gives negative controls.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers
import torch
import transformers

from actors.capture import SITES as SITE_MODULES
from cluster.data import load_texts

ARCHS = ("qwen3_moe", "olmoe")
SITES = tuple(SITE_MODULES)
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
# Enough docstrings for a stable 1k-token BPE vocab while keeping training well under a second.
TOKENIZER_TRAIN_CHARS = 300_000
# Bump when the build steps change, so cached checkpoints from older steps are not reused.
BUILD_RECIPE = 1


def _fail(key: str, value, rule: str) -> None:
    raise ValueError(f"{key}={value!r} is invalid: {rule}")


@dataclass(frozen=True)
class Plant:
    """Scale the norm weight at `dim` by `scale` in `layers`, at each of `sites`.

    `layers` and `sites` accept lists or tuples and are stored as tuples so specs hash.
    """

    dim: int
    layers: tuple[int, ...]
    scale: float
    sites: tuple[str, ...] = SITES

    def __post_init__(self) -> None:
        for key in ("layers", "sites"):
            value = getattr(self, key)
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, range)):
                _fail(key, value, "must be a list")
            object.__setattr__(self, key, tuple(value))
        if not _is_index(self.dim):
            _fail("dim", self.dim, "must be an integer >= 0")
        if not self.layers or not all(_is_index(i) for i in self.layers):
            _fail("layers", list(self.layers), "must be a non-empty list of integers >= 0")
        if len(set(self.layers)) != len(self.layers):
            _fail("layers", list(self.layers), "must not repeat a layer")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) \
                or not math.isfinite(self.scale) or self.scale == 0:
            _fail("scale", self.scale, "must be a finite non-zero number")
        if not self.sites or not set(self.sites) <= set(SITES) or len(set(self.sites)) != len(self.sites):
            _fail("sites", list(self.sites), f"must be a non-empty subset of {list(SITES)}")


@dataclass(frozen=True)
class TinySpec:
    """Shape, seed and plants of a tiny MoE checkpoint; every layer is an MoE layer."""

    arch: str = "qwen3_moe"
    num_layers: int = 8
    hidden_size: int = 128
    num_experts: int = 8
    top_k: int = 2
    expert_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 1024
    max_position: int = 4096
    seed: int = 0
    plants: tuple[Plant, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "plants", tuple(self.plants))
        if self.arch not in ARCHS:
            _fail("arch", self.arch, f"must be one of {list(ARCHS)}")
        self._check_sizes()
        for plant in self.plants:
            self._check_plant(plant)

    def _check_sizes(self) -> None:
        for key in ("num_layers", "hidden_size", "num_experts", "top_k", "expert_size",
                    "num_heads", "num_kv_heads", "max_position"):
            value = getattr(self, key)
            if not _is_index(value) or value < 1:
                _fail(key, value, "must be a positive integer")
        if not _is_index(self.seed):
            _fail("seed", self.seed, "must be an integer >= 0")
        if self.top_k > self.num_experts:
            _fail("top_k", self.top_k, f"must be <= num_experts ({self.num_experts})")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            _fail("num_heads", self.num_heads,
                  f"must divide hidden_size ({self.hidden_size}) into an even head size (for RoPE)")
        if self.num_heads % self.num_kv_heads:
            _fail("num_kv_heads", self.num_kv_heads, f"must divide num_heads ({self.num_heads})")
        # Byte-level BPE needs its 256 byte tokens and the special tokens before any merge.
        if not _is_index(self.vocab_size) or self.vocab_size < 512:
            _fail("vocab_size", self.vocab_size, "must be an integer >= 512")

    def _check_plant(self, plant: Plant) -> None:
        if not isinstance(plant, Plant):
            _fail("plants", plant, "must hold Plant objects (or dicts via TinySpec.from_dict)")
        if plant.dim >= self.hidden_size:
            _fail("plants.dim", plant.dim, f"must be < hidden_size ({self.hidden_size})")
        outside = [i for i in plant.layers if i >= self.num_layers]
        if outside:
            _fail("plants.layers", list(plant.layers), f"must all be < num_layers ({self.num_layers})")

    @classmethod
    def from_dict(cls, data: dict) -> TinySpec:
        """Build a spec from plain data (e.g. YAML); `plants` is a list of dicts."""
        if not isinstance(data, dict):
            _fail("spec", data, "must be a mapping of TinySpec fields")
        _reject_unknown(data, cls, "TinySpec")
        values = dict(data)
        plants = values.pop("plants", ())
        for plant in plants:
            if not isinstance(plant, dict):
                _fail("plants", plant, "each plant must be a mapping with keys dim, layers, scale, sites")
            _reject_unknown(plant, Plant, "Plant")
        return cls(**values, plants=tuple(Plant(**plant) for plant in plants))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _reject_unknown(data: dict, cls, name: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"unknown {name} keys {unknown}; valid keys are {valid}")


def default_plants(num_layers: int = 8, hidden_size: int = 128) -> tuple[Plant, ...]:
    """Two true outliers and two negative controls for a model of this size.

    True outliers: two dims at scale 40 in the first three quarters of the
    layers, both sites (far above the 25%-of-layers and 6%-of-tokens bars).
    Controls: one dim at scale 40 in a single layer (fails the layer bar when
    num_layers > 4) and one at scale 1.5 in every layer. The weak dim peaks
    near 1.5 x 4.8 (the largest normalized value over a few thousand tokens),
    so it may touch 6 at a handful of tokens, but never near 6% of them.
    For the default 8 x 128 model these are dims 7 and 77 (true), 100 and 33.
    """
    strong_layers = tuple(range(max(1, math.ceil(num_layers * 3 / 4))))
    strong_a, strong_b, lone, weak = (hidden_size * d // 128 for d in (7, 77, 100, 33))
    return (
        Plant(dim=strong_a, layers=strong_layers, scale=40.0),
        Plant(dim=strong_b, layers=strong_layers, scale=40.0),
        Plant(dim=lone, layers=(num_layers // 2,), scale=40.0),
        Plant(dim=weak, layers=tuple(range(num_layers)), scale=1.5),
    )


DEFAULT_PLANTS = default_plants()
# The dims of DEFAULT_PLANTS that meet the outlier criteria in the default spec.
DEFAULT_OUTLIER_DIMS = tuple(plant.dim for plant in DEFAULT_PLANTS[:2])  # (7, 77)


def build_tiny(spec: TinySpec, cache_dir: str | Path) -> str:
    """A local checkpoint directory for `spec`, built once and reused from `cache_dir`.

    The build goes to a temporary directory inside `cache_dir` and is renamed
    into place, so a crashed or concurrent build never leaves a partial
    checkpoint at the final path.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"tiny-{spec.arch}-{spec_digest(spec)}"
    if target.is_dir():
        return str(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    try:
        _write_checkpoint(spec, staging)
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():
            raise
        # Another process finished the same build first; its copy is equivalent.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def spec_digest(spec: TinySpec) -> str:
    """Cache key: the spec plus the library versions that shape the saved files."""
    key = {"spec": spec.to_dict(), "transformers": transformers.__version__,
           "tokenizers": tokenizers.__version__, "torch": torch.__version__,
           # stdlib docstrings (tokenizer training text) change between Python versions
           "python": platform.python_version(), "recipe": BUILD_RECIPE}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _write_checkpoint(spec: TinySpec, out_dir: Path) -> None:
    tokenizer = train_tokenizer(spec.vocab_size, spec.max_position)
    model = _init_model(spec, tokenizer)
    plant_norm_weights(model, spec.plants)
    transformers.utils.logging.disable_progress_bar()  # keep run logs to our own lines
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "tiny_spec.json").write_text(json.dumps(spec.to_dict(), indent=2))


def train_tokenizer(vocab_size: int, max_length: int) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE trained on a bounded prefix of the stdlib docstrings."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_bounded_texts(TOKENIZER_TRAIN_CHARS), trainer=trainer)
    bos, eos, pad = SPECIAL_TOKENS
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad,
        model_max_length=max_length)


def _bounded_texts(max_chars: int):
    total = 0
    for text in load_texts("stdlib"):
        if total >= max_chars:
            return
        total += len(text)
        yield text


def _init_model(spec: TinySpec, tokenizer) -> transformers.PreTrainedModel:
    config = model_config(spec, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(spec.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def model_config(spec: TinySpec, bos_id: int, eos_id: int, pad_id: int) -> transformers.PreTrainedConfig:
    """HF config for `spec`, with every decoder layer an MoE layer."""
    common = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position, num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k, bos_token_id=bos_id, eos_token_id=eos_id,
        pad_token_id=pad_id, tie_word_embeddings=False)
    if spec.arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, moe_intermediate_size=spec.expert_size,
            intermediate_size=spec.expert_size * spec.top_k,  # unused: no dense MLP layers
            decoder_sparse_step=1, mlp_only_layers=[])
    return transformers.OlmoeConfig(**common, intermediate_size=spec.expert_size)


def plant_norm_weights(model, plants: tuple[Plant, ...]) -> None:
    """Multiply the RMSNorm weight at each plant's dim, layer and site by its scale."""
    layers = model.model.layers
    with torch.no_grad():
        for plant in plants:
            for index in plant.layers:
                for site in plant.sites:
                    norm = getattr(layers[index], SITE_MODULES[site])
                    norm.weight[plant.dim] *= plant.scale
