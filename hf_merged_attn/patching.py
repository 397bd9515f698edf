"""Patch a model of any registered family in place (seeded from its own weights), and export it back to stock."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import collect_attention_moments, collect_rotary_statistics
from .export import (  # noqa: F401
    EXACT_EXPORT_TOL,
    homogeneous_factors,
    stock_attention,
    unpatch_model,
)
from .merged_attention import ArchitectureSpec, MergedAttention, PatchConfig
from .merged_models import is_hub_id
from .quantized_cache import GENERATION_FIELD, QuantizationSettings, cache_problem
from .registry import spec_for_model
from .seeded import (  # noqa: F401  (the seeding of one layer; names kept importable from here)
    EXACT_ROPE_SEEDING,
    seeded_attention,
    seeded_exact_rope_attention,
    seeded_rotary_attention,
    seeded_weights,
)
from .seeding import latent_singular_values, qk_singular_values, rank_for_energy
from .swapping import _adapters_on, _forget_merged_names, _set_class, _swap

logger = logging.getLogger(__name__)


def _resolve_rotary(patch: PatchConfig, spec: ArchitectureSpec, model: nn.Module, calibration) -> bool:
    """Check a patch of a rotary family and fill in its rotary defaults (all pairs; '2norm' when pairs are dropped):
    r_c within what the latent can hold, calibration given where a rule or the seeding reads it. Returns whether the
    seeding reads calibration data (the kept-pair rule or whitening)."""
    config = model.config
    if patch.rope is None:  # the route that won (docs/rotary_smollm2.md): exact unless pairs are asked for
        patch.rope = "partial" if patch.rope_pairs is not None or patch.rope_selection is not None else "exact"
    if patch.mode != "latent":
        raise NotImplementedError(
            f"mode={patch.mode!r} on {spec.family} ({type(model).__name__}): its positions are rotary, and the rotation "
            "between Wq and Wk makes Wq·Wkᵀ a different matrix at every offset, so no single S_h (covariance, lowrank) "
            "exists; merged values would cache x (d numbers) where grouped-query attention caches 2·G·hd. Use "
            "mode='latent', rank=r_c, rope_pairs=r: a shared latent for the values and the keys of the pairs that "
            "lose their rotation, plus r rotary pairs per KV head."
        )
    if patch.energy is not None:
        raise ValueError(
            f"rank={patch.energy} (a spectral-energy target) is not available on rotary models yet: pass an integer "
            "r_c (e.g. MHA2MLA's budgets: r_c = G·d_kv with d_kv = 32, 16 or 8)."
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    half = head_dim // 2
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if patch.rope == "exact":
        return _resolve_exact_rope(patch, config, kv_heads, head_dim)
    if patch.rope_pairs is not None and patch.rope_pairs > half:
        raise ValueError(
            f"rope_pairs={patch.rope_pairs} exceeds hd/2 = {half} (head size {head_dim}): a head has {half} frequency "
            f"pairs. Use 0 <= rope_pairs <= {half} ({half} keeps every pair rotated: exact)."
        )
    if patch.rope_pairs is None and patch.rope_selection not in (None, "rorope"):
        logger.warning("rope_selection=%r was given without rope_pairs: every pair stays rotated (the default, "
                       "rope_pairs=%d), so no rule applies. Pass rope_pairs=r < %d to drop pairs.",
                       patch.rope_selection, half, half)
    needs_data = patch.init == "whitened" or patch.rope_needs_calibration(head_dim)
    if calibration is None and patch.rope_needs_calibration(head_dim):
        rule = patch.rope_selection or "2norm"
        default = " (the default when rope_pairs drops pairs)" if patch.rope_selection is None else ""
        raise ValueError(
            f"rope_selection={rule!r}{default} chooses the kept rotary pairs from calibration activations; pass "
            "calibration=... (e.g. 16 blocks of 256 tokens of text), or a data-free rule: rope_selection='high', "
            "'low' or 'uniform'."
        )
    if patch.rope_pairs is None:
        patch.rope_pairs = half
    if patch.rope_selection is None and patch.rope_pairs < half:
        patch.rope_selection = "2norm"
    if patch.rope_pairs == half and patch.rope_selection in ("2norm", "high", "low", "uniform"):
        patch.rope_selection = None  # every pair of every head is kept: the rules agree
    widest = kv_heads * (2 * head_dim - 2 * patch.rope_pairs)  # NoPE keys + values: what a latent can hold
    ranks = patch.rank.values() if isinstance(patch.rank, dict) else [patch.rank]
    too_wide = [r for r in ranks if widest < r < config.hidden_size]
    if too_wide:
        raise ValueError(
            f"rank={patch.rank} exceeds {widest}, the width of the NoPE keys and the values together (G·(2·hd − 2r) = "
            f"{kv_heads}·(2·{head_dim} − 2·{patch.rope_pairs})): a latent of {widest} already holds them exactly. Use "
            f"rank <= {widest} (or the hidden size {config.hidden_size})."
        )
    return needs_data


def _check_seeding(seeding, rope: str | None) -> None:
    """Refuse seeding options that are not a dict of `EXACT_ROPE_SEEDING`'s keys, or given to a patch whose resolved
    route is not rope='exact' (None: not a rotary model)."""
    if seeding is None:
        return
    unknown = sorted(set(seeding) - set(EXACT_ROPE_SEEDING)) if isinstance(seeding, dict) else None
    if unknown is None or unknown or rope != "exact":
        route = (f"this patch has rope={rope!r}: pass rope='exact'" if rope is not None
                 else "this model is not rotary, so no seeding option applies: drop seeding")
        raise ValueError(
            f"seeding={seeding!r}: a dict of rope='exact' seeding options ({', '.join(EXACT_ROPE_SEEDING)})"
            + (f"; unknown: {unknown}." if unknown else f"; {route}." if unknown is not None else ".")
        )


def _resolve_exact_rope(patch: PatchConfig, config, kv_heads: int, head_dim: int) -> bool:
    """Check an exact-RoPE latent patch (rope="exact"): r_c within 2·G·hd (or the hidden size), a RoPE whose
    frequencies do not depend on the length. Returns whether the seeding reads calibration data (whitening)."""
    from .exact_rope import LENGTH_DEPENDENT_ROPE, rope_type_of

    rope_type = rope_type_of(config)
    if rope_type in LENGTH_DEPENDENT_ROPE:
        raise ValueError(
            f"rope='exact' rebuilds every cached key and rotates it at decode time, but this model's RoPE type "
            f"{rope_type!r} changes its frequencies with the sequence length, so a rebuilt key would not get the "
            "rotation stock gave it. Use rope='partial' (rope_pairs=...), or a model with a fixed RoPE."
        )
    widest = 2 * kv_heads * head_dim  # the pre-RoPE keys and the values: what a latent can hold
    ranks = patch.rank.values() if isinstance(patch.rank, dict) else [patch.rank]
    too_wide = [r for r in ranks if r is not None and widest < r < config.hidden_size]
    if too_wide:
        raise ValueError(
            f"rank={patch.rank} exceeds {widest}, the width of the keys and the values together (2·G·hd = "
            f"2·{kv_heads}·{head_dim}): a latent of {widest} already holds them exactly. Use rank <= {widest}."
        )
    return patch.init == "whitened"


def _rank_for_energy(spec: ArchitectureSpec, attn: nn.Module, mode: str, energy: float) -> int:
    """The smallest rank at which the seed keeps `energy` of the spectrum: of every head's S̃_h (lowrank), of the
    layer's balanced stacked [Wk | Wv] (latent)."""
    parts = spec.read_weights(attn)
    if mode == "latent":
        return rank_for_energy(latent_singular_values(parts["wk"], parts["wv"]), energy)
    return rank_for_energy(qk_singular_values(parts["wq"], parts["bq"], parts["wk"]), energy)


