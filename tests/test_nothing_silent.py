"""Nothing silent in the value and latent modes (#19): adapters in cached decoding, unpatching peft models, the
per-head value bias under padding and dropout, shared configs, paths in saved files, honest messages and cards."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest
import torch
from conftest import VOCAB, make_gpt2, max_diff, tiny_config
from families import DECODERS, FAMILY_IDS, inputs
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from hf_merged_attn import MergedGPT2LMHeadModel, patch_model, unpatch_model

# every mode with the projections a LoRA can target in it (the trainable nn.Linear / Conv1D of the merged module)
MODES = {
    "covariance": ({"mode": "covariance"}, ["q_proj", "v_proj", "c_proj"]),
    "merged-values": ({"mode": "covariance", "values": "merged"}, ["q_proj", "c_proj"]),
    "covariance-value-rank": ({"mode": "covariance", "value_rank": 3}, ["q_proj", "v_proj", "c_proj"]),
    "lowrank": ({"mode": "lowrank", "rank": 3}, ["q_proj", "k_proj", "v_proj", "c_proj"]),
    "lowrank-values": ({"mode": "lowrank", "rank": 3, "value_rank": 2}, ["q_proj", "k_proj", "v_proj", "c_proj"]),
    "latent": ({"mode": "latent", "rank": 8}, ["q_proj", "latent_proj", "k_up", "v_up", "c_proj"]),
}
# the exact value modes (value_rank = head size 8): what they compute must be stock's, loss and gradients
VALUE_MODES = {
    "merged-values": {"mode": "covariance", "values": "merged"},
    "covariance-value-rank": {"mode": "covariance", "value_rank": 8},
    "lowrank-values": {"mode": "lowrank", "rank": 8, "value_rank": 8},
}


def lora(model, targets):
    """LoRA with non-zero adapters (init_lora_weights=False), so an adapter that is skipped changes the logits."""
    config = LoraConfig(r=2, target_modules=targets, init_lora_weights=False)
    return get_peft_model(model, config).eval()


# --- 1. adapters act in cached decoding ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")  # peft's fan_in_fan_out notice for GPT-2's Conv1D c_proj
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(MODES))
def test_cache_equals_no_cache_with_an_adapter_on_each_projection(name, attn_implementation):
    """One adapter at a time on every projection the mode has: a cached step's logits equal the full forward's.
    The latent's absorbed decode used to read k_up / v_up weights directly (off by 0.2 with LoRA there)."""
    kwargs, targets = MODES[name]
    ids = torch.randint(1, VOCAB, (2, 10))
    for target in targets:
        model = lora(patch_model(make_gpt2(attn_implementation=attn_implementation), **kwargs), [target])
        base = patch_model(make_gpt2(attn_implementation=attn_implementation), **kwargs)
        with torch.no_grad():
            full = model(ids).logits[:, -1]
            prefix = model(ids[:, :-1], use_cache=True)
            step = model(ids[:, -1:], past_key_values=prefix.past_key_values).logits[:, -1]
            without = base(ids).logits[:, -1]
        assert max_diff(full, without) > 1e-3, target  # the adapter acts (else the check below proves nothing)
        assert max_diff(step, full) < 1e-4, target  # fp32 round-off of a different summation order (~1e-6)


