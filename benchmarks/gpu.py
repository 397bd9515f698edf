"""The prepared GPU benchmark (#20): decode tokens per second and achieved memory bandwidth, stock vs every mode.

    bash benchmarks/gpu.sh                                   # on one GPU: writes docs/gpu/ (about 5-8 min on an H200)
    python benchmarks/gpu.py --device cpu --dry_run --out /tmp/gpu   # the CPU dry run the tests keep alive

GPT-2-small shape (12 layers x 12 heads x 64, vocabulary 50257, bf16, random weights, sdpa), for each (batch,
context) in --batches x --contexts:

- stock as most users run it: eager forward, DynamicCache (`generate()`'s default);
- every mode (stock included) at its best: a StaticCache, written in place, and the forward compiled with
  `torch.compile(model.forward, fullgraph=True, backend=--backend)` ("cudagraphs": Dynamo + CUDA graphs, which
  removes the per-kernel launch cost that makes eager decode launch-bound; "inductor" with mode="reduce-overhead"
  adds fused kernels at a much longer compile). Decode steps run against a cache pre-filled to the context (no
  prefill is timed or needed), the greedy token of each step feeding the next;
- the achieved memory bandwidth of a step: (weight bytes + cache bytes read) / step time, against --peak_gbs;
- a training step (forward + backward of the LM loss) at T = --train_tokens per mode, as a ratio to stock, beside
  the analytic FLOP ratio (benchmarks/flops.py).

Writes gpu.json, gpu.md and gpu.png into --out; every ratio is against stock measured in the same run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, GPT2LMHeadModel, StaticCache

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # a clean clone without `pip install -e .`
import flops  # noqa: E402
from run import DTYPES, stock_config, synchronize  # noqa: E402

sys.path.insert(2, str(HERE.parent / "examples"))
from run_record import current_commit  # noqa: E402

from hf_merged_attn import LatentQuantizedCache, MergedAttention, patch_model, use_kernels  # noqa: E402
from hf_merged_attn.evaluation import cache_bytes_per_token  # noqa: E402

transformers.logging.set_verbosity_error()

MODES = {  # name: patch_model arguments (None: stock)
    "stock": None,
    "covariance": {"mode": "covariance"},
    "covariance+values": {"mode": "covariance", "values": "merged"},
    "lowrank64": {"mode": "lowrank", "rank": 64},
    "latent256": {"mode": "latent", "rank": 256},
    "latent128": {"mode": "latent", "rank": 128},
}
# the forward's cache keyword: `cache` since transformers 5.2x, `past_key_values` before (5.17 knows only that one)
CACHE_KWARG = "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"
QUANTIZED = {"int8": 8, "int4": 4}  # latent caches timed beside the static one: every token quantized, eager forward
PEAK_GBS = {"H200": 4800, "H100": 3350, "A100": 2039}  # HBM bandwidth by device name, GB/s


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES) + ["lowrank8", "latent16"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="cudagraphs", help="torch.compile backend of the best decode (or 'inductor')")
    p.add_argument("--kernels", nargs="*", default=["shared_blocks", "sdpa_folded", "sdpa_expand"],
                   help="decode kernels to time against the automatic choice (hf_merged_attn.attention_kernels)")
    p.add_argument("--kernel_shapes", nargs="*", default=["b64-8192", "b8-2048"], help="where to compare kernels")
    p.add_argument("--train_tokens", type=int, default=1024)
    p.add_argument("--train_batch", type=int, default=8)
    p.add_argument("--peak_gbs", type=float, default=None, help="the device's peak memory bandwidth (GB/s)")
    p.add_argument("--dry_run", action="store_true", help="tiny sizes for a CPU check of the whole pipeline")
    p.add_argument("--replot", type=Path, default=None, help="only rewrite gpu.md / gpu.png from this gpu.json")
    p.add_argument("--out", type=Path, default=Path("docs/gpu"))
    args = p.parse_args(argv)
    if args.dry_run:
        args.layers, args.hidden, args.heads, args.vocab = 2, 64, 4, 101
        args.batches, args.contexts, args.steps, args.repeats = [1, 2], [32], 4, 1
        args.train_tokens, args.train_batch, args.kernel_shapes = 32, 2, ["b2-32"]
        MODES.update(lowrank8={"mode": "lowrank", "rank": 8}, latent16={"mode": "latent", "rank": 16})
        args.modes = ["stock", "covariance", "covariance+values", "lowrank8", "latent16"]
        args.backend = "eager" if args.device == "cpu" else args.backend
    if args.device.startswith("cuda") and not torch.cuda.is_available() and args.replot is None:
        p.error(f"--device {args.device}: no CUDA device here. Run on a GPU machine, or pass --device cpu --dry_run.")
    if "stock" not in args.modes:
        p.error(f"--modes {args.modes}: every ratio is against stock, so 'stock' must be one of them.")
    return args


def build(name: str, args, device) -> torch.nn.Module:
    """The same random model (seed 0) for every mode, patched unless stock; eval, on the device in the dtype."""
    torch.manual_seed(0)
    positions = max(args.contexts) + args.steps * (args.repeats + 2) + 8
    model = AutoModelForCausalLM.from_config(stock_config("gpt2", args.hidden, args.heads, args.layers, args.vocab,
                                                          max(positions, args.train_tokens)))
    model.set_attn_implementation("sdpa")
    if MODES[name] is not None:
        patch_model(model, **MODES[name])
    return model.to(device=device, dtype=DTYPES[args.dtype]).eval()


def layouts(model) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """((key heads, width), (value heads, width)) per layer as the cache stores them."""
    merged = [m.cache_layout.stored_shapes() for m in model.modules() if isinstance(m, MergedAttention)]
    if merged:
        return merged
    heads = model.config.num_attention_heads
    return [((heads, model.config.hidden_size // heads),) * 2] * model.config.num_hidden_layers


def filled_cache(model, kind: str, batch: int, context: int, max_len: int, device, dtype):
    """A cache holding `context` tokens of random keys/values in the model's layout (no prefill needed to time a step)."""
    if kind == "static":
        cache = StaticCache(config=model.config, max_cache_len=max_len)
    elif kind in QUANTIZED:  # the latent quantized as it enters (window 0); read block by block by the decode
        cache = LatentQuantizedCache(model.config, nbits=QUANTIZED[kind], residual_length=0)
    else:
        cache = DynamicCache(config=model.config)
    for i, ((kh, kw), (vh, vw)) in enumerate(layouts(model)):
        keys = torch.randn(batch, kh, context, kw, device=device, dtype=dtype)
        values = torch.randn(batch, vh, context, vw, device=device, dtype=dtype)
        cache.update(keys, values, i)  # a static layer allocates (B, heads, max_len, width) here and writes in place
    return cache


