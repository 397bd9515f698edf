"""Patch a GPT-2 in place and show that it computes what the stock model computes.

    python examples/quickstart.py                                  # the shipped stand-in model (offline)
    python examples/quickstart.py --model_name_or_path gpt2        # real GPT-2 (needs the Hub)
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_merged_attn import patch_model

DEFAULT_MODEL = Path(__file__).resolve().parent / "shakespeare-gpt2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=str(DEFAULT_MODEL), help="hub id or local folder")
    parser.add_argument("--prompt", default="To be, or not to be")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    stock = AutoModelForCausalLM.from_pretrained(args.model_name_or_path).eval()
    batch = tokenizer([args.prompt], return_tensors="pt")
    n_stock = sum(p.numel() for p in stock.parameters())
    head_dim = stock.config.n_embd // stock.config.n_head
    print(f"{args.model_name_or_path}: {n_stock / 1e6:.2f}M parameters, head size {head_dim}")
    with torch.no_grad():
        reference = stock(**batch).logits
        for mode, rank in [("covariance", None), ("lowrank", head_dim), ("lowrank", head_dim // 2)]:
            model = patch_model(copy.deepcopy(stock), mode, rank=rank)
            diff = (model(**batch).logits - reference).abs().max().item()
            n = sum(p.numel() for p in model.parameters())
            label = mode if rank is None else f"{mode} r={rank}"
            print(f"  {label:<16} {n / 1e6:7.2f}M parameters   max |logit - stock| = {diff:.2e}")
        generated = model.generate(**batch, max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    print(f"  greedy text from the lowrank r={head_dim // 2} model: {tokenizer.decode(generated[0])!r}")


if __name__ == "__main__":
    main()
