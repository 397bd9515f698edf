"""examples/finetune.py with tiny budgets: outputs, exactness at patch, DDP, resume, LoRA, other families, bad input."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
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
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    get_scheduler,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import finetune  # noqa: E402
import lm_data  # noqa: E402

from hf_merged_attn import patch_model  # noqa: E402
from hf_merged_attn.evaluation import evaluate_perplexity  # noqa: E402
from hf_merged_attn.registry import REGISTRY  # noqa: E402
from conftest import HANG_TIMEOUT

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
    # the exact modes and the two that shrink the cache: merged values, lowrank at hd/2, the latent at d/4
    assert modes == [("stock", "stock", None), ("covariance", "covariance", None),
                     ("covariance+values", "covariance+values", None), (f"lowrank-r{head_dim // 2}", "lowrank", head_dim // 2),
                     (f"latent-r{config.n_embd // 4}", "latent", config.n_embd // 4)]
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


LAUNCH_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch_command(args: list[str], port: int, processes: int = 2, script: str = "finetune.py") -> list[str]:
    """`accelerate launch` examples/<script> on `processes` CPU ranks (several: DDP over gloo)."""
    return [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if processes > 1 else []),
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), str(ROOT / "examples" / script), *args]


def launch_two_processes(args: list[str], port: int, script: str = "finetune.py") -> dict:
    """`accelerate launch` examples/<script> on 2 CPU ranks (DDP over gloo); finetune's results.json."""
    command = launch_command(args, port, script=script)
    result = subprocess.run(command, capture_output=True, text=True, timeout=HANG_TIMEOUT, env=LAUNCH_ENV)
    assert result.returncode == 0, result.stderr[-4000:]
    if script != "finetune.py":
        return {}
    saved = json.loads((Path(args[args.index("--output_dir") + 1]) / "results.json").read_text())
    assert saved["world_size"] == 2 and "MULTI_CPU" in saved["distributed_type"]  # not 2 runs of world size 1
    return saved


def test_two_processes(assets, tmp_path):
    out = tmp_path / "ddp"
    saved = launch_two_processes(tiny_args(assets, out, "--modes", "covariance"), 29517)
    assert saved["world_size"] == 2 and "MULTI_CPU" in saved["distributed_type"]
    hashes = saved["runs"][0]["first_batch_hash_per_rank"]
    assert len(hashes) == 2 and hashes[0] != hashes[1]  # the ranks see different data
    assert saved["summary"]["covariance"]["train_tokens"] == 4 * 4 * 64 * 2  # global tokens: both ranks


def test_two_processes_follow_the_one_process_schedule(assets, tmp_path):
    """1 process × 8 and 2 processes × 4 (the same global batches), dropout off: the same learning rate at every
    step (a prepared scheduler steps once per process per optimizer step) and the same losses up to fp round-off."""
    model = tmp_path / "no-dropout"
    shutil.copytree(assets / "model", model)
    config = json.loads((model / "config.json").read_text())
    config.update(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    (model / "config.json").write_text(json.dumps(config))

    def args(out: str, batch: int) -> list[str]:
        args = tiny_args(assets, tmp_path / out, "--modes", "lowrank:8", "--num_warmup_steps", "2",
                         "--per_device_train_batch_size", str(batch))
        args[args.index("--model_name_or_path") + 1] = str(model)
        args[args.index("--max_train_steps") + 1] = "6"
        return args

    one = finetune.main(args("one", 8))["runs"][0]
    two = launch_two_processes(args("two", 4), 29518)["runs"][0]
    lrs = [p["lr"] for p in one["history"]["train"]]
    assert lrs[:3] == [0.0, 2.5e-4, 5e-4] and lrs[-1] > 0  # warm-up over 2 steps, then a cosine not yet at 0
    assert [p["lr"] for p in two["history"]["train"]] == lrs
    assert [p["loss"] for p in two["history"]["train"]] == pytest.approx([p["loss"] for p in one["history"]["train"]], rel=1e-5)
    assert two["perplexity_after"] == pytest.approx(one["perplexity_after"], rel=1e-5)
    assert two["train_tokens"] == one["train_tokens"] == 6 * 8 * 64


def test_pretrain_on_two_processes_follows_the_schedule(tmp_path):
    """examples/pretrain.py on 2 ranks: the learning rate of the last step is the one of a 1-process schedule."""
    lines = (SHIPPED_DATA / "pretrain.txt").read_text(encoding="utf-8").splitlines()[:600]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "pretrained"
    launch_two_processes([
        "--train_file", str(tmp_path / "train.txt"), "--validation_file", "", "--vocab_size", "300", "--block_size", "128",
        "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--per_device_train_batch_size", "2", "--max_train_steps", "4",
        "--num_warmup_steps", "2", "--output_dir", str(out), "--num_threads", "1",
    ], 29519, script="pretrain.py")
    log = json.loads((out / "training_log.json").read_text())
    assert log["world_size"] == 2 and log["tokens_per_step"] == 2 * 2 * 128
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)  # the default --learning_rate
    expected = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=4)
    for _ in range(3):
        expected.step()
    assert log["train"][-1]["step"] == 4 and log["train"][-1]["lr"] == pytest.approx(expected.get_last_lr()[0], rel=1e-12)


