"""What a merged attention layer caches, which phase a call is in, and the table of kernels that compute it.

Self-contained (torch and transformers only): it travels next to every checkpoint with `merged_attention.py`.

- `CacheLayout`: per layer, the key and value tensors the cache holds — heads × width, or "values are the keys"
  (width 0). transformers' cache layers (dynamic and static) hold keys and values with ONE head count; where one
  side is shared by all heads (1 head) and the other is per head, the per-head side is stored packed as one head
  of H·w numbers — `(B, 1, T, H·w)`, exactly the projection's output, no copy — and unpacked as a view. The static
  cache is then pre-allocated from the layout and holds only what the mode caches; bytes per token follow from it.
- The phase of a call comes from the cache's state, never from shapes: "train" (no cache), "prefill" (a cache that
  held no token of this layer) or "decode" (it held some). A static cache's buffer is always longer than the prompt,
  so shapes would mistake its prefill for decoding.
- `KERNELS`: each (score form × phase × backend) is a named kernel with a `fits` test (what it can compute) and a
  `prefers` test (where it is the fastest measured choice). A layer resolves its kernel once per (implementation,
  device, phase, shape class) and re-resolves when one changes (`set_attn_implementation`, `.to()`). A new kernel
  is one entry in the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary

PHASES = ("train", "prefill", "decode")


@dataclass(frozen=True)
class CacheLayout:
    """What one layer caches per token: keys (key_heads × key_width) and values (value_heads × value_width; width 0
    when the values are the keys, as for the latent and covariance with merged values)."""

    key_heads: int
    key_width: int
    value_heads: int
    value_width: int

    @property
    def values_are_keys(self) -> bool:
        return self.value_width == 0

    @property
    def packed(self) -> bool:
        """One side shared by all heads, the other per head: the per-head side is stored as one head of H·w."""
        return not self.values_are_keys and self.key_heads != self.value_heads

    def stored_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((heads, width) of the key buffer, (heads, width) of the value buffer) as the cache holds them."""
        key, value = (self.key_heads, self.key_width), (self.value_heads, self.value_width)
        if self.values_are_keys:
            return key, (self.key_heads, 0)
        if self.packed:
            return (1, key[0] * key[1]), (1, value[0] * value[1])
        return key, value

    def numbers_per_token(self) -> int:
        """Numbers this layer caches per token (x 2 bytes in bf16/fp16); stock caches 2·d."""
        return self.key_heads * self.key_width + self.value_heads * self.value_width

    def stored(self, tensor: torch.Tensor, heads: int) -> torch.Tensor:
        """A (B, T, heads·w) projection output as the cache stores it: (B, 1, T, heads·w) packed, else (B, heads, T, w)."""
        if heads == 1 or self.packed:
            return tensor.unsqueeze(1)  # (B, 1, T, heads·w): a view
        batch, length, _ = tensor.shape
        return tensor.view(batch, length, heads, -1).transpose(1, 2)  # (B, heads, T, w)

    @staticmethod
    def unpacked(tensor: torch.Tensor, heads: int) -> torch.Tensor:
        """Inverse of `stored` for a packed side: (B, 1, Tk, heads·w) -> (B, heads, Tk, w), a view."""
        if heads == 1 or tensor.shape[1] == heads:
            return tensor
        batch, _, length, _ = tensor.shape
        return tensor.view(batch, length, heads, -1).transpose(1, 2)


# The phase a static cache's length gave in the current forward: {cache: (layer index, phase, version, length)}
_STATIC_PHASES = WeakIdKeyDictionary()


