"""The quantized latent cache (#23): int8 / int4, per-token or per-channel scales, a full-precision window, inside
generate() for every decoder family; bytes measured on the cache; the choice saved with the model; clear errors."""

from __future__ import annotations

import pytest
import torch
from families import DECODERS, inputs
from transformers import AutoModelForCausalLM

from hf_merged_attn import LatentQuantizedCache, patch_model, use_quantized_latent_cache
from hf_merged_attn.evaluation import kv_cache_bytes_per_token
from hf_merged_attn.quantized_cache import GENERATION_FIELD, dequantize, fake_quantized_latent, quantize

SETTINGS = [(8, "token", None), (8, "channel", 4), (4, "token", 4), (4, "channel", 2)]  # (nbits, axis, q_group_size)
IDS = [f"int{b}-{a}" for b, a, _ in SETTINGS]


@pytest.mark.parametrize("nbits,axis,group", [(8, "token", 16), (4, "token", 8), (8, "channel", 4), (4, "channel", 6)])
def test_round_trip_error_is_half_a_step(nbits, axis, group):
    x = torch.randn(2, 1, 12, 32) * torch.linspace(0.1, 5, 32)  # channels of very different scales
    codes, scale, low = quantize(x, nbits, axis, group)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == (32 if nbits == 8 else 16)  # int4: two codes per byte
    restored = dequantize(codes, scale, low, nbits, axis, group, x.dtype)
    shape = (2, 1, 12, 32 // group, group) if axis == "token" else (2, 1, 12 // group, group, 32)
    step = scale.expand(shape).reshape(x.shape)  # each element's quantization step
    # uniform rounding: at most half a step off (plus fp32 round-off of the affine map)
    assert ((restored - x).abs() <= step / 2 + 1e-5).all()
    assert (restored - x).abs().max() > 0  # it really quantizes


@pytest.mark.parametrize("family", DECODERS, ids=[f.model_type for f in DECODERS])
@pytest.mark.parametrize("nbits,axis,group", SETTINGS, ids=IDS)
def test_generate_with_a_quantized_latent_cache(family, nbits, axis, group):
    """Greedy, beams and seeded sampling over a left-padded batch run with the cache; with a window longer than the
    sequence nothing is quantized and the tokens are the dynamic cache's exactly."""
    model = patch_model(family.make("sdpa" if family.sdpa else "eager"), "latent", rank=8)
    ids, mask = inputs(family, batch=3, length=10)
    settings = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=family.config.pad_token_id)
    for strategy in (dict(do_sample=False), dict(do_sample=False, num_beams=3), dict(do_sample=True, top_k=20)):
        torch.manual_seed(1)
        dynamic = model.generate(ids, **settings, **strategy)
        torch.manual_seed(1)
        window = LatentQuantizedCache(model.config, nbits=nbits, axis=axis, q_group_size=group, residual_length=64)
        assert torch.equal(model.generate(ids, past_key_values=window, **settings, **strategy), dynamic)
        quantized = LatentQuantizedCache(model.config, nbits=nbits, axis=axis, q_group_size=group, residual_length=2)
        out = model.generate(ids, past_key_values=quantized, **settings, **strategy)
        assert out.shape == dynamic.shape and quantized.layers[0].codes is not None  # older tokens were quantized


@pytest.mark.parametrize("family", DECODERS, ids=[f.model_type for f in DECODERS])
def test_cache_equals_no_cache_within_the_quantization_error(family):
    """A decode step against a cache that quantized every token (window 0) reads exactly the dequantized latents (the
    same step against a dynamic cache holding them gives the same logits), and differs from the full forward by the
    quantization only: less at int8 than at int4. fake_quantized_latent (every position, prompt included, attends
    round-tripped latents: what cache_sweep's quantized perplexities use) lands within that same error."""
    from transformers import DynamicCache

    model = patch_model(family.make("sdpa" if family.sdpa else "eager"), "latent", rank=8)
    ids, mask = inputs(family, batch=3, length=10)
    errors = {}
    for nbits in (8, 4):
        cache = LatentQuantizedCache(model.config, nbits=nbits, residual_length=0)
        with torch.no_grad():
            model(ids[:, :9], attention_mask=mask[:, :9], past_key_values=cache, use_cache=True)
            held = DynamicCache(config=model.config)
            for i, layer in enumerate(cache.layers):  # the dequantized latents the quantized cache hands to attention
                latent = dequantize(layer.codes, layer.scale, layer.low, nbits, "token", layer.group, torch.float32)
                held.update(latent, latent[..., :0], i)
            reference = model(ids[:, 9:], attention_mask=mask, past_key_values=held, use_cache=True).logits[:, -1]
            step = model(ids[:, 9:], attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
            exact = model(ids, attention_mask=mask).logits[:, -1]
            with fake_quantized_latent(model, nbits=nbits):
                simulated = model(ids, attention_mask=mask).logits[:, -1]
        # the new token's own latent is quantized in the step (window 0) and exact in `held`: compare within int8's step
        assert (step - reference).abs().max() < (step - exact).abs().max() + 1e-6
        errors[nbits] = (step - exact).abs().max().item()
        assert (simulated - exact).abs().max() < 4 * errors[nbits]
    assert 0 < errors[8] < errors[4]


@pytest.mark.parametrize("family", DECODERS, ids=[f.model_type for f in DECODERS])
@pytest.mark.parametrize("nbits,axis,group", SETTINGS + [(4, "token", None)], ids=IDS + ["int4-token-per-token"])
@pytest.mark.parametrize("patch", [dict(mode="latent", rank=8), dict(mode="covariance", values="merged")],
                         ids=["latent", "merged-values"])
def test_decode_reads_the_codes_in_blocks_as_the_whole_dequantized_cache(family, nbits, axis, group, patch):
    """The decode (the absorbed latent, or merged values' x) attends the quantized part block by block
    (`attend_absorbed`: an online softmax over blocks of 4 tokens here, the window last) and gives the logits of
    attending the whole cache dequantized at once (the same cache with code reading switched off), over a left-padded
    batch, one- and two-token steps, with and without a full-precision window. One scale per token (int8-token,
    int4-token-per-token) goes the affine way (scales on the scores and weights; int4 in even / odd channel halves),
    groups of channels and the channel axis dequantize each block. 1e-5: float32 summation order (blocks vs one
    softmax, scales applied after the products), ~1e-7 of logits of ~1."""
    model = patch_model(family.make("sdpa" if family.sdpa else "eager"), **patch)
    ids, mask = inputs(family, batch=3, length=16)
    for window in (0, 3):
        caches = []
        for reads in (True, False):
            cache = LatentQuantizedCache(model.config, nbits=nbits, axis=axis, q_group_size=group, residual_length=window)
            for layer in cache.layers:
                layer.reads_codes, layer.block_size = reads, 4
            caches.append(cache)
        with torch.no_grad():
            logits = [[model(ids[:, :9], attention_mask=mask[:, :9], past_key_values=c, use_cache=True).logits]
                      for c in caches]
            for start, end in ((9, 10), (10, 11), (11, 13), (13, 14), (14, 16)):
                for c, out in zip(caches, logits):
                    out.append(model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=c,
                                     use_cache=True).logits)
        assert caches[0].layers[0].codes is not None and caches[0].layers[0].codes.shape[2] > 4  # several blocks
        for blocked, whole in zip(*logits):
            assert (blocked - whole).abs().max() < 1e-5, (window, (blocked - whole).abs().max())


