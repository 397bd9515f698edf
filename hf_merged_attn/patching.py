"""Patch a GPT-2 model in place (seeded from its own weights), and export it back to stock GPT-2."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from .calibration import collect_attention_moments
from .config import PatchConfig
from .configuration_merged_gpt2 import MergedGPT2Config
from .modeling_merged_gpt2 import MERGED_CLASSES, MergedGPT2Attention
from .seeding import (
    covariance_from_qk,
    heads_to_linear,
    linear_to_heads,
    lowrank_from_qk,
    merge_gpt2_qkv,
    qk_from_homogeneous,
    qk_singular_values,
    rank_for_energy,
    split_gpt2_qkv,
    whitened_lowrank_from_qk,
)

logger = logging.getLogger(__name__)

# Hooks on a swapped module move to its replacement, e.g. transformers' output_attentions recorder,
# which is installed lazily on first use, so outputs keep being recorded after the swap.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)

# rank(S̃_h) <= hd is needed for an exact export; fp32 weights carry ~1e-7 relative round-off, so a tail
# below 1e-5 of ‖S̃_h‖ is round-off, not lost structure.
EXACT_EXPORT_TOL = 1e-5


def _attentions(model: nn.Module, kind: type) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, module) for every module of type `kind` in `model`, in module order."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, kind)
    ]


def _swap(parent: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    for hooks in _HOOK_DICTS:
        getattr(new, hooks).update(getattr(old, hooks))
    new.train(old.training)
    setattr(parent, name, new)


def seeded_attention(
    attn: GPT2Attention, mode: str, rank: int | None = None, *, moment: torch.Tensor | None = None
) -> MergedGPT2Attention:
    """A MergedGPT2Attention computing the same scores as stock `attn` (shares its c_proj and dropouts).

    With `moment` (lowrank only) — E[x̃ᵀx̃] ((d+1) x (d+1)) of this layer's input x̃ = [x, 1], from
    `collect_attention_moments` — factors below the head size are the activation-aware ("whitened") ones,
    least score error on those inputs, instead of the best rank-r approximation of the weights.
    """
    if moment is not None and mode != "lowrank":
        raise ValueError(f"moment (activation-aware seeding) applies to mode='lowrank' only; got mode={mode!r}.")
    weight = attn.c_attn.weight
    new = MergedGPT2Attention(
        attn.config, mode, rank, attn.layer_idx, c_proj=attn.c_proj, device=weight.device, dtype=weight.dtype
    )
    new.attn_dropout, new.resid_dropout = attn.attn_dropout, attn.resid_dropout
    parts = split_gpt2_qkv(weight.detach(), attn.c_attn.bias.detach(), attn.num_heads)
    if mode == "covariance":
        query_weight, query_bias = covariance_from_qk(parts["wq"], parts["bq"], parts["wk"])  # (H,d,d), (H,d)
        key_weight = None
    elif moment is not None:
        query_weight, query_bias, key_weight = whitened_lowrank_from_qk(
            parts["wq"], parts["bq"], parts["wk"], rank, moment, init_std=attn.config.initializer_range
        )  # (H,d,r), (H,r), (H,d,r)
    else:
        query_weight, query_bias, key_weight = lowrank_from_qk(
            parts["wq"], parts["bq"], parts["wk"], rank, init_std=attn.config.initializer_range
        )  # (H,d,r), (H,r), (H,d,r)
    with torch.no_grad():
        new.q_proj.weight.copy_(heads_to_linear(query_weight))
        new.q_proj.bias.copy_(query_bias.reshape(-1))  # (H, qk) -> (H*qk,)
        if key_weight is not None:
            new.k_proj.weight.copy_(heads_to_linear(key_weight))
        new.v_proj.weight.copy_(parts["wv"].mT)  # Conv1D (in, out) -> Linear (out, in)
        new.v_proj.bias.copy_(parts["bv"])
    return new


def _rank_for_energy(attn: GPT2Attention, energy: float) -> int:
    """The smallest rank at which every head of stock `attn` keeps `energy` of the spectrum of its S̃_h."""
    parts = split_gpt2_qkv(attn.c_attn.weight.detach(), attn.c_attn.bias.detach(), attn.num_heads)
    return rank_for_energy(qk_singular_values(parts["wq"], parts["bq"], parts["wk"]), energy)


def patch_model(
    model: nn.Module,
    mode: str = "covariance",
    *,
    rank: int | float | dict[int, int] | None = None,
    layers: list[int] | None = None,
    init: str = "svd",
    calibration=None,
) -> nn.Module:
    """Replace GPT-2 self-attention with merged query–key attention, seeded to compute exactly what it did.

    Works on every GPT-2 class of transformers (GPT2Model, GPT2LMHeadModel, GPT2DoubleHeadsModel,
    GPT2For...). The model is changed in place and returned: its attention modules are swapped, its class
    becomes the matching `MergedGPT2*` subclass and its config a `MergedGPT2Config` recording the patch in
    `config.merged_attn`, so `save_pretrained` / `push_to_hub` write a checkpoint that loads back.

    Args:
        model: a GPT-2 model (anything whose modules include `GPT2Attention`).
        mode: "covariance" — one d x d matrix S_h = Wq_h Wk_hᵀ per head (exact); or "lowrank" — S_h ≈ U_h V_hᵀ
            at rank r (exact for r = head size, best rank-r approximation below, extra capacity above).
        rank: required for "lowrank", None for "covariance". An int r (1 <= r <= hidden size) for every block;
            a dict {block index: r} for a rank per block (its keys are the patched blocks); or a float in (0, 1),
            a spectral-energy target: each block gets the smallest rank at which every one of its heads keeps
            that fraction of Σσ² of its S̃_h, at most the head size. The ranks depend on the weights only;
            `init` then chooses the factors at those ranks. The resolved ranks are recorded as
            `config.merged_attn["rank"]` = {"block": r} with `"energy"`, so checkpoints reload.
        layers: block indices to patch (default: all).
        init: how "lowrank" factors below the head size are seeded. "svd" (default): best rank-r approximation
            of each head's S̃_h = [S_h; u_h] in Frobenius norm (weights only). "whitened": the rank-r factors
            with the least error of the SCORES on `calibration` activations — SVD of L_qᵀ S̃_h L_k, with
            Cholesky factors of the damped second moments of the attention input [x, 1] (query side) and x
            (key side), un-whitened (see `seeding.whitened_lowrank_from_qk`). For rank >= head size both are
            exact and identical. Recorded in `config.merged_attn["init"]` (None for covariance).
        calibration: for init="whitened" only: an iterable of batches of token ids (LongTensors (B, T), lists,
            or dicts with 'input_ids' and optionally 'attention_mask' — a DataLoader or tokenized dataset). The
            stock model is run over it once (eval, no gradients) before any weight is changed.

    Returns:
        The same `model` object, patched.

    Raises:
        ValueError: bad mode / rank / layers / init / calibration (all before any weight is changed), a model
            that is already patched, or one with no GPT2Attention.
        NotImplementedError: GPT-2 with cross-attention (`add_cross_attention=True`).
    """
    patch = PatchConfig(mode, rank, layers, init)
    patch.check_calibration(calibration)
    found = _attentions(model, GPT2Attention)
    if any(isinstance(module, MergedGPT2Attention) for _, _, module in found):
        raise ValueError(
            f"{type(model).__name__} is already patched (config.merged_attn="
            f"{getattr(model.config, 'merged_attn', None)}); patching twice would seed from merged weights. "
            "Patch a fresh copy of the stock model, or call unpatch_model(model) first."
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
    patch.check_against(found[0][2].embed_dim, len(found))
    moments, calibration_tokens = {}, None
    if patch.init == "whitened":  # one pass of the STOCK model; raises on bad calibration before any swap
        moments, calibration_tokens = collect_attention_moments(model, calibration, patch.layers)
    if patch.energy is not None:
        blocks = [old for _, _, old in found if old.layer_idx in patch.layers]
        patch.rank = {old.layer_idx: _rank_for_energy(old, patch.energy) for old in blocks}
    seeded = [  # every new module is built before the first swap: a seeding error leaves the model untouched
        (parent, name, old, seeded_attention(
            old, patch.mode, patch.rank_for(old.layer_idx), moment=moments.get(old.layer_idx)
        ))
        for parent, name, old in found
        if old.layer_idx in patch.layers
    ]
    for parent, name, old, new in seeded:
        _swap(parent, name, old, new)

    config = model.config
    if type(config) is GPT2Config:
        config.__class__ = MergedGPT2Config  # same fields plus merged_attn; model_type "merged_gpt2"
    config.merged_attn = {**patch.to_dict(), "base_model": config._name_or_path or None}
    if calibration_tokens is not None:
        config.merged_attn["calibration_tokens"] = calibration_tokens
    merged = MERGED_CLASSES.get(type(model))
    if merged is not None:
        model.__class__ = merged[0]  # a subclass of the stock class: isinstance checks still hold
    else:
        logger.warning(
            "%s is not a stock GPT-2 class: it is patched, but save_pretrained will not write a checkpoint "
            "that reloads as a merged model.", type(model).__name__,
        )
    return model


def homogeneous_factors(attn: MergedGPT2Attention) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged score matrix of `attn` as factors: S̃_h = [S_h; u_h] = left_h @ right_hᵀ ((d+1) x d).

    Returns:
        left (H, d+1, k) and right (H, d, k), detached, with k = d (covariance, right = I) or r (lowrank).
    """
    heads, d = attn.num_heads, attn.embed_dim
    query = linear_to_heads(attn.q_proj.weight.detach(), heads)  # (H, d, qk)
    bias = attn.q_proj.bias.detach().reshape(heads, 1, -1)  # (H, 1, qk)
    left = torch.cat([query, bias], dim=1)  # (H, d+1, qk)
    if attn.k_proj is None:
        right = torch.eye(d, dtype=query.dtype, device=query.device).expand(heads, d, d)
    else:
        right = linear_to_heads(attn.k_proj.weight.detach(), heads)  # (H, d, r)
    return left, right


