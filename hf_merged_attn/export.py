"""Back to the stock classes: `unpatch_model` and the stock attention module that computes a merged one (exactly where the
ranks fit the head size, the best rank-hd part otherwise)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from .merged_attention import (
    ArchitectureSpec,
    MergedAttention,
    linear_to_heads,
    write_output,
)
from .quantized_cache import GENERATION_FIELD
from .registry import SPECS
from .seeding import best_rank_factors, qk_from_homogeneous
from .swapping import _adapters_on, _forget_merged_names, _set_class, _swap

logger = logging.getLogger(__name__)

# rank(S̃_h) <= hd is needed for an exact export; fp32 weights carry ~1e-7 relative round-off, so a tail
# below 1e-5 of ‖S̃_h‖ is round-off, not lost structure.
EXACT_EXPORT_TOL = 1e-5


def homogeneous_factors(attn: MergedAttention) -> tuple[torch.Tensor, torch.Tensor]:
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


def stock_attention(spec: ArchitectureSpec, attn: MergedAttention, config) -> tuple[nn.Module, dict[str, float]]:
    """A stock attention module of family `spec` computing `attn`'s scores and values (bk = 0), or their best
    rank-hd approximation.

    Latent modules are always exact (Wk_h = W_c Bk_h, Wv_h = W_c Bv_h); covariance and lowrank keep the best
    rank-hd part of each head's S̃_h = [S_h; u_h]; merged and low-rank values the best rank-hd part of each
    M_h = Wv_h Wo_h, with the value bias bv_h solving bv_h Wo_h = c_h (any part of c_h outside the rows of Wo_h goes
    to the output bias, exact wherever attention rows sum to 1).

    Returns:
        The module and the largest per-head relative errors by side: {"query_key": ‖S̃ − Ŝ‖_F / ‖S̃‖_F} plus
        {"value_output": ‖M − M̂‖_F / ‖M‖_F} where the values are merged (0 up to round-off when exact).
    """
    heads = attn.num_heads
    weight = attn.q_proj.weight
    stock = spec.new_stock_attention(config, attn.layer_idx).to(device=weight.device, dtype=weight.dtype)
    if attn.output_name is not None and attn.values is None and attn.value_rank is None:
        setattr(stock, attn.output_name, getattr(attn, attn.output_name))  # shared, as at patch time
    if spec.rotary:  # exact where no pair lost its rotation, refused (with the reason) otherwise
        spec.write_weights(stock, attn.stock_parts())
        return stock, {"query_key": 0.0}
    if attn.mode == "latent":
        down = attn.latent_proj.weight.detach().mT  # (d, r_c) = W_c
        wq, bq = linear_to_heads(weight.detach(), heads), attn.q_proj.bias.detach().view(heads, -1)  # stock queries
        wk = down @ linear_to_heads(attn.k_up.weight.detach(), heads)  # (d, r_c) @ (H, r_c, hd) -> (H, d, hd)
        wv = down @ linear_to_heads(attn.v_up.weight.detach(), heads)
        bv, qk_error = attn.v_up.bias.detach().view(heads, -1), torch.zeros(heads)
    else:
        wq, bq, wk, qk_error = qk_from_homogeneous(*homogeneous_factors(attn), attn.head_dim)  # (H,d,hd), (H,hd), ..
    errors = {"query_key": qk_error.max().item()}
    if attn.values is not None or attn.value_rank is not None:  # the output map holds M_h (or Q_h), c_h beside it
        wv, wo, value_error = _stock_values(attn)  # (H, d, hd), (H, hd, d)
        c = attn.value_bias.detach().to(wo.dtype)  # (H, d)
        bv = torch.einsum("hd,hdk->hk", c, torch.linalg.pinv(wo))  # (H, hd): least squares bv_h Wo_h ≈ c_h
        rest = (c - torch.einsum("hk,hkd->hd", bv, wo)).sum(0)  # (d,): 0 unless c_h left the rows of Wo_h
        output = getattr(attn, attn.output_name).bias.detach()
        write_output(getattr(stock, attn.output_name), wo, output + rest.to(output.dtype))
        errors["value_output"] = value_error.max().item()
    elif attn.mode != "latent":
        wv = linear_to_heads(attn.v_proj.weight.detach(), heads)  # (H, d, hd)
        bv = attn.v_proj.bias.detach().view(heads, -1)  # (H, hd)
    spec.write_weights(stock, {"wq": wq, "bq": bq, "wk": wk, "bk": torch.zeros_like(bq), "wv": wv, "bv": bv})
    return stock, errors


def _stock_values(attn: MergedAttention) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stock Wv (H, d, hd) and Wo (H, hd, d) holding the best rank-hd part of each M_h, and the relative error per head
    (0 up to round-off for low-rank values r_v <= hd and for merged values right after seeding)."""
    heads, hd = attn.num_heads, attn.head_dim
    output = getattr(attn, attn.output_name).weight.detach()  # (d, H*k)
    per_head = output.view(output.shape[0], heads, -1).permute(1, 2, 0)  # (H, k, d): rows of head h's map
    if attn.values == "merged":  # M_h (d x d) whole: factor it
        eye = torch.eye(per_head.shape[-1], dtype=torch.float64, device=per_head.device)
        left, right = per_head.double(), eye.expand_as(per_head)
    else:  # M_h = P_h Q_hᵀ, rank r_v <= hd
        left, right = linear_to_heads(attn.v_proj.weight.detach(), heads).double(), per_head.mT.double()
    wv, wo = best_rank_factors(left, right, min(hd, left.shape[-1]))  # (H, d, <=hd) each: M ≈ wv woᵀ
    full = left @ right.mT
    error = torch.linalg.matrix_norm(full - wv @ wo.mT) / torch.linalg.matrix_norm(full).clamp_min(1e-300)
    pad = hd - wv.shape[-1]
    return nn.functional.pad(wv, (0, pad)), nn.functional.pad(wo, (0, pad)).mT, error


