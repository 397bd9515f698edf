"""Shared fixtures: tiny random GPT-2 models whose attention is far from trivial.

Sizes are mini versions of GPT-2 small (d=768, 12 heads of 64, 12 layers): d=32 with 4 heads of 8,
2 layers. Random GPT-2 init (std 0.02) gives near-uniform attention and ZERO biases, which would hide
bugs in the score and in the bias term; `make_gpt2` therefore scales the query/key weights up and
draws non-zero attention biases, so the softmax is peaked and u_h = bq_h Wk_hᵀ matters.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

HIDDEN = 32  # GPT-2 small: 768
HEADS = 4  # 12
HEAD_DIM = HIDDEN // HEADS  # 64
LAYERS = 2  # 12
VOCAB = 101  # 50257


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(**overrides) -> GPT2Config:
    """A mini GPT-2 config, dropout off; `overrides` go to GPT2Config."""
    settings = dict(
        n_embd=HIDDEN,
        n_head=HEADS,
        n_layer=LAYERS,
        n_positions=64,
        vocab_size=VOCAB,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    settings.update(overrides)
    return GPT2Config(**settings)


def make_gpt2(cls=GPT2LMHeadModel, attn_implementation: str = "eager", **overrides):
    """A stock GPT-2 model of class `cls` in eval mode with strong q/k weights and non-zero attention biases."""
    model = cls(tiny_config(**overrides)).eval()
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("attn.c_attn.weight"):
                param.normal_(0.0, 0.25)  # scores of order 1-10: a peaked, input-dependent softmax
            elif name.endswith("attn.c_attn.bias"):
                param.normal_(0.0, 0.5)  # non-zero bq, bk (and bv): GPT-2's zero init hides the bias term
    return model


# Subprocess timeouts catch hangs only: a test's verdict must not depend on the machine's load (several jobs on two
# cores run the slowest subprocess here ~5x slower than an idle machine), so the limit is far above any honest run.
HANG_TIMEOUT = 3600


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# The first lines of a script run in a subprocess that must not import hf_merged_attn (remote-code loading tests).
BLOCK_PACKAGE = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_merged_attn":
            raise ImportError("hf_merged_attn is blocked in this test")
sys.meta_path.insert(0, Block())
"""
