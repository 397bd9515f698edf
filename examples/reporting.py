"""Reporting of the fine-tuning comparison: per-mode summaries over seeds, the results table and the loss curves."""

from __future__ import annotations

import statistics
from pathlib import Path

def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and std over seeds; (None, None) when a figure was not measured (tokens/s of a 1-step run)."""
    if any(v is None for v in values):
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def summarize(records: list[dict], stock_before: float) -> dict:
    summary = {}
    for label in dict.fromkeys(r["label"] for r in records):
        runs = [r for r in records if r["label"] == label]
        keys = ("mode", "rank", "ranks_per_block", "total_params", "trainable_params", "kv_cache_bytes_per_token",
                "train_tokens")
        entry = {k: runs[0][k] for k in keys}
        entry.update({k: runs[0].get(k) for k in ("rope_pairs", "rope_selection")})  # rotary latents: as resolved
        entry["perplexity_before"] = stock_before
        for key in ("perplexity_at_patch", "perplexity_after", "tokens_per_s", "peak_memory_mb", "train_time_s"):
            entry[key], entry[key + "_std"] = mean_std([r[key] for r in runs])
        entry["seeds"] = [r["seed"] for r in runs]
        summary[label] = entry
    return summary


def markdown_table(summary: dict, args, world_size: int, accumulation: int | None = None) -> str:
    """results.md: one row per mode; accumulation: the steps accelerate accumulated (a DeepSpeed config's wins)."""
    accumulation = accumulation or args.gradient_accumulation_steps
    n = len(next(iter(summary.values()))["seeds"])
    spread = " ± std over seeds" if n > 1 else ""
    lines = [
        f"| mode | params (trainable) | KV cache B/token | ppl before | ppl at patch | ppl after{spread} | train tokens "
        "| tokens/s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, e in summary.items():
        after = f"{e['perplexity_after']:.2f}" + (f" ± {e['perplexity_after_std']:.2f}" if n > 1 else "")
        if e.get("ranks_per_block"):  # an energy target: show the ranks it chose
            label = f"{label} (ranks {'/'.join(str(r) for r in e['ranks_per_block'].values())})"
        if e.get("rope_pairs") is not None:  # a rotary latent: the pairs it keeps and the rule that chose them
            label = f"{label} (rope_pairs {e['rope_pairs']}, {e['rope_selection'] or 'all kept'})"
        lines.append(
            f"| {label} | {e['total_params'] / 1e6:.2f}M ({e['trainable_params'] / 1e6:.2f}M) "
            f"| {e.get('kv_cache_bytes_per_token', 0):,.0f} | {e['perplexity_before']:.2f} "
            f"| {e['perplexity_at_patch']:.2f} | {after} | {e['train_tokens']:,} | {fmt(e['tokens_per_s'], '.0f')} | {e['peak_memory_mb']:.0f} |"
        )
    lines.append("")
    lines.append(
        f"{n} seed(s) from {args.seed}; {args.max_train_steps} steps of {args.per_device_train_batch_size}×{args.block_size} "
        f"tokens × {accumulation} accumulation × {world_size} process(es); perplexity: sliding window "
        f"{args.block_size}, stride {args.eval_stride or args.block_size // 2}, on the first "
        f"{next(iter(summary.values())).get('eval_tokens', 'all')} validation tokens."
    )
    return "\n".join(lines) + "\n"


def plot_curves(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r["label"] for r in records):
        runs = [r for r in records if r["label"] == label]
        for ax, kind in zip(axes, ("train", "eval")):
            points = runs[0]["history"][kind]
            x = [p["tokens"] for p in points]
            y = [statistics.fmean(r["history"][kind][i]["loss"] for r in runs) for i in range(len(points))]
            ax.plot(x, y, label=label, marker="o" if kind == "eval" else None, markersize=3)
    for ax, title in zip(axes, ("train loss (per step, mean over seeds)", "validation loss (curve slice)")):
        ax.set_xlabel("training tokens")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
