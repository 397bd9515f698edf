"""The report of examples/study.py: study.md and the Pareto / learning-rate plots, from the result in study.json."""

from __future__ import annotations

import math
from pathlib import Path

from finetune import RANKED

HERE = Path(__file__).resolve().parent


def verdict(delta: dict) -> str:
    return "better" if delta["high"] < 0 else "worse" if delta["low"] > 0 else "no clear difference"


def fmt_delta(d: dict) -> str:
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def mode_name(label: str, row: dict) -> str:
    """The label, with "whitened" for a whitened-seeded mode and the kept rotary pairs of a rotary latent."""
    notes = ["whitened"] if row["init"] == "whitened" and row["mode"] in RANKED else []
    if row.get("rope_pairs") is not None:
        notes.append(f"rope_pairs {row['rope_pairs']}, {row.get('rope_selection') or 'all kept'}")
    return f"{label} ({'; '.join(notes)})" if notes else label


def markdown(study: dict) -> str:
    args, rows = study["args"], study["rows"]
    stock = rows["stock"]
    n = len(stock["test_perplexity"])
    ft = study["finetune_args"]
    per_step = (ft["per_device_train_batch_size"] * ft["block_size"] * ft["gradient_accumulation_steps"]
                * study["world_size"])  # training tokens per optimizer step

    def answer(key: str) -> str:
        groups = {v: ", ".join(label for label, r in rows.items() if label != "stock" and verdict(r[key]) == v) or "none"
                  for v in ("better", "worse", "no clear difference")}
        return (f"better than stock: {groups['better']}; worse: {groups['worse']}; no difference the interval can "
                f"resolve: {groups['no clear difference']}")

    same_lr = (f" At stock's learning rate ({stock['best_lr']:g}) for every mode: {answer('same_lr_delta_vs_stock')}."
               if "same_lr_delta_vs_stock" in stock else "")
    lines = [
        f"# Does merging help? A tuned study on {rel(ft['model_name_or_path'])}"
        + (" (quick smoke run: tiny budgets, not a result)" if args["quick"] else ""),
        "",
        "Command (from the repository root):",
        "",
        f"```bash\n{study['command']}\n```",
        "",
        f"Code: commit {study['commit']} (when the study started"
        + (f"; HEAD was {study['commit_at_end']} when it finished" if study.get("commit_at_end", study["commit"]) != study["commit"] else "")
        + f"). Machine: {study['machine']}; {study['world_size']} process(es). "
        f"Wall time: {study['wall_time_s'] / 60:.1f} min for this invocation, {study['runs_time_s'] / 60:.1f} min summed "
        f"over the {len(study['runs'])} runs (a resumed study reuses finished runs). Started {study['started']}.",
        "",
        "## Answer",
        "",
        f"Test-split perplexity, {n} seeds, each mode's difference to stock paired by seed with its 95% t-interval. At "
        f"each mode's own learning rate (chosen on validation): {answer('delta_vs_stock')}.{same_lr} Stock: "
        f"{stock['test_mean']:.2f} ± {stock['test_std']:.2f} after fine-tuning; before it, test "
        f"{study['perplexity_before']['test']:.2f} and validation {study['perplexity_before']['validation']:.2f}.",
        "",
        "## Each mode at its own learning rate (test split)",
        "",
        "| mode | trainable params | KV cache B/token (× stock) | best lr | test ppl (mean ± std) | Δ vs stock [95% CI] | verdict | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        edge = " (grid edge)" if r["best_lr_at_edge"] else ""
        tps = "n/a" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        delta = "–" if label == "stock" else fmt_delta(r["delta_vs_stock"])
        lines.append(
            f"| {mode_name(label, r)} | {r['trainable_params'] / 1e6:.3f}M | {r['kv_cache_bytes_per_token']:,.0f} "
            f"({r['kv_cache_bytes_per_token'] / stock['kv_cache_bytes_per_token']:.3g}) | {r['best_lr']:g}{edge} "
            f"| {r['test_mean']:.2f} ± {r['test_std']:.2f} | {delta} | {'–' if label == 'stock' else verdict(r['delta_vs_stock'])} | {tps} |")
    quantized = [(label, cache, q) for label, r in rows.items() for cache, q in r.get("quantized", {}).items()]
    if quantized:
        lines += [
            "",
            "The latent modes' final models read through a quantized latent cache (`LatentQuantizedCache`, every token "
            "quantized: no full-precision window; per-token scales; bytes measured on the cache object after "
            "`generate()`, scales included). Test perplexity from `fake_quantized_latent` (what that cache attends):",
            "",
            "| mode | cache | KV cache B/token (× stock) | test ppl (mean ± std) | Δ vs stock [95% CI] | verdict "
            "| Δ vs the same latent unquantized [95% CI] (relative) |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, cache, q in quantized:
            rel_delta = q["delta_vs_unquantized"]["mean"] / rows[label]["test_mean"]
            lines.append(
                f"| {label} | {cache} | {q['kv_cache_bytes_per_token']:,.0f} "
                f"({q['kv_cache_bytes_per_token'] / stock['kv_cache_bytes_per_token']:.3g}) | {q['test_mean']:.2f} ± "
                f"{q['test_std']:.2f} | {fmt_delta(q['delta_vs_stock'])} | {verdict(q['delta_vs_stock'])} | "
                f"{fmt_delta(q['delta_vs_unquantized'])} ({rel_delta:+.2%}) |")
    lines += [
        "",
        "Per seed (test perplexity; a seed fixes the data order and dropout, the same for every mode):",
        "",
        "| mode | " + " | ".join(f"seed {s}" for s in stock["test_perplexity"]) + " | Δ per seed |",
        "|---|" + "---|" * (n + 1),
    ]
    for label, r in rows.items():
        per_seed = "–" if label == "stock" else ", ".join(f"{d:+.2f}" for d in r["delta_vs_stock"]["per_seed"].values())
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in r["test_perplexity"].values()) + f" | {per_seed} |")
    lines += [
        "",
        f"## Every mode at stock's learning rate ({stock['best_lr']:g}, the same hyper-parameters)",
        "",
    ]
    if "same_lr_test_mean" in stock:
        lines += ["| mode | val ppl (sweep, seed {}) | test ppl (mean ± std) | Δ vs stock [95% CI] |".format(args["seed"]),
                  "|---|---|---|---|"]
        for label, r in rows.items():
            delta = "–" if label == "stock" else fmt_delta(r["same_lr_delta_vs_stock"])
            lines.append(f"| {label} | {r['same_lr_val_perplexity']:.2f} | {r['same_lr_test_mean']:.2f} ± "
                         f"{r['same_lr_test_std']:.2f} | {delta} |")
    else:
        lines += [f"Validation perplexity of the sweep (seed {args['seed']}, {args['sweep_steps']} step(s)); the test-split "
                  "view with seeds was not run (`--same_lr_runs sweep`).", "",
                  "| mode | val ppl at stock's lr | val ppl at its own lr |", "|---|---|---|"]
        for label, r in rows.items():
            own = r["sweep"][f"{r['best_lr']:g}"]
            lines.append(f"| {label} | {r['same_lr_val_perplexity']:.2f} | {own:.2f} |")
    grid = sorted({float(lr) for r in rows.values() for lr in r["sweep"]})
    lines += [
        "",
        f"## Learning-rate sweep (validation perplexity, seed {args['seed']}, {args['sweep_steps']} step(s); best in bold)",
        "",
        "| mode | " + " | ".join(f"{lr:g}" for lr in grid) + " |",
        "|---|" + "---|" * len(grid),
    ]
    for label, r in rows.items():
        cells = []
        for lr in grid:
            ppl = r["sweep"].get(f"{lr:g}")
            cells.append("" if ppl is None else f"**{ppl:.2f}**" if lr == r["best_lr"] else f"{ppl:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "![test perplexity against KV-cache bytes per token](study_pareto_cache.png)",
        "![test perplexity against trainable parameters](study_pareto_params.png)",
        "![learning-rate curves](study_lr.png)",
        "",
        "## Design",
        "",
        f"- Model `{rel(ft['model_name_or_path'])}`; data: train `{ft['dataset_name'] or rel(ft['train_file'])}`, "
        f"validation (every choice) `{ft['dataset_name'] or rel(ft['validation_file'])}`, test (only reported) "
        f"`{(ft['dataset_name'] + ':' + args['test_split']) if ft['dataset_name'] else rel(args['test_file'])}`.",
        f"- Sweep: peak learning rates {args['lr_grid']} (log grid; a best at an edge adds up to {args['extend_edges']} "
        f"grid step(s) beyond it), seed {args['seed']}, {args['sweep_steps']} step(s) "
        f"({args['sweep_steps'] * per_step:,} tokens). Final: {args['seeds']} seeds from {args['seed']}, "
        f"{args['final_steps']} steps ({args['final_steps'] * per_step:,} tokens). Both: AdamW, {ft['lr_scheduler_type']} "
        f"schedule with {args['warmup_fraction']:.3g} of the steps as warm-up, weight decay {ft['weight_decay']}, batches "
        f"of {per_step:,} tokens; the same data order for every mode and learning rate of a seed.",
        f"- Perplexity: finetune.py's evaluator (sliding window {ft['block_size']}, stride "
        f"{ft['eval_stride'] or ft['block_size'] // 2}); validation: {stock['eval_tokens']:,} "
        f"tokens; test: {stock['test_tokens']:,} tokens. KV-cache bytes per token are measured on the cache after "
        "`generate()`.",
        f"- Init: `{args['init']}` for lowrank and latent (marked in the table; latent at r_c = d is exact with either); "
        "stock, covariance, covariance+values and LoRA start from the pretrained weights exactly. LoRA (peft): rank R, "
        "alpha 2R, on stock's q/k/v projection (GPT-2: the fused `c_attn`), only the adapters trained.",
        f"- Runs: {study['counts']['sweep']} sweep ({study['phase_time_s']['sweep'] / 60:.1f} min), "
        f"{study['counts']['final']} final ({study['phase_time_s']['final'] / 60:.1f} min, test evaluation included); "
        "every run is in study.json with its wall time, tokens/s and both perplexities.",
        f"- Sized for 150 minutes on an idle 2-core CPU (the wall time above says how long it took): by default the "
        f"sweep at finetune.py's default budget of 60 steps (here {args['sweep_steps']}), the final runs at twice it (here "
        f"{args['final_steps']}), {len(rows)} modes × a {len({float(v) for v in args['lr_grid'].split(',') if v.strip()})}-value grid with at most "
        f"{args['extend_edges']} extension per edge, validation scored on a slice in disjoint windows. Other jobs on "
        "the same cores slow it several times (two torch threads wait on each other): run it alone, or pass "
        "`--num_threads 1` on a shared machine; a stopped study resumes where it stopped when rerun with the same command.",
        "",
        STAND_IN_NOTE,
        "",
        "## The same study on GPT-2 small (where the Hub is reachable)",
        "",
        "```bash",
        "accelerate launch examples/study.py --model_name_or_path gpt2 --dataset_name wikitext \\",
        "    --dataset_config_name wikitext-2-raw-v1 --output_dir runs/study_gpt2 --docs_dir docs/study_gpt2",
        "```",
        "",
        "The mode sizes follow the model (hd/4 = 16, hd/2 = 32, d = 768, d/2 = 384, d/4 = 192 on GPT-2 small); the test "
        "split is wikitext-2's `test`. GPT-2 small has about 23 times the stand-in's parameters: run it on a GPU (add "
        "`--mixed_precision bf16` after `accelerate launch` if wanted), where a larger budget is welcome as a second table.",
        "",
    ]
    return "\n".join(lines)


