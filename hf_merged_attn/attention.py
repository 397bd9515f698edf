"""`MergedGPT2Attention`: GPT-2 self-attention with the query–key product held as S_h or U_h V_hᵀ.

Shapes: batch B, query length T (Tk with the cache), hidden d, heads H, head size hd, rank r.

- covariance: q_h = x S_h + u_h (B, H, T, d); the key is x itself, ONE head shared by all: (B, 1, T, d).
- lowrank:    q_h = x U_h + a_h (B, H, T, r); k_h = x V_h (B, H, T, r).
Values and `c_proj` are stock GPT-2's. Scores use stock's scaling (hd^-½, optionally / (layer+1)).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.pytorch_utils import Conv1D
from transformers.utils.deprecation import deprecate_kwarg

from .config import PatchConfig
from .seeding import covariance_from_qk, lowrank_from_qk, split_gpt2_qkv

SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


class MergedGPT2Attention(GPT2Attention):
    """Drop-in replacement for a self-attention `GPT2Attention` (same call signature and returns).

    It subclasses `GPT2Attention` so that transformers' isinstance-based machinery (the recorders behind
    `output_attentions`, `_init_weights`) treats it as GPT-2 attention; it does not build `c_attn`.

    Parameters (all ordinary, named for LoRA targeting and checkpoints):
        q_proj: nn.Linear(d, H*qk) with qk = d (covariance) or r (lowrank). Rows h*qk .. (h+1)*qk-1 of its
            weight are S_hᵀ (resp. U_hᵀ); its bias holds u_h (resp. a_h).
        k_proj: lowrank only, nn.Linear(d, H*r, bias=False); rows h*r .. are V_hᵀ.
        v_proj: nn.Linear(d, d), stock GPT-2's value weights.
        c_proj: stock GPT-2's output Conv1D.
    """

    def __init__(
        self,
        config,
        mode: str,
        rank: int | None = None,
        layer_idx: int | None = None,
        *,
        c_proj: Conv1D | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        nn.Module.__init__(self)  # GPT2Attention.__init__ would build the c_attn we replace
        PatchConfig(mode, rank)  # validates mode / rank
        self.config = config
        self.mode = mode
        self.rank = rank
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.split_size = self.embed_dim
        self.qk_head_dim = self.embed_dim if mode == "covariance" else rank
        self.layer_idx = layer_idx
        self.is_cross_attention = False
        self.is_causal = True
        self.scale_attn_weights = config.scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = config.scale_attn_by_inverse_layer_idx
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn
        # Stock GPT-2's scaling, NOT qk_head_dim^-½: the scores must equal stock's.
        self.scaling = 1.0
        if self.scale_attn_weights:
            self.scaling = self.head_dim**-0.5
        if self.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(self.layer_idx + 1)

        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(self.embed_dim, self.num_heads * self.qk_head_dim, bias=True, **factory)
        if mode == "lowrank":
            self.k_proj = nn.Linear(self.embed_dim, self.num_heads * rank, bias=False, **factory)
        else:
            self.k_proj = None
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=True, **factory)
        self.c_proj = c_proj if c_proj is not None else Conv1D(self.embed_dim, self.embed_dim).to(**factory)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    @classmethod
    def from_gpt2_attention(cls, attn: GPT2Attention, mode: str, rank: int | None = None) -> MergedGPT2Attention:
        """Build a merged attention seeded from a stock `GPT2Attention` so that it computes the same scores.

        `c_proj` and the dropouts are shared by reference; new weights are built on the old weights'
        device and dtype (seeding math runs in float64 and is cast back).
        """
        weight = attn.c_attn.weight
        new = cls(attn.config, mode, rank, attn.layer_idx, c_proj=attn.c_proj, device=weight.device, dtype=weight.dtype)
        new.attn_dropout, new.resid_dropout = attn.attn_dropout, attn.resid_dropout
        parts = split_gpt2_qkv(weight.detach(), attn.c_attn.bias.detach(), attn.num_heads)
        if mode == "covariance":
            query_weight, query_bias = covariance_from_qk(parts["wq"], parts["bq"], parts["wk"])  # (H,d,d), (H,d)
            key_weight = None
        else:
            query_weight, query_bias, key_weight = lowrank_from_qk(
                parts["wq"], parts["bq"], parts["wk"], rank, init_std=attn.config.initializer_range
            )  # (H,d,r), (H,r), (H,d,r)
        with torch.no_grad():
            new.q_proj.weight.copy_(_heads_to_linear(query_weight))
            new.q_proj.bias.copy_(query_bias.reshape(-1))  # (H, qk) -> (H*qk,)
            if key_weight is not None:
                new.k_proj.weight.copy_(_heads_to_linear(key_weight))
            new.v_proj.weight.copy_(parts["wv"].mT)  # Conv1D (in, out) -> Linear (out, in)
            new.v_proj.bias.copy_(parts["bv"])
        new.train(attn.training)
        return new

    def homogeneous_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged score matrix as factors: S̃_h = [S_h; u_h] = left_h @ right_hᵀ ((d+1) x d per head).

        Returns:
            left (H, d+1, k) and right (H, d, k), detached, with k = d (covariance, right = I) or r (lowrank).
        """
        h, d, qk = self.num_heads, self.embed_dim, self.qk_head_dim
        weight = self.q_proj.weight.detach().reshape(h, qk, d).mT  # (H*qk, d) -> (H, d, qk)
        bias = self.q_proj.bias.detach().reshape(h, 1, qk)  # (H, 1, qk)
        left = torch.cat([weight, bias], dim=1)  # (H, d+1, qk)
        if self.k_proj is None:
            right = torch.eye(d, dtype=weight.dtype, device=weight.device).expand(h, d, d)
        else:
            right = self.k_proj.weight.detach().reshape(h, qk, d).mT  # (H, d, r)
        return left, right

    def extra_repr(self) -> str:
        rank = f", rank={self.rank}" if self.rank is not None else ""
        return f"mode={self.mode!r}{rank}, layer_idx={self.layer_idx}"

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
        implementation = self.config._attn_implementation or "eager"
        if implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
            raise NotImplementedError(
                f"attn_implementation={implementation!r} is not supported by the {self.mode} patch (query/key head "
                f"size {self.qk_head_dim}, value head size {self.head_dim}); supported: "
                f"{', '.join(SUPPORTED_ATTN_IMPLEMENTATIONS)}. Call model.set_attn_implementation('sdpa')."
            )
        lead = hidden_states.shape[:-1]  # (B, T)
        query = self.q_proj(hidden_states).view(*lead, self.num_heads, -1).transpose(1, 2)  # (B, H, T, qk)
        if self.k_proj is None:
            key = hidden_states.unsqueeze(1)  # (B, 1, T, d): the shared key, cached once per layer
        else:
            key = self.k_proj(hidden_states).view(*lead, self.num_heads, -1).transpose(1, 2)  # (B, H, T, r)
        value = self.v_proj(hidden_states).view(*lead, self.num_heads, -1).transpose(1, 2)  # (B, H, T, hd)

        if cache is not None:
            layer_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            key, value = layer_cache.update(key, value, self.layer_idx, kwargs=kwargs)  # (B, Hk, Tk, qk), (B, H, Tk, hd)

        if implementation == "eager":
            attn_output, attn_weights = self._eager_attention(query, key, value, attention_mask)
        else:
            attn_output, attn_weights = ALL_ATTENTION_FUNCTIONS[implementation](
                self,
                query,
                key.expand(-1, self.num_heads, -1, -1),  # (B, H, Tk, qk): a view, no copy of the shared key
                value,
                attention_mask,
                dropout=self.attn_dropout.p if self.training else 0.0,
                scaling=self.scaling,
                **kwargs,
            )
        attn_output = attn_output.reshape(*attn_output.shape[:-2], -1).contiguous()  # (B, T, H, hd) -> (B, T, d)
        attn_output = self.resid_dropout(self.c_proj(attn_output))
        return attn_output, attn_weights

    def _eager_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stock GPT-2's eager attention (incl. `reorder_and_upcast_attn`) for a shared or per-head key.

        The softmax always runs in float32: covariance scores can be larger than stock's per-head ones.
        """
        upcast = self.reorder_and_upcast_attn
        with torch.autocast(query.device.type, enabled=False) if upcast else nullcontext():
            if upcast:
                query, key = query.float(), key.float()
            scores = _scores(query, key) * self.scaling  # (B, H, T, Tk)
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        weights = self.attn_dropout(weights)
        attn_output = (weights @ value).transpose(1, 2)  # (B, H, T, hd) -> (B, T, H, hd)
        return attn_output, weights


def _scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """q·kᵀ per head; a one-head (shared) key is used by all heads in one GEMM without copying it."""
    batch, heads, length, width = query.shape
    if key.shape[1] == 1 and heads > 1:
        flat = query.reshape(batch, heads * length, width)  # (B, H*T, qk)
        return (flat @ key[:, 0].mT).view(batch, heads, length, -1)  # (B, H*T, Tk) -> (B, H, T, Tk)
    return query @ key.mT  # (B, H, T, Tk)


def _heads_to_linear(per_head: torch.Tensor) -> torch.Tensor:
    """(H, d, k) per-head maps x -> x @ W_h into one nn.Linear weight (H*k, d)."""
    heads, d, k = per_head.shape
    return per_head.mT.reshape(heads * k, d)  # (H, k, d) -> (H*k, d)