def phase_of(cache, layer_idx: int) -> str:
    """"train" without a cache, "prefill" when the cache holds no token of this layer yet, "decode" when it does.

    Read before the layer's update. A static layer's length is a tensor: under torch.compile (where transformers runs
    only decode steps; prefill runs eagerly) an initialised static layer counts as holding tokens, so no value is
    read and nothing recompiles. In eager mode reading it is a device-to-host sync, so it is read once per forward:
    by the first merged layer that runs, whose phase the later layers of the same forward take (`_shared_phase`).
    Either answer is exact — the phase only picks the kernel and whether fresh or cached keys are attended.
    """
    if cache is None:
        return "train"
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return "prefill"
    layer = layers[layer_idx]
    if not getattr(layer, "is_initialized", False):
        return "prefill"
    if getattr(layer, "is_compileable", False) and torch.compiler.is_compiling():
        return "decode"
    length = layer.get_seq_length()
    if not isinstance(length, torch.Tensor):  # a Python int (dynamic layers): nothing to synchronise
        return "decode" if length > 0 else "prefill"
    return _shared_phase(cache, layer_idx, length)


def _shared_phase(cache, layer_idx: int, length: torch.Tensor) -> str:
    """The phase from a static layer's length tensor, read once per forward.

    The layers of a forward run in order, each updating its cache (one in-place addition to its length) after reading
    its phase. A layer takes the phase an earlier layer recorded when that layer has been updated exactly once since
    and this one not yet: the recorded length's version counter (a host-side number: no sync) moved by one, and this
    layer's equals the recorded one. Anything else — the first merged layer of a forward, a layer called on its own, a
    cache cropped or reset between layers, a cache whose lengths are not updated in place — reads its own length.
    """
    version, recorded = length._version, _STATIC_PHASES.get(cache)
    if recorded is not None:
        index, phase, recorded_version, recorded_length = recorded
        if index < layer_idx and version == recorded_version and recorded_length._version == recorded_version + 1:
            return phase
    phase = "decode" if int(length) > 0 else "prefill"
    _STATIC_PHASES[cache] = (layer_idx, phase, version, length)
    return phase


@dataclass(frozen=True)
class KernelQuery:
    """What a kernel choice depends on (hashable: the resolution is memoised per module on it)."""

    implementation: str  # "eager" or "sdpa"
    device: str  # "cpu", "cuda", ...
    phase: str
    shared: bool  # the key or the value has one head shared by all heads
    mqa: bool  # key and value are both one shared head (the absorbed latent; covariance + merged values)
    equal_widths: bool  # query/key width == value width
    width: int  # query/key width
    dropout: bool  # attention dropout acts (training with p > 0)
    masked: bool  # an attention mask is given (padding, a static cache's unwritten slots; ALiBi comes as one)
    codes: bool = False  # the cache can be attended from its codes (a quantized cache of one tensor, read in blocks)


@dataclass(frozen=True)
class Kernel:
    """A named attention kernel: `run(module, query, key, value, mask, causal, need_weights, kwargs)` returns the
    output (B, T, H, v) and the weights or None. A kernel that `reads_codes` gets the cache layer holding the codes
    as its key and value (the layer's update then returns its full-precision window alone, nothing dequantized)."""

    name: str
    fits: Callable[[KernelQuery], bool]
    prefers: Callable[[KernelQuery], bool]
    run: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    reads_codes: bool = False


def _eager(module, query, key, value, mask, causal, need_weights, kwargs):
    return module._eager_attention(query, key, value, mask)


def _blocks(module, query, key, value, mask, causal, need_weights, kwargs):
    """The module's blocked kernel without weights (a shared key in one GEMM per block of queries; per-head keys too)."""
    return module._eager_attention(query, key, value, mask, causal=causal, need_weights=False)


