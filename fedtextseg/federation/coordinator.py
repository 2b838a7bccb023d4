"""The server's side of a federated run, without Flower: global state, rounds, records, checkpoints, resume.

Rounds are run by :func:`fedtextseg.federation.rounds.run_rounds` through a transport (in-process, Flower, SecAgg+
over Flower), which hands each round's replies to :meth:`Coordinator.finish_round`. Everything a round decides
(which sites count, how groups are aggregated, what is logged, what a checkpoint holds) is here, once for every
transport, so it is tested without a SuperLink.

What crosses the wire per round: the *shared* and *per-class* arrays (``wire_arrays``); the *frozen common* arrays
(pretrained DINOv2/CLIP weights + text bank) go to each node once, by content hash (:class:`FrozenDistributor`);
*local* arrays never leave a site.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np
import torch
from omegaconf import DictConfig

from fedtextseg import wire
from fedtextseg.federation.aggregation import SiteUpdate, aggregate, class_coverage, screen_updates
from fedtextseg.federation.checkpoint import load_latest, save_checkpoint
from fedtextseg.federation.frozen import FrozenBundle, FrozenDistributor
from fedtextseg.federation.identity import model_identity
from fedtextseg.federation.rounds import SecureAggregate, TrainRound
from fedtextseg.federation.server_opt import make_server_optimizer
from fedtextseg.metrics import mean_over_classes
from fedtextseg.params import check_groups, count_params, merge_into
from fedtextseg.preflight import preflight
from fedtextseg.privacy.secure import decode_mean
from fedtextseg.privacy.server import record_privacy, run_key_for, split_declined
from fedtextseg.runtime import build_model, prepare_bank
from fedtextseg.tracking import RunRecorder, dice_table, environment_info, format_table, read_metrics

__all__ = ["Coordinator", "RoundOutcome"]

log = logging.getLogger(__name__)


class RoundOutcome(dict):
    """What one training round did: sites used, sites excluded (with reasons), bytes, losses."""


class Coordinator:
    """Global model state and the round logic of one federated run."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, *, resume: bool = False, log_fn=print,
                 num_sites: int | None = None):
        self.cfg = cfg
        self.log_fn = log_fn
        self.total_rounds = int(cfg.federation.rounds)
        self.recorder = RunRecorder(run_dir, cfg, resume=resume)
        torch.manual_seed(int(cfg.run.seed))
        np.random.seed(int(cfg.run.seed))
        self.bank = prepare_bank(cfg, log_fn=log_fn)
        self.model = build_model(cfg, self.bank)
        self.groups = check_groups(self.model)  # every entry in exactly one group, per-class axes of the classes
        state = self.model.state_dict()
        self.wire_names = list(self.groups.shared) + list(self.groups.per_class)
        self.global_arrays = {k: state[k].detach().cpu().numpy().copy() for k in self.wire_names}
        wire_bytes = int(sum(a.nbytes for a in self.global_arrays.values()))
        full_bytes = int(sum(t.numel() * t.element_size() for t in state.values()))  # full-model FedAvg, per round
        # before any training: bad options, a patch the model cannot take, a results disk without room
        # (a checkpoint holds the wire arrays plus up to two server-optimiser moments of the same size)
        preflight(cfg, self.model, self.recorder.run_dir, checkpoint_bytes=3 * wire_bytes, model_bytes=full_bytes,
                  num_sites=num_sites)
        self.identity = model_identity(cfg.model.name, self.model)  # what every site's model must match
        self.frozen = FrozenBundle(
            {k: state[k].detach().cpu().numpy() for k in self.groups.frozen_common},
            meta={"class_names": list(self.bank.class_names), "task_names": list(self.bank.task_names),
                  "model": cfg.model.name, "bank": self.bank.provenance(),
                  "dino": dict(self.model.provenance.get("dino", {})),
                  "clip": {k: v for k, v in self.model.provenance.items()  # TGC-Net: origin of the CLIP weights
                           if k in ("clip_model", "clip_weights", "pretrained")}},
        )
        self.distributor = FrozenDistributor(self.frozen)
        self.server_opt = make_server_optimizer(cfg.federation.rule, **dict(cfg.federation.server_opt))
        self.start_round = 1
        self.site_annotations: dict[str, list[str]] = {}
        self._unseen = None
        if resume:
            self._resume()
        self.recorder.update_metadata(full_model_bytes=full_bytes,
            experiment=cfg.run.experiment, provenance=self.model.provenance, text_bank=self.bank.provenance(),
            frozen_hash=self.frozen.content_hash, frozen_bytes=self.frozen.nbytes, wire_bytes=wire_bytes,
            params=count_params(self.model, self.groups), environment=environment_info(),
        )
        self.log_fn(
            f"fedtextseg: {cfg.model.name} with {len(self.wire_names)} wire tensors ({wire_bytes / 1e6:.2f} MB/round "
            f"each way per site; full-model FedAvg: {full_bytes / 1e6:.2f} MB), frozen common parts "
            f"{self.frozen.nbytes / 1e6:.2f} MB sent once per site "
            f"(hash {self.frozen.content_hash}); text bank: {self.bank.encoder.get('kind')} "
            f"{self.bank.encoder.get('model') or ''} {self.bank.encoder.get('fallback_reason') or ''}".rstrip()
        )

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        ckpt = load_latest(self.recorder.run_dir)
        if ckpt is None:
            self.log_fn(f"resume: no checkpoint in {self.recorder.run_dir}; starting at round 1")
            self.recorder.truncate_after(0)  # rows of a round 1 that never completed would be counted twice
            return
        missing = set(self.wire_names) - set(ckpt.global_arrays)
        if missing:
            raise RuntimeError(f"{ckpt.path}: checkpoint lacks arrays {sorted(missing)[:5]}: not a checkpoint of "
                               f"this model configuration")
        self.global_arrays = {k: np.asarray(ckpt.global_arrays[k]) for k in self.wire_names}
        self.server_opt.load_state_dict(ckpt.strategy_state.get("server_opt", {}))
        self.site_annotations = dict(ckpt.extra.get("site_annotations", {}))
        ckpt.restore_rng()
        self.start_round = int(ckpt.round) + 1
        self.recorder.truncate_after(int(ckpt.round))
        self.log_fn(f"resume: continuing after round {ckpt.round} from {ckpt.path}")

    # ------------------------------------------------------------------ round protocol
    def round_config(self, round_: int) -> dict[str, Any]:
        return {wire.ROUND: int(round_), wire.TOTAL_ROUNDS: self.total_rounds,
                wire.PROX_MU: float(self.cfg.federation.prox_mu),
                wire.RUN_KEY: run_key_for(self.recorder)}  # names the sites' privacy ledgers (kept on resume)

    def round_timeout(self, round_: int) -> float:
        """Seconds to wait for the sites' replies: ``federation.first_round_timeout`` (when set) for the first round
        this server runs, where every site also receives the frozen parts, builds its model and preprocesses its
        data, else ``federation.round_timeout``."""
        first = self.cfg.federation.first_round_timeout
        if first is not None and round_ == self.start_round:
            return float(first)
        return float(self.cfg.federation.round_timeout)

    def frozen_payload(self, node_id: Any) -> FrozenBundle | None:
        return self.distributor.payload_for(node_id)

    def finish_round(self, round_: int, trained: TrainRound) -> RoundOutcome:
        """The round's end, whatever the transport brought: updates in the clear, or their secure sum."""
        if trained.secure is not None:
            return self.finish_secure_round(round_, trained.secure, trained.failures)
        return self.finish_train_round(round_, trained.updates, trained.failures, trained.bytes_sent,
                                       trained.bytes_received)

    def finish_train_round(self, round_: int, updates: list[SiteUpdate], failures: Mapping[str, str],
                           bytes_sent: Mapping[str, int] | None = None,
                           bytes_received: Mapping[str, int] | None = None) -> RoundOutcome:
        """Screen replies, aggregate group-wise (class-aware rows), step the server optimiser, record."""
        failures = dict(failures)
        updates = self._without_declined(round_, updates, failures)
        fed = self.cfg.federation
        good, bad = screen_updates(self.global_arrays, updates, self.groups, expected_identity=self.identity,
                                   outlier_factor=fed.outlier_factor, max_update_norm=fed.max_update_norm)
        for node, problems in bad.items():
            failures[node] = "; ".join(problems)
        min_sites = self._min_sites()
        aggregated = len(good) >= min_sites
        if aggregated:
            weighting = self.cfg.federation.weighting
            agg = aggregate(self.global_arrays, good, self.groups, rule=self.cfg.federation.robust or "mean",
                            weighting=weighting)
            coverage = class_coverage(good, len(self.bank.class_names), weighting=weighting)
            self.global_arrays = self.server_opt.step(self.global_arrays, agg, self.groups, coverage)
        else:
            self.log_fn(f"round {round_}: only {len(good)} usable replies (< min_sites={min_sites}); "
                        f"global model unchanged. Excluded: {failures}")
        sent, received = bytes_sent or {}, bytes_received or {}
        losses = [u.metrics.get("train_loss") for u in good if "train_loss" in u.metrics]
        return self._record_round(
            round_, [(u.node, u.num_examples, u.metrics) for u in good], failures, aggregated,
            annotations={u.node: [c for c, a in zip(self.bank.class_names, u.annotated) if a] for u in good},
            train_extra={u.node: {"bytes_sent": sent.get(u.node), "bytes_received": received.get(u.node)}
                         for u in good},
            round_extra={"bytes_sent": int(sum(sent.values())), "bytes_received": int(sum(received.values()))},
            headline=f"{len(good)} sites aggregated" + (f", mean train loss {np.mean(losses):.4f}" if losses else ""))

    def finish_secure_round(self, round_: int, secure: SecureAggregate, failures: Mapping[str, str]) -> RoundOutcome:
        """The round's end when only the secure sum of the updates arrived: decode it, step, record. The sites'
        weights and metrics (not their arrays) travel in the clear."""
        failures = dict(failures)
        replies = [SimpleNamespace(node=s, num_examples=int(n), metrics=dict(m)) for s, (n, m) in secure.per_site.items()]
        used = [r for r in self._without_declined(round_, replies, failures) if r.num_examples > 0]
        min_sites = self._min_sites()
        aggregated = secure.mean is not None and len(used) >= max(1, min_sites)
        if aggregated:
            agg, coverage = decode_mean(self.global_arrays, secure.mean, self.groups)
            self.global_arrays = self.server_opt.step(self.global_arrays, agg, self.groups, coverage)
        else:
            self.log_fn(f"round {round_}: secure aggregate of {len(used)} site(s) (< min_sites={min_sites}) or none; "
                        f"global model unchanged. Excluded: {failures}")
        return self._record_round(
            round_, [(r.node, r.num_examples, r.metrics) for r in used], failures, aggregated,
            annotations={r.node: list(secure.annotations[r.node]) for r in used if r.node in secure.annotations},
            round_extra={"secure_aggregation": "secaggplus"},
            headline=f"secure aggregate (SecAgg+) of {len(used)} site(s)")

    def _min_sites(self) -> int:
        return int(self.cfg.federation.min_sites)

    def _without_declined(self, round_: int, replies: list, failures: dict[str, str]) -> list:
        """Record the sites' privacy metrics ("privacy" rows, privacy.json); the replies of sites whose budget is
        spent become failures (nothing to aggregate, the run goes on)."""
        record_privacy(self.recorder, round_, replies)
        kept, declined = split_declined(replies)
        failures.update(declined)
        return kept

    def _record_round(self, round_: int, used: list[tuple[str, int, Mapping[str, Any]]], failures: Mapping[str, str],
                      aggregated: bool, *, annotations: Mapping[str, list[str]], headline: str,
                      train_extra: Mapping[str, Mapping[str, Any]] | None = None,
                      round_extra: Mapping[str, Any] | None = None) -> RoundOutcome:
        """The records every round writes: a train row per used site, a failure row per excluded one, a round row."""
        self.site_annotations.update({node: list(names) for node, names in annotations.items()})
        for node, num_examples, metrics in used:
            self.recorder.log("train", round_, site=node, num_examples=num_examples,
                              **dict((train_extra or {}).get(node, {})),
                              **{k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        for node, why in failures.items():
            self.recorder.log("failure", round_, site=node, reason=why)
        self.recorder.log("round", round_, sites=len(used), excluded=len(failures), aggregated=aggregated,
                          **dict(round_extra or {}))
        self.log_fn(f"round {round_}/{self.total_rounds}: {headline}" + (f", excluded {failures}" if failures else ""))
        return RoundOutcome(round=round_, sites=[node for node, _, _ in used], excluded=failures, aggregated=aggregated)

    def record_site_eval(self, round_: int, site: str, per_class: Mapping[str, Mapping[str, float]]) -> None:
        self.recorder.log_per_class("site_eval", round_, site, per_class)

    # ------------------------------------------------------------------ server-side evaluation
    def global_model(self) -> torch.nn.Module:
        merge_into(self.model, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.global_arrays.items()})
        return self.model

    def evaluate_unseen(self, round_: int, site_path: str | Path) -> dict[str, dict[str, float]]:
        """Global model on the held-out hospital (all its labeled cases)."""
        from fedtextseg.runtime import SiteRunner

        if self._unseen is None:
            runner = SiteRunner(self.cfg, site_path, self.global_model())
            self._unseen = (runner, runner.all_cases_dataset())
        runner, dataset = self._unseen
        runner.model = self.global_model()
        start = time.perf_counter()
        # every case of the unseen hospital in the final round; eval.max_cases of them in earlier rounds
        summary = runner.evaluate(dataset, max_cases=None if round_ >= self.total_rounds else self.cfg.eval.max_cases)
        self.recorder.log_per_class("unseen_eval", round_, f"unseen:{runner.site.name}", summary)
        self.log_fn(f"round {round_}: unseen hospital {runner.site.name!r} mean Dice "
                    f"{mean_over_classes(summary):.3f} over {len(summary)} classes ({time.perf_counter() - start:.0f}s)")
        return summary

    # ------------------------------------------------------------------ persistence
    def checkpoint(self, round_: int) -> Path:
        return save_checkpoint(
            self.recorder.run_dir, round_, self.global_arrays,
            strategy_state={"server_opt": self.server_opt.state_dict()},
            extra={"site_annotations": self.site_annotations, "frozen_hash": self.frozen.content_hash},
        )

    def save_model(self) -> Path:
        """The final global model as one self-describing file (weights, architecture, bank, classes, sites)."""
        from fedtextseg.model_file import save_model_file

        return save_model_file(
            self.recorder.run_dir / "model.pt", self.global_model(), self.cfg, bank=self.bank,
            annotated_by=self._annotated_by(), training={"rounds": self.total_rounds,
                                                         "sites": sorted(self.site_annotations)},
        )

    def _annotated_by(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for site, classes in sorted(self.site_annotations.items()):
            for c in classes:
                out.setdefault(c, []).append(site)
        return out

    def summary_table(self) -> str:
        """Per-class Dice of the final global model on every site and on the unseen hospital."""
        rows = read_metrics(self.recorder.metrics_path)
        table = dice_table(rows, "site_eval")
        for cls, per_site in dice_table(rows, "unseen_eval").items():
            table.setdefault(cls, {}).update(per_site)
        text = format_table(table, self.bank.class_names,
                            title="Per-class Dice of the final global model (blank: site does not annotate the class)")
        (self.recorder.run_dir / "summary.txt").write_text(text + "\n")
        return text
