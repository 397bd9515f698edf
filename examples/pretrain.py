#!/usr/bin/env python
"""Pretrain a small GPT-2 on the Shakespeare ``pretrain`` split (CPU friendly).

This is the script that produced ``examples/shakespeare-gpt2``; its defaults are the
settings used for the shipped model, so

    python examples/pretrain.py --output_dir examples/shakespeare-gpt2
    # or: accelerate launch examples/pretrain.py --output_dir examples/shakespeare-gpt2

reproduces it (up to floating-point non-determinism across machines/thread counts).

Pipeline (modelled on transformers' ``run_clm_no_trainer.py``):

1. ``--train_file`` (default ``examples/data/shakespeare/pretrain.txt``) is read with
   ``datasets.load_dataset("text", keep_linebreaks=True)``. Its last ``--holdout_fraction``
   (2%) of lines are held out deterministically as the *pretraining* validation set.
   ``--validation_file`` (the fine-tuning ``validation`` split: two tragedies, a shifted
   domain) is evaluated for reference only.
2. Unless ``--tokenizer_name`` is given, a byte-level BPE tokenizer (vocab 8192, special
   token ``<|endoftext|>`` = bos = eos = unk, as GPT-2) is trained with ``tokenizers`` on
   the training lines of the pretrain split only, and wrapped as ``GPT2TokenizerFast``.
3. Lines are tokenized, concatenated and chunked into ``--block_size`` blocks (``.map``
   with ``batched=True``), and a ``GPT2LMHeadModel`` (4 layers, d=256, 4 heads of size 64,
   256 positions, dropout 0.1, tied embeddings) is trained with AdamW + cosine schedule.
4. The model (safetensors), tokenizer, ``generation_config.json`` and ``training_log.json``
   are written to ``--output_dir``.
"""
import argparse
import gc
import json
import math
import os
import time
from itertools import chain

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import load_dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel,
                          GPT2TokenizerFast, default_data_collator, get_scheduler)

from run_record import recorded_args  # examples/ is on sys.path when a script runs

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "shakespeare")
EOT = "<|endoftext|>"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain a small GPT-2 on Shakespeare (CPU).")
    p.add_argument("--train_file", default=os.path.join(DATA, "pretrain.txt"))
    p.add_argument("--validation_file", default=os.path.join(DATA, "validation.txt"),
                   help="reference eval set (fine-tuning validation split); '' to skip")
    p.add_argument("--holdout_fraction", type=float, default=0.02,
                   help="last fraction of train_file lines held out as pretraining validation")
    p.add_argument("--tokenizer_name", default=None,
                   help="tokenizer folder to load; if unset, train a byte-level BPE on the train lines")
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--per_device_train_batch_size", type=int, default=16)
    p.add_argument("--per_device_eval_batch_size", type=int, default=16)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--lr_scheduler_type", default="cosine")
    p.add_argument("--num_warmup_steps", type=int, default=50)
    p.add_argument("--max_train_steps", type=int, default=700)
    p.add_argument("--eval_steps", type=int, default=100)
    p.add_argument("--max_periodic_eval_blocks", type=int, default=64,
                   help="blocks of validation_file used in periodic evals (the final eval uses all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=None,
                   help="torch threads (default: number of usable CPU cores)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--sample_prompt", default="ROMEO.\n")
    return p.parse_args(argv)


