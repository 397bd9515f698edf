"""Save / load (with and without the package) / push / export back to stock GPT-2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import BLOCK_PACKAGE, HANG_TIMEOUT, HEAD_DIM, VOCAB, make_gpt2, max_diff
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
)
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

import hf_merged_attn
from hf_merged_attn import MergedGPT2LMHeadModel, patch_model, unpatch_model

MODES = [("covariance", None), ("lowrank", 3), ("lowrank", 2 * HEAD_DIM)]
MODE_IDS = ["covariance", "lowrank_r<hd", "lowrank_r>hd"]
# Same weights, same attention implementation, same machine: a reloaded model repeats the same float ops,
# so logits agree to the last bit in practice; 1e-6 only allows for a different BLAS blocking choice.
RELOAD_TOL = 1e-6


def trained(model, steps: int = 3, labels: torch.Tensor | None = None):
    """Move every weight away from its seeded value (a loader that re-seeds from stock must then fail)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(1, VOCAB, (4, 12))
    for _ in range(steps):
        model(ids, labels=ids if labels is None else labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture
def ids():
    return torch.randint(1, VOCAB, (2, 10))


@pytest.mark.parametrize("mode,rank", MODES, ids=MODE_IDS)
def test_save_and_load_with_the_package(tmp_path, ids, mode, rank):
    model = trained(patch_model(make_gpt2(), mode, rank=rank, layers=[1] if mode == "covariance" else None))
    seeded = patch_model(make_gpt2(), mode, rank=rank, layers=[1] if mode == "covariance" else None)
    assert max_diff(model.transformer.h[1].attn.q_proj.weight, seeded.transformer.h[1].attn.q_proj.weight) > 1e-3
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert {"modeling_merged_gpt2.py", "merged_attention.py", "merged_models.py", "README.md"} <= set(files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "merged_gpt2"
    assert config["merged_attn"]["mode"] == mode and config["merged_attn"]["rank"] == rank
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_merged_gpt2.MergedGPT2LMHeadModel"

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(loaded) is MergedGPT2LMHeadModel
    expected_state = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected_state[name]), name
    with torch.no_grad():
        assert max_diff(loaded(ids).logits, model(ids).logits) < RELOAD_TOL


def test_other_heads_load_through_their_auto_classes(tmp_path, ids):
    stock = make_gpt2(GPT2ForSequenceClassification, num_labels=3)
    model = trained(patch_model(stock, "lowrank", rank=3), labels=torch.tensor([0, 1, 2, 1]))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager")
    assert type(loaded).__name__ == "MergedGPT2ForSequenceClassification"
    with torch.no_grad():
        assert max_diff(loaded(ids).logits, model(ids).logits) < RELOAD_TOL
    base = AutoModel.from_pretrained(tmp_path, attn_implementation="eager")  # the body alone
    assert type(base).__name__ == "MergedGPT2Model"


def test_bf16_round_trip(tmp_path, ids):
    model = patch_model(make_gpt2().to(torch.bfloat16), "covariance")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto", attn_implementation="eager")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    expected = model.state_dict()
    assert all(torch.equal(t, expected[n]) for n, t in loaded.state_dict().items())


REMOTE_LOAD = BLOCK_PACKAGE + textwrap.dedent(
    """
    import torch
    import transformers
    folder, trust, auto = sys.argv[1], sys.argv[2] == "1", getattr(transformers, sys.argv[4])
    try:
        model = auto.from_pretrained(folder, trust_remote_code=trust, attn_implementation="eager")
    except Exception as error:
        print("ERROR", type(error).__name__, str(error)[:2000].replace(chr(10), " "))
        sys.exit(3)
    assert "hf_merged_attn" not in sys.modules
    ids = torch.tensor(json.loads(sys.argv[3]))
    with torch.no_grad():
        print(json.dumps({"type": type(model).__name__, "logits": model(ids)[0].tolist()}))
    """
)


def run_without_package(folder: Path, trust: bool, ids: torch.Tensor, tmp_path: Path, auto: str = "AutoModelForCausalLM"):
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(folder), "1" if trust else "0", json.dumps(ids.tolist()), auto],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=HANG_TIMEOUT,
    )


