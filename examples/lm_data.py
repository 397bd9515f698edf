"""The language-model data of the example scripts: checked files, train blocks, evaluation streams, a fixed order.

Data comes through `datasets` (a hub dataset, or local .txt/.json(l)/.csv files) and is tokenized and cut into
blocks as transformers' run_clm does; the validation and test splits are single token streams for the strided
evaluator. `EpochSampler` fixes the training order by (seed, epoch), the same for every mode and after a resume.
"""

from __future__ import annotations

import codecs
from itertools import chain
from pathlib import Path

import torch
from datasets import load_dataset
from torch.utils.data import Sampler

DATA_EXTENSIONS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def check_data_file(flag: str, path: str | None) -> None:
    """An existing, non-empty UTF-8 file with a known extension; errors name the flag and the file."""
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path!r} does not exist. Pass an existing .txt/.json/.csv file, or --dataset_name.")
    if Path(path).suffix not in DATA_EXTENSIONS:
        raise ValueError(f"{flag} {path!r}: extension must be one of {sorted(DATA_EXTENSIONS)}.")
    decoder, size = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:  # error.object: bytes held over from the last chunk + this chunk
                offset = size - (len(error.object) - len(chunk)) + error.start
                raise ValueError(
                    f"{flag} {path!r} is not UTF-8 text: byte {offset} ({error.object[error.start]:#04x}) "
                    f"{error.reason}. Convert it to UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > converted{Path(path).suffix}."
                ) from None
            size += len(chunk)
    if size == 0:
        raise ValueError(f"{flag} {path!r} is empty. Pass a file with text in it.")


def load_lm_data(args, tokenizer, accelerator):
    """Tokenize the train/validation text; train as block_size blocks, validation as one token stream."""
    if args.dataset_name:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
    else:
        builder = DATA_EXTENSIONS[Path(args.train_file).suffix]
        extra = {"keep_linebreaks": True} if builder == "text" else {}
        raw = load_dataset(builder, data_files={"train": args.train_file, "validation": args.validation_file}, **extra)
    if "validation" not in raw:
        raise ValueError(f"dataset {args.dataset_name!r} has no 'validation' split (splits: {list(raw)}); use --validation_file.")
    for split in ("train", "validation"):
        if args.text_column not in raw[split].column_names:
            raise ValueError(
                f"the {split} data has no text column {args.text_column!r} (columns: {raw[split].column_names}). "
                "Pass --text_column with the column that holds the text."
            )

    def tokenize(batch):
        return tokenizer(batch[args.text_column], add_special_tokens=False)

    def group_texts(batch):  # concatenate and cut into blocks, as run_clm does
        ids = list(chain(*batch["input_ids"]))
        total = len(ids) // args.block_size * args.block_size
        blocks = [ids[i : i + args.block_size] for i in range(0, total, args.block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    columns = raw["train"].column_names
    with accelerator.main_process_first():
        tokenized = raw.map(tokenize, batched=True, remove_columns=columns, desc="tokenize")
        train = tokenized["train"].map(
            group_texts, batched=True, batch_size=None, remove_columns=tokenized["train"].column_names, desc="blocks"
        )
    batch = args.per_device_train_batch_size * accelerator.num_processes
    if len(train) < batch:
        raise ValueError(
            f"the train data makes {len(train)} blocks of --block_size {args.block_size} tokens, fewer than one batch "
            f"of {batch} (--per_device_train_batch_size {args.per_device_train_batch_size} x {accelerator.num_processes} "
            "process(es)). Give more training text, or a smaller --block_size or --per_device_train_batch_size."
        )
    stream = torch.tensor(list(chain(*tokenized["validation"]["input_ids"])), dtype=torch.long)  # (N,)
    if args.eval_max_tokens:
        stream = stream[: args.eval_max_tokens]
    if stream.numel() < 2:
        raise ValueError(
            f"the validation data has {stream.numel()} token(s); perplexity needs at least 2. Give more validation "
            "text (--validation_file or the dataset's validation split)."
        )
    return train.with_format("torch"), stream


def load_test_stream(args, tokenizer, test_file: str | None = None, test_split: str = "test",
                     max_tokens: int = 0) -> torch.Tensor:
    """A test split as one token stream, tokenized as `load_lm_data` tokenizes validation: `test_split` of
    args.dataset_name, else the local `test_file`."""
    if args.dataset_name:
        raw = load_dataset(args.dataset_name, args.dataset_config_name, split=test_split)
    else:
        builder = DATA_EXTENSIONS[Path(test_file).suffix]
        extra = {"keep_linebreaks": True} if builder == "text" else {}
        raw = load_dataset(builder, data_files={"test": test_file}, split="test", **extra)
    ids = tokenizer(list(raw[args.text_column]), add_special_tokens=False)["input_ids"]
    stream = torch.tensor(list(chain(*ids)), dtype=torch.long)  # (N,)
    return stream[:max_tokens] if max_tokens else stream


class EpochSampler(Sampler):
    """A random order fixed by (seed, epoch): the same for every mode, reproducible on resume."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