def patch_model(
    model: nn.Module,
    mode: str = "covariance",
    *,
    rank: int | float | dict[int, int] | None = None,
    layers: list[int] | None = None,
    init: str = "svd",
    calibration=None,
    values: str | None = None,
    value_rank: int | None = None,
    rope_pairs: int | None = None,
    rope_selection: str | None = None,
    rope: str | None = None,
    balance_kv: bool = True,
    seeding: dict | None = None,
) -> nn.Module:
    """Replace a model's self-attention with merged query–key attention, seeded to compute exactly what it did.

    Works on every model class of a registered family (GPT-2, OPT, BLOOM, BERT, RoBERTa: see
    `registry.SPECS`), found from `model.config.model_type`. The model is changed in place and returned: its
    self-attention modules are swapped, its class becomes the matching `Merged*` subclass and its config the
    merged config recording the patch in `config.merged_attn`, so `save_pretrained` / `push_to_hub` write a
    checkpoint that loads back.

    Args:
        model: a stock transformers model of a registered family.
        mode: "covariance" — one d x d matrix S_h = Wq_h Wk_hᵀ per head (exact); or "lowrank" — S_h ≈ U_h V_hᵀ
            at rank r (exact for r = head size, best rank-r approximation below, extra capacity above).
        rank: required for "lowrank", None for "covariance". An int r (1 <= r <= hidden size) for every block;
            a dict {block index: r} for a rank per block (its keys are the patched blocks); or a float in (0, 1),
            a spectral-energy target: each block gets the smallest rank at which every one of its heads keeps
            that fraction of Σσ² of its S̃_h, at most the head size. The ranks depend on the weights only;
            `init` then chooses the factors at those ranks. The resolved ranks are recorded as
            `config.merged_attn["rank"]` = {"block": r} with `"energy"`, so checkpoints reload.
        layers: block indices to patch, any iterable (default: all).
        init: how "lowrank" factors below the head size are seeded. "svd" (default): best rank-r approximation
            of each head's S̃_h = [S_h; u_h] in Frobenius norm (weights only). "whitened": the rank-r factors
            with the least error of the SCORES on `calibration` activations — SVD of L_qᵀ S̃_h L_k, with
            Cholesky factors of the damped second moments of the attention input [x, 1] (query side) and x
            (key side), un-whitened (see `seeding.whitened_lowrank_from_qk`). For rank >= head size both are
            exact and identical. Recorded in `config.merged_attn["init"]` (None for covariance).
        calibration: for init="whitened" only: an iterable of batches of token ids (LongTensors (B, T), lists,
            or dicts with 'input_ids' and optionally 'attention_mask' — a DataLoader or tokenized dataset). The
            stock model is run over it once (eval, no gradients) before any weight is changed.
        values: None (stock values) or "merged": the value is the layer input x itself, shared by every head, and
            head h holds M_h = Wv_h Wo_h (d x d) in the output projection, with the value bias folded into its bias.
            Exact. With covariance keys and values are the same tensor, cached ONCE per layer: (B, 1, T, d), half of
            stock's K + V. Decoders only (the output projection must be inside the attention module).
        value_rank: r_v, 1 <= r_v <= head size, for low-rank values M_h ≈ P_h Q_hᵀ (V cache (B, H, T, r_v); exact at
            r_v = head size, best rank-r_v below, whitened with init="whitened"). With covariance or lowrank.
        rope_pairs: rotary families (Llama, Qwen2, Mistral) only, mode "latent": r, the frequency pairs per KV head
            kept rotated with rope="partial" (given, they select that route; hd/2 keeps all, exact with r_c covering the
            values). The other pairs lose their rotation
            (a change of the model: fine-tune to recover) and their keys join the values in the latent. The layer
            then caches r_c + G·2r numbers per token (stock: 2·G·hd).
        rope_selection: which pairs stay rotated: "2norm" (default when pairs are dropped; calibration's largest
            query·key pair norms), "high", "low", "uniform" (data-free), or "rorope" (TransMLA: a PCA across the KV
            heads per frequency on calibration data, the strongest G·r mixed pairs kept as ONE rotary key shared by
            all heads).
        rope: rotary families, mode "latent": "exact" (the default unless rope_pairs / rope_selection are given) keeps
            every rotation — the latent c = x·W_c holds the keys BEFORE RoPE and the values, keys are rebuilt
            (c·Bk + bk) and rotated at each cached token's own position; the cache holds c and the positions. Exact
            at r_c = 2·G·hd, and `unpatch_model` returns a stock model computing it at any r_c. "partial": the
            rope_pairs route above (MHA2MLA; pairs that lose their rotation change the model).
        balance_kv: latent mode: scale the keys and the values to equal norms before the joint SVD that seeds the
            latent (default: neither side owns the SVD); False fits [Wk | Wv] as it is (an ablation).
        seeding: rope="exact" only, options of its seeding (defaults `EXACT_ROPE_SEEDING`, the measured best):
            {"damping": λ} the whitening's relative ridge (Σ_x + λ·mean(diag Σ_x)·I: larger λ moves the seed toward the
            weights-only PCA), {"query_aware_keys": True} weighs each key dimension by its KV group's offset-averaged
            query energy when choosing the latent (`seeding.query_pair_energy`), {"rotate_latent": True} mixes c by a
            fixed orthogonal matrix (`seeding.orthogonal_mix`, folded into W_c, Bk, Bv: exact in full precision) so
            that quantized codes see evener coordinates.

    New weights take `requires_grad` from the stock weights they are seeded from (a frozen model stays frozen, a
    PEFT model keeps its frozen / trainable split). A peft model whose adapters sit on the replaced attention weights
    is refused (merge them first); adapters elsewhere are kept. A quantized-cache default left in the model's
    generation config (`use_quantized_latent_cache` on an earlier patch, or a saved generation_config.json) that this
    patch cannot decode with is dropped, with a warning giving the reason.

    Returns:
        The same `model` object, patched.

    Raises:
        TypeError: `model` is not an nn.Module (e.g. a model name: load the model first).
        ValueError: bad mode / rank / layers / init / calibration (all before any weight is changed), a model
            that is already patched, or peft adapters on the attention weights the patch replaces (merge them first).
        NotImplementedError: an unsupported family (rotary ones with the reason), or an unsupported variant of
            a supported one (GPT-2 with cross-attention, a BERT decoder, ...).
    """
    patch = PatchConfig(mode, rank, layers, init, values, value_rank, rope_pairs, rope_selection, rope)
    spec, patched, reads_data = resolve_patch(model, patch, calibration, seeding)  # checks only: nothing changed yet
    statistics = calibrate(model, patch, calibration, reads_data)  # one pass of the stock model, if the seed reads data
    # The patched model gets its own copy of the config: another model built from the same config object must not
    # start reporting a patch (and a merged model_type) it does not have.
    config = copy.deepcopy(model.config)
    # every new module is built before the first swap: a seeding error leaves the model untouched
    seeded = [(parent, name, old, seed_layer(spec, old, config, patch, statistics, balance_kv, seeding))
              for parent, name, old in patched]
    install(model, seeded, config)
    record_patch(model, spec, patch, config, statistics.tokens)
    return model


