"""Seeded, cached tiny checkpoints of any decoder family, with planted outlier features.

Tests and the default job need a real Hugging Face checkpoint directory (config,
safetensors weights, tokenizer) without network access. `build_tiny` makes one from a
`TinySpec`: a random-init model of the family `arch` (any causal-LM model_type of the
installed transformers, shrunk to the spec's sizes by `cluster/small_config.py`), plus
a byte-level BPE tokenizer trained locally on standard-library docstrings.

Outlier features are planted in its weights (cluster.plants).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers
import torch
import transformers

from cluster.data import load_texts
from cluster.plants import Plant, plant_weights
from cluster.small_config import small_config
from common.errors import ConfigError

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
# Enough docstrings for a stable 1k-token BPE vocab while keeping training well under a second.
TOKENIZER_TRAIN_CHARS = 300_000
# Bump when the build steps change, so cached checkpoints from older steps are not reused.
BUILD_RECIPE = 2


def _fail(key: str, value, rule: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: {rule}")


@dataclass(frozen=True)
class TinySpec:
    """Family, shape, seed and plants of a tiny checkpoint.

    `arch` is a model_type; the sizes map onto its config's own keys, and `config` sets any
    other key of it (e.g. {embedding_multiplier: 12}). `dtype` is the dtype it is saved in.
    """

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
    config: tuple = ()
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "plants", tuple(
            Plant(**p) if isinstance(p, dict) else p for p in self.plants))
        object.__setattr__(self, "config", _frozen(self.config))
        if self.arch not in transformers.CONFIG_MAPPING:
            _fail("arch", self.arch, "must be a model_type of the installed transformers, e.g. 'qwen3_moe'")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            _fail("dtype", self.dtype, "must be float32, bfloat16 or float16")
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
            _fail("plants", plant, "must hold Plant objects or mappings")
        if plant.dim >= self.hidden_size:
            _fail("plants.dim", plant.dim, f"must be < hidden_size ({self.hidden_size})")
        outside = [i for i in plant.layers if i >= self.num_layers]
        if outside:
            _fail("plants.layers", list(plant.layers), f"must all be < num_layers ({self.num_layers})")

    @property
    def overrides(self) -> dict:
        """`config` as the mapping it was given as."""
        return {key: _thawed(value) for key, value in self.config}

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["config"] = self.overrides
        return data


def _frozen(value):
    """A mapping as sorted (key, value) pairs and lists as tuples, so a spec hashes."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value):
    return list(value) if isinstance(value, tuple) else value


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
    plant_weights(model, spec.plants)
    transformers.utils.logging.disable_progress_bar()  # keep run logs to our own lines
    model.to(getattr(torch, spec.dtype)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "tiny_spec.json").write_text(json.dumps(spec.to_dict(), indent=2))


_TOKENIZERS: dict = {}


def train_tokenizer(vocab_size: int, max_length: int) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE trained on a bounded prefix of the stdlib docstrings (once per process)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size not in _TOKENIZERS:
        bpe = tokenizers.Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe.train_from_iterator(_bounded_texts(TOKENIZER_TRAIN_CHARS), trainer=trainer)
        _TOKENIZERS[vocab_size] = bpe.to_str()
    bos, eos, pad = SPECIAL_TOKENS
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(_TOKENIZERS[vocab_size]),
        bos_token=bos, eos_token=eos, pad_token=pad, model_max_length=max_length)


def _bounded_texts(max_chars: int):
    total = 0
    for text in load_texts("stdlib"):
        if total >= max_chars:
            return
        total += len(text)
        yield text


def _init_model(spec: TinySpec, tokenizer) -> transformers.PreTrainedModel:
    config = small_config(
        spec.arch, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
        num_experts=spec.num_experts, top_k=spec.top_k, expert_size=spec.expert_size,
        num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, vocab_size=spec.vocab_size,
        max_position=spec.max_position, extra={
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, **spec.overrides})
    torch.manual_seed(spec.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
