"""The project's latent against what users would pick instead, on the same tokens: perplexity, bytes per token, decode.

    python benchmarks/peers.py --output_dir docs                           # the stand-in (4-layer GPT-2), ~5 min, 2 CPUs
    python examples/smollm2.py                                             # once: runs/SmolLM2-135M-Instruct
    python benchmarks/peers.py --model_name_or_path runs/SmolLM2-135M-Instruct --context 2048 --scored 256 \
        --windows 4 --kvpress_venv ../venv-kvpress --output_dir docs       # SmolLM2-135M, merged in (~2-3 h, 1 thread)
    python benchmarks/peers.py --dry_run --output_dir runs/peers_dry       # the CI dry run (tests/test_peers.py)
    python benchmarks/peers.py --report --output_dir docs                  # peers.md and peers.png again from peers.json

Peers install with `pip install -e ".[peers]"` (optimum-quanto, hqq). kvpress pins transformers<5.3, so it runs in its
own venv (--kvpress_venv PATH; the error says how to make one) through benchmarks/peers_kvpress.py, a self-contained
script that receives the token ids and returns its figures as JSON. vllm (its CPU build) is not compared.

Protocol, identical for every row: --windows disjoint, evenly spaced windows of --context + --scored tokens of the
Shakespeare test split. Each window: the first context - 1 tokens are one prefill into the row's cache, then every other
token is fed one at a time; the last --scored tokens are scored, each from a decode step that reads the cache as the
row stores it (a prefill attends its own keys unquantized and unpressed, so a full forward would measure nothing). The
stock row's loop through a plain DynamicCache must reproduce a full forward's logits (checked every run: an error if
not). Bytes per token: every tensor the filled cache holds after the window (codes, scales, zero points, full-precision
windows, kept tokens), divided by the tokens fed — measured, never computed from a formula.

Rows: stock (fp32); quanto int4 / int2 (residual window 0 and 128, axis 0 as transformers' docs advise, groups of 64); HQQ int8 / int4 (window 32,
groups of 32); fp8 (transformers' QuantizedCache("fp8"): keys and values stored as torch.float8_e4m3fn with one scale
per layer and tensor frozen at the prefill, upcast when read); a sliding window (DynamicSlidingWindowLayer) at
--sliding_windows; kvpress presses at --kvpress_ratios (Llama-family models only); the project's latent at
--latent_ranks (whitened seeding on the training split; rotary models keep --rope_pairs pairs by --rope_selection; with
--recover_steps, layer-wise recovery to stock after seeding) in a DynamicCache and in its int8 / int4 LatentQuantizedCache (every token quantized: residual_length 0).

Decode: ms per step at --time_batches (1 thread), every row but kvpress, each cache filled with --context random tokens
in its layout (the time does not depend on the values) then --time_steps steps timed, --time_repeats times, rows
interleaved; ratios against stock in the same run.

Writes peers.json (one entry per model: a run on another model is merged in, the entries of others are kept),
peers.md and peers.png (perplexity against bytes per token, one curve per method) to --output_dir.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer, QuantizedCache

from hf_merged_attn import LatentQuantizedCache, patch_model, recover_layerwise
from hf_merged_attn.calibration import evenly_spaced_blocks
from hf_merged_attn.evaluation import cache_bytes_per_token

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from run_record import portable  # examples/run_record.py: results files hold no machine paths

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
# transformers 5.25 renames past_key_values to cache; the floor (5.17) only knows past_key_values
warnings.filterwarnings("ignore", message=".*past_key_values.*is deprecated", category=FutureWarning)
STAND_IN = ROOT / "examples" / "shakespeare-gpt2"
SHAKESPEARE = ROOT / "examples" / "data" / "shakespeare"
KVPRESS_SCRIPT = Path(__file__).resolve().parent / "peers_kvpress.py"
KVPRESS_FAMILIES = ("llama", "mistral", "phi3", "qwen2", "qwen3", "gemma3", "gemma3_text")
KVPRESS_PRESSES = ("SnapKVPress", "StreamingLLMPress", "KnormPress", "ExpectedAttentionPress", "TOVAPress")
KVPRESS_INSTALL = "python3 -m venv {p} && {p}/bin/pip install torch==2.13.0 && {p}/bin/pip install kvpress==0.5.5"
CHECK_TOLERANCE = 1e-3  # the stock DynamicCache loop against a full forward: max |logit difference|


EXACT = "exact-RoPE latent"  # the rows of rope="exact" (rotary models)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=str(STAND_IN), help="an HF folder (default: the stand-in GPT-2)")
    p.add_argument("--context", type=int, default=128, help="tokens before the scored ones in each window")
    p.add_argument("--scored", type=int, default=128, help="tokens scored per window, each from a decode step")
    p.add_argument("--windows", type=int, default=8, help="disjoint windows of context + scored tokens")
    p.add_argument("--latent_ranks", type=int, nargs="+", default=None,
                   help="r_c of the latent rows (default: d/2, d/4, d/8; rotary: G·hd/2, /4, /8)")
    p.add_argument("--rope_pairs", type=int, default=4, help="rotary models: kept pairs per KV head")
    p.add_argument("--rope_selection", default="rorope", help="rotary models: which pairs stay rotated")
    p.add_argument("--exact_ranks", type=int, nargs="*", default=None,
                   help="rotary models: r_c of the exact-RoPE latent rows (default: 1/2, 5/16 and 1/8 of 2·G·hd; none: "
                        "no such rows)")
    p.add_argument("--keep_rows", action="store_true",
                   help="keep the rows of this model's entry in peers.json that this run does not measure (with --only), "
                        "when they scored the same windows (the stock row must reproduce its loss)")
    p.add_argument("--calibration_blocks", type=int, default=16)
    p.add_argument("--calibration_length", type=int, default=256)
    p.add_argument("--recover_steps", type=int, default=0,
                   help="layer-wise recovery of each latent model (recover_layerwise, steps per layer; 0: none)")
    p.add_argument("--sliding_windows", type=int, nargs="+", default=None,
                   help="sliding-window sizes (default: context/8, /4 and /2)")
    p.add_argument("--kvpress_venv", type=Path, default=None,
                   help="a venv with kvpress (Llama-family models; without it the kvpress rows are listed as not run)")
    p.add_argument("--kvpress_presses", nargs="+", default=list(KVPRESS_PRESSES))
    p.add_argument("--kvpress_ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9], help="fractions evicted")
    p.add_argument("--only", nargs="+", default=None, help="measure only rows whose name starts with one of these "
                   "(stock always runs); the others are listed as not run")
    p.add_argument("--time_batches", type=int, nargs="*", default=[1, 8], help="decode timing batches (none: no timing)")
    p.add_argument("--time_steps", type=int, default=32)
    p.add_argument("--time_repeats", type=int, default=3)
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--dry_run", action="store_true",
                   help="context 32, 8 scored, 1 window, 2 timed steps x 1 repeat at batch 1 and 2 (the CI test)")
    p.add_argument("--output_dir", type=Path, default=Path("runs/peers"))
    p.add_argument("--report", action="store_true",
                   help="measure nothing: regenerate peers.md and peers.png from --output_dir/peers.json")
    args = p.parse_args(argv)
    if args.dry_run:
        args.context, args.scored, args.windows = 32, 8, 1
        args.time_batches, args.time_steps, args.time_repeats = [1, 2], 2, 1
        args.calibration_blocks, args.calibration_length = 4, 32
    if args.recover_steps < 0:
        p.error(f"--recover_steps must be >= 0; got {args.recover_steps}.")
    for name in ("context", "scored", "windows", "calibration_blocks", "calibration_length", "time_steps",
                 "time_repeats", "num_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(args, name)}.")
    if args.context < 2:
        p.error("--context must be >= 2: the prefill holds context - 1 tokens.")
    if any(w < 2 for w in args.sliding_windows or []) or any(r < 1 for r in args.latent_ranks or []):
        p.error(f"--sliding_windows must be >= 2 and --latent_ranks >= 1; got {args.sliding_windows}, {args.latent_ranks}.")
    if any(b < 1 for b in args.time_batches):
        p.error(f"--time_batches must be >= 1; got {args.time_batches}.")
    if any(not 0 < r < 1 for r in args.kvpress_ratios):
        p.error(f"--kvpress_ratios are fractions of the prefill evicted, in (0, 1); got {args.kvpress_ratios}.")
    if not Path(args.model_name_or_path).is_dir():
        p.error(f"--model_name_or_path {args.model_name_or_path!r} is not a folder (the Hub is not used); for SmolLM2 "
                "run `python examples/smollm2.py` first, which writes runs/SmolLM2-135M-Instruct.")
    if args.kvpress_venv is not None and not (args.kvpress_venv / "bin" / "python").exists():
        p.error(f"--kvpress_venv {args.kvpress_venv}: no venv there (no bin/python). Make it with\n    "
                + KVPRESS_INSTALL.format(p=args.kvpress_venv)
                + "\n(kvpress pins transformers<5.3, which this project does not run on: it needs its own venv).")
    return args


# ------------------------------------------------------------------------------------------------ measuring caches
def tensors_of(obj) -> list[torch.Tensor]:
    """Every plain tensor inside `obj`: tensors, tensor subclasses (quanto's QTensors: their inner tensors), tuples,
    lists and dicts (HQQ's metadata)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return [t for name in names for t in tensors_of(getattr(obj, name))]
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in tensors_of(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in tensors_of(item)]
    return []


def stored_bytes(cache: Cache) -> int:
    """Bytes of every tensor a filled cache holds: keys and values in the model's dtype (full-precision windows
    included), and the quantized states of transformers' quantized layers (codes, scales, zero points) or the
    project's `stored_tensors`. Each tensor counted once."""
    seen, total = set(), 0
    for layer in cache.layers:
        if hasattr(layer, "stored_tensors"):
            parts = layer.stored_tensors()
        else:
            parts = [getattr(layer, "keys", None), getattr(layer, "values", None),
                     getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)]
        for t in tensors_of(parts):
            key = (t.data_ptr(), t.numel(), t.dtype)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------------ the rows
def sliding_cache(config, window: int) -> Cache:
    """A cache whose every layer keeps the last `window` - 1 tokens, attending them and the new one (transformers 5.x
    has no SinkCache: no attention sinks)."""
    layers = config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[DynamicSlidingWindowLayer(sliding_window=window) for _ in range(layers)])


