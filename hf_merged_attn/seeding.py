"""Pure tensor functions that seed merged / low-rank query–key weights from stock GPT-2 weights.

No `nn.Module` in here, so every formula can be tested on its own. Notation follows
`shared/MATH.md`: hidden size `d`, `H` heads, head size `hd = d / H`, rank `r`.

GPT-2's `c_attn` is a `transformers.pytorch_utils.Conv1D`, whose weight is stored (in, out) =
(d, 3d) and computes `y = x @ W + b` — the transpose of `nn.Linear`'s (out, in) layout.
"""

from __future__ import annotations

import torch

# SVDs and QRs run in float64: they are small (per head, at most (d+1) x d) and this keeps the
# seeded weights exact to fp32 round-off whatever the model's dtype; results are cast back by callers.
_SEED_DTYPE = torch.float64


def split_gpt2_qkv(c_attn_weight: torch.Tensor, c_attn_bias: torch.Tensor, num_heads: int) -> dict[str, torch.Tensor]:
    """Split a GPT-2 `c_attn` Conv1D into per-head query, key and value weights.

    Args:
        c_attn_weight: Conv1D weight, shape (d, 3d) — (in, out), NOT nn.Linear's (out, in).
        c_attn_bias: Conv1D bias, shape (3d,).
        num_heads: H.

    Returns:
        dict with `wq`, `wk` of shape (H, d, hd), `bq`, `bk` of shape (H, hd), and the value block
        `wv` (d, d) / `bv` (d,) in Conv1D layout.
    """
    d = c_attn_weight.shape[0]
    if c_attn_weight.shape != (d, 3 * d) or c_attn_bias.shape != (3 * d,) or d % num_heads:
        raise ValueError(
            f"c_attn weight/bias have shapes {tuple(c_attn_weight.shape)}/{tuple(c_attn_bias.shape)} with "
            f"num_heads={num_heads}; expected (d, 3d)/(3d,) with d divisible by num_heads."
        )
    hd = d // num_heads
    wq, wk, wv = c_attn_weight.split(d, dim=1)  # each (d, d); column h*hd + j is head h, channel j
    bq, bk, bv = c_attn_bias.split(d, dim=0)  # each (d,)

    def per_head(w: torch.Tensor) -> torch.Tensor:
        return w.reshape(d, num_heads, hd).permute(1, 0, 2)  # (d, d) -> (d, H, hd) -> (H, d, hd)

    return {
        "wq": per_head(wq),
        "wk": per_head(wk),
        "bq": bq.reshape(num_heads, hd),  # (H, hd)
        "bk": bk.reshape(num_heads, hd),  # (H, hd)
        "wv": wv,
        "bv": bv,
    }