STAND_IN_NOTE = """## What the stand-in can and cannot tell about GPT-2

The stand-in (`examples/shakespeare-gpt2`) is a real pretrained GPT-2 with GPT-2's head size (64) and attention code,
fine-tuned on a shifted domain (tragedies and poems after comedies and histories), so this study can tell how the
parametrisations compare *at matched tuning* on a pretrained model: whether a tuned learning rate closes or keeps the
gap a shared one shows, how each mode's optimum moves, and what each costs in trainable parameters, KV-cache bytes
and speed. It cannot tell what GPT-2 small or larger would gain: they have 12+ heads (covariance multiplies the
query–key parameters by the number of heads over 2: 6× for GPT-2 small instead of 2× here), 12+ layers, a 50k
vocabulary and far more pretraining; real models' query–key products are far less low-rank than the stand-in's (the
real MiniLM weights: docs/minilm.md), so low ranks and small latents cost more there; and a fine-tune of a few
hundred thousand tokens is tiny: whether a difference grows, shrinks or flips with more data is not measured. The
sweep's budget is shorter than the final runs', so a mode whose optimum moves with the budget may be slightly
mistuned; a best at the grid's edge is flagged in the table."""


def plot(study: dict, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = study["rows"]
    for key, xlabel, name in (("kv_cache_bytes_per_token", "KV-cache bytes per token (measured after generate)", "cache"),
                              ("trainable_params", "trainable parameters", "params")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        points = sorted((r[key], r["test_mean"], label) for label, r in rows.items())
        for i, (x, y, label) in enumerate(points):
            ax.errorbar(x, y, yerr=rows[label]["test_std"], fmt="o", capsize=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4 - 10 * (i % 3)), fontsize=8)
        if name == "cache":  # the quantized caches of the latent modes: their own points on the front
            quantized = [(q[key], q["test_mean"], f"{label} {cache}") for label, r in rows.items()
                         for cache, q in r.get("quantized", {}).items()]
            for x, y, label in quantized:
                ax.plot(x, y, marker="s", markersize=5, color="tab:purple", alpha=0.8)
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7, color="tab:purple")
            points = sorted(points + quantized)
        front, best = [], math.inf  # Pareto front: no other mode has both fewer x and a lower perplexity
        for x, y, _ in points:
            if y < best:
                front.append((x, y))
                best = y
        ax.step(*zip(*front), where="post", color="grey", alpha=0.6, label="Pareto front")
        ax.axhline(rows["stock"]["test_mean"], ls="--", color="black", lw=0.8, label="stock")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test perplexity (mean ± std over seeds)")
        ax.set_title("each mode at its own learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(docs / f"study_pareto_{name}.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, r in rows.items():
        lrs = [float(lr) for lr in r["sweep"]]
        line, = ax.plot(lrs, list(r["sweep"].values()), marker="o", markersize=3, label=label)
        ax.plot(r["best_lr"], r["sweep"][f"{r['best_lr']:g}"], marker="*", markersize=11, color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("validation perplexity after the sweep budget")
    ax.set_title("learning-rate sweep (star: the chosen rate)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "study_lr.png", dpi=120)
    plt.close(fig)


def rel(path: str) -> str:
    """A path under the repository as a relative path (docs do not name the machine's folders); others unchanged."""
    try:
        return str(Path(path).resolve().relative_to(HERE.parent))
    except ValueError:
        return path
