"""Nothing silent in round four (#36): what a hostile probe found in the rotary latent, the recovery and the CLI, each
with the behaviour a user should see. Tiny random Llama / Qwen2 / Mistral configs (test_rotary's sizes)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import max_diff
from test_convert import FAST, text_files, tiny_model
from test_rotary import FAMILIES, SIZES
from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from hf_merged_attn import LatentQuantizedCache, patch_model, recover_layerwise
from hf_merged_attn.calibration import mixed_blocks
from hf_merged_attn.cli import decode_ms_per_step, main
from hf_merged_attn.evaluation import evaluate_perplexity


def _strong(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(p in name for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
                param.normal_(0.0, 0.3 if name.endswith("weight") else 0.5)
    return model.eval()


# 1 -----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["dynamic", "static", "quantized"])
def test_rope_pairs_zero_decodes_from_the_latent_alone(cache):
    """rope_pairs=0 (no rotary key at all) generates with every cache, and cached == uncached tokens."""
    model = patch_model(FAMILIES[0].make(), "latent", rank=8, rope_pairs=0, rope_selection="high")
    ids = torch.randint(2, 101, (2, 6))
    settings = {"dynamic": {}, "static": {"cache_implementation": "static"},
                "quantized": {"past_key_values": LatentQuantizedCache(model.config, nbits=8, residual_length=64)}}
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                pad_token_id=0, **settings[cache])
        uncached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                  pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


# 2 -----------------------------------------------------------------------------------------------------------------
def _mixed_window_qwen2():
    config = Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                         layer_types=["full_attention", "sliding_attention"], **SIZES)
    torch.manual_seed(0)
    return _strong(Qwen2ForCausalLM(config))


def test_layerwise_targets_are_each_layers_real_stock_output_on_a_mixed_window_model():
    """Layer 1 has a window of 4, layer 0 full attention: the stock outputs recovery fits each layer to are the stock
    model's own per-layer attention outputs (before the fix, layer 1 got layer 0's mask: |d| ~ 1e-2)."""
    stock = _mixed_window_qwen2()
    assert stock.model.layers[1].self_attn.sliding_window == 4
    ids = torch.randint(2, 101, (2, 12))
    real, seen = {}, {}

    def record(store, index):
        return lambda module, args, output: store.setdefault(index, []).append(output[0].detach().clone())

    handles = [layer.self_attn.register_forward_hook(record(real, i)) for i, layer in enumerate(stock.model.layers)]
    with torch.no_grad():
        stock(ids)
    for handle in handles:
        handle.remove()
    model = patch_model(copy.deepcopy(stock), "latent", rank=6, rope="exact")
    handles = [layer.self_attn.register_forward_hook(record(seen, i)) for i, layer in enumerate(stock.model.layers)]
    recover_layerwise(model, stock, [ids], steps=1, show_progress=False)
    for handle in handles:
        handle.remove()
    for index in (0, 1):
        assert max_diff(seen[index][-1], real[index][0]) < 1e-6, index  # the same computation, the same order


# 3 -----------------------------------------------------------------------------------------------------------------
def test_layerwise_recovery_of_a_partial_patch_fits_exactly_the_patched_layers():
    stock = FAMILIES[0].make()
    model = patch_model(copy.deepcopy(stock), "latent", rank=4, rope="exact", layers=[1])
    untouched = copy.deepcopy(model.model.layers[0].state_dict())
    records = recover_layerwise(model, stock, [torch.randint(2, 101, (4, 12))], steps=10, learning_rate=1e-2,
                                show_progress=False)
    assert [r["layer"] for r in records] == [1] and records[0]["error_after"] < records[0]["error_before"]
    assert all(torch.equal(v, model.model.layers[0].state_dict()[k]) for k, v in untouched.items())


# 4 -----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope", ["exact", "partial"])
def test_the_quantized_cache_keeps_only_a_sliding_window(rope):
    """Mistral with a window of 32: the int8 LatentQuantizedCache holds the same bytes after 256 and 512 tokens (the
    window), and decode steps past the window match the uncached forward up to int8 error."""
    config = MistralConfig(num_key_value_heads=2, sliding_window=32, **{**SIZES, "max_position_embeddings": 1024})
    torch.manual_seed(0)
    extra = {"rope": "exact"} if rope == "exact" else {"rope_pairs": 1, "rope_selection": "high"}
    model = patch_model(_strong(MistralForCausalLM(config)), "latent", rank=8, **extra)
    ids = torch.randint(2, 101, (1, 512))

    def held_bytes(length: int) -> int:
        cache = LatentQuantizedCache(model.config, nbits=8, residual_length=4)
        with torch.no_grad():
            model(ids[:, :length], past_key_values=cache, use_cache=True)
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.stored_tensors())

    assert held_bytes(512) == held_bytes(256) < held_bytes(24) * 2  # bounded by the window, not the context
    cache = LatentQuantizedCache(model.config, nbits=8, residual_length=4)
    with torch.no_grad():
        full = model(ids[:, :300]).logits
        model(ids[:, :290], past_key_values=cache, use_cache=True)
        steps = torch.cat([model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                           for t in range(290, 300)], dim=1)
    assert all(layer.held() == 31 for layer in cache.layers)  # the window - 1, as DynamicSlidingWindowLayer holds
    assert max_diff(steps, full[:, 290:]) < 0.02 * full.abs().max().item()  # int8 codes of c only


# 5, 9 --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert5")
    calibration, held_out = text_files(root / "text")
    source = tiny_model(FAMILIES[0], root / "llama")
    out = root / "converted"
    code = main(["convert", "--model_name_or_path", str(source), "--output_dir", str(out), "--calibration_file",
                 str(calibration), "--eval_file", str(held_out), *FAST, "--kv_budget", "0.5", "--recover", "none"])
    assert code == 0
    return source, out, calibration, held_out


def test_inspect_reports_bad_paths_and_broken_folders_in_one_line(converted_llama, tmp_path, capsys):
    _, out, *_ = converted_llama
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "README.md", "tokenizer.json", "tokenizer_config.json"):
        (no_weights / name).write_bytes((out / name).read_bytes())
    for path, message in ((tmp_path / "missing", "neither a folder nor a Hub id"),
                          (broken, "cannot be read"), (no_weights, "lacks model.safetensors")):
        code = main(["inspect", str(path)])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("hf-merged-attn inspect: ") and message in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["inspect", str(out)]) == 0
    assert "exact-RoPE" in capsys.readouterr().out


def test_an_interrupted_convert_leaves_no_folder_that_looks_finished(converted_llama, tmp_path, capsys, monkeypatch):
    """Interrupted while saving the tokenizer: the target does not exist and no half-written folder remains beside it;
    a folder that lacks its tokenizer is named as incomplete by inspect."""
    source, out, calibration, held_out = converted_llama
    target = tmp_path / "target"

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(AutoTokenizer.from_pretrained(str(source))), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["convert", "--model_name_or_path", str(source), "--output_dir", str(target), "--calibration_file",
              str(calibration), "--eval_file", str(held_out), *FAST, "--kv_budget", "0.5", "--recover", "none"])
    assert not target.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    partial = tmp_path / "partial"
    partial.mkdir()
    for file in out.iterdir():
        if not file.name.startswith("tokenizer"):
            (partial / file.name).write_bytes(file.read_bytes())
    assert main(["inspect", str(partial)]) == 0  # loadable: inspected, with what convert would have written named
    assert "lacks a tokenizer" in capsys.readouterr().out


# 6 -----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, message", [
    ({"kv_budget": "a lot"}, "kv_budget = 'a lot' (str) must be float or null"),
    ({"kv_buget": 0.5}, "unknown key(s) ['kv_buget']"),
    ({"mode": "sparse"}, "mode = 'sparse' is not one of ['covariance', 'lowrank', 'latent']"),
    ({"recover_steps": 2.5}, "recover_steps = 2.5 (float) must be int"),
    ({"push_to_hub": "yes"}, "push_to_hub = 'yes' (str) must be bool"),
], ids=["type", "misspelt", "choice", "int", "bool"])
def test_config_file_mistakes_are_one_line_naming_the_key(converted_llama, tmp_path, settings, message, capsys):
    source, *_ = converted_llama
    config = tmp_path / "convert.json"
    config.write_text(json.dumps({"model_name_or_path": str(source), "output_dir": str(tmp_path / "out"),
                                  **settings}))
    code = main(["convert", str(config)])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err, err
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    assert main(["convert", str(bad_json)]) == 1 and "cannot be read" in capsys.readouterr().err


# 8 -----------------------------------------------------------------------------------------------------------------
def test_a_kl_reference_with_another_vocabulary_is_refused_before_any_forward():
    model = FAMILIES[0].make()
    other_config = copy.deepcopy(FAMILIES[0].config)
    other_config.vocab_size = 130
    other = type(model)(other_config).eval()
    other.forward = lambda *a, **k: pytest.fail("a forward pass ran")
    with pytest.raises(ValueError, match="vocabulary of 130 tokens and model of 101"):
        evaluate_perplexity(model, torch.randint(2, 101, (40,)), max_length=16, reference=other)


# the card's decode figure ------------------------------------------------------------------------------------------
def test_an_unmeasurable_decode_time_is_not_reported_as_a_figure(converted_llama, monkeypatch):
    """A run of prefill + 3 steps that times SHORTER than prefill + 1 step (timer noise at 2 steps) gives no figure,
    and the card then says it was not measured instead of showing 0.00."""
    from types import SimpleNamespace

    from hf_merged_attn import evaluation

    ticks = iter([0.0, 0.1, 1.0, 1.2, 2.0, 2.5])  # warm-up; prefill + 3 steps: 0.2 s; prefill + 1 step: 0.5 s
    monkeypatch.setattr(evaluation, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert decode_ms_per_step(FAMILIES[0].make(), 2) is None
    _, out, *_ = converted_llama
    card = (out / "README.md").read_text()
    assert "| decode ms per step, stock | 0.00 |" not in card and "| decode ms per step, converted | 0.00 |" not in card


# the mixed calibration loader (#37) --------------------------------------------------------------------------------
def test_mixed_blocks_take_equal_shares_and_refuse_bad_sources_up_front():
    streams = {"a": torch.arange(0, 100), "b": torch.arange(1000, 1100), "c": torch.arange(5000, 5064)}
    blocks = mixed_blocks(streams, 7, 16)  # shares 3, 2, 2
    assert blocks.shape == (7, 16)
    assert [int((blocks // 1000 == k).all(-1).sum()) for k in (0, 1, 5)] == [3, 2, 2]
    with pytest.raises(ValueError, match="'c' has 0 tokens"):
        mixed_blocks({**streams, "c": torch.tensor([], dtype=torch.long)}, 6, 16)
    with pytest.raises(ValueError, match="'b' has 100 tokens.*needs 3 blocks of 64"):
        mixed_blocks(streams, 9, 64)
    with pytest.raises(ValueError, match="at least one source"):
        mixed_blocks({}, 4, 16)
    with pytest.raises(ValueError, match="at least the number of sources"):
        mixed_blocks(streams, 2, 16)


def test_seeding_options_are_checked():
    model = FAMILIES[0].make()
    with pytest.raises(ValueError, match="unknown: \\['dampening'\\]"):
        patch_model(copy.deepcopy(model), "latent", rank=6, seeding={"dampening": 0.1})
    with pytest.raises(ValueError, match="rope='partial'"):
        patch_model(copy.deepcopy(model), "latent", rank=6, rope_pairs=2, rope_selection="high",
                    seeding={"damping": 0.1})
    from families import FAMILIES as ABSOLUTE

    with pytest.raises(ValueError, match="this model is not rotary"):  # never silently ignored
        patch_model(ABSOLUTE[0].make(), "latent", rank=8, seeding={"damping": 0.1})
    aware = patch_model(copy.deepcopy(model), "latent", rank=6, seeding={"query_aware_keys": True})
    plain = patch_model(copy.deepcopy(model), "latent", rank=6)
    assert not torch.equal(aware.model.layers[0].self_attn.latent_proj.weight,
                           plain.model.layers[0].self_attn.latent_proj.weight)


def test_convert_calibrates_on_the_mixed_default_when_no_text_is_given(converted_llama, tmp_path, capsys):
    """#37: without --calibration_file the calibration is equal blocks of the three shipped kinds of text (Shakespeare,
    CPython's Python reference, SmolLM2's own answers); --calibration_file still overrides it."""
    source, _, calibration, held_out = converted_llama
    code = main(["convert", "--model_name_or_path", str(source), "--output_dir", str(tmp_path / "mixed"),
                 "--eval_file", str(held_out), *FAST, "--calibration_blocks", "6", "--kv_budget", "0.5",
                 "--recover", "none"])
    out = capsys.readouterr().out
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("[2/6]"))
    assert "6 blocks" in line and "a mix of Shakespeare, Python reference, SmolLM2 generations (the default)" in line
    assert main(["convert", "--model_name_or_path", str(source), "--output_dir", str(tmp_path / "own"),
                 "--calibration_file", str(calibration), "--eval_file", str(held_out), *FAST, "--kv_budget", "0.5",
                 "--recover", "none"]) == 0
    assert f"from {calibration} / {held_out}" in capsys.readouterr().out


def test_a_sliding_quantized_layer_refuses_a_crop_it_cannot_undo():
    """Without past recording the layer has already dropped what left its window: a crop would silently leave fewer
    tokens than the window, so it is refused (as transformers' sliding layers refuse it); with recording it works."""
    config = MistralConfig(num_key_value_heads=2, sliding_window=8, **SIZES)
    torch.manual_seed(0)
    model = patch_model(_strong(MistralForCausalLM(config)), "latent", rank=8, rope="exact")
    ids = torch.randint(2, 101, (1, 20))
    cache = LatentQuantizedCache(model.config, nbits=8, residual_length=4)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="already dropped 13 tokens"):
        cache.crop(-2)
    recorded = LatentQuantizedCache(model.config, nbits=8, residual_length=4)
    recorded.activate_past_recording()
    with torch.no_grad():
        model(ids[:, :16], past_key_values=recorded, use_cache=True)
        model(ids[:, 16:], past_key_values=recorded, use_cache=True)
    recorded.crop(-2)
    assert all(layer.held() == 7 and layer.get_seq_length() == 18 for layer in recorded.layers)
