"""Perplexity against KV-cache bytes per token on the shipped stand-in, right after patching (no fine-tune).

    python examples/cache_sweep.py --output_dir docs
    python examples/cache_sweep.py --model_name_or_path runs/SmolLM2-135M-Instruct --rope_pairs 4 \
        --output_dir runs/cache_sweep_smollm2          # a rotary model (Llama, Qwen2, Mistral): the latent only

For each configuration: the perplexity of the validation split (first 16,384 tokens, windows of 256 with stride
256: MATH.md's reference settings) and the KV-cache bytes per token measured on the cache object after a
`generate()` call (fp32). Latent and lowrank with value_rank are seeded by svd and by whitened (calibrated on 16
evenly spaced 256-token blocks of the training split). Writes cache_sweep.json, cache_sweep.md and cache_sweep.png
to --output_dir.

On a rotary model the sweep is stock and the rotary latent at a few r_c (default G·hd, G·hd/2, G·hd/4, G·hd/8: stock
caches 2·G·hd numbers per token and layer), keeping --rope_pairs rotary pairs per KV head chosen by --rope_selection
('2norm' and 'rorope' are calibrated on the same training blocks); the modes that cannot apply there (covariance,
lowrank, merged or low-rank values, the quantized latent cache) are skipped with the reason printed and recorded.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_merged_attn import PatchConfig, patch_model
from hf_merged_attn.calibration import evenly_spaced_blocks
from hf_merged_attn.evaluation import evaluate_perplexity, kv_cache_bytes_per_token
from hf_merged_attn.quantized_cache import LatentQuantizedCache, fake_quantized_latent
from hf_merged_attn.registry import REGISTRY
from run_record import recorded_args  # noqa: E402 (examples/ is on sys.path when a script runs)

HERE = Path(__file__).resolve().parent
ROPE_SELECTIONS = ("2norm", "high", "low", "uniform", "rorope")
SKIPPED_ON_ROTARY = {
    "covariance, covariance + merged values, lowrank (with or without value_rank)":
        "the rotation between Wq and Wk makes Wq·Wkᵀ a different matrix at every offset (no single S_h), and merged "
        "values would cache more than grouped-query attention does; the rotary latent is the mode for these models",
    "int8 / int4 latent cache": "the quantized latent cache does not take rotary latent layers yet (they cache the "
                                "rotated rotary keys beside the latent)",
}


def configurations(d: int, hd: int, latent_ranks: list[int]) -> list[tuple[str, str, dict]]:
    """(label, mode, patch kwargs); the labels name the family of points in the plot."""
    out = [("stock", "stock", {}), ("covariance", "covariance", {}),
           ("covariance + merged values", "covariance", {"values": "merged"})]
    out += [(f"lowrank r={r}", "lowrank", {"rank": r}) for r in (hd, hd // 2, hd // 4)]
    out += [(f"lowrank r={hd}, value_rank={rv}", "lowrank", {"rank": hd, "value_rank": rv}) for rv in (hd // 2, hd // 4)]
    out += [(f"latent r_c={r}", "latent", {"rank": r}) for r in latent_ranks]
    return out


def rotary_configurations(latent_ranks: list[int], rope: dict) -> list[tuple[str, str, dict]]:
    """Stock and the partial-RoPE latent at each r_c with the given rope settings (rope_pairs, rope_selection); the
    exact-RoPE latent (patch_model's rotary default) has its own sweep, examples/exact_rope_smollm2.py."""
    return [("stock", "stock", {})] + [(f"latent r_c={r}", "latent", {"rank": r, "rope": "partial", **rope})
                                       for r in latent_ranks]


def split_tokens(tokenizer, data_dir: str | Path, split: str) -> torch.Tensor:
    """The token ids of `<data_dir>/<split>.txt` as one 1-D stream."""
    return torch.tensor(tokenizer((Path(data_dir) / f"{split}.txt").read_text(encoding="utf-8"))["input_ids"])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=str(HERE / "shakespeare-gpt2"))
    p.add_argument("--data_dir", default=str(HERE / "data" / "shakespeare"))
    p.add_argument("--latent_ranks", type=int, nargs="+", default=None,
                   help="default: d, 3d/4, d/2, 3d/8, d/4, d/8; on a rotary model G·hd, G·hd/2, G·hd/4, G·hd/8")
    p.add_argument("--eval_tokens", type=int, default=16384)
    p.add_argument("--quantized_ranks", type=int, nargs="*", default=None,
                   help="latent ranks also scored with an int8 / int4 cache (default: d/2 and d/4; none on rotary models)")
    p.add_argument("--rope_pairs", type=int, default=None,
                   help="rotary models: frequency pairs per KV head kept rotated (default: all, hd/2)")
    p.add_argument("--rope_selection", choices=ROPE_SELECTIONS, default=None,
                   help="rotary models: which pairs stay rotated (default 2norm when pairs are dropped; 2norm and rorope "
                        "are calibrated on the training blocks)")
    p.add_argument("--output_dir", default="runs/cache_sweep")
    args = p.parse_args(argv)
    if args.eval_tokens < 257 or (args.latent_ranks and min(args.latent_ranks) < 1):
        raise ValueError(f"--eval_tokens must be > 256 and --latent_ranks >= 1; got {args.eval_tokens}, {args.latent_ranks}.")
    rope = {k: getattr(args, k) for k in ("rope_pairs", "rope_selection") if getattr(args, k) is not None}
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    spec = REGISTRY.get(config.model_type)
    rotary = spec is not None and spec.rotary
    if rope and not rotary:
        raise ValueError(f"--rope_pairs / --rope_selection were given for {args.model_name_or_path!r}, a "
                         f"{config.model_type!r} model whose positions are not rotary; drop them.")
    if rotary and args.quantized_ranks:
        raise ValueError(f"--quantized_ranks on {args.model_name_or_path!r}: {SKIPPED_ON_ROTARY['int8 / int4 latent cache']}.")
    torch.manual_seed(0)
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    stock = AutoModelForCausalLM.from_pretrained(args.model_name_or_path).eval()
    d, hd = stock.config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rotary:  # stock caches 2·G·hd numbers per token and layer; G·hd holds the values
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        ranks = args.latent_ranks or [min(d, kv * hd // n) for n in (1, 2, 4, 8)]
        args.quantized_ranks, skipped = [], [{"what": what, "reason": why} for what, why in SKIPPED_ON_ROTARY.items()]
        for row in skipped:
            print(f"skipped on this rotary model ({spec.family}): {row['what']}: {row['reason']}.", flush=True)
        sweep = rotary_configurations(ranks, rope)
    else:
        ranks = args.latent_ranks or [d, 3 * d // 4, d // 2, 3 * d // 8, d // 4, d // 8]
        if args.quantized_ranks is None:
            args.quantized_ranks = [d // 2, d // 4]
        skipped, sweep = [], configurations(d, hd, ranks)

    held_out = split_tokens(tokenizer, args.data_dir, "validation")[: args.eval_tokens]
    calibration = list(evenly_spaced_blocks(split_tokens(tokenizer, args.data_dir, "train"), 16, 256).split(4))  # 4 batches of (4, 256)
    rows = []
    for label, mode, kwargs in sweep:
        approximate = mode == "latent" or "value_rank" in kwargs
        for init in ("svd", "whitened") if approximate else ("svd",):
            extra = {"init": "whitened", "calibration": calibration} if init == "whitened" else {}
            if mode != "stock" and PatchConfig(mode, **kwargs).rope_needs_calibration():
                extra["calibration"] = calibration  # the kept rotary pairs are chosen on data ('2norm', 'rorope')
            model = stock if mode == "stock" else patch_model(copy.deepcopy(stock), mode, **kwargs, **extra)
            shown, resolved = label, {}
            if rotary and mode != "stock":  # the kept pairs as the patch resolved them (all: hd/2, no rule)
                resolved = {k: model.config.merged_attn.get(k) for k in ("rope_pairs", "rope_selection")}
                shown = f"{label}, rope_pairs={resolved['rope_pairs']} {resolved['rope_selection'] or '(all)'}"
            rows.append({
                "label": shown, "mode": mode, **kwargs, **resolved, "init": init if approximate else None,
                "perplexity": evaluate_perplexity(model, held_out, max_length=256, stride=256)["perplexity"],
                "cache_bytes_per_token": kv_cache_bytes_per_token(model),
                "parameters": sum(p.numel() for p in model.parameters()),
            })
            print(f"{shown:34s} {init if approximate else '':9s} ppl {rows[-1]['perplexity']:.3f}  "
                  f"cache {rows[-1]['cache_bytes_per_token']:.0f} B/token", flush=True)
            if mode == "latent" and init == "whitened" and kwargs["rank"] in args.quantized_ranks:
                for nbits in (8, 4):  # the same latent in a quantized cache: every token quantized (window 0)
                    with fake_quantized_latent(model, nbits=nbits):
                        ppl = evaluate_perplexity(model, held_out, max_length=256, stride=256)["perplexity"]
                    cache = LatentQuantizedCache(model.config, nbits=nbits, residual_length=0)
                    rows.append({
                        "label": f"{label}, int{nbits} cache", "mode": mode, **kwargs, "init": init, "nbits": nbits,
                        "perplexity": ppl, "cache_bytes_per_token": kv_cache_bytes_per_token(model, past_key_values=cache),
                        "parameters": rows[-1]["parameters"],
                    })
                    print(f"{rows[-1]['label']:34s} {init:9s} ppl {ppl:.3f}  cache "
                          f"{rows[-1]['cache_bytes_per_token']:.0f} B/token", flush=True)
    result = {"rows": rows, "skipped": skipped, "command": "python examples/cache_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "args": recorded_args(args),
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
              "seconds": round(time.time() - start)}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache_sweep.json").write_text(json.dumps(result, indent=1))
    model = None  # the shipped stand-in
    if Path(args.model_name_or_path).resolve() != (HERE / "shakespeare-gpt2").resolve():
        model = {"name": Path(args.model_name_or_path).name, "command": result["command"], "rotary": rotary,
                 "sizes": f"{config.model_type}, {config.num_hidden_layers} layers, d = {d}, "
                          f"{config.num_attention_heads} heads of {hd}" + (f", {kv} KV heads" if rotary else "")}
    write_report(rows, out, model, skipped, held_out.numel())
    return result


def write_report(rows: list[dict], out: Path, model: dict | None = None, skipped: list[dict] = (),
                 eval_tokens: int = 16384) -> None:
    """cache_sweep.md (the table) and cache_sweep.png (perplexity against cache bytes per token).

    model: {"name", "command", "sizes", "rotary"} of a model other than the shipped stand-in (None: the stand-in);
    skipped: the modes that cannot apply to the model, with the reason ({"what", "reason"}), listed under the table.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stock = rows[0]
    if model is None:
        name, sizes = "shipped stand-in", "4 layers, d=256"
        about = ("`python examples/cache_sweep.py --output_dir docs` (one deterministic run; 2–5 min on a 2-core CPU). "
                 "The shipped stand-in GPT-2 (4 layers, d = 256, 4 heads of 64)")
    else:
        name, sizes = model["name"], model["sizes"]
        about = f"`{model['command']}`. {name} ({sizes})"
    quantized = any(r.get("nbits") for r in rows)
    lines = [
        f"# Perplexity against KV-cache bytes per token ({name}, at patch)", "",
        f"{about} right after patching, no fine-tune: perplexity on the "
        f"validation split (first {eval_tokens:,} tokens, windows of 256, stride 256), KV-cache bytes per token measured "
        "on the cache object after a `generate()` call (fp32, all layers). whitened: calibrated on 16 evenly spaced "
        "256-token blocks of the training split"
        + ("; the rope selections 2norm and rorope read the same blocks." if model and model["rotary"] else ".")
        + (" *int8 / int4 cache*: the whitened latent stored in a `LatentQuantizedCache` "
           "(asymmetric, one scale and minimum per token, every token quantized: window 0), bytes measured on that cache "
           "(codes + scales); perplexity with every position attending round-tripped latents (`fake_quantized_latent`; "
           "slightly pessimistic against decoding, whose prefill attends the prompt in full precision)." if quantized else "")
        + (" The stand-in is far easier to compress than real weights (see minilm.md)." if model is None else ""), "",
        "![perplexity vs cache bytes](cache_sweep.png)", "",
        "| configuration | init | KV cache B/token (vs stock) | parameters | perplexity (Δ vs stock) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['init'] or '–'} | {r['cache_bytes_per_token']:,.0f} "
            f"({r['cache_bytes_per_token'] / stock['cache_bytes_per_token']:.3g}×) | {r['parameters']:,} | "
            f"{r['perplexity']:.3f} ({r['perplexity'] - stock['perplexity']:+.3f}) |"
        )
    if skipped:
        lines += ["", "Skipped on this model:", ""] + [f"- {r['what']}: {r['reason']}." for r in skipped]
    (out / "cache_sweep.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    groups = {}
    for r in rows:
        kind = r["mode"] + (" + values" if "value_rank" in r or "values" in r else "") + (f" ({r['init']})" if r["init"] else "") + (
            f", int{r['nbits']} cache" if r.get("nbits") else "")
        groups.setdefault(kind, []).append(r)
    for kind, points in groups.items():
        points = sorted(points, key=lambda r: r["cache_bytes_per_token"])
        ax.plot([r["cache_bytes_per_token"] for r in points], [r["perplexity"] for r in points], "o-", label=kind)
    ax.axhline(stock["perplexity"], color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV-cache bytes per token (fp32, all layers; measured after generate)")
    ax.set_ylabel("validation perplexity at patch")
    ax.set_title(f"{name[0].upper() + name[1:]} ({sizes}): perplexity vs cache size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cache_sweep.png", dpi=120)


if __name__ == "__main__":
    main()
