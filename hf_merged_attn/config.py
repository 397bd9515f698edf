"""What a patch is: its mode, rank and layers, validated before any weight is touched."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from numbers import Integral, Real

MODES = ("covariance", "lowrank")
INITS = ("svd", "whitened")  # how lowrank factors are seeded: plain SVD of the weights, or activation-aware


@dataclass
class PatchConfig:
    """The settings of one `patch_model` call, recorded on the model as `config.merged_attn`.

    Attributes:
        mode: "covariance" (one d x d matrix S_h = Wq_h Wk_hᵀ per head) or "lowrank" (S_h ≈ U_h V_hᵀ).
        rank: for "lowrank", r (1 <= r <= hidden size) for every patched block, or {block index: r} per block;
            None for "covariance". An energy target is resolved to the per-block dict by `patch_model`.
        layers: indices of the patched blocks (sorted); None until resolved against a model.
        init: how "lowrank" factors are seeded — "svd" (best rank-r approximation of the weights) or
            "whitened" (least score error on calibration activations); None for "covariance" (exact).
        energy: set from `rank=<float>` ("lowrank"): the fraction in (0, 1) of each head's spectral energy that
            the seed keeps; `patch_model` picks the smallest such rank per block.
    """

    mode: str
    rank: int | dict[int, int] | None = None
    layers: list[int] | None = field(default=None)
    init: str | None = "svd"
    energy: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(
                f"mode={self.mode!r} is not a patch mode; allowed: {', '.join(repr(m) for m in MODES)}. "
                "Use mode='covariance' for the exact merged S_h, or mode='lowrank' with rank=r."
            )
        if self.mode == "covariance" and self.rank is not None:
            raise ValueError(
                f"rank={self.rank!r} was given with mode='covariance', which has no rank (S_h is d x d). "
                "Drop rank, or use mode='lowrank' to factor S_h at rank r."
            )
        if self.mode == "lowrank":
            if self.rank is None:
                raise ValueError(
                    "mode='lowrank' needs rank=r (an integer, e.g. the head size 64 for GPT-2, which is exact; a "
                    "dict {block: r}; or a float in (0, 1), the spectral energy to keep). Pass rank=..., or use "
                    "mode='covariance'."
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
        self._check_init()

    @staticmethod
    def _integer_rank(rank, name: str) -> int:
        if isinstance(rank, bool) or not isinstance(rank, Integral):
            raise ValueError(
                f"{name}={rank!r} ({type(rank).__name__}) is not an integer; lowrank needs an integer rank r >= 1 "
                "(r = head size is exact, smaller approximates, larger adds capacity), a dict {block: r}, or a "
                "float in (0, 1) (the spectral energy to keep)."
            )
        if rank < 1:
            raise ValueError(f"{name}={rank} is below 1; lowrank needs an integer rank r >= 1.")
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
        if self.mode == "covariance":
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
        if self.mode == "covariance" and given:
            raise ValueError(
                f"{what} was given with mode='covariance', which is exact and uses no data. Drop calibration, "
                "or use mode='lowrank', rank=r, init='whitened' to fit low-rank factors to it."
            )
        if self.init == "svd" and given:
            raise ValueError(
                f"{what} was given with init='svd', which factors the weights alone and ignores data. Pass "
                "init='whitened' to use the calibration activations, or drop calibration."
            )
        if self.init == "whitened" and not given:
            raise ValueError(
                "init='whitened' needs calibration=...: an iterable of batches of token ids (LongTensors (B, T), "
                "lists of ids, or dicts with 'input_ids', e.g. a DataLoader or a tokenized dataset) to measure "
                "the attention inputs on. Pass e.g. 16 blocks of 256 tokens of training text, or use init='svd'."
            )

    def check_against(self, hidden_size: int, num_layers: int) -> None:
        """Check rank and layers against a model's sizes and resolve `layers` (None -> all blocks).

        Raises:
            ValueError: rank above the hidden size, or a layer index out of range / not an integer.
        """
        if isinstance(self.rank, dict) and not all(0 <= i < num_layers for i in self.rank):
            raise ValueError(
                f"rank={self.rank!r} names blocks outside this model's 0..{num_layers - 1}; key each rank by a block "
                "index of the model."
            )
        ranks = self.rank.values() if isinstance(self.rank, dict) else [self.rank]
        if any(r is not None and r > hidden_size for r in ranks):
            raise ValueError(
                f"rank={self.rank} exceeds the hidden size {hidden_size}: S_h is {hidden_size} x {hidden_size}, so "
                f"a rank above {hidden_size} adds nothing. Use 1 <= rank <= {hidden_size}, or mode='covariance'."
            )
        if self.layers is None:
            self.layers = list(range(num_layers))
            return
        given = self.layers
        if isinstance(given, (str, bytes)) or not hasattr(given, "__iter__"):
            raise ValueError(f"layers={given!r} is not a list of block indices; pass e.g. layers=[0, 1] or None (all).")
        bad = [i for i in given if isinstance(i, bool) or not isinstance(i, Integral) or not 0 <= i < num_layers]
        if bad or not given:
            raise ValueError(
                f"layers={list(given)!r} has indices out of range {bad!r}; this model has {num_layers} blocks, so "
                f"allowed indices are 0..{num_layers - 1}. Pass a non-empty list of those, or None for all."
            )
        self.layers = sorted({int(i) for i in given})

    def to_dict(self) -> dict:
        """JSON-ready dict (what `config.merged_attn` holds): a per-block rank as {"block": r}; energy if used."""
        record = asdict(self)
        if isinstance(self.rank, dict):
            record["rank"] = {str(i): r for i, r in sorted(self.rank.items())}
        if self.energy is None:
            del record["energy"]
        return record
