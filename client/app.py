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
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedtextseg.federation.frozen import FrozenCache
from fedtextseg.flower_adapter import (eval_reply_content, missing_frozen_error, receive_frozen, record_nbytes,
                                       record_to_arrays, record_to_config, site_reply_content)
from fedtextseg.federation.frozen import MISSING_FROZEN
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


def _config(context: Context):
    rc = context.run_config
    cfg = compose_config(str(rc.get("experiment", "demo")), str(rc.get("overrides", "")))
    if rc.get("data-root"):
        cfg.data.root = str(rc["data-root"])
    threads = cfg.run.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    return cfg


def _runner(msg: Message, context: Context) -> tuple[SiteRunner, str]:
    cfg = _config(context)
    site_path = resolve_site_path(cfg, context.node_config)
    cache_dir = cfg.federation.get("frozen_cache") or str(Path(os.environ.get("FEDTEXTSEG_CACHE", Path.home() / ".cache" / "fedtextseg")) / "frozen")
    bundle = receive_frozen(msg.content, FrozenCache(cache_dir))
    key = (context.run_id, str(site_path), bundle.content_hash)
    if key not in _RUNNERS:
        model = build_model(cfg, frozen=bundle.arrays, meta=bundle.meta)
        _RUNNERS[key] = SiteRunner(cfg, site_path, model)
        _load_local_state(context, _RUNNERS[key])
    runner = _RUNNERS[key]
    runner.load_global(record_to_arrays(msg.content.array_records["arrays"]))
    return runner, bundle.content_hash


def _local_state_file(context: Context, runner: SiteRunner) -> Path | None:
    """Where this site keeps its ``local`` arrays (never sent, e.g. ``local_norms``) between messages: in deployment
    every message runs in a fresh ClientApp process, so they live on disk, per run name and site."""
    if not runner.model.param_groups().local:
        return None
    root = Path(os.environ.get("FEDTEXTSEG_CACHE", Path.home() / ".cache" / "fedtextseg")).expanduser()
    run = str(context.run_config.get("run-name") or f"run-{context.run_id}")
    safe = [re.sub(r"[^\w.-]+", "_", name) for name in (run, runner.site.name)]
    return root / "site-state" / safe[0] / f"{safe[1]}.npz"


def _save_local_state(context: Context, runner: SiteRunner) -> None:
    path = _local_state_file(context, runner)
    if path is None:
        return
    state = runner.model.state_dict()
    arrays = {k: state[k].detach().cpu().numpy() for k in runner.model.param_groups().local}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, __run_id__=np.array(str(context.run_id)), **arrays)
    os.replace(tmp, path)


def _load_local_state(context: Context, runner: SiteRunner) -> None:
    """Restore the saved local arrays: of this Flower run, or of the run being resumed (same run name)."""
    path = _local_state_file(context, runner)
    if path is None or not path.is_file():
        return
    with np.load(path) as saved:
        if str(saved["__run_id__"]) != str(context.run_id) and not context.run_config.get("resume", False):
            return  # an earlier run that reused the name: start fresh
        arrays = {k: saved[k] for k in saved.files if k != "__run_id__"}
    runner.load_global(arrays)  # merges any named arrays into the model


def _error_reply(msg: Message, exc: Exception) -> Message:
    if MISSING_FROZEN in str(exc):  # the server resends the frozen parts next round (FrozenDistributor)
        info = msg.content.config_records.get("frozen-info")
        return Message(missing_frozen_error(str(info["hash"]) if info is not None else ""), reply_to=msg)
    raise exc


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_secure_train(msg):  # SecAgg+ "collect" stage: train as below, reply with the encoded update to be masked
        return secure_train(msg, context, train)
    try:
        runner, _ = _runner(msg, context)
    except Exception as exc:  # a missing frozen bundle is answered, anything else is a real failure
        return _error_reply(msg, exc)
    conf = record_to_config(msg.content.config_records["config"])
    # DP-SGD settings with this node's own budget (node config) and the run's ledger key; None when off
    runner.privacy = SitePrivacy.for_site(runner.cfg, runner.site, context.node_config,
                                          run_key=str(conf.get("run-key") or f"flower-run-{context.run_id}"))
    start = time.perf_counter()
    stats = runner.train_round(round_=int(conf["round"]), total_rounds=int(conf["total-rounds"]),
                               prox_mu=float(conf.get("prox-mu", 0.0)))
    _save_local_state(context, runner)
    content = site_reply_content(  # a site whose budget is spent declines: global arrays back, 0 examples
        runner.wire_arrays(), 0 if getattr(stats, "declined", False) else runner.num_examples,
        runner.trained_classes_mask(),
        {**stats.as_metrics(), "round_seconds": time.perf_counter() - start},
    )
    # the model's identity (name, architecture, frozen/bank hashes, version): the server refuses a mismatch
    content["site"] = ConfigRecord({"name": runner.site.name, "task": runner.site.task, **runner.identity()})
    log.info("[%s] round %s: %d steps, loss %.4f, reply %.2f MB", runner.site.name, conf["round"], stats.steps,
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
    n_cases = min(len(runner.data.val_cases), int(runner.cfg.eval.get("max_cases") or len(runner.data.val_cases)))
    summary = screen_eval_summary(runner.cfg, runner.evaluate(), n_cases)  # privacy.min_samples_for_metrics
    content = eval_reply_content(summary, runner.site.vocabulary.class_names, len(runner.data.val_cases))
    content["site"] = ConfigRecord({"name": runner.site.name})
    return Message(content, reply_to=msg)
