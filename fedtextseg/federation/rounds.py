"""The one federated round protocol, whatever carries the messages.

A round: the transport has every site train on the global model (:class:`TrainRound`: the sites' updates in the
clear, or only their secure sum, :class:`SecureAggregate`), the :class:`~fedtextseg.federation.coordinator.
Coordinator` screens, aggregates and records them, the transport has every site evaluate the new global model
(:class:`EvalReply` per site), the server evaluates the unseen hospital and checkpoints. :func:`run_rounds` is that
loop, once, for every transport:

* in-process (:class:`fedtextseg.federation.inprocess.InProcessTransport`): studies, tests, benchmarks;
* Flower's Message API (:class:`fedtextseg.flower_adapter.FlowerTransport`): simulation and deployment;
* SecAgg+ over Flower (``server/secure.py``): the same, with the training replies summed under masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedtextseg.federation.aggregation import SiteUpdate

if TYPE_CHECKING:  # the coordinator imports this module
    from fedtextseg.federation.coordinator import Coordinator

__all__ = ["SecureAggregate", "TrainRound", "EvalReply", "RoundTransport", "run_rounds"]


@dataclass
class SecureAggregate:
    """What a secure-aggregation round leaves the server: the weighted mean of the sites' encoded updates
    (:func:`fedtextseg.privacy.secure.encode_update`; None when nothing could be unmasked), each site's weight and
    clear-text metrics, and the classes each site annotates."""

    mean: list[np.ndarray] | None
    per_site: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    annotations: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class TrainRound:
    """The training half of a round, as the transport brought it back."""

    updates: list[SiteUpdate] = field(default_factory=list)  # updates in the clear (empty with ``secure``)
    failures: dict[str, str] = field(default_factory=dict)  # site -> why it is not in this round
    bytes_sent: dict[str, int] | None = None  # per site, when the transport measures them
    bytes_received: dict[str, int] | None = None
    secure: SecureAggregate | None = None


@dataclass
class EvalReply:
    """One site's answer to "evaluate the global model": per-class metrics, or why there are none."""

    site: str
    summary: dict[str, dict[str, float]] | None = None
    failure: str | None = None


class RoundTransport(Protocol):
    """How a round's messages reach the sites and come back."""

    def train(self, coord: Coordinator, round_: int, timeout: float) -> TrainRound: ...

    def evaluate(self, coord: Coordinator, round_: int, timeout: float) -> list[EvalReply]: ...


def run_rounds(coord: Coordinator, transport: RoundTransport, *, unseen: str | Path | None = None,
               stop_after: int | None = None) -> str | None:
    """Rounds ``coord.start_round .. federation.rounds`` (or up to ``stop_after``); after the last round of the run
    the final model file and the per-class Dice table are written, and the table is returned (else None)."""
    last = coord.total_rounds if stop_after is None else min(coord.total_rounds, int(stop_after))
    for round_ in range(coord.start_round, last + 1):
        timeout = coord.round_timeout(round_)  # the first round may be given longer (sites preprocess then)
        coord.finish_round(round_, transport.train(coord, round_, timeout))
        for reply in transport.evaluate(coord, round_, timeout):
            if reply.failure is not None:
                coord.recorder.log("failure", round_, site=reply.site, reason=f"evaluate: {reply.failure}")
            else:
                coord.record_site_eval(round_, reply.site, reply.summary or {})
        if unseen is not None:
            coord.evaluate_unseen(round_, unseen)
        coord.checkpoint(round_)
    if last < coord.total_rounds:
        return None
    coord.save_model()
    return coord.summary_table()
