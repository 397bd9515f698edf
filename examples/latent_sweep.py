"""Perplexity of the shipped stand-in at patch (no fine-tune) for the latent mode over r_c, svd vs whitened seeding.

    python examples/latent_sweep.py --output_dir docs

Validation split, first 16,384 tokens, windows of 256 with stride 256 (the settings of MATH.md's reference
figures); whitened calibration on 16 evenly spaced 256-token blocks of the training split. Writes
latent_sweep.json to --output_dir and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_merged_attn import patch_model
from hf_merged_attn.calibration import evenly_spaced_blocks
from hf_merged_attn.evaluation import evaluate_perplexity

HERE = Path(__file__).resolve().parent


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=str(HERE / "shakespeare-gpt2"))
    p.add_argument("--data_dir", default=str(HERE / "data" / "shakespeare"))
    p.add_argument("--ranks", type=int, nargs="+", default=[256, 192, 128, 96, 64, 32])
    p.add_argument("--eval_tokens", type=int, default=16384)
    p.add_argument("--output_dir", default="runs/latent_sweep")
    args = p.parse_args(argv)
    if min(args.ranks) < 1 or args.eval_tokens < 257:
        raise ValueError(f"--ranks must be >= 1 and --eval_tokens > 256; got {args.ranks}, {args.eval_tokens}.")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    stock = AutoModelForCausalLM.from_pretrained(args.model_name_or_path).eval()

    def tokens(split: str) -> torch.Tensor:
        return torch.tensor(tokenizer((Path(args.data_dir) / f"{split}.txt").read_text(encoding="utf-8"))["input_ids"])

    held_out = tokens("validation")[: args.eval_tokens]
    calibration = list(evenly_spaced_blocks(tokens("train"), 16, 256).split(4))  # 4 batches of (4, 256)

    def perplexity(model) -> float:
        return evaluate_perplexity(model, held_out, max_length=256, stride=256)["perplexity"]

    results = {"stock": perplexity(stock), "latent": {}}
    print(f"| r_c | svd | whitened |\n|---|---|---|\n| stock | {results['stock']:.3f} | |")
    for rank in args.ranks:
        row = {}
        for init in ("svd", "whitened"):
            extra = {"calibration": calibration} if init == "whitened" else {}
            row[init] = perplexity(patch_model(copy.deepcopy(stock), "latent", rank=rank, init=init, **extra))
        results["latent"][rank] = row
        print(f"| {rank} | {row['svd']:.3f} | {row['whitened']:.3f} |", flush=True)
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latent_sweep.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