def test_bytes_per_token_are_measured_on_the_cache():
    """Codes, scales and minima counted; the window in the model's dtype. r_c = 8, fp32, 2 layers."""
    family = DECODERS[0]
    model = patch_model(family.make(), "latent", rank=8)
    full = kv_cache_bytes_per_token(model, prompt_length=40)
    int8 = kv_cache_bytes_per_token(model, prompt_length=40,
                                    past_key_values=LatentQuantizedCache(model.config, nbits=8, residual_length=0))
    int4 = kv_cache_bytes_per_token(model, prompt_length=40,
                                    past_key_values=LatentQuantizedCache(model.config, nbits=4, residual_length=0))
    assert full == 2 * 8 * 4  # layers x r_c x fp32
    assert int8 == 2 * (8 + 2 * 4) and int4 == 2 * (4 + 2 * 4)  # codes + (scale, minimum) in fp32, one group per token


def test_the_choice_is_saved_with_the_model(tmp_path):
    family = DECODERS[0]
    model = patch_model(family.make(), "latent", rank=8)
    use_quantized_latent_cache(model, nbits=4, residual_length=3)
    card = model.create_model_card()
    assert "defaults to a quantized latent cache (LatentQuantizedCache: int4" in card
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(loaded.generation_config, GENERATION_FIELD)["nbits"] == 4
    ids, mask = inputs(family, batch=2, length=8)
    out = loaded.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                          pad_token_id=0)
    assert isinstance(out.past_key_values, LatentQuantizedCache) and out.past_key_values.layers[0].codes is not None
    explicit = loaded.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                               pad_token_id=0, cache_implementation="dynamic")
    assert not isinstance(explicit.past_key_values, LatentQuantizedCache)  # a cache asked for explicitly wins
    use_quantized_latent_cache(loaded, nbits=None)
    assert not hasattr(loaded.generation_config, GENERATION_FIELD)


@pytest.mark.parametrize("kwargs,match", [
    ({"nbits": 3}, r"nbits=3 is not supported; allowed: \(4, 8\)"),
    ({"axis": "head"}, r"axis='head' is not a quantization axis; allowed: \('token', 'channel'\)"),
    ({"q_group_size": 0}, r"q_group_size=0 must be a positive integer"),
    ({"nbits": 4, "q_group_size": 3}, r"q_group_size=3 must be a positive integer \(even for nbits=4"),
    ({"residual_length": -1}, r"residual_length=-1 must be an integer >= 0"),
])
def test_bad_settings_fail_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatentQuantizedCache(DECODERS[0].config, **kwargs)


def test_layers_that_cache_two_tensors_are_refused():
    family = DECODERS[0]
    model = patch_model(family.make(), "lowrank", rank=3)
    ids, mask = inputs(family, batch=2, length=6)
    with pytest.raises(ValueError, match=r"LatentQuantizedCache holds layers whose values are their keys.*patch every layer"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0,
                       past_key_values=LatentQuantizedCache(model.config))
    with pytest.raises(ValueError, match=r"use_quantized_latent_cache needs every layer patched so that it caches one"):
        use_quantized_latent_cache(model)
    with pytest.raises(ValueError, match=r"q_group_size=3 does not divide the latent width 8"):
        latent = patch_model(family.make(), "latent", rank=8)
        latent.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0,
                        past_key_values=LatentQuantizedCache(latent.config, q_group_size=3))
    merged = patch_model(family.make(), "covariance", values="merged")  # x cached once: quantizable too
    out = merged.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0, do_sample=False,
                          past_key_values=LatentQuantizedCache(merged.config, residual_length=0))
    assert out.shape == (2, 9)
