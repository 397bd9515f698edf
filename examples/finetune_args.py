"""The arguments of examples/finetune.py: run_clm_no_trainer's names plus the comparison's (--modes, --seeds, --init,
the rotary route, recovery, LoRA), parsed by transformers' HfArgumentParser and checked before any work.

`parse_args` and `validate` are what the other example scripts (study.py, recover.py, rank_sweep.py) call to set up
their finetune.py runs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import AutoConfig, HfArgumentParser

from hf_merged_attn import PatchConfig
from hf_merged_attn.registry import REGISTRY, ROTARY_MODEL_TYPES, SPECS
from checkpoints import resume_point
from lm_data import check_data_file

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


def run_dir_of(args, label: str, seed: int) -> Path:
    return Path(args.output_dir) / f"{label}-seed{seed}"
