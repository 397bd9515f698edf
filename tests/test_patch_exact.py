"""Patched models compute what stock GPT-2 computes (logits, attentions, caches, generation)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import HEAD_DIM, HEADS, HIDDEN, LAYERS, VOCAB, make_gpt2, max_diff
from transformers import (
    DynamicCache,
    GPT2DoubleHeadsModel,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)

from hf_merged_attn import MergedGPT2Attention, patch_model

# fp32: the patched model sums the same products in another order (S_h = Wq_h Wk_hᵀ is formed in float64
# and rounded once, scores are d-long instead of hd-long dot products), which moves logits by ~1e-7 here.
# 1e-4 is the bound the project promises; anything structural (a dropped bias, wrong scaling, a wrong
# head split) moves them by > 1e-2 on these models (see test_bias_term_matters).
FP32_TOL = 1e-4

EXACT = [("covariance", None), ("lowrank", HEAD_DIM), ("lowrank", 2 * HEAD_DIM)]
EXACT_IDS = ["covariance", "lowrank_r=hd", "lowrank_r=2hd"]


def inputs(batch: int = 3, length: int = 12, padding: str | None = "right"):
    """Random ids and an attention mask with some padding on one side of rows 1..batch-1."""
    ids = torch.randint(1, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        pad = 2 * row
        if padding == "right":
            mask[row, length - pad :] = 0
        elif padding == "left":
            mask[row, :pad] = 0
    return ids, mask


def patched_copy(model, mode, rank, **kwargs):
    return patch_model(copy.deepcopy(model), mode, rank=rank, **kwargs)


@pytest.mark.parametrize("mode,rank", EXACT, ids=EXACT_IDS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", ["right", "left", None])
@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"scale_attn_weights": False},
        {"scale_attn_by_inverse_layer_idx": True},
        {"reorder_and_upcast_attn": True},
    ],
    ids=["default", "no_scale", "inverse_layer_idx", "reorder_upcast"],
)
def test_logits_match_stock(mode, rank, impl, padding, flags):
    stock = make_gpt2(attn_implementation=impl, **flags)
    ids, mask = inputs(padding=padding)
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask).logits
        patched = patched_copy(stock, mode, rank)
        got = patched(ids, attention_mask=mask).logits
    keep = mask.bool()  # padded positions' logits are not defined by either model
    diff = max_diff(got[keep], expected[keep])
    assert diff < FP32_TOL, f"max |Δlogit| = {diff:.3g}"


def test_bias_term_matters():
    """The fixtures make the query-bias term u_h = bq_h Wk_hᵀ visible: dropping it breaks exactness."""
    stock = make_gpt2()
    ids, mask = inputs()
    patched = patched_copy(stock, "covariance", None)
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask).logits
        for block in patched.transformer.h:
            block.attn.q_proj.bias.zero_()
        broken = patched(ids, attention_mask=mask).logits
    assert max_diff(broken, expected) > 100 * FP32_TOL


def test_lowrank_error_falls_with_rank():
    stock = make_gpt2()
    ids, mask = inputs()
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask).logits
        errors = [max_diff(patched_copy(stock, "lowrank", r)(ids, attention_mask=mask).logits, expected) for r in (1, 2, 4, 6, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 100 * FP32_TOL and errors[-1] < FP32_TOL, errors


@pytest.mark.parametrize(
    "cls",
    [GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification, GPT2ForTokenClassification, GPT2ForQuestionAnswering],
)
@pytest.mark.parametrize("mode,rank", EXACT[:2], ids=EXACT_IDS[:2])
def test_every_gpt2_class(cls, mode, rank):
    stock = make_gpt2(cls)
    ids, mask = inputs(padding="right")
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask)
        got = patched_copy(stock, mode, rank)(ids, attention_mask=mask)
    name = {GPT2Model: "last_hidden_state", GPT2ForQuestionAnswering: "start_logits"}.get(cls, "logits")
    assert max_diff(got[name], expected[name]) < FP32_TOL


def test_double_heads_model():
    stock = make_gpt2(GPT2DoubleHeadsModel)
    ids = torch.randint(1, VOCAB, (2, 3, 10))  # (batch, choices, length)
    cls_index = torch.full((2, 3), 9)
    with torch.no_grad():
        expected = stock(ids, mc_token_ids=cls_index)
        got = patched_copy(stock, "covariance", None)(ids, mc_token_ids=cls_index)
    assert max_diff(got.logits, expected.logits) < FP32_TOL
    assert max_diff(got.mc_logits, expected.mc_logits) < FP32_TOL


def test_layers_subset_and_parameter_counts():
    stock = make_gpt2()
    ids, mask = inputs()
    n_stock = sum(p.numel() for p in stock.parameters())
    # MATH.md: query-key parameters per layer are 2d² + 2d (stock c_attn's q and k parts),
    # H·d² + H·d (covariance: S_h and u_h), 2·H·d·r + H·r (lowrank: U_h, V_h, a_h). Values are unchanged.
    stock_qk = 2 * HIDDEN**2 + 2 * HIDDEN
    cov_qk = HEADS * HIDDEN**2 + HEADS * HIDDEN
    for mode, rank, layers, per_layer in [
        ("covariance", None, None, cov_qk),
        ("covariance", None, [1], cov_qk),
        ("lowrank", 3, [0], 2 * HEADS * HIDDEN * 3 + HEADS * 3),
        ("lowrank", 2 * HEAD_DIM, None, 2 * HEADS * HIDDEN * 2 * HEAD_DIM + HEADS * 2 * HEAD_DIM),
    ]:
        patched = patched_copy(stock, mode, rank, layers=layers)
        n_layers = LAYERS if layers is None else len(layers)
        assert sum(p.numel() for p in patched.parameters()) == n_stock + n_layers * (per_layer - stock_qk)
        kinds = [type(block.attn).__name__ for block in patched.transformer.h]
        expected_kinds = ["MergedGPT2Attention" if layers is None or i in layers else "GPT2Attention" for i in range(LAYERS)]
        assert kinds == expected_kinds
        record = patched.config.merged_attn
        assert (record["mode"], record["rank"], record["layers"]) == (mode, rank, layers or list(range(LAYERS)))
        if rank is None or rank >= HEAD_DIM:
            with torch.no_grad():
                diff = max_diff(patched(ids, attention_mask=mask).logits, stock(ids, attention_mask=mask).logits)
            assert diff < FP32_TOL


def test_patch_is_in_place_and_drops_old_weights():
    model = make_gpt2()
    c_proj = model.transformer.h[0].attn.c_proj
    assert patch_model(model, "covariance") is model
    attn = model.transformer.h[0].attn
    assert attn.c_proj is c_proj  # shared by reference, as optimum's BetterTransformer does
    names = {name for name, _ in model.named_parameters()}
    assert not any("c_attn" in name for name in names)
    assert "transformer.h.0.attn.q_proj.weight" in names and "transformer.h.0.attn.v_proj.bias" in names


@pytest.mark.parametrize("mode,rank", EXACT, ids=EXACT_IDS)
def test_output_attentions(mode, rank):
    stock = make_gpt2()
    fresh = patched_copy(stock, mode, rank)  # patched before any output_attentions call
    ids, mask = inputs()
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask, output_attentions=True).attentions
        # the stock model has now installed its recording hooks; they must move to the new modules
        patch_model(stock, mode, rank=rank)
        got = stock(ids, attention_mask=mask, output_attentions=True).attentions
        fresh = fresh(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(got) == len(fresh) == LAYERS
    for a, b, c in zip(got, expected, fresh):
        assert a.shape == b.shape == (3, HEADS, 12, 12)
        assert max_diff(a, b) < FP32_TOL and max_diff(c, b) < FP32_TOL


def test_switch_attn_implementation_after_patching():
    stock = make_gpt2(attn_implementation="eager")
    ids, mask = inputs(padding="left")
    patched = patched_copy(stock, "covariance", None)
    for impl in ("sdpa", "eager", "sdpa"):
        stock.set_attn_implementation(impl)
        patched.set_attn_implementation(impl)
        assert patched.transformer.h[0].attn.config._attn_implementation == impl
        with torch.no_grad():
            diff = max_diff(patched(ids, attention_mask=mask).logits, stock(ids, attention_mask=mask).logits)
        assert diff < FP32_TOL, impl


@pytest.mark.parametrize("mode,rank,key_shape,value_shape", [
    # covariance: x once per layer, never per head; the per-head values packed as one head of H·hd (CacheLayout), so
    # that keys and values have one head count, as transformers' static cache needs
    ("covariance", None, (2, 1, 7, HIDDEN), (2, 1, 7, HEADS * HEAD_DIM)),
    ("lowrank", 3, (2, HEADS, 7, 3), (2, HEADS, 7, HEAD_DIM)),
])
def test_cache_layout(mode, rank, key_shape, value_shape):
    model = patch_model(make_gpt2(), mode, rank=rank)
    ids = torch.randint(1, VOCAB, (2, 7))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    for layer in cache.layers:
        assert tuple(layer.keys.shape) == key_shape
        assert tuple(layer.values.shape) == value_shape
        if mode == "covariance":
            assert layer.keys.stride(1) == layer.keys.shape[2] * HIDDEN  # a real (B, 1, T, d) tensor, not a view
    assert cache.get_seq_length() == 7


@pytest.mark.parametrize("mode,rank", EXACT + [("lowrank", 3)], ids=EXACT_IDS + ["lowrank_r=3"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_incremental_decoding_matches_full_forward(mode, rank, impl):
    """Feeding tokens one at a time through the cache gives the full-sequence logits (left-padded batch)."""
    model = patch_model(make_gpt2(attn_implementation=impl), mode, rank=rank)
    ids, mask = inputs(batch=2, length=9, padding="left")
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = DynamicCache()
        out = model(ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(5, 9):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    keep = mask.bool()
    assert max_diff(torch.cat(steps, dim=1)[keep], full[keep]) < FP32_TOL


@pytest.mark.parametrize("mode,rank", EXACT, ids=EXACT_IDS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_greedy_generate_matches_stock(mode, rank, impl):
    stock = make_gpt2(attn_implementation=impl)
    patched = patched_copy(stock, mode, rank)
    ids, mask = inputs(batch=3, length=6, padding="left")
    settings = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = stock.generate(ids, **settings)
        cached = patched.generate(ids, **settings)
        uncached = patched.generate(ids, use_cache=False, **settings)
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, cached)


def test_module_accepts_deprecated_past_key_values():
    model = patch_model(make_gpt2(), "covariance")
    attn = model.transformer.h[0].attn
    hidden = torch.randn(2, 5, HIDDEN)
    cache = DynamicCache()
    with torch.no_grad():
        new_style = attn(hidden, cache=DynamicCache())[0]
        old_style = attn(hidden, past_key_values=cache)[0]
    assert cache.layers[0].keys.shape == (2, 1, 5, HIDDEN)
    assert max_diff(new_style, old_style) == 0.0


def test_seeded_weights_keep_device_dtype_and_mode():
    model = make_gpt2().to(torch.float64).train()
    patch_model(model, "lowrank", rank=5)
    attn = model.transformer.h[1].attn
    assert isinstance(attn, MergedGPT2Attention) and attn.training
    assert {p.dtype for p in attn.parameters()} == {torch.float64}
    assert attn.q_proj.weight.shape == (HEADS * 5, HIDDEN) and attn.k_proj.weight.shape == (HEADS * 5, HIDDEN)
