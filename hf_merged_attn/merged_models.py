"""The checkpoint side of the core: merged model classes that build, check, save, describe and push themselves.

Self-contained (torch, transformers and the core beside it) and family-free: it travels with every checkpoint.
An adapter makes each of its family's model classes with `merged_class(StockClass, spec, auto_name)`.
"""

from __future__ import annotations

import logging
import os
import tempfile

import torch
from torch import nn
from transformers.generation.utils import ALL_CACHE_NAMES
from transformers.utils.hub import CommitOperationAdd, hf_api

from .merged_attention import FORMAT_VERSION, ArchitectureSpec, CorruptRecordError, MergedAttention, check_record
from .quantized_cache import GENERATION_FIELD, LatentQuantizedCache, QuantizationSettings

logger = logging.getLogger(__name__)


def is_hub_id(name: str) -> bool:
    """Whether `name` can be a Hugging Face Hub model id: `name` (legacy ids such as `gpt2`) or `namespace/name` —
    at most one slash — each part of letters, digits, "-", "_" and ".", beginning and ending with a letter, digit or
    "_", without "--" or "..", the name at most 96 characters (the Hub's own rule). A relative folder such as
    `runs/exp1/checkpoint-500` is not one."""
    parts = name.split("/")
    if len(parts) > 2 or len(parts[-1]) > 96 or "--" in name or ".." in name:
        return False
    return all(
        part and all(c.isalnum() or c in "-_." for c in part) and (part[0].isalnum() or part[0] == "_")
        and (part[-1].isalnum() or part[-1] == "_")
        for part in parts
    )


def num_layers_of(config) -> int:
    """The number of transformer blocks (every supported config maps its own name to num_hidden_layers)."""
    return config.num_hidden_layers


def merge_attention_modules(model: nn.Module, spec: ArchitectureSpec, record: dict) -> None:
    """Swap the recorded blocks' stock self-attention for unseeded merged modules of the same device and dtype.

    Used when building a model from a merged config, whose weights then come from a checkpoint.
    """
    patch = check_record(record, num_layers_of(model.config), model.config.hidden_size, model.config.num_attention_heads)
    rotary = {}
    if spec.rotary:  # a record from before rope="exact" existed is the partial route
        rotary = {"rope_pairs": patch.rope_pairs, "rope_selection": patch.rope_selection, "rope": patch.rope or "partial"}
    for parent, name, child in spec.stock_attentions(model):
        if child.layer_idx in patch.layers:
            setattr(parent, name, spec.merged_attention_class.like(
                child, model.config, patch.mode, patch.rank_for(child.layer_idx), patch.values, patch.value_rank,
                **rotary,
            ))


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters of a patched model and of the stock model it came from (queries, keys, values: 3d² + 3d)."""
    total = sum(p.numel() for p in model.parameters())
    stock = total
    for module in model.modules():
        if isinstance(module, MergedAttention):
            d = module.embed_dim
            output = getattr(module, module.output_name) if module.output_name else None
            own = sum(p.numel() for p in module.parameters())
            if module.values is None and module.value_rank is None:  # the stock output projection, kept as it was
                own -= sum(p.numel() for p in (output.parameters() if output else ()))
            else:  # the output map holds M_h / Q_h in place of stock's d x d output projection
                stock += d * d + d
            stock += module.stock_qkv_parameters() - own
    return {"total": total, "stock": stock}


def cache_summary(model: nn.Module, has_cache: bool) -> str:
    """One line on the KV cache per token of a patched model against stock's (for the model card)."""
    modules = [m for m in model.modules() if isinstance(m, MergedAttention)]
    if not has_cache:
        return "No KV cache (an encoder)."
    ours = sum(m.cache_numbers_per_token() for m in modules)
    stock = sum(m.stock_cache_numbers_per_token() for m in modules)
    return (
        f"KV cache per token over the {len(modules)} patched layers: {ours:,} numbers ({2 * ours:,} bytes in bf16/fp16) "
        f"against stock's {stock:,} ({2 * stock:,} bytes): {ours / stock:.3g}x."
    )