def stock_attention(attn: MergedGPT2Attention) -> tuple[GPT2Attention, float]:
    """A stock GPT2Attention with the best rank-hd approximation of `attn`'s scores (bk = 0).

    Returns:
        The module and the largest per-head relative error ‖S̃ − Ŝ‖_F / ‖S̃‖_F (0 up to round-off when exact).
    """
    weight = attn.q_proj.weight
    stock = GPT2Attention(attn.config, layer_idx=attn.layer_idx).to(device=weight.device, dtype=weight.dtype)
    stock.c_proj, stock.attn_dropout, stock.resid_dropout = attn.c_proj, attn.attn_dropout, attn.resid_dropout
    wq, bq, wk, rel_error = qk_from_homogeneous(*homogeneous_factors(attn), attn.head_dim)  # (H,d,hd), (H,hd), ..
    weight, bias = merge_gpt2_qkv(
        wq, bq, wk, torch.zeros_like(bq), attn.v_proj.weight.detach().mT, attn.v_proj.bias.detach()
    )  # Conv1D (in, out) = (d, 3d); bk = 0
    with torch.no_grad():
        stock.c_attn.weight.copy_(weight)
        stock.c_attn.bias.copy_(bias)
    return stock, rel_error.max().item()


def unpatch_model(model: nn.Module, *, strict: bool = False, return_errors: bool = False):
    """Turn a patched model back into a stock GPT-2 (GPT2Attention modules, GPT2Config), in place.

    Each head's S̃_h = [S_h; u_h] is factored by SVD and its best rank-hd part written to Wq_h, bq_h, Wk_h (bk = 0).
    That is exact whenever rank(S̃_h) <= hd: lowrank r <= hd, or covariance before S_h has learned extra
    rank. Otherwise it is truncated, and the per-layer relative error is logged (and returned).

    Args:
        model: a model patched by `patch_model` or loaded as a merged checkpoint.
        strict: raise instead of truncating when some layer cannot be exported exactly.
        return_errors: also return {layer index: max relative error over its heads}.

    Returns:
        The same model object (and the errors dict if `return_errors`).

    Raises:
        ValueError: the model is not patched, or `strict` and some layer's error exceeds round-off.
    """
    found = _attentions(model, MergedGPT2Attention)
    if not found:
        raise ValueError(f"{type(model).__name__} is not patched (no MergedGPT2Attention); nothing to unpatch.")
    exported = [(parent, name, old, *stock_attention(old)) for parent, name, old in found]
    errors = {old.layer_idx: error for _, _, old, _, error in exported}
    inexact = {i: e for i, e in errors.items() if e > EXACT_EXPORT_TOL}
    if inexact and strict:
        raise ValueError(
            f"unpatch_model(strict=True): layers {sorted(inexact)} hold S_h of rank > head size "
            f"{found[0][2].head_dim}; a stock GPT-2 would lose relative error {inexact}. Pass strict=False to "
            "truncate (and check perplexity), or keep the patched model."
        )
    for parent, name, old, new, _ in exported:
        _swap(parent, name, old, new)
    if inexact:
        logger.warning("unpatch_model truncated S_h to rank %d; per-layer relative error: %s", found[0][2].head_dim, inexact)
    config = model.config
    del config.merged_attn
    if type(config) is MergedGPT2Config:
        config.__class__ = GPT2Config
    for stock_cls, (merged_cls, _) in MERGED_CLASSES.items():
        if type(model) is merged_cls:
            model.__class__ = stock_cls
    return (model, errors) if return_errors else model
