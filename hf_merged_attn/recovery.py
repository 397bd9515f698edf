"""Layer-wise recovery: fit each patched attention layer to the stock layer's output, one layer at a time.

A patch that is not exact (a rotary latent with dropped pairs, lowrank, a latent below d) changes every layer's
attention output a little; the errors compound through the depth. End-to-end training wins them back through the
whole model at the cost of its full forward and backward passes (and a stock teacher). Layer-wise recovery instead
fits each layer on its own — the attention module's parameters only, with the stock layer's output as the target —
which costs a forward and backward of one attention module per step:

    for layer i:   minimise  E ‖ patched_attn_i(x_i) − stock_attn_i(x_i^stock) ‖²  /  E ‖ stock_attn_i(x_i^stock) ‖²

x_i^stock is the stock model's hidden state at the layer's attention input on the calibration tokens. x_i is either the
same (`inputs="stock"`: every layer learns to reproduce stock on stock's own activations) or the PATCHED model's
activations after the layers before it were recovered (`inputs="patched"`: GPTQ-style, a layer also corrects what the
earlier ones left). The calibration batches run through the model once, block by block: both residual streams are kept
(tokens × d each), so memory is that of one block plus a few activations per token, not of the model's depth.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import calibration_batches
from .merged_attention import MergedAttention
from .registry import spec_for_model, spec_for_patched

INPUTS = ("stock", "patched")


class _Captured(Exception):
    """Raised by a pre-hook once it has what it needs: the rest of the forward pass is not run."""


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """(args, kwargs) of a recorded call with its hidden-states input replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _capture_call(module: nn.Module, run) -> tuple[tuple, dict]:
    """The (args, kwargs) `module` is called with when `run()` runs; the pass stops there."""
    seen: list = []

    def hook(_, args, kwargs):
        seen.append((args, kwargs))
        raise _Captured

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(module).__name__} was not called by the forward pass; cannot recover this layer.")
    return seen[0]


