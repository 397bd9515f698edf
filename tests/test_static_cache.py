"""Static cache and compiled decode in every mode and every family with a cache (#20), and the kernel table.

A static cache is pre-allocated from each layer's `CacheLayout` (transformers' `StaticLayer` sizes its buffers from
the first update), holds only what the mode caches, and gives exactly the dynamic cache's tokens. A compiled forward
(`torch.compile(..., fullgraph=True)`) decodes against it with no graph break and no more compilations than stock's.
Compilation here uses the "eager" backend (Dynamo's tracing, guards and graph breaks are what is tested; code
generation is backend work) except one inductor run.
"""

from __future__ import annotations

import copy

import pytest
import torch
from families import DECODERS, HEAD_DIM, HEADS, HIDDEN, LAYERS, inputs
from transformers import CompileConfig, StaticCache

from hf_merged_attn import MergedAttention, patch_model, use_kernels
from hf_merged_attn.attention_kernels import KERNELS, CacheLayout

MODES = {  # name: (patch, numbers one layer caches per token: what the static buffers must hold)
    "covariance": ({"mode": "covariance"}, HIDDEN + HEADS * HEAD_DIM),  # key x + per-head values (packed: one head)
    "merged-values": ({"mode": "covariance", "values": "merged"}, HIDDEN),  # x once
    "covariance-value-rank": ({"mode": "covariance", "value_rank": 3}, HIDDEN + HEADS * 3),
    "lowrank": ({"mode": "lowrank", "rank": 3}, HEADS * 3 + HEADS * HEAD_DIM),
    "lowrank-values": ({"mode": "lowrank", "rank": 3, "value_rank": 2}, HEADS * 3 + HEADS * 2),
    "lowrank-merged-values": ({"mode": "lowrank", "rank": 3, "values": "merged"}, HEADS * 3 + HIDDEN),
    "latent": ({"mode": "latent", "rank": 8}, 8),
}
STRATEGIES = {
    "greedy": dict(do_sample=False),
    "beams": dict(do_sample=False, num_beams=3),
    "sampling": dict(do_sample=True, top_k=20),
}


def _generate(model, family, ids, mask, **settings):
    torch.manual_seed(1)  # the same draws for sampling
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=family.config.pad_token_id,
                              **settings)


@pytest.mark.parametrize("family", DECODERS, ids=[f.model_type for f in DECODERS])
@pytest.mark.parametrize("name", list(MODES))
def test_static_cache_gives_the_dynamic_caches_tokens(family, name):
    """Greedy, beams and seeded sampling over a left-padded batch, eager and sdpa: token for token."""
    for implementation in ["eager", "sdpa"] if family.sdpa else ["eager"]:
        model = patch_model(family.make(implementation), **MODES[name][0])
        ids, mask = inputs(family, batch=3, length=8)
        for strategy, settings in STRATEGIES.items():
            dynamic = _generate(model, family, ids, mask, **settings)
            static = _generate(model, family, ids, mask, cache_implementation="static", **settings)
            assert torch.equal(static, dynamic), (implementation, strategy)


@pytest.mark.parametrize("family", DECODERS, ids=[f.model_type for f in DECODERS])
@pytest.mark.parametrize("name", list(MODES))
def test_an_explicit_static_cache_holds_only_what_the_mode_caches(family, name):
    model = patch_model(family.make("sdpa" if family.sdpa else "eager"), **MODES[name][0])
    ids, mask = inputs(family, batch=3, length=8)
    cache = StaticCache(config=model.config, max_cache_len=20)
    dynamic = _generate(model, family, ids, mask)
    assert torch.equal(_generate(model, family, ids, mask, past_key_values=cache), dynamic)
    numbers = MODES[name][1]
    layouts = [m.cache_layout for m in model.modules() if isinstance(m, MergedAttention)]
    for layer, layout in zip(cache.layers, layouts):  # the pre-allocated buffers: (B, heads, max_len, width) each
        held = layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel()  # numbers per token in the buffers
        assert held == layout.numbers_per_token() == numbers
        assert layer.keys.shape[2] == layer.values.shape[2] == 20
    assert len(cache.layers) == LAYERS