def unpatch_model(model: nn.Module, *, strict: bool = False, return_errors: bool = False):
    """Turn a patched model back into the stock model of its family (stock attention and config), in place.

    Each head's S̃_h = [S_h; u_h] is factored by SVD and its best rank-hd part written to Wq_h, bq_h, Wk_h (bk = 0);
    with merged or low-rank values, each M_h = Wv_h Wo_h likewise into Wv_h, Wo_h. That is exact whenever the
    ranks fit the head size: lowrank r <= hd, value_rank, latent, or covariance / merged values before S_h / M_h have
    learned extra rank. Otherwise it is truncated, and the per-layer relative error of each side is logged (and
    returned).

    A peft model (`PeftModel`) is unpatched inside: its adapters elsewhere (LoRA on the MLP, or on an output
    projection the patch kept) stay. Adapters on the merged projections themselves are refused: the export reads
    base weights only, so they would be dropped — merge them first (`model.merge_and_unload()`). A quantized latent
    cache default (`use_quantized_latent_cache`) is removed from the generation config: a stock model cannot use it.

    Args:
        model: a model patched by `patch_model` or loaded as a merged checkpoint (or a peft model around one).
        strict: raise instead of truncating when some layer cannot be exported exactly.
        return_errors: also return {layer index: {"query_key": error of S_h, "value_output": error of M_h}} (the
            largest relative error over the layer's heads; "value_output" only with merged or low-rank values).

    Returns:
        The same model object (and the errors dict if `return_errors`).

    Raises:
        ValueError: the model is not patched, peft adapters sit on merged projections, or `strict` and some
            layer's error exceeds round-off.
    """
    found = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, MergedAttention)
    ]
    if not found:
        raise ValueError(f"{type(model).__name__} is not patched (no merged attention module); nothing to unpatch.")
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # under peft
    spec = next(s for s in SPECS if type(found[0][2]) is s.merged_attention_class)
    _refuse_merged_adapters(model, [attn for _, _, attn in found])
    config = inner.config
    exported = [(parent, name, old, *stock_attention(spec, old, config)) for parent, name, old in found]
    errors = {old.layer_idx: error for _, _, old, _, error in exported}
    inexact = {i: {side: e for side, e in sides.items() if e > EXACT_EXPORT_TOL} for i, sides in errors.items()}
    inexact = {i: sides for i, sides in inexact.items() if sides}
    head_dim = found[0][2].head_dim
    if inexact:
        what = "; ".join(
            f"layer {i}: " + ", ".join(f"{_SIDES[side]} (relative error {e:.3g})" for side, e in sides.items())
            for i, sides in sorted(inexact.items())
        )
        text = f"a stock {spec.family} keeps rank <= head size {head_dim} per head, so these lose their tail: {what}"
        if strict:
            raise ValueError(
                f"unpatch_model(strict=True): {text}. Pass strict=False to truncate (and check perplexity), or keep "
                "the patched model."
            )
    for parent, name, old, new, _ in exported:
        _swap(parent, name, old, new)
    if inexact:
        logger.warning("unpatch_model truncated: %s", text)
    del config.merged_attn
    if type(config) is spec.config_class:
        config.__class__ = spec.config_class.__base__  # the stock config class
    _forget_merged_names(config)
    for stock_cls, (merged_cls, _) in spec.model_classes.items():
        if type(inner) is merged_cls:
            _set_class(inner, stock_cls)
    generation = getattr(inner, "generation_config", None)  # a stock model has no quantized latent cache
    if generation is not None and generation.__dict__.pop(GENERATION_FIELD, None) is not None:
        logger.info("unpatch_model removed generation_config.%s (the quantized latent cache default of the patched "
                    "model): a stock model caches per-head keys and values.", GENERATION_FIELD)
    return (model, errors) if return_errors else model


# what each side of the export holds, for messages
_SIDES = {"query_key": "S_h = Wq_h·Wk_hᵀ", "value_output": "M_h = Wv_h·Wo_h"}


def _refuse_merged_adapters(model: nn.Module, attentions: list[MergedAttention]) -> None:
    """Raise if a peft adapter sits on a projection of a merged module that the export rebuilds (all but an output
    projection shared with the stock model, i.e. with stock values)."""
    adapters = _adapters_on(model, [
        (attn, attn.output_name if attn.values is None and attn.value_rank is None else None) for attn in attentions
    ])
    if adapters:
        raise ValueError(
            f"{', '.join(adapters)} carry peft adapters (e.g. LoRA) on merged projections that unpatch_model rebuilds "
            "as stock weights; the export reads the base weights only, so the adapters would be lost. Merge them into "
            "the weights first (model = model.merge_and_unload(), then unpatch_model(model))."
        )
