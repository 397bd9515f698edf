"""Checks for the shipped stand-in model ``examples/shakespeare-gpt2`` (CPU, offline, seconds).

The model is a small GPT-2 pretrained by ``examples/pretrain.py`` on the ``pretrain`` split of
``examples/data/shakespeare`` (comedies + histories); here it is evaluated on the held-out
``test`` split (two tragedies, a shifted domain).
"""
import math
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "examples", "shakespeare-gpt2")
DATA_DIR = os.path.join(ROOT, "examples", "data", "shakespeare")
BLOCK = 256
N_BLOCKS = 80  # 80 x 256 = 20,480 tokens of the test split


def _read_lines(split):
    # Same convention as training: datasets "text" loader with keep_linebreaks=True.
    with open(os.path.join(DATA_DIR, f"{split}.txt"), encoding="utf-8") as f:
        return f.read().splitlines(keepends=True)


def _tokenize(tokenizer, lines):
    out = []
    for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        out.extend(ids)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    m = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    m.eval()
    return m


def test_files_and_config():
    files = set(os.listdir(MODEL_DIR))
    assert "model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert os.path.getsize(os.path.join(MODEL_DIR, "model.safetensors")) <= 25 * 2**20
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "training_log.json", "README.md"):
        assert f in files, f
    cfg = transformers.AutoConfig.from_pretrained(MODEL_DIR)
    assert cfg.model_type == "gpt2"
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, cfg.vocab_size) == (4, 256, 4, 256, 8192)
    assert cfg.n_embd // cfg.n_head == 64


def test_tokenizer_round_trip(tokenizer):
    assert len(tokenizer) == 8192
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.unk_token == "<|endoftext|>"
    text = "HAMLET.\nTo be, or not to be, that is the question:\n  Whether 'tis nobler in the mind\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 5 < len(ids) < len(text)  # a real (non-empty) BPE: fewer tokens than characters
    assert tokenizer.decode(ids) == text
    odd = "caf\u00e9 \u2014 \U0001F600 {x}"  # byte-level: anything round-trips
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False)["input_ids"]) == odd


def test_test_split_perplexity_beats_unigram(model, tokenizer):
    ids = _tokenize(tokenizer, _read_lines("test"))
    assert len(ids) >= N_BLOCKS * BLOCK
    blocks = torch.tensor(ids[: N_BLOCKS * BLOCK]).view(N_BLOCKS, BLOCK)

    # Model: non-overlapping 256-token blocks, token-weighted mean NLL over predicted tokens.
    nll, n = 0.0, 0
    with torch.no_grad():
        for chunk in blocks.split(16):
            loss = model(input_ids=chunk, labels=chunk).loss
            k = chunk[:, 1:].numel()
            nll += loss.item() * k
            n += k
    model_ppl = math.exp(nll / n)

    # Unigram baseline on the same predicted tokens: unigram probabilities estimated from the
    # token counts of the *pretrain* split, with add-one (Laplace) smoothing over the vocabulary.
    counts = torch.bincount(torch.tensor(_tokenize(tokenizer, _read_lines("pretrain"))),
                            minlength=len(tokenizer)).double()
    logp = torch.log((counts + 1) / (counts.sum() + len(tokenizer)))
    targets = blocks[:, 1:].reshape(-1)
    unigram_ppl = math.exp(-logp[targets].mean().item())

    print(f"test split ({n} tokens): model ppl {model_ppl:.2f}, unigram ppl {unigram_ppl:.2f}")
    assert model_ppl < 0.5 * unigram_ppl, (model_ppl, unigram_ppl)


def test_generation_is_mostly_text(model, tokenizer):
    torch.manual_seed(0)
    enc = tokenizer("KING.\n", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=60, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text) > 40, text
    good = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text)
    assert good / len(text) > 0.75, text
    assert len(re.findall(r"[A-Za-z]{3,}", text)) >= 5, text