@pytest.fixture(scope="module")
def checkpointed(assets, tmp_path_factory):
    """A 4-step lowrank:8 run with checkpoints at steps 2 and 4: (its results, its run folder)."""
    out = tmp_path_factory.mktemp("checkpointed")
    full = finetune.main(tiny_args(assets, out, "--modes", "lowrank:8", "--checkpointing_steps", "2"))
    return full, out / "lowrank-r8-seed0"


def assert_same_run(a: dict, b: dict) -> None:
    # same weights, optimizer, scheduler, RNG and data position: the same float ops in the same order
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-6)
    assert b["perplexity_after"] == pytest.approx(a["perplexity_after"], rel=1e-6)
    assert [p["loss"] for p in b["history"]["train"]] == pytest.approx([p["loss"] for p in a["history"]["train"]], rel=1e-6)
    assert b["train_steps"] == a["train_steps"] and b["train_tokens"] == a["train_tokens"]


def test_checkpoints_are_complete_and_resume_reaches_the_same_result(assets, checkpointed, tmp_path, capsys):
    full, run = checkpointed
    assert sorted(p.name for p in run.iterdir()) == ["model", "step_2", "step_4"]  # no .partial folder left
    manifest = json.loads((run / "step_2" / "manifest.json").read_text())
    assert manifest["step"] == 2 and {"history.json", "optimizer.bin", "random_states_0.pkl"} <= set(manifest["sha256"])
    # a run killed while writing step 4, with an older run's interrupted step_3 and a stray backup copy: resume
    # takes the newest complete checkpoint, says so, and ends where the uninterrupted run ended
    stopped = tmp_path / "stopped" / "lowrank-r8-seed0"
    shutil.copytree(run / "step_2", stopped / "step_2")
    shutil.copytree(run / "step_2", stopped / "step_bak")
    (stopped / "step_3").mkdir()
    shutil.copytree(run / "step_4", stopped / ".step_4.partial", ignore=shutil.ignore_patterns("manifest.json", "optimizer.bin"))
    capsys.readouterr()
    resumed = finetune.main(tiny_args(assets, tmp_path / "stopped", "--modes", "lowrank:8", "--resume_from_checkpoint",
                                      "latest", "--checkpointing_steps", "2"))
    printed = capsys.readouterr().out
    assert "skipped incomplete checkpoints ['.step_4.partial', 'step_3']" in printed
    assert f"resumed from {stopped / 'step_2'} (the newest complete checkpoint) at step 2" in printed
    assert resumed["runs"][0]["resumed_from"] == str(stopped / "step_2")
    assert_same_run(full["runs"][0], resumed["runs"][0])
    assert not (stopped / ".step_4.partial").exists() and (stopped / "step_4" / "manifest.json").is_file()


