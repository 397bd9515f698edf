"""Where a decode step's time goes: torch.profiler's operator table for stock and one patched mode.

    python benchmarks/profile_decode.py                        # lowrank r = 64 vs stock, sdpa, context 512
    python benchmarks/profile_decode.py --mode covariance --context 2048 --attn_implementation eager
    python benchmarks/profile_decode.py --model_type bloom      # another causal family (BLOOM: eager only)

Same model as benchmarks/run.py (GPT-2-small-shaped, 2 layers, vocabulary 8192, fp32, batch 1, one thread; of the
family --model_type, default gpt2).
Prints the median ms per token of each model (interleaved repeats, alternating which model goes first, each after one
untimed step) and, for each, the operators
that took the most self CPU time over --steps steps. Run it twice, once with `MALLOC_MMAP_THRESHOLD_=4294967296
MALLOC_TRIM_THRESHOLD_=4294967296` in the environment, to see how much of a difference comes from glibc returning
and re-faulting the memory of the KV cache's per-step `torch.cat` (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers
from torch.profiler import profile
from transformers import AutoModelForCausalLM, DynamicCache

from hf_merged_attn import patch_model
from run import CAUSAL_MODEL_TYPES, attn_implementations, stock_config  # benchmarks/run.py: the same model

transformers.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["covariance", "lowrank"], default="lowrank")
    parser.add_argument("--rank", type=int, default=None, help="lowrank only (default 64, the head size)")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--model_type", default="gpt2", choices=CAUSAL_MODEL_TYPES)
    parser.add_argument("--attn_implementation", choices=["sdpa", "eager"], default=None,
                        help="default: sdpa (eager for BLOOM, which has no sdpa)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per repeat")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rows", type=int, default=8, help="operators shown per model")
    args = parser.parse_args(argv)
    if args.mode == "covariance" and args.rank is not None:
        parser.error(f"--rank {args.rank} was given with --mode covariance, which has no rank; drop --rank")
    args.rank = 64 if args.rank is None and args.mode == "lowrank" else args.rank
    if args.mode == "lowrank" and not 1 <= args.rank <= 768:
        parser.error(f"--rank {args.rank}: allowed are 1 .. 768 (the hidden size); 64 is the head size (exact)")
    if min(args.context, args.steps, args.repeats, args.rows) < 1:
        parser.error("--context, --steps, --repeats and --rows must be positive integers")
    supported = attn_implementations(args.model_type)
    args.attn_implementation = args.attn_implementation or supported[0]
    if args.attn_implementation not in supported:
        parser.error(f"--attn_implementation {args.attn_implementation}: stock {args.model_type} runs only "
                     f"{' and '.join(supported)} attention; pass --attn_implementation {supported[0]}")

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = stock_config(args.model_type, hidden=768, heads=12, layers=2, vocab=8192,
                          positions=args.context + args.steps + 1)
    stock = AutoModelForCausalLM.from_config(config).eval()
    stock.set_attn_implementation(args.attn_implementation)
    patched = patch_model(copy.deepcopy(stock), args.mode, rank=args.rank)
    name = args.mode if args.mode == "covariance" else f"lowrank{args.rank}"
    models = {"stock": stock, name: patched}

    prefix = torch.randint(0, config.vocab_size, (1, args.context))
    token = torch.randint(0, config.vocab_size, (1, 1))
    times = {key: [] for key in models}
    with torch.no_grad():
        caches = {key: DynamicCache(config=config) for key in models}
        for key, model in models.items():
            model(prefix, past_key_values=caches[key], use_cache=True)

        def steps(key: str, count: int) -> None:
            for _ in range(count):
                models[key](token, past_key_values=caches[key], use_cache=True)
            caches[key].crop(-count)  # back to the prefilled context

        for repeat in range(args.repeats):
            for key in list(models)[repeat % 2 :] + list(models)[: repeat % 2]:  # alternate which model goes first
                steps(key, 1)  # untimed: this model's weights back in the CPU caches
                start = time.perf_counter()
                steps(key, args.steps)
                times[key].append((time.perf_counter() - start) / args.steps * 1e3)
        medians = {key: statistics.median(values) for key, values in times.items()}
        print(f"{args.attn_implementation}, context {args.context}: " + ", ".join(
            f"{key} {ms:.2f} ms/token ({ms / medians['stock']:.3f} x stock)" for key, ms in medians.items()))
        for key in models:
            with profile() as prof:
                steps(key, args.steps)
            print(f"\n{key}: operators by self CPU time over {args.steps} steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
