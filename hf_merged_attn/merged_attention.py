"""The architecture-free core: the patch record and its validation, and the merged attention math.

Self-contained (imports only torch and transformers): this file travels next to every saved checkpoint,
like the adapter (`modeling_merged_<family>.py`) that imports it, so `from_pretrained(...,
trust_remote_code=True)` works where hf_merged_attn is not installed. No model family is named here:
each family's adapter subclasses its stock attention class together with `MergedAttention`, says how its
config gives sizes and scaling (`stock_settings`), and calls `attend` from a `forward` with the family's own
signature.

Shapes: batch B, query length T (Tk with the cache), hidden d, heads H, head size hd, rank r.

- covariance: q_h = x S_h + u_h (B, H, T, d); the key is x itself, ONE head shared by all: (B, 1, T, d).
- lowrank:    q_h = x U_h + a_h (B, H, T, r); k_h = x V_h (B, H, T, r).
- latent:     q_h stock; ONE latent c = x W_c (B, 1, T, r_c) per layer, cached for keys and values alike;
              k_h = c Bk_h, v_h = c Bv_h + bv_h. Training and prefill expand c (SDPA's fused kernels); decoding
              with cached tokens uses the absorbed order (q_h Bk_hᵀ against c, then (A c) Bv_h) and never
              re-expands the cache — unless k_up / v_up carry forward hooks, which then act on the cache as in
              the prefill.
Values and the output projection are the stock model's unless values="merged" / value_rank is given (then the
output projection holds M_h = Wv_h Wo_h, or its factors). Scores use the stock scaling (hd^-½ and the family's
rules), plus any additive score bias the family has (ALiBi), so the softmax equals stock's.
"""

from __future__ import annotations


from contextlib import nullcontext
from typing import Callable  # noqa: F401  (re-exported names below keep older imports working)

import torch
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache

from .attention_kernels import (
    EXACT_ROPE_KERNELS,
    KERNELS,
    PHASES,
    ROTARY_KERNELS,
    CacheLayout,
    Kernel,
    KernelQuery,
    _bias_mask,
    _masked_softmax,
    _row_sums,
    _weighted_values,
    phase_of,
    resolve_kernel,
)
from .config import (  # noqa: F401  (the record's names, imported from here by older code and checkpoints)
    FORMAT_VERSION,
    INITS,
    MODES,
    RANKED_MODES,
    ROPE_ROUTES,
    ROPE_SELECTIONS,
    SUPPORTED_ATTN_IMPLEMENTATIONS,
    VALUES,
    CorruptRecordError,
    PatchConfig,
    check_record,
)
from .projections import _hooked, _linear_map, _module_state, _storage  # noqa: F401
from .weights import (  # noqa: F401
    ArchitectureSpec,
    heads_to_linear,
    linear_to_heads,
    read_linear_qkv,
    read_output,
    write_linear_qkv,
    write_output,
)


# ---------------------------------------------------------------------------------------------------------------
# The attention math
# ---------------------------------------------------------------------------------------------------------------