@dataclass
class CalibrationStatistics:
    """What the seeding reads from a pass of the stock model over calibration text (empty without one)."""

    moments: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> E[x̃ᵀx̃] of its attention input
    tokens: int | None = None  # calibration tokens seen
    pair_norms: dict[int, tuple] = field(default_factory=dict)  # layer -> rotary pair norms ('2norm')


def resolve_patch(model: nn.Module, patch: PatchConfig, calibration, seeding: dict | None = None
                  ) -> tuple[ArchitectureSpec, list[tuple[nn.Module, str, nn.Module]], bool]:
    """Step 1 of `patch_model`: check `patch` against `model` (family, sizes, rotary route, adapters, calibration) and
    resolve what it leaves open (layers, rotary defaults, energy targets to ranks). Changes nothing in the model.

    Returns:
        (the family's registry entry, [(parent, name, stock attention)] of the layers to patch, whether the seeding
        reads calibration data).
    """
    if not isinstance(model, nn.Module):
        load = f"AutoModelForCausalLM.from_pretrained({model if isinstance(model, str) else 'gpt2'!r})"
        raise TypeError(
            f"patch_model takes a transformers model (an nn.Module); got {model!r} ({type(model).__name__}). Load "
            f"the model first, e.g. model = {load}, then patch_model(model, ...)."
        )
    patch.check_calibration(calibration)
    if any(isinstance(module, MergedAttention) for module in model.modules()):
        raise ValueError(
            f"{type(model).__name__} is already patched (config.merged_attn="
            f"{getattr(model.config, 'merged_attn', None)}); patching twice would seed from merged weights. "
            "Patch a fresh copy of the stock model, or call unpatch_model(model) first."
        )
    spec = spec_for_model(model)
    config = model.config
    spec.check_model(config)
    reads_data = patch.init == "whitened"  # whether the seeding reads calibration data
    if spec.rotary:
        reads_data = _resolve_rotary(patch, spec, model, calibration)
    elif patch.rope_pairs is not None or patch.rope_selection is not None or patch.rope is not None:
        raise ValueError(
            f"rope={patch.rope!r} / rope_pairs={patch.rope_pairs!r} / rope_selection={patch.rope_selection!r} were given for "
            f"{type(model).__name__} ({spec.family}), whose positions are not rotary: there is no rotation to keep. "
            "Drop them."
        )
    _check_seeding(seeding, patch.rope)  # once the route is resolved (None on a model without rotary positions)
    found = spec.stock_attentions(model)
    if not found:
        raise ValueError(
            f"{type(model).__name__} (model_type {config.model_type!r}) has no {spec.attention_class.__name__} "
            "module to patch. Pass the transformers model itself (e.g. AutoModel.from_pretrained(...)), not a part "
            "of it."
        )
    patch.check_against(config.hidden_size, len(found), config.num_attention_heads)
    patched = [(parent, name, old) for parent, name, old in found if old.layer_idx in patch.layers]
    _refuse_adapters(model, spec, patch, [old for _, _, old in patched])
    if patch.energy is not None:
        if any(p.is_meta for _, _, old in patched for p in old.parameters()):
            raise ValueError(
                f"rank={patch.energy} (a spectral-energy target) picks each block's rank from the singular values of "
                f"its weights, but {type(model).__name__}'s weights are on the meta device (not loaded). Load the "
                "weights first, or pass an integer rank or a dict {block: rank}."
            )
        patch.rank = {old.layer_idx: _rank_for_energy(spec, old, patch.mode, patch.energy) for _, _, old in patched}
    return spec, patched, reads_data


