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

import gc
import hashlib
import json
import time
import warnings
from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator, get_scheduler
from transformers.pytorch_utils import Conv1D

from hf_merged_attn import patch_model
from hf_merged_attn.evaluation import evaluate_perplexity, kv_cache_bytes_per_token
from hf_merged_attn.recovery import distillation_loss, recover_layerwise
from hf_merged_attn.registry import REGISTRY
from checkpoints import checkpoint_step, load_checkpoint, resume_point, save_checkpoint
from lm_data import EpochSampler, load_lm_data
from processes import PeakMemory, is_sharded, local_parameter_count, make_accelerator
from reporting import fmt, markdown_table, plot_curves, summarize
from run_record import recorded_args  # examples/ is on sys.path when a script runs

# the arguments (and their checks) live beside this file; names re-exported for the scripts that import them from here
from finetune_args import (  # noqa: F401
    DEFAULT_DATA,
    DEFAULT_MODEL,
    HERE,
    MODES,
    RANKED,
    FinetuneArguments,
    HelpFormatter,
    arg,
    argument_parser,
    causal_lm_spec,
    check_rotary,
    parse_args,
    parse_modes,
    patch_kwargs,
    run_dir_of,
    uses_calibration,
    validate,
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