# --- 2. unpatching a peft model --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name,target,exact", [  # exact: the merged-in adapter keeps S_h / M_h within rank hd
    ("lowrank", "q_proj", True), ("latent", "k_up", True), ("merged-values", "c_proj", False),
    ("lowrank-values", "v_proj", True),
])
def test_unpatch_refuses_adapters_on_merged_projections(name, target, exact):
    model = lora(patch_model(make_gpt2(), **MODES[name][0]), [target])
    ids = torch.randint(1, VOCAB, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(ValueError, match=rf"base_model\.model\.transformer\.h\.0\.attn\.{target}, .*carry peft adapters .*"
                                         r"unpatch_model rebuilds.*model = model\.merge_and_unload\(\), then unpatch_model"):
        unpatch_model(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # untouched
    stock, errors = unpatch_model(model.merge_and_unload(), return_errors=True)  # what the message says to do
    assert type(stock) is GPT2LMHeadModel
    if exact:
        with torch.no_grad():
            assert max_diff(stock(ids).logits, before) < 1e-4
    else:  # LoRA on the M_h map raised its rank above hd: reported on that side
        assert max(e["value_output"] for e in errors.values()) > 1e-3


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["covariance", "latent"])
def test_unpatch_a_peft_model_with_adapters_elsewhere(tmp_path, name):
    """LoRA on the MLP (c_fc) and on a kept output projection: unpatched inside, adapters kept, saves as stock."""
    targets = ["c_fc", "c_proj"] if name == "covariance" else ["c_fc"]
    model = lora(patch_model(make_gpt2(), **MODES[name][0]), targets)
    ids = torch.randint(1, VOCAB, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
    unpatch_model(model, strict=True)
    inner = model.get_base_model()
    assert type(inner) is GPT2LMHeadModel and not hasattr(inner.config, "merged_attn")
    with torch.no_grad():
        assert max_diff(model(ids).logits, before) < 1e-4  # the adapters still act
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path)  # used to fail: a merged class with a stock config
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
    with torch.no_grad():
        assert max_diff(GPT2LMHeadModel.from_pretrained(tmp_path)(ids).logits, before) < 1e-4


# --- 3. the per-head value bias where attention rows do not sum to 1 ----------------------------------------------


def _loss_and_grads(model, ids, mask, seed):
    torch.manual_seed(seed)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.loss.detach(), model.get_input_embeddings().weight.grad.clone()


@pytest.mark.parametrize("family", DECODERS, ids=[f.model_type for f in DECODERS])
@pytest.mark.parametrize("name", list(VALUE_MODES))
@pytest.mark.parametrize("setting", ["sdpa-left-padding", "attention-dropout"])
def test_value_modes_equal_stock_loss_and_gradients(family, name, setting):
    """Left-padded queries whose mask hides every key (SDPA gives them all-zero weights) and inverted attention dropout
    (rows that do not sum to 1): stock's loss and gradients, not those of a value bias folded into the output bias."""
    implementation = "sdpa" if setting == "sdpa-left-padding" and family.sdpa else "eager"
    family = dataclasses.replace(family, config=copy.deepcopy(family.config))  # the dropout set below stays here
    stock = family.make(implementation)
    if setting == "attention-dropout":
        for _, _, attn in family.spec.stock_attentions(stock):
            dropout = getattr(attn, "attn_dropout", None) or getattr(attn, "attention_dropout", None)
            if isinstance(dropout, torch.nn.Dropout):
                dropout.p = 0.3
            else:  # OPT keeps a float
                attn.dropout = 0.3
        stock.config.update({"attn_pdrop": 0.3} if family.model_type == "gpt2" else {"attention_dropout": 0.3})
    ids, mask = inputs(family, batch=3, length=12)
    if family.model_type == "gpt2" and setting == "sdpa-left-padding":
        mask[2, :9] = 0  # long left padding: more fully hidden rows
    merged = patch_model(copy.deepcopy(stock), **VALUE_MODES[name])
    if setting == "attention-dropout":
        stock.train(), merged.train()
    stock_loss, stock_grad = _loss_and_grads(stock, ids, mask, seed=3)
    loss, grad = _loss_and_grads(merged, ids, mask, seed=3)
    # fp32 round-off of the re-associated products (M_h = Wv_h Wo_h); a folded bias moved the loss by ~1e-4
    assert abs(loss.item() - stock_loss.item()) < 2e-6
    assert max_diff(grad, stock_grad) < 2e-5 * stock_grad.abs().max().item() + 1e-7
    if setting == "attention-dropout":  # dropout really acts: another seed gives another loss
        assert abs(_loss_and_grads(merged, ids, mask, seed=4)[0].item() - loss.item()) > 1e-4


# --- 4. a config shared with another model --------------------------------------------------------------------------


def test_patch_gives_the_model_its_own_config():
    config = tiny_config()
    model, other = GPT2LMHeadModel(config), GPT2LMHeadModel(config)
    patch_model(model, "covariance")
    assert other.config is config and not hasattr(config, "merged_attn") and config.model_type == "gpt2"
    assert type(config).__name__ == "GPT2Config"
    assert model.config.merged_attn["mode"] == "covariance" and model.config is not config
    assert all(m.config is model.config for m in model.modules() if "config" in m.__dict__)


# --- 5. no local paths in saved files -------------------------------------------------------------------------------


def test_no_local_path_in_saved_files(tmp_path):
    stock_dir = tmp_path / "private" / "my-gpt2"
    make_gpt2().save_pretrained(stock_dir)
    model = patch_model(GPT2LMHeadModel.from_pretrained(stock_dir), "covariance")
    out = tmp_path / "patched"
    model.save_pretrained(out)
    for file in out.iterdir():
        if file.suffix in (".json", ".md", ".py"):
            assert str(tmp_path) not in file.read_text(), file.name
    record = json.loads((out / "config.json").read_text())["merged_attn"]
    assert record["base_model"] is None and record["base_model_folder"] == "my-gpt2"
    card = (out / "README.md").read_text()
    assert "local folder `my-gpt2`" in card and "base_model:" not in card
    model.config._name_or_path = "openai-community/gpt2"  # a Hub id is kept as it is (re-patch to re-record)
    hub = patch_model(unpatch_model(model), "covariance")
    assert hub.config.merged_attn["base_model"] == "openai-community/gpt2"
    assert "base_model: openai-community/gpt2" in hub.create_model_card()


# --- 6. unpatch names the side that is lost -------------------------------------------------------------------------


def test_unpatch_names_the_lossy_side(caplog):
    """Merged values whose M_h learned rank > hd: the loss is in M_h, not S_h (exact at lowrank r = 4 <= hd)."""
    model = patch_model(make_gpt2(), "lowrank", rank=4, values="merged")
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight.add_(torch.randn_like(model.transformer.h[0].attn.c_proj.weight))
    with pytest.raises(ValueError, match=r"layer 0: M_h = Wv_h·Wo_h \(relative error [0-9.e-]+\)\. Pass strict=False"):
        unpatch_model(copy.deepcopy(model), strict=True)
    with caplog.at_level(logging.WARNING):
        _, errors = unpatch_model(model, return_errors=True)
    assert "S_h" not in caplog.text and "M_h = Wv_h·Wo_h" in caplog.text
    assert set(errors[0]) == {"query_key", "value_output"}
    assert errors[0]["query_key"] < 1e-5 < 1e-2 < errors[0]["value_output"]  # each side reported on its own
    assert errors[1]["value_output"] < 1e-5  # layer 1 untouched: exact


# --- 7. the model card states every choice -------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,says", [
    ({"mode": "covariance", "values": "merged"}, ["Values are merged", "exactly what the base model computed"]),
    ({"mode": "lowrank", "rank": 8, "value_rank": 2}, ["Values are low-rank at r_v = 2", "an approximation",
                                                       "approximated the base model (the value side below full rank)"]),
    ({"mode": "lowrank", "rank": 8, "value_rank": 8}, ["exact: r_v is the head size", "exactly what the base model"]),
    ({"mode": "latent", "rank": 0.9}, ["of the layer's stacked [Wk | Wv]", "only c is cached", "approximated"]),
    ({"mode": "covariance"}, ["Values and the output projection are the stock ones", "exactly what"]),
])
def test_the_card_states_the_value_side_and_exactness(kwargs, says):
    card = patch_model(make_gpt2(), **kwargs).create_model_card()
    for text in says:
        assert text in card, text
    assert "each head's spectral energy" not in card


