"""A small config of any decoder family: the spec's sizes mapped onto the family's own keys.

Families name the same size differently (`num_experts`, `num_local_experts`,
`n_routed_experts`; `moe_intermediate_size` or `intermediate_size` for an expert), and
many have sizes of their own (MLA ranks, linear-attention and Mamba heads, indexers).
`small_config` works in three passes:

1. every key below that the config class has (directly or through its `attribute_map`)
   is set from the generic sizes;
2. every layer kind the family's full-size default uses (`layer_types`, `mlp_layer_types`,
   ...) is made to appear among the small model's layers, so a split meets them all;
3. the family's own `tiny` overrides (actors/families.py), then `extra`.
"""

from __future__ import annotations

import dataclasses
import functools

import transformers

LAYER_LISTS = ("layer_types", "mlp_layer_types", "indexer_types", "layers_block_type")


def generic_values(hidden: int, layers: int, heads: int, kv_heads: int, experts: int, top_k: int,
                   expert: int, vocab: int, positions: int, mla: bool, moe_size: bool) -> dict:
    """Keys that mean the same in every family that has them."""
    head = hidden // heads
    values = {
        "vocab_size": vocab, "hidden_size": hidden, "d_model": hidden,
        "num_hidden_layers": layers, "n_layers": layers, "num_layers": layers,
        "num_attention_heads": heads, "n_heads": heads, "num_key_value_heads": heads if mla else kv_heads,
        "head_dim": 8 if mla else head, "kv_channels": head,  # MLA: head_dim is the rope part
        "max_position_embeddings": positions, "model_max_length": positions, "max_seq_len": positions,
        # Feed-forward widths: intermediate_size is the expert's where the family has no MoE size.
        "intermediate_size": 2 * expert if moe_size else expert, "moe_intermediate_size": expert,
        "expert_ffn_hidden_size": expert, "intermediate_size_mlp": 2 * expert,
        "dense_intermediate_size": 2 * expert, "prefix_dense_intermediate_size": 2 * expert,
        "num_experts": experts, "num_local_experts": experts, "n_routed_experts": experts,
        "moe_num_experts": experts, "num_experts_per_tok": top_k, "moe_topk": top_k, "moe_k": top_k,
        "num_experts_per_token": top_k, "zero_expert_num": experts,
        "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
        "shared_expert_intermediate_size": expert, "shared_intermediate_size": expert,
        "moe_shared_expert_intermediate_size": expert, "shared_experts_intermediate_size": expert,
        # Multi-head latent attention.
        "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": head,
        # Linear attention (gated delta net, KDA, lightning) and Mamba.
        "linear_num_key_heads": max(1, heads // 2), "linear_num_value_heads": heads,
        "linear_key_head_dim": head, "linear_value_head_dim": head, "linear_head_dim": head,
        "linear_num_heads": heads, "block_size": 8,
        "mamba_n_heads": hidden // 8, "mamba_num_heads": hidden // 8, "mamba_d_head": 16, "mamba_head_dim": 16,
        "mamba_expand": 2, "expand": 2, "mamba_d_state": 16, "ssm_state_size": 16,
        "mamba_chunk_size": 8, "chunk_size": 8, "mamba_dt_rank": 8, "use_mamba_kernels": False,
        # Sparse-attention indexers.
        "index_n_heads": 2, "index_head_dim": 16, "index_topk": 8,
        "index_block_size": 4, "index_topk_blocks": 2, "index_local_blocks": 1,
        # Windows and chunks small enough to matter in a few dozen tokens.
        "sliding_window": 8, "sliding_window_size": 8, "attention_chunk_size": 8, "use_sliding_window": True,
        "max_window_layers": layers // 2,
        "swa_num_attention_heads": heads, "swa_num_key_value_heads": kv_heads, "swa_head_dim": head,
        "router_hidden_size": 16, "o_lora_rank": 16, "o_groups": 2, "gated_norm_rank": 4, "loop_gate_rank": 4,
        "rotary_dim": head // 2, "num_attention_heads_per_layer": [heads] * layers,
        "loop_layer_index_start": 2, "loop_layer_index_end": 4, "n_layers_per_attn_res_block": 2,
        "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        # Dense and MoE layers, and every attention kind, within a few layers.
        "first_k_dense_replace": 1, "num_dense_layers": 1, "moe_layer_start_index": 1,
        "moe_layer_end_index": layers - 1, "mlp_only_layers": [0], "interleave_moe_layer_step": 2,
        "no_rope_layer_interval": 3, "global_attn_every_n_layers": 3, "sliding_window_pattern": 3,
        "layer_group_size": 3, "attn_layer_period": 3, "attn_layer_offset": 1, "num_nextn_predict_layers": 0,
    }
    return values


@functools.lru_cache(maxsize=None)
def _defaults(model_type: str) -> dict:
    return transformers.CONFIG_MAPPING[model_type]().to_dict()


def _key(cls, name: str) -> str | None:
    """The constructor keyword for `name` in config class `cls`, or None if it has none."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    mapped = (getattr(cls, "attribute_map", {}) or {}).get(name)
    return name if name in fields else mapped if mapped in fields else None


def _sized(model_type: str, sizes: dict) -> dict:
    """The generic values under the config class's own keys."""
    cls, defaults = transformers.CONFIG_MAPPING[model_type], _defaults(model_type)

    mapped = getattr(cls, "attribute_map", {}) or {}

    def default(name):
        key = _key(cls, name)
        if key is None:
            return None
        # NOTE: to_dict() may list a value under the mapped name or the alias.
        return next((defaults[k] for k in (key, name, mapped.get(name), mapped.get(key)) if k in defaults), None)

    values = generic_values(**sizes, mla=_key(cls, "kv_lora_rank") is not None,
                            moe_size=any(_key(cls, k) for k in ("moe_intermediate_size", "expert_ffn_hidden_size")))
    values["q_lora_rank"] = 32 if default("q_lora_rank") else None  # None: the family's q has no LoRA
    for name in ("n_group", "num_expert_group"):  # grouped routing: groups must divide the experts
        if default(name) is not None:
            values[name], values["topk_group"] = (2 if default(name) > 1 else 1), 1
    if default("mamba_n_groups") is not None or default("n_groups") is not None:
        values["mamba_n_groups"] = values["n_groups"] = 2 if (default("n_groups") or 1) > 1 else 1
    for name, token in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        ids = default(name)
        ids = ids if isinstance(ids, list) else [ids]
        if any(isinstance(i, int) and i >= sizes["vocab"] for i in ids):
            values[name] = token  # special ids must lie inside the small vocabulary
    if default("unpadded_vocab_size") is not None:
        values["unpadded_vocab_size"] = sizes["vocab"]
    out = {}
    for name, value in values.items():
        key = _key(cls, name)
        if key is not None and key not in out:
            out[key] = value
    return out


def _with_every_kind(pattern: list, kinds: list) -> list:
    """`pattern` with each of `kinds` in it, replacing later entries of over-represented kinds."""
    pattern = list(pattern)
    for kind in kinds:
        if kind in pattern:
            continue
        spare = [i for i in range(len(pattern) - 1, -1, -1) if pattern.count(pattern[i]) > 1]
        if not spare:
            raise ValueError(f"cannot fit layer kind {kind!r} into {pattern}")
        pattern[spare[0]] = kind
    return pattern


def _every_kind(model_type: str, kwargs: dict, layers: int) -> dict:
    """Add per-layer kind lists so that every kind of the full-size default appears."""
    cls, defaults = transformers.CONFIG_MAPPING[model_type], _defaults(model_type)
    probe = cls(**kwargs)
    for name in LAYER_LISTS:
        key = _key(cls, name)
        full, current = defaults.get(key), getattr(probe, key, None) if key else None
        if key is None or key in kwargs or not isinstance(full, (list, tuple)) \
                or not isinstance(current, (list, tuple)):
            continue
        pattern = [current[i % len(current)] for i in range(layers)]
        kinds = list(dict.fromkeys(full))
        if set(kinds) - set(pattern) or len(pattern) != len(current):
            kwargs[key] = _with_every_kind(pattern, kinds)
    return kwargs


def small_config(model_type: str, *, num_layers: int = 6, hidden_size: int = 64, num_experts: int = 4,
                 top_k: int = 2, expert_size: int = 32, num_heads: int = 4, num_kv_heads: int = 2,
                 vocab_size: int = 512, max_position: int = 256, extra: dict | None = None):
    """A config of `model_type` at these sizes (see the module docstring)."""
    from actors.families import family_of

    sizes = dict(hidden=hidden_size, layers=num_layers, heads=num_heads, kv_heads=num_kv_heads,
                 experts=num_experts, top_k=top_k, expert=expert_size, vocab=vocab_size, positions=max_position)
    kwargs = {**_sized(model_type, sizes), **family_of(model_type).tiny, **(extra or {})}
    kwargs = _every_kind(model_type, kwargs, num_layers)
    return transformers.CONFIG_MAPPING[model_type](**kwargs)
