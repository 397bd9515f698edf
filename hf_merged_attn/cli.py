"""`hf-merged-attn`: convert a user's own causal LM in one command, and inspect a converted checkpoint.

    hf-merged-attn convert --model_name_or_path HuggingFaceTB/SmolLM2-135M --mode latent --kv_budget 0.3125 \\
        --calibration_file notes.txt --recover layerwise --eval_file held_out.txt --output_dir smollm2-mla
    hf-merged-attn inspect smollm2-mla

`convert` checks every argument first (nothing is loaded or written before), then: load → calibrate → patch →
recover → evaluate (stock and converted in one run) → save (safetensors, remote code, a model card with the printed
figures) → push. Arguments come from `ConvertArguments` through transformers' HfArgumentParser; a single .json / .yaml
argument is read as a config file, as run_clm does. `python -m hf_merged_attn` is the same command.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .convert_arguments import (  # noqa: F401  (importable from here, as before)
    MODES,
    RECOVERIES,
    REPO_CORPUS,
    REPO_GENERATIONS,
    ConvertArguments,
    _head_dim,
    _kv_heads,
    _rope_route,
    convert_parser,
    latent_rank,
    lowrank_rank,
    parse_layers,
    parse_rank,
    read_config_file,
    resolve_budget,
    rotary_latent_rank,
)


def _text_source(flag: str, path: str | None) -> None:
    """An existing UTF-8 .txt file, or a folder holding at least one."""
    if path is None:
        return
    p = Path(path)
    files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path!r} does not exist. Pass a .txt file or a folder of .txt files, or "
                                "--dataset_name.")
    if not files or any(f.suffix != ".txt" for f in files):
        raise ValueError(f"{flag} {path!r}: pass a .txt file or a folder holding .txt files (found none).")
    for f in files:
        try:
            if not f.read_text(encoding="utf-8").strip():
                raise ValueError(f"{flag} {path!r}: {f.name} holds no text.")
        except UnicodeDecodeError as error:
            raise ValueError(f"{flag} {path!r}: {f.name} is not UTF-8 ({error.reason} at byte {error.start}); convert it, "
                             "e.g. iconv -f latin1 -t utf-8.") from None


def _model_location(args: ConvertArguments) -> tuple[str, str | None]:
    """(folder or Hub id, gguf file name or None) from --model_name_or_path / --gguf_file."""
    where = args.model_name_or_path
    if where.endswith(".gguf"):
        if not Path(where).is_file():
            raise FileNotFoundError(f"--model_name_or_path {where!r}: no such GGUF file.")
        return str(Path(where).resolve().parent), Path(where).name
    return where, args.gguf_file


def check_arguments(args: ConvertArguments):
    """Every check that needs no weights: the arguments, the output folder, the data, and the model's config against
    the family's registry entry and the patch. Returns (config, spec, patch_model's keyword arguments, the budget
    line or None, whether the seeding reads calibration data)."""
    from transformers import AutoConfig

    from .merged_attention import PatchConfig
    from .merged_models import is_hub_id
    from .quantized_cache import QuantizationSettings, width_problem
    from .registry import SPECS, spec_for_model

    if not args.model_name_or_path or not args.output_dir:
        raise ValueError("--model_name_or_path and --output_dir are required (e.g. --model_name_or_path "
                         "HuggingFaceTB/SmolLM2-135M --output_dir smollm2-mla).")
    out = Path(args.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--output_dir {args.output_dir!r} exists and is not an empty folder; pass a new folder.")
    if args.push_to_hub and not (args.hub_model_id and "/" in args.hub_model_id and is_hub_id(args.hub_model_id)):
        raise ValueError(f"--push_to_hub needs --hub_model_id namespace/name (a Hub repository id); got "
                         f"{args.hub_model_id!r}.")
    if args.hub_model_id and not args.push_to_hub:
        raise ValueError(f"--hub_model_id {args.hub_model_id!r} was given without --push_to_hub; add --push_to_hub.")
    if args.kv_budget is not None and args.rank is not None:
        raise ValueError(f"--rank {args.rank} and --kv_budget {args.kv_budget} were both given; pass one of them.")
    if args.kv_budget is not None and not 0 < args.kv_budget <= 1:
        raise ValueError(f"--kv_budget {args.kv_budget}: a fraction of stock's KV numbers per token, in (0, 1].")
    if args.kv_budget is not None and args.mode == "covariance":
        raise ValueError("--kv_budget was given with --mode covariance, which has no rank: it caches d keys + the values "
                         "(1.0 of stock; 0.5 with --values merged). Use --mode latent or lowrank with --kv_budget.")
    for name in ("recover_steps", "calibration_blocks", "batch_size", "decode_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: pass a positive integer.")
    if args.learning_rate is None:
        args.learning_rate = 1e-3 if args.recover == "layerwise" else 2e-4
    if args.eval_tokens < 0 or args.learning_rate <= 0 or (args.block_size is not None and args.block_size < 2):
        raise ValueError(f"--eval_tokens {args.eval_tokens} (>= 0), --learning_rate {args.learning_rate} (> 0), "
                         f"--block_size {args.block_size} (>= 2): one of them is out of range.")
    if args.dataset_name and (args.calibration_file or args.eval_file):
        raise ValueError("--dataset_name was given with --calibration_file / --eval_file; pass one source of text.")
    _text_source("--calibration_file", args.calibration_file)
    _text_source("--eval_file", args.eval_file)
    if not args.dataset_name and not (args.calibration_file and args.eval_file) and not (
            REPO_CORPUS.is_dir() and (args.calibration_file or (REPO_GENERATIONS / "calibration.txt").is_file())):
        raise FileNotFoundError(
            "no text given and no default corpus here: the default (examples/data: the Shakespeare corpus and SmolLM2's "
            "generations) ships with the repository, not with the installed package. Pass --calibration_file and "
            "--eval_file (.txt files or folders), or --dataset_name.")
    if args.dataset_name:
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise ImportError("--dataset_name needs the datasets package: pip install datasets.") from None
    where, gguf = _model_location(args)
    if gguf is None and not Path(where).is_dir() and not is_hub_id(where):
        raise FileNotFoundError(f"--model_name_or_path {where!r}: no such folder, and neither a .gguf file nor a Hub id.")
    first = Path(where).parts[0] if Path(where).parts else ""
    if gguf is None and not Path(where).is_dir() and (where.startswith((".", "~", os.sep)) or Path(first).is_dir()):
        # a typo in a local path ("examples/shakespeare-gtp2"): fail now instead of asking the Hub for it, with retries
        raise FileNotFoundError(f"--model_name_or_path {where!r}: no such folder (it reads as a local path: {first!r} is "
                                "a folder here). Check the spelling; a Hub id is namespace/name.")
    config = AutoConfig.from_pretrained(where, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(where)

    class _Shell(torch.nn.Module):  # the registry reads the config only
        pass

    shell = _Shell()
    shell.config = config
    spec = spec_for_model(shell)  # already patched / unsupported: the registry's errors
    causal = ", ".join(f"{s.family} ({', '.join(s.model_types)})" for s in SPECS if s.has_cache)
    if not spec.has_cache:
        raise NotImplementedError(
            f"{spec.family} (model_type {config.model_type!r}) is an encoder: it has no KV cache to shrink and no causal "
            f"LM perplexity to check the conversion by. convert takes causal LMs: {causal}. For an encoder, call "
            "hf_merged_attn.patch_model(model, ...) yourself and check its embeddings (examples/minilm_fidelity.py).")
    if spec.rotary and args.mode != "latent":
        raise ValueError(f"--mode {args.mode} was given for {spec.family}, a rotary family: its query–key product is not "
                         "position-free, so only --mode latent (the rotary latent, with --rope_pairs) applies.")
    if not spec.rotary and (args.rope_pairs is not None or args.rope_selection is not None or args.rope is not None):
        raise ValueError(f"--rope / --rope_pairs / --rope_selection were given for {spec.family}, which has no rotary "
                         "positions; drop them (they apply to Llama, Qwen2, Mistral).")
    if spec.rotary and args.rope == "exact" and (args.rope_pairs is not None or args.rope_selection is not None):
        raise ValueError("--rope exact keeps every frequency pair rotated, so --rope_pairs / --rope_selection have "
                         "nothing to choose; drop them, or pass --rope partial.")
    if spec.rotary and args.rank is not None and isinstance(parse_rank(args.rank), float):
        raise ValueError(f"--rank {args.rank} (a spectral-energy target) is not available on rotary models; pass an "
                         "integer r_c or --kv_budget (e.g. --kv_budget 0.3125).")
    limit = spec.max_length(config)
    if limit and args.block_size is not None and args.block_size > limit:
        raise ValueError(f"--block_size {args.block_size} exceeds the model's {limit} positions; use --block_size <= "
                         f"{limit}.")
    half = _head_dim(config) // 2
    if spec.rotary and args.rope_pairs is not None and not 0 <= args.rope_pairs <= half:
        raise ValueError(f"--rope_pairs {args.rope_pairs}: a head of {2 * half} has {half} pairs; use 0 <= rope_pairs <= "
                         f"{half}.")
    if args.quantized_cache_bits and not (args.mode == "latent" or (args.mode == "covariance" and args.values == "merged")):
        raise ValueError(f"--quantized_cache_bits {args.quantized_cache_bits} needs a cache of one tensor per layer: "
                         "--mode latent, or --mode covariance --values merged.")
    if args.quantized_cache_bits and args.layers:
        raise ValueError("--quantized_cache_bits needs every layer patched; drop --layers.")
    rank, pairs, how = parse_rank(args.rank), args.rope_pairs, None
    if args.kv_budget is not None:
        rank, pairs, how = resolve_budget(args, config, spec)
    if args.mode != "covariance" and rank is None:
        raise ValueError(f"--mode {args.mode} needs --rank or --kv_budget (e.g. --kv_budget 0.3125).")
    # the command always has calibration text: approximations are fitted to it unless --init svd is asked for
    init = args.init or ("whitened" if args.mode != "covariance" or args.value_rank else "svd")
    rope = _rope_route(args) if spec.rotary else None
    patch = {"mode": args.mode, "rank": rank, "layers": parse_layers(args.layers), "init": init, "values": args.values,
             "value_rank": args.value_rank, "rope_pairs": pairs, "rope_selection": args.rope_selection,
             "rope": rope, "balance_kv": args.balance_kv}
    checked = PatchConfig(args.mode, rank, patch["layers"], init, args.values, args.value_rank, pairs,
                          args.rope_selection, rope)
    checked.check_against(config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
    if args.quantized_cache_bits:
        # the cached width: r_c, or d for covariance + merged values; an energy target's ranks are known only at patch
        # time (use_quantized_latent_cache checks them then)
        widths = set(rank.values()) if isinstance(rank, dict) else {config.hidden_size} if rank is None else (
            {rank} if isinstance(rank, int) else set())
        for width in widths:
            problem = width_problem(QuantizationSettings(args.quantized_cache_bits), width)
            if problem:
                raise ValueError(f"--quantized_cache_bits {args.quantized_cache_bits}: {problem}")
    if spec.rotary:
        kept = 0 if rope == "exact" else half if pairs is None else pairs
        widest = _kv_heads(config) * (4 * half - 2 * kept)  # the NoPE keys and the values: what a latent can hold
        ranks = rank.values() if isinstance(rank, dict) else [rank] if isinstance(rank, int) else []
        if any(widest < r < config.hidden_size or (rope != "exact" and r > widest) for r in ranks):
            what = ("the keys before RoPE and the values (2·G·hd)" if rope == "exact"
                    else f"with {kept} kept pairs of {half}, G·(2·hd − 2r)")
            raise ValueError(f"--rank {args.rank}: a latent holds at most {widest} numbers ({what}), already exact; use "
                             f"--rank <= {widest}.")
    # whether the seeding reads the calibration blocks (patch_model refuses them otherwise)
    reads_data = checked.init == "whitened" or (spec.rotary and checked.rope_needs_calibration(2 * half))
    return config, spec, patch, how, reads_data


# ----------------------------------------------------------------------------------------------------------------
# the steps
# ----------------------------------------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, flush=True)


def _read_text(path: str) -> str:
    p = Path(path)
    files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def _texts(args: ConvertArguments) -> tuple[str | dict[str, str], str, str]:
    """(calibration text — or {name: text} of the mixed default —, held-out text, where they come from)."""
    if args.dataset_name:
        from datasets import load_dataset

        raw = load_dataset(args.dataset_name, args.dataset_config_name)
        held = next((s for s in ("validation", "test") if s in raw), None)
        if "train" not in raw or held is None or args.text_column not in raw["train"].column_names:
            raise ValueError(f"--dataset_name {args.dataset_name!r}: need a train split and a validation or test split "
                             f"with a {args.text_column!r} column (splits: {list(raw)}); see --text_column.")
        return ("\n\n".join(raw["train"][args.text_column]), "\n\n".join(raw[held][args.text_column]),
                f"{args.dataset_name} (train / {held})")
    held_out = args.eval_file or _shown(REPO_CORPUS / "validation.txt")
    if args.calibration_file:
        return _read_text(args.calibration_file), _read_text(held_out), f"{args.calibration_file} / {held_out}"
    mixed = default_calibration_texts()
    return mixed, _read_text(held_out), f"a mix of {', '.join(mixed)} (the default) / {held_out}"


def default_calibration_texts() -> dict[str, str]:
    """The default calibration of `convert` (docs/domains.md: a mix generalizes to held-out kinds of text where any one
    text does not): the repository's Shakespeare train split, the calibration half of SmolLM2-Instruct's own answers
    (examples/data/generations) and the first 60% of the Python language reference CPython ships (`pydoc_data`, sorted
    by topic; the rest is held out in docs/domains.md), in equal blocks (`calibration.mixed_blocks`)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    return {
        "Shakespeare": _read_text(str(REPO_CORPUS / "train.txt")),
        "Python reference": "\n\n".join(topics[n] for n in names[: int(len(names) * 0.6)]),
        "SmolLM2 generations": _read_text(str(REPO_GENERATIONS / "calibration.txt")),
    }