def test_load_with_remote_code_where_the_package_is_not_importable(tmp_path, ids):
    model = trained(patch_model(make_gpt2(), "lowrank", rank=3))
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    for name in ("modeling_merged_gpt2.py", "merged_attention.py", "merged_models.py", "attention_kernels.py",
                 "quantized_cache.py", "config.py", "weights.py", "projections.py"):
        source = (folder / name).read_text()
        imports = {line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))}
        assert imports <= {"__future__", "logging", "os", "math", "tempfile", "contextlib", "dataclasses", "numbers", "typing",
                           "torch", "transformers", ".merged_attention", ".merged_models", ".attention_kernels",
                           ".quantized_cache", ".config", ".weights", ".projections"} | {
            i for i in imports if i.startswith(("torch.", "transformers."))
        }, imports  # self-contained: torch / transformers / the core files beside it only
    result = run_without_package(folder, True, ids, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["type"] == "MergedGPT2LMHeadModel"
    with torch.no_grad():
        assert max_diff(torch.tensor(out["logits"]), model(ids).logits) < RELOAD_TOL

    refused = run_without_package(folder, False, ids, tmp_path)
    assert refused.returncode == 3, (refused.stdout, refused.stderr[-2000:])  # never a randomly initialised model
    assert "trust_remote_code" in refused.stdout


def test_auto_map_lists_every_auto_class_of_the_family(tmp_path, ids):
    """Remote code loads a checkpoint through any Auto class it fits, not only the saved class's own."""
    model = patch_model(make_gpt2(GPT2ForSequenceClassification, num_labels=3), "lowrank", rank=3)
    model.save_pretrained(tmp_path / "ckpt")
    auto_map = json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "modeling_merged_gpt2.MergedGPT2Config", **{
        auto: f"modeling_merged_gpt2.{merged.__name__}"
        for merged, auto in hf_merged_attn.modeling_merged_gpt2.SPEC.model_classes.values() if auto
    }} and len(auto_map) == 6
    result = run_without_package(tmp_path / "ckpt", True, ids, tmp_path, auto="AutoModel")
    assert result.returncode == 0, (result.stdout, result.stderr[-3000:])
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["type"] == "MergedGPT2Model"
    with torch.no_grad():
        assert max_diff(torch.tensor(out["logits"]), model.transformer(ids)[0]) < RELOAD_TOL


