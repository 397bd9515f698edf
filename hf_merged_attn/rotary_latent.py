"""Rotary latent attention (MATH.md part four): a shared latent for the NoPE keys and the values, a few kept rotary pairs.

Self-contained (torch, transformers and the core files beside it): it travels next to every rotary checkpoint. No
model family is named here: an adapter (`modeling_merged_llama.py`, ...) subclasses its stock attention together with
`RotaryLatentAttention` and calls `attend` from its `forward`.

Shapes: batch B, query length T (Tk with the cache), hidden d, H query heads, G key/value heads, head size hd,
latent width r_c; Gk rotary key heads (G for the per-head rules, 1 for RoRoPE) with K kept pairs each (2K numbers:
the first halves of the pairs, then their second halves, so rotate_half applies), w NoPE numbers per key head.

- queries: the stock q_proj, then a fixed map per head (`query_map`, (H, hd, 2K + w)) to the rotary features of its
  key head (rotated with the positions' angles) and the NoPE features (not rotated);
- keys: the rotary key k_P = k_rope(x), rotated, (B, Gk, T, 2K); the NoPE keys from the latent c = latent_proj(x),
  k_N = k_up(c), (B, Gk, T, w); values v = v_up(c) (+ the stock value bias), (B, G, T, hd);
- cache per token per layer: c (r_c numbers) in the key slot and k_P after rotation (Gk·2K) in the value slot —
  nothing else;
- decoding attends the cache in the absorbed order: q̃ = q_N·Bkᵀ against c plus the rotary term against k_P, one
  softmax, then (A·c)·Bv; training and prefill expand c and run the family's own attention (GQA, masks, windows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import Cache

from .attention_kernels import ROTARY_KERNELS, CacheLayout, KernelQuery, phase_of
from .exact_rope import ExactRopeLatent, position_digits, rotate
from .merged_attention import (
    ROPE_SELECTIONS,
    SUPPORTED_ATTN_IMPLEMENTATIONS,
    MergedAttention,
    _hooked,
    _linear_map,
    _masked_softmax,
)


@dataclass
class RotaryInputs:
    """What a rotary kernel attends (see attention_kernels.ROTARY_KERNELS)."""

    rope_query: torch.Tensor  # (B, H, T, 2K), rotated
    nope_query: torch.Tensor  # (B, H, T, w)
    latent: torch.Tensor  # (B, Tk, r_c): the fresh tokens' (train, prefill) or the cache's (decode)
    rope_key: torch.Tensor  # (B, Gk, Tk, 2K), rotated


class RotaryLatentAttention(ExactRopeLatent, MergedAttention):
    """Mixin: the latent mode of a rotary, grouped-query attention (Llama, Qwen2, Mistral). See the module docstring;
    with rope="exact" the exact-RoPE latent of `exact_rope.py` (every pair rotated, keys rebuilt from c).

    Parameters: q_proj (stock), k_rope (d -> Gk·2K, the stock key bias's rotary part; None when K = 0), latent_proj
    (d -> r_c, W_cᵀ), k_up (r_c -> Gk·w, Bkᵀ; None when w = 0), v_up (r_c -> G·hd, Bvᵀ, the stock value bias), o_proj
    (stock, shared). Buffers (saved with the weights): `rope_freq` (Gk, K), the frequency of every rotary pair, and
    `query_map` (H, hd, 2K + w).
    """

    output_name = "o_proj"
    rotary = True
    kernel_table = ROTARY_KERNELS
    eager_attention = None  # the family's eager attention function (its modeling file's eager_attention_forward)

    def __init__(
        self,
        config,
        mode: str,
        rank: int | None = None,
        layer_idx: int | None = None,
        *,
        output: nn.Module | None = None,
        values: str | None = None,
        value_rank: int | None = None,
        rope_pairs: int | None = None,
        rope_selection: str | None = None,
        rope: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        nn.Module.__init__(self)
        if mode != "latent" or rank is None or values is not None or value_rank is not None:
            raise ValueError(
                f"{type(self).__name__} takes mode='latent' with rank=r_c (got mode={mode!r}, rank={rank!r}, "
                f"values={values!r}, value_rank={value_rank!r})."
            )
        settings = self.stock_settings(config, layer_idx)
        d, heads, kv_heads, hd = (settings[k] for k in ("hidden_size", "num_heads", "num_kv_heads", "head_dim"))
        self.config, self.mode, self.rank, self.layer_idx = config, mode, rank, layer_idx
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = d, heads, kv_heads, hd
        self.num_key_value_groups = heads // kv_heads  # read by the family's attention functions (repeat_kv)
        self.qk_head_dim, self.scaling, self.is_causal, self.upcast_scores = hd, settings["scaling"], True, False
        self.values = self.value_rank = self.value_bias = None
        self.rope = rope or "partial"
        bias, factory = settings["qkv_bias"], {"device": device, "dtype": dtype}
        self.attn_dropout = nn.Dropout(settings["dropout"])
        self.o_proj = output if output is not None else nn.Linear(heads * hd, d, bias=settings["output_bias"], **factory)
        self.q_proj = nn.Linear(d, heads * hd, bias=bias, **factory)
        if self.rope == "exact":
            if rope_pairs is not None or rope_selection is not None:
                raise ValueError(f"rope='exact' keeps every pair rotated; got rope_pairs={rope_pairs!r}, "
                                 f"rope_selection={rope_selection!r}.")
            self._init_exact(settings, rank, factory)
            return
        self.rope_pairs = hd // 2 if rope_pairs is None else rope_pairs
        if not 0 <= self.rope_pairs <= hd // 2 or rope_selection not in (None, *ROPE_SELECTIONS):
            raise ValueError(
                f"rope_pairs={rope_pairs!r} / rope_selection={rope_selection!r} do not describe a rotary latent of head "
                f"size {hd}: rope_pairs must be 0 .. {hd // 2}, rope_selection one of 2norm, high, low, uniform, rorope."
            )
        self.rope_selection = rope_selection
        shared = rope_selection == "rorope"  # one rotary key for all heads (DeepSeek-V2's layout)
        self.rope_heads = 1 if shared else kv_heads  # Gk
        self.rope_width = 2 * self.rope_pairs * (kv_heads if shared else 1)  # 2K per rotary key head
        self.nope_width = (kv_heads * hd if shared else hd) - self.rope_width  # w per key head
        self.k_rope = nn.Linear(d, self.rope_heads * self.rope_width, bias=bias, **factory) if self.rope_width else None
        self.latent_proj = nn.Linear(d, rank, bias=False, **factory)
        self.k_up = nn.Linear(rank, self.rope_heads * self.nope_width, bias=False, **factory) if self.nope_width else None
        self.v_up = nn.Linear(rank, kv_heads * hd, bias=bias, **factory)
        self.register_buffer("rope_freq", torch.zeros(self.rope_heads, self.rope_width // 2, dtype=torch.long,
                                                      device=device))
        self.register_buffer("query_map", torch.zeros(heads, hd, self.rope_width + self.nope_width, **factory))

    @classmethod
    def stock_settings(cls, config, layer_idx: int | None) -> dict:
        """Sizes, scaling and biases of the family's attention, from its config (an adapter overrides what differs):
        hidden_size, num_heads, num_kv_heads, head_dim (config.head_dim, else d / H), scaling hd^-½, dropout,
        qkv_bias / output_bias (config.attention_bias)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        bias = bool(getattr(config, "attention_bias", False))
        return {
            "hidden_size": config.hidden_size, "num_heads": config.num_attention_heads,
            "num_kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            "head_dim": head_dim, "scaling": head_dim**-0.5, "is_causal": True,
            "dropout": getattr(config, "attention_dropout", 0.0), "qkv_bias": bias, "output_bias": bias,
        }

    @property
    def cache_layout(self) -> CacheLayout:
        """c (r_c) in the key slot, the rotated rotary keys of every rotary key head (Gk·2K) packed in the value slot;
        rope="exact": each token's position (`exact_rope.position_digits` numbers) in the value slot."""
        if self.rope == "exact":
            return CacheLayout(1, self.rank, 1, position_digits(self.latent_proj.weight.dtype))
        return CacheLayout(1, self.rank, 1, self.rope_heads * self.rope_width)

    def stock_qkv_parameters(self) -> int:
        """Parameters of the stock q/k/v projections this module replaces (GQA: d·(H + 2G)·hd, plus biases)."""
        width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        return self.embed_dim * width + (width if self.q_proj.bias is not None else 0)

    def stock_cache_numbers_per_token(self) -> int:
        """Numbers stock caches per token in this layer: keys and values of the G KV heads, 2·G·hd."""
        return 2 * self.num_kv_heads * self.head_dim

    def exact_export(self) -> bool:
        """Whether `stock_parts` is exact: nothing lost its rotation (w = 0), whatever was trained since."""
        return self.rope == "exact" or self.nope_width == 0

    def extra_repr(self) -> str:
        if self.rope == "exact":
            return f"mode='latent', rank={self.rank}, rope='exact', layer_idx={self.layer_idx}"
        return (f"mode='latent', rank={self.rank}, rope_pairs={self.rope_pairs}, rope_selection={self.rope_selection!r}, "
                f"layer_idx={self.layer_idx}")

    def _check_implementation(self) -> str:
        """The model's attention implementation, refused unless the rotary latent supports it."""
        implementation = self.config._attn_implementation or "eager"
        if implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
            raise NotImplementedError(
                f"attn_implementation={implementation!r} is not supported by the rotary latent patch (latent width "
                f"{self.rank}); supported: {', '.join(SUPPORTED_ATTN_IMPLEMENTATIONS)}. Call "
                "model.set_attn_implementation('sdpa')."
            )
        return implementation

    def _angles(self, table: torch.Tensor) -> torch.Tensor:
        """cos or sin (B, T, hd) from the model's rotary embedding -> (B, Gk, T, 2K) at each kept pair's frequency."""
        half = self.head_dim // 2
        first = table[..., self.rope_freq]  # (B, T, Gk, K)
        second = table[..., self.rope_freq + half]
        return torch.cat([first, second], dim=-1).transpose(1, 2)  # (B, Gk, T, 2K)

    def attend(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotary latent self-attention of `hidden_states` (B, T, d) through o_proj: (output (B, T, d), weights or None).

        `position_embeddings` is the (cos, sin) the model computed (B, T, hd): used as given, never recomputed.
        """
        if self.rope == "exact":
            return self._attend_exact(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        implementation = self._check_implementation()
        batch, length = hidden_states.shape[:-1]
        key_heads, width = self.rope_heads, self.rope_width
        cos, sin = (self._angles(t) for t in position_embeddings)  # (B, Gk, T, 2K)
        query = self.q_proj(hidden_states).view(batch, length, self.num_heads, -1).transpose(1, 2)  # (B, H, T, hd)
        query = query @ self.query_map  # (B, H, T, 2K + w): each head's rotary and NoPE features
        rope_query = rotate(query[..., :width].unflatten(1, (key_heads, -1)), cos.unsqueeze(2), sin.unsqueeze(2))
        rope_query = rope_query.flatten(1, 2)  # (B, Gk, H/Gk, T, 2K) -> (B, H, T, 2K)
        latent = self.latent_proj(hidden_states)  # (B, T, r_c)
        if self.k_rope is None:
            rope_key = latent.new_zeros(batch, key_heads, length, 0)
        else:
            rope_key = self.k_rope(hidden_states).view(batch, length, key_heads, width).transpose(1, 2)
            rope_key = rotate(rope_key, cos, sin)  # (B, Gk, T, 2K)

        phase, buffer = "train", length
        if cache is not None:
            phase = phase_of(cache, self.layer_idx)  # read before the update
            packed = rope_key.transpose(1, 2).reshape(batch, 1, length, key_heads * width)  # (B, 1, T, Gk·2K)
            # a quantized latent cache (LatentQuantizedCache) keeps the rotary keys whole in the model's dtype
            # (full_precision_values) and, in a decode, returns c of the whole cache dequantized — every step, as no
            # block-wise reader of this layout exists yet; a prefill attends its fresh tokens (read_codes: nothing is
            # dequantized). Other caches ignore both arguments.
            cached_latent, cached_rope = cache.update(latent.unsqueeze(1), packed, self.layer_idx, kwargs=kwargs,
                                                      full_precision_values=True, read_codes=phase != "decode")
            buffer = cached_latent.shape[2]  # a static cache returns its whole buffer
            if phase == "decode":  # attend the cache; a prefill attends its own fresh tokens (a static buffer is longer)
                latent = cached_latent[:, 0]  # (B, Tk, r_c)
                tokens = latent.shape[1]  # rope_pairs = 0 caches no rotary key: its view has no length to infer
                rope_key = cached_rope[:, 0, :tokens].reshape(batch, tokens, key_heads, width).transpose(1, 2)  # (B, Gk, Tk, 2K)
        if phase != "decode" and attention_mask is not None and attention_mask.shape[-1] > length:
            attention_mask = attention_mask[..., :length]  # a static cache's mask spans its whole buffer
        dropout = self.training and self.attn_dropout.p > 0
        kernel = self._kernel(KernelQuery(
            implementation, hidden_states.device.type, phase, shared=True, mqa=True, equal_widths=False,
            width=self.rank, dropout=dropout, masked=attention_mask is not None,
        ))
        inputs = RotaryInputs(rope_query, query[..., width:], latent, rope_key)
        hooked = any(m is not None and _hooked(m) for m in (self.k_up, self.v_up))
        if phase == "decode" and hooked:  # what hooks on k_up / v_up do acts on the latent itself: expand it
            kernel = ROTARY_KERNELS["rotary_expand"]
            attention_mask = self._additive_for_eager(self._decode_mask(attention_mask, length, latent.shape[1]),
                                                      latent.dtype)
        output, weights = kernel.run(self, inputs, attention_mask, implementation == "eager", kwargs)  # (B, T, H, hd)
        if weights is not None and weights.shape[-1] < buffer:  # a static cache's prefill: stock returns the buffer
            weights = F.pad(weights, (0, buffer - weights.shape[-1]))
        return self.o_proj(output.reshape(batch, length, -1)), weights

    # --- kernels (entries of attention_kernels.ROTARY_KERNELS) -----------------------------------------------------

    def _expanded_attention(self, inputs: RotaryInputs, mask, need_weights: bool, kwargs):
        """Training / prefill: k = [k_P | c·Bk] per key head, v = c·Bv + bv, through the family's own attention."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        latent = inputs.latent
        batch, tokens, _ = latent.shape
        key = inputs.rope_key
        if self.k_up is not None:
            nope_key = self.k_up(latent).view(batch, tokens, self.rope_heads, -1).transpose(1, 2)  # (B, Gk, Tk, w)
            key = torch.cat([key, nope_key], dim=-1)  # (B, Gk, Tk, 2K + w)
        query = torch.cat([inputs.rope_query, inputs.nope_query], dim=-1)  # (B, H, T, 2K + w)
        value = self.v_up(latent).view(batch, tokens, self.num_kv_heads, -1).transpose(1, 2)  # (B, G, Tk, hd)
        if key.shape[1] != value.shape[1]:  # one rotary key head for all (RoRoPE): a view per KV head
            key = key.expand(-1, value.shape[1], -1, -1)
        implementation = self.config._attn_implementation or "eager"
        attention = self.eager_attention if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
        return attention(self, query, key, value, mask, dropout=self.attn_dropout.p if self.training else 0.0,
                         scaling=self.scaling, **kwargs)

    def _latent_query(self, nope_query: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """q̃ = q_N·Bkᵀ per head against the shared latent `latent` (B, Tk, r_c): (B, H, T, w) -> (B, H, T, r_c)."""
        batch, heads, length, _ = nope_query.shape
        if self.k_up is None:
            return nope_query.new_zeros(batch, heads, length, self.rank)
        k_up = _linear_map(self.k_up, latent)[0].view(self.rope_heads, -1, self.rank)  # (Gk, w, r_c): Bk
        grouped = nope_query.unflatten(1, (self.rope_heads, -1))  # (B, Gk, H/Gk, T, w)
        return (grouped @ k_up[:, None]).flatten(1, 2)  # (B, H, T, r_c)

    def _rope_scores(self, inputs: RotaryInputs) -> torch.Tensor:
        """q_P·k_P of every head against its rotary key head: (B, H, T, Tk)."""
        batch, heads, length, width = inputs.rope_query.shape
        if width == 0:  # rope_pairs = 0: no rotary key, the latent scores alone
            return inputs.rope_query.new_zeros(batch, heads, length, inputs.rope_key.shape[2])
        grouped = inputs.rope_query.reshape(batch, self.rope_heads, -1, width)  # (B, Gk, H/Gk·T, 2K)
        return (grouped @ inputs.rope_key.mT).view(batch, heads, length, -1)  # (B, Gk, H/Gk·T, Tk) -> (B, H, T, Tk)

    def _decode_mask(self, mask: torch.Tensor | None, length: int, kv_length: int) -> torch.Tensor | None:
        """The given mask, or (no mask: no padding) causal over the last `length` of the cached keys."""
        if mask is None and length > 1:
            return torch.ones(length, kv_length, dtype=torch.bool, device=self.q_proj.weight.device).tril_(kv_length - length)
        return mask

    def _additive_for_eager(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """A boolean mask as the family's eager attention takes it (added to the scores: 0 or dtype's minimum); any
        other mask, or any mask under sdpa, as it is."""
        if (self.config._attn_implementation or "eager") != "eager" or mask is None or mask.dtype != torch.bool:
            return mask
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

    def _values(self, mixed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """z_i = (A_i c)·Bv_g(i) + rowsum(A_i)·bv_g(i): (B, H, T, r_c) and row sums (B, 1 or H, T) -> (B, T, H, hd)."""
        batch, heads, length, _ = mixed.shape
        v_up, v_bias = _linear_map(self.v_up, mixed)  # (G·hd, r_c), (G·hd,) or None
        v_up = v_up.view(self.num_kv_heads, self.head_dim, -1)  # (G, hd, r_c)
        out = (mixed.unflatten(1, (self.num_kv_heads, -1)) @ v_up.mT[:, None]).flatten(1, 2)  # (B, H, T, hd)
        if v_bias is not None:
            per_head = v_bias.view(self.num_kv_heads, 1, -1).expand(-1, heads // self.num_kv_heads, -1)  # (G, H/G, hd)
            out = out + rows.unsqueeze(-1).to(out.dtype) * per_head.reshape(heads, 1, -1)
        return out.transpose(1, 2)

    def _absorbed_attention(self, inputs: RotaryInputs, mask, need_weights: bool, kwargs):
        """Decode: scores q̃·c + q_P·k_P (two GEMMs over the cache as stored), a float32 softmax, A·c, then Bv."""
        latent = inputs.latent
        batch, heads, length, _ = inputs.nope_query.shape
        kv_length = latent.shape[1]
        latent_query = self._latent_query(inputs.nope_query, latent)  # (B, H, T, r_c)
        scores = torch.bmm(latent_query.reshape(batch, heads * length, -1), latent.mT)  # (B, H·T, Tk)
        scores = (scores.view(batch, heads, length, kv_length) + self._rope_scores(inputs)) * self.scaling
        weights = _masked_softmax(scores, self._decode_mask(mask, length, kv_length), latent.dtype)
        weights = self.attn_dropout(weights)  # (B, H, T, Tk)
        mixed = torch.bmm(weights.reshape(batch, heads * length, kv_length), latent).view(batch, heads, length, -1)
        return self._values(mixed, weights.sum(-1)), (weights if need_weights else None)

    def _absorbed_sdpa(self, inputs: RotaryInputs, mask, need_weights: bool, kwargs):
        """Decode: ONE SDPA call over the shared latent (heads folded into the query rows), the scaled rotary scores
        (and the mask) as its additive bias; no weights."""
        latent = inputs.latent
        batch, heads, length, _ = inputs.nope_query.shape
        kv_length = latent.shape[1]
        bias = self._rope_scores(inputs) * self.scaling  # (B, H, T, Tk)
        mask = self._decode_mask(mask, length, kv_length)
        rows = torch.ones(batch, heads, length, dtype=latent.dtype, device=latent.device)
        if mask is not None and mask.dtype == torch.bool:
            bias = bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
            rows = rows * mask.any(-1)  # a query that sees no key gets 0, as stock SDPA gives
        elif mask is not None:
            bias = bias + mask
        query = self._latent_query(inputs.nope_query, latent).reshape(batch, 1, heads * length, -1)  # (B, 1, H·T, r_c)
        keys = latent.unsqueeze(1)  # (B, 1, Tk, r_c)
        mixed = F.scaled_dot_product_attention(query, keys, keys, attn_mask=bias.reshape(batch, 1, heads * length, -1),
                                               scale=self.scaling)  # (B, 1, H·T, r_c)
        mixed = mixed.view(batch, heads, length, -1) * rows.unsqueeze(-1)
        return self._values(mixed, rows), None

    # --- export -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def stock_parts(self) -> dict[str, torch.Tensor]:
        """The canonical per-head stock weights {wq, bq, wk, bk, wv, bv} ((H|G, d, hd), (H|G, hd)) this module computes.

        Exact only when no pair lost its rotation (`exact_export`): the rotary map is then orthogonal and invertible.

        Raises:
            ValueError: some pairs were dropped (their rotation cannot be put back).
        """
        if self.rope == "exact":
            return self._exact_stock_parts()
        if not self.exact_export():
            raise ValueError(
                f"layer {self.layer_idx} keeps {self.rope_pairs} of {self.head_dim // 2} rotary pairs per KV head "
                f"(rope_selection={self.rope_selection!r}): the other pairs' keys lost their rotation, which a stock "
                "rotary model applies to every pair, so no stock attention computes this layer. Export is exact only "
                "for rope_pairs = hd/2; keep the patched model."
            )
        heads, kv_heads, hd, d = self.num_heads, self.num_kv_heads, self.head_dim, self.embed_dim
        maps = self.query_map.detach().double().view(kv_heads, heads // kv_heads, hd, -1)[:, 0]  # (G, hd, 2K)
        rope = self.k_rope.weight.detach().double().view(self.rope_heads, self.rope_width, d)  # (Gk, 2K, d)
        if self.rope_heads == 1:  # RoRoPE: every KV head reads the one rotary key through its block of the mix
            wk = torch.einsum("kfd,ghf->gdh", rope, maps)  # (G, d, hd)
        else:
            wk = torch.einsum("gfd,ghf->gdh", rope, maps)
        bk = None
        if self.k_rope.bias is not None:
            rope_bias = self.k_rope.bias.detach().double().view(self.rope_heads, -1)  # (Gk, 2K)
            if self.rope_heads == 1:
                bk = torch.einsum("f,ghf->gh", rope_bias[0], maps)  # (G, hd)
            else:
                bk = torch.einsum("gf,ghf->gh", rope_bias, maps)
        down = self.latent_proj.weight.detach().double().mT  # (d, r_c)
        wv = down @ self.v_up.weight.detach().double().view(kv_heads, hd, -1).mT  # (G, d, hd)
        dtype = self.q_proj.weight.dtype
        parts = {
            "wq": self.q_proj.weight.detach().view(heads, hd, d).mT, "wk": wk.to(dtype), "wv": wv.to(dtype),
            "bq": None if self.q_proj.bias is None else self.q_proj.bias.detach().view(heads, hd),
            "bk": None if bk is None else bk.to(dtype),
            "bv": None if self.v_up.bias is None else self.v_up.bias.detach().view(kv_heads, hd),
        }
        return parts


def read_rotary_qkv(attn: nn.Module) -> dict[str, torch.Tensor | None]:
    """Canonical per-head weights of a stock rotary attention with q_proj / k_proj / v_proj nn.Linear projections:
    wq (H, d, hd), wk and wv (G, d, hd); bq (H, hd), bk and bv (G, hd), or None where the projection has no bias."""
    parts = {}
    for name in ("q", "k", "v"):
        linear = getattr(attn, f"{name}_proj")
        weight = linear.weight.detach()  # (heads·hd, d)
        parts[f"w{name}"] = weight.view(-1, attn.head_dim, weight.shape[1]).mT  # (heads, d, hd)
        parts[f"b{name}"] = None if linear.bias is None else linear.bias.detach().view(-1, attn.head_dim)
    return parts


@torch.no_grad()
def write_rotary_qkv(attn: nn.Module, parts: dict[str, torch.Tensor | None]) -> None:
    """Inverse of `read_rotary_qkv` (a missing bias must be None where the projection has none)."""
    for name in ("q", "k", "v"):
        linear = getattr(attn, f"{name}_proj")
        linear.weight.copy_(parts[f"w{name}"].mT.reshape(linear.weight.shape))
        bias = parts[f"b{name}"]
        if linear.bias is not None:
            linear.bias.copy_(torch.zeros_like(linear.bias) if bias is None else bias.reshape(-1))
        elif bias is not None and bias.abs().max() > 0:
            raise ValueError(f"{type(attn).__name__}.{name}_proj has no bias to hold a non-zero b{name}.")
