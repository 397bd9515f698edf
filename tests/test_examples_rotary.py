"""examples/finetune.py, study.py and cache_sweep.py on a rotary (Llama) folder (#28 item 5), end to end at tiny budgets.

The folder: a tiny random Llama (d = 32, 4 query heads of 8, 2 KV heads, 2 layers; strong q/k/v weights so the
attention is peaked and approximations show) saved with the shipped stand-in's tokenizer; data: the first lines of the
shipped Shakespeare splits. Stock caches 2 layers x 2·G·hd = 32 numbers x 4 bytes = 256 bytes per token; the rotary
latent 2 x (r_c + G·2r) x 4.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import cache_sweep  # noqa: E402
import finetune  # noqa: E402
import recover  # noqa: E402
import study  # noqa: E402

SHIPPED_DATA = ROOT / "examples" / "data" / "shakespeare"
STOCK_BYTES = 2 * 2 * 2 * 8 * 4  # layers x (K + V) x G x hd x fp32


def latent_bytes(r_c: int, pairs: int) -> int:
    return 2 * (r_c + 2 * 2 * pairs) * 4  # layers x (latent + G rotary keys of 2r) x fp32


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """{"model": a tiny Llama folder with the stand-in's tokenizer, "data": train / validation / test .txt}."""
    root = tmp_path_factory.mktemp("rotary_examples")
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "examples" / "shakespeare-gpt2")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_attention_heads=4, head_dim=8, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=48, vocab_size=len(tokenizer), max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=True))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(p in name for p in ("q_proj", "k_proj", "v_proj")):
                param.normal_(0.0, 0.3)
    model.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    data = root / "data"
    data.mkdir()
    for split, lines in (("train", 800), ("validation", 300), ("test", 300)):  # ~6,400 / 2,500 / 2,500 tokens
        text = (SHIPPED_DATA / f"{split}.txt").read_text(encoding="utf-8").splitlines()[:lines]
        (data / f"{split}.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    return {"model": root / "llama", "data": data}


def finetune_args(assets, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(assets["model"]), "--train_file", str(assets["data"] / "train.txt"),
        "--validation_file", str(assets["data"] / "validation.txt"), "--block_size", "64",
        "--per_device_train_batch_size", "4", "--max_train_steps", "3", "--num_warmup_steps", "1", "--eval_steps", "2",
        "--eval_max_tokens", "512", "--curve_eval_tokens", "128", "--calibration_samples", "4", "--output_dir", str(out),
        *extra,
    ]


# ---------------------------------------------------------------- finetune.py


def test_finetune_runs_stock_and_the_rotary_latent(assets, tmp_path):
    """--rope_pairs 2 (rule: 2norm, the default, calibrated on train blocks although --init is svd)."""
    out = tmp_path / "run"
    results = finetune.main(finetune_args(assets, out, "--modes", "stock,latent:16", "--rope_pairs", "2"))
    summary, before = results["summary"], results["perplexity_before"]
    assert list(summary) == ["stock", "latent-r16"]
    assert summary["stock"]["perplexity_at_patch"] == pytest.approx(before, rel=1e-6)
    assert summary["stock"]["kv_cache_bytes_per_token"] == STOCK_BYTES
    latent = summary["latent-r16"]
    assert latent["kv_cache_bytes_per_token"] == latent_bytes(16, 2)  # c and the kept rotary keys, measured
    assert (latent["rope_pairs"], latent["rope_selection"]) == (2, "2norm")  # as the patch resolved them
    assert (summary["stock"]["rope_pairs"], summary["stock"]["rope_selection"]) == (None, None)
    assert abs(latent["perplexity_at_patch"] / before - 1) > 1e-4  # rotation dropped from 2 of 4 pairs, r_c < 2·G·hd
    for entry in summary.values():
        assert entry["perplexity_after"] < entry["perplexity_at_patch"] and entry["train_tokens"] == 3 * 4 * 64
    assert results["args"]["rope_pairs"] == 2 and results["args"]["rope_selection"] is None
    run = next(r for r in results["runs"] if r["label"] == "latent-r16")
    assert run["reload_max_abs_diff"] < 1e-4  # the saved rotary latent reloads to the model in memory
    assert "| latent-r16 (rope_pairs 2, 2norm) |" in (out / "results.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"][1]["rope_pairs"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(out / "latent-r16-seed0" / "model")
    record = reloaded.config.merged_attn
    assert (record["mode"], record["rank"], record["rope_pairs"], record["rope_selection"]) == ("latent", 16, 2, "2norm")


def test_finetune_lora_on_a_rotary_latent_targets_k_rope(assets, tmp_path):
    """LoRA on every projection of the rotary latent, k_rope (the rotary keys) included; rorope with whitening."""
    out = tmp_path / "lora"
    results = finetune.main(finetune_args(assets, out, "--modes", "latent:8", "--rope_pairs", "1", "--rope_selection",
                                          "rorope", "--init", "whitened", "--lora", "--lora_r", "2",
                                          "--max_train_steps", "2"))
    entry = results["summary"]["latent-r8"]
    assert 0 < entry["trainable_params"] < 0.1 * entry["total_params"]
    assert (entry["rope_pairs"], entry["rope_selection"]) == (1, "rorope")
    assert entry["kv_cache_bytes_per_token"] == 2 * (8 + 2 * 2 * 1) * 4  # RoRoPE: one rotary key of G·r pairs
    adapter = json.loads((out / "latent-r8-seed0" / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "k_rope", "latent_proj", "k_up", "v_up"}


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--modes", "stock,covariance"], r"--modes entry 'covariance' cannot run on --model_name_or_path '.*llama', "
                                          r"a Llama model: its positions are rotary.*Use the latent: --modes stock,latent:R"),
        (["--modes", "stock,covariance+values"], r"--modes entry 'covariance\+values' cannot run on .*Use the latent"),
        (["--modes", "lowrank:4"], r"--modes entry 'lowrank' cannot run on .*Use the latent"),
        ([], r"--modes entry 'covariance' cannot run on"),  # the default modes are GPT-2's: name the latent instead
        (["--modes", "latent:0.5"], r"'latent-e0.5': a spectral-energy target is not available on rotary models yet"),
        (["--modes", "stock,latent", "--rope_pairs", "5"], r"--rope_pairs 5: a head of 8 has 4 frequency pairs"),
        (["--modes", "stock", "--rope_pairs", "2"], r"--rope_pairs 2: the rotary settings apply to latent modes"),
    ],
    ids=["covariance", "merged-values", "lowrank", "default-modes", "energy", "too-many-pairs", "no-latent"],
)
def test_finetune_refuses_what_a_rotary_model_cannot_take_before_any_work(assets, tmp_path, extra, match):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=match):
        finetune.main(finetune_args(assets, out, *extra))
    assert not out.exists()  # nothing started


