"""examples/finetune.py with tiny budgets: outputs, exactness at patch, DDP, resume, LoRA, other families, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import finetune  # noqa: E402

from hf_merged_attn import patch_model  # noqa: E402
from hf_merged_attn.evaluation import evaluate_perplexity  # noqa: E402
from hf_merged_attn.registry import REGISTRY  # noqa: E402

SHIPPED_DATA = ROOT / "examples" / "data" / "shakespeare"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny GPT-2 (2 layers, 64 wide, 4 heads of 16, non-zero attention biases) with a 400-token BPE, and data."""
    root = tmp_path_factory.mktemp("finetune_assets")
    lines = (SHIPPED_DATA / "train.txt").read_text(encoding="utf-8").splitlines()
    (root / "train.txt").write_text("\n".join(lines[:1500]) + "\n", encoding="utf-8")
    (root / "validation.txt").write_text("\n".join(lines[-300:]) + "\n", encoding="utf-8")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(lines[:1500], trainer)
    eot = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eot, eos_token=eot, unk_token=eot)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_head=4, n_layer=2, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("c_attn.weight"):
                param.normal_(0.0, 0.25)  # peaked, input-dependent attention, so approximations show
            elif name.endswith("c_attn.bias"):
                param.normal_(0.0, 0.3)  # non-zero biases: the seeded u_h must be right for ppl to match stock
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


def tiny_args(assets: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(assets / "model"), "--train_file", str(assets / "train.txt"),
        "--validation_file", str(assets / "validation.txt"), "--block_size", "64", "--per_device_train_batch_size", "4",
        "--max_train_steps", "4", "--num_warmup_steps", "1", "--eval_steps", "2", "--eval_max_tokens", "1024",
        "--curve_eval_tokens", "256", "--output_dir", str(out), *extra,
    ]


