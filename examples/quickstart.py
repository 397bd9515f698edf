"""Patch a GPT-2 in place in each mode: exact or close to stock, and what its KV cache costs per token.

    python examples/quickstart.py                                  # the shipped stand-in model (offline, seconds)
    python examples/quickstart.py --model_name_or_path gpt2        # real GPT-2 (needs the Hub)
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_merged_attn import patch_model
from hf_merged_attn.evaluation import kv_cache_bytes_per_token

DEFAULT_MODEL = Path(__file__).resolve().parent / "shakespeare-gpt2"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=str(DEFAULT_MODEL), help="hub id or local folder")
    parser.add_argument("--prompt", default="To be, or not to be")
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    stock = AutoModelForCausalLM.from_pretrained(args.model_name_or_path).eval()
    batch = tokenizer([args.prompt], return_tensors="pt")
    d, heads = stock.config.n_embd, stock.config.n_head
    head_dim = d // heads
    print(f"{args.model_name_or_path}: {sum(p.numel() for p in stock.parameters()) / 1e6:.2f}M parameters, "
          f"d = {d}, {heads} heads of {head_dim}")
    modes = [  # (label, patch_model arguments): the exact modes, then the ones that shrink the cache
        ("stock", None),
        ("covariance", dict(mode="covariance")),
        ("covariance + merged values", dict(mode="covariance", values="merged")),
        (f"lowrank r={head_dim // 2}", dict(mode="lowrank", rank=head_dim // 2)),
        (f"latent r_c={d // 4}", dict(mode="latent", rank=d // 4)),
    ]
    print(f"  {'mode':<28}{'parameters':>12}{'max |logit - stock|':>22}{'KV cache B/token':>18}")
    with torch.no_grad():
        reference = stock(**batch).logits
        for label, kwargs in modes:
            model = stock if kwargs is None else patch_model(copy.deepcopy(stock), **kwargs)
            diff = (model(**batch).logits - reference).abs().max().item()
            n = sum(p.numel() for p in model.parameters())
            cache = kv_cache_bytes_per_token(model)  # measured on the cache generate() returns (fp32 here)
            print(f"  {label:<28}{n / 1e6:11.2f}M{diff:22.2e}{cache:18,.0f}")
        generated = model.generate(**batch, max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    print(f"  greedy text from the {label} model: {tokenizer.decode(generated[0])!r}")


if __name__ == "__main__":
    main()
