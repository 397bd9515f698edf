"""examples/rank_sweep.py end to end on the tiny model of test_finetune (2 layers, d = 64, 4 heads of 16)."""

from __future__ import annotations

import json
import sys

from test_finetune import ROOT, assets  # noqa: F401  (assets: the tiny model and data fixture)

sys.path.insert(0, str(ROOT / "examples"))
import rank_sweep  # noqa: E402


def test_latent_sweep_reports_both_inits_and_measured_cache(assets, tmp_path, capsys):
    out = tmp_path / "latent_sweep"
    rank_sweep.main([
        "--model_name_or_path", str(assets / "model"), "--mode", "latent", "--ranks", "8,64", "--max_train_steps", "1",
        "--per_device_train_batch_size", "2", "--block_size", "64", "--eval_max_tokens", "512", "--eval_stride", "64",
        "--calibration_samples", "4", "--output_dir", str(out), "--",
        "--train_file", str(assets / "train.txt"), "--validation_file", str(assets / "validation.txt"),
        "--curve_eval_tokens", "128",
    ])
    rows = {(r["init"], r["rank"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {("svd", 8), ("whitened", 8), ("svd", 64), ("whitened", 64)}
    # r_c = d = 64 is exact: run once, reported for both inits; below it the inits are different seeds
    assert rows["whitened", 64]["shared_with"] == "svd"
    assert rows["svd", 8]["perplexity_at_patch"] != rows["whitened", 8]["perplexity_at_patch"]
    # measured on the cache after generate(): one latent of r_c fp32 numbers per token and layer (stock: 2 x 64)
    assert rows["svd", 8]["kv_cache_bytes_per_token"] == 2 * 8 * 4
    assert rows["svd", 64]["kv_cache_bytes_per_token"] == 2 * 64 * 4
    report = (out / "latent_sweep.md").read_text()  # its own name: a lowrank sweep's report is not overwritten
    assert "Rank sweep (latent)" in report and "| rank | KV cache B/token |" in report and "| 8 | 64 |" in report
    assert (out / "latent_sweep.png").stat().st_size > 0 and not (out / "rank_sweep.md").exists()
