"""What differs between decoder families: the one table that changes to add a family.

A stage runs the model's own forward (actors/handoff.py), so masks, rotary embeddings,
layer kinds and embedding scales all come from the model's code. What the stage must
still know about a family is only where things are:

- the decoder: `<inner>.<layers>` of the CausalLM (`model.layers` almost everywhere),
  its token embeddings and its final norm (the parts a stage may leave out);
- the module that plays each role in a decoder layer. A site is the *input* of its
  role's module: `ln_attn` what the attention block (self-attention, linear attention,
  state-space mixer) projects into q/k/v, `ln_mlp` what the MLP or MoE block feeds its
  router and experts. In pre-norm layers these are, bit for bit, the outputs of the
  two layer norms; in post-norm and sandwich-norm layers they are not, and the role is
  what LLM.int8() measured.

`FAMILIES` lists every model_type that was checked (README "Supported families" is
generated from it); a model_type not listed runs with `DEFAULT` when its layers have
the default module names, and is refused in one line when they do not.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from common.errors import ModelError
from common.layout import SITES

SITE_ROLES = dict(zip(SITES, ("attention", "mlp")))  # site -> the role of the module it is the input of


class FamilyError(ModelError):
    """A family whose layers cannot be captured; the message names it and what is missing."""


@dataclass(frozen=True)
class Family:
    """Where a decoder family keeps its layers, and which module plays each role."""

    name: str = "decoder"
    attention: tuple[str, ...] = ("self_attn", "linear_attn", "self_attention", "attention", "mamba")
    """Module names of the attention role in a decoder layer; the first one a layer has is used."""
    mlp: tuple[str, ...] = ("mlp", "block_sparse_moe", "feed_forward", "ffn")
    """Module names of the MLP/MoE role (router and experts, or the dense MLP)."""
    inner: str = "model"
    """Attribute path of the CausalLM to the decoder, the module whose forward the stage runs."""
    layers: str = "layers"
    embed: str = "embed_tokens"
    norm: str = "norm"
    head: str = "lm_head"
    experts: str = "experts"
    """The routed experts module inside the MLP block, called as (hidden, top_k_index, top_k_weights)."""
    routed_refusal: str | None = None
    """Why routing and expert captures cannot work for this family (None: they can)."""
    carries: tuple = (0,)
    """What one decoder layer passes to the next, in the order the layer returns it: the
    argument at a position, or of a keyword name (default: the hidden states only)."""
    returns: int = 0
    """How many values a decoder layer returns, the carried ones first (0: just those)."""
    tiny: dict = field(default_factory=dict)
    """Config keys for a small random-init build that the generic sizes do not cover."""
    scales: dict = field(default_factory=dict)
    """Non-default values of fields that scale the forward outside the layers (tests set them)."""
    refuse: str | None = None
    """Why this family cannot be captured; refused before the cluster starts."""
    ray: bool = False
    """Tested through Ray as well as with in-process stages."""

    @property
    def routed(self) -> bool:
        return self.routed_refusal is None

    @property
    def arity(self) -> int:
        """How many values a decoder layer returns."""
        return self.returns or len(self.carries)

    def roles(self) -> dict[str, tuple[str, ...]]:
        return {"attention": self.attention, "mlp": self.mlp}

    def role_module(self, layer: nn.Module, role: str) -> nn.Module | None:
        """The module of `layer` that plays `role` (names may be dotted paths), or None."""
        for name in self.roles()[role]:
            module = layer
            for part in name.split("."):
                module = getattr(module, part, None)
            if isinstance(module, nn.Module) and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                return module
        return None


DEFAULT = Family()


def _family(name: str, attention: tuple[str, ...] = ("self_attn",), mlp: tuple[str, ...] = ("mlp",),
            **changes) -> Family:
    return Family(name=name, attention=attention, mlp=mlp, **changes)


_GRANITE_SCALES = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                   "attention_multiplier": 1 / 64, "logits_scaling": 8.0}
_ROUTED_SCALE = {"routed_scaling_factor": 2.0}
# A dense MLP first: HF's names of the layer types, not a storage mode.
_DENSE_FIRST = {"mlp_layer_types": ["dense"] + ["sparse"] * 5}
_HYBRID = ("self_attn", "linear_attn")

# model_type -> Family. Every entry is covered by tests/test_families.py: a tiny random-init
# checkpoint split into 1, 2 and 3 stages equals the single-process forward bit for bit, and
# its planted outlier is found; refused entries fail in one line before the cluster starts.
FAMILIES: dict[str, Family] = {
    # Mixture-of-Experts decoders.
    "afmoe": _family("AFMoE", scales={"mup_enabled": True, "route_scale": 2.0}),
    "aria_text": _family("Aria (text)"),
    "axk1": _family("A.X K1"),
    "axk2": _family("A.X K2"),
    "bailing_hybrid": _family("Bailing hybrid (linear + MLA attention)"),
    "beam": _family("Beam", scales={"final_logit_softcapping": 3.0}),
    "cohere2_moe": _family("Cohere2-MoE (parallel attention and MoE)", tiny={"first_k_dense_replace": 1},
                           scales={"logit_scale": 0.25}),
    "dbrx": _family("DBRX", attention=("norm_attn_norm.attn",), mlp=("ffn",), inner="transformer",
                    layers="blocks", embed="wte", norm="norm_f", tiny={
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}}),
    "deepseek_v2": _family("DeepSeek-V2", scales=_ROUTED_SCALE),
    "doge": _family("Doge (cross-domain MoE)", tiny={"is_moe": True}),
    "deepseek_v3": _family("DeepSeek-V3 / R1", ray=True),
    "deepseek_v32": _family("DeepSeek-V3.2"),
    "deepseek_v4": _family("DeepSeek-V4"),
    "dots1": _family("dots.llm1", scales=_ROUTED_SCALE),
    "dots3_note_text": _family("dots3 (text)", tiny={
        "swa_num_attention_heads": 4, "swa_num_key_value_heads": 4, "swa_q_lora_rank": 32,
        "swa_kv_lora_rank": 16, "swa_head_dim": 16, "swa_qk_nope_head_dim": 8, "swa_v_head_dim": 16}),
    "ernie4_5_moe": _family("Ernie-4.5-MoE"),
    "exaone_moe": _family("EXAONE-MoE"),
    "flex_olmo": _family("FlexOlmo (post-norm)"),
    "flint": _family("Flint"),
    "gemma4_text": _family("Gemma 4 (text)", refuse=(
        "its layers run a dense MLP and an MoE side by side on differently normalised inputs, so "
        "ln_mlp is not one tensor, and they read per-layer inputs derived from the embeddings")),
    "glm4_moe": _family("GLM-4-MoE", scales=_ROUTED_SCALE),
    "glm4_moe_lite": _family("GLM-4-MoE-lite"),
    "glm_moe_dsa": _family("GLM-MoE-DSA", carries=(0, "prev_topk_indices"), tiny={"indexer_types": ["full", "shared", "shared"] * 2}),
    "gpt_oss": _family("GPT-OSS", ray=True),
    "granitemoe": _family("Granite-MoE", mlp=("block_sparse_moe",), scales=_GRANITE_SCALES),
    "granitemoe_swa": _family("Granite-MoE (sliding window)", mlp=("block_sparse_moe",), scales=_GRANITE_SCALES),
    "granitemoehybrid": _family("Granite-MoE hybrid (Mamba + attention)", attention=("self_attn", "mamba"),
                                mlp=("block_sparse_moe",), scales=_GRANITE_SCALES,
                                tiny={"layer_types": ["linear_attention", "linear_attention", "full_attention"] * 2}),
    "granitemoeshared": _family("Granite-MoE (shared expert)", mlp=("block_sparse_moe",), scales=_GRANITE_SCALES),
    "hunyuan_v1_moe": _family("Hunyuan-MoE"),
    "hy_v3": _family("HY-V3"),
    "hy_v4": _family("HY-V4", carries=(0, "prev_topk_indices"), scales={"hc_magnitude": 1.5}),
    "inkling_text": _family("Inkling (text)", scales={"logits_mup_width_multiplier": 4.0, "log_scaling_n_floor": 8},
                            tiny=_DENSE_FIRST),
    "inkling2_text": _family("Inkling2 (text)", refuse=(
        "its layers pass a growing list of block states to each other; a pipeline stage cannot hand it on")),
    "inkling2_loop_text": _family("Inkling2-Loop (text)", refuse=(
        "it runs a block of its layers several times per forward; a layer's sites are not one value per token")),
    "jamba": _family("Jamba (Mamba + attention)", attention=("self_attn", "mamba"), mlp=("feed_forward",)),
    "jetmoe": _family("JetMoE", attention=("self_attention",)),
    "kimi_linear": _family("Kimi-Linear (KDA + MLA)"),
    "kolibri1": _family("Kolibri1"),
    "laguna": _family("Laguna", scales={"moe_routed_scaling_factor": 2.0, "moe_router_logit_softcapping": 5.0},
                      tiny={"layer_types": ["full_attention", "sliding_attention"] * 3}),
    "lara_mini": _family("Lara-mini (hybrid)", attention=_HYBRID),
    "lfm2_moe": _family("LFM2-MoE (short convolutions + attention)", attention=("self_attn", "conv"),
                        mlp=("feed_forward",), scales=_ROUTED_SCALE,
                        tiny={"layer_types": ["conv", "conv", "full_attention"] * 2}),
    "llama4_text": _family("Llama 4 (text)", mlp=("feed_forward",), scales={"floor_scale": 4, "attn_scale": 0.5},
                           routed_refusal="weights each token before its experts and runs every expert on "
                                          "every token"),
    "longcat_flash": _family("LongCat-Flash", refuse=(
        "each layer holds two attention and two MLP blocks plus a shortcut MoE; the two sites are not one module each")),
    "mellum": _family("Mellum", tiny={"layer_types": ["full_attention", "sliding_attention"] * 3, **_DENSE_FIRST}),
    "mimo_v2_flash": _family("MiMo-V2-Flash", scales={"attention_value_scale": 0.5, **_ROUTED_SCALE}),
    "minimax": _family("MiniMax (lightning + softmax attention)", scales={
        "full_attn_alpha_factor": 1.5, "full_attn_beta_factor": 0.75, "linear_attn_alpha_factor": 1.25,
        "linear_attn_beta_factor": 0.5, "mlp_alpha_factor": 1.5, "mlp_beta_factor": 0.5}),
    "minimax_m2": _family("MiniMax-M2"),
    "minimax_m3_vl_text": _family("MiniMax-M3 (text)", tiny={
        "layer_types": ["full_attention", "minimax_m3_sparse"] * 3, **_DENSE_FIRST}),
    "mixtral": _family("Mixtral"),
    "nemotron_h": _family("Nemotron-H", refuse=(
        "each of its layers is a single mixer (Mamba, attention, MLP or MoE), so a layer has one site, not two")),
    "olmoe": _family("OLMoE"),
    "phimoe": _family("PhiMoE"),
    "qwen2_moe": _family("Qwen2-MoE"),
    "qwen3_5_moe_text": _family("Qwen3.5-MoE (text)", attention=_HYBRID),
    "qwen3_moe": _family("Qwen3-MoE", tiny={"use_sliding_window": False, "mlp_only_layers": []}),
    "qwen4_exp_text": _family("Qwen4-exp (text; hyper-connections)", attention=_HYBRID, tiny={
        "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
        "indexer_compress_ratio": 4}),
    "qwen3_next": _family("Qwen3-Next (gated delta net + attention)", attention=_HYBRID, ray=True),
    "sarvam_mla": _family("Sarvam (MLA)"),
    "sarvam_moe": _family("Sarvam-MoE"),
    "solar_open": _family("Solar-Open", scales=_ROUTED_SCALE),
    "zaya": _family("ZAYA", carries=(0, 1), tiny={"num_experts_per_tok": 1, "layer_types": ["hybrid", "hybrid_sliding"] * 3}),
    # Dense baselines.
    "bloom": _family("BLOOM", attention=("self_attention",), inner="transformer", layers="h",
                     embed="word_embeddings", norm="ln_f", returns=2),
    "gpt2": _family("GPT-2", attention=("attn",), inner="transformer", layers="h", embed="wte", norm="ln_f"),
    "gpt_neox": _family("GPT-NeoX / Pythia", attention=("attention",), inner="gpt_neox", embed="embed_in",
                        norm="final_layer_norm"),
    "opt": _family("OPT", mlp=("fc1",), inner="model.decoder", norm="final_layer_norm"),
    "cohere": _family("Cohere (parallel attention and MLP)", scales={"logit_scale": 0.25}),
    "gemma2": _family("Gemma 2 (sandwich norms)", scales={
        "final_logit_softcapping": 3.0, "attn_logit_softcapping": 0.05, "query_pre_attn_scalar": 32}),
    "granite": _family("Granite", scales=_GRANITE_SCALES),
    "llama": _family("Llama", ray=True),
    "mistral": _family("Mistral"),
    "olmo2": _family("OLMo 2 (post-norm)"),
    "qwen3": _family("Qwen3"),
}


def family_of(model_type: str) -> Family:
    """The table's entry for `model_type`, else the default layout."""
    return FAMILIES.get(model_type, replace(DEFAULT, name=model_type))


