"""Decode speed with a quantized latent cache: ms per step against the unquantized latent and stock, same run.

    python benchmarks/quantized_decode.py --output_dir docs                     # batch 8, context 2048 (~3 min, 2 CPUs)
    python benchmarks/quantized_decode.py --batch 1 --context 256 --steps 3 --repeats 2 --output_dir runs/q  # a dry run
    python benchmarks/quantized_decode.py --attn_implementation eager --batch 4 --context 1024 --output_dir runs/qe

The model is benchmarks/run.py's (GPT-2-small-shaped: d = 768, 12 heads, 2 layers, vocabulary 8192, fp32, random
weights, seed 0), stock and patched to the latent at --rank (default 256 = d/3, GPT-2 small's "⅓" point). Each cache is
filled by one prefill of --context tokens (timed once: prefill_ms), then --steps single-token decode steps are timed,
--repeats times, the caches interleaved (rotating which goes first). Compared, on the same latent model:

- the latent in a DynamicCache (fp32);
- `LatentQuantizedCache(nbits=8 / 4, residual_length=0)` read block by block (`attend_absorbed`, the default), and
  the same cache with code reading switched off (`reads_codes = False`: the whole quantized part dequantized per
  step — what the cache did before the block-wise reader);
- stock GPT-2 with its DynamicCache (the K and V of every head).

--attn_implementation eager times the eager path (BLOOM's only one; it returns the attention weights): its decode
reads the codes block by block as well. Under load, `--steps 1 --repeats 60` and the min_ms of the JSON are steadier.

Writes quantized_decode.json and quantized_decode.md to --output_dir. Median ms per step and ratios to the
unquantized latent; the cache bytes per token are measured on the cache objects after the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

from hf_merged_attn import LatentQuantizedCache, patch_model
from hf_merged_attn.evaluation import cache_bytes_per_token
from run import machine, rotated, stock_config  # benchmarks/run.py: the same model and machine record

transformers.logging.set_verbosity_error()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=2048, help="tokens in the cache before the timed steps")
    p.add_argument("--rank", type=int, default=256, help="latent width r_c")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--num_threads", type=int, default=1, help="torch threads (1: the figure does not depend on load)")
    p.add_argument("--attn_implementation", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--output_dir", type=Path, default=Path("runs/quantized_decode"))
    args = p.parse_args(argv)
    for name in ("batch", "context", "rank", "steps", "repeats", "num_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(args, name)}.")
    if args.rank > 768:
        p.error(f"--rank {args.rank} exceeds the model's hidden size 768; pass a latent width of at most 768.")
    return args


def caches(config) -> dict:
    """name -> a factory of an empty cache for that entry (every entry but stock runs on the latent model)."""
    def quantized(nbits: int, blocks: bool):
        def make():
            cache = LatentQuantizedCache(config, nbits=nbits, residual_length=0)
            for layer in cache.layers:
                layer.reads_codes = blocks
            return cache
        return make

    return {
        "latent, fp32 cache": lambda: DynamicCache(config=config),
        "latent, int8 cache (block-wise)": quantized(8, True),
        "latent, int8 cache (whole dequantize)": quantized(8, False),
        "latent, int4 cache (block-wise)": quantized(4, True),
        "latent, int4 cache (whole dequantize)": quantized(4, False),
    }


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    # every repeat continues the same caches with one untimed and `steps` timed tokens
    config = stock_config("gpt2", 768, 12, 2, 8192, args.context + args.repeats * (args.steps + 1) + 1)
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(config).eval()
    stock.set_attn_implementation(args.attn_implementation)
    torch.manual_seed(0)
    latent = patch_model(AutoModelForCausalLM.from_config(config).eval(), "latent", rank=args.rank)
    latent.set_attn_implementation(args.attn_implementation)
    prompt = torch.randint(1, config.vocab_size, (args.batch, args.context))
    step_ids = torch.randint(1, config.vocab_size, (args.batch, 1))
    entries = {"stock, fp32 cache": (stock, lambda: DynamicCache(config=stock.config))}
    entries.update({name: (latent, make) for name, make in caches(latent.config).items()})
    filled, prefill_ms = {}, {}
    for name, (model, make) in entries.items():  # prefill once (timed once); each repeat continues the same cache
        cache = make()
        begin = time.perf_counter()
        model(prompt, past_key_values=cache, use_cache=True)
        prefill_ms[name] = (time.perf_counter() - begin) * 1e3
        filled[name] = cache
    times = {name: [] for name in entries}
    start = time.time()
    for repeat in range(args.repeats):
        for name in rotated(list(entries), repeat):
            model, cache = entries[name][0], filled[name]
            model(step_ids, past_key_values=cache, use_cache=True)  # one untimed step
            begin = time.perf_counter()
            for _ in range(args.steps):
                model(step_ids, past_key_values=cache, use_cache=True)
            times[name].append((time.perf_counter() - begin) / args.steps * 1e3)
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.1f}" for n, t in times.items()), flush=True)
    reference = statistics.median(times["latent, fp32 cache"])
    rows = {name: {"ms_per_step": statistics.median(t), "min_ms": min(t), "times_ms": t,
                   "vs_latent_fp32": statistics.median(t) / reference, "prefill_ms": prefill_ms[name],
                   "cache_bytes_per_token": cache_bytes_per_token(filled[name]) / args.batch} for name, t in times.items()}
    result = {
        "command": "python benchmarks/quantized_decode.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "output_dir"},
        "machine": machine(args, torch.device("cpu")), "wall_time_s": time.time() - start, "rows": rows,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "quantized_decode.json").write_text(json.dumps(result, indent=1))
    (args.output_dir / "quantized_decode.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    a, m = result["args"], result["machine"]
    stock = result["rows"]["stock, fp32 cache"]
    lines = [
        f"# Decode with a quantized latent cache (CPU, {a['attn_implementation']})",
        "",
        f"`{result['command']}` — {m['cpu']}, {a['num_threads']} torch thread(s) of {m['cpu_count']} cores, torch "
        f"{m['torch']}, transformers {m['transformers']}. benchmarks/run.py's model (GPT-2-small-shaped, 2 layers, "
        f"fp32, random weights), latent r_c = {a['rank']}; batch {a['batch']}, context {a['context']} (one prefill, "
        f"timed once), median over {a['repeats']} repeats of {a['steps']} single-token steps, caches interleaved. Every "
        "token of the quantized caches is quantized (no full-precision window), one scale and minimum per token.",
        "",
        "| cache | ms / step | × the fp32 latent | × stock | cache bytes / token (× stock) | prefill ms (once) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['ms_per_step']:.1f} | {r['vs_latent_fp32']:.2f} | "
                     f"{r['ms_per_step'] / stock['ms_per_step']:.2f} | {r['cache_bytes_per_token']:,.0f} "
                     f"({r['cache_bytes_per_token'] / stock['cache_bytes_per_token']:.3g}) | {r['prefill_ms']:.0f} |")
    lines += [
        "",
        "Block-wise: `LatentQuantizedLayer.attend_absorbed` reads 512 tokens at a time into an online softmax (one "
        "scale and minimum per token, as here: the codes only converted to float, the scale and minimum applied to the "
        "scores and the weights, int4 as its even and odd channels; other groupings dequantized per block); whole "
        "dequantize: the quantized part dequantized in full and concatenated for every step (code reading off), whose "
        "large per-step temporaries make its time vary between repeats (see times_ms in the JSON). The step includes "
        "the whole model (projections, MLP, LM head), not only attention.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
