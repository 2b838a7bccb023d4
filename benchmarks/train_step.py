"""Benchmark: CDPDNet local training step time and peak memory, with and without the DINOv2 feature cache.

    python benchmarks/train_step.py [--model cdpdnet_tiny] [--patch 32 32 32] [--batch 4] [--steps 10]

Each variant runs in its own process so peak memory is its own: CUDA ``max_memory_allocated`` on a GPU, the
process's peak resident set size on CPU. "cached" trains on DINOv2 features cropped from a per-volume cache
(the default for training); "recompute" runs the frozen ViT on every patch. The one-time cost of filling the cache
for one volume is reported too. Prints a table and writes ``benchmarks/results/train_step.{json,md}``. It never
asserts a time: figures depend on the machine, which is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _measure(model_name: str, patch: list[int], batch: int, steps: int, variant: str) -> dict:
    import torch

    from fedtextseg.engine import autocast, prepare_model, resolve_device
    from fedtextseg.losses import PartialLabelLoss
    from fedtextseg.models import compute_volume_features, create_model, crop_features

    torch.manual_seed(0)
    device = resolve_device("auto")
    c, t, e = 32, 11, 512
    model = create_model(model_name, class_embeddings=torch.randn(c, e), task_embeddings=torch.randn(t, e),
                         class_names=[f"c{i}" for i in range(c)], task_names=[f"t{i}" for i in range(t)],
                         patch_size=tuple(patch), dino={"weights": "provided"})
    model = prepare_model(model, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = PartialLabelLoss("masked", batch_dice=True)
    d, h, w = patch
    volume = torch.rand(1, 2 * d, 2 * h, 2 * w)
    result = {"variant": variant, "model": model_name, "patch": patch, "batch": batch, "device": str(device)}
    feats = None
    if variant == "cached":
        model.dino.to(device)
        start = time.perf_counter()
        fv = compute_volume_features(model, volume, (h, w))
        result["cache_fill_s_per_volume"] = time.perf_counter() - start
        result["cache_mb_per_volume"] = fv.nbytes / 2**20
        crop = crop_features(fv, (0, 0, 0), (d, h, w))
        feats = crop.unsqueeze(0).expand(batch, *crop.shape).to(device)
    x = volume[:, :d, :h, :w].unsqueeze(0).expand(batch, 1, d, h, w).contiguous().to(device)
    y = (torch.rand(batch, c, d, h, w, device=device) > 0.9).float()
    ann = torch.ones(batch, c, device=device)
    task = torch.zeros(batch, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 2):  # 2 warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(device):
            out = model.forward_batch({"image": x, "task": task, **({"dino": feats} if feats is not None else {})})
            loss = loss_fn(out["logits"], y, ann)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = sorted(times[2:])
    result["step_s_median"] = steady[len(steady) // 2]
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name(0)
    else:
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["threads"] = torch.get_num_threads()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cdpdnet_tiny")
    p.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--variant", choices=["cached", "recompute"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.variant:  # child process: one measurement, JSON on stdout
        print(json.dumps(_measure(args.model, args.patch, args.batch, args.steps, args.variant)))
        return 0
    rows = []
    for variant in ("recompute", "cached"):
        cmd = [sys.executable, __file__, "--model", args.model, "--patch", *map(str, args.patch), "--batch",
               str(args.batch), "--steps", str(args.steps), "--variant", variant]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    base = rows[0]["step_s_median"]
    lines = [f"# Training step: DINOv2 feature cache ({args.model}, patch {args.patch}, batch {args.batch})", "",
             f"Machine: {platform.processor() or platform.machine()}, device {rows[0]['device']}"
             + (f" ({rows[0].get('gpu')})" if rows[0].get("gpu") else f", {rows[0].get('threads')} torch threads"),
             "", "| variant | step (s, median) | speed-up | peak memory (MB) | cache fill (s/volume) | cache (MB/volume) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['step_s_median']:.3f} | {base / r['step_s_median']:.2f}x | "
                     f"{r['peak_mb']:.0f} | {r.get('cache_fill_s_per_volume', float('nan')):.2f} | "
                     f"{r.get('cache_mb_per_volume', float('nan')):.1f} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_step.json").write_text(json.dumps(rows, indent=2))
    (args.out / "train_step.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
