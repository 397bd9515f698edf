"""What LoRA on the latent's up-projections costs a decode step: the step of a latent model with LoRA on k_up and v_up
over the step of the same model without (#27).

    python benchmarks/adapter_decode.py                      # d = 768, 12 heads, 2 blocks, context 512, r_c 192 and 768
    python benchmarks/adapter_decode.py --batches 1 8 --threads 2

The absorbed decode multiplies by k_up's and v_up's weights instead of expanding the cached latent; an adapted one
(peft LoRA) is read as a linear map by probing it with r_c + 1 rows. Before #27 that probe ran in every layer of every
step; now the map is kept per adapter state. Measured with the defaults (1 thread of a shared 2-core CPU), LoRA on
k_up, v_up over the plain step, batch 1 / 8: before r_c = 192 1.48x / 1.20x, r_c = 768 4.23x / 1.90x; after
1.05x / 1.03x and 1.01x / 1.03x, beside 0.98-1.04x for LoRA on latent_proj (peft's own cost). GPT-2-small-shaped
random model (vocabulary 8192, fp32, sdpa), one prefilled DynamicCache per model cropped back after each repeat;
medians of interleaved repeats, rotating which model goes first, each after one untimed step. Prints one line per
(r_c, batch): ms per step of each model and the ratio to the plain step, beside a model with the same LoRA on
latent_proj instead (what peft's wrapper costs by itself); with --json, writes them there too.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, DynamicCache

from hf_merged_attn import patch_model
from run import stock_config  # benchmarks/run.py: the same family configs

transformers.logging.set_verbosity_error()


def decode_times(models: dict, batch: int, context: int, vocab: int, steps: int, repeats: int) -> dict[str, float]:
    """Median ms per decode step of each model (same prompt, each its own cache, interleaved repeats)."""
    prefix = torch.randint(0, vocab, (batch, context))
    token = torch.randint(0, vocab, (batch, 1))
    caches = {key: DynamicCache(config=model.config) for key, model in models.items()}
    times = {key: [] for key in models}
    with torch.no_grad():
        for key, model in models.items():
            model(prefix, past_key_values=caches[key], use_cache=True)

        def run(key: str, count: int) -> None:
            for _ in range(count):
                models[key](token, past_key_values=caches[key], use_cache=True)
            caches[key].crop(-count)  # back to the prefilled context

        for repeat in range(repeats):
            order = repeat % len(models)
            for key in list(models)[order:] + list(models)[:order]:  # rotate which model goes first
                run(key, 1)  # untimed: this model's weights back in the CPU caches
                start = time.perf_counter()
                run(key, steps)
                times[key].append((time.perf_counter() - start) / steps * 1e3)
    return {key: statistics.median(values) for key, values in times.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[192, 768], help="latent widths r_c")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per repeat")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if any(not 1 <= r <= args.hidden for r in args.ranks):
        parser.error(f"--ranks {args.ranks}: each r_c must be in 1 .. {args.hidden} (the hidden size)")
    if min(args.hidden, args.heads, args.layers, args.context, args.lora_rank, args.steps, args.repeats, args.threads,
           *args.batches) < 1 or args.hidden % args.heads:
        parser.error("sizes, counts and threads must be positive integers, and --hidden a multiple of --heads")

    torch.set_num_threads(args.threads)
    vocab = 8192
    rows = []
    for rank in args.ranks:
        torch.manual_seed(0)
        config = stock_config("gpt2", hidden=args.hidden, heads=args.heads, layers=args.layers, vocab=vocab,
                              positions=args.context + args.steps + 2)
        stock = AutoModelForCausalLM.from_config(config).eval()
        stock.set_attn_implementation("sdpa")
        plain = patch_model(stock, "latent", rank=rank)
        models = {"plain": plain}
        for name, targets in (("lora", ["k_up", "v_up"]), ("elsewhere", ["latent_proj"])):
            lora = LoraConfig(r=args.lora_rank, target_modules=targets, init_lora_weights=False)
            models[name] = get_peft_model(copy.deepcopy(plain), lora).eval()
        for batch in args.batches:
            ms = decode_times(models, batch, args.context, vocab, args.steps, args.repeats)
            row = {"rank": rank, "batch": batch, **{f"{key}_ms": value for key, value in ms.items()},
                   "ratio": ms["lora"] / ms["plain"], "elsewhere_ratio": ms["elsewhere"] / ms["plain"]}
            rows.append(row)
            print(f"r_c {rank}, batch {batch}, context {args.context}, {args.threads} thread(s): without LoRA "
                  f"{ms['plain']:.2f} ms/step; LoRA on k_up, v_up {ms['lora']:.2f} ms/step: {row['ratio']:.2f}x; "
                  f"(LoRA on latent_proj, for peft's own cost: {ms['elsewhere']:.2f} ms/step, "
                  f"{row['elsewhere_ratio']:.2f}x)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
