"""Crash-safe checkpoints of a training run (examples/finetune.py and the scripts that drive it).

step_N is written as the hidden folder .step_N.partial and renamed to step_N once every process has written its files
and the manifest (sha256 of every file) is in: a run killed at any moment leaves complete step_N folders and at most one
.partial folder, which resuming ignores and the next save replaces. Loading checks every file against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

CHECKPOINT_NAME = re.compile(r"step_(\d+)")
MANIFEST = "manifest.json"


def checkpoint_step(folder: Path) -> int | None:
    """N of a step_N folder; None for any other name."""
    match = CHECKPOINT_NAME.fullmatch(folder.name)
    return int(match[1]) if match else None


def resume_point(args, run_dir: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint a run resumes from (None: from the start) and the incomplete ones skipped for 'latest'.

    Raises (before any work): a folder that is not a complete step_N checkpoint, or one past --max_train_steps.
    """
    resume = args.resume_from_checkpoint
    if resume == "latest":
        found = sorted((checkpoint_step(p), p) for p in run_dir.glob("step_*") if checkpoint_step(p) is not None)
        complete = [p for _, p in found if (p / MANIFEST).is_file()]
        folder = complete[-1] if complete else None
        newer = [p.name for n, p in found if folder is None or n > checkpoint_step(folder)]
        skipped = sorted(p.name for p in run_dir.glob(".step_*.partial")) + newer
    elif resume:
        folder, skipped = Path(resume), []
        if checkpoint_step(folder) is None:
            raise ValueError(
                f"--resume_from_checkpoint {resume!r}: checkpoint folders are named step_N (N = the optimizer step, as "
                f"--checkpointing_steps writes them); got {folder.name!r}. Pass a step_N folder, or 'latest'."
            )
        if not (folder / MANIFEST).is_file():
            raise ValueError(
                f"--resume_from_checkpoint {resume!r} is not a complete checkpoint (no {MANIFEST}, which is written "
                "last): its writing was interrupted, or it was not written by --checkpointing_steps. Pass 'latest' "
                "to resume from the newest complete checkpoint, or another step_N folder."
            )
    else:
        return None, []
    if folder is not None and checkpoint_step(folder) > args.max_train_steps:
        raise ValueError(
            f"{folder} was saved at step {checkpoint_step(folder)}, past --max_train_steps {args.max_train_steps}. "
            f"Resume with --max_train_steps {checkpoint_step(folder)} or more, or start a fresh run in another "
            "--output_dir."
        )
    return folder, skipped


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(accelerator, run_dir: Path, step: int, history: dict) -> None:
    """Write step_N crash-safe (see above): into .step_N.partial, renamed when complete."""
    final, partial = run_dir / f"step_{step}", run_dir / f".step_{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by a run killed while writing it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every process's files (its RNG state too) are written
    if accelerator.is_main_process:
        (partial / "history.json").write_text(json.dumps(history))
        # every file, also in the sub-folders sharded states are written to (FSDP: one per model / optimizer)
        files = {str(f.relative_to(partial)): _sha256(f) for f in sorted(partial.rglob("*")) if f.is_file()}
        (partial / MANIFEST).write_text(json.dumps({"step": step, "sha256": files}))
        for path in [*sorted(partial.rglob("*"), reverse=True), partial]:  # on disk before the rename shows it
            descriptor = os.open(path, os.O_RDONLY)
            os.fsync(descriptor)
            os.close(descriptor)
        if final.exists():
            shutil.rmtree(final)  # an earlier run's, in the same --output_dir
        partial.rename(final)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, folder: Path) -> dict:
    """Load a checkpoint after checking every file against its manifest; returns its history."""
    expected = json.loads((folder / MANIFEST).read_text())["sha256"]
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            raise ValueError(
                f"{path} is {'missing' if not path.is_file() else 'corrupted (its sha256 differs from the manifest)'}"
                f"; resuming from {folder.name} would not continue the interrupted run (a damaged random-number state "
                "silently changes the dropout masks, a damaged optimizer state the updates). Resume from another "
                "step_N folder, or start afresh without --resume_from_checkpoint."
            )
    accelerator.load_state(str(folder))
    return json.loads((folder / "history.json").read_text())
