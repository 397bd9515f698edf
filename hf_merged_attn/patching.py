"""Patch a model of any registered family in place (seeded from its own weights), and export it back to stock."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from importlib import import_module

import torch
from torch import nn

from .calibration import collect_attention_moments, collect_rotary_statistics
from .merged_attention import (
    ArchitectureSpec,
    MergedAttention,
    PatchConfig,
    heads_to_linear,
    linear_to_heads,
    read_output,
    write_output,
)
from .merged_models import is_hub_id
from .quantized_cache import GENERATION_FIELD, QuantizationSettings, cache_problem
from .registry import SPECS, spec_for_model
from .seeding import (
    DEFAULT_DAMPING,
    best_rank_factors,
    covariance_from_qk,
    kept_pairs,
    pair_norm_scores,
    orthogonal_mix,
    query_pair_energy,
    rorope_maps,
    rotary_latent_from_kv,
    selection_maps,
    values_from_vo,
    latent_from_kv,
    latent_singular_values,
    lowrank_from_qk,
    qk_from_homogeneous,
    qk_singular_values,
    rank_for_energy,
    value_bias_per_head,
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


def _set_class(model: nn.Module, cls: type) -> None:
    """Change a model's class in place, keeping transformers' output capture (output_attentions, output_hidden_states)
    working: it looks the recordable outputs up by the class's name, registered in `PreTrainedModel.__init__`."""
    model.__class__ = cls
    registry = getattr(import_module("transformers.utils.output_capturing"), "_CAN_RECORD_REGISTRY", None)
    if registry is not None and getattr(cls, "_can_record_outputs", None) is not None:
        registry[model] = cls._can_record_outputs


def _forget_merged_names(config) -> None:
    """Drop what a loaded config pins on the instance and would contradict its (new) class: the model_type read from
    config.json, and an auto_map pointing to the merged remote-code files (an exported stock checkpoint has none)."""
    config.__dict__.pop("model_type", None)
    auto_map = config.__dict__.get("auto_map") or {}
    if auto_map and all(str(target).startswith("modeling_merged_") for target in auto_map.values()):
        del config.__dict__["auto_map"]


