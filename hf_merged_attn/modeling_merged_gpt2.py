"""GPT-2 adapter: merged attention for `GPT2Attention`, its config, its model classes and its registry entry.

Self-contained with the core files beside it (torch and transformers only): copied next to saved checkpoints so
that `from_pretrained(..., trust_remote_code=True)` works where hf_merged_attn is not installed.

GPT-2's `c_attn` is a `transformers.pytorch_utils.Conv1D` whose weight is stored (in, out) = (d, 3d), `y = x @ W
+ b`: columns [0, d) are the queries, [d, 2d) the keys, [2d, 3d) the values; head h owns columns h*hd .. of each.
Scores: hd^-½ (scale_attn_weights), divided by layer_idx + 1 (scale_attn_by_inverse_layer_idx); causal; KV cache.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config
from transformers.cache_utils import Cache
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2Attention,
    GPT2Block,
    GPT2DoubleHeadsModel,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils.deprecation import deprecate_kwarg

from .merged_attention import ArchitectureSpec, MergedAttention
from .merged_models import merged_classes


class MergedGPT2Config(GPT2Config):
    """A `GPT2Config` plus `merged_attn`, the record of the patch (see `PatchConfig.to_dict`), and `base_model`.

    Its own `model_type` keeps transformers from ever loading such a checkpoint as a stock GPT-2 with missing
    attention weights.
    """

    model_type = "merged_gpt2"
    merged_attn: dict | None = None


def check_model(config: GPT2Config) -> None:
    """Refuse GPT-2 variants whose attention is not merged here."""
    if getattr(config, "add_cross_attention", False):
        raise NotImplementedError(
            "GPT-2 with add_cross_attention=True (an encoder-decoder setup) is not supported: only decoder "
            "self-attention is merged. Use a decoder-only GPT-2 (add_cross_attention=False)."
        )


class MergedGPT2Attention(MergedAttention, GPT2Attention):
    """Drop-in replacement for a self-attention `GPT2Attention` (same call signature and returns).

    It subclasses `GPT2Attention` so that transformers' isinstance-based machinery (the recorders behind
    `output_attentions`, `_init_weights`) treats it as GPT-2 attention; it does not build `c_attn`.
    """

    output_name = "c_proj"

    @classmethod
    def stock_settings(cls, config: GPT2Config, layer_idx: int | None) -> dict:
        scaling = (config.hidden_size // config.num_attention_heads) ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scaling /= float(layer_idx + 1)
        return {
            "hidden_size": config.hidden_size, "num_heads": config.num_attention_heads, "scaling": scaling,
            "is_causal": True, "dropout": config.attn_pdrop, "upcast": config.reorder_and_upcast_attn,
        }

    def __init__(self, config: GPT2Config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.is_cross_attention = False
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def new_output(self, config: GPT2Config) -> Conv1D:
        return Conv1D(self.embed_dim, self.embed_dim)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same contract as `GPT2Attention.forward` for self-attention: returns (attn_output, attn_weights)."""
        if encoder_hidden_states is not None:
            raise NotImplementedError(
                "MergedGPT2Attention is self-attention only; got encoder_hidden_states. Cross-attention is not patched."
            )
        attn_output, attn_weights = self.attend(hidden_states, attention_mask, cache, **kwargs)  # through c_proj
        return self.resid_dropout(attn_output), attn_weights


def read_weights(attn: GPT2Attention) -> dict[str, torch.Tensor]:
    """Per-head wq, wk, wv (H, d, hd) and bq, bk, bv (H, hd) of a stock `GPT2Attention` (views, detached)."""
    weight, bias = attn.c_attn.weight.detach(), attn.c_attn.bias.detach()  # Conv1D (in, out) = (d, 3d), (3d,)
    d, heads = weight.shape[0], attn.num_heads
    w = weight.view(d, 3, heads, d // heads).permute(1, 2, 0, 3)  # column j*d + h*hd + c -> (3, H, d, hd)
    b = bias.view(3, heads, d // heads)  # (3, H, hd)
    return {"wq": w[0], "wk": w[1], "wv": w[2], "bq": b[0], "bk": b[1], "bv": b[2]}


@torch.no_grad()
def write_weights(attn: GPT2Attention, parts: dict[str, torch.Tensor]) -> None:
    """Inverse of `read_weights`: write per-head weights into `attn.c_attn` (cast to its dtype)."""
    w = torch.stack([parts["wq"], parts["wk"], parts["wv"]])  # (3, H, d, hd)
    d = w.shape[2]
    attn.c_attn.weight.copy_(w.permute(2, 0, 1, 3).reshape(d, 3 * d))  # (d, 3, H, hd) -> Conv1D (d, 3d)
    attn.c_attn.bias.copy_(torch.stack([parts["bq"], parts["bk"], parts["bv"]]).reshape(-1))  # (3, H, hd) -> (3d,)


SPEC = ArchitectureSpec(
    "GPT-2", ("gpt2",), GPT2Attention, MergedGPT2Attention, MergedGPT2Config, GPT2Block, read_weights, write_weights,
    new_stock_attention=lambda config, layer_idx: GPT2Attention(config, layer_idx=layer_idx), check_model=check_model,
    qkv_names=("c_attn",),
)

(
    MergedGPT2Model,
    MergedGPT2LMHeadModel,
    MergedGPT2DoubleHeadsModel,
    MergedGPT2ForSequenceClassification,
    MergedGPT2ForTokenClassification,
    MergedGPT2ForQuestionAnswering,
) = merged_classes(
    SPEC,
    (GPT2Model, "AutoModel"),
    (GPT2LMHeadModel, "AutoModelForCausalLM"),
    (GPT2DoubleHeadsModel, None),  # transformers has no Auto class for it
    (GPT2ForSequenceClassification, "AutoModelForSequenceClassification"),
    (GPT2ForTokenClassification, "AutoModelForTokenClassification"),
    (GPT2ForQuestionAnswering, "AutoModelForQuestionAnswering"),
)
