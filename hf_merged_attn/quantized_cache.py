"""A quantized cache for layers whose values are their keys: the shared latent c, or x with covariance + merged values.

Self-contained (torch and transformers only): it travels next to every checkpoint with the core files.

The latent is one tensor per layer, (B, 1, T, r_c), with no rotary positions: a friendly target for quantization.
`LatentQuantizedCache` keeps the most recent `residual_length` tokens in the model's dtype and stores older ones as
unsigned integers of `nbits` (8, or 4 packed two per byte) with a scale and a minimum per group (asymmetric, as KIVI):

- axis="token": each token's r_c channels in groups of `q_group_size` (per-token scales, as KIVI does for values);
- axis="channel": each channel over groups of `q_group_size` tokens (per-channel scales, as KIVI does for keys; the
  latent is both, so both are offered; the overflow is quantized in whole groups of tokens).

The decode reads the codes block by block (`LatentQuantizedLayer.attend_absorbed`, the kernel table's
"quantized_blocks": each block of `block_size` tokens read where it is used; sdpa in one pass with an online softmax,
eager keeping the weights it returns) — the absorbed latent, and x of merged values alike: both attend one cached
tensor that is keys and values at once — so no step materialises the whole cache in full precision. A prefill attends
its own tokens in full precision and dequantizes nothing. Bytes per token — integers, scales and minima, residual
window included — come from `LatentQuantizedLayer.stored_tensors`. Rolling back rejected candidates (assisted and
prompt-lookup decoding) is exact: see `LatentQuantizedLayer`. The cache is not compileable: a fullgraph compile of a
forward that uses it is refused at its first call (`COMPILE_REFUSAL`).

Rotary latent layers (Llama, Qwen2, Mistral: `rotary_latent.RotaryLatentAttention`) cache the rotated rotary keys
(B, 1, T, Gk·2K) beside c, in the value slot: those are kept in the model's dtype, never quantized, and every operation
on tokens (crop, reorder, batch selection, reset) acts on them with c. Their decode receives the whole cache with c
dequantized at every step (no block-wise reading of the rotary layout yet).

    from hf_merged_attn import LatentQuantizedCache
    cache = LatentQuantizedCache(model.config, nbits=8)              # or nbits=4, axis="channel", residual_length=64
    model.generate(ids, past_key_values=cache, max_new_tokens=50)
    use_quantized_latent_cache(model, nbits=4)                       # the default of model.generate, saved with it
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from numbers import Integral

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
        if isinstance(self.nbits, bool) or not isinstance(self.nbits, Integral) or int(self.nbits) not in BITS:
            kind = "" if isinstance(self.nbits, Integral) else f" (a {type(self.nbits).__name__}, not an integer)"
            raise ValueError(f"nbits={self.nbits!r}{kind} is not supported; allowed: {BITS} (int8, or int4 packed two "
                             "per byte), as integers. Pass nbits=8 or nbits=4.")
        object.__setattr__(self, "nbits", int(self.nbits))  # a numpy integer is recorded as a plain int
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


def width_problem(settings: QuantizationSettings, width: int) -> str | None:
    """Why `settings` cannot quantize a cached tensor `width` numbers wide, or None if they can."""
    group = settings.group(width)
    if settings.axis == "token" and width % group:
        return f"q_group_size={group} does not divide the latent width {width}; pass a divisor of {width}."
    if settings.nbits == 4 and width % 2:
        return f"nbits=4 packs two channels per byte, but the latent width {width} is odd; use nbits=8."
    return None


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


COMPILE_REFUSAL = (
    "LatentQuantizedCache cannot be compiled with torch.compile(..., fullgraph=True): its codes grow by whole tokens "
    "and are read in a number of blocks that changes with the length, so every decode step would need a new graph "
    "(Dynamo would recompile until its recompile limit). Decode with it uncompiled (generate() does, the cache is not "
    "compileable), or compile the decode with a static cache (cache_implementation='static')."
)


def _not_in_a_graph() -> None:
    """Called while Dynamo traces a quantized cache update: a graph break carrying COMPILE_REFUSAL, which
    fullgraph=True turns into an error at the first compiled call (without fullgraph the update runs eagerly)."""


try:  # the reason shows in Dynamo's error (torch >= 2.7)
    _not_in_a_graph = torch.compiler.disable(_not_in_a_graph, reason=COMPILE_REFUSAL)
except TypeError:
    _not_in_a_graph = torch.compiler.disable(_not_in_a_graph)


class LatentQuantizedLayer(DynamicLayer):
    """One layer's cache: quantized older tokens, a full-precision window of the newest (see the module doc).

    Rolling back (`crop`, as assisted and prompt-lookup decoding do after rejecting candidates): a crop that stays in
    the full-precision window only shortens it. One that reaches into the quantized part needs the tokens that then
    return to the window in full precision: while past recording is on (`activate_past_recording`, which transformers'
    assisted decoding calls on its caches), each update keeps the originals of the tokens it quantizes until the next
    crop, which restores them: the layer is then exactly what it would be had the kept tokens alone been appended
    (quantization of a token, or of a whole group of tokens, depends on those tokens only).
    """

    is_compileable = False
    reads_codes = True  # the decode may attend it block by block (`attend_absorbed`)
    block_size = 512  # tokens dequantized at a time by attend_absorbed (rounded up to whole token groups)

    def __init__(self, settings: QuantizationSettings):
        super().__init__()
        self.settings = settings
        self.codes = self.scale = self.low = None  # the quantized part
        self.record_past = False  # keep the originals of what each update quantizes until the next crop
        self.pending = None  # those originals (B, 1, P, r): the P most recently quantized tokens, in order
        self.carries_values = False  # a rotary latent layer: its values (the rotary keys) kept whole, unquantized

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor,
                            full_precision_values: bool = False) -> None:
        if full_precision_values and value_states.shape[-1] != 0 and key_states.shape[1] == 1:
            self.carries_values = True
            self.reads_codes = False  # attend_absorbed reads c alone: the rotary decode takes the whole cache instead
        elif value_states.shape[-1] != 0 or key_states.shape[1] != 1:
            raise ValueError(
                f"LatentQuantizedCache holds layers whose values are their keys, one shared head: the latent "
                f"(patch_model(model, 'latent', rank=r_c)) or covariance with values='merged'. This layer caches keys "
                f"{tuple(key_states.shape)} and values {tuple(value_states.shape)}; patch every layer in one of those "
                "modes, or use the default dynamic cache."
            )
        problem = width_problem(self.settings, key_states.shape[-1])
        if problem:
            raise ValueError(problem)
        super().lazy_initialization(key_states, value_states)
        self.group = self.settings.group(key_states.shape[-1])

    def activate_past_recording(self, **kwargs) -> None:
        """Keep the originals of the tokens each update quantizes until the next `crop`, so that a crop may take back
        tokens that already left the full-precision window (transformers calls this before assisted decoding; its
        arguments, such as a number of recurrent states, do not apply: a crop may undo whatever came since the last)."""
        self.record_past = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, read_codes: bool = False,
               full_precision_values: bool = False, **kwargs):
        """Append (B, 1, T, r) latent tokens; quantize what leaves the window. Returns the whole cache (dequantized
        part + window) as keys, and an empty value slot — or, with read_codes=True (the caller attends the fresh
        tokens, or the cache through `attend_absorbed`), the window alone, nothing dequantized.

        full_precision_values=True (a rotary latent layer, its rotated rotary keys (B, 1, T, Gk·2K) as values): the
        values are appended whole in their dtype and returned whole, (B, 1, Tk, Gk·2K), beside the keys above. Without
        it, a non-empty value slot is refused (the layer caches two tensors of another kind)."""
        if torch.compiler.is_compiling():
            _not_in_a_graph()  # see COMPILE_REFUSAL
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states, full_precision_values)
        self.keys = torch.cat([self.keys, key_states], dim=-2)  # the full-precision window
        if self.carries_values:
            self.values = torch.cat([self.values, value_states], dim=-2)  # (B, 1, Tk, v): every token, never quantized
        else:
            self.values = self.keys[..., :0]
        overflow = self.keys.shape[-2] - self.settings.residual_length
        if self.settings.axis == "channel":
            overflow -= overflow % self.group  # whole groups of tokens
        if overflow > 0:
            old, self.keys = self.keys[..., :overflow, :], self.keys[..., overflow:, :].contiguous()
            if self.record_past:  # what a crop may take back
                self.pending = old if self.pending is None else torch.cat([self.pending, old], dim=-2)
            codes, scale, low = quantize(old, self.settings.nbits, self.settings.axis, self.group)
            if self.codes is None:
                self.codes, self.scale, self.low = codes, scale, low
            else:  # dim 2: the token dimension of the codes and of either axis' scales
                self.codes = torch.cat([self.codes, codes], dim=2)
                self.scale = torch.cat([self.scale, scale], dim=2)
                self.low = torch.cat([self.low, low], dim=2)
            if not self.carries_values:
                self.values = self.keys[..., :0]
        if self.codes is None or read_codes:
            return self.keys, self.values
        # the quantized part is dequantized for this step only: nothing but codes, scales and the window is kept
        restored = dequantize(self.codes, self.scale, self.low, self.settings.nbits, self.settings.axis, self.group,
                              self.keys.dtype)
        keys = torch.cat([restored, self.keys], dim=-2)  # (B, 1, Tk, r_c)
        return keys, (self.values if self.carries_values else keys[..., :0])

    def _blocks(self) -> list[tuple[int, int]]:
        """(start, end) of the blocks `attend_absorbed` reads: the quantized part in `block_size` tokens (whole groups
        of tokens on the channel axis), then the full-precision window."""
        step = self.block_size
        if self.settings.axis == "channel":  # whole groups of tokens per block
            step = -(-step // self.group) * self.group
        quantized = 0 if self.codes is None else self.codes.shape[2]
        blocks = [(start, min(start + step, quantized)) for start in range(0, quantized, step)]
        return [(start, end) for start, end in [*blocks, (quantized, self.held())] if start < end]

    def _read(self, start: int, end: int, halves: tuple[slice, ...], affine: bool):
        """Tokens start..end as float32 (B, Tb, r or r/2) per channel half, and the per-token scale and minimum
        (B, 1, Tb) still to apply (affine reading of the codes), or None where the block is already dequantized."""
        quantized = 0 if self.codes is None else self.codes.shape[2]
        if start < quantized and affine:
            codes = self.codes[:, 0, start:end]  # (B, Tb, r or r/2) uint8
            split = len(halves) == 2
            values = [codes.float()] if not split else [(codes & 0x0F).float(), (codes >> 4).float()]
            token_scale = self.scale[:, 0, start:end, 0, 0].float().unsqueeze(1)  # (B, 1, Tb)
            token_low = self.low[:, 0, start:end, 0, 0].float().unsqueeze(1)
            return values, token_scale, token_low
        if start < quantized:
            channel = self.settings.axis == "channel"
            groups = slice(start // self.group, -(-end // self.group)) if channel else slice(start, end)
            latent = dequantize(self.codes[:, :, start:end], self.scale[:, :, groups], self.low[:, :, groups],
                                self.settings.nbits, self.settings.axis, self.group, torch.float32)
        else:
            latent = self.keys.float()
        return [latent[:, 0][..., h] for h in halves], None, None

    def attend_absorbed(self, query: torch.Tensor, mask: torch.Tensor | None, scale: float,
                        need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """softmax(scale · query · cᵀ + mask) · c over every cached c (the latent, or x), reading the codes in blocks.

        Each block of tokens is read where it is used (a few hundred KB, cache-resident: with one scale and minimum
        per token only converted to float, the affine map moved onto the scores and weights; else dequantized) and
        folded into an online softmax (running maximum and sum, as flash-decoding does), the full-precision window
        last: one pass, and no tensor of the whole cache in full precision. With `need_weights` (eager attention,
        which returns the weights) the scores of all blocks are kept instead — (B, H, T, Tk), what eager returns —
        and the blocks are read a second time for the weighted sum. Computed in float32: for an fp32 model equal to
        attending the dequantized cache up to summation order; for bf16 / fp16 models slightly more accurate than it
        (the whole cache path rounds the dequantized latent to the model's dtype first).

        Args:
            query: (B, H, T, r): the absorbed queries q_h Bk_hᵀ of the latent, or covariance's x S_h + u_h.
            mask: boolean (True = attend) or additive float, broadcastable to (B, H, T, Tk), or None (no padding:
                causal over the last T of the Tk keys).
            scale: the score scaling.
            need_weights: also return the attention weights.

        Returns:
            The output (B, T, H, r) in the query's dtype (what the attention kernels return; a query that sees no key
            gets 0), and the weights (B, H, T, Tk) in that dtype, or None without `need_weights`.
        """
        batch, heads, length, width = query.shape
        total = self.held()
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

        def scores_of(start, end, values, token_scale, token_low):  # (B, H*T, Tb), scaled and masked
            scores = sum(torch.bmm(q, v.mT) for q, v in zip(queries, values))
            if token_scale is not None:
                scores = scores * token_scale + row_sums * token_low
            scores = scores.mul_(scale)
            if mask is not None:
                part = mask[..., start:end].expand(batch, heads, length, end - start).reshape(batch, heads * length, -1)
                scores = scores.masked_fill_(~part, float("-inf")) if part.dtype == torch.bool else scores + part.float()
            return scores

        def fold(outs, weights, values, token_scale, token_low):  # outs + weights · (block), per channel half
            if token_scale is None:
                return [o + torch.bmm(weights, v) for o, v in zip(outs, values)]
            shift = (weights * token_low).sum(-1, keepdim=True)  # (B, H*T, 1): Σ_t a_t m_t, every channel
            scaled = weights * token_scale
            return [o + torch.bmm(scaled, v) + shift for o, v in zip(outs, values)]

        outs = [rows.new_zeros(q.shape) for q in queries]
        blocks = self._blocks()
        if need_weights:  # every block's scores, one softmax, then the blocks again for the weighted sum
            scores = torch.cat([scores_of(s, e, *self._read(s, e, halves, affine)) for s, e in blocks], dim=-1)
            peak = scores.amax(-1, keepdim=True)
            weights = (scores - peak.masked_fill(peak == float("-inf"), 0.0)).exp_()  # (B, H*T, Tk)
            norm = weights.sum(-1, keepdim=True)
            weights = torch.where(norm > 0, weights / norm.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
            for start, end in blocks:
                outs = fold(outs, weights[..., start:end], *self._read(start, end, halves, affine))
            norm = None
        else:
            peak = rows.new_full((batch, heads * length, 1), float("-inf"))
            norm = rows.new_zeros(batch, heads * length, 1)
            for start, end in blocks:
                values, token_scale, token_low = self._read(start, end, halves, affine)
                scores = scores_of(start, end, values, token_scale, token_low)
                new_peak = torch.maximum(peak, scores.amax(-1, keepdim=True))
                safe = new_peak.masked_fill(new_peak == float("-inf"), 0.0)  # rows with no key seen yet stay at zero
                block_weights = (scores - safe).exp_()  # (B, H*T, Tb)
                correction = (peak - safe).exp_()
                norm = norm * correction + block_weights.sum(-1, keepdim=True)
                outs = fold([o * correction for o in outs], block_weights, values, token_scale, token_low)
                peak = new_peak
        out = outs[0] if not split else torch.stack(outs, dim=-1).flatten(-2)  # (B, H*T, r), channels interleaved back
        if norm is not None:
            out = torch.where(norm > 0, out / norm.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        out = out.view(batch, heads, length, width).transpose(1, 2).to(query.dtype)  # (B, T, H, r)
        if not need_weights:
            return out, None
        return out, weights.view(batch, heads, length, total).to(query.dtype)

    def held(self) -> int:
        """Tokens this layer holds (quantized + full-precision window)."""
        if not self.is_initialized:
            return 0
        return self.keys.shape[-2] + (0 if self.codes is None else self.codes.shape[-2])

    def get_seq_length(self) -> int:
        return self.held()

    def stored_tensors(self) -> list[torch.Tensor]:
        """What the cache holds for its tokens: codes, scales, minima and the full-precision window (and, while past
        recording is on, the originals of what was quantized since the last crop), and a rotary layer's values (its
        rotary keys, every token in the model's dtype)."""
        values = self.values if self.carries_values else None
        return [t for t in (self.codes, self.scale, self.low, self.keys, self.pending, values) if t is not None]

    def _select(self, fn) -> None:
        for name in ("keys", "codes", "scale", "low", "pending") + (("values",) if self.carries_values else ()):
            if getattr(self, name, None) is not None:
                setattr(self, name, fn(getattr(self, name)))
        if self.keys is not None and not self.carries_values:
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

    def _quantized_count(self, length: int) -> int:
        """How many of `length` tokens this layer holds quantized: all but the newest `residual_length` (in whole
        groups of tokens on the channel axis)."""
        overflow = max(0, length - self.settings.residual_length)
        return overflow - overflow % self.group if self.settings.axis == "channel" else overflow

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest `-tokens_to_remove` tokens (a count <= 0, as transformers' cache layers take it; more than
        the cache holds removes all; nothing on a layer that holds none). A positive value is refused, as
        transformers' DynamicLayer refuses it. Tokens that return to the full-precision window come back from what
        past recording kept (see the class doc); a crop also ends that recording period. Without their originals, a
        crop within the window only shortens it (the quantized tokens stay as they are, and the window refills before
        anything more is quantized), and one that would remove quantized tokens is refused, saying what to change."""
        if isinstance(tokens_to_remove, torch.Tensor) and tokens_to_remove.numel() == 1 and not (
                tokens_to_remove.is_floating_point() or tokens_to_remove.dtype == torch.bool):
            tokens_to_remove = int(tokens_to_remove)  # transformers 5.17's assisted decoding passes a 0-d tensor
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, Integral) or tokens_to_remove > 0:
            raise ValueError(
                f"LatentQuantizedCache.crop({tokens_to_remove!r}): pass the number of newest tokens to remove as a "
                "negative integer (crop(-n); crop(0) removes none), as transformers' cache layers take it. A positive "
                "value (the length to keep, an old convention) is not supported: pass crop(length - cache length)."
            )
        pending, self.pending = self.pending, None
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        total = self.held()
        length = max(0, total - abs(int(tokens_to_remove)))
        quantized = 0 if self.codes is None else self.codes.shape[2]
        kept = min(self._quantized_count(length), quantized)  # of the `length` tokens left, those held quantized
        back = min(length, quantized) - kept  # quantized tokens that return to the full-precision window
        first = quantized - (0 if pending is None else pending.shape[-2])  # the oldest token whose original is kept
        if back > 0 and kept < first:  # some originals are gone
            if length < quantized:
                removable = max(total - quantized, total - first - self.settings.residual_length)
                raise ValueError(
                    f"LatentQuantizedCache.crop({tokens_to_remove}) would remove quantized tokens and leave {length} of "
                    f"{total}, whose newest {length - kept} belong in full precision (residual_length="
                    f"{self.settings.residual_length}); {min(back, first - kept)} of them are quantized and their "
                    f"originals were not kept: at most {removable} token(s), or all {total}, can be removed now. Call "
                    "cache.activate_past_recording() before the updates a crop may undo (transformers' assisted and "
                    "prompt-lookup decoding do), or use a larger residual_length."
                )
            kept, back = quantized, 0  # within the window: what would return to it stays quantized until it refills
        if back > 0:
            self.keys = torch.cat([pending[..., kept - first : kept - first + back, :], self.keys], dim=-2)
        if kept < quantized:
            groups = kept // self.group if self.settings.axis == "channel" else kept
            self.codes, self.scale, self.low = (t[:, :, :n] for t, n in ((self.codes, kept), (self.scale, groups),
                                                                          (self.low, groups)))
            if kept == 0:
                self.codes = self.scale = self.low = None
        self.keys = self.keys[..., : length - kept, :]
        # a rotary layer's values (never quantized) keep their first `length` tokens
        self.values = self.values[..., :length, :] if self.carries_values else self.keys[..., :0]

    def reset(self) -> None:
        """Drop every token: the layer is empty and uninitialised again (transformers 5.17's DynamicLayer.reset
        would only zero the window in place, and the next update would append to those zeros)."""
        self.keys = self.values = None
        self.is_initialized = False
        self.codes = self.scale = self.low = self.pending = None
        self.carries_values = False
        self.__dict__.pop("reads_codes", None)  # the next update decides again


class SlidingLatentQuantizedLayer(LatentQuantizedLayer):
    """A `LatentQuantizedLayer` for a sliding-window attention layer (Mistral; Qwen2's sliding layers): it holds only
    the newest `sliding_window - 1` tokens between steps, as transformers' `DynamicSlidingWindowLayer` does — the oldest
    dropped from the quantized part first (whole groups of tokens on the channel axis, so a few more may stay), then
    from the window. The mask sees the held tokens at their absolute positions (`get_mask_sizes`' offset), so anything
    held beyond the window is still masked. While past recording is on nothing is dropped until the next crop."""

    is_sliding = True

    def __init__(self, settings: QuantizationSettings, sliding_window: int):
        super().__init__(settings)
        self.sliding_window = int(sliding_window)
        self.dropped = 0  # tokens dropped from the front: the absolute position of the first held token

    def get_seq_length(self) -> int:
        """Every token seen (what positions count from), as the sliding layers of transformers report."""
        return self.dropped + self.held()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.held() + query_length, self.dropped

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)  # what this step attends
        if not self.record_past:
            self._slide()
        return keys, values

    def crop(self, tokens_to_remove) -> None:
        """As `LatentQuantizedLayer.crop`; refused when tokens already left the window without past recording (they
        cannot come back: the layer would silently attend fewer than its window), as transformers' sliding layers do."""
        removes = not isinstance(tokens_to_remove, (int, torch.Tensor)) or int(tokens_to_remove) != 0
        if removes and self.dropped and not self.record_past:
            raise ValueError(
                f"LatentQuantizedCache.crop({tokens_to_remove!r}) on a sliding-window layer (window "
                f"{self.sliding_window}) that already dropped {self.dropped} tokens: they cannot return to the window. "
                "Call cache.activate_past_recording() before the updates a crop may undo (transformers' assisted and "
                "prompt-lookup decoding do)."
            )
        super().crop(tokens_to_remove)
        self._slide()

    def _slide(self) -> None:
        """Drop the oldest held tokens beyond the newest `sliding_window - 1`."""
        excess = self.held() - (self.sliding_window - 1)
        if excess <= 0:
            return
        quantized = 0 if self.codes is None else self.codes.shape[2]
        from_codes = min(excess, quantized)
        if self.settings.axis == "channel":
            from_codes -= from_codes % self.group  # whole groups of tokens only
        if from_codes:
            groups = from_codes // self.group if self.settings.axis == "channel" else from_codes
            self.codes, self.scale, self.low = (t[:, :, n:] for t, n in ((self.codes, from_codes),
                                                                          (self.scale, groups), (self.low, groups)))
            if self.codes.shape[2] == 0:
                self.codes = self.scale = self.low = None
        from_window = excess - from_codes if from_codes == quantized else 0
        self.keys = self.keys[..., from_window:, :]
        dropped = from_codes + from_window
        if self.carries_values:
            self.values = self.values[..., dropped:, :]
        else:
            self.values = self.keys[..., :0]
        self.dropped += dropped

    def reset(self) -> None:
        super().reset()
        self.dropped = 0


def _sliding_windows(config, num_layers: int) -> list[int | None]:
    """Each layer's sliding window (None: full attention), from `layer_types` where the config has it, else
    `sliding_window` for every layer (Mistral)."""
    if config is None:
        return [None] * num_layers
    text = config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if not window:
        return [None] * num_layers
    if layer_types is None:
        return [window] * num_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types[:num_layers]]


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
        super().__init__(layers=[
            LatentQuantizedLayer(self.settings) if window is None else SlidingLatentQuantizedLayer(self.settings, window)
            for window in _sliding_windows(config, num_layers)
        ])


GENERATION_FIELD = "merged_attn_cache"  # the generation-config field that makes a quantized latent cache the default


def cache_problem(model, settings: QuantizationSettings, subject: str = "LatentQuantizedCache") -> str | None:
    """Why `model` cannot decode with `LatentQuantizedCache` under `settings` (a sentence starting with `subject`), or
    None if it can: every layer must cache one tensor (the latent, or covariance + merged values) of a width the
    settings can quantize, or be a rotary latent layer (c quantized, its rotary keys kept in the model's dtype)."""
    from .merged_attention import MergedAttention

    layers = [m for m in model.modules() if isinstance(m, MergedAttention)]
    if not layers or any(not (m.cache_layout.values_are_keys or getattr(m, "rotary", False)) for m in layers) or (
        len(layers) != model.config.get_text_config(decoder=True).num_hidden_layers
    ):
        return (
            f"{subject} needs every layer patched so that it caches one tensor: "
            "patch_model(model, 'latent', rank=r_c) or patch_model(model, 'covariance', values='merged') on all layers "
            "(on rotary families, the latent with its kept rotary keys). "
            f"{type(model).__name__} has {len(layers)} merged layer(s) of "
            f"{sorted({m.mode + ('+values' if m.values else '') for m in layers}) or 'none'}."
        )
    for width in sorted({m.cache_layout.key_width for m in layers}):
        problem = width_problem(settings, width)
        if problem:
            return f"{subject}: {problem}"
    return None


def use_quantized_latent_cache(model, nbits: int = 8, axis: str = "token", q_group_size: int | None = None,
                               residual_length: int = 128):
    """Make `LatentQuantizedCache(nbits, ...)` the default cache of `model.generate` (None: back to the dynamic cache
    when called with nbits=None). Recorded in the generation config, so `save_pretrained` keeps the choice; a cache or
    a `cache_implementation` given to generate() (or set in a generation config) still wins. `unpatch_model` removes
    the choice, and `patch_model` drops it (with a warning) where the new patch cannot use it. Checks the settings
    now, and that the model's layers cache one tensor (latent, or covariance + merged values) of a width they fit."""
    if nbits is None:
        model.generation_config.__dict__.pop(GENERATION_FIELD, None)
        return model
    settings = QuantizationSettings(nbits, axis, q_group_size, residual_length)
    problem = cache_problem(model, settings, "use_quantized_latent_cache")
    if problem:
        raise ValueError(problem)
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