def _swap(parent: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    for hooks in _HOOK_DICTS:
        getattr(new, hooks).update(getattr(old, hooks))
    new.train(old.training)
    setattr(parent, name, new)


def seeded_weights(parts: dict[str, torch.Tensor], mode: str, rank: int | None, *, init_std: float = 0.02,
                   moment: torch.Tensor | None = None, values: str | None = None, value_rank: int | None = None,
                   output_name: str | None = None, balance_kv: bool = True) -> dict[str, torch.Tensor]:
    """The merged module's parameters (by name, in nn.Linear layout) seeded from canonical per-head stock weights.

    Args:
        parts: wq, wk, wv (H, d, hd) and bq, bk, bv (H, hd), from the family's `read_weights`; with values or
            value_rank also wo (H, hd, d) and bo (d,) of the output projection (`read_output`).
        mode, rank: the patch.
        init_std: std of the random extra query columns of lowrank r > hd.
        moment: E[x̃ᵀx̃] of the layer's attention input for activation-aware ("whitened") seeding, or None.
        values, value_rank: merged or low-rank values; the output projection `output_name` then holds M_h / Q_h.
        balance_kv: latent: keys and values scaled to equal norms before their joint SVD (False: as they are).
    """
    weights = {"q_proj.bias": parts["bq"].reshape(-1)}
    if mode == "covariance":
        query, weights["q_proj.bias"] = covariance_from_qk(parts["wq"], parts["bq"], parts["wk"])  # (H,d,d), (H,d)
        weights["q_proj.weight"] = heads_to_linear(query)
    elif mode == "lowrank":
        if moment is not None:
            query, bias, key = whitened_lowrank_from_qk(
                parts["wq"], parts["bq"], parts["wk"], rank, moment, init_std=init_std
            )  # (H,d,r), (H,r), (H,d,r)
        else:
            query, bias, key = lowrank_from_qk(parts["wq"], parts["bq"], parts["wk"], rank, init_std=init_std)
        weights.update({"q_proj.weight": heads_to_linear(query), "q_proj.bias": bias, "k_proj.weight": heads_to_linear(key)})
    else:  # latent: stock queries, one latent for keys and values
        down, key_up, value_up = latent_from_kv(parts["wk"], parts["wv"], rank, moment, balance=balance_kv)  # (d,r_c), (H,r_c,hd) x2
        weights.update({
            "q_proj.weight": heads_to_linear(parts["wq"]), "latent_proj.weight": down.mT,
            "k_up.weight": heads_to_linear(key_up), "v_up.weight": heads_to_linear(value_up),
            "v_up.bias": parts["bv"],
        })
    if values is not None or value_rank is not None:
        down, up = values_from_vo(parts["wv"], parts["wo"], value_rank, moment)  # P (H,d,r_v) or None; M or Q
        heads, d, width = up.shape
        weights[f"{output_name}.weight"] = up.permute(1, 0, 2).reshape(d, heads * width) if down is not None else (
            up.permute(2, 0, 1).reshape(d, heads * width)  # column h*d + i of the map = row i of M_h
        )  # (d, H*k): the output of head h (k numbers) multiplies columns h*k .. (h+1)*k - 1
        weights[f"{output_name}.bias"] = parts["bo"]
        weights["value_bias"] = value_bias_per_head(parts["bv"], parts["wo"])  # (H, d): c_h = bv_h Wo_h
        if down is not None:
            weights["v_proj.weight"] = heads_to_linear(down)
    elif mode != "latent":
        weights.update({"v_proj.weight": heads_to_linear(parts["wv"]), "v_proj.bias": parts["bv"]})
    return {name: tensor.reshape(-1) if name.endswith("bias") else tensor for name, tensor in weights.items()}


def seeded_attention(
    spec: ArchitectureSpec,
    attn: nn.Module,
    config,
    mode: str,
    rank: int | None = None,
    *,
    moment: torch.Tensor | None = None,
    values: str | None = None,
    value_rank: int | None = None,
    balance_kv: bool = True,
) -> MergedAttention:
    """A merged module computing the same scores as the stock `attn` of family `spec` (shares its output projection).

    With `moment` (lowrank and latent) — E[x̃ᵀx̃] ((d+1) x (d+1)) of this layer's input x̃ = [x, 1], from
    `collect_attention_moments` — factors are the activation-aware ("whitened") ones, least error on those
    inputs, instead of the best approximation of the weights.
    """
    if moment is not None and mode == "covariance" and value_rank is None:
        raise ValueError("moment (activation-aware seeding) applies to mode='lowrank' or 'latent'; covariance is exact.")
    new = spec.merged_attention_class.like(attn, config, mode, rank, values, value_rank)
    init_std = getattr(config, "initializer_range", getattr(config, "init_std", 0.02))  # OPT calls it init_std
    parts = spec.read_weights(attn)
    if values is not None or value_rank is not None:
        parts["wo"], parts["bo"] = read_output(getattr(attn, new.output_name), new.num_heads)  # (H, hd, d), (d,)
    weights = seeded_weights(parts, mode, rank, init_std=init_std, moment=moment, values=values,
                             value_rank=value_rank, output_name=new.output_name, balance_kv=balance_kv)
    # a new weight is trainable only if every stock weight it is seeded from is: the query/key/value weights, and
    # for an output map that holds M_h (merged or low-rank values) also the stock output projection
    # (the P_h of low-rank values and the value bias c_h = bv_h Wo_h are seeded from both sides as well)
    output = f"{new.output_name}." if new.output_name else None
    qkv_trainable = all(p.requires_grad for n, p in attn.named_parameters() if not (output and n.startswith(output)))
    all_trainable = all(p.requires_grad for p in attn.parameters())
    both_sides = (output,) if value_rank is None else (output, "v_proj.")
    params = dict(new.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.reshape(params[name].shape))
            from_both = name == "value_bias" or (output is not None and name.startswith(both_sides))
            params[name].requires_grad_(all_trainable if from_both else qkv_trainable)
    return new


def seeded_rotary_attention(
    spec: ArchitectureSpec,
    attn: nn.Module,
    config,
    rank: int,
    rope_pairs: int,
    rope_selection: str | None,
    *,
    moment: torch.Tensor | None = None,
    pair_norms: tuple[torch.Tensor, torch.Tensor] | None = None,
    whiten: bool = False,
    balance: bool = True,
) -> MergedAttention:
    """A rotary latent module (`rotary_latent.RotaryLatentAttention`) seeded from the stock rotary attention `attn`.

    The kept pairs come from `rope_selection` ("2norm" ranks the calibration `pair_norms`; "rorope" mixes the KV
    heads per frequency by the PCA of `moment`); the latent from the joint (balanced, optionally whitened by
    `moment`) SVD of [NoPE keys | values]. Exact at patch when every pair is kept and r_c covers the values.
    """
    new = spec.merged_attention_class.like(attn, config, "latent", rank, rope_pairs=rope_pairs,
                                           rope_selection=rope_selection)
    parts = spec.read_weights(attn)
    heads, kv_heads, hd = new.num_heads, new.num_kv_heads, new.head_dim
    if rope_selection == "rorope":
        if moment is None:
            raise ValueError("rope_selection='rorope' needs the calibration moment of the layer's input (pass calibration).")
        rope_map, nope_map, freq, _ = rorope_maps(parts["wk"], parts["bk"], moment, rope_pairs)
    else:
        scores = pair_norm_scores(*pair_norms) if rope_selection == "2norm" else None
        rope_map, nope_map, freq = selection_maps(kept_pairs(rope_selection or "high", hd, rope_pairs, kv_heads, scores), hd)
    seeded = rotary_latent_from_kv(parts["wk"], parts["bk"], parts["wv"], rope_map, nope_map, rank,
                                   moment if whiten else None, balance=balance)
    key_heads = rope_map.shape[0]
    # query head i reads rotary key head i // (H / Gk) through the block of its own KV head i // (H / G)
    query_map = torch.stack([
        torch.cat([rope_map[i * key_heads // heads, i * kv_heads // heads],
                   nope_map[i * key_heads // heads, i * kv_heads // heads]], dim=-1)
        for i in range(heads)
    ])  # (H, hd, 2K + w)
    weights = {
        "q_proj.weight": attn.q_proj.weight.detach(), "latent_proj.weight": seeded["down"].mT,
        "v_up.weight": heads_to_linear(seeded["value_up"]),  # (G·hd, r_c)
    }
    if attn.q_proj.bias is not None:
        weights["q_proj.bias"] = attn.q_proj.bias.detach()
    if parts["bv"] is not None:
        weights["v_up.bias"] = parts["bv"].reshape(-1)
    if new.k_rope is not None:
        weights["k_rope.weight"] = heads_to_linear(seeded["rope_weight"])  # (Gk, d, 2K) -> (Gk·2K, d)
        if "rope_bias" in seeded and new.k_rope.bias is not None:
            weights["k_rope.bias"] = seeded["rope_bias"].reshape(-1)
    if new.k_up is not None:
        weights["k_up.weight"] = heads_to_linear(seeded["key_up"])  # (Gk, r_c, w) -> (Gk·w, r_c)
    trainable = all(p.requires_grad for n, p in attn.named_parameters() if not n.startswith(f"{new.output_name}."))
    params = dict(new.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.reshape(params[name].shape))
        for name, param in params.items():
            if not name.startswith(f"{new.output_name}."):
                param.requires_grad_(trainable)
        new.rope_freq.copy_(freq)
        new.query_map.copy_(query_map)
    return new


# The exact-RoPE latent's seeding options (`patch_model(seeding=...)`): the whitening's relative ridge (damping, as
# `seeding.damped_cholesky`) and whether the key columns are weighed by their groups' query energy (query-aware keys).
# Measured on SmolLM2 (docs/domains.md, docs/exact_rope_smollm2.md): larger damping and query-aware keys lose on every
# held-out text; rotating c loses nothing in full precision and lowers the int4 codes' cost (1.33x vs 1.35x at -68.75%).
EXACT_ROPE_SEEDING = {"damping": DEFAULT_DAMPING, "query_aware_keys": False, "rotate_latent": True}


def seeded_exact_rope_attention(spec: ArchitectureSpec, attn: nn.Module, config, rank: int, *,
                                 moment: torch.Tensor | None = None, balance: bool = True,
                                 seeding: dict | None = None) -> MergedAttention:
    """An exact-RoPE latent module (rope="exact", `exact_rope.py`) seeded from the stock rotary attention `attn`: the
    joint (K/V-balanced, whitened by `moment` when given) PCA of [pre-RoPE keys | values] gives W_c, Bk, Bv; queries,
    key and value biases and o_proj stay stock. Exact at r_c = 2·G·hd (and r_c = d). `seeding`: see `patch_model`."""
    seeding = {**EXACT_ROPE_SEEDING, **(seeding or {})}
    new = spec.merged_attention_class.like(attn, config, "latent", rank, rope="exact")
    parts = spec.read_weights(attn)  # wk, wv (G, d, hd)
    weights = None
    if seeding["query_aware_keys"]:
        weights = query_pair_energy(parts["wq"], parts["bq"], new.num_kv_heads, moment)  # (G, hd)
    down, key_up, value_up = latent_from_kv(parts["wk"], parts["wv"], rank, moment, balance=balance,
                                            damping=seeding["damping"], key_weights=weights)
    if seeding["rotate_latent"]:  # c·H: the same model in full precision, evener coordinates for quantized codes
        mix = orthogonal_mix(rank).to(down)
        down, key_up, value_up = down @ mix, mix.mT @ key_up, mix.mT @ value_up
    weights = {"q_proj.weight": attn.q_proj.weight.detach(), "latent_proj.weight": down.mT,
               "k_up.weight": heads_to_linear(key_up), "v_up.weight": heads_to_linear(value_up)}  # (G·hd, r_c)
    for name, side in (("q_proj", "bq"), ("k_up", "bk"), ("v_up", "bv")):
        if parts[side] is not None:
            weights[f"{name}.bias"] = parts[side].reshape(-1)
    trainable = all(p.requires_grad for n, p in attn.named_parameters() if not n.startswith(f"{new.output_name}."))
    params = dict(new.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if name in weights:
                param.copy_(weights[name].reshape(param.shape))
            if not name.startswith(f"{new.output_name}."):
                param.requires_grad_(trainable)
    return new


def _resolve_rotary(patch: PatchConfig, spec: ArchitectureSpec, model: nn.Module, calibration) -> bool:
    """Check a patch of a rotary family and fill in its rotary defaults (all pairs; '2norm' when pairs are dropped):
    r_c within what the latent can hold, calibration given where a rule or the seeding reads it. Returns whether the
    seeding reads calibration data (the kept-pair rule or whitening)."""
    config = model.config
    if patch.rope is None:  # the route that won (docs/rotary_smollm2.md): exact unless pairs are asked for
        patch.rope = "partial" if patch.rope_pairs is not None or patch.rope_selection is not None else "exact"
    if patch.mode != "latent":
        raise NotImplementedError(
            f"mode={patch.mode!r} on {spec.family} ({type(model).__name__}): its positions are rotary, and the rotation "
            "between Wq and Wk makes Wq·Wkᵀ a different matrix at every offset, so no single S_h (covariance, lowrank) "
            "exists; merged values would cache x (d numbers) where grouped-query attention caches 2·G·hd. Use "
            "mode='latent', rank=r_c, rope_pairs=r: a shared latent for the values and the keys of the pairs that "
            "lose their rotation, plus r rotary pairs per KV head."
        )
    if patch.energy is not None:
        raise ValueError(
            f"rank={patch.energy} (a spectral-energy target) is not available on rotary models yet: pass an integer "
            "r_c (e.g. MHA2MLA's budgets: r_c = G·d_kv with d_kv = 32, 16 or 8)."
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    half = head_dim // 2
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if patch.rope == "exact":
        return _resolve_exact_rope(patch, config, kv_heads, head_dim)
    if patch.rope_pairs is not None and patch.rope_pairs > half:
        raise ValueError(
            f"rope_pairs={patch.rope_pairs} exceeds hd/2 = {half} (head size {head_dim}): a head has {half} frequency "
            f"pairs. Use 0 <= rope_pairs <= {half} ({half} keeps every pair rotated: exact)."
        )
    if patch.rope_pairs is None and patch.rope_selection not in (None, "rorope"):
        logger.warning("rope_selection=%r was given without rope_pairs: every pair stays rotated (the default, "
                       "rope_pairs=%d), so no rule applies. Pass rope_pairs=r < %d to drop pairs.",
                       patch.rope_selection, half, half)
    needs_data = patch.init == "whitened" or patch.rope_needs_calibration(head_dim)
    if calibration is None and patch.rope_needs_calibration(head_dim):
        rule = patch.rope_selection or "2norm"
        default = " (the default when rope_pairs drops pairs)" if patch.rope_selection is None else ""
        raise ValueError(
            f"rope_selection={rule!r}{default} chooses the kept rotary pairs from calibration activations; pass "
            "calibration=... (e.g. 16 blocks of 256 tokens of text), or a data-free rule: rope_selection='high', "
            "'low' or 'uniform'."
        )
    if patch.rope_pairs is None:
        patch.rope_pairs = half
    if patch.rope_selection is None and patch.rope_pairs < half:
        patch.rope_selection = "2norm"
    if patch.rope_pairs == half and patch.rope_selection in ("2norm", "high", "low", "uniform"):
        patch.rope_selection = None  # every pair of every head is kept: the rules agree
    widest = kv_heads * (2 * head_dim - 2 * patch.rope_pairs)  # NoPE keys + values: what a latent can hold
    ranks = patch.rank.values() if isinstance(patch.rank, dict) else [patch.rank]
    too_wide = [r for r in ranks if widest < r < config.hidden_size]
    if too_wide:
        raise ValueError(
            f"rank={patch.rank} exceeds {widest}, the width of the NoPE keys and the values together (G·(2·hd − 2r) = "
            f"{kv_heads}·(2·{head_dim} − 2·{patch.rope_pairs})): a latent of {widest} already holds them exactly. Use "
            f"rank <= {widest} (or the hidden size {config.hidden_size})."
        )
    return needs_data


def _check_seeding(seeding, rope: str | None) -> None:
    """Refuse seeding options that are not a dict of `EXACT_ROPE_SEEDING`'s keys, or given to a route other than
    rope='exact' (None: not resolved yet)."""
    if seeding is None:
        return
    unknown = sorted(set(seeding) - set(EXACT_ROPE_SEEDING)) if isinstance(seeding, dict) else None
    if unknown is None or unknown or rope not in (None, "exact"):
        raise ValueError(
            f"seeding={seeding!r}: a dict of rope='exact' seeding options ({', '.join(EXACT_ROPE_SEEDING)})"
            + (f"; unknown: {unknown}." if unknown else f"; this patch has rope={rope!r}: pass rope='exact'."
               if unknown is not None else ".")
        )


def _resolve_exact_rope(patch: PatchConfig, config, kv_heads: int, head_dim: int) -> bool:
    """Check an exact-RoPE latent patch (rope="exact"): r_c within 2·G·hd (or the hidden size), a RoPE whose
    frequencies do not depend on the length. Returns whether the seeding reads calibration data (whitening)."""
    from .exact_rope import LENGTH_DEPENDENT_ROPE, rope_type_of

    rope_type = rope_type_of(config)
    if rope_type in LENGTH_DEPENDENT_ROPE:
        raise ValueError(
            f"rope='exact' rebuilds every cached key and rotates it at decode time, but this model's RoPE type "
            f"{rope_type!r} changes its frequencies with the sequence length, so a rebuilt key would not get the "
            "rotation stock gave it. Use rope='partial' (rope_pairs=...), or a model with a fixed RoPE."
        )
    widest = 2 * kv_heads * head_dim  # the pre-RoPE keys and the values: what a latent can hold
    ranks = patch.rank.values() if isinstance(patch.rank, dict) else [patch.rank]
    too_wide = [r for r in ranks if r is not None and widest < r < config.hidden_size]
    if too_wide:
        raise ValueError(
            f"rank={patch.rank} exceeds {widest}, the width of the keys and the values together (2·G·hd = "
            f"2·{kv_heads}·{head_dim}): a latent of {widest} already holds them exactly. Use rank <= {widest}."
        )
    return patch.init == "whitened"


def _rank_for_energy(spec: ArchitectureSpec, attn: nn.Module, mode: str, energy: float) -> int:
    """The smallest rank at which the seed keeps `energy` of the spectrum: of every head's S̃_h (lowrank), of the
    layer's balanced stacked [Wk | Wv] (latent)."""
    parts = spec.read_weights(attn)
    if mode == "latent":
        return rank_for_energy(latent_singular_values(parts["wk"], parts["wv"]), energy)
    return rank_for_energy(qk_singular_values(parts["wq"], parts["bq"], parts["wk"]), energy)


def patch_model(
    model: nn.Module,
    mode: str = "covariance",
    *,
    rank: int | float | dict[int, int] | None = None,
    layers: list[int] | None = None,
    init: str = "svd",
    calibration=None,
    values: str | None = None,
    value_rank: int | None = None,
    rope_pairs: int | None = None,
    rope_selection: str | None = None,
    rope: str | None = None,
    balance_kv: bool = True,
    seeding: dict | None = None,
) -> nn.Module:
    """Replace a model's self-attention with merged query–key attention, seeded to compute exactly what it did.

    Works on every model class of a registered family (GPT-2, OPT, BLOOM, BERT, RoBERTa: see
    `registry.SPECS`), found from `model.config.model_type`. The model is changed in place and returned: its
    self-attention modules are swapped, its class becomes the matching `Merged*` subclass and its config the
    merged config recording the patch in `config.merged_attn`, so `save_pretrained` / `push_to_hub` write a
    checkpoint that loads back.

    Args:
        model: a stock transformers model of a registered family.
        mode: "covariance" — one d x d matrix S_h = Wq_h Wk_hᵀ per head (exact); or "lowrank" — S_h ≈ U_h V_hᵀ
            at rank r (exact for r = head size, best rank-r approximation below, extra capacity above).
        rank: required for "lowrank", None for "covariance". An int r (1 <= r <= hidden size) for every block;
            a dict {block index: r} for a rank per block (its keys are the patched blocks); or a float in (0, 1),
            a spectral-energy target: each block gets the smallest rank at which every one of its heads keeps
            that fraction of Σσ² of its S̃_h, at most the head size. The ranks depend on the weights only;
            `init` then chooses the factors at those ranks. The resolved ranks are recorded as
            `config.merged_attn["rank"]` = {"block": r} with `"energy"`, so checkpoints reload.
        layers: block indices to patch, any iterable (default: all).
        init: how "lowrank" factors below the head size are seeded. "svd" (default): best rank-r approximation
            of each head's S̃_h = [S_h; u_h] in Frobenius norm (weights only). "whitened": the rank-r factors
            with the least error of the SCORES on `calibration` activations — SVD of L_qᵀ S̃_h L_k, with
            Cholesky factors of the damped second moments of the attention input [x, 1] (query side) and x
            (key side), un-whitened (see `seeding.whitened_lowrank_from_qk`). For rank >= head size both are
            exact and identical. Recorded in `config.merged_attn["init"]` (None for covariance).
        calibration: for init="whitened" only: an iterable of batches of token ids (LongTensors (B, T), lists,
            or dicts with 'input_ids' and optionally 'attention_mask' — a DataLoader or tokenized dataset). The
            stock model is run over it once (eval, no gradients) before any weight is changed.
        values: None (stock values) or "merged": the value is the layer input x itself, shared by every head, and
            head h holds M_h = Wv_h Wo_h (d x d) in the output projection, with the value bias folded into its bias.
            Exact. With covariance keys and values are the same tensor, cached ONCE per layer: (B, 1, T, d), half of
            stock's K + V. Decoders only (the output projection must be inside the attention module).
        value_rank: r_v, 1 <= r_v <= head size, for low-rank values M_h ≈ P_h Q_hᵀ (V cache (B, H, T, r_v); exact at
            r_v = head size, best rank-r_v below, whitened with init="whitened"). With covariance or lowrank.
        rope_pairs: rotary families (Llama, Qwen2, Mistral) only, mode "latent": r, the frequency pairs per KV head
            kept rotated (default hd/2: all, exact with r_c covering the values). The other pairs lose their rotation
            (a change of the model: fine-tune to recover) and their keys join the values in the latent. The layer
            then caches r_c + G·2r numbers per token (stock: 2·G·hd).
        rope_selection: which pairs stay rotated: "2norm" (default when pairs are dropped; calibration's largest
            query·key pair norms), "high", "low", "uniform" (data-free), or "rorope" (TransMLA: a PCA across the KV
            heads per frequency on calibration data, the strongest G·r mixed pairs kept as ONE rotary key shared by
            all heads).
        rope: rotary families, mode "latent": "exact" (the default unless rope_pairs / rope_selection are given) keeps
            every rotation — the latent c = x·W_c holds the keys BEFORE RoPE and the values, keys are rebuilt
            (c·Bk + bk) and rotated at each cached token's own position; the cache holds c and the positions. Exact
            at r_c = 2·G·hd, and `unpatch_model` returns a stock model computing it at any r_c. "partial": the
            rope_pairs route above (MHA2MLA; pairs that lose their rotation change the model).
        balance_kv: latent mode: scale the keys and the values to equal norms before the joint SVD that seeds the
            latent (default: neither side owns the SVD); False fits [Wk | Wv] as it is (an ablation).
        seeding: rope="exact" only, options of its seeding (defaults `EXACT_ROPE_SEEDING`, the measured best):
            {"damping": λ} the whitening's relative ridge (Σ_x + λ·mean(diag Σ_x)·I: larger λ moves the seed toward the
            weights-only PCA), {"query_aware_keys": True} weighs each key dimension by its KV group's offset-averaged
            query energy when choosing the latent (`seeding.query_pair_energy`), {"rotate_latent": True} mixes c by a
            fixed orthogonal matrix (`seeding.orthogonal_mix`, folded into W_c, Bk, Bv: exact in full precision) so
            that quantized codes see evener coordinates.

    New weights take `requires_grad` from the stock weights they are seeded from (a frozen model stays frozen, a
    PEFT model keeps its frozen / trainable split). A peft model whose adapters sit on the replaced attention weights
    is refused (merge them first); adapters elsewhere are kept. A quantized-cache default left in the model's
    generation config (`use_quantized_latent_cache` on an earlier patch, or a saved generation_config.json) that this
    patch cannot decode with is dropped, with a warning giving the reason.

    Returns:
        The same `model` object, patched.

    Raises:
        TypeError: `model` is not an nn.Module (e.g. a model name: load the model first).
        ValueError: bad mode / rank / layers / init / calibration (all before any weight is changed), a model
            that is already patched, or peft adapters on the attention weights the patch replaces (merge them first).
        NotImplementedError: an unsupported family (rotary ones with the reason), or an unsupported variant of
            a supported one (GPT-2 with cross-attention, a BERT decoder, ...).
    """
    patch = PatchConfig(mode, rank, layers, init, values, value_rank, rope_pairs, rope_selection, rope)
    spec, patched, reads_data = resolve_patch(model, patch, calibration, seeding)  # checks only: nothing changed yet
    statistics = calibrate(model, patch, calibration, reads_data)  # one pass of the stock model, if the seed reads data
    # The patched model gets its own copy of the config: another model built from the same config object must not
    # start reporting a patch (and a merged model_type) it does not have.
    config = copy.deepcopy(model.config)
    # every new module is built before the first swap: a seeding error leaves the model untouched
    seeded = [(parent, name, old, seed_layer(spec, old, config, patch, statistics, balance_kv, seeding))
              for parent, name, old in patched]
    install(model, seeded, config)
    record_patch(model, spec, patch, config, statistics.tokens)
    return model


@dataclass
class CalibrationStatistics:
    """What the seeding reads from a pass of the stock model over calibration text (empty without one)."""

    moments: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> E[x̃ᵀx̃] of its attention input
    tokens: int | None = None  # calibration tokens seen
    pair_norms: dict[int, tuple] = field(default_factory=dict)  # layer -> rotary pair norms ('2norm')


def resolve_patch(model: nn.Module, patch: PatchConfig, calibration, seeding: dict | None = None
                  ) -> tuple[ArchitectureSpec, list[tuple[nn.Module, str, nn.Module]], bool]:
    """Step 1 of `patch_model`: check `patch` against `model` (family, sizes, rotary route, adapters, calibration) and
    resolve what it leaves open (layers, rotary defaults, energy targets to ranks). Changes nothing in the model.

    Returns:
        (the family's registry entry, [(parent, name, stock attention)] of the layers to patch, whether the seeding
        reads calibration data).
    """
    if not isinstance(model, nn.Module):
        load = f"AutoModelForCausalLM.from_pretrained({model if isinstance(model, str) else 'gpt2'!r})"
        raise TypeError(
            f"patch_model takes a transformers model (an nn.Module); got {model!r} ({type(model).__name__}). Load "
            f"the model first, e.g. model = {load}, then patch_model(model, ...)."
        )
    _check_seeding(seeding, patch.rope)
    patch.check_calibration(calibration)
    if any(isinstance(module, MergedAttention) for module in model.modules()):
        raise ValueError(
            f"{type(model).__name__} is already patched (config.merged_attn="
            f"{getattr(model.config, 'merged_attn', None)}); patching twice would seed from merged weights. "
            "Patch a fresh copy of the stock model, or call unpatch_model(model) first."
        )
    spec = spec_for_model(model)
    config = model.config
    spec.check_model(config)
    reads_data = patch.init == "whitened"  # whether the seeding reads calibration data
    if spec.rotary:
        reads_data = _resolve_rotary(patch, spec, model, calibration)
        _check_seeding(seeding, patch.rope)
    elif patch.rope_pairs is not None or patch.rope_selection is not None or patch.rope is not None:
        raise ValueError(
            f"rope={patch.rope!r} / rope_pairs={patch.rope_pairs!r} / rope_selection={patch.rope_selection!r} were given for "
            f"{type(model).__name__} ({spec.family}), whose positions are not rotary: there is no rotation to keep. "
            "Drop them."
        )
    found = spec.stock_attentions(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} (model_type {config.model_type!r}) has no {spec.attention_class.__name__} "
            "module to patch. Pass the transformers model itself (e.g. AutoModel.from_pretrained(...)), not a part "
            "of it."
        )
    patch.check_against(config.hidden_size, len(found), config.num_attention_heads)
    patched = [(parent, name, old) for parent, name, old in found if old.layer_idx in patch.layers]
    _refuse_adapters(model, spec, patch, [old for _, _, old in patched])
    if patch.energy is not None:
        if any(p.is_meta for _, _, old in patched for p in old.parameters()):
            raise ValueError(
                f"rank={patch.energy} (a spectral-energy target) picks each block's rank from the singular values of "
                f"its weights, but {type(model).__name__}'s weights are on the meta device (not loaded). Load the "
                "weights first, or pass an integer rank or a dict {block: rank}."
            )
        patch.rank = {old.layer_idx: _rank_for_energy(spec, old, patch.mode, patch.energy) for _, _, old in patched}
    return spec, patched, reads_data


def calibrate(model: nn.Module, patch: PatchConfig, calibration, reads_data: bool) -> CalibrationStatistics:
    """Step 2 of `patch_model`: one pass of the STOCK model over `calibration` (eval, no gradients) for what the seeding
    reads — the second moments of every patched layer's attention input (whitening, RoRoPE) and, for the '2norm' rule,
    the rotary pair norms; nothing without `reads_data`. Raises on bad calibration before any swap."""
    if not reads_data:
        return CalibrationStatistics()
    if getattr(patch, "rope", None) == "partial":  # the pair norms ('2norm') and moments in one pass
        moments, tokens, pair_norms = collect_rotary_statistics(model, calibration, patch.layers)
        return CalibrationStatistics(moments, tokens, pair_norms)
    moments, tokens = collect_attention_moments(model, calibration, patch.layers)
    return CalibrationStatistics(moments, tokens)


def seed_layer(spec: ArchitectureSpec, old: nn.Module, config, patch: PatchConfig, statistics: CalibrationStatistics,
               balance_kv: bool = True, seeding: dict | None = None) -> MergedAttention:
    """Step 3 of `patch_model`: the merged module that replaces the stock attention `old`, seeded from its weights (and
    the calibration statistics of its layer) by the route `patch` gives."""
    layer, rank = old.layer_idx, patch.rank_for(old.layer_idx)
    moment = statistics.moments.get(layer)
    if spec.rotary and patch.rope == "exact":
        return seeded_exact_rope_attention(spec, old, config, rank, moment=moment, balance=balance_kv, seeding=seeding)
    if spec.rotary:
        return seeded_rotary_attention(spec, old, config, rank, patch.rope_pairs, patch.rope_selection, moment=moment,
                                       pair_norms=statistics.pair_norms.get(layer), whiten=patch.init == "whitened",
                                       balance=balance_kv)
    return seeded_attention(spec, old, config, patch.mode, rank, moment=moment, values=patch.values,
                            value_rank=patch.value_rank, balance_kv=balance_kv)


def install(model: nn.Module, seeded: list[tuple[nn.Module, str, nn.Module, nn.Module]], config) -> None:
    """Step 4 of `patch_model`: swap each (parent, name, old, new) (hooks and train/eval mode move to the new module),
    and give every module that held the model's config its own copy `config`."""
    shared = model.config
    for parent, name, old, new in seeded:
        _swap(parent, name, old, new)
    for module in model.modules():  # every module that held the shared config now holds the model's own copy
        if module.__dict__.get("config") is shared:
            module.config = config
    _match_rotary_frequencies(model, [new for *_, new in seeded])


def _match_rotary_frequencies(model: nn.Module, modules: list[nn.Module]) -> None:
    """Give each exact-RoPE module's rotary embedding the model's own frequencies (values, dtype, device: a model cast to
    bf16 before the patch rotates its queries with bf16-rounded frequencies, and the rebuilt keys must match them)."""
    owned = {id(m.rotary_emb) for m in modules if getattr(m, "rope", None) == "exact"}
    if not owned:
        return
    source = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding") and id(m) not in owned
                   and isinstance(getattr(m, "inv_freq", None), torch.Tensor)), None)
    if source is None:
        return
    for module in modules:
        if id(getattr(module, "rotary_emb", None)) in owned:
            with torch.no_grad():
                module.rotary_emb.inv_freq = source.inv_freq.detach().clone()


def record_patch(model: nn.Module, spec: ArchitectureSpec, patch: PatchConfig, config, calibration_tokens) -> None:
    """Step 5 of `patch_model`: the merged config class and its `merged_attn` record, the model's merged class (so
    save_pretrained writes a checkpoint that reloads), and no generation default the patch cannot decode with."""
    if type(config) is spec.config_class.__base__:  # the stock config class: same fields plus merged_attn
        config.__class__ = spec.config_class  # model_type "merged_<family>"
    _forget_merged_names(config)
    config.merged_attn = {**patch.to_dict(), **base_model_record(config._name_or_path)}
    if calibration_tokens is not None:
        config.merged_attn["calibration_tokens"] = calibration_tokens
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # under peft
    merged = spec.model_classes.get(type(inner))
    if merged is not None:
        _set_class(inner, merged[0])  # a subclass of the stock class: isinstance checks still hold
    else:
        logger.warning(
            "%s is not a stock %s class: it is patched, but save_pretrained will not write a checkpoint "
            "that reloads as a merged model.", type(inner).__name__, spec.family,
        )
    _drop_unusable_cache_default(inner)


def _drop_unusable_cache_default(model: nn.Module) -> None:
    """Remove a quantized-cache default (generation_config.merged_attn_cache, from `use_quantized_latent_cache` on an
    earlier patch, or a saved generation_config.json) that the model as patched now cannot decode with, and say why."""
    generation = getattr(model, "generation_config", None)
    settings = getattr(generation, GENERATION_FIELD, None) if generation is not None else None
    if not settings:
        return
    try:
        problem = cache_problem(model, QuantizationSettings(**settings), "the quantized latent cache")
    except (TypeError, ValueError) as error:  # a hand-edited record
        problem = f"its settings are not valid ({error})"
    if problem:
        del generation.__dict__[GENERATION_FIELD]
        logger.warning(
            "patch_model dropped generation_config.%s=%s, a quantized latent cache as generate()'s default (set by "
            "use_quantized_latent_cache on an earlier patch or read from a saved generation_config.json), which this "
            "patch cannot use: %s generate() uses transformers' default cache; to quantize the cache, patch as "
            "'latent' (or 'covariance' with values='merged') and call use_quantized_latent_cache(model).",
            GENERATION_FIELD, settings, problem,
        )


def _adapters_on(model: nn.Module, modules: list[tuple[nn.Module, str | None]]) -> list[str]:
    """Paths of the peft-wrapped projections (LoRA, ...) inside each module of (module, name of a submodule to skip)."""
    paths = {module: path for path, module in model.named_modules()}
    return [
        f"{paths[parent]}.{name}" for parent, kept in modules for name, module in parent.named_modules()
        if isinstance(getattr(module, "base_layer", None), nn.Module) and name.split(".")[0] != kept
    ]


def base_model_record(name_or_path) -> dict[str, str | None]:
    """What a patch record says about the model it was made from: {"base_model": a Hub id} — or, for a model loaded
    from a local folder, {"base_model": None, "base_model_folder": the folder's name}: a user's path never goes into
    a config, a model card or the Hub. A name that cannot be a Hub id (`merged_models.is_hub_id`: two or more
    slashes, as `runs/exp1/checkpoint-500`, or characters the Hub does not allow) is a folder, on disk or not."""
    path = str(name_or_path or "")
    if not path:
        return {"base_model": None}
    if (os.path.isabs(path) or os.path.exists(path) or path.startswith((".", "~")) or "\\" in path
            or not is_hub_id(path)):
        return {"base_model": None, "base_model_folder": os.path.basename(os.path.normpath(path)) or None}
    return {"base_model": path}


def _refuse_adapters(model: nn.Module, spec: ArchitectureSpec, patch: PatchConfig, attentions: list[nn.Module]) -> None:
    """Raise if a peft adapter (LoRA, ...) sits on a weight that the patch replaces: seeding reads the base weights
    only, so it would be silently dropped. An output projection the merged module keeps (shared) keeps its adapter."""
    kept = spec.merged_attention_class.output_name if patch.values is None and patch.value_rank is None else None
    adapters = _adapters_on(model, [(attn, kept) for attn in attentions])
    if adapters:
        raise ValueError(
            f"{', '.join(adapters)} carry peft adapters (e.g. LoRA) on weights that patch_model replaces; the merged "
            "attention is seeded from the base weights only, so the adapters would be lost. Merge them into the "
            "weights first (model = model.merge_and_unload(), then patch_model(model, ...)), or patch the stock model "
            "before adding adapters (LoRA can then target the new q_proj / k_proj / v_proj)."
        )


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