def rewind(cache, kind: str, context: int) -> None:
    """Back to `context` cached tokens (a static layer only moves its write position; a dynamic one is cropped)."""
    if kind == "static":
        for layer in cache.layers:
            layer.cumulative_length.fill_(context)
    elif cache.get_seq_length() > context:
        cache.crop(context - cache.get_seq_length())  # transformers 5 crops by a negative count


def decode(model, forward, cache, token, mask, steps: int, device) -> float:
    """`steps` greedy decode steps; seconds per step."""
    cuda_graphs = device.type == "cuda"
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits = forward(token, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache}).logits
            token = logits[:, -1:].argmax(-1).clone()  # (B, 1): read before the next graph replay overwrites it
    synchronize(device)
    return (time.perf_counter() - start) / steps


def bench_decode(model, name: str, kind: str, batch: int, context: int, args, device, log) -> dict:
    dtype = DTYPES[args.dtype]
    max_len = context + args.steps + 1
    cache = filled_cache(model, kind, batch, context, max_len, device, dtype)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    if kind == "static":  # the 2-D mask spans the buffer: every step has the same shapes (one graph)
        mask = torch.ones(batch, max_len, dtype=torch.long, device=device)
        torch._dynamo.reset()
        forward = torch.compile(model.forward, fullgraph=True, backend=args.backend, dynamic=False,
                                **({"mode": "reduce-overhead"} if args.backend == "inductor" else {}))
    else:
        mask, forward = None, model.forward
    compile_start = time.perf_counter()
    decode(model, forward, cache, token, mask, 2, device)  # warm-up: compiles and records the graphs
    warmup = time.perf_counter() - compile_start
    times = []
    for _ in range(args.repeats):
        if kind in QUANTIZED:  # a quantized cache cannot be cropped below its window: a fresh one per repeat
            cache = filled_cache(model, kind, batch, context, max_len, device, dtype)
        else:
            rewind(cache, kind, context)
        times.append(decode(model, forward, cache, token, mask, args.steps, device))
    step = statistics.median(times)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if kind in QUANTIZED:  # codes, scales and minima, as held
        read = round(cache_bytes_per_token(cache) * context)
    else:
        read = sum(kh * kw + vh * vw for (kh, kw), (vh, vw) in layouts(model)) * batch * context * torch.finfo(dtype).bits // 8
    log(f"  {name:18s} {kind:7s} b{batch:<3d} ctx {context:5d}: {1e3 * step:8.3f} ms/step, "
        f"{batch / step:9.0f} tok/s (warm-up {warmup:.1f}s)")
    return {"step_ms": 1e3 * step, "tokens_per_s": batch / step, "times_ms": [1e3 * t for t in times],
            "warmup_s": warmup, "weight_bytes": weights, "cache_bytes_read": read,
            "achieved_gbs": (weights + read) / step / 1e9}