def _shown(path: Path) -> str:
    """A path relative to the working folder where it lies below it (printed output holds no machine paths)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _tokens(tokenizer, text: str) -> torch.Tensor:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # one long stream is cut into blocks here, not by the tokenizer
    try:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    finally:
        hf_logging.set_verbosity(verbosity)


def _ms(value: float | None, steps: int) -> str:
    return f"{value:.2f}" if value is not None else f"not measured ({steps} steps are too few: pass --decode_tokens 32)"


def _load(where: str, gguf: str | None):
    """The stock causal LM in eval mode. A GGUF file's weights are dequantized on load, but transformers still marks
    the model as a GGUF one, which save_pretrained refuses: the same weights then go into a fresh model of its class."""
    from transformers import AutoModelForCausalLM

    if gguf is None:
        return AutoModelForCausalLM.from_pretrained(where).eval()
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf)
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    model = type(loaded)(config).to(loaded.dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model.eval()


def convert(args: ConvertArguments) -> dict[str, str]:
    """Run the conversion; returns the figures written to the model card (as printed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import patch_model, recover_layerwise, use_quantized_latent_cache
    from .calibration import evenly_spaced_blocks, mixed_blocks
    from .evaluation import (
        decode_ms_per_step,
        evaluate_perplexity,
        kv_cache_bytes_per_token,
    )
    from .merged_attention import MergedAttention
    from .quantized_cache import QuantizationSettings
    from .recovery import recover_end_to_end

    config, spec, patch, how, reads_data = check_arguments(args)
    say(f"[0/6] arguments checked: {spec.family} (model_type {config.model_type!r}), mode {args.mode}"
        + (f"; {how}" if how else ""))
    where, gguf = _model_location(args)
    extra = {"gguf_file": gguf} if gguf else {}

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    stock = _load(where, gguf)
    model = copy.deepcopy(stock)  # patched and recovered; stock stays the reference
    stock.requires_grad_(False)
    say(f"[1/6] loaded {args.model_name_or_path}: {type(stock).__name__}, "
        f"{sum(p.numel() for p in stock.parameters()):,} parameters ({time.perf_counter() - start:.1f} s)")

    limit = spec.max_length(config)
    block = args.block_size or min(512, limit or 512)  # checked against the positions at [0/6]
    calibration_text, held_text, source = _texts(args)
    if isinstance(calibration_text, dict):  # the default: equal blocks of several kinds of text
        streams = {name: _tokens(tokenizer, text) for name, text in calibration_text.items()}
        count = min(args.calibration_blocks, len(streams) * min(t.numel() // block for t in streams.values()))
        count -= count % len(streams)
        blocks = mixed_blocks(streams, count, block) if count else None
        tokens = min(t.numel() for t in streams.values())
    else:
        stream = _tokens(tokenizer, calibration_text)
        count, tokens = min(args.calibration_blocks, stream.numel() // block), stream.numel()
        blocks = evenly_spaced_blocks(stream, count, block) if count else None
    if count < 1:
        raise ValueError(f"the calibration text has {tokens} tokens, less than one block of {block}; pass more text or a "
                         "smaller --block_size.")
    batches = list(blocks.split(args.batch_size))
    held = _tokens(tokenizer, held_text)
    if args.eval_tokens:
        held = held[: args.eval_tokens]
    if held.numel() < 2:
        raise ValueError("the held-out text has fewer than 2 tokens; pass more text (--eval_file).")
    say(f"[2/6] calibration: {count} blocks of {block} tokens ({count * block:,} tokens), held out: {held.numel():,} "
        f"tokens, from {source}")

    start = time.perf_counter()
    patch_model(model, **patch, calibration=batches if reads_data else None)
    modules = [m for m in model.modules() if isinstance(m, MergedAttention)]
    ours = sum(m.cache_numbers_per_token() for m in modules)
    theirs = sum(m.stock_cache_numbers_per_token() for m in modules)
    with torch.no_grad():
        ids = blocks[:1]
        gap = (model(ids).logits - stock(ids).logits).abs().max().item()
    say(f"[3/6] patched {len(modules)} layers ({json.dumps({k: v for k, v in model.config.merged_attn.items() if k in ('mode', 'rank', 'rope', 'rope_pairs', 'rope_selection', 'values', 'value_rank', 'init')})}): "
        f"KV numbers per token {ours:,} of stock's {theirs:,} ({ours / theirs:.4g}); max |Δlogits| to stock "
        f"{gap:.3g} ({time.perf_counter() - start:.1f} s)")

    start = time.perf_counter()
    if args.recover == "layerwise":
        records = recover_layerwise(model, stock, batches, steps=args.recover_steps, learning_rate=args.learning_rate,
                                    inputs=args.recover_inputs, seed=args.seed)
        before = sum(r["error_before"] for r in records) / len(records)
        after = sum(r["error_after"] for r in records) / len(records)
        say(f"[4/6] layer-wise recovery, {args.recover_steps} steps per layer: mean relative error of the attention "
            f"outputs {before:.3g} -> {after:.3g} ({time.perf_counter() - start:.1f} s)")
    elif args.recover == "finetune":
        before, after = recover_end_to_end(model, stock, batches, args.recover_steps, args.learning_rate, args.seed)
        say(f"[4/6] distillation, {args.recover_steps} steps: KL to stock on the calibration blocks {before:.4g} -> "
            f"{after:.4g} nats/token ({time.perf_counter() - start:.1f} s)")
    else:
        say("[4/6] no recovery (--recover none)")
    model.eval()

    if args.quantized_cache_bits:
        use_quantized_latent_cache(model, nbits=args.quantized_cache_bits)
    start = time.perf_counter()
    window = {"max_length": block, "batch_size": args.batch_size, "show_progress": True}
    stock_ppl = evaluate_perplexity(stock, held, **window)
    ours_ppl = evaluate_perplexity(model, held, reference=stock, **window)
    # bytes per token at a full window's length: a quantized cache then holds codes beyond its full-precision window
    cached = max(block, 2 * QuantizationSettings().residual_length) if args.quantized_cache_bits else block
    cached = min(cached, limit) if limit else cached
    stock_bytes = kv_cache_bytes_per_token(stock, prompt_length=cached - 4)
    our_bytes = kv_cache_bytes_per_token(model, prompt_length=cached - 4)
    stock_ms, our_ms = decode_ms_per_step(stock, args.decode_tokens), decode_ms_per_step(model, args.decode_tokens)
    cache = f" (int{args.quantized_cache_bits} quantized latent cache)" if args.quantized_cache_bits else ""
    results = {
        "held-out tokens": f"{ours_ppl['tokens']:,}",
        "perplexity, stock": f"{stock_ppl['perplexity']:.3f}",
        "perplexity, converted": f"{ours_ppl['perplexity']:.3f}",
        "KL to stock (nats/token)": f"{ours_ppl['kl_to_reference']:.4f}",
        f"KV cache bytes per token at {cached} tokens, stock": f"{stock_bytes:,.0f}",
        f"KV cache bytes per token at {cached} tokens, converted{cache}": f"{our_bytes:,.0f} ({our_bytes / stock_bytes:.3f}x)",
        "decode ms per step, stock": _ms(stock_ms, args.decode_tokens),
        "decode ms per step, converted": _ms(our_ms, args.decode_tokens),
        "recovery": {"none": "none", "layerwise": f"layer-wise, {args.recover_steps} steps per layer",
                     "finetune": f"KL distillation, {args.recover_steps} steps"}[args.recover],
    }
    say(f"[5/6] evaluated ({time.perf_counter() - start:.1f} s; window {block} tokens, batch 1 decode on "
        f"{next(model.parameters()).device}):")
    for key, value in results.items():
        say(f"  {key}: {value}")

    # written into a folder beside the target and renamed into place once complete and reloaded: an interrupted run
    # leaves no folder that looks finished (only a hidden .partial one)
    target = Path(args.output_dir).resolve()  # "." has no name to put a staging folder beside
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, model_card_results=results)
        tokenizer.save_pretrained(staging)
        again = AutoModelForCausalLM.from_pretrained(staging).eval()
        with torch.no_grad():
            reload_gap = (again(blocks[:1]).logits - model(blocks[:1]).logits).abs().max().item()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # an interrupted save: nothing that looks finished
        raise
    try:
        if target.exists():
            target.rmdir()  # empty (checked at [0/6])
        staging.rename(target)
    except OSError as error:  # the work is done and saved: keep it where it is and say where
        raise OSError(f"the converted checkpoint is complete in {staging}, but it could not be moved to "
                      f"{args.output_dir} ({error}; did something write there during the run?). Move it yourself.") from None
    files = sorted(p.name for p in target.iterdir())
    say(f"[6/6] saved {args.output_dir}: {', '.join(files)}; reloaded, max |Δlogits| {reload_gap:.3g}")
    if args.push_to_hub:
        model.push_to_hub(args.hub_model_id, token=args.hub_token, results=results)
        tokenizer.push_to_hub(args.hub_model_id, token=args.hub_token)
        say(f"pushed to https://huggingface.co/{args.hub_model_id}")
    return results


def missing_files(folder: str, causal: bool) -> list[str]:
    """What a converted folder lacks of what convert writes: weights, config, model card, remote code, tokenizer."""
    path = Path(folder)
    if not path.is_dir():
        return []
    wanted = {"config.json": path / "config.json", "README.md (the model card)": path / "README.md"}
    if not (path / "model.safetensors").exists() and not (path / "model.safetensors.index.json").exists():
        wanted["model.safetensors"] = path / "model.safetensors"
    lacking = [name for name, file in wanted.items() if not file.exists()]
    if not list(path.glob("modeling_merged_*.py")):
        lacking.append("the remote code (modeling_merged_*.py)")
    if causal and not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json",
                                                              "tokenizer.model", "vocab.json")):
        lacking.append("a tokenizer (tokenizer.json / tokenizer_config.json)")
    return lacking


def inspect(where: str) -> dict:
    """What a checkpoint (folder or Hub id) is: printed, and returned as a dict."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .evaluation import kv_cache_bytes_per_token
    from .merged_attention import MergedAttention
    from .merged_models import is_hub_id
    from .quantized_cache import GENERATION_FIELD
    from .registry import MERGED_REGISTRY, REGISTRY

    if not Path(where).is_dir() and not is_hub_id(where):
        raise FileNotFoundError(f"{where!r} is neither a folder nor a Hub id; pass a converted checkpoint's folder.")
    local = Path(where).is_dir()
    try:
        config = AutoConfig.from_pretrained(where)
    except (ValueError, KeyError, OSError) as error:  # OSError: transformers' message for a broken or absent file
        if not local and isinstance(error, OSError):
            raise
        raise ValueError(f"{where}: its config.json cannot be read ({' '.join(str(error).split())}); the checkpoint "
                         "is damaged or not a transformers checkpoint.") from None
    spec = MERGED_REGISTRY.get(config.model_type)
    if spec is None:
        known = REGISTRY.get(config.model_type)
        state = (f"a stock {known.family} checkpoint: `hf-merged-attn convert --model_name_or_path {where}` converts it"
                 if known else f"model_type {config.model_type!r}: not a family hf_merged_attn converts")
        say(f"{where}: {state}")
        return {"patched": False, "model_type": config.model_type}
    lacking = missing_files(where, spec.has_cache)
    needed = [name for name in lacking if name.startswith(("config.json", "model.safetensors"))]
    if needed and Path(where).is_dir():
        raise FileNotFoundError(f"{where} is an incomplete checkpoint: it lacks {', '.join(lacking)} (an interrupted "
                                "save?). Convert again, or copy the missing files from the original.")
    if lacking and Path(where).is_dir():  # loadable, but not what convert writes: say what a user will miss
        say(f"{where}: note: it lacks {', '.join(lacking)} (convert writes them; save_pretrained alone does not)")
    model = (AutoModelForCausalLM if spec.has_cache else AutoModel).from_pretrained(where).eval()
    record = model.config.merged_attn
    modules = [m for m in model.modules() if isinstance(m, MergedAttention)]
    layers = []
    for m in modules:
        rotary = getattr(m, "rotary", False)
        if rotary and m.rope == "exact":
            exact = m.rank >= min(2 * m.num_kv_heads * m.head_dim, m.embed_dim)
        elif rotary:
            exact = m.rope_pairs == m.head_dim // 2 and m.rank >= m.num_kv_heads * m.head_dim
        elif m.mode == "covariance":
            exact = True
        else:
            exact = m.rank >= (m.head_dim if m.mode == "lowrank" else m.embed_dim)
        exact = exact and (m.value_rank is None or m.value_rank >= m.head_dim)
        layers.append({"layer": m.layer_idx, "mode": m.mode, "rank": m.rank, "rope": m.rope if rotary else None,
                       "rope_pairs": m.rope_pairs if rotary and m.rope == "partial" else None, "exact_at_patch": bool(exact),
                       "kv_numbers_per_token": m.cache_numbers_per_token(),
                       "stock_kv_numbers_per_token": m.stock_cache_numbers_per_token()})
    quantized = getattr(model.generation_config, GENERATION_FIELD, None) if spec.has_cache else None
    # measured at 256 tokens, or beyond a quantized cache's full-precision window; at most the model's positions
    cached = max(256, 2 * quantized["residual_length"]) if quantized else 256
    cached = min(cached, spec.max_length(config) or cached)
    info = {"patched": True, "family": spec.family, "model_type": config.model_type,
            "base_model": record.get("base_model") or record.get("base_model_folder"), "layers": layers,
            "quantized_cache_default": quantized, "measured_at_tokens": cached if spec.has_cache else None,
            "kv_cache_bytes_per_token":
                kv_cache_bytes_per_token(model, prompt_length=cached - 4) if spec.has_cache else None}
    say(f"{where}: {spec.family} ({config.model_type}), from {info['base_model']}, {len(modules)} patched layers of "
        f"{config.num_hidden_layers}")
    runs: list[tuple[list[int], str]] = []  # consecutive layers that read the same, printed once
    for row in layers:
        pairs = f", rope_pairs {row['rope_pairs']}" if row["rope_pairs"] is not None else ""
        pairs = (", exact-RoPE (every pair rotated)" if row["rope"] == "exact" else pairs)
        text = (f"{row['mode']}, rank {row['rank']}{pairs}, {'exact' if row['exact_at_patch'] else 'approximate'} at "
                f"patch, KV numbers per token {row['kv_numbers_per_token']} of stock's {row['stock_kv_numbers_per_token']}")
        if runs and runs[-1][1] == text and runs[-1][0][-1] == row["layer"] - 1:
            runs[-1][0].append(row["layer"])
        else:
            runs.append(([row["layer"]], text))
    for indices, text in runs:
        say(f"  {f'layer {indices[0]}' if len(indices) == 1 else f'layers {indices[0]}–{indices[-1]}'}: {text}")
    if spec.has_cache:
        say(f"  KV cache bytes per token (measured at {cached} tokens, {model.dtype}): "
            f"{info['kv_cache_bytes_per_token']:,.0f}"
            + (f"; generate() defaults to a quantized latent cache {quantized}" if quantized else
               "; no quantized cache default"))
    return info


USAGE = """usage: hf-merged-attn {convert,inspect} ...

  hf-merged-attn convert --model_name_or_path ID_OR_FOLDER --output_dir DIR [--mode latent --kv_budget 0.3125 ...]
  hf-merged-attn convert config.json          (or .yaml: the same arguments in a file)
  hf-merged-attn inspect FOLDER_OR_ID

  hf-merged-attn convert --help lists every argument."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "inspect":
        if len(rest) != 1 or rest[0].startswith("-"):
            print("usage: hf-merged-attn inspect FOLDER_OR_ID", file=sys.stderr)
            return 0 if rest and rest[0] in ("-h", "--help") else 2
        try:
            inspect(rest[0])
        except (ValueError, OSError, KeyError) as error:  # a missing folder, a broken config.json, missing weights
            print(f"hf-merged-attn inspect: {error}", file=sys.stderr)
            return 1
        return 0
    if command != "convert":
        print(f"hf-merged-attn: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    parser = convert_parser()
    try:
        if len(rest) == 1 and rest[0].endswith((".json", ".yaml", ".yml")):
            args = read_config_file(parser, rest[0])
        else:
            (args,) = parser.parse_args_into_dataclasses(rest)
        convert(args)
    except (ValueError, OSError, NotImplementedError, ImportError) as error:  # OSError: files, the Hub
        print(f"hf-merged-attn convert: {error}", file=sys.stderr)
        return 1
    return 0


from .evaluation import decode_ms_per_step  # noqa: E402  (a step of convert, kept importable from here)

__all__ = ["ConvertArguments", "decode_ms_per_step", "check_arguments", "convert", "inspect", "latent_rank", "lowrank_rank",
           "main", "resolve_budget", "rotary_latent_rank"]
