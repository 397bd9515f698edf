"""examples/study.py: the --quick pipeline end to end, choices on validation only, paired statistics, resume after a kill."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import finetune  # noqa: E402
import lm_data  # noqa: E402
import study  # noqa: E402

DATA = ROOT / "examples" / "data" / "shakespeare"
LABELS = ["stock", "covariance", "covariance+values", "lowrank-r16", "lowrank-r32", "latent-r256", "latent-r128",
          "latent-r64", "lora-r16"]  # the default modes on the stand-in (d = 256, head size 64)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick study (every default mode) with a spy on the test split's loader: (output dir, result, calls)."""
    out = tmp_path_factory.mktemp("study") / "quick"
    calls, load = [], study.load_test_stream

    def spy(ft, tokenizer, test_file, *rest):
        choices = out / "choices.json"
        calls.append({"choices": json.loads(choices.read_text()) if choices.is_file() else None,
                      "final_records": list((out / "final").rglob("record.json")),
                      "sweep_records": len(list((out / "sweep").rglob("record.json"))), "test_file": test_file})
        return load(ft, tokenizer, test_file, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(study, "load_test_stream", spy)
        start = time.time()
        result = study.main(["--quick", "--output_dir", str(out), "--quantized_cache_bits", "8,4"])
    result["test_wall_s"] = time.time() - start
    return out, result, calls


def records(out: Path) -> dict[str, float]:
    """{run folder relative to out: mtime of its record.json}."""
    return {str(p.parent.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("record.json")}


# ---------------------------------------------------------------- the quick pipeline


def test_quick_study_writes_the_docs_outputs(quick):
    out, result, _ = quick
    for name in ("study.md", "study.json", "study_pareto_cache.png", "study_pareto_params.png", "study_lr.png"):
        assert (out / name).is_file(), name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "study.json").read_text())
    rows = saved["rows"]
    assert list(rows) == LABELS
    for label, row in rows.items():
        for key in ("trainable_params", "kv_cache_bytes_per_token", "best_lr", "test_mean", "test_std", "tokens_per_s"):
            assert row[key] is not None and row[key] > 0 or key == "test_std", (label, key)
        assert set(row["test_perplexity"]) == {"0", "1"}  # --quick: 2 seeds
        delta = row["delta_vs_stock"]
        assert delta["low"] <= delta["mean"] <= delta["high"] and delta["n"] == 2
    assert rows["stock"]["delta_vs_stock"]["mean"] == 0.0
    before = saved["perplexity_before"]  # the pretrained model; covariance starts exactly there
    assert rows["covariance"]["perplexity_at_patch"] == pytest.approx(before["validation"], rel=1e-5)
    assert before["test"] > 1 and f"before it, test {before['test']:.2f}" in (out / "study.md").read_text()
    for row in rows.values():  # the same-hyper-parameters view: every mode at stock's rate, on test, paired
        assert row["same_lr_val_perplexity"] == row["sweep"][f"{rows['stock']['best_lr']:g}"]
        assert set(row["same_lr_test_perplexity"]) == {"0", "1"} and row["same_lr_delta_vs_stock"]["n"] == 2
    stock_bytes = rows["stock"]["kv_cache_bytes_per_token"]
    assert stock_bytes == 4 * 2 * 256 * 4  # 4 layers, K + V of 256 numbers, fp32 (measured after generate)
    assert rows["covariance+values"]["kv_cache_bytes_per_token"] == stock_bytes / 2
    assert rows["latent-r64"]["kv_cache_bytes_per_token"] == 4 * 64 * 4
    assert rows["lora-r16"]["trainable_params"] < 0.05 * rows["lora-r16"]["total_params"]
    assert rows["lowrank-r16"]["init"] == "whitened" and rows["lora-r16"]["lora_r"] == 16
    assert saved["counts"]["final"] == len(LABELS) * 2 and saved["counts"]["sweep"] >= len(LABELS) * 4
    for label in ("latent-r256", "latent-r128", "latent-r64"):  # --quantized_cache_bits 8,4: the latent modes only
        row, q = rows[label], rows[label]["quantized"]
        assert set(q) == {"int8", "int4"} and set(q["int8"]["test_perplexity"]) == {"0", "1"}
        r_c = row["rank"]  # codes of r_c numbers plus one fp32 scale and minimum per token and layer (4 layers)
        assert q["int8"]["kv_cache_bytes_per_token"] == 4 * (r_c + 8)
        assert q["int4"]["kv_cache_bytes_per_token"] == 4 * (r_c // 2 + 8)
        seeds = q["int8"]["test_perplexity"]
        assert q["int8"]["delta_vs_unquantized"]["per_seed"] == pytest.approx(
            {s: seeds[s] - row["test_perplexity"][s] for s in seeds})
    assert all("quantized" not in rows[label] for label in LABELS if not label.startswith("latent"))
    md = (out / "study.md").read_text()
    assert "| latent-r64 | int4 | 160 (0.0195) |" in md
    assert "| mode | trainable params | KV cache B/token (× stock) | best lr | test ppl (mean ± std) | Δ vs stock [95% CI]" in md
    for label in LABELS:
        assert f"| {label}" in md
    for section in ("## Answer", "## What the stand-in can and cannot tell about GPT-2", "--dataset_name wikitext",
                    "quick smoke run", "![test perplexity against KV-cache bytes per token](study_pareto_cache.png)"):
        assert section in md


def test_learning_rates_are_chosen_on_validation_only(quick):
    out, result, calls = quick
    # the test split is read once, after every learning rate was chosen and written, before any final run finished
    assert len(calls) == 1
    assert calls[0]["choices"] == {label: f"{lr:g}" for label, lr in result["best_lr"].items()}
    assert calls[0]["final_records"] == [] and calls[0]["sweep_records"] == result["counts"]["sweep"]
    assert Path(calls[0]["test_file"]) == DATA / "test.txt"
    sweeps = [r for r in result["runs"] if r["phase"] == "sweep"]
    assert sweeps and not any(key.startswith("test") for r in sweeps for key in r)  # never scored on test
    assert all("test_perplexity" in r for r in result["runs"] if r["phase"] == "final")
    for label, row in result["rows"].items():
        by_validation = min(row["sweep"], key=row["sweep"].get)
        assert row["best_lr"] == float(by_validation) == result["best_lr"][label]
        assert len(row["sweep"]) >= 4 and f"{result['best_lr']['stock']:g}" in row["sweep"]  # the same-lr view
        assert {r["lr"] for r in result["runs"] if r["label"] == label and r["phase"] == "final"} == {row["best_lr"]}


def test_test_split_is_held_out():
    """Hamlet and Macbeth are in the test file only; validation (Julius Caesar, Othello) chooses."""
    text = {split: (DATA / f"{split}.txt").read_text(encoding="utf-8") for split in ("train", "validation", "test")}
    for name in ("HAMLET", "MACBETH"):
        assert name in text["test"] and name not in text["validation"] and name not in text["train"]
    args, _ = study.parse_args([])
    assert Path(args.test_file) == DATA / "test.txt" and args.same_lr_runs == "test"


def test_test_stream_is_tokenized_like_validation():
    args, ft = study.parse_args(["--test_file", str(DATA / "validation.txt")])
    ft = dataclasses.replace(ft, eval_max_tokens=0)
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ft.model_name_or_path)
    validation = lm_data.load_lm_data(ft, tokenizer, Accelerator())[1]
    assert lm_data.load_test_stream(ft, tokenizer, args.test_file).tolist() == validation.tolist()


