"""Patches of the SHIPPED pretrained stand-in model (trained weights, not random): exact, and graceful at low rank."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_merged_attn import patch_model
from hf_merged_attn.evaluation import evaluate_perplexity

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "shakespeare-gpt2"


@pytest.fixture(scope="module")
def stand_in():
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, attn_implementation="eager").eval()
    text = (ROOT / "examples" / "data" / "shakespeare" / "validation.txt").read_text(encoding="utf-8")[:20000]
    ids = torch.tensor(tokenizer(text)["input_ids"][:2048])  # (N,) held-out fine-tuning validation text
    return model, ids


@pytest.mark.parametrize("mode,rank", [("covariance", None), ("lowrank", 64)])
def test_exact_patches_on_trained_weights(stand_in, mode, rank):
    stock, ids = stand_in
    batch = ids[:1024].view(4, 256)  # (B, T) full-context blocks
    with torch.no_grad():
        expected = stock(batch).logits
        got = patch_model(copy.deepcopy(stock), mode, rank=rank)(batch).logits
    diff = (got - expected).abs().max().item()
    # fp32 round-off of a reordered sum over 4 layers of trained weights (logits of size ~10): ~6e-6 measured
    assert diff <= 1e-4, f"max |Δlogit| = {diff:.3g}"


def test_low_rank_loses_perplexity_smoothly(stand_in):
    stock, ids = stand_in
    base = evaluate_perplexity(stock, ids, max_length=256, stride=256)["perplexity"]
    ranks = [4, 16, 32, 64]
    ppl = {r: evaluate_perplexity(patch_model(copy.deepcopy(stock), "lowrank", rank=r), ids, max_length=256, stride=256)["perplexity"] for r in ranks}
    assert ppl[64] == pytest.approx(base, rel=1e-5)  # r = head size is exact
    # best rank-r truncation: perplexity falls as r grows, and degrades gracefully (no cliff) as r falls
    assert all(ppl[a] > ppl[b] for a, b in zip(ranks, ranks[1:])), ppl
    assert ppl[4] < 1.5 * base, ppl
