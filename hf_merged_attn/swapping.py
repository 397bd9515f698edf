"""Swapping attention modules in place: hooks move to the replacement, the model's class and config change with the
patch, and peft adapters on what a swap replaces are found (so they are refused, never silently dropped)."""

from __future__ import annotations

from importlib import import_module

from torch import nn

# Hooks on a swapped module move to its replacement, e.g. transformers' output_attentions recorder,
# which is installed lazily on first use, so outputs keep being recorded after the swap.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def _set_class(model: nn.Module, cls: type) -> None:
    """Change a model's class in place, keeping transformers' output capture (output_attentions, output_hidden_states)
    working: it looks the recordable outputs up by the class's name, registered in `PreTrainedModel.__init__`."""
    model.__class__ = cls
    registry = getattr(import_module("transformers.utils.output_capturing"), "_CAN_RECORD_REGISTRY", None)
    if registry is not None and getattr(cls, "_can_record_outputs", None) is not None:
        registry[model] = cls._can_record_outputs


def _forget_merged_names(config) -> None:
    """Drop what a loaded config pins on the instance and would contradict its (new) class: the model_type read from
    config.json, and an auto_map pointing to the merged remote-code files (an exported stock checkpoint has none)."""
    config.__dict__.pop("model_type", None)
    auto_map = config.__dict__.get("auto_map") or {}
    if auto_map and all(str(target).startswith("modeling_merged_") for target in auto_map.values()):
        del config.__dict__["auto_map"]


def _swap(parent: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    for hooks in _HOOK_DICTS:
        getattr(new, hooks).update(getattr(old, hooks))
    new.train(old.training)
    setattr(parent, name, new)


def _adapters_on(model: nn.Module, modules: list[tuple[nn.Module, str | None]]) -> list[str]:
    """Paths of the peft-wrapped projections (LoRA, ...) inside each module of (module, name of a submodule to skip)."""
    paths = {module: path for path, module in model.named_modules()}
    return [
        f"{paths[parent]}.{name}" for parent, kept in modules for name, module in parent.named_modules()
        if isinstance(getattr(module, "base_layer", None), nn.Module) and name.split(".")[0] != kept
    ]
