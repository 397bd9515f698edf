"""Rank per block: explicit dicts, and spectral-energy targets (rank=0.9) resolved from each block's heads."""

from __future__ import annotations

import copy
import json

import numpy as np  # a dependency of transformers
import pytest
import torch
from conftest import HEAD_DIM, HEADS, HIDDEN, make_gpt2, max_diff
from transformers import AutoModelForCausalLM

import hf_merged_attn  # noqa: F401  (registers the merged classes with the Auto classes)
from hf_merged_attn import patch_model, unpatch_model
from hf_merged_attn.modeling_merged_gpt2 import read_weights
from hf_merged_attn.seeding import qk_singular_values, rank_for_energy

FP32_TOL = 1e-4  # as in test_patch_exact: fp32 round-off of reordered sums; structural errors are > 1e-2


def explicit_head_spectra(attn) -> torch.Tensor:
    """(H, d) singular values of each head's explicit (d+1) x d matrix S̃_h = [Wq_h; bq_h] Wk_hᵀ, straight from
    c_attn, with no factored shortcut."""
    weight, bias = attn.c_attn.weight.double(), attn.c_attn.bias.double()
    rows = torch.cat([weight, bias[None]], dim=0)  # (d+1, 3d): [x, 1] @ rows = [q, k, v]
    spectra = []
    for h in range(HEADS):
        q = rows[:, h * HEAD_DIM : (h + 1) * HEAD_DIM]  # (d+1, hd): [Wq_h; bq_h]
        k = weight[:, HIDDEN + h * HEAD_DIM : HIDDEN + (h + 1) * HEAD_DIM]  # (d, hd): Wk_h
        spectra.append(torch.linalg.svdvals(q @ k.T))  # of the (d+1, d) matrix
    return torch.stack(spectra)


def smallest_rank(spectra: torch.Tensor, energy: float) -> int:
    """Reference: the first r at which every head's cumulative σ² share reaches `energy`, by a plain loop."""
    needed = 1
    for sigma in spectra:
        power = sigma**2
        total, kept, r = power.sum(), 0.0, 0
        while kept < energy * total * (1 - 1e-12):
            kept += power[r]
            r += 1
        needed = max(needed, r)
    return needed


def test_rank_for_energy_on_known_spectra():
    sigma = torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # σ² shares: 9,4,1,0 of 14; 1,1,1,1 of 4
    assert rank_for_energy(sigma[:1], 0.5) == 1  # 9/14 = 0.64
    assert rank_for_energy(sigma[:1], 0.9) == 2  # 13/14 = 0.93
    assert rank_for_energy(sigma[:1], 1.0) == 3  # the zero direction is never needed
    assert rank_for_energy(sigma, 0.5) == 2  # the flat head needs 2 of 4: a block's heads share the largest
    assert rank_for_energy(torch.zeros(1, 4), 0.9) == 1  # an all-zero block still gets a rank of 1


def test_qk_singular_values_match_the_explicit_matrices():
    attn = make_gpt2().transformer.h[0].attn
    parts = read_weights(attn)
    got = qk_singular_values(parts["wq"], parts["bq"], parts["wk"])  # (H, hd)
    expected = explicit_head_spectra(attn)  # (H, d): rank <= hd, the rest is round-off
    assert got.shape == (HEADS, HEAD_DIM)
    torch.testing.assert_close(got, expected[:, :HEAD_DIM], rtol=1e-9, atol=1e-9 * expected.max().item())
    assert expected[:, HEAD_DIM:].max() < 1e-9 * expected.max()


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_energy_target_picks_the_smallest_rank_per_block(energy):
    stock = make_gpt2(n_layer=3)
    with torch.no_grad():  # make the blocks differ: a block whose heads are nearly rank 2 needs a small rank
        attn = stock.transformer.h[1].attn
        attn.c_attn.weight[:, :HIDDEN] *= torch.cat([torch.ones(2), torch.full((HEAD_DIM - 2,), 0.05)]).repeat(HEADS)
    expected = {i: smallest_rank(explicit_head_spectra(block.attn)[:, :HEAD_DIM], energy)
                for i, block in enumerate(stock.transformer.h)}
    model = patch_model(copy.deepcopy(stock), "lowrank", rank=energy)
    got = {i: block.attn.rank for i, block in enumerate(model.transformer.h)}
    assert got == expected
    assert model.config.merged_attn["rank"] == {str(i): r for i, r in expected.items()}
    assert model.config.merged_attn["energy"] == energy
    if energy == 0.9:
        assert got[1] < got[0]  # the near-rank-2 block gets less
    # every head keeps at least `energy` of its energy, and one rank less would not do for some head
    for i, block in enumerate(model.transformer.h):
        spectra = explicit_head_spectra(stock.transformer.h[i].attn)
        share = (spectra[:, : got[i]] ** 2).sum(1) / (spectra**2).sum(1)  # (H,)
        assert share.min() >= energy - 1e-9
        if got[i] > 1:
            assert ((spectra[:, : got[i] - 1] ** 2).sum(1) / (spectra**2).sum(1)).min() < energy


def test_energy_near_one_keeps_every_direction_and_is_exact():
    stock = make_gpt2()
    model = patch_model(copy.deepcopy(stock), "lowrank", rank=1 - 1e-9)  # random heads: every σ_i² > 1e-9 of Σσ²
    assert all(block.attn.rank == HEAD_DIM for block in model.transformer.h)
    ids = torch.randint(1, 100, (2, 12))
    with torch.no_grad():
        assert max_diff(model(ids).logits, stock(ids).logits) < FP32_TOL