def fp8_cache(config) -> QuantizedCache:
    """transformers' fp8 QuantizedCache: keys and values as float8_e4m3fn, one scale per layer and tensor set by the
    prefill's amplitude and frozen, upcast to the model's dtype when read (no full-precision window)."""
    return QuantizedCache("fp8", config)


def peer_rows(config, args) -> list[dict]:
    """name, curve, the model it runs on ('stock'), and a factory of its empty cache."""
    rows = [{"name": "stock", "curve": "stock", "model": "stock", "cache": lambda: DynamicCache(config=config)}]
    for bits in (4, 2):
        for residual in (0, 128):
            rows.append({"name": f"quanto int{bits}, residual {residual}", "curve": "quanto (transformers)",
                         "model": "stock", "backend": "optimum-quanto",
                         "cache": lambda b=bits, r=residual: QuantizedCache(
                             "quanto", config, nbits=b, axis_key=0, axis_value=0, q_group_size=64, residual_length=r)})
    for bits in (8, 4):  # groups of 32: with 64, int4 packing fails on an odd number of groups (3 KV heads, odd length)
        rows.append({"name": f"HQQ int{bits}, residual 32", "curve": "HQQ (transformers)", "model": "stock",
                     "backend": "hqq", "cache": lambda b=bits: QuantizedCache(
                         "hqq", config, nbits=b, axis_key=1, axis_value=1, q_group_size=32, residual_length=32)})
    rows.append({"name": "fp8 (e4m3, per-tensor scale)", "curve": "fp8 (transformers)", "model": "stock",
                 "cache": lambda: fp8_cache(config)})
    for window in args.sliding_windows:
        rows.append({"name": f"sliding window {window}", "curve": "sliding window", "model": "stock",
                     "cache": lambda w=window: sliding_cache(config, w)})
    return rows


