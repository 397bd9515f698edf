"""lm-evaluation-harness on saved checkpoints, offline: the shipped `shakespeare` task (examples/lm_eval_tasks) through
the `lm_eval` CLI as the README gives it. Stock and an exact patch (covariance, loaded through trust_remote_code) score
the same; an approximate patch does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BLOCK_PACKAGE, HANG_TIMEOUT
from transformers import AutoModelForCausalLM

from hf_merged_attn import patch_model

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = ROOT / "examples" / "shakespeare-gpt2"
# `python -m lm_eval ARGS` in a process that cannot import hf_merged_attn: the patched checkpoints load through
# trust_remote_code alone, as for a user who never installed the package
LM_EVAL = BLOCK_PACKAGE + """
import runpy
sys.argv = ["lm_eval", *sys.argv[1:]]
runpy.run_module("lm_eval", run_name="__main__", alter_sys=True)
"""
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def lm_eval(folder: Path, out: Path, remote_code: bool) -> dict:
    """`lm_eval --model hf ... --tasks shakespeare` on the first 2 test documents; the task's metrics."""
    model_args = f"pretrained={folder}" + (",trust_remote_code=True" if remote_code else "")
    command = [sys.executable, "-c", LM_EVAL, "--model", "hf", "--model_args", model_args,
               "--include_path", str(ROOT / "examples" / "lm_eval_tasks"), "--tasks", "shakespeare",
               "--device", "cpu", "--batch_size", "8", "--limit", "2", "--output_path", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=HANG_TIMEOUT, env=OFFLINE, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    (found,) = out.rglob("results_*.json")
    metrics = json.loads(found.read_text())["results"]["shakespeare"]
    return {k.split(",")[0]: v for k, v in metrics.items() if k.split(",")[0] in
            ("word_perplexity", "byte_perplexity", "bits_per_byte")}


@pytest.fixture(scope="module")
def stock_scores(tmp_path_factory):
    return lm_eval(STAND_IN, tmp_path_factory.mktemp("stock") / "out", remote_code=False)


def saved_patch(tmp_path: Path, mode: str, **kwargs) -> Path:
    model = patch_model(AutoModelForCausalLM.from_pretrained(STAND_IN), mode, **kwargs)
    folder = tmp_path / mode
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((STAND_IN / name).read_bytes())
    return folder


def test_exact_patch_scores_as_stock(stock_scores, tmp_path):
    assert set(stock_scores) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert 0.5 < stock_scores["bits_per_byte"] < 8  # a trained byte-level LM on English text, not a broken one
    patched = lm_eval(saved_patch(tmp_path, "covariance"), tmp_path / "out", remote_code=True)
    # the same function up to fp32 round-off in the merged products (~1e-6 relative on the logits, see
    # tests/test_patch_exact.py); summed over ~5k tokens the document log-likelihoods agree to ~1e-6 relative
    for metric, value in stock_scores.items():
        assert patched[metric] == pytest.approx(value, rel=1e-5), metric


def test_approximate_patch_scores_differently(stock_scores, tmp_path):
    patched = lm_eval(saved_patch(tmp_path, "lowrank", rank=1), tmp_path / "out", remote_code=True)
    # rank 1 of 64 per head changes every attention pattern: the scores move (the comparison above can fail)
    assert abs(patched["bits_per_byte"] - stock_scores["bits_per_byte"]) > 1e-3
