"""`python -m hf_merged_attn convert ...` / `inspect ...`: the `hf-merged-attn` command (see `hf_merged_attn.cli`)."""

import sys

from .cli import main

sys.exit(main())