def test_choose_lr_uses_validation_and_skips_diverged_runs():
    def sweep(lr, val):
        return {"phase": "sweep", "lr": lr, "val_perplexity": val}

    assert study.choose_lr([sweep(1e-4, 130.0), sweep(3e-4, 128.0), sweep(1e-3, 129.0)]) == 3e-4
    assert study.choose_lr([sweep(1e-4, 130.0), sweep(3e-4, math.nan), sweep(1e-3, math.inf)]) == 1e-4
    assert study.choose_lr([sweep(1e-3, 128.0), sweep(1e-4, 128.0)]) == 1e-4  # a tie: the smaller rate
    with pytest.raises(ValueError, match="choose_lr takes sweep records"):
        study.choose_lr([sweep(1e-4, 130.0), {"phase": "final", "lr": 3e-4, "val_perplexity": 1.0, "test_perplexity": 1.0}])


@pytest.mark.parametrize("optimum,extend,expected", [
    (5e-4, 1, [2e-4, 4.31e-4, 9.28e-4, 2e-3]),  # inside the grid: nothing added
    (1e-5, 1, [9.28e-5, 2e-4, 4.31e-4, 9.28e-4, 2e-3]),  # below it: one step down, then stop (still an edge)
    (1e-5, 2, [4.31e-5, 9.28e-5, 2e-4, 4.31e-4, 9.28e-4, 2e-3]),
    (2.5e-3, 2, [2e-4, 4.31e-4, 9.28e-4, 2e-3, 4.31e-3]),  # at the top edge: one step up, and 2e-3 is inside
    (5e-3, 0, [2e-4, 4.31e-4, 9.28e-4, 2e-3]),
])
def test_sweep_extends_the_grid_past_a_winning_edge(optimum, extend, expected):
    runs = []

    def run(phase, mode, lr, seed):  # validation perplexity: a parabola in log(lr) around the optimum
        runs.append(lr)
        return {"phase": phase, "lr": lr, "val_perplexity": 100 + math.log(lr / optimum) ** 2}

    fake = study.Study.__new__(study.Study)
    fake.args, fake.run = study.StudyArguments(extend_edges=extend, seed=0), run
    records = fake.sweep(("stock", "stock", None, None), study.parse_grid(study.DEFAULT_GRID))
    assert sorted(r["lr"] for r in records) == pytest.approx(expected)


