#!/usr/bin/env python
"""Does the whitened init's advantage at patch hold on held-out data? svd vs whitened on validation AND test.

    python examples/init_splits.py --output_dir docs        # ~6 min on an idle 2-core CPU

The shipped stand-in right after patching (no fine-tune), lowrank at r per head and latent at r_c per layer, seeded
by svd (weights only) and by whitened (calibrated on 16 blocks of 256 training tokens). The whitened seed depends on
which blocks it saw: it is drawn --draws times (16 evenly spaced blocks, all shifted by k/draws of their spacing for
draw k: disjoint sets), so the
spread of its perplexity is visible beside the deterministic svd one. Perplexity on the first --eval_tokens tokens of
the validation and of the test split (windows of 256, stride 256). Writes init_splits.json and init_splits.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_merged_attn import patch_model
from hf_merged_attn.evaluation import evaluate_perplexity
from run_record import recorded_args  # noqa: E402 (examples/ is on sys.path when a script runs)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cache_sweep import split_tokens  # noqa: E402
from rank_sweep import machine  # noqa: E402

SPLITS = ("validation", "test")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=str(HERE / "shakespeare-gpt2"))
    p.add_argument("--data_dir", default=str(HERE / "data" / "shakespeare"))
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 16], help="lowrank ranks per head")
    p.add_argument("--latent_ranks", type=int, nargs="+", default=[32, 64, 128], help="latent ranks per layer")
    p.add_argument("--draws", type=int, default=3, help="calibration sets for the whitened seed")
    p.add_argument("--eval_tokens", type=int, default=16384)
    p.add_argument("--output_dir", default="runs/init_splits")
    args = p.parse_args(argv)
    if args.draws < 1 or args.eval_tokens < 257:
        raise ValueError(f"--draws must be >= 1 and --eval_tokens > 256; got {args.draws}, {args.eval_tokens}.")
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    stock = AutoModelForCausalLM.from_pretrained(args.model_name_or_path).eval()

    held_out = {split: split_tokens(tokenizer, args.data_dir, split)[: args.eval_tokens] for split in SPLITS}
    train = split_tokens(tokenizer, args.data_dir, "train")
    step = len(train) // 16  # draw k: block i starts at i*step + k*step/draws (disjoint for step >= draws * 256)
    if step < args.draws * 256:
        raise ValueError(f"the training split ({len(train)} tokens) is too short for {args.draws} disjoint draws of 16 "
                         "blocks of 256 tokens; pass fewer --draws.")
    draws = [torch.stack([train[i * step + k * step // args.draws:][:256] for i in range(16)]).split(4)
             for k in range(args.draws)]

    def perplexities(model) -> dict:
        return {s: evaluate_perplexity(model, held_out[s], max_length=256, stride=256)["perplexity"] for s in SPLITS}

    rows = [{"label": "stock", "mode": "stock", "rank": None, "svd": perplexities(stock), "whitened": []}]
    for mode, ranks in (("lowrank", args.ranks), ("latent", args.latent_ranks)):
        for rank in ranks:
            row = {"label": f"{mode} {'r' if mode == 'lowrank' else 'r_c'}={rank}", "mode": mode, "rank": rank,
                   "svd": perplexities(patch_model(copy.deepcopy(stock), mode, rank=rank)), "whitened": []}
            for calibration in draws:
                model = patch_model(copy.deepcopy(stock), mode, rank=rank, init="whitened", calibration=calibration)
                row["whitened"].append(perplexities(model))
            rows.append(row)
            print(row["label"], row["svd"], row["whitened"], flush=True)
    command = "python examples/init_splits.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = {"rows": rows, "args": recorded_args(args), "seconds": round(time.time() - start), "command": command,
              "machine": machine()}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "init_splits.json").write_text(json.dumps(result, indent=1))
    (out / "init_splits.md").write_text(report(rows, args, result))
    return result


def report(rows: list[dict], args, result: dict) -> str:
    stock = rows[0]["svd"]
    lines = [
        "# svd vs whitened seeding, at patch, on the validation and the test split", "",
        f"`{result['command']}` ({result['seconds'] / 60:.1f} min; {result['machine']}). The shipped stand-in "
        f"right after patching; perplexity on the first {args.eval_tokens:,} tokens of each split (windows of 256, stride "
        f"256). whitened: {args.draws} calibration sets of 16 × 256 training tokens (mean ± std over them, and the "
        "range); svd is deterministic. Δ: perplexity minus stock's on the same split; better: the init ahead of every "
        "draw of the other (mixed: svd falls inside the whitened draws).", "",
        f"Stock: validation {stock['validation']:.3f}, test {stock['test']:.3f}.", "",
        "| configuration | split | svd Δ | whitened Δ (mean ± std) | whitened range | better |", "|---|---|---|---|---|---|",
    ]
    for row in rows[1:]:
        for split in SPLITS:
            svd = row["svd"][split] - stock[split]
            white = [w[split] - stock[split] for w in row["whitened"]]
            mean = statistics.fmean(white)
            std = statistics.stdev(white) if len(white) > 1 else 0.0
            better = "whitened" if max(white) < svd else "svd" if min(white) > svd else "mixed (within the draws)"
            lines.append(f"| {row['label']} | {split} | {svd:+.3f} | {mean:+.3f} ± {std:.3f} | {min(white):+.3f} … "
                         f"{max(white):+.3f} | {better} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
