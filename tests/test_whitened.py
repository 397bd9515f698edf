"""Activation-aware ("whitened") low-rank seeding: the math, the calibration pass, errors, checkpoints, and
the shipped stand-in model (whitened beats plain SVD in perplexity right after patching)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import HEAD_DIM, HIDDEN, LAYERS, VOCAB, make_gpt2, max_diff
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, default_data_collator

import hf_merged_attn  # noqa: F401  (registers the merged classes with the Auto classes)
from hf_merged_attn import MergedGPT2LMHeadModel, patch_model
from hf_merged_attn.calibration import collect_attention_moments, evenly_spaced_blocks
from hf_merged_attn.seeding import (
    damped_cholesky,
    lowrank_from_qk,
    weighted_score_error,
    whitened_best_rank_factors,
    whitened_lowrank_from_qk,
)

F64 = torch.float64
H, D, HD = 3, 12, 4  # pure-math sizes (as tests/test_seeding.py)


def random_heads():
    return torch.randn(H, D, HD, dtype=F64), torch.randn(H, HD, dtype=F64), torch.randn(H, D, HD, dtype=F64)


def anisotropic_inputs(n: int = 400) -> torch.Tensor:
    """Rows x (n, D) with correlated features, scales over 3 decades and a non-zero mean (like LayerNorm output)."""
    mix = torch.randn(D, D, dtype=F64) @ torch.diag(torch.logspace(-2, 1, D, dtype=F64))
    return torch.randn(n, D, dtype=F64) @ mix + torch.randn(D, dtype=F64)


def homogeneous(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)


def moment_of(x: torch.Tensor) -> torch.Tensor:
    xt = homogeneous(x)
    return xt.T @ xt / x.shape[0]  # E[x̃ᵀx̃] (D+1, D+1)


def product(u, a, v):
    return torch.cat([u, a.unsqueeze(1)], dim=1) @ v.mT  # Ŝ (H, D+1, D)


# --------------------------------------------------------------------------------------------- pure math


def test_weighted_error_is_the_mean_squared_score_error_over_all_pairs():
    wq, bq, wk = random_heads()
    x = anisotropic_inputs(50)
    target, approx = product(wq, bq, wk), product(*lowrank_from_qk(wq, bq, wk, 2))
    moment = moment_of(x)
    direct = ((homogeneous(x) @ (target - approx) @ x.T) ** 2).mean((-2, -1))  # (H,) mean over all (i, j)
    assert torch.allclose(weighted_score_error(target, approx, moment, moment[:D, :D]), direct, rtol=1e-10)


@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_whitened_has_lower_score_error_than_svd_at_equal_rank(damping):
    wq, bq, wk = random_heads()
    moment = moment_of(anisotropic_inputs())
    target = product(wq, bq, wk)
    for rank in range(1, HD):
        svd = weighted_score_error(target, product(*lowrank_from_qk(wq, bq, wk, rank)), moment, moment[:D, :D])
        whitened_factors = whitened_lowrank_from_qk(wq, bq, wk, rank, moment, damping=damping)
        whitened = weighted_score_error(target, product(*whitened_factors), moment, moment[:D, :D])
        assert (whitened < svd).all(), (rank, whitened, svd)
        if damping == 0:  # exactly optimal: no random rank-r perturbation does better
            for _ in range(5):
                u, a, v = (t + 1e-3 * torch.randn_like(t) for t in whitened_factors)
                assert (weighted_score_error(target, product(u, a, v), moment, moment[:D, :D]) >= whitened).all()
    assert (whitened_factors[0].shape, whitened_factors[1].shape, whitened_factors[2].shape) == (
        (H, D, HD - 1), (H, HD - 1), (H, D, HD - 1)
    )


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_identity_moments_give_plain_svd(scale):
    wq, bq, wk = random_heads()
    moment = scale * torch.eye(D + 1, dtype=F64)
    for rank in range(1, HD):
        plain = product(*lowrank_from_qk(wq, bq, wk, rank))
        whitened = product(*whitened_lowrank_from_qk(wq, bq, wk, rank, moment))
        assert (plain - whitened).abs().max() < 1e-10


def test_center_keys_minimises_the_error_around_the_mean_key():
    """Errors along the mean key μ only add row constants (softmax-invariant); center_keys whitens with Cov(x)."""
    wq, bq, wk = random_heads()
    x = anisotropic_inputs() + 5.0  # a large mean, as LayerNorm's beta / outlier features give
    moment = moment_of(x)
    covariance = moment[:D, :D] - torch.outer(moment[D, :D], moment[D, :D])
    target = product(wq, bq, wk)
    for rank in range(1, HD):
        centred = product(*whitened_lowrank_from_qk(wq, bq, wk, rank, moment, damping=0.0, center_keys=True))
        plain = product(*whitened_lowrank_from_qk(wq, bq, wk, rank, moment, damping=0.0))
        assert (weighted_score_error(target, centred, moment, covariance)
                <= weighted_score_error(target, plain, moment, covariance) * (1 + 1e-9)).all()
    identity = product(*whitened_lowrank_from_qk(wq, bq, wk, 2, torch.eye(D + 1, dtype=F64), center_keys=True))
    assert (identity - product(*lowrank_from_qk(wq, bq, wk, 2))).abs().max() < 1e-10  # E[x] = 0: no change


def test_factors_are_balanced_like_the_svd_seed():
    """The un-whitened product is re-split as P Σ½, Q Σ½: equal column norms, orthogonal columns on each side."""
    wq, bq, wk = random_heads()
    u, a, v = whitened_lowrank_from_qk(wq, bq, wk, 3, moment_of(anisotropic_inputs()))
    left = torch.cat([u, a.unsqueeze(1)], dim=1)
    assert (left.norm(dim=-2) - v.norm(dim=-2)).abs().max() < 1e-9
    gram = v.mT @ v
    assert (gram - torch.diag_embed(gram.diagonal(dim1=-2, dim2=-1))).abs().max() < 1e-9


def test_rank_at_or_above_head_size_is_exact_and_equals_svd():
    wq, bq, wk = random_heads()
    moment = moment_of(anisotropic_inputs())
    for rank in (HD, 2 * HD):
        plain = lowrank_from_qk(wq, bq, wk, rank, generator=torch.Generator().manual_seed(1))
        whitened = whitened_lowrank_from_qk(wq, bq, wk, rank, moment, generator=torch.Generator().manual_seed(1))
        assert all(torch.equal(p, w) for p, w in zip(plain, whitened))
        assert (product(*whitened) - product(wq, bq, wk)).abs().max() < 1e-10


@pytest.mark.parametrize(
    "inputs",
    [
        torch.zeros(10, D, dtype=F64),  # all-zero activations: E[xᵀx] = 0
        torch.ones(10, D, dtype=F64) * 3.0,  # constant rows: rank 1
        torch.randn(3, D, dtype=F64),  # fewer tokens than features: rank 3
        torch.randn(50, D, dtype=F64) * torch.tensor([1.0] * (D - 2) + [0.0, 0.0], dtype=F64),  # dead features
    ],
    ids=["zeros", "constant", "few_tokens", "dead_features"],
)
@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_rank_deficient_inputs_are_finite_and_deterministic(inputs, damping):
    wq, bq, wk = random_heads()
    moment = moment_of(inputs)
    first = whitened_lowrank_from_qk(wq, bq, wk, 2, moment, damping=damping)
    second = whitened_lowrank_from_qk(wq, bq, wk, 2, moment.clone(), damping=damping)
    assert all(torch.isfinite(t).all() for t in first)
    assert all(torch.equal(f, s) for f, s in zip(first, second))


def test_damped_cholesky():
    c = moment_of(anisotropic_inputs())
    factor = damped_cholesky(c, 1e-2)
    assert torch.allclose(factor @ factor.T, c + 1e-2 * c.diagonal().mean() * torch.eye(D + 1, dtype=F64))
    assert torch.equal(factor, factor.tril())
    singular = torch.ones(4, 4, dtype=F64)  # rank 1: undamped Cholesky fails, the retry raises λ until it works
    assert torch.isfinite(damped_cholesky(singular, 0.0)).all()
    with pytest.raises(ValueError, match=r"moment has NaN/inf entries"):
        damped_cholesky(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match=r"is not positive definite even at"):
        damped_cholesky(-torch.eye(3, dtype=F64), 0.0)
    with pytest.raises(ValueError, match=r"damping=-1 must be >= 0"):
        damped_cholesky(torch.eye(3), -1)


def test_whitened_best_rank_factors_with_identity_is_best_rank_factors():
    left, right = torch.randn(2, 7, 5, dtype=F64), torch.randn(2, 6, 5, dtype=F64)
    a, b = whitened_best_rank_factors(left, right, 3, torch.eye(7, dtype=F64).expand(2, 7, 7), torch.eye(6, dtype=F64).expand(2, 6, 6))
    u, s, vh = torch.linalg.svd(left @ right.mT)
    assert (a @ b.mT - u[..., :3] @ torch.diag_embed(s[..., :3]) @ vh[..., :3, :]).abs().max() < 1e-9


# ------------------------------------------------------------------------------------ calibration pass


def calibration_ids(n: int = 6, length: int = 16) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def layer0_inputs(model, ids: torch.Tensor) -> torch.Tensor:
    """x = ln_1(wte + wpe) of block 0 (independent of any attention), (B, T, d)."""
    with torch.no_grad():
        t = model.transformer
        return t.h[0].ln_1(t.wte(ids) + t.wpe(torch.arange(ids.shape[1])))


def test_moments_match_a_direct_computation_and_hooks_are_removed():
    model = make_gpt2().train()
    ids = calibration_ids()
    moments, tokens = collect_attention_moments(model, list(ids.split(2)))
    assert tokens == ids.numel() and sorted(moments) == list(range(LAYERS))
    x = layer0_inputs(model.eval(), ids).reshape(-1, HIDDEN).double()
    assert torch.allclose(moments[0], moment_of(x), atol=1e-10)
    assert moments[0].dtype == F64 and moments[0].shape == (HIDDEN + 1, HIDDEN + 1)
    model.train()
    collect_attention_moments(model, ids)
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert not any(block.attn._forward_pre_hooks for block in model.transformer.h)


def test_padding_is_left_out_and_formats_agree():
    """A DataLoader of padded dicts, a list of tensors, a datasets.Dataset and a single tensor give one moment."""
    datasets = pytest.importorskip("datasets")
    model = make_gpt2()
    ids = calibration_ids(4, 12)
    reference, tokens = collect_attention_moments(model, ids)
    padded = [
        {"input_ids": torch.cat([row, torch.zeros(5, dtype=torch.long)]), "attention_mask": torch.tensor([1] * 12 + [0] * 5)}
        for row in ids
    ]
    sources = {
        "dataloader": DataLoader(padded, batch_size=3, collate_fn=default_data_collator),
        "list": list(ids),
        "dataset": datasets.Dataset.from_dict({"input_ids": ids.tolist()}),
        "nested_lists": ids.tolist(),
    }
    for name, source in sources.items():
        moments, count = collect_attention_moments(model, source)
        assert count == tokens, name
        # Block 0's input is embeddings + LayerNorm, row by row: the same float ops with or without padding (1e-12).
        # Later blocks see attention outputs, whose fp32 sums over a padded (longer) row may be blocked differently
        # by BLAS: fp32 round-off (~1e-7 relative) on activations of order 1, so 1e-6 relative; a padding token
        # counted in the moment would move it by ~1/48 of its size (one token in 48).
        for layer in reference:
            tol = {"atol": 1e-12} if layer == 0 else {"rtol": 1e-6, "atol": 1e-6 * reference[layer].abs().max().item()}
            assert torch.allclose(moments[layer], reference[layer], **tol), (name, layer)


def layer0_score_error(stock, patched, ids) -> float:
    """Mean squared error of block 0's per-head scores (unscaled, all pairs) against stock's, up to row constants."""
    x = layer0_inputs(stock, ids).double()  # (B, T, d)
    attn = stock.transformer.h[0].attn
    q, k, _ = attn.c_attn(x.float()).double().split(HIDDEN, dim=-1)
    heads = lambda t: t.view(*t.shape[:2], -1, t.shape[-1] // attn.num_heads).transpose(1, 2)  # noqa: E731
    stock_scores = heads(q) @ heads(k).mT  # (B, H, T, T)
    merged = patched.transformer.h[0].attn
    with torch.no_grad():
        mq, mk = merged.q_proj(x.float()).double(), merged.k_proj(x.float()).double()
    merged_scores = heads(mq) @ heads(mk).mT
    diff = stock_scores - merged_scores
    diff = diff - diff.mean(-1, keepdim=True)  # row constants do not change the softmax
    return diff.pow(2).mean().item()


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_patch_model_whitened_reduces_score_error_on_calibration_data(rank):
    stock = make_gpt2()
    ids = calibration_ids(8, 32)
    svd = patch_model(copy.deepcopy(stock), "lowrank", rank=rank)
    whitened = patch_model(copy.deepcopy(stock), "lowrank", rank=rank, init="whitened", calibration=ids.split(4))
    assert whitened.config.merged_attn["init"] == "whitened" and svd.config.merged_attn["init"] == "svd"
    assert whitened.config.merged_attn["calibration_tokens"] == ids.numel()
    assert (whitened.config.merged_attn["mode"], whitened.config.merged_attn["rank"]) == ("lowrank", rank)
    assert layer0_score_error(stock, whitened, ids) < layer0_score_error(stock, svd, ids)
    again = patch_model(copy.deepcopy(stock), "lowrank", rank=rank, init="whitened", calibration=ids.split(4))
    assert all(torch.equal(p, q) for p, q in zip(whitened.state_dict().values(), again.state_dict().values()))


def test_rank_at_head_size_whitened_is_exact():
    stock = make_gpt2()
    ids = calibration_ids()
    patched = patch_model(copy.deepcopy(stock), "lowrank", rank=HEAD_DIM, init="whitened", calibration=ids)
    plain = patch_model(copy.deepcopy(stock), "lowrank", rank=HEAD_DIM)
    for (name, p), q in zip(patched.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(p, q), name
    with torch.no_grad():
        assert max_diff(patched(ids).logits, stock(ids).logits) < 1e-5


def test_covariance_record_has_no_init():
    model = patch_model(make_gpt2(), "covariance")
    assert model.config.merged_attn["init"] is None and "calibration_tokens" not in model.config.merged_attn


# ------------------------------------------------------------------------------------------------ errors


class Boom(Exception):
    pass


def exploding_batches():
    yield calibration_ids(2, 8)
    raise Boom("the data loader failed half-way")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "lowrank", "rank": 2, "init": "whitened"}, r"init='whitened' needs calibration=\.\.\..*or use init='svd'"),
        ({"mode": "lowrank", "rank": 2, "calibration": [[1, 2, 3]]},
         r"calibration \(a list\) was given with init='svd', which factors the weights alone.*Pass init='whitened'"),
        ({"mode": "covariance", "calibration": [[1, 2, 3]]},
         r"calibration \(a list\) was given with mode='covariance', which is exact and uses no data"),
        ({"mode": "covariance", "init": "whitened"}, r"init='whitened' was given with mode='covariance', which is exact"),
        ({"mode": "lowrank", "rank": 2, "init": "asvd"}, r"init='asvd' is not a seeding method; allowed: 'svd', 'whitened'"),
        ({"mode": "lowrank", "rank": 2, "init": 3}, r"init=3 is not a seeding method"),
        ({"mode": "lowrank", "rank": 2, "init": "whitened", "calibration": []},
         r"calibration is empty \(0 batches, 0 tokens\).*Pass some batches"),
        ({"mode": "lowrank", "rank": 2, "init": "whitened", "calibration": (t for t in [])},
         r"calibration is empty \(0 batches, 0 tokens\)"),
        ({"mode": "lowrank", "rank": 2, "init": "whitened", "calibration": [torch.zeros(2, 0, dtype=torch.long)]},
         r"calibration is empty \(1 batches, 0 tokens\)"),
        ({"mode": "lowrank", "rank": 2, "init": "whitened", "calibration": [torch.rand(2, 8)]},
         r"calibration batch 0 is a torch.float32 tensor of shape \(2, 8\); input_ids must be integer token ids"),
        ({"mode": "lowrank", "rank": 2, "init": "whitened", "calibration": [calibration_ids(2, 8), torch.ones(2, 8).double()]},
         r"calibration batch 1 is a torch.float64 tensor"),
        ({"mode": "lowrank", "rank": 2, "init": "whitened", "calibration": [torch.tensor([[1, 2, VOCAB]])]},
         rf"calibration batch 0 holds token id {VOCAB}, outside \[0, {VOCAB}\).*Tokenize with the model's own tokenizer"),
        ({"mode": "lowrank", "rank": 2, "init": "whitened", "calibration": [torch.tensor([[1, -100, 3]])]},
         r"holds token id -100, outside \[0, "),
        ({"mode": "lowrank", "rank": 2, "init": "whitened", "calibration": ["To be, or not to be"]},
         r"calibration batch 0 is text .*Tokenize it first"),
        ({"mode": "lowrank", "rank": 2, "init": "whitened", "calibration": "To be, or not to be"},
         r"calibration=str 'To be, or not to be' is not a source of token ids"),
        ({"mode": "lowrank", "rank": 2, "init": "whitened", "calibration": 42},
         r"calibration=int 42 is not a source of token ids"),
        ({"mode": "lowrank", "rank": 2, "init": "whitened", "calibration": [{"text": "hi"}]},
         r"calibration batch 0 is a dict without 'input_ids' \(keys: \['text'\]\).*Tokenize the text first"),
        ({"mode": "lowrank", "rank": 2, "init": "whitened", "calibration": [torch.ones(2, 2, 2, dtype=torch.long)]},
         r"input_ids must have shape \(batch, length\) or \(length,\)"),
        ({"mode": "lowrank", "rank": 2, "init": "whitened", "calibration": [[[1, 2], [3]]]},
         r"calibration batch 0 .* cannot be read as a tensor of token ids"),
        ({"mode": "lowrank", "rank": 2, "init": "whitened", "calibration": [torch.ones(1, 65, dtype=torch.long)]},
         r"calibration batch 0 has sequences of 65 tokens, more than the model's position limit of 64"),
        ({"mode": "lowrank", "rank": 2, "init": "whitened",
          "calibration": [{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 3)}]},
         r"attention_mask has shape \(2, 3\) but input_ids \(2, 4\)"),
    ],
)
def test_bad_calibration_fails_before_any_weight_changes(kwargs, match):
    model = make_gpt2()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        patch_model(model, **kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert not hasattr(model.config, "merged_attn")
    assert not any(block.attn._forward_pre_hooks for block in model.transformer.h)


def test_a_failing_data_loader_leaves_the_model_untouched():
    model = make_gpt2().train()
    with pytest.raises(Boom):
        patch_model(model, "lowrank", rank=2, init="whitened", calibration=exploding_batches())
    assert type(model.transformer.h[0].attn).__name__ == "GPT2Attention" and model.training
    assert not any(block.attn._forward_pre_hooks for block in model.transformer.h)


# ------------------------------------------------------------------------------------------- checkpoints


def test_whitened_checkpoint_saves_and_reloads_exactly(tmp_path):
    ids = calibration_ids()
    model = patch_model(make_gpt2(), "lowrank", rank=3, init="whitened", calibration=ids.split(3))
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["merged_attn"]
    assert record["init"] == "whitened" and record["rank"] == 3 and record["calibration_tokens"] == ids.numel()
    assert "seeded by activation-whitened SVD" in (tmp_path / "README.md").read_text()  # the model card says so
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")  # no calibration needed
    assert type(loaded) is MergedGPT2LMHeadModel and loaded.config.merged_attn["init"] == "whitened"
    state = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_records_without_init_still_load(tmp_path):
    """Checkpoints written before `init` existed have no such key: they load unchanged."""
    model = patch_model(make_gpt2(), "lowrank", rank=3)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["merged_attn"]["init"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids = calibration_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_evenly_spaced_blocks():
    stream = torch.arange(100)
    blocks = evenly_spaced_blocks(stream, 3, 10)
    assert blocks.shape == (3, 10) and blocks[:, 0].tolist() == [0, 30, 60]
    with pytest.raises(ValueError, match=r"the stream has 100 tokens, 10 blocks of 10; 11 were asked for"):
        evenly_spaced_blocks(stream, 11, 10)


# ----------------------------------------------------------------------------- the shipped stand-in model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAND_IN = os.path.join(ROOT, "examples", "shakespeare-gpt2")
DATA = os.path.join(ROOT, "examples", "data", "shakespeare")


def read_stream(tokenizer, split: str, max_tokens: int | None = None) -> torch.Tensor:
    """A split as one token stream (lines with their line breaks, as examples/pretrain.py tokenizes them)."""
    with open(os.path.join(DATA, f"{split}.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    ids: list[int] = []
    for chunk in range(0, len(lines), 2000):
        for row in tokenizer(lines[chunk : chunk + 2000], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
        if max_tokens is not None and len(ids) >= max_tokens:
            return torch.tensor(ids[:max_tokens])
    return torch.tensor(ids)


def test_stand_in_model_whitened_beats_svd_in_perplexity():
    from transformers import AutoTokenizer

    from hf_merged_attn.evaluation import evaluate_perplexity

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(STAND_IN)
    calibration = evenly_spaced_blocks(read_stream(tokenizer, "train"), 16, 256)  # 16 x 256 tokens
    validation = read_stream(tokenizer, "validation", max_tokens=16384)
    stock = AutoModelForCausalLM.from_pretrained(STAND_IN).eval()
    baseline = evaluate_perplexity(stock, validation, max_length=256, stride=256)["perplexity"]
    results = {}
    for rank in (16, 32):
        for init in ("svd", "whitened"):
            extra = {"calibration": calibration.split(4)} if init == "whitened" else {}
            model = patch_model(copy.deepcopy(stock), "lowrank", rank=rank, init=init, **extra)
            results[rank, init] = evaluate_perplexity(model, validation, max_length=256, stride=256)["perplexity"]
    print(f"stock {baseline:.2f}; " + ", ".join(f"r={r} {i}: {p:.2f}" for (r, i), p in results.items()))
    for rank in (16, 32):
        assert results[rank, "whitened"] < results[rank, "svd"], (baseline, results)
