"""Nothing silent in the quantized latent cache (#27, items 3, 4, 6, 7, 9, 10, 12 and the cost of dequantizing work
that is thrown away), on the tiny random decoders of families.py.

Each test failed before its fix: a stale quantized default outlived unpatch_model; a cache_implementation set in a
generation config collided with it; crop took a positive value as a length and could not undo assisted decoding's
rejected candidates; a forced kernel was ignored under the quantized cache; nbits=8.0 was recorded as a float; a
fullgraph compile recompiled at every step until Dynamo's limit; eager decoding and every prefill dequantized the
whole quantized part.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from families import DECODERS, inputs
from transformers import DynamicCache, GenerationConfig, StaticCache
from transformers.generation.utils import ALL_CACHE_NAMES

from hf_merged_attn import (
    LatentQuantizedCache,
    MergedAttention,
    patch_model,
    unpatch_model,
    use_kernels,
    use_quantized_latent_cache,
)
from hf_merged_attn import quantized_cache
from hf_merged_attn.quantized_cache import COMPILE_REFUSAL, GENERATION_FIELD, QuantizationSettings

GPT2 = DECODERS[0]
WIDTH = 8  # the latent width r_c of every latent model here


def _latent(family=GPT2, implementation="sdpa", **settings):
    """A latent model (r_c = 8) of `family`, with `use_quantized_latent_cache(**settings)` if settings are given."""
    model = patch_model(family.make(implementation if family.sdpa else "eager"), "latent", rank=WIDTH)
    return use_quantized_latent_cache(model, **settings) if settings else model


def _generate(model, ids, mask, **settings):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                              return_dict_in_generate=True, **settings)


# --- 3. a stale quantized-cache default --------------------------------------------------------------------------------


def test_unpatch_removes_the_quantized_cache_default(tmp_path):
    """latent -> use_quantized_latent_cache -> unpatch: the stock model (and its saved generation_config.json) holds no
    quantized default, and patching it again as covariance generates with the dynamic cache."""
    model = _latent(nbits=8)
    unpatch_model(model)
    assert not hasattr(model.generation_config, GENERATION_FIELD)
    model.save_pretrained(tmp_path)
    assert GENERATION_FIELD not in json.loads((tmp_path / "generation_config.json").read_text())
    patch_model(model, "covariance")
    ids, mask = inputs(GPT2, batch=2, length=6)
    assert isinstance(_generate(model, ids, mask).past_key_values, DynamicCache)


def test_a_patch_that_cannot_use_a_stale_default_drops_it_and_says_why(caplog):
    """A stock model whose generation config still carries the field (a generation_config.json saved before unpatch
    removed it): a patch that cannot use it drops it with a warning naming the reason; one that can keeps it."""
    ids, mask = inputs(GPT2, batch=2, length=6)
    cases = [  # (patch, stale settings, the reason it cannot be used, or None: kept)
        (dict(mode="covariance"), dict(nbits=8), "needs every layer patched so that it caches one tensor"),
        (dict(mode="latent", rank=WIDTH), dict(nbits=8, q_group_size=3), "q_group_size=3 does not divide the latent"),
        (dict(mode="latent", rank=WIDTH), dict(nbits=4, residual_length=2), None),
    ]
    for patch, stale, reason in cases:
        stock = GPT2.make("sdpa")
        setattr(stock.generation_config, GENERATION_FIELD, {**vars(QuantizationSettings()), **stale})
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            model = patch_model(stock, **patch)
        cache = _generate(model, ids, mask).past_key_values
        if reason is None:
            assert getattr(model.generation_config, GENERATION_FIELD)["nbits"] == 4 and not caplog.text
            assert isinstance(cache, LatentQuantizedCache)
        else:
            assert not hasattr(model.generation_config, GENERATION_FIELD) and isinstance(cache, DynamicCache)
            assert f"patch_model dropped generation_config.{GENERATION_FIELD}" in caplog.text and reason in caplog.text
            assert "use_quantized_latent_cache(model)" in caplog.text  # what to do to quantize again


# --- 4. a cache_implementation wins wherever it is set ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["argument", "passed generation_config", "model.generation_config"])
def test_a_cache_implementation_set_anywhere_wins_over_the_quantized_default(where):
    model = _latent(nbits=8)
    ids, mask = inputs(GPT2, batch=2, length=6)
    dynamic = _generate(model, ids, mask, cache_implementation="dynamic").sequences
    if where == "argument":
        out = _generate(model, ids, mask, cache_implementation="static")
    elif where == "passed generation_config":
        config = GenerationConfig(cache_implementation="static", max_new_tokens=4, do_sample=False, pad_token_id=0,
                                  return_dict_in_generate=True)
        with torch.no_grad():
            out = model.generate(ids, config, attention_mask=mask)  # positionally, as generate's second argument
    else:
        model.generation_config.cache_implementation = "static"
        out = _generate(model, ids, mask)
    assert isinstance(out.past_key_values, StaticCache)
    assert torch.equal(out.sequences, dynamic)  # the static cache gives the dynamic cache's tokens exactly


def test_a_passed_cache_or_use_cache_false_wins_over_the_quantized_default():
    model = _latent(nbits=8)
    ids, mask = inputs(GPT2, batch=2, length=6)
    for name in {ALL_CACHE_NAMES[0], "past_key_values"}:  # this transformers' name for it ("cache" in 5.25), the former
        passed = DynamicCache(config=model.config)
        assert _generate(model, ids, mask, **{name: passed}).past_key_values is passed
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(
            use_cache=False, max_new_tokens=2, pad_token_id=0, return_dict_in_generate=True))
    assert out.past_key_values is None


# --- 6. crop as transformers' layers crop --------------------------------------------------------------------------


def _filled(length=10, residual_length=4, record=False, **settings):
    """A one-layer cache with `length` random latents appended in one update (as a prefill does)."""
    cache = LatentQuantizedCache(num_layers=1, residual_length=residual_length, **settings)
    if record:
        cache.activate_past_recording()
    latents = torch.randn(2, 1, length, WIDTH)
    cache.update(latents, latents[..., :0], 0)
    return cache, latents


def test_crop_takes_a_count_to_remove_as_transformers_layers_do():
    cache, _ = _filled()
    for value in (12, 15, 3, 2.0):  # a positive count (an old "length to keep") is refused, as DynamicLayer refuses it
        with pytest.raises(ValueError, match=rf"crop\({value!r}\): pass the number of newest tokens to remove as a "
                                             r"negative integer \(crop\(-n\)"):
            cache.crop(value)
    assert cache.get_seq_length() == 10  # untouched
    cache.crop(0)
    cache.crop(-3)  # within the full-precision window of 4
    assert cache.get_seq_length() == 7 and cache.layers[0].keys.shape[-2] == 1
    empty = LatentQuantizedCache(num_layers=2)
    empty.crop(-2)  # a layer that holds nothing: nothing to do (DynamicLayer's rule)
    assert empty.get_seq_length() == 0
    cache.crop(torch.tensor(-1))  # transformers 5.17's assisted decoding passes a 0-d tensor
    cache.crop(-20)  # more than it holds removes all, as DynamicLayer's slicing does
    assert cache.get_seq_length() == 0 and cache.layers[0].codes is None
    cache.reset()  # empty and uninitialised again: the next update starts afresh
    latents = torch.randn(2, 1, 3, WIDTH)
    cache.update(latents, latents[..., :0], 0)
    assert torch.equal(cache.layers[0].keys, latents)


# --- 7. rolling back what assisted decoding rejects -----------------------------------------------------------------


@pytest.mark.parametrize("settings", [dict(nbits=8), dict(nbits=4, q_group_size=4), dict(nbits=8, axis="channel",
                                                                                          q_group_size=2)],
                         ids=["int8-token", "int4-token-groups", "int8-channel"])
def test_a_crop_into_the_quantized_part_restores_what_the_kept_tokens_alone_give(settings):
    """Past recording on (as assisted decoding sets it): an update of 6 candidates then crop(-n) leaves exactly the
    cache that the kept tokens alone give — codes, scales, minima and window equal bit for bit (quantizing a token,
    or a group of tokens, depends on those tokens only) — for every n, within the window (n <= 3) or beyond it."""
    for remove in range(0, 7):
        cache, prompt = _filled(residual_length=3, record=True, **settings)
        candidates = torch.randn(2, 1, 6, WIDTH)
        cache.update(candidates, candidates[..., :0], 0)
        cache.crop(-remove)
        kept = torch.cat([prompt, candidates[:, :, : 6 - remove]], dim=2)
        reference = LatentQuantizedCache(num_layers=1, residual_length=3, **settings)
        reference.update(kept, kept[..., :0], 0)
        layer, expected = cache.layers[0], reference.layers[0]
        assert layer.get_seq_length() == 16 - remove and layer.pending is None
        for name in ("codes", "scale", "low", "keys"):
            assert torch.equal(getattr(layer, name), getattr(expected, name)), (remove, name)


def test_a_crop_past_what_was_recorded_is_refused_with_what_to_do():
    cache, _ = _filled(residual_length=2)  # no past recording: 8 tokens quantized, 2 in the window
    with pytest.raises(ValueError, match=r"crop\(-3\) would remove quantized tokens and leave 7 of 10, whose newest 2 "
                                         r"belong in full precision .* at most 2 token\(s\), or all 10, can be removed "
                                         r"now\. Call cache\.activate_past_recording\(\)"):
        cache.crop(-3)
    cache.crop(-2)  # the window itself can always go (the quantized tokens stay as they are)
    assert cache.get_seq_length() == 8 and cache.layers[0].codes.shape[2] == 8
    zero, _ = _filled(residual_length=0)  # no window: a token-axis crop only cuts codes, exactly
    zero.crop(-4)
    assert zero.get_seq_length() == 6 and zero.layers[0].codes.shape[2] == 6


def _repetitive(length=14):
    """A prompt that repeats itself, so prompt lookup proposes candidates (some of them rejected)."""
    return torch.tensor([[5, 6, 7, 8, 9] * (length // 5) + [5, 6, 7, 8, 9][: length % 5]])


def _recording_crops(monkeypatch) -> list[tuple[int, int, int]]:
    """Every LatentQuantizedLayer.crop from now on, as (id of the layer, tokens removed, full-precision window)."""
    crops, original = [], quantized_cache.LatentQuantizedLayer.crop

    def crop(layer, tokens_to_remove):
        crops.append((id(layer), -tokens_to_remove, layer.keys.shape[-2] if layer.is_initialized else 0))
        return original(layer, tokens_to_remove)

    monkeypatch.setattr(quantized_cache.LatentQuantizedLayer, "crop", crop)
    return crops


def test_prompt_lookup_decoding_with_a_window_smaller_than_the_candidates(monkeypatch):
    """prompt_lookup_num_tokens=5 over a window of 2 (it used to fail mid-generation: "can only crop tokens of its
    full-precision window (2); asked to remove 3"): it runs, its crops reach into the codes, and it gives plain greedy
    decoding's tokens with the same cache settings (candidate verification attends a few tokens as codes that one-by-one
    decoding holds in full precision: int8 error, far below this tiny model's margins between tokens)."""
    model = _latent()
    ids = _repetitive()
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, past_key_values=LatentQuantizedCache(model.config, residual_length=2), **settings)
        crops = _recording_crops(monkeypatch)
        lookup = model.generate(ids, past_key_values=LatentQuantizedCache(model.config, residual_length=2),
                                prompt_lookup_num_tokens=5, **settings)
    assert any(removed > window for _, removed, window in crops)  # some crop took back tokens already quantized
    assert torch.equal(lookup, plain)


