#!/usr/bin/env python
"""Parameters and training-state memory of stock vs patched GPT-2 at the four published sizes (no weights needed).

    python benchmarks/memory.py            # prints the markdown table (the README's "Scale out" section shows part)

Every model is built on the meta device (shapes only, no memory) from its published config, patched classes from a
`merged_attn` record exactly as from_pretrained builds them, and its parameters counted. Training state: fp32
weights + gradients + AdamW's two moments = 16 bytes per parameter (activations come on top and depend on batch and
context). FSDP / ZeRO-3 over N ranks divide that state by N (plus the one gathered block being computed).
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_merged_attn import PatchConfig
from hf_merged_attn.modeling_merged_gpt2 import MergedGPT2Config, MergedGPT2LMHeadModel

SIZES = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}
BYTES_PER_PARAMETER = 16  # fp32 weight 4 + gradient 4 + AdamW exp_avg 4 + exp_avg_sq 4
MODES = {  # label -> patch_model arguments (hd: head size, d: hidden size)
    "covariance": lambda d, hd: dict(mode="covariance"),
    "covariance+values": lambda d, hd: dict(mode="covariance", values="merged"),
    "lowrank hd/2": lambda d, hd: dict(mode="lowrank", rank=hd // 2),
    "latent d/4": lambda d, hd: dict(mode="latent", rank=d // 4),
}


def count(d: int, layers: int, heads: int, patch: dict | None, vocab: int = 50257, positions: int = 1024) -> int:
    """Parameters of GPT-2 of this shape, stock (patch None) or patched with `patch` (patch_model's arguments)."""
    shape = dict(n_embd=d, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=positions)
    with torch.device("meta"):
        if patch is None:
            model = GPT2LMHeadModel(GPT2Config(**shape))
        else:
            config = MergedGPT2Config(**shape)
            config.merged_attn = {**PatchConfig(**patch, layers=list(range(layers))).to_dict(), "base_model": None}
            model = MergedGPT2LMHeadModel(config)
    return sum(p.numel() for p in model.parameters())


def table(ranks: int = 8) -> str:
    rows = ["| model (d, layers, heads) | mode | parameters | × stock | training state (fp32 + AdamW) | per rank, "
            f"FSDP over {ranks} |", "|---|---|---|---|---|---|"]
    for name, (d, layers, heads) in SIZES.items():
        stock = count(d, layers, heads, None)
        for label, make in {"stock": None, **MODES}.items():
            n = stock if make is None else count(d, layers, heads, make(d, d // heads))
            gb = n * BYTES_PER_PARAMETER / 1e9
            rows.append(f"| {name} ({d}, {layers}, {heads}) | {label} | {n / 1e6:,.0f}M | {n / stock:.2f} | "
                        f"{gb:,.1f} GB | {gb / ranks:,.2f} GB |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