def calibrate(model: nn.Module, patch: PatchConfig, calibration, reads_data: bool) -> CalibrationStatistics:
    """Step 2 of `patch_model`: one pass of the STOCK model over `calibration` (eval, no gradients) for what the seeding
    reads — the second moments of every patched layer's attention input (whitening, RoRoPE) and, for the '2norm' rule,
    the rotary pair norms; nothing without `reads_data`. Raises on bad calibration before any swap."""
    if not reads_data:
        return CalibrationStatistics()
    if getattr(patch, "rope", None) == "partial":  # the pair norms ('2norm') and moments in one pass
        moments, tokens, pair_norms = collect_rotary_statistics(model, calibration, patch.layers)
        return CalibrationStatistics(moments, tokens, pair_norms)
    moments, tokens = collect_attention_moments(model, calibration, patch.layers)
    return CalibrationStatistics(moments, tokens)


def seed_layer(spec: ArchitectureSpec, old: nn.Module, config, patch: PatchConfig, statistics: CalibrationStatistics,
               balance_kv: bool = True, seeding: dict | None = None) -> MergedAttention:
    """Step 3 of `patch_model`: the merged module that replaces the stock attention `old`, seeded from its weights (and
    the calibration statistics of its layer) by the route `patch` gives."""
    layer, rank = old.layer_idx, patch.rank_for(old.layer_idx)
    moment = statistics.moments.get(layer)
    if spec.rotary and patch.rope == "exact":
        return seeded_exact_rope_attention(spec, old, config, rank, moment=moment, balance=balance_kv, seeding=seeding)
    if spec.rotary:
        return seeded_rotary_attention(spec, old, config, rank, patch.rope_pairs, patch.rope_selection, moment=moment,
                                       pair_norms=statistics.pair_norms.get(layer), whiten=patch.init == "whitened",
                                       balance=balance_kv)
    return seeded_attention(spec, old, config, patch.mode, rank, moment=moment, values=patch.values,
                            value_rank=patch.value_rank, balance_kv=balance_kv)


