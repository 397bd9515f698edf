"""The perplexity evaluator against the transformers-docs loop, written out the docs' way."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import VOCAB, make_gpt2

from hf_merged_attn import patch_model
from hf_merged_attn.evaluation import evaluate_perplexity, sliding_windows


def docs_recipe(model, ids, max_length, stride):
    """The loop from the docs page "Perplexity of fixed-length models" (one window at a time, labels=-100)."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq_len = ids.numel()
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[None, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        # The docs subtract one token per window for the label shift, which is right only for the first window
        # (later windows' first target has context before it and IS scored); count the scored targets instead,
        # which makes the average truly token-weighted.
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("max_length,stride", [(16, 8), (16, 16), (16, 5), (64, 64)])
def test_matches_the_docs_recipe(max_length, stride):
    model = make_gpt2()
    ids = torch.randint(1, VOCAB, (103,))
    expected, n = docs_recipe(model, ids, max_length, stride)
    got = evaluate_perplexity(model, ids, max_length=max_length, stride=stride, batch_size=3)
    # batching pads the last window on the right; fp32 sums of ~100 log-probs in another order: ~1e-6 relative
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert got["tokens"] == n
    # with overlap (stride < max_length) every token but the stream's first is scored exactly once;
    # disjoint windows (stride = max_length) cannot score each window's first token (no context)
    windows = -(-ids.numel() // max_length)
    assert n == (ids.numel() - 1 if stride < max_length else ids.numel() - windows)


def test_same_for_exact_patch():
    model = make_gpt2()
    ids = torch.randint(1, VOCAB, (80,))
    stock = evaluate_perplexity(model, ids, max_length=32, stride=16)
    patched = evaluate_perplexity(patch_model(model, "covariance"), ids, max_length=32, stride=16)
    assert patched["perplexity"] == pytest.approx(stock["perplexity"], rel=1e-5)


def test_windows_cover_each_token_once():
    windows = sliding_windows(100, 30, 12)
    assert sum(new for _, _, new in windows) == 100 and windows[-1][1] == 100
    with pytest.raises(ValueError, match="stride=0 must be between 1 and max_length=30"):
        sliding_windows(100, 30, 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_length": 16, "stride": 0}, r"stride=0 must be between 1 and max_length=16 .*Pass e\.g\. stride=8"),
        ({"max_length": 16, "stride": 17}, r"stride=17 must be between 1 and max_length=16"),
        ({"max_length": 1}, r"max_length=1: a window must hold at least 2 tokens .*Pass an integer max_length >= 2"),
        ({"max_length": 65}, r"max_length=65 exceeds the model's 64 positions .*Pass max_length <= 64"),
    ],
)
def test_bad_windows_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_perplexity(make_gpt2(), torch.randint(1, VOCAB, (100,)), **kwargs)