def _load_folded_value_bias(model: nn.Module, info: dict, where) -> None:
    """Checkpoints of merged / low-rank values saved before `value_bias` existed hold b̃ = bo + Σ_h c_h in the output
    bias: with c_h = 0 they compute exactly what they computed when saved. Zero those, drop them from the missing
    keys, and say what that folded form does not reproduce. Only a record without a format version can be such a
    checkpoint: from version 1 on a missing `value_bias` is a missing weight like any other."""
    old = [key for key in info.get("missing_keys", []) if key.endswith(".value_bias")]
    if not old or model.config.merged_attn.get("format_version") is not None:
        return
    params = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", "")
    for key in old:
        param = params.get(key, params.get(f"{prefix}.{key}"))
        if param is not None:
            with torch.no_grad():
                param.zero_()
            info["missing_keys"] = [k for k in info["missing_keys"] if k != key]
    logger.warning(
        "%s was saved before the per-head value bias c_h = bv_h Wo_h had its own weight (value_bias): its output bias "
        "holds bo + Σ_h c_h, which it keeps (value_bias = 0). That equals stock wherever every attention row sums to 1, "
        "not for queries whose mask hides every key (SDPA) or under attention dropout. Re-patch the stock model for "
        "the exact form.", where,
    )


def quantized_cache_summary(model) -> str:
    """The card's line on a quantized latent cache set as the generation default ('' if none)."""
    settings = getattr(getattr(model, "generation_config", None), GENERATION_FIELD, None)  # heads without generate()
    if not settings:
        return ""
    modules = [m for m in model.modules() if isinstance(m, MergedAttention)]
    width = modules[0].cache_layout.key_width
    group = QuantizationSettings(**settings).group(width)
    scales = 2 * (width // group if settings["axis"] == "token" else width / group)  # scale + minimum per group
    per_layer = width * settings["nbits"] / 8  # bytes of codes per token and layer, plus the scales below
    rotary = ""
    if getattr(modules[0], "rotary", False):  # the rotary keys (value slot) stay in the model's dtype, every token
        numbers = modules[0].cache_layout.value_width
        dtype = modules[0].latent_proj.weight.dtype
        size, name = dtype.itemsize, str(dtype).removeprefix("torch.")
        rotary = (f" The rotary keys are not quantized: {numbers} numbers ({numbers * size} bytes in {name}) per token "
                  f"and layer, every token; beyond the window {per_layer + (scales + numbers) * size:g} bytes per token "
                  f"and layer in all (codes, scales and minima in {name}, rotary keys).")
    return (
        f" `generate()` defaults to a quantized latent cache (LatentQuantizedCache: int{settings['nbits']}, scales per "
        f"{settings['axis']}, groups of {group}, the newest {settings['residual_length']} tokens in full precision): "
        f"{per_layer:g} bytes of codes + {scales:g} scale numbers per token and layer beyond that window." + rotary
    )


def default_cache(model, args: tuple, kwargs: dict) -> LatentQuantizedCache | None:
    """The quantized latent cache `model.generate(*args, **kwargs)` starts with by default, or None (transformers then
    picks the cache as usual).

    A setting is read as transformers resolves it: the argument, else the `generation_config` passed (positionally
    second, or by name), else `model.generation_config`. None where no generation config asks for the quantized cache,
    a cache is passed, a `cache_implementation` is set or use_cache is False. An assistant's default cache (assisted
    decoding calls the assistant's generate() with is_assistant set) records what each update quantizes, so that the
    rollback of rejected candidates can restore it, as transformers does for the caches it makes for assistants.
    """
    passed = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
    configs = [c for c in (passed, getattr(model, "generation_config", None)) if c is not None]

    def setting(name: str, argument: bool = True):
        if argument and kwargs.get(name) is not None:
            return kwargs[name]
        return next((getattr(c, name) for c in configs if getattr(c, name, None) is not None), None)

    settings = setting(GENERATION_FIELD, argument=False)
    if not settings or setting("cache_implementation") is not None or setting("use_cache") is False or any(
        kwargs.get(name) is not None for name in ("cache", "past_key_values")
    ):
        return None
    cache = LatentQuantizedCache(model.config, **settings)
    if setting("is_assistant"):
        cache.activate_past_recording()
    return cache


class MergedModelMixin:
    """What every merged model class adds to its stock transformers class: build, check, save, card, push.

    `merged_spec` (the family's `ArchitectureSpec`) is set on each class by `merged_class`.
    """

    merged_spec: ArchitectureSpec

    def __init__(self, config, *args, **kwargs):
        check_record(config.merged_attn, num_layers_of(config), config.hidden_size, config.num_attention_heads)
        self.merged_spec.check_model(config)
        super().__init__(config, *args, **kwargs)
        merge_attention_modules(self, self.merged_spec, config.merged_attn)
        self.post_init()

    def _merged_attention_names(self) -> list[str]:
        prefix = getattr(self, "base_model_prefix", "")
        names = [n for n, m in self.named_modules() if isinstance(m, MergedAttention)]
        return names + [n[len(prefix) + 1 :] for n in names if prefix and n.startswith(prefix + ".")]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing checkpoints whose weights do not fit the recorded patch.

        A missing, unexpected or mis-shaped attention weight raises instead of being randomly initialised.
        """
        want_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        try:  # mismatched shapes are collected (not raised) so that they can be told apart below
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, ignore_mismatched_sizes=True,
                **kwargs,
            )
        except CorruptRecordError as error:
            raise ValueError(f"{pretrained_model_name_or_path}/config.json: {error}") from error
        attention = tuple(name + "." for name in model._merged_attention_names())
        _load_folded_value_bias(model, info, pretrained_model_name_or_path)
        # mismatched keys come as (name, shape in the checkpoint, shape the config gives)
        mismatched = {key: f"{key}: checkpoint {list(saved)}, config {list(wanted)}"
                      for key, saved, wanted in info.get("mismatched_keys", [])}
        problems = {
            kind: sorted(k for k in info.get(kind, []) if k.startswith(attention))
            for kind in ("missing_keys", "unexpected_keys")
        }
        problems["mismatched_keys"] = sorted(text for key, text in mismatched.items() if key.startswith(attention))
        problems = {kind: keys for kind, keys in problems.items() if keys}
        if problems:
            raise ValueError(
                f"{pretrained_model_name_or_path}: the attention weights in model.safetensors do not match "
                f"config.json's merged_attn={model.config.merged_attn} ({problems}). Refusing to load a model with "
                "missing or randomly initialised attention; re-save it from the patched model with save_pretrained."
            )
        others = sorted(text for key, text in mismatched.items() if not key.startswith(attention))
        if others and not ignore_mismatched:
            raise ValueError(
                f"{pretrained_model_name_or_path}: weights outside the merged attention do not have the shapes that "
                f"config.json gives them ({'; '.join(others)}); merged_attn is not involved. The config's sizes "
                "(vocab_size, hidden size, positions, ...) and model.safetensors disagree: fix config.json or re-save "
                "the model with save_pretrained, or pass ignore_mismatched_sizes=True to re-initialise those weights."
            )
        return (model, info) if want_info else model

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, with the quantized latent cache as the default where the generation config says
        so (`use_quantized_latent_cache`). A cache passed here, a `cache_implementation` set anywhere (an argument, the
        `generation_config` passed, or `model.generation_config`) and use_cache=False win over that default."""
        cache = default_cache(self, args, kwargs)
        if cache is not None:  # under the name this transformers takes a cache by: "cache" (5.25), "past_key_values" (5.17)
            kwargs[ALL_CACHE_NAMES[0]] = cache
        return super().generate(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, model_card_results: dict | None = None, **kwargs):
        """`PreTrainedModel.save_pretrained` (safetensors only) plus a README.md model card if none is there.

        The record is written with the current `FORMAT_VERSION`: every weight of the patch is saved, whichever format
        the model was loaded from.
        """
        kwargs.pop("safe_serialization", None)  # only safetensors are ever written
        self.config.merged_attn = {**self.config.merged_attn, "format_version": FORMAT_VERSION}
        merged = {m for m, _ in self.merged_spec.model_classes.values()}
        own = next((c for c in type(self).__mro__ if c in merged), type(self))
        # remote code: every Auto class of the family loads the checkpoint as its merged class (transformers itself
        # would write only this class's own Auto name)
        module = own.__module__.rsplit(".", 1)[-1]
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **{
            auto: f"{module}.{m.__name__}" for m, auto in self.merged_spec.model_classes.values() if auto
        }}
        # a subclass made at run time around the model (FSDP2's FSDP<Name>) would be written as the remote-code class,
        # with torch's own source files beside it: save as the merged class the checkpoint is of
        wrapper, self.__class__ = self.__class__, own
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
            card = os.path.join(save_directory, "README.md")
            if kwargs.get("is_main_process", True) and (model_card_results is not None or not os.path.exists(card)):
                with open(card, "w", encoding="utf-8") as f:
                    f.write(self.create_model_card(results=model_card_results))
        finally:
            self.__class__ = wrapper

    def create_model_card(self, results: dict | None = None, repo_id: str | None = None) -> str:
        """A README.md: base model, every choice of the patch (both sides) and whether it is exact, parameter counts
        vs stock, the cache, how to load, optional results."""
        spec, record = self.merged_spec, self.config.merged_attn
        counts = parameter_counts(self)
        base, folder = record.get("base_model"), record.get("base_model_folder")
        if base and not is_hub_id(base):  # a folder recorded as a Hub id (before #27): its last name only
            base, folder = None, os.path.basename(os.path.normpath(base))
        base_text = f" (`{base}`)" if base else (f" (from a local folder `{folder}`)" if folder else "")
        where = repo_id or "path/to/this/folder"
        rank = record["rank"]
        modules = [m for m in self.modules() if isinstance(m, MergedAttention)]
        hidden, head_dim = modules[0].embed_dim, modules[0].head_dim
        ranks = list(rank.values()) if isinstance(rank, dict) else [rank]
        if isinstance(rank, dict):
            energy = record.get("energy")
            source = "each head's S̃_h = [S_h; u_h]" if record["mode"] == "lowrank" else "the layer's stacked [Wk | Wv]"
            energy = f", the smallest keeping a share {energy:g} of the spectral energy of {source}" if energy else ""
            rank_text = f"ranks per block ({', '.join(f'block {i}: {r}' for i, r in rank.items())}{energy})"
        else:
            rank_text = f"rank {rank}"
        seed = "activation-whitened SVD" if record.get("init") == "whitened" else "SVD"
        cached = "only c is cached" if spec.has_cache else "keys and values are expanded from c; an encoder caches nothing"
        what = {
            "covariance": "whose query–key product is held as one d x d matrix per head (S_h = Wq_h·Wk_hᵀ, covariance mode)",
            "lowrank": f"whose query–key product is held factored at {rank_text} (S_h ≈ U_h·V_hᵀ, lowrank mode, "
            f"seeded by {seed})",
            "latent": f"whose keys and values come from one shared latent per layer, c = x·W_c at {rank_text} "
            f"(latent mode, seeded by {seed} of the layer's stacked [Wk | Wv]; {cached})",
        }[record["mode"]]
        rotary_exact = None
        if spec.rotary and record.get("rope") == "exact":
            full = 2 * modules[0].num_kv_heads * head_dim
            what = (f"whose keys and values come from one shared latent per layer, c = x·W_c at r_c = {rank} "
                    f"(exact-RoPE latent: rope='exact', seeded by {seed} of the layer's [keys before RoPE | values]); "
                    "every frequency pair keeps its rotation: keys are rebuilt from c (c·Bk + bk) and rotated at each "
                    "cached token's own position; the cache holds c and each token's position only")
            rotary_exact = all(r >= full for r in ranks)
            dropped = (f" Only the rank changed (r_c of {full} = 2·G·hd), so a stock {spec.family} with "
                       "Wk = W_c·Bk and Wv = W_c·Bv computes this model exactly: `hf_merged_attn.unpatch_model(model)` "
                       f"gives that stock model, which anything that runs {spec.family} can evaluate or serve (at the "
                       "stock cache size).")
        elif spec.rotary:
            first = modules[0]
            pairs, selection, half = record.get("rope_pairs"), record.get("rope_selection"), head_dim // 2
            kept = (f"the {first.rope_heads * first.rope_width // 2} strongest mixed pairs of a per-frequency PCA across "
                    "the KV heads (RoRoPE) as ONE rotary key shared by all heads" if selection == "rorope"
                    else f"{pairs} of {half} frequency pairs per KV head (rule {selection!r}; each layer's choice is its "
                    "`rope_freq` buffer)")
            what = (f"whose keys and values come from one shared latent per layer, c = x·W_c at r_c = {rank} (rotary "
                    f"latent mode: rope_pairs={pairs}, rope_selection={selection!r}, seeded by {seed} of the layer's "
                    f"[NoPE keys | values]); {kept} keep their rotation; the cache holds c and the rotated rotary keys "
                    "only")
            values_covered = all(r >= first.num_kv_heads * head_dim for r in ranks)
            rotary_exact = pairs == half and values_covered
            dropped = "" if pairs == half else (
                f" The other {half - pairs} pairs per KV head lost their rotation: a change of the model that "
                "fine-tuning recovers only in part, and that no stock export can undo.")
        value_rank = record.get("value_rank")
        if record.get("values") == "merged":
            values = ("Values are merged: the value is the layer input x, shared by every head, and each head's output "
                      "map holds M_h = Wv_h·Wo_h (d x d), with the value bias c_h = bv_h·Wo_h beside it (exact).")
        elif value_rank is not None:
            values = (f"Values are low-rank at r_v = {value_rank}: M_h = Wv_h·Wo_h ≈ P_h·Q_hᵀ, seeded by {seed} "
                      f"({'exact: r_v is the head size' if value_rank >= head_dim else f'an approximation: the head size is {head_dim}'}).")
        elif record["mode"] == "latent":
            values = "Queries and the output projection are the stock ones."
        else:
            values = "Values and the output projection are the stock ones."
        exact_keys = record["mode"] == "covariance" or all(
            r >= (head_dim if record["mode"] == "lowrank" else hidden) for r in ranks
        )
        exact_values = value_rank is None or value_rank >= head_dim
        if rotary_exact is not None:
            exact_keys = exact_values = rotary_exact
        exact_text = ("At patch time it computed exactly what the base model computed (up to round-off)."
                      if exact_keys and exact_values
                      else "At patch time it approximated the base model (" + ", ".join(
                          side for side, ok in (("the query–key side", exact_keys), ("the value side", exact_values)) if not ok
                      ) + " below full rank); any recovery or training since is in the Results below, if recorded.")
        auto = next((a for m, a in spec.model_classes.values() if m is type(self) and a), "AutoModel")
        stock_type = spec.model_types[0]
        front = ["---", "library_name: transformers", f"tags: [hf_merged_attn, {stock_type}, merged-attention]"]
        if base:  # a Hub id (a local folder is recorded by its name only, as base_model_folder)
            front.append(f"base_model: {base}")
        lines = front + [
            "---",
            "",
            f"# {type(self).__name__}: {record['mode']} attention"
            + ("" if not rank else ", ranks per block" if isinstance(rank, dict) else f", rank {rank}"),
            "",
            f"{spec.family}{base_text} {what}, made with hf_merged_attn. Patched blocks: {record['layers']}.",
            "",
            f"{values} {exact_text}" + (dropped if spec.rotary else ""),
            "",
            cache_summary(self, spec.has_cache) + quantized_cache_summary(self),
            "",
            "| | parameters |",
            "|---|---|",
            f"| this model | {counts['total']:,} |",
            f"| stock {spec.family} of the same shape | {counts['stock']:,} |",
            "",
            "## Load",
            "",
            "```python",
            f"from transformers import {auto}",
            f'model = {auto}.from_pretrained("{where}", trust_remote_code=True)',
            "# or, with `pip install hf_merged_attn`: import hf_merged_attn, then from_pretrained without trust_remote_code",
            f"# back to a stock {spec.family}: hf_merged_attn.unpatch_model(model)",
            "```",
        ]
        if results:
            lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in results.items()]
        return "\n".join(lines) + "\n"

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str = "5GB",
        results: dict | None = None,
    ):
        """Upload weights, config, remote code and a model card (with `results`, if given) to the Hub.

        Returns:
            The `huggingface_hub.CommitInfo` of the upload.
        """
        api = hf_api()
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
            with open(os.path.join(tmp_dir, "README.md"), "w", encoding="utf-8") as f:
                f.write(self.create_model_card(results=results, repo_id=repo_id))
            operations = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(tmp_dir, name))
                for name in sorted(os.listdir(tmp_dir))
            ]
            return api.create_commit(
                repo_id=repo_id,
                operations=operations,
                commit_message=commit_message or f"Upload {type(self).__name__} ({self.config.merged_attn['mode']})",
                token=token,
                revision=revision,
                create_pr=create_pr,
            )


