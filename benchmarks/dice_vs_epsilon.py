"""Benchmark: global-model Dice against each site's privacy budget epsilon (DP-SGD), on the synthetic hospitals.

    python benchmarks/dice_vs_epsilon.py [--epsilons 1 4 8 inf] [--rounds 3] [--steps 10] [--overrides "..."]

Each budget is one federated run (in process, the same Coordinator and SiteRunner rounds as the Flower apps; the
simulated Flower transport does not change the numbers) with a tiny CDPDNet; ``inf`` is the same run without DP.
Prints a table of mean Dice on the unseen hospital and on the sites' validation cases, plus each site's final
epsilon, and writes ``benchmarks/results/dice_vs_epsilon.{json,md}``. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(epsilon: float, args, work: Path) -> dict:
    from fedtextseg.config import compose_config
    from fedtextseg.federation.inprocess import run_federation_inprocess
    from fedtextseg.metrics import mean_over_classes
    from fedtextseg.tracking import dice_table, read_metrics

    privacy = ["privacy=none"] if math.isinf(epsilon) else ["privacy=dp", f"privacy.target_epsilon={epsilon}"]
    cfg = compose_config("demo", [
        f"data.root={args.data}", f"federation.rounds={args.rounds}", f"train.local_steps={args.steps}",
        "eval.max_cases=2", "eval.hd95=false", "run.threads=null", *privacy, *args.overrides.split(),
    ])
    run_dir = work / f"eps-{epsilon}"
    start = time.perf_counter()
    run_federation_inprocess(cfg, run_dir, log_fn=lambda *_: None)
    rows = read_metrics(run_dir / "metrics.jsonl")
    unseen = {c: next(iter(v.values())) for c, v in dice_table(rows, "unseen_eval").items()}
    sites = dice_table(rows, "site_eval")
    site_mean = [v for per in sites.values() for v in per.values() if v is not None]
    eps_rows = [r for r in rows if r["kind"] == "privacy"]
    last = max((r["round"] for r in eps_rows), default=None)
    spent = {r["site"]: r.get("epsilon") for r in eps_rows if r["round"] == last}
    return {
        "target_epsilon": None if math.isinf(epsilon) else epsilon,
        "unseen_mean_dice": mean_over_classes({c: {"dice": v} for c, v in unseen.items() if v is not None}),
        "site_mean_dice": sum(site_mean) / len(site_mean) if site_mean else float("nan"),
        "epsilon_spent": spent,
        "declined": sum(1 for r in rows if r["kind"] == "failure" and "budget" in str(r.get("reason", ""))),
        "seconds": time.perf_counter() - start,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epsilons", nargs="+", default=["1", "4", "8", "inf"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--data", type=Path, default=Path("data/synthetic"), help="synthetic hospitals (made if absent)")
    p.add_argument("--overrides", default="", help="extra Hydra overrides for every run")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    args.data = args.data.resolve()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for eps in args.epsilons:
            rows.append(run_one(float(eps), args, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    lines = ["# Dice vs privacy budget (DP-SGD at every site)", "",
             f"Machine: {platform.machine()} CPU; {args.rounds} rounds x {args.steps} local steps, cdpdnet_tiny, "
             f"synthetic hospitals; Dice = mean over classes (unseen hospital: all its cases; sites: 2 validation "
             f"cases each). The tiny model is far from converged at this budget: compare rows, not absolute values.",
             "", "| target epsilon | unseen mean Dice | sites' mean Dice | epsilon spent per site | declined | s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        spent = ", ".join(f"{s}: {e:.2f}" for s, e in sorted(r["epsilon_spent"].items()) if e is not None) or "-"
        lines.append(f"| {r['target_epsilon'] if r['target_epsilon'] is not None else 'inf (no DP)'} | "
                     f"{r['unseen_mean_dice']:.3f} | {r['site_mean_dice']:.3f} | {spent} | {r['declined']} | "
                     f"{r['seconds']:.0f} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dice_vs_epsilon.json").write_text(json.dumps(rows, indent=2))
    (args.out / "dice_vs_epsilon.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
