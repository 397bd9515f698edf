#!/usr/bin/env python
"""Fine-tune a stock causal LM vs its patched copies at an equal budget and compare perplexity.

    accelerate launch examples/finetune.py                      # shipped stand-in model + Shakespeare, ~10 min on 2 CPUs
    accelerate launch examples/finetune.py --seeds 3 --output_dir docs/finetune
    accelerate launch --multi_gpu --num_processes 2 examples/finetune.py   # 2 ranks (DDP; gloo on CPU)
    accelerate launch --config_file examples/accelerate_configs/fsdp.yaml examples/finetune.py   # sharded (FSDP2)
    accelerate launch --mixed_precision bf16 examples/finetune.py          # mixed precision (on a GPU)
    accelerate launch examples/finetune.py --model_name_or_path gpt2 \\
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1   # real GPT-2 (needs the Hub)
    accelerate launch examples/finetune.py --model_name_or_path facebook/opt-125m ...   # another causal family

The model can be of any causal family that hf_merged_attn registers (GPT-2, OPT, BLOOM, and the rotary Llama, Qwen2,
Mistral: see `hf_merged_attn.registry`); encoders and unregistered families are refused before any work. A rotary model
takes stock and latent only (its rotation sits between Wq and Wk: no covariance / lowrank, and merged values would
cache more than grouped-query attention does); --rope_pairs / --rope_selection choose the rotary pairs its latent keeps:

    accelerate launch examples/finetune.py --model_name_or_path runs/SmolLM2-135M-Instruct \
        --modes stock,latent:96 --rope_pairs 4 --rope_selection 2norm   # see examples/smollm2.py for the folder

For every mode in --modes (default: stock, covariance, covariance with merged values, lowrank at half the head size and
the latent at a quarter of the hidden size — the exact modes and the two that shrink the KV cache) and every seed,
the script takes a fresh copy of the pretrained model, patches it (except stock), measures perplexity
right after patching (equal to stock for exact modes), fine-tunes it with the same data order, seed,
optimizer, schedule and token budget, and measures perplexity again. Perplexity always comes from the
same evaluator (`hf_merged_attn.evaluation.evaluate_perplexity`, the strided sliding-window recipe).

Writes to --output_dir: results.json, results.md (also printed) and loss_curves.png. The first seed's fine-tuned
model is saved (save_pretrained, with its tokenizer) and, in full precision and without --lora, reloaded from disk:
its logits must equal those of the model in memory (`reload_max_abs_diff` in results.json; a warning if not).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate.utils import DistributedType, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, default_data_collator,
                          get_scheduler)
from transformers.pytorch_utils import Conv1D

from hf_merged_attn import PatchConfig, patch_model
from hf_merged_attn.evaluation import evaluate_perplexity, kv_cache_bytes_per_token
from hf_merged_attn.recovery import distillation_loss, recover_layerwise
from hf_merged_attn.registry import REGISTRY, ROTARY_MODEL_TYPES, SPECS
from checkpoints import checkpoint_step, load_checkpoint, resume_point, save_checkpoint
from lm_data import EpochSampler, check_data_file, load_lm_data
from processes import PeakMemory, is_sharded, local_parameter_count, make_accelerator
from reporting import fmt, markdown_table, plot_curves, summarize
from run_record import recorded_args  # examples/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "shakespeare-gpt2"
DEFAULT_DATA = HERE / "data" / "shakespeare"
MODES = ("stock", "covariance", "lowrank", "latent")
RANKED = ("lowrank", "latent")  # modes that take :R / :E (default ranks: half the head size, a quarter of d)


def arg(default, help: str = "", **metadata):
    """A dataclass field that is also a command-line flag (HfArgumentParser reads `metadata` as argparse's keywords)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class ModelDataArguments:
    """Which model and data (hub ids or local paths)."""

    _argument_group_name = "model and data (hub ids or local paths)"
    model_name_or_path: str = arg(str(DEFAULT_MODEL), "a causal LM of a registered family (folder or hub id)")
    dataset_name: str | None = arg(None, "hub dataset, e.g. wikitext (overrides the files)")
    dataset_config_name: str | None = arg(None, "e.g. wikitext-2-raw-v1")
    train_file: str = arg(str(DEFAULT_DATA / "train.txt"), ".txt, .json(l) or .csv")
    validation_file: str = arg(str(DEFAULT_DATA / "validation.txt"))
    text_column: str = arg("text")
    block_size: int = arg(256, "training sequence length (<= the model's context, where it has learned positions)")


@dataclass
class ComparisonArguments:
    """Which modes and seeds are compared, and how low-rank modes are seeded."""

    _argument_group_name = "comparison"
    modes: str = arg("stock,covariance,covariance+values,lowrank,latent",
                     "comma-separated: stock, covariance, covariance+values (merged values: keys and values one cached "
                     "tensor), lowrank (uses --rank), lowrank:R, lowrank:E with E in (0, 1) (per block, the smallest rank "
                     "keeping that share of the spectral energy), latent (r_c = d/4), latent:R, latent:E; rotary models (Llama, "
                     "Qwen2, Mistral) take stock and latent:R only")
    rank: int | None = arg(None, "lowrank rank (default: half the head size)")
    seeds: int = arg(1, "run every mode with seeds seed, seed+1, ...")
    init: Literal["svd", "whitened"] = arg(
        "svd", "lowrank / latent seeding: svd (weights only) or whitened (activation-aware, calibrated on train blocks)")
    calibration_samples: int = arg(16, "evenly spaced train blocks that calibrate --init whitened and the rope "
                                       "selections 2norm / rorope (at most all of them)")
    rope_pairs: int | None = arg(None, "rotary models, latent modes: frequency pairs per KV head kept rotated (default: "
                                 "all, hd/2: exact with r_c covering the values; MHA2MLA keeps hd/16)")
    rope_selection: Literal["2norm", "high", "low", "uniform", "rorope"] | None = arg(
        None, "rotary models, latent modes: which pairs stay rotated (default 2norm when --rope_pairs drops pairs); "
        "2norm and rorope are calibrated on --calibration_samples train blocks, high / low / uniform use no data")
    rope: Literal["exact", "partial"] | None = arg(
        None, "rotary models, latent modes: exact (every pair keeps its rotation, keys compressed before RoPE: the "
        "default) or partial (--rope_pairs kept rotated, the default when --rope_pairs / --rope_selection are given)")


@dataclass
class TrainArguments:
    """The training loop's settings, named as run_clm_no_trainer names them."""

    _argument_group_name = "training (as run_clm_no_trainer)"
    per_device_train_batch_size: int = arg(8)
    per_device_eval_batch_size: int = arg(8)
    gradient_accumulation_steps: int = arg(1)
    learning_rate: float = arg(5e-4)
    weight_decay: float = arg(0.0)
    lr_scheduler_type: str = arg("cosine")
    num_warmup_steps: int = arg(10)
    max_train_steps: int = arg(60)
    max_grad_norm: float = arg(1.0)
    seed: int = arg(0)
    gradient_checkpointing: bool = arg(False)
    output_dir: str = arg("runs/finetune")
    checkpointing_steps: int | None = arg(None, "save accelerate state every N steps")
    resume_from_checkpoint: str | None = arg(
        None, "'latest' (each run resumes from its newest checkpoint in --output_dir) or a step_N folder")


@dataclass
class EvaluationArguments:
    """How perplexity and the loss curves are measured."""

    _argument_group_name = "evaluation"
    eval_stride: int | None = arg(None, "sliding-window stride (default block_size/2)")
    eval_max_tokens: int = arg(24576, "validation tokens scored (0 = all)")
    eval_steps: int = arg(20, "eval loss for the curves every N steps")
    curve_eval_tokens: int = arg(4096, "validation tokens for curve points")


@dataclass
class AdapterHubArguments:
    """LoRA adapters (peft) instead of full fine-tuning, and pushing to the Hub."""

    _argument_group_name = "LoRA (peft) and the Hub"
    lora: bool = arg(False, "train LoRA adapters on the attention modules only")
    lora_r: int = arg(8)
    lora_alpha: int = arg(16)
    lora_dropout: float = arg(0.0)
    push_to_hub: bool = arg(False, "push each fine-tuned patched model (first seed)")
    hub_model_id: str | None = arg(None)
    hub_token: str | None = arg(None)


@dataclass
class RecoveryArguments:
    """Winning back what a patch that is not exact costs: layer-wise recovery before fine-tuning, distillation."""

    _argument_group_name = "recovery (patched modes; stock runs are unchanged)"
    recover_steps: int = arg(0, "layer-wise recovery after patching (hf_merged_attn.recovery.recover_layerwise): "
                                "optimizer steps per attention layer, each on one batch of train blocks (0: off)")
    recover_samples: int = arg(64, "evenly spaced train blocks the layer-wise recovery fits on")
    recover_batch_size: int = arg(8, "train blocks per layer-wise recovery step")
    recover_learning_rate: float = arg(1e-3)
    recover_inputs: Literal["stock", "patched"] = arg(
        "patched", "each layer's input: the stock model's activations, or the patched model's own after the earlier "
        "layers were recovered (GPTQ-style)")
    distill: bool = arg(False, "fine-tune patched models on KL(stock ‖ patched) of the next-token distributions, the "
                               "stock model's logits as the target, instead of the LM loss (stock runs keep the LM loss)")


GROUPS = (ModelDataArguments, ComparisonArguments, TrainArguments, EvaluationArguments, RecoveryArguments,
          AdapterHubArguments)


@dataclass
class FinetuneArguments(AdapterHubArguments, RecoveryArguments, EvaluationArguments, TrainArguments,
                        ComparisonArguments, ModelDataArguments):
    """Every setting of a comparison, as one typed object: drivers (study.py) derive a run's settings from it with
    `dataclasses.replace`. Its fields are those of the groups above, in their order."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows every default."""


def argument_parser(description: str | None = __doc__, allow_abbrev: bool = True) -> HfArgumentParser:
    """The command line of finetune.py: one flag per field of the groups, grouped in --help."""
    return HfArgumentParser(GROUPS, description=description, formatter_class=HelpFormatter, allow_abbrev=allow_abbrev)


def parse_args(argv: list[str] | None = None, allow_abbrev: bool = True) -> FinetuneArguments:
    """The command line (argv, or sys.argv) as FinetuneArguments; unknown flags are argparse's usual error."""
    return FinetuneArguments(**vars(argument_parser(allow_abbrev=allow_abbrev).parse_args(argv)))


def patch_kwargs(mode: str, args: FinetuneArguments | None = None) -> tuple[str, dict]:
    """A --modes mode ('covariance+values', 'latent', ...) -> (patch_model mode, extra patch_model kwargs); with
    `args`, a latent mode also takes the given --rope_pairs / --rope_selection (validate allows them on rotary models
    only)."""
    base, _, extra = mode.partition("+")
    kwargs = {"values": "merged"} if extra == "values" else {}
    if args is not None and base == "latent":
        kwargs.update({k: getattr(args, k) for k in ("rope_pairs", "rope_selection", "rope")
                       if getattr(args, k) is not None})
    return base, kwargs


def uses_calibration(args: FinetuneArguments, mode: str) -> bool:
    """Whether patching for `mode` reads calibration batches: --init whitened (lowrank, latent), or a rope selection
    that ranks the rotary pairs on data (2norm, the default when pairs are dropped, and rorope)."""
    base, kwargs = patch_kwargs(mode, args)
    if base not in RANKED:
        return False
    return args.init == "whitened" or PatchConfig(base, 1, **kwargs).rope_needs_calibration()


def parse_modes(text: str, default_rank: int, default_latent_rank: int) -> list[tuple[str, str, int | float | None]]:
    """'stock,covariance,covariance+values,lowrank:16,lowrank:0.9,latent:128' -> [(label, mode, rank)]; errors name
    the bad entry.

    After "lowrank:" / "latent:", digits are a rank, and a number with a "." or an exponent is a spectral-energy
    target (checked to lie in (0, 1) by PatchConfig in `validate`); the label keeps the text as typed.
    "covariance+values" is covariance with merged values (keys and values one cached tensor).
    """
    allowed = ("allowed: stock, covariance, covariance+values, lowrank, lowrank:R (a rank) or lowrank:E (an energy in "
               "(0, 1)), latent, latent:R or latent:E, e.g. --modes stock,covariance+values,lowrank:16,latent:128.")
    modes = []
    for item in [m.strip() for m in text.split(",") if m.strip()]:
        name, _, rank_text = item.partition(":")
        mode, plus, extra = name.partition("+")
        if mode not in MODES or (rank_text and mode not in RANKED) or (plus and (mode, extra) != ("covariance", "values")):
            raise ValueError(f"--modes entry {item!r} is not a mode; {allowed}")
        rank, label = None, name
        if mode in RANKED and rank_text.isdigit():
            rank, label = int(rank_text), f"{mode}-r{int(rank_text)}"
        elif mode in RANKED and rank_text:
            try:
                rank, label = float(rank_text), f"{mode}-e{rank_text}"
            except ValueError:
                raise ValueError(
                    f"--modes entry {item!r}: after ':' give an integer rank ({mode}:16) or a spectral-energy "
                    f"fraction in (0, 1) ({mode}:0.9: the smallest rank per block keeping 90% of the energy)."
                ) from None
        elif mode in RANKED:
            rank = default_rank if mode == "lowrank" else default_latent_rank
            label = f"{mode}-r{rank}"
        modes.append((label, name, rank))
    labels = [label for label, _, _ in modes]
    if len(set(labels)) < len(labels):
        raise ValueError(f"--modes {text!r} names a mode twice ({labels}); give each once.")
    if not modes:
        raise ValueError("--modes is empty; give at least one of stock, covariance, lowrank.")
    return modes


def validate(args: FinetuneArguments) -> tuple[list, AutoConfig]:
    """Check every argument that can be checked before loading data or models; returns (modes, model config)."""
    if not args.dataset_name:
        for flag, path in (("--train_file", args.train_file), ("--validation_file", args.validation_file)):
            check_data_file(flag, path)
    for flag in ("max_train_steps", "seeds", "per_device_train_batch_size", "gradient_accumulation_steps", "block_size",
                 "calibration_samples", "recover_samples", "recover_batch_size"):
        if getattr(args, flag) < (0 if flag == "max_train_steps" else 1):
            raise ValueError(f"--{flag} {getattr(args, flag)} must be >= {0 if flag == 'max_train_steps' else 1}.")
    if args.recover_steps < 0 or args.recover_learning_rate <= 0:
        raise ValueError(f"--recover_steps {args.recover_steps} must be >= 0 (0: no layer-wise recovery) and "
                         f"--recover_learning_rate {args.recover_learning_rate} > 0.")
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    spec = causal_lm_spec(config, args.model_name_or_path)
    positions = getattr(config, "max_position_embeddings", None)  # None: no learned positions (BLOOM's ALiBi)
    if positions is not None and args.block_size > positions:
        raise ValueError(
            f"--block_size {args.block_size} is larger than the model's context ({positions} positions "
            f"in {args.model_name_or_path}). Use --block_size {positions} or less."
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    modes = parse_modes(args.modes, args.rank if args.rank is not None else head_dim // 2, config.hidden_size // 4)
    check_rotary(args, spec, modes, head_dim)
    for _, mode, rank in modes:
        if mode != "stock":
            base, extra = patch_kwargs(mode, args)
            PatchConfig(base, rank, **extra).check_against(config.hidden_size, config.num_hidden_layers)
    resume = args.resume_from_checkpoint
    if resume and resume != "latest":
        if not Path(resume).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {resume!r} is not a folder; pass a step_N folder or 'latest'.")
        if len(modes) * args.seeds != 1:
            raise ValueError("--resume_from_checkpoint with a folder needs a single mode and seed; use 'latest' for several.")
    for label, _, _ in modes:  # every run's checkpoint, checked before any work
        for seed in range(args.seed, args.seed + args.seeds):
            resume_point(args, run_dir_of(args, label, seed))
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. you/my-model-merged).")
    return modes, config


def check_rotary(args, spec, modes, head_dim: int) -> None:
    """A rotary model takes stock and latent (integer r_c) only, and --rope_pairs <= hd/2; other models take no rope
    setting. Errors say what to pass instead."""
    rope = [f"--{k} {getattr(args, k)}" for k in ("rope_pairs", "rope_selection", "rope")
            if getattr(args, k) is not None]
    name = f"--model_name_or_path {args.model_name_or_path!r}"
    if not spec.rotary:
        if rope:
            raise ValueError(f"{' / '.join(rope)}: {name} is a {spec.family} model, whose positions are not rotary: "
                             "there is no rotation to keep. Drop them (they apply to Llama, Qwen2 and Mistral).")
        return
    for label, mode, rank in modes:
        if mode not in ("stock", "latent"):
            raise ValueError(
                f"--modes entry {mode!r} cannot run on {name}, a {spec.family} model: its positions are rotary, and the "
                "rotation between Wq and Wk makes Wq·Wkᵀ a different matrix at every offset (no covariance or lowrank "
                "S_h), while merged values would cache more than its grouped-query attention does. Use the latent: "
                "--modes stock,latent:R (R = r_c) with --rope_pairs r (rotary pairs kept per KV head) and "
                "--rope_selection, e.g. --modes stock,latent:96 --rope_pairs 4.")
        if isinstance(rank, float):
            raise ValueError(f"--modes entry {label!r}: a spectral-energy target is not available on rotary models "
                             "yet; give an integer r_c, e.g. latent:96.")
    if rope and not any(mode == "latent" for _, mode, _ in modes):
        raise ValueError(f"{' / '.join(rope)}: the rotary settings apply to latent modes, and --modes {args.modes!r} "
                         "has none; add one (e.g. latent:96) or drop them.")
    if args.rope_pairs is not None and not 0 <= args.rope_pairs <= head_dim // 2:
        raise ValueError(f"--rope_pairs {args.rope_pairs}: a head of {head_dim} has {head_dim // 2} frequency pairs; "
                         f"use 0 <= --rope_pairs <= {head_dim // 2} ({head_dim // 2} keeps every pair rotated: exact).")


def causal_lm_spec(config, name: str):
    """The registry entry of the model's family; a ValueError unless it is a registered causal (decoder) family."""
    model_type = getattr(config, "model_type", None)
    spec = REGISTRY.get(model_type)
    causal = [f"{s.family} ({', '.join(s.model_types)})" for s in SPECS if s.causal]
    if spec is not None and spec.causal:
        return spec
    also = ""
    if spec is not None:
        why = f"an encoder ({spec.family}: bidirectional attention, no causal LM head)"
        also = " (an encoder can be patched with hf_merged_attn.patch_model directly)"
    elif model_type in ROTARY_MODEL_TYPES:
        why = ("a rotary-position model of a family without an adapter here (the rotary families Llama, Qwen2 and "
               "Mistral take the latent mode)")
    else:
        why = "not a family hf_merged_attn can patch"
    raise ValueError(
        f"--model_name_or_path {name!r} is a {model_type!r} model, {why}. This comparison fine-tunes causal language "
        f"models of the families: {', '.join(causal)}. Pass a checkpoint of one of them, e.g. gpt2, "
        f"facebook/opt-125m, bigscience/bloom-560m or HuggingFaceTB/SmolLM2-135M{also}."
    )


# ---------------------------------------------------------------- one run


def build_model(args, mode: str, rank: int | None, calibration=None):
    """A fresh pretrained model, patched for `mode` (lowrank: seeded by --init), with LoRA adapters if --lora."""
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    base, extra = patch_kwargs(mode, args)
    if base in RANKED and args.init == "whitened":
        patch_model(model, base, rank=rank, init="whitened", calibration=calibration, **extra)
    elif mode != "stock":  # calibration: for a rope selection that reads data (uses_calibration), else None
        patch_model(model, base, rank=rank, calibration=calibration, **extra)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if args.lora:
        from peft import LoraConfig, get_peft_model

        # like for like: the stock q/k/v projections of the family (GPT-2's fused c_attn, OPT's q_proj/k_proj/v_proj,
        # BLOOM's query_key_value) vs the patched q_proj / k_proj (lowrank) / v_proj, the latent's projections and a
        # rotary latent's k_rope (its rotary keys)
        patched = ("q_proj", "k_proj", "v_proj", "k_rope", "latent_proj", "k_up", "v_up")  # those the mode has
        names = REGISTRY[model.config.model_type].qkv_names if mode == "stock" else patched
        found = {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules()}
        targets = [t for t in names if t in found]  # lowrank has a k_proj, covariance none
        config = LoraConfig(  # transformers' Conv1D (GPT-2) stores its weight (in, out): peft must transpose it
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets,
            fan_in_fan_out=any(isinstance(found[t], Conv1D) for t in targets), task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    return model


def _ranks_per_block(model) -> dict[str, int] | None:
    """{block: rank} of a lowrank model patched with a per-block rank (e.g. an energy target), else None."""
    rank = (getattr(model.config, "merged_attn", None) or {}).get("rank")
    return rank if isinstance(rank, dict) else None


def _rope_settings(model) -> dict:
    """{"rope", "rope_pairs", "rope_selection"} as the patch resolved them on a rotary model (None on others, stock)."""
    record = getattr(model.config, "merged_attn", None) or {}
    return {key: record.get(key) for key in ("rope", "rope_pairs", "rope_selection")}


def eval_loss(model, stream, args, max_tokens=None, reference=None) -> dict:
    """Held-out perplexity (and, with a reference model, the KL to its next-token distributions)."""
    ids = stream[:max_tokens] if max_tokens else stream
    return evaluate_perplexity(
        model, ids, max_length=args.block_size, stride=args.eval_stride or args.block_size // 2,
        batch_size=args.per_device_eval_batch_size, reference=reference,
    )


def evenly_spaced_train_blocks(train_data, count: int) -> torch.Tensor:
    """min(count, all) train blocks spread evenly over the training set: (N, block_size) input ids."""
    n = min(count, len(train_data))
    return train_data[[i * len(train_data) // n for i in range(n)]]["input_ids"]


def run_dir_of(args, label: str, seed: int) -> Path:
    return Path(args.output_dir) / f"{label}-seed{seed}"


def run_one(args, accelerator, label, mode, rank, seed, train_data, stream, repo_suffix="") -> dict:
    """Patch, evaluate, fine-tune and evaluate one (mode, seed); returns its record (main process)."""
    set_seed(seed)
    run_dir = run_dir_of(args, label, seed)
    calibration = None
    if uses_calibration(args, mode):  # the same evenly spaced train blocks for every run
        calibration = evenly_spaced_train_blocks(train_data, args.calibration_samples).split(4)
    model = build_model(args, mode, rank, calibration)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the stock model a patched one is recovered towards: layer-wise targets, distillation's teacher, the eval's KL
    reference = None
    if mode != "stock" and (args.recover_steps or args.distill):
        reference = AutoModelForCausalLM.from_pretrained(args.model_name_or_path).to(accelerator.device).eval()
        reference.requires_grad_(False)
    at_patch = eval_loss(model, stream, args, reference=reference) if accelerator.is_main_process else None
    recovered = None
    if mode != "stock" and args.recover_steps:
        blocks = evenly_spaced_train_blocks(train_data, args.recover_samples).split(args.recover_batch_size)
        start = time.perf_counter()
        layers = recover_layerwise(model.to(accelerator.device), reference, blocks,
                                   steps=args.recover_steps, learning_rate=args.recover_learning_rate,
                                   inputs=args.recover_inputs, seed=seed,
                                   show_progress=accelerator.is_local_main_process)
        recovered = {"seconds": time.perf_counter() - start, "layers": layers}
        if accelerator.is_main_process:
            recovered.update(eval_loss(model, stream, args, reference=reference))
    sampler = EpochSampler(len(train_data), seed)
    # its own generator: starting an epoch then draws no number from the global RNG, so dropout masks after a
    # resume (whose iterator starts after the RNG state is restored) match the uninterrupted run
    loader = DataLoader(train_data, batch_size=args.per_device_train_batch_size, sampler=sampler,
                        collate_fn=default_data_collator, drop_last=True, generator=torch.Generator().manual_seed(seed))
    norms = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) for p in m.parameters()}
    params = [(p, n.endswith("bias") or id(p) in norms) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for p, exempt in params if not exempt]  # biases and norm weights: no weight decay
    no_decay = [p for p, exempt in params if exempt]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
    )
    # a prepared scheduler steps once per process at every optimizer step (accelerate, split_batches=False): its
    # length is counted in those steps, as in run_clm_no_trainer, so every world size sees the same rate per step
    processes = accelerator.num_processes
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                              num_warmup_steps=args.num_warmup_steps * processes,
                              num_training_steps=args.max_train_steps * processes)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    # sharded (FSDP, ZeRO-3): every forward pass gathers the shards, so every rank evaluates; else the main one only
    evaluates = accelerator.is_main_process or is_sharded(accelerator)
    held = accelerator.gather_for_metrics([local_parameter_count(model)], use_gather_object=True)
    accumulation = accelerator.gradient_accumulation_steps  # a DeepSpeed config's value wins over the flag
    tokens_per_step = args.per_device_train_batch_size * args.block_size * accumulation * accelerator.num_processes

    step, history = 0, {"train": [], "eval": []}
    resume_dir, skipped = resume_point(args, run_dir)
    if skipped:
        accelerator.print(f"[{label} seed {seed}] skipped incomplete checkpoints {skipped} (writing interrupted)")
    if resume_dir is not None:
        history, step = load_checkpoint(accelerator, resume_dir), checkpoint_step(resume_dir)
        newest = " (the newest complete checkpoint)" if args.resume_from_checkpoint == "latest" else ""
        accelerator.print(f"[{label} seed {seed}] resumed from {resume_dir}{newest} at step {step}")
    elif args.resume_from_checkpoint:
        accelerator.print(f"[{label} seed {seed}] no complete checkpoint in {run_dir}: training from step 0")
    if resume_dir is None and evaluates:
        curve = eval_loss(accelerator.unwrap_model(model), stream, args, args.curve_eval_tokens)
        history["eval"].append({"step": 0, "tokens": 0, "loss": curve["loss"]})

    micro_done = step * accumulation
    epoch, offset = divmod(micro_done, len(loader))
    first_batch_hash = None
    train_time, timed_steps, running = 0.0, 0, []  # the run's first step is warm-up and is not timed
    warmup_step = step + 1
    progress = tqdm(total=args.max_train_steps, initial=step, desc=f"{label} seed {seed}",
                    disable=not accelerator.is_local_main_process)
    model.train()
    with PeakMemory(accelerator.device) as memory:
        while step < args.max_train_steps:
            sampler.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, offset) if offset else loader
            offset = 0
            for batch in batches:
                if first_batch_hash is None:
                    first_batch_hash = hashlib.sha1(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()[:12]
                start = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]  # the learning rate of this optimizer step
                with accelerator.accumulate(model):
                    if args.distill and reference is not None:  # KL(stock ‖ patched) per token, the teacher frozen
                        loss = distillation_loss(model, reference, batch["input_ids"])
                    else:
                        loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                if step + 1 > warmup_step:
                    train_time += time.perf_counter() - start
                running.append(accelerator.reduce(loss.detach(), "mean").item())
                if not accelerator.sync_gradients:
                    continue
                step += 1
                timed_steps += step > warmup_step
                history["train"].append({"step": step, "tokens": step * tokens_per_step, "loss": sum(running) / len(running),
                                         "lr": lr})
                running = []
                progress.update(1)
                progress.set_postfix(loss=f"{history['train'][-1]['loss']:.3f}")
                if evaluates and (step % args.eval_steps == 0 or step == args.max_train_steps):
                    curve = eval_loss(accelerator.unwrap_model(model), stream, args, args.curve_eval_tokens)
                    history["eval"].append({"step": step, "tokens": step * tokens_per_step, "loss": curve["loss"]})
                    model.train()
                if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, run_dir, step, history)
                if step >= args.max_train_steps:
                    break
            epoch += 1
    progress.close()
    hashes = accelerator.gather_for_metrics([first_batch_hash], use_gather_object=True)
    unwrapped = accelerator.unwrap_model(model)
    record = None
    if evaluates:
        after = eval_loss(unwrapped, stream, args, reference=reference)
        cache_bytes = kv_cache_bytes_per_token(unwrapped)  # measured on the cache object of a short generate()
        probe = stream[: args.block_size][None].to(accelerator.device)
        with torch.no_grad():
            unwrapped.eval()
            in_memory = unwrapped(input_ids=probe).logits.float().cpu()  # what the saved model must reproduce
    saving = seed == args.seed
    # the full state dict, gathered from the shards onto the main process (a collective: every rank calls it)
    state_dict = accelerator.get_state_dict(model) if saving and is_sharded(accelerator) else None
    if accelerator.is_main_process:
        record = {
            "label": label, "mode": mode, "rank": rank, "seed": seed,
            "ranks_per_block": _ranks_per_block(unwrapped), **_rope_settings(unwrapped),
            "total_params": total, "trainable_params": trainable, "kv_cache_bytes_per_token": cache_bytes,
            "perplexity_at_patch": at_patch["perplexity"], "perplexity_after": after["perplexity"],
            "kl_at_patch": at_patch.get("kl_to_reference"), "kl_after": after.get("kl_to_reference"),
            "perplexity_after_recovery": recovered and recovered["perplexity"],
            "kl_after_recovery": recovered and recovered["kl_to_reference"],
            "recover_time_s": recovered and recovered["seconds"], "recover_layers": recovered and recovered["layers"],
            "distilled": bool(args.distill and reference is not None),
            "eval_tokens": after["tokens"], "train_steps": step, "train_tokens": step * tokens_per_step,
            "tokens_per_s": timed_steps * tokens_per_step / train_time if train_time else None,
            "peak_memory_mb": memory.peak_mb, "train_time_s": train_time,
            "final_train_loss": history["train"][-1]["loss"] if history["train"] else None,
            "first_batch_hash_per_rank": hashes, "parameters_held_per_rank": held,
            "resumed_from": resume_dir and str(resume_dir), "history": history,
        }
        if saving:
            save_run(args, unwrapped, mode, label, record, run_dir, repo_suffix, state_dict)
            del state_dict  # the gathered copy: not held beside the reloaded one
            if not args.lora:
                record["reload_max_abs_diff"] = check_reload(Path(record["saved_to"]), probe, in_memory, accelerator)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return record