def test_assisted_decoding_with_an_assistant_that_quantizes_its_cache(monkeypatch):
    """The assistant (a latent OPT) has the quantized default with a window of 1 and drafts 5 tokens a round: its own
    cache records what it quantizes (as transformers' caches for assistants do), so rejected drafts roll back in it and
    in the main model's quantized cache (window 1). The tokens are plain greedy decoding's with the same cache (int8
    error far below this tiny model's margins)."""
    model, assistant = _latent(), _latent(DECODERS[1], nbits=8, residual_length=1)
    assistant.generation_config.update(num_assistant_tokens=5, num_assistant_tokens_schedule="constant",
                                       assistant_confidence_threshold=0.0)  # always 5 drafts: some are rejected
    ids = _repetitive(9)
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, past_key_values=LatentQuantizedCache(model.config, residual_length=1), **settings)
        main = LatentQuantizedCache(model.config, residual_length=1)
        crops = _recording_crops(monkeypatch)
        assisted = model.generate(ids, assistant_model=assistant, past_key_values=main, **settings)
    mains = {id(layer) for layer in main.layers}
    for side in (True, False):  # the main model's cache and the assistant's: crops beyond the window in both
        assert any(removed > window for layer, removed, window in crops if (layer in mains) == side), side
    assert torch.equal(assisted, plain)


