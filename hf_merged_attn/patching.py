"""Walk a GPT-2 model and swap its self-attention modules for `MergedGPT2Attention`, in place."""

from __future__ import annotations

from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from .attention import MergedGPT2Attention
from .config import PatchConfig


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def _self_attentions(model: nn.Module) -> list[tuple[nn.Module, str, GPT2Attention]]:
    """(parent, attribute name, module) for every GPT2Attention in `model`, in module order."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, GPT2Attention):
                found.append((parent, name, child))
    return found


def patch_model(
    model: nn.Module,
    mode: str = "covariance",
    *,
    rank: int | None = None,
    layers: list[int] | None = None,
) -> nn.Module:
    """Replace GPT-2 self-attention with merged query–key attention, seeded to compute exactly what it did.

    Works on any GPT-2 model class of transformers (GPT2Model, GPT2LMHeadModel, GPT2For*...). The model is
    changed in place and returned. The patch is recorded as `model.config.merged_attn`.

    Args:
        model: a GPT-2 model (anything whose modules include `GPT2Attention`).
        mode: "covariance" — one d x d matrix S_h = Wq_h Wk_hᵀ per head (exact); or "lowrank" — S_h ≈ U_h V_hᵀ
            at rank r (exact for r = head size, best rank-r approximation below, extra capacity above).
        rank: r, required for "lowrank" (1 <= r <= hidden size); must be None for "covariance".
        layers: block indices to patch (default: all).

    Returns:
        The same `model` object, patched.

    Raises:
        ValueError: bad mode / rank / layers, a model that is already patched, or one with no GPT2Attention.
        NotImplementedError: GPT-2 with cross-attention (`add_cross_attention=True`).
    """
    patch = PatchConfig(mode, rank, layers)
    found = _self_attentions(model)
    if any(isinstance(module, MergedGPT2Attention) for _, _, module in found):
        raise ValueError(
            f"{type(model).__name__} is already patched (config.merged_attn="
            f"{getattr(model.config, 'merged_attn', None)}); patching twice would seed from merged weights. "
            "Patch a fresh copy of the stock model instead."
        )
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no GPT2Attention module; patch_model supports GPT-2 models "
            "(GPT2Model, GPT2LMHeadModel, GPT2For...). Load a GPT-2 checkpoint, e.g. AutoModelForCausalLM('gpt2')."
        )
    if any(module.is_cross_attention for _, _, module in found):
        raise NotImplementedError(
            "GPT-2 with add_cross_attention=True (an encoder-decoder setup) is not supported: only decoder "
            "self-attention is merged. Use a decoder-only GPT-2 (add_cross_attention=False)."
        )
    first = found[0][2]
    patch.check_against(first.embed_dim, len(found))
    for parent, name, old in found:
        if old.layer_idx not in patch.layers:
            continue
        new = MergedGPT2Attention.from_gpt2_attention(old, patch.mode, patch.rank)
        # Hooks already on the old module (e.g. transformers' output_attentions recorder, installed lazily
        # on first use) move with it, so outputs keep being recorded after the swap.
        for hooks in _HOOK_DICTS:
            getattr(new, hooks).update(getattr(old, hooks))
        setattr(parent, name, new)
    model.config.merged_attn = patch.to_dict()
    return model