def bench_kernels(models: dict, args, device, log) -> dict:
    """Decode at its best with each shared-key kernel forced (where it fits), to confirm the automatic choice."""
    out = {}
    for name, model in models.items():
        if MODES[name] is None or MODES[name]["mode"] == "lowrank":  # per-head keys: no shared-key kernel applies
            continue
        out[name] = {}
        for kernel in args.kernels:
            try:
                use_kernels(model, decode=kernel)
                for key in args.kernel_shapes:
                    batch, context = (int(x) for x in key[1:].split("-"))
                    row = bench_decode(model, f"{name}/{kernel}", "static", batch, context, args, device, log)
                    out[name].setdefault(kernel, {})[key] = row
            except Exception as error:  # noqa: BLE001 - a kernel that does not fit this mode is recorded, not fatal
                out[name][kernel] = {"error": str(error).splitlines()[0][:200]}
            finally:
                use_kernels(model, decode=None)
    return out


def bench_train(models: dict, args, device, log) -> dict:
    ids = torch.randint(0, args.vocab, (args.train_batch, args.train_tokens), device=device,
                        generator=torch.Generator(device=device).manual_seed(1))
    # the covariance modes also with the blocked kernel the CPU uses, to show what the fused one changes
    runs = {name: (name, None) for name in models}
    runs.update({f"{name} (shared_blocks)": (name, "shared_blocks") for name in models
                 if MODES[name] and MODES[name]["mode"] == "covariance"})
    times = {run: [] for run in runs}
    for rep in range(args.repeats + 1):
        for run, (name, kernel) in runs.items():
            model = models[name]
            use_kernels(model, train=kernel) if MODES[name] else None
            model.train()
            synchronize(device)
            start = time.perf_counter()
            model(ids, labels=ids, use_cache=False).loss.backward()
            synchronize(device)
            if rep:  # the first round warms up
                times[run].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
            model.eval()
            use_kernels(model, train=None) if MODES[name] else None
    out = {}
    d, heads, layers, vocab = args.hidden, args.heads, args.layers, args.vocab
    stock_flops = flops.step_flops("stock", None, tokens=args.train_tokens, d=d, heads=heads, layers=layers, vocab=vocab)
    for run, (name, _) in runs.items():
        spec = MODES[name] or {"mode": "stock"}
        analytic = flops.step_flops(spec["mode"], spec.get("rank"), tokens=args.train_tokens, d=d, heads=heads,
                                    layers=layers, vocab=vocab, values=spec.get("values"))
        out[run] = {"step_s": statistics.median(times[run]), "analytic_flop_ratio": analytic["total"] / stock_flops["total"]}
    for name, row in out.items():
        row["time_ratio"] = row["step_s"] / out["stock"]["step_s"]
        row["time_over_flops"] = row["time_ratio"] / row["analytic_flop_ratio"]
        log(f"  train T={args.train_tokens} {name:18s} {row['step_s'] * 1e3:8.1f} ms  {row['time_ratio']:.2f}x stock "
            f"(analytic {row['analytic_flop_ratio']:.2f}x)")
    return out


