"""Calibration data for activation-aware seeding: validate batches of token ids, collect attention-input moments.

`collect_attention_moments` runs the STOCK model once over the calibration batches (eval mode, no
gradients) with forward pre-hooks on its stock self-attention modules (found through the registry), and accumulates, per layer, the second
moment of the homogeneous attention input x̃ = [x, 1] (x = the input of the attention: after ln_1 in GPT-2):

    E[x̃ᵀx̃] = [[E[xᵀx], E[xᵀ]],     ((d+1) x (d+1), float64; the top-left d x d block is the key side E[xᵀx])
              [E[x],   1    ]]

averaged over every non-padding token. Hooks are removed and the train/eval mode restored even on error,
and every batch is checked (integer dtype, ids in [0, vocab_size), length <= the model's position limit) before it is run,
so bad calibration input fails before any weight is touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from .registry import spec_for_model

ACCEPTED = (
    "an iterable of batches of token ids — LongTensors of shape (B, T) or (T,), lists of ids, or dicts with "
    "'input_ids' (and optionally 'attention_mask'), e.g. a torch DataLoader or a tokenized datasets.Dataset"
)


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    text = repr(obj)
    return f"{type(obj).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _as_ids(batch, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One calibration batch -> (input_ids (B, T) long, attention_mask (B, T) or None), or a ValueError."""
    where = f"calibration batch {index}"
    mask = None
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(
                f"{where} is a {type(batch).__name__} without 'input_ids' (keys: {sorted(map(str, batch))}); "
                f"calibration must be {ACCEPTED}. Tokenize the text first, e.g. tokenizer(texts)['input_ids']."
            )
        batch, mask = batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, (str, bytes)):
        raise ValueError(
            f"{where} is text ({_describe(batch)}), not token ids; calibration must be {ACCEPTED}. "
            "Tokenize it first with the model's tokenizer."
        )
    if not isinstance(batch, torch.Tensor):
        try:
            batch = torch.as_tensor(batch)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(
                f"{where} ({_describe(batch)}) cannot be read as a tensor of token ids ({error}); calibration must "
                f"be {ACCEPTED}. Pad or cut the sequences of a batch to one length, or pass one sequence per batch."
            ) from error
    if batch.dtype == torch.bool or batch.is_floating_point() or batch.is_complex():
        raise ValueError(
            f"{where} is {_describe(batch)}; input_ids must be integer token ids (torch.long). Pass the tokenizer's "
            "input_ids (not embeddings, logits or a float cast of them), or convert exact ids with .long()."
        )
    if batch.dim() == 1:
        batch = batch.unsqueeze(0)
    if batch.dim() != 2:
        raise ValueError(
            f"{where} is {_describe(batch)}; input_ids must have shape (batch, length) or (length,). "
            "Flatten extra dimensions into the batch."
        )
    batch = batch.long()
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != batch.shape:
            raise ValueError(
                f"{where}: attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(batch.shape)}; "
                "they must match (1 for real tokens, 0 for padding)."
            )
        mask = mask.long()
    return batch, mask


