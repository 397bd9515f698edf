"""`hf-merged-attn convert` / `inspect` end to end on tiny random models of every causal family (GPT-2, OPT, BLOOM,
Llama, Qwen2, Mistral), the encoders refused, bad arguments refused before any work, the KV budget's arithmetic.

The tiny models use the stand-in's tokenizer (examples/shakespeare-gpt2, 8192 tokens) and a few hundred characters of
the shipped corpus; recovery runs a few steps. One conversion per family is shared by the tests (module fixture).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import transformers
from conftest import BLOCK_PACKAGE
from families import FAMILIES
from test_rotary import FAMILIES as ROTARY
from transformers import AutoModelForCausalLM

from hf_merged_attn import cli
from hf_merged_attn.cli import latent_rank, lowrank_rank, main, rotary_latent_rank

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = ROOT / "examples" / "shakespeare-gpt2"
CORPUS = ROOT / "examples" / "data" / "shakespeare"
TOKENIZER_VOCAB = 8192
FAST = ["--block_size", "32", "--calibration_blocks", "4", "--batch_size", "2", "--eval_tokens", "200",
        "--recover_steps", "2", "--decode_tokens", "2"]

# (name, family row, conversion arguments, the KV numbers per token and layer expected: patched, stock)
CASES = [
    ("gpt2", FAMILIES[0], ["--mode", "latent", "--kv_budget", "0.25", "--recover", "layerwise",
                           "--quantized_cache_bits", "8"], (16, 64)),
    ("opt", FAMILIES[1], ["--mode", "lowrank", "--rank", "2", "--recover", "finetune"], (4 * 2 + 32, 64)),
    ("bloom", FAMILIES[2], ["--mode", "covariance", "--values", "merged", "--recover", "layerwise"], (32, 64)),
    # G = 2 KV heads of hd = 8; kv_budget 0.5, the exact-RoPE latent (the rotary default): r_c = 0.5·2·G·hd = 16,
    # plus each token's position (1 number in fp32)
    ("llama", ROTARY[0], ["--mode", "latent", "--kv_budget", "0.5", "--recover", "layerwise"], (16 + 1, 32)),
    ("qwen2", ROTARY[2], ["--mode", "latent", "--kv_budget", "0.75", "--rope_pairs", "2", "--rope_selection", "rorope",
                          "--recover", "finetune"], (12, 16)),
    ("mistral", ROTARY[3], ["--mode", "latent", "--rank", "16", "--rope_pairs", "2", "--rope_selection", "high",
                            "--init", "whitened", "--recover", "none"], (16 + 8, 32)),
]


def tiny_model(row, folder: Path) -> Path:
    """A tiny stock model of `row` (its strong random q/k/v weights) with the stand-in's tokenizer, saved to `folder`."""
    config = copy.deepcopy(row.config)
    config.vocab_size = TOKENIZER_VOCAB
    model = dataclasses.replace(row, config=config).make()
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STAND_IN / name, folder / name)
    return folder


