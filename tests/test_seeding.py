"""The pure seeding functions, checked against direct formulas (float64 throughout, so tolerances are ~1e-10)."""

from __future__ import annotations

import torch

from hf_merged_attn.seeding import (
    best_rank_factors,
    covariance_from_qk,
    lowrank_from_qk,
    qk_from_homogeneous,
)

H, D, HD = 3, 12, 4
TOL = 1e-10  # float64 round-off on matrices of size ~12


def random_qk():
    weight = torch.randn(D, 3 * D, dtype=torch.float64)
    bias = torch.randn(3 * D, dtype=torch.float64)
    per_head = weight.view(D, 3, H, HD).permute(1, 2, 0, 3)  # GPT-2's Conv1D column j*d + h*hd + c -> (3, H, d, hd)
    b = bias.view(3, H, HD)
    return weight, bias, {"wq": per_head[0], "wk": per_head[1], "bq": b[0], "bk": b[1]}


def stock_scores(weight, bias, x):
    """Stock per-head scores (H, T, T) without scaling, straight from the Conv1D layout."""
    q, k, _ = (x @ weight + bias).split(D, dim=-1)  # (T, d) each
    q, k = q.view(-1, H, HD).transpose(0, 1), k.view(-1, H, HD).transpose(0, 1)  # (H, T, hd)
    return q @ k.mT


def test_covariance_scores_equal_stock_up_to_row_constants():
    weight, bias, parts = random_qk()
    s, u = covariance_from_qk(parts["wq"], parts["bq"], parts["wk"])
    x = torch.randn(5, D, dtype=torch.float64)
    merged = (x @ s + u.unsqueeze(1)) @ x.T  # (H, T, T)
    diff = stock_scores(weight, bias, x) - merged
    # the dropped terms (x_i Wq bkᵀ, bq bkᵀ) are constant along each row j, so the softmax is unchanged
    assert (diff - diff[..., :1]).abs().max() < TOL
    assert diff.abs().max() > 1e-3  # ... and they are really there (non-zero bk)


def test_best_rank_factors_is_truncated_svd():
    left, right = torch.randn(H, D + 1, 6, dtype=torch.float64), torch.randn(H, D, 6, dtype=torch.float64)
    m = left @ right.mT
    u, s, vh = torch.linalg.svd(m)
    for r in (1, 3, 6):
        a, b = best_rank_factors(left, right, r)
        best = u[..., :r] @ torch.diag_embed(s[..., :r]) @ vh[..., :r, :]
        assert (a @ b.mT - best).abs().max() < 1e-9
        assert (a.norm(dim=-2) - b.norm(dim=-2)).abs().max() < 1e-9  # Σ split evenly between the two sides


def test_lowrank_seeding():
    _, _, parts = random_qk()
    wq, bq, wk = parts["wq"], parts["bq"], parts["wk"]
    target = torch.cat([wq, bq.unsqueeze(1)], 1) @ wk.mT  # S̃ (H, d+1, d)

    def product(u, a, v):
        return torch.cat([u, a.unsqueeze(1)], 1) @ v.mT

    u, a, v = lowrank_from_qk(wq, bq, wk, HD)
    assert torch.equal(u, wq) and torch.equal(a, bq) and torch.equal(v, wk)
    u, a, v = lowrank_from_qk(wq, bq, wk, 2 * HD, init_std=0.1)
    assert u.shape == (H, D, 2 * HD) and (product(u, a, v) - target).abs().max() < TOL
    assert v[..., HD:].abs().max() == 0 and u[..., HD:].abs().max() > 0
    errors = [(product(*lowrank_from_qk(wq, bq, wk, r)) - target).norm() for r in (1, 2, 3, 4)]
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-9


def test_export_round_trip():
    _, _, parts = random_qk()
    s, u = covariance_from_qk(parts["wq"], parts["bq"], parts["wk"])
    left = torch.cat([s, u.unsqueeze(1)], dim=1)  # (H, d+1, d), rank <= hd right after seeding
    eye = torch.eye(D, dtype=torch.float64).expand(H, D, D)
    wq, bq, wk, err = qk_from_homogeneous(left, eye, HD)
    assert wq.shape == (H, D, HD) and bq.shape == (H, HD) and err.max() < 1e-9
    assert (torch.cat([wq, bq.unsqueeze(1)], 1) @ wk.mT - left).abs().max() < 1e-9
    # a full-rank S cannot be held at rank hd: the error is reported, not hidden
    _, _, _, err = qk_from_homogeneous(torch.randn(H, D + 1, D, dtype=torch.float64), eye, HD)
    assert (err > 0.1).all()
