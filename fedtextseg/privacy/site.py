"""A site's privacy for one run: its resolved settings, its persistent ledger, and a private local round.

:meth:`SitePrivacy.train_round` is what ``SiteRunner.train_round`` calls when DP-SGD is on: it fixes the noise
(planned once from the target epsilon for the planned rounds x local steps, or the fixed multiplier), computes the
epsilon the round *would* reach, and either declines (nothing trained, the ledger records the decline) or trains
through ``engine.train_steps`` with the private parts of :mod:`fedtextseg.privacy.dpsgd` and records the round.
The round is written to the ledger *before* training starts, so a crash mid-round over-counts rather than
under-counts.

The stats it returns (:class:`PrivateTrainStats`) add ``privacy/*`` metrics to ``as_metrics()`` and leave out
the training loss unless ``privacy.report_train_loss`` (it is computed on the private data and not covered by the
DP guarantee).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from fedtextseg.errors import BudgetExhaustedError, FedTextSegError
from fedtextseg.privacy.accounting import SiteLedger, plan_noise_multiplier
from fedtextseg.privacy.settings import PrivacySettings, resolve_settings

__all__ = ["SitePrivacy", "PrivateTrainStats", "run_privacy_config", "screen_eval_summary", "PRIVACY_PREFIX",
           "DECLINED_KEY"]

log = logging.getLogger(__name__)

PRIVACY_PREFIX = "privacy/"
DECLINED_KEY = "privacy/declined"


def run_privacy_config(cfg: DictConfig | Mapping | None) -> dict[str, Any]:
    """The run's ``privacy`` config group as a plain dict (empty when the config has none)."""
    if cfg is None:
        return {}
    node = cfg.get("privacy") if hasattr(cfg, "get") else None
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def _engine_stats_class():
    from fedtextseg.engine import TrainStats

    @dataclass
    class PrivateTrainStats(TrainStats):
        """``TrainStats`` of a DP-SGD round (or a declined one): ``privacy/*`` metrics, no private loss."""

        declined: bool = False
        privacy: dict[str, float] = field(default_factory=dict)
        report_loss: bool = False

        def as_metrics(self) -> dict[str, float]:
            out = super().as_metrics()
            if self.declined or not self.report_loss:
                out.pop("train_loss", None)
            out.update(self.privacy)
            return out

    return PrivateTrainStats


PrivateTrainStats = _engine_stats_class()


def screen_eval_summary(cfg: DictConfig | Mapping | None, summary: Mapping[str, Mapping[str, float]],
                        num_cases: int) -> dict[str, dict[str, float]]:
    """Evaluation metrics as they may leave the site: nothing when computed over fewer than
    ``privacy.min_samples_for_metrics`` cases, else rounded to ``privacy.metric_decimals`` (if set)."""
    run = run_privacy_config(cfg)
    min_n = int(run.get("min_samples_for_metrics") or 0)
    if num_cases < min_n:
        log.info("evaluation over %d case(s) < privacy.min_samples_for_metrics=%d: no metrics sent", num_cases, min_n)
        return {}
    decimals = run.get("metric_decimals")
    if decimals in (None, ""):
        return {c: dict(v) for c, v in summary.items()}
    d = int(decimals)
    return {c: {k: (round(float(x), d) if isinstance(x, (int, float)) and math.isfinite(float(x)) else x)
                for k, x in v.items()} for c, v in summary.items()}