# ---------------------------------------------------------------- statistics


def test_paired_differences_by_hand():
    values, reference = {0: 11.0, 1: 22.0, 2: 33.0}, {0: 10.0, 1: 20.0, 2: 30.0}  # differences 1, 2, 3
    d = study.paired_differences(values, reference)
    half = 4.302653 * 1.0 / math.sqrt(3)  # t(0.975, 2 df) × std 1 / sqrt(n)
    assert d["mean"] == pytest.approx(2.0) and d["std"] == pytest.approx(1.0) and d["n"] == 3
    assert (d["low"], d["high"]) == (pytest.approx(2 - half, abs=1e-5), pytest.approx(2 + half, abs=1e-5))
    assert d["per_seed"] == {0: pytest.approx(1.0), 1: pytest.approx(2.0), 2: pytest.approx(3.0)}
    # pairing: a large seed-to-seed spread shared by both sides cancels
    shared = {0: 100.0, 1: 150.0, 2: 200.0}
    d = study.paired_differences({s: v + 0.5 for s, v in shared.items()}, shared)
    assert d["mean"] == pytest.approx(0.5) and d["high"] - d["low"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="same >= 2 seeds"):
        study.paired_differences({0: 1.0, 1: 2.0}, {0: 1.0, 2: 2.0})
    with pytest.raises(ValueError, match="same >= 2 seeds"):
        study.paired_differences({0: 1.0}, {0: 2.0})


def test_paired_differences_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (*range(1, 41), 60, 120, 1000):
        assert study.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-6), df
    for n in (3, 5, 40):
        values = {s: 100 + math.sin(s) * 3 + 0.1 * s for s in range(n)}
        reference = {s: 100 + math.sin(s) * 3 + math.cos(3 * s) for s in range(n)}
        d = study.paired_differences(values, reference)
        diffs = [values[s] - reference[s] for s in range(n)]
        low, high = stats.t.interval(0.95, n - 1, loc=statistics.fmean(diffs), scale=stats.sem(diffs))
        assert (d["low"], d["high"]) == (pytest.approx(low, rel=1e-5), pytest.approx(high, rel=1e-5))
        assert stats.ttest_rel(list(values.values()), list(reference.values())).statistic == pytest.approx(
            d["mean"] / (d["std"] / math.sqrt(n)))


# ---------------------------------------------------------------- resume


def test_rerun_recomputes_only_a_missing_run(quick, tmp_path):
    out, result, _ = quick
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    missing = next(p for p in records(copy) if p.startswith("final/") and p.endswith("covariance-seed1"))
    (copy / missing / "record.json").unlink()
    before = records(copy)
    again = study.main(["--quick", "--output_dir", str(copy), "--keep_models", "--quantized_cache_bits", "8,4"])
    assert again["computed"] == [missing]
    # the model that was scored on test is the one trained: reloaded, it gives the run's validation perplexity
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, ft = study.parse_args(["--quick"])
    validation = lm_data.load_lm_data(ft, AutoTokenizer.from_pretrained(ft.model_name_or_path), Accelerator())[1]
    reloaded = AutoModelForCausalLM.from_pretrained(copy / missing / "model")
    record = json.loads((copy / missing / "record.json").read_text())
    assert finetune.eval_loss(reloaded, validation, ft)["perplexity"] == pytest.approx(record["val_perplexity"], rel=1e-5)
    after = records(copy)
    assert {k: v for k, v in after.items() if k != missing} == before  # every other record untouched
    old = next(r for r in result["runs"] if r["phase"] == "final" and r["label"] == "covariance" and r["seed"] == 1)
    new = next(r for r in again["runs"] if r["phase"] == "final" and r["label"] == "covariance" and r["seed"] == 1)
    assert new["test_perplexity"] == pytest.approx(old["test_perplexity"], rel=1e-5)  # same seed, same data order
    assert again["best_lr"] == result["best_lr"]