def save_run(args, model, mode, label, record, run_dir: Path, repo_suffix: str, state_dict=None) -> None:
    """Save the fine-tuned model (or its LoRA adapters) and push patched ones if asked.

    state_dict: the gathered full state dict of a sharded model (its parameters in memory are shards).
    """
    target = run_dir / ("adapter" if args.lora else "model")
    model.save_pretrained(target, **({"state_dict": state_dict} if state_dict is not None else {}))
    AutoTokenizer.from_pretrained(args.model_name_or_path).save_pretrained(target)  # a folder others can load alone
    record["saved_to"] = str(target)
    if args.push_to_hub and mode != "stock":
        to_push = model.merge_and_unload() if args.lora else model
        results = {
            "perplexity at patch": f"{record['perplexity_at_patch']:.2f}",
            "perplexity after fine-tuning": f"{record['perplexity_after']:.2f}",
            "train tokens": record["train_tokens"], "data": args.dataset_name or Path(args.train_file).name,
        }
        to_push.push_to_hub(args.hub_model_id + repo_suffix, token=args.hub_token, results=results)


def check_reload(folder: Path, probe: torch.Tensor, in_memory: torch.Tensor, accelerator) -> float | None:
    """Max |logit difference| between the saved model, loaded back onto the training device, and the fine-tuned
    model in memory; warns loudly when they differ beyond round-off (the run's results are still written).

    None under mixed precision, where the model in memory computes in half precision and the reloaded one in fp32.
    """
    if accelerator.mixed_precision != "no":
        return None
    reloaded = AutoModelForCausalLM.from_pretrained(folder).to(accelerator.device).eval()
    with torch.no_grad():
        diff = (reloaded(input_ids=probe).logits.float().cpu() - in_memory).abs().max().item()
    del reloaded
    # the same fp32 weights through the same kernels: equal up to a summation order (sharded vs whole forward),
    # ~1e-7 of the logits' scale; 1e-5 of it is far below any trained change
    scale = in_memory.abs().max().item()
    if diff > 1e-5 * max(scale, 1.0):
        warnings.warn(
            f"{folder} loads back with logits up to {diff:.3g} away from the fine-tuned model in memory (logits up to "
            f"{scale:.3g}): the checkpoint may not hold what was trained. Please report this with the command you ran.",
            stacklevel=2,
        )
    return diff


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    modes, config = validate(args)  # before any long work
    accelerator = make_accelerator(args, causal_lm_spec(config, args.model_name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    train_data, stream = load_lm_data(args, tokenizer, accelerator)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.print(
        f"{len(train_data)} train blocks of {args.block_size}; {stream.numel()} validation tokens; "
        f"modes {[m[0] for m in modes]}; {args.seeds} seed(s); {accelerator.num_processes} process(es)"
    )
    stock_before = None
    if accelerator.is_main_process:
        stock_before = eval_loss(AutoModelForCausalLM.from_pretrained(args.model_name_or_path), stream, args)["perplexity"]
        accelerator.print(f"stock perplexity before fine-tuning: {stock_before:.3f}")
    records = []
    start = time.time()
    several_patched = sum(mode != "stock" for _, mode, _ in modes) > 1  # then push each to <hub_model_id>-<mode>
    for seed in range(args.seed, args.seed + args.seeds):
        for label, mode, rank in modes:
            suffix = f"-{label}" if several_patched else ""
            record = run_one(args, accelerator, label, mode, rank, seed, train_data, stream, suffix)
            if record:
                accelerator.print(
                    f"[{label} seed {seed}] ppl before {stock_before:.3f} | at patch {record['perplexity_at_patch']:.3f}"
                    f" | after {record['perplexity_after']:.3f} | {fmt(record['tokens_per_s'], '.0f')} tokens/s"
                )
                records.append(record)
    if not accelerator.is_main_process:
        return None
    summary = summarize(records, stock_before)
    for e in summary.values():
        e["eval_tokens"] = records[0]["eval_tokens"]
    table = markdown_table(summary, args, accelerator.num_processes, accelerator.gradient_accumulation_steps)
    results = {
        "args": recorded_args(args), "world_size": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision, "torch": torch.__version__,
        "fsdp_wrapped_blocks": (accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap
                                if accelerator.distributed_type == DistributedType.FSDP else None),
        "wall_time_s": time.time() - start,
        "perplexity_before": stock_before, "summary": summary, "runs": records,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    (output_dir / "results.md").write_text(table)
    plot_curves(records, output_dir / "loss_curves.png")
    accelerator.print("\n" + table)
    accelerator.print(f"wrote {output_dir}/results.json, results.md, loss_curves.png in {time.time() - start:.0f} s")
    gc.collect()  # DDP wrappers left in reference cycles go now, not after the process group (see pretrain.py's end)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
