"""Qwen2 adapter: the rotary latent for `Qwen2Attention`, its config, model classes and registry entry.

Self-contained with the core files beside it (torch and transformers only): copied next to saved checkpoints.
Qwen2: Llama's attention with q/k/v biases (no o_proj bias) and, per layer type, an optional sliding window (passed
to the attention function and encoded in the mask the model builds; the cache of a sliding layer keeps the window).
"""

from __future__ import annotations

import torch
from transformers import Qwen2Config
from transformers.cache_utils import Cache
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen2Model,
    Qwen2RotaryEmbedding,
    eager_attention_forward,
)
from transformers.utils.deprecation import deprecate_kwarg

from .merged_attention import ArchitectureSpec
from .merged_models import merged_classes
from .rotary_latent import RotaryLatentAttention, read_rotary_qkv, write_rotary_qkv


class MergedQwen2Config(Qwen2Config):
    """A `Qwen2Config` plus `merged_attn`, the record of the patch; its own `model_type`."""

    model_type = "merged_qwen2"
    merged_attn: dict | None = None


class MergedQwen2Attention(RotaryLatentAttention, Qwen2Attention):
    """Drop-in replacement for `Qwen2Attention` (same call signature and returns); keeps the stock `o_proj`."""

    eager_attention = staticmethod(eager_attention_forward)
    rotary_embedding_class = Qwen2RotaryEmbedding  # rope='exact': rotates the keys rebuilt from the cache

    @classmethod
    def stock_settings(cls, config, layer_idx: int | None) -> dict:
        """Qwen2: biases on q, k and v, none on o_proj."""
        return {**super().stock_settings(config, layer_idx), "qkv_bias": True, "output_bias": False}

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        layer_types = getattr(config, "layer_types", None)
        sliding = layer_types is not None and self.layer_idx is not None and layer_types[self.layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None, cache: Cache | None = None, **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same contract as `Qwen2Attention.forward`: returns (attn_output, attn_weights)."""
        return self.attend(hidden_states, position_embeddings, attention_mask, cache, sliding_window=self.sliding_window,
                           **kwargs)


SPEC = ArchitectureSpec(
    "Qwen2", ("qwen2",), Qwen2Attention, MergedQwen2Attention, MergedQwen2Config, Qwen2DecoderLayer, read_rotary_qkv,
    write_rotary_qkv, new_stock_attention=lambda config, layer_idx: Qwen2Attention(config, layer_idx=layer_idx),
    qkv_names=("q_proj", "k_proj", "v_proj"), rotary=True,
)

MergedQwen2Model, MergedQwen2ForCausalLM, MergedQwen2ForSequenceClassification = merged_classes(
    SPEC,
    (Qwen2Model, "AutoModel"),
    (Qwen2ForCausalLM, "AutoModelForCausalLM"),
    (Qwen2ForSequenceClassification, "AutoModelForSequenceClassification"),
)
