#!/usr/bin/env python
"""Does merging help? Every mode at its own tuned learning rate, chosen on validation, scored on a held-out test split.

    accelerate launch examples/study.py --docs_dir docs          # the full study on the shipped stand-in (2-core CPU)
    accelerate launch examples/study.py --quick                  # the whole pipeline at tiny budgets, for CI
    accelerate launch examples/study.py --model_name_or_path gpt2 --dataset_name wikitext \\
        --dataset_config_name wikitext-2-raw-v1 --output_dir runs/study_gpt2 --docs_dir docs/study_gpt2   # needs the Hub

Every run goes through examples/finetune.py's `run_one` (its data pipeline, data order, AdamW, warm-up + cosine
schedule, evaluator and KV-cache measurement), in three phases:

1. sweep: every mode at every peak learning rate of a log grid (--lr_grid), seed --seed, --sweep_steps steps. Each
   mode's learning rate is its best VALIDATION perplexity; a best at an edge of the grid extends the grid by one
   more step beyond it (at most --extend_edges times per mode).
2. final: every mode at its own learning rate, --seeds seeds, --final_steps steps; perplexity on the TEST split
   (read only after every choice is fixed and never used for one), mean ± std, and the paired per-seed differences
   to stock with a 95% t-interval.
3. same learning rate: every mode at stock's learning rate (the "same hyper-parameters" view): from the sweep
   (validation, one seed), and on the test split with the final seeds and budget (--same_lr_runs test, the default;
   runs shared with phase 2 where the rates agree).

Modes (--modes) are those of finetune.py, with sizes that may be written hd/N or d/N (head size, hidden size), plus
lora:R (peft LoRA of rank R, alpha 2R, on stock's q/k/v projection). --init whitened (the default) seeds lowrank and
latent modes activation-aware; it changes nothing for stock, covariance, covariance+values and LoRA. A rotary model
(Llama, Qwen2, Mistral) takes stock, latent and lora modes, with finetune.py's --rope_pairs / --rope_selection:

    accelerate launch examples/study.py --model_name_or_path runs/SmolLM2-135M-Instruct \
        --modes stock,latent:96,latent:48,lora:16 --rope_pairs 4 --rope_selection 2norm --output_dir runs/study_smollm2

Resumable: a finished run leaves a record.json that a rerun reuses; an unfinished one resumes from its newest
checkpoint. Writes study.json, study.md, study_pareto_cache.png, study_pareto_params.png and study_lr.png to
--docs_dir (default --output_dir). Other arguments go to finetune.py (model, data, batch, block size, evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

import finetune  # examples/ is on sys.path when a script runs
from finetune import arg
from lm_data import load_lm_data, load_test_stream
from processes import on_cpu_ranks
from rank_sweep import machine
from run_record import recorded_args
from study_report import markdown, plot

from hf_merged_attn.quantized_cache import fake_quantized_latent

HERE = Path(__file__).resolve().parent
DEFAULT_MODES = "stock,covariance,covariance+values,lowrank:hd/4,lowrank:hd/2,latent:d,latent:d/2,latent:d/4,lora:hd/4"
DEFAULT_GRID = "2e-4,4.31e-4,9.28e-4,2e-3"  # 4 log-spaced values spanning 10x
# finetune.py defaults the study changes (explicit flags still win): validation scored on 16,384 tokens in disjoint
# windows (as cache_sweep.py and rank_sweep.py) and loss-curve points at the start, middle and end only, to fit the time
STUDY_FINETUNE = ["--eval_max_tokens", "16384", "--eval_stride", "256", "--eval_steps", "60"]
QUICK = dict(sweep_steps=1, final_steps=3, seeds=2, extend_edges=1, checkpointing_steps=2, test_max_tokens=1024,
             num_threads=1, output_dir="runs/study_quick")
QUICK_FINETUNE = ["--block_size", "64", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16",
                  "--eval_max_tokens", "1024", "--eval_stride", "64", "--curve_eval_tokens", "128",
                  "--calibration_samples", "4"]
SET_BY_STUDY = {  # finetune.py flags the study sets per run -> what to use instead
    "--learning_rate": "--lr_grid", "--max_train_steps": "--sweep_steps / --final_steps",
    "--num_warmup_steps": "--warmup_fraction", "--lora": "lora:R in --modes", "--lora_r": "lora:R in --modes",
    "--lora_alpha": "lora:R in --modes (alpha = 2R)", "--resume_from_checkpoint": "a rerun (it always resumes)",
    "--push_to_hub": "finetune.py", "--hub_model_id": "finetune.py",
}


@dataclass
class StudyArguments:
    """The study's own settings; every other flag is finetune.py's (FinetuneArguments), shared by all runs."""

    modes: str = arg(DEFAULT_MODES, "comma-separated finetune.py modes (sizes as hd/N, d/N) and lora:R")
    lr_grid: str = arg(DEFAULT_GRID, "peak learning rates, >= 4 values spanning >= 10x")
    extend_edges: int = arg(1, "grid steps added beyond an edge that wins (per mode)")
    sweep_steps: int = arg(60, "optimizer steps of each sweep run (finetune.py: 60)")
    final_steps: int = arg(120, "optimizer steps of each final run (finetune.py: 60)")
    warmup_fraction: float = arg(1 / 6, "warm-up steps / steps (finetune.py: 10/60)")
    seeds: int = arg(3, "final runs use seeds --seed .. --seed + N - 1")
    seed: int = arg(0, "the sweep's seed (data order, dropout)")
    same_lr_runs: Literal["sweep", "test"] = arg(
        "test", "the stock-learning-rate view from the sweep only, or also final runs on the test split")
    init: Literal["svd", "whitened"] = arg("whitened", "lowrank / latent seeding")
    test_file: str = arg(str(finetune.DEFAULT_DATA / "test.txt"), "test split (a local file)")
    test_split: str = arg("test", "test split of --dataset_name")
    test_max_tokens: int = arg(0, "test tokens scored (0 = all)")
    quantized_cache_bits: str = arg(
        "", "comma-separated bit widths (8, 4): every final latent run is also scored on the test split with its "
        "latent round-tripped through a quantized cache of that width (LatentQuantizedCache, every token quantized)")
    checkpointing_steps: int = arg(50, "checkpoint each run every N steps")
    output_dir: str = arg("runs/study", "runs, checkpoints and records")
    docs_dir: str | None = arg(None, "where study.md/.json/.png go (default: --output_dir)")
    keep_models: bool = arg(False, "keep each run's saved model (default: delete)")
    num_threads: int = arg(0, "torch CPU threads (0: torch's default); --quick uses 1: its tiny matrices gain nothing "
                           "from more threads, and threads waiting on each other on a busy machine cost it several times")
    quick: bool = arg(False, "tiny budgets: the whole pipeline in a few minutes")
    command: str = field(default="", init=False)  # the command line, as recorded in study.json


T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139, 2.200985,
        2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873,
        2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)  # t quantile 0.975, df 1..30


def parse_args(argv: list[str] | None = None) -> tuple[StudyArguments, finetune.FinetuneArguments]:
    """(study arguments, finetune.py arguments shared by every run); --quick changes the defaults, explicit flags
    still win."""
    p = HfArgumentParser(StudyArguments, description=__doc__, formatter_class=finetune.HelpFormatter,
                         allow_abbrev=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    known, rest = p.parse_known_args(argv)
    if known.quick:
        p.set_defaults(**QUICK)
        known, rest = p.parse_known_args(argv)
    args = StudyArguments(**vars(known))
    for item in rest:
        flag = item.split("=")[0].replace("-", "_").replace("__", "--", 1)  # --lora-r is --lora_r
        if flag in SET_BY_STUDY:
            raise ValueError(f"{item.split('=')[0]} is set by the study for each run; use {SET_BY_STUDY[flag]} instead.")
    # no abbreviations: --learn would otherwise reach --learning_rate past the check above
    ft = finetune.parse_args(STUDY_FINETUNE + (QUICK_FINETUNE if args.quick else []) + rest, allow_abbrev=False)
    args.command = "accelerate launch examples/study.py " + shlex.join(argv)
    return args, dataclasses.replace(ft, init=args.init, seeds=1)


def parse_grid(text: str) -> list[float]:
    """'1e-4,2.15e-4,4.64e-4,1e-3' -> sorted floats; at least 4 positive values spanning at least 10x."""
    try:
        grid = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--lr_grid {text!r} must be comma-separated numbers, e.g. {DEFAULT_GRID}.") from None
    if len(grid) < 4 or grid[0] <= 0 or grid[-1] / grid[0] < 10 * (1 - 1e-9):
        raise ValueError(f"--lr_grid {text!r} gives {grid}: a fair sweep needs at least 4 positive learning rates "
                         f"spanning at least 10x (largest / smallest), e.g. {DEFAULT_GRID}.")
    return grid


def parse_bits(text: str) -> list[int]:
    """'8,4' -> [8, 4]: the quantized-cache widths the final latent runs are also scored with ('' -> none)."""
    bits = [item.strip() for item in text.split(",") if item.strip()]
    if any(b not in ("8", "4") for b in bits) or len(set(bits)) < len(bits):
        raise ValueError(f"--quantized_cache_bits {text!r}: give distinct widths from 8 and 4, e.g. 8,4 (or nothing).")
    return [int(b) for b in bits]


def resolve_modes(text: str, hidden: int, heads: int,
                  head_dim: int | None = None) -> list[tuple[str, str, int | float | None, int | None]]:
    """'stock,lowrank:hd/4,lora:16' -> [(label, finetune mode, rank, lora rank)]; hd/N and d/N are sizes of the model
    (head_dim: a config's own head size, where it is not hidden / heads)."""
    sizes = {"hd": head_dim or hidden // heads, "d": hidden}
    modes = []
    for item in [m.strip() for m in text.split(",") if m.strip()]:
        name, colon, size = item.partition(":")
        match = re.fullmatch(r"(hd|d)(?:/([1-9]\d*))?", size)
        if match:
            size = str(sizes[match[1]] // int(match[2] or 1))
        if name == "lora":
            if not size.isdigit() or int(size) < 1:
                raise ValueError(f"--modes entry {item!r}: LoRA needs a positive integer rank, e.g. lora:16 or lora:hd/4.")
            modes.append((f"lora-r{size}", "stock", None, int(size)))
        else:
            (label, mode, rank), = finetune.parse_modes(name + colon + size, sizes["hd"] // 2, hidden // 2)
            modes.append((label, mode, rank, None))
    labels = [m[0] for m in modes]
    if len(set(labels)) < len(labels):
        raise ValueError(f"--modes {text!r} names a mode twice ({labels}); give each once.")
    if "stock" not in labels:
        raise ValueError(f"--modes {text!r} has no stock: the differences and the same-learning-rate view are "
                         "relative to it. Add stock to --modes.")
    return modes


def validate(args, ft) -> tuple[list, list[float]]:
    """Check everything that can be checked before any work; returns (modes, learning-rate grid)."""
    grid = parse_grid(args.lr_grid)
    for flag in ("sweep_steps", "final_steps", "checkpointing_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} {getattr(args, flag)} must be >= 1.")
    if args.seeds < 2:
        raise ValueError(f"--seeds {args.seeds}: paired differences with a confidence interval need at least 2 seeds "
                         "(3 or more advised).")
    if args.num_threads < 0:
        raise ValueError(f"--num_threads {args.num_threads} must be >= 0 (0: torch's default).")
    if args.extend_edges < 0 or not 0 <= args.warmup_fraction < 1:
        raise ValueError(f"--extend_edges {args.extend_edges} must be >= 0 and --warmup_fraction "
                         f"{args.warmup_fraction} in [0, 1).")
    parse_bits(args.quantized_cache_bits)
    if not ft.dataset_name and not Path(args.test_file).is_file():
        raise FileNotFoundError(f"--test_file {args.test_file!r} does not exist. Pass the held-out test split as a "
                                ".txt file.")
    config = AutoConfig.from_pretrained(ft.model_name_or_path)
    modes = resolve_modes(args.modes, config.hidden_size, config.num_attention_heads, getattr(config, "head_dim", None))
    every_run = ",".join(sorted({m[1] if m[2] is None else f"{m[1]}:{m[2]}" for m in modes}))
    ft.modes = every_run  # what the runs are, as study.json records it
    finetune.validate(ft)  # data files, model family (rotary: stock and latent only), block size, ranks, rope settings
    if args.quantized_cache_bits and finetune.causal_lm_spec(config, ft.model_name_or_path).rotary:
        raise ValueError(
            f"--quantized_cache_bits {args.quantized_cache_bits!r}: the quantized latent cache does not take rotary "
            "latent layers yet (they cache the rotated rotary keys beside the latent). Drop it for "
            f"{ft.model_name_or_path!r}.")
    saved = Path(args.output_dir) / "settings.json"
    if saved.is_file():  # finished runs are reused only if they were made with the same settings
        before, now = json.loads(saved.read_text()), run_settings(args, ft)
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if changed:
            diff = ", ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in changed)
            raise ValueError(
                f"--output_dir {args.output_dir!r} holds runs made with other settings ({diff}); its runs cannot be "
                "reused. Pass the same settings to resume it, or another --output_dir.")
    return modes, grid


def run_settings(args, ft) -> dict:
    """What makes a run: everything but the list of modes, learning rates and seeds, and where things are written."""
    skip = {"modes", "seeds", "output_dir", "resume_from_checkpoint", "checkpointing_steps", "push_to_hub",
            "hub_model_id", "hub_token", "lora", "lora_r", "lora_alpha", "learning_rate", "max_train_steps",
            "num_warmup_steps", "seed"}
    study = ("sweep_steps", "final_steps", "warmup_fraction", "init", "seed", "test_file", "test_split", "test_max_tokens")
    if args.quantized_cache_bits:  # recorded only when asked for: a study made before the option resumes as it was
        study += ("quantized_cache_bits",)
    return {**{k: v for k, v in vars(ft).items() if k not in skip}, **{k: getattr(args, k) for k in study}}


# ---------------------------------------------------------------- statistics and choices


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with df degrees of freedom (table to 30, Cornish-Fisher expansion beyond)."""
    if df < 1:
        raise ValueError(f"degrees of freedom {df} must be >= 1.")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2) \
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)


def paired_differences(values: dict[int, float], reference: dict[int, float]) -> dict:
    """values[seed] - reference[seed] over the shared seeds: mean, std, and the 95% t-interval of the mean."""
    if set(values) != set(reference) or len(values) < 2:
        raise ValueError(f"paired differences need the same >= 2 seeds on both sides; got {sorted(values)} and "
                         f"{sorted(reference)}.")
    seeds = sorted(values)
    diffs = [values[s] - reference[s] for s in seeds]
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t_quantile_975(len(diffs) - 1) * std / math.sqrt(len(diffs))
    return {"mean": mean, "std": std, "n": len(diffs), "low": mean - half, "high": mean + half,
            "per_seed": dict(zip(seeds, diffs))}


def choose_lr(sweep_records: list[dict]) -> float:
    """The learning rate of the lowest VALIDATION perplexity (a diverged run counts as infinite; ties: the smaller)."""
    for r in sweep_records:
        if r["phase"] != "sweep" or "test_perplexity" in r:
            raise ValueError(f"choose_lr takes sweep records (validation only); got a {r['phase']} record.")
    finite = lambda ppl: ppl if math.isfinite(ppl) else math.inf  # noqa: E731
    return min(sweep_records, key=lambda r: (finite(r["val_perplexity"]), r["lr"]))["lr"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ---------------------------------------------------------------- runs


class Study:
    """The runs of one study: each is finetune.run_one, or its record.json when a previous invocation finished it."""

    def __init__(self, args, ft, modes, accelerator):
        self.args, self.ft, self.modes, self.accelerator = args, ft, modes, accelerator
        self.out = Path(args.output_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(ft.model_name_or_path)
        self.train_data, self.val_stream = load_lm_data(ft, self.tokenizer, accelerator)
        self.test_stream = None  # read only in run() of a final run, after every learning rate is chosen
        self.computed: list[str] = []

    def run(self, phase: str, mode: tuple, lr: float, seed: int) -> dict:
        label, ft_mode, rank, lora_r = mode
        steps = self.args.sweep_steps if phase == "sweep" else self.args.final_steps
        parent = self.out / phase / f"lr{lr:g}"
        run_dir = parent / f"{label}-seed{seed}"
        path = run_dir / "record.json"
        if not path.is_file():
            start = time.time()
            ft = dataclasses.replace(
                self.ft, learning_rate=lr, max_train_steps=steps, num_warmup_steps=round(self.args.warmup_fraction * steps),
                seed=seed, output_dir=str(parent), lora=lora_r is not None, lora_r=lora_r or self.ft.lora_r,
                lora_alpha=2 * (lora_r or self.ft.lora_r), checkpointing_steps=self.args.checkpointing_steps,
                resume_from_checkpoint="latest",
            )
            full = finetune.run_one(ft, self.accelerator, label, ft_mode, rank, seed, self.train_data, self.val_stream)
            if self.accelerator.is_main_process:
                record = {k: full[k] for k in ("label", "mode", "rank", "seed", "total_params", "trainable_params",
                                               "kv_cache_bytes_per_token", "perplexity_at_patch", "train_steps",
                                               "train_tokens", "tokens_per_s", "train_time_s", "final_train_loss",
                                               "eval_tokens")}
                record.update(phase=phase, lr=lr, lora_r=lora_r, init=ft.init, val_perplexity=full["perplexity_after"])
                if full.get("rope_pairs") is not None:  # a rotary latent: its kept pairs, as the patch resolved them
                    record.update(rope_pairs=full["rope_pairs"], rope_selection=full["rope_selection"])
                if phase == "final":
                    test = self.test_perplexity(ft, run_dir)
                    record.update(test_perplexity=test["perplexity"], test_tokens=test["tokens"])
                    if ft_mode == "latent":
                        record.update(self.quantized_scores(ft, run_dir))
                record["wall_s"] = time.time() - start
                (run_dir / "history.json").write_text(json.dumps(full["history"]))
                write_json(path, record)
                for folder in [*run_dir.glob("step_*"), *run_dir.glob(".step_*.partial")]:  # the record replaces them
                    shutil.rmtree(folder)
                if not self.args.keep_models:
                    for folder in ("model", "adapter"):
                        shutil.rmtree(run_dir / folder, ignore_errors=True)
            self.computed.append(str(run_dir.relative_to(self.out)))
            self.accelerator.wait_for_everyone()
        return json.loads(path.read_text())

    def before_fine_tuning(self) -> dict:
        """Perplexity of the pretrained model (every mode's starting point, exactly or nearly) on validation and test."""
        model = AutoModelForCausalLM.from_pretrained(self.ft.model_name_or_path)
        return {"validation": finetune.eval_loss(model, self.val_stream, self.ft)["perplexity"],
                "test": self.test_perplexity(self.ft, None, model)["perplexity"]}

    def test_perplexity(self, ft, run_dir: Path | None, model=None) -> dict:
        """Score the test split with `model`, or the run's saved model (or stock + its LoRA adapter) reloaded."""
        if self.test_stream is None:
            self.test_stream = load_test_stream(ft, self.tokenizer, self.args.test_file, self.args.test_split,
                                                self.args.test_max_tokens)
        if model is not None:
            return finetune.eval_loss(model, self.test_stream, ft)
        if ft.lora:
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(ft.model_name_or_path)
            model = PeftModel.from_pretrained(base, run_dir / "adapter")
        else:
            model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
        return finetune.eval_loss(model, self.test_stream, ft)

    def quantized_scores(self, ft, run_dir: Path) -> dict:
        """Test perplexity of the run's saved latent model with its latent round-tripped through a quantized cache
        of each --quantized_cache_bits width, and that cache's bytes per token (codes and scales, measured on the
        cache object after a short generate())."""
        from hf_merged_attn.evaluation import kv_cache_bytes_per_token
        from hf_merged_attn.quantized_cache import LatentQuantizedCache

        scores = {}
        model = AutoModelForCausalLM.from_pretrained(run_dir / "model")  # the hooks leave it as loaded on exit
        for nbits in parse_bits(self.args.quantized_cache_bits):
            with fake_quantized_latent(model, nbits=nbits):
                test = finetune.eval_loss(model, self.test_stream, ft)
            cache = LatentQuantizedCache(model.config, nbits=nbits, residual_length=0)
            scores[f"int{nbits}"] = {"test_perplexity": test["perplexity"],
                                     "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model, past_key_values=cache)}
        return {"quantized": scores} if scores else {}

    def sweep(self, mode: tuple, grid: list[float]) -> list[dict]:
        """Every learning rate of the grid; while the best is at an edge, one more grid step beyond it."""
        lrs, ratio = list(grid), (grid[-1] / grid[0]) ** (1 / (len(grid) - 1))
        for extension in range(self.args.extend_edges + 1):
            records = [self.run("sweep", mode, lr, self.args.seed) for lr in lrs]
            best = choose_lr(records)
            if best not in (lrs[0], lrs[-1]) or extension == self.args.extend_edges:
                return records
            lrs = [float(f"{lrs[0] / ratio:.3g}")] + lrs if best == lrs[0] else lrs + [float(f"{lrs[-1] * ratio:.3g}")]


def write_json(path: Path, data) -> None:
    """Write atomically: a study killed while writing leaves the old file or none, never half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# ---------------------------------------------------------------- report


def summarize(modes, sweeps: dict, best: dict, finals: dict, same: dict) -> dict:
    """Per mode: sizes, the sweep curve, its learning rate, test perplexity over seeds and paired Δ to stock."""
    test = {label: {r["seed"]: r["test_perplexity"] for r in runs} for label, runs in finals.items()}
    rows = {}
    for label, *_ in modes:
        first = finals[label][0]
        ppl = list(test[label].values())
        sweep = {r["lr"]: r["val_perplexity"] for r in sweeps[label]}
        lrs = sorted(sweep)
        row = {k: first[k] for k in ("mode", "rank", "lora_r", "init", "total_params", "trainable_params",
                                     "kv_cache_bytes_per_token", "perplexity_at_patch", "eval_tokens", "test_tokens")}
        row.update({k: first[k] for k in ("rope_pairs", "rope_selection") if k in first})  # rotary latents
        row.update(
            sweep={f"{lr:g}": sweep[lr] for lr in lrs}, best_lr=best[label],
            best_lr_at_edge=best[label] in (lrs[0], lrs[-1]),
            test_perplexity=test[label], val_perplexity={r["seed"]: r["val_perplexity"] for r in finals[label]},
            tokens_per_s=statistics.fmean(r["tokens_per_s"] for r in finals[label]) if all(
                r["tokens_per_s"] for r in finals[label]) else None,
            delta_vs_stock=paired_differences(test[label], test["stock"]),
            same_lr_val_perplexity=sweep.get(best["stock"]),
        )
        row["test_mean"], row["test_std"] = mean_std(ppl)
        for cache in finals[label][0].get("quantized", {}):  # the same fine-tuned latent read through a quantized cache
            quantized = {r["seed"]: r["quantized"][cache]["test_perplexity"] for r in finals[label]}
            mean, std = mean_std(list(quantized.values()))
            row.setdefault("quantized", {})[cache] = {
                "kv_cache_bytes_per_token": first["quantized"][cache]["kv_cache_bytes_per_token"],
                "test_perplexity": quantized, "test_mean": mean, "test_std": std,
                "delta_vs_stock": paired_differences(quantized, test["stock"]),
                "delta_vs_unquantized": paired_differences(quantized, test[label]),
            }
        if same:
            same_test = {r["seed"]: r["test_perplexity"] for r in same[label]}
            row["same_lr_test_perplexity"] = same_test
            row["same_lr_test_mean"], row["same_lr_test_std"] = mean_std(list(same_test.values()))
            row["same_lr_delta_vs_stock"] = paired_differences(same_test, test["stock"])
        rows[label] = row
    return rows


def commit() -> str:
    """The commit, and whether examples/ or hf_merged_attn/ differ from it (read-only git commands)."""
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=HERE.parent, capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return "unknown (not a git checkout)"
    changed = git("diff", "--quiet", "HEAD", "--", "examples", "hf_merged_attn").returncode
    untracked = git("ls-files", "--others", "--exclude-standard", "--", "examples", "hf_merged_attn").stdout.strip()
    return head.stdout.strip() + (" with uncommitted changes to examples/ or hf_merged_attn/" if changed or untracked else "")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict | None:
    args, ft = parse_args(argv)
    modes, grid = validate(args, ft)  # before any long work
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.num_threads or threads)
        return run_study(args, ft, modes, grid)
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process


def run_study(args, ft, modes, grid) -> dict | None:
    accelerator = Accelerator(gradient_accumulation_steps=ft.gradient_accumulation_steps,
                              cpu=on_cpu_ranks())
    started, start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    code = commit()  # the code this process loaded: HEAD may move on during a long study
    study = Study(args, ft, modes, accelerator)
    if accelerator.is_main_process:
        study.out.mkdir(parents=True, exist_ok=True)
        write_json(study.out / "settings.json", run_settings(args, ft))
    stock_mode = next(mode for mode in modes if mode[0] == "stock")
    sweeps = {"stock": study.sweep(stock_mode, grid)}
    stock_lr = choose_lr(sweeps["stock"])
    for mode in modes:  # every mode also at stock's rate (the same-hyper-parameters view), also where the grid grew
        if mode[0] != "stock":
            records = study.sweep(mode, grid)
            if stock_lr not in [r["lr"] for r in records]:
                records.append(study.run("sweep", mode, stock_lr, args.seed))
            sweeps[mode[0]] = records
    sweeps = {mode[0]: sweeps[mode[0]] for mode in modes}  # in --modes order
    best = {label: choose_lr(records) for label, records in sweeps.items()}  # validation only: no test run exists yet
    if accelerator.is_main_process:
        write_json(study.out / "choices.json", {label: f"{lr:g}" for label, lr in best.items()})
        accelerator.print("learning rates chosen on validation: " + ", ".join(f"{k} {v:g}" for k, v in best.items()))
    seeds = range(args.seed, args.seed + args.seeds)
    finals = {mode[0]: [] for mode in modes}
    for seed in seeds:
        for mode in modes:
            finals[mode[0]].append(study.run("final", mode, best[mode[0]], seed))
    same = {}
    if args.same_lr_runs == "test":
        same = {mode[0]: [study.run("final", mode, best["stock"], seed) for seed in seeds] for mode in modes}
    if not accelerator.is_main_process:
        return None
    before = study.before_fine_tuning()  # after every choice, like every other test-split figure
    rows = summarize(modes, sweeps, best, finals, same)
    runs = [r for records in (*sweeps.values(), *finals.values(), *same.values()) for r in records]
    runs = list({(r["phase"], r["label"], r["lr"], r["seed"]): r for r in runs}.values())  # same-lr runs may repeat
    result = {
        "command": args.command, "commit": code, "commit_at_end": commit(), "machine": machine(), "started": started,
        "wall_time_s": time.time() - start, "runs_time_s": sum(r["wall_s"] for r in runs),
        "world_size": accelerator.num_processes, "args": recorded_args(args), "finetune_args": recorded_args(ft),
        "counts": {phase: sum(r["phase"] == phase for r in runs) for phase in ("sweep", "final")},
        "phase_time_s": {phase: sum(r["wall_s"] for r in runs if r["phase"] == phase) for phase in ("sweep", "final")},
        "perplexity_before": before, "best_lr": best, "rows": rows, "runs": runs, "computed": study.computed,
    }
    docs = Path(args.docs_dir or args.output_dir)
    docs.mkdir(parents=True, exist_ok=True)
    write_json(docs / "study.json", result)
    (docs / "study.md").write_text(markdown(result))
    plot(result, docs)
    accelerator.print(f"{len(study.computed)} run(s) computed, {len(runs) - len(study.computed)} reused; wrote "
                      f"{docs}/study.md, study.json, study_pareto_cache.png, study_pareto_params.png, study_lr.png "
                      f"in {result['wall_time_s']:.0f} s")
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
