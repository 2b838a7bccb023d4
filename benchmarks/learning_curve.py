"""Benchmark: how fast pooled training reaches Dice on the unseen hospital (the CPU learning-speed figure).

    python benchmarks/learning_curve.py [--experiment demo] [--overrides "..."] [--steps 1200] [--eval-every 200]

One model trained on the pooled synthetic sites (the experiment's data, model and loss; one AdamW optimizer and a
cosine learning rate over all ``--steps``), evaluated every ``--eval-every`` steps on ``--cases`` whole volumes of the
unseen, fully labeled hospital (sliding window, the experiment's threshold and clean-up). Prints one line per
checkpoint (mean Dice over the organs, over every class, per organ, seconds per step) and writes
``benchmarks/results/learning_curve.{json,md}``. docs/learning_speed.md records what it measured. It never asserts a
figure: they depend on the machine and the seed, which are recorded with them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
_NOTABLE_FLAGS = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def learning_curve(experiment: str, overrides: str, steps: int, eval_every: int, cases: int, threads: int | None,
                   log=print) -> dict:
    import numpy as np
    import torch
    from torch.utils.data import ConcatDataset

    from fedtextseg import engine
    from fedtextseg.config import compose_config
    from fedtextseg.data.dataset import make_loader
    from fedtextseg.synthetic.phantom import ORGANS
    from fedtextseg.runtime import SiteRunner, build_model, prepare_bank
    from fedtextseg.sites import ensure_data, unseen_site

    if threads:
        torch.set_num_threads(threads)
    cfg = compose_config(experiment, overrides)
    torch.manual_seed(int(cfg.run.seed))
    bank = prepare_bank(cfg, log_fn=log)
    model = build_model(cfg, bank)
    runners = [SiteRunner(cfg, site, model) for site in ensure_data(cfg, log_fn=log)]
    unseen_path = unseen_site(cfg)
    if unseen_path is None:
        raise SystemExit(f"experiment {experiment!r} has no unseen hospital (data.unseen) to evaluate on")
    device = runners[0].device
    model = engine.prepare_model(model, device)
    unseen = SiteRunner(cfg, unseen_path, model)
    unseen_ds = unseen.all_cases_dataset()
    pooled = ConcatDataset([r.data.train_ds for r in runners])
    for r in runners:
        r.data.train_ds.transform.set_random_state(seed=int(cfg.run.seed))
    loader = make_loader(pooled, batch_size=int(cfg.train.batch_size), shuffle=True,
                         generator=torch.Generator().manual_seed(int(cfg.run.seed)))
    optimizer = engine.make_optimizer(model, float(cfg.train.lr), float(cfg.train.weight_decay), cfg.train.optimizer)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)

    def batches():
        while True:
            yield from loader

    stream, done, train_seconds, points = batches(), 0, 0.0, []
    while done < steps:
        chunk = min(eval_every, steps - done)
        start = time.perf_counter()
        stats = engine.train_steps(model, (next(stream) for _ in range(chunk)), loss_fn=runners[0].loss_fn,
                                   optimizer=optimizer, steps=chunk, device=device, precision=cfg.run.precision,
                                   grad_clip=cfg.train.grad_clip, step_hook=lambda *_: schedule.step())
        train_seconds += time.perf_counter() - start
        done += chunk
        unseen.model = model
        summary = unseen.evaluate(unseen_ds, max_cases=cases)
        organs = {c: summary[c]["dice"] for c in ORGANS if c in summary}
        every = [v["dice"] for v in summary.values() if "dice" in v]
        point = {"step": done, "train_seconds": round(train_seconds, 1), "seconds_per_step": train_seconds / done,
                 "loss": stats.loss, "organ_mean_dice": float(np.nanmean(list(organs.values()))),
                 "organ_dice_per_cpu_minute": float(np.nanmean(list(organs.values()))) / (train_seconds / 60),
                 "class_mean_dice": float(np.nanmean(every)), "organs": organs}
        points.append(point)
        log(f"step {done}: organs {point['organ_mean_dice']:.3f}, all classes {point['class_mean_dice']:.3f}, "
            f"{point['seconds_per_step']:.2f} s/step | " + " ".join(f"{c}={d:.2f}" for c, d in organs.items()))
    return {"experiment": experiment, "overrides": overrides, "steps": steps, "unseen_cases": cases,
            "model": cfg.model.name, "dino": model.provenance["dino"], "torch_threads": torch.get_num_threads(),
            "precision": engine.resolve_precision(device, cfg.run.precision),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "device": str(device), "cpu_flags": sorted(engine.cpu_flags() & _NOTABLE_FLAGS)},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "points": points}


def _markdown(result: dict) -> str:
    organs = list(result["points"][-1]["organs"]) if result["points"] else []
    lines = [f"# Learning curve: {result['experiment']} {result['overrides']}".rstrip(), "",
             f"{result['date']}, {result['machine']['processor']} ({result['torch_threads']} torch threads, CPU flags "
             f"{' '.join(result['machine']['cpu_flags']) or 'none of note'}), device {result['machine']['device']}, "
             f"precision {result['precision']}; unseen hospital, {result['unseen_cases']} cases.", "",
             "| step | s/step | organ mean | organ Dice / CPU min | all classes | " + " | ".join(organs) + " |",
             "|---" * (5 + len(organs)) + "|"]
    for p in result["points"]:
        lines.append(f"| {p['step']} | {p['seconds_per_step']:.2f} | {p['organ_mean_dice']:.3f} | "
                     f"{p['organ_dice_per_cpu_minute']:.3f} | "
                     f"{p['class_mean_dice']:.3f} | " + " | ".join(f"{p['organs'][c]:.2f}" for c in organs) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="demo")
    p.add_argument("--overrides", default="", help='Hydra overrides, e.g. "model=cdpdnet_tiny train.bce_weight=1"')
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--cases", type=int, default=3, help="unseen-hospital cases per evaluation")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for learning_curve.{json,md}")
    args = p.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1:
        p.error("--steps and --eval-every must be positive")
    result = learning_curve(args.experiment, args.overrides, args.steps, args.eval_every, args.cases, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learning_curve.json").write_text(json.dumps(result, indent=2))
    (args.out / "learning_curve.md").write_text(_markdown(result))
    print(f"wrote {args.out / 'learning_curve.json'} and learning_curve.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
