"""The benchmark's smoke run (GPT-2, OPT, BLOOM), and torch.compile of the patched attention (one graph, same numbers
as eager)."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_TIMEOUT, HEAD_DIM, HIDDEN, make_gpt2, max_diff

from hf_merged_attn import patch_model

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_every_mode(tmp_path):
    """`python benchmarks/run.py --quick` (the CI smoke run) in a fresh process: a few seconds after imports."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=HANG_TIMEOUT, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "benchmarks.json").read_text())
    assert (tmp_path / "benchmarks.md").read_text().count("| covariance |") >= 4
    assert (tmp_path / "benchmarks.png").stat().st_size > 10_000

    modes = result["modes"]
    assert list(modes) == ["stock", "covariance", "lowrank64", "lowrank32", "lowrank16"]
    for kind in ("train", "decode"):
        for settings in result[kind].values():
            for figures in settings.values():
                assert set(figures) == set(modes)
                assert all(t > 0 for name in modes for t in figures[name]["times_s"]), kind
    head_dim = result["config"]["hidden"] // result["config"]["heads"]
    assert head_dim == 64  # the ratios below are r/64 of GPT-2 small's heads
    for context, caches in result["kv_cache"].items():
        stock = caches["stock"]
        assert caches["covariance"]["k_bytes"] == stock["k_bytes"] > 0, context  # (B, 1, T, d) vs (B, H, T, hd)
        assert caches["covariance"]["v_bytes"] == stock["v_bytes"], context
        for name, spec in modes.items():
            if spec["mode"] == "lowrank":
                assert caches[name]["k_bytes"] * head_dim == stock["k_bytes"] * spec["rank"], (name, context)
                assert caches[name]["v_bytes"] == stock["v_bytes"]
    # The analytic parameter formula (benchmarks/flops.py, docs/MATH.md) matches the models that were timed.
    layers, d, heads = result["config"]["layers"], result["config"]["hidden"], result["config"]["heads"]
    for name in modes:
        extra = (result["analytic"][name]["qk_params_per_layer"] - result["analytic"]["stock"]["qk_params_per_layer"])
        assert modes[name]["params_total"] - modes["stock"]["params_total"] == layers * extra, name
    assert result["analytic"]["covariance"]["qk_params_per_layer"] == heads * d * d + heads * d
    assert result["config"]["model_type"] == "gpt2" and result["config"]["impls"] == ["sdpa"]


