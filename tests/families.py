"""The table of registered families the parametrised tests run over: one row per family, tiny random configs.

Sizes are mini versions of the real models (GPT-2 small / OPT-125m / BLOOM-560m / BERT-base: d = 768-1024,
12-16 heads of 64): d = 32 with 4 heads of 8, 2 layers, dropout off. Random init gives near-uniform attention and
(for GPT-2, OPT) ZERO biases, which would hide score and bias bugs; `make` therefore scales the query/key/value
weights up and draws non-zero q/k/v biases, so the softmax is peaked and u_h = bq_h Wk_hᵀ matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    BertConfig,
    BertModel,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    OPTConfig,
    OPTForCausalLM,
    RobertaConfig,
    RobertaModel,
)

from hf_merged_attn.registry import REGISTRY

HIDDEN, HEADS, LAYERS, VOCAB = 32, 4, 2, 101
HEAD_DIM = HIDDEN // HEADS


@dataclass
class Family:
    """A row of the table: how to build a tiny stock model of the family and what it supports."""

    model_type: str
    model_class: type  # the class patched in the tests (an LM head for decoders, the encoder body otherwise)
    config: object  # the tiny config
    causal: bool
    sdpa: bool  # whether the stock family runs with attn_implementation="sdpa"
    auto: str  # the Auto class a checkpoint loads through

    @property
    def spec(self):
        return REGISTRY[self.model_type]

    def make(self, attn_implementation: str = "eager"):
        """A stock model in eval mode with strong q/k/v weights and non-zero q/k/v biases."""
        model = self.model_class(self.config).eval()
        model.set_attn_implementation(attn_implementation)
        with torch.no_grad():
            for _, _, attn in self.spec.stock_attentions(model):
                for name, param in attn.named_parameters():
                    if name.split(".")[0] in self.spec.qkv_names:
                        param.normal_(0.0, 0.25 if name.endswith("weight") else 0.5)
        return model

    def output(self, model, ids, mask=None):
        """Logits of a decoder, last hidden state of an encoder."""
        out = model(input_ids=ids, attention_mask=mask)
        return out.logits if self.causal else out.last_hidden_state


_DROPOUT_OFF = dict(attention_dropout=0.0)
FAMILIES = [
    Family(
        "gpt2", GPT2LMHeadModel,
        GPT2Config(n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS, n_positions=64, vocab_size=VOCAB, attn_pdrop=0.0,
                   resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0),
        causal=True, sdpa=True, auto="AutoModelForCausalLM",
    ),
    Family(
        "opt", OPTForCausalLM,
        OPTConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS, ffn_dim=64,  # OPT-125m: 768, 12, 12, 3072
                  word_embed_proj_dim=HIDDEN, max_position_embeddings=64, vocab_size=VOCAB, dropout=0.0,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1, **_DROPOUT_OFF),
        causal=True, sdpa=True, auto="AutoModelForCausalLM",
    ),
    Family(
        "bloom", BloomForCausalLM,
        BloomConfig(hidden_size=HIDDEN, n_head=HEADS, n_layer=LAYERS, vocab_size=VOCAB,  # BLOOM-560m: 1024, 16, 24
                    hidden_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=1, **_DROPOUT_OFF),
        causal=True, sdpa=False, auto="AutoModelForCausalLM",
    ),
    Family(
        "bert", BertModel,
        BertConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS, intermediate_size=64,
                   max_position_embeddings=64, vocab_size=VOCAB, hidden_dropout_prob=0.0,  # BERT-base: 768, 12, 12
                   attention_probs_dropout_prob=0.0, pad_token_id=0),
        causal=False, sdpa=True, auto="AutoModel",
    ),
    Family(
        "roberta", RobertaModel,
        RobertaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS, intermediate_size=64,
                      max_position_embeddings=66, vocab_size=VOCAB, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, pad_token_id=1),
        causal=False, sdpa=True, auto="AutoModel",
    ),
]
FAMILY_IDS = [f.model_type for f in FAMILIES]
DECODERS = [f for f in FAMILIES if f.causal]


def inputs(family: Family, batch: int = 3, length: int = 12):
    """Random ids (avoiding the pad id) and a mask padding rows 1.. : on the left for decoders (as for generation),
    on the right for encoders (as tokenizers pad)."""
    pad_id = family.config.pad_token_id
    ids = torch.randint(2, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        pad = 2 * row
        if family.causal:
            mask[row, :pad] = 0
        else:
            mask[row, length - pad :] = 0
    return ids.masked_fill(mask == 0, pad_id), mask