def test_push_to_hub_uploads_the_checkpoint_and_a_card(tmp_path, monkeypatch):
    """huggingface_hub is intercepted at its API boundary (create_repo / create_commit): no network."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import CommitInfo, RepoUrl

    committed = {}

    def fake_create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            source = op.path_or_fileobj
            committed[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else source.read()
        committed["__message__"] = kwargs.get("commit_message")
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="", commit_description="",
            oid="0" * 40,
        )

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "create_commit", fake_create_commit)
    monkeypatch.setattr(HfApi, "preupload_lfs_files", lambda self, *a, **k: None, raising=False)
    model = patch_model(make_gpt2(), "lowrank", rank=3)
    model.push_to_hub("someone/tiny-merged", results={"validation perplexity": "12.34"})

    assert {"config.json", "model.safetensors", "modeling_merged_gpt2.py", "merged_attention.py", "README.md"} <= set(committed)
    assert not any(name.endswith((".bin", ".pt")) for name in committed)
    card = committed["README.md"].decode()
    assert "lowrank" in card and "rank 3" in card and "seeded by SVD" in card and "validation perplexity | 12.34" in card
    assert 'from_pretrained("someone/tiny-merged", trust_remote_code=True)' in card
    stock_params = sum(p.numel() for p in make_gpt2().parameters())
    assert f"{stock_params:,}" in card and f"{sum(p.numel() for p in model.parameters()):,}" in card
    # the uploaded files are a loadable checkpoint
    folder = tmp_path / "pushed"
    folder.mkdir()
    for name, data in committed.items():
        if not name.startswith("__"):
            (folder / name).write_bytes(data)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in loaded.state_dict().items())


@pytest.mark.parametrize("rank", [3, HEAD_DIM])
def test_unpatch_lowrank_after_training_is_exact(ids, rank):
    model = trained(patch_model(make_gpt2(), "lowrank", rank=rank))
    with torch.no_grad():
        expected = model(ids).logits
    stock, errors = unpatch_model(model, strict=True, return_errors=True)
    assert stock is model and type(stock) is GPT2LMHeadModel and type(stock.config) is GPT2Config
    assert not hasattr(stock.config, "merged_attn")
    assert all(type(block.attn) is GPT2Attention for block in stock.transformer.h)
    assert max(max(sides.values()) for sides in errors.values()) < 1e-6  # rank(S̃) <= r <= hd: the SVD export loses only round-off
    with torch.no_grad():
        assert max_diff(stock(ids).logits, expected) < 1e-4  # fp32 round-off, as in the patch tests


def test_unpatch_covariance_right_after_seeding_is_exact(tmp_path, ids):
    original = make_gpt2()
    with torch.no_grad():
        expected = original(ids).logits
    model = unpatch_model(patch_model(original, "covariance"), strict=True)
    with torch.no_grad():
        assert max_diff(model(ids).logits, expected) < 1e-4
    model.save_pretrained(tmp_path)  # a plain GPT-2 checkpoint again
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"


def test_unpatch_trained_covariance_truncates_and_reports(ids, caplog):
    model = trained(patch_model(make_gpt2(), "covariance"), steps=5)
    with pytest.raises(ValueError, match=r"strict=True.*keeps rank <= head size 8 per head.*layer 0: S_h = Wq_h·Wk_hᵀ "
                                         r"\(relative error"):
        unpatch_model(model, strict=True)
    assert type(model) is MergedGPT2LMHeadModel  # strict failure leaves the model untouched
    with caplog.at_level("WARNING"):
        _, errors = unpatch_model(model, return_errors=True)
    assert min(sides["query_key"] for sides in errors.values()) > 1e-4 and "relative error" in caplog.text


def test_unpatch_errors():
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel is not patched"):
        unpatch_model(make_gpt2())


def _saved(tmp_path, mode, rank):
    model = patch_model(make_gpt2(), mode, rank=rank)
    model.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder, **merged):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["merged_attn"].update(merged)
    path.write_text(json.dumps(config))


def test_checkpoint_with_wrong_rank(tmp_path):
    folder = _saved(tmp_path, "lowrank", 4)
    _edit_config(folder, rank=3)
    with pytest.raises(ValueError, match=r"config.json's merged_attn=.*'mismatched_keys': \['transformer\.h\.0\.attn\."
                                         r"k_proj\.weight: checkpoint \[16, 32\], config \[12, 32\]"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("ignore", [False, True])
def test_checkpoint_with_a_wrong_shape_outside_the_attention(tmp_path, ignore):
    """A bad tensor that is not an attention weight is not blamed on merged_attn."""
    folder = _saved(tmp_path, "lowrank", 4)
    weights = load_file(folder / "model.safetensors")
    weights["transformer.ln_f.weight"] = torch.ones(5)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    if ignore:  # as transformers: re-initialised on request, and reported
        _, info = AutoModelForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=True, output_loading_info=True)
        assert [key for key, *_ in info["mismatched_keys"]] == ["transformer.ln_f.weight"]
        return
    with pytest.raises(ValueError, match=r"weights outside the merged attention do not have the shapes that config.json "
                                         r"gives them \(transformer\.ln_f\.weight: checkpoint \[5\], config \[32\]\); "
                                         r"merged_attn is not involved\..*pass ignore_mismatched_sizes=True"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_checkpoint_with_wrong_mode(tmp_path):
    folder = _saved(tmp_path, "lowrank", 4)
    _edit_config(folder, mode="covariance", rank=None)
    with pytest.raises(ValueError, match=r"model.safetensors do not"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_checkpoint_with_missing_weight(tmp_path):
    folder = _saved(tmp_path, "lowrank", 4)
    weights = load_file(folder / "model.safetensors")
    del weights["transformer.h.1.attn.k_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing_keys.*transformer.h.1.attn.k_proj.weight.*Refusing"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize(
    "field,match",
    [
        ({"mode": "merged"}, r"config.json: merged_attn: mode='merged' is not a patch mode.*the checkpoint is corrupted"),
        ({"layers": [7]}, r"config.json: merged_attn.layers=\[7\] must be .*the checkpoint is corrupted"),
        ({"init": "foo"}, r"config.json: merged_attn: init='foo' is not a seeding method; allowed: 'svd', 'whitened'"),
        # checked against the head size up front, not later as a shape mismatch after transformers' load report
        ({"value_rank": 9}, r"config.json: merged_attn: value_rank=9 exceeds the head size 8.*the checkpoint is corrupted"),
    ],
)
def test_checkpoint_with_corrupt_record(tmp_path, field, match):
    folder = _saved(tmp_path, "covariance", None)
    _edit_config(folder, **field)
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(folder)


def test_package_registers_auto_classes():
    assert hf_merged_attn.MergedGPT2Config.model_type == "merged_gpt2"
    from transformers import AutoConfig

    assert AutoConfig.for_model("merged_gpt2").__class__.__name__ == "MergedGPT2Config"
