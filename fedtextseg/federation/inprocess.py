"""A federated run in one process, without Flower: the round protocol of every run (``rounds.run_rounds``) over a
transport of function calls.

Used by tests (resume equivalence, aggregation on real models), by benchmarks (Flower's overhead is a simulated
round minus this), and by studies that sweep many configurations. Sites train one after another.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from fedtextseg.errors import FedTextSegError
from fedtextseg.federation.aggregation import SiteUpdate
from fedtextseg.federation.coordinator import Coordinator
from fedtextseg.federation.rounds import EvalReply, TrainRound, run_rounds
from fedtextseg.runtime import SiteRunner, build_model
from fedtextseg.sites import ensure_data, unseen_site

__all__ = ["run_federation_inprocess", "InProcessTransport"]


class InProcessTransport:
    """The round's messages as function calls: each site's :class:`SiteRunner` trains and evaluates in turn."""

    def __init__(self, runners: list[SiteRunner], prox_mu: float = 0.0):
        self.runners, self.prox_mu = runners, prox_mu

    def train(self, coord: Coordinator, round_: int, timeout: float) -> TrainRound:
        """A site that raises is out of the round, as a Flower ClientApp's error reply would be; a round in which
        every site fails is an error (``FedTextSegError`` with each site's reason)."""
        updates, failures = [], {}
        for runner in self.runners:
            try:
                updates.append(self._train_site(coord, runner, round_))
            except Exception as exc:  # noqa: BLE001 - any site failure is that site's, like an error reply
                failures[runner.site.name] = f"{type(exc).__name__}: {exc}"
        if not updates:
            raise FedTextSegError(f"round {round_}: every site failed: " +
                                  "; ".join(f"{site}: {why}" for site, why in failures.items()))
        return TrainRound(updates, failures)

    def evaluate(self, coord: Coordinator, round_: int, timeout: float) -> list[EvalReply]:
        replies = []
        for runner in self.runners:
            try:
                runner.load_global(coord.global_arrays)
                replies.append(EvalReply(runner.site.name, summary=runner.evaluate()))
            except Exception as exc:  # noqa: BLE001
                replies.append(EvalReply(runner.site.name, failure=f"{type(exc).__name__}: {exc}"))
        return replies

    def _train_site(self, coord: Coordinator, runner: SiteRunner, round_: int) -> SiteUpdate:
        runner.load_global(coord.global_arrays)
        stats = runner.train_round(round_=round_, total_rounds=coord.total_rounds, prox_mu=self.prox_mu)
        return SiteUpdate(runner.site.name, runner.wire_arrays(), runner.num_examples, runner.trained_classes_mask(),
                          stats.as_metrics(), identity=runner.identity())


def run_federation_inprocess(cfg: DictConfig, run_dir: str | Path, *, resume: bool = False,
                             stop_after: int | None = None, log_fn=print) -> Coordinator:
    """Run rounds ``start..federation.rounds`` (or up to ``stop_after``); returns the coordinator.

    A site that raises while training or evaluating is out of that round only (``failure`` rows of metrics.jsonl)
    and is asked again next round; a round in which every site fails stops the run.
    """
    sites = ensure_data(cfg, log_fn=log_fn)
    coord = Coordinator(cfg, run_dir, resume=resume, log_fn=log_fn, num_sites=len(sites))
    runners = [SiteRunner(cfg, s, build_model(cfg, frozen=coord.frozen.arrays, meta=coord.frozen.meta))
               for s in sites]
    unseen = unseen_site(cfg) if cfg.federation.evaluate_unseen else None
    transport = InProcessTransport(runners, prox_mu=float(cfg.federation.prox_mu))
    run_rounds(coord, transport, unseen=unseen, stop_after=stop_after)
    return coord