def latent_rows(config, ranks: list[int], prefix: str = "latent") -> list[dict]:
    """The project's rows: the latent at each r_c in a DynamicCache and its int8 / int4 LatentQuantizedCache (groups of
    at most 32 channels that divide r_c). `prefix` names the route ("latent", or "exact-RoPE latent")."""
    rows = []
    for r_c in ranks:
        rows.append({"name": f"{prefix} r_c={r_c}", "curve": f"{prefix} (fp32 cache)", "model": f"{prefix}{r_c}",
                     "cache": lambda: DynamicCache(config=config)})
        group = max(g for g in range(1, 33) if r_c % g == 0) if prefix != "latent" else None
        for bits in (8, 4):
            rows.append({"name": f"{prefix} r_c={r_c}, int{bits}", "curve": f"{prefix}, int{bits} cache",
                         "model": f"{prefix}{r_c}", "cache": lambda b=bits, g=group: LatentQuantizedCache(
                             config, nbits=b, residual_length=0, q_group_size=g)})
    return rows


def backend_problem(row: dict) -> str | None:
    """Why a row's backend cannot run here (with what to install), or None."""
    backend = row.get("backend")
    if backend is None:
        return None
    module = {"optimum-quanto": "optimum.quanto", "hqq": "hqq"}[backend]
    try:
        __import__(module)
    except ImportError as error:
        return (f"row {row['name']!r} needs {backend}, which does not import ({error}). Install the peers with "
                "`pip install -e \".[peers]\"` (optimum-quanto, hqq), or leave the row out with --only.")
    return None


# ------------------------------------------------------------------------------------------------ scoring
def text_windows(tokenizer, args) -> torch.Tensor:
    """(windows, context + scored) token ids: disjoint, evenly spaced windows of the Shakespeare test split."""
    ids = torch.tensor(tokenizer((SHAKESPEARE / "test.txt").read_text(encoding="utf-8"))["input_ids"])
    length = args.context + args.scored
    if ids.numel() < args.windows * length:
        raise ValueError(f"the test split has {ids.numel()} tokens: too few for {args.windows} windows of {length}.")
    return evenly_spaced_blocks(ids, args.windows, length)


