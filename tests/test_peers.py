"""benchmarks/peers.py's dry run on the stand-in: every row it lists is measured (quanto and HQQ are installed by the
`peers` extra: a missing backend is an error, never a skip), the rows it does not claim are listed as not run, and the
measured bytes per token are what the caches hold."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]


def load_peers(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("peers", ROOT / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peers_dry_run_measures_every_row_it_lists(tmp_path):
    """The dry run in a fresh process (one thread; quanto builds its C++ extension on first use, ~50 s)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--dry_run", "--sliding_windows", "8", "64",
         "--output_dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=HANG_TIMEOUT, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "peers.json").read_text())["runs"]["shakespeare-gpt2"]
    rows, not_run = record["rows"], record["not_run"]
    expected = (["stock"] + [f"quanto int{b}, residual {r}" for b in (4, 2) for r in (0, 128)]
                + ["HQQ int8, residual 32", "HQQ int4, residual 32", "fp8 (e4m3, per-tensor scale)",
                   "sliding window 8", "sliding window 64"]
                + [f"latent r_c={r}{q}" for r in (128, 64, 32) for q in ("", ", int8", ", int4")])
    assert list(rows) == expected  # every listed row measured, in order
    assert list(not_run) == ["kvpress (every press)"] and "gpt2" in not_run["kvpress (every press)"]
    stock = rows["stock"]
    assert stock["loop_vs_full_forward_max_abs"] < 1e-3 and stock["tokens"] == 8
    for name, r in rows.items():
        assert r["tokens"] == 8 and r["perplexity"] > 1 and r["bytes_per_token"] > 0, name
        assert set(r["decode"]) == {"1", "2"} and all(t["ms_per_step"] > 0 for t in r["decode"].values()), name
    # 4 layers, K and V of 4 heads x 64 in fp32; a window longer than the text changes nothing
    assert stock["bytes_per_token"] == 4 * 2 * 256 * 4
    assert rows["sliding window 64"]["loss"] == pytest.approx(stock["loss"], abs=1e-5)
    assert rows["sliding window 64"]["bytes_per_token"] == stock["bytes_per_token"]
    assert stock["delta_nll"] == 0 and rows["sliding window 64"]["delta_nll"] == pytest.approx(0, abs=1e-5)
    assert rows["sliding window 8"]["delta_nll"] == pytest.approx(rows["sliding window 8"]["loss"] - stock["loss"])
    assert rows["sliding window 8"]["bytes_per_token"] == stock["bytes_per_token"] * 7 / 39  # 7 kept of 39 fed
    # quanto with no residual window: codes plus an fp32 scale and shift per group of 64; fp8: one byte a number
    for bits in (4, 2):
        assert rows[f"quanto int{bits}, residual 0"]["bytes_per_token"] == 4 * 2 * (256 * bits / 8 + 256 / 64 * 8)
    assert rows["fp8 (e4m3, per-tensor scale)"]["bytes_per_token"] == pytest.approx(4 * 2 * 256, abs=1)
    # the latent: r_c fp32 numbers a layer; int8 / int4 codes plus an fp32 scale and minimum per token; the same
    # figure as the project's own measure of the same cache
    for r_c in (128, 64, 32):
        assert rows[f"latent r_c={r_c}"]["bytes_per_token"] == 4 * r_c * 4
        assert rows[f"latent r_c={r_c}, int8"]["bytes_per_token"] == 4 * (r_c + 8)
        assert rows[f"latent r_c={r_c}, int4"]["bytes_per_token"] == 4 * (r_c // 2 + 8)
        for q in ("", ", int8", ", int4"):
            assert rows[f"latent r_c={r_c}{q}"]["bytes_per_token_project"] == rows[f"latent r_c={r_c}{q}"]["bytes_per_token"]
    md = (tmp_path / "peers.md").read_text()
    assert all(f"| {name} |" in md or f"| **{name}** |" in md for name in rows)
    assert "**Not run**: kvpress (every press)" in md
    assert (tmp_path / "peers.png").stat().st_size > 10_000


def test_a_missing_backend_is_an_error_with_what_to_install(monkeypatch):
    peers = load_peers(monkeypatch)
    monkeypatch.setitem(sys.modules, "hqq", None)  # `import hqq` raises ImportError
    problem = peers.backend_problem({"name": "HQQ int4, residual 32", "backend": "hqq"})
    assert problem is not None and 'pip install -e ".[peers]"' in problem
    assert peers.backend_problem({"name": "stock"}) is None
    with pytest.raises(RuntimeError, match="needs hqq"):
        peers.main(["--dry_run", "--output_dir", "/nonexistent/never-written"])


def test_bad_input_is_refused_before_any_work(monkeypatch, tmp_path, capsys):
    peers = load_peers(monkeypatch)
    for argv, message in ((["--kvpress_venv", str(tmp_path / "none")], "kvpress==0.5.5"),
                          (["--kvpress_ratios", "1.5"], "in (0, 1)"),
                          (["--context", "1"], "--context must be >= 2"),
                          (["--model_name_or_path", str(tmp_path / "absent")], "examples/smollm2.py")):
        with pytest.raises(SystemExit):
            peers.parse_args(argv)
        assert message in capsys.readouterr().err, argv


FAKE_WORKER = """
import json, sys
sys.path.insert(0, {bench!r})
import torch
from transformers import AutoModelForCausalLM
import peers_kvpress

request = json.loads(sys.stdin.read())
model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32).eval()
stock = peers_kvpress.score(model, request["windows"], request["context"])  # the worker's own loop, no press
rows = {{"kvpress SnapKV 50%": {{"curve": "kvpress SnapKV", **stock, "bytes_per_token": 1.0}},
        "kvpress Missing 50%": {{"error": "kvpress 0.5.5 has no MissingPress"}}}}
print("progress on stdout first")
print(json.dumps({{"versions": {{"kvpress": "fake", "transformers": "x", "torch": "x"}}, "stock": stock, "rows": rows}}))
"""


def test_a_rotary_model_with_its_kvpress_rows(tmp_path):
    """A tiny random Llama (the rotary latent, its quantized cache, the rotary fill of the timing) and the kvpress
    exchange through a stand-in venv whose python runs benchmarks/peers_kvpress.py's scoring loop without a press: its
    stock row must match the main loop's, its rows are merged, a press it could not run is listed as not run."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 intermediate_size=128, num_hidden_layers=2, vocab_size=8192,
                                 max_position_embeddings=512)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "examples" / "shakespeare-gpt2" / name, folder / name)
    venv = tmp_path / "venv-kvpress"
    (venv / "bin").mkdir(parents=True)
    (tmp_path / "worker.py").write_text(FAKE_WORKER.format(bench=str(ROOT / "benchmarks")))
    (venv / "bin" / "python").write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'worker.py'}\n")
    (venv / "bin" / "python").chmod(0o755)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--dry_run", "--model_name_or_path", str(folder),
         "--only", "stock", "latent r_c=16", "sliding window", "--kvpress_venv", str(venv), "--kvpress_presses",
         "SnapKVPress", "MissingPress", "--kvpress_ratios", "0.5", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=HANG_TIMEOUT, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "peers.json").read_text())["runs"]["tiny-llama"]
    rows = record["rows"]
    assert record["rotary"] and record["args"]["rope_pairs"] == 4
    assert set(rows) == {"stock", "sliding window 4", "sliding window 8", "sliding window 16", "latent r_c=16",
                         "latent r_c=16, int8", "latent r_c=16, int4", "kvpress SnapKV 50%"}
    assert record["not_run"]["kvpress Missing 50%"] == "kvpress 0.5.5 has no MissingPress"
    assert record["not_run"]["quanto int4, residual 0"] == "left out by --only"
    assert rows["stock"]["kvpress_env"]["loss"] == pytest.approx(rows["stock"]["loss"], abs=1e-4)
    # 2 layers: stock K and V of 2 KV heads x 16; the latent r_c plus 2 heads x 2·4 rotary numbers, fp32; int8 codes of
    # r_c plus an fp32 scale and minimum, the rotary keys whole
    assert rows["stock"]["bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert rows["latent r_c=16"]["bytes_per_token"] == 2 * (16 + 2 * 8) * 4
    assert rows["latent r_c=16, int8"]["bytes_per_token"] == 2 * (16 + 8 + 2 * 8 * 4)
    assert all(set(r["decode"]) == {"1", "2"} for n, r in rows.items() if not n.startswith("kvpress"))
    assert "decode" not in rows["kvpress SnapKV 50%"] or rows["kvpress SnapKV 50%"]["decode"] == {}
