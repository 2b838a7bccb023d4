"""Benchmark: the production training step (``engine.train_steps``) under each precision and memory layout.

    python benchmarks/train_step.py                                  # the demo's network, its patch and batch
    python benchmarks/train_step.py --experiment demo --overrides "model=cdpdnet_tiny" --steps 10

Variants, each in its own process (so peak memory is its own), on the same random batch of the experiment's
``batch_size`` volumes x ``num_crops`` crops of its patch size, timed per step through ``engine.train_steps``'
``step_hook`` (the loop clients and centralized training run, loss and optimizer included):

- precision ``fp32`` or ``bf16`` autocast (bf16 only where the device computes it natively, or ``--force-bf16``);
- layout ``channels-last`` (what the engine selects for 3D networks on CUDA and AMX CPUs) or ``contiguous``;
- for networks with a DINOv2 branch, ``cached`` features (the site's feature cache) or ``recompute`` (the ViT runs
  on every patch).

``auto`` marks the combination the engine picks by itself on this machine. Prints a table with each variant's
speed-up over fp32 contiguous, and writes ``benchmarks/results/train_step.{json,md}`` with the CPU's bf16/AMX flags.
Dice per CPU minute of the same choices comes from ``benchmarks/learning_curve.py``. Nothing is asserted.
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


def _measure(experiment: str, overrides: str, steps: int, precision: str, layout: str, dino: str) -> dict:
    import torch

    from fedtextseg import engine
    from fedtextseg.config import compose_config
    from fedtextseg.losses import build_loss
    from fedtextseg.runtime import build_model, prepare_bank
    from fedtextseg.vocab import get_vocabulary

    engine._channels_last = lambda device: layout == "channels-last"  # the layout measured, whatever auto picks
    cfg = compose_config(experiment, overrides)
    if cfg.run.get("threads"):
        torch.set_num_threads(int(cfg.run.threads))
    torch.manual_seed(0)
    device = engine.resolve_device(cfg.run.device)
    model = engine.prepare_model(build_model(cfg, prepare_bank(cfg, log_fn=lambda *_: None)), device)
    vocab = get_vocabulary()
    pre = cfg.data.preprocess
    n, patch = int(cfg.train.batch_size) * int(pre.num_crops), tuple(int(v) for v in pre.patch_size)
    volume = tuple(2 * p for p in patch)
    batch = {"image": torch.rand(n, 1, *patch), "label": (torch.rand(n, vocab.num_classes, *patch) > 0.9).byte(),
             "annotated": torch.ones(n, vocab.num_classes), "task": torch.zeros(n, dtype=torch.long),
             "crop_start": torch.zeros(n, 3, dtype=torch.long), "volume_shape": torch.tensor([volume] * n)}
    if getattr(model, "dino", None) is not None and dino == "cached":
        with torch.no_grad():
            batch["dino"] = model.dino_features(batch["image"].to(device)).cpu()
    loss_fn = build_loss("masked", vocab, batch_dice=True, bce_weight=float(cfg.train.bce_weight))
    optimizer = engine.make_optimizer(model, float(cfg.train.lr), float(cfg.train.weight_decay))
    times, last = [], [time.perf_counter()]

    def hook(step: int, loss: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    engine.train_steps(model, [batch], loss_fn=loss_fn, optimizer=optimizer, steps=steps + 2, device=device,
                       precision=precision, grad_clip=cfg.train.grad_clip, step_hook=hook)
    steady = sorted(times[2:])  # 2 warm-up steps
    result = {"variant": f"{precision} {layout}" + (f" dino-{dino}" if getattr(model, "dino", None) else ""),
              "precision": precision, "layout": layout, "dino": dino if getattr(model, "dino", None) else None,
              "model": str(cfg.model.name), "patches": n, "patch": list(patch), "device": str(device),
              "step_s_median": steady[len(steady) // 2]}
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name(0)
    else:
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["threads"] = torch.get_num_threads()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="demo")
    p.add_argument("--overrides", default="", help='Hydra overrides, e.g. "model=cdpdnet_tiny"')
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--force-bf16", action="store_true", help="measure bf16 even where the device emulates it")
    p.add_argument("--child", nargs=3, metavar=("PRECISION", "LAYOUT", "DINO"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.child:  # one measurement, JSON on stdout
        print(json.dumps(_measure(args.experiment, args.overrides, args.steps, *args.child)))
        return 0

    import torch

    from fedtextseg import engine
    from fedtextseg.config import compose_config

    cfg = compose_config(args.experiment, args.overrides)
    device = engine.resolve_device(cfg.run.device)
    auto = engine.resolve_precision(device, "auto")
    precisions = ["fp32"] + (["bf16"] if auto == "bf16" or args.force_bf16 or device.type == "cuda" else [])
    with_dino = bool(cfg.model.get("kwargs", {}).get("dino", {}).get("enabled", True))
    dinos = ["cached", "recompute"] if with_dino else ["none"]
    rows = []
    for dino in dinos:
        for precision in precisions:
            for layout in ("contiguous", "channels-last"):
                cmd = [sys.executable, __file__, "--experiment", args.experiment, "--overrides", args.overrides,
                       "--steps", str(args.steps), "--child", precision, layout, dino]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                row = json.loads(out)
                row["auto"] = (precision == auto and (layout == "channels-last") == engine._channels_last(device)
                               and dino in ("cached", "none"))
                rows.append(row)
                print(f"{row['variant']}: {row['step_s_median']:.3f} s/step", flush=True)
    flags = sorted(engine.cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"})
    base = rows[0]["step_s_median"]
    machine = (f"{platform.processor() or platform.machine()}, CPU flags {' '.join(flags) or 'none of note'}, "
               f"device {rows[0]['device']}" + (f" ({rows[0]['gpu']})" if rows[0].get("gpu")
                                                 else f", {rows[0].get('threads')} torch threads"))
    lines = [f"# Training step ({rows[0]['model']}, {rows[0]['patches']} patches of {rows[0]['patch']}): "
             f"`engine.train_steps`", "", f"{time.strftime('%Y-%m-%d')}. Machine: {machine}. `auto` = what the engine "
             "picks here.", "", "| variant | step (s, median) | vs fp32 contiguous | peak memory (MB) | auto |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['step_s_median']:.3f} | {base / r['step_s_median']:.2f}x | "
                     f"{r['peak_mb']:.0f} | {'yes' if r['auto'] else ''} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_step.json").write_text(json.dumps({"machine": machine, "cpu_flags": flags, "rows": rows,
                                                          "torch": torch.__version__}, indent=2))
    (args.out / "train_step.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
