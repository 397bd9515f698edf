"""Analytic multiply-accumulate (MAC) counts of stock, covariance and lowrank GPT-2 (FLOPs = 2 x MACs).

Per layer, for T new tokens attending to key/value positions, with hidden size d, H heads of hd = d/H,
rank r and P = the number of (query, key) pairs that a causal model must score:

    P = T·(T+1)/2           a causal forward over T tokens (the minimum: no masked pair is computed)
    P = T·L                 T new tokens decoding against a cache of L positions (decode: T = 1)

                   q/k projections    v proj   scores      attn·V    out proj   MLP
    stock          2·T·d²             T·d²     P·d         P·d       T·d²       8·T·d²
    covariance     H·T·d²  (k = x)    T·d²     H·P·d       P·d       T·d²       8·T·d²
    lowrank r      2·H·T·d·r          T·d²     H·P·r       P·d       T·d²       8·T·d²

(stock's scores are Σ_h P·hd = P·d; covariance scores each head's d-dim query against the d-dim shared
key; lowrank against an r-dim key per head.) The LM head adds T·d·V (V = vocabulary) once per model.
A training step (forward + backward) counts 3x the forward: the backward of every product computes two
products of the same size (the gradients of both operands). Biases, layer norms, GELU, softmax, the
loss and the embedding lookup are not counted: they are O(T·d) or O(H·P) element-wise work, not MACs.

"dense" variants count P = T² instead (what a kernel that computes the masked half of the score matrix
and throws it away does); the benchmark reports the causal count as the limit, the stricter target.
"""

from __future__ import annotations


def pairs(tokens: int, context: int = 0, causal: bool = True) -> int:
    """Scored (query, key) pairs for `tokens` new tokens after `context` cached ones."""
    if context:
        return tokens * (context + tokens) if not causal else tokens * context + tokens * (tokens + 1) // 2
    return tokens * (tokens + 1) // 2 if causal else tokens * tokens


def attention_macs(mode: str, rank: int | None, tokens: int, n_pairs: int, d: int, heads: int,
                   values: str | None = None, keys: int | None = None) -> dict[str, int]:
    """MACs of one attention module (projections, scores, attn·V, output projection) by part.

    latent (rank = r_c): a pass whose keys are all new (`keys` = tokens: training, prefill) expands the latent
    (T·d·r_c down, 2·T·r_c·d up) and then runs stock attention; a pass against a cache (`keys` > tokens: decode) runs
    the absorbed order: q·Bkᵀ and z̃·Bv (T·d·r_c each), scores and A·c against the r_c-dim latent of every head.
    values="merged": no value projection, each head averages the d-dim x (H·P·d), the output map is H·T·d·d.
    """
    keys = tokens if keys is None else keys
    v_proj, attn_v, out_proj = tokens * d * d, n_pairs * d, tokens * d * d
    if mode == "stock":
        qk_proj, scores = 2 * tokens * d * d, n_pairs * d
    elif mode == "covariance":
        qk_proj, scores = heads * tokens * d * d, heads * n_pairs * d
    elif mode == "lowrank":
        qk_proj, scores = 2 * heads * tokens * d * rank, heads * n_pairs * rank
    elif mode == "latent" and keys == tokens:  # expanded
        qk_proj, scores, v_proj = tokens * d * d + tokens * d * rank + tokens * rank * d, n_pairs * d, tokens * rank * d
    elif mode == "latent":  # absorbed
        qk_proj, scores = tokens * d * d + tokens * d * rank + tokens * d * rank, heads * n_pairs * rank
        v_proj, attn_v = tokens * d * rank, heads * n_pairs * rank
    else:
        raise ValueError(mode)
    if values == "merged":
        v_proj, attn_v, out_proj = 0, heads * n_pairs * d, heads * tokens * d * d
    return {"qk_proj": qk_proj, "v_proj": v_proj, "scores": scores, "attn_v": attn_v, "out_proj": out_proj}


def model_macs(
    mode: str,
    rank: int | None,
    *,
    tokens: int,
    context: int = 0,
    d: int,
    heads: int,
    layers: int,
    vocab: int,
    causal: bool = True,
    values: str | None = None,
) -> dict[str, int]:
    """Forward MACs of a whole GPT-2 LM (`layers` blocks + LM head): attention-only and total."""
    n_pairs = pairs(tokens, context, causal)
    macs = attention_macs(mode, rank, tokens, n_pairs, d, heads, values=values, keys=tokens + context)
    attention = sum(macs.values()) * layers
    mlp = 8 * tokens * d * d * layers
    head = tokens * d * vocab
    return {"attention": attention, "mlp": mlp, "lm_head": head, "total": attention + mlp + head}


def step_flops(mode: str, rank: int | None, *, tokens: int, d: int, heads: int, layers: int, vocab: int,
               causal: bool = True, values: str | None = None) -> dict[str, int]:
    """FLOPs of one training step (forward + backward = 3 x forward) over a causal sequence of `tokens`."""
    macs = model_macs(mode, rank, tokens=tokens, d=d, heads=heads, layers=layers, vocab=vocab, causal=causal,
                      values=values)
    return {k: 2 * 3 * v for k, v in macs.items()}


def decode_flops(mode: str, rank: int | None, *, context: int, d: int, heads: int, layers: int, vocab: int,
                 values: str | None = None) -> dict[str, int]:
    """FLOPs of one decode step: one new token attending to `context` cached positions and itself."""
    macs = model_macs(mode, rank, tokens=1, context=context, d=d, heads=heads, layers=layers, vocab=vocab,
                      values=values)
    return {k: 2 * v for k, v in macs.items()}


def qk_parameters(mode: str, rank: int | None, d: int, heads: int) -> int:
    """Query–key parameters per layer (weights + biases): 2d² + 2d, H·d² + H·d, 2·H·d·r + H·r; latent r_c: the
    stock queries d² + d, W_c and the key up-projection 2·d·r_c."""
    if mode == "stock":
        return 2 * d * d + 2 * d
    if mode == "covariance":
        return heads * d * d + heads * d
    if mode == "latent":
        return d * d + d + 2 * d * rank
    return 2 * heads * d * rank + heads * rank


def k_cache_bytes(mode: str, rank: int | None, *, tokens: int, d: int, heads: int, layers: int, itemsize: int,
                  batch: int = 1) -> int:
    """Bytes of the K cache: stock (B, H, T, hd), covariance (B, 1, T, d), lowrank (B, H, T, r)."""
    width = rank * heads if mode == "lowrank" else d
    return batch * tokens * width * itemsize * layers
