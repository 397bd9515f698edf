#!/usr/bin/env python
"""Is fusing the q/k/v input projections into one GEMM worth it here? Separate vs fused, at decode and at prefill.

    python benchmarks/fused_projections.py              # GPT-2-small width (d = 768), 1 thread, fp32

Stock GPT-2 projects q, k and v with one fused GEMM (c_attn: d -> 3d); the patched modes keep separate projections
(q_proj, k_proj / latent_proj, v_proj: separate checkpoint keys and LoRA targets). This times, interleaved and
repeated (median of --repeats), the three d -> d projections of lowrank r = hd as three F.linear calls against one
F.linear over the concatenated weight (forward, no grad), for one decoded token (T = 1, batch 1 and 8) and a
256-token prefill.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


def timed(fn, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=21, help="interleaved timings per case (the median is reported)")
    p.add_argument("--iterations", type=int, default=200, help="calls per timing")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = args.hidden
    parts = [nn.Linear(d, d) for _ in range(3)]
    weight = torch.cat([m.weight for m in parts]).detach()  # (3d, d): c_attn's layout, transposed
    bias = torch.cat([m.bias for m in parts]).detach()
    rows = []
    for batch, tokens in ((1, 1), (8, 1), (1, 256)):
        x = torch.randn(batch, tokens, d)
        separate = lambda: [nn.functional.linear(x, m.weight, m.bias) for m in parts]  # noqa: E731
        fused = lambda: nn.functional.linear(x, weight, bias).split(d, dim=-1)  # noqa: E731
        with torch.no_grad():
            diff = max((a - b).abs().max().item() for a, b in zip(separate(), fused()))
            iterations = max(args.iterations // tokens, 5)
            for fn in (separate, fused):
                timed(fn, iterations)  # warm-up
            times = {"separate": [], "fused": []}
            for _ in range(args.repeats):  # interleaved: a change of load hits both alike
                times["separate"].append(timed(separate, iterations))
                times["fused"].append(timed(fused, iterations))
        sep, fus = (statistics.median(times[k]) * 1e6 for k in ("separate", "fused"))
        rows.append({"batch": batch, "tokens": tokens, "separate_us": sep, "fused_us": fus,
                     "fused_over_separate": fus / sep, "max_abs_diff": diff})
    print(f"| batch × tokens | 3 separate GEMMs (µs) | 1 fused GEMM (µs) | fused / separate |  (d = {d}, "
          f"{args.threads} thread(s), median of {args.repeats})")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} × {r['tokens']} | {r['separate_us']:.1f} | {r['fused_us']:.1f} | {r['fused_over_separate']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
