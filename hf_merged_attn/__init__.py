"""hf_merged_attn: self-attention with the query–key product merged into one matrix per head.

    from hf_merged_attn import patch_model
    patch_model(model, mode="covariance")          # S_h = Wq_h Wk_hᵀ, exact
    patch_model(model, mode="lowrank", rank=32)    # S_h ≈ U_h V_hᵀ
    recover_layerwise(model, stock, calibration)   # fit each patched layer back to the stock one

Families: GPT-2, OPT, BLOOM (ALiBi), BERT and RoBERTa encoders, and the rotary Llama, Qwen2 and Mistral (the latent
mode: by default the exact-RoPE latent, rope="exact", which keeps every rotation; rope="partial" keeps rope_pairs)
(`registry.SPECS`); other rotary families are refused.
Importing the package registers the merged config and model classes with transformers' Auto classes, so saved
checkpoints load with `AutoModelForCausalLM.from_pretrained(folder)` (or `AutoModel`) without remote code.
"""

import transformers

from .merged_attention import ArchitectureSpec, MergedAttention, PatchConfig, use_kernels
from .modeling_merged_bert import (
    MergedBertConfig,
    MergedBertModel,
    MergedBertSelfAttention,
    MergedRobertaConfig,
    MergedRobertaModel,
)
from .modeling_merged_bloom import MergedBloomAttention, MergedBloomConfig, MergedBloomForCausalLM, MergedBloomModel
from .modeling_merged_gpt2 import (
    MergedGPT2Attention,
    MergedGPT2Config,
    MergedGPT2DoubleHeadsModel,
    MergedGPT2ForQuestionAnswering,
    MergedGPT2ForSequenceClassification,
    MergedGPT2ForTokenClassification,
    MergedGPT2LMHeadModel,
    MergedGPT2Model,
)
from .modeling_merged_opt import MergedOPTAttention, MergedOPTConfig, MergedOPTForCausalLM, MergedOPTModel
from .patching import patch_model, unpatch_model
from .quantized_cache import LatentQuantizedCache, use_quantized_latent_cache
from .recovery import recover_end_to_end, recover_layerwise
from .registry import REGISTRY, SPECS

for _spec in SPECS:
    transformers.AutoConfig.register(_spec.config_class.model_type, _spec.config_class, exist_ok=True)
    for _merged, _auto_name in _spec.model_classes.values():
        if _auto_name is not None:
            getattr(transformers, _auto_name).register(_spec.config_class, _merged, exist_ok=True)

__all__ = [
    "REGISTRY",
    "SPECS",
    "ArchitectureSpec",
    "LatentQuantizedCache",
    "MergedAttention",
    "MergedBertConfig",
    "MergedBertModel",
    "MergedBertSelfAttention",
    "MergedBloomAttention",
    "MergedBloomConfig",
    "MergedBloomForCausalLM",
    "MergedBloomModel",
    "MergedGPT2Attention",
    "MergedGPT2Config",
    "MergedGPT2DoubleHeadsModel",
    "MergedGPT2ForQuestionAnswering",
    "MergedGPT2ForSequenceClassification",
    "MergedGPT2ForTokenClassification",
    "MergedGPT2LMHeadModel",
    "MergedGPT2Model",
    "MergedOPTAttention",
    "MergedOPTConfig",
    "MergedOPTForCausalLM",
    "MergedOPTModel",
    "MergedRobertaConfig",
    "MergedRobertaModel",
    "PatchConfig",
    "patch_model",
    "recover_end_to_end",
    "recover_layerwise",
    "unpatch_model",
    "use_kernels",
    "use_quantized_latent_cache",
]
__version__ = "0.2.0"