def test_quick_benchmark_of_the_value_and_latent_modes(tmp_path, monkeypatch):
    """`run.py --quick --latent-ranks ... --merged-values`: measured cache bytes, parameter and FLOP formulas, targets."""
    run = load_script("run", monkeypatch)
    threads = torch.get_num_threads()
    try:
        result = run.main(["--quick", "--ranks", "--latent-ranks", "768", "64", "--merged-values", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # --quick runs on one thread
    modes, d = result["modes"], result["config"]["hidden"]
    assert list(modes) == ["stock", "covariance", "covariance+values", "latent768", "latent64"]
    for context, caches in result["kv_cache"].items():  # measured on the cache objects
        stock = caches["stock"]["total_bytes"]
        assert 2 * caches["covariance+values"]["total_bytes"] == stock and caches["covariance+values"]["v_bytes"] == 0
        assert caches["latent768"]["total_bytes"] * 2 == stock  # r_c = d: x itself, half of K + V
        assert caches["latent64"]["total_bytes"] * 2 * d == stock * 64
        assert [list(s) for s in caches["latent64"]["layer0_k_v_shapes"]] == [[1, 1, int(context), 64], [1, 1, int(context), 0]]
    layers = result["config"]["layers"]
    for r in (768, 64):  # queries d² + d, W_c d·r, k_up and v_up 2·r·d + d, against stock's q, k, v 3d² + 3d
        assert modes[f"latent{r}"]["params_total"] - modes["stock"]["params_total"] == layers * (3 * d * r - 2 * d * d - d)
    decode = result["analytic"]["latent64"]["decode"]  # the absorbed order: r_c-dim scores for every head
    assert all(v["attention"] < result["analytic"]["stock"]["decode"][c]["attention"] for c, v in decode.items())
    text = (tmp_path / "benchmarks.md").read_text()
    assert "covariance+values: KV cache bytes exactly 1/2 of stock | yes" in text
    assert "latent r_c=64: KV cache exactly r_c/(2d) of stock | yes" in text and "latent r_c=768: decode within 1.3 x" in text


@pytest.mark.parametrize("model_type,impl,family", [("opt", "sdpa", "OPT"), ("bloom", "eager", "BLOOM")])
def test_quick_benchmark_of_another_family(model_type, impl, family, tmp_path, monkeypatch):
    """`run.py --quick --model_type X` in this process (imports done): a random stock model of the family."""
    run = load_script("run", monkeypatch)
    threads = torch.get_num_threads()
    try:
        result = run.main(["--quick", "--model_type", model_type, "--ranks", "64", "16", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # --quick runs on one thread
    saved = json.loads((tmp_path / "benchmarks.json").read_text())
    assert saved["config"]["model_type"] == model_type and saved["config"]["impls"] == [impl]  # BLOOM: eager only
    assert f"Model: {family} (`{model_type}`), GPT-2-small-shaped" in (tmp_path / "benchmarks.md").read_text()
    modes = saved["modes"]
    assert list(modes) == ["stock", "covariance", "lowrank64", "lowrank16"]
    assert list(saved["train"]) == list(saved["decode"]) == [impl]
    for kind in ("train", "decode"):
        for figures in saved[kind][impl].values():
            assert all(t > 0 for name in modes for t in figures[name]["times_s"]), kind
    for context, caches in saved["kv_cache"].items():  # the family's own cache: stock (B, H, T, hd), 12 heads of 64
        assert caches["stock"]["layer0_k_v_shapes"][0] == [1, 12, int(context), 64]
        assert caches["covariance"]["k_bytes"] == caches["stock"]["k_bytes"] > 0
        assert caches["lowrank16"]["k_bytes"] * 4 == caches["stock"]["k_bytes"]
    analytic = saved["analytic"]  # the family's q/k parameters are those flops.py counts (weights and biases)
    for name in modes:
        extra = analytic[name]["qk_params_per_layer"] - analytic["stock"]["qk_params_per_layer"]
        assert modes[name]["params_total"] - modes["stock"]["params_total"] == saved["config"]["layers"] * extra, name
    assert result["config"] == saved["config"]


def load_script(name: str, monkeypatch):
    """benchmarks/<name>.py as a module under a private name (its sibling imports, e.g. flops, resolve)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--device", "tpu"], "allowed are cpu, cuda and cuda:N"),
        (["--ranks", "0", "16"], "--ranks [0, 16]: every value must be a positive integer"),
        (["--hidden", "770"], "--hidden 770 is not divisible by --heads 12"),
        (["--ranks", "800"], "a rank is at most the hidden size (768)"),
        (["--latent-ranks", "0"], "--latent-ranks [0]: every value must be a positive integer"),
        (["--device", "cuda:1"], "sees 0 CUDA GPU(s)"),  # torch.cuda.is_available() is patched to False below
        (["--model_type", "bloom", "--impls", "sdpa", "eager"],
         "--impls sdpa eager: stock bloom runs only eager attention in transformers"),
        (["--model_type", "bert"], "argument --model_type: invalid choice: 'bert'"),
    ],
)
def test_bad_arguments_fail_before_any_work(argv, message, capsys, monkeypatch):
    """Argument errors come from parse_args (argparse's exit 2), before a model is built or a file written."""
    run = load_script("run", monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine, also where a GPU is
    with pytest.raises(SystemExit) as exited:
        run.parse_args(["--quick", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_profile_decode_prints_times_and_operators(capsys, monkeypatch):
    profile_decode = load_script("profile_decode", monkeypatch)
    profile_decode.main(["--context", "16", "--steps", "2", "--repeats", "2", "--rank", "16"])
    out = capsys.readouterr().out
    assert "stock" in out and "lowrank16" in out and "x stock" in out
    assert out.count("operators by self CPU time") == 2  # one operator table per model
    with pytest.raises(SystemExit):
        profile_decode.main(["--mode", "covariance", "--rank", "16"])
    assert "which has no rank" in capsys.readouterr().err


def test_profile_decode_of_bloom_uses_eager(capsys, monkeypatch):
    profile_decode = load_script("profile_decode", monkeypatch)
    profile_decode.main(["--model_type", "bloom", "--context", "16", "--steps", "2", "--repeats", "2", "--rank", "16"])
    out = capsys.readouterr().out
    assert out.startswith("eager, context 16: stock") and "lowrank16" in out
    with pytest.raises(SystemExit):
        profile_decode.main(["--model_type", "bloom", "--attn_implementation", "sdpa"])
    assert "stock bloom runs only eager attention; pass --attn_implementation eager" in capsys.readouterr().err


# torch.compile. The backend is "aot_eager": dynamo captures the graph (fullgraph=True fails on any graph break)
# and AOTAutograd traces forward and backward into aten graphs, which is where graph breaks and tracing errors
# show up. Inductor then generates and compiles C++ for each graph; test_inductor_whole_model runs it on tiny
# whole models, forward only (~30 s cold on a 2-core CPU; training-step speed and agreement at T = 512 are reported
# by `benchmarks/run.py --compile`). Tolerance 1e-5: the compiled graph runs the same fp32 aten ops, so any
# difference is round-off from a reordered reduction (scores here are O(1-10), outputs O(1): ~1e-7), while a
# wrong mask, scaling or head layout moves outputs by > 1e-2.
COMPILE_TOL = 1e-5
CASES = [("stock", None, {}), ("covariance", None, {}), ("lowrank", HEAD_DIM, {}), ("lowrank", 3, {}),
         ("covariance", None, {"values": "merged"}), ("lowrank", 3, {"value_rank": 5}), ("latent", 12, {}),
         ("latent", HIDDEN, {})]
CASE_IDS = ["stock", "covariance", "lowrank_r=hd", "lowrank_r=3", "covariance+merged_values", "lowrank_r=3+value_rank=5",
            "latent_r=12", "latent_r=d"]


@pytest.mark.parametrize("mode,rank,extra", CASES, ids=CASE_IDS)
def test_compiled_attention_is_one_graph_and_matches_eager(mode, rank, extra):
    torch._dynamo.reset()
    model = make_gpt2(attn_implementation="sdpa", n_positions=320)
    if mode != "stock":
        patch_model(model, mode, rank=rank, **extra)
    attn = model.transformer.h[0].attn.train()
    compiled = torch.compile(copy.deepcopy(attn), fullgraph=True, backend="aot_eager")
    # T = 300 > 64: the covariance sdpa path multiplies causal blocks of 64 queries (recomputed in backward).
    hidden = torch.randn(2, 300, HIDDEN)
    for module in (attn, compiled):
        module.zero_grad(set_to_none=True)
    x_eager, x_compiled = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    expected = attn(x_eager)[0]
    got = compiled(x_compiled)[0]
    assert max_diff(got, expected) < COMPILE_TOL
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    assert max_diff(x_compiled.grad, x_eager.grad) < COMPILE_TOL
    for (name, p_eager), p_compiled in zip(attn.named_parameters(), compiled.parameters()):
        assert max_diff(p_compiled.grad, p_eager.grad) < COMPILE_TOL, name


def test_patched_model_has_no_graph_breaks_where_stock_has_none():
    """torch._dynamo.explain of whole models with a padding mask (sdpa; eager for covariance's masked path)."""
    ids = torch.randint(1, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the masked paths
    counts = {}
    for (mode, rank, extra), impl in [*((case, "sdpa") for case in CASES), (("covariance", None, {}), "eager")]:
        model = make_gpt2(attn_implementation=impl)
        if mode != "stock":
            patch_model(model, mode, rank=rank, **extra)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(ids, attention_mask=mask)
        counts[mode, rank, str(extra), impl] = (explained.graph_count, explained.graph_break_count)
    assert counts[("stock", None, "{}", "sdpa")] == (1, 0)
    assert all(c == (1, 0) for c in counts.values()), counts


@pytest.mark.parametrize("mode,rank,extra", CASES[1:], ids=CASE_IDS[1:])
def test_inductor_whole_model(mode, rank, extra):
    torch._dynamo.reset()
    model = patch_model(make_gpt2(attn_implementation="sdpa"), mode, rank=rank, **extra)
    ids = torch.randint(1, 100, (2, 12))
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True)(ids).logits
        expected = model(ids).logits
    assert max_diff(got, expected) < COMPILE_TOL


@pytest.mark.parametrize("patch", [None, dict(mode="covariance"), dict(mode="covariance", values="merged"),
                                   dict(mode="lowrank", rank=3), dict(mode="latent", rank=8)])
def test_memory_table_counts_what_patch_model_builds(patch, monkeypatch):
    """benchmarks/memory.py counts meta-device models; they must have the parameters of really patched ones."""
    memory = load_script("memory", monkeypatch)
    model = make_gpt2()
    if patch:
        patch_model(model, **patch)
    expected = sum(p.numel() for p in model.parameters())
    c = model.config
    assert memory.count(c.n_embd, c.n_layer, c.n_head, patch, vocab=c.vocab_size, positions=c.n_positions) == expected


def test_fused_projection_benchmark_runs(monkeypatch, capsys):
    """benchmarks/fused_projections.py at a tiny width: the fused and separate GEMMs agree and both are timed."""
    rows = load_script("fused_projections", monkeypatch).main(["--hidden", "32", "--repeats", "2", "--iterations", "4"])
    assert [(r["batch"], r["tokens"]) for r in rows] == [(1, 1), (8, 1), (1, 256)]
    assert all(r["separate_us"] > 0 and r["fused_us"] > 0 for r in rows)
    assert all(r["max_abs_diff"] < 1e-5 for r in rows)  # the same projections (fp32 round-off in the GEMM blocking)
    assert "| 1 × 1 |" in capsys.readouterr().out


def test_gpu_benchmark_dry_run_on_cpu(tmp_path, monkeypatch):
    """The prepared GPU benchmark (benchmarks/gpu.sh -> gpu.py) end to end on tiny sizes, so that it cannot rot
    between GPU sessions: every mode decodes at its best (static cache + compiled forward, Dynamo's eager backend
    here) and stock also as users run it; training ratios; gpu.json / gpu.md / gpu.png."""
    gpu = load_script("gpu", monkeypatch)
    result = gpu.main(["--device", "cpu", "--dry_run", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert list(saved["decode"]) == ["stock", "covariance", "covariance+values", "lowrank8", "latent16"]
    assert set(saved["decode"]["stock"]) == {"static", "dynamic"}
    assert set(saved["decode"]["latent16"]) == {"static", "int8", "int4"}  # and the latent in a quantized cache
    for name, kinds in saved["decode"].items():
        for row in (row for by_shape in kinds.values() for row in by_shape.values()):
            assert row["tokens_per_s"] > 0 and row["achieved_gbs"] > 0 and row["warmup_s"] > 0
    # the cache bytes each step reads follow the layouts: the latent at r_c = 16 reads 16 numbers per token and layer,
    # stock 2·d = 128
    stock, latent = (saved["decode"][m]["static"]["b2-32"]["cache_bytes_read"] for m in ("stock", "latent16"))
    assert stock == 2 * 32 * 2 * 128 * 2 and latent == 2 * 32 * 2 * 16 * 2  # batch, context, layers, numbers, bf16
    # int8: one byte per number, plus a bf16 scale and minimum per token and layer; int4: half a byte per number
    int8, int4 = (saved["decode"]["latent16"][kind]["b2-32"]["cache_bytes_read"] for kind in ("int8", "int4"))
    assert int8 == 2 * 32 * 2 * (16 + 4) and int4 == 2 * 32 * 2 * (8 + 4)
    # training: every mode, and the covariance modes also on the blocked kernel the CPU uses (the GPU comparison)
    assert set(saved["train"]) == set(saved["decode"]) | {"covariance (shared_blocks)", "covariance+values (shared_blocks)"}
    assert saved["train"]["stock"]["time_ratio"] == 1.0
    # decode kernels forced one by one where a shared key lets them apply; one that cannot compute a mode says so
    assert set(saved["kernels"]) == {"covariance", "covariance+values", "latent16"}
    assert saved["kernels"]["latent16"]["sdpa_folded"]["b2-32"]["tokens_per_s"] > 0
    assert "error" in saved["kernels"]["covariance"]["sdpa_folded"]  # per-head values: not multi-query
    text = (tmp_path / "gpu.md").read_text()
    assert "| latent16 (static, compiled) |" in text and "## Training step at T = 32" in text
    assert "| latent16 | int4 |" in text
    assert (tmp_path / "gpu.png").stat().st_size > 0 and result["machine"]["torch"] == torch.__version__
    (tmp_path / "gpu.md").unlink()
    gpu.main(["--replot", str(tmp_path / "gpu.json")])  # tables and plot again from the JSON alone
    assert (tmp_path / "gpu.md").read_text() == text
    with pytest.raises(SystemExit):
        gpu.main(["--modes", "latent256"])  # no stock to compare with (and, here, no CUDA)


def test_quantized_decode_benchmark_runs_and_measures_bytes(tmp_path, monkeypatch):
    """benchmarks/quantized_decode.py at tiny sizes (more repeats than its documented dry run, so every token it decodes
    must fit the model's positions): every cache timed, bytes per token measured on the caches as held."""
    bench = load_script("quantized_decode", monkeypatch)
    result = bench.main(["--batch", "2", "--context", "8", "--steps", "2", "--repeats", "3", "--rank", "64",
                         "--output_dir", str(tmp_path)])
    rows = result["rows"]
    assert len(rows) == 6 and all(len(r["times_ms"]) == 3 and r["ms_per_step"] > 0 for r in rows.values())
    assert rows["latent, fp32 cache"]["vs_latent_fp32"] == 1.0
    # per token of one sequence and layer (2 layers): stock K + V of 768 fp32 numbers; the latent 64 fp32 numbers; int8 64 bytes and
    # int4 32 bytes of codes plus an fp32 scale and minimum
    assert rows["stock, fp32 cache"]["cache_bytes_per_token"] == 2 * 2 * 768 * 4
    assert rows["latent, fp32 cache"]["cache_bytes_per_token"] == 2 * 64 * 4
    for name, codes in (("int8", 64), ("int4", 32)):
        for reader in ("block-wise", "whole dequantize"):
            assert rows[f"latent, {name} cache ({reader})"]["cache_bytes_per_token"] == 2 * (codes + 8)
    assert "| latent, int4 cache (block-wise) |" in (tmp_path / "quantized_decode.md").read_text()


def test_rotary_decode_benchmark_dry_run(tmp_path, monkeypatch):
    """benchmarks/rotary_decode.py on a tiny random Llama: every row timed, bytes per token measured on the filled
    caches (stock: K and V of 2 KV heads of 16; the partial latent: r_c + 2 heads x 2·4 rotary numbers; the exact-RoPE
    latent: r_c + 1 position; 2 layers, fp32)."""
    bench = load_script("rotary_decode", monkeypatch)
    bench.main(["--model_name_or_path", "tiny", "--batch", "2", "--context", "16", "--steps", "2", "--repeats", "2",
                "--output_dir", str(tmp_path)])
    record = json.loads((tmp_path / "rotary_decode.json").read_text())
    rows = {r["configuration"]: r for r in record["results"]}
    assert len(rows) == 13 and all(r["ms_per_step"] > 0 for r in rows.values())
    for r_c in (32, 20, 8):  # 1/2, 5/16 and 1/8 of 2·G·hd = 64
        for kernel in ("exact_rebuild", "exact_rebuild_sdpa"):
            assert rows[f"exact-RoPE r_c={r_c} (-{ {32: '50', 20: '68.75', 8: '87.5'}[r_c] }%), {kernel}"][
                "cache_bytes_per_token"] == 2 * (r_c + 1) * 4
    assert rows["stock"]["cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    for r_c in (64, 32, 16):
        for kernel in ("rotary_absorbed", "rotary_absorbed_sdpa"):
            name = next(n for n in rows if n.startswith(f"latent r_c={r_c} ") and n.endswith(kernel))
            assert rows[name]["cache_bytes_per_token"] == 2 * (r_c + 2 * 8) * 4
