"""How a merged module reads its up-projections when something wraps or hooks them: peft adapters (LoRA, ...) and
forward hooks. The absorbed decode needs an up-projection as a matrix (Bk, Bv); a wrapped one is probed once per state of
its weights and adapters and the map kept until that state changes.

Self-contained (torch only): it travels next to every saved checkpoint with the core files.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

# The map of each probed (wrapped) up-projection, kept per state: {module: (state, what it pins, weight, bias)}
_PROBED_MAPS = WeakIdKeyDictionary()


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` runs more than its modules' own forward: a forward hook or pre-hook on it or on a module
    inside it, or a forward replaced on an instance (as accelerate's offloading does). Global hooks on every module
    (`register_module_forward_hook`: profilers, FlopCounterMode's module tracker) observe and are not counted: the
    decode then runs as it does without them."""
    stack = [module]
    while stack:  # every module inside (module.modules() without its names: this runs in every forward)
        m = stack.pop()
        if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
            return True
        stack.extend(child for child in m._modules.values() if child is not None)
    return False


def _linear_map(module: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias (out,) or None) of an up-projection that the absorbed decode multiplies by instead of
    calling it on the cached latent `like` (..., in) — never a hooked one (`_hooked`: the decode calls those).

    A plain nn.Linear gives its own tensors. Anything else holding a linear map (a peft LoRA / DoRA layer, a dynamically
    quantized Linear, which has no parameters) is read by probing it with 0 and the unit vectors, in the latent's dtype
    and device, so that what it adds acts in the absorbed decode as in the expanded forward. The probed map is kept
    per state of the module (`_module_state`; and per dtype and device of the latent, inside or outside
    inference_mode) and probed again only when that state changes: after set_adapter, disable_adapter, a training
    step or any in-place update of its weights.
    """
    if type(module).forward is nn.Linear.forward:
        return module.weight, module.bias
    state, pinned = (None, None) if torch.compiler.is_compiling() else _module_state(module)
    if state is not None:  # a map probed in another dtype (autocast) or under inference_mode is not this call's
        state = (like.dtype, like.device, torch.is_inference_mode_enabled(), state)
    kept = _PROBED_MAPS.get(module) if state is not None else None
    if kept is not None and kept[0] == state:
        return kept[2:]
    width = like.shape[-1]
    probe = torch.cat([like.new_zeros(1, width), torch.eye(width, dtype=like.dtype, device=like.device)])
    out = module(probe)  # (1 + in, out): row 0 = the bias, row 1 + i = column i of the weight + the bias
    weight, bias = (out[1:] - out[:1]).mT, out[0]
    if state is not None:  # kept in nn.Linear's layout: the decode's products then read it as a plain weight
        weight = weight.contiguous()
        _PROBED_MAPS[module] = (state, pinned, weight, bias)
    return weight, bias


def _module_state(module: nn.Module) -> tuple[tuple | None, list]:
    """What a probed module's map depends on, as a tuple that compares equal while none of it changes — or None where
    the map must be probed at every call: while gradients flow to its parameters, or while a dropout inside it acts
    (an adapter's dropout in training mode draws anew at every call) — and the storages it names by address.

    Per module inside it: train / eval; each parameter and buffer by storage address and version counter (an in-place
    update such as an optimizer step moves the counter, a replaced tensor the address; the storages are returned to
    be held with the map, so that no new tensor takes an address the state names); for a peft adapter layer (it wraps
    a `base_layer`) its active adapters, disabled flag, merged adapters and scaling; a torch.ao quantized Linear's
    packed weights by identity (also held; `set_weight_bias` and `load_state_dict` replace them).
    """
    grad, state, pinned, stack = torch.is_grad_enabled(), [], [], [module]
    while stack:  # every module inside (module.modules() without its names: this runs in every decode step)
        m = stack.pop()
        stack.extend(child for child in m._modules.values() if child is not None)
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return None, []
        state.append(m.training)
        for tensors in (m._parameters, m._buffers):
            for tensor in tensors.values():
                if tensor is not None:
                    if grad and tensor.requires_grad:
                        return None, []
                    state.append((tensor.data_ptr(), None if tensor.is_inference() else tensor._version))
                    pinned.append(_storage(tensor))
        if "base_layer" in m._modules:  # peft's tuner layers (LoRA, DoRA, ...)
            settings = ("active_adapters", "disable_adapters", "merged_adapters", "scaling")
            state.append(repr([getattr(m, name, None) for name in settings]))
        packed = m.__dict__.get("_packed_params")  # torch.ao's quantized Linear: weights outside any tensor attribute
        if packed is not None:
            state.append(id(packed))
            pinned.append(packed)
    return tuple(state), pinned


def _storage(tensor: torch.Tensor):
    """The storage behind `tensor` (which keeps its address taken while held), or the tensor itself where it has no
    storage of its own to give (wrapper subclasses)."""
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return tensor
