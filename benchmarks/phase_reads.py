"""How often a generated token reads a static cache's length on the host: stock GPT-2 vs patched modes (#27).

    python benchmarks/phase_reads.py                 # 12 blocks, 20 generated tokens
    python benchmarks/phase_reads.py --layers 24 --tokens 50

A static layer's length is a device tensor; reading it as a Python number (int, bool, item, ...) is a device-to-host
sync on a GPU. Each merged layer needs its phase (prefill or decode); before #27 every layer read its own length in
every eager step (one sync per layer per token), now the first merged layer of a forward reads it and the others take
its phase. Counted here on the CPU by wrapping the tensor methods that read a value, for the length tensors of the
cache only, over `generate(past_key_values=StaticCache(...))` with a tiny random GPT-2 of --layers blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, StaticCache

from hf_merged_attn import patch_model

transformers.logging.set_verbosity_error()
READS = ("__int__", "__bool__", "__index__", "__float__", "item", "tolist")  # what turns a tensor into Python values


@contextlib.contextmanager
def counting_reads(watched: list, reads: list):
    """Within the block, every host read of a tensor in `watched` (by identity) appends the method's name to `reads`."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, original):
        def read(self, *args):
            if any(self is tensor for tensor in watched):
                reads.append(name)
            return original(self, *args)
        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def reads_per_token(model, tokens: int, prompt: int = 8) -> float:
    """Host reads of the static cache's lengths per generated token (greedy, batch 2)."""
    ids = torch.randint(1, model.config.vocab_size, (2, prompt))
    cache = StaticCache(config=model.config, max_cache_len=prompt + tokens + 1)
    lengths = [layer.cumulative_length for layer in cache.layers]  # created with the cache, updated in place
    reads = []
    with counting_reads(lengths, reads), torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=tokens,
                       min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return len(reads) / tokens


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=20)
    args = parser.parse_args(argv)
    if min(args.layers, args.tokens) < 1:
        parser.error("--layers and --tokens must be positive integers")
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_head=4, n_layer=args.layers, vocab_size=101, n_positions=args.tokens + 16,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    stock = GPT2LMHeadModel(config).eval()
    models = {"stock": stock, "latent": patch_model(copy.deepcopy(stock), "latent", rank=16),
              "covariance": patch_model(copy.deepcopy(stock), "covariance")}
    counts = {name: reads_per_token(model, args.tokens) for name, model in models.items()}
    for name, count in counts.items():
        print(f"{name}: {count:.2f} host reads of the static length per generated token ({args.layers} blocks)")
    return counts


if __name__ == "__main__":
    main()