def test_defaults_point_at_the_shipped_assets():
    args = finetune.parse_args([])
    assert Path(args.model_name_or_path) == ROOT / "examples" / "shakespeare-gpt2"
    assert Path(args.train_file) == SHIPPED_DATA / "train.txt" and Path(args.validation_file) == SHIPPED_DATA / "validation.txt"
    modes, config = finetune.validate(args)  # the shipped model and files exist and fit the defaults
    head_dim = config.n_embd // config.n_head
    assert modes == [("stock", "stock", None), ("covariance", "covariance", None), (f"lowrank-r{head_dim // 2}", "lowrank", head_dim // 2)]
    assert (ROOT / "examples" / "shakespeare-gpt2" / "model.safetensors").is_file()


def test_short_run_writes_results(assets, tmp_path):
    out = tmp_path / "run"
    results = finetune.main(tiny_args(assets, out, "--modes", "stock,covariance,lowrank:16,lowrank:2"))
    assert {"results.json", "results.md", "loss_curves.png"} <= set(os.listdir(out))
    saved = json.loads((out / "results.json").read_text())
    summary = saved["summary"]
    assert list(summary) == ["stock", "covariance", "lowrank-r16", "lowrank-r2"]
    before = saved["perplexity_before"]
    for label in ("stock", "covariance", "lowrank-r16"):  # exact modes: same perplexity as stock at patch
        # fp32 logits agree to ~1e-6 (see test_patch_exact); exp(mean NLL) then agrees to ~1e-6 relative
        assert summary[label]["perplexity_at_patch"] == pytest.approx(before, rel=1e-5)
    assert abs(summary["lowrank-r2"]["perplexity_at_patch"] / before - 1) > 1e-4  # r < hd approximates (exact modes: < 1e-5)
    for entry in summary.values():
        assert entry["train_tokens"] == 4 * 4 * 64 and entry["tokens_per_s"] > 0 and entry["peak_memory_mb"] > 0
        assert entry["perplexity_after"] < entry["perplexity_at_patch"]  # 4 steps at lr 5e-4 already help
        assert entry["trainable_params"] == entry["total_params"]
    assert summary["covariance"]["total_params"] > summary["stock"]["total_params"] > summary["lowrank-r2"]["total_params"]
    assert "| covariance |" in (out / "results.md").read_text() and results["world_size"] == 1
    reloaded = AutoModelForCausalLM.from_pretrained(out / "covariance-seed0" / "model")  # a patched checkpoint
    assert reloaded.config.merged_attn["mode"] == "covariance"


def test_one_step_run_and_energy_ranks(assets, tmp_path):
    """--max_train_steps 1 (its only step is the untimed warm-up: tokens/s is n/a) with a spectral-energy mode."""
    out = tmp_path / "one"
    args = tiny_args(assets, out, "--modes", "lowrank:0.9")
    args[args.index("--max_train_steps") + 1] = "1"
    finetune.main(args)
    saved = json.loads((out / "results.json").read_text())
    entry = saved["summary"]["lowrank-e0.9"]
    assert entry["rank"] == 0.9 and entry["tokens_per_s"] is None and entry["train_tokens"] == 4 * 64
    ranks = saved["runs"][0]["ranks_per_block"]
    assert set(ranks) == {"0", "1"} and all(1 <= r <= 16 for r in ranks.values())  # head size 16
    table = (out / "results.md").read_text()
    assert f"| lowrank-e0.9 (ranks {ranks['0']}/{ranks['1']}) |" in table and "| n/a |" in table
    assert entry["ranks_per_block"] == ranks
    reloaded = AutoModelForCausalLM.from_pretrained(out / "lowrank-e0.9-seed0" / "model")
    assert reloaded.config.merged_attn["rank"] == ranks and reloaded.config.merged_attn["energy"] == 0.9


def test_two_processes(assets, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
               str(ROOT / "examples" / "finetune.py"), *tiny_args(assets, out, "--modes", "covariance")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["world_size"] == 2 and "MULTI_CPU" in saved["distributed_type"]
    hashes = saved["runs"][0]["first_batch_hash_per_rank"]
    assert len(hashes) == 2 and hashes[0] != hashes[1]  # the ranks see different data
    assert saved["summary"]["covariance"]["train_tokens"] == 4 * 4 * 64 * 2  # global tokens: both ranks


def test_resume_reaches_the_same_result(assets, tmp_path):
    full = finetune.main(tiny_args(assets, tmp_path / "full", "--modes", "lowrank:8", "--checkpointing_steps", "2"))
    checkpoint = tmp_path / "full" / "lowrank-r8-seed0" / "step_2"
    assert (checkpoint / "history.json").is_file()
    # a run stopped after step 2: only its checkpoint survives; resume it in a fresh output folder
    stopped = tmp_path / "stopped" / "lowrank-r8-seed0"
    stopped.mkdir(parents=True)
    shutil.copytree(checkpoint, stopped / "step_2")
    resumed = finetune.main(tiny_args(assets, tmp_path / "stopped", "--modes", "lowrank:8", "--resume_from_checkpoint", "latest"))
    a, b = full["runs"][0], resumed["runs"][0]
    # same weights, optimizer, scheduler, RNG and data position: the same float ops in the same order
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-6)
    assert b["perplexity_after"] == pytest.approx(a["perplexity_after"], rel=1e-6)
    assert [p["loss"] for p in b["history"]["train"]] == pytest.approx([p["loss"] for p in a["history"]["train"]], rel=1e-6)


def test_lora_trains_only_adapters_and_saves_them(assets, tmp_path):
    from peft import PeftModel

    out = tmp_path / "lora"
    results = finetune.main(tiny_args(assets, out, "--modes", "stock,covariance", "--lora", "--lora_r", "4"))
    stream = finetune.load_lm_data(finetune.parse_args(tiny_args(assets, out)), _tokenizer(assets), _accelerator())[1]
    for label, mode in (("stock", "stock"), ("covariance", "covariance")):
        entry = results["summary"][label]
        assert 0 < entry["trainable_params"] < 0.2 * entry["total_params"]
        adapter = out / f"{label}-seed0" / "adapter"
        assert (adapter / "adapter_model.safetensors").is_file()
        base = AutoModelForCausalLM.from_pretrained(assets / "model")
        if mode != "stock":
            patch_model(base, mode)
        loaded = PeftModel.from_pretrained(base, adapter)
        ppl = evaluate_perplexity(loaded, stream, max_length=64, stride=32)["perplexity"]
        assert ppl == pytest.approx(entry["perplexity_after"], rel=1e-5)  # the adapters are what was trained
        merged = loaded.merge_and_unload()
        assert evaluate_perplexity(merged, stream, max_length=64, stride=32)["perplexity"] == pytest.approx(ppl, rel=1e-4)


def test_lora_targets_the_stock_qkv_of_gpt2(assets, tmp_path):
    """Stock GPT-2's fused c_attn is a transformers Conv1D (weight stored (in, out)): peft must transpose it."""
    model = finetune.build_model(finetune.parse_args(tiny_args(assets, tmp_path, "--lora")), "stock", None)
    lora = model.peft_config["default"]
    assert lora.target_modules == {"c_attn"} and lora.fan_in_fan_out is True


def _tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets / "model")


def test_latent_and_merged_value_modes_report_measured_cache_bytes(assets, tmp_path):
    out = tmp_path / "cache"
    args = tiny_args(assets, out, "--modes", "stock,covariance+values,latent:16")
    args[args.index("--max_train_steps") + 1] = "2"
    finetune.main(args)
    summary = json.loads((out / "results.json").read_text())["summary"]
    stock = summary["stock"]["kv_cache_bytes_per_token"]
    assert stock == 2 * 2 * 64 * 4  # 2 layers, K + V of 64 numbers, fp32: measured after a generate() call
    assert summary["covariance+values"]["kv_cache_bytes_per_token"] == stock / 2  # x cached once
    assert summary["latent-r16"]["kv_cache_bytes_per_token"] == 2 * 16 * 4  # the latent only
    at_patch = {label: e["perplexity_at_patch"] for label, e in summary.items()}
    assert at_patch["covariance+values"] == pytest.approx(at_patch["stock"], rel=1e-5)  # exact
    assert at_patch["latent-r16"] > at_patch["stock"]  # r_c = d/4: approximate
    assert "| covariance+values |" in (out / "results.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out / "latent-r16-seed0" / "model")
    assert reloaded.config.merged_attn["mode"] == "latent" and reloaded.config.merged_attn["rank"] == 16


def _accelerator():
    from accelerate import Accelerator

    return Accelerator()


@pytest.mark.parametrize(
    "extra,error,match",
    [
        (["--modes", "stock,merged"], ValueError, r"--modes entry 'merged' is not a mode; allowed: stock, covariance, covariance\+values, lowrank"),
        (["--modes", "lowrank+values"], ValueError, r"--modes entry 'lowrank\+values' is not a mode"),
        (["--modes", "latent:999"], ValueError, r"rank=999 exceeds the hidden size 64"),
        (["--modes", "lowrank:x"], ValueError, r"lowrank:x.*give an integer rank \(lowrank:16\) or a spectral-energy"),
        (["--modes", "lowrank:0.x"], ValueError, r"lowrank:0.x.*give an integer rank"),
        (["--modes", "lowrank:1.0"], ValueError, r"rank=1.0 is a float, i.e. a spectral-energy target, but not in \(0, 1\)"),
        (["--modes", "lowrank:16,lowrank:16"], ValueError, r"names a mode twice"),
        (["--modes", "lowrank:999"], ValueError, r"rank=999 exceeds the hidden size 64"),
        (["--train_file", "/nonexistent/train.txt"], FileNotFoundError, r"--train_file '/nonexistent/train.txt' does not exist"),
        (["--block_size", "128"], ValueError, r"--block_size 128 is larger than the model's context \(64 positions"),
        (["--resume_from_checkpoint", "/nonexistent"], FileNotFoundError, r"--resume_from_checkpoint '/nonexistent' is not a folder"),
    ],
)
def test_bad_input_fails_before_training(assets, tmp_path, extra, error, match):
    out = tmp_path / "bad"
    with pytest.raises(error, match=match):
        finetune.main(tiny_args(assets, out, *extra))
    assert not out.exists()  # nothing started


def test_dataset_without_text_column(assets, tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("content\nTo be or not to be\n", encoding="utf-8")
    out = tmp_path / "bad"
    args = tiny_args(assets, out)
    args[args.index("--train_file") + 1] = str(csv)
    args[args.index("--validation_file") + 1] = str(csv)
    with pytest.raises(ValueError, match=r"no text column 'text' \(columns: \['content'\]\).*--text_column"):
        finetune.main(args)
    assert not out.exists()


# ---------------------------------------------------------------- other families of the registry

OTHER_FAMILIES = {  # tiny random stock models: 2 layers, 64 wide, 4 heads of 16, no position limit for BLOOM
    "opt": (OPTForCausalLM, dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=128,
                                 word_embed_proj_dim=64, max_position_embeddings=64, pad_token_id=1)),
    "bloom": (BloomForCausalLM, dict(hidden_size=64, n_head=4, n_layer=2, pad_token_id=1)),
}


@pytest.fixture(scope="module")
def family_models(assets):
    """{model_type: folder}: tiny OPT and BLOOM (strong q/k/v weights, non-zero biases) with the assets' tokenizer."""
    tokenizer = _tokenizer(assets)
    folders = {}
    for model_type, (cls, sizes) in OTHER_FAMILIES.items():
        torch.manual_seed(0)
        config = {"opt": OPTConfig, "bloom": BloomConfig}[model_type](
            vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, **sizes)
        model = cls(config)
        spec = REGISTRY[model_type]
        with torch.no_grad():  # peaked attention and non-zero q/k biases, so a wrong merge shows in the perplexity
            for _, _, attn in spec.stock_attentions(model):
                for name, param in attn.named_parameters():
                    if name.split(".")[0] in spec.qkv_names:
                        param.normal_(0.0, 0.25 if name.endswith("weight") else 0.3)
        folders[model_type] = assets / model_type
        model.save_pretrained(folders[model_type])
        tokenizer.save_pretrained(folders[model_type])
    return folders


def family_args(assets, folder: Path, out: Path, *extra: str) -> list[str]:
    args = tiny_args(assets, out, *extra)
    args[args.index("--model_name_or_path") + 1] = str(folder)
    args[args.index("--max_train_steps") + 1] = "2"
    args[args.index("--eval_max_tokens") + 1] = "512"
    return args


@pytest.mark.parametrize("model_type", list(OTHER_FAMILIES))
def test_other_causal_family_runs_stock_and_covariance(assets, family_models, tmp_path, model_type):
    out = tmp_path / model_type
    saved = finetune.main(family_args(assets, family_models[model_type], out, "--modes", "stock,covariance"))
    summary, before = saved["summary"], saved["perplexity_before"]
    assert list(summary) == ["stock", "covariance"] and before > 1.0
    for entry in summary.values():
        assert entry["perplexity_at_patch"] == pytest.approx(before, rel=1e-5)  # covariance is exact
        assert entry["perplexity_after"] < entry["perplexity_at_patch"]  # 2 steps at lr 5e-4 already help
        assert entry["train_tokens"] == 2 * 4 * 64 and entry["trainable_params"] == entry["total_params"]
    assert summary["covariance"]["total_params"] > summary["stock"]["total_params"]
    reloaded = AutoModelForCausalLM.from_pretrained(out / "covariance-seed0" / "model")
    assert reloaded.config.model_type == f"merged_{model_type}" and reloaded.config.merged_attn["mode"] == "covariance"


def test_lora_on_opt_targets_its_q_k_v_projections(assets, family_models, tmp_path):
    out = tmp_path / "lora"
    saved = finetune.main(family_args(assets, family_models["opt"], out, "--modes", "stock,covariance", "--lora",
                                      "--lora_r", "4"))
    targets = {}
    for label in ("stock", "covariance"):
        entry = saved["summary"][label]
        assert 0 < entry["trainable_params"] < 0.2 * entry["total_params"]
        assert entry["perplexity_at_patch"] == pytest.approx(saved["perplexity_before"], rel=1e-5)
        adapter = json.loads((out / f"{label}-seed0" / "adapter" / "adapter_config.json").read_text())
        targets[label] = (set(adapter["target_modules"]), adapter["fan_in_fan_out"])
    # like for like: stock OPT's own q_proj / k_proj / v_proj vs the patched q_proj / v_proj (covariance: no k_proj)
    assert targets == {"stock": ({"q_proj", "k_proj", "v_proj"}, False), "covariance": ({"q_proj", "v_proj"}, False)}


def test_lora_targets_blooms_fused_query_key_value(assets, family_models, tmp_path):
    args = finetune.parse_args(family_args(assets, family_models["bloom"], tmp_path, "--lora"))
    lora = finetune.build_model(args, "stock", None).peft_config["default"]
    assert lora.target_modules == {"query_key_value"} and lora.fan_in_fan_out is False  # an nn.Linear
    lora = finetune.build_model(args, "lowrank", 4).peft_config["default"]
    assert lora.target_modules == {"q_proj", "k_proj", "v_proj"} and lora.fan_in_fan_out is False


def test_block_size_limit_follows_the_family(assets, family_models, tmp_path):
    """OPT has 64 learned positions; BLOOM's ALiBi positions have no limit."""
    with pytest.raises(ValueError, match=r"--block_size 128 is larger than the model's context \(64 positions"):
        finetune.validate(finetune.parse_args(family_args(assets, family_models["opt"], tmp_path, "--block_size",
                                                          "128")))
    args = finetune.parse_args(family_args(assets, family_models["bloom"], tmp_path, "--block_size", "4096"))
    modes, config = finetune.validate(args)
    assert config.model_type == "bloom" and modes[-1] == ("lowrank-r8", "lowrank", 8)  # half the head size 16


@pytest.mark.parametrize(
    "config,match",
    [
        (BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128),
         r"is a 'bert' model, an encoder \(BERT: bidirectional attention, no causal LM head\)\. This comparison "
         r"fine-tunes causal language models of the families: GPT-2 \(gpt2\), OPT \(opt\), BLOOM \(bloom\)\. "
         r"Pass a checkpoint of one of them"),
        (LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128),
         r"is a 'llama' model, a rotary-position model: RoPE .* cannot be merged exactly\. This comparison fine-tunes "
         r"causal language models of the families: GPT-2 \(gpt2\), OPT \(opt\), BLOOM \(bloom\)"),
    ],
    ids=["bert-encoder", "llama-rotary"],
)
def test_encoder_and_rotary_models_are_refused_before_any_work(assets, tmp_path, config, match):
    folder = tmp_path / config.model_type
    config.save_pretrained(folder)  # validate reads only the config
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=match) as error:
        finetune.main(family_args(assets, folder, out))
    assert f"--model_name_or_path {str(folder)!r}" in str(error.value)
    assert not out.exists()  # nothing started
