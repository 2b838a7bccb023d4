"""Performance harness: where the time, memory and bytes of a fedtextseg run go, on this machine. Figures, never
assertions.

    python benchmarks/performance.py                    # CPU-sized, ~15 min on 2 cores
    python benchmarks/performance.py --skip flower      # without the Flower simulation (no Ray)
    python benchmarks/performance.py --rounds 3 --local-steps 10,25 --out results/studies

Sections (each can be skipped with ``--skip``):

* ``step``: local training step time and peak memory with and without the DINOv2 feature cache
  (``benchmarks/train_step.py``), and plain vs DP-SGD (``benchmarks/privacy_overhead.py``), each in its own process;
* ``flower``: the Flower overhead: the same federated configuration run as a Flower simulation (``fedtextseg
  simulate``: SuperLink, Ray, messages) and directly in one process (``run_federation_inprocess``: the same
  Coordinator and SiteRunner rounds). The simulation gets all cores per site, so sites train one at a time in both.
  Also the bytes per round per site measured on Flower's messages against the arrays' own size;
* ``inference``: segmenting one whole volume of the unseen hospital with the trained model file
  (``fedtextseg.predict``: preprocessing, sliding window, inverse resampling).

Writes ``<out>/performance/{table.md, table.csv, study.json, performance.png}`` (the results page picks them up)
with the device it ran on.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
SECTIONS = ("step", "flower", "inference")
DATA = PROJECT / "data" / "studies" / "synthetic-4x4"  # the studies' 4 synthetic hospitals (made on first use)


def _run_json(cmd: list[str], result: Path) -> object:
    """Run a benchmark script in its own process and read the JSON it writes."""
    subprocess.run(cmd, check=True, cwd=PROJECT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(result.read_text())


def step_rows(args, work: Path) -> list[dict]:
    """Training step: precision, layout and DINOv2 cache vs recompute (train_step.py) and plain vs DP-SGD (privacy_overhead.py)."""
    rows = []
    cache = _run_json([sys.executable, "benchmarks/train_step.py", "--overrides", "model=cdpdnet_tiny", "--steps",
                       str(args.steps), "--out", str(work / "train_step")], work / "train_step" / "train_step.json")
    for r in cache["rows"]:
        rows.append({"section": "training step", "variant": f"{r['variant']} ({r['patches']} patches)",
                     "seconds": r["step_s_median"], "peak_mb": r["peak_mb"], "device": r["device"]})
    dp = _run_json([sys.executable, "benchmarks/privacy_overhead.py", "--models", "cdpdnet_tiny", "--modes", "plain",
                    "dp-microbatch", "dp-hooks", "--precisions", "fp32", "--steps", str(args.steps), "--out", str(work / "privacy_overhead")],
                   work / "privacy_overhead.json")
    for r in dp["results"]:
        rows.append({"section": "training step", "variant": f"{'DP-SGD' if r['mode'] != 'plain' else 'no DP'} "
                     f"({r['mode']}, cached features, {r['volumes']} volumes x {r['crops']} patches)", "seconds": r["step_seconds_median"],
                     "peak_mb": r["peak_bytes"] / 2**20, "device": dp["device"]["device"]})
    return rows


def _round_times(run_dir: Path, launched: float) -> tuple[float, float]:
    """(seconds from launch to the first round's record, median seconds between consecutive rounds' records: a
    round's training + the previous round's evaluation). The median, because one round on a shared 2-core machine
    can be slowed by anything else that runs."""
    import statistics

    from fedtextseg.tracking import read_metrics

    times = [r["time"] for r in read_metrics(run_dir) if r.get("kind") == "round"]
    gaps = [b - a for a, b in zip(times, times[1:])]
    return (times[0] - launched if times else float("nan"),
            statistics.median(gaps) if gaps else float("nan"))


def _overrides(args, out: Path, local_steps: int) -> list[str]:
    return [f"federation.rounds={args.rounds}", f"train.local_steps={local_steps}",
            f"data.root={DATA}", "data.generate.cases_per_site=4", "eval.max_cases=1",
            "eval.overlap=0.0", "eval.hd95=false", f"run.results_dir={out}", *args.override]


def _flower_pair(args, work: Path, local_steps: int) -> tuple[list[dict], Path, Path]:
    """One federated configuration run in one process and then as a Flower simulation; rows and both run folders."""
    from fedtextseg.config import compose_config
    from fedtextseg.federation.inprocess import run_federation_inprocess

    overrides, tag = _overrides(args, work, local_steps), f"{local_steps} local steps"
    inproc_dir, flower_dir = work / f"inprocess-{local_steps}", work / f"flower-{local_steps}"
    # both arms train on every core: in process torch's default, in Flower `fedtextseg simulate` sets run.threads to
    # --cpus-per-site (the demo's own run.threads is 1, for sites side by side)
    cfg = compose_config("demo", overrides + ["run.threads=null"])
    launched, start = time.time(), time.perf_counter()
    run_federation_inprocess(cfg, inproc_dir, log_fn=lambda *_: None)
    inproc_total = time.perf_counter() - start
    inproc_start, inproc_round = _round_times(inproc_dir, launched)
    rows = [{"section": "federated run", "variant": f"in process (Coordinator + SiteRunner), {tag}",
             "seconds": inproc_total, "per_round_s": inproc_round},
            {"section": "federated run", "variant": f"in process: start-up to the first round's end, {tag}",
             "seconds": inproc_start}]
    if "flower" in args.skip:
        return rows, inproc_dir, flower_dir
    launched, start = time.time(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedtextseg.cli", "simulate", "--experiment", "demo", "--run-name",
                    flower_dir.name, "--cpus-per-site", str(os.cpu_count() or 1), "--overrides", " ".join(overrides)],
                   check=True, cwd=PROJECT)
    flower_total = time.perf_counter() - start
    flower_start, flower_round = _round_times(flower_dir, launched)
    rows += [{"section": "federated run", "variant": f"Flower simulation (flwr run, Ray), {tag}",
              "seconds": flower_total, "per_round_s": flower_round},
             {"section": "federated run", "variant": "Flower: start-up to the first round's end (SuperLink, Ray, "
              f"app bundle, frozen parts sent), {tag}", "seconds": flower_start},
             {"section": "federated run", "variant": f"Flower overhead, {tag} (per round "
              f"{flower_round / inproc_round:.2f}x in process)", "seconds": flower_total - inproc_total,
              "per_round_s": flower_round - inproc_round}]
    return rows, inproc_dir, flower_dir


def flower_rows(args, work: Path) -> tuple[list[dict], Path]:
    """The same federated runs through Flower and in one process, at each ``--local-steps`` (a short round shows the
    fixed cost of a round's messages, the demo's 25 steps what a user pays); returns rows and an in-process run
    folder (for the inference section)."""
    from fedtextseg.tracking import read_metrics

    rows, flower_dir, inproc_dir = [], None, None
    for local_steps in args.local_steps:
        pair, inproc_dir, flower_dir = _flower_pair(args, work, local_steps)
        rows += pair
    if "flower" in args.skip:
        return rows, inproc_dir
    meta = json.loads((flower_dir / "metadata.json").read_text())
    sites = [r for r in read_metrics(flower_dir) if r.get("kind") == "train" and r.get("bytes_received")]
    if sites:
        rows.append({"section": "bytes per round per site", "variant": "Flower message, site -> server (measured)",
                     "mb": sum(r["bytes_received"] for r in sites) / len(sites) / 1e6})
        for label, keep in (("round 1, with the frozen parts", lambda rnd: rnd == 1),
                            ("later rounds", lambda rnd: rnd > 1)):
            sent = [r["bytes_sent"] for r in sites if r.get("bytes_sent") and keep(int(r["round"]))]
            if sent:
                rows.append({"section": "bytes per round per site", "mb": sum(sent) / len(sent) / 1e6,
                             "variant": f"Flower message, server -> site, {label} (measured)"})
    rows.append({"section": "bytes per round per site", "variant": "shared + per-class arrays",
                 "mb": meta["wire_bytes"] / 1e6})
    rows.append({"section": "bytes per round per site", "variant": "full model (FedAvg of every tensor)",
                 "mb": meta["full_model_bytes"] / 1e6})
    return rows, inproc_dir


def inference_rows(run_dir: Path, work: Path, args) -> list[dict]:
    """Segment one whole volume of the unseen hospital with the run's model file."""
    from fedtextseg.predict import Predictor

    volume = sorted((DATA / "unseen" / "images").glob("*.nii.gz"))[0]
    predictor = Predictor.from_file(run_dir / "model.pt", task="btcv")
    predictor.predict_file(volume)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        predictor.predict_file(volume)
        times.append(time.perf_counter() - start)
    return [{"section": "inference", "variant": f"one volume ({volume.name}, {len(predictor.classes)} classes)",
             "seconds": sorted(times)[len(times) // 2]}]


def write_outputs(rows: list[dict], out: Path, args, elapsed: float) -> None:
    from matplotlib.figure import Figure

    from fedtextseg.studies.runner import machine_info

    info = {"study": "performance", "size": "cpu", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(), "command": "python benchmarks/performance.py " + " ".join(sys.argv[1:]),
            "elapsed_s": elapsed}
    (out / "study.json").write_text(json.dumps(info, indent=2))
    with (out / "table.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["section", "variant", "seconds", "per_round_s", "peak_mb", "mb", "device"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    def cell(r, key, digits):
        v = r.get(key)
        return "" if v is None else f"{v:.{digits}f}"

    m = info["machine"]
    lines = ["# Study `performance`: time, memory and bytes", "",
             f"Ran {info['date']} on {m['cpu_model']} ({m['cpus']} cores, {m['torch_threads']} torch threads, load "
             f"average {m['load_average']}), device {m['device']}, torch {m['torch']}, Flower {m.get('flwr')}. "
             f"Command: `{info['command']}`. Federated runs: demo experiment, 4 sites, {args.rounds} rounds x "
             f"{' and '.join(map(str, args.local_steps))} local steps. On a shared machine, wall times include other people's jobs.", "",
             "| section | variant | seconds | s / round | peak memory MB | MB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['section']} | {r['variant']} | {cell(r, 'seconds', 3)} | {cell(r, 'per_round_s', 2)} | "
              f"{cell(r, 'peak_mb', 0)} | {cell(r, 'mb', 2)} |" for r in rows]
    timed = [r for r in rows if r.get("seconds") is not None and r["section"] != "federated run"]
    if timed:
        fig = Figure(figsize=(7.5, 0.4 * len(timed) + 1.5), layout="constrained")
        ax = fig.subplots()
        ax.barh(range(len(timed)), [r["seconds"] for r in timed])
        ax.set_yticks(range(len(timed)), [f"{r['section']}: {r['variant']}" for r in timed], fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="seconds (median)", title=f"Step and inference time ({m['device']})")
        ax.grid(alpha=0.3, axis="x")
        fig.savefig(out / "performance.png", dpi=110, bbox_inches="tight")
        lines += ["", "![performance](performance.png)"]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=PROJECT / "results" / "studies")
    p.add_argument("--rounds", type=int, default=5, help="federated rounds (the per-round figure is the median of "
                   "the rounds - 1 gaps between them)")
    p.add_argument("--local-steps", type=lambda v: [int(x) for x in v.split(",")], default=[4, 25],
                   help="local steps per round, comma-separated: each is measured in process and through Flower")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per step variant")
    p.add_argument("--repeats", type=int, default=3, help="timed inference repeats")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    p.add_argument("override", nargs="*", help="extra Hydra overrides for the federated runs")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out.expanduser().resolve() / "performance"
    work = out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    start, rows = time.perf_counter(), []
    if "step" not in args.skip:
        rows += step_rows(args, work)
    fed_rows, run_dir = flower_rows(args, work)
    rows += fed_rows
    if "inference" not in args.skip:
        rows += inference_rows(run_dir, work, args)
    write_outputs(rows, out, args, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