@torch.no_grad()
def score(model, windows: torch.Tensor, context: int, make_cache, check: bool = False) -> dict:
    """NLL of the last `scored` tokens of each window (per token, in order: "nll"), each from a decode step after a
    prefill of context - 1 tokens into `make_cache()`; the stored bytes per fed token of the filled cache (mean over
    windows). With `check`, the loop's logits against one full forward of the window (max |difference|)."""
    nll, per_token, worst = [], [], 0.0
    for window in windows:
        ids = window.unsqueeze(0)
        cache = make_cache()
        model(ids[:, : context - 1], past_key_values=cache, use_cache=True, logits_to_keep=1)  # no LM head over the prefill
        step_logits = []
        for t in range(context - 1, ids.shape[1] - 1):
            step_logits.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[0, -1].float())
        logits = torch.stack(step_logits)  # (scored, vocab): position t predicts token t + 1
        nll += nn.functional.cross_entropy(logits, window[context:], reduction="none").tolist()
        per_token.append(stored_bytes(cache) / (ids.shape[1] - 1))
        if check:
            full = model(ids[:, :-1], logits_to_keep=logits.shape[0]).logits[0].float()  # positions context - 1 on
            worst = max(worst, (full - logits).abs().max().item())
    loss = statistics.mean(nll)
    result = {"perplexity": math.exp(loss), "loss": loss, "tokens": len(nll), "nll": nll,
              "bytes_per_token": statistics.mean(per_token)}
    if check:
        result["loop_vs_full_forward_max_abs"] = worst
    if not isinstance(cache, QuantizedCache) and all(not getattr(l, "is_sliding", False) for l in cache.layers):
        result["bytes_per_token_project"] = cache_bytes_per_token(cache)  # the project's measure, same cache
    return result


