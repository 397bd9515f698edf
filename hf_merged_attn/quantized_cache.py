"""A quantized cache for layers whose values are their keys: the shared latent c, or x with covariance + merged values.

Self-contained (torch and transformers only): it travels next to every checkpoint with the core files.

The latent is one tensor per layer, (B, 1, T, r_c), with no rotary positions: a friendly target for quantization.
`LatentQuantizedCache` keeps the most recent `residual_length` tokens in the model's dtype and stores older ones as
unsigned integers of `nbits` (8, or 4 packed two per byte) with a scale and a minimum per group (asymmetric, as KIVI):

- axis="token": each token's r_c channels in groups of `q_group_size` (per-token scales, as KIVI does for values);
- axis="channel": each channel over groups of `q_group_size` tokens (per-channel scales, as KIVI does for keys; the
  latent is both, so both are offered; the overflow is quantized in whole groups of tokens).

The decode (sdpa) reads the codes block by block (`LatentQuantizedLayer.attend_absorbed`: each block of `block_size`
tokens read where it is used, one pass with an online softmax, the window last) — the absorbed latent, and x of
merged values alike: both attend one cached tensor that is keys and values at once — so no step materialises the
whole cache in full precision; eager attention (which returns the weights) gets the whole cache dequantized. A prefill attends its own tokens in full precision. Bytes per token — integers, scales and minima,
residual window included — come from `LatentQuantizedLayer.stored_tensors`.

    from hf_merged_attn import LatentQuantizedCache
    cache = LatentQuantizedCache(model.config, nbits=8)              # or nbits=4, axis="channel", residual_length=64
    model.generate(ids, past_key_values=cache, max_new_tokens=50)
    use_quantized_latent_cache(model, nbits=4)                       # the default of model.generate, saved with it
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

AXES = ("token", "channel")
BITS = (4, 8)


@dataclass(frozen=True)
class QuantizationSettings:
    """How a latent cache is quantized (what `use_quantized_latent_cache` records in the generation config)."""

    nbits: int = 8
    axis: str = "token"
    q_group_size: int | None = None  # channels per group (token axis; None: all r_c) or tokens per group (channel axis: 32)
    residual_length: int = 128  # the most recent tokens kept in full precision

    def __post_init__(self):
        if isinstance(self.nbits, bool) or self.nbits not in BITS:
            raise ValueError(f"nbits={self.nbits!r} is not supported; allowed: {BITS} (int8, or int4 packed two per "
                             "byte). Pass nbits=8 or nbits=4.")
        if self.axis not in AXES:
            raise ValueError(f"axis={self.axis!r} is not a quantization axis; allowed: {AXES} (scales per token over "
                             "groups of channels, or per channel over groups of tokens).")
        if self.q_group_size is not None and (isinstance(self.q_group_size, bool) or not isinstance(self.q_group_size, int)
                                              or self.q_group_size < 1 or (self.nbits == 4 and self.axis == "token"
                                                                           and self.q_group_size % 2)):
            raise ValueError(f"q_group_size={self.q_group_size!r} must be a positive integer (even for nbits=4 on the "
                             "token axis, where two channels share a byte), or None for the default.")
        if isinstance(self.residual_length, bool) or not isinstance(self.residual_length, int) or self.residual_length < 0:
            raise ValueError(f"residual_length={self.residual_length!r} must be an integer >= 0: the number of most "
                             "recent tokens kept in full precision (0: quantize every token once it is cached).")

    def group(self, width: int) -> int:
        return self.q_group_size or (width if self.axis == "token" else 32)


def quantize(x: torch.Tensor, nbits: int, axis: str, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uniform quantization of x (B, H, T, r) in groups along `axis`.

    Returns:
        q: uint8 (B, H, T, r), or (B, H, T, r/2) with two 4-bit codes per byte (channel 2i in the low nibble);
        scale, minimum: (B, H, T, r/group, 1) for the token axis, (B, H, T/group, 1, r) for the channel axis, in x's dtype.
    """
    batch, heads, length, width = x.shape
    levels = 2**nbits - 1
    if axis == "token":
        grouped = x.float().view(batch, heads, length, width // group, group)  # groups of channels
        low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    else:
        grouped = x.float().view(batch, heads, length // group, group, width)  # groups of tokens
        low, high = grouped.amin(-2, keepdim=True), grouped.amax(-2, keepdim=True)
    scale = ((high - low) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    scale, low = scale.to(x.dtype), low.to(x.dtype)  # stored as the cache stores them: dequantize from these
    codes = ((grouped - low.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8).view(batch, heads, length, width)
    if nbits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # (B, H, T, r/2)
    return codes, scale, low


def dequantize(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, nbits: int, axis: str, group: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize` (up to its rounding): (B, H, T, r) in `dtype`."""
    if nbits == 4:
        codes = torch.stack([codes & 0x0F, codes >> 4], dim=-1).flatten(-2)  # (B, H, T, r)
    batch, heads, length, width = codes.shape
    shape = (batch, heads, length, width // group, group) if axis == "token" else (batch, heads, length // group, group, width)
    return (codes.view(shape).float() * scale.float() + low.float()).to(dtype).view(batch, heads, length, width)


class LatentQuantizedLayer(DynamicLayer):
    """One layer's cache: quantized older tokens, a full-precision window of the newest (see the module doc)."""

    is_compileable = False
    reads_codes = True  # the decode may attend it block by block (`attend_absorbed`)
    block_size = 512  # tokens dequantized at a time by attend_absorbed (rounded up to whole token groups)

    def __init__(self, settings: QuantizationSettings):
        super().__init__()
        self.settings = settings
        self.codes = self.scale = self.low = None  # the quantized part

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if value_states.shape[-1] != 0 or key_states.shape[1] != 1:
            raise ValueError(
                f"LatentQuantizedCache holds layers whose values are their keys, one shared head: the latent "
                f"(patch_model(model, 'latent', rank=r_c)) or covariance with values='merged'. This layer caches keys "
                f"{tuple(key_states.shape)} and values {tuple(value_states.shape)}; patch every layer in one of those "
                "modes, or use the default dynamic cache."
            )
        width, group = key_states.shape[-1], self.settings.group(key_states.shape[-1])
        if self.settings.axis == "token" and width % group:
            raise ValueError(f"q_group_size={group} does not divide the latent width {width}; pass a divisor of {width}.")
        if self.settings.nbits == 4 and width % 2:
            raise ValueError(f"nbits=4 packs two channels per byte, but the latent width {width} is odd; use nbits=8.")
        super().lazy_initialization(key_states, value_states)
        self.group = group

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, read_codes: bool = False, **kwargs):
        """Append (B, 1, T, r) latent tokens; quantize what leaves the window. Returns the whole cache (dequantized
        part + window) as keys, and an empty value slot — or, with read_codes=True (the caller attends through
        `attend_absorbed`), the window alone, nothing dequantized."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)  # the full-precision window
        self.values = self.keys[..., :0]
        overflow = self.keys.shape[-2] - self.settings.residual_length
        if self.settings.axis == "channel":
            overflow -= overflow % self.group  # whole groups of tokens
        if overflow > 0:
            old, self.keys = self.keys[..., :overflow, :], self.keys[..., overflow:, :].contiguous()
            codes, scale, low = quantize(old, self.settings.nbits, self.settings.axis, self.group)
            if self.codes is None:
                self.codes, self.scale, self.low = codes, scale, low
            else:  # dim 2: the token dimension of the codes and of either axis' scales
                self.codes = torch.cat([self.codes, codes], dim=2)
                self.scale = torch.cat([self.scale, scale], dim=2)
                self.low = torch.cat([self.low, low], dim=2)
            self.values = self.keys[..., :0]
        if self.codes is None or read_codes:
            return self.keys, self.values
        # the quantized part is dequantized for this step only: nothing but codes, scales and the window is kept
        restored = dequantize(self.codes, self.scale, self.low, self.settings.nbits, self.settings.axis, self.group,
                              self.keys.dtype)
        keys = torch.cat([restored, self.keys], dim=-2)  # (B, 1, Tk, r_c)
        return keys, keys[..., :0]

    def attend_absorbed(self, query: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """softmax(scale · query · cᵀ + mask) · c over every cached c (the latent, or x), reading the codes in blocks.

        Each block of tokens is read where it is used (a few hundred KB, cache-resident: with one scale and minimum
        per token only converted to float, the affine map moved onto the scores and weights; else dequantized) and
        folded into an online softmax (running maximum and sum, as flash-decoding does), the full-precision window
        last: one pass, and no tensor of the whole cache in full precision. Computed in float32: for an fp32 model
        equal to attending the dequantized cache up to summation order; for bf16 / fp16 models slightly more accurate
        than it (the whole cache path rounds the dequantized latent to the model's dtype first).

        Args:
            query: (B, H, T, r): the absorbed queries q_h Bk_hᵀ of the latent, or covariance's x S_h + u_h.
            mask: boolean (True = attend) or additive float, broadcastable to (B, H, T, Tk), or None (no padding:
                causal over the last T of the Tk keys).
            scale: the score scaling.

        Returns:
            (B, T, H, r) in the query's dtype (what the attention kernels return); a query that sees no key gets 0.
        """
        batch, heads, length, width = query.shape
        total = self.get_seq_length()
        if mask is None and length > 1:
            mask = torch.ones(length, total, dtype=torch.bool, device=query.device).tril_(total - length)
        rows = query.float().reshape(batch, heads * length, width)  # (B, H*T, r): heads folded into the rows
        # one scale and minimum per token (the default): c_t = s_t·q_t + m_t moves onto the scores and the weights,
        # q·c_t = s_t (q·q_t) + m_t Σq and Σ_t a_t c_t = Σ_t (a_t s_t) q_t + Σ_t a_t m_t, so a block is only converted
        # to float; int4 then splits into its even (low nibble) and odd (high nibble) channels, never interleaved
        affine = self.settings.axis == "token" and self.group == width
        split = affine and self.settings.nbits == 4
        halves = (slice(0, None, 2), slice(1, None, 2)) if split else (slice(None),)
        queries = [rows[..., h].contiguous() for h in halves]  # (B, H*T, r or r/2) each
        row_sums = rows.sum(-1, keepdim=True)  # (B, H*T, 1)
        peak = rows.new_full((batch, heads * length, 1), float("-inf"))
        norm = rows.new_zeros(batch, heads * length, 1)
        outs = [rows.new_zeros(q.shape) for q in queries]
        step = self.block_size
        if self.settings.axis == "channel":  # whole groups of tokens per block
            step = -(-step // self.group) * self.group
        quantized = 0 if self.codes is None else self.codes.shape[2]
        blocks = [(start, min(start + step, quantized)) for start in range(0, quantized, step)]
        for start, end in [*blocks, (quantized, total)]:
            if start == end:
                continue
            token_scale = token_low = None
            if start < quantized and affine:
                codes = self.codes[:, 0, start:end]  # (B, Tb, r or r/2) uint8
                values = [codes.float()] if not split else [(codes & 0x0F).float(), (codes >> 4).float()]
                token_scale = self.scale[:, 0, start:end, 0, 0].float().unsqueeze(1)  # (B, 1, Tb)
                token_low = self.low[:, 0, start:end, 0, 0].float().unsqueeze(1)
            else:
                if start < quantized:
                    groups = slice(start // self.group, -(-end // self.group)) if self.settings.axis == "channel" else slice(start, end)
                    latent = dequantize(self.codes[:, :, start:end], self.scale[:, :, groups], self.low[:, :, groups],
                                        self.settings.nbits, self.settings.axis, self.group, torch.float32)
                else:
                    latent = self.keys.float()
                values = [latent[:, 0][..., h] for h in halves]  # (B, Tb, r or r/2) each
            scores = sum(torch.bmm(q, v.mT) for q, v in zip(queries, values))  # (B, H*T, Tb)
            if token_scale is not None:
                scores = scores * token_scale + row_sums * token_low
            scores = scores.mul_(scale)
            if mask is not None:
                part = mask[..., start:end].expand(batch, heads, length, end - start).reshape(batch, heads * length, -1)
                scores = scores.masked_fill_(~part, float("-inf")) if part.dtype == torch.bool else scores + part.float()
            new_peak = torch.maximum(peak, scores.amax(-1, keepdim=True))
            safe = new_peak.masked_fill(new_peak == float("-inf"), 0.0)  # rows with no key seen yet stay at zero
            weights = (scores - safe).exp_()  # (B, H*T, Tb)
            correction = (peak - safe).exp_()
            norm = norm * correction + weights.sum(-1, keepdim=True)
            if token_scale is None:
                outs = [o * correction + torch.bmm(weights, v) for o, v in zip(outs, values)]
            else:
                shift = (weights * token_low).sum(-1, keepdim=True)  # (B, H*T, 1): Σ_t a_t m_t, every channel
                scaled = weights * token_scale
                outs = [o * correction + torch.bmm(scaled, v) + shift for o, v in zip(outs, values)]
            peak = new_peak
        out = outs[0] if not split else torch.stack(outs, dim=-1).flatten(-2)  # (B, H*T, r), channels interleaved back
        out = torch.where(norm > 0, out / norm.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        return out.view(batch, heads, length, width).transpose(1, 2).to(query.dtype)  # (B, T, H, r)

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.shape[-2] + (0 if self.codes is None else self.codes.shape[-2])

    def stored_tensors(self) -> list[torch.Tensor]:
        """What the cache holds for its tokens: codes, scales, minima and the full-precision window."""
        return [t for t in (self.codes, self.scale, self.low, self.keys) if t is not None]

    def _select(self, fn) -> None:
        for name in ("keys", "codes", "scale", "low"):
            if getattr(self, name, None) is not None:
                setattr(self, name, fn(getattr(self, name)))
        if self.keys is not None:
            self.values = self.keys[..., :0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            tokens_to_remove = self.get_seq_length() - tokens_to_remove
        if tokens_to_remove and abs(tokens_to_remove) > self.keys.shape[-2]:
            raise ValueError(f"LatentQuantizedCache can only crop tokens of its full-precision window "
                             f"({self.keys.shape[-2]}); asked to remove {abs(tokens_to_remove)}.")
        if tokens_to_remove:
            self.keys = self.keys[..., : -abs(tokens_to_remove), :]
            self.values = self.keys[..., :0]

    def reset(self) -> None:
        super().reset()
        self.codes = self.scale = self.low = None


class LatentQuantizedCache(Cache):
    """A transformers `Cache` of `LatentQuantizedLayer`s, one per layer of the model (see the module doc).

    Args:
        config: the model's config (its number of layers).
        nbits: 8 or 4. axis: "token" or "channel". q_group_size: channels (token axis) or tokens (channel axis) per
            scale; default all r_c channels / 32 tokens. residual_length: newest tokens kept in full precision.
    """

    def __init__(self, config=None, nbits: int = 8, axis: str = "token", q_group_size: int | None = None,
                 residual_length: int = 128, num_layers: int | None = None):
        self.settings = QuantizationSettings(nbits, axis, q_group_size, residual_length)
        if num_layers is None:
            if config is None:
                raise ValueError("LatentQuantizedCache needs the model's config (or num_layers=...).")
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[LatentQuantizedLayer(self.settings) for _ in range(num_layers)])


GENERATION_FIELD = "merged_attn_cache"  # the generation-config field that makes a quantized latent cache the default


def use_quantized_latent_cache(model, nbits: int = 8, axis: str = "token", q_group_size: int | None = None,
                               residual_length: int = 128):
    """Make `LatentQuantizedCache(nbits, ...)` the default cache of `model.generate` (None: back to the dynamic cache
    when called with nbits=None). Recorded in the generation config, so `save_pretrained` keeps the choice.
    Checks the settings now, and that the model's layers cache one tensor (latent, or covariance + merged values)."""
    from .merged_attention import MergedAttention

    if nbits is None:
        model.generation_config.__dict__.pop(GENERATION_FIELD, None)
        return model
    settings = QuantizationSettings(nbits, axis, q_group_size, residual_length)
    layers = [m for m in model.modules() if isinstance(m, MergedAttention)]
    if any(getattr(m, "rotary", False) for m in layers):
        raise ValueError(
            "use_quantized_latent_cache: this model's layers are rotary latent layers, which cache the rotated rotary "
            "keys beside the latent c; the quantized latent cache holds c alone and does not take them yet. Use the "
            "dynamic or static cache (its size is already c + the kept rotary keys per token)."
        )
    if not layers or any(not m.cache_layout.values_are_keys for m in layers) or (
        len(layers) != model.config.get_text_config(decoder=True).num_hidden_layers
    ):
        raise ValueError(
            "use_quantized_latent_cache needs every layer patched so that it caches one tensor: "
            "patch_model(model, 'latent', rank=r_c) or patch_model(model, 'covariance', values='merged') on all layers. "
            f"{type(model).__name__} has {len(layers)} merged layer(s) of "
            f"{sorted({m.mode + ('+values' if m.values else '') for m in layers}) or 'none'}."
        )
    setattr(model.generation_config, GENERATION_FIELD, asdict(settings))
    # a generation config marked as derived from the model config loads back without extra fields: this one is set
    model.generation_config._from_model_config = False
    return model


class fake_quantized_latent:
    """Context manager: every latent layer's c = x W_c is replaced by its quantize-dequantize round trip (token axis)
    in forward passes — what decoding with
    `LatentQuantizedCache(nbits, axis="token", residual_length=0)` attends, token for token, for every position at
    once. So a perplexity evaluated under it (no cache, sliding windows) is the quantized cache's perplexity.

        with fake_quantized_latent(model, nbits=8):
            evaluate_perplexity(model, tokens)
    """

    def __init__(self, model, nbits: int = 8, q_group_size: int | None = None):
        from .merged_attention import MergedAttention

        self.settings = QuantizationSettings(nbits, "token", q_group_size, 0)
        self.layers = [m for m in model.modules() if isinstance(m, MergedAttention)]
        if not self.layers or any(m.mode != "latent" for m in self.layers):
            raise ValueError("fake_quantized_latent needs latent layers (patch_model(model, 'latent', rank=r_c)): with "
                             "covariance + merged values the cached x is also the query's input, which stays exact.")
        self.handles = []

    def _round_trip(self, tensor: torch.Tensor) -> torch.Tensor:  # (B, T, w)
        group = self.settings.group(tensor.shape[-1])
        x = tensor.unsqueeze(1)  # (B, 1, T, w)
        codes, scale, low = quantize(x, self.settings.nbits, "token", group)
        return dequantize(codes, scale, low, self.settings.nbits, "token", group, tensor.dtype).squeeze(1)

    def __enter__(self):
        for layer in self.layers:
            self.handles.append(layer.latent_proj.register_forward_hook(lambda m, args, out: self._round_trip(out)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
