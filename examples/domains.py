"""Does a conversion hold outside its calibration text? SmolLM2-135M, "calibrated on A -> scored on B", training-free.

    python examples/smollm2.py && python examples/make_generations.py       # once: the model, its own generations
    python examples/domains.py --output_dir docs                            # -> docs/domains.{json,md}

Texts (each split into a calibration part and a held-out part that never meet):
- shakespeare: the project's corpus (calibration: its train split; held out: its test split);
- python_reference: the Python language reference CPython ships (`pydoc_data.topics`, sorted by topic): the first 60%
  of the topics calibrate, the rest are held out;
- generations: SmolLM2-Instruct's own answers to varied prompts (examples/make_generations.py): the first half of the
  prompts calibrate, the second half are held out;
- mixed (calibration only): equal blocks from the three (`hf_merged_attn.calibration.mixed_blocks`).

Each row patches the stock model (`rope="exact"` by default, or the partial route) at a cache budget with one
calibration set and one seeding, and scores the first --num_tokens held-out tokens of every text (windows of
--max_length). One deterministic run per row (no random number enters the seeding).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from rotary_smollm2 import DEFAULT_MODEL, SHAKESPEARE, python_reference_text
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_merged_attn import patch_model
from hf_merged_attn.calibration import evenly_spaced_blocks, mixed_blocks
from hf_merged_attn.evaluation import evaluate_perplexity

HERE = Path(__file__).resolve().parent
GENERATIONS = HERE / "data" / "generations"
BUDGETS = {"-50%": 192, "-68.75%": 120, "-81.25%": 72}  # exact-RoPE r_c for SmolLM2 (2·G·hd = 384)
SEEDINGS = {"default": {}, "damping 0.1": {"damping": 0.1}, "damping 1": {"damping": 1.0},
            "query-aware keys": {"query_aware_keys": True}}


def texts() -> dict[str, tuple[str, str]]:
    """{name: (calibration text, held-out text)}."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    cut = int(len(names) * 0.6)
    python = ("\n\n".join(topics[n] for n in names[:cut]), "\n\n".join(topics[n] for n in names[cut:]))
    assert python_reference_text().startswith(python[0][:100])  # the same text as docs/rotary_smollm2.md, split
    return {
        "shakespeare": ((SHAKESPEARE / "train.txt").read_text(encoding="utf-8"),
                        (SHAKESPEARE / "test.txt").read_text(encoding="utf-8")),
        "python_reference": python,
        "generations": ((GENERATIONS / "calibration.txt").read_text(encoding="utf-8"),
                        (GENERATIONS / "test.txt").read_text(encoding="utf-8")),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=str(DEFAULT_MODEL))
    parser.add_argument("--output_dir", default="docs")
    parser.add_argument("--num_tokens", type=int, default=2048)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--calibration_blocks", type=int, default=16)
    parser.add_argument("--calibration_length", type=int, default=256)
    parser.add_argument("--budgets", nargs="+", default=["-50%", "-68.75%"], choices=list(BUDGETS))
    parser.add_argument("--calibrations", nargs="+", default=["shakespeare", "python_reference", "generations", "mixed"])
    parser.add_argument("--seedings", nargs="+", default=list(SEEDINGS), choices=list(SEEDINGS),
                        help="seedings measured at --seeding_budget with the shakespeare and mixed calibrations")
    parser.add_argument("--seeding_budget", default="-68.75%", choices=list(BUDGETS))
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    stock = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32).eval()
    stock.set_attn_implementation("sdpa")
    pairs = texts()
    tokens = {name: (torch.tensor(tokenizer(cal)["input_ids"]), torch.tensor(tokenizer(held)["input_ids"]))
              for name, (cal, held) in pairs.items()}
    held_out = {name: ids[: args.num_tokens] for name, (_, ids) in tokens.items()}
    blocks, length = args.calibration_blocks, args.calibration_length
    calibrations = {name: evenly_spaced_blocks(cal, blocks, length) for name, (cal, _) in tokens.items()}
    calibrations["mixed"] = mixed_blocks({name: cal for name, (cal, _) in tokens.items()}, blocks, length)

    rows = [{"label": "stock", "calibration": None, "budget": None, "seeding": None}]
    for budget in args.budgets:
        rows += [{"label": f"{budget} calibrated on {c}", "calibration": c, "budget": budget, "seeding": "default"}
                 for c in args.calibrations]
    for seeding in args.seedings:
        if seeding != "default":
            rows += [{"label": f"{args.seeding_budget} calibrated on {c}, {seeding}", "calibration": c,
                      "budget": args.seeding_budget, "seeding": seeding} for c in ("shakespeare", "mixed")]
    results = []
    for row in rows:
        start = time.time()
        model = stock
        if row["calibration"] is not None:
            model = patch_model(copy.deepcopy(stock), "latent", rank=BUDGETS[row["budget"]], rope="exact",
                                init="whitened", calibration=[calibrations[row["calibration"]]],
                                seeding=SEEDINGS[row["seeding"]] or None)
        entry = dict(row)
        for name, ids in held_out.items():
            entry[name] = evaluate_perplexity(model, ids, max_length=args.max_length, stride=args.max_length)["perplexity"]
        entry["seconds"] = round(time.time() - start, 1)
        results.append(entry)
        print(json.dumps(entry), flush=True)
        del model
    record = {"model": Path(args.model_name_or_path).name, "num_tokens": args.num_tokens, "max_length": args.max_length,
              "calibration": f"{blocks} blocks of {length} tokens", "torch_threads": torch.get_num_threads(),
              "results": results}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "domains.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    (out / "domains.md").write_text(report(record), encoding="utf-8")
    print(f"wrote {out / 'domains.md'}")


def report(record: dict) -> str:
    """docs/domains.md from the JSON record: perplexity and ratio to stock per held-out text, and the mean ratio over
    the texts that were NOT in the calibration set."""
    rows = record["results"]
    stock = rows[0]
    names = [k for k in ("shakespeare", "python_reference", "generations") if k in stock]
    lines = [
        "# Calibrated on A, scored on B: the exact-RoPE latent across domains (SmolLM2-135M)",
        "",
        f"`python examples/domains.py --output_dir docs` on {record['model']} (fp32, from the PyPI GGUF), 2-core CPU, "
        f"{record['torch_threads']} threads. Calibration: {record['calibration']} of the named text's calibration part "
        f"(mixed: equal blocks of the three); scored on the first {record['num_tokens']} tokens of each text's held-out "
        f"part, windows of {record['max_length']}. One deterministic run per row. 'held-out mean' is the mean ratio to "
        "stock over the texts NOT used for calibration (for mixed: all three, each held-out part unseen).",
        "",
        "| configuration | " + " | ".join(names) + " | held-out mean |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for row in rows:
        ratios = {n: row[n] / stock[n] for n in names}
        unseen = [ratios[n] for n in names if n != row["calibration"]]
        cells = " | ".join(f"{row[n]:.2f} ({ratios[n]:.2f}x)" for n in names)
        lines.append(f"| {row['label']} | {cells} | {sum(unseen) / len(unseen):.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