def train_tokenizer(lines, vocab_size):
    """Byte-level BPE as GPT-2, wrapped as GPT2TokenizerFast (built from vocab + merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # NB: in transformers 5, GPT2TokenizerFast(vocab_file=..., merges_file=...) silently builds an
    # empty tokenizer; pass the vocab dict and merges list directly and check the round trip.
    hf_tok = GPT2TokenizerFast(vocab=model["vocab"], merges=merges, unk_token=EOT,
                               bos_token=EOT, eos_token=EOT, add_prefix_space=False)
    sample = "".join(lines[:200])
    ids = hf_tok(sample)["input_ids"]
    assert len(hf_tok) == vocab_size, len(hf_tok)
    assert hf_tok.decode(ids) == sample, "tokenizer round trip failed"
    assert ids == tok.encode(sample).ids, "wrapped tokenizer disagrees with trained one"
    return hf_tok


def main(argv=None):
    args = parse_args(argv)
    nthreads = args.num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, nthreads))
    # several processes and no accelerator: DDP over gloo on the CPU (accelerate picks MULTI_CPU only when told
    # cpu=True; otherwise each launched process would silently train alone, world size 1)
    on_cpu_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=on_cpu_ranks)
    set_seed(args.seed)
    t_start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)

    # ---- data ------------------------------------------------------------------------------
    data_files = {"train": args.train_file}
    if args.validation_file:
        data_files["validation"] = args.validation_file
    raw = load_dataset("text", data_files=data_files, keep_linebreaks=True)
    n = len(raw["train"])
    n_hold = max(1, int(round(n * args.holdout_fraction)))
    raw["heldout"] = raw["train"].select(range(n - n_hold, n))
    raw["train"] = raw["train"].select(range(n - n_hold))
    accelerator.print(f"lines: train={len(raw['train'])} heldout={n_hold}"
                      + (f" validation={len(raw['validation'])}" if args.validation_file else ""))

    # ---- tokenizer -------------------------------------------------------------------------
    if args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
    else:
        tokenizer = train_tokenizer(raw["train"]["text"], args.vocab_size)
    tokenizer.model_max_length = args.block_size

    def tokenize(batch):
        return tokenizer(batch["text"], add_special_tokens=False)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = (len(concatenated["input_ids"]) // args.block_size) * args.block_size
        result = {k: [t[i:i + args.block_size] for i in range(0, total, args.block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    with accelerator.main_process_first():
        tokenized = raw.map(tokenize, batched=True, remove_columns=["text"],
                            load_from_cache_file=False, desc="tokenize")
        # One map batch over the whole split: concatenate everything, drop only the last remainder.
        lm = tokenized.map(group_texts, batched=True, batch_size=None,
                           load_from_cache_file=False, desc=f"group into {args.block_size}-token blocks")
    ntok = {k: sum(len(x) for x in tokenized[k]["input_ids"]) for k in tokenized}
    accelerator.print("tokens: " + ", ".join(f"{k}={v}" for k, v in ntok.items())
                      + " | blocks: " + ", ".join(f"{k}={len(v)}" for k, v in lm.items()))

    train_dl = DataLoader(lm["train"], shuffle=True, collate_fn=default_data_collator,
                          batch_size=args.per_device_train_batch_size, drop_last=True)
    eval_sets = {"heldout": lm["heldout"]}
    if args.validation_file:
        eval_sets["validation"] = lm["validation"]
    eval_dls = {k: DataLoader(v, collate_fn=default_data_collator, batch_size=args.per_device_eval_batch_size)
                for k, v in eval_sets.items()}
    periodic_dls = dict(eval_dls)
    if args.validation_file and len(lm["validation"]) > args.max_periodic_eval_blocks:
        periodic_dls["validation"] = DataLoader(lm["validation"].select(range(args.max_periodic_eval_blocks)),
                                                collate_fn=default_data_collator,
                                                batch_size=args.per_device_eval_batch_size)

    # ---- model -----------------------------------------------------------------------------
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.block_size, n_embd=args.n_embd,
                        n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=args.dropout,
                        embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                        bos_token_id=eot_id, eos_token_id=eot_id, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    accelerator.print(f"model parameters: {n_params:,}")

    no_decay = ("bias", "ln_", "layernorm", "LayerNorm")
    groups = [
        {"params": [p for nm, p in model.named_parameters() if not any(nd in nm for nd in no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for nm, p in model.named_parameters() if any(nd in nm for nd in no_decay)],
         "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95))
    # a prepared scheduler steps once per process at every optimizer step (accelerate, split_batches=False): its
    # length is counted in those steps, as in run_clm_no_trainer, so every world size sees the same rate per step
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                              num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                              num_training_steps=args.max_train_steps * accelerator.num_processes)
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    eval_dls = {k: accelerator.prepare(v) for k, v in eval_dls.items()}
    periodic_dls = {k: accelerator.prepare(v) for k, v in periodic_dls.items()}

    @torch.no_grad()
    def evaluate(dl):
        model.eval()
        tot, cnt = 0.0, 0
        for batch in dl:
            loss = model(**batch).loss
            k = batch["labels"][:, 1:].numel()  # predicted tokens (token-weighted mean)
            tot += accelerator.gather_for_metrics(loss.detach() * k).sum().item()
            cnt += accelerator.gather_for_metrics(torch.tensor([k], device=loss.device)).sum().item()
        model.train()
        return tot / max(cnt, 1)

    # ---- train -----------------------------------------------------------------------------
    tokens_per_step = (args.per_device_train_batch_size * args.block_size
                       * args.gradient_accumulation_steps * accelerator.num_processes)
    log = {"args": recorded_args(args), "n_params": n_params, "tokens": ntok, "tokens_per_step": tokens_per_step,
           "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
           "world_size": accelerator.num_processes,
           "train": [], "eval": []}
    progress = tqdm(range(args.max_train_steps), disable=not accelerator.is_local_main_process,
                    mininterval=5)
    step, running, running_n = 0, 0.0, 0
    t_train = time.time()
    train_time = 0.0  # excludes evaluation
    model.train()
    while step < args.max_train_steps:
        for batch in train_dl:
            t0 = time.time()
            lr = optimizer.param_groups[0]["lr"]  # the learning rate of this optimizer step
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            train_time += time.time() - t0
            running += loss.item()
            running_n += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % 10 == 0 or step == args.max_train_steps:
                entry = {"step": step, "tokens_seen": step * tokens_per_step, "loss": running / running_n,
                         "lr": lr, "wall_s": round(time.time() - t_start, 1),
                         "train_tokens_per_s": round(step * tokens_per_step / train_time, 1)}
                log["train"].append(entry)
                progress.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=entry["train_tokens_per_s"])
                running, running_n = 0.0, 0
            if step % args.eval_steps == 0 and step < args.max_train_steps:
                ev = {"step": step, "tokens_seen": step * tokens_per_step, "wall_s": round(time.time() - t_start, 1)}
                for k, dl in periodic_dls.items():
                    ev[f"{k}_loss"] = evaluate(dl)
                log["eval"].append(ev)
                accelerator.print(f"\n[eval step {step}] " + " ".join(
                    f"{k}={v:.4f} (ppl {math.exp(v):.1f})" for k, v in ev.items() if k.endswith("_loss")),
                    flush=True)
            if step >= args.max_train_steps:
                break

    # ---- final eval + save -----------------------------------------------------------------
    ev = {"step": step, "tokens_seen": step * tokens_per_step, "wall_s": round(time.time() - t_start, 1),
          "final": True}
    for k, dl in eval_dls.items():
        ev[f"{k}_loss"] = evaluate(dl)
        ev[f"{k}_ppl"] = math.exp(ev[f"{k}_loss"])
    log["eval"].append(ev)
    accelerator.print("final: " + " ".join(f"{k}={v:.4f}" for k, v in ev.items() if k.endswith(("_loss", "_ppl"))))

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        unwrapped.generation_config = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id,
                                                       pad_token_id=eot_id, max_new_tokens=100)
        unwrapped.save_pretrained(args.output_dir, safe_serialization=True)
        tokenizer.save_pretrained(args.output_dir)
        # Greedy sample (deterministic) for the model card.
        unwrapped.eval()
        enc = tokenizer(args.sample_prompt, return_tensors="pt")
        with torch.no_grad():
            out = unwrapped.generate(**enc, max_new_tokens=80, do_sample=False, pad_token_id=eot_id)
        log["sample_prompt"] = args.sample_prompt
        log["sample_greedy"] = tokenizer.decode(out[0], skip_special_tokens=True)
        accelerator.print("greedy sample:\n" + log["sample_greedy"])
        log["total_steps"] = step
        log["total_tokens_seen"] = step * tokens_per_step
        log["train_time_s"] = round(train_time, 1)
        log["wall_time_s"] = round(time.time() - t_start, 1)
        with open(os.path.join(args.output_dir, "training_log.json"), "w") as f:
            json.dump(log, f, indent=1)
    # Free the DDP wrapper before the process group is destroyed. Its Reducer holds the group: were the Reducer's
    # destructor to drop the group's last reference (after end_training), ~ProcessGroupGloo would join gloo's worker
    # threads while holding the GIL that a worker may need to free a finished barrier's tensors — a shutdown deadlock
    # seen here with torch 2.13 on 2 CPU ranks. Dropped through destroy_process_group, the group is freed without it.
    del model, optimizer, train_dl, scheduler, eval_dls, periodic_dls, unwrapped
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