def calibration_batches(
    calibration, vocab_size: int, max_length: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Validate and yield (input_ids (B, T) long, attention_mask or None) for each calibration batch.

    A single tensor, list of ids or dict with 'input_ids' is one batch; anything else is iterated.
    Each batch is checked as it is reached (a DataLoader is consumed once, never materialised).

    Raises:
        ValueError: text or a non-iterable instead of batches, float / bool tensors, ids outside
            [0, vocab_size), sequences longer than `max_length`, or no tokens at all.
    """
    if calibration is None or isinstance(calibration, (str, bytes)) or not (
        isinstance(calibration, (torch.Tensor, Mapping)) or isinstance(calibration, Iterable)
    ):
        raise ValueError(
            f"calibration={_describe(calibration)} is not a source of token ids; calibration must be {ACCEPTED}. "
            "Tokenize calibration text with the model's tokenizer and pass the ids."
        )
    if isinstance(calibration, (torch.Tensor, Mapping)) or (
        isinstance(calibration, (list, tuple)) and calibration and not isinstance(calibration[0], (list, tuple, Mapping, torch.Tensor))
        and not isinstance(calibration[0], (str, bytes))
    ):
        calibration = [calibration]  # one batch (a tensor, a dict, or one flat list of ids)
    tokens = 0
    index = -1
    for index, batch in enumerate(calibration):
        ids, mask = _as_ids(batch, index)
        if ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"calibration batch {index} holds token id {bad}, outside [0, {vocab_size}) for this model's "
                    f"vocab_size={vocab_size}. Tokenize with the model's own tokenizer (and do not use -100 label "
                    "padding as input ids)."
                )
        if max_length is not None and ids.shape[1] > max_length:
            raise ValueError(
                f"calibration batch {index} has sequences of {ids.shape[1]} tokens, more than the "
                f"model's position limit of {max_length}. Cut them into blocks of at most {max_length} tokens."
            )
        count = int(ids.numel() if mask is None else mask.sum())
        tokens += count
        if count:
            yield ids, mask
    if tokens == 0:
        raise ValueError(
            f"calibration is empty ({index + 1} batches, 0 tokens); calibration must be {ACCEPTED}, with at least "
            "one token. Pass some batches (e.g. 16 blocks of 256 tokens of training text)."
        )


class _MomentAccumulator:
    """Running float64 sums Σxᵀx, Σx and the token count of one layer's attention input."""

    def __init__(self, dim: int, device: torch.device):
        self.xtx = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.xsum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.to(device=self.xtx.device, dtype=torch.float64)  # (N, d)
        self.xtx += rows.T @ rows
        self.xsum += rows.sum(0)
        self.count += rows.shape[0]

    def moment(self) -> torch.Tensor:
        """E[x̃ᵀx̃] for x̃ = [x, 1], (d+1, d+1) float64."""
        d = self.xsum.numel()
        out = torch.empty(d + 1, d + 1, dtype=torch.float64, device=self.xtx.device)
        out[:d, :d] = self.xtx / self.count
        out[:d, d] = out[d, :d] = self.xsum / self.count
        out[d, d] = 1.0
        return out


class _PairNormAccumulator:
    """Running sums of the rotary pair norms ‖(q_f, q_{f+hd/2})‖ of every query head and key head of one layer."""

    def __init__(self, module: nn.Module):
        self.module, self.count = module, 0
        self.query = self.key = 0.0

    @staticmethod
    def _norms(projection: nn.Module, rows: torch.Tensor, head_dim: int) -> torch.Tensor:
        out = projection(rows).double()  # (N, heads*hd)
        out = out.view(out.shape[0], -1, 2, head_dim // 2)  # (N, heads, 2, hd/2): the halves of each pair
        return out.pow(2).sum(2).sqrt().sum(0)  # (heads, hd/2)

    def add(self, rows: torch.Tensor) -> None:
        head_dim = self.module.head_dim
        self.query = self.query + self._norms(self.module.q_proj, rows, head_dim).cpu()
        self.key = self.key + self._norms(self.module.k_proj, rows, head_dim).cpu()
        self.count += rows.shape[0]

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query / self.count, self.key / self.count


@torch.no_grad()
def collect_rotary_statistics(
    model: nn.Module, calibration, layers: list[int] | None = None
) -> tuple[dict[int, torch.Tensor], int, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """`collect_attention_moments` plus, per layer, the mean norm of every rotary frequency pair of every query head
    (H, hd/2) and key head (G, hd/2) before rotation (a rotation keeps norms): what the '2norm' rule ranks pairs by.

    Returns:
        (moments, number of calibration tokens, {layer index: (query norms (H, hd/2), key norms (G, hd/2))}).
    """
    norms: dict[int, _PairNormAccumulator] = {}
    moments, tokens = collect_attention_moments(model, calibration, layers, _extra=norms)
    return moments, tokens, {i: acc.means() for i, acc in norms.items()}


@torch.no_grad()
def collect_attention_moments(
    model: nn.Module, calibration, layers: list[int] | None = None, _extra: dict | None = None
) -> tuple[dict[int, torch.Tensor], int]:
    """Second moments E[x̃ᵀx̃] of the attention inputs x̃ = [x, 1] of a stock model, over calibration tokens.

    One pass, eval mode (no dropout), no gradients; padding tokens (attention_mask 0) are left out.

    Args:
        model: a stock model of a registered family (its self-attention modules are hooked).
        calibration: see `calibration_batches`.
        layers: block indices to collect (default: all).

    Returns:
        ({layer index: (d+1, d+1) float64 moment on the CPU}, number of calibration tokens).

    Raises:
        ValueError: bad calibration input (see `calibration_batches`), or no stock attention to hook.
    """
    spec = spec_for_model(model)
    modules = [m for _, _, m in spec.stock_attentions(model) if layers is None or m.layer_idx in layers]
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no stock {spec.attention_class.__name__} in layers={layers} to calibrate."
        )
    device = next(modules[0].parameters()).device
    acc_device = device if device.type in ("cpu", "cuda") else torch.device("cpu")  # float64 support
    accumulators = {m.layer_idx: _MomentAccumulator(model.config.hidden_size, acc_device) for m in modules}
    if _extra is not None:  # rotary pair norms, in the same pass
        _extra.update({m.layer_idx: _PairNormAccumulator(m) for m in modules})
    current_mask: list[torch.Tensor | None] = [None]

    def make_hook(layer_idx: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, d): the attention input
            mask = current_mask[0]
            rows = hidden.reshape(-1, hidden.shape[-1]) if mask is None else hidden[mask.bool()]
            accumulators[layer_idx].add(rows)
            if _extra is not None:
                _extra[layer_idx].add(rows)

        return hook

    runner = getattr(model, "base_model", model)  # the body (e.g. GPT2Model): skips the LM / classification head
    config = model.config
    was_training = model.training
    handles = [m.register_forward_pre_hook(make_hook(m.layer_idx), with_kwargs=True) for m in modules]
    try:
        model.eval()
        cache = {"use_cache": False} if spec.has_cache else {}
        max_length = spec.max_length(config)  # None for ALiBi (BLOOM)
        for ids, mask in calibration_batches(calibration, config.vocab_size, max_length):
            current_mask[0] = None if mask is None else mask.to(device)
            runner(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device), **cache)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    tokens = next(iter(accumulators.values())).count
    return {i: acc.moment().cpu() for i, acc in accumulators.items()}, tokens


def evenly_spaced_blocks(input_ids: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    """`num_blocks` disjoint blocks of `block_size` tokens spread evenly over a 1-D token stream: (N, T) long.

    A deterministic calibration set that samples the whole stream rather than only its beginning.

    Raises:
        ValueError: a stream shorter than num_blocks * block_size, or non-positive sizes.
    """
    input_ids = torch.as_tensor(input_ids)
    if num_blocks < 1 or block_size < 1 or input_ids.dim() != 1:
        raise ValueError(
            f"need num_blocks >= 1, block_size >= 1 and a 1-D stream; got {num_blocks}, {block_size}, shape "
            f"{tuple(input_ids.shape)}."
        )
    available = input_ids.numel() // block_size
    if available < num_blocks:
        raise ValueError(
            f"the stream has {input_ids.numel()} tokens, {available} blocks of {block_size}; {num_blocks} were asked "
            "for. Use fewer or shorter blocks, or more text."
        )
    starts = [(i * available // num_blocks) * block_size for i in range(num_blocks)]
    return torch.stack([input_ids[s : s + block_size] for s in starts]).long()


def mixed_blocks(streams: dict[str, torch.Tensor], num_blocks: int, block_size: int) -> torch.Tensor:
    """A calibration set drawn equally from several token streams (texts of different kinds): (num_blocks, T) long.

    Source i (in the dict's order) gives num_blocks // n blocks, the first num_blocks % n sources one more, each spread
    evenly over its stream (`evenly_spaced_blocks`). A whitened seed keeps the directions its calibration uses and
    drops the rest; mixing kinds of text keeps what each needs (docs/domains.md measures it).

    Raises:
        ValueError: no source, an empty or non-1-D stream, or a stream too short for its share — all named, before any
            block is cut.
    """
    if not isinstance(streams, dict) or not streams:
        raise ValueError(f"mixed_blocks needs a dict {{name: 1-D token ids}} of at least one source; got {streams!r}.")
    if num_blocks < len(streams) or block_size < 1:
        raise ValueError(
            f"num_blocks={num_blocks} must be at least the number of sources ({len(streams)}: {', '.join(streams)}) and "
            f"block_size={block_size} at least 1: every source gives one block or more."
        )
    shares = {name: num_blocks // len(streams) + (i < num_blocks % len(streams)) for i, name in enumerate(streams)}
    problems = []
    for name, ids in streams.items():
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.numel() < shares[name] * block_size:
            problems.append(f"{name!r} has {ids.numel()} tokens (shape {tuple(ids.shape)}), its share needs "
                            f"{shares[name]} blocks of {block_size} = {shares[name] * block_size}")
    if problems:
        raise ValueError(f"mixed_blocks: {'; '.join(problems)}. Give each source more text, or ask for fewer or shorter "
                         "blocks.")
    return torch.cat([evenly_spaced_blocks(torch.as_tensor(ids), shares[name], block_size)
                      for name, ids in streams.items()])
