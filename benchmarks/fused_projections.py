#!/usr/bin/env python
"""Is fusing the q/k/v input projections into one GEMM worth it here? Separate vs fused, at decode and at prefill.

    python benchmarks/fused_projections.py              # GPT-2-small width (d = 768), 1 thread, fp32
    python benchmarks/fused_projections.py --output docs/fused_projections.md   # the committed figures (~2 min)

Stock GPT-2 projects q, k and v with one fused GEMM (c_attn: d -> 3d); the patched modes keep separate projections
(q_proj, k_proj / latent_proj, v_proj: separate checkpoint keys and LoRA targets). This times, interleaved and
repeated (median of --repeats), the three d -> d projections of lowrank r = hd as three F.linear calls against one
F.linear over the concatenated weight (forward, no grad), for one decoded token (T = 1, batch 1 and 8) and a
256-token prefill.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

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
    p.add_argument("--output", default=None, help="also write the table, command and machine to this markdown file")
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
    lines = [f"| batch × tokens | 3 separate GEMMs (µs) | 1 fused GEMM (µs) | fused / separate |  (d = {d}, "
             f"{args.threads} thread(s), median of {args.repeats})", "|---|---|---|---|"]
    lines += [f"| {r['batch']} × {r['tokens']} | {r['separate_us']:.1f} | {r['fused_us']:.1f} | "
              f"{r['fused_over_separate']:.3f} |" for r in rows]
    print("\n".join(lines))
    if args.output:
        command = "python benchmarks/fused_projections.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.output).write_text(
            "# Fused q/k/v projections: one GEMM or three?\n\n"
            "Lowrank r = hd keeps three input projections (separate checkpoint keys and LoRA targets) where stock GPT-2 "
            "runs one fused `c_attn`. This times both (forward, no grad; interleaved, median) at one decoded token "
            "(batch 1 and 8) and a 256-token prefill. A ratio below 1 means fusing would pay.\n\n"
            + "\n".join(lines) + f"\n\n`{command}` — {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPU cores, torch {torch.__version__}, Python {platform.python_version()}. Ratios move by "
            "several percent between runs under load; the projections stay separate unless a ratio is clearly below 1 "
            "at decode.\n"
        )
    return rows


if __name__ == "__main__":
    main()
