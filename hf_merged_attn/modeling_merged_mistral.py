"""Mistral adapter: the rotary latent for `MistralAttention`, its config, model classes and registry entry.

Self-contained with the core files beside it (torch and transformers only): copied next to saved checkpoints.
Mistral: Llama's attention without biases, with `config.sliding_window` (None: full attention). The window is
honoured as stock honours it: the model builds a sliding-window mask, the dynamic cache keeps the window (of the
latent and the rotary keys alike), and the window size is passed on to the attention function.
"""

from __future__ import annotations

import torch
from transformers import MistralConfig
from transformers.cache_utils import Cache
from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralDecoderLayer,
    MistralForCausalLM,
    MistralForSequenceClassification,
    MistralModel,
    MistralRotaryEmbedding,
    eager_attention_forward,
)
from transformers.utils.deprecation import deprecate_kwarg

from .merged_attention import ArchitectureSpec
from .merged_models import merged_classes
from .rotary_latent import RotaryLatentAttention, read_rotary_qkv, write_rotary_qkv


class MergedMistralConfig(MistralConfig):
    """A `MistralConfig` plus `merged_attn`, the record of the patch; its own `model_type`."""

    model_type = "merged_mistral"
    merged_attn: dict | None = None


class MergedMistralAttention(RotaryLatentAttention, MistralAttention):
    """Drop-in replacement for `MistralAttention` (same call signature and returns); keeps the stock `o_proj`."""

    eager_attention = staticmethod(eager_attention_forward)
    rotary_embedding_class = MistralRotaryEmbedding  # rope='exact': rotates the keys rebuilt from the cache

    @classmethod
    def stock_settings(cls, config, layer_idx: int | None) -> dict:
        """Mistral: no attention biases."""
        return {**super().stock_settings(config, layer_idx), "qkv_bias": False, "output_bias": False}

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None, cache: Cache | None = None, **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same contract as `MistralAttention.forward`: returns (attn_output, attn_weights)."""
        return self.attend(hidden_states, position_embeddings, attention_mask, cache,
                           sliding_window=getattr(self.config, "sliding_window", None), **kwargs)


SPEC = ArchitectureSpec(
    "Mistral", ("mistral",), MistralAttention, MergedMistralAttention, MergedMistralConfig, MistralDecoderLayer,
    read_rotary_qkv, write_rotary_qkv,
    new_stock_attention=lambda config, layer_idx: MistralAttention(config, layer_idx=layer_idx),
    qkv_names=("q_proj", "k_proj", "v_proj"), rotary=True,
)

MergedMistralModel, MergedMistralForCausalLM, MergedMistralForSequenceClassification = merged_classes(
    SPEC,
    (MistralModel, "AutoModel"),
    (MistralForCausalLM, "AutoModelForCausalLM"),
    (MistralForSequenceClassification, "AutoModelForSequenceClassification"),
)
