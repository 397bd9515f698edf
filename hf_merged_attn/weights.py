"""What a family adapter tells the package (`ArchitectureSpec`, the registry entry), and how per-head weights are
read out of (and written back to) `nn.Linear` / `Conv1D` projections.

Self-contained (torch and transformers only): it travels next to every saved checkpoint with the core files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

@dataclass
class ArchitectureSpec:
    """One model family: how to find, read, rebuild and save its self-attention. The registry entry.

    Checklist for a new family (an adapter file `modeling_merged_<family>.py` beside the GPT-2 one):
      1. Check that merging is exact: positions must not act between the query and key projections (learned
         absolute positions, or a bias added to the scores as ALiBi is). Rotary families cannot be merged.
      2. `MergedXConfig(XConfig)` with `model_type = "merged_<x>"` and `merged_attn: dict | None = None`.
      3. `MergedXAttention(MergedAttention, XAttention)`: `stock_settings(config, layer_idx)` gives the sizes, the
         family's scaling rule, causality and dropout (its default reads the common config names; override it
         where the family differs, e.g. GPT-2's layer-dependent scaling); `output_name` names the stock output projection the merged
         module keeps (shared by reference; None where it lives outside the self-attention module, as in BERT);
         `forward` keeps the stock signature and return value and calls `self.attend(...)` (which applies the output
         projection the module owns, and the per-head value bias of merged values), passing any additive
         score bias (ALiBi) as `score_bias`.
      4. `read_weights(stock_attention)` -> the canonical per-head dict {wq, wk, wv: (H, d, hd); bq, bk, bv:
         (H, hd)} and `write_weights(stock_attention, parts)`, its inverse (for export back to stock).
      5. `merged_classes(spec, (StockClass, auto_name), ...)` for the family's model classes, each assigned to a
         module-level name (`MergedXForCausalLM`), so checkpoints load through the Auto classes and remote code.
      6. One entry in `registry.REGISTRY`, one row in the families table of `tests/families.py` and README.md.

    Attributes:
        family: display name ("GPT-2").
        model_types: the stock `config.model_type` values this entry patches.
        attention_class: the stock self-attention class (found with isinstance).
        merged_attention_class: the adapter's subclass of it and of `MergedAttention`.
        config_class: the merged config class (its `model_type` is "merged_<x>").
        block_class: the transformer block (for FSDP wrapping).
        causal: decoder (causal) or encoder (bidirectional) attention.
        has_cache: whether the family keeps a KV cache when generating.
        read_weights, write_weights: stock module <-> canonical per-head weights (see the checklist).
        new_stock_attention: (config, layer_idx) -> an empty stock attention module, for export.
        qkv_names: the stock attention's query/key/value submodules (what `read_weights` reads; like-for-like LoRA
            targets on a stock model).
        rotary: positions are rotary (RoPE, grouped-query attention): only the latent mode applies, with kept
            rotary pairs (`rotary_latent.RotaryLatentAttention`).
        check_model: raises NotImplementedError for variants of the family that are not supported.
        max_length: config -> the longest input the model takes (None: no limit, e.g. ALiBi); default
            config.max_position_embeddings. RoBERTa's positions start after its padding index, so it takes fewer.
        model_classes: stock model class -> (merged class, Auto class name or None), filled by `merged_class`.
    """

    family: str
    model_types: tuple[str, ...]
    attention_class: type
    merged_attention_class: type
    config_class: type
    block_class: type
    read_weights: Callable[[nn.Module], dict]
    write_weights: Callable[[nn.Module, dict], None]
    new_stock_attention: Callable[..., nn.Module]
    qkv_names: tuple[str, ...] = ()
    rotary: bool = False
    causal: bool = True
    has_cache: bool = True
    check_model: Callable[[object], None] = lambda config: None
    max_length: Callable[[object], int | None] = lambda config: getattr(config, "max_position_embeddings", None)
    model_classes: dict = field(default_factory=dict)

    def stock_attentions(self, model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
        """(parent, attribute, module) for each stock (not yet merged) self-attention of `model`, in order."""
        from .merged_attention import MergedAttention  # the attention math imports this module

        return [
            (parent, name, child)
            for parent in model.modules()
            for name, child in parent.named_children()
            if isinstance(child, self.attention_class) and not isinstance(child, MergedAttention)
            and not getattr(child, "is_cross_attention", False)
        ]


def heads_to_linear(per_head: torch.Tensor) -> torch.Tensor:
    """(H, d, k) per-head maps x -> x @ W_h as one nn.Linear weight (H*k, d)."""
    heads, d, k = per_head.shape
    return per_head.mT.reshape(heads * k, d)  # (H, k, d) -> (H*k, d)


def linear_to_heads(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of `heads_to_linear`: an nn.Linear weight (H*k, d) -> per-head maps (H, d, k)."""
    _, d = weight.shape
    return weight.reshape(num_heads, -1, d).mT  # (H*k, d) -> (H, k, d) -> (H, d, k)


def read_linear_qkv(query: nn.Linear, key: nn.Linear, value: nn.Linear, num_heads: int) -> dict[str, torch.Tensor]:
    """The canonical per-head weights of separate q/k/v `nn.Linear` projections with biases (detached views)."""
    parts = {}
    for name, linear in (("q", query), ("k", key), ("v", value)):
        parts[f"w{name}"] = linear_to_heads(linear.weight.detach(), num_heads)  # (H, d, hd)
        parts[f"b{name}"] = linear.bias.detach().view(num_heads, -1)  # (H, hd)
    return parts


@torch.no_grad()
def write_linear_qkv(query: nn.Linear, key: nn.Linear, value: nn.Linear, parts: dict[str, torch.Tensor]) -> None:
    """Inverse of `read_linear_qkv`: write canonical per-head weights into q/k/v `nn.Linear` projections."""
    for name, linear in (("q", query), ("k", key), ("v", value)):
        linear.weight.copy_(heads_to_linear(parts[f"w{name}"]))
        linear.bias.copy_(parts[f"b{name}"].reshape(-1))


def read_output(output: nn.Module, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head rows Wo_h (H, hd, d) and the bias bo (d,) of a stock output projection: an nn.Linear (out, in) or a
    transformers Conv1D (in, out), as GPT-2's c_proj. Head h's attention output multiplies Wo_h."""
    weight = output.weight.detach()
    rows = weight.mT if isinstance(output, nn.Linear) else weight  # (in, out) = (H*hd, d)
    return rows.reshape(num_heads, -1, rows.shape[1]), output.bias.detach()


@torch.no_grad()
def write_output(output: nn.Module, wo: torch.Tensor, bo: torch.Tensor) -> None:
    """Inverse of `read_output`."""
    rows = wo.reshape(-1, wo.shape[-1])  # (H*hd, d)
    output.weight.copy_(rows.mT if isinstance(output, nn.Linear) else rows)
    output.bias.copy_(bo)