def test_cache_layouts_and_bytes_per_token():
    """The layout is the one place cache sizes come from: per-token numbers for the card, packing for one head count."""
    assert CacheLayout(1, HIDDEN, HEADS, HEAD_DIM).packed and not CacheLayout(HEADS, 3, HEADS, HEAD_DIM).packed
    assert CacheLayout(1, 8, 1, 0).values_are_keys and CacheLayout(1, 8, 1, 0).numbers_per_token() == 8
    x = torch.randn(2, 5, HEADS * 3)
    packed = CacheLayout(1, HIDDEN, HEADS, 3)
    stored = packed.stored(x, HEADS)  # (B, 1, T, H·w): the projection output itself, no copy
    assert stored.shape == (2, 1, 5, HEADS * 3) and stored.data_ptr() == x.data_ptr()
    assert torch.equal(packed.unpacked(stored, HEADS), x.view(2, 5, HEADS, 3).transpose(1, 2))


def _decode_by_hand(model, forward, ids, mask, steps=5):
    """Eager prefill into a StaticCache, then `steps` greedy decode steps through `forward` (what generate does with
    a compiled forward): the 2-D mask spans the whole buffer, so every decode call has the same shapes."""
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    full = torch.cat([mask, torch.ones(mask.shape[0], steps + 1, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        token = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        tokens = [token]
        for _ in range(steps):
            token = forward(token, attention_mask=full, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tokens.append(token)
    return torch.cat(tokens, dim=1)


def _compiled_graphs(model, ids, mask, backend="eager"):
    """Tokens of a compiled decode and the number of graphs Dynamo compiled for it (fullgraph: a break raises)."""
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, fullgraph=True, backend=backend, dynamic=False)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    tokens = _decode_by_hand(model, compiled, ids, mask)
    return tokens, torch._dynamo.utils.counters["stats"]["unique_graphs"] - before


@pytest.mark.parametrize("name", list(MODES))
def test_a_compiled_forward_decodes_with_a_static_cache(name):
    """`model.forward = torch.compile(model.forward, fullgraph=True)`: no graph break; as many compiled graphs as the
    stock model needs (transformers' own wrapper recompiles once on its second call), none per step; eager's tokens."""
    family = DECODERS[0]
    ids, mask = inputs(family, batch=3, length=8)
    _, stock_graphs = _compiled_graphs(family.make("sdpa"), ids, mask)
    model = patch_model(family.make("sdpa"), **MODES[name][0])
    tokens, graphs = _compiled_graphs(model, ids, mask)
    assert torch.equal(tokens, _decode_by_hand(model, model.forward, ids, mask))
    assert graphs == stock_graphs <= 2


def test_compiled_decode_with_inductor():
    family = DECODERS[0]
    ids, mask = inputs(family, batch=3, length=8)
    model = patch_model(family.make("sdpa"), "latent", rank=8)
    tokens, graphs = _compiled_graphs(model, ids, mask, backend="inductor")
    # inductor fuses and reorders fp32 arithmetic: the same greedy tokens on this tiny model (margins >> 1e-6)
    assert torch.equal(tokens, _decode_by_hand(model, model.forward, ids, mask)) and graphs <= 2


def _generate_compiled(model, family, ids, mask):
    """transformers' own recipe: generate(cache_implementation="static") compiles its decode step (its compile_config;
    forced on this CPU with _compile_all_devices). Returns the tokens and the number of graphs compiled."""
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = True
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    tokens = _generate(model, family, ids, mask, cache_implementation="static", compile_config=config)
    return tokens, torch._dynamo.utils.counters["stats"]["unique_graphs"] - before


@pytest.mark.parametrize("family", DECODERS, ids=[f.model_type for f in DECODERS])
@pytest.mark.parametrize("name", list(MODES))
def test_generate_compiles_the_static_decode_in_every_mode(family, name):
    ids, mask = inputs(family, batch=3, length=8)
    implementation = "sdpa" if family.sdpa else "eager"
    _, stock_graphs = _generate_compiled(family.make(implementation), family, ids, mask)
    model = patch_model(family.make(implementation), **MODES[name][0])
    tokens, graphs = _generate_compiled(model, family, ids, mask)
    assert graphs == stock_graphs >= 1  # it did compile, with no more graphs than stock (fullgraph: no break)
    assert torch.equal(tokens, _generate(model, family, ids, mask))


# --- the kernel table ------------------------------------------------------------------------------------------------


GPU_KERNELS = [  # (mode, phase, kernel a GPU prefers): each forced here on the CPU and checked against the CPU's choice
    ("latent", "decode", "sdpa_folded"), ("merged-values", "decode", "sdpa_folded"),
    ("latent", "decode", "sdpa_gqa"), ("merged-values", "decode", "sdpa_gqa"),
    ("covariance", "decode", "sdpa_expand"), ("covariance", "train", "sdpa_expand"),
    ("merged-values", "train", "sdpa_folded"), ("covariance-value-rank", "train", "sdpa_expand"),
]


@pytest.mark.parametrize("name,phase,kernel", GPU_KERNELS, ids=[f"{n}-{p}-{k}" for n, p, k in GPU_KERNELS])
def test_gpu_kernels_compute_what_the_cpu_kernels_do(name, phase, kernel):
    """The fused kernels a GPU prefers (one SDPA call per layer) give the CPU kernels' numbers: decode steps against
    a padded cache (sdpa_gqa: an unpadded one, it takes no mask), and training losses and gradients."""
    family = DECODERS[0]
    model = patch_model(family.make("sdpa"), **MODES[name][0])
    reference = copy.deepcopy(model)
    ids, mask = inputs(family, batch=3, length=8)
    if kernel == "sdpa_gqa":
        ids, mask = ids[:1], None  # no padding: no mask at decode
    use_kernels(model, **{phase: kernel})
    if phase == "decode":
        with torch.no_grad():
            prefix = model(ids[:, :7], attention_mask=None if mask is None else mask[:, :7], use_cache=True)
            step = model(ids[:, 7:], attention_mask=mask, past_key_values=prefix.past_key_values).logits[:, -1]
            full = reference(ids, attention_mask=mask).logits[:, -1]
        assert (step - full).abs().max() < 1e-5  # fp32 round-off of another summation order
        used = {k.name for m in model.modules() if isinstance(m, MergedAttention) for (q, _), k in m._kernel_memo.items()
                if q.phase == "decode"}
        assert used == {kernel}
        return
    grads = []
    for net in (model, reference):
        net.train()
        loss = net(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        loss.backward()
        grads.append((loss.detach(), net.transformer.wte.weight.grad.clone()))
    (loss, grad), (expected_loss, expected_grad) = grads
    assert abs(loss.item() - expected_loss.item()) < 1e-5 and (grad - expected_grad).abs().max() < 1e-5


def test_the_cpu_prefers_its_blocked_kernel_for_shared_keys():
    family = DECODERS[0]
    model = patch_model(family.make("sdpa"), "latent", rank=8)
    ids, mask = inputs(family, batch=3, length=8)
    _decode_by_hand(model, model.forward, ids, mask)
    chosen = {m._kernel_memo[k].name for m in model.modules() if isinstance(m, MergedAttention)
              for k in m._kernel_memo if k[0].phase == "decode"}
    assert chosen == {"shared_blocks"}  # measured fastest on this CPU (docs/benchmarks_cache.md)
    use_kernels(model, decode="sdpa_folded")
    assert all(m.kernel_overrides == {"decode": "sdpa_folded"} for m in model.modules() if isinstance(m, MergedAttention))
    use_kernels(model, decode=None)
    assert all(m.kernel_overrides is None for m in model.modules() if isinstance(m, MergedAttention))


def test_kernels_are_re_resolved_when_the_implementation_changes():
    family = DECODERS[0]
    model = patch_model(family.make("sdpa"), "lowrank", rank=3)
    ids, mask = inputs(family)
    with torch.no_grad():
        model(ids, attention_mask=mask)
        model.set_attn_implementation("eager")
        model(ids, attention_mask=mask)
    names = {k.name for k in model.transformer.h[0].attn._kernel_memo.values()}
    assert names == {"sdpa", "eager"}


def test_a_forced_kernel_must_fit():
    family = DECODERS[0]
    model = patch_model(family.make("sdpa"), "lowrank", rank=3)
    with pytest.raises(ValueError, match=r"use_kernels\(\{'decode': 'flash'\}\): phases are .* kernels \["):
        use_kernels(model, decode="flash")
    use_kernels(model, train="sdpa_folded")  # per-head keys: not multi-query attention
    ids, mask = inputs(family)
    with pytest.raises(ValueError, match=r"kernel 'sdpa_folded' cannot compute this attention .* kernels that can: \['sdpa'"):
        model(ids, attention_mask=mask, use_cache=False)  # no cache: the "train" phase
    assert set(KERNELS) >= {"eager", "sdpa", "sdpa_gqa", "sdpa_folded", "sdpa_expand", "shared_blocks"}
