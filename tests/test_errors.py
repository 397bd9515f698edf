"""Bad input fails early with a message naming what was given, what is allowed and what to do."""

from __future__ import annotations

import pytest
import torch
from conftest import HIDDEN, LAYERS, make_gpt2
from transformers import GPT2LMHeadModel

from hf_merged_attn import patch_model


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"mode": "covarience"}, ValueError, r"mode='covarience' is not a patch mode; allowed: 'covariance', 'lowrank', 'latent'"),
        ({"mode": "latent"}, ValueError, r"mode='latent' needs rank=r \(an integer — the hidden size, e.g. 768 for GPT-2 — is exact"),
        ({"mode": "latent", "rank": HIDDEN + 1}, ValueError, rf"rank={HIDDEN + 1} exceeds the hidden size {HIDDEN}"),
        ({"mode": "latent", "rank": 4, "init": "whitened"}, ValueError, r"init='whitened' needs calibration="),
        ({"values": "shared"}, ValueError, r"values='shared' is not a value mode; allowed: None .* or 'merged'"),
        ({"mode": "latent", "rank": 4, "values": "merged"}, ValueError, r"with mode='latent', whose latent already serves"),
        ({"values": "merged", "value_rank": 2}, ValueError, r"value_rank=2 was given with values='merged'"),
        ({"value_rank": 0}, ValueError, r"value_rank=0 is below 1; value_rank takes an integer r_v with 1 <= r_v <= the head size"),
        ({"value_rank": 0.9}, ValueError, r"value_rank=0.9 \(float\) is not an integer; value_rank takes an integer r_v"),
        ({"value_rank": HIDDEN // 4 + 1}, ValueError, r"value_rank=9 exceeds the head size 8"),
        ({"mode": "lowrank"}, ValueError, r"mode='lowrank' needs rank=r"),
        ({"mode": "lowrank", "rank": 2.5}, ValueError, r"rank=2.5 is a float, i.e. a spectral-energy target, but not in \(0, 1\)"),
        ({"mode": "lowrank", "rank": 0.0}, ValueError, r"rank=0.0 is a float, i.e. a spectral-energy target"),
        ({"mode": "lowrank", "rank": 1.0}, ValueError, r"rank=1.0 is a float.*\(rank=1 for rank one; the head size"),
        ({"mode": "covariance", "rank": 0.9}, ValueError, r"rank=0.9 was given with mode='covariance'"),
        ({"mode": "lowrank", "rank": {0: 2.5}}, ValueError, r"rank\[0\]=2.5 \(float\) is not an integer"),
        ({"mode": "lowrank", "rank": {0: 0}}, ValueError, r"rank\[0\]=0 is below 1"),
        ({"mode": "lowrank", "rank": {"a": 2}}, ValueError, r"rank dict key 'a' is not a block index"),
        ({"mode": "lowrank", "rank": {}}, ValueError, r"rank=\{\} names no block"),
        ({"mode": "lowrank", "rank": {0: 2}, "layers": [1]}, ValueError, r"layers=\[1\] was given with a rank per block"),
        ({"mode": "lowrank", "rank": {0: 2, "0": 3}}, ValueError, r"names a block twice"),
        ({"mode": "lowrank", "rank": {LAYERS: 2}}, ValueError, rf"rank=\{{{LAYERS}: 2\}} names blocks outside this model's 0\.\.{LAYERS - 1}"),
        ({"mode": "lowrank", "rank": {0: HIDDEN + 1}}, ValueError, rf"exceeds the hidden size {HIDDEN}"),
        ({"mode": "lowrank", "rank": "8"}, ValueError, r"rank='8' \(str\) is not an integer"),
        ({"mode": "lowrank", "rank": True}, ValueError, r"rank=True \(bool\) is not an integer"),
        ({"mode": "lowrank", "rank": 0}, ValueError, r"rank=0 is below 1"),
        ({"mode": "lowrank", "rank": HIDDEN + 1}, ValueError, rf"rank={HIDDEN + 1} exceeds the hidden size {HIDDEN}"),
        ({"mode": "covariance", "rank": 8}, ValueError, r"rank=8 was given with mode='covariance'"),
        ({"layers": [0, LAYERS]}, ValueError, rf"layers=\[0, {LAYERS}\] has indices out of range \[{LAYERS}\].*0\.\.{LAYERS - 1}"),
        ({"layers": [-1]}, ValueError, r"out of range \[-1\]"),
        ({"layers": []}, ValueError, r"layers=\[\] names no block; pass a non-empty list of block indices in 0\.\.1"),
        ({"layers": 1}, ValueError, r"layers=1 is not a list of block indices"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model = make_gpt2()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(error, match=match):
        patch_model(model, **kwargs)
    # nothing was touched: errors come before any module is swapped
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert not hasattr(model.config, "merged_attn")


def test_patching_twice():
    model = patch_model(make_gpt2(), "covariance")
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel is already patched \(config.merged_attn=.*covariance"):
        patch_model(model, "lowrank", rank=4)


def test_something_that_is_not_a_transformers_model():
    with pytest.raises(ValueError, match=r"Linear has no `config`; patch_model takes a transformers model .*GPT-2 \(gpt2\)"):
        patch_model(torch.nn.Linear(4, 4))


def test_a_part_of_a_model_is_refused():
    block = make_gpt2().transformer.h[0]
    block.config = make_gpt2().config  # looks like a GPT-2 but holds no GPT2Attention at the top level
    del block.attn
    with pytest.raises(ValueError, match=r"GPT2Block \(model_type 'gpt2'\) has no GPT2Attention module to patch"):
        patch_model(block)


def test_cross_attention_is_refused():
    model = make_gpt2(GPT2LMHeadModel, add_cross_attention=True)
    with pytest.raises(NotImplementedError, match=r"add_cross_attention=True .* not supported"):
        patch_model(model)


def test_unsupported_attn_implementation_at_call_time():
    model = patch_model(make_gpt2(), "covariance")
    model.config._attn_implementation = "flash_attention_2"  # as set_attn_implementation would, where installed
    with pytest.raises(NotImplementedError, match=r"attn_implementation='flash_attention_2' is not supported .*supported: eager, sdpa"):
        model(torch.ones(1, 4, dtype=torch.long))


@pytest.mark.parametrize("model,match", [
    (None, r"patch_model takes a transformers model \(an nn.Module\); got None \(NoneType\)\. Load the model first"),
    ("gpt2", r"got 'gpt2' \(str\)\. Load the model first, e\.g\. model = AutoModelForCausalLM\.from_pretrained\('gpt2'\)"),
])
def test_a_name_or_none_instead_of_a_model(model, match):
    with pytest.raises(TypeError, match=match):
        patch_model(model)


def test_an_energy_target_on_a_meta_device_model():
    with torch.device("meta"):
        model = make_gpt2()
    with pytest.raises(ValueError, match=r"rank=0.9 \(a spectral-energy target\) .* weights are on the meta device "
                                         r"\(not loaded\)\. Load the weights first, or pass an integer rank"):
        patch_model(model, "lowrank", rank=0.9)
    assert not hasattr(model.config, "merged_attn")


def test_messages_name_the_argument_and_the_mode():
    """value_rank's messages speak of value_rank (no energy floats, no "lowrank and latent"); rank's of the mode."""
    for kwargs, absent in (({"value_rank": 0.9}, "(0, 1)"), ({"value_rank": 0}, "lowrank and latent")):
        with pytest.raises(ValueError) as info:
            patch_model(make_gpt2(), **kwargs)
        assert absent not in str(info.value)
    with pytest.raises(ValueError, match=r"rank=0 is below 1; mode='latent' takes an integer rank >= 1 \(r_c = hidden"):
        patch_model(make_gpt2(), "latent", rank=0)
