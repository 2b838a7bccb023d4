"""``fedtextseg train``: centralized (pooled) training on one or more sites, the upper bound federated runs are
compared with. Same model, same partial-label loss, same engine as a federated client; the only difference is that
batches are drawn from all sites' data in one place.

    fedtextseg train --experiment demo --overrides "train.epochs=5"

Writes ``results/<run>/``: config.yaml, metadata.json, metrics.jsonl (per-epoch train loss, per-class validation
Dice per site and on the unseen hospital), checkpoints, model.pt, summary.txt.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path

import torch
from monai.data import DataLoader
from omegaconf import DictConfig
from torch.utils.data import ConcatDataset

from fedtextseg import engine
from fedtextseg.config import compose_config, list_experiments
from fedtextseg.data.dataset import make_loader
from fedtextseg.metrics import mean_over_classes
from fedtextseg.runtime import SiteRunner, build_model, derived_seed, lr_for_round, prepare_bank
from fedtextseg.sites import ensure_data, unseen_site
from fedtextseg.tracking import RunRecorder, dice_table, environment_info, format_table, read_metrics

__all__ = ["train_centralized", "train_main"]


def train_centralized(cfg: DictConfig, run_dir: str | Path, *, epochs: int | None = None, log_fn=print) -> Path:
    """Train one model on the pooled sites; ``epochs`` x ``train.local_steps`` steps, evaluating every epoch."""
    recorder = RunRecorder(run_dir, cfg)
    torch.manual_seed(int(cfg.run.seed))
    bank = prepare_bank(cfg, log_fn=log_fn)
    model = build_model(cfg, bank)
    sites = ensure_data(cfg, log_fn=log_fn)
    runners = [SiteRunner(cfg, s, model) for s in sites]
    recorder.update_metadata(experiment=cfg.run.experiment, mode="centralized", provenance=model.provenance,
                             text_bank=bank.provenance(), environment=environment_info(),
                             sites=[r.site.name for r in runners])
    epochs = int(epochs or cfg.federation.rounds)
    pooled = ConcatDataset([r.data.train_ds for r in runners])
    device = runners[0].device
    model = engine.prepare_model(model, device)
    unseen_path = unseen_site(cfg)
    unseen = SiteRunner(cfg, unseen_path, model) if unseen_path else None
    unseen_ds = unseen.all_cases_dataset() if unseen else None
    steps = int(cfg.train.local_steps) * len(runners)  # same number of gradient steps as one federated round
    for epoch in range(1, epochs + 1):
        seed = derived_seed(cfg.run.seed, "centralized", epoch)
        torch.manual_seed(seed)
        for r in runners:
            r.data.train_ds.transform.set_random_state(seed=seed)
        loader: DataLoader = make_loader(pooled, batch_size=int(cfg.train.batch_size), shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
        optimizer = engine.make_optimizer(model, lr_for_round(cfg, epoch, epochs), float(cfg.train.weight_decay),
                                          cfg.train.optimizer)
        stats = engine.train_steps(model, loader, loss_fn=runners[0].loss_fn, optimizer=optimizer, steps=steps,
                                   device=device, precision=cfg.run.precision, grad_clip=cfg.train.grad_clip,
                                   log_every=int(cfg.train.log_every), label=f"[pooled] epoch {epoch}")
        recorder.log("train", epoch, site="pooled", **stats.as_metrics())
        for r in runners:
            r.model = model
            recorder.log_per_class("site_eval", epoch, r.site.name, r.evaluate())
        if unseen is not None:
            unseen.model = model
            # every case in the final epoch, eval.max_cases of them before (as the federation's server does)
            summary = unseen.evaluate(unseen_ds, max_cases=None if epoch == epochs else cfg.eval.max_cases)
            recorder.log_per_class("unseen_eval", epoch, f"unseen:{unseen.site.name}", summary)
            log_fn(f"epoch {epoch}/{epochs}: loss {stats.loss:.4f}, unseen mean Dice {mean_over_classes(summary):.3f}")
    from fedtextseg.model_file import save_model_file

    annotated_by: dict[str, list[str]] = {}
    for r in runners:
        for c in r.site.annotated:
            annotated_by.setdefault(c, []).append(r.site.name)
    save_model_file(recorder.run_dir / "model.pt", model, cfg, bank=bank, annotated_by=annotated_by,
                    training={"mode": "centralized", "epochs": epochs, "sites": [r.site.name for r in runners]})
    rows = read_metrics(recorder.metrics_path)
    table = dice_table(rows, "site_eval")
    for cls, per_site in dice_table(rows, "unseen_eval").items():
        table.setdefault(cls, {}).update(per_site)
    text = format_table(table, bank.class_names, title="Per-class Dice of the centrally trained model")
    (recorder.run_dir / "summary.txt").write_text(text + "\n")
    log_fn(text)
    return recorder.run_dir


def train_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedtextseg train", description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="demo", help=f"experiment config ({', '.join(list_experiments())})")
    p.add_argument("--overrides", default="", help='Hydra overrides, e.g. "model=cdpdnet_small train.lr=1e-3"')
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: federation.rounds, for comparison)")
    p.add_argument("--run-name", default=None)
    args = p.parse_args(argv)
    cfg = compose_config(args.experiment, args.overrides)
    name = args.run_name or f"{args.experiment}-centralized-{datetime.now():%Y%m%d-%H%M%S}"
    start = time.perf_counter()
    run_dir = train_centralized(cfg, Path(cfg.run.results_dir) / name, epochs=args.epochs)
    print(f"results: {run_dir} ({time.perf_counter() - start:.0f} s)")
    return 0
