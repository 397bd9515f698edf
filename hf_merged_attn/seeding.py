"""Pure tensor functions that seed merged / low-rank query–key weights from stock per-head weights.

No `nn.Module` and no model family in here, so every formula can be tested on its own. Inputs are in the
canonical per-head layout every adapter's `read_weights` returns: wq, wk of shape (H, d, hd) acting as
`x @ W_h`, and bq of shape (H, hd). Notation follows docs/MATH.md: hidden size `d`, `H` heads, head size
`hd = d / H`, rank `r`.
"""

from __future__ import annotations

import torch


# SVDs and QRs run in float64: they are small (per head, at most (d+1) x d) and this keeps the
# seeded weights exact to fp32 round-off whatever the model's dtype; results are cast back by callers.
_SEED_DTYPE = torch.float64


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
    qa, qb, core = _thin_core(left, right)
    w, sigma, zh = torch.linalg.svd(core)  # (..., k, k'): M = qa @ core @ qbᵀ
    root = sigma[..., :rank].sqrt().unsqueeze(-2)  # (..., 1, r)
    return (qa @ w[..., :rank]) * root, (qb @ zh.mT[..., :rank]) * root


def _thin_core(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M = left @ rightᵀ as qa @ core @ qbᵀ with orthonormal qa (..., m, k), qb (..., n, k'), core (..., k, k')."""
    qa, ra = torch.linalg.qr(left.to(_SEED_DTYPE))  # (..., m, k), (..., k, k)
    qb, rb = torch.linalg.qr(right.to(_SEED_DTYPE))  # (..., n, k'), (..., k', k')
    return qa, qb, ra @ rb.mT


def product_singular_values(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values of M = left @ rightᵀ (batched, descending): (..., min(k, k')) float64, from the thin core."""
    return torch.linalg.svdvals(_thin_core(left, right)[2])


def qk_singular_values(wq: torch.Tensor, bq: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
    """Per-head spectrum of S̃_h = [Wq_h; bq_h] Wk_hᵀ: (H, hd) singular values, descending, float64.

    rank(S̃_h) <= hd, so these hd values are the whole spectrum; computed from the thin factors.
    """
    homogeneous = torch.cat([wq, bq.unsqueeze(1)], dim=1)  # (H, d+1, hd)
    return product_singular_values(homogeneous, wk)


def rank_for_energy(sigma: torch.Tensor, energy: float) -> int:
    """The smallest r whose top-r singular values hold at least `energy` of Σσ² in EVERY matrix of the batch.

    Args:
        sigma: (..., k) singular values, descending (e.g. one row per head of a layer).
        energy: fraction in (0, 1]; 1.0 asks for every non-zero direction.
        (patch_model takes energies in (0, 1) only, so that rank=1.0 is not mistaken for rank 1.)

    Returns:
        r in 1..k: one rank for the whole batch (a layer's heads share one rank), the largest needed by any.
    """
    if not torch.isfinite(sigma).all():
        raise ValueError("singular values with NaN/inf: the attention weights are not finite; check the checkpoint.")
    power = sigma.to(_SEED_DTYPE).square()  # (..., k)
    total = power.sum(-1, keepdim=True)  # (..., 1)
    share = power.cumsum(-1) / total.clamp_min(torch.finfo(_SEED_DTYPE).tiny)  # (..., k)
    kept = torch.where(total > 0, share, 1.0)  # a zero matrix needs rank 1 only
    # round-off: a target of 1.0 must be reachable once every non-zero direction is kept
    needed = (kept < energy - 1e-12).sum(-1) + 1  # (...,): first r with kept[r-1] >= energy
    return int(needed.max().clamp(1, sigma.shape[-1]))


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
        head_dim: hd, the number of components a stock attention head can hold.

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


# ---------------------------------------------------------------------------------------------------
# Activation-aware ("whitened") low-rank seeding
# ---------------------------------------------------------------------------------------------------

# Relative damping of a second-moment matrix before its Cholesky factor is taken: C + λ·mean(diag C)·I,
# as SVD-LLM / ASVD do. It keeps rank-deficient moments (constant inputs, fewer tokens than d, LayerNorm's
# null direction) invertible; if the factorisation still fails, λ grows tenfold, up to _MAX_DAMPING_TRIES times.
DEFAULT_DAMPING = 1e-2
_MAX_DAMPING_TRIES = 8


def damped_cholesky(moment: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Lower-triangular L with L Lᵀ = C + λ·mean(diag C)·I (float64), for a second-moment matrix C.

    The damping is relative to the mean eigenvalue mean(diag C) (absolute 1 when C is all zero), so it does
    not depend on the scale of the activations. If the Cholesky factorisation fails (C indefinite from
    round-off, or damping=0 on a singular C), λ is raised tenfold (starting at 1e-8 when damping=0) and it
    is tried again; deterministic for a given C.

    Args:
        moment: (..., n, n) symmetric positive semi-definite, e.g. E[xᵀx].
        damping: λ >= 0.

    Returns:
        L (..., n, n), float64.

    Raises:
        ValueError: a non-finite or non-square moment, a negative damping, or no λ that makes C + λ·I
            positive definite (only possible for a badly non-symmetric or non-PSD input).
    """
    if moment.dim() < 2 or moment.shape[-1] != moment.shape[-2]:
        raise ValueError(f"moment must be a square (..., n, n) matrix; got shape {tuple(moment.shape)}.")
    if not damping >= 0:
        raise ValueError(f"damping={damping!r} must be >= 0 (a relative ridge, e.g. {DEFAULT_DAMPING}).")
    c = moment.to(_SEED_DTYPE)
    if not torch.isfinite(c).all():
        raise ValueError(
            "moment has NaN/inf entries: the calibration activations overflowed or were not finite. "
            "Check the model's weights and the calibration input_ids."
        )
    c = (c + c.mT) / 2  # exact symmetry (accumulated sums can differ in the last bit)
    n = c.shape[-1]
    scale = c.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1)  # (..., 1, 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    eye = torch.eye(n, dtype=_SEED_DTYPE, device=c.device)
    lam = damping
    for _ in range(_MAX_DAMPING_TRIES):
        factor, info = torch.linalg.cholesky_ex(c + lam * scale * eye)
        if not info.any():
            return factor
        lam = lam * 10 if lam > 0 else 1e-8
    raise ValueError(
        f"moment + λ·mean(diag)·I is not positive definite even at λ={lam / 10:g}; a second-moment matrix "
        "E[xᵀx] is positive semi-definite, so this input is not one. Pass the moments collected by "
        "hf_merged_attn.calibration.collect_attention_moments."
    )


def whitened_best_rank_factors(
    left: torch.Tensor, right: torch.Tensor, rank: int, left_chol: torch.Tensor, right_chol: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of M = left @ rightᵀ minimising the WEIGHTED error ‖L_lᵀ (M − M̂) L_r‖_F (batched).

    Derivation. Let Cl = L_l L_lᵀ and Cr = L_r L_rᵀ be positive definite (Cholesky factors). For row
    vectors a with E[aᵀa] = Cl and b with E[bᵀb] = Cr drawn independently,

        E[(a (M − M̂) bᵀ)²] = E[tr((M − M̂)ᵀ aᵀa (M − M̂) bᵀb)] = tr((M − M̂)ᵀ Cl (M − M̂) Cr)
                           = ‖L_lᵀ (M − M̂) L_r‖_F².

    The map M̂ ↦ L_lᵀ M̂ L_r is a bijection of the rank-≤r matrices (L_l, L_r invertible), so the weighted
    problem is plain Eckart–Young in whitened coordinates: take the truncated SVD [L_lᵀ M L_r]_r = A Bᵀ and
    un-whiten, M̂ = L_l^{-T} A Bᵀ L_r^{-1}, i.e. factors L_l^{-T} A and L_r^{-T} B (triangular solves).
    Whitened coordinates stay thin: L_lᵀ M L_r = (L_lᵀ left)(L_rᵀ right)ᵀ, so `best_rank_factors` runs on
    (m, k) and (n, k) factors. Finally the product is re-split by `best_rank_factors` itself, so the returned
    factors are P Σ½, Q Σ½ of M̂'s own SVD — orthogonal columns, Σ shared evenly between the two sides, the
    same form as the plain-SVD seed (balanced factors train better than whatever scale whitening left).
    With Cl = c·I and Cr = c'·I this is exactly the plain truncated SVD of M.

    Args:
        left: (..., m, k). right: (..., n, k). rank: 1 <= r <= min(m, n, k).
        left_chol: (..., m, m) lower-triangular L_l (e.g. from `damped_cholesky`).
        right_chol: (..., n, n) lower-triangular L_r.

    Returns:
        (left_r, right_r) of shapes (..., m, r) and (..., n, r), float64.
    """
    left, right = left.to(_SEED_DTYPE), right.to(_SEED_DTYPE)
    left_chol, right_chol = left_chol.to(_SEED_DTYPE), right_chol.to(_SEED_DTYPE)
    a, b = best_rank_factors(left_chol.mT @ left, right_chol.mT @ right, rank)  # whitened (.., m, r), (.., n, r)
    a = torch.linalg.solve_triangular(left_chol.mT, a, upper=True)  # L_l^{-T} A
    b = torch.linalg.solve_triangular(right_chol.mT, b, upper=True)  # L_r^{-T} B
    return best_rank_factors(a, b, rank)


def weighted_score_error(
    target: torch.Tensor, approx: torch.Tensor, query_moment: torch.Tensor, key_moment: torch.Tensor
) -> torch.Tensor:
    """Mean squared score error E[(x̃_i (S̃ − Ŝ) x_jᵀ)²] = tr(Δᵀ Cq Δ Ck), Δ = S̃ − Ŝ (batched over heads).

    Args:
        target, approx: (..., d+1, d) homogeneous score matrices.
        query_moment: (d+1, d+1) E[x̃ᵀx̃]. key_moment: (d, d) E[xᵀx].

    Returns:
        (...,) float64.
    """
    delta = (target.to(_SEED_DTYPE) - approx.to(_SEED_DTYPE))
    cq, ck = query_moment.to(_SEED_DTYPE), key_moment.to(_SEED_DTYPE)
    return ((cq @ delta) * (delta @ ck)).sum((-2, -1))  # tr(Δᵀ Cq Δ Ck) = Σ (Cq Δ) ∘ (Δ Ck)


def whitened_lowrank_from_qk(
    wq: torch.Tensor,
    bq: torch.Tensor,
    wk: torch.Tensor,
    rank: int,
    moment: torch.Tensor,
    *,
    damping: float = DEFAULT_DAMPING,
    center_keys: bool = False,
    init_std: float = 0.02,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activation-aware seed of U_h, a_h, V_h: the rank-r factors with the least score error on real inputs.

    The score of head h is x̃_i S̃_h x_jᵀ with S̃_h = [Wq_h; bq_h] Wk_hᵀ ((d+1) x d), query-side input
    x̃_i = [x_i, 1] and key-side input x_j (x = the attention input, after ln_1). Plain SVD minimises
    ‖S̃ − Ŝ‖_F, which weighs every direction of x equally; what matters is the error of the scores,

        E[(x̃_i (S̃ − Ŝ) x_jᵀ)²] = tr(Δᵀ Cq Δ Ck) = ‖L_qᵀ (S̃ − Ŝ) L_k‖_F²,

    with Cq = E[x̃ᵀx̃] = L_q L_qᵀ ((d+1) x (d+1), the `moment` given) and Ck = E[xᵀx] = L_k L_kᵀ, its
    top-left d x d block (the key side sees x without the 1). Both sides are whitened — the query side
    (SVD-LLM's whitening) and the key side — and `whitened_best_rank_factors` solves the problem exactly:
    truncated SVD of L_qᵀ S̃ L_k, un-whitened by L_q^{-T} and L_k^{-T}. Each moment is damped by
    λ·mean(diag)·I first (`damped_cholesky`), so rank-deficient or constant calibration inputs are safe.
    Treating i and j as independent is the approximation: summed over ALL pairs (i, j) of one stream of
    tokens, ‖X̃ Δ Xᵀ‖_F² = tr(Δᵀ X̃ᵀX̃ Δ XᵀX) is exact; causal masking and per-sequence pairing are ignored.

    `center_keys`: the softmax over j ignores anything constant along j, and the error x̃_i Δ μᵀ caused by the
    mean key μ = E[x] is such a constant. With center_keys=True the key side uses the covariance
    Ck = E[xᵀx] − μᵀμ instead, so no rank is spent on that softmax-invariant part (it is exact for the error
    around the global mean; per-sequence means still differ from it).

    For r >= hd nothing is lost — rank(S̃_h) <= hd, so S̃_h is held exactly — and whitening would change
    nothing: the result is that of `lowrank_from_qk` (stock weights at r = hd, padded above).

    Args:
        wq, wk: (H, d, hd). bq: (H, hd). rank: r >= 1.
        moment: (d+1, d+1) E[x̃ᵀx̃] of this layer's attention input, x̃ = [x, 1] (last row/column: E[x], 1).
        damping: relative ridge λ for both Cholesky factors.
        center_keys: whiten the key side with the covariance of x instead of its second moment.
        init_std, generator: as `lowrank_from_qk` (used only for r > hd).

    Returns:
        U (H, d, r), a (H, r), V (H, d, r), in float64.
    """
    num_heads, d, hd = wq.shape
    if moment.shape != (d + 1, d + 1):
        raise ValueError(
            f"moment has shape {tuple(moment.shape)}; expected ({d + 1}, {d + 1}) = E[x̃ᵀx̃] for x̃ = [x, 1] with "
            f"hidden size d={d}."
        )
    if rank >= hd:
        return lowrank_from_qk(wq, bq, wk, rank, init_std=init_std, generator=generator)
    wq, bq, wk = (t.to(_SEED_DTYPE) for t in (wq, bq, wk))
    moment = moment.to(device=wq.device, dtype=_SEED_DTYPE)
    query_chol = damped_cholesky(moment, damping)  # (d+1, d+1)
    key_moment = moment[:d, :d]  # E[xᵀx]
    if center_keys:
        mean = moment[d, :d]  # E[x]
        key_moment = key_moment - torch.outer(mean, mean)  # Cov(x)
    key_chol = damped_cholesky(key_moment, damping)  # (d, d)
    homogeneous = torch.cat([wq, bq.unsqueeze(1)], dim=1)  # (H, d+1, hd): S̃_h = homogeneous @ Wk_hᵀ
    left, right = whitened_best_rank_factors(
        homogeneous, wk, rank, query_chol.expand(num_heads, d + 1, d + 1), key_chol.expand(num_heads, d, d)
    )  # (H, d+1, r), (H, d, r)
    return left[:, :d].contiguous(), left[:, d].contiguous(), right


# ---------------------------------------------------------------------------------------------------
# One shared latent for keys and values (MLA-style): c = x W_c, k_h = c Bk_h, v_h = c Bv_h + bv_h
# ---------------------------------------------------------------------------------------------------


def query_pair_energy(wq: torch.Tensor, bq: torch.Tensor | None, kv_heads: int,
                      moment: torch.Tensor | None = None) -> torch.Tensor:
    """Offset-averaged query energy per key dimension of each KV group (MATH.md part five, query-aware keys): (G, hd).

    The score error of a key is qᵀR_δ(k − k̂). Averaged over the offsets δ, each rotary pair's 2x2 block of the
    group's query second moment Σ_q = Σ_{i in g} E[q_i q_iᵀ] becomes isotropic and cross-pair terms vanish, so the
    error weighs key dimension j of pair f by e_f = (Σ_q[f, f] + Σ_q[f', f']) / 2 (f' = f + hd/2, rotate_half's
    pairing). q_i = x̃·[Wq_i; bq_i] over the calibration inputs (`moment` = E[x̃ᵀx̃]), or over white inputs without one.

    Args:
        wq: (H, d, hd) query weights, bq: (H, hd) or None, kv_heads: G (query head i reads group i // (H/G)).

    Returns:
        (G, hd) float64, each pair's energy on both of its dimensions.
    """
    heads, d, hd = wq.shape
    left = wq.to(_SEED_DTYPE)
    if moment is None:
        energy = (left * left).sum(1)  # (H, hd): diag(Wqᵀ Wq)
    else:
        full = torch.cat([left, (bq if bq is not None else torch.zeros(heads, hd)).to(left).unsqueeze(1)], 1)
        energy = torch.einsum("hdj,de,hej->hj", full, moment.to(left), full)  # (H, hd): diag(W̃qᵀ E[x̃ᵀx̃] W̃q)
    per_group = energy.view(kv_heads, heads // kv_heads, hd).sum(1)  # (G, hd)
    half = hd // 2
    pairs = (per_group[:, :half] + per_group[:, half:]) / 2  # (G, hd/2)
    return torch.cat([pairs, pairs], dim=1)


def orthogonal_mix(size: int, seed: int = 0) -> torch.Tensor:
    """A fixed orthogonal (size, size) float64 matrix that spreads energy evenly over coordinates: the normalised
    Hadamard matrix when `size` is a power of two, else the Q of a seeded Gaussian matrix's QR (a random rotation).
    Folded into a latent (W_c H, Hᵀ Bk, Hᵀ Bv: exact in full precision) it evens out a PCA's decaying coordinates before
    per-group quantization (MATH.md part five, quantizing c)."""
    if size & (size - 1) == 0:
        mix = torch.ones(1, 1, dtype=_SEED_DTYPE)
        while mix.shape[0] < size:
            mix = torch.cat([torch.cat([mix, mix], 1), torch.cat([mix, -mix], 1)], 0)
        return mix / size**0.5
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=_SEED_DTYPE))
    return q * torch.sign(torch.diagonal(r))  # a unique Q (positive diagonal of R)


def _stacked_kv(wk: torch.Tensor, wv: torch.Tensor, moment: torch.Tensor | None, damping: float,
                balance: bool = True, key_weights: torch.Tensor | None = None):
    """The balanced stacked matrix [Wk | Wv] (d x (Hk·wk + Hv·wv)) the latent is fitted to, optionally whitened:
    (M, L or None).

    Keys and values are each scaled to unit Frobenius norm (in whitened coordinates when whitening), so neither
    side owns the SVD (`balance=False`: as they are); with `moment` = E[x̃ᵀx̃] ((d+1) x (d+1)) the rows are weighted
    by Lᵀ, L the Cholesky factor of E[xᵀx] (its top-left d x d block): ‖X (M − M̂)‖_F = ‖Lᵀ (M − M̂)‖_F. Keys and
    values may differ in head count and width (a rotary model's NoPE keys and its values); either may be empty.
    """
    d = wk.shape[1]
    keys = wk.to(_SEED_DTYPE).permute(1, 0, 2).reshape(d, -1)  # (Hk, d, wk) -> (d, Hk*wk)
    values = wv.to(_SEED_DTYPE).permute(1, 0, 2).reshape(d, -1)  # (Hv, d, wv) -> (d, Hv*wv)
    chol = None
    if moment is not None:
        if moment.shape != (d + 1, d + 1):
            raise ValueError(f"moment has shape {tuple(moment.shape)}; expected ({d + 1}, {d + 1}) = E[x̃ᵀx̃].")
        chol = damped_cholesky(moment.to(device=wk.device, dtype=_SEED_DTYPE)[:d, :d], damping)  # (d, d)
        keys, values = chol.mT @ keys, chol.mT @ values
    if key_weights is not None:  # query-aware keys: column j of head h weighed by sqrt(its query energy)
        keys = keys * key_weights.to(keys).reshape(-1).clamp_min(0).sqrt()
    if balance:
        tiny = torch.finfo(_SEED_DTYPE).tiny
        keys, values = keys / keys.norm().clamp_min(tiny), values / values.norm().clamp_min(tiny)
    return torch.cat([keys, values], dim=1), chol  # (d, Hk*wk + Hv*wv)


def latent_singular_values(wk: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    """Spectrum of the balanced stacked [Wk | Wv] of a layer: (1, d) singular values, descending, float64
    (one row: a layer's heads share one latent, so `rank_for_energy` gives one r_c per block)."""
    return torch.linalg.svdvals(_stacked_kv(wk, wv, None, 0.0)[0]).unsqueeze(0)


def latent_from_kv(
    wk: torch.Tensor,
    wv: torch.Tensor,
    rank: int,
    moment: torch.Tensor | None = None,
    *,
    damping: float = DEFAULT_DAMPING,
    balance: bool = True,
    key_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seed one latent per layer: W_c (d, r_c) and per-head up-projections Bk_h, Bv_h (r_c, hd) with
    Wk_h ≈ W_c Bk_h and Wv_h ≈ W_c Bv_h (MATH.md, "one shared latent").

    - r_c = d: W_c = I, Bk = Wk, Bv = Wv — stock exactly (the latent is x itself).
    - r_c < d: W_c spans the top-r_c left singular directions of the balanced stacked [Wk | Wv] (d x 2d); with
      orthonormal W_c, Bk_h = W_cᵀ Wk_h and Bv_h = W_cᵀ Wv_h, the best projection of both onto that subspace.
    - with `moment` (activation-aware, SVD-LLM whitening): the same in whitened coordinates, minimising the error
      of x Wk_h and x Wv_h on the calibration inputs: SVD of Lᵀ M = P Σ Qᵀ, W_c = L^{-T} P_r, B = P_rᵀ Lᵀ W
      (the map x ↦ x W_c Bk_h is then x L^{-T} P_r P_rᵀ Lᵀ Wk_h, a projection in the inputs' metric).

    The key bias never enters (its score term is constant along the softmax row); the value bias stays a bias of
    the value up-projection (exact: the attention weights of a row sum to 1).

    Args:
        wk, wv: (H, d, hd) per-head key and value weights (a rotary model's NoPE keys (Hk, d, w) may differ from its
            values (G, d, hd) in head count and width). rank: r_c, 1 <= r_c <= d.
        moment: optional (d+1, d+1) E[x̃ᵀx̃] of the layer's attention input (from `collect_attention_moments`).
        damping: relative ridge of the Cholesky factor (see `damped_cholesky`).
        balance: scale keys and values to equal norms before the SVD (default); False fits [Wk | Wv] as it is.
        key_weights: optional (Hk, w) weight of every key column in the SVD that CHOOSES the latent (e.g.
            `query_pair_energy`: the key error as the queries see it); Bk is the same projection either way.

    Returns:
        W_c (d, r_c), Bk (H, r_c, hd), Bv (H, r_c, hd), float64.
    """
    d = wk.shape[1]
    if not 1 <= rank <= d:
        raise ValueError(f"rank={rank} must be between 1 and the hidden size d={d} for a latent.")
    wk, wv = wk.to(_SEED_DTYPE), wv.to(_SEED_DTYPE)
    if rank == d:
        return torch.eye(d, dtype=_SEED_DTYPE, device=wk.device), wk.clone(), wv.clone()
    stacked, chol = _stacked_kv(wk, wv, moment, damping, balance, key_weights)
    left = torch.linalg.svd(stacked, full_matrices=False)[0][:, :rank]  # (d, r_c), orthonormal
    if chol is None:
        down, whiten = left, torch.eye(d, dtype=_SEED_DTYPE, device=wk.device)
    else:
        down = torch.linalg.solve_triangular(chol.mT, left, upper=True)  # L^{-T} P_r
        whiten = chol.mT  # Lᵀ
    project = left.mT @ whiten  # (r_c, d): P_rᵀ Lᵀ (Lᵀ = I without whitening)
    return down, project @ wk, project @ wv  # (d, r_c), (H, r_c, hd) each (broadcast over heads)


# ---------------------------------------------------------------------------------------------------
# The value side: M_h = Wv_h Wo_h, merged whole (d x d) or factored at rank r_v
# ---------------------------------------------------------------------------------------------------


def value_bias_per_head(bv: torch.Tensor, wo: torch.Tensor) -> torch.Tensor:
    """c_h = bv_h Wo_h (H, d): each head's value bias carried through the output projection.

    With merged or low-rank values it cannot stay a value bias (the value is x, or P_h has no bias), so the output
    adds Σ_h (Σ_j A_h[i, j]) c_h: the row sums of A_h are 1 in most places, but 0 for a query whose mask hides every
    key (SDPA) and anything under attention dropout, where folding Σ_h c_h into the output bias would be wrong.
    """
    return torch.einsum("hk,hkd->hd", bv.to(_SEED_DTYPE), wo.to(_SEED_DTYPE))


def values_from_vo(
    wv: torch.Tensor,
    wo: torch.Tensor,
    value_rank: int | None = None,
    moment: torch.Tensor | None = None,
    *,
    damping: float = DEFAULT_DAMPING,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Seed the value side from per-head Wv_h (d, hd) and Wo_h (hd, d): M_h = Wv_h Wo_h (MATH.md, merged values).

    - value_rank None: merged, M (H, d, d) whole (exact); the value is x itself, so there is no P.
    - value_rank r_v: M_h ≈ P_h Q_hᵀ with P (H, d, r_v), Q (H, d, r_v). r_v = hd: P = Wv, Q = Woᵀ (stock exactly);
      r_v < hd: the best rank-r_v factors from the thin QR of Wv_h and Wo_hᵀ and an hd x hd SVD (never a d x d SVD
      per head); with `moment` ((d+1) x (d+1) E[x̃ᵀx̃]) the least error ‖X (M_h − M̂_h)‖ on the calibration inputs,
      weighting the input side by the Cholesky factor of E[xᵀx].

    Returns:
        (P or None, M (H, d, d) for merged values, or Q (H, d, r_v)), float64.
    """
    num_heads, d, hd = wv.shape
    wv, wo = wv.to(_SEED_DTYPE), wo.to(_SEED_DTYPE)
    if value_rank is None:
        return None, wv @ wo  # (H, d, hd) @ (H, hd, d) -> (H, d, d)
    if not 1 <= value_rank <= hd:
        raise ValueError(f"value_rank={value_rank} must be between 1 and the head size {hd} (M_h has rank <= {hd}).")
    if value_rank == hd:
        return wv.clone(), wo.mT.clone()
    if moment is None:
        return best_rank_factors(wv, wo.mT, value_rank)
    chol = damped_cholesky(moment.to(device=wv.device, dtype=_SEED_DTYPE)[:d, :d], damping)  # (d, d)
    eye = torch.eye(d, dtype=_SEED_DTYPE, device=wv.device)
    return whitened_best_rank_factors(wv, wo.mT, value_rank, chol.expand(num_heads, d, d), eye.expand(num_heads, d, d))


# ---------------------------------------------------------------------------------------------------
# Rotary models (MATH.md part four): which frequency pairs stay rotated, RoRoPE, and one latent for the
# NoPE keys and the values. Head size hd, G key/value heads, pair f = dims (f, f + hd/2) (rotate_half).
# A "key map" sends the G stock key heads (G, hd) to the features of Gk new key heads: rotary features
# (2K per head: the first halves of K pairs, then their second halves, so rotate_half applies) and NoPE
# features (w per head). Query head i reads new key head i // (H / Gk) through the same map's block of
# its own KV head: scores are unchanged wherever the map is orthogonal and nothing is dropped.
# ---------------------------------------------------------------------------------------------------

def kept_pairs(rule: str, head_dim: int, pairs: int, kv_heads: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """The frequency pairs each KV head keeps rotated, (G, r) sorted, by MHA2MLA's rules.

    "high": the r fastest (f = 0 .. r-1); "low": the r slowest; "uniform": every hd/(2r)-th from the fastest;
    "2norm": the r largest `scores` (G, hd/2) — the mean pair norm of the group's queries times its key's.
    """
    half = head_dim // 2
    if not 0 <= pairs <= half:
        raise ValueError(f"pairs={pairs} must be between 0 and hd/2 = {half}.")
    if rule == "high":
        kept = torch.arange(pairs)
    elif rule == "low":
        kept = torch.arange(half - pairs, half)
    elif rule == "uniform":
        kept = torch.arange(pairs) * half // max(pairs, 1)
    elif rule == "2norm":
        if scores is None or scores.shape != (kv_heads, half):
            raise ValueError(f"rule '2norm' needs scores of shape ({kv_heads}, {half}); got "
                             f"{None if scores is None else tuple(scores.shape)}.")
        return scores.topk(pairs, dim=-1).indices.sort(dim=-1).values
    else:
        raise ValueError(f"rule={rule!r} is not a per-head rule; allowed: 'high', 'low', 'uniform', '2norm'.")
    return kept.expand(kv_heads, pairs).clone()


def pair_norm_scores(query_norms: torch.Tensor, key_norms: torch.Tensor) -> torch.Tensor:
    """MHA2MLA's 2-norm score of each (KV head g, pair f): Σ_{query heads i of g} mean‖q_i,f‖ · mean‖k_g,f‖.

    Args: query_norms (H, hd/2) and key_norms (G, hd/2), mean norms over calibration tokens. Returns (G, hd/2).
    """
    kv_heads = key_norms.shape[0]
    grouped = query_norms.view(kv_heads, -1, query_norms.shape[-1]).sum(1)  # (G, H/G, hd/2) -> (G, hd/2)
    return grouped * key_norms


def selection_maps(kept: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key maps for per-head kept pairs (0/1 selections, Gk = G): new key head g reads stock key head g only.

    Args: kept (G, r) pair indices from `kept_pairs`.
    Returns: rope_map (G, G, hd, 2r), nope_map (G, G, hd, hd - 2r), freq (G, r) (the frequency of each rotary pair).
    """
    kv_heads, pairs = kept.shape
    half = head_dim // 2
    rope = torch.zeros(kv_heads, kv_heads, head_dim, 2 * pairs, dtype=_SEED_DTYPE)
    nope = torch.zeros(kv_heads, kv_heads, head_dim, head_dim - 2 * pairs, dtype=_SEED_DTYPE)
    for g in range(kv_heads):
        keep = set(kept[g].tolist())
        dropped = [f for f in range(half) if f not in keep]
        for j, f in enumerate(kept[g].tolist()):
            rope[g, g, f, j] = rope[g, g, f + half, pairs + j] = 1.0
        for j, f in enumerate(dropped):
            nope[g, g, f, j] = nope[g, g, f + half, len(dropped) + j] = 1.0
    return rope, nope, kept.clone()


def rorope_maps(wk: torch.Tensor, bk: torch.Tensor | None, moment: torch.Tensor, pairs: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TransMLA's RoRoPE: per frequency pair f an orthogonal mix U_f (G x G) across the KV heads — the PCA of their
    key pairs on calibration activations, the same on both halves of the pair, so it commutes with the rotation —
    and ONE new key head (DeepSeek-V2's shared rotary key) keeping the G·r mixed pairs of largest energy.

    Exact before truncation: the rotary and NoPE maps together are orthogonal on R^(G·hd), so every query head,
    reading all mixed components of its frequency, gets its stock score.

    Args:
        wk (G, d, hd), bk (G, hd) or None: stock key weights. moment (d+1, d+1): E[x̃ᵀx̃] of the layer's input.
        pairs: r, the per-KV-head budget; G·r mixed pairs are kept (the same rotary numbers per token as r per head).

    Returns:
        rope_map (1, G, hd, 2K), nope_map (1, G, hd, G·hd - 2K), freq (1, K) with K = G·r, and the energy of every
        mixed pair (hd/2, G), descending per frequency.
    """
    kv_heads, d, head_dim = wk.shape
    half = head_dim // 2
    wk = wk.to(_SEED_DTYPE)
    keys = torch.cat([wk, (wk.new_zeros(kv_heads, 1, head_dim) if bk is None
                      else bk.to(wk.device, _SEED_DTYPE).unsqueeze(1))], dim=1)  # (G, d+1, hd): [Wk; bk]
    second = torch.einsum("gaf,ab,hbf->fgh", keys, moment.to(wk.device, _SEED_DTYPE), keys)  # (hd, G, G): E[k_g k_h]
    cov = second[:half] + second[half:]  # (hd/2, G, G): both halves of each pair
    energy, vectors = torch.linalg.eigh(cov)  # ascending
    energy, mix = energy.flip(-1), vectors.flip(-1).mT  # (hd/2, G) descending; mix[f, j, g] = U_f[j, g]
    order = energy.flatten().cpu().argsort(descending=True, stable=True).tolist()  # (f, j) as f·G + j, strongest first
    kept = sorted(order[: kv_heads * pairs])
    dropped = sorted(order[kv_heads * pairs:])

    def build(features):
        out = torch.zeros(1, kv_heads, head_dim, 2 * len(features), dtype=_SEED_DTYPE)
        for t, flat in enumerate(features):
            f, j = divmod(flat, kv_heads)
            out[0, :, f, t] = out[0, :, f + half, len(features) + t] = mix[f, j]  # (G,): U_f[j, g] for every head g
        return out

    freq = torch.tensor([flat // kv_heads for flat in kept], dtype=torch.long).view(1, -1)
    return build(kept), build(dropped), freq, energy


def rotary_latent_from_kv(
    wk: torch.Tensor,
    bk: torch.Tensor | None,
    wv: torch.Tensor,
    rope_map: torch.Tensor,
    nope_map: torch.Tensor,
    rank: int,
    moment: torch.Tensor | None = None,
    *,
    damping: float = DEFAULT_DAMPING,
    balance: bool = True,
) -> dict[str, torch.Tensor]:
    """Seed a rotary latent layer: the kept rotary keys as a projection of their own, the NoPE keys and the values
    from ONE latent c = x W_c (the joint, K/V-balanced, optionally whitened SVD of `latent_from_kv`).

    The NoPE part of the key bias is dropped (its score term q_N·bk_N is constant along the softmax row); the rotary
    part stays with the rotary key (it is rotated with it).

    Args:
        wk (G, d, hd), bk (G, hd) or None, wv (G, d, hd): stock key and value weights.
        rope_map (Gk, G, hd, 2K), nope_map (Gk, G, hd, w): from `selection_maps` or `rorope_maps`.
        rank: r_c. moment: E[x̃ᵀx̃] for whitening, or None. balance: see `latent_from_kv`.

    Returns:
        {"rope_weight" (Gk, d, 2K), "rope_bias" (Gk, 2K) or absent, "down" W_c (d, r_c), "key_up" (Gk, r_c, w),
        "value_up" (G, r_c, hd)}, float64.
    """
    wk = wk.to(_SEED_DTYPE)
    rope_map, nope_map = rope_map.to(wk.device, _SEED_DTYPE), nope_map.to(wk.device, _SEED_DTYPE)  # the weights' device
    out = {"rope_weight": torch.einsum("gdh,kghf->kdf", wk, rope_map)}  # (Gk, d, 2K)
    if bk is not None:
        out["rope_bias"] = torch.einsum("gh,kghf->kf", bk.to(_SEED_DTYPE), rope_map)  # (Gk, 2K)
    nope_keys = torch.einsum("gdh,kghf->kdf", wk, nope_map)  # (Gk, d, w)
    out["down"], out["key_up"], out["value_up"] = latent_from_kv(nope_keys, wv, rank, moment, damping=damping,
                                                                 balance=balance)
    return out