def merged_class(stock_class: type, spec: ArchitectureSpec, auto_name: str | None) -> type:
    """`Merged<StockClass>`: the stock model class with `MergedModelMixin`, defined in the adapter's module.

    Records it in `spec.model_classes` and registers it for `auto_name` (the Auto class written to config.json's
    auto_map for remote code; None where transformers has no Auto class for it). Assign the result to a
    module-level name equal to its `__name__`, so remote code can find it.
    """
    name = f"Merged{stock_class.__name__}"
    cls = type(
        name,
        (MergedModelMixin, stock_class),
        {"config_class": spec.config_class, "merged_spec": spec, "__module__": spec.merged_attention_class.__module__},
    )
    cls.__qualname__ = name
    spec.model_classes[stock_class] = (cls, auto_name)
    if auto_name is not None:
        cls.register_for_auto_class(auto_name)
    return cls


def merged_classes(spec: ArchitectureSpec, *stock_and_auto: tuple[type, str | None]) -> tuple[type, ...]:
    """`merged_class` for each (stock class, Auto class name or None) pair, in order; registers the config too."""
    spec.config_class.register_for_auto_class()  # config.json's auto_map gets "AutoConfig" for remote code
    return tuple(merged_class(stock, spec, auto) for stock, auto in stock_and_auto)
