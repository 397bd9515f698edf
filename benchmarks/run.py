"""Benchmark a stock causal LM (GPT-2 by default) against its covariance and lowrank patches, side by side.

    python benchmarks/run.py --threads 1 --out docs     # the committed figures (about 15 min on 2 CPU cores)
    python benchmarks/run.py --quick --out /tmp/bench   # smoke run, a few seconds after imports
    python benchmarks/run.py --device cuda --out gpu    # on a GPU machine
    python benchmarks/run.py --model_type opt --quick   # another causal family of the registry (gpt2, opt, bloom)

Measures, for stock, covariance and lowrank at each rank (default 64, 32, 16), on a GPT-2-small-shaped model
(12 heads x 64 = 768 wide; layers and vocabulary reduced to fit a CPU, see --layers/--vocab) of the family
--model_type, built from random weights by transformers' AutoConfig.for_model and AutoModelForCausalLM:

- a training step (forward + backward of the LM loss) per token at T in --tokens, for each --impls;
- one decode step per token with the KV cache (DynamicCache) at each context in --contexts;
- K/V cache bytes, parameter counts, bytes saved for backward (saved_tensors_hooks), and the peak memory
  of a training step with AdamW (CPU: peak RSS of a fresh subprocess; CUDA: max_memory_allocated);
- the analytic FLOPs of each (benchmarks/flops.py), attention-only and whole-model;
- optionally (--compile) torch.compile(fullgraph=True) speed and agreement with eager.

Every setting runs all modes interleaved within each repeat (the order rotates), after warm-up; the
figures are medians, and ratios are taken against stock from the same run. Writes benchmarks.json, a
markdown report (benchmarks.md: the generated part between markers, text outside them is kept) and
benchmarks.png into --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # a clean clone without `pip install -e .`
import flops  # noqa: E402
import report  # noqa: E402

from hf_merged_attn import patch_model  # noqa: E402
from hf_merged_attn.registry import SPECS, spec_for_model, spec_for_patched  # noqa: E402

transformers.logging.set_verbosity_error()


# ----------------------------------------------------------------------------------------------- setup
def mode_specs(ranks: list[int], latent_ranks: list[int] = (), merged_values: bool = False) -> list[dict]:
    """The benchmarked modes: stock, covariance, lowrank at `ranks`; covariance with merged values; latent at r_c."""
    specs = [{"name": "stock", "mode": "stock", "rank": None}, {"name": "covariance", "mode": "covariance", "rank": None}]
    if merged_values:
        specs.append({"name": "covariance+values", "mode": "covariance", "rank": None, "values": "merged"})
    specs += [{"name": f"lowrank{r}", "mode": "lowrank", "rank": r} for r in ranks]
    return specs + [{"name": f"latent{r}", "mode": "latent", "rank": r} for r in latent_ranks]


CAUSAL_MODEL_TYPES = tuple(t for spec in SPECS if spec.causal for t in spec.model_types)  # gpt2, opt, bloom
# the dropout fields of the families (GPT-2's *_pdrop; OPT's and BLOOM's), all set to 0 where the config has them
DROPOUT_FIELDS = ("attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout", "attention_dropout", "activation_dropout",
                  "hidden_dropout", "layerdrop")


def stock_config(model_type: str, hidden: int, heads: int, layers: int, vocab: int, positions: int):
    """A stock config of the family with the generic size names, dropout off; `positions` where it has learned ones."""
    defaults = AutoConfig.for_model(model_type)  # which fields the family has
    settings = dict(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers, vocab_size=vocab,
                    bos_token_id=0, eos_token_id=0, pad_token_id=0)
    settings.update({name: 0.0 for name in DROPOUT_FIELDS if hasattr(defaults, name)})
    if hasattr(defaults, "max_position_embeddings"):  # BLOOM has none: ALiBi positions have no limit
        settings["max_position_embeddings"] = positions
    if hasattr(defaults, "ffn_dim"):  # OPT: the MLP width (4d) and embedding size (d) that flops.py counts
        settings.update(ffn_dim=4 * hidden, word_embed_proj_dim=hidden)
    return AutoConfig.for_model(model_type, **settings)


EXPLAIN_TOKENS = 64  # T of the torch._dynamo.explain forward


def model_config(args):
    positions = max(max(args.tokens), max(args.contexts) + args.decode_steps + 1, args.compile_tokens, EXPLAIN_TOKENS)
    return stock_config(args.model_type, args.hidden, args.heads, args.layers, args.vocab, positions)


def attn_implementations(model_type: str) -> list[str]:
    """The attention implementations the stock family runs in transformers: sdpa and eager, or eager alone (BLOOM)."""
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.for_model(model_type))]
    return ["sdpa", "eager"] if model_class._supports_sdpa else ["eager"]


def build(spec: dict, args, device: torch.device, impl: str | None = None) -> PreTrainedModel:
    """The same random model (seed 0) for every mode, patched (and seeded from it) unless stock.

    `impl`: the attention implementation; by default the family's first (sdpa, or eager for BLOOM).
    """
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(args))
    model.set_attn_implementation(impl or attn_implementations(args.model_type)[0])
    if spec["mode"] != "stock":
        patch_model(model, spec["mode"], rank=spec["rank"], values=spec.get("values"))
    return model.to(device=device, dtype=DTYPES[args.dtype])


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def median_summary(times: list[float], per: int) -> dict:
    med = statistics.median(times)
    return {"times_s": times, "median_s": med, "min_s": min(times), "per_token_ms": 1e3 * med / per}


# --------------------------------------------------------------------------------------------- timing
def train_step(model: PreTrainedModel, ids: torch.Tensor) -> None:
    model(ids, labels=ids).loss.backward()


def bench_train(models: dict, specs: list[dict], args, device, impl: str, tokens: int, log) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, tokens), generator=gen).to(device)
    for model in models.values():
        model.set_attn_implementation(impl)
        model.train()
    times = {s["name"]: [] for s in specs}
    for rep in range(args.warmup + args.repeats):
        for spec in rotated(specs, rep):
            model = models[spec["name"]]
            elapsed = timed(lambda: train_step(model, ids), device)
            model.zero_grad(set_to_none=True)
            if rep >= args.warmup:
                times[spec["name"]].append(elapsed)
        log(f"  train {impl} T={tokens} repeat {rep + 1}/{args.warmup + args.repeats}: "
            + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items() if v))
    return {name: median_summary(t, args.batch * tokens) for name, t in times.items()}


def cache_bytes(cache: DynamicCache) -> dict:
    keys = sum(layer.keys.numel() * layer.keys.element_size() for layer in cache.layers)
    values = sum(layer.values.numel() * layer.values.element_size() for layer in cache.layers)
    shapes = [tuple(cache.layers[0].keys.shape), tuple(cache.layers[0].values.shape)]
    return {"k_bytes": keys, "v_bytes": values, "total_bytes": keys + values, "layer0_k_v_shapes": shapes}


@torch.no_grad()
def bench_decode(models: dict, specs: list[dict], args, device, impl: str, context: int, log) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, args.vocab, (args.batch, context), generator=gen).to(device)
    steps = torch.randint(0, args.vocab, (args.batch, args.decode_steps), generator=gen).to(device)
    caches, sizes = {}, {}
    for spec in specs:
        model = models[spec["name"]]
        model.set_attn_implementation(impl)
        model.eval()
        cache = DynamicCache()
        model(prefix, past_key_values=cache, use_cache=True)
        caches[spec["name"]] = cache
        sizes[spec["name"]] = cache_bytes(cache)

    def decode(model, cache):
        for i in range(args.decode_steps):
            model(steps[:, i : i + 1], past_key_values=cache, use_cache=True)

    def reset(cache):
        extra = cache.get_seq_length() - context
        if extra:
            cache.crop(-extra)  # back to the prefilled context (transformers 5 crops by a negative count)

    times = {s["name"]: [] for s in specs}
    for rep in range(args.warmup + args.decode_repeats):
        for spec in rotated(specs, rep):
            model, cache = models[spec["name"]], caches[spec["name"]]
            reset(cache)
            model(steps[:, :1], past_key_values=cache, use_cache=True)  # one untimed step: this model's weights back in cache
            reset(cache)
            elapsed = timed(lambda: decode(model, cache), device)
            if rep >= args.warmup:
                times[spec["name"]].append(elapsed)
        log(f"  decode {impl} ctx={context} repeat {rep + 1}/{args.warmup + args.decode_repeats}: "
            + ", ".join(f"{k} {1e3 * v[-1] / args.decode_steps:.2f}ms" for k, v in times.items() if v))
    del caches
    return {name: median_summary(t, args.batch * args.decode_steps) for name, t in times.items()}, sizes


def saved_activation_bytes(model: PreTrainedModel, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(ids, labels=ids).loss
    del loss
    return sum(seen.values())


# --------------------------------------------------------------------------------- peak memory (worker)
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(job: dict) -> dict:
    """One fresh process: build one model, run 2 AdamW training steps, report its peak memory over the baseline.

    CPU: peak RSS (VmHWM) minus the RSS after imports; the parent sets MALLOC_MMAP_THRESHOLD_ so that freed
    tensors go back to the OS and RSS tracks live bytes. The high-water mark is reset (clear_refs) after the
    model is built, so seeding's temporaries are not counted. CUDA: torch.cuda.max_memory_allocated.
    """
    args = argparse.Namespace(**job["args"])
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    (torch.randn(64, 64) @ torch.randn(64, 64)).sum()  # initialise the BLAS / thread pool before the baseline
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.init()
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_kib("VmRSS") * 1024
    model = build(job["spec"], args, device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, args.vocab, (args.batch, job["tokens"]), generator=torch.Generator().manual_seed(1)).to(device)
    after_build = torch.cuda.memory_allocated(device) if cuda else _rss_kib("VmRSS") * 1024
    reset = True
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            reset = False  # VmHWM then also covers building the model
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if cuda else _rss_kib("VmHWM") * 1024
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"peak_bytes": peak - base, "model_bytes": after_build - base, "param_bytes": params,
            "hwm_reset": reset, "method": "cuda.max_memory_allocated" if cuda else "VmHWM-VmRSS(baseline)"}


def bench_memory(specs: list[dict], args, tokens: int, log) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = {}
    for spec in specs:
        job = {"spec": spec, "tokens": tokens, "args": vars(args)}
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--memory-worker", json.dumps(job)],
            capture_output=True, text=True, env=env, check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker failed for {spec['name']} T={tokens}:\n{proc.stderr[-3000:]}")
        out[spec["name"]] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  peak memory T={tokens} {spec['name']}: {out[spec['name']]['peak_bytes'] / 2**20:.0f} MiB")
    return out


# -------------------------------------------------------------------------------------------- compile
def first_attention_call(model: PreTrainedModel, ids: torch.Tensor) -> tuple:
    """The first self-attention module of `model` and the inputs (args, kwargs) the model calls it with on `ids`."""
    spec = spec_for_patched(model) or spec_for_model(model)
    attn = next(module for module in model.modules() if isinstance(module, spec.attention_class))
    calls = []
    hook = attn.register_forward_pre_hook(lambda _, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        model(ids, use_cache=False)
    hook.remove()
    return attn, *calls[0]


def graph_breaks(model: PreTrainedModel, ids: torch.Tensor) -> dict:
    """torch._dynamo.explain of the first attention module (called as the model calls it) and of the whole model."""
    import torch._dynamo as dynamo

    dynamo.reset()
    attn, attn_args, attn_kwargs = first_attention_call(model, ids)
    out = {}
    for name, module, inputs, kwargs in (("attention", attn, attn_args, attn_kwargs), ("model", model, (ids,), {})):
        explained = dynamo.explain(module)(*inputs, **kwargs)
        out[name] = {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
                     "reasons": [str(b.reason)[:200] for b in explained.break_reasons]}
    dynamo.reset()
    return out


def bench_compile(models: dict, specs: list[dict], args, device, log) -> dict:
    """Inductor, fullgraph=True: compile time, max |Δlogits| against eager-mode PyTorch, and fwd+bwd speed.

    The loss is taken outside the compiled model (transformers' loss function logs a warning once, a graph break
    in stock GPT-2 too). Attention: sdpa, or eager for a family without sdpa (BLOOM).
    """
    import torch._dynamo as dynamo

    ids = torch.randint(0, args.vocab, (args.batch, args.compile_tokens), generator=torch.Generator().manual_seed(3))
    ids = ids.to(device)

    def step(fn):
        logits = fn(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return logits

    compiled, out = {}, {}
    for spec in specs:
        model = models[spec["name"]]
        model.set_attn_implementation(attn_implementations(args.model_type)[0])
        model.train()
        fn = torch.compile(model, fullgraph=True)
        start = time.perf_counter()
        logits = step(fn)
        synchronize(device)
        compile_s = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        diff = (logits.detach() - step(model).detach()).abs().max().item()
        model.zero_grad(set_to_none=True)
        compiled[spec["name"]] = fn
        out[spec["name"]] = {"compile_s": compile_s, "max_abs_logit_diff_vs_eager": diff}
        log(f"  compiled {spec['name']} (forward + backward) in {compile_s:.0f}s, max |Δlogit| vs eager {diff:.2e}")
    times = {s["name"]: [] for s in specs}
    for rep in range(args.warmup + args.repeats):
        for spec in rotated(specs, rep):
            fn, model = compiled[spec["name"]], models[spec["name"]]
            elapsed = timed(lambda: step(fn), device)
            model.zero_grad(set_to_none=True)
            if rep >= args.warmup:
                times[spec["name"]].append(elapsed)
    for name, t in times.items():
        out[name].update(median_summary(t, args.batch * args.compile_tokens))
    dynamo.reset()
    return out


# ----------------------------------------------------------------------------------------------- main
def analytic(specs: list[dict], args) -> dict:
    shape = dict(d=args.hidden, heads=args.heads, layers=args.layers, vocab=args.vocab)
    full = dict(d=768, heads=12, layers=12, vocab=50257)  # GPT-2 small itself, for reference
    out = {}
    for spec in specs:
        mode, rank, values = spec["mode"], spec["rank"], {"values": spec.get("values")}
        out[spec["name"]] = {
            "train": {str(t): flops.step_flops(mode, rank, tokens=t, **shape, **values) for t in args.tokens},
            "train_dense": {str(t): flops.step_flops(mode, rank, tokens=t, causal=False, **shape, **values)
                            for t in args.tokens},
            "decode": {str(c): flops.decode_flops(mode, rank, context=c, **shape, **values) for c in args.contexts},
            "train_gpt2_small": {str(t): flops.step_flops(mode, rank, tokens=t, **full, **values) for t in (256, 1024)},
            "decode_gpt2_small": {str(c): flops.decode_flops(mode, rank, context=c, **full, **values)
                                  for c in (512, 2048)},
            "qk_params_per_layer": flops.qk_parameters(mode, rank, args.hidden, args.heads),
        }
    return out


def machine(args, device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny T, 1 layer, vocab 1024, 2 repeats, sdpa only (eager for BLOOM)")
    p.add_argument("--model_type", default="gpt2", choices=CAUSAL_MODEL_TYPES,
                   help="the family of the stock model (config.model_type); the shape flags below apply to it")
    p.add_argument("--out", default=None, help="output folder (default: docs, or a temp folder with --quick)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--layers", type=int, default=2, help="GPT-2 small has 12; 2 keeps a CPU run short")
    p.add_argument("--vocab", type=int, default=8192, help="GPT-2 has 50257; smaller keeps the LM head from dominating")
    p.add_argument("--ranks", type=int, nargs="*", default=[64, 32, 16], help="lowrank ranks (none: no lowrank)")
    p.add_argument("--latent-ranks", type=int, nargs="*", default=[], help="latent ranks r_c (e.g. 768 256)")
    p.add_argument("--merged-values", action="store_true", help="also covariance with values='merged'")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], help="T of the training steps")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048], help="cache lengths for decoding")
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps timed per repeat")
    p.add_argument("--decode-repeats", type=int, default=21, help="repeats of the decode timing (cheap, noisy)")
    p.add_argument("--impls", nargs="+", default=None, choices=["sdpa", "eager"],
                   help="attention implementations timed (default: sdpa and eager; eager alone for BLOOM)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-explain", action="store_true", help="skip torch._dynamo.explain (graph breaks)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(fullgraph=True) (slow on CPU)")
    p.add_argument("--compile-tokens", type=int, default=512, help="T of the compiled step (> 256: two causal blocks)")
    p.add_argument("--label", default="", help="free text stored in the JSON (e.g. the machine's load)")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r}: allowed are cpu, cuda and cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            p.error(f"--device {args.device!r}, but this torch ({torch.__version__}) sees {count} CUDA GPU(s); use "
                    "--device cpu, another GPU index, or a CUDA build of torch on a GPU machine")
    for name in ("ranks", "latent_ranks", "tokens", "contexts"):
        if min(getattr(args, name), default=1) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: every value must be a positive integer")
    positive = ("hidden", "heads", "layers", "vocab", "batch", "repeats", "decode_steps", "decode_repeats", "compile_tokens")
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    for name in ("threads", "warmup"):
        if getattr(args, name) < 0:
            p.error(f"--{name} {getattr(args, name)}: must be 0 or more")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}; the model needs hidden = heads x "
                "head size")
    if max(args.ranks + args.latent_ranks, default=0) > args.hidden:
        p.error(f"--ranks {args.ranks} / --latent-ranks {args.latent_ranks}: a rank is at most the hidden size "
                f"({args.hidden})")
    supported = attn_implementations(args.model_type)
    if args.impls is None:
        args.impls = supported
    elif not set(args.impls) <= set(supported):
        p.error(f"--impls {' '.join(args.impls)}: stock {args.model_type} runs only {' and '.join(supported)} "
                f"attention in transformers {transformers.__version__}; pass --impls {' '.join(supported)} or drop "
                "--impls")
    if args.quick:
        args.layers, args.vocab, args.tokens, args.contexts = 1, 1024, [32, 64], [32, 64]
        args.decode_steps, args.repeats, args.decode_repeats, args.warmup, args.impls = 2, 2, 2, 1, supported[:1]
        args.no_memory, args.no_explain, args.compile_tokens = True, True, 32
        args.threads = args.threads or 1  # tiny shapes: a second OpenMP thread only waits on a shared machine
    if args.out is None:
        args.out = os.path.join(tempfile.gettempdir(), "hf_merged_attn_bench_quick") if args.quick else "docs"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.time()
    log = lambda msg: print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)  # noqa: E731
    specs = mode_specs(args.ranks, args.latent_ranks, args.merged_values)
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "command": command.strip(),
        "label": args.label,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": os.getloadavg(),
        "machine": machine(args, device),
        "config": {k: v for k, v in vars(args).items() if k != "memory_worker"},
        "modes": {s["name"]: dict(s) for s in specs},
        "analytic": analytic(specs, args),
        "train": {},
        "decode": {},
        "kv_cache": {},
        "saved_activation_bytes": {},
    }
    models = {s["name"]: build(s, args, device) for s in specs}
    for spec in specs:
        n = sum(p.numel() for p in models[spec["name"]].parameters())
        result["modes"][spec["name"]]["params_total"] = n
    log(f"built {len(models)} models on {device}, {torch.get_num_threads()} threads: "
        + ", ".join(f"{s['name']} {result['modes'][s['name']]['params_total'] / 1e6:.1f}M" for s in specs))

    for impl in args.impls:
        result["train"][impl] = {str(t): bench_train(models, specs, args, device, impl, t, log) for t in args.tokens}
    for impl in args.impls:
        result["decode"][impl] = {}
        for c in args.contexts:
            result["decode"][impl][str(c)], sizes = bench_decode(models, specs, args, device, impl, c, log)
            result["kv_cache"][str(c)] = sizes
    for t in args.tokens:
        ids = torch.randint(0, args.vocab, (args.batch, t), generator=torch.Generator().manual_seed(1)).to(device)
        result["saved_activation_bytes"][str(t)] = {}
        for spec in specs:
            model = models[spec["name"]]
            model.set_attn_implementation(attn_implementations(args.model_type)[0])
            result["saved_activation_bytes"][str(t)][spec["name"]] = saved_activation_bytes(model, ids)
            model.zero_grad(set_to_none=True)
    if not args.no_explain:
        ids = torch.randint(0, args.vocab, (args.batch, EXPLAIN_TOKENS), generator=torch.Generator().manual_seed(4))
        ids = ids.to(device)
        result["graph_breaks"] = {}
        for impl in args.impls:
            result["graph_breaks"][impl] = {}
            for spec in specs:
                model = models[spec["name"]].eval()
                model.set_attn_implementation(impl)
                result["graph_breaks"][impl][spec["name"]] = graph_breaks(model, ids)
            log(f"  dynamo.explain {impl}: " + ", ".join(
                f"{k} {v['model']['graphs']} graph(s)/{v['model']['graph_breaks']} breaks"
                for k, v in result["graph_breaks"][impl].items()))
    if args.compile:
        result["compiled"] = bench_compile(models, specs, args, device, log)
    del models
    gc.collect()
    if not args.no_memory:
        result["peak_memory"] = {str(t): bench_memory(specs, args, t, log) for t in args.tokens}
    result["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.time() - started

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(result, indent=1) + "\n")
    table = report.markdown(result)
    report.write_markdown(out / "benchmarks.md", table)
    report.plot(result, out / "benchmarks.png")
    print(table)
    log(f"wrote {out / 'benchmarks.json'}, {out / 'benchmarks.md'}, {out / 'benchmarks.png'}")
    return result


if __name__ == "__main__":
    main()
