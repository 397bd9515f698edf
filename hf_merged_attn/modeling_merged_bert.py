"""BERT-family adapter (BERT, RoBERTa): merged attention for their self-attention, configs, model classes, entries.

Self-contained with the core files beside it (torch and transformers only): copied next to saved checkpoints.
BERT and RoBERTa have separate query/key/value `nn.Linear` projections with biases and learned absolute
positions (added to the embeddings); attention is bidirectional, scaled by hd^-½, with no cache in an encoder.
The output projection (`BertSelfOutput.dense`) lives outside the self-attention module and stays stock.
RoBERTa's modules are BERT's under other names, so one attention class serves both.
"""

from __future__ import annotations

import torch
from torch import nn
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
from .merged_models import merged_class


class MergedBertConfig(BertConfig):
    """A `BertConfig` plus `merged_attn`, the record of the patch; its own `model_type`."""

    model_type = "merged_bert"
    merged_attn: dict | None = None


class MergedRobertaConfig(RobertaConfig):
    """A `RobertaConfig` plus `merged_attn`, the record of the patch; its own `model_type`."""

    model_type = "merged_roberta"
    merged_attn: dict | None = None


MergedBertConfig.register_for_auto_class()
MergedRobertaConfig.register_for_auto_class()


class MergedBertSelfAttention(MergedAttention, BertSelfAttention):
    """Drop-in replacement for an encoder's `BertSelfAttention` (same call signature and returns)."""

    def __init__(
        self,
        config: BertConfig,
        mode: str,
        rank: int | None = None,
        layer_idx: int | None = None,
        *,
        output: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        if output is not None:
            raise ValueError("BERT's self-attention has no output projection of its own (it is BertSelfOutput.dense).")
        head_dim = config.hidden_size // config.num_attention_heads
        self._build_merged(
            config, mode=mode, rank=rank, layer_idx=layer_idx, hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads, scaling=head_dim**-0.5, is_causal=False,
            dropout=config.attention_probs_dropout_prob, device=device, dtype=dtype,
        )
        self.is_decoder = False
        self.num_attention_heads, self.attention_head_size = self.num_heads, self.head_dim
        self.all_head_size = self.embed_dim

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


def _spec(family, model_type, attention, merged, config_class, block) -> ArchitectureSpec:
    return ArchitectureSpec(
        family=family,
        model_types=(model_type,),
        attention_class=attention,
        merged_attention_class=merged,
        config_class=config_class,
        block_class=block,
        causal=False,
        has_cache=False,
        read_weights=read_weights,
        write_weights=write_weights,
        new_stock_attention=lambda config, layer_idx: attention(config, is_causal=False, layer_idx=layer_idx),
        check_model=check_model,
    )


SPEC = _spec("BERT", "bert", BertSelfAttention, MergedBertSelfAttention, MergedBertConfig, BertLayer)
ROBERTA_SPEC = _spec("RoBERTa", "roberta", RobertaSelfAttention, MergedRobertaSelfAttention, MergedRobertaConfig, RobertaLayer)

MergedBertModel = merged_class(BertModel, SPEC, "AutoModel")
MergedBertForMaskedLM = merged_class(BertForMaskedLM, SPEC, "AutoModelForMaskedLM")
MergedBertForSequenceClassification = merged_class(BertForSequenceClassification, SPEC, "AutoModelForSequenceClassification")
MergedBertForTokenClassification = merged_class(BertForTokenClassification, SPEC, "AutoModelForTokenClassification")
MergedBertForQuestionAnswering = merged_class(BertForQuestionAnswering, SPEC, "AutoModelForQuestionAnswering")
MergedBertForMultipleChoice = merged_class(BertForMultipleChoice, SPEC, "AutoModelForMultipleChoice")
MergedRobertaModel = merged_class(RobertaModel, ROBERTA_SPEC, "AutoModel")
MergedRobertaForMaskedLM = merged_class(RobertaForMaskedLM, ROBERTA_SPEC, "AutoModelForMaskedLM")
MergedRobertaForSequenceClassification = merged_class(RobertaForSequenceClassification, ROBERTA_SPEC, "AutoModelForSequenceClassification")
MergedRobertaForTokenClassification = merged_class(RobertaForTokenClassification, ROBERTA_SPEC, "AutoModelForTokenClassification")
MergedRobertaForQuestionAnswering = merged_class(RobertaForQuestionAnswering, ROBERTA_SPEC, "AutoModelForQuestionAnswering")
MergedRobertaForMultipleChoice = merged_class(RobertaForMultipleChoice, ROBERTA_SPEC, "AutoModelForMultipleChoice")
