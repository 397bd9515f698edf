"""Layer-wise recovery (#29): `recover_layerwise` fits each patched attention layer to the stock one.

Tiny random models of every family (families.py, test_rotary.py: strong q/k/v weights and non-zero biases), patched
to a latent below d (GPT-2 / OPT / BLOOM / BERT / RoBERTa) or a rotary latent with a pair dropped (Llama, Qwen2,
Mistral), so nothing is exact at patch and there is something to win back.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from families import FAMILIES, FAMILY_IDS
from test_rotary import FAMILIES as ROTARY
from test_rotary import IDS as ROTARY_IDS

from hf_merged_attn import patch_model
from hf_merged_attn.evaluation import evaluate_perplexity
from hf_merged_attn.recovery import recover_layerwise

VOCAB = 101


def calibration(batches: int = 4, rows: int = 4, length: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (rows, length), generator=generator) for _ in range(batches)]


def patched_pair(family, rotary: bool):
    stock = family.make("sdpa" if rotary or family.sdpa else "eager")
    if rotary:
        model = patch_model(copy.deepcopy(stock), "latent", rank=12, rope_pairs=1, rope_selection="high")
    else:
        model = patch_model(copy.deepcopy(stock), "latent", rank=8)
    return stock, model


def output(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def relative_error(model, stock, ids) -> float:
    with torch.no_grad():
        ours, theirs = output(model, ids), output(stock, ids)
    return float((ours - theirs).pow(2).mean() / theirs.pow(2).mean())


CASES = [(f, False) for f in FAMILIES] + [(f, True) for f in ROTARY]
CASE_IDS = FAMILY_IDS + ROTARY_IDS


@pytest.mark.parametrize("inputs", ["stock", "patched"])
@pytest.mark.parametrize("family,rotary", CASES, ids=CASE_IDS)
def test_every_layer_and_the_whole_model_move_towards_stock(family, rotary, inputs):
    torch.manual_seed(0)
    stock, model = patched_pair(family, rotary)
    stock_state = {k: v.clone() for k, v in stock.state_dict().items()}
    held_out = torch.randint(2, VOCAB, (3, 16), generator=torch.Generator().manual_seed(7))
    before = relative_error(model, stock, held_out)
    frozen = {n: p.clone() for n, p in model.named_parameters() if ".attn" not in n and "attention" not in n
              and "self_attn" not in n}
    records = recover_layerwise(model, stock, calibration(), steps=40, learning_rate=3e-3, inputs=inputs,
                                show_progress=False)
    assert [r["layer"] for r in records] == [0, 1]
    for r in records:  # each layer's fitted error is below its error at patch (on the calibration batches)
        assert r["error_after"] < 0.9 * r["error_before"], r
    assert relative_error(model, stock, held_out) < before  # and the model's output on other tokens follows
    assert all(torch.equal(v, stock.state_dict()[k]) for k, v in stock_state.items())  # the reference is untouched
    for name, value in frozen.items():  # only the attention modules' parameters are fitted
        assert torch.equal(value, dict(model.named_parameters())[name]), name
    assert not model.training and not stock.training  # modes restored (both were in eval mode)


def test_patched_inputs_carry_the_earlier_layers_error_and_stock_inputs_do_not():
    family = FAMILIES[0]  # GPT-2
    torch.manual_seed(0)
    stock, model = patched_pair(family, False)
    runs = {}
    for inputs in ("stock", "patched"):
        runs[inputs] = recover_layerwise(copy.deepcopy(model), stock, calibration(), steps=5, inputs=inputs,
                                         show_progress=False)
    # layer 0 sees the same embeddings either way; layer 1 sees stock's activations or the patched model's own
    assert runs["stock"][0]["error_before"] == pytest.approx(runs["patched"][0]["error_before"], rel=1e-6)
    assert runs["stock"][1]["error_before"] != pytest.approx(runs["patched"][1]["error_before"], rel=1e-3)
    # with stock inputs, layer 1's error at patch is what it is in the unrecovered model on stock's activations
    again = recover_layerwise(copy.deepcopy(model), stock, calibration(), steps=1, inputs="stock", show_progress=False)
    assert again[1]["error_before"] == pytest.approx(runs["stock"][1]["error_before"], rel=1e-6)


def test_deterministic_for_a_seed_and_the_seed_orders_the_batches():
    family = ROTARY[0]
    torch.manual_seed(0)
    stock, model = patched_pair(family, True)
    states = []
    for seed in (0, 0, 1):
        copy_ = copy.deepcopy(model)
        recover_layerwise(copy_, stock, calibration(), steps=6, seed=seed, show_progress=False)
        states.append(copy_.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_an_exact_patch_is_left_as_it_is():
    family = FAMILIES[0]
    stock = family.make()
    model = patch_model(copy.deepcopy(stock), "covariance")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    records = recover_layerwise(model, stock, calibration(), steps=5, show_progress=False)
    # covariance is exact up to float32 rounding of the merged products (~1e-13 relative squared error)
    assert all(r["error_before"] < 1e-10 for r in records)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_padding_is_left_out_of_the_fit():
    """Left-padded calibration: what sits at padded positions changes nothing (masked out of the inputs and the loss)."""
    family = ROTARY[0]
    torch.manual_seed(0)
    stock, model = patched_pair(family, True)
    ids = calibration(batches=2)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1:, :5] = 0
    results = []
    for fill in (0, 7):
        batches = [{"input_ids": b.masked_fill(mask == 0, fill), "attention_mask": mask} for b in ids]
        copy_ = copy.deepcopy(model)
        recover_layerwise(copy_, stock, batches, steps=4, show_progress=False)
        results.append(copy_.state_dict())
    # the same fit up to float32 reduction order of the masked rows (the fitted weights differ by ~1e-7)
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-5) for k in results[0])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, s: recover_layerwise(s, s, calibration()), r"without patched attention .*Patch it first"),
        (lambda m, s: recover_layerwise(m, m, calibration()), r"already patched"),
        (lambda m, s: recover_layerwise(m, FAMILIES[1].make(), calibration()),
         r"reference is a OPT model but model is a patched GPT-2 model"),
        (lambda m, s: recover_layerwise(m, s, calibration(), inputs="teacher"), r"inputs='teacher'; allowed: 'stock'"),
        (lambda m, s: recover_layerwise(m, s, calibration(), steps=0), r"steps=0: pass a positive integer"),
        (lambda m, s: recover_layerwise(m, s, calibration(), learning_rate=-1.0), r"learning_rate=-1.0"),
        (lambda m, s: recover_layerwise(m, s, calibration(), learning_rate=math.nan), r"learning_rate=nan"),
        (lambda m, s: recover_layerwise(m, s, "some text"), r"not a source of token ids"),
        (lambda m, s: recover_layerwise(m, s, [torch.full((2, 4), VOCAB)]), r"token id 101, outside \[0, 101\)"),
    ],
)
def test_bad_input_is_refused_before_any_weight_moves(call, match):
    stock, model = patched_pair(FAMILIES[0], False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        call(model, stock)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_reference_of_another_size_is_refused():
    stock, model = patched_pair(FAMILIES[0], False)
    config = copy.deepcopy(FAMILIES[0].config)
    config.n_layer = 3
    with pytest.raises(ValueError, match=r"differ in num_hidden_layers \(2 vs 3\)"):
        recover_layerwise(model, type(stock)(config), calibration())


def test_kl_to_a_reference_in_the_perplexity_pass():
    family = ROTARY[0]
    torch.manual_seed(0)
    stock, model = patched_pair(family, True)
    stream = torch.randint(2, VOCAB, (40,), generator=torch.Generator().manual_seed(3))
    same = evaluate_perplexity(stock, stream, max_length=16, stride=16, reference=copy.deepcopy(stock))
    assert abs(same["kl_to_reference"]) < 1e-6  # KL of a distribution to itself, float32 log-softmax rounding
    result = evaluate_perplexity(model, stream, max_length=16, stride=16, reference=stock)
    # by hand over the disjoint windows [0, 16), [16, 32), [32, 40): every position but each window's last
    total, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, 40, 16):
            ids = stream[begin:begin + 16][None]
            p = stock(input_ids=ids).logits[0, :-1].log_softmax(-1)
            q = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            total += float((p.exp() * (p - q)).sum())
            count += ids.shape[1] - 1
    assert result["tokens"] == count
    assert result["kl_to_reference"] == pytest.approx(total / count, rel=1e-4)  # float32 sums in another order
    assert result["kl_to_reference"] > 1e-3
    assert "kl_to_reference" not in evaluate_perplexity(model, stream, max_length=16)