def test_energy_ranks_do_not_depend_on_init_but_the_factors_do():
    """The ranks come from the weights' spectrum; init="whitened" picks other factors at the same ranks."""
    stock = make_gpt2()
    ids = torch.randint(1, 100, (6, 16))
    whitened = patch_model(copy.deepcopy(stock), "lowrank", rank=0.9, init="whitened", calibration=ids.split(3))
    plain = patch_model(copy.deepcopy(stock), "lowrank", rank=0.9)
    assert whitened.config.merged_attn["rank"] == plain.config.merged_attn["rank"]
    assert whitened.config.merged_attn["init"] == "whitened" and whitened.config.merged_attn["energy"] == 0.9
    assert all(block.attn.rank < HEAD_DIM for block in plain.transformer.h)  # so the two seeds can differ
    assert max_diff(whitened.transformer.h[0].attn.k_proj.weight, plain.transformer.h[0].attn.k_proj.weight) > 1e-3


def test_energy_on_some_blocks_numpy_scalars_and_string_keys():
    stock = make_gpt2(n_layer=3)
    model = patch_model(copy.deepcopy(stock), "lowrank", rank=np.float32(0.9), layers=[0, 2])
    assert sorted(model.config.merged_attn["rank"]) == ["0", "2"] and model.config.merged_attn["layers"] == [0, 2]
    assert type(model.transformer.h[1].attn).__name__ == "GPT2Attention"  # not patched
    keyed = patch_model(copy.deepcopy(stock), "lowrank", rank={"2": np.int64(3), 0: 2})
    assert [b.attn.rank for b in keyed.transformer.h if hasattr(b.attn, "rank")] == [2, 3]
    assert keyed.config.merged_attn["rank"] == {"0": 2, "2": 3}
    uniform = patch_model(copy.deepcopy(stock), "lowrank", rank=4)
    assert uniform.config.merged_attn["rank"] == 4 and "energy" not in uniform.config.merged_attn  # as before


def test_rank_dict_with_whitened_init_and_a_block_above_head_size():
    stock = make_gpt2()
    ids = torch.randint(1, 100, (6, 16))
    model = patch_model(copy.deepcopy(stock), "lowrank", rank={0: 2, 1: HEAD_DIM + 3}, init="whitened",
                        calibration=ids.split(3))
    assert [b.attn.rank for b in model.transformer.h] == [2, HEAD_DIM + 3]
    with torch.no_grad():  # block 1 is exact (padded); block 0 approximates
        only_block_1 = patch_model(copy.deepcopy(stock), "lowrank", rank={1: HEAD_DIM + 3})
        assert max_diff(only_block_1(ids).logits, stock(ids).logits) < FP32_TOL
        assert max_diff(model(ids).logits, stock(ids).logits) > 1e-3


def test_rank_dict_per_block_and_exact_blocks():
    stock = make_gpt2()
    model = patch_model(copy.deepcopy(stock), "lowrank", rank={1: HEAD_DIM, 0: 2})
    assert [block.attn.rank for block in model.transformer.h] == [2, HEAD_DIM]
    assert model.config.merged_attn["rank"] == {"0": 2, "1": HEAD_DIM}
    assert model.config.merged_attn["layers"] == [0, 1] and "energy" not in model.config.merged_attn
    assert model.transformer.h[1].attn.q_proj.weight.shape == (HEADS * HEAD_DIM, HIDDEN)
    assert model.transformer.h[0].attn.k_proj.weight.shape == (HEADS * 2, HIDDEN)
    only_one = patch_model(copy.deepcopy(stock), "lowrank", rank={1: 3})
    assert type(only_one.transformer.h[0].attn).__name__ == "GPT2Attention" and only_one.transformer.h[1].attn.rank == 3


@pytest.mark.parametrize("rank", [0.9, {0: 3, 1: HEAD_DIM + 2}], ids=["energy", "dict"])
def test_per_block_ranks_save_reload_and_export(rank, tmp_path):
    model = patch_model(make_gpt2(), "lowrank", rank=rank)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["merged_attn"]
    assert record["rank"] == model.config.merged_attn["rank"] and isinstance(record["rank"], dict)
    assert "ranks per block" in (tmp_path / "README.md").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert [b.attn.rank for b in loaded.transformer.h] == [b.attn.rank for b in model.transformer.h]
    state = model.state_dict()
    assert all(torch.equal(t, state[n]) for n, t in loaded.state_dict().items())
    ids = torch.randint(1, 100, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        expected = model(ids).logits
        _, errors = unpatch_model(loaded, return_errors=True)  # ranks <= hd, or padded with zero key columns
        assert max(max(sides.values()) for sides in errors.values()) < 1e-5
        assert max_diff(loaded(ids).logits, expected) < FP32_TOL


def test_record_whose_rank_blocks_differ_from_layers_is_refused(tmp_path):
    patch_model(make_gpt2(), "lowrank", rank={0: 2, 1: 3}).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["merged_attn"]["rank"] = {"0": 2}  # block 1 is patched but has no rank
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"merged_attn.rank=\{'0': 2\} must name exactly the blocks in merged_attn.layers"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
