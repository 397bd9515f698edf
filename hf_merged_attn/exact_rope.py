"""The exact-RoPE latent (MATH.md part five): keys compressed BEFORE rotation together with the values, rotated after.

Self-contained (torch, transformers and the core files beside it): it travels next to every rotary checkpoint.
`RotaryLatentAttention(..., rope="exact")` takes these methods (a mixin); no family is named here.

    c_n = x_n W_c                                   (latent_proj: d -> r_c; the cache holds c)
    k_g,n = R_n (c_n Bk_g + bk_g)                   (k_up: r_c -> G·hd with the stock key bias, then the model's RoPE)
    v_g,n = c_n Bv_g + bv_g                         (v_up: r_c -> G·hd with the stock value bias)
    s_i(m, n) = (R_m q_i,m) · k_g(i),n · hd^-½      (every pair keeps its rotation; queries are stock's)

Nothing but the rank changes the model: at r_c = 2·G·hd it is stock, and at ANY r_c the stock family computes it with
Wk' = W_c Bk, Wv' = W_c Bv (`stock_parts`): a converted checkpoint exports to a plain Llama / Qwen2 / Mistral exactly.

Positions: R_n is the rotation at token n's own position_ids (in a left-padded batch not its cache slot), so the cache
holds, per token and layer, c (r_c numbers) in the key slot and the token's position in the value slot, as base-256
digits in the cache's dtype (1 number in float32, whose integers are exact to 2^24; 3 in bf16 / fp16, exact to 2^24).
Beams, crops (assisted decoding) and sliding windows act on both slots alike, so positions always match their c.

Kernels (attention_kernels.EXACT_ROPE_KERNELS): training and prefill rebuild keys and values of the fresh tokens and run
the family's own attention (masks, GQA, sliding windows); decoding rebuilds the cached keys from c (one GEMM), rotates
them at their cached positions, scores them per KV head, and reads the values through c (A·c, then Bv: r_c wide).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .attention_kernels import EXACT_ROPE_KERNELS, KernelQuery, _masked_softmax, phase_of
from .projections import _hooked

# the rotations of the cached tokens in the current decode step, per cache: {cache: (table key, positions, (cos, sin))}
_STEP_ROTATIONS = WeakIdKeyDictionary()
POSITION_BASE = 256  # digits of a stored position: every integer below 256 is exact in bf16, fp16 and fp32
# RoPE types whose frequencies depend on the sequence length seen so far: stock rotates each key with the frequencies
# of the step that computed it, which a key rebuilt later cannot know.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def position_digits(dtype: torch.dtype) -> int:
    """Numbers a cached position takes in `dtype`: 1 in float32 / float64 (exact to 2^24), else 3 base-256 digits."""
    return 1 if dtype in (torch.float32, torch.float64) else 3


def encode_positions(position_ids: torch.Tensor, digits: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) integer positions -> (B, 1, T, digits) in `dtype` (most significant digit first), as the cache stores."""
    positions = position_ids.long()
    if digits == 1:
        return positions.to(dtype)[:, None, :, None]
    powers = POSITION_BASE ** torch.arange(digits - 1, -1, -1, device=positions.device)  # (digits,)
    return ((positions[..., None] // powers) % POSITION_BASE).to(dtype).unsqueeze(1)  # (B, 1, T, digits)


def decode_positions(stored: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_positions`: (B, 1, Tk, digits) -> (B, Tk) long."""
    digits = stored.shape[-1]
    powers = POSITION_BASE ** torch.arange(digits - 1, -1, -1, device=stored.device)  # (digits,)
    return (stored[:, 0].float().round().long() * powers).sum(-1)


def rope_type_of(config) -> str:
    """The config's RoPE type ("default" when it names none), in transformers 5's `rope_parameters` or the older
    `rope_scaling`."""
    for field in ("rope_parameters", "rope_scaling"):
        settings = getattr(config, field, None)
        if isinstance(settings, dict) and settings.get("rope_type", settings.get("type")):
            return settings.get("rope_type", settings.get("type"))
    return "default"


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in transformers' rotate_half convention, x·cos + rotate_half(x)·sin, on features laid out [first halves of
    the pairs | second halves] (a whole head here; the kept pairs of the partial route in rotary_latent.py)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class ExactRopeLatent:
    """Mixin of `RotaryLatentAttention` for rope="exact" (see the module docstring). Parameters: q_proj (stock),
    latent_proj (d -> r_c, W_cᵀ), k_up (r_c -> G·hd, Bkᵀ and the stock key bias), v_up (r_c -> G·hd, Bvᵀ and the stock
    value bias), o_proj (stock, shared), and `rotary_emb`, the family's own rotary embedding (`rotary_embedding_class`,
    built from the config; nothing of it is saved) that rotates the keys rebuilt from the cache."""

    rotary_embedding_class: type | None = None  # the family's RotaryEmbedding (set by the adapter)

    def _init_exact(self, settings: dict, rank: int, factory: dict) -> None:
        d, kv_heads, hd, bias = (settings[k] for k in ("hidden_size", "num_kv_heads", "head_dim", "qkv_bias"))
        rope_type = rope_type_of(self.config)
        if rope_type in LENGTH_DEPENDENT_ROPE:
            raise ValueError(
                f"rope='exact' rebuilds every cached key and rotates it at decode time, but this model's RoPE type "
                f"{rope_type!r} changes its frequencies with the sequence length, so a rebuilt key would not get the "
                "rotation stock gave it. Use rope='partial' (rope_pairs=...), or a model with a fixed RoPE "
                f"(types other than {', '.join(LENGTH_DEPENDENT_ROPE)})."
            )
        self.rope_pairs, self.rope_selection = hd // 2, None  # every pair keeps its rotation
        self.rope_heads, self.rope_width, self.nope_width = kv_heads, 0, 0
        self.k_rope = None
        self.latent_proj = nn.Linear(d, rank, bias=False, **factory)
        self.k_up = nn.Linear(rank, kv_heads * hd, bias=bias, **factory)
        self.v_up = nn.Linear(rank, kv_heads * hd, bias=bias, **factory)
        self.kernel_table = EXACT_ROPE_KERNELS
        # the family's own rotary embedding rotates the keys rebuilt from the cache. A submodule, so that .to() moves and
        # casts it with the model (its frequencies must stay those the queries are rotated with); its buffers are not
        # saved (non-persistent), and transformers re-initialises a *RotaryEmbedding from the config after an empty init
        self.rotary_emb = self.rotary_embedding_class(self.config)
        if factory.get("device") is not None:
            self.rotary_emb.to(device=factory["device"])

    def _rotary_table(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (B, Tk, hd) at integer `positions` (B, Tk) from the family's rotary embedding (what stock used)."""
        return self.rotary_emb(like, positions)

    def _cached_rotations(self, cache, positions: torch.Tensor, like: torch.Tensor):
        """(cos, sin) (B, Tk, hd) of the cached tokens: computed once per decode step and shared by the layers that
        hold the same positions (every layer of a model without sliding windows), as long as the table is the same
        (dtype, device, rotary settings); under torch.compile always computed (no data-dependent check in a graph)."""
        if torch.compiler.is_compiling() or like.device.type != "cpu":  # on an accelerator the check would sync
            return self._rotary_table(positions, like)
        seen = _STEP_ROTATIONS.get(cache)
        inv_freq = self.rotary_emb.inv_freq  # each layer holds its own copy: compared by value
        key = (like.dtype, inv_freq.dtype, type(self.rotary_emb), getattr(self.rotary_emb, "attention_scaling", None))
        if (seen is not None and seen[0] == key and seen[1].shape == positions.shape and torch.equal(seen[3], inv_freq)
                and torch.equal(seen[1], positions)):
            return seen[2]
        table = self._rotary_table(positions, like)
        _STEP_ROTATIONS[cache] = (key, positions, table, inv_freq)
        return table

    def _attend_exact(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs):
        """Exact-RoPE latent self-attention of `hidden_states` (B, T, d): (output (B, T, d), weights or None)."""
        implementation = self._check_implementation()
        position_ids = kwargs.pop("position_ids", None)
        batch, length = hidden_states.shape[:-1]
        cos, sin = position_embeddings  # (B or 1, T, hd): the model's, used as given
        query = self.q_proj(hidden_states).view(batch, length, self.num_heads, -1).transpose(1, 2)  # (B, H, T, hd)
        query = rotate(query, cos.unsqueeze(1), sin.unsqueeze(1))
        latent = self.latent_proj(hidden_states)  # (B, T, r_c)
        key_cos, key_sin = cos, sin
        phase, buffer = "train", length
        if cache is not None:
            phase = phase_of(cache, self.layer_idx)  # read before the update
            if position_ids is None:
                raise ValueError(
                    f"{type(self).__name__} (rope='exact') caches each token's position and needs position_ids; the "
                    "family's decoder layer passes them (call the model, not the attention module alone, or pass "
                    "position_ids=...)."
                )
            positions = position_ids.expand(batch, length)  # (B, T): one row broadcast to the batch
            stored = encode_positions(positions, position_digits(latent.dtype), latent.dtype)  # (B, 1, T, digits)
            cached_latent, cached_positions = cache.update(latent.unsqueeze(1), stored, self.layer_idx, kwargs=kwargs,
                                                           full_precision_values=True, read_codes=phase != "decode")
            buffer = cached_latent.shape[2]  # a static cache returns its whole buffer
            if phase == "decode":  # rebuild the cached keys at their own positions
                latent = cached_latent[:, 0]  # (B, Tk, r_c)
                key_cos, key_sin = self._cached_rotations(cache, decode_positions(cached_positions), latent)
        if phase != "decode" and attention_mask is not None and attention_mask.shape[-1] > length:
            attention_mask = attention_mask[..., :length]  # a static cache's mask spans its whole buffer
        kernel = self._kernel(KernelQuery(
            implementation, hidden_states.device.type, phase, shared=False, mqa=False, equal_widths=True,
            width=self.head_dim, dropout=self.training and self.attn_dropout.p > 0,
            masked=attention_mask is not None,
        ))
        if phase == "decode" and _hooked(self.v_up):  # hooks on v_up act on the values themselves: expand them
            kernel = EXACT_ROPE_KERNELS["exact_expand"]
        output, weights = kernel.run(self, query, latent, (key_cos, key_sin), attention_mask, kwargs)  # (B, T, H, hd)
        if weights is not None and weights.shape[-1] < buffer:  # a static cache's prefill: stock returns the buffer
            weights = F.pad(weights, (0, buffer - weights.shape[-1]))
        return self.o_proj(output.reshape(batch, length, -1)), weights

    def _rebuilt_keys(self, latent: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor],
                      fast: bool = False) -> torch.Tensor:
        """k = RoPE(c·Bk + bk) per KV head: latent (B, Tk, r_c), cos/sin (B, Tk, hd) -> (B, G, Tk, hd).

        Training and prefill (`fast=False`) rotate as stock does (k·cos + rotate_half(k)·sin: the same rounding). The
        decode (`fast=True`) uses that transformers' tables repeat each pair's angle on both halves (cos = cat(cos_f,
        cos_f)): (k1·cos_f − k2·sin_f, k2·cos_f + k1·sin_f), two fused multiply-adds into one buffer in the GEMM's own
        (B, Tk, G, hd) layout, where rotate_half would copy the keys twice more (these elementwise passes over every
        cached key are most of a CPU decode step)."""
        batch, tokens, _ = latent.shape
        key = self.k_up(latent).view(batch, tokens, self.num_kv_heads, -1)  # (B, Tk, G, hd), contiguous
        if not fast:
            return rotate(key.transpose(1, 2), *(t.unsqueeze(1) for t in angles))  # (B, G, Tk, hd)
        half = key.shape[-1] // 2
        cos, sin = (t[..., :half].unsqueeze(2).to(key.dtype) for t in angles)  # (B, Tk, 1, hd/2)
        first, second = key[..., :half], key[..., half:]
        if torch.compiler.is_compiling() or torch.is_grad_enabled() and key.requires_grad:
            # Dynamo takes no strided out=, autograd no out= at all: the halves joined (one more pass)
            rotated = torch.cat([torch.addcmul(first * cos, second, sin, value=-1),
                                 torch.addcmul(second * cos, first, sin)], dim=-1)
        else:
            rotated = torch.empty_like(key)
            torch.addcmul(first * cos, second, sin, value=-1, out=rotated[..., :half])
            torch.addcmul(second * cos, first, sin, out=rotated[..., half:])
        return rotated.transpose(1, 2)  # (B, G, Tk, hd)

    def _exact_expanded(self, query, latent, angles, mask, kwargs):
        """Keys and values of every token expanded from c, through the family's own attention (any phase)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        batch, tokens, _ = latent.shape
        key = self._rebuilt_keys(latent, angles)  # (B, G, Tk, hd)
        value = self.v_up(latent).view(batch, tokens, self.num_kv_heads, -1).transpose(1, 2)  # (B, G, Tk, hd)
        if mask is None and query.shape[2] > 1 and query.shape[2] < tokens:  # decoding several tokens, no padding
            mask = self._decode_mask(None, query.shape[2], tokens)
        mask = self._additive_for_eager(mask, query.dtype)
        implementation = self.config._attn_implementation or "eager"
        attention = self.eager_attention if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
        return attention(self, query, key, value, mask, dropout=self.attn_dropout.p if self.training else 0.0,
                         scaling=self.scaling, **kwargs)

    def _exact_rebuild(self, query, latent, angles, mask, kwargs):
        """Decode: the cached keys rebuilt (one GEMM) and rotated, scores per KV head, a float32 softmax, then the
        values through c: z_i = (A_i·c)·Bv_g(i) + rowsum(A_i)·bv_g(i). Returns the weights."""
        batch, heads, length, hd = query.shape
        kv_heads, tokens = self.num_kv_heads, latent.shape[1]
        key = self._rebuilt_keys(latent, angles, fast=True)  # (B, G, Tk, hd)
        grouped = query.reshape(batch, kv_heads, -1, hd)  # (B, G, H/G·T, hd): heads of a group in the rows
        scores = (grouped @ key.mT).view(batch, heads, length, tokens) * self.scaling  # (B, H, T, Tk)
        weights = _masked_softmax(scores, self._decode_mask(mask, length, tokens), latent.dtype)
        weights = self.attn_dropout(weights)
        mixed = torch.bmm(weights.reshape(batch, heads * length, tokens), latent).view(batch, heads, length, -1)
        need_weights = (self.config._attn_implementation or "eager") == "eager"
        return self._values(mixed, weights.sum(-1)), (weights if need_weights else None)

    def _exact_rebuild_sdpa(self, query, latent, angles, mask, kwargs):
        """Decode: the rebuilt keys and the latent itself as the value (one view per KV head, no copy) through ONE SDPA
        call with grouped heads; then Bv. No weights."""
        batch, heads, length, _ = query.shape
        key = self._rebuilt_keys(latent, angles, fast=True)  # (B, G, Tk, hd)
        value = latent.unsqueeze(1).expand(-1, self.num_kv_heads, -1, -1)  # (B, G, Tk, r_c): a view
        mask = self._decode_mask(mask, length, latent.shape[1])
        mixed = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=self.scaling,
                                               enable_gqa=True)  # (B, H, T, r_c)
        rows = torch.ones(batch, heads, length, dtype=latent.dtype, device=latent.device)
        if mask is not None and mask.dtype == torch.bool:
            rows = rows * mask.any(-1)  # a query that sees no key gets 0, as stock SDPA gives
            mixed = mixed * rows.unsqueeze(-1)
        return self._values(mixed, rows), None

    @torch.no_grad()
    def _exact_stock_parts(self) -> dict[str, torch.Tensor | None]:
        """{wq, bq, wk, bk, wv, bv} of the stock attention computing this layer at its rank: Wk = W_c·Bk, Wv = W_c·Bv."""
        heads, kv_heads, hd, d = self.num_heads, self.num_kv_heads, self.head_dim, self.embed_dim
        down = self.latent_proj.weight.detach().double().mT  # (d, r_c)
        dtype = self.q_proj.weight.dtype

        def through_latent(up: nn.Linear) -> torch.Tensor:
            return (down @ up.weight.detach().double().view(kv_heads, hd, -1).mT).to(dtype)  # (G, d, hd)

        return {
            "wq": self.q_proj.weight.detach().view(heads, hd, d).mT, "wk": through_latent(self.k_up),
            "wv": through_latent(self.v_up),
            "bq": None if self.q_proj.bias is None else self.q_proj.bias.detach().view(heads, hd),
            "bk": None if self.k_up.bias is None else self.k_up.bias.detach().view(kv_heads, hd),
            "bv": None if self.v_up.bias is None else self.v_up.bias.detach().view(kv_heads, hd),
        }
