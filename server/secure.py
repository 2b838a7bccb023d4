"""SecAgg+ inside fedtextseg's Message-API ServerApp: Flower's legacy ``SecAggPlusWorkflow``, driven one round at a
time through a ``LegacyContext`` and a small legacy ``Strategy`` that hands it the global arrays and takes back the
aggregate (``privacy.secure_aggregation: secaggplus``).

Per round:

1. *prepare* (a ``query`` message to each node): nodes that lack the frozen common parts get them (by hash, once);
   every node answers with its site's name, task, annotated classes and training-volume count - site metadata,
   needed to name the (clear-text) per-site metrics and to choose SecAgg+'s ``max_weight``;
2. the SecAgg+ workflow's four stages (setup, share keys, collect masked vectors, unmask). In "collect", each
   ClientApp trains and replies in Flower's legacy ``fitres`` format with its encoded update
   (:func:`fedtextseg.privacy.secure.encode_update`) and weight; ``secaggplus_mod`` quantises and masks it. The
   server only ever holds masked vectors and, after unmasking, their weighted mean;
3. the round protocol's coordinator (``Coordinator.finish_secure_round``) decodes the mean (group-wise,
   class-aware), steps the server optimiser and records the round, including each site's privacy metrics (which
   travel in the clear). Evaluation, the unseen hospital and checkpoints are the plain Flower transport's.

Dropouts are handled by SecAgg+ itself (shares of a dropped node's keys reconstruct its masks) as long as
``reconstruction_threshold`` nodes stay.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.serverapp import Grid

from fedtextseg import wire
from fedtextseg.federation.rounds import SecureAggregate, TrainRound
from fedtextseg.flower_adapter import FlowerTransport, attach_frozen, is_missing_frozen, send_and_receive
from fedtextseg.privacy.secure import check_secure_config

__all__ = ["SecureFlowerTransport", "SECURE_FLAG"]

SECURE_FLAG = wire.SECURE_FLAG


def _strategy_class():
    from flwr.server.strategy import Strategy

    class RoundStrategy(Strategy):
        """Legacy strategy of one SecAgg+ round: every registered node trains; the aggregate is kept, not used."""

        def __init__(self, parameters, config: dict[str, Any]):
            self.parameters, self.config = parameters, config
            self.results: list = []
            self.failures: list = []
            self.aggregate = None

        def initialize_parameters(self, client_manager):
            return self.parameters

        def configure_fit(self, server_round, parameters, client_manager):
            return [(proxy, FitIns(self.parameters, dict(self.config))) for proxy in client_manager.all().values()]

        def aggregate_fit(self, server_round, results, failures):
            self.results, self.failures = list(results), list(failures)
            self.aggregate = results[0][1].parameters if results else None
            return self.aggregate, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return RoundStrategy


class SecureFlowerTransport(FlowerTransport):
    """The Flower transport whose training half is a SecAgg+ round; evaluation is the plain transport's."""

    def __init__(self, coord, grid: Grid, context: Context):
        super().__init__(grid)
        check_secure_config(coord.cfg)
        self.context = context
        opts = coord.cfg.privacy.secagg
        self.clip = float(opts.clipping_range)
        self.shares = opts.num_shares
        self.threshold = opts.reconstruction_threshold
        self.quantization = int(opts.quantization_range)
        self.sites: dict[int, dict[str, Any]] = {}

    def prepare(self, coord, round_: int, timeout: float) -> dict[str, str]:
        """Frozen parts to nodes that lack them; each node's site name/task/annotations/example count."""
        failures = {}
        messages = []
        for node in sorted(self.grid.get_node_ids()):
            content = RecordDict({wire.CONFIG: ConfigRecord({wire.ROUND: int(round_),
                                                             SECURE_FLAG: wire.SECURE_PREPARE})})
            attach_frozen(content, coord.frozen.content_hash, coord.frozen_payload(node))
            messages.append(Message(content=content, message_type=MessageType.QUERY, dst_node_id=node))
        for reply in send_and_receive(self.grid, messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                if is_missing_frozen(reply):
                    coord.distributor.mark_missing(node)
                failures[f"node-{node}"] = f"prepare: {reply.error.reason}"
                continue
            site = reply.content.config_records[wire.SITE]
            self.sites[node] = {"name": str(site["name"]), "annotated": [c for c in site.get("annotated", []) if c],
                                wire.TRAIN_VOLUMES: int(site.get(wire.TRAIN_VOLUMES, 1))}
            self.names[node] = str(site["name"])
        return failures

    def train(self, coord, round_: int, timeout: float) -> TrainRound:
        from flwr.server import ServerConfig
        from flwr.server.client_manager import SimpleClientManager
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

        failures = self.prepare(coord, round_, timeout)
        ready = {n: s for n, s in self.sites.items() if f"node-{n}" not in failures}
        params = ndarrays_to_parameters([np.asarray(coord.global_arrays[k]) for k in coord.wire_names])
        config = {**coord.round_config(round_), SECURE_FLAG: wire.SECURE_TRAIN, wire.FROZEN_HASH: coord.frozen.content_hash,
                  wire.CLIPPING_RANGE: self.clip,
                  wire.WEIGHTING: str(coord.cfg.federation.weighting),
                  wire.WIRE_GROUPS: json.dumps({"shared": list(coord.groups.shared),
                                                "per_class": {k: int(v) for k, v in coord.groups.per_class.items()}})}
        strategy = _strategy_class()(params, config)
        manager = SimpleClientManager()
        for node in ready:
            manager.register(GridClientProxy(node_id=node, grid=self.grid, run_id=self.context.run_id))
        legacy = LegacyContext(self.context, config=ServerConfig(num_rounds=coord.total_rounds), strategy=strategy,
                               client_manager=manager)
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: int(round_)})
        from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord

        legacy.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(params, keep_input=True)
        max_weight = float(max([s[wire.TRAIN_VOLUMES] for s in ready.values()] + [1]))
        workflow = SecAggPlusWorkflow(num_shares=self.shares, reconstruction_threshold=self.threshold,
                                      max_weight=max_weight, clipping_range=self.clip,
                                      quantization_range=self.quantization, timeout=timeout)
        mean = None
        if len(ready) < 2:
            failures["(secure aggregation)"] = f"SecAgg+ needs at least 2 sites, {len(ready)} ready"
        else:
            try:
                workflow(self.grid, legacy)
                if strategy.aggregate is not None:
                    mean = parameters_to_ndarrays(strategy.aggregate)
            except ZeroDivisionError:  # every site sent weight 0 (all declined): nothing to unmask into a mean
                failures["(secure aggregation)"] = "every site declined or sent weight 0"
        per_site = {}
        for proxy, fitres in strategy.results:
            site = self.sites.get(proxy.node_id, {}).get("name", f"node-{proxy.node_id}")
            per_site[site] = (int(fitres.num_examples), dict(fitres.metrics))
        for exc in strategy.failures:
            failures.setdefault("(secure aggregation)", str(exc))
        annotations = {s["name"]: s["annotated"] for s in ready.values()}
        return TrainRound(failures=failures, secure=SecureAggregate(mean, per_site, annotations))