def test_finetune_refuses_rope_settings_on_a_non_rotary_model(tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=r"--rope_selection high: --model_name_or_path '.*shakespeare-gpt2' is a GPT-2 "
                                         r"model, whose positions are not rotary"):
        finetune.main(["--rope_selection", "high", "--output_dir", str(out)])
    assert not out.exists()


def test_finetune_recovers_layer_wise_then_distills(assets, tmp_path):
    """--recover_steps: the layer-wise recovery runs after patching and is scored; --distill: KL to stock."""
    out = tmp_path / "recover"
    results = finetune.main(finetune_args(assets, out, "--modes", "stock,latent:8", "--rope_pairs", "1",
                                          "--recover_steps", "20", "--recover_samples", "8", "--recover_batch_size",
                                          "4", "--distill", "--learning_rate", "1e-3"))
    stock, latent = results["runs"]
    assert stock["perplexity_after_recovery"] is None and stock["kl_at_patch"] is None and not stock["distilled"]
    assert latent["distilled"] and len(latent["recover_layers"]) == 2 and latent["recover_time_s"] > 0
    assert all(r["error_after"] < r["error_before"] for r in latent["recover_layers"])
    # the recovery moves the model towards stock's next-token distributions, and distillation further
    assert latent["kl_after_recovery"] < latent["kl_at_patch"]
    assert latent["kl_after"] < latent["kl_after_recovery"]
    assert latent["reload_max_abs_diff"] < 1e-4  # the recovered, distilled model saves and reloads


