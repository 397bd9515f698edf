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
from dataclasses import asdict, dataclass, field
from numbers import Integral, Real
from typing import Callable

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers.cache_utils import Cache, EncoderDecoderCache

from .attention_kernels import (
    KERNELS,
    PHASES,
    EXACT_ROPE_KERNELS,
    ROTARY_KERNELS,
    CacheLayout,
    Kernel,
    KernelQuery,
    phase_of,
    resolve_kernel,
)

MODES = ("covariance", "lowrank", "latent")
ROPE_SELECTIONS = ("2norm", "high", "low", "uniform", "rorope")  # rotary families: which pairs stay rotated
# rotary families: "exact" keeps every rotation (keys compressed before RoPE with the values, rotated after rebuilding);
# "partial" keeps rope_pairs pairs rotated and drops the others' rotation (MHA2MLA)
ROPE_ROUTES = ("exact", "partial")
RANKED_MODES = ("lowrank", "latent")  # the modes that take rank=...
VALUES = ("merged",)  # values="merged": value = x shared by all heads, M_h = Wv_h Wo_h per head
INITS = ("svd", "whitened")  # how lowrank factors are seeded: plain SVD of the weights, or activation-aware
SUPPORTED_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
# The checkpoint format a `merged_attn` record describes (its "format_version"). A record without one is from before
# versions were recorded (hf_merged_attn <= 0.2.0): its merged / low-rank values may lack `value_bias` (the folded
# form, `merged_models._load_folded_value_bias`). From version 1 on every weight of the patch is in the checkpoint.
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# The record of a patch: what `patch_model` was asked, and what a checkpoint's config.json says
# ---------------------------------------------------------------------------------------------------------------


class CorruptRecordError(ValueError):
    """A `merged_attn` record in a checkpoint's config that cannot describe a patch."""


