"""hf_merged_attn: GPT-2 attention with the query–key product merged into one matrix per head.

    from hf_merged_attn import patch_model
    patch_model(model, mode="covariance")          # S_h = Wq_h Wk_hᵀ, exact
    patch_model(model, mode="lowrank", rank=32)    # S_h ≈ U_h V_hᵀ

Importing the package registers the merged config and model classes with transformers' Auto classes,
so saved checkpoints load with `AutoModelForCausalLM.from_pretrained(folder)` without remote code.
"""

import transformers

from .config import PatchConfig
from .configuration_merged_gpt2 import MergedGPT2Config
from .modeling_merged_gpt2 import (
    MERGED_CLASSES,
    MergedGPT2Attention,
    MergedGPT2DoubleHeadsModel,
    MergedGPT2ForQuestionAnswering,
    MergedGPT2ForSequenceClassification,
    MergedGPT2ForTokenClassification,
    MergedGPT2LMHeadModel,
    MergedGPT2Model,
)
from .patching import patch_model, unpatch_model

transformers.AutoConfig.register(MergedGPT2Config.model_type, MergedGPT2Config, exist_ok=True)
for _merged, _auto_name in MERGED_CLASSES.values():
    if _auto_name is not None:
        getattr(transformers, _auto_name).register(MergedGPT2Config, _merged, exist_ok=True)

__all__ = [
    "MergedGPT2Attention",
    "MergedGPT2Config",
    "MergedGPT2DoubleHeadsModel",
    "MergedGPT2ForQuestionAnswering",
    "MergedGPT2ForSequenceClassification",
    "MergedGPT2ForTokenClassification",
    "MergedGPT2LMHeadModel",
    "MergedGPT2Model",
    "PatchConfig",
    "patch_model",
    "unpatch_model",
]
__version__ = "0.1.0"