# --- 9. forced kernels under the quantized cache ---------------------------------------------------------------------


def _decode_step(model, cache, ids, mask):
    with torch.no_grad():
        model(ids[:, :-1], attention_mask=None if mask is None else mask[:, :-1], past_key_values=cache, use_cache=True)
        return model(ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]


def _decode_kernels(model) -> set[str]:
    return {k.name for m in model.modules() if isinstance(m, MergedAttention)
            for (q, _), k in getattr(m, "_kernel_memo", {}).items() if q.phase == "decode"}


def test_a_forced_kernel_is_honoured_or_refused_under_a_quantized_cache():
    """The quantized reader is the kernel table's "quantized_blocks": chosen automatically, refused where it cannot run
    (a dynamic cache), and any other forced kernel is checked as under a dynamic cache — sdpa_gqa takes no mask, so a
    padded batch is refused (it ran silently with another path before), an unpadded one runs it."""
    ids, mask = inputs(GPT2, batch=3, length=10)
    model = _latent()
    cache = LatentQuantizedCache(model.config, residual_length=2)
    automatic = _decode_step(model, cache, ids[:1], None)
    assert _decode_kernels(model) == {"quantized_blocks"}
    use_kernels(model, decode="sdpa_gqa")
    with pytest.raises(ValueError, match=r"kernel 'sdpa_gqa' cannot compute this attention .*codes=True\)\); kernels "
                                         r"that can: \['quantized_blocks', 'sdpa_folded'"):
        _decode_step(model, LatentQuantizedCache(model.config, residual_length=2), ids, mask)
    forced = _decode_step(model, LatentQuantizedCache(model.config, residual_length=2), ids[:1], None)
    assert "sdpa_gqa" in _decode_kernels(model)
    assert (forced - automatic).abs().max() < 1e-5  # the same dequantized cache, another summation order (fp32)
    use_kernels(model, decode="quantized_blocks")
    with pytest.raises(ValueError, match=r"kernel 'quantized_blocks' cannot compute this attention"):
        _decode_step(model, DynamicCache(config=model.config), ids, mask)


