"""hf_merged_attn: GPT-2 attention with the query–key product merged into one matrix per head.

    from hf_merged_attn import patch_model
    patch_model(model, mode="covariance")          # S_h = Wq_h Wk_hᵀ, exact
    patch_model(model, mode="lowrank", rank=32)    # S_h ≈ U_h V_hᵀ
"""

from .attention import MergedGPT2Attention
from .config import PatchConfig
from .patching import patch_model

__all__ = ["MergedGPT2Attention", "PatchConfig", "patch_model"]
__version__ = "0.1.0"