def _capture_calls(blocks: list[nn.Module], run) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) each of `blocks` is called with when `run()` runs (each block's own: a model of mixed
    attention types gives each layer its own mask); the pass stops at the last block. Hidden states are kept for the
    first block only (the others' are replaced by the stream's)."""
    seen: dict[int, tuple] = {}

    def make_hook(i: int):
        def hook(_, args, kwargs):
            if i > 0:  # only the arguments: the hidden states come from the stream
                args, kwargs = _with_hidden(args, kwargs, None)
            seen[i] = (args, kwargs)
            if i == len(blocks) - 1:
                raise _Captured
        return hook

    handles = [block.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        run()
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(seen) != len(blocks):
        raise RuntimeError(f"{len(blocks) - len(seen)} of {len(blocks)} blocks were not called by the forward pass; "
                           "cannot recover this model layer by layer.")
    return [seen[i] for i in range(len(blocks))]


def _blocks(model: nn.Module, block_class: type, attentions: list[nn.Module]) -> list[nn.Module]:
    """The transformer block holding each attention module, in order."""
    blocks = [m for m in model.modules() if isinstance(m, block_class)]
    found = []
    for attn in attentions:
        holders = [b for b in blocks if any(m is attn for m in b.modules())]
        if len(holders) != 1:
            raise RuntimeError(f"no single {block_class.__name__} holds attention layer {len(found)}.")
        found.append(holders[0])
    return found


def _check(model: nn.Module, reference: nn.Module, inputs: str, steps, learning_rate) -> tuple:
    spec = spec_for_patched(model)
    if spec is None:
        raise ValueError(
            f"model is a {type(model).__name__} without patched attention (config.model_type="
            f"{getattr(getattr(model, 'config', None), 'model_type', None)!r}); recover_layerwise fits a PATCHED model to "
            "its stock reference. Patch it first: patch_model(model, 'latent', rank=...), with a stock copy kept aside."
        )
    reference_spec = spec_for_model(reference)  # raises for a patched or unsupported reference
    if reference_spec is not spec:
        raise ValueError(
            f"reference is a {reference_spec.family} model but model is a patched {spec.family} model; pass the stock "
            "model the patched one was made from."
        )
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        mine, theirs = getattr(model.config, key, None), getattr(reference.config, key, None)
        if mine != theirs:
            raise ValueError(
                f"model and reference differ in {key} ({mine} vs {theirs}); pass the stock model the patched one was "
                "made from."
            )
    if inputs not in INPUTS:
        raise ValueError(
            f"inputs={inputs!r}; allowed: 'stock' (every layer fits on the stock model's activations) or 'patched' "
            "(the patched model's own activations, earlier layers already recovered: GPTQ-style)."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: pass a positive integer, the optimizer steps per layer (e.g. 100).")
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate={learning_rate!r}: pass a positive number (e.g. 1e-3).")
    return spec


def distillation_loss(model: nn.Module, reference: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ model) of the next-token distributions, mean nats per token: the end-to-end recovery's loss,
    the stock `reference`'s logits as the target (computed without gradients)."""
    with torch.no_grad():
        target = reference(input_ids=input_ids).logits.float().log_softmax(-1)
    ours = model(input_ids=input_ids).logits.float().log_softmax(-1)
    return nn.functional.kl_div(ours.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")


def recover_layerwise(
    model: nn.Module,
    reference: nn.Module,
    calibration,
    *,
    steps: int = 100,
    learning_rate: float = 1e-3,
    inputs: str = "stock",
    seed: int = 0,
    show_progress: bool = True,
) -> list[dict]:
    """Fit every patched attention layer of `model` to the same layer of the stock `reference`, one layer at a time.

    Trained: every parameter of each patched attention module that requires grad (for the rotary latent: q_proj, the
    latent's down-projection W_c `latent_proj`, its up-projections `k_up` (Bk) and `v_up` (Bv), the rotary keys
    `k_rope` and o_proj; for GPT-2 the merged S / U, V, values and c_proj); nothing else. Adam with a cosine decay per
    layer, a relative squared error (masked to real tokens), calibration batches in a seeded random order, eval mode
    (no dropout). Deterministic for a seed on one device. The model is changed in place; `reference` is not.

    Args:
        model: a patched model (any registered family and mode).
        reference: the stock model it was patched from (same family and sizes; left unchanged).
        calibration: batches of token ids (see `calibration.calibration_batches`), e.g. 64 blocks of 512 training
            tokens split into batches of 8. Every batch is kept as activations: tokens × d × 4 numbers.
        steps: optimizer steps per layer (one calibration batch each).
        learning_rate: Adam's peak rate.
        inputs: "stock" — each layer's input is the stock model's activation; "patched" — the patched model's own,
            after the earlier layers were recovered (corrects the error they leave).
        seed: the order of the batches.
        show_progress: a tqdm bar over layers.

    Returns:
        one record per layer: {"layer", "error_before", "error_after" (relative squared error of the attention
        output on the calibration batches, on this layer's inputs), "seconds"}.

    Raises:
        ValueError: an unpatched model, a reference of another family or size, bad calibration, steps, rate or inputs.
    """
    spec = _check(model, reference, inputs, steps, learning_rate)
    config = model.config
    batches = list(calibration_batches(calibration, config.vocab_size, spec.max_length(config)))
    patched = {m.layer_idx: m for m in model.modules() if isinstance(m, MergedAttention)}  # a partial patch too
    theirs = [m for _, _, m in spec.stock_attentions(reference)]
    our_blocks = [m for m in model.modules() if isinstance(m, spec.block_class)]
    their_blocks = _blocks(reference, spec.block_class, theirs)
    if len(our_blocks) != len(their_blocks) or not set(patched) <= {m.layer_idx for m in theirs}:
        raise ValueError(
            f"model has {len(our_blocks)} blocks (patched layers {sorted(patched)}) but reference {len(their_blocks)} "
            "stock ones; pass the stock model the patched one was made from."
        )
    device = next(model.parameters()).device
    cache = {"use_cache": False} if spec.has_cache else {}
    modes = (model.training, reference.training)
    model.eval()
    reference.eval()
    records = []
    try:
        with torch.no_grad():  # each batch's call of every block: block 0's hidden states, each block's own arguments
            def block_calls(runner, blocks, ids, mask):
                return _capture_calls(blocks, lambda: getattr(runner, "base_model", runner)(
                    input_ids=ids, attention_mask=mask, **cache))

            streams = []
            for ids, mask in batches:
                ids, mask = ids.to(device), None if mask is None else mask.to(device)
                stock_calls = block_calls(reference, their_blocks, ids, mask)
                patched_calls = block_calls(model, our_blocks, ids, mask) if inputs == "patched" else None
                tokens = torch.ones(ids.shape, dtype=torch.bool, device=device) if mask is None else mask.bool()
                streams.append({"stock": stock_calls, "patched": patched_calls, "tokens": tokens,
                                "hidden": {"stock": _hidden_of(*stock_calls[0]),
                                           "patched": None if patched_calls is None else _hidden_of(*patched_calls[0])}})
        generator = torch.Generator().manual_seed(seed)
        progress = tqdm(range(len(their_blocks)), desc="layer-wise recovery", disable=not show_progress)
        for index in progress:
            start = time.perf_counter()
            attn, stock_attn = patched.get(index), theirs[index]
            block, stock_block = our_blocks[index], their_blocks[index]
            samples = []  # (attention call on this layer's input, stock output (B, T, d_out), token mask (B, T))
            with torch.no_grad():
                for stream in streams:
                    # this block's own arguments (its attention type's mask: full or sliding window) with the stream
                    args, kwargs = _with_hidden(*stream["stock"][index], stream["hidden"]["stock"])
                    call, output = [], []
                    pre = stock_attn.register_forward_pre_hook(lambda m, a, k: call.append((a, k)), with_kwargs=True)
                    post = stock_attn.register_forward_hook(lambda m, a, o: output.append(_first(o)))
                    try:
                        stream["hidden"]["stock"] = _first(stock_block(*args, **kwargs))
                    finally:
                        pre.remove()
                        post.remove()
                    if attn is None:
                        continue
                    attn_args, attn_kwargs = call[0]
                    if inputs == "patched":
                        args, kwargs = _with_hidden(*stream["patched"][index], stream["hidden"]["patched"])
                        ours_in = _hidden_of(*_capture_call(attn, lambda: block(*args, **kwargs)))
                        attn_args, attn_kwargs = _with_hidden(attn_args, attn_kwargs, ours_in)
                    samples.append(((attn_args, attn_kwargs), output[0], stream["tokens"]))

            def error(sample) -> torch.Tensor:
                (args, kwargs), target, tokens = sample
                diff = (_first(attn(*args, **kwargs)) - target)[tokens]  # (tokens, d_out)
                return diff.pow(2).mean() / target[tokens].pow(2).mean().clamp_min(1e-30)

            def mean_error() -> float:
                with torch.no_grad():
                    return sum(error(s).item() for s in samples) / len(samples)

            if attn is not None:
                params = [p for p in attn.parameters() if p.requires_grad]
                before = mean_error()
                if params and before > 1e-12:  # an exact layer (or a frozen one) is left as it is
                    optimizer = torch.optim.Adam(params, lr=learning_rate)
                    schedule = torch.optim.lr_scheduler.LambdaLR(
                        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
                    order = torch.cat([torch.randperm(len(samples), generator=generator)
                                       for _ in range(-(-steps // len(samples)))])[:steps]
                    for b in order.tolist():
                        loss = error(samples[b])
                        loss.backward()
                        optimizer.step()
                        schedule.step()
                        optimizer.zero_grad(set_to_none=True)
                after = mean_error()
            if inputs == "patched":
                with torch.no_grad():
                    for stream in streams:
                        args, kwargs = _with_hidden(*stream["patched"][index], stream["hidden"]["patched"])
                        stream["hidden"]["patched"] = _first(block(*args, **kwargs))
            if attn is not None:
                records.append({"layer": index, "error_before": before, "error_after": after,
                                "seconds": time.perf_counter() - start})
                progress.set_postfix(before=f"{before:.2e}", after=f"{after:.2e}")
    finally:
        model.train(modes[0])
        reference.train(modes[1])
    return records


def recover_end_to_end(model: nn.Module, reference: nn.Module, batches: list[torch.Tensor], steps: int,
                       learning_rate: float, seed: int = 0) -> tuple[float, float]:
    """A short end-to-end recovery (what `hf-merged-attn convert --recover finetune` runs): Adam on KL(reference ‖ model)
    of the next-token distributions (`distillation_loss`) over `batches` of token ids, `steps` batches drawn with
    `seed`, eval mode (no dropout); the reference is not trained. Returns the mean KL over the batches before and
    after."""

    def mean_kl() -> float:
        with torch.no_grad():
            return sum(distillation_loss(model, reference, ids).item() for ids in batches) / len(batches)

    model.eval()  # no dropout: the recovery fits the model as it will decode
    before = mean_kl()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    order = torch.randint(len(batches), (steps,), generator=torch.Generator().manual_seed(seed)).tolist()
    for step in tqdm(order, desc="distillation"):
        loss = distillation_loss(model, reference, batches[step])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return before, mean_kl()
