"""kvpress's rows of benchmarks/peers.py, run inside a venv with kvpress (it pins transformers<5.3; this script imports
nothing from the project).

Reads one JSON request on stdin — {"model": folder, "windows": [[token ids]], "context": int, "presses": [class names],
"ratios": [fractions evicted], "num_threads": int} — and prints one JSON line: {"versions", "stock": figures,
"rows": {name: figures or {"error": why}}}. The protocol is peers.py's: per window, a prefill of context - 1 tokens
(pressed: the press prunes the prefill only), then one token at a time with explicit positions (the pruned cache is
shorter than the text), the last len(window) - context tokens scored. Bytes per token: the kept keys and values of
every layer after the window, divided by the tokens fed.

    echo '{"model": "runs/SmolLM2-135M-Instruct", ...}' | ../venv-kvpress/bin/python benchmarks/peers_kvpress.py
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from importlib.metadata import version

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


@torch.no_grad()
def score(model, windows: list[list[int]], context: int, press=None) -> dict:
    """NLL of each window's tokens after the first `context` (per token, in order), each from a decode step, after a
    (pressed) prefill."""
    nll, per_token = [], []
    for window in windows:
        ids = torch.tensor(window).unsqueeze(0)
        cache = DynamicCache()
        if press is None:
            model.model(input_ids=ids[:, : context - 1], past_key_values=cache)
        else:
            with press(model):
                model.model(input_ids=ids[:, : context - 1], past_key_values=cache)
        logits = torch.stack([
            model(input_ids=ids[:, t : t + 1], past_key_values=cache, position_ids=torch.tensor([[t]])).logits[0, -1].float()
            for t in range(context - 1, ids.shape[1] - 1)])
        nll += nn.functional.cross_entropy(logits, ids[0, context:], reduction="none").tolist()
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        per_token.append(held / (ids.shape[1] - 1))
    loss = statistics.mean(nll)
    return {"perplexity": math.exp(loss), "loss": loss, "tokens": len(nll), "nll": nll,
            "bytes_per_token": statistics.mean(per_token)}


def main() -> None:
    import kvpress  # here, not at the top: score() serves without it (tests/test_peers.py)

    request = json.loads(sys.stdin.read())
    torch.set_num_threads(request.get("num_threads", 1))
    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32).eval()
    model.set_attn_implementation("sdpa")
    windows, context = request["windows"], request["context"]
    out = {"versions": {"kvpress": version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__},
           "stock": score(model, windows, context), "rows": {}}
    for press_name in request["presses"]:
        for ratio in request["ratios"]:
            name = f"kvpress {press_name.removesuffix('Press')} {round(ratio * 100)}%"
            press_class = getattr(kvpress, press_name, None)
            if press_class is None:
                out["rows"][name] = {"error": f"kvpress {version('kvpress')} has no {press_name}"}
                continue
            try:
                figures = score(model, windows, context, press_class(compression_ratio=ratio))
            except Exception as error:  # noqa: BLE001 — recorded as not run, with the reason: never a silent skip
                figures = {"error": f"{type(error).__name__}: {error}"}
            out["rows"][name] = {"curve": f"kvpress {press_name.removesuffix('Press')}", **figures}
            print(f"{name}: perplexity {figures.get('perplexity')}", file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
