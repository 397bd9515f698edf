"""The registry: `config.model_type` -> the family's `ArchitectureSpec` (from its adapter file), and refusals.

Adding a family is one adapter file (see the checklist in `merged_attention.ArchitectureSpec`) and one line here.
"""

from __future__ import annotations

from torch import nn

from . import (
    modeling_merged_bert,
    modeling_merged_bloom,
    modeling_merged_gpt2,
    modeling_merged_llama,
    modeling_merged_mistral,
    modeling_merged_opt,
    modeling_merged_qwen2,
)
from .merged_attention import ArchitectureSpec

SPECS: tuple[ArchitectureSpec, ...] = (
    modeling_merged_gpt2.SPEC,
    modeling_merged_opt.SPEC,
    modeling_merged_bloom.SPEC,
    modeling_merged_bert.SPEC,
    modeling_merged_bert.ROBERTA_SPEC,
    modeling_merged_llama.SPEC,
    modeling_merged_qwen2.SPEC,
    modeling_merged_mistral.SPEC,
)
REGISTRY: dict[str, ArchitectureSpec] = {model_type: spec for spec in SPECS for model_type in spec.model_types}
MERGED_REGISTRY: dict[str, ArchitectureSpec] = {spec.config_class.model_type: spec for spec in SPECS}

# Families whose positions are rotary (RoPE): the rotation of the query and the key depends on their positions and
# sits between Wq and Wk, so Wq·Wkᵀ is not one position-free matrix and cannot be merged exactly. The registered rotary
# families (Llama, Qwen2, Mistral) take the rotary latent mode; the others here are refused with that reason.
ROTARY_MODEL_TYPES = (
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3", "phi",
    "phi3", "gpt_neox", "gptj", "codegen", "falcon", "olmo", "olmo2", "stablelm", "starcoder2", "cohere", "glm",
    "deepseek_v2", "deepseek_v3", "granite", "persimmon", "gpt_neox_japanese", "internlm2", "exaone", "smollm3",
)
_ROTARY_CONFIG_FIELDS = ("rope_theta", "rope_parameters", "rope_scaling", "rotary_dim", "rotary_pct", "rotary_emb_base")


def supported() -> str:
    """The supported families and their model types, for error messages."""
    return ", ".join(f"{spec.family} ({', '.join(spec.model_types)})" for spec in SPECS)


def _is_rotary(config) -> bool:
    if getattr(config, "model_type", None) in ROTARY_MODEL_TYPES:
        return True
    if getattr(config, "position_embedding_type", None) in ("rotary", "rope"):
        return True
    return any(getattr(config, name, None) is not None for name in _ROTARY_CONFIG_FIELDS)


def spec_for_model(model: nn.Module) -> ArchitectureSpec:
    """The registry entry of a stock model, from `model.config.model_type`.

    Raises:
        ValueError: the model is already patched (a merged model type), or has no config.
        NotImplementedError: an unregistered family; for rotary ones, saying why they cannot be merged.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in MERGED_REGISTRY:
        raise ValueError(
            f"{type(model).__name__} is already patched (config.merged_attn={getattr(config, 'merged_attn', None)}); "
            "patching twice would seed from merged weights. Patch a fresh copy of the stock model, or call "
            "unpatch_model(model) first."
        )
    if model_type in REGISTRY:
        return REGISTRY[model_type]
    if config is None:
        raise ValueError(
            f"{type(model).__name__} has no `config`; patch_model takes a transformers model (a PreTrainedModel, "
            f"e.g. from AutoModelForCausalLM.from_pretrained) of a supported family: {supported()}."
        )
    if _is_rotary(config):
        raise NotImplementedError(
            f"{type(model).__name__} (model_type {model_type!r}) uses rotary position embeddings (RoPE) and has no "
            "adapter here. Rotary families take the rotary latent mode (patch_model(model, 'latent', rank=r_c, "
            f"rope_pairs=r)) through an adapter; supported: {supported()}."
        )
    raise NotImplementedError(
        f"{type(model).__name__} (model_type {model_type!r}) is not a supported family; supported: {supported()}. "
        "A family whose positions do not act between Wq and Wk can be added with one adapter file "
        "(see hf_merged_attn.merged_attention.ArchitectureSpec)."
    )


def spec_for_patched(model: nn.Module) -> ArchitectureSpec | None:
    """The registry entry of a patched model (merged config), or None if the model is not patched."""
    return MERGED_REGISTRY.get(getattr(getattr(model, "config", None), "model_type", None))
