"""BERT-family adapter (BERT, RoBERTa): merged attention for their self-attention, configs, model classes, entries.

Self-contained with the core files beside it (torch and transformers only): copied next to saved checkpoints.
BERT and RoBERTa have separate query/key/value `nn.Linear` projections with biases and learned absolute
positions (added to the embeddings); attention is bidirectional, scaled by hd^-½, with no cache in an encoder.
The output projection (`BertSelfOutput.dense`) lives outside the self-attention module and stays stock.
RoBERTa's modules are BERT's under other names, so one attention class serves both.
"""

from __future__ import annotations

import torch
from transformers import BertConfig, RobertaConfig
from transformers.cache_utils import Cache
from transformers.models.bert.modeling_bert import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLayer,
    BertModel,
    BertSelfAttention,
)
from transformers.models.roberta.modeling_roberta import (
    RobertaForMaskedLM,
    RobertaForMultipleChoice,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaLayer,
    RobertaModel,
    RobertaSelfAttention,
)
from transformers.utils.deprecation import deprecate_kwarg

from .merged_attention import ArchitectureSpec, MergedAttention, read_linear_qkv, write_linear_qkv
from .merged_models import merged_classes


class MergedBertConfig(BertConfig):
    """A `BertConfig` plus `merged_attn`, the record of the patch; its own `model_type`."""

    model_type = "merged_bert"
    merged_attn: dict | None = None


class MergedRobertaConfig(RobertaConfig):
    """A `RobertaConfig` plus `merged_attn`, the record of the patch; its own `model_type`."""

    model_type = "merged_roberta"
    merged_attn: dict | None = None


class MergedBertSelfAttention(MergedAttention, BertSelfAttention):
    """Drop-in replacement for an encoder's `BertSelfAttention` (same call signature and returns)."""

    causal = False
    dropout_name = "attention_probs_dropout_prob"

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same contract as `BertSelfAttention.forward`: returns (context (B, T, d), attn_weights)."""
        return self.attend(hidden_states, attention_mask, cache, **kwargs)


class MergedRobertaSelfAttention(MergedBertSelfAttention, RobertaSelfAttention):
    """Drop-in replacement for an encoder's `RobertaSelfAttention` (BERT's, under RoBERTa's class)."""


def read_weights(attn: BertSelfAttention | RobertaSelfAttention) -> dict[str, torch.Tensor]:
    """Per-head wq, wk, wv (H, d, hd) and bq, bk, bv (H, hd) of a stock BERT / RoBERTa self-attention."""
    return read_linear_qkv(attn.query, attn.key, attn.value, attn.num_attention_heads)


def write_weights(attn: BertSelfAttention | RobertaSelfAttention, parts: dict[str, torch.Tensor]) -> None:
    """Inverse of `read_weights`."""
    write_linear_qkv(attn.query, attn.key, attn.value, parts)


def check_model(config: BertConfig | RobertaConfig) -> None:
    """Refuse decoder / cross-attention variants: only encoder self-attention is merged."""
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise NotImplementedError(
            f"{type(config).__name__} with is_decoder=True or add_cross_attention=True is not supported: only "
            "bidirectional encoder self-attention (BERT, RoBERTa, MiniLM, sentence-transformers) is merged. Use the "
            "encoder (is_decoder=False), or a decoder family (GPT-2, OPT, BLOOM)."
        )


def _spec(family, model_type, attention, merged, config_class, block, **extra) -> ArchitectureSpec:
    return ArchitectureSpec(
        family, (model_type,), attention, merged, config_class, block, read_weights, write_weights,
        new_stock_attention=lambda config, layer_idx: attention(config, is_causal=False, layer_idx=layer_idx),
        qkv_names=("query", "key", "value"), causal=False, has_cache=False, check_model=check_model, **extra,
    )


SPEC = _spec("BERT", "bert", BertSelfAttention, MergedBertSelfAttention, MergedBertConfig, BertLayer)
# RoBERTa numbers positions from padding_idx + 1 (transformers' create_position_ids_from_input_ids): 514 embeddings
# hold 512 tokens
ROBERTA_SPEC = _spec("RoBERTa", "roberta", RobertaSelfAttention, MergedRobertaSelfAttention, MergedRobertaConfig,
                     RobertaLayer, max_length=lambda config: config.max_position_embeddings - (config.pad_token_id or 0) - 1)

# The Auto class of each head, in the order of the class lists below (the same heads for BERT and RoBERTa).
_AUTO = ("AutoModel", "AutoModelForMaskedLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
         "AutoModelForQuestionAnswering", "AutoModelForMultipleChoice")
(
    MergedBertModel,
    MergedBertForMaskedLM,
    MergedBertForSequenceClassification,
    MergedBertForTokenClassification,
    MergedBertForQuestionAnswering,
    MergedBertForMultipleChoice,
) = merged_classes(SPEC, *zip((BertModel, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification,
                                BertForQuestionAnswering, BertForMultipleChoice), _AUTO))
(
    MergedRobertaModel,
    MergedRobertaForMaskedLM,
    MergedRobertaForSequenceClassification,
    MergedRobertaForTokenClassification,
    MergedRobertaForQuestionAnswering,
    MergedRobertaForMultipleChoice,
) = merged_classes(ROBERTA_SPEC, *zip((RobertaModel, RobertaForMaskedLM, RobertaForSequenceClassification,
                                        RobertaForTokenClassification, RobertaForQuestionAnswering,
                                        RobertaForMultipleChoice), _AUTO))
