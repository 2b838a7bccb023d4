"""DP-SGD overhead: time per local step and peak memory of a DP-SGD step vs the ordinary step, per model.

    python benchmarks/privacy_overhead.py                       # the demo's model and cdpdnet_small, all modes
    python benchmarks/privacy_overhead.py --models cdpdnet_tiny_nodino --modes plain dp-microbatch --steps 3

Every (model, mode) runs in its own subprocess (so peak memory is that configuration's own): the same synthetic
batch of ``--volumes`` volumes x ``--crops`` crops (frozen DINOv2 features precomputed, as the site's feature cache
provides them) through ``engine.train_steps`` - plainly (``plain``: AdamW, global-norm clipping), or through
``fedtextseg.privacy.dpsgd.make_private`` (``dp-microbatch``: one forward/backward per volume, its gradient clipped
by Opacus' DPOptimizer; ``dp-hooks``: the same clipping from materialised per-sample gradients; ``dp-fast``: Opacus
fast gradient clipping, two backward passes). The Poisson sampling rate is 1 so every step sees the same batch.
Precision: fp32, and bf16 autocast where the engine picks it (CUDA, or a CPU with AMX; ``--precisions fp32 bf16``
measures both anywhere) for the plain step and ``dp-microbatch`` (the other modes always run in fp32); ratios are to
the plain step at the same precision.

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the process's peak resident set
(``resource.getrusage(...).ru_maxrss``) minus the resident set before the first step (torch's CPU allocations are
invisible to ``tracemalloc``). Results (figures only, nothing is asserted) are printed and written to
``benchmarks/results/privacy_overhead.json`` and ``.md`` together with the device they were measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

MODES = ("plain", "dp-microbatch", "dp-hooks", "dp-fast")
FP32_ONLY = ("dp-hooks", "dp-fast")
PATCHES = {"cdpdnet_tiny_nodino": (32, 32, 32), "cdpdnet_tiny": (32, 32, 32), "cdpdnet_small": (16, 64, 64)}
RESULTS = Path(__file__).resolve().parent / "results"


def _bank(dim: int = 64):
    import torch

    from fedtextseg.vocab import get_vocabulary

    vocab = get_vocabulary()
    g = torch.Generator().manual_seed(0)
    return dict(class_embeddings=torch.randn(vocab.num_classes, dim, generator=g),
                task_embeddings=torch.randn(len(vocab.tasks), dim, generator=g),
                class_names=vocab.class_names, task_names=vocab.task_names)


def _dataset(model, volumes: int, crops: int, patch, device):
    import torch

    from fedtextseg.vocab import get_vocabulary

    vocab = get_vocabulary()
    g = torch.Generator().manual_seed(0)
    annotated = torch.zeros(vocab.num_classes)
    annotated[[vocab.class_names.index(c) for c in ("liver", "liver tumor", "spleen")]] = 1.0
    items = []
    for v in range(volumes):
        crops_ = []
        for _ in range(crops):
            image = torch.rand(1, *patch, generator=g)
            item = {"image": image, "label": (torch.rand(vocab.num_classes, *patch, generator=g) > 0.8).to(torch.uint8),
                    "annotated": annotated.clone(), "task": 1, "case_id": f"vol{v}"}
            if getattr(model, "dino", None) is not None:
                with torch.no_grad():
                    item["dino"] = model.dino_features(image[None].to(device))[0].cpu()
            crops_.append(item)
        items.append(crops_)
    return items


def _peak_bytes(device, baseline: int) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline)


def model_spec(model_name: str) -> tuple[str, dict]:
    """A registered model's name, or a ``configs/model/<name>.yaml`` config (the demo's ``cdpdnet_tiny_nodino``)
    composed into the registered name and keyword overrides it builds; DINOv2 weights stay random (offline)."""
    from omegaconf import OmegaConf

    from fedtextseg.config import compose_config
    from fedtextseg.models import is_model

    if is_model(model_name):
        return model_name, ({"dino": {"weights": None}} if model_name == "cdpdnet_small" else {})
    model = compose_config("demo", [f"model={model_name}"]).model  # an unknown name fails here, naming the options
    return str(model.name), OmegaConf.to_container(model.kwargs, resolve=True) or {}


def worker(model_name: str, mode: str, precision: str, volumes: int, crops: int, steps: int,
           threads: int | None) -> dict:
    """One configuration in this process; returns its figures."""
    import torch
    from monai.data import DataLoader, list_data_collate

    from fedtextseg import engine
    from fedtextseg.losses import PartialLabelLoss
    from fedtextseg.models import create_model
    from fedtextseg.privacy.dpsgd import make_private

    if threads:
        torch.set_num_threads(threads)
    device = engine.resolve_device("auto")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name, kwargs = model_spec(model_name)
        model = create_model(name, **_bank(), **kwargs)
    patch = PATCHES.get(model_name, model.patch_size)
    model = engine.prepare_model(model, device).train()
    data = _dataset(model, volumes, crops, patch, device)
    loss_fn = PartialLabelLoss("masked")
    optimizer = engine.make_optimizer(model, 1e-4)
    times: list[float] = []
    cpu: list[float] = []
    hook = lambda step, loss: (times.append(time.perf_counter()), cpu.append(time.process_time()))  # noqa: E731
    parts = None
    if mode == "plain":
        loader = DataLoader(data, batch_size=volumes, shuffle=False, collate_fn=list_data_collate)
    else:
        parts = make_private(model, data, optimizer, loss_fn, noise_multiplier=1.0, max_grad_norm=1.0,
                             sample_rate=1.0, steps=steps + 1, mode=mode.removeprefix("dp-"))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start, cpu_start = time.perf_counter(), time.process_time()
    common = dict(steps=steps + 1, device=device, precision=precision, step_hook=hook, log_every=0,
                  label=f"{model_name} {mode} {precision}")
    if parts is None:
        engine.train_steps(model, loader, loss_fn=loss_fn, optimizer=optimizer, grad_clip=12.0, **common)
    else:
        parts.train_steps(**common)  # the site's DP round: DP-SGD's clipping, fp32 where the mode needs it
    if device.type == "cuda":
        torch.cuda.synchronize()
    if parts is not None:
        parts.close()
    step_times = [b - a for a, b in zip([start] + times[:-1], times)][1:]  # the first step warms up
    cpu_times = [b - a for a, b in zip([cpu_start] + cpu[:-1], cpu)][1:]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"model": model_name, "mode": mode, "precision": precision, "patch": list(patch), "volumes": volumes, "crops": crops,
            "rows": volumes * crops, "trainable_params": trainable, "steps_timed": len(step_times),
            "step_seconds_median": statistics.median(step_times), "step_seconds_all": step_times,
            "cpu_seconds_median": statistics.median(cpu_times),
            "peak_bytes": _peak_bytes(device, baseline),
            "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "ru_maxrss growth during training"}


def device_description() -> dict:
    import opacus
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "opacus": opacus.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["device"] = f"CUDA: {torch.cuda.get_device_name(0)}"
    else:
        from fedtextseg.engine import CPU_BF16_FLAGS, cpu_flags
        from fedtextseg.tracking import cpu_model

        info["device"] = f"CPU: {cpu_model()}"
        info["cpu_bf16_flags"] = sorted(CPU_BF16_FLAGS & cpu_flags())
        try:
            info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            pass
    return info


def _native_precisions() -> list[str]:
    from fedtextseg import engine

    return ["fp32"] + (["bf16"] if engine.resolve_precision(engine.resolve_device("auto")) == "bf16" else [])


def _table(rows: list[dict]) -> str:
    lines = ["| model | mode | precision | patch | volumes x crops | wall s/step | x plain | CPU s/step | x plain | "
             "peak memory (MB) | x plain |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    plain = {(r["model"], r["precision"]): r for r in rows if r["mode"] == "plain" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['precision']} | | | failed: {r['error'][:80]} | | | | | |")
            continue
        p = plain.get((r["model"], r["precision"]))
        t_ratio = f"{r['step_seconds_median'] / p['step_seconds_median']:.2f}" if p else ""
        c_ratio = f"{r['cpu_seconds_median'] / p['cpu_seconds_median']:.2f}" if p else ""
        m_ratio = f"{r['peak_bytes'] / p['peak_bytes']:.2f}" if p and p["peak_bytes"] > 0 else ""
        lines.append(f"| {r['model']} | {r['mode']} | {r['precision']} | {'x'.join(map(str, r['patch']))} | {r['volumes']} x "
                     f"{r['crops']} | {r['step_seconds_median']:.3f} | {t_ratio} | {r['cpu_seconds_median']:.3f} | "
                     f"{c_ratio} | {r['peak_bytes'] / 2**20:.0f} | {m_ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["cdpdnet_tiny_nodino", "cdpdnet_small"],
                   help="model names (default: the demo's model and cdpdnet_small)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--precisions", nargs="+", default=None, choices=("fp32", "bf16"),
                   help="default: fp32, plus bf16 where the engine picks it (CUDA, AMX CPUs)")
    p.add_argument("--volumes", type=int, default=2)
    p.add_argument("--crops", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "privacy_overhead")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "MODE", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args.volumes, args.crops, args.steps, args.threads)))
        return 0
    precisions = args.precisions or _native_precisions()
    runs = [(model, mode, precision) for model in args.models for precision in precisions for mode in args.modes
            if precision == "fp32" or mode not in FP32_ONLY]
    rows = []
    for model, mode, precision in runs:
        cmd = [sys.executable, __file__, "--worker", model, mode, precision, "--volumes", str(args.volumes),
               "--crops", str(args.crops), "--steps", str(args.steps)] + (
                   ["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"model": model, "mode": mode, "precision": precision, "error": err})
        else:
            rows.append(json.loads(line[len("RESULT "):]))
        r = rows[-1]
        figures = (f"{r['step_seconds_median']:.3f} s/step ({r['cpu_seconds_median']:.3f} CPU s), peak "
                   f"{r['peak_bytes'] / 2**20:.0f} MB" if "error" not in r else f"failed ({r['error']})")
        print(f"{model:>20} {mode:>13} {precision}: {figures}", flush=True)
    info = device_description()
    table = _table(rows)
    print(f"\nDP-SGD overhead on {info['device']} (torch {info['torch']}, opacus {info['opacus']}, "
          f"{info['torch_threads']} threads)\n\n{table}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"device": info, "results": rows}, indent=2))
    args.out.with_suffix(".md").write_text(
        f"# DP-SGD overhead (benchmarks/privacy_overhead.py)\n\nDevice: {info['device']}; torch {info['torch']}, "
        f"opacus {info['opacus']}, {info['torch_threads']} torch threads"
        + (f", CPU bf16 flags {info['cpu_bf16_flags'] or 'none'}" if "cpu_bf16_flags" in info else "")
        + (f", load average at start {info['load_average_at_start']}" if "load_average_at_start" in info else "")
        + ".\nMedian wall-clock and process-CPU time per local step after one warm-up step (on a shared "
        "machine the CPU time is the steadier figure); peak memory is "
        + ("CUDA max_memory_allocated." if "CUDA" in info["device"] else
           "the growth of the process's peak resident set during training (CPU).")
        + f"\n\n{table}\n")
    print(f"\nwritten: {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
