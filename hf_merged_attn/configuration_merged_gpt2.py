"""Config of a GPT-2 whose attention is merged (self-contained: imports only transformers).

This file is copied next to saved checkpoints, so that `from_pretrained(..., trust_remote_code=True)`
works where hf_merged_attn is not installed.
"""

from transformers import GPT2Config


class MergedGPT2Config(GPT2Config):
    """A `GPT2Config` plus `merged_attn`, the record of the patch.

    `merged_attn` is a dict: `mode` ("covariance" | "lowrank"), `rank` (an int, {"block": r} per block, or
    None), `layers` (patched block indices), `init` (how lowrank factors were seeded), `energy` (only when the
    per-block ranks came from a spectral-energy target) and `base_model` (what was patched, for the model
    card). Its own `model_type`
    keeps transformers from ever loading such a checkpoint as a stock GPT-2 with missing attention weights.
    """

    model_type = "merged_gpt2"
    merged_attn: dict | None = None


MergedGPT2Config.register_for_auto_class()
