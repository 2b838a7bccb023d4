"""The ClientApp's side of SecAgg+ (``privacy.secure_aggregation: secaggplus``; the server side is server/secure.py).

* :func:`secure_aggregation_mod` runs Flower's ``secaggplus_mod`` on the messages of the SecAgg+ protocol only (they
  carry its ``secaggplus_configs`` ConfigRecord), so ordinary rounds are untouched.
* :func:`prepare_reply` answers the round's ``query``: caches the frozen common parts (sent once, by hash) and
  returns the site's name, task, annotated classes and training-volume count.
* :func:`secure_train` answers the "collect masked vectors" stage: the legacy ``fitins`` message is translated into
  the app's own train message (named arrays + round config), the ordinary ``train`` handler trains (DP-SGD,
  declines and all), and its reply becomes a legacy ``fitres`` whose parameters are the encoded update
  (:func:`fedtextseg.privacy.secure.encode_update`) and whose ``num_examples`` is the SecAgg+ weight. The mod
  then quantises and masks it: the plain update never leaves the process.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtextseg.data.dataset import split_cases
from fedtextseg.data.site import load_site
from fedtextseg import wire
from fedtextseg.federation.site_state import site_frozen_cache
from fedtextseg.flower_adapter import (arrays_to_record, attach_frozen, config_to_record, receive_frozen,
                                       record_to_arrays, record_to_metrics)
from fedtextseg.privacy.secure import encode_update, secure_weight
from fedtextseg.sites import resolve_site_path

__all__ = ["secure_aggregation_mod", "is_secure_train", "secure_train", "prepare_reply", "SECAGG_RECORD"]

SECAGG_RECORD = wire.SECAGG_RECORD
_LEGACY_PARAMS = wire.LEGACY_PARAMS


def secure_aggregation_mod(msg: Message, context: Context, call_next):
    """Flower's ``secaggplus_mod`` for SecAgg+ messages; every other message goes straight to the app."""
    if msg.has_content() and SECAGG_RECORD in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secure_train(msg: Message) -> bool:
    return msg.has_content() and _LEGACY_PARAMS in msg.content.array_records


def prepare_reply(msg: Message, context: Context, cfg) -> Message:
    """Cache the announced frozen bundle (raises ``missing-frozen`` if neither sent nor cached); site metadata back."""
    receive_frozen(msg.content, site_frozen_cache(cfg))
    site = load_site(resolve_site_path(cfg, context.node_config), cfg.data.vocabulary)
    train, _ = split_cases(site.cases, float(cfg.data.val_fraction), int(cfg.run.seed))
    info = {"name": site.name, "task": site.task, "annotated": list(site.annotated) or [""],
            wire.TRAIN_VOLUMES: len(train)}
    return Message(RecordDict({wire.SITE: ConfigRecord(info)}), reply_to=msg)


def secure_train(msg: Message, context: Context, train_fn) -> Message:
    """The SecAgg+ "collect" stage: train through ``train_fn`` (the app's handler), reply with the encoded update."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    conf = dict(fitins.config)
    groups = json.loads(str(conf.pop(wire.WIRE_GROUPS)))
    names = list(groups["shared"]) + list(groups["per_class"])
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(names):
        raise ValueError(f"SecAgg+ round sent {len(arrays)} arrays for {len(names)} names")
    global_arrays = dict(zip(names, arrays))
    native = RecordDict({wire.ARRAYS: arrays_to_record(global_arrays), wire.CONFIG: config_to_record(conf)})
    attach_frozen(native, str(conf[wire.FROZEN_HASH]), None)  # the bundle comes from the cache (prepare step)
    reply = train_fn(Message(content=native, metadata=msg.metadata), context)
    if reply.has_error():
        raise RuntimeError(f"training failed: {reply.error.reason}")  # SecAgg+ treats this node as dropped out
    local = record_to_arrays(reply.content.array_records[wire.ARRAYS])
    annotated = local.pop(wire.ANNOTATED)
    metrics = record_to_metrics(reply.content.metric_records[wire.METRICS])
    n = int(metrics.pop(wire.NUM_EXAMPLES))
    declined = float(metrics.get("privacy/declined", 0.0)) > 0.5
    weight = secure_weight(str(conf.get(wire.WEIGHTING, "examples")), n, declined,
                           num_annotated=int(np.asarray(annotated).astype(bool).sum()))
    spec = SimpleNamespace(shared=groups["shared"], per_class={k: int(v) for k, v in groups["per_class"].items()})
    vector = encode_update(global_arrays, local, annotated, spec, clip=float(conf.get(wire.CLIPPING_RANGE, 1.0)))
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(vector), weight,
                    {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
