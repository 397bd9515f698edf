"""What the example scripts record about a run: its arguments with no machine's paths in them.

Results files are committed (docs/*.json); a path such as /home/you/project/examples/data/train.txt would publish
the machine's layout and be wrong on every other one. Paths inside the repository are recorded relative to its root,
an installed package's files from the package's name on, other absolute paths by their last component.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def portable(value):
    """`value` with absolute paths made repository-relative (or reduced to their name); lists and dicts recursively."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, Path) or (isinstance(value, str) and os.path.isabs(value)):
        path = Path(value).resolve() if os.path.isabs(str(value)) else Path(value)
        if "site-packages" in path.parts:  # an installed package's data: its name on, not this venv's layout
            return str(Path(*path.parts[path.parts.index("site-packages") + 1:]))
        if not path.is_absolute():
            return str(path)
        try:
            return str(path.relative_to(ROOT))
        except ValueError:
            return path.name
    return value


def recorded_args(args) -> dict:
    """An argparse namespace (or dataclass-like object) as the dict a results file records."""
    return portable(dict(vars(args)))


def current_commit() -> str:
    """The short hash of the checkout's HEAD, or "unknown" outside a git checkout."""
    import subprocess

    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return proc.stdout.strip() or "unknown"