class SitePrivacy:
    """Settings + ledger location of one site in one run; ``None`` from :meth:`for_site` when DP-SGD is off."""

    def __init__(self, settings: PrivacySettings, site: str, run_key: str):
        self.settings = settings
        self.site = str(site)
        self.run_key = str(run_key)
        self.last: dict[str, float] = {}

    @classmethod
    def for_site(cls, cfg: DictConfig, site, node_config: Mapping[str, Any] | None = None,
                 run_key: str | None = None) -> "SitePrivacy | None":
        """The site's privacy from the run config, its site.yaml block and its node config (None when off)."""
        settings = resolve_settings(run_privacy_config(cfg), getattr(site, "privacy", None), node_config,
                                    train_batch_size=int(cfg.train.batch_size), site_name=site.name)
        if not settings.enabled:
            return None
        key = run_key or str(run_privacy_config(cfg).get("run_key") or cfg.run.get("name")
                             or cfg.run.get("experiment") or "default")
        return cls(settings, site.name, key)

    def ledger(self) -> SiteLedger:
        s = self.settings
        return SiteLedger.open(self.run_key, self.site, accountant=s.accountant, delta=s.target_delta,
                               ledger_dir=s.ledger_dir)

    # ------------------------------------------------------------------ noise
    def noise_multiplier(self, ledger: SiteLedger, sample_rate: float, steps: int, round_: int,
                         total_rounds: int) -> float:
        """The fixed multiplier, or the one planned (once, kept in the ledger) for the rounds still to come."""
        s = self.settings
        if s.noise_multiplier is not None:
            return float(s.noise_multiplier)
        key = {"target_epsilon": s.target_epsilon, "delta": s.target_delta, "sample_rate": round(sample_rate, 12),
               "steps_per_round": int(steps), "rounds": int(total_rounds), "accountant": s.accountant}
        if ledger.plan.get("key") == key:
            return float(ledger.plan["noise_multiplier"])
        remaining = max(1, int(total_rounds) - int(round_) + 1)
        sigma = plan_noise_multiplier(s.target_epsilon, s.target_delta, sample_rate, steps * remaining,
                                      s.accountant, history=ledger.history)
        ledger.plan = {"key": key, "noise_multiplier": sigma, "planned_at_round": int(round_),
                       "planned_steps": int(steps * remaining)}
        log.info("[%s] DP-SGD: noise multiplier %.4f planned for epsilon=%g, delta=%g over %d more step(s) at "
                 "sampling rate %.3g (%s)", self.site, sigma, s.target_epsilon, s.target_delta, steps * remaining,
                 sample_rate, s.accountant)
        return sigma

    def _metrics(self, ledger: SiteLedger, sigma: float, q: float, declined: bool, would: float) -> dict[str, float]:
        s = self.settings
        eps = ledger.epsilon()
        self.last = {
            "privacy/epsilon": eps, "privacy/delta": s.target_delta, "privacy/noise_multiplier": float(sigma),
            "privacy/sample_rate": float(q), "privacy/max_grad_norm": float(s.max_grad_norm),
            "privacy/steps": float(ledger.steps), "privacy/rounds": float(ledger.rounds_trained),
            "privacy/target_epsilon": float(s.target_epsilon) if s.target_epsilon is not None else -1.0,
            "privacy/epsilon_if_trained": float(would) if math.isfinite(would) else -1.0,
            DECLINED_KEY: 1.0 if declined else 0.0,
        }
        return dict(self.last)

    # ------------------------------------------------------------------ the private round
    def train_round(self, runner, *, round_: int, total_rounds: int, train_kwargs: dict[str, Any]):
        """Decline or train one DP-SGD round through ``engine.train_steps``; returns :class:`PrivateTrainStats`."""
        from fedtextseg import engine
        from fedtextseg.privacy.dpsgd import make_private

        s = self.settings
        dataset = runner.data.train_ds
        n = len(dataset)
        if n == 0:
            raise FedTextSegError(f"site {self.site!r}: no training volumes for DP-SGD")
        steps = int(train_kwargs["steps"])
        q = min(1.0, float(s.expected_batch_size or runner.cfg.train.batch_size) / n)
        ledger = self.ledger()
        sigma = self.noise_multiplier(ledger, q, steps, round_, total_rounds)
        try:
            would = ledger.check(sigma, q, steps, s.target_epsilon)
        except BudgetExhaustedError as exc:
            would = ledger.epsilon([sigma, q, steps])
            ledger.record_decline(round_, would, noise_multiplier=sigma, sample_rate=q, steps_if_trained=steps)
            ledger.save()
            log.warning("%s", exc)
            return PrivateTrainStats(steps=0, samples=0, loss=float("nan"), seconds=0.0, declined=True,
                                     privacy=self._metrics(ledger, sigma, q, True, would))
        ledger.record_round(round_, sigma, q, steps, max_grad_norm=s.max_grad_norm, mode=s.grad_sample_mode,
                            status="started")  # counted before training: a crash over-counts, never under-counts
        ledger.save()
        kwargs = dict(train_kwargs)
        teacher, distill_fn = kwargs.pop("teacher", None), kwargs.pop("distill_fn", None)
        parts = make_private(
            runner.model, dataset, kwargs.pop("optimizer"), kwargs.pop("loss_fn"), noise_multiplier=sigma,
            max_grad_norm=s.max_grad_norm, sample_rate=q, steps=steps, mode=s.grad_sample_mode,
            distill_fn=distill_fn if teacher is not None else None, teacher=teacher,
            prox_mu=float(kwargs.pop("prox_mu", 0.0) or 0.0), prox_reference=kwargs.pop("prox_reference", None))
        try:
            stats = parts.train_steps(**kwargs)
        finally:
            parts.close()
        ledger.rounds[-1]["status"] = "done"
        ledger.save()
        eps = ledger.epsilon()
        log.info("[%s] round %d: DP-SGD (%s clipping, C=%g, sigma=%.3f, q=%.3g, %d steps): epsilon=%.3f at delta=%g "
                 "over %d round(s)", self.site, round_, s.grad_sample_mode, s.max_grad_norm, sigma, q, steps, eps,
                 s.target_delta, ledger.rounds_trained)
        return PrivateTrainStats(steps=stats.steps, samples=stats.samples, loss=stats.loss, seconds=stats.seconds,
                                 history=stats.history, report_loss=s.report_train_loss,
                                 privacy=self._metrics(ledger, sigma, q, False, eps))

    def epsilon_spent(self) -> float:
        return self.ledger().epsilon()