def text_files(folder: Path) -> tuple[Path, Path]:
    folder.mkdir()
    calibration, held_out = folder / "calibration.txt", folder / "held_out.txt"
    calibration.write_text((CORPUS / "train.txt").read_text(encoding="utf-8")[:4000], encoding="utf-8")
    held_out.write_text((CORPUS / "validation.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return calibration, held_out


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{name: (model folder, output folder, printed stdout)} for every case, converted once."""
    root = tmp_path_factory.mktemp("convert")
    calibration, held_out = text_files(root / "text")
    done = {}
    for name, row, extra, _ in CASES:
        source, out = tiny_model(row, root / f"{name}-stock"), root / f"{name}-converted"
        argv = ["convert", "--model_name_or_path", str(source), "--output_dir", str(out), "--calibration_file",
                str(calibration), "--eval_file", str(held_out), *FAST, *extra]
        if name == "mistral":  # the same arguments from a JSON file, as run_clm takes them (typed values)
            config = root / "mistral.json"
            settings = dict(zip([a[2:] for a in argv[1::2]], argv[2::2]))
            settings.update({k: int(settings[k]) for k in ("block_size", "calibration_blocks", "batch_size",
                                                           "eval_tokens", "recover_steps", "decode_tokens",
                                                           "rank", "rope_pairs")})
            config.write_text(json.dumps(settings))
            argv = ["convert", str(config)]
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            code = main(argv)
        assert code == 0, f"{name}: convert failed:\n{buffer.getvalue()}"
        done[name] = (source, out, buffer.getvalue())
    return done


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_convert_writes_a_checkpoint_whose_card_holds_the_printed_figures(converted, case):
    name, _, _, (numbers, stock_numbers) = case
    source, out, printed = converted[name]
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "README.md" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]  # only safetensors
    assert any(f.startswith("modeling_merged_") for f in files)  # the remote code
    texts = {f: (out / f).read_text(encoding="utf-8") for f in files if f.endswith((".json", ".md"))}
    assert not [f for f, text in texts.items() if str(source.parent) in text]  # no local path of the user's
    # the patch line states the cache the patched modules report (cache_numbers_per_token), for 2 layers
    patched = re.search(r"KV numbers per token ([\d,]+) of stock's ([\d,]+)", printed)
    assert patched, printed
    assert (int(patched[1].replace(",", "")), int(patched[2].replace(",", ""))) == (2 * numbers, 2 * stock_numbers)
    # every figure printed by the evaluation is in the card's results table, as printed
    figures = dict(re.findall(r"^  (.+?): (.+)$", printed, flags=re.MULTILINE))
    assert {"perplexity, stock", "perplexity, converted", "KL to stock (nats/token)", "recovery"} <= set(figures)
    card = (out / "README.md").read_text(encoding="utf-8")
    table = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", card, flags=re.MULTILINE))
    assert {k: table.get(k) for k in figures} == figures
    # the printed stock perplexity is the stock model's, recomputed here on the same held-out tokens
    stock = AutoModelForCausalLM.from_pretrained(source).eval()
    from hf_merged_attn.evaluation import evaluate_perplexity

    held = cli._tokens(transformers.AutoTokenizer.from_pretrained(source),
                       (out.parent / "text" / "held_out.txt").read_text(encoding="utf-8"))[:200]
    assert f"{evaluate_perplexity(stock, held, max_length=32, batch_size=2)['perplexity']:.3f}" == figures["perplexity, stock"]
    assert "reloaded, max |Δlogits| 0" in printed


def test_saved_folders_load_with_and_without_the_package(converted):
    ids = torch.randint(1, TOKENIZER_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = {}
    for name, (source, out, _) in converted.items():
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(model).__name__.startswith("Merged")
        stock = AutoModelForCausalLM.from_pretrained(source).eval()
        with torch.no_grad():
            expected[name] = model(ids).logits
            if name != "bloom":  # bloom's covariance + merged values is exact: the others changed the model
                assert (expected[name] - stock(ids).logits).abs().max() > 1e-4
    script = BLOCK_PACKAGE + f"""
import torch
from transformers import AutoModelForCausalLM
ids = torch.tensor({ids.tolist()})
out = {{}}
for name, folder in {json.dumps({n: str(o) for n, (_, o, _) in converted.items()})}.items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        out[name] = model(ids).logits.tolist()
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    for name, logits in expected.items():
        assert (torch.tensor(remote[name]) - logits).abs().max() < 1e-5, name


def test_inspect_says_what_each_checkpoint_is(converted, capsys):
    info = cli.inspect(str(converted["gpt2"][1]))
    assert info["family"] == "GPT-2" and [r["rank"] for r in info["layers"]] == [16, 16]
    assert not any(r["exact_at_patch"] for r in info["layers"])
    assert info["quantized_cache_default"]["nbits"] == 8
    assert info["kv_cache_bytes_per_token"] == 2 * 16 * 4  # two layers of a 16-number latent in fp32
    bloom = cli.inspect(str(converted["bloom"][1]))
    assert all(r["exact_at_patch"] and r["mode"] == "covariance" for r in bloom["layers"])
    assert bloom["quantized_cache_default"] is None
    llama = cli.inspect(str(converted["llama"][1]))
    assert [(r["rank"], r["rope"], r["rope_pairs"]) for r in llama["layers"]] == [(16, "exact", None)] * 2
    mistral = cli.inspect(str(converted["mistral"][1]))
    assert [(r["rank"], r["rope"], r["rope_pairs"]) for r in mistral["layers"]] == [(16, "partial", 2)] * 2
    stock = cli.inspect(str(converted["llama"][0]))
    assert stock == {"patched": False, "model_type": "llama"}
    printed = capsys.readouterr().out
    assert "exact-RoPE (every pair rotated)" in printed and "rope_pairs 2" in printed
    assert "approximate at patch" in printed and "exact at patch" in printed
    assert "hf-merged-attn convert --model_name_or_path" in printed  # the stock one: how to convert it


# ---------------------------------------------------------------------------------------------------------------
# refusals before any work
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    calibration, held_out = text_files(root / "text")
    return tiny_model(FAMILIES[0], root / "gpt2"), calibration, held_out, root


BAD = [
    (["--kv_budget", "0.25", "--rank", "8"], "pass one of them"),
    (["--kv_budget", "0.75"], "0.5 of stock is already exact"),
    (["--kv_budget", "1.5"], "in (0, 1]"),
    (["--mode", "covariance", "--kv_budget", "0.5"], "has no rank"),
    (["--mode", "lowrank"], "needs --rank or --kv_budget"),
    (["--rank", "40"], "exceeds the hidden size 32"),
    (["--rank", "abc"], "--rank 'abc'"),
    (["--rank", "8", "--rope_pairs", "2"], "no rotary positions"),
    (["--rank", "8", "--layers", "0,7"], "out of range"),
    (["--rank", "7", "--quantized_cache_bits", "4"], "odd"),
    (["--mode", "lowrank", "--rank", "4", "--quantized_cache_bits", "8"], "one tensor per layer"),
    (["--rank", "8", "--push_to_hub"], "--hub_model_id namespace/name"),
    (["--rank", "8", "--hub_model_id", "you/model"], "without --push_to_hub"),
    (["--rank", "8", "--calibration_file", "missing.txt"], "does not exist"),
    (["--rank", "8", "--dataset_name", "wikitext"], "one source of text"),
    (["--rank", "8", "--recover_steps", "0"], "positive integer"),
    (["--rank", "8", "--model_name_or_path", "./no-such-model"], "no such folder"),  # a local path: no Hub retries
    (["--rank", "8", "--init", "whitened", "--mode", "covariance"], "covariance"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_arguments_are_refused_before_any_work(gpt2_folder, extra, message, capsys, monkeypatch):
    source, calibration, held_out, root = gpt2_folder

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    out = root / "out"
    argv = ["convert", "--model_name_or_path", str(source), "--output_dir", str(out), "--mode", "latent",
            "--calibration_file", str(calibration), "--eval_file", str(held_out), *FAST, *extra]
    code, stdout, stderr = run(argv, capsys)
    assert code == 1 and message in stderr, stderr
    assert not out.exists() and "[1/6]" not in stdout


def test_encoders_are_refused_naming_the_causal_families(tmp_path, capsys):
    bert = FAMILIES[3]
    assert bert.model_type == "bert"
    folder = tiny_model(bert, tmp_path / "bert")
    code, _, stderr = run(["convert", "--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out"),
                           "--rank", "8"], capsys)
    assert code == 1 and "is an encoder" in stderr
    assert all(name in stderr for name in ("GPT-2", "OPT", "BLOOM", "Llama", "Qwen2", "Mistral"))
    assert not (tmp_path / "out").exists()


def test_unsupported_and_already_converted_models_are_refused(tmp_path, capsys, converted):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    folder = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                     intermediate_size=32, vocab_size=TOKENIZER_VOCAB)).save_pretrained(folder)
    code, _, stderr = run(["convert", "--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "o"),
                           "--rank", "8"], capsys)
    assert code == 1 and "rotary" in stderr and "supported: GPT-2" in stderr
    code, _, stderr = run(["convert", "--model_name_or_path", str(converted["gpt2"][1]), "--output_dir",
                           str(tmp_path / "o"), "--rank", "8"], capsys)
    assert code == 1 and "already patched" in stderr
    assert not (tmp_path / "o").exists()


def test_an_existing_output_dir_is_refused(gpt2_folder, capsys):
    source, *_, root = gpt2_folder
    taken = root / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    code, _, stderr = run(["convert", "--model_name_or_path", str(source), "--output_dir", str(taken), "--rank", "8"],
                          capsys)
    assert code == 1 and "not an empty folder" in stderr
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


def test_a_yaml_config_file_is_read(gpt2_folder, tmp_path, capsys):
    source, *_ = gpt2_folder
    config = tmp_path / "convert.yaml"
    config.write_text(f"model_name_or_path: {source}\noutput_dir: {tmp_path / 'out'}\nmode: latent\nkv_budget: 0.9\n")
    code, _, stderr = run(["convert", str(config)], capsys)
    assert code == 1 and "--kv_budget 0.9" in stderr  # the file's settings were the ones checked


# ---------------------------------------------------------------------------------------------------------------
# the budget's arithmetic
# ---------------------------------------------------------------------------------------------------------------


def test_budget_resolution():
    # SmolLM2-135M: G = 3 KV heads of 64; MHA2MLA's 0.3125 with r = hd/16 = 4 pairs: 120 = r_c + 3·8 numbers
    assert rotary_latent_rank(0.3125, 3, 64, 4) == 96
    assert rotary_latent_rank(1.0, 3, 64, 32) == 192  # every pair, the latent holds the values: exact
    assert latent_rank(0.25, 768) == 384 and latent_rank(0.5, 768) == 768
    assert lowrank_rank(0.75, 768, 12, 768) == 32  # 12·32 keys + 768 stock values = 1152 = 0.75 · 1536
    assert lowrank_rank(1.0, 768, 12, 768) == 64  # capped at the head size
    with pytest.raises(ValueError, match="rotary pairs of 3 KV heads alone take 24"):
        rotary_latent_rank(0.0625, 3, 64, 4)
    assert rotary_latent_rank(1.0, 3, 64, 4) == 360  # the NoPE keys and the values whole
    with pytest.raises(ValueError, match="can hold"):
        rotary_latent_rank(1.2, 3, 64, 4)
    with pytest.raises(ValueError, match="0.5 of stock is already exact"):
        latent_rank(0.6, 768)
    with pytest.raises(ValueError, match="the values alone take 768"):
        lowrank_rank(0.5, 768, 12, 768)


@pytest.mark.parametrize("extra, message", [
    (["--mode", "lowrank", "--rank", "4"], "only --mode latent"),
    # partial route, every pair kept: G·(2·hd − 2r) = 2·(16 − 8)
    (["--rope", "partial", "--rank", "20"], "a latent holds at most 16"),
    (["--rank", "40"], "exceeds the hidden size 32"),  # exact route: 2·G·hd = 32 = d
    (["--rank", "8", "--rope_pairs", "5"], "has 4 pairs"),
    (["--kv_budget", "0.5", "--rope_pairs", "5"], "has 4 pairs"),
    (["--rope", "partial", "--kv_budget", "0.1"], "alone take 4"),  # 0.1 · 32 = 3; one kept pair of 2 KV heads: 4
    (["--rope", "exact", "--rope_pairs", "2", "--rank", "8"], "--rope exact keeps every frequency pair rotated"),
    (["--rank", "0.5"], "spectral-energy target) is not available on rotary models"),  # #36: before loading
    (["--rank", "8", "--block_size", "1000"], "exceeds the model's 64 positions"),  # #36: before loading
], ids=["lowrank", "rank", "exact-rank", "pairs", "budget-pairs", "budget", "exact-pairs", "energy", "block"])
def test_rotary_arguments_are_refused_before_any_work(tmp_path, extra, message, capsys, monkeypatch):
    folder = tiny_model(ROTARY[0], tmp_path / "llama")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    code, _, stderr = run(["convert", "--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out"),
                           *extra], capsys)
    assert code == 1 and message in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_a_dataset_and_a_push(gpt2_folder, tmp_path, capsys, monkeypatch):
    """--dataset_name (a local folder with train / validation files, as `datasets` reads one) and --push_to_hub: the
    upload gets the card's figures (the Hub itself is not reached here)."""
    from hf_merged_attn.merged_models import MergedModelMixin

    source, calibration, held_out, _ = gpt2_folder
    data = tmp_path / "my_dataset"
    data.mkdir()
    shutil.copy(calibration, data / "train.txt")
    shutil.copy(held_out, data / "validation.txt")
    pushed = {}
    monkeypatch.setattr(MergedModelMixin, "push_to_hub",
                        lambda self, repo_id, **kw: pushed.update(model=(repo_id, kw)))
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "push_to_hub",
                        lambda self, repo_id, **kw: pushed.update(tokenizer=(repo_id, kw)))
    out = tmp_path / "out"
    code, printed, stderr = run(["convert", "--model_name_or_path", str(source), "--output_dir", str(out),
                                 "--dataset_name", str(data), "--mode", "lowrank", "--kv_budget", "0.75", *FAST,
                                 "--push_to_hub", "--hub_model_id", "you/tiny-merged", "--hub_token", "hf_x"], capsys)
    assert code == 0, stderr
    assert "from " + str(data) + " (train / validation)" in printed
    assert "kv_budget 0.75: r = 4" in printed  # (0.75·64 − 32 stock values) / 4 heads
    figures = dict(re.findall(r"^  (.+?): (.+)$", printed, flags=re.MULTILINE))
    assert pushed["model"] == ("you/tiny-merged", {"token": "hf_x", "results": figures})
    assert pushed["tokenizer"] == ("you/tiny-merged", {"token": "hf_x"})
    assert "pushed to https://huggingface.co/you/tiny-merged" in printed


def test_usage_and_unknown_commands(capsys):
    assert main([]) == 2 and "hf-merged-attn convert --model_name_or_path" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert main(["export"]) == 2 and "unknown command 'export'" in capsys.readouterr().err
    assert main(["inspect"]) == 2
