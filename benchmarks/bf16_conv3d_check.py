"""Benchmark (correctness): how often this CPU's bf16 ``Conv3d`` gets its forward pass, input gradient and weight
gradient wrong, by input shape, against float32 on the same values.

    python benchmarks/bf16_conv3d_check.py [--trials 40]

Each trial draws a fresh convolution (3x3x3, padding 1) and input, runs it under CPU bf16 autocast and in float32,
and counts a result wrong when it is non-finite or off by more than ``fedtextseg.bf16_check.TOLERANCE`` (relative
max error; bf16 rounding alone stays under 1 %). The shapes are CDPDNet's levels for common patches, among them
the 2-voxel-deep levels that ``fedtextseg.bf16_check`` found wrong on torch 2.14.1 on an AMD EPYC (Zen 4) with
AVX512-BF16.
Prints a table and writes ``benchmarks/results/bf16_conv3d_check.{json,md}`` with the CPU's bf16/AMX flags.
Nothing is asserted: the engine runs the same check on a run's own shapes before it trains in bf16 on a CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fedtextseg import engine
from fedtextseg.bf16_check import TOLERANCE, relative_error
from fedtextseg.tracking import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [  # (channels, depth, height, width): one row of a batch
    (16, 32, 32, 32), (32, 16, 16, 16), (64, 8, 8, 8), (64, 4, 4, 4), (16, 16, 32, 32), (32, 8, 16, 16),
    (32, 4, 8, 8), (32, 2, 8, 8), (16, 2, 16, 16), (64, 2, 4, 4), (16, 2, 2, 2), (64, 1, 4, 4), (16, 4, 2, 2),
    (16, 3, 4, 4),
]


def wrong_rates(channels: int, spatial: tuple[int, int, int], trials: int, seed: int = 0) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    wrong = {"forward": 0, "input_grad": 0, "weight_grad": 0}
    for _ in range(trials):
        weight = torch.randn(channels, channels, 3, 3, 3, generator=g) / (27 * channels) ** 0.5
        x = torch.randn(1, channels, *spatial, generator=g)
        upstream = torch.randn(1, channels, *spatial, generator=g)
        results = []
        for autocast in (True, False):
            w, xi = weight.clone().requires_grad_(), x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = F.conv3d(xi, w, padding=1)
            y.float().backward(upstream)
            results.append((y.detach().float(), xi.grad, w.grad))
        (y16, gx16, gw16), (y32, gx32, gw32) = results
        for name, got, want in (("forward", y16, y32), ("input_grad", gx16, gx32), ("weight_grad", gw16, gw32)):
            wrong[name] += int(relative_error(got, want) > TOLERANCE)
    return {k: v / trials for k, v in wrong.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=40)
    args = parser.parse_args()
    flags = sorted(engine.cpu_flags() & set(engine.CPU_BF16_FLAGS))
    rows = []
    for c, d, h, w in SHAPES:
        rates = wrong_rates(c, (d, h, w), args.trials)
        rows.append({"channels": c, "input": [d, h, w], **rates})
        print(f"C={c:3d} input {d}x{h}x{w}: wrong forward {rates['forward']:.0%}, input grad "
              f"{rates['input_grad']:.0%}, weight grad {rates['weight_grad']:.0%}")
    meta = {"torch": torch.__version__, "cpu": cpu_model(), "bf16_flags": flags,
            "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "threads": torch.get_num_threads(),
            "trials": args.trials, "tolerance": TOLERANCE}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bf16_conv3d_check.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# CPU bf16 Conv3d against float32 (benchmarks/bf16_conv3d_check.py)", "",
             f"{meta['cpu']}, torch {meta['torch']}, CPU bf16 flags: {', '.join(flags) or 'none'}, "
             f"{meta['threads']} thread(s), "
             f"{args.trials} trials per shape, wrong = non-finite or off by more than {TOLERANCE:.0%} (relative max).",
             "", "| channels | input (D x H x W) | forward wrong | input grad wrong | weight grad wrong |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['channels']} | {' x '.join(map(str, r['input']))} | {r['forward']:.0%} | {r['input_grad']:.0%} | "
              f"{r['weight_grad']:.0%} |" for r in rows]
    (RESULTS / "bf16_conv3d_check.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'bf16_conv3d_check.md'}")


if __name__ == "__main__":
    main()
