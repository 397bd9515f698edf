"""The quantized latent cache on rotary models (#28 item 5): c quantized, the rotated rotary keys kept in the model's
dtype, on a tiny random Llama (d = 32, 4 heads of 8, 2 KV heads, 2 layers, strong q/k/v weights), patched as
`patch_model(model, "latent", rank=12, rope_pairs=1, rope_selection="high")`: r_c = 12 and 2 KV heads x 2 numbers of
rotary keys per token and layer."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicLayer

from hf_merged_attn import LatentQuantizedCache, patch_model, use_quantized_latent_cache
from hf_merged_attn.evaluation import kv_cache_bytes_per_token
from hf_merged_attn import quantized_cache
from hf_merged_attn.quantized_cache import GENERATION_FIELD, dequantize, quantize

HIDDEN, HEADS, HEAD_DIM, KV_HEADS, LAYERS, VOCAB, RANK = 32, 4, 8, 2, 2, 101, 12
ROTARY = KV_HEADS * 2  # one kept pair (2 numbers) per KV head
CONFIG = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, head_dim=HEAD_DIM, num_key_value_heads=KV_HEADS,
                     num_hidden_layers=LAYERS, intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0, attention_dropout=0.0, attention_bias=False)
WINDOW = 2  # residual_length: all but the newest two tokens quantized


def rotary_model(attn_implementation: str = "sdpa"):
    """The tiny Llama with strong q/k/v/o weights, patched as the rotary latent."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(copy.deepcopy(CONFIG)).eval()
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(p in name for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
                param.normal_(0.0, 0.3)
    return patch_model(model, "latent", rank=RANK, rope_pairs=1, rope_selection="high")


def batch(length: int = 10, rows: int = 3):
    """Random ids and a LEFT-padded mask: row b has 2·b padding tokens."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    for row in range(1, rows):
        mask[row, : 2 * row] = 0
    return ids.masked_fill(mask == 0, 0), mask


class RoundTripLayer(DynamicLayer):
    """Reference: a dynamic layer that keeps c and the rotary keys exact and returns c with all but the newest
    `window` tokens quantize-dequantized (token axis, one group per token: each token's round trip depends on it
    alone) — what LatentQuantizedCache's decode attends, computed another way."""

    def __init__(self, nbits: int, window: int):
        super().__init__()
        self.nbits, self.window = nbits, window

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states)  # (B, 1, Tk, r_c), (B, 1, Tk, Gk·2K)
        old = keys.shape[-2] - self.window
        if old <= 0:
            return keys, values
        codes, scale, low = quantize(keys[..., :old, :], self.nbits, "token", RANK)
        restored = dequantize(codes, scale, low, self.nbits, "token", RANK, keys.dtype)
        return torch.cat([restored, keys[..., old:, :]], dim=-2), values


def run(model, ids, mask, cache, **settings):
    """Six greedy (or beam) steps with `cache` (None: generate's own choice), the logits of each step returned."""
    if cache is not None:
        settings["past_key_values"] = cache
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, **settings)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("nbits", [8, 4])
def test_generate_attends_the_round_tripped_latent_and_exact_rotary_keys(nbits, implementation):
    """Greedy and beams over a left-padded batch: every step's logits equal those of a reference cache that
    quantize-dequantizes c alone (rotary keys exact), and differ from the unquantized cache's."""
    model = rotary_model(implementation)
    ids, mask = batch()
    for strategy in (dict(), dict(num_beams=3)):
        cache = LatentQuantizedCache(model.config, nbits=nbits, residual_length=WINDOW)
        out = run(model, ids, mask, cache, **strategy)
        reference = run(model, ids, mask, Cache(layers=[RoundTripLayer(nbits, WINDOW) for _ in range(LAYERS)]),
                        **strategy)
        exact = run(model, ids, mask, None, **strategy)
        layer = out.past_key_values.layers[0]
        assert layer.carries_values and layer.codes is not None and layer.codes.shape[2] > 10  # most tokens quantized
        assert not layer.reads_codes  # MergedAttention's block reader (c alone) is never offered this layer
        assert layer.values.dtype == torch.float32 and layer.values.shape[-2] == out.past_key_values.get_seq_length()
        assert torch.equal(out.sequences, reference.sequences)
        quantized, expected = torch.stack(out.logits), torch.stack(reference.logits)
        assert (quantized - expected).abs().max() < 1e-4
        if not strategy:  # greedy: the quantization shows in the logits of the decode steps
            assert (quantized[1:] - torch.stack(exact.logits)[1:]).abs().max() > 1e-4


