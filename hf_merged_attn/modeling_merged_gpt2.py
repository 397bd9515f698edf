"""GPT-2 with merged query–key attention: the attention module and the model classes that load it.

Self-contained (imports only torch and transformers, plus the config file beside it): this file is
copied next to saved checkpoints so that `from_pretrained(..., trust_remote_code=True)` rebuilds the
model where hf_merged_attn is not installed. Seeding from stock weights lives in the package, not here.

Shapes: batch B, query length T (Tk with the cache), hidden d, heads H, head size hd, rank r.

- covariance: q_h = x S_h + u_h (B, H, T, d); the key is x itself, ONE head shared by all: (B, 1, T, d).
- lowrank:    q_h = x U_h + a_h (B, H, T, r); k_h = x V_h (B, H, T, r).
Values and `c_proj` are stock GPT-2's. Scores use stock's scaling (hd^-½, optionally / (layer+1)).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import nullcontext

import torch
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2Attention,
    GPT2DoubleHeadsModel,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.hub import CommitOperationAdd, hf_api

from .configuration_merged_gpt2 import MergedGPT2Config

logger = logging.get_logger(__name__)


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

        shared_key = key.shape[1] == 1 and self.num_heads > 1
        unequal = query.shape[-1] != value.shape[-1]  # q/k head size != v head size: SDPA has no fused kernel
        if implementation == "eager":
            attn_output, attn_weights = self._eager_attention(query, key, value, attention_mask)
        elif shared_key or (unequal and query.shape[2] == 1):
            # Covariance, and lowrank r != hd decoding one token: SDPA would take its math fallback, which (for the
            # shared key) copies the key to every head and computes all T x Tk scores, and (for one token) scales a
            # copy of the whole K cache. _eager_attention does one GEMM per block of queries against the shared key,
            # skips the keys above the diagonal when sdpa would be causal (no mask, T > 1), and gives the same
            # results as SDPA, including a zero output for a query whose mask hides every key. No weights, like SDPA.
            causal = attention_mask is None and query.shape[2] > 1 and kwargs.get("is_causal", self.is_causal)
            attn_output, attn_weights = self._eager_attention(
                query, key, value, attention_mask, causal=bool(causal), need_weights=False
            )
        else:
            if unequal and query.shape[-1] < value.shape[-1]:
                # lowrank r < hd over T > 1 tokens: zero-pad q and k to hd (q·k is unchanged, the cache keeps r) so
                # that SDPA can use a fused kernel (CPU flash attention needs equal q/k and v head sizes) instead of
                # its math fallback, which materialises the T x Tk scores.
                pad = value.shape[-1] - query.shape[-1]
                query, key = nn.functional.pad(query, (0, pad)), nn.functional.pad(key, (0, pad))
            attn_output, attn_weights = ALL_ATTENTION_FUNCTIONS[implementation](
                self,
                query,
                key,
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
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        causal: bool = False,
        need_weights: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stock GPT-2's eager attention (incl. `reorder_and_upcast_attn`) for a per-head or a shared key.

        Args:
            query: (B, H, T, qk); key: (B, H, Tk, qk) or the shared (B, 1, Tk, qk); value: (B, H, Tk, hd).
            attention_mask: additive float (eager's format) or boolean, True = attend (sdpa's format),
                broadcastable to (B, H, T, Tk).
            causal: sdpa's `is_causal` (no mask): query i sees keys 0..i (of the first T keys).
            need_weights: False for sdpa, which returns no weights; with a shared key and autograd on, the weights
                are then recomputed in the backward pass instead of being kept.

        Returns:
            The output (B, T, H, hd) and the weights (B, H, T, Tk); None instead of the weights when `causal` or
            not `need_weights`.

        The softmax always runs in float32: covariance scores can be larger than stock's per-head ones. With a
        shared key, the scores of all heads come from one GEMM (B, T*H, d) @ (B, d, Tk) on the query projection as
        it is laid out, with no copy of the key or the query, and the scaling is applied to the smaller operand
        rather than to the scores. When `causal`, the queries go in blocks of 64 and each block only multiplies
        the keys it can see: about half the score and attn·V work of a dense product for long sequences.
        """
        upcast = self.reorder_and_upcast_attn
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
                return (weights @ values).transpose(1, 2), weights  # (B, Tc, H, hd)

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
        attn_output = (weights @ value[:, :, :kv_length]).transpose(1, 2)  # (B, H, T, hd) -> (B, T, H, hd)
        return attn_output, weights


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Softmax over keys (the last dim) in float32, cast to `dtype`, under eager GPT-2's or SDPA's mask.

    `mask` broadcasts to `scores`: additive float (eager's format, added) or boolean, True = attend (sdpa's format;
    a query whose mask hides every key gets weights 0, as SDPA gives). `scores` must be a fresh tensor: a boolean
    mask is applied to it in place.
    """
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask  # not in place: a float32 mask promotes half scores, as in stock
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    if mask is not None and mask.dtype == torch.bool:
        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return weights


MODES = ("covariance", "lowrank")


class CorruptRecordError(ValueError):
    """A `merged_attn` record that cannot describe a patch."""


def check_merged_attn(record: dict | None, num_layers: int, hidden_size: int) -> None:
    """Check a `merged_attn` record (mode, rank, layers) against a model's sizes.

    Raises:
        ValueError: naming the bad field.
    """
    if not isinstance(record, dict):
        raise CorruptRecordError(
            f"merged_attn={record!r} is not a patch record; expected a dict with mode, rank and layers "
            "as written by save_pretrained on a patched model. Load a checkpoint saved by hf_merged_attn."
        )
    mode, rank, layers = record.get("mode"), record.get("rank"), record.get("layers")
    if mode not in MODES:
        raise CorruptRecordError(f"merged_attn.mode={mode!r} is not one of {MODES}; the checkpoint is corrupted.")
    if not (isinstance(layers, list) and layers and all(isinstance(i, int) and 0 <= i < num_layers for i in layers)):
        raise CorruptRecordError(
            f"merged_attn.layers={layers!r} must be a non-empty list of block indices in "
            f"0..{num_layers - 1}; the checkpoint is corrupted."
        )
    ranks = list(rank.values()) if isinstance(rank, dict) else [rank]
    per_block_ok = not isinstance(rank, dict) or sorted(rank) == sorted(str(i) for i in layers)
    if mode == "lowrank" and not (
        per_block_ok and all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= hidden_size for r in ranks)
    ):
        raise CorruptRecordError(
            f"merged_attn.rank={rank!r} must be an integer in 1..{hidden_size}, or {{\"block\": rank}} for exactly "
            f"the blocks in merged_attn.layers={layers!r}, for mode 'lowrank'; the checkpoint is corrupted."
        )
    if mode == "covariance" and rank is not None:
        raise CorruptRecordError(f"merged_attn.rank={rank!r} must be null for mode 'covariance'.")
    energy = record.get("energy")
    if energy is not None and not (isinstance(energy, float) and 0 < energy < 1 and isinstance(rank, dict)):
        raise CorruptRecordError(
            f"merged_attn.energy={energy!r} must be absent or a number in (0, 1) next to a per-block rank; the "
            "checkpoint is corrupted."
        )


def merge_attention_modules(model: nn.Module, record: dict) -> None:
    """Swap the recorded layers' GPT2Attention for (unseeded) MergedGPT2Attention of the same device/dtype.

    Used when building a model from a `MergedGPT2Config`, whose weights then come from a checkpoint.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GPT2Attention) and not isinstance(child, MergedGPT2Attention):
                if child.is_cross_attention or child.layer_idx not in record["layers"]:
                    continue
                weight = child.c_attn.weight
                rank = record["rank"]
                rank = rank[str(child.layer_idx)] if isinstance(rank, dict) else rank
                new = MergedGPT2Attention(
                    child.config, record["mode"], rank, child.layer_idx,
                    c_proj=child.c_proj, device=weight.device, dtype=weight.dtype,
                )
                setattr(parent, name, new)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters of a patched model and of the stock GPT-2 it came from (c_attn's q, k: 2d² + 2d)."""
    total = sum(p.numel() for p in model.parameters())
    stock = total
    for module in model.modules():
        if isinstance(module, MergedGPT2Attention):
            d = module.embed_dim
            stock += 2 * d * d + 2 * d - module.q_proj.weight.numel() - module.q_proj.bias.numel()
            if module.k_proj is not None:
                stock -= module.k_proj.weight.numel()
    return {"total": total, "stock": stock}


class MergedGPT2Mixin:
    """What every merged GPT-2 class adds to its stock transformers class: build, check, save, card, push."""

    config_class = MergedGPT2Config

    def __init__(self, config: MergedGPT2Config, *args, **kwargs):
        check_merged_attn(config.merged_attn, config.n_layer, config.n_embd)
        super().__init__(config, *args, **kwargs)
        if config.add_cross_attention:
            raise NotImplementedError("Merged GPT-2 does not support add_cross_attention=True.")
        merge_attention_modules(self, config.merged_attn)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing checkpoints whose weights do not fit the recorded patch.

        A missing, unexpected or mis-shaped attention weight raises instead of being randomly initialised.
        """
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except CorruptRecordError as error:
            raise ValueError(f"{pretrained_model_name_or_path}/config.json: {error}") from error
        except RuntimeError as error:  # transformers' size-mismatch report
            if "mismatch" not in str(error):
                raise
            raise ValueError(
                f"{pretrained_model_name_or_path}: the weights in model.safetensors do not have the shapes that "
                f"config.json's merged_attn describes ({error}). The checkpoint's config and weights disagree; "
                "re-save it from the patched model with save_pretrained."
            ) from error
        problems = {
            kind: sorted(k for k in info.get(kind, []) if ".attn." in k or k.startswith("attn."))
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        }
        problems = {kind: keys for kind, keys in problems.items() if keys}
        if problems:
            raise ValueError(
                f"{pretrained_model_name_or_path}: the attention weights in model.safetensors do not match "
                f"config.json's merged_attn={model.config.merged_attn} ({problems}). Refusing to load a model with "
                "missing or randomly initialised attention; re-save it from the patched model with save_pretrained."
            )
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, model_card_results: dict | None = None, **kwargs):
        """`PreTrainedModel.save_pretrained` (safetensors only) plus a README.md model card if none is there."""
        kwargs.pop("safe_serialization", None)  # only safetensors are ever written
        super().save_pretrained(save_directory, *args, **kwargs)
        card = os.path.join(save_directory, "README.md")
        if kwargs.get("is_main_process", True) and (model_card_results is not None or not os.path.exists(card)):
            with open(card, "w", encoding="utf-8") as f:
                f.write(self.create_model_card(results=model_card_results))

    def create_model_card(self, results: dict | None = None, repo_id: str | None = None) -> str:
        """A README.md: base model, mode, rank, parameter counts vs stock, how to load, optional results."""
        record = self.config.merged_attn
        counts = parameter_counts(self)
        base = record.get("base_model")
        where = repo_id or "path/to/this/folder"
        rank = record["rank"]
        if isinstance(rank, dict):
            ranks = ", ".join(f"block {i}: {r}" for i, r in rank.items())
            energy = record.get("energy")
            energy = f", the smallest keeping a share {energy:g} of each head's spectral energy" if energy else ""
            rank_text = f"ranks per block ({ranks}{energy})"
        else:
            rank_text = f"rank {rank}"
        what = (
            "as one d x d matrix per head (S_h = Wq_h·Wk_hᵀ, covariance mode)"
            if record["mode"] == "covariance"
            else f"factored at {rank_text} (S_h ≈ U_h·V_hᵀ, lowrank mode, seeded by "
            f"{'activation-whitened SVD' if record.get('init') == 'whitened' else 'SVD'})"
        )
        front = ["---", "library_name: transformers", "tags: [hf_merged_attn, gpt2, merged-attention]"]
        if base and not os.path.isdir(str(base)):  # a hub id, not a local folder
            front.append(f"base_model: {base}")
        lines = front + [
            "---",
            "",
            f"# {type(self).__name__}: {record['mode']} attention"
            + ("" if not rank else ", ranks per block" if isinstance(rank, dict) else f", rank {rank}"),
            "",
            f"GPT-2{f' (`{base}`)' if base else ''} whose query–key product is held {what}, made with "
            f"hf_merged_attn. Patched blocks: {record['layers']}.",
            "",
            "| | parameters |",
            "|---|---|",
            f"| this model | {counts['total']:,} |",
            f"| stock GPT-2 of the same shape | {counts['stock']:,} |",
            "",
            "## Load",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{where}", trust_remote_code=True)',
            "# or, with `pip install hf_merged_attn`: import hf_merged_attn, then from_pretrained without trust_remote_code",
            "# back to a stock GPT-2: hf_merged_attn.unpatch_model(model)",
            "```",
        ]
        if results:
            lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in results.items()]
        return "\n".join(lines) + "\n"

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str = "5GB",
        results: dict | None = None,
    ):
        """Upload weights, config, remote code and a model card (with `results`, if given) to the Hub.

        Returns:
            The `huggingface_hub.CommitInfo` of the upload.
        """
        api = hf_api()
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
            with open(os.path.join(tmp_dir, "README.md"), "w", encoding="utf-8") as f:
                f.write(self.create_model_card(results=results, repo_id=repo_id))
            operations = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(tmp_dir, name))
                for name in sorted(os.listdir(tmp_dir))
            ]
            return api.create_commit(
                repo_id=repo_id,
                operations=operations,
                commit_message=commit_message or f"Upload {type(self).__name__} ({self.config.merged_attn['mode']})",
                token=token,
                revision=revision,
                create_pr=create_pr,
            )


class MergedGPT2Model(MergedGPT2Mixin, GPT2Model):
    pass


class MergedGPT2LMHeadModel(MergedGPT2Mixin, GPT2LMHeadModel):
    pass


class MergedGPT2DoubleHeadsModel(MergedGPT2Mixin, GPT2DoubleHeadsModel):
    pass


class MergedGPT2ForSequenceClassification(MergedGPT2Mixin, GPT2ForSequenceClassification):
    pass


class MergedGPT2ForTokenClassification(MergedGPT2Mixin, GPT2ForTokenClassification):
    pass


class MergedGPT2ForQuestionAnswering(MergedGPT2Mixin, GPT2ForQuestionAnswering):
    pass


# stock class -> merged class, and the Auto class each is saved under (auto_map in config.json)
MERGED_CLASSES = {
    GPT2Model: (MergedGPT2Model, "AutoModel"),
    GPT2LMHeadModel: (MergedGPT2LMHeadModel, "AutoModelForCausalLM"),
    GPT2DoubleHeadsModel: (MergedGPT2DoubleHeadsModel, None),  # transformers has no Auto class for it
    GPT2ForSequenceClassification: (MergedGPT2ForSequenceClassification, "AutoModelForSequenceClassification"),
    GPT2ForTokenClassification: (MergedGPT2ForTokenClassification, "AutoModelForTokenClassification"),
    GPT2ForQuestionAnswering: (MergedGPT2ForQuestionAnswering, "AutoModelForQuestionAnswering"),
}
for _merged, _auto in MERGED_CLASSES.values():
    if _auto is not None:
        _merged.register_for_auto_class(_auto)
