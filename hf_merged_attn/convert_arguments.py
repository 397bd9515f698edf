"""The arguments of `hf-merged-attn convert`: `ConvertArguments` (names as transformers / accelerate name them), the KV
budget's pure arithmetic, the parser `convert --help` shows (grouped, true defaults) and the checked reading of a
.json / .yaml settings file. `cli.py` runs the command."""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

MODES = ("covariance", "lowrank", "latent")
RECOVERIES = ("none", "layerwise", "finetune")
# the shipped corpus of the repository (examples/ is not part of an installed package: then pass your own text)
REPO_CORPUS = Path(__file__).resolve().parents[1] / "examples" / "data" / "shakespeare"
REPO_GENERATIONS = REPO_CORPUS.parent / "generations"  # SmolLM2-Instruct's own answers (examples/make_generations.py)


def arg(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ConvertArguments:
    """Every setting of `hf-merged-attn convert` (names as transformers / accelerate name them)."""

    model_name_or_path: str = arg(None, "a Hub id, a local folder, or a .gguf file (or a folder with --gguf_file)")
    output_dir: str = arg(None, "where the converted checkpoint is saved (must be empty or absent)")
    gguf_file: str | None = arg(None, "a GGUF file inside --model_name_or_path (transformers' gguf_file=)")
    mode: str = arg("latent", "covariance (exact, merged S_h), lowrank (S_h ≈ U_h V_hᵀ) or latent (MLA-style shared "
                    "latent; rotary Llama/Qwen2/Mistral: the rotary latent)", choices=list(MODES))
    rank: str | None = arg(None, "lowrank r / latent r_c: an integer, a float in (0, 1) (spectral energy kept), or "
                           "'block:r,...' per block; or give --kv_budget instead")
    kv_budget: float | None = arg(None, "the fraction of stock's KV-cache numbers per token kept, in (0, 1]: resolved "
                                  "to the rank (and the kept rotary pairs) and printed; instead of --rank")
    layers: str | None = arg(None, "blocks to patch, e.g. '0,1,2' (default: all)")
    init: str | None = arg(None, "how factors are seeded: whitened (least error on the calibration activations) or svd "
                           "(the weights only) (default: whitened where something is approximated)",
                           choices=["svd", "whitened"])
    values: str | None = arg(None, "merged: the value is x, M_h = Wv_h Wo_h (covariance / lowrank; default: stock "
                             "values)", choices=["merged"])
    value_rank: int | None = arg(None, "r_v: low-rank values M_h ≈ P_h Q_hᵀ (covariance / lowrank)")
    rope_pairs: int | None = arg(None, "rotary families: frequency pairs per KV head kept rotated (hd/2 keeps all; "
                                 "with --kv_budget the default is hd/16, MHA2MLA's)")
    rope_selection: str | None = arg(None, "which pairs stay rotated: 2norm, high, low, uniform or rorope",
                                     choices=["2norm", "high", "low", "uniform", "rorope"])
    rope: str | None = arg(None, "rotary families: exact (every pair keeps its rotation; keys compressed before RoPE "
                           "with the values — the default) or partial (--rope_pairs kept, the others dropped: MHA2MLA)",
                           choices=["exact", "partial"])
    balance_kv: bool = arg(True, "latent: keys and values scaled to equal norms before their joint SVD")
    calibration_file: str | None = arg(None, "a UTF-8 .txt file or a folder of .txt files: calibration and recovery "
                                       "text (default: equal blocks of the repository's Shakespeare, SmolLM2's own "
                                       "answers and CPython's Python reference: docs/domains.md)")
    eval_file: str | None = arg(None, "held-out text (.txt file or folder) for perplexity (default: the repository's "
                                "Shakespeare validation split)")
    dataset_name: str | None = arg(None, "a datasets id instead of the files: its train split calibrates, its "
                                   "validation (or test) split evaluates")
    dataset_config_name: str | None = arg(None, "the dataset's configuration")
    text_column: str = arg("text", "the dataset's text column")
    block_size: int | None = arg(None, "tokens per calibration block and evaluation window (default: min(512, the "
                                 "model's positions))")
    calibration_blocks: int = arg(32, "calibration blocks (fewer if the text is short)")
    eval_tokens: int = arg(16384, "held-out tokens evaluated (0: all)")
    batch_size: int = arg(8, "blocks per batch (calibration, recovery, evaluation)")
    recover: str = arg("layerwise", "none, layerwise (each attention layer fitted to stock's output) or finetune (a "
                       "short KL distillation to stock's logits)", choices=list(RECOVERIES))
    recover_steps: int = arg(100, "layerwise: optimizer steps per layer; finetune: steps in all")
    learning_rate: float | None = arg(None, "the recovery's Adam learning rate (default: 1e-3 layer-wise, 2e-4 "
                                      "finetune: the rates of docs/recovery_smollm2.md)")
    recover_inputs: str = arg("patched", "layerwise: 'stock' or 'patched' (GPTQ-style) layer inputs",
                              choices=["stock", "patched"])
    quantized_cache_bits: int | None = arg(None, "save a quantized latent cache (4 or 8 bits) as generate()'s default",
                                           choices=[4, 8])
    decode_tokens: int = arg(32, "greedy decode steps timed for ms per step")
    push_to_hub: bool = arg(False, "upload the checkpoint to --hub_model_id")
    hub_model_id: str | None = arg(None, "namespace/name of the Hub repository")
    hub_token: str | None = arg(None, "a Hub token (default: the logged-in one)")
    seed: int = arg(0, "the seed of the recovery")


# ----------------------------------------------------------------------------------------------------------------
# the KV budget: pure functions
# ----------------------------------------------------------------------------------------------------------------


def rotary_latent_rank(kv_budget: float, kv_heads: int, head_dim: int, rope_pairs: int) -> int:
    """r_c of a rotary latent that keeps `kv_budget` of stock's KV numbers per token and layer.

    The layer caches r_c + G·2r numbers (the latent and the G rotated keys of r kept pairs); stock caches 2·G·hd.
    So r_c = ⌊b·2·G·hd⌋ − G·2r, rounded down (the cache stays within the budget).

    Raises:
        ValueError: the budget does not cover the rotary keys plus one latent number, or r_c would exceed what the
            latent can hold (the NoPE keys and the values: G·(2·hd − 2r)).
    """
    stock, rope = 2 * kv_heads * head_dim, 2 * kv_heads * rope_pairs
    rank = math.floor(kv_budget * stock + 1e-9) - rope
    if rank < 1:
        raise ValueError(
            f"--kv_budget {kv_budget} keeps {math.floor(kv_budget * stock + 1e-9)} of stock's {stock} numbers per token "
            f"and layer, but the {rope_pairs} kept rotary pairs of {kv_heads} KV heads alone take {rope} (G·2r). "
            f"Raise --kv_budget above {(rope + 1) / stock:.4g}, or keep fewer pairs (--rope_pairs)."
        )
    widest = kv_heads * (2 * head_dim - 2 * rope_pairs)
    if rank > widest:
        raise ValueError(
            f"--kv_budget {kv_budget} gives r_c = {rank}, above the {widest} numbers the latent can hold with "
            f"{rope_pairs} kept pairs (G·(2·hd − 2r)): use --kv_budget <= {(widest + rope) / stock:.4g} (exact), or keep "
            "more pairs."
        )
    return rank


def latent_rank(kv_budget: float, hidden_size: int) -> int:
    """r_c of a (GPT-2-like) latent keeping `kv_budget` of stock's KV numbers per token and layer: r_c of 2·d,
    r_c = ⌊b·2d⌋, at most d (a latent of d is exact: budget 0.5).

    Raises:
        ValueError: a budget below one number or above 0.5.
    """
    rank = math.floor(kv_budget * 2 * hidden_size + 1e-9)
    if not 1 <= rank <= hidden_size:
        raise ValueError(
            f"--kv_budget {kv_budget} gives a latent of r_c = {rank} of stock's 2·d = {2 * hidden_size} numbers per token "
            f"and layer; a latent holds 1 <= r_c <= d = {hidden_size} (0.5 of stock is already exact). Use "
            f"{1 / (2 * hidden_size):.4g} <= --kv_budget <= 0.5, or --mode covariance --values merged (exact, 0.5)."
        )
    return rank


def lowrank_rank(kv_budget: float, hidden_size: int, heads: int, value_numbers: int) -> int:
    """r of lowrank keys keeping `kv_budget` of stock's 2·d numbers per token and layer: the layer caches H·r keys
    plus `value_numbers` (stock values: d; value_rank r_v: H·r_v; merged values: d), so r = ⌊(b·2d − values)/H⌋,
    at most the head size (exact).

    Raises:
        ValueError: the budget does not cover the values plus one key number per head.
    """
    rank = min(math.floor((kv_budget * 2 * hidden_size - value_numbers) / heads + 1e-9), hidden_size // heads)
    if rank < 1:
        raise ValueError(
            f"--kv_budget {kv_budget} keeps {math.floor(kv_budget * 2 * hidden_size)} of stock's {2 * hidden_size} numbers "
            f"per token and layer, but the values alone take {value_numbers}. Raise --kv_budget above "
            f"{(value_numbers + heads) / (2 * hidden_size):.4g}, or shrink the values (--value_rank), or use --mode latent."
        )
    return rank


def resolve_budget(args: ConvertArguments, config, spec) -> tuple[int, int | None, str]:
    """(rank, rope_pairs, the line that says how) for `--kv_budget` on a model of `config` (family `spec`)."""
    budget = args.kv_budget
    if spec.rotary and _rope_route(args) == "exact":
        stock = 2 * _kv_heads(config) * _head_dim(config)
        rank = max(1, math.floor(budget * stock))
        return rank, None, (f"kv_budget {budget}: r_c = {rank} (exact-RoPE latent: per layer r_c = {rank} of stock's "
                            f"2·G·hd = {stock}, plus each token's position)")
    if spec.rotary:
        kv_heads, head_dim = _kv_heads(config), _head_dim(config)
        pairs = args.rope_pairs if args.rope_pairs is not None else max(1, head_dim // 16)
        rank = rotary_latent_rank(budget, kv_heads, head_dim, pairs)
        return rank, pairs, (f"kv_budget {budget}: r_c = {rank}, rope_pairs = {pairs} (per layer r_c + G·2r = {rank} + "
                             f"{kv_heads}·{2 * pairs} = {rank + 2 * kv_heads * pairs} of stock's 2·G·hd = "
                             f"{2 * kv_heads * head_dim})")
    d, heads = config.hidden_size, config.num_attention_heads
    if args.mode == "latent":
        rank = latent_rank(budget, d)
        return rank, None, f"kv_budget {budget}: r_c = {rank} (per layer r_c = {rank} of stock's 2·d = {2 * d})"
    values = heads * args.value_rank if args.value_rank else d
    rank = lowrank_rank(budget, d, heads, values)
    return rank, None, (f"kv_budget {budget}: r = {rank} (per layer H·r + values = {heads}·{rank} + {values} = "
                        f"{heads * rank + values} of stock's 2·d = {2 * d})")


def _rope_route(args: ConvertArguments) -> str:
    """The rotary route asked for: --rope, else partial when --rope_pairs / --rope_selection are given, else exact."""
    if args.rope:
        return args.rope
    return "partial" if args.rope_pairs is not None or args.rope_selection is not None else "exact"


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ----------------------------------------------------------------------------------------------------------------
# checks before any work
# ----------------------------------------------------------------------------------------------------------------


def parse_rank(text: str | None):
    """--rank: '32' -> 32, '0.9' -> 0.9 (energy), '0:32,1:16' -> {0: 32, 1: 16}."""
    if text is None or isinstance(text, (int, float, dict)):  # a config file's number or mapping, as it is
        return text
    try:
        if ":" in text:
            return {int(k): int(v) for k, v in (item.split(":") for item in text.split(","))}
        return float(text) if "." in text else int(text)
    except ValueError:
        raise ValueError(f"--rank {text!r}: pass an integer (32), a float in (0, 1) (0.9: the spectral energy kept) or "
                         "ranks per block ('0:32,1:16').") from None


def parse_layers(text: str | None) -> list[int] | None:
    if text is None or isinstance(text, (int, float, dict)):  # a config file's number or mapping, as it is
        return text
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers {text!r}: pass block indices separated by commas, e.g. '0,1,2'.") from None


HELP_EXAMPLE = """Convert a causal LM: check every argument, load, calibrate, patch, recover, evaluate, save, push.

example:
  hf-merged-attn convert --model_name_or_path HuggingFaceTB/SmolLM2-135M --kv_budget 0.3125 \\
      --calibration_file notes.txt --eval_file held_out.txt --output_dir smollm2-mla
  hf-merged-attn convert config.json        (the same settings in a .json / .yaml file)"""
# the flags of `convert --help`, by what they set (anything not named lands in the last group)
HELP_GROUPS = {
    "model": ("model_name_or_path", "gguf_file", "output_dir"),
    "what to patch and the cache budget": ("mode", "kv_budget", "rank", "layers", "rope", "rope_pairs",
                                           "rope_selection", "values", "value_rank", "init", "balance_kv"),
    "calibration and evaluation text": ("calibration_file", "eval_file", "dataset_name", "dataset_config_name",
                                        "text_column", "block_size", "calibration_blocks", "eval_tokens", "batch_size"),
    "recovery": ("recover", "recover_steps", "learning_rate", "recover_inputs", "seed"),
    "output": ("quantized_cache_bits", "decode_tokens", "push_to_hub", "hub_model_id", "hub_token"),
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's true default once (none shown for an unset optional value or a required flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and not action.required
                and "default" not in text and action.option_strings):
            text += " (default: %(default)s)"
        return text


def convert_parser():
    """The argument parser of `hf-merged-attn convert`: transformers' HfArgumentParser over `ConvertArguments`, its
    flags grouped (HELP_GROUPS), the required ones marked, one example at the top."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ConvertArguments, prog="hf-merged-attn convert", description=HELP_EXAMPLE,
                              formatter_class=_HelpFormatter)
    general = parser._action_groups[1]  # argparse's "options" group, where HfArgumentParser put every flag
    groups = {title: parser.add_argument_group(title) for title in HELP_GROUPS}
    for action in list(general._group_actions):
        if action.dest == "help":
            continue
        title = next((t for t, names in HELP_GROUPS.items() if action.dest in names), "output")
        general._group_actions.remove(action)
        groups[title]._group_actions.append(action)
        if action.dest in ("model_name_or_path", "output_dir"):
            action.required = True
        if action.dest == "balance_kv" and "--no_balance_kv" in action.option_strings:
            action.help = "latent: fit [Wk | Wv] as it is, keys and values NOT scaled to equal norms (an ablation)"
    return parser


def read_config_file(parser, path: str) -> ConvertArguments:
    """ConvertArguments from a .json / .yaml file (as run_clm reads one), every value checked against its field's type
    and choices (a file, unlike the command line, passes values through unconverted).

    Raises:
        ValueError: a file that cannot be read or parsed, an unknown key, or a value of the wrong type or choice — each
            naming the key, the value given and what is allowed.
    """
    import dataclasses
    import typing

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist.")
    try:
        if path.endswith(".json"):
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        else:
            import yaml

            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (ValueError, ImportError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {path!r} cannot be read: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} holds a {type(data).__name__}, not a mapping of argument names to values.")
    fields = {f.name: f for f in dataclasses.fields(ConvertArguments)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"config file {path!r}: unknown key(s) {unknown}; allowed keys are the flags of "
                         "`hf-merged-attn convert --help` without their dashes.")
    hints = typing.get_type_hints(ConvertArguments)
    for key, value in data.items():
        allowed = tuple(t for t in typing.get_args(hints[key]) or (hints[key],) if t is not type(None))
        ok = value is None and type(None) in typing.get_args(hints[key])
        if not ok:
            kinds = (int, float) if float in allowed else allowed  # an integer where a float is expected is fine
            ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in allowed)
            if str in allowed and key == "rank" and isinstance(value, (int, float, dict)):
                ok = not isinstance(value, bool)  # --rank also takes a number or a {block: rank} mapping in a file
        choices = fields[key].metadata.get("choices")
        if ok and choices is not None and value is not None and value not in choices:
            raise ValueError(f"config file {path!r}: {key} = {value!r} is not one of {choices}.")
        if not ok:
            names = " or ".join(t.__name__ for t in allowed) + (" or null" if type(None) in typing.get_args(hints[key]) else "")
            raise ValueError(f"config file {path!r}: {key} = {value!r} ({type(value).__name__}) must be {names}"
                             + (f" (one of {choices})" if choices else "") + f": {fields[key].metadata['help']}.")
    return ConvertArguments(**data)
