"""The record of a patch: what `patch_model` was asked, and what a checkpoint's config.json says (`merged_attn`).

Self-contained (the standard library only): it travels next to every saved checkpoint with the core files.
`PatchConfig` is the one place where mode, rank, layers, init, values and the rotary settings are validated;
`check_record` rebuilds it from a saved record and says what is wrong with a corrupted one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from numbers import Integral, Real

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
        rope_pairs: rotary families only (mode "latent", rope="partial"): r, the frequency pairs per KV head kept
            rotated (0 <= r <= hd/2; hd/2 keeps them all); the other pairs lose their rotation and their keys join the
            latent. Resolved by `patch_model` (None with rope="exact", which keeps every pair).
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
