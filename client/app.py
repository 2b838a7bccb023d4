"""Flower ClientApp: one hospital. Thin glue over ``fedtextseg.runtime.SiteRunner``.

Which site: ``site-path`` in the node config (deployment: ``flower-supernode --node-config 'site-path="/data/a"'``),
or, in simulation, the ``partition-id``-th site listed in ``<data-root>/federation.yaml``.

Per round (``train``): take the frozen common parts (sent once by hash, kept in a local cache), load the global
shared + per-class arrays, train locally, reply with the updated arrays, the sample count, the annotated-class
mask and numeric metrics. ``evaluate``: the global model's per-class Dice/HD95 on the site's validation cases,
one key per vocabulary class (with a ``has/`` flag), so every site's reply carries the same keys.
"""

from __future__ import annotations

import os as _os
from pathlib import Path as _Path

# the configs travel inside the Flower app bundle, next to this package
_os.environ.setdefault("FEDTEXTSEG_CONFIGS", str(_Path(__file__).resolve().parent.parent / "configs"))

import logging
import time

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedtextseg import wire
from fedtextseg.federation.frozen import MissingFrozenError
from fedtextseg.federation.site_state import load_local_state, save_local_state, site_frozen_cache
from fedtextseg.flower_adapter import (announced_frozen_hash, eval_reply_content, missing_frozen_error,
                                       receive_frozen, record_nbytes, record_to_arrays, record_to_config,
                                       site_reply_content)
from client.secure import is_secure_train, prepare_reply, secure_aggregation_mod, secure_train
from fedtextseg.privacy.audit import message_audit_mod
from fedtextseg.privacy.site import SitePrivacy, screen_eval_summary
from fedtextseg.runtime import SiteRunner, build_model
from fedtextseg.sites import resolve_site_path
from fedtextseg.config import compose_config

# every reply is checked against the allow-list (fedtextseg.privacy.audit), as sent: SecAgg+ messages go through
# Flower's secaggplus_mod (client/secure.py) inside it, so the audit sees the masked reply
app = ClientApp(mods=[message_audit_mod, secure_aggregation_mod])
log = logging.getLogger("fedtextseg.client")
_lib_log = logging.getLogger("fedtextseg")
if not _lib_log.handlers:  # per-step progress lines of local training reach the SuperNode's / simulation's log
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    _lib_log.addHandler(_handler)
    _lib_log.setLevel(logging.INFO)
    _lib_log.propagate = False

# In simulation the same process serves many rounds: keep each site's runner (data cached in memory and on disk).
_RUNNERS: dict[tuple, SiteRunner] = {}
_CONFIGS: dict[tuple, object] = {}


def _config(context: Context):
    """The run's composed config, once per process and run config (composing takes ~0.15 s, every message paid it)."""
    rc = context.run_config
    key = (str(rc.get("experiment", "demo")), str(rc.get("overrides", "")), str(rc.get("data-root") or ""))
    if key not in _CONFIGS:
        cfg = compose_config(key[0], key[1])
        if key[2]:
            cfg.data.root = key[2]
        _CONFIGS[key] = cfg
    cfg = _CONFIGS[key]
    threads = cfg.run.threads
    if threads:
        torch.set_num_threads(int(threads))
    return cfg


def _runner(msg: Message, context: Context) -> tuple[SiteRunner, str]:
    cfg = _config(context)
    site_path = resolve_site_path(cfg, context.node_config)
    key = (context.run_id, str(site_path), announced_frozen_hash(msg.content))
    if key not in _RUNNERS or wire.FROZEN_ARRAYS in msg.content.array_records:  # sent: verify and cache it
        bundle = receive_frozen(msg.content, site_frozen_cache(cfg))
    if key not in _RUNNERS:  # a new run, site or frozen bundle: build the site's model from the bundle
        model = build_model(cfg, frozen=bundle.arrays, meta=bundle.meta)
        _RUNNERS[key] = SiteRunner(cfg, site_path, model)
        load_local_state(_RUNNERS[key], _run_name(context), context.run_id,
                         resume=bool(context.run_config.get("resume", False)))
    runner = _RUNNERS[key]
    runner.load_global(record_to_arrays(msg.content.array_records[wire.ARRAYS]))
    return runner, key[2]


def _run_name(context: Context) -> str:
    return str(context.run_config.get("run-name") or f"run-{context.run_id}")


def _error_reply(msg: Message, exc: Exception) -> Message:
    if isinstance(exc, MissingFrozenError):  # the server resends the frozen parts next round (FrozenDistributor)
        return Message(missing_frozen_error(exc.content_hash), reply_to=msg)
    raise exc


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_secure_train(msg):  # SecAgg+ "collect" stage: train as below, reply with the encoded update to be masked
        return secure_train(msg, context, train)
    try:
        runner, _ = _runner(msg, context)
    except Exception as exc:  # a missing frozen bundle is answered, anything else is a real failure
        return _error_reply(msg, exc)
    conf = record_to_config(msg.content.config_records[wire.CONFIG])
    # DP-SGD settings with this node's own budget (node config) and the run's ledger key; None when off
    runner.privacy = SitePrivacy.for_site(runner.cfg, runner.site, context.node_config,
                                          run_key=str(conf.get(wire.RUN_KEY) or f"flower-run-{context.run_id}"))
    start = time.perf_counter()
    stats = runner.train_round(round_=int(conf[wire.ROUND]), total_rounds=int(conf[wire.TOTAL_ROUNDS]),
                               prox_mu=float(conf.get(wire.PROX_MU, 0.0)))
    save_local_state(runner, _run_name(context), context.run_id)
    content = site_reply_content(  # a site whose budget is spent declines: global arrays back, 0 examples
        runner.wire_arrays(), 0 if getattr(stats, "declined", False) else runner.num_examples,
        runner.trained_classes_mask(),
        {**stats.as_metrics(), "round_seconds": time.perf_counter() - start},
    )
    # the model's identity (name, architecture, frozen/bank hashes, version): the server refuses a mismatch
    content[wire.SITE] = ConfigRecord({"name": runner.site.name, "task": runner.site.task, **runner.identity()})
    log.info("[%s] round %s: %d steps, loss %.4f, reply %.2f MB", runner.site.name, conf[wire.ROUND], stats.steps,
             stats.loss, record_nbytes(content) / 1e6)
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """SecAgg+ round preparation (server/secure.py): the frozen parts into the local cache, the site's metadata back."""
    try:
        return prepare_reply(msg, context, _config(context))
    except Exception as exc:
        return _error_reply(msg, exc)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        runner, _ = _runner(msg, context)
    except Exception as exc:
        return _error_reply(msg, exc)
    n_cases = min(len(runner.data.val_cases), int(runner.cfg.eval.max_cases or len(runner.data.val_cases)))
    summary = screen_eval_summary(runner.cfg, runner.evaluate(), n_cases)  # privacy.min_samples_for_metrics
    content = eval_reply_content(summary, runner.site.vocabulary.class_names, len(runner.data.val_cases))
    content[wire.SITE] = ConfigRecord({"name": runner.site.name})
    return Message(content, reply_to=msg)
