"""Nothing lost, nothing silent: peft adapters, frozen weights and `layers` iterables survive patch_model (#14)."""

from __future__ import annotations

import ast
import configparser
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_gpt2, max_diff
from peft import LoraConfig, get_peft_model

from hf_merged_attn import MergedGPT2LMHeadModel, patch_model

PATCHES = [
    ("covariance", {}),
    ("lowrank", {"rank": 3}),
    ("latent", {"rank": 8}),
    ("covariance", {"values": "merged"}),
    ("lowrank", {"rank": 3, "value_rank": 2}),
]
PATCH_IDS = ["covariance", "lowrank", "latent", "merged-values", "lowrank-values"]


@pytest.fixture
def ids():
    return torch.randint(1, VOCAB, (2, 10))


def lora(model, *targets: str):
    """A peft LoRA model with non-zero adapters (init_lora_weights=False), so dropping one changes the logits."""
    config = LoraConfig(r=4, target_modules=list(targets), fan_in_fan_out=True, init_lora_weights=False)
    return get_peft_model(model, config).eval()


def trainable(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("target", ["c_attn", "c_proj"])
def test_an_adapter_on_a_replaced_weight_is_refused_not_dropped(ids, target):
    model = lora(make_gpt2(), target)
    with torch.no_grad():
        before = model(ids).logits
    extra = {"values": "merged"} if target == "c_proj" else {}  # merged values replace the output projection too
    with pytest.raises(ValueError, match=rf"base_model\.model\.transformer\.h\.0\.attn\.{target}, .* carry peft adapters "
                                         r".*would be lost\. Merge them into the weights first \(model = model\.merge_and_unload\(\)"):
        patch_model(model, "covariance", **extra)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # untouched, adapters included
    merged = patch_model(model.merge_and_unload(), "covariance", **extra)  # what the message says to do
    with torch.no_grad():
        assert max_diff(merged(ids).logits, before) < 1e-4


def test_a_kept_output_projection_keeps_its_adapter(ids):
    model = lora(make_gpt2(), "c_proj")  # without merged values, the merged module shares the stock c_proj
    with torch.no_grad():
        before = model(ids).logits
    patch_model(model, "lowrank", rank=8)  # r = head size: exact
    with torch.no_grad():
        assert max_diff(model(ids).logits, before) < 1e-4


@pytest.mark.parametrize("mode,kwargs", PATCHES, ids=PATCH_IDS)
def test_a_peft_model_keeps_its_adapters_and_its_frozen_split(ids, mode, kwargs):
    model = lora(make_gpt2(), "c_fc")
    adapters = trainable(model)
    assert adapters and all("lora_" in name for name in adapters)
    with torch.no_grad():
        before = model(ids).logits
    patch_model(model, mode, **kwargs)
    assert trainable(model) == adapters  # the new attention weights are frozen like the ones they replace
    assert type(model.get_base_model()) is MergedGPT2LMHeadModel
    if mode == "covariance":  # exact: the adapter still acts
        with torch.no_grad():
            assert max_diff(model(ids).logits, before) < 1e-4


@pytest.mark.parametrize("mode,kwargs", PATCHES, ids=PATCH_IDS)
def test_requires_grad_is_carried_over(mode, kwargs):
    frozen = make_gpt2().requires_grad_(False)
    assert not trainable(patch_model(frozen, mode, **kwargs))
    assert all(param.requires_grad for param in patch_model(make_gpt2(), mode, **kwargs).parameters())


def test_a_frozen_output_projection_freezes_only_what_is_seeded_from_it():
    model = make_gpt2()
    for block in model.transformer.h:
        block.attn.c_proj.requires_grad_(False)
    patch_model(model, "covariance", values="merged")  # c_proj holds M_h = Wv_h Wo_h: seeded from the frozen Wo
    attn = model.transformer.h[0].attn
    assert attn.q_proj.weight.requires_grad and attn.q_proj.bias.requires_grad
    assert not attn.c_proj.weight.requires_grad and not attn.c_proj.bias.requires_grad
    shared = patch_model(make_gpt2(), "covariance").transformer.h[0].attn.c_proj  # stock values: c_proj is shared
    assert shared.weight.requires_grad


@pytest.mark.parametrize("layers", [lambda: (i for i in [1]), lambda: iter([1]), lambda: range(1, 2), lambda: {1}],
                         ids=["generator", "iterator", "range", "set"])
def test_layers_from_any_iterable(tmp_path, ids, layers):
    model = patch_model(make_gpt2(), "covariance", layers=layers())
    assert model.config.merged_attn["layers"] == [1]
    assert type(model.transformer.h[0].attn).__name__ == "GPT2Attention"
    assert type(model.transformer.h[1].attn).__name__ == "MergedGPT2Attention"
    model.save_pretrained(tmp_path)
    loaded = MergedGPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert max_diff(loaded(ids).logits, model(ids).logits) < 1e-6


# ---------------------------------------------------------------- packaging

ROOT = Path(__file__).resolve().parents[1]
# import name -> pip name (yaml: convert's .yaml settings files; transformers depends on pyyaml too)
DISTRIBUTIONS = {"torch": "torch", "transformers": "transformers", "tqdm": "tqdm", "yaml": "pyyaml"}
# imported only where a user asks for it, with an ImportError that says what to install: module -> its files
OPTIONAL = {"datasets": {"cli.py"}}  # hf-merged-attn convert --dataset_name


def _requirements(text: str) -> set[str]:
    return {re.split(r"[<>=!~\[ ]", line.strip())[0] for line in text.splitlines() if line.strip() and not line.strip().startswith("#")}


def test_install_requires_is_what_the_library_imports():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    imported, optional = set(), {}
    for source in (ROOT / "hf_merged_attn").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            found = {name.split(".")[0] for name in names} - set(sys.stdlib_module_names) - {"__future__"}
            for name in found & set(OPTIONAL):
                optional.setdefault(name, set()).add(source.name)
            imported |= found - set(OPTIONAL)
    assert imported == set(DISTRIBUTIONS)
    assert optional == OPTIONAL  # an optional import stays where it is declared
    assert "pip install datasets" in (ROOT / "hf_merged_attn" / "cli.py").read_text()
    assert _requirements(setup["options"]["install_requires"]) == set(DISTRIBUTIONS.values())
    for extra in ("examples", "test"):  # what the example scripts (and through them the tests) import
        assert {"accelerate", "datasets", "peft", "tokenizers"} <= _requirements(setup["options.extras_require"][extra])
        assert set(OPTIONAL) <= _requirements(setup["options.extras_require"][extra])


def test_docs_references_exist():
    sources = [*(ROOT / "hf_merged_attn").glob("*.py"), *(ROOT / "examples").glob("*.py"), ROOT / "README.md"]
    text = "\n".join(path.read_text(encoding="utf-8") for path in sources)
    assert "shared/" not in text
    for reference in set(re.findall(r"\bdocs/[\w.-]+\.md\b", text)):
        assert (ROOT / reference).is_file(), reference