def test_bytes_per_token_are_codes_and_scales_of_c_plus_the_rotary_keys():
    """fp32: codes of c (r_c bytes at int8, r_c/2 at int4), a scale and a minimum (2 x 4 bytes) and the rotary keys
    (Gk·2K x 4 bytes) per token and layer; below the fp32 latent's (r_c + Gk·2K) x 4."""
    model = rotary_model()
    full = kv_cache_bytes_per_token(model, prompt_length=40)
    int8 = kv_cache_bytes_per_token(model, prompt_length=40,
                                    past_key_values=LatentQuantizedCache(model.config, nbits=8, residual_length=0))
    int4 = kv_cache_bytes_per_token(model, prompt_length=40,
                                    past_key_values=LatentQuantizedCache(model.config, nbits=4, residual_length=0))
    assert full == LAYERS * (RANK + ROTARY) * 4
    assert int8 == LAYERS * (RANK + 2 * 4 + ROTARY * 4)
    assert int4 == LAYERS * (RANK // 2 + 2 * 4 + ROTARY * 4)
    assert int4 < int8 < full


def test_the_default_is_saved_and_used_by_generate(tmp_path):
    model = rotary_model()
    use_quantized_latent_cache(model, nbits=4, residual_length=WINDOW)
    card = model.create_model_card()
    assert "defaults to a quantized latent cache (LatentQuantizedCache: int4" in card
    assert "6 bytes of codes + 2 scale numbers" in card and f"rotary keys are not quantized: {ROTARY} numbers" in card
    assert f"{RANK // 2 + (2 + ROTARY) * 4:g} bytes per token and layer in all" in card
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(loaded.generation_config, GENERATION_FIELD)["nbits"] == 4
    ids, mask = batch()
    out = run(loaded, ids, mask, None)
    cache = out.past_key_values
    assert isinstance(cache, LatentQuantizedCache) and cache.settings.nbits == 4 and cache.layers[0].codes is not None
    explicit = run(loaded, ids, mask, LatentQuantizedCache(loaded.config, nbits=4, residual_length=WINDOW))
    assert torch.equal(out.sequences, explicit.sequences)


@pytest.mark.parametrize("nbits", [8, 4])
def test_prompt_lookup_decoding_crops_both_tensors(nbits, monkeypatch):
    """Prompt-lookup decoding (5 candidates over a window of 2) rejects candidates and crops the cache back into its
    quantized part: c and the rotary keys keep one length, the first layer's rotary keys (which depend on the tokens
    alone) are those of plain greedy decoding, and at int8 the tokens are plain greedy decoding's with the same cache
    settings (verification attends a few candidates as codes that one-by-one decoding holds in full precision)."""
    model = rotary_model()
    ids = torch.tensor([[5, 6, 7, 8, 9] * 3])  # repeats: prompt lookup proposes candidates, some rejected
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(ids, past_key_values=LatentQuantizedCache(model.config, nbits=nbits,
                                                                         residual_length=WINDOW), **settings)
        crops, original = [], quantized_cache.LatentQuantizedLayer.crop

        def crop(layer, tokens_to_remove):
            crops.append((-tokens_to_remove, layer.keys.shape[-2] if layer.is_initialized else 0))
            return original(layer, tokens_to_remove)

        monkeypatch.setattr(quantized_cache.LatentQuantizedLayer, "crop", crop)
        cache = LatentQuantizedCache(model.config, nbits=nbits, residual_length=WINDOW)
        lookup = model.generate(ids, past_key_values=cache, prompt_lookup_num_tokens=5, **settings)
    assert any(removed > window for removed, window in crops), crops  # some crop took back quantized tokens
    for layer in cache.layers:
        assert layer.values.shape[-2] == layer.get_seq_length() == cache.get_seq_length()
    first, reference = cache.layers[0].values, plain.past_key_values.layers[0].values  # (1, 1, Tk, Gk·2K)
    same = (lookup.sequences[0] == plain.sequences[0]).long().cumprod(0).sum()  # leading tokens both runs share
    common = min(first.shape[-2], reference.shape[-2], int(same))
    assert common > ids.shape[1] and (first[..., :common, :] - reference[..., :common, :]).abs().max() < 1e-5
    if nbits == 8:
        assert torch.equal(lookup.sequences, plain.sequences)


def test_every_token_operation_acts_on_the_rotary_keys():
    """On one layer: the values (rotary keys) follow c through batch repeat / select, a crop and a reset, and come
    back whole and exact; without full_precision_values a non-empty value slot is still refused."""
    layer = quantized_cache.LatentQuantizedLayer(quantized_cache.QuantizationSettings(nbits=8, residual_length=WINDOW))
    latent, rotary = torch.randn(2, 1, 7, RANK), torch.randn(2, 1, 7, ROTARY)  # (B, 1, T, r_c), (B, 1, T, Gk·2K)
    keys, values = layer.update(latent, rotary, full_precision_values=True)
    assert keys.shape == latent.shape and 0 < (keys - latent).abs().max() < 0.1 and torch.equal(values, rotary)
    layer.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
    layer.batch_select_indices(torch.tensor([3, 0]))  # rows 1, 0
    assert torch.equal(layer.values, rotary[[1, 0]]) and layer.codes.shape[0] == 2
    layer.crop(-1)  # within the window
    assert torch.equal(layer.values, rotary[[1, 0], :, :6]) and layer.get_seq_length() == 6
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.values is None and not layer.carries_values
    with pytest.raises(ValueError, match="values are their keys"):
        quantized_cache.LatentQuantizedLayer(layer.settings).update(latent, rotary)
