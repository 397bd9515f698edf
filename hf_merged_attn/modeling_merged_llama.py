"""Llama adapter: the rotary latent for `LlamaAttention` (SmolLM2 is this class), its config, model classes, registry entry.

Self-contained with the core files beside it (torch and transformers only): copied next to saved checkpoints.
Llama: separate q/k/v/o `nn.Linear` projections (biases if `attention_bias`), grouped-query attention
(num_key_value_heads), rotary positions passed to the attention as `position_embeddings` (cos, sin), scaling hd^-½.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    LlamaRotaryEmbedding,
    eager_attention_forward,
)
from transformers.utils.deprecation import deprecate_kwarg

from .merged_attention import ArchitectureSpec
from .merged_models import merged_classes
from .rotary_latent import RotaryLatentAttention, read_rotary_qkv, write_rotary_qkv


class MergedLlamaConfig(LlamaConfig):
    """A `LlamaConfig` plus `merged_attn`, the record of the patch; its own `model_type`."""

    model_type = "merged_llama"
    merged_attn: dict | None = None


class MergedLlamaAttention(RotaryLatentAttention, LlamaAttention):
    """Drop-in replacement for `LlamaAttention` (same call signature and returns); keeps the stock `o_proj`."""

    eager_attention = staticmethod(eager_attention_forward)
    rotary_embedding_class = LlamaRotaryEmbedding  # rope='exact': rotates the keys rebuilt from the cache

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None, cache: Cache | None = None, **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same contract as `LlamaAttention.forward`: returns (attn_output, attn_weights)."""
        return self.attend(hidden_states, position_embeddings, attention_mask, cache, **kwargs)


SPEC = ArchitectureSpec(
    "Llama", ("llama",), LlamaAttention, MergedLlamaAttention, MergedLlamaConfig, LlamaDecoderLayer, read_rotary_qkv,
    write_rotary_qkv, new_stock_attention=lambda config, layer_idx: LlamaAttention(config, layer_idx=layer_idx),
    qkv_names=("q_proj", "k_proj", "v_proj"), rotary=True,
)

MergedLlamaModel, MergedLlamaForCausalLM, MergedLlamaForSequenceClassification = merged_classes(
    SPEC,
    (LlamaModel, "AutoModel"),
    (LlamaForCausalLM, "AutoModelForCausalLM"),
    (LlamaForSequenceClassification, "AutoModelForSequenceClassification"),
)