def site_modules(family: Family, layer: nn.Module, index: int, model_type: str) -> dict[str, nn.Module]:
    """{site: module whose input is captured} for one decoder layer, or FamilyError."""
    found = {site: family.role_module(layer, role) for site, role in SITE_ROLES.items()}
    missing = {site: family.roles()[SITE_ROLES[site]] for site, module in found.items() if module is None}
    if missing:
        children = sorted(name for name, _ in layer.named_children())
        raise FamilyError(
            f"model_type={model_type!r}: decoder layer {index} ({type(layer).__name__}) has no module for "
            + "; ".join(f"{site} (looked for {list(names)})" for site, names in missing.items())
            + f"; its modules are {children}. To add the family, map its module names in "
            "actors/families.py:FAMILIES."
        )
    return found


def support_table() -> str:
    """README's table of families, from FAMILIES (tests/test_families.py keeps them equal)."""
    lines = ["| model_type | family | attention block | MLP / MoE block | tested |", "|---|---|---|---|---|"]
    for model_type, family in sorted(FAMILIES.items()):
        if family.refuse:
            lines.append(f"| `{model_type}` | {family.name} | | | refused: {family.refuse} |")
            continue
        tested = "1/2/3 stages" + (", Ray" if family.ray else "")
        attention, mlp = (" or ".join(f"`{name}`" for name in names) for names in (family.attention, family.mlp))
        lines.append(f"| `{model_type}` | {family.name} | {attention} | {mlp} | {tested} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(support_table())


def inner_model(model: nn.Module, family: Family) -> nn.Module:
    """The module whose forward runs the decoder (`model.model` in most families)."""
    for name in family.inner.split("."):
        model = getattr(model, name)
    return model
