"""Perplexity of a causal LM on one long token stream: the strided sliding-window recipe.

This is the recipe of the transformers docs ("Perplexity of fixed-length models"): windows of
`max_length` tokens advance by `stride`; each window scores only the tokens not scored by the previous
one, with the tokens before them as context, so every token after the first is scored exactly once with
at least `max_length - stride` tokens of context (except near the start). Token-weighted: the result is
exp(total NLL / number of scored tokens). stride = max_length gives disjoint blocks (fast, less context).
"""

from __future__ import annotations

import math
import time
from numbers import Integral

import torch
from torch import nn
from tqdm.auto import tqdm


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, number of new target tokens) for each window over a stream of `num_tokens`."""
    if isinstance(stride, bool) or not isinstance(stride, Integral) or not 1 <= stride <= max_length:
        raise ValueError(
            f"stride={stride!r} must be between 1 and max_length={max_length} (an integer: windows advance by stride "
            f"tokens). Pass e.g. stride={max(1, max_length // 2)} (half the window), or None for that default."
        )
    windows, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        windows.append((begin, end, end - previous_end))
        previous_end = end
        if end == num_tokens:
            break
    return windows


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    show_progress: bool = False,
    reference: nn.Module | None = None,
) -> dict[str, float]:
    """Token-weighted strided sliding-window perplexity of `model` on a 1-D token stream.

    With a `reference` model (e.g. the stock model a patched one was made from), the same pass also gives the mean
    KL(reference ‖ model) of the next-token distributions over the scored tokens, in nats.

    Args:
        model: a causal LM returning `.logits` (any mode, patched or stock: the same evaluator for all).
        input_ids: 1-D LongTensor, the whole evaluation text tokenized and concatenated.
        max_length: window length, 2 <= max_length <= the model's positions.
        stride: step between windows, 1 <= stride <= max_length (default, None: max_length // 2).
        batch_size: windows per forward pass.
        show_progress: tqdm bar over batches.
        reference: a causal LM with the same vocabulary, run on the same windows.

    Returns:
        {"perplexity", "loss" (mean NLL per scored token), "tokens" (number scored)}, and "kl_to_reference" with a
        reference.
    """
    if input_ids.dim() != 1 or input_ids.numel() < 2:
        raise ValueError(f"input_ids must be a 1-D token stream of at least 2 tokens; got shape {tuple(input_ids.shape)}.")
    # None: no learned positions (ALiBi), or a wrapper without a config (DistributedDataParallel)
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_length, bool) or not isinstance(max_length, Integral) or max_length < 2:
        raise ValueError(
            f"max_length={max_length!r}: a window must hold at least 2 tokens (its first token is context only, "
            "never scored). Pass an integer max_length >= 2, e.g. the model's context."
        )
    if positions is not None and max_length > positions:
        raise ValueError(
            f"max_length={max_length} exceeds the model's {positions} positions (config.max_position_embeddings). "
            f"Pass max_length <= {positions}."
        )
    if reference is not None:
        ours, theirs = (getattr(getattr(m, "config", None), "vocab_size", None) for m in (model, reference))
        if ours is not None and theirs is not None and ours != theirs:
            raise ValueError(
                f"reference has a vocabulary of {theirs} tokens and model of {ours}: the KL between their next-token "
                "distributions needs the same vocabulary. Pass the stock model the patched one was made from."
            )
    if stride is None:
        stride = max_length // 2
    was_training = model.training, reference is not None and reference.training
    model.eval()
    if reference is not None:
        reference.eval()
    device = next(model.parameters()).device
    windows = sliding_windows(input_ids.numel(), max_length, stride)
    total_nll, total_kl, total_tokens = 0.0, 0.0, 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in tqdm(batches, desc="perplexity", disable=not show_progress, leave=False):
        length = max(end - begin for begin, end, _ in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        targets = torch.full((len(batch), length), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for row, (begin, end, new) in enumerate(batch):
            n = end - begin
            ids[row, :n] = input_ids[begin:end]
            mask[row, :n] = 1
            targets[row, n - new : n] = input_ids[end - new : end]  # only tokens not scored by the previous window
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        # position t predicts token t+1 (the first token of the stream has no prediction and is never scored)
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1).to(device), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += int((targets[:, 1:] != -100).sum())
        if reference is not None:
            scored = (targets[:, 1:] != -100).to(device)  # (B, L-1): the positions whose next token is scored
            theirs = reference(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()[:, :-1][scored]
            ours = logits[:, :-1][scored]  # (scored tokens, vocab)
            total_kl += nn.functional.kl_div(ours.log_softmax(-1), theirs.log_softmax(-1), log_target=True,
                                             reduction="sum").item()
    model.train(was_training[0])
    if reference is not None:
        reference.train(was_training[1])
    loss = total_nll / total_tokens
    result = {"perplexity": math.exp(loss), "loss": loss, "tokens": total_tokens}
    if reference is not None:
        result["kl_to_reference"] = total_kl / total_tokens
    return result


@torch.no_grad()
def kv_cache_bytes_per_token(model: nn.Module, prompt_length: int = 8, max_new_tokens: int = 4, **generate_kwargs) -> float:
    """Bytes the KV cache holds per token of one sequence, measured on the cache object a `generate()` call returns.

    Counts every tensor the cache keeps (keys and values of every layer, an empty value slot as 0 bytes), divided
    by the number of cached tokens: what a deployment pays per token of context, whatever the mode.

    Args:
        model: a causal LM with a KV cache (stock or patched), in the dtype to measure.
        prompt_length, max_new_tokens: the short greedy generation run to fill the cache.
        generate_kwargs: more arguments of that `generate()` call, e.g. `past_key_values=LatentQuantizedCache(...)`.

    Returns:
        Bytes per cached token (summed over layers).

    Raises:
        ValueError: the model returned no cache (an encoder, or use_cache disabled).
    """
    config = model.config
    device = next(model.parameters()).device
    prompt = torch.arange(prompt_length, device=device).remainder(config.vocab_size).unsqueeze(0)  # (1, T)
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        do_sample=False, return_dict_in_generate=True, use_cache=True, pad_token_id=config.pad_token_id or 0,
        **generate_kwargs,
    )
    cache = out.past_key_values
    if cache is None:
        raise ValueError(f"{type(model).__name__}.generate returned no cache; kv_cache_bytes_per_token needs a decoder.")
    return cache_bytes_per_token(cache)


def cache_bytes_per_token(cache) -> float:
    """Bytes a filled transformers cache holds per cached token, summed over its layers and batch rows.

    Keys and values of every layer (an empty value slot as 0 bytes); a quantized layer says what it stores itself
    (`stored_tensors`: codes, scales, minima and its full-precision window).
    """
    tensors = [t for layer in cache.layers for t in (
        layer.stored_tensors() if hasattr(layer, "stored_tensors") else (layer.keys, layer.values)) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors) / cache.get_seq_length()


@torch.no_grad()
def decode_ms_per_step(model, steps: int, prompt_length: int = 16) -> float | None:
    """Milliseconds per greedy decode step (batch 1): the time of prefill + `steps` steps minus that of prefill + 1;
    None when that difference is not positive (too few steps to measure)."""
    prompt = torch.arange(1, prompt_length + 1).remainder(model.config.vocab_size).unsqueeze(0)
    prompt = prompt.to(next(model.parameters()).device)

    def timed(new: int) -> float:
        start = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=model.config.pad_token_id or 0)
        return time.perf_counter() - start

    timed(2)  # warm-up
    difference = timed(steps + 1) - timed(1)
    return 1000 * difference / steps if difference > 0 else None  # too few steps to rise above the timer's noise
