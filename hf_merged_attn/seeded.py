"""Merged modules seeded from a stock attention module's weights: the pure tensor math of `seeding.py` applied to one
layer of a family (`ArchitectureSpec` reads and writes its weights). `patch_model` calls these through `seed_layer`."""

from __future__ import annotations

import torch
from torch import nn

from .merged_attention import (
    ArchitectureSpec,
    MergedAttention,
    heads_to_linear,
    read_output,
)
from .seeding import (
    DEFAULT_DAMPING,
    covariance_from_qk,
    kept_pairs,
    latent_from_kv,
    lowrank_from_qk,
    orthogonal_mix,
    pair_norm_scores,
    query_pair_energy,
    rorope_maps,
    rotary_latent_from_kv,
    selection_maps,
    value_bias_per_head,
    values_from_vo,
    whitened_lowrank_from_qk,
)


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
