"""The same checks over every registered family (tests/families.py): exact at patch, padding, cache layout,
cache == no cache, greedy generate, save -> load with and without the package, export back to stock, errors."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BLOCK_PACKAGE, HANG_TIMEOUT
from families import DECODERS, FAMILIES, FAMILY_IDS, HEAD_DIM, HEADS, HIDDEN, LAYERS, VOCAB, inputs
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertLMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    T5Config,
    T5Model,
)

from hf_merged_attn import MergedAttention, patch_model, unpatch_model

# fp32: the patched model sums the same products in another order (S_h = Wq_h Wk_hᵀ is formed in float64 and
# rounded once; scores are d-long instead of hd-long dot products), which moves outputs by ~1e-7 here. 1e-4 is
# the bound the project promises; anything structural (a dropped bias, a wrong scaling, a wrong head split or a
# lost ALiBi) moves them by > 1e-2 on these models (see test_a_wrong_seed_is_caught).
FP32_TOL = 1e-4
# Same weights and float ops after a save/load round trip: equal to the last bit in practice; 1e-6 only allows a
# different BLAS blocking choice in another process.
RELOAD_TOL = 1e-6
EXACT = [("covariance", None), ("lowrank", HEAD_DIM), ("latent", HIDDEN)]
EXACT_IDS = ["covariance", "lowrank_r=hd", "latent_r=d"]
APPROX = [("lowrank", 3), ("latent", 8)]  # below the exact rank: approximate, but every guarantee but exactness holds
APPROX_IDS = ["lowrank_r=3", "latent_r=8"]


def patched(family, mode, rank, impl="eager", **kwargs):
    """(stock, patched copy) of a fresh tiny model of `family`."""
    stock = family.make(impl)
    return stock, patch_model(copy.deepcopy(stock), mode, rank=rank, **kwargs)


def diff_on_real_tokens(a, b, mask):
    """Max |a - b| over positions whose token is real (padding rows see only padding: compared nowhere)."""
    return (a - b).abs()[mask.bool()].max().item()


def implementations(family):
    return ["eager", "sdpa"] if family.sdpa else ["eager"]


CASES = [(f, impl) for f in FAMILIES for impl in implementations(f)]


@pytest.mark.parametrize("family,impl", CASES, ids=[f"{f.model_type}-{i}" for f, i in CASES])
@pytest.mark.parametrize("mode,rank", EXACT, ids=EXACT_IDS)
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_patch_is_exact(family, impl, mode, rank, padded):
    stock, model = patched(family, mode, rank, impl)
    ids, mask = inputs(family)
    if not padded:
        mask = torch.ones_like(mask)
    assert sum(isinstance(m, MergedAttention) for m in model.modules()) == LAYERS
    assert not family.spec.stock_attentions(model)  # every stock self-attention was swapped
    assert type(model).__name__ == f"Merged{family.model_class.__name__}"
    with torch.no_grad():
        expected, got = family.output(stock, ids, mask), family.output(model, ids, mask)
    assert diff_on_real_tokens(got, expected, mask) < FP32_TOL


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_a_wrong_seed_is_caught(family):
    """The exactness tests can fail: a seed that drops the query bias term u_h moves the outputs far beyond 1e-4."""
    stock, model = patched(family, "covariance", None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MergedAttention):
                module.q_proj.bias.zero_()
        ids, mask = inputs(family)
        assert diff_on_real_tokens(family.output(model, ids, mask), family.output(stock, ids, mask), mask) > 1e-2


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_read_and_write_weights_are_inverse(family):
    stock = family.make()
    spec = family.spec
    _, _, attn = spec.stock_attentions(stock)[1]
    parts = spec.read_weights(attn)
    assert {k: tuple(v.shape) for k, v in parts.items()} == {
        **{f"w{n}": (HEADS, HIDDEN, HEAD_DIM) for n in "qkv"}, **{f"b{n}": (HEADS, HEAD_DIM) for n in "qkv"}
    }
    fresh = spec.new_stock_attention(stock.config, 1)
    spec.write_weights(fresh, parts)
    original = dict(attn.named_parameters())
    for name, param in fresh.named_parameters():
        if name.split(".")[0] not in ("c_proj", "out_proj", "dense"):  # the output projection is not q/k/v
            assert torch.equal(param, original[name]), name


@pytest.mark.parametrize("family", DECODERS, ids=[f.model_type for f in DECODERS])
@pytest.mark.parametrize("mode,rank", [*EXACT, *APPROX], ids=[*EXACT_IDS, *APPROX_IDS])
def test_cache_layout_and_cache_equals_no_cache(family, mode, rank, monkeypatch):
    _, model = patched(family, mode, rank)
    ids, mask = inputs(family, length=10)
    # latent: the cached latent must never be re-expanded per head while decoding. Counted by nn.Linear's own forward:
    # a hook on k_up would itself make the decode call k_up on the cache (hooks act in decode steps too, #27)
    expansions, linear = [], torch.nn.Linear.forward
    ups = {m.k_up for m in model.modules() if isinstance(m, MergedAttention) and m.mode == "latent"}
    monkeypatch.setattr(torch.nn.Linear, "forward",
                        lambda mod, x: (expansions.append(x.shape[1]) if mod in ups else None) or linear(mod, x))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits  # (B, 10, V)
        prefix = model(input_ids=ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        layer = prefix.past_key_values.layers[0]
        keys, values = {  # what one layer caches: (B, heads, T, size) of keys and of values
            # covariance: the per-head values packed as one head of H·hd beside the shared key (one head count, as
            # transformers' static cache needs; CacheLayout)
            "covariance": ((3, 1, 7, HIDDEN), (3, 1, 7, HEADS * HEAD_DIM)),
            "lowrank": ((3, HEADS, 7, rank), (3, HEADS, 7, HEAD_DIM)),
            "latent": ((3, 1, 7, rank), (3, 1, 7, 0)),  # the latent only: the value slot is empty
        }[mode]
        assert (tuple(layer.keys.shape), tuple(layer.values.shape)) == (keys, values)
        cache, steps, expanded = prefix.past_key_values, [], list(expansions)
        for t in range(7, 10):  # one token at a time through the cache
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert diff_on_real_tokens(torch.cat(steps, dim=1), full[:, 7:], mask[:, 7:]) < FP32_TOL
    assert expansions == expanded  # decoding steps ran the absorbed order only (no k_up call on the cache)


@pytest.mark.parametrize("family", DECODERS, ids=[f.model_type for f in DECODERS])
@pytest.mark.parametrize("mode,rank", EXACT, ids=EXACT_IDS)
@pytest.mark.parametrize("beams", [1, 3], ids=["greedy", "beam_search"])
def test_generate_is_token_identical(family, mode, rank, beams):
    stock, model = patched(family, mode, rank)
    ids, mask = inputs(family, length=6)
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=beams,
                    pad_token_id=family.config.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **settings), stock.generate(ids, **settings))


REMOTE_LOAD = BLOCK_PACKAGE + textwrap.dedent(
    """
    import torch, transformers
    folder, auto, causal = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
    assert "hf_merged_attn" not in sys.modules
    ids = torch.tensor(json.loads(sys.argv[4]))
    with torch.no_grad():
        out = model(input_ids=ids)
    print(json.dumps({"type": type(model).__name__, "out": (out.logits if causal else out.last_hidden_state).tolist()}))
    """
)


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize("mode,rank", APPROX, ids=APPROX_IDS)
def test_save_and_load_with_and_without_the_package(family, mode, rank, tmp_path):
    _, model = patched(family, mode, rank)
    with torch.no_grad():  # move every attention weight away from its seed: a loader that re-seeds must fail
        for module in model.modules():
            if isinstance(module, MergedAttention):
                for param in module.parameters():
                    param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    module_file = f"modeling_merged_{family.spec.merged_attention_class.__module__.rsplit('_', 1)[-1]}.py"
    assert {"model.safetensors", "config.json", "README.md", module_file, "merged_attention.py", "merged_models.py"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == f"merged_{family.model_type}" and config["merged_attn"]["rank"] == rank
    assert config["merged_attn"]["mode"] == mode
    assert config["auto_map"][family.auto] == f"{module_file[:-3]}.{type(model).__name__}"

    ids = torch.randint(2, VOCAB, (2, 9))
    loaded = getattr(__import__("transformers"), family.auto).from_pretrained(tmp_path, attn_implementation="eager")
    assert type(loaded) is type(model)
    state = model.state_dict()
    assert all(torch.equal(t, state[n]) for n, t in loaded.state_dict().items())
    with torch.no_grad():
        expected = family.output(model, ids)
        assert (family.output(loaded, ids) - expected).abs().max() < RELOAD_TOL

    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    script = [sys.executable, "-c", REMOTE_LOAD, str(tmp_path), family.auto, "1" if family.causal else "0", json.dumps(ids.tolist())]
    result = subprocess.run(script, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=HANG_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["type"] == type(model).__name__
    assert (torch.tensor(out["out"]) - expected).abs().max() < RELOAD_TOL


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_model_card_names_the_family(family):
    _, model = patched(family, "lowrank", 3)
    card = model.create_model_card(repo_id="someone/tiny")
    assert f"{family.spec.family} whose query–key product is held factored at rank 3" in card
    assert ("KV cache per token over the 2 patched layers" if family.causal else "No KV cache (an encoder)") in card
    assert f'{family.auto}.from_pretrained("someone/tiny", trust_remote_code=True)' in card
    assert f"tags: [hf_merged_attn, {family.model_type}, merged-attention]" in card


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize("mode,rank", [*EXACT, *APPROX], ids=[*EXACT_IDS, *APPROX_IDS])
def test_export_back_to_stock_is_exact(family, mode, rank):
    stock, model = patched(family, mode, rank)
    ids, mask = inputs(family)
    with torch.no_grad():
        expected = family.output(model, ids, mask)  # = stock's for exact modes; the approximate model's otherwise
    exported, errors = unpatch_model(model, strict=True, return_errors=True)
    assert type(exported) is family.model_class and type(exported.config) is type(stock.config)
    assert not hasattr(exported.config, "merged_attn") and exported.config.model_type == family.model_type
    assert not any(isinstance(m, MergedAttention) for m in exported.modules())
    assert max(max(sides.values()) for sides in errors.values()) < 1e-5  # rank(S̃_h) <= hd: the SVD export loses only round-off
    with torch.no_grad():
        assert diff_on_real_tokens(family.output(exported, ids, mask), expected, mask) < FP32_TOL


def _tiny(config_class, **sizes):
    return config_class(vocab_size=VOCAB, **sizes)


@pytest.mark.parametrize(
    "model,match",
    [
        (lambda: LlamaForCausalLM(_tiny(LlamaConfig, hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=1,
                                        intermediate_size=64)),
         r"mode='covariance' on Llama \(LlamaForCausalLM\): its positions are rotary.*between Wq and Wk.*no single "
         r"S_h.*Use mode='latent', rank=r_c, rope_pairs=r"),
        (lambda: GPTNeoXForCausalLM(_tiny(GPTNeoXConfig, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                          num_hidden_layers=1, intermediate_size=64)),
         r"model_type 'gpt_neox'\) uses rotary position embeddings \(RoPE\) and has no adapter here.*Llama \(llama\)"),
        (lambda: GPTJForCausalLM(_tiny(GPTJConfig, n_embd=HIDDEN, n_head=HEADS, n_layer=1, rotary_dim=4)),
         r"model_type 'gptj'\) uses rotary position embeddings"),
        (lambda: T5Model(_tiny(T5Config, d_model=HIDDEN, num_heads=HEADS, num_layers=1, d_kv=HEAD_DIM, d_ff=64)),
         r"T5Model \(model_type 't5'\) is not a supported family; supported: GPT-2 \(gpt2\), .*one adapter file"),
        (lambda: OPTForCausalLM(_tiny(OPTConfig, hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=1,
                                      ffn_dim=64, word_embed_proj_dim=HIDDEN, enable_bias=False)),
         r"OPT with enable_bias=False is not supported"),
        (lambda: BertLMHeadModel(_tiny(BertConfig, hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=1,
                                       intermediate_size=64, is_decoder=True)),
         r"BertConfig with is_decoder=True .* is not supported: only bidirectional encoder self-attention"),
    ],
    ids=["llama", "gpt_neox", "gptj", "t5", "opt_without_bias", "bert_decoder"],
)
def test_unsupported_models_are_refused_untouched(model, match):
    model = model()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match=match):
        patch_model(model, "covariance")
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert not hasattr(model.config, "merged_attn")


def test_patching_a_loaded_merged_checkpoint_again_is_refused(tmp_path):
    family = FAMILIES[2]  # BLOOM
    patched(family, "covariance", None)[1].save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"MergedBloomForCausalLM is already patched"):
        patch_model(loaded, "lowrank", rank=2)
    assert AutoModel.from_pretrained(tmp_path).config.merged_attn["mode"] == "covariance"


# The value side (decoders: the output projection is inside their attention module). (mode, rank, patch kwargs,
# what one layer caches: keys and values as (heads, size)); exact unless the ranks are below the head size.
VALUE_CASES = [
    ("covariance", None, {"values": "merged"}, ((1, HIDDEN), (1, 0)), True),  # x cached ONCE: half of stock
    ("lowrank", HEAD_DIM, {"values": "merged"}, ((1, HEADS * HEAD_DIM), (1, HIDDEN)), True),  # per-head keys packed
    ("lowrank", HEAD_DIM, {"value_rank": HEAD_DIM}, ((HEADS, HEAD_DIM), (HEADS, HEAD_DIM)), True),
    ("lowrank", 3, {"value_rank": 2}, ((HEADS, 3), (HEADS, 2)), False),
]
VALUE_IDS = ["covariance+merged_values", "lowrank_r=hd+merged_values", "lowrank_r=hd+value_rank=hd", "lowrank_r=3+value_rank=2"]


@pytest.mark.parametrize("family", DECODERS, ids=[f.model_type for f in DECODERS])
@pytest.mark.parametrize("mode,rank,kwargs,cached,exact", VALUE_CASES, ids=VALUE_IDS)
def test_value_modes(family, mode, rank, kwargs, cached, exact, tmp_path):
    """Exact at patch (eager and sdpa, padded), the cache layout, cache == no cache, generate, save/load, export."""
    ids, mask = inputs(family, length=10)
    for impl in implementations(family):
        stock, model = patched(family, mode, rank, impl, **kwargs)
        with torch.no_grad():
            full, expected = family.output(model, ids, mask), family.output(stock, ids, mask)
        if exact:
            assert diff_on_real_tokens(full, expected, mask) < FP32_TOL, impl
    with torch.no_grad():
        prefix = model(input_ids=ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        layer = prefix.past_key_values.layers[0]
        assert (tuple(layer.keys.shape), tuple(layer.values.shape)) == ((3, *cached[0][:1], 7, cached[0][1]),
                                                                         (3, *cached[1][:1], 7, cached[1][1]))
        step = model(input_ids=ids[:, 7:8], attention_mask=mask[:, :8], past_key_values=prefix.past_key_values, use_cache=True)
    assert diff_on_real_tokens(step.logits, full[:, 7:8], mask[:, 7:8]) < FP32_TOL
    if exact:
        settings = dict(attention_mask=mask[:, :6], max_new_tokens=6, do_sample=False, pad_token_id=family.config.pad_token_id)
        with torch.no_grad():
            assert torch.equal(model.generate(ids[:, :6], **settings), stock.generate(ids[:, :6], **settings))
    numbers = sum(heads * size for heads, size in cached)  # what one layer caches per token, as the card must say
    assert f"over the {LAYERS} patched layers: {LAYERS * numbers:,} numbers" in model.create_model_card()
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["merged_attn"]
    assert {k: record[k] for k in kwargs} == kwargs
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert (family.output(loaded, ids, mask) - full).abs().max() < RELOAD_TOL
    exported, errors = unpatch_model(loaded, strict=True, return_errors=True)
    assert type(exported) is family.model_class and max(max(sides.values()) for sides in errors.values()) < 1e-5
    with torch.no_grad():
        assert diff_on_real_tokens(family.output(exported, ids, mask), full, mask) < FP32_TOL


def test_trained_merged_values_export_truncates_and_reports():
    family = DECODERS[0]
    _, model = patched(family, "covariance", None, values="merged")
    with torch.no_grad():  # give every M_h full rank, as training would
        for module in model.modules():
            if isinstance(module, MergedAttention):
                module.c_proj.weight.add_(torch.randn_like(module.c_proj.weight) * 0.5)
    with pytest.raises(ValueError, match=r"strict=True"):
        unpatch_model(model, strict=True)
    _, errors = unpatch_model(model, return_errors=True)
    # the lost part of each M_h beyond rank hd, reported on its own side (S_h is exact)
    assert min(sides["value_output"] for sides in errors.values()) > 1e-2


@pytest.mark.parametrize("kwargs", [{"values": "merged"}, {"value_rank": 4}])
def test_value_modes_are_refused_for_encoders(kwargs):
    model = FAMILIES[3].make()  # BERT: its output projection lives in BertSelfOutput
    with pytest.raises(NotImplementedError, match=r"need the output projection inside the attention module"):
        patch_model(model, "covariance", **kwargs)
    assert not hasattr(model.config, "merged_attn")


@pytest.mark.parametrize("mode,rank,kwargs", [("latent", 8, {}), ("covariance", None, {"values": "merged"}),
                                              ("lowrank", 3, {"value_rank": 2})], ids=["latent", "merged_values", "value_rank"])
def test_new_modes_train_with_gradient_checkpointing_and_half_precision(mode, rank, kwargs):
    family = DECODERS[0]
    _, model = patched(family, mode, rank, "sdpa", **kwargs)
    ids, mask = inputs(family)
    model.train()
    model.gradient_checkpointing_enable()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".attn." in n}
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    for dtype in (torch.bfloat16, torch.float16):
        half = copy.deepcopy(model).eval().to(dtype)
        with torch.no_grad():
            logits = half(input_ids=ids, attention_mask=mask).logits.float()
            reference = model.eval()(input_ids=ids, attention_mask=mask).logits
        # half precision keeps 8 (bf16) / 11 (fp16) bits: logits of order 1-10 move by a few 1e-2, a wrong cast by far more
        assert torch.isfinite(logits).all() and diff_on_real_tokens(logits, reference, mask) < 0.5, dtype


def test_latent_rank_per_block_from_an_energy_target(tmp_path):
    family = DECODERS[0]
    _, model = patched(family, "latent", 0.9)
    ranks = model.config.merged_attn["rank"]
    assert set(ranks) == {"0", "1"} and all(1 <= r < HIDDEN for r in ranks.values())
    assert model.config.merged_attn["energy"] == 0.9
    assert [m.rank for m in model.modules() if isinstance(m, MergedAttention)] == [ranks["0"], ranks["1"]]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert [m.rank for m in loaded.modules() if isinstance(m, MergedAttention)] == [ranks["0"], ranks["1"]]


@pytest.mark.parametrize("family", DECODERS, ids=[f.model_type for f in DECODERS])
def test_cache_bytes_per_token_measured_after_generate(family):
    """Covariance + merged values and latent r_c = d cache exactly half of stock's K + V; the latent r_c numbers."""
    from hf_merged_attn.evaluation import kv_cache_bytes_per_token

    stock = family.make()
    measured = {
        name: kv_cache_bytes_per_token(patch_model(copy.deepcopy(stock), mode, **kwargs))
        for name, mode, kwargs in [
            ("merged_values", "covariance", {"values": "merged"}), ("latent_d", "latent", {"rank": HIDDEN}),
            ("latent_8", "latent", {"rank": 8}), ("covariance", "covariance", {}),
        ]
    }
    full = kv_cache_bytes_per_token(stock)
    assert full == LAYERS * 2 * HIDDEN * 4  # K + V, fp32
    assert measured == {"merged_values": full / 2, "latent_d": full / 2, "latent_8": LAYERS * 8 * 4, "covariance": full}


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_outputs_are_still_recorded_after_patch_and_unpatch(family):
    """transformers records attentions / hidden states by the model's class name: the swapped class must be known."""
    model = patch_model(family.make(), "covariance")
    ids = torch.randint(2, VOCAB, (1, 6))
    for stage in ("patched", "unpatched"):
        out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
        assert len(out.attentions) == LAYERS and len(out.hidden_states) == LAYERS + 1, stage
        model = unpatch_model(model) if stage == "patched" else model