def test_recover_quick_on_a_llama_folder(assets, tmp_path):
    out = tmp_path / "recover"
    command = ["--quick", "--model_name_or_path", str(assets["model"]), "--train_file", str(assets["data"] / "train.txt"),
               "--validation_file", str(assets["data"] / "validation.txt"), "--calibration_samples", "4",
               "--block_size", "64", "--budgets", "0.5", "--rope_pairs", "1", "--output_dir", str(out)]
    result = recover.main(command)
    # stock caches 2·G·hd = 32 numbers per token and layer; half of that is r_c = 16 − G·2r = 12 beside the rotary keys
    (row,) = result["summary"]
    assert row["rank"] == 12 and row["kv_cache_bytes_per_token"] == latent_bytes(12, 1) == STOCK_BYTES / 2
    assert result["stock"]["kv_cache_bytes_per_token"] == STOCK_BYTES
    assert [r["arm"] for r in result["runs"]] == list(recover.ARMS)
    e2e, both = result["runs"]
    assert e2e["perplexity_at_patch"] == pytest.approx(both["perplexity_at_patch"], rel=1e-6)  # the same patch
    assert e2e["perplexity_after_recovery"] is None and both["recover_time_s"] > 0
    for stage in ("at patch", "layer-wise", "end-to-end", "layer-wise + end-to-end"):
        assert row[stage]["perplexity"]["n"] == 1
    md = (out / "recovery_smollm2.md").read_text()
    assert "| −50.00% | 12 | 128 |" in md and (out / "recovery_smollm2.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "runs" / "save0.5-e2e-seed0").exists()  # models deleted, records kept
    again = recover.main(command)  # finished runs are reused
    assert again["runs"] == result["runs"]


def test_recover_refuses_a_budget_without_room_for_the_latent(assets, tmp_path):
    with pytest.raises(ValueError, match=r"a saving of 90.00% leaves no room for a latent beside 1 rotary pairs"):
        recover.main(["--model_name_or_path", str(assets["model"]), "--budgets", "0.9", "--rope_pairs", "1",
                      "--output_dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- study.py


def test_quick_study_on_a_llama_folder(assets, tmp_path):
    out = tmp_path / "study"
    result = study.main([
        "--quick", "--model_name_or_path", str(assets["model"]), "--train_file", str(assets["data"] / "train.txt"),
        "--validation_file", str(assets["data"] / "validation.txt"), "--test_file", str(assets["data"] / "test.txt"),
        "--modes", "stock,latent:d/2,lora:2", "--rope_pairs", "2", "--rope_selection", "high", "--extend_edges", "0",
        "--output_dir", str(out),
    ])
    rows = result["rows"]
    assert list(rows) == ["stock", "latent-r16", "lora-r2"]
    assert rows["stock"]["kv_cache_bytes_per_token"] == rows["lora-r2"]["kv_cache_bytes_per_token"] == STOCK_BYTES
    assert rows["latent-r16"]["kv_cache_bytes_per_token"] == latent_bytes(16, 2)
    assert (rows["latent-r16"]["rope_pairs"], rows["latent-r16"]["rope_selection"]) == (2, "high")
    assert "rope_pairs" not in rows["stock"] and rows["lora-r2"]["trainable_params"] < rows["lora-r2"]["total_params"]
    assert result["finetune_args"]["rope_pairs"] == 2 and result["counts"]["final"] >= 3 * 2
    assert "| latent-r16 (whitened; rope_pairs 2, high) |" in (out / "study.md").read_text()


@pytest.mark.parametrize(
    "extra,match",
    [
        ([], r"--modes entry 'covariance' cannot run on .*a Llama model.*Use the latent"),  # the study's default modes
        (["--modes", "stock,latent:d/2", "--quantized_cache_bits", "8"],
         r"--quantized_cache_bits '8': the quantized latent cache does not take rotary latent layers yet"),
    ],
    ids=["default-modes", "quantized-cache"],
)
def test_study_refuses_what_a_rotary_model_cannot_take_before_any_work(assets, tmp_path, extra, match):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=match):
        study.main(["--quick", "--model_name_or_path", str(assets["model"]), "--train_file",
                    str(assets["data"] / "train.txt"), "--validation_file", str(assets["data"] / "validation.txt"),
                    "--test_file", str(assets["data"] / "test.txt"), "--output_dir", str(out), *extra])
    assert not out.exists()


# ---------------------------------------------------------------- cache_sweep.py


@pytest.mark.parametrize(
    "rope,ranks,kept",
    [([], ["16", "8"], (4, None)),  # every pair kept: r_c = G·hd = 16 holds the values, so it is the stock model
     (["--rope_pairs", "1", "--rope_selection", "rorope"], ["8"], (1, "rorope"))],  # calibrated also for svd
    ids=["all-pairs", "rorope"],
)
def test_cache_sweep_on_a_llama_folder(assets, tmp_path, capsys, rope, ranks, kept):
    out = tmp_path / "sweep"
    result = cache_sweep.main(["--model_name_or_path", str(assets["model"]), "--data_dir", str(assets["data"]),
                               "--eval_tokens", "512", "--latent_ranks", *ranks, *rope, "--output_dir", str(out)])
    rows = result["rows"]
    assert [(r["mode"], r["init"]) for r in rows] == [("stock", None)] + [("latent", i) for _ in ranks
                                                                            for i in ("svd", "whitened")]
    stock = rows[0]
    assert stock["cache_bytes_per_token"] == STOCK_BYTES
    for r in rows[1:]:
        assert (r["rope_pairs"], r["rope_selection"]) == kept
        assert r["cache_bytes_per_token"] == 2 * (r["rank"] + 2 * 2 * kept[0]) * 4
    if not rope:
        for r in rows[1:3]:  # r_c = 16, both seeds: exact
            assert r["perplexity"] == pytest.approx(stock["perplexity"], rel=1e-5)
        assert all(abs(r["perplexity"] / stock["perplexity"] - 1) > 1e-5 for r in rows[3:])  # r_c = 8 approximates
    skipped = [s["what"] for s in result["skipped"]]
    assert any("covariance" in s for s in skipped) and any("int8" in s for s in skipped)
    assert "skipped on this rotary model (Llama): covariance" in capsys.readouterr().out
    md = (out / "cache_sweep.md").read_text()
    assert "# Perplexity against KV-cache bytes per token (llama, at patch)" in md and "Skipped on this model:" in md
    assert f"| latent r_c={ranks[-1]}, rope_pairs={kept[0]} {kept[1] or '(all)'} | whitened |" in md
    assert (out / "cache_sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "model,extra,match",
    [("stand-in", ["--rope_pairs", "2"], r"--rope_pairs / --rope_selection were given for .* a 'gpt2' model"),
     ("llama", ["--quantized_ranks", "8"], r"--quantized_ranks on .*the quantized latent cache does not take rotary")],
    ids=["rope-on-gpt2", "quantized-on-llama"],
)
def test_cache_sweep_refusals(assets, tmp_path, model, extra, match):
    folder = ROOT / "examples" / "shakespeare-gpt2" if model == "stand-in" else assets["model"]
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=match):
        cache_sweep.main(["--model_name_or_path", str(folder), "--output_dir", str(out), *extra])
    assert not out.exists()
