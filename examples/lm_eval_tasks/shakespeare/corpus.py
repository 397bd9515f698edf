"""Documents and per-document figures of the `shakespeare` lm-eval task (the corpus shipped in examples/data)."""

from __future__ import annotations

import re
from pathlib import Path

from datasets import Dataset, DatasetDict

CORPUS = Path(__file__).resolve().parents[2] / "data" / "shakespeare"
LINES_PER_DOCUMENT = 200


def load(**_) -> DatasetDict:
    """{"validation", "test"}: each split's text in documents of LINES_PER_DOCUMENT lines, in corpus order."""
    splits = {}
    for split in ("validation", "test"):
        lines = (CORPUS / f"{split}.txt").read_text(encoding="utf-8").splitlines(keepends=True)
        documents = ["".join(lines[i:i + LINES_PER_DOCUMENT]) for i in range(0, len(lines), LINES_PER_DOCUMENT)]
        splits[split] = Dataset.from_dict({"text": [d for d in documents if d.strip()]})
    return DatasetDict(splits)


def process_results(doc: dict, results: list) -> dict:
    """The document's log-likelihood with its word and byte counts, aggregated by the harness (as for wikitext)."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    size = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}