class MergedAttention:
    """Mixin holding the merged projections and computing attention from them; no family is named here.

    Parameters (all ordinary, named for LoRA targeting and checkpoints):
        q_proj: nn.Linear(d, H*qk) with qk = d (covariance), r (lowrank) or hd (latent: the stock queries). Rows
            h*qk .. (h+1)*qk-1 of its weight are S_hᵀ (resp. U_hᵀ, Wq_hᵀ); its bias holds u_h (resp. a_h, bq_h).
        k_proj: lowrank only, nn.Linear(d, H*r, bias=False); rows h*r .. are V_hᵀ. None otherwise.
        v_proj: nn.Linear(d, d), the stock value weights (head h: rows h*hd .. (h+1)*hd-1); with value_rank r_v,
            nn.Linear(d, H*r_v, bias=False) holding the P_h; None for latent and values="merged" (the value is x).
        latent_proj, k_up, v_up: latent only. latent_proj = nn.Linear(d, r_c, bias=False) (W_cᵀ); k_up, v_up =
            nn.Linear(r_c, d) (rows h*hd .. are Bk_hᵀ, Bv_hᵀ; v_up's bias is the stock value bias).
        value_bias: with merged or low-rank values, (H, d): c_h = bv_h Wo_h, each head's value bias after the output
            map. The output adds Σ_h rowsum(A_h) c_h, which is Σ_h c_h where every attention row sums to 1 and stays
            exact where one does not (a query whose mask hides every key under SDPA; attention dropout). None
            otherwise.
    The stock output projection, where the self-attention module owns one, keeps its stock attribute name
    `output_name` and is shared with the stock module it replaces (not copied).
    """

    output_name: str | None = None  # the stock output projection kept by the module (None: it has none)
    causal: bool = True  # decoder (causal) or encoder (bidirectional) attention, for `stock_settings`
    dropout_name: str = "attention_dropout"  # the config field of the attention-probability dropout

    @classmethod
    def like(cls, stock: nn.Module, config, mode: str, rank: int | None, values=None, value_rank=None, **extra):
        """An unseeded merged module for the place of `stock` (same layer, device and dtype, its output projection);
        `extra` goes to the class's `__init__` (the rotary settings of a rotary latent)."""
        weight = next(stock.parameters())
        output = getattr(stock, cls.output_name) if cls.output_name else None
        return cls(config, mode, rank, stock.layer_idx, output=output, values=values, value_rank=value_rank,
                   device=weight.device, dtype=weight.dtype, **extra)

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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Build the merged projections in place of the stock ones (the stock class's `__init__` is not run).

        Args:
            config: the model's config; the family's `stock_settings` reads its sizes and scaling rules from it.
            mode, rank: the patch ("covariance", "lowrank" at rank r, or "latent" at rank r_c).
            layer_idx: the block index (cache slot, layer-dependent scaling).
            output: the stock output projection to share, where the module has one (`output_name`); a fresh
                one of the family's type (`new_output`) when None, as when loading a checkpoint.
            values, value_rank: merged values (value = x, M_h = Wv_h Wo_h) or low-rank values (rank r_v): the
                output projection under `output_name` then becomes nn.Linear(H*k, d) holding the M_h (k = d) or
                the Q_h (k = r_v), and the stock one is not kept.
        """
        nn.Module.__init__(self)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}.")
        settings = {"upcast": False, **self.stock_settings(config, layer_idx)}
        hidden_size, num_heads = settings["hidden_size"], settings["num_heads"]
        self.config = config
        self.mode = mode
        self.rank = rank
        self.layer_idx = layer_idx
        self.embed_dim = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qk_head_dim = {"covariance": hidden_size, "lowrank": rank, "latent": self.head_dim}[mode]
        self.scaling = settings["scaling"]  # the stock scaling (hd^-½ and the family's rules), NOT qk^-½
        self.is_causal = settings["is_causal"]
        self.upcast_scores = settings["upcast"]  # q·k in float32 under autocast (GPT-2's reorder_and_upcast_attn)
        self.values, self.value_rank = values, value_rank
        own_output = values is not None or value_rank is not None  # the output map is part of the merge
        if own_output and self.output_name is None:
            raise NotImplementedError(
                f"{type(self).__name__}: values={values!r} / value_rank={value_rank!r} need the output projection "
                "inside the attention module, which this family keeps outside (in BERT it is BertSelfOutput.dense); "
                "encoders have no cache to shrink either. Use stock values (no values / value_rank) here."
            )
        self.value_head_dim = hidden_size if values == "merged" else value_rank or self.head_dim
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(hidden_size, num_heads * self.qk_head_dim, bias=True, **factory)
        self.k_proj = nn.Linear(hidden_size, num_heads * rank, bias=False, **factory) if mode == "lowrank" else None
        if mode == "latent":
            self.v_proj = None
            self.latent_proj = nn.Linear(hidden_size, rank, bias=False, **factory)
            self.k_up = nn.Linear(rank, hidden_size, bias=False, **factory)
            self.v_up = nn.Linear(rank, hidden_size, bias=True, **factory)
        elif values == "merged":
            self.v_proj = None  # the value is x itself
        else:  # stock values (head size hd, with bias) or P_h of low-rank values (r_v; the bias is folded into the output)
            self.v_proj = nn.Linear(hidden_size, num_heads * self.value_head_dim, bias=value_rank is None, **factory)
        self.attn_dropout = nn.Dropout(settings["dropout"])
        self.value_bias = None
        if own_output:  # M_h (or Q_h) of every head and bo as ONE linear map; c_h = bv_h Wo_h per head beside it
            setattr(self, self.output_name, nn.Linear(num_heads * self.value_head_dim, hidden_size, **factory))
            self.value_bias = nn.Parameter(torch.zeros(num_heads, hidden_size, **factory))  # (H, d)
        elif self.output_name is not None:
            setattr(self, self.output_name, output if output is not None else self.new_output(config).to(**factory))
        elif output is not None:
            raise ValueError(f"{type(self).__name__} has no output projection of its own; got output={output!r}.")

    @classmethod
    def stock_settings(cls, config, layer_idx: int | None) -> dict:
        """The family's attention settings, read from its config; an adapter overrides what differs.

        Returns:
            {"hidden_size", "num_heads", "scaling" (the stock score scaling), "is_causal", "dropout" (on the
            attention probabilities), and optionally "upcast" (GPT-2's reorder_and_upcast_attn)}. The defaults:
            config.hidden_size and num_attention_heads, scaling hd^-½, the class's `causal`, and the dropout
            probability in the config field the class's `dropout_name` names.
        """
        return {
            "hidden_size": config.hidden_size,
            "num_heads": config.num_attention_heads,
            "scaling": (config.hidden_size // config.num_attention_heads) ** -0.5,
            "is_causal": cls.causal,
            "dropout": getattr(config, cls.dropout_name),
        }

    def new_output(self, config) -> nn.Module:
        """A fresh output projection (d -> d) of the family's type, for `output_name`."""
        return nn.Linear(self.embed_dim, self.embed_dim)

    @property
    def cache_layout(self) -> CacheLayout:
        """What this layer caches per token: the latent c (r_c), the shared key x (covariance, d) or per-head keys
        (lowrank, H x r); per-head values (H x hd or r_v), the shared x (merged values, d), or none (the keys serve)."""
        heads, d = self.num_heads, self.embed_dim
        if self.mode == "latent":
            return CacheLayout(1, self.rank, 1, 0)
        key = (1, d) if self.mode == "covariance" else (heads, self.rank)
        if self.values == "merged":
            return CacheLayout(*key, 1, 0 if self.mode == "covariance" else d)
        return CacheLayout(*key, heads, self.value_head_dim)

    def stock_qkv_parameters(self) -> int:
        """Parameters of the stock query/key/value projections this module replaces: 3d² + 3d."""
        return 3 * self.embed_dim * self.embed_dim + 3 * self.embed_dim

    def stock_cache_numbers_per_token(self) -> int:
        """Numbers the stock layer caches per token: keys and values, 2·d."""
        return 2 * self.embed_dim

    def cache_numbers_per_token(self) -> int:
        """Numbers this layer caches per token (keys + values; x2 bytes in bf16): stock caches 2·d."""
        return self.cache_layout.numbers_per_token()

    kernel_overrides: dict[str, str] | None = None  # {phase: kernel name}, set by `use_kernels`
    kernel_table: dict[str, Kernel] | None = None  # the kernels this layer chooses from (None: KERNELS)

    def _kernel(self, query: KernelQuery) -> Kernel:
        """The kernel for `query`, resolved once per distinct query (implementation, device, phase, shapes) and
        memoised, so `set_attn_implementation` and `.to()` re-resolve it; traced through under torch.compile."""
        forced = (self.kernel_overrides or {}).get(query.phase)
        if torch.compiler.is_compiling():
            return resolve_kernel(query, forced, self.kernel_table)
        memo = self.__dict__.setdefault("_kernel_memo", {})
        if (query, forced) not in memo:
            memo[(query, forced)] = resolve_kernel(query, forced, self.kernel_table)
        return memo[(query, forced)]

    def extra_repr(self) -> str:
        rank = f", rank={self.rank}" if self.rank is not None else ""
        values = f", values={self.values!r}" if self.values else ""
        value_rank = f", value_rank={self.value_rank}" if self.value_rank else ""
        return f"mode={self.mode!r}{rank}{values}{value_rank}, layer_idx={self.layer_idx}"

    def _run_kernel(self, implementation, phase, query, key, value, attention_mask, dropout, length, kwargs):
        """The chosen attention kernel (see attention_kernels) on (B, H, T, qk) queries: ((B, T, H, v), weights)."""
        kernel = self._kernel(KernelQuery(
            implementation, query.device.type, phase, shared=key.shape[1] == 1 or value.shape[1] == 1,
            mqa=key.shape[1] == 1 and value.shape[1] == 1 and self.num_heads > 1,
            equal_widths=query.shape[-1] == value.shape[-1], width=query.shape[-1], dropout=dropout,
            masked=attention_mask is not None,
        ))
        # sdpa's is_causal (no mask, several fresh tokens): query i sees keys 0..i
        causal = bool(attention_mask is None and length > 1 and kwargs.get("is_causal", self.is_causal))
        return kernel.run(self, query, key, value, attention_mask, causal, implementation == "eager", kwargs)

    def attend(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        score_bias: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Merged self-attention of `hidden_states` (B, T, d), through the output projection the module owns.

        Args:
            attention_mask: as the family's model passes it — additive float (eager) or boolean, True = attend
                (sdpa) — broadcastable to (B, H, T, Tk), or None (no padding; causal if the module is).
            cache: the transformers cache; this layer's keys and values are appended to it.
            score_bias: an additive bias on the scores (B, H, 1 or T, Tk), e.g. ALiBi; added after scaling.
            kwargs: passed on to the attention function (as stock does), and to the cache update.

        Returns:
            The attention output through the module's output projection `output_name` (B, T, d) — or, where the
            family keeps that projection outside the module (`output_name` None: BERT), before it, (B, T, d) — and
            the weights (B, H, T, Tk), or None where none are computed.
        """
        implementation = self.config._attn_implementation or "eager"
        if implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
            raise NotImplementedError(
                f"attn_implementation={implementation!r} is not supported by the {self.mode} patch (query/key head "
                f"size {self.qk_head_dim}, value head size {self.head_dim}); supported: "
                f"{', '.join(SUPPORTED_ATTN_IMPLEMENTATIONS)}. Call model.set_attn_implementation('sdpa')."
            )
        layout = self.cache_layout
        lead = hidden_states.shape[:-1]  # (B, T)
        length = lead[-1]
        query = self.q_proj(hidden_states).view(*lead, self.num_heads, -1).transpose(1, 2)  # (B, H, T, qk)
        # The new tokens' keys and values in the layout the cache stores them (see CacheLayout): the latent c, the
        # shared key x (covariance), or per-head keys (lowrank); values per head, x (merged), or none (= the keys).
        if self.mode == "latent":
            fresh_key = self.latent_proj(hidden_states)  # (B, T, r_c)
        elif self.k_proj is None:
            fresh_key = hidden_states  # (B, T, d)
        else:
            fresh_key = self.k_proj(hidden_states)  # (B, T, H*r)
        key = layout.stored(fresh_key, layout.key_heads)  # (B, 1, T, w) shared or packed, or (B, H, T, r)
        if layout.values_are_keys:
            value = key[..., :0]  # (B, 1, T, 0): the cache's value slot holds nothing
        else:
            fresh_value = hidden_states if self.values == "merged" else self.v_proj(hidden_states)  # (B, T, d or H*v)
            value = layout.stored(fresh_value, layout.value_heads)

        phase, codes, code_kernel, buffer = "train", None, None, length
        # a hook on k_up / v_up (or a forward replaced on them) acts on what they are called on: the decode then calls
        # them on the cached latent as the prefill does, instead of multiplying by their weights (the absorbed order)
        hooked = self.mode == "latent" and (_hooked(self.k_up) or _hooked(self.v_up))
        if cache is not None:
            layer_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            phase = phase_of(layer_cache, self.layer_idx)  # read before the update
            reader = (_code_reading_layer(layer_cache, self.layer_idx) if layout.values_are_keys and not hooked
                      else None)
            if reader is not None and phase == "decode":  # a quantized cache of c or x: the kernel table decides
                code_kernel = self._kernel(KernelQuery(  # the absorbed query is as wide as the cached tensor
                    implementation, query.device.type, phase, shared=True, mqa=self.num_heads > 1, equal_widths=True,
                    width=key.shape[-1], dropout=self.training and self.attn_dropout.p > 0,
                    masked=attention_mask is not None or score_bias is not None, codes=True,
                ))
                codes, code_kernel = (reader, code_kernel) if code_kernel.reads_codes else (None, None)
            # a prefill attends its fresh tokens, a code-reading decode the codes: the update returns its window alone
            extra = {"read_codes": True} if reader is not None and (phase != "decode" or codes is not None) else {}
            cached = layer_cache.update(key, value, self.layer_idx, kwargs=kwargs, **extra)  # (B, Hk|Hv, Tk, .) each
            buffer = cached[0].shape[2]  # the keys the cache returns: a static one returns its whole buffer
            if phase == "decode":  # attend the cache; a prefill attends its own fresh tokens (a static buffer is longer)
                key, value = cached
        if phase != "decode" and attention_mask is not None and attention_mask.shape[-1] > length:
            attention_mask = attention_mask[..., :length]  # a static cache's mask spans its whole buffer
        if phase != "decode" and score_bias is not None and score_bias.shape[-1] > length:
            score_bias = score_bias[..., :length]
        key = layout.unpacked(key, layout.key_heads)  # (B, Hk, Tk, .): a view
        value = key if layout.values_are_keys else layout.unpacked(value, layout.value_heads)

        absorbed = self.mode == "latent" and phase == "decode" and not hooked
        if absorbed:  # scores q_h·(c Bk_h) = (q_h Bk_hᵀ)·c: the queries move to the latent, the cache stays as it is
            k_up = _linear_map(self.k_up, key)[0].view(self.num_heads, self.head_dim, -1)  # (H, hd, r_c): Bk_hᵀ
            query, value = query @ k_up, key  # (B, H, T, r_c); the latent is the value too
        elif self.mode == "latent":  # training / prefill (or hooked up-projections): expand the latent per head
            latent = key[:, 0]  # (B, Tk, r_c)
            key = self.k_up(latent).view(*latent.shape[:2], self.num_heads, -1).transpose(1, 2)  # (B, H, Tk, hd)
            value = self.v_up(latent).view(*latent.shape[:2], self.num_heads, -1).transpose(1, 2)  # (B, H, Tk, hd)
        # under attention dropout the rows of A_h do not sum to 1: carry a constant 1 channel through A·V to get the row
        # sums that the per-head value bias c_h — and the absorbed latent's bv_h — need (training only: no cache is
        # copied at decode time)
        dropout = self.training and self.attn_dropout.p > 0
        count_rows = dropout and (self.value_bias is not None or absorbed)
        if count_rows:
            value = torch.cat([value, value.new_ones(*value.shape[:-1], 1)], dim=-1)  # (B, Hv, Tk, v + 1)
        if score_bias is not None:
            keys = key.shape[2] if codes is None else codes.get_seq_length()  # (key: only the window when codes are read)
            attention_mask = _bias_mask(score_bias, attention_mask, length, keys, self.is_causal)

        if codes is not None:  # decode over a quantized cache of c (absorbed) or x (merged values), read in blocks
            attn_output, attn_weights = code_kernel.run(self, query, codes, codes, attention_mask, False,
                                                        implementation == "eager", kwargs)
        else:
            attn_output, attn_weights = self._run_kernel(implementation, phase, query, key, value, attention_mask,
                                                         dropout, length, kwargs)
        # the row sums of the weights: counted under dropout (B, T, H); else from the mask (B, T, 1 or H), or None where
        # every row sums to 1
        rows = None
        if count_rows:
            attn_output, rows = attn_output[..., :-1], attn_output[..., -1]  # (B, T, H, v), (B, T, H)
        elif self.value_bias is not None or absorbed:
            rows = _row_sums(attention_mask)
        if absorbed:  # z_h = (A_h c) Bv_h + rowsum(A_h) bv_h
            v_up, v_bias = _linear_map(self.v_up, key)  # (H*hd, r_c), (H*hd,)
            v_up = v_up.view(self.num_heads, self.head_dim, -1)  # (H, hd, r_c)
            v_bias = v_bias.view(self.num_heads, -1)  # (H, hd)
            attn_output = (attn_output.unsqueeze(-2) @ v_up.mT).squeeze(-2)  # (B, T, H, hd)
            attn_output = attn_output + (v_bias if rows is None else rows.unsqueeze(-1).to(v_bias.dtype) * v_bias)
        if attn_weights is not None and attn_weights.shape[-1] < buffer:  # a static cache's prefill: stock returns
            attn_weights = nn.functional.pad(attn_weights, (0, buffer - attn_weights.shape[-1]))  # the whole buffer
        attn_output = attn_output.reshape(*lead, -1)  # (B, T, H, v) -> (B, T, H*v)
        if self.output_name is None:  # the family applies its output projection outside this module (BERT)
            return attn_output.contiguous(), attn_weights
        output = getattr(self, self.output_name)(attn_output)  # (B, T, d)
        if self.value_bias is not None:  # + Σ_h rowsum(A_h) c_h
            bias = self.value_bias.to(output.dtype)  # (H, d)
            if rows is None:  # every row sums to 1
                output = output + bias.sum(0)
            elif rows.shape[-1] == 1:  # one row sum for all heads (a mask shared by the heads)
                output = output + rows.to(bias.dtype) * bias.sum(0)
            else:  # a row sum per head (dropout)
                output = output + rows.to(bias.dtype) @ bias
        return output, attn_weights

    def _eager_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        causal: bool = False,
        need_weights: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stock eager attention (incl. GPT-2's `reorder_and_upcast_attn`) for a per-head or a shared key.

        Args:
            query: (B, H, T, qk); key: (B, H, Tk, qk) or the shared (B, 1, Tk, qk); value: (B, H, Tk, v) or the
                shared (B, 1, Tk, v).
            attention_mask: additive float (eager's format) or boolean, True = attend (sdpa's format),
                broadcastable to (B, H, T, Tk).
            causal: sdpa's `is_causal` (no mask): query i sees keys 0..i (of the first T keys).
            need_weights: False for sdpa, which returns no weights; with a shared key and autograd on, the weights
                are then recomputed in the backward pass instead of being kept.

        Returns:
            The output (B, T, H, v) and the weights (B, H, T, Tk); None instead of the weights when `causal` or
            not `need_weights`.

        The softmax always runs in float32: covariance scores can be larger than stock's per-head ones. With a
        shared key, the scores of all heads come from one GEMM (B, T*H, d) @ (B, d, Tk) on the query projection as
        it is laid out, with no copy of the key or the query, and the scaling is applied to the smaller operand
        rather than to the scores. When `causal`, the queries go in blocks of 64 and each block only multiplies
        the keys it can see: about half the score and attn·V work of a dense product for long sequences.
        """
        upcast = self.upcast_scores
        batch, heads, length, _ = query.shape
        kv_length = length if causal else key.shape[2]  # sdpa's is_causal uses the first T keys
        no_autocast = torch.autocast(query.device.type, enabled=False) if upcast else nullcontext()
        if key.shape[1] == 1 and heads > 1:
            rows = query.transpose(1, 2).reshape(batch, length * heads, -1)  # (B, T*H, qk), row t*H + h: a view
            shared = key[:, 0, :kv_length]  # (B, Tk, qk)
            mask = None if attention_mask is None else attention_mask.transpose(1, 2)  # (B, T, H or 1, Tk)
            with no_autocast:
                if upcast:
                    rows, shared = rows.float(), shared.float()
                if self.scaling != 1.0:  # scale the smaller operand, never the T x Tk scores
                    if rows.shape[1] <= shared.shape[1]:
                        rows = rows * self.scaling
                    else:
                        shared = shared * self.scaling
            dropout = self.training and self.attn_dropout.p > 0

            def attend(left, right, values, part, start):
                """Queries `left` (rows t*H + h) against keys `right`: (B, Tc, H, hd) and the weights (B, H, Tc, Tk')."""
                with no_autocast:
                    scores = torch.bmm(left, right.mT)  # (B, Tc*H, Tk')
                scores = scores.view(batch, -1, heads, right.shape[1])  # (B, Tc, H, Tk')
                if causal:  # query start + i sees keys 0 .. start + i: only the diagonal block has hidden keys
                    tc = scores.shape[1]
                    above = torch.ones(tc, tc, dtype=torch.bool, device=scores.device).triu_(1)  # (Tc, Tc)
                    scores[..., start:].masked_fill_(above[:, None], torch.finfo(scores.dtype).min)  # in place: bmm keeps no output
                weights = _masked_softmax(scores, part, values.dtype).transpose(1, 2)  # (B, H, Tc, Tk'), a view
                if dropout:  # draw the dropout mask in stock's (B, H, T, Tk) order
                    weights = self.attn_dropout(weights.contiguous())
                return _weighted_values(weights, values), weights  # (B, Tc, H, v)

            # Without weights to return (sdpa), keep none of the T x Tk weights for backward, as SDPA's fused kernels
            # do: each block's scores are recomputed in the backward pass (a third more score work, O(T) memory).
            recompute = not need_weights and torch.is_grad_enabled() and (rows.requires_grad or value.requires_grad)
            block = 64 if causal else length
            outputs, weights = [], None
            # split, not slices: the backward pass then concatenates the blocks' query gradients once instead of
            # zero-filling a (B, T*H, qk) gradient for every block
            for start, left in zip(range(0, length, block), rows.split(block * heads, dim=1)):
                stop = min(start + block, length)
                keys = stop if causal else kv_length
                part = None if mask is None else mask[:, start:stop]
                inputs = (left, shared[:, :keys], value[:, :, :keys], part, start)
                if recompute:
                    out = torch.utils.checkpoint.checkpoint(
                        lambda *args: attend(*args)[0], *inputs, use_reentrant=False, preserve_rng_state=dropout
                    )
                else:
                    out, weights = attend(*inputs)
                outputs.append(out)
            attn_output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # (B, T, H, hd)
            return attn_output, weights if need_weights and not causal else None

        if causal:  # as a boolean mask, True = attend (the forward never asks for this: per-head keys over T > 1 use SDPA)
            attention_mask = torch.ones(length, kv_length, dtype=torch.bool, device=query.device).tril_()
        with no_autocast:
            if upcast:
                query, key = query.float(), key.float()
            scores = (query @ key[:, :, :kv_length].mT) * self.scaling  # (B, H, T, Tk)
        weights = self.attn_dropout(_masked_softmax(scores, attention_mask, value.dtype))
        return _weighted_values(weights, value[:, :, :kv_length]), weights  # (B, T, H, v)


def use_kernels(model: nn.Module, **by_phase: str | None) -> nn.Module:
    """Force attention kernels by phase on every merged layer of `model`, e.g. `use_kernels(model, decode="sdpa_folded")`
    (None: back to the automatic choice). Phases: "train", "prefill", "decode"; kernels: `attention_kernels.KERNELS`.
    A forced kernel must fit the attention it is asked to compute (checked when it runs). Returns `model`.

    Raises:
        ValueError: an unknown phase or kernel, or a model without merged attention (nothing would use the kernel).
    """
    known = {**KERNELS, **ROTARY_KERNELS, **EXACT_ROPE_KERNELS}
    bad = {p: k for p, k in by_phase.items() if p not in PHASES or (k is not None and k not in known)}
    if bad:
        raise ValueError(f"use_kernels({bad}): phases are {PHASES}, kernels {list(KERNELS)} (rotary latent layers: "
                         f"{list(ROTARY_KERNELS)}; exact-RoPE latent layers: {list(EXACT_ROPE_KERNELS)}), or None for "
                         "automatic.")
    merged = [module for module in model.modules() if isinstance(module, MergedAttention)]
    if not merged:
        raise ValueError(
            f"use_kernels: {type(model).__name__} has no merged attention layer (it is not patched), so no kernel would "
            f"be used. Patch it first (patch_model(model, ...)) or load a merged checkpoint, then call "
            f"use_kernels(model, {', '.join(f'{p}={k!r}' for p, k in by_phase.items())})."
        )
    for module in merged:
        overrides = {**(module.kernel_overrides or {}), **by_phase}
        module.kernel_overrides = {p: k for p, k in overrides.items() if k is not None} or None
    return model


def _code_reading_layer(cache, layer_idx: int):
    """The cache's layer `layer_idx` if it can be attended from its codes (`LatentQuantizedLayer.attend_absorbed`)."""
    layers = getattr(cache, "layers", None)
    layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
    return layer if getattr(layer, "reads_codes", False) else None