def covariance_from_qk(wq: torch.Tensor, bq: torch.Tensor, wk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-head query and key weights: S_h = Wq_h Wk_hᵀ and u_h = bq_h Wk_hᵀ.

    The key bias bk only adds terms constant along each softmax row, so it is dropped (MATH.md).

    Args:
        wq, wk: (H, d, hd). bq: (H, hd).

    Returns:
        S of shape (H, d, d) and u of shape (H, d), in float64.
    """
    wq, bq, wk = (t.to(_SEED_DTYPE) for t in (wq, bq, wk))
    s = wq @ wk.mT  # (H, d, hd) @ (H, hd, d) -> (H, d, d)
    u = (bq.unsqueeze(1) @ wk.mT).squeeze(1)  # (H, 1, hd) @ (H, hd, d) -> (H, d)
    return s, u


def best_rank_factors(left: torch.Tensor, right: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of M = left @ rightᵀ (batched), split evenly: M ≈ (P Σ½)(Q Σ½)ᵀ.

    Works on the thin factors (QR of each, then an SVD of the small core), so it is cheap when M
    is given as a product, and exact (Eckart–Young optimal in Frobenius norm). Pass
    `right = identity` to factor a full matrix.

    Args:
        left: (..., m, k). right: (..., n, k). rank: r, with 1 <= r <= k.

    Returns:
        (left_r, right_r) of shapes (..., m, r) and (..., n, r), float64, with left_r @ right_rᵀ the best
        rank-r approximation of M.
    """
    k = left.shape[-1]
    if not 1 <= rank <= min(k, left.shape[-2], right.shape[-2]):
        raise ValueError(f"rank={rank} must be between 1 and min(m, n, k) for M of inner size k={k}.")
    qa, ra = torch.linalg.qr(left.to(_SEED_DTYPE))  # (..., m, k), (..., k, k)
    qb, rb = torch.linalg.qr(right.to(_SEED_DTYPE))  # (..., n, k'), (..., k', k)
    w, sigma, zh = torch.linalg.svd(ra @ rb.mT)  # core (..., k, k')
    root = sigma[..., :rank].sqrt().unsqueeze(-2)  # (..., 1, r)
    return (qa @ w[..., :rank]) * root, (qb @ zh.mT[..., :rank]) * root


def lowrank_from_qk(
    wq: torch.Tensor,
    bq: torch.Tensor,
    wk: torch.Tensor,
    rank: int,
    init_std: float = 0.02,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seed low-rank factors U_h, a_h, V_h with [x, 1] [U_h; a_h] V_hᵀ xᵀ ≈ the stock score (up to row constants).

    - r == hd: U = Wq, a = bq, V = Wk — stock attention re-parametrised, exact.
    - r <  hd: best rank-r factors of the homogeneous matrix S̃_h = [Wq_h; bq_h] Wk_hᵀ ((d+1) x d).
    - r >  hd: Wq, bq, Wk plus r - hd extra columns: small random on the query side (U, a), zeros on
      the key side (V). The product is unchanged, and because only one side is zero the new columns
      are not stuck at the zero–zero saddle (each side's gradient is proportional to the other side).

    Args:
        wq, wk: (H, d, hd). bq: (H, hd). rank: r >= 1.
        init_std: standard deviation of the random extra query columns when r > hd.
        generator: optional torch.Generator for those random columns.

    Returns:
        U (H, d, r), a (H, r), V (H, d, r), in float64.
    """
    num_heads, d, hd = wq.shape
    wq, bq, wk = (t.to(_SEED_DTYPE) for t in (wq, bq, wk))
    if rank == hd:
        return wq.clone(), bq.clone(), wk.clone()
    if rank < hd:
        homogeneous = torch.cat([wq, bq.unsqueeze(1)], dim=1)  # (H, d+1, hd): S̃_h = homogeneous @ Wk_hᵀ
        left, right = best_rank_factors(homogeneous, wk, rank)  # (H, d+1, r), (H, d, r)
        return left[:, :d].contiguous(), left[:, d].contiguous(), right
    extra = rank - hd
    noise = torch.randn(num_heads, d + 1, extra, generator=generator, dtype=_SEED_DTYPE, device=wq.device) * init_std
    u = torch.cat([wq, noise[:, :d]], dim=2)  # (H, d, r)
    a = torch.cat([bq, noise[:, d]], dim=1)  # (H, r)
    v = torch.cat([wk, wk.new_zeros(num_heads, d, extra)], dim=2)  # (H, d, r)
    return u, a, v


def qk_from_homogeneous(
    left: torch.Tensor, right: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Export a merged score matrix S̃_h = left_h @ right_hᵀ ((d+1) x d) back to stock Wq, bq, Wk.

    Keeps the best `head_dim` components (exact when rank(S̃_h) <= head_dim) and reports the relative
    Frobenius error ‖S̃ − Ŝ‖ / ‖S̃‖ per head.

    Args:
        left: (H, d+1, k) — rows 0..d-1 act on x, row d on the homogeneous 1 (the bias).
        right: (H, d, k).
        head_dim: hd, the number of components stock GPT-2 can hold.

    Returns:
        wq (H, d, hd), bq (H, hd), wk (H, d, hd), rel_error (H,), float64. If rank(S̃) < hd the spare
        columns are zero.
    """
    num_heads, d_plus_1, k = left.shape
    keep = min(head_dim, k, right.shape[1])
    new_left, new_right = best_rank_factors(left, right, keep)
    if keep < head_dim:  # pad to the stock head size with zero columns (contribute nothing)
        new_left = torch.nn.functional.pad(new_left, (0, head_dim - keep))
        new_right = torch.nn.functional.pad(new_right, (0, head_dim - keep))
    full = left.to(_SEED_DTYPE) @ right.to(_SEED_DTYPE).mT  # (H, d+1, d)
    approx = new_left @ new_right.mT
    norm = torch.linalg.matrix_norm(full).clamp_min(torch.finfo(_SEED_DTYPE).tiny)
    rel_error = torch.linalg.matrix_norm(full - approx) / norm
    return new_left[:, : d_plus_1 - 1], new_left[:, d_plus_1 - 1], new_right, rel_error


def heads_to_linear(per_head: torch.Tensor) -> torch.Tensor:
    """(H, d, k) per-head maps x -> x @ W_h as one nn.Linear weight (H*k, d)."""
    heads, d, k = per_head.shape
    return per_head.mT.reshape(heads * k, d)  # (H, k, d) -> (H*k, d)


def linear_to_heads(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of `heads_to_linear`: an nn.Linear weight (H*k, d) -> per-head maps (H, d, k)."""
    _, d = weight.shape
    return weight.reshape(num_heads, -1, d).mT  # (H*k, d) -> (H, k, d) -> (H, d, k)