# --- cost: nothing dequantized that is thrown away --------------------------------------------------------------------


@pytest.mark.parametrize("family", DECODERS, ids=[f.model_type for f in DECODERS])
@pytest.mark.parametrize("patch", [dict(mode="latent", rank=WIDTH), dict(mode="covariance", values="merged")],
                         ids=["latent", "merged-values"])
def test_eager_decode_and_prefill_read_blocks_and_return_eagers_weights(family, patch, monkeypatch):
    """Eager attention (always for BLOOM) decodes from the codes in blocks too, returning the weights eager returns, and
    a prefill dequantizes nothing: with one scale per token no dequantize call at all (each block is only converted),
    and the same logits and attention weights as the whole cache dequantized (code reading switched off)."""
    model = patch_model(family.make("eager"), **patch)
    ids, mask = inputs(family, batch=3, length=12)
    outputs, calls = [], []
    real = quantized_cache.dequantize
    monkeypatch.setattr(quantized_cache, "dequantize", lambda codes, *a: calls.append(codes.shape[2]) or real(codes, *a))
    for reads in (True, False):
        cache = LatentQuantizedCache(model.config, residual_length=2)
        for layer in cache.layers:
            layer.reads_codes, layer.block_size = reads, 4  # blocks of 4 tokens: several per step
        calls.clear()
        with torch.no_grad():
            model(ids[:, :9], attention_mask=mask[:, :9], past_key_values=cache, use_cache=True)
            prefill_calls = list(calls)
            steps = [model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], past_key_values=cache, use_cache=True,
                           output_attentions=True) for i in range(9, 12)]
        outputs.append((steps, prefill_calls, list(calls)))
    (blocked, prefill, reads), (whole, _, whole_reads) = outputs
    assert prefill == [] and reads == [] and whole_reads  # the whole-cache path did dequantize, every step
    for a, b in zip(blocked, whole):
        # fp32 summation order (blocks vs one product, scales applied to the scores): ~1e-7 of logits of ~1
        assert (a.logits - b.logits).abs().max() < 1e-5
        for wa, wb in zip(a.attentions, b.attentions):
            assert wa.shape == wb.shape and (wa - wb).abs().max() < 1e-6  # weights in [0, 1]


# --- 10. nbits is an integer -------------------------------------------------------------------------------------------


def test_nbits_must_be_an_integer_and_is_recorded_as_one():
    for value in (8.0, "8", 4.0, True):
        with pytest.raises(ValueError, match=rf"nbits={value!r}.* is not supported; allowed: \(4, 8\) .*as integers"):
            use_quantized_latent_cache(_latent(), nbits=value)
    model = use_quantized_latent_cache(_latent(), nbits=np.int64(4))
    recorded = getattr(model.generation_config, GENERATION_FIELD)["nbits"]
    assert recorded == 4 and type(recorded) is int


# --- 12. a fullgraph compile is refused at once -------------------------------------------------------------------------


def test_a_fullgraph_compile_of_a_quantized_decode_is_refused_at_the_first_call():
    """It used to recompile at every step and die with Dynamo's FailOnRecompileLimitHit after 8; now the first compiled
    call stops with the library's reason (the cache cannot be traced into one graph) and what to do."""
    model = _latent()
    ids, mask = inputs(GPT2, batch=2, length=8)
    cache = LatentQuantizedCache(model.config, residual_length=2)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    with torch.no_grad():
        token = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        full = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        with pytest.raises(Exception, match=r"LatentQuantizedCache cannot be compiled with torch\.compile\(\.\.\., "
                                            r"fullgraph=True\).*cache_implementation='static'") as error:
            compiled(token, attention_mask=full, past_key_values=cache, use_cache=True)
    assert "RecompileLimit" not in type(error.value).__name__ and COMPILE_REFUSAL.split(":")[0] in str(error.value)
    torch._dynamo.reset()