def _zero_hidden_rows(output: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A query whose boolean mask hides every key gets 0, as stock SDPA gives (output (B, H or 1, T, v))."""
    if mask is not None and mask.dtype == torch.bool:
        return output.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return output


def _quantized_blocks(module, query, layer, value, mask, causal, need_weights, kwargs):
    """A quantized cache of one tensor (`LatentQuantizedLayer`, passed as the key) read block by block, in one pass
    with an online softmax, or with the weights that eager returns (`attend_absorbed`)."""
    return layer.attend_absorbed(query, mask, module.scaling, need_weights=need_weights)


def _sdpa_gqa(module, query, key, value, mask, causal, need_weights, kwargs):
    """ONE SDPA call with one key/value head for all query heads (`enable_gqa`; no mask): flash kernels read the
    shared head once for every query head. The stock scale (hd^-½, not the width's)."""
    output = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=module.scaling,
                                            enable_gqa=True)  # (B, H, T, v)
    return output.transpose(1, 2), None


def _sdpa_folded(module, query, key, value, mask, causal, need_weights, kwargs):
    """ONE single-head SDPA call with the heads folded into the query rows (row t·H + h): the shared key/value is
    read once per sequence for all heads, and a mask (padding, a static cache's unwritten slots) is taken by the
    fused memory-efficient kernel — where SDPA's GQA path with a mask falls back to copying the cache per head."""
    batch, heads, length, width = query.shape
    rows = query.transpose(1, 2).reshape(batch, 1, length * heads, width)  # (B, 1, T·H, w)
    if causal:  # the fresh tokens' causal mask, per row t·H + h
        mask = torch.ones(length, key.shape[2], dtype=torch.bool, device=query.device).tril_()[None, None]
    if mask is not None:  # (B, 1 or H, T, Tk) -> (B, 1, T·H, Tk)
        mask = mask.expand(-1, heads, length, -1).transpose(1, 2).reshape(mask.shape[0], 1, length * heads, -1)
    dropout = module.attn_dropout.p if module.training else 0.0
    output = F.scaled_dot_product_attention(rows, key, value, attn_mask=mask, dropout_p=dropout, scale=module.scaling)
    output = _zero_hidden_rows(output, mask)  # (B, 1, T·H, v)
    return output.view(batch, length, heads, -1), None


def _sdpa_expand(module, query, key, value, mask, causal, need_weights, kwargs):
    """SDPA over a head-shared key or value expanded to every head as a stride-0 view (no copy): covariance's d-wide
    shared key with per-head values in one fused call (the memory-efficient kernel takes q/k and v of unequal widths,
    masks and dropout), instead of blocks of 64 queries with a float32 softmax and recomputation."""
    heads = query.shape[1]
    key, value = key.expand(-1, heads, -1, -1), value.expand(-1, heads, -1, -1)  # views: (B, H, Tk, .)
    dropout = module.attn_dropout.p if module.training else 0.0
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, dropout_p=dropout,
                                            scale=module.scaling)
    return _zero_hidden_rows(output, mask).transpose(1, 2), None