def test_an_encoder_latent_card_does_not_claim_a_cache():
    family = next(f for f in __import__("families").FAMILIES if f.model_type == "bert")
    card = patch_model(family.make(), "latent", rank=16).create_model_card()
    assert "only c is cached" not in card and "an encoder caches nothing" in card


# --- 8. trainability of the low-rank value factors -----------------------------------------------------------------


def test_value_factors_are_frozen_when_the_output_projection_is():
    """P_h (v_proj) and c_h are seeded from Wv_h AND Wo_h: frozen if either is."""
    model = make_gpt2()
    for block in model.transformer.h:
        block.attn.c_proj.requires_grad_(False)
    patch_model(model, "lowrank", rank=4, value_rank=2)
    attn = model.transformer.h[0].attn
    assert not attn.v_proj.weight.requires_grad and not attn.c_proj.weight.requires_grad
    assert not attn.value_bias.requires_grad and attn.q_proj.weight.requires_grad


def test_a_checkpoint_from_before_value_bias_loads_as_it_was_saved(tmp_path, caplog):
    """The folded form (bo + Σ_h c_h in the output bias, no value_bias) still loads, computing what it computed."""
    from safetensors.torch import load_file, save_file

    model = patch_model(make_gpt2(), "covariance", values="merged")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["merged_attn"]["format_version"]  # the old format: a record without a version (#27) ...
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = load_file(tmp_path / "model.safetensors")
    for i in range(2):  # ... and weights with the folded bias, no value_bias
        weights[f"transformer.h.{i}.attn.c_proj.bias"] += weights.pop(f"transformer.h.{i}.attn.value_bias").sum(0)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(1, VOCAB, (2, 10))
    with caplog.at_level(logging.WARNING):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is MergedGPT2LMHeadModel and "saved before the per-head value bias" in caplog.text
    assert torch.count_nonzero(loaded.transformer.h[0].attn.value_bias) == 0
    with torch.no_grad():
        assert max_diff(loaded(ids).logits, model(ids).logits) < 1e-5
