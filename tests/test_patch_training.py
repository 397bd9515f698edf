"""Patched models train: gradients reach every new weight, loss falls, checkpointing, dropout, dtypes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import HEAD_DIM, HIDDEN, LAYERS, VOCAB, make_gpt2, max_diff

from hf_merged_attn import MergedGPT2Attention, patch_model

MODES = [("covariance", None), ("lowrank", 3), ("lowrank", HEAD_DIM), ("lowrank", 2 * HEAD_DIM)]
MODE_IDS = ["covariance", "lowrank_r=3", "lowrank_r=hd", "lowrank_r=2hd"]


def batch(size: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(1, VOCAB, (size, length))


def new_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if any(k in n for k in ("q_proj", "k_proj", "v_proj"))}


@pytest.mark.parametrize("mode,rank", MODES, ids=MODE_IDS)
def test_every_new_parameter_gets_a_gradient_and_loss_falls(mode, rank):
    model = patch_model(make_gpt2(), mode, rank=rank).train()
    ids = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        if not losses:
            params = new_parameters(model)
            assert len(params) == 2 * (5 if mode == "lowrank" else 4)  # 2 layers x (q w, q b, [k w], v w, v b)
            for name, param in params.items():
                assert param.grad is not None and param.grad.abs().sum() > 0, name
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_extra_rank_columns_leave_the_zero_saddle():
    """r > hd: the extra columns start random on U and zero on V; both sides must start learning."""
    model = patch_model(make_gpt2(), "lowrank", rank=2 * HEAD_DIM).train()
    attn = model.transformer.h[0].attn
    heads, rank = attn.num_heads, attn.rank

    def extra(weight):  # (H*r, d) -> the rows of the r - hd extra columns of every head
        return weight.detach().reshape(heads, rank, HIDDEN)[:, HEAD_DIM:].clone()

    u0, v0 = extra(attn.q_proj.weight), extra(attn.k_proj.weight)
    assert v0.abs().max() == 0 and u0.abs().max() > 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = batch()
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert max_diff(extra(attn.k_proj.weight), v0) > 1e-6
    assert max_diff(extra(attn.q_proj.weight), u0) > 1e-6


@pytest.mark.parametrize("mode,rank", MODES[:2], ids=MODE_IDS[:2])
def test_gradient_checkpointing_gives_the_same_gradients(mode, rank):
    plain = patch_model(make_gpt2(), mode, rank=rank).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.transformer.gradient_checkpointing
    ids = batch()
    for model in (plain, checkpointed):
        model(ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        # same ops recomputed in the same order: equal up to fp32 round-off in the accumulation
        assert max_diff(a.grad, b.grad) < 1e-5, name


@pytest.mark.parametrize("mode,rank", MODES[:2], ids=MODE_IDS[:2])
def test_attention_dropout_matches_stock_under_the_same_seed(mode, rank):
    """Eager: dropout masks are drawn in the same order and shapes as stock, so outputs match exactly."""
    stock = make_gpt2(attn_pdrop=0.3, resid_pdrop=0.1, embd_pdrop=0.1).train()
    patched = patch_model(copy.deepcopy(stock), mode, rank=rank)
    ids = batch()
    torch.manual_seed(1)
    expected = stock(ids).logits
    torch.manual_seed(1)
    got = patched(ids).logits
    torch.manual_seed(2)
    other_seed = patched(ids).logits
    if rank is None:
        assert max_diff(got, expected) < 1e-4  # same fp32 tolerance as the eval-mode exactness tests
    assert max_diff(other_seed, got) > 1e-2  # dropout is really active in training


def test_sdpa_dropout_is_active_only_in_training():
    model = patch_model(make_gpt2(attn_implementation="sdpa", attn_pdrop=0.5), "covariance")
    ids = batch()
    with torch.no_grad():
        eval_a, eval_b = model(ids).logits, model(ids).logits
        model.train()
        train = model(ids).logits
    assert max_diff(eval_a, eval_b) == 0.0
    assert max_diff(train, eval_a) > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,rank", [MODES[0], *MODES[2:]], ids=[MODE_IDS[0], *MODE_IDS[2:]])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_half_precision_stays_half_and_matches_stock(dtype, mode, rank, impl):
    reference = make_gpt2(attn_implementation=impl)
    stock = copy.deepcopy(reference).to(dtype)
    patched = patch_model(copy.deepcopy(stock), mode, rank=rank)
    assert {p.dtype for p in patched.parameters()} == {dtype}
    ids = batch(2, 10)
    with torch.no_grad():
        exact = reference(ids).logits
        stock_out, got = stock(ids).logits, patched(ids).logits
    assert got.dtype == dtype
    # Half precision keeps ~3 (bf16) or ~4 (fp16) significant digits, so neither model matches fp32 to 1e-4.
    # The patched model must be about as close to the fp32 result as stock in the same dtype is
    # (its products are rounded differently, so allow 3x stock's own error plus one bf16 ulp at |logit|~1).
    stock_error = max_diff(stock_out, exact)
    assert max_diff(got, exact) < 3 * stock_error + 2**-7, (max_diff(got, exact), stock_error)
    patched.train()
    patched(ids, labels=ids).loss.backward()
    assert all(p.grad.dtype == dtype for p in patched.parameters() if p.grad is not None)


@pytest.mark.parametrize("mode,rank", [("covariance", None), ("lowrank", HEAD_DIM)], ids=["covariance", "lowrank_r=hd"])
def test_long_sequences_match_stock_in_forward_and_backward(mode, rank, monkeypatch):
    """T = 200 under sdpa with no mask: covariance runs its causal blocks of 64 queries (the diagonal block masked
    in place, each block recomputed in backward), lowrank SDPA's causal kernel. Loss and the gradients of every
    parameter the patch keeps from stock (embeddings, value/output projections, MLPs, layer norms) match stock."""
    stock = make_gpt2(attn_implementation="sdpa", n_positions=256).train()  # dropout is 0 in the fixture config
    patched = patch_model(copy.deepcopy(stock), mode, rank=rank)
    ids = torch.randint(1, stock.config.vocab_size, (2, 200))
    causal_flags = []  # which path each layer took: covariance must take the blocked causal one, lowrank SDPA
    original = MergedGPT2Attention._eager_attention

    def spy(self, *args, **kwargs):
        causal_flags.append(kwargs.get("causal", False))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MergedGPT2Attention, "_eager_attention", spy)
    stock_loss, patched_loss = stock(ids, labels=ids).loss, patched(ids, labels=ids).loss
    assert causal_flags == ([True] * LAYERS if mode == "covariance" else [])
    stock_loss.backward()
    patched_loss.backward()
    # Same fp32 tolerance as the eval-mode exactness tests. The gradients are O(1e-2..1), so the bound is absolute
    # 1e-4 for the small ones (fp32 round-off of the reordered sums is ~1e-7 here) and relative 1e-4 for the
    # largest; a mask shifted by one key moves the loss itself by > 1e-2.
    assert abs(patched_loss.item() - stock_loss.item()) < 1e-4
    patched_params = dict(patched.named_parameters())
    shared = [name for name, _ in stock.named_parameters() if "c_attn" not in name]
    assert len(shared) > 10
    for name in shared:
        grad, expected = patched_params[name].grad, dict(stock.named_parameters())[name].grad
        assert max_diff(grad, expected) < 1e-4 * max(1.0, expected.abs().max().item()), name