def _sdpa(module, query, key, value, mask, causal, need_weights, kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if query.shape[-1] < value.shape[-1]:
        # lowrank r < hd: zero-pad q and k to hd (q·k is unchanged, the cache keeps r) so that SDPA can use a fused
        # kernel (CPU flash attention needs equal q/k and v head sizes) instead of its math fallback
        pad = value.shape[-1] - query.shape[-1]
        query, key = F.pad(query, (0, pad)), F.pad(key, (0, pad))
    return ALL_ATTENTION_FUNCTIONS["sdpa"](
        module, query, key, value, mask, dropout=module.attn_dropout.p if module.training else 0.0,
        scaling=module.scaling, **kwargs,
    )


# In order of preference; the first kernel that fits and prefers the query wins, else the first that fits.
KERNELS: dict[str, Kernel] = {k.name: k for k in (
    # a quantized cache of the latent or of x (merged values), decoding: its codes read in blocks, never the whole cache
    # dequantized (eager or sdpa; attention dropout goes to the kernels below, over the dequantized cache). Any other
    # kernel that fits a forced choice reads the whole cache dequantized instead.
    Kernel("quantized_blocks", fits=lambda q: q.codes and q.phase == "decode" and not q.dropout,
           prefers=lambda q: True, run=_quantized_blocks, reads_codes=True),
    # eager: stock's eager math (weights returned, GPT-2's reorder_and_upcast_attn); a shared key in one GEMM
    Kernel("eager", fits=lambda q: q.implementation == "eager", prefers=lambda q: True, run=_eager),
    # On GPUs (fused kernels; measured choices are for `benchmarks/gpu.sh` to confirm): one KV head shared by all
    # query heads without a mask (the absorbed latent, covariance + merged values; flash caps the width at 256) ...
    Kernel("sdpa_gqa", fits=lambda q: q.implementation == "sdpa" and q.mqa and q.equal_widths and not q.masked
           and not q.dropout and q.width <= 256, prefers=lambda q: q.device != "cpu", run=_sdpa_gqa),
    # ... with a mask, or over a long fresh sequence: the heads folded into the query rows of one head
    Kernel("sdpa_folded", fits=lambda q: q.implementation == "sdpa" and q.mqa,
           prefers=lambda q: q.device != "cpu", run=_sdpa_folded),
    # a shared key with per-head values (covariance training and prefill): the shared side expanded as a view
    Kernel("sdpa_expand", fits=lambda q: q.implementation == "sdpa" and q.shared,
           prefers=lambda q: q.device != "cpu", run=_sdpa_expand),
    # a head-shared key or value: one GEMM per block of 64 queries with the heads folded into the rows, causal blocks
    # skipped, scores recomputed in backward
    Kernel("shared_blocks", fits=lambda q: q.shared, prefers=lambda q: True, run=_blocks),
    # per-head keys and values of one width: transformers' SDPA attention
    Kernel("sdpa", fits=lambda q: q.implementation == "sdpa" and not q.shared and (q.equal_widths or q.phase != "decode"),
           prefers=lambda q: True, run=_sdpa),
    # per-head keys and values of unequal widths decoding one token: SDPA would scale a copy of the whole cache
    Kernel("per_head_blocks", fits=lambda q: not q.shared, prefers=lambda q: True, run=_blocks),
)}


# Rotary latent layers (rotary_latent.py): run(module, inputs, mask, need_weights, kwargs) on `RotaryInputs`. Training and
# prefill expand the latent to per-group keys and values and run the family's own attention (stock's GQA, masks,
# sliding windows); decoding attends the cache in the absorbed order: one score over the shared latent c plus one over
# the small rotary key, one softmax, values from A·c.
ROTARY_KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("rotary_expand", fits=lambda q: q.phase != "decode", prefers=lambda q: True,
           run=lambda module, *args: module._expanded_attention(*args)),
    # the rotary scores as an additive mask of ONE SDPA call over the shared latent (heads folded into query rows)
    Kernel("rotary_absorbed_sdpa", fits=lambda q: q.phase == "decode" and q.implementation == "sdpa" and not q.dropout,
           prefers=lambda q: q.device != "cpu", run=lambda module, *args: module._absorbed_sdpa(*args)),
    # two score GEMMs (latent, rotary key), a float32 softmax, A·c: returns the weights; exact row sums under dropout
    Kernel("rotary_absorbed", fits=lambda q: q.phase == "decode", prefers=lambda q: True,
           run=lambda module, *args: module._absorbed_attention(*args)),
)}


# Exact-RoPE latent layers (exact_rope.py, rope="exact"): run(module, query, latent, (cos, sin), mask, kwargs) with the
# rotated queries (B, H, T, hd), the latent of the attended tokens (B, Tk, r_c) and their rotations (B, Tk, hd).
# Training and prefill expand keys and values and run the family's own attention; decoding rebuilds the cached keys from
# c (one GEMM), rotates them and reads the values through c.
EXACT_ROPE_KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("exact_expand", fits=lambda q: True, prefers=lambda q: q.phase != "decode",
           run=lambda module, *args: module._exact_expanded(*args)),
    # one SDPA call over the rebuilt keys with c itself as the value (grouped heads), then Bv: no weights
    Kernel("exact_rebuild_sdpa", fits=lambda q: q.phase == "decode" and q.implementation == "sdpa" and not q.dropout,
           prefers=lambda q: q.device != "cpu", run=lambda module, *args: module._exact_rebuild_sdpa(*args)),
    # scores per KV head over the rebuilt keys, a float32 softmax, A·c then Bv: returns the weights under eager
    Kernel("exact_rebuild", fits=lambda q: q.phase == "decode", prefers=lambda q: True,
           run=lambda module, *args: module._exact_rebuild(*args)),
)}

