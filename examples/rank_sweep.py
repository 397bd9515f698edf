#!/usr/bin/env python
"""Rank sweep: plain-SVD vs activation-aware ("whitened") low-rank seeding, before and after a short fine-tune.

    python examples/rank_sweep.py                       # shipped stand-in model + Shakespeare, CPU
    python examples/rank_sweep.py --ranks 8,32 --max_train_steps 20 --output_dir runs/rank_sweep_quick
    python examples/rank_sweep.py --mode latent --ranks 32,64,128,256 --output_dir runs/latent_sweep   # the latent

--mode lowrank (default) sweeps the query-key rank r per head; --mode latent the rank r_c of the one latent per
layer that keys and values come from (its KV cache is r_c numbers per token and layer, stock's 2·d).

For every init in --inits the sweep runs `examples/finetune.py` (the same script, data order, optimizer,
schedule, token budget and evaluator as the main stock / covariance / lowrank comparison) with
`--modes stock,MODE:R1,MODE:R2,... --init INIT`, which records, per rank, the perplexity right after
patching and after fine-tuning, and the KV-cache bytes per token measured after a generate() call. "whitened" is
calibrated on --calibration_samples evenly spaced training blocks. Where the rank makes the patch exact (lowrank:
r >= head size; latent: r_c >= hidden size) both inits are identical, so that rank is run once (with svd) and
reported for both. Stock is fine-tuned once, as the reference.

Writes to --output_dir: results.json (the merged finetune.py results), rank_sweep.md and rank_sweep.png.
Copy those to docs/ (or pass --docs_dir docs) to publish them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from run_record import recorded_args  # noqa: E402 (examples/ is on sys.path when a script runs)

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "shakespeare-gpt2"
INITS = ("svd", "whitened")
MODES = ("lowrank", "latent")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=str(DEFAULT_MODEL))
    p.add_argument("--mode", default="lowrank", choices=MODES, help="the ranked mode to sweep")
    p.add_argument("--ranks", default="4,8,16,32,48,64", help="comma-separated ranks (lowrank: r; latent: r_c)")
    p.add_argument("--inits", default="svd,whitened", help="comma-separated: svd, whitened")
    p.add_argument("--calibration_samples", type=int, default=16, help="training blocks for init=whitened")
    p.add_argument("--max_train_steps", type=int, default=60)
    p.add_argument("--per_device_train_batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--eval_max_tokens", type=int, default=16384, help="validation tokens scored")
    p.add_argument("--eval_stride", type=int, default=256, help="sliding-window stride (256 = disjoint blocks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_stock", action="store_true", help="skip the stock reference run")
    p.add_argument("--output_dir", default=None, help="default: runs/rank_sweep (lowrank), runs/latent_sweep (latent)")
    p.add_argument("--docs_dir", default=None,
                   help="also copy the report here (e.g. docs): rank_sweep.md / .png, latent_sweep.md / .png for latent")
    p.add_argument("--command", default=None, help="the command line to print in the report (default: this one)")
    p.add_argument("--report_only", action="store_true",
                   help="do not train: rebuild the report from the finetune.py results.json already in --output_dir")
    p.add_argument("--note", action="append", default=[], help="a sentence added to the report (repeatable)")
    p.add_argument("finetune_args", nargs=argparse.REMAINDER, help="after --: extra arguments for finetune.py")
    args = p.parse_args(argv)
    try:
        args.rank_list = sorted({int(r) for r in args.ranks.split(",") if r.strip()})
    except ValueError as error:
        raise SystemExit(f"--ranks {args.ranks!r} must be comma-separated integers, e.g. 4,8,16 ({error}).")
    args.init_list = [i.strip() for i in args.inits.split(",") if i.strip()]
    bad = [i for i in args.init_list if i not in INITS]
    if bad or not args.init_list or not args.rank_list or min(args.rank_list) < 1:
        raise SystemExit(f"--inits must be from {INITS} and --ranks positive integers; got {args.inits!r}, {args.ranks!r}.")
    args.name = "rank_sweep" if args.mode == "lowrank" else "latent_sweep"  # file names: the two sweeps coexist
    args.output_dir = args.output_dir or f"runs/{args.name}"
    if args.finetune_args and args.finetune_args[0] == "--":
        args.finetune_args = args.finetune_args[1:]
    return args


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only ({threads} torch threads)"
    return f"{cpu}, {os.cpu_count()} logical cores; {device}; torch {torch.__version__}, Python {platform.python_version()}"


def run_finetune(args, init: str, ranks: list[int], with_stock: bool, out: Path) -> dict:
    modes = (["stock"] if with_stock else []) + [f"{args.mode}:{r}" for r in ranks]
    cmd = [
        sys.executable, str(HERE / "finetune.py"),
        "--model_name_or_path", args.model_name_or_path,
        "--modes", ",".join(modes),
        "--init", init,
        "--calibration_samples", str(args.calibration_samples),
        "--max_train_steps", str(args.max_train_steps),
        "--per_device_train_batch_size", str(args.per_device_train_batch_size),
        "--block_size", str(args.block_size),
        "--eval_max_tokens", str(args.eval_max_tokens),
        "--eval_stride", str(args.eval_stride),
        "--seed", str(args.seed),
        "--eval_steps", str(args.max_train_steps),  # loss-curve points only at the start and the end
        "--output_dir", str(out),
        *args.finetune_args,
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "results.json").read_text())


def collect(args, exact_at: int) -> tuple[dict, dict]:
    """Run finetune.py once per init; returns ({(init, rank): record}, {"stock": record or None, ...}).

    exact_at: the smallest rank at which the patch is exact (then both inits are the same: run once).
    """
    out = Path(args.output_dir)
    rows, extra = {}, {"stock": None, "stock_before": None, "runs": {}}
    shared = [r for r in args.rank_list if r >= exact_at]  # whitening changes nothing there: run once
    for index, init in enumerate(args.init_list):
        ranks = [r for r in args.rank_list if r < exact_at or index == 0]
        with_stock = index == 0 and not args.no_stock
        if not ranks and not with_stock:
            continue
        if args.report_only:
            results = json.loads((out / init / "results.json").read_text())
            found = {r["mode"] for r in results["runs"]} - {"stock"}
            if found - {args.mode}:
                raise SystemExit(f"{out / init} holds {sorted(found)} runs, not --mode {args.mode}: pass the "
                                 "--output_dir of a sweep of that mode.")
        else:
            results = run_finetune(args, init, ranks, with_stock, out / init)
        extra["runs"][init] = results
        extra["stock_before"] = results["perplexity_before"]
        for record in results["runs"]:
            if record["mode"] == "stock":
                extra["stock"] = record
            else:
                rows[init, record["rank"]] = record
    for init in args.init_list[1:]:
        for rank in shared:
            rows[init, rank] = {**rows[args.init_list[0], rank], "shared_with": args.init_list[0]}
    return rows, extra


SEEDING = {
    "lowrank": "- svd: best rank-r factors of each head's S̃_h = [S_h; u_h] (Frobenius norm on the weights). whitened: "
    "least error of the scores on {samples} evenly spaced training blocks of {block} tokens — SVD of L_qᵀ S̃_h L_k "
    "(Cholesky factors of the damped second moments of [x, 1] and x, the attention input), un-whitened "
    "(`hf_merged_attn.seeding.whitened_lowrank_from_qk`, docs/MATH.md).",
    "latent": "- svd: the balanced joint SVD of the stacked key and value weights [Wk | Wv] at rank r_c (one latent "
    "c = x·W_c per layer, per-head up-projections). whitened: the same SVD of L_xᵀ [Wk | Wv], the second moment of "
    "the attention input on {samples} evenly spaced training blocks of {block} tokens, un-whitened "
    "(`hf_merged_attn.seeding.latent_from_kv`, docs/MATH.md).",
}


def report(args, rows: dict, extra: dict, wall_s: float, command: str) -> str:
    inits = args.init_list
    header = ("| rank | KV cache B/token | " + " | ".join(f"{i} at patch" for i in inits) + " | "
              + " | ".join(f"{i} after FT" for i in inits) + " |")
    lines = [header, "|" + "---|" * (2 + 2 * len(inits))]
    for rank in args.rank_list:
        cells = []
        shared = any(rows.get((i, rank), {}).get("shared_with") for i in inits)
        for key in ("perplexity_at_patch", "perplexity_after"):
            values = {i: rows[i, rank][key] for i in inits if (i, rank) in rows}
            best = min(values.values()) if values else None
            for i in inits:
                v = values.get(i)
                text = "–" if v is None else f"{v:.2f}"
                cells.append(f"**{text}**" if v is not None and len(values) > 1 and v == best and not shared else text)
        cache = next((rows[i, rank].get("kv_cache_bytes_per_token") for i in inits if (i, rank) in rows), None)
        cache = "–" if cache is None else f"{cache:,.0f}"
        lines.append(f"| {rank}{' (exact: inits identical)' if shared else ''} | {cache} | " + " | ".join(cells) + " |")
    stock = extra["stock"]
    first = next(iter(rows.values()))
    text = [
        f"# Rank sweep ({args.mode}): plain-SVD vs activation-aware (whitened) seeding",
        "",
        f"Validation perplexity of the GPT-2 `{os.path.relpath(args.model_name_or_path)}` with every attention layer in "
        f"{args.mode} mode, right after patching and after a short equal-budget fine-tune (lower is better; bold: the "
        "better init at that rank). KV-cache bytes per token (fp32, all layers) measured on the cache after "
        "`generate()`.",
        "",
        f"Stock model: **{extra['stock_before']:.2f}** before fine-tuning"
        + (f", **{stock['perplexity_after']:.2f}** after the same fine-tune" if stock else "")
        + (f"; KV cache {stock['kv_cache_bytes_per_token']:,.0f} B/token." if stock else "."),
        "",
        *lines,
        "",
        f"![rank sweep]({args.name}.png)",
        "",
        "## Setup",
        "",
        SEEDING[args.mode].format(samples=args.calibration_samples, block=args.block_size),
        f"- Fine-tune: `examples/finetune.py`, {args.max_train_steps} steps of {args.per_device_train_batch_size}×"
        f"{args.block_size} tokens ({first['train_tokens']:,} tokens) on the train split, AdamW, seed {args.seed}, the "
        "same data order for every run.",
        f"- Perplexity: `hf_merged_attn.evaluation.evaluate_perplexity`, the first {first['eval_tokens']:,} scored "
        f"tokens of the validation split, windows of {args.block_size}, stride {args.eval_stride}.",
        f"- Machine: {machine()}. Wall time of the whole sweep: {wall_s / 60:.1f} min.",
        *[f"- {note}" for note in args.note],
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
    ]
    return "\n".join(text)


def plot(args, rows: dict, extra: dict, path: Path) -> None:
    """Perplexity minus stock's (same stage), per rank: the differences are small, so no shared axis, no log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"svd": "tab:blue", "whitened": "tab:orange"}
    stages = (
        ("perplexity_at_patch", "right after patching", extra["stock_before"]),
        ("perplexity_after", "after the equal-budget fine-tune", (extra["stock"] or {}).get("perplexity_after")),
    )
    for ax, (key, title, reference) in zip(axes, stages):
        base = reference or 0.0
        for init in args.init_list:
            ranks = [r for r in args.rank_list if (init, r) in rows]
            ax.plot(ranks, [rows[init, r][key] - base for r in ranks], marker="o", label=init, color=colors.get(init))
        ax.axhline(0.0, color="gray", linestyle="--", label=f"stock ({reference:.2f})" if reference else "0")
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.rank_list, [str(r) for r in args.rank_list])
        ax.set_xlabel("rank r per head" if args.mode == "lowrank" else "latent rank r_c per layer")
        ax.set_ylabel("validation perplexity − stock" if reference else "validation perplexity")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{args.mode} seeding: svd vs whitened ({os.path.basename(os.path.normpath(args.model_name_or_path))})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model_name_or_path)
    exact_at = config.hidden_size // config.num_attention_heads if args.mode == "lowrank" else config.hidden_size
    command = args.command or "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    start = time.time()
    rows, extra = collect(args, exact_at)
    wall_s = time.time() - start
    if args.report_only:  # the time of the sweep that produced the results (else: of its finetune.py runs)
        previous = Path(args.output_dir) / "results.json"
        wall_s = (json.loads(previous.read_text()).get("wall_time_s") if previous.is_file() else None) or sum(
            r["wall_time_s"] for r in extra["runs"].values()
        )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged = {
        "args": recorded_args(args), "machine": machine(), "wall_time_s": wall_s,
        "stock_before": extra["stock_before"],
        "stock_after": (extra["stock"] or {}).get("perplexity_after"),
        "rows": [
            {"init": init, "rank": rank, **{k: v for k, v in rec.items() if k != "history"}}
            for (init, rank), rec in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        ],
    }
    (out / "results.json").write_text(json.dumps(merged, indent=1))
    md = report(args, rows, extra, wall_s, command)
    (out / f"{args.name}.md").write_text(md)
    plot(args, rows, extra, out / f"{args.name}.png")
    print(md)
    if args.docs_dir:
        docs = Path(args.docs_dir)
        docs.mkdir(parents=True, exist_ok=True)
        (docs / f"{args.name}.md").write_text(md)
        plot(args, rows, extra, docs / f"{args.name}.png")
        print(f"wrote {docs}/{args.name}.md and {args.name}.png")


if __name__ == "__main__":
    main()
