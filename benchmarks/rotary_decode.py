"""Decode speed of the rotary latent on a Llama model: ms per step against stock at MHA2MLA's budgets, same run.

    python examples/smollm2.py                                           # once: SmolLM2-135M as an HF folder
    python benchmarks/rotary_decode.py --output_dir docs                 # SmolLM2, batch 8, context 2048 (~5 min)
    python benchmarks/rotary_decode.py --model_name_or_path tiny --batch 2 --context 32 --steps 2 --repeats 1 \
        --output_dir runs/rd                                             # a dry run on a tiny random Llama

Each model's cache is filled with --context tokens of random numbers in the layout the model caches (stock: K and V
of its G heads; the latent: c and the rotated rotary keys) — the time of a step does not depend on the values, and a
real prefill of 8 x 2048 tokens would take minutes per model here — then --steps single-token steps are timed,
--repeats times, the models interleaved. The latent rows are r = 4 kept pairs per KV head and r_c = G·d_kv with
d_kv = 32, 16, 8 (-68.75%, -81.25%, -87.5% of stock's numbers per token), each with the two decode kernels of the
table (the explicit one, `rotary_absorbed`, and one SDPA call with the rotary scores as its bias); the exact-RoPE latent
(rope="exact") at r_c = 1/2, 5/16 and 1/8 of 2·G·hd with its two decode kernels (`exact_rebuild`: keys rebuilt from c,
rotated, scored per KV head, values through c; `exact_rebuild_sdpa`: the same keys and c as the value in one SDPA
call). Bytes per token are
measured on the filled caches. fp32; writes rotary_decode.json and rotary_decode.md to --output_dir.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from hf_merged_attn import patch_model, use_kernels
from hf_merged_attn.evaluation import cache_bytes_per_token
from hf_merged_attn.exact_rope import encode_positions

transformers.logging.set_verbosity_error()
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "runs" / "SmolLM2-135M-Instruct"
BUDGETS = {"-68.75%": 32, "-81.25%": 16, "-87.5%": 8}  # d_kv per KV head
EXACT_BUDGETS = {"-50%": 0.5, "-68.75%": 0.3125, "-87.5%": 0.125}  # r_c / (2·G·hd) of the exact-RoPE latent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=str(DEFAULT_MODEL), help="a Llama folder, or 'tiny' (random)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--num_threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--output_dir", type=Path, default=Path("runs/rotary_decode"))
    args = p.parse_args(argv)
    for name in ("batch", "context", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(args, name)}.")
    if args.model_name_or_path != "tiny" and not Path(args.model_name_or_path).is_dir() and "/" not in args.model_name_or_path:
        p.error(f"--model_name_or_path {args.model_name_or_path!r} is neither a folder, a Hub id nor 'tiny'; run "
                "`python examples/smollm2.py` for the default folder.")
    return args


def load(name: str):
    if name == "tiny":
        config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             intermediate_size=128, num_hidden_layers=2, vocab_size=256, max_position_embeddings=4096)
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()
    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()


def filled_cache(model, batch: int, context: int) -> DynamicCache:
    """A DynamicCache holding `context` random tokens in the layout each layer of `model` caches."""
    cache = DynamicCache(config=model.config)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        if getattr(attn, "rope", None) == "exact":  # c, and each token's position (what the keys are rebuilt at)
            key = torch.randn(batch, 1, context, attn.rank)
            value = encode_positions(torch.arange(context).expand(batch, -1), attn.cache_layout.value_width,
                                     key.dtype)
        elif hasattr(attn, "cache_layout"):
            layout = attn.cache_layout
            key = torch.randn(batch, layout.key_heads, context, layout.key_width)
            value = torch.randn(batch, layout.value_heads, context, layout.value_width)
        else:
            key = torch.randn(batch, config.num_key_value_heads, context, head_dim)
            value = torch.randn_like(key)
        cache.update(key, value, i)
    return cache


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    stock = load(args.model_name_or_path)
    stock.set_attn_implementation("sdpa")
    config = stock.config
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rows = {"stock": (stock, None)}  # name -> (model, forced decode kernel)
    for budget, d_kv in BUDGETS.items():
        model = patch_model(copy.deepcopy(stock), "latent", rank=kv_heads * d_kv, rope_pairs=min(4, head_dim // 2),
                            rope_selection="high")  # which pairs are kept does not change the time
        for kernel in ("rotary_absorbed", "rotary_absorbed_sdpa"):
            rows[f"latent r_c={kv_heads * d_kv} r=4 ({budget}), {kernel}"] = (model, kernel)
    for budget, share in EXACT_BUDGETS.items():  # the exact-RoPE latent: c alone (and positions), keys rebuilt
        rank = round(share * 2 * kv_heads * head_dim)
        model = patch_model(copy.deepcopy(stock), "latent", rank=rank, rope="exact")
        for kernel in ("exact_rebuild", "exact_rebuild_sdpa"):
            rows[f"exact-RoPE r_c={rank} ({budget}), {kernel}"] = (model, kernel)
    times: dict[str, list[float]] = {name: [] for name in rows}
    caches = {}
    token = torch.randint(0, config.vocab_size, (args.batch, 1))
    with torch.no_grad():
        for repeat in range(args.repeats):
            names = list(rows)
            names = names[repeat % len(names):] + names[: repeat % len(names)]  # rotate which goes first
            for name in names:
                model, kernel = rows[name]
                if kernel is not None:
                    use_kernels(model, decode=kernel)
                cache = filled_cache(model, args.batch, args.context)
                mask = torch.ones(args.batch, args.context + args.steps + 1, dtype=torch.long)
                model(token, past_key_values=cache, attention_mask=mask[:, : args.context + 1])  # warm-up step
                start = time.perf_counter()
                for step in range(args.steps):
                    model(token, past_key_values=cache, attention_mask=mask[:, : args.context + step + 2])
                times[name].append((time.perf_counter() - start) / args.steps * 1000)
                caches[name] = cache_bytes_per_token(cache) / args.batch
    base = statistics.median(times["stock"])
    results = [{"configuration": name, "ms_per_step": statistics.median(t), "spread_ms": [min(t), max(t)],
                "ratio_to_stock": statistics.median(t) / base, "cache_bytes_per_token": caches[name]}
               for name, t in times.items()]
    record = {"model": Path(args.model_name_or_path).name, "batch": args.batch, "context": args.context,
              "steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
                         f"{torch.__version__}, transformers {transformers.__version__}", "results": results}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "rotary_decode.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    lines = [
        "# Decode speed of the rotary latents (fp32, CPU)",
        "",
        f"`python benchmarks/rotary_decode.py --output_dir {args.output_dir}` on {record['model']}: batch {args.batch}, "
        f"{args.context} tokens in the cache, {args.steps} timed steps x {args.repeats} repeats (median, [min, max]); "
        f"{record['machine']}.",
        "",
        "| configuration | ms per step | spread | vs stock | cache bytes per token |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['configuration']} | {r['ms_per_step']:.1f} | [{r['spread_ms'][0]:.1f}, {r['spread_ms'][1]:.1f}] | "
              f"{r['ratio_to_stock']:.2f}x | {r['cache_bytes_per_token']:,.0f} |" for r in results]
    (args.output_dir / "rotary_decode.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