# ------------------------------------------------------------------------------------------------ decode timing
def layouts(model) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per layer, (heads, width) of the key slot and of the value slot, read off a 2-token DynamicCache."""
    cache = DynamicCache(config=model.config)
    model(torch.zeros(1, 2, dtype=torch.long), past_key_values=cache, use_cache=True)
    return [((l.keys.shape[1], l.keys.shape[-1]), (l.values.shape[1], l.values.shape[-1])) for l in cache.layers]


@torch.no_grad()
def time_decode(models: dict, rows: list[dict], batch: int, args, vocab: int) -> dict:
    """Median ms per decode step of every row at `batch`, rows interleaved (the first rotating)."""
    shapes = {name: layouts(model) for name, model in models.items()}
    token = torch.randint(1, vocab, (batch, 1), generator=torch.Generator().manual_seed(0))
    times = {row["name"]: [] for row in rows}
    for repeat in range(args.time_repeats):
        shift = repeat % len(rows)
        for row in rows[shift:] + rows[:shift]:
            model, cache = models[row["model"]], row["cache"]()
            # a rotary latent layer's value slot holds its rotary keys, kept whole (as its attention updates it)
            extra = ({"full_precision_values": True} if isinstance(cache, LatentQuantizedCache)
                     and any(getattr(m, "rotary", False) for m in model.modules()) else {})
            for i, ((kh, kw), (vh, vw)) in enumerate(shapes[row["model"]]):
                cache.update(torch.randn(batch, kh, args.context, kw), torch.randn(batch, vh, args.context, vw), i, **extra)
            model(token, past_key_values=cache, use_cache=True)  # one untimed step
            begin = time.perf_counter()
            for _ in range(args.time_steps):
                model(token, past_key_values=cache, use_cache=True)
            times[row["name"]].append((time.perf_counter() - begin) / args.time_steps * 1e3)
            del cache
    stock = statistics.median(times["stock"])
    return {name: {"ms_per_step": statistics.median(t), "min_ms": min(t), "times_ms": t,
                   "vs_stock": statistics.median(t) / stock}
            for name, t in times.items()}


# ------------------------------------------------------------------------------------------------ kvpress
def run_kvpress(args, windows: torch.Tensor) -> dict:
    """The kvpress rows, in --kvpress_venv (benchmarks/peers_kvpress.py): {row name: figures}."""
    request = {"model": str(Path(args.model_name_or_path).resolve()), "windows": windows.tolist(),
               "context": args.context, "presses": args.kvpress_presses, "ratios": args.kvpress_ratios,
               "num_threads": args.num_threads}
    proc = subprocess.run([str(args.kvpress_venv / "bin" / "python"), str(KVPRESS_SCRIPT)], input=json.dumps(request),
                          capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": ""})
    if proc.returncode != 0:
        raise RuntimeError(f"the kvpress run in {args.kvpress_venv} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main
def machine(args) -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} torch thread(s) of {os.cpu_count()} cores, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report:
        path = args.output_dir / "peers.json"
        if not path.exists():
            raise FileNotFoundError(f"--report reads {path}, which does not exist: run a measurement first.")
        runs = json.loads(path.read_text())["runs"]
        (args.output_dir / "peers.md").write_text(markdown(runs), encoding="utf-8")
        plot(runs, args.output_dir / "peers.png")
        return runs
    torch.set_num_threads(args.num_threads)
    start = time.time()
    stock = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32).eval()
    stock.set_attn_implementation("sdpa")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    config = stock.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and args.context + args.scored > positions:
        raise ValueError(f"--context {args.context} + --scored {args.scored} exceeds the model's {positions} positions.")
    if positions is not None and args.time_batches and args.context + args.time_steps + 1 > positions:
        raise ValueError(f"--context {args.context} + --time_steps {args.time_steps} + 1 exceeds the model's {positions} "
                         "positions (the timed decode continues the context).")
    rotary = config.model_type in ("llama", "qwen2", "mistral")
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    full = kv_heads * head_dim if rotary else config.hidden_size
    ranks = args.latent_ranks or [full // 2, full // 4, full // 8]
    args.sliding_windows = args.sliding_windows or sorted({max(2, args.context // k) for k in (8, 4, 2)})
    kvpress_ok = config.model_type in KVPRESS_FAMILIES
    if args.kvpress_venv is not None and not kvpress_ok:
        raise ValueError(f"kvpress hooks {KVPRESS_FAMILIES} only, not {config.model_type}: drop --kvpress_venv.")

    exact = [] if not rotary else (args.exact_ranks if args.exact_ranks is not None else
                                   [2 * full // 2, 2 * full * 5 // 16, 2 * full // 8])
    rows = peer_rows(config, args)
    names = [row["name"] for row in rows + latent_rows(config, ranks) + latent_rows(config, exact, EXACT)]
    unmatched = [o for o in args.only or [] if not any(n.startswith(o) for n in names)]
    if unmatched:
        raise ValueError(f"--only {unmatched} matches no row; the rows: {names}.")
    for row in rows:  # a backend a row needs must import: an error now, before any long work
        problem = backend_problem(row) if args.only is None or any(row["name"].startswith(o) for o in args.only) else None
        if problem:
            raise RuntimeError(problem)
    windows = text_windows(tokenizer, args)
    train = torch.tensor(tokenizer((SHAKESPEARE / "train.txt").read_text(encoding="utf-8"))["input_ids"])
    calibration = [evenly_spaced_blocks(train, args.calibration_blocks, min(args.calibration_length, positions or 10**9))]
    models = {"stock": stock}
    wanted = lambda name: name == "stock" or args.only is None or any(name.startswith(o) for o in args.only)
    for r_c in ranks:
        if not wanted(f"latent r_c={r_c}"):
            continue
        rope = {"rope_pairs": args.rope_pairs, "rope_selection": args.rope_selection} if rotary else {}
        models[f"latent{r_c}"] = patch_model(copy.deepcopy(stock), "latent", rank=r_c, init="whitened",
                                             calibration=calibration, **rope)
        if args.recover_steps:
            recover_layerwise(models[f"latent{r_c}"], stock, calibration, steps=args.recover_steps, show_progress=False)
        models[f"latent{r_c}"].set_attn_implementation("sdpa")
    for r_c in exact:  # the exact-RoPE latent: every pair rotated, keys rebuilt from c
        if not wanted(f"{EXACT} r_c={r_c}"):
            continue
        models[f"{EXACT}{r_c}"] = patch_model(copy.deepcopy(stock), "latent", rank=r_c, rope="exact", init="whitened",
                                              calibration=calibration)
        if args.recover_steps:
            recover_layerwise(models[f"{EXACT}{r_c}"], stock, calibration, steps=args.recover_steps,
                              show_progress=False)
        models[f"{EXACT}{r_c}"].set_attn_implementation("sdpa")
    rows += latent_rows(config, ranks) + latent_rows(config, exact, EXACT)

    results, not_run = {}, {}
    for row in rows:
        if not wanted(row["name"]):
            not_run[row["name"]] = "left out by --only"
            continue
        t0 = time.time()
        figures = score(models[row["model"]], windows, args.context, row["cache"], check=row["name"] == "stock")
        if row["name"] == "stock" and figures["loop_vs_full_forward_max_abs"] > CHECK_TOLERANCE:
            raise RuntimeError(f"the token-by-token loop through a DynamicCache differs from a full forward by "
                               f"{figures['loop_vs_full_forward_max_abs']:.2e} (> {CHECK_TOLERANCE}): the protocol is broken.")
        results[row["name"]] = {"curve": row["curve"], "project": row["model"] != "stock", **figures,
                                "seconds": time.time() - t0}
        print(f"{row['name']}: perplexity {figures['perplexity']:.3f}, {figures['bytes_per_token']:,.0f} B/token "
              f"({time.time() - t0:.0f} s)", flush=True)

    kv_names = [f"kvpress {p.removesuffix('Press')} {round(r * 100)}%" for p in args.kvpress_presses
                for r in args.kvpress_ratios]
    if not kvpress_ok:
        reason = f"kvpress hooks {', '.join(KVPRESS_FAMILIES)} only, not {config.model_type}"
        not_run.update({"kvpress (every press)": reason})
    elif args.kvpress_venv is None:
        not_run.update({name: "no --kvpress_venv given" for name in kv_names})
    else:
        kv = run_kvpress(args, windows)
        gap = abs(kv["stock"]["loss"] - results["stock"]["loss"])
        if gap > 1e-3:
            raise RuntimeError(f"stock in the kvpress venv scores {kv['stock']['loss']:.5f} nats/token against "
                               f"{results['stock']['loss']:.5f} here: not the same tokens or model.")
        for name, figures in kv["rows"].items():
            if "error" in figures:
                not_run[name] = figures["error"]
            else:
                results[name] = {"curve": figures["curve"], "project": False, **figures}
        results["stock"]["kvpress_env"] = {"loss": kv["stock"]["loss"], "versions": kv["versions"]}

    reference = results["stock"]["nll"]
    for figures in results.values():  # the same tokens in every row: paired differences against stock
        figures["delta_nll"], figures["delta_nll_se"] = paired(figures.pop("nll"), reference)

    timing = {}
    measured = [row for row in rows if row["name"] in results]
    for batch in args.time_batches:
        timing[str(batch)] = time_decode(models, measured, batch, args, config.vocab_size)
        print(f"decode, batch {batch}: " + ", ".join(f"{n} {t['vs_stock']:.2f}x" for n, t in timing[str(batch)].items()),
              flush=True)
    for name, figures in results.items():
        figures["decode"] = {b: timing[b][name] for b in timing if name in timing[b]}

    record = {
        "command": "python benchmarks/peers.py " + shlex.join(portable(a) for a in (sys.argv[1:] if argv is None else argv)),
        "model": Path(args.model_name_or_path).name, "model_type": config.model_type, "rotary": rotary,
        "args": portable({k: v for k, v in vars(args).items() if k != "output_dir"}),
        "machine": machine(args), "wall_time_s": None, "rows": results, "not_run": not_run,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, **peer_versions()},
    }
    record["wall_time_s"] = time.time() - start
    if args.keep_rows:
        keep_rows(record, args.output_dir / "peers.json")
    write(record, args.output_dir)
    return record


def keep_rows(record: dict, path: Path) -> None:
    """Copy into `record` the rows of its model's previous entry in `path` that it did not measure, when both runs
    scored the same windows: same context, scored tokens and windows, and a stock loss equal to 1e-6 nats (so the
    previous rows' paired ΔNLL is against the same stock). Each kept row says which run measured it."""
    previous = (json.loads(path.read_text())["runs"] if path.exists() else {}).get(record["model"])
    if previous is None:
        raise ValueError(f"--keep_rows: {path} has no entry for {record['model']} to keep rows from.")
    same = all(previous["args"].get(k) == record["args"].get(k) for k in ("context", "scored", "windows"))
    gap = abs(previous["rows"]["stock"]["loss"] - record["rows"]["stock"]["loss"])
    if not same or gap > 1e-6:
        raise ValueError(f"--keep_rows: the previous {record['model']} run scored other windows or another stock (stock "
                         f"loss {previous['rows']['stock']['loss']:.6f} vs {record['rows']['stock']['loss']:.6f}); "
                         "measure every row again instead.")
    for name, row in previous["rows"].items():
        if name not in record["rows"]:
            record["rows"][name] = {**row, "kept_from": previous["command"]}
            record["not_run"].pop(name, None)
    for name, reason in previous.get("not_run", {}).items():
        if name not in record["rows"] and reason != "left out by --only":
            record["not_run"].setdefault(name, reason)
    record["kept_from"] = previous["command"]


def paired(nll: list[float], reference: list[float]) -> tuple[float, float]:
    """Mean per-token NLL difference (nats) against the reference on the same tokens, and its standard error."""
    if len(nll) != len(reference):
        raise RuntimeError(f"{len(nll)} scored tokens against {len(reference)}: the rows did not score the same tokens.")
    diff = [a - b for a, b in zip(nll, reference)]
    se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return statistics.mean(diff), se


def peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("optimum-quanto", "hqq"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# ------------------------------------------------------------------------------------------------ report
def dominance(rows: dict) -> dict:
    """For every measured peer row: the project rows with no more bytes per token and no worse perplexity."""
    project = {n: r for n, r in rows.items() if r["project"]}
    return {name: sorted((n for n, p in project.items() if p["bytes_per_token"] <= r["bytes_per_token"]
                          and p["perplexity"] <= r["perplexity"]), key=lambda n: project[n]["bytes_per_token"])
            for name, r in rows.items() if not r["project"] and name != "stock"}


def write(record: dict, output_dir: Path) -> None:
    """Merge `record` into output_dir/peers.json (one entry per model) and regenerate peers.md and peers.png."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "peers.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    runs[record["model"]] = record
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n", encoding="utf-8")
    (output_dir / "peers.md").write_text(markdown(runs), encoding="utf-8")
    plot(runs, output_dir / "peers.png")
    print(markdown(runs))


SMOLLM2_COMMAND = ("python benchmarks/peers.py --model_name_or_path runs/SmolLM2-135M-Instruct --context 2048 --scored 256 "
                   "--windows 4 --kvpress_venv ../venv-kvpress --output_dir docs")
NOTES = {"shakespeare-gpt2": "The shipped 4-layer stand-in (d = 256, 4 heads, 256 positions): its perplexity hardly "
                             "depends on far context (a 32-token window costs a few percent), so every cache scores "
                             "about the same here and differences of a few tenths are noise (see ΔNLL ± 2 SE); a real "
                             "model is the test of the caches."}


def markdown(runs: dict) -> str:
    lines = ["# Side by side with the peers: quantized KV caches, sliding windows, kvpress", "",
             "Generated by [benchmarks/peers.py](../benchmarks/peers.py) (the protocol is in its docstring); every "
             "section below is one run of it, merged into [peers.json](peers.json). Every row scores the same tokens "
             "one decode step at a time after a prefill of the context into its own cache (a prefill attends its own "
             "keys unquantized and unpressed, so a full forward would measure nothing); bytes per token are measured "
             "on the filled caches (every tensor held — codes, scales, zero points, full-precision windows, kept "
             "tokens — divided by the tokens fed). ΔNLL: the mean per-token difference to stock on the same tokens, "
             "nats, ± two standard errors of that paired difference. Decode times: ms per step against stock in the "
             "same run, 1 thread. Bold: the project's rows.", "", "![perplexity against bytes per token](peers.png)", ""]
    for model, rec in runs.items():
        a, rows = rec["args"], rec["rows"]
        stock = rows["stock"]
        batches = sorted({b for r in rows.values() for b in r.get("decode", {})}, key=int)
        recovered = f", then layer-wise recovery of {a['recover_steps']} steps per layer" if a.get("recover_steps") else ""
        rope = f", rope_pairs={a['rope_pairs']} by {a['rope_selection']}" if rec["rotary"] else ""
        lines += [f"## {model}", ""] + ([NOTES[model], ""] if model in NOTES else []) + [
            f"`{rec['command']}` — {rec['machine']}; {a['windows']} window(s) of {a['context']} + {a['scored']} tokens "
            f"of the Shakespeare test split ({stock['tokens']} scored), fp32; wall time {rec['wall_time_s'] / 60:.1f} "
            "min. Versions: " + ", ".join(f"{k} {v}" for k, v in rec["versions"].items())
            + (f"; kvpress {stock['kvpress_env']['versions']['kvpress']} under transformers "
               f"{stock['kvpress_env']['versions']['transformers']} (its stock row: {stock['kvpress_env']['loss']:.5f} "
               f"nats/token, here {stock['loss']:.5f})" if "kvpress_env" in stock else "")
            + f". The latent: whitened seeding on {a['calibration_blocks']} blocks of {a['calibration_length']} training "
            f"tokens{rope}{recovered}, no fine-tuning"
            + ("; the exact-RoPE latent (rope='exact'): every pair rotated, the cache holds c and each token's position, "
               "int8 / int4 codes in groups of at most 32 channels" if any(n.startswith(EXACT) for n in rows) else "")
            + f". Stock's loop through a DynamicCache matches a full forward to "
            f"{stock['loop_vs_full_forward_max_abs']:.1e} (max |logit difference|).",
            "", "| row | perplexity (× stock) | ΔNLL ± 2 SE | bytes / token (× stock) | "
            + " | ".join(f"decode ms, batch {b} (× stock)" for b in batches) + " |",
            "|---|---|---|---|" + "---|" * len(batches)]
        for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["bytes_per_token"]):
            cells = [f"{r['decode'][b]['ms_per_step']:.1f} ({r['decode'][b]['vs_stock']:.2f})" if b in r.get("decode", {})
                     else "not timed" for b in batches]
            label = (f"**{name}**" if r["project"] else name) + (" †" if "kept_from" in r else "")
            lines.append(f"| {label} | {r['perplexity']:.3f} ({r['perplexity'] / stock['perplexity']:.3f}) | "
                         f"{r['delta_nll']:+.4f} ± {2 * r['delta_nll_se']:.4f} | "
                         f"{r['bytes_per_token']:,.0f} ({r['bytes_per_token'] / stock['bytes_per_token']:.3f}) | "
                         + " | ".join(cells) + " |")
        if rec.get("kept_from"):
            lines += ["", f"† measured by an earlier run on the same windows and stock (`{rec['kept_from']}`), its decode "
                      "times from that run's machine load; the others by the command above (`--keep_rows`)."]
        if rec["not_run"]:
            lines += ["", "**Not run**: " + "; ".join(f"{n} ({why})" for n, why in rec["not_run"].items()) + "."]
        wins = dominance(rows)
        free = [n for n, by in wins.items() if not by]
        lines += ["", f"Dominance: {len(wins) - len(free)} of {len(wins)} peer rows have a project row with no more "
                  "bytes per token and no worse perplexity."]
        if free:
            lines.append("**Where a peer wins** (no project row at or below its bytes per token with a perplexity as "
                         "good): " + "; ".join(f"{n} ({rows[n]['perplexity']:.3f} at {rows[n]['bytes_per_token']:,.0f} "
                                               f"B{margin(rows, n)})" for n in free) + ".")
        if "8" in batches:
            slower = [n for n, r in rows.items() if r["project"] and r.get("decode", {}).get("8", {}).get("vs_stock", 0) > 1]
            lines.append("Decode at batch 8: " + ("every project row is at most stock's time." if not slower else
                         "**slower than stock**: " + ", ".join(f"{n} ({rows[n]['decode']['8']['vs_stock']:.2f}×)"
                                                                for n in slower) + "."))
        lines.append("")
    if not any(rec["rotary"] for rec in runs.values()):
        lines += ["## SmolLM2-135M (not measured yet)", "", "The real-model run takes hours on 2 CPU cores; its command "
                  "(after `python examples/smollm2.py`, and a kvpress venv made as `--kvpress_venv`'s error says):", "",
                  f"    {SMOLLM2_COMMAND}", ""]
    lines += ["## How the peers are built", "",
              "- quanto and HQQ: transformers' `QuantizedCache` (quanto: int4 / int2, axis 0, groups of 64; HQQ: int8 / "
              "int4, axis 1, groups of 32 — with 64 its int4 packing fails where heads × length is odd). transformers "
              "quantizes the whole prefill at once and keeps later tokens in fp32 until the residual window is full, "
              "then requantizes everything: their bytes per token depend on where the length falls (measured after "
              "the last token of each window).",
              "- fp8: transformers' `QuantizedCache(\"fp8\")`: keys and values stored as float8_e4m3fn with one scale "
              "per layer and tensor, set by the prefill's amplitude and frozen, upcast to fp32 when read.",
              "- sliding window: a cache of transformers' `DynamicSlidingWindowLayer`s (the last window − 1 tokens and the "
              "new one; no attention sinks — transformers 5 has no SinkCache).",
              "- kvpress: its presses prune the prefill only (the decoded tokens are all kept), in their own venv "
              "(kvpress pins transformers < 5.3) through benchmarks/peers_kvpress.py, on the same token ids; its stock "
              "row must match this one. It hooks Llama, Mistral, Phi-3, Qwen2/3 and Gemma 3 only: not the GPT-2 "
              "stand-in. Not timed (the decode is a plain cache of the kept tokens).",
              "- the project: `patch_model(model, \"latent\", rank=r_c, init=\"whitened\", calibration=...)` in a "
              "DynamicCache, and in `LatentQuantizedCache(nbits=8 / 4, residual_length=0)` (every token quantized; one "
              "scale and minimum per token; a rotary latent's rotary keys stay fp32).",
              "- decode timing: each cache filled with `--context` random tokens in its layout (time does not depend on "
              "the values), one untimed step, then `--time_steps` timed; rows with a residual window flush every R "
              "steps (HQQ's 32 inside the 32 timed steps, quanto's 128 not: its figure leaves the flush out).",
              "- not compared: vllm (its CPU build) — optional, skipped.", ""]
    return "\n".join(lines)


def margin(rows: dict, peer: str) -> str:
    """', closest project row X: ΔNLL d ± 2 SE' for the project row with the best perplexity at or below the peer's
    bytes (the comparison is unpaired between rows, so the SE is the larger of the two rows' own)."""
    cheaper = [n for n, r in rows.items() if r["project"] and r["bytes_per_token"] <= rows[peer]["bytes_per_token"]]
    if not cheaper:
        return ", no project row at or below these bytes"
    best = min(cheaper, key=lambda n: rows[n]["perplexity"])
    gap = rows[best]["delta_nll"] - rows[peer]["delta_nll"]
    se = max(rows[best]["delta_nll_se"], rows[peer]["delta_nll_se"])
    noise = " (within 2 SE: noise)" if abs(gap) <= 2 * se else ""
    return f"; best project row at or below: {best}, {rows[best]['perplexity']:.3f}, ΔNLL {gap:+.4f}{noise}"


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 5), squeeze=False)
    for ax, (model, rec) in zip(axes[0], runs.items()):
        curves: dict[str, list] = {}
        for r in rec["rows"].values():
            curves.setdefault(r["curve"], []).append((r["bytes_per_token"], r["perplexity"], r["project"]))
        for curve, points in curves.items():
            points.sort()
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            style = ({"marker": "*", "markersize": 14, "linestyle": ""} if curve == "stock"
                     else {"marker": "o" if points[0][2] else "x"})
            ax.plot(xs, ys, label=curve, linewidth=2.5 if points[0][2] else 1, **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("KV-cache bytes per token (measured on the filled cache)")
        ax.set_ylabel("perplexity (token by token after a prefill)")
        ax.set_title(f"{model}{' (the stand-in)' if model in NOTES else ''}: {rec['args']['context']} + {rec['args']['scored']} tokens × {rec['args']['windows']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