def machine(device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def report(result: dict, out: Path) -> None:
    """gpu.md (tables) and gpu.png (tokens per second per mode, at best, by batch and context)."""
    rows = result["decode"]
    stock_best = {key: rows["stock"]["static"][key]["tokens_per_s"] for key in rows["stock"]["static"]}
    keys = list(stock_best)
    lines = [
        "# Decode on a GPU: tokens per second, stock vs every mode", "",
        f"`{result['command']}` — " + ", ".join(f"{k} {v}" for k, v in result["machine"].items())
        + f"; commit {result['commit']}.", "",
        "Ratios are tokens per second against stock **at its best** (static cache + compiled forward), measured in",
        "the same run; `stock (eager, dynamic)` is stock as most users run it. Bandwidth: (weight bytes + cache bytes",
        f"read) per step / step time, against a peak of {result['peak_gbs']} GB/s.", "",
        "| mode | " + " | ".join(f"b{k.split('-')[0][1:]} ctx {k.split('-')[1]}" for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    stock_eager = rows["stock"].get("dynamic", {})
    lines.append("| stock (eager, dynamic) | " + " | ".join(
        f"{stock_eager[k]['tokens_per_s'] / stock_best[k]:.2f}x" if k in stock_eager else "–" for k in keys) + " |")
    for name, kinds in rows.items():
        lines.append(f"| {name} (static, compiled) | " + " | ".join(
            f"{kinds['static'][k]['tokens_per_s'] / stock_best[k]:.2f}x ({kinds['static'][k]['tokens_per_s']:,.0f} tok/s, "
            + (f"{kinds['static'][k]['achieved_gbs'] / result['peak_gbs']:.0%} of peak bw)" if result["peak_gbs"]
               else f"{kinds['static'][k]['achieved_gbs']:.1f} GB/s)") for k in keys) + " |")
    quantized = [(name, kind) for name, kinds in rows.items() for kind in kinds if kind in QUANTIZED]
    if quantized:
        lines += ["", "## The latent in a quantized cache (eager forward, dynamic shapes; read block by block)", "",
                  "| mode | cache | " + " | ".join(f"b{k.split('-')[0][1:]} ctx {k.split('-')[1]}" for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for name, kind in quantized:
            lines.append(f"| {name} | {kind} | " + " | ".join(
                f"{rows[name][kind][k]['tokens_per_s'] / stock_best[k]:.2f}x ({rows[name][kind][k]['tokens_per_s']:,.0f} "
                "tok/s)" for k in keys) + " |")
    kernels = result.get("kernels", {})
    if kernels:
        lines += ["", "## Decode kernels (static cache, compiled), forced", "",
                  "| mode | kernel | " + " | ".join(result["settings"]["kernel_shapes"]) + " |",
                  "|---|---|" + "---|" * len(result["settings"]["kernel_shapes"])]
        for name, by_kernel in kernels.items():
            for kernel, shapes in by_kernel.items():
                cells = [shapes["error"][:60]] if "error" in shapes else [
                    f"{shapes[k]['tokens_per_s'] / stock_best[k]:.2f}x stock" if k in shapes else "–"
                    for k in result["settings"]["kernel_shapes"]]
                lines.append(f"| {name} | {kernel} | " + " | ".join(cells) + " |")
    lines += ["", f"## Training step at T = {result['train_tokens']}", "", "| mode | time vs stock | analytic FLOPs vs stock | time / FLOP ratio |",
              "|---|---|---|---|"]
    for name, row in result["train"].items():
        lines.append(f"| {name} | {row['time_ratio']:.2f}x | {row['analytic_flop_ratio']:.2f}x | {row['time_over_flops']:.2f} |")
    (out / "gpu.md").write_text("\n".join(lines) + "\n")

    try:
        import matplotlib
    except ImportError:  # a bare GPU machine: the tables are written, the plot is left to a machine with matplotlib
        print("matplotlib is not installed: gpu.png not written (python benchmarks/gpu.py --replot gpu.json)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / (len(rows) + 1)
    for i, (name, kinds) in enumerate([("stock (eager)", {"static": rows["stock"].get("dynamic", {})})] + list(rows.items())):
        values = [kinds["static"].get(k, {}).get("tokens_per_s", 0) for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], values, width, label=name)
    ax.set_xticks([j + 0.4 for j in range(len(keys))], keys)
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s (log)")
    ax.set_title(f"Decode, {result['machine'].get('gpu', result['machine']['platform'])}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "gpu.png", dpi=120)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        report(result, args.replot.parent)
        return result
    device = torch.device(args.device)
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = args.peak_gbs or next((gbs for key, gbs in PEAK_GBS.items() if key in gpu_name), None)
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda text: print(text, flush=True)  # noqa: E731
    models = {name: build(name, args, device) for name in args.modes}
    result = {"command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine(device), "commit": current_commit(), "peak_gbs": peak, "train_tokens": args.train_tokens,
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "decode": {}}
    for name, model in models.items():
        result["decode"][name] = {"static": {}}
        if name == "stock":
            result["decode"][name]["dynamic"] = {}
        if MODES[name] is not None and MODES[name]["mode"] == "latent":
            result["decode"][name].update({kind: {} for kind in QUANTIZED})
        for batch in args.batches:
            for context in args.contexts:
                key = f"b{batch}-{context}"
                for kind in result["decode"][name]:
                    result["decode"][name][kind][key] = bench_decode(model, name, kind, batch, context, args, device, log)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    result["kernels"] = bench_kernels(models, args, device, log)
    result["train"] = bench_train(models, args, device, log)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1))
    report(result, args.out)
    log(f"wrote {args.out}/gpu.json, gpu.md, gpu.png")
    return result


if __name__ == "__main__":
    main()
