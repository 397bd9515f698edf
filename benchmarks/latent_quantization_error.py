"""How much error does quantizing the cached latent add, by scale axis, and does balancing the channels help? (#23)

    python benchmarks/latent_quantization_error.py      # the shipped stand-in, latent r_c = 128 whitened (~1 min)

The latents c = x W_c of every layer over 4,096 validation tokens, quantized as LatentQuantizedCache would: per token
(one scale and minimum per token, all 128 channels), per channel (groups of 32 tokens), and per token after dividing
each channel by its RMS (balancing, undone after dequantizing). Prints the relative squared error ‖ĉ − c‖² / ‖c‖²,
averaged over layers, for int8 and int4.
"""
import sys, torch, copy
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "examples"))
from cache_sweep import split_tokens
from transformers import AutoModelForCausalLM, AutoTokenizer
from hf_merged_attn import patch_model
from hf_merged_attn.calibration import evenly_spaced_blocks
from hf_merged_attn.quantized_cache import quantize, dequantize
torch.manual_seed(0)
root = __import__("pathlib").Path(__file__).resolve().parents[1]
path = str(root / "examples" / "shakespeare-gpt2")
tok = AutoTokenizer.from_pretrained(path); stock = AutoModelForCausalLM.from_pretrained(path).eval()
calib = list(evenly_spaced_blocks(split_tokens(tok, root / "examples" / "data" / "shakespeare", "train"), 16, 256).split(4))
m = patch_model(copy.deepcopy(stock), "latent", rank=128, init="whitened", calibration=calib)
val = split_tokens(tok, root / "examples" / "data" / "shakespeare", "validation")[:4096].view(16, 256)
lat = []
hooks = [a.latent_proj.register_forward_hook(lambda mod, i, o: lat.append(o.detach())) for a in [b.attn for b in m.transformer.h]]
with torch.no_grad(): m(val)
for h in hooks: h.remove()
for nbits in (8, 4):
    errs = {"token": [], "channel": [], "token+balanced": []}
    for c in lat:
        x = c.unsqueeze(1)  # (B,1,T,r)
        for name in errs:
            y = x
            if name == "token+balanced":
                s = x.pow(2).mean(dim=(0, 1, 2), keepdim=True).sqrt().clamp_min(1e-6)  # per-channel RMS
                y = x / s
            axis = "channel" if name == "channel" else "token"
            g = 32 if axis == "channel" else 128
            q = dequantize(*quantize(y, nbits, axis, g), nbits, axis, g, torch.float32)
            if name == "token+balanced": q = q * s
            errs[name].append(((q - x).pow(2).sum() / x.pow(2).sum()).item())
    print(f"int{nbits}", {k: f"{sum(v)/len(v):.2e}" for k, v in errs.items()})
