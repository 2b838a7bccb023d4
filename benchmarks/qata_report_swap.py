"""Benchmark (does the report steer the mask?): a trained TGC-Net on QaTa-COV19 valid/ images whose report names
one lung, segmented once with its own report and once with the same report naming the other lung.

    python benchmarks/qata_report_swap.py [--model results/studies/qata/runs/fed-text/seed0/model.pt] [--limit N]

For every valid image with a unilateral report ("unilateral pulmonary infection, one infected area, lower right
lung."), the swapped report names the same zones of the other lung. Reported: Dice against the expert mask with
each report, the share of the predicted area that lies on the reported lung's half of the image (with the
expert masks' own share as the reference), and how much the two masks differ. A model that
ignores its report gives the same mask twice. Prints a table and writes
``benchmarks/results/qata_report_swap.{json,md}``; nothing is asserted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "benchmarks" / "results"


def _swap_side(pairs: set[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted((zone, "left" if side == "right" else "right") for zone, side in pairs)


def _share_on(side: str, mask: np.ndarray) -> float:
    """Share of the mask's pixels on ``side``'s half of the image. In QaTa-COV19 the lung a report calls "right"
    is on the image's right half: the expert masks of its unilateral valid/ reports lie there (the table's last
    row measures it), not on the left half the radiological convention would put it."""
    half = mask.shape[1] // 2
    on = mask[:, half:].sum() if side == "right" else mask[:, :half].sum()
    return float(on / mask.sum()) if mask.sum() else float("nan")


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from fedtextseg.data.qata import parse_qata_caption, qata_caption
    from fedtextseg.data.xray_site import load_png
    from fedtextseg.metrics import dice_score
    from fedtextseg.predict_xray import XrayPredictor
    from fedtextseg.tracking import cpu_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=PROJECT / "results/studies/qata/runs/fed-text/seed0/model.pt")
    p.add_argument("--qata", type=Path, default=Path(os.environ.get("FEDTEXTSEG_QATA")
                                                     or PROJECT.parent / "shared/data/qata-cov19"))
    p.add_argument("--limit", type=int, default=None, help="at most this many unilateral images")
    args = p.parse_args(argv)
    if not (args.qata / "valid.csv").is_file() or not args.model.is_file():
        print(f"qata_report_swap: needs QaTa-COV19 at {args.qata} and a trained model at {args.model} "
              "(fedtextseg study qata)")
        return 1
    predictor = XrayPredictor.from_file(args.model)
    with (args.qata / "valid.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if len({s for _, s in parse_qata_caption(r["caption"])}) == 1]
    rows = rows[: args.limit] if args.limit else rows
    start, per_image = time.perf_counter(), []
    for row in rows:
        pairs = parse_qata_caption(row["caption"])
        side = next(iter(pairs))[1]
        image = load_png(args.qata / "valid" / row["image"])
        truth = np.asarray(Image.open(args.qata / "valid" / row["mask"]).convert("L")) > 127
        own = predictor.predict_array(image, row["caption"])[1][0].astype(bool)
        swapped = predictor.predict_array(image, qata_caption(_swap_side(pairs)))[1][0].astype(bool)
        changed = np.logical_xor(own, swapped).sum() / max(1, np.logical_or(own, swapped).sum())
        per_image.append({"image": row["image"], "side": side, "dice_own": dice_score(own, truth),
                          "dice_swapped": dice_score(swapped, truth), "share_own": _share_on(side, own),
                          "share_swapped": _share_on(side, swapped), "share_truth": _share_on(side, truth),
                          "changed": float(changed)})

    def mean(key: str) -> float:
        vals = [r[key] for r in per_image if np.isfinite(r[key])]
        return float(np.mean(vals)) if vals else float("nan")

    summary = {"model": str(args.model), "images": len(per_image), "cpu": cpu_model(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "seconds": time.perf_counter() - start,
               **{k: mean(k) for k in ("dice_own", "dice_swapped", "share_own", "share_swapped", "share_truth",
                                       "changed")}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "qata_report_swap.json").write_text(json.dumps({"summary": summary, "images": per_image}, indent=2))
    lines = ["# Does the report steer the mask? (QaTa-COV19 valid/, unilateral reports)", "",
             f"Ran {summary['date']} on {summary['cpu']}: `python benchmarks/qata_report_swap.py` with "
             f"`{args.model.relative_to(PROJECT) if args.model.is_relative_to(PROJECT) else args.model}`, "
             f"{summary['images']} images whose report names one lung, each segmented with its own report and with "
             "the same zones of the other lung.", "",
             "| report | Dice vs the expert mask "
             "| share of the predicted area on the side the image's own report names |",
             "|---|---|---|",
             f"| its own | {summary['dice_own']:.3f} | {summary['share_own']:.3f} |",
             f"| naming the other lung | {summary['dice_swapped']:.3f} | {summary['share_swapped']:.3f} |",
             f"| (the expert mask itself) | 1.000 | {summary['share_truth']:.3f} |", "",
             f"The two masks differ in {summary['changed']:.1%} of their union, on average."]
    (RESULTS / "qata_report_swap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
