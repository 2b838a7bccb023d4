"""A federated run in one process, without Flower: the same Coordinator and SiteRunner rounds as the Flower apps.

Used by tests (resume equivalence, aggregation on real models), by benchmarks (Flower's overhead is a simulated
round minus this), and by studies that sweep many configurations. Sites train one after another.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from fedtextseg.errors import FedTextSegError
from fedtextseg.federation.aggregation import SiteUpdate
from fedtextseg.federation.coordinator import Coordinator
from fedtextseg.runtime import SiteRunner, build_model
from fedtextseg.sites import ensure_data, unseen_site

__all__ = ["run_federation_inprocess"]


def run_federation_inprocess(cfg: DictConfig, run_dir: str | Path, *, resume: bool = False,
                             stop_after: int | None = None, log_fn=print) -> Coordinator:
    """Run rounds ``start..federation.rounds`` (or up to ``stop_after``); returns the coordinator.

    A site that raises while training or evaluating is out of that round only, as a Flower ClientApp's error reply
    would be: the failure is recorded (``failure`` rows of metrics.jsonl) and the site is asked again next round.
    A round in which every site fails stops the run (``FedTextSegError`` with each site's reason).
    """
    sites = ensure_data(cfg, log_fn=log_fn)
    coord = Coordinator(cfg, run_dir, resume=resume, log_fn=log_fn, num_sites=len(sites))
    runners = [SiteRunner(cfg, s, build_model(cfg, frozen=coord.frozen.arrays, meta=coord.frozen.meta))
               for s in sites]
    unseen = unseen_site(cfg) if cfg.federation.get("evaluate_unseen", True) else None
    prox_mu = float(cfg.federation.get("prox_mu", 0.0) or 0.0)
    last = coord.total_rounds if stop_after is None else min(coord.total_rounds, int(stop_after))
    for round_ in range(coord.start_round, last + 1):
        updates, failures = [], {}
        for runner in runners:
            try:
                updates.append(_train_site(coord, runner, round_, prox_mu))
            except Exception as exc:  # noqa: BLE001 - any site failure is that site's, like an error reply
                failures[runner.site.name] = f"{type(exc).__name__}: {exc}"
        if not updates:
            raise FedTextSegError(f"round {round_}: every site failed: " +
                                  "; ".join(f"{site}: {why}" for site, why in failures.items()))
        coord.finish_train_round(round_, updates, failures)
        for runner in runners:
            try:
                runner.load_global(coord.global_arrays)
                coord.record_site_eval(round_, runner.site.name, runner.evaluate())
            except Exception as exc:  # noqa: BLE001
                coord.recorder.log("failure", round_, site=runner.site.name,
                                   reason=f"evaluate: {type(exc).__name__}: {exc}")
        if unseen is not None:
            coord.evaluate_unseen(round_, unseen)
        coord.checkpoint(round_)
    if last == coord.total_rounds:
        coord.save_model()
        coord.summary_table()
    return coord


def _train_site(coord: Coordinator, runner: SiteRunner, round_: int, prox_mu: float) -> SiteUpdate:
    runner.load_global(coord.global_arrays)
    stats = runner.train_round(round_=round_, total_rounds=coord.total_rounds, prox_mu=prox_mu)
    return SiteUpdate(runner.site.name, runner.wire_arrays(), runner.num_examples, runner.trained_classes_mask(),
                      stats.as_metrics(), identity=runner.identity())