def test_killed_runs_resume_to_the_same_result(assets, tmp_path):
    """SIGKILL a real `accelerate launch examples/finetune.py` run while it writes a checkpoint, and again at a random
    moment of training; resumed each time with 'latest', it ends exactly where the uninterrupted run ends."""
    rng = random.Random(14)
    run = tmp_path / "crashed" / "lowrank-r8-seed0"

    def command(out: str) -> list[str]:
        args = tiny_args(assets, tmp_path / out, "--modes", "lowrank:8", "--checkpointing_steps", "1",
                         "--resume_from_checkpoint", "latest")
        args[args.index("--max_train_steps") + 1] = "6"
        return launch_command(args, 29521, processes=1)

    def start(out: str) -> subprocess.Popen:
        return subprocess.Popen(command(out), env=LAUNCH_ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # its own process group: the launcher and its worker

    def wait_until(condition, proc) -> None:
        deadline = time.monotonic() + 300
        while not condition():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the moment to kill it"
            time.sleep(0.0005)

    def kill(proc) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def partial() -> Path | None:
        return next(run.glob(".step_*.partial"), None)

    reference = subprocess.run(command("reference"), env=LAUNCH_ENV, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert reference.returncode == 0, reference.stderr[-4000:]
    # 1. frozen (SIGSTOP) as soon as a checkpoint's .partial folder shows, and killed if it is still being written
    proc = start("crashed")
    while True:
        wait_until(lambda: partial() is not None, proc)
        os.killpg(proc.pid, signal.SIGSTOP)
        time.sleep(0.05)  # the stop has landed
        if partial() is not None:
            break
        os.killpg(proc.pid, signal.SIGCONT)  # the folder was complete and renamed meanwhile: wait for the next one
    kill(proc)
    interrupted = partial()
    assert interrupted is not None and not (interrupted / "manifest.json").exists()
    # 2. killed at a random moment: a random time after a random later checkpoint
    proc = start("crashed")
    later = rng.randint(finetune.checkpoint_step(interrupted.with_name(interrupted.name[1:-len(".partial")])), 6)
    wait_until(lambda: (run / f"step_{later}").is_dir(), proc)
    time.sleep(rng.uniform(0.0, 0.5))
    kill(proc)
    # 3. resumed to the end
    final = subprocess.run(command("crashed"), env=LAUNCH_ENV, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert final.returncode == 0, final.stderr[-4000:]
    assert "(the newest complete checkpoint)" in final.stdout and not partial()
    a, b = (json.loads((tmp_path / out / "results.json").read_text())["runs"][0] for out in ("reference", "crashed"))
    assert b["history"] == a["history"]  # every step's loss and learning rate, exactly
    assert (b["final_train_loss"], b["perplexity_after"], b["train_steps"]) == (a["final_train_loss"], a["perplexity_after"], 6)


@pytest.mark.parametrize(
    "prepare,extra,match",
    [
        (lambda run, ckpt: (run / "step_2").mkdir(), ["--resume_from_checkpoint", "{run}/step_2"],
         r"'.*/step_2' is not a complete checkpoint \(no manifest.json, which is written last\).*Pass 'latest'"),
        (lambda run, ckpt: shutil.copytree(ckpt, run / "step_bak"), ["--resume_from_checkpoint", "{run}/step_bak"],
         r"checkpoint folders are named step_N .*; got 'step_bak'\. Pass a step_N folder, or 'latest'"),
        (lambda run, ckpt: shutil.copytree(ckpt, run / "step_2"), ["--resume_from_checkpoint", "latest", "--max_train_steps", "1"],
         r"step_2 was saved at step 2, past --max_train_steps 1\. Resume with --max_train_steps 2 or more"),
    ],
    ids=["empty-step-folder", "stray-folder-name", "past-max-train-steps"],
)
def test_bad_checkpoints_fail_before_training(assets, checkpointed, tmp_path, prepare, extra, match):
    run = tmp_path / "out" / "lowrank-r8-seed0"
    run.mkdir(parents=True)
    prepare(run, checkpointed[1] / "step_2")
    extra = [e.format(run=run) for e in extra]
    with pytest.raises(ValueError, match=match):
        finetune.main(tiny_args(assets, tmp_path / "out", "--modes", "lowrank:8", *extra))
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_corrupted_rng_state_fails_instead_of_diverging(assets, checkpointed, tmp_path):
    run = tmp_path / "out" / "lowrank-r8-seed0"
    shutil.copytree(checkpointed[1] / "step_2", run / "step_2")
    state = run / "step_2" / "random_states_0.pkl"
    saved = torch.load(state, weights_only=False)["torch_manual_seed"]  # (5056,) uint8
    data = bytearray(state.read_bytes())
    data[data.find(bytes(saved.numpy())) + 100] ^= 0xFF  # one flipped byte inside the stored torch RNG state
    state.write_bytes(bytes(data))
    assert not torch.equal(torch.load(state, weights_only=False)["torch_manual_seed"], saved)  # loads: other dropout masks
    with pytest.raises(ValueError, match=r"random_states_0.pkl is corrupted \(its sha256 differs from the manifest\); "
                                         r"resuming from step_2 would not continue the interrupted run"):
        finetune.main(tiny_args(assets, tmp_path / "out", "--modes", "lowrank:8", "--resume_from_checkpoint", "latest"))


def test_lora_trains_only_adapters_and_saves_them(assets, tmp_path):
    from peft import PeftModel

    out = tmp_path / "lora"
    results = finetune.main(tiny_args(assets, out, "--modes", "stock,covariance", "--lora", "--lora_r", "4"))
    stream = lm_data.load_lm_data(finetune.parse_args(tiny_args(assets, out)), _tokenizer(assets), _accelerator())[1]
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


@pytest.mark.parametrize(
    "flag,content,match",
    [
        ("--train_file", b"", r"--train_file '.*/data\.txt' is empty\. Pass a file with text in it"),
        ("--validation_file", b"", r"--validation_file '.*/data\.txt' is empty"),
        ("--train_file", "To be, or not\n".encode() + b"\xff to be\n",
         r"--train_file '.*/data\.txt' is not UTF-8 text: byte 14 \(0xff\) invalid start byte\. Convert it to UTF-8"),
        ("--train_file", b"To be, or not to be, that is the question.\n" * 6,
         r"the train data makes \d blocks of --block_size 64 tokens, fewer than one batch of 4 "
         r"\(--per_device_train_batch_size 4 x 1 process\(es\)\)\. Give more training text"),
        ("--validation_file", b"a", r"the validation data has 1 token\(s\); perplexity needs at least 2"),
    ],
    ids=["empty-train", "empty-validation", "not-utf8", "fewer-blocks-than-a-batch", "one-validation-token"],
)
def test_bad_data_fails_before_training(assets, tmp_path, flag, content, match):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    args = tiny_args(assets, tmp_path / "bad")
    args[args.index(flag) + 1] = str(data)
    with pytest.raises(ValueError, match=match):
        finetune.main(args)
    assert not (tmp_path / "bad").exists()  # nothing started


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
    assert config.model_type == "bloom" and modes[-2] == ("lowrank-r8", "lowrank", 8)  # half the head size 16


@pytest.mark.parametrize(
    "config,match",
    [
        (BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128),
         r"is a 'bert' model, an encoder \(BERT: bidirectional attention, no causal LM head\)\. This comparison "
         r"fine-tunes causal language models of the families: GPT-2 \(gpt2\), OPT \(opt\), BLOOM \(bloom\), Llama "
         r"\(llama\), Qwen2 \(qwen2\), Mistral \(mistral\)\. Pass a checkpoint of one of them"),
        (Qwen3Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128),
         r"is a 'qwen3' model, a rotary-position model of a family without an adapter here \(the rotary families "
         r"Llama, Qwen2 and Mistral take the latent mode\)\. This comparison fine-tunes causal language models of the "
         r"families: GPT-2 \(gpt2\), OPT \(opt\), BLOOM \(bloom\), Llama"),
    ],
    ids=["bert-encoder", "unregistered-rotary"],
)
def test_encoder_and_unregistered_rotary_models_are_refused_before_any_work(assets, tmp_path, config, match):
    folder = tmp_path / config.model_type
    config.save_pretrained(folder)  # validate reads only the config
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=match) as error:
        finetune.main(family_args(assets, folder, out))
    assert f"--model_name_or_path {str(folder)!r}" in str(error.value)
    assert not out.exists()  # nothing started