def install(model: nn.Module, seeded: list[tuple[nn.Module, str, nn.Module, nn.Module]], config) -> None:
    """Step 4 of `patch_model`: swap each (parent, name, old, new) (hooks and train/eval mode move to the new module),
    and give every module that held the model's config its own copy `config`."""
    shared = model.config
    for parent, name, old, new in seeded:
        _swap(parent, name, old, new)
    for module in model.modules():  # every module that held the shared config now holds the model's own copy
        if module.__dict__.get("config") is shared:
            module.config = config
    _match_rotary_frequencies(model, [new for *_, new in seeded])


def _match_rotary_frequencies(model: nn.Module, modules: list[nn.Module]) -> None:
    """Give each exact-RoPE module's rotary embedding the model's own frequencies (values, dtype, device: a model cast to
    bf16 before the patch rotates its queries with bf16-rounded frequencies, and the rebuilt keys must match them)."""
    owned = {id(m.rotary_emb) for m in modules if getattr(m, "rope", None) == "exact"}
    if not owned:
        return
    source = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding") and id(m) not in owned
                   and isinstance(getattr(m, "inv_freq", None), torch.Tensor)), None)
    if source is None:
        return
    for module in modules:
        if id(getattr(module, "rotary_emb", None)) in owned:
            with torch.no_grad():
                module.rotary_emb.inv_freq = source.inv_freq.detach().clone()