def test_killed_study_resumes_and_reuses_finished_runs(quick, tmp_path):
    """SIGKILL a --quick study in the middle, rerun it: finished runs are reused and the result is the same."""
    out = tmp_path / "killed"
    argv = ["--quick", "--modes", "stock,lowrank:hd/4", "--output_dir", str(out)]
    process = subprocess.Popen([sys.executable, str(ROOT / "examples" / "study.py"), *argv], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while len(records(out)) < 3 and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the study finished (or failed) before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    finished = records(out)
    assert len(finished) >= 3 and not (out / "study.json").exists()
    resumed = study.main(argv)
    assert not set(resumed["computed"]) & set(finished)
    assert {k: v for k, v in records(out).items() if k in finished} == finished  # reused, not rewritten
    full = {(r["phase"], r["label"], r["lr"], r["seed"]): r for r in quick[1]["runs"]}
    for r in resumed["runs"]:  # the runs of an uninterrupted study with the same settings
        twin = full[(r["phase"], r["label"], r["lr"], r["seed"])]
        assert r["val_perplexity"] == pytest.approx(twin["val_perplexity"], rel=1e-5)
        if r["phase"] == "final":
            assert r["test_perplexity"] == pytest.approx(twin["test_perplexity"], rel=1e-5)


# ---------------------------------------------------------------- arguments


def test_default_modes_follow_the_model():
    args, ft = study.parse_args([])
    modes, grid = study.validate(args, ft)
    assert [m[0] for m in modes] == LABELS and len(grid) >= 4 and grid[-1] / grid[0] >= 10
    assert ("lora-r16", "stock", None, 16) in modes and ("latent-r64", "latent", 64, None) in modes
    gpt2 = study.resolve_modes(study.DEFAULT_MODES, hidden=768, heads=12)  # GPT-2 small
    assert [m[0] for m in gpt2] == ["stock", "covariance", "covariance+values", "lowrank-r16", "lowrank-r32",
                                    "latent-r768", "latent-r384", "latent-r192", "lora-r16"]
    assert args.final_steps * ft.per_device_train_batch_size >= 2 * 60 * 8  # at least twice finetune.py's budget
    assert args.seeds >= 3


@pytest.mark.parametrize(
    "extra,error,match",
    [
        (["--lr_grid", "1e-4,3e-4,1e-3"], ValueError, r"--lr_grid '1e-4,3e-4,1e-3' gives .*at least 4 positive learning rates"),
        (["--lr_grid", "1e-4,2e-4,3e-4,5e-4"], ValueError, r"spanning at least 10x"),
        (["--lr_grid", "1e-4,x"], ValueError, r"--lr_grid '1e-4,x' must be comma-separated numbers"),
        (["--learning_rate", "1e-3"], ValueError, r"--learning_rate is set by the study for each run; use --lr_grid"),
        (["--lora"], ValueError, r"--lora is set by the study.*lora:R in --modes"),
        (["--learning-rate=1e-3"], ValueError, r"--learning-rate is set by the study for each run; use --lr_grid"),
        (["--push-to-hub"], ValueError, r"--push-to-hub is set by the study"),
        (["--learn", "1e-3"], SystemExit, "2"),  # no abbreviation reaches a flag the study sets (argparse's error)
        (["--modes", "covariance,lowrank:hd/4"], ValueError, r"has no stock.*Add stock to --modes"),
        (["--modes", "stock,lora:x"], ValueError, r"'lora:x': LoRA needs a positive integer rank"),
        (["--modes", "stock,lowrank:hd/4,lowrank:16"], ValueError, r"names a mode twice"),
        (["--modes", "stock,merged"], ValueError, r"--modes entry 'merged' is not a mode"),
        (["--modes", "stock,latent:999"], ValueError, r"rank=999 exceeds the hidden size 256"),
        (["--quantized_cache_bits", "8,3"], ValueError, r"--quantized_cache_bits '8,3': give distinct widths from 8 and 4"),
        (["--seeds", "1"], ValueError, r"--seeds 1: paired differences .* need at least 2 seeds"),
        (["--test_file", "/nonexistent/test.txt"], FileNotFoundError, r"--test_file '/nonexistent/test.txt' does not exist"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, extra, error, match):
    out = tmp_path / "bad"
    with pytest.raises(error, match=match):
        study.main(["--quick", "--output_dir", str(out), *extra])
    assert not out.exists()


def test_other_settings_in_the_same_output_dir_are_refused(quick):
    out, _, _ = quick
    before = records(out)
    with pytest.raises(ValueError, match=r"holds runs made with other settings \(sweep_steps: 1 then, 2 now\)"):
        study.main(["--quick", "--output_dir", str(out), "--sweep_steps", "2", "--quantized_cache_bits", "8,4"])
    assert records(out) == before
