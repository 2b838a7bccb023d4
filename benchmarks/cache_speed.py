"""Benchmark: seconds per training batch read from the on-disk preprocessing cache vs the in-memory one.

    python benchmarks/cache_speed.py          # the demo's first site and batch, at its 6 mm voxels and at 2 mm
    python benchmarks/cache_speed.py --experiment demo --batches 40 --variant "data.preprocess.spacing=[4,4,4]"

A site's training batches come from its cached deterministic preprocessing (load, resample, window, crop to the
body) followed by the random part (crops, flips, intensity). ``disk`` is ``build_site_data(cache_dir=PATH)`` (MONAI
``PersistentDataset`` under the project's atomic, validated entries), ``memory`` is ``cache_dir=False`` (MONAI
``CacheDataset``). Both caches are filled before timing; then the same loader the clients use (``make_loader``, the
experiment's batch size, shuffled) draws ``--batches`` batches from each, alternating disk and memory batch by
batch so that both see the same machine load. Each ``--variant`` (Hydra overrides; default: the demo as it is, and
at 2 mm voxels, whose volumes are 27x larger) is one pair of rows. Prints the table and writes
``benchmarks/results/cache_speed.{json,md}``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _first_site(cfg) -> Path:
    from fedtextseg.sites import ensure_data

    return ensure_data(cfg, log_fn=lambda *_: None)[0]


def _cpu_model() -> str:
    from fedtextseg.studies.runner import machine_info

    return str(machine_info().get("cpu_model") or platform.machine())


def measure(experiment: str, overrides: list[str], batches: int, threads: int) -> dict:
    import torch

    from fedtextseg.config import compose_config
    from fedtextseg.data.dataset import build_site_data, make_loader
    from fedtextseg.data.site import load_site
    from fedtextseg.runtime import preprocess_config

    torch.set_num_threads(threads)
    cfg = compose_config(experiment, overrides)
    site = load_site(_first_site(cfg), cfg.data.get("vocabulary"))
    pre = preprocess_config(cfg, None)
    batch_size = int(cfg.train.batch_size)
    with tempfile.TemporaryDirectory(prefix="fedtextseg-cache-bench-") as tmp:
        t0 = time.perf_counter()
        disk = build_site_data(site, pre, cache_dir=Path(tmp), seed=int(cfg.run.seed))
        for i in range(len(disk.train_ds)):  # fill the disk cache (first epoch of a fresh site)
            disk.train_ds[i]
        fill_disk = time.perf_counter() - t0
        t0 = time.perf_counter()
        memory = build_site_data(site, pre, cache_dir=False, seed=int(cfg.run.seed))
        fill_memory = time.perf_counter() - t0
        cache_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*.pt"))
        loaders = {name: make_loader(d.train_ds, batch_size=batch_size, shuffle=True,
                                     generator=torch.Generator().manual_seed(0))
                   for name, d in (("disk", disk), ("memory", memory))}
        iters = {name: iter(loader) for name, loader in loaders.items()}
        times: dict[str, list[float]] = {"disk": [], "memory": []}
        for _ in range(batches + 1):  # the first batch of each is a warm-up
            for name in ("disk", "memory"):
                t0 = time.perf_counter()
                try:
                    next(iters[name])
                except StopIteration:
                    iters[name] = iter(loaders[name])
                    next(iters[name])
                times[name].append(time.perf_counter() - t0)
    rows = []
    for name in ("memory", "disk"):
        samples = times[name][1:]
        rows.append({"cache": name, "s_per_batch_median": statistics.median(samples),
                     "s_per_batch_mean": statistics.fmean(samples), "batches": len(samples)})
    base = rows[0]["s_per_batch_median"]
    for r in rows:
        r["x_memory"] = r["s_per_batch_median"] / base
    return {
        "benchmark": "cache_speed", "experiment": experiment, "overrides": overrides, "site": site.name,
        "train_cases": len(disk.train_cases), "batch_size": batch_size, "num_crops": int(pre.num_crops),
        "patch_size": list(pre.patch_size), "spacing": list(pre.spacing), "torch_threads": threads,
        "fill_disk_s": fill_disk, "fill_memory_s": fill_memory, "disk_cache_bytes": cache_bytes, "rows": rows,
        "machine": f"{_cpu_model()}, {os.cpu_count()} CPUs",
        "load_average": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def write(results: list[dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cache_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    first = results[0]
    lines = [
        "# Preprocessing cache: disk vs memory (benchmarks/cache_speed.py)", "",
        f"{first['date']}, {first['machine']}, {first['torch_threads']} torch thread(s). Site {first['site']} of "
        f"`{first['experiment']}` ({first['train_cases']} training volumes), batches of {first['batch_size']} volumes "
        f"x {first['num_crops']} crops of {'x'.join(map(str, first['patch_size']))} voxels through the clients' "
        f"loader, {first['rows'][0]['batches']} batches from each cache, alternating (same machine load).", "",
        "| variant | voxels (mm) | disk cache (MiB) | cache | s/batch (median) | s/batch (mean) | x memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for r in result["rows"]:
            lines.append(f"| {' '.join(result['overrides']) or 'as configured'} | "
                         f"{'x'.join(f'{v:g}' for v in result['spacing'])} | {result['disk_cache_bytes'] / 2**20:.1f} | "
                         f"{r['cache']} | {r['s_per_batch_median']:.4f} | {r['s_per_batch_mean']:.4f} | "
                         f"{r['x_memory']:.2f} |")
    (out_dir / "cache_speed.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--variant", action="append", default=None,
                        help="space-separated Hydra overrides of one variant (repeatable; default: as configured "
                             "and at 2 mm voxels)")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo's clients use 1)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    variants = args.variant if args.variant is not None else ["", "data.preprocess.spacing=[2,2,2]"]
    results = [measure(args.experiment, v.split(), args.batches, args.threads) for v in variants]
    write(results, args.out)
    print((args.out / "cache_speed.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
