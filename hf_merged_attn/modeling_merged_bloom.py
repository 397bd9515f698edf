"""BLOOM adapter: merged attention for `BloomAttention`, its config, its model classes and its registry entry.

Self-contained with the core files beside it (torch and transformers only): copied next to saved checkpoints.
BLOOM's fused `query_key_value` `nn.Linear(d, 3d)` is laid out per head: output feature h*3*hd + j*hd + c is
channel c of head h's query (j = 0), key (1) or value (2). Positions are ALiBi, a bias added to the scores AFTER
the q·k product (alibi + hd^-½ q·k; stock writes the scale as 1 / sqrt(hd), equal up to one rounding), so the merge is exact and ALiBi is passed on unchanged. Causal, KV cache,
eager attention only (as stock BLOOM).
"""

from __future__ import annotations

import torch
from transformers import BloomConfig
from transformers.cache_utils import Cache
from transformers.models.bloom.modeling_bloom import (
    BloomAttention,
    BloomBlock,
    BloomForCausalLM,
    BloomForQuestionAnswering,
    BloomForSequenceClassification,
    BloomForTokenClassification,
    BloomModel,
    dropout_add,
)

from .merged_attention import ArchitectureSpec, MergedAttention, heads_to_linear, linear_to_heads
from .merged_models import merged_classes


class MergedBloomConfig(BloomConfig):
    """A `BloomConfig` plus `merged_attn`, the record of the patch; its own `model_type`."""

    model_type = "merged_bloom"
    merged_attn: dict | None = None


class MergedBloomAttention(MergedAttention, BloomAttention):
    """Drop-in replacement for `BloomAttention` (same call signature and returns); keeps the stock `dense`."""

    output_name = "dense"

    def __init__(self, config: BloomConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.hidden_dropout = config.hidden_dropout

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        alibi: torch.Tensor,
        attention_mask: torch.Tensor,
        layer_past: Cache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same contract as `BloomAttention.forward`: returns (dropout(dense(attention)) + residual, weights)."""
        batch = hidden_states.shape[0]
        bias = alibi.view(batch, self.num_heads, 1, -1)  # (B*H, 1, Tk) -> (B, H, 1, Tk)
        output, weights = self.attend(hidden_states, attention_mask, layer_past, score_bias=bias, **kwargs)  # through dense
        # (pretraining_tp > 1 with slow_but_exact applies `dense` in column slices: the same sum, other rounding)
        return dropout_add(output, residual, self.hidden_dropout, self.training), weights


def read_weights(attn: BloomAttention) -> dict[str, torch.Tensor]:
    """Per-head wq, wk, wv (H, d, hd) and bq, bk, bv (H, hd) of a stock `BloomAttention` (detached)."""
    heads = attn.num_heads
    weight = attn.query_key_value.weight.detach()  # nn.Linear (out, in) = (3d, d)
    per_head = weight.view(heads, 3, -1, weight.shape[1])  # (H, 3, hd, d): row h*3*hd + j*hd + c
    bias = attn.query_key_value.bias.detach().view(heads, 3, -1)  # (H, 3, hd)
    parts = {}
    for j, name in enumerate("qkv"):
        parts[f"w{name}"] = linear_to_heads(per_head[:, j].reshape(-1, weight.shape[1]), heads)  # (H, d, hd)
        parts[f"b{name}"] = bias[:, j]  # (H, hd)
    return parts


@torch.no_grad()
def write_weights(attn: BloomAttention, parts: dict[str, torch.Tensor]) -> None:
    """Inverse of `read_weights`: write per-head weights into the fused, per-head interleaved `query_key_value`."""
    heads, d, _ = parts["wq"].shape
    weight = torch.stack([heads_to_linear(parts[f"w{n}"]).view(heads, -1, d) for n in "qkv"], dim=1)  # (H, 3, hd, d)
    attn.query_key_value.weight.copy_(weight.reshape(-1, d))
    attn.query_key_value.bias.copy_(torch.stack([parts[f"b{n}"] for n in "qkv"], dim=1).reshape(-1))  # (H, 3, hd)


SPEC = ArchitectureSpec(
    "BLOOM", ("bloom",), BloomAttention, MergedBloomAttention, MergedBloomConfig, BloomBlock, read_weights,
    write_weights, new_stock_attention=lambda config, layer_idx: BloomAttention(config, layer_idx=layer_idx),
    qkv_names=("query_key_value",),
)

(
    MergedBloomModel,
    MergedBloomForCausalLM,
    MergedBloomForSequenceClassification,
    MergedBloomForTokenClassification,
    MergedBloomForQuestionAnswering,
) = merged_classes(
    SPEC,
    (BloomModel, "AutoModel"),
    (BloomForCausalLM, "AutoModelForCausalLM"),
    (BloomForSequenceClassification, "AutoModelForSequenceClassification"),
    (BloomForTokenClassification, "AutoModelForTokenClassification"),
    (BloomForQuestionAnswering, "AutoModelForQuestionAnswering"),
)