def resolve_kernel(query: KernelQuery, forced: str | None = None, table: dict[str, Kernel] | None = None) -> Kernel:
    """The kernel for `query` from `table` (default KERNELS): `forced` (a name in the table, checked to fit), else the
    first that fits and prefers it, else the first that fits."""
    table = KERNELS if table is None else table
    if forced is not None:
        kernel = table.get(forced)
        if kernel is None or not kernel.fits(query):
            fitting = [k.name for k in table.values() if k.fits(query)]
            raise ValueError(
                f"kernel {forced!r} cannot compute this attention ({query}); kernels that can: {fitting}. "
                f"Known kernels for this layer: {list(table)}."
            )
        return kernel
    fitting = [k for k in table.values() if k.fits(query)]
    return next((k for k in fitting if k.prefers(query)), fitting[0])


# --- the tensor helpers the kernels and the merged modules share -------------------------------------------------


def _row_sums(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The row sums of the attention weights implied by a mask, (B, T, 1 or H), or None where every row sums to 1.

    Only a boolean (SDPA-style) mask can hide every key of a query; SDPA (and this module's kernels) then give that
    query all-zero weights. An additive float mask (eager) leaves a softmax that sums to 1 in every row.
    """
    if mask is None or mask.dtype != torch.bool:
        return None
    return mask.any(dim=-1).transpose(1, 2)  # (B, 1 or H, T) -> (B, T, 1 or H)


def _weighted_values(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A·V as (B, T, H, v) for weights (B, H, T, Tk) and per-head values (B, H, Tk, v) or ONE head-shared value
    (B, 1, Tk, v) — merged values, the absorbed latent. The shared one goes through one bmm with the heads folded
    into the rows: a broadcast matmul would copy the value to every head first (H x the cache, per step)."""
    if values.shape[1] == 1 and weights.shape[1] > 1:
        batch, heads, length, _ = weights.shape
        rows = weights.transpose(1, 2).reshape(batch, length * heads, -1)  # (B, T*H, Tk): a view when T = 1
        return torch.bmm(rows, values[:, 0]).view(batch, length, heads, -1)  # (B, T, H, v)
    return (weights @ values).transpose(1, 2)  # (B, H, T, v) -> (B, T, H, v)


def _bias_mask(
    bias: torch.Tensor, mask: torch.Tensor | None, length: int, kv_length: int, causal: bool
) -> torch.Tensor:
    """An additive score bias (ALiBi) and the attention mask as ONE additive float mask (B, H, T, Tk).

    The merged scores then get exactly stock's `bias + scaling·q·k (+ mask)` through the ordinary masked path.
    A missing mask means no padding: causal over the last T of the Tk keys for decoders (a cache holds the first
    Tk - T), nothing hidden for encoders.
    """
    low = torch.finfo(bias.dtype).min
    if mask is None and causal and length > 1:
        mask = torch.ones(length, kv_length, dtype=torch.bool, device=bias.device).tril_(kv_length - length)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        mask = torch.zeros((), dtype=bias.dtype, device=bias.device).masked_fill(~mask, low)
    return (bias + mask).clamp_min(low)  # (B, H, T, Tk); clamped: min + a negative bias must not reach -inf


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Softmax over keys (the last dim) in float32, cast to `dtype`, under an eager or an SDPA-style mask.

    `mask` broadcasts to `scores`: additive float (eager's format, added) or boolean, True = attend (sdpa's format;
    a query whose mask hides every key gets weights 0, as SDPA gives). `scores` must be a fresh tensor: a boolean
    mask is applied to it in place.
    """
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask  # not in place: a float32 mask promotes half scores, as in stock
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    if mask is not None and mask.dtype == torch.bool:
        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return weights
