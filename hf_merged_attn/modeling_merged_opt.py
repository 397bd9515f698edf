"""OPT adapter: merged attention for `OPTAttention`, its config, its model classes and its registry entry.

Self-contained with the core files beside it (torch and transformers only): copied next to saved checkpoints.
OPT has separate q/k/v/out `nn.Linear` projections with biases, learned absolute positions (added to the
embeddings, so nothing sits between Wq and Wk), scales the query by hd^-½, is causal and keeps a KV cache.
"""

from __future__ import annotations

import torch
from transformers import OPTConfig
from transformers.cache_utils import Cache
from transformers.models.opt.modeling_opt import (
    OPTAttention,
    OPTDecoderLayer,
    OPTForCausalLM,
    OPTForQuestionAnswering,
    OPTForSequenceClassification,
    OPTModel,
)
from transformers.utils.deprecation import deprecate_kwarg

from .merged_attention import ArchitectureSpec, MergedAttention, read_linear_qkv, write_linear_qkv
from .merged_models import merged_classes


class MergedOPTConfig(OPTConfig):
    """An `OPTConfig` plus `merged_attn`, the record of the patch; its own `model_type`."""

    model_type = "merged_opt"
    merged_attn: dict | None = None


def check_model(config: OPTConfig) -> None:
    """Refuse OPT variants whose attention is not merged here."""
    if not config.enable_bias:
        raise NotImplementedError(
            "OPT with enable_bias=False is not supported: the merged query bias u_h = bq_h Wk_hᵀ has no place in a "
            "bias-free stock OPT on export. Use an OPT with enable_bias=True (every released OPT checkpoint)."
        )


class MergedOPTAttention(MergedAttention, OPTAttention):
    """Drop-in replacement for `OPTAttention` (same call signature and returns); keeps the stock `out_proj`."""

    output_name = "out_proj"

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self, hidden_states: torch.Tensor, cache: Cache | None = None, attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False, **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same contract as `OPTAttention.forward`: returns (attn_output, attn_weights)."""
        return self.attend(hidden_states, attention_mask, cache, **kwargs)  # through out_proj


def read_weights(attn: OPTAttention) -> dict[str, torch.Tensor]:
    """Per-head wq, wk, wv (H, d, hd) and bq, bk, bv (H, hd) of a stock `OPTAttention`."""
    return read_linear_qkv(attn.q_proj, attn.k_proj, attn.v_proj, attn.num_heads)


def write_weights(attn: OPTAttention, parts: dict[str, torch.Tensor]) -> None:
    """Inverse of `read_weights`."""
    write_linear_qkv(attn.q_proj, attn.k_proj, attn.v_proj, parts)


SPEC = ArchitectureSpec(
    "OPT", ("opt",), OPTAttention, MergedOPTAttention, MergedOPTConfig, OPTDecoderLayer, read_weights, write_weights,
    new_stock_attention=lambda config, layer_idx: OPTAttention(config, layer_idx=layer_idx), check_model=check_model,
    qkv_names=("q_proj", "k_proj", "v_proj"),
)

MergedOPTModel, MergedOPTForCausalLM, MergedOPTForSequenceClassification, MergedOPTForQuestionAnswering = merged_classes(
    SPEC,
    (OPTModel, "AutoModel"),
    (OPTForCausalLM, "AutoModelForCausalLM"),
    (OPTForSequenceClassification, "AutoModelForSequenceClassification"),
    (OPTForQuestionAnswering, "AutoModelForQuestionAnswering"),
)