def test_a_loaded_checkpoint_unpatches_to_a_clean_stock_config_and_patches_again(tmp_path):
    family = DECODERS[0]
    patched(family, "covariance", None)[1].save_pretrained(tmp_path)
    stock = unpatch_model(AutoModelForCausalLM.from_pretrained(tmp_path))
    assert stock.config.model_type == "gpt2" and getattr(stock.config, "auto_map", None) is None  # no remote code left
    patch_model(stock, "lowrank", rank=4)
    assert stock.config.model_type == "merged_gpt2"


@pytest.mark.parametrize("kwargs", [{"values": "merged"}, {"value_rank": 2},
                                    {"value_rank": 2, "init": "whitened", "calibration": torch.randint(2, VOCAB, (2, 16))}],
                         ids=["merged", "value_rank", "value_rank_whitened"])
def test_covariance_value_modes_count_stock_parameters_right(kwargs):
    from hf_merged_attn.merged_models import parameter_counts

    stock = DECODERS[0].make()
    model = patch_model(copy.deepcopy(stock), "covariance", **kwargs)
    assert parameter_counts(model)["stock"] == sum(p.numel() for p in stock.parameters())


def test_roberta_calibration_length_counts_its_position_offset():
    """RoBERTa numbers positions from padding_idx + 1: 66 position embeddings (pad 1) hold 64 tokens. A longer
    calibration batch is refused by name before any forward pass (not an IndexError from the embedding)."""
    family = next(f for f in FAMILIES if f.model_type == "roberta")
    model = family.make()
    ids = torch.randint(2, VOCAB, (1, 64))
    patch_model(copy.deepcopy(model), "lowrank", rank=4, init="whitened", calibration=[ids])  # the longest it takes
    with pytest.raises(ValueError, match="sequences of 65 tokens, more than the model's position limit of 64"):
        patch_model(model, "lowrank", rank=4, init="whitened", calibration=[torch.randint(2, VOCAB, (1, 65))])