@dataclass
class PatchConfig:
    """The settings of one `patch_model` call, recorded on the model as `config.merged_attn`.

    The one place where mode, rank, layers and init are validated: `patch_model` builds it from the user's
    arguments, and `check_record` rebuilds it from a checkpoint's `merged_attn`.

    Attributes:
        mode: "covariance" (one d x d matrix S_h = Wq_h Wk_hᵀ per head), "lowrank" (S_h ≈ U_h V_hᵀ) or "latent"
            (one cached latent c = x W_c per layer for keys and values).
        rank: for "lowrank" r, for "latent" r_c (1 <= rank <= hidden size) for every patched block, or
            {block index: rank} per block; None for "covariance". An energy target is resolved to the per-block
            dict by `patch_model`.
        layers: indices of the patched blocks (sorted); None until resolved against a model.
        init: how "lowrank" / "latent" factors are seeded — "svd" (best approximation of the weights) or
            "whitened" (least error on calibration activations); None for "covariance" (exact).
        values: None (stock values) or "merged": the value is the layer input x, shared by all heads, and each head
            holds M_h = Wv_h Wo_h (d x d); with covariance, keys and values are then the same cached tensor.
        value_rank: r_v (1 <= r_v <= head size) for low-rank values M_h ≈ P_h Q_hᵀ (V cache (B, H, T, r_v)),
            with covariance or lowrank; None for stock values.
        rope_pairs: rotary families only (mode "latent"): r, the frequency pairs per KV head kept rotated (0 <= r <=
            hd/2; hd/2, the default, keeps them all); the other pairs lose their rotation and their keys join the
            latent. Resolved by `patch_model`.
        rope_selection: which pairs stay rotated: "2norm" (the largest query·key pair norms on calibration data),
            "high" (fastest), "low" (slowest), "uniform", or "rorope" (TransMLA's PCA across the KV heads per
            frequency, keeping the strongest mixed pairs as ONE rotary key shared by all heads). Resolved by
            `patch_model` ("2norm" when pairs are dropped; None when every pair of every head is kept).
        rope: rotary families only (mode "latent"): "exact" (every pair keeps its rotation; the latent holds the keys
            before RoPE and the values, keys are rebuilt and rotated at attention) or "partial" (`rope_pairs` kept
            rotated, the others' keys join the latent without rotation). Resolved by `patch_model` (None elsewhere).
        energy: set from `rank=<float>`: the fraction in (0, 1) of the spectral energy that the seed keeps (of each
            head's S̃_h for lowrank, of the layer's stacked [Wk | Wv] for latent); `patch_model` picks the smallest
            such rank per block.
    """

    mode: str
    rank: int | dict[int, int] | None = None
    layers: list[int] | None = field(default=None)
    init: str | None = "svd"
    values: str | None = None
    value_rank: int | None = None
    rope_pairs: int | None = None
    rope_selection: str | None = None
    rope: str | None = None
    energy: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, (str, bytes, type(None))) and hasattr(self.layers, "__iter__"):
            self.layers = list(self.layers)  # a generator or iterator is read once, here
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ValueError(
                f"mode={self.mode!r} is not a patch mode; allowed: {', '.join(repr(m) for m in MODES)}. "
                "Use mode='covariance' for the exact merged S_h, mode='lowrank' with rank=r, or mode='latent' with "
                "rank=r_c."
            )
        if self.mode == "covariance" and self.rank is not None:
            raise ValueError(
                f"rank={self.rank!r} was given with mode='covariance', which has no rank (S_h is d x d). "
                "Drop rank, or use mode='lowrank' to factor S_h at rank r."
            )
        if self.mode in RANKED_MODES:
            if self.rank is None:
                exact = "the head size, e.g. 64 for GPT-2" if self.mode == "lowrank" else "the hidden size, e.g. 768 for GPT-2"
                raise ValueError(
                    f"mode={self.mode!r} needs rank=r (an integer — {exact} — is exact; a dict {{block: r}}; or a "
                    "float in (0, 1), the spectral energy to keep). Pass rank=..., or use mode='covariance'."
                )
            if isinstance(self.rank, Real) and not isinstance(self.rank, Integral):  # an energy target
                if not 0.0 < float(self.rank) < 1.0:
                    raise ValueError(
                        f"rank={self.rank!r} is a float, i.e. a spectral-energy target, but not in (0, 1); pass e.g. "
                        "rank=0.9 to keep 90% of each head's energy, or an integer rank (rank=1 for rank one; the "
                        "head size, e.g. 64, for exact)."
                    )
                self.energy, self.rank = float(self.rank), None
            elif isinstance(self.rank, dict):
                if not self.rank:
                    raise ValueError("rank={} names no block; pass {block index: r, ...} or an integer rank.")
                ranks = {self._block(i): self._integer_rank(r, f"rank[{i!r}]") for i, r in self.rank.items()}
                if len(ranks) < len(self.rank):
                    raise ValueError(f"rank={self.rank!r} names a block twice (as int and str); give each block once.")
                if self.layers is not None:
                    raise ValueError(
                        f"layers={self.layers!r} was given with a rank per block (rank={self.rank!r}), whose keys "
                        "already are the patched blocks. Drop layers."
                    )
                self.rank, self.layers = ranks, sorted(ranks)
            elif self.rank is not None:
                self.rank = self._integer_rank(self.rank, "rank")
        self._check_values()
        self._check_init()
        self._check_rope()

    def _check_rope(self) -> None:
        if self.rope is not None and (not isinstance(self.rope, str) or self.rope not in ROPE_ROUTES):
            raise ValueError(
                f"rope={self.rope!r} is not a rotary route; allowed: 'exact' (every pair keeps its rotation: keys "
                "compressed before RoPE with the values) or 'partial' (rope_pairs pairs keep it, the rest are dropped)."
            )
        if self.rope is not None and self.mode != "latent":
            raise ValueError(
                f"rope={self.rope!r} was given with mode={self.mode!r}; the rotary routes belong to mode='latent' on a "
                "rotary model (Llama, Qwen2, Mistral). Use mode='latent', rank=r_c, rope='exact'."
            )
        if self.rope == "exact" and (self.rope_pairs is not None or self.rope_selection is not None):
            raise ValueError(
                f"rope='exact' keeps every frequency pair rotated, so rope_pairs={self.rope_pairs!r} / "
                f"rope_selection={self.rope_selection!r} have nothing to choose. Drop them, or use rope='partial' to "
                "keep only rope_pairs pairs rotated."
            )
        if self.rope_pairs is None and self.rope_selection is None:
            return
        given = f"rope_pairs={self.rope_pairs!r}, rope_selection={self.rope_selection!r}"
        if self.mode != "latent":
            raise ValueError(
                f"{given} was given with mode={self.mode!r}; the rotary settings belong to mode='latent' on a rotary "
                "model (Llama, Qwen2, Mistral). Use mode='latent', rank=r_c, rope_pairs=r."
            )
        if self.rope_selection is not None and self.rope_selection not in ROPE_SELECTIONS:
            raise ValueError(
                f"rope_selection={self.rope_selection!r} is not a rule; allowed: "
                f"{', '.join(repr(r) for r in ROPE_SELECTIONS)} ('2norm' and 'rorope' read calibration data)."
            )
        if self.rope_pairs is not None and (isinstance(self.rope_pairs, bool) or not isinstance(self.rope_pairs, Integral)
                                            or self.rope_pairs < 0):
            raise ValueError(
                f"rope_pairs={self.rope_pairs!r} must be an integer 0 <= r <= hd/2 (frequency pairs per KV head kept "
                "rotated; hd/2, e.g. 32 for head size 64, keeps them all and is exact); MHA2MLA's default is hd/16."
            )
        if self.rope_pairs is not None:
            self.rope_pairs = int(self.rope_pairs)

    def rope_needs_calibration(self, head_dim: int | None = None) -> bool:
        """Whether choosing the kept pairs reads calibration data: 'rorope', or '2norm' (the default) when pairs are
        dropped (rope_pairs < hd/2; without `head_dim`, whenever rope_pairs is given)."""
        dropped = self.rope_pairs is not None and (head_dim is None or self.rope_pairs < head_dim // 2)
        return self.rope_selection == "rorope" or (dropped and self.rope_selection in (None, "2norm"))

    def _check_values(self) -> None:
        if self.values is not None and self.values not in VALUES:
            raise ValueError(
                f"values={self.values!r} is not a value mode; allowed: None (stock values) or 'merged' (the value is "
                "x itself, shared by every head, with M_h = Wv_h Wo_h). For low-rank values pass value_rank=r_v."
            )
        if self.mode == "latent" and (self.values is not None or self.value_rank is not None):
            raise ValueError(
                f"values={self.values!r} / value_rank={self.value_rank!r} was given with mode='latent', whose latent "
                "already serves as keys and values (its rank sets both). Drop them, or use mode='covariance' or "
                "'lowrank' with values='merged' or value_rank=r_v."
            )
        if self.value_rank is not None:
            if self.values is not None:
                raise ValueError(
                    f"value_rank={self.value_rank!r} was given with values='merged', which holds each M_h whole "
                    "(d x d). Pass one of them: values='merged' (exact, cache x once) or value_rank=r_v."
                )
            self.value_rank = self._integer_rank(self.value_rank, "value_rank")

    def _integer_rank(self, rank, name: str) -> int:
        if name == "value_rank":
            allowed = ("value_rank takes an integer r_v with 1 <= r_v <= the head size (r_v = head size, e.g. 64 for "
                       "GPT-2, is exact), or values='merged' for M_h whole")
        else:
            exact = "r = head size is exact" if self.mode == "lowrank" else "r_c = hidden size is exact"
            allowed = (f"mode={self.mode!r} takes an integer rank >= 1 ({exact}), a dict {{block: rank}}, or a float "
                       "in (0, 1) (the spectral energy to keep)")
        if isinstance(rank, bool) or not isinstance(rank, Integral):
            raise ValueError(f"{name}={rank!r} ({type(rank).__name__}) is not an integer; {allowed}.")
        if rank < 1:
            raise ValueError(f"{name}={rank} is below 1; {allowed}.")
        return int(rank)

    @staticmethod
    def _block(index) -> int:
        """A block index from a rank dict (ints, or digit strings as JSON writes dict keys)."""
        if isinstance(index, str) and index.isdigit():
            return int(index)
        if isinstance(index, bool) or not isinstance(index, Integral):
            raise ValueError(f"rank dict key {index!r} is not a block index; pass {{0: 32, 1: 16, ...}}.")
        return int(index)

    def rank_for(self, layer: int) -> int | None:
        """The rank of block `layer` (None for covariance)."""
        return self.rank[layer] if isinstance(self.rank, dict) else self.rank

    def _check_init(self) -> None:
        if self.init is not None and (not isinstance(self.init, str) or self.init not in INITS):
            raise ValueError(
                f"init={self.init!r} is not a seeding method; allowed: {', '.join(repr(i) for i in INITS)}. "
                "Use init='svd' (best rank-r factors of the weights, no data) or init='whitened' with "
                "calibration=... (least score error on real activations)."
            )
        if self.mode == "covariance" and self.value_rank is None:
            if self.init == "whitened":
                raise ValueError(
                    "init='whitened' was given with mode='covariance', which is exact (S_h = Wq_h Wk_hᵀ is held "
                    "whole, nothing is approximated, so there is nothing to fit to activations). Drop init, or "
                    "use mode='lowrank' with rank=r and init='whitened'."
                )
            self.init = None
        elif self.init is None:
            self.init = "svd"

    def check_calibration(self, calibration) -> None:
        """Check that calibration data is given exactly when the seeding uses it (init='whitened').

        Raises:
            ValueError: init='whitened' without calibration, or calibration with init='svd' / covariance.
        """
        given = calibration is not None
        what = f"calibration (a {type(calibration).__name__})"
        if self.init == "whitened" and not given:
            raise ValueError(
                "init='whitened' needs calibration=...: an iterable of batches of token ids (LongTensors (B, T), "
                "lists of ids, or dicts with 'input_ids', e.g. a DataLoader or a tokenized dataset) to measure "
                "the attention inputs on. Pass e.g. 16 blocks of 256 tokens of training text, or use init='svd'."
            )
        if self.rope_pairs is not None or self.rope_selection is not None:
            return  # a rotary patch: the rules' data needs are checked by patch_model once the head size is known
        if self.mode == "covariance" and self.value_rank is None and given:
            raise ValueError(
                f"{what} was given with mode='covariance', which is exact and uses no data. Drop calibration, "
                "or use mode='lowrank', rank=r, init='whitened' to fit low-rank factors to it."
            )
        if self.init == "svd" and given:
            raise ValueError(
                f"{what} was given with init='svd', which factors the weights alone and ignores data. Pass "
                "init='whitened' to use the calibration activations, or drop calibration."
            )

    def check_against(self, hidden_size: int, num_layers: int, num_heads: int | None = None) -> None:
        """Check rank, value_rank (given `num_heads`) and layers against a model's sizes and resolve `layers`
        (None -> all blocks).

        Raises:
            ValueError: rank above the hidden size, value_rank above the head size, or a layer index out of range /
                not an integer.
        """
        head_dim = hidden_size // num_heads if num_heads else None
        if head_dim and self.value_rank is not None and self.value_rank > head_dim:
            raise ValueError(
                f"value_rank={self.value_rank} exceeds the head size {head_dim}: M_h = Wv_h Wo_h has rank <= {head_dim}, "
                f"so r_v = {head_dim} is already exact. Use 1 <= value_rank <= {head_dim}, or values='merged'."
            )
        if isinstance(self.rank, dict) and not all(0 <= i < num_layers for i in self.rank):
            raise ValueError(
                f"rank={self.rank!r} names blocks outside this model's 0..{num_layers - 1}; key each rank by a block "
                "index of the model."
            )
        ranks = self.rank.values() if isinstance(self.rank, dict) else [self.rank]
        if any(r is not None and r > hidden_size for r in ranks):
            raise ValueError(
                f"rank={self.rank} exceeds the hidden size {hidden_size}: S_h (lowrank) and the latent (latent) are at "
                f"most {hidden_size} wide, so a rank above {hidden_size} adds nothing. Use 1 <= rank <= {hidden_size}"
                f"{', or mode=' + repr('covariance') if self.mode == 'lowrank' else ' (the hidden size is exact)'}."
            )
        if self.layers is None:
            self.layers = list(range(num_layers))
            return
        given = self.layers
        if isinstance(given, (str, bytes)) or not hasattr(given, "__iter__"):
            raise ValueError(f"layers={given!r} is not a list of block indices; pass e.g. layers=[0, 1] or None (all).")
        if not given:
            raise ValueError(
                f"layers={given!r} names no block; pass a non-empty list of block indices in 0..{num_layers - 1}, or "
                "None for all blocks. (To leave the model stock, do not patch it.)"
            )
        bad = [i for i in given if isinstance(i, bool) or not isinstance(i, Integral) or not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"layers={list(given)!r} has indices out of range {bad!r}; this model has {num_layers} blocks, so "
                f"allowed indices are 0..{num_layers - 1}. Pass a non-empty list of those, or None for all."
            )
        self.layers = sorted({int(i) for i in given})

    def to_dict(self) -> dict:
        """JSON-ready dict (what `config.merged_attn` holds): a per-block rank as {"block": r}; energy if used; the
        checkpoint format (`FORMAT_VERSION`) the weights saved with it are in."""
        record = asdict(self)
        if isinstance(self.rank, dict):
            record["rank"] = {str(i): r for i, r in sorted(self.rank.items())}
        for optional in ("energy", "values", "value_rank", "rope_pairs", "rope_selection", "rope"):  # absent unless used: older records stay as they were
            if record[optional] is None:
                del record[optional]
        record["format_version"] = FORMAT_VERSION
        return record


def check_record(record, num_layers: int, hidden_size: int, num_heads: int | None = None) -> PatchConfig:
    """Rebuild and check the `PatchConfig` of a checkpoint's `merged_attn` record against the model's sizes.

    The same validation as `patch_model` (through `PatchConfig`), plus what only a saved record can get wrong:
    layers must be a list (with a per-block rank, exactly its keys), the energy must sit next to a per-block rank,
    the format version (absent in records from before it was recorded) must be one this code reads.

    Raises:
        CorruptRecordError: naming the bad field and saying that the checkpoint is corrupted, or that it was saved
            by a newer hf_merged_attn.
    """

    def corrupt(text: str) -> CorruptRecordError:
        return CorruptRecordError(
            f"{text}; the checkpoint is corrupted. Re-save it from the patched model with save_pretrained."
        )

    if not isinstance(record, dict):
        raise corrupt(
            f"merged_attn={record!r} is not a patch record (a dict with mode, rank and layers as written by "
            "save_pretrained on a patched model)"
        )
    version = record.get("format_version")
    if version is not None and (type(version) is not int or version < 1):
        raise corrupt(f"merged_attn.format_version={version!r} must be an integer from 1 to {FORMAT_VERSION}, or absent")
    if version is not None and version > FORMAT_VERSION:
        raise CorruptRecordError(
            f"merged_attn.format_version={version} is newer than this hf_merged_attn reads ({FORMAT_VERSION}): the "
            "checkpoint was saved by a newer version of it. Upgrade hf_merged_attn (pip install -U hf_merged_attn)."
        )
    mode, rank, layers, energy = record.get("mode"), record.get("rank"), record.get("layers"), record.get("energy")
    if not (isinstance(layers, list) and layers and all(type(i) is int and 0 <= i < num_layers for i in layers)):
        raise corrupt(f"merged_attn.layers={layers!r} must be a non-empty list of block indices in 0..{num_layers - 1}")
    if isinstance(rank, dict) and sorted(rank) != sorted(str(i) for i in layers):
        raise corrupt(f"merged_attn.rank={rank!r} must name exactly the blocks in merged_attn.layers={layers!r}")
    if energy is not None and not (isinstance(energy, float) and 0 < energy < 1 and isinstance(rank, dict)):
        raise corrupt(f"merged_attn.energy={energy!r} must be absent or a number in (0, 1) next to a per-block rank")
    try:
        patch = PatchConfig(
            mode, rank, None if isinstance(rank, dict) else layers, record.get("init"), record.get("values"),
            record.get("value_rank"), record.get("rope_pairs"), record.get("rope_selection"), record.get("rope"),
        )
        patch.check_against(hidden_size, num_layers, num_heads)
    except ValueError as error:
        raise corrupt(f"merged_attn: {error}".rstrip(".")) from error
    patch.energy = energy
    return patch


# ---------------------------------------------------------------------------------------------------------------
# What a family adapter tells the package (the registry entry)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ArchitectureSpec:
    """One model family: how to find, read, rebuild and save its self-attention. The registry entry.

    Checklist for a new family (an adapter file `modeling_merged_<family>.py` beside the GPT-2 one):
      1. Check that merging is exact: positions must not act between the query and key projections (learned
         absolute positions, or a bias added to the scores as ALiBi is). Rotary families cannot be merged.
      2. `MergedXConfig(XConfig)` with `model_type = "merged_<x>"` and `merged_attn: dict | None = None`.
      3. `MergedXAttention(MergedAttention, XAttention)`: `stock_settings(config, layer_idx)` gives the sizes, the
         family's scaling rule, causality and dropout (its default reads the common config names; override it
         where the family differs, e.g. GPT-2's layer-dependent scaling); `output_name` names the stock output projection the merged
         module keeps (shared by reference; None where it lives outside the self-attention module, as in BERT);
         `forward` keeps the stock signature and return value and calls `self.attend(...)` (which applies the output
         projection the module owns, and the per-head value bias of merged values), passing any additive
         score bias (ALiBi) as `score_bias`.
      4. `read_weights(stock_attention)` -> the canonical per-head dict {wq, wk, wv: (H, d, hd); bq, bk, bv:
         (H, hd)} and `write_weights(stock_attention, parts)`, its inverse (for export back to stock).
      5. `merged_classes(spec, (StockClass, auto_name), ...)` for the family's model classes, each assigned to a
         module-level name (`MergedXForCausalLM`), so checkpoints load through the Auto classes and remote code.
      6. One entry in `registry.REGISTRY`, one row in the families table of `tests/families.py` and README.md.

    Attributes:
        family: display name ("GPT-2").
        model_types: the stock `config.model_type` values this entry patches.
        attention_class: the stock self-attention class (found with isinstance).
        merged_attention_class: the adapter's subclass of it and of `MergedAttention`.
        config_class: the merged config class (its `model_type` is "merged_<x>").
        block_class: the transformer block (for FSDP wrapping).
        causal: decoder (causal) or encoder (bidirectional) attention.
        has_cache: whether the family keeps a KV cache when generating.
        read_weights, write_weights: stock module <-> canonical per-head weights (see the checklist).
        new_stock_attention: (config, layer_idx) -> an empty stock attention module, for export.
        qkv_names: the stock attention's query/key/value submodules (what `read_weights` reads; like-for-like LoRA
            targets on a stock model).
        rotary: positions are rotary (RoPE, grouped-query attention): only the latent mode applies, with kept
            rotary pairs (`rotary_latent.RotaryLatentAttention`).
        check_model: raises NotImplementedError for variants of the family that are not supported.
        max_length: config -> the longest input the model takes (None: no limit, e.g. ALiBi); default
            config.max_position_embeddings. RoBERTa's positions start after its padding index, so it takes fewer.
        model_classes: stock model class -> (merged class, Auto class name or None), filled by `merged_class`.
    """

    family: str
    model_types: tuple[str, ...]
    attention_class: type
    merged_attention_class: type
    config_class: type
    block_class: type
    read_weights: Callable[[nn.Module], dict]
    write_weights: Callable[[nn.Module, dict], None]
    new_stock_attention: Callable[..., nn.Module]
    qkv_names: tuple[str, ...] = ()
    rotary: bool = False
    causal: bool = True
    has_cache: bool = True
    check_model: Callable[[object], None] = lambda config: None
    max_length: Callable[[object], int | None] = lambda config: getattr(config, "max_position_embeddings", None)
    model_classes: dict = field(default_factory=dict)

    def stock_attentions(self, model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
        """(parent, attribute, module) for each stock (not yet merged) self-attention of `model`, in order."""
        return [
            (parent, name, child)
            for parent in model.modules()
            for name, child in parent.named_children()
            if isinstance(child, self.attention_class) and not isinstance(child, MergedAttention)
            and not getattr(child, "is_cross_attention", False)
        ]


def heads_to_linear(per_head: torch.Tensor) -> torch.Tensor:
    """(H, d, k) per-head maps x -> x @ W_h as one nn.Linear weight (H*k, d)."""
    heads, d, k = per_head.shape
    return per_head.mT.reshape(heads * k, d)  # (H, k, d) -> (H*k, d)


def linear_to_heads(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of `heads_to_linear`: an nn.Linear weight (H*k, d) -> per-head maps (H, d, k)."""
    _, d = weight.shape
    return weight.reshape(num_heads, -1, d).mT  # (H*k, d) -> (H, k, d) -> (H, d, k)


def read_linear_qkv(query: nn.Linear, key: nn.Linear, value: nn.Linear, num_heads: int) -> dict[str, torch.Tensor]:
    """The canonical per-head weights of separate q/k/v `nn.Linear` projections with biases (detached views)."""
    parts = {}
    for name, linear in (("q", query), ("k", key), ("v", value)):
        parts[f"w{name}"] = linear_to_heads(linear.weight.detach(), num_heads)  # (H, d, hd)
        parts[f"b{name}"] = linear.bias.detach().view(num_heads, -1)  # (H, hd)
    return parts


@torch.no_grad()
def write_linear_qkv(query: nn.Linear, key: nn.Linear, value: nn.Linear, parts: dict[str, torch.Tensor]) -> None:
    """Inverse of `read_linear_qkv`: write canonical per-head weights into q/k/v `nn.Linear` projections."""
    for name, linear in (("q", query), ("k", key), ("v", value)):
        linear.weight.copy_(heads_to_linear(parts[f"w{name}"]))
        linear.bias.copy_(parts[f"b{name}"].reshape(-1))


def read_output(output: nn.Module, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head rows Wo_h (H, hd, d) and the bias bo (d,) of a stock output projection: an nn.Linear (out, in) or a
    transformers Conv1D (in, out), as GPT-2's c_proj. Head h's attention output multiplies Wo_h."""
    weight = output.weight.detach()
    rows = weight.mT if isinstance(output, nn.Linear) else weight  # (in, out) = (H*hd, d)
    return rows.reshape(num_heads, -1, rows.shape[1]), output.bias.detach()


@torch.no_grad()
def write_output(output: nn.Module, wo: torch.Tensor, bo: torch.Tensor) -> None:
    """Inverse of `read_output`."""
    rows = wo.reshape(-1, wo.shape[-1])  # (H*hd, d)
    output.weight.copy_(rows.mT if isinstance(output, nn.Linear) else rows)
    output.bias.copy_(bo)


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


# The map of each probed (wrapped) up-projection, kept per state: {module: (state, what it pins, weight, bias)}
_PROBED_MAPS = WeakIdKeyDictionary()


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` runs more than its modules' own forward: a forward hook or pre-hook on it or on a module
    inside it, or a forward replaced on an instance (as accelerate's offloading does). Global hooks on every module
    (`register_module_forward_hook`: profilers, FlopCounterMode's module tracker) observe and are not counted: the
    decode then runs as it does without them."""
    stack = [module]
    while stack:  # every module inside (module.modules() without its names: this runs in every forward)
        m = stack.pop()
        if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
            return True
        stack.extend(child for child in m._modules.values() if child is not None)
    return False


def _linear_map(module: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias (out,) or None) of an up-projection that the absorbed decode multiplies by instead of
    calling it on the cached latent `like` (..., in) — never a hooked one (`_hooked`: the decode calls those).

    A plain nn.Linear gives its own tensors. Anything else holding a linear map (a peft LoRA / DoRA layer, a dynamically
    quantized Linear, which has no parameters) is read by probing it with 0 and the unit vectors, in the latent's dtype
    and device, so that what it adds acts in the absorbed decode as in the expanded forward. The probed map is kept
    per state of the module (`_module_state`; and per dtype and device of the latent, inside or outside
    inference_mode) and probed again only when that state changes: after set_adapter, disable_adapter, a training
    step or any in-place update of its weights.
    """
    if type(module).forward is nn.Linear.forward:
        return module.weight, module.bias
    state, pinned = (None, None) if torch.compiler.is_compiling() else _module_state(module)
    if state is not None:  # a map probed in another dtype (autocast) or under inference_mode is not this call's
        state = (like.dtype, like.device, torch.is_inference_mode_enabled(), state)
    kept = _PROBED_MAPS.get(module) if state is not None else None
    if kept is not None and kept[0] == state:
        return kept[2:]
    width = like.shape[-1]
    probe = torch.cat([like.new_zeros(1, width), torch.eye(width, dtype=like.dtype, device=like.device)])
    out = module(probe)  # (1 + in, out): row 0 = the bias, row 1 + i = column i of the weight + the bias
    weight, bias = (out[1:] - out[:1]).mT, out[0]
    if state is not None:  # kept in nn.Linear's layout: the decode's products then read it as a plain weight
        weight = weight.contiguous()
        _PROBED_MAPS[module] = (state, pinned, weight, bias)
    return weight, bias


def _module_state(module: nn.Module) -> tuple[tuple | None, list]:
    """What a probed module's map depends on, as a tuple that compares equal while none of it changes — or None where
    the map must be probed at every call: while gradients flow to its parameters, or while a dropout inside it acts
    (an adapter's dropout in training mode draws anew at every call) — and the storages it names by address.

    Per module inside it: train / eval; each parameter and buffer by storage address and version counter (an in-place
    update such as an optimizer step moves the counter, a replaced tensor the address; the storages are returned to
    be held with the map, so that no new tensor takes an address the state names); for a peft adapter layer (it wraps
    a `base_layer`) its active adapters, disabled flag, merged adapters and scaling; a torch.ao quantized Linear's
    packed weights by identity (also held; `set_weight_bias` and `load_state_dict` replace them).
    """
    grad, state, pinned, stack = torch.is_grad_enabled(), [], [], [module]
    while stack:  # every module inside (module.modules() without its names: this runs in every decode step)
        m = stack.pop()
        stack.extend(child for child in m._modules.values() if child is not None)
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return None, []
        state.append(m.training)
        for tensors in (m._parameters, m._buffers):
            for tensor in tensors.values():
                if tensor is not None:
                    if grad and tensor.requires_grad:
                        return None, []
                    state.append((tensor.data_ptr(), None if tensor.is_inference() else tensor._version))
                    pinned.append(_storage(tensor))
        if "base_layer" in m._modules:  # peft's tuner layers (LoRA, DoRA, ...)
            settings = ("active_adapters", "disable_adapters", "merged_adapters", "scaling")
            state.append(repr([getattr(m, name, None) for name in settings]))
        packed = m.__dict__.get("_packed_params")  # torch.ao's quantized Linear: weights outside any tensor attribute
        if packed is not None:
            state.append(id(packed))
            pinned.append(packed)
    return tuple(state), pinned


def _storage(tensor: torch.Tensor):
    """The storage behind `tensor` (which keeps its address taken while held), or the tensor itself where it has no
    storage of its own to give (wrapper subclasses)."""
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return tensor


def _code_reading_layer(cache, layer_idx: int):
    """The cache's layer `layer_idx` if it can be attended from its codes (`LatentQuantizedLayer.attend_absorbed`)."""
    layers = getattr(cache, "layers", None)
    layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
    return layer if getattr(layer, "reads_codes", False) else None


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
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    if mask is not None and mask.dtype == torch.bool:
        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return weights
