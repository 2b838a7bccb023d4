"""Benchmark (which input size gives the best Dice per CPU minute?): TGC-Net on QaTa-COV19 trained on the pooled
hospitals at 96, 128 and 224 px for the same CPU time, each scored on valid/ at the masks' own 224 px.

    python benchmarks/qata_resolution.py [--sizes 96,128,224] [--cpu-minutes 8] [--epochs 12]

Per size: a short probe measures the production step (``engine.train_steps`` inside ``train_centralized``, one
torch thread, its second epoch); the run then trains ``--epochs`` epochs (cosine schedule, the study's recipe ``tgcnet_qata``) with
as many steps as ``--cpu-minutes`` of that step allow. The trained model is scored twice on all 300 valid/ images,
with each image's own report: at its input size (the study's number) and upsampled to the expert masks' 224 px (the
one that compares sizes). Prints a table and writes ``benchmarks/results/qata_resolution.{json,md}``; nothing is
asserted. Needs ../shared/data/qata-cov19 (or FEDTEXTSEG_QATA).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "benchmarks" / "results"


def _train(size: int, epochs: int, steps: int, out: Path, quiet: bool) -> tuple[Path, float, list[dict]]:
    """One centralized run at ``size`` px; its run folder, CPU seconds and metrics rows."""
    from fedtextseg.centralized import train_centralized
    from fedtextseg.config import compose_config
    from fedtextseg.tracking import read_metrics

    cfg = compose_config("tgcnet_qata", [f"model.kwargs.image_size={size}", f"federation.rounds={epochs}",
                                         f"train.local_steps={steps}", "eval.max_cases=8", "run.threads=1",
                                         f"run.name=res{size}"])
    start = time.process_time()
    run_dir = train_centralized(cfg, out / f"res{size}-{epochs}x{steps}", log_fn=(lambda *_: None) if quiet else print)
    return run_dir, time.process_time() - start, read_metrics(run_dir)


def _score_at_mask_size(model_file: Path, qata: Path) -> dict[str, float]:
    """Per-image mean and pooled Dice on valid/, predictions upsampled to the expert masks' own size."""
    from PIL import Image

    from fedtextseg.data.xray_site import load_png
    from fedtextseg.predict_xray import XrayPredictor

    predictor = XrayPredictor.from_file(model_file)
    dice, inter, total = [], 0, 0
    with (qata / "valid.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            truth = np.asarray(Image.open(qata / "valid" / row["mask"]).convert("L")) > 127
            pred = predictor.predict_array(load_png(qata / "valid" / row["image"]), row["caption"])[1][0] > 0
            i, s = int((pred & truth).sum()), int(pred.sum() + truth.sum())
            inter, total = inter + i, total + s
            if s:
                dice.append(2.0 * i / s)
    return {"dice_per_image": float(np.mean(dice)), "dice_pooled": 2.0 * inter / max(total, 1),
            "mask_size": int(truth.shape[0])}


def main(argv: list[str] | None = None) -> int:
    import torch

    from fedtextseg.tracking import cpu_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="96,128,224")
    p.add_argument("--cpu-minutes", type=float, default=8.0, help="training CPU time per size (one thread)")
    p.add_argument("--epochs", type=int, default=12, help="epochs of the cosine schedule (steps follow the budget)")
    p.add_argument("--probe-steps", type=int, default=4, help="steps per site of the timing probe")
    p.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    qata = Path(os.environ.get("FEDTEXTSEG_QATA") or PROJECT.parent / "shared/data/qata-cov19")
    if not (qata / "valid.csv").is_file():
        print(f"qata_resolution: needs QaTa-COV19 at {qata} (set FEDTEXTSEG_QATA)")
        return 1
    os.chdir(PROJECT)  # the data config's paths are relative to the project root
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="qata-resolution-"))
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        _, _, probe = _train(size, 2, args.probe_steps, out / "probe", args.quiet)
        train = [r for r in probe if r["kind"] == "train"][-1]  # the second epoch: warm
        s_step = train["train_seconds"] / train["train_steps"]
        steps = max(1, round(args.cpu_minutes * 60 / (s_step * args.epochs * 3)))  # 3 hospitals' steps an epoch
        run_dir, cpu_s, metrics = _train(size, args.epochs, steps, out, args.quiet)
        final = [r for r in metrics if r["kind"] == "unseen_eval" and r["round"] == args.epochs][0]
        trained = sum(r["train_seconds"] for r in metrics if r["kind"] == "train")
        row = {"size": size, "s_per_step": s_step, "steps": steps * 3 * args.epochs, "train_cpu_minutes": trained / 60,
               "run_cpu_minutes": cpu_s / 60, "dice_per_image_at_input": final["dice"],
               "dice_pooled_at_input": final["dice_pooled"], **_score_at_mask_size(run_dir / "model.pt", qata)}
        row["dice_per_image_per_train_cpu_minute"] = row["dice_per_image"] / row["train_cpu_minutes"]
        rows.append(row)
        print(json.dumps(row))
    summary = {"cpu": cpu_model(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "budget_cpu_minutes": args.cpu_minutes, "epochs": args.epochs, "threads": 1,
               "experiment": "tgcnet_qata (centralized, reports read by MiniLM)", "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "qata_resolution.json").write_text(json.dumps(summary, indent=2))
    mask = rows[0]["mask_size"]
    lines = ["# TGC-Net on QaTa-COV19: input size at an equal CPU budget", "",
             f"Ran {summary['date']} on {summary['cpu']}, one torch thread: `python benchmarks/qata_resolution.py "
             f"--cpu-minutes {args.cpu_minutes:g} --epochs {args.epochs}`. Centralized training on the 3 QaTa hospitals "
             f"(the study's `central-text` recipe), {args.epochs} epochs, steps set by the budget; Dice on all 300 "
             f"valid/ images with their own reports, at the model's input size and upsampled to the masks' {mask} px.",
             "", "| input px | s / step | steps | training CPU min | per-image Dice (input px) | pooled (input px) "
             f"| per-image Dice ({mask} px) | pooled ({mask} px) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['s_per_step']:.2f} | {r['steps']} | {r['train_cpu_minutes']:.1f} "
                     f"| {r['dice_per_image_at_input']:.3f} | {r['dice_pooled_at_input']:.3f} "
                     f"| {r['dice_per_image']:.3f} | {r['dice_pooled']:.3f} |")
    (RESULTS / "qata_resolution.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
