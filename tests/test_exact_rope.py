"""The exact-RoPE latent (#35, MATH.md part five): rope="exact" on Llama (GQA), Qwen2 (q/k/v biases) and Mistral (a
sliding window shorter than the prompt), against the stock transformers models.

Tiny random configs from test_rotary (d = 32, 4 query heads of 8, 2 layers), strong q/k/v weights and non-zero biases.
At r_c = 2·G·hd the patch is the stock model; at any r_c the stock family computes it (unpatch_model); the cache holds
c and each token's position, so left-padded rows, beams, static caches, compiled steps and crops all rebuild keys at
each token's own position.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import max_diff
from test_rotary import (FAMILIES, HEAD_DIM, IDS, IMPLEMENTATIONS, LAYERS, STRATEGIES, batch, real_rows,
                         remote_logits_and_tokens)
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from hf_merged_attn import LatentQuantizedCache, patch_model, recover_layerwise, unpatch_model, use_kernels
from hf_merged_attn.evaluation import kv_cache_bytes_per_token
from hf_merged_attn.exact_rope import decode_positions, encode_positions, position_digits


def _stock_numbers(family) -> int:
    return 2 * family.kv_heads * HEAD_DIM


def _full_rank(family) -> int:
    """The smallest exact r_c: 2·G·hd, or the hidden size where that is smaller (W_c = I)."""
    return min(_stock_numbers(family), family.config.hidden_size)


def _reduced(family, implementation="sdpa", rank=6):
    """A reduced exact-RoPE latent (r_c = 6 of 2·G·hd = 16 .. 64), seeded from the weights alone."""
    return patch_model(family.make(implementation), "latent", rank=rank, rope="exact")


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _generate(model, ids, mask, **settings):
    torch.manual_seed(1)  # the same draws for sampling
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **settings)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_full_rank_is_stock_and_decoding_rebuilds_keys_exactly(family, implementation):
    """r_c = 2·G·hd (or d where smaller): the stock model (<= 1e-4 fp32, the seed's float64 SVD rounded to fp32); a prefill and a 3-token
    decode step over a left-padded batch equal the full forward at the same positions."""
    stock = family.make(implementation)
    ids, mask = batch()
    model = patch_model(copy.deepcopy(stock), "latent", rank=_full_rank(family), rope="exact")
    assert all(m.rope == "exact" for m in model.modules() if hasattr(m, "rope"))
    positions = _positions(mask)
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask).logits
        full = model(ids, attention_mask=mask).logits
        prefix = model(ids[:, :-3], attention_mask=mask[:, :-3], position_ids=positions[:, :-3], use_cache=True)
        step = model(ids[:, -3:], attention_mask=mask, position_ids=positions[:, -3:],
                     past_key_values=prefix.past_key_values).logits
    assert max_diff(real_rows(full, mask), real_rows(expected, mask)) < 1e-4
    # the decode kernel sums in another order than the expanded prefill (~1e-6 in fp32)
    assert max_diff(step, full[:, -3:]) < 2e-5


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_reduced_rank_unpatches_to_a_stock_model_computing_it(family):
    """At any r_c the stock family computes the patch (Wk = W_c·Bk, Wv = W_c·Bv, biases kept): unpatch_model returns
    a stock class whose logits equal the patched ones (fp32 round-off of the products), and clearly not stock's."""
    stock = family.make("sdpa")
    model = _reduced(family)
    ids, mask = batch()
    with torch.no_grad():
        patched = model(ids, attention_mask=mask).logits
        original = stock(ids, attention_mask=mask).logits
    exported, errors = unpatch_model(model, strict=True, return_errors=True)
    assert type(exported) is type(stock) and not hasattr(exported.config, "merged_attn")
    with torch.no_grad():
        again = exported(ids, attention_mask=mask).logits
    assert max_diff(real_rows(again, mask), real_rows(patched, mask)) < 1e-5
    assert max_diff(real_rows(original, mask), real_rows(patched, mask)) > 1e-2  # r_c = 6 is an approximation


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_generate_cached_uncached_static_and_rows_alone_agree(family, strategy, implementation):
    """Left-padded batches: generate() with the dynamic cache, the static cache and no cache give the same tokens
    (greedy, beams, sampling); greedy rows of the batch equal each row generated alone (its own positions)."""
    model = _reduced(family, implementation)
    ids, mask = batch(length=8)
    settings = STRATEGIES[strategy]
    dynamic = _generate(model, ids, mask, **settings)
    assert torch.equal(dynamic, _generate(model, ids, mask, use_cache=False, **settings))
    assert torch.equal(dynamic, _generate(model, ids, mask, cache_implementation="static", **settings))
    if strategy == "greedy":
        for row in range(ids.shape[0]):
            start = int((mask[row] == 0).sum())
            alone = _generate(model, ids[row:row + 1, start:], mask[row:row + 1, start:])
            assert torch.equal(alone[0, -6:], dynamic[row, -6:]), row


def test_assisted_decoding_crops_positions_with_the_latent():
    """Assisted decoding (a draft model; rejected candidates cropped from the cache) gives greedy's tokens."""
    family = FAMILIES[0]
    model = _reduced(family)
    draft = _reduced(family, rank=4)
    ids, _ = batch(length=8, rows=1)
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assisted = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, assistant_model=draft)
        lookup = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, greedy) and torch.equal(lookup, greedy)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_the_cache_holds_the_latent_and_positions_only(family):
    """Per token and layer: c (r_c numbers) and the position (1 number in fp32), on a dynamic and a static cache, and
    in kv_cache_bytes_per_token; stock holds 2·G·hd."""
    model = _reduced(family)
    ours, stock = kv_cache_bytes_per_token(model), kv_cache_bytes_per_token(family.make("sdpa"))
    assert ours / stock == (6 + 1) / _stock_numbers(family)
    ids, mask = batch(length=6)
    cache = StaticCache(config=model.config, max_cache_len=10)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=_positions(mask), past_key_values=cache, use_cache=True)
    slots = min(10, getattr(model.config, "sliding_window", None) or 10)
    assert [tuple(layer.keys.shape) for layer in cache.layers] == [(3, 1, slots, 6)] * LAYERS
    assert [tuple(layer.values.shape) for layer in cache.layers] == [(3, 1, slots, 1)] * LAYERS
    kept = min(6, slots)  # a sliding layer keeps the newest tokens of its window
    stored = cache.layers[0].values[:, 0, :kept, 0]  # the positions of the left-padded rows, as the model used them
    assert torch.equal(stored.long(), _positions(mask)[:, -kept:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_positions_survive_every_cache_dtype(dtype):
    """Stored positions decode to themselves in fp32 (1 number) and as base-256 digits in bf16 / fp16 (3 numbers),
    up to 2^24 - 1."""
    positions = torch.tensor([[0, 1, 255, 256, 4097, 65535, 65536, 2**24 - 1]])
    stored = encode_positions(positions, position_digits(dtype), dtype)
    assert stored.dtype == dtype and stored.shape == (1, 1, 8, position_digits(dtype))
    assert torch.equal(decode_positions(stored), positions)


def test_bf16_decoding_matches_its_own_forward():
    """bf16 weights and cache (positions as digits): greedy cached == uncached tokens."""
    model = _reduced(FAMILIES[0]).to(torch.bfloat16)
    ids, mask = batch(length=8)
    assert torch.equal(_generate(model, ids, mask), _generate(model, ids, mask, use_cache=False))


def test_both_decode_kernels_agree_and_steps_without_a_mask_are_causal():
    family = FAMILIES[2]
    model = _reduced(family)
    ids, mask = batch(length=10)
    positions = _positions(mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        for kernel in ("exact_rebuild", "exact_rebuild_sdpa", "exact_expand"):
            use_kernels(model, decode=kernel)
            prefix = model(ids[:, :-3], attention_mask=mask[:, :-3], position_ids=positions[:, :-3], use_cache=True)
            step = model(ids[:, -3:], attention_mask=mask, position_ids=positions[:, -3:],
                         past_key_values=prefix.past_key_values).logits
            assert max_diff(step, full[:, -3:]) < 2e-5, kernel
            prefix = model(ids[:1, :-3], use_cache=True)  # no mask at all: causal built inside the step
            step = model(ids[:1, -3:], past_key_values=prefix.past_key_values).logits
            assert max_diff(step, model(ids[:1]).logits[:, -3:]) < 2e-5, kernel


def test_compiled_decode_with_a_static_cache_does_not_recompile():
    """generate()'s compiled static-cache decode (fullgraph) gives eager's tokens, and compiling model.forward decodes
    step after step with no more graphs than stock compiles."""
    from test_rotary import check_compiled_decode

    check_compiled_decode(FAMILIES[0], _reduced(FAMILIES[0]))


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_quantized_latent_cache(family):
    """LatentQuantizedCache on exact-RoPE layers: with every token in the full-precision window it is the dynamic
    cache; int8 codes beyond a window of 2 stay close (quantization error only) and hold fewer bytes."""
    model = _reduced(family)
    ids, mask = batch(length=8)
    dynamic = _generate(model, ids, mask)
    window = LatentQuantizedCache(model.config, nbits=8, residual_length=64)
    assert torch.equal(_generate(model, ids, mask, past_key_values=window), dynamic)
    positions = _positions(mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = LatentQuantizedCache(model.config, nbits=8, residual_length=2)
        model(ids[:, :-2], attention_mask=mask[:, :-2], position_ids=positions[:, :-2], past_key_values=cache)
        step = model(ids[:, -2:], attention_mask=mask, position_ids=positions[:, -2:], past_key_values=cache).logits
    assert max_diff(step, full[:, -2:]) < 0.05 * full.abs().max().item()  # int8 codes of c, per token


def test_save_and_load_with_and_without_the_package(tmp_path):
    """Qwen2 (biases, GQA 4:1): the checkpoint reloads exactly through the Auto classes and as remote code without the
    package; the card names the route and that a stock export is exact."""
    family = FAMILIES[2]
    model = _reduced(family)
    ids, mask = batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["merged_attn"]["rope"] == "exact"
    card = (tmp_path / "README.md").read_text()
    assert "exact-RoPE" in card and "every frequency pair keeps its rotation" in card
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert max_diff(loaded(ids, attention_mask=mask).logits, expected) == 0.0
    remote = remote_logits_and_tokens(tmp_path, ids, mask)
    assert max_diff(torch.tensor(remote["logits"]), expected) < 1e-6  # the same code, another process
    assert remote["tokens"] == tokens.tolist()


def test_whitened_seeding_beats_weights_only_on_its_calibration_text():
    """init='whitened' (the joint [k | v] PCA in the inputs' metric) fits the layer outputs on calibration-like inputs
    better than the weights-only SVD at the same r_c."""
    family = FAMILIES[0]
    stock = family.make("sdpa")
    torch.manual_seed(0)
    data = [torch.randint(2, 30, (8, 16))]  # a skewed vocabulary: inputs live in a subspace
    held_out = torch.randint(2, 30, (4, 16))
    errors = {}
    for init in ("svd", "whitened"):
        model = patch_model(copy.deepcopy(stock), "latent", rank=6, rope="exact", init=init,
                            calibration=data if init == "whitened" else None)
        with torch.no_grad():
            errors[init] = max_diff(model(held_out).logits, stock(held_out).logits)
    assert errors["whitened"] < errors["svd"]


def test_layerwise_recovery_trains_the_latent():
    """recover_layerwise fits each exact-RoPE layer back toward stock: W_c, Bk, Bv move and the error falls."""
    family = FAMILIES[2]
    stock = family.make("sdpa")
    model = _reduced(family, rank=4)
    before = model.model.layers[0].self_attn.latent_proj.weight.clone()
    data = [torch.randint(2, 101, (4, 16))]
    records = recover_layerwise(model, stock, data, steps=20, learning_rate=1e-2)
    assert not torch.equal(before, model.model.layers[0].self_attn.latent_proj.weight)
    assert all(r["error_after"] < r["error_before"] for r in records)


def test_exact_rope_refusals_say_what_to_do():
    family = FAMILIES[0]
    with pytest.raises(ValueError, match="keeps every frequency pair rotated"):
        patch_model(family.make(), "latent", rank=6, rope="exact", rope_pairs=2)
    with pytest.raises(ValueError, match="not a rotary route"):
        patch_model(family.make(), "latent", rank=6, rope="full")
    with pytest.raises(ValueError, match="exceeds 16, the width of the keys and the values"):
        patch_model(FAMILIES[2].make(), "latent", rank=20, rope="exact")  # 2·G·hd = 16 < 20 < d = 32
    config = LlamaConfig(**{**FAMILIES[0].config.to_dict(), "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="changes its frequencies with the sequence length"):
        patch_model(LlamaForCausalLM(config), "latent", rank=6, rope="exact")
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="not rotary"):
        patch_model(GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=4, n_layer=1)), "latent", rank=8, rope="exact")


def test_default_route_is_exact_and_partial_keeps_todays_route():
    family = FAMILIES[0]
    default = patch_model(family.make(), "latent", rank=6)
    assert default.config.merged_attn["rope"] == "exact"
    partial = patch_model(family.make(), "latent", rank=6, rope_pairs=2, rope_selection="high")
    assert partial.config.merged_attn["rope"] == "partial" and partial.config.merged_attn["rope_pairs"] == 2
    cache = DynamicCache(config=partial.config)
    ids, mask = batch(length=6)
    with torch.no_grad():
        partial(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    assert cache.layers[0].values.shape[-1] == 2 * family.kv_heads * 2  # the rotated kept pairs, not positions


def test_a_rotated_latent_is_the_same_model_in_full_precision():
    """seeding={"rotate_latent": True} (the default) folds an orthogonal mix of c into W_c, Bk and Bv: the same logits
    as the unrotated seed (fp32 round-off), a different cached c."""
    from hf_merged_attn.seeding import orthogonal_mix

    family = FAMILIES[1]
    stock = family.make("sdpa")
    ids, mask = batch()
    plain = patch_model(copy.deepcopy(stock), "latent", rank=6, rope="exact", seeding={"rotate_latent": False})
    rotated = patch_model(copy.deepcopy(stock), "latent", rank=6, rope="exact")
    with torch.no_grad():
        assert max_diff(real_rows(rotated(ids, attention_mask=mask).logits, mask),
                        real_rows(plain(ids, attention_mask=mask).logits, mask)) < 1e-5
    down = [m.model.layers[0].self_attn.latent_proj.weight for m in (plain, rotated)]
    assert not torch.allclose(down[0], down[1])
    for size in (8, 6):  # Hadamard, and a seeded rotation
        mix = orthogonal_mix(size)
        assert torch.allclose(mix @ mix.T, torch.eye(size, dtype=mix.dtype), atol=1e-12)


@pytest.mark.parametrize("cast", ["before the patch", "after the patch"])
def test_bf16_keys_are_rotated_with_the_queries_frequencies_at_long_positions(cast):
    """A model cast to bf16 rotates its queries with bf16-rounded frequencies; the keys rebuilt from the cache must get
    the same ones (the layer's rotary embedding follows the model's casts, and takes the model's own frequencies at
    patch): one decode step after 3,000 tokens equals the full forward to bf16 noise (a float32 table for the keys
    against the bf16 one of the queries was off by ~5 in the logits here)."""
    config = LlamaConfig(**{**FAMILIES[0].config.to_dict(), "max_position_embeddings": 4096})
    torch.manual_seed(0)
    stock = LlamaForCausalLM(config).eval()
    if cast == "before the patch":
        stock = stock.to(torch.bfloat16)
    model = patch_model(stock, "latent", rank=_full_rank(FAMILIES[0]), rope="exact")
    if cast == "after the patch":
        model = model.to(torch.bfloat16)
    ids = torch.randint(2, 101, (1, 3001))
    with torch.no_grad():
        full = model(ids).logits.float()
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=prefix.past_key_values).logits.float()
    assert max_diff(step[:, -1], full[:, -1]) < 0.02 * full.abs().max().item()  # bf16 round-off of two orders of sums