def record_patch(model: nn.Module, spec: ArchitectureSpec, patch: PatchConfig, config, calibration_tokens) -> None:
    """Step 5 of `patch_model`: the merged config class and its `merged_attn` record, the model's merged class (so
    save_pretrained writes a checkpoint that reloads), and no generation default the patch cannot decode with."""
    if type(config) is spec.config_class.__base__:  # the stock config class: same fields plus merged_attn
        config.__class__ = spec.config_class  # model_type "merged_<family>"
    _forget_merged_names(config)
    config.merged_attn = {**patch.to_dict(), **base_model_record(config._name_or_path)}
    if calibration_tokens is not None:
        config.merged_attn["calibration_tokens"] = calibration_tokens
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # under peft
    merged = spec.model_classes.get(type(inner))
    if merged is not None:
        _set_class(inner, merged[0])  # a subclass of the stock class: isinstance checks still hold
    else:
        logger.warning(
            "%s is not a stock %s class: it is patched, but save_pretrained will not write a checkpoint "
            "that reloads as a merged model.", type(inner).__name__, spec.family,
        )
    _drop_unusable_cache_default(inner)


def _drop_unusable_cache_default(model: nn.Module) -> None:
    """Remove a quantized-cache default (generation_config.merged_attn_cache, from `use_quantized_latent_cache` on an
    earlier patch, or a saved generation_config.json) that the model as patched now cannot decode with, and say why."""
    generation = getattr(model, "generation_config", None)
    settings = getattr(generation, GENERATION_FIELD, None) if generation is not None else None
    if not settings:
        return
    try:
        problem = cache_problem(model, QuantizationSettings(**settings), "the quantized latent cache")
    except (TypeError, ValueError) as error:  # a hand-edited record
        problem = f"its settings are not valid ({error})"
    if problem:
        del generation.__dict__[GENERATION_FIELD]
        logger.warning(
            "patch_model dropped generation_config.%s=%s, a quantized latent cache as generate()'s default (set by "
            "use_quantized_latent_cache on an earlier patch or read from a saved generation_config.json), which this "
            "patch cannot use: %s generate() uses transformers' default cache; to quantize the cache, patch as "
            "'latent' (or 'covariance' with values='merged') and call use_quantized_latent_cache(model).",
            GENERATION_FIELD, settings, problem,
        )


def base_model_record(name_or_path) -> dict[str, str | None]:
    """What a patch record says about the model it was made from: {"base_model": a Hub id} — or, for a model loaded
    from a local folder, {"base_model": None, "base_model_folder": the folder's name}: a user's path never goes into
    a config, a model card or the Hub. A name that cannot be a Hub id (`merged_models.is_hub_id`: two or more
    slashes, as `runs/exp1/checkpoint-500`, or characters the Hub does not allow) is a folder, on disk or not."""
    path = str(name_or_path or "")
    if not path:
        return {"base_model": None}
    if (os.path.isabs(path) or os.path.exists(path) or path.startswith((".", "~")) or "\\" in path
            or not is_hub_id(path)):
        return {"base_model": None, "base_model_folder": os.path.basename(os.path.normpath(path)) or None}
    return {"base_model": path}


def _refuse_adapters(model: nn.Module, spec: ArchitectureSpec, patch: PatchConfig, attentions: list[nn.Module]) -> None:
    """Raise if a peft adapter (LoRA, ...) sits on a weight that the patch replaces: seeding reads the base weights
    only, so it would be silently dropped. An output projection the merged module keeps (shared) keeps its adapter."""
    kept = spec.merged_attention_class.output_name if patch.values is None and patch.value_rank is None else None
    adapters = _adapters_on(model, [(attn, kept) for attn in attentions])
    if adapters:
        raise ValueError(
            f"{', '.join(adapters)} carry peft adapters (e.g. LoRA) on weights that patch_model replaces; the merged "
            "attention is seeded from the base weights only, so the adapters would be lost. Merge them into the "
            "weights first (model = model.merge_and_unload(), then patch_model(model, ...)), or patch the stock model "
            "before adding adapters (LoRA can then target the new q_proj / k_proj / v_proj)."
        )
