"""Flower ServerApp: thin glue between Flower's Grid and ``fedtextseg.federation.coordinator.Coordinator``.

Run-config keys (flat, as Flower requires): ``experiment`` (a file in configs/experiment), ``overrides`` (Hydra
overrides, one string), ``results-dir``, ``data-root``, ``run-name``, ``resume`` (continue ``run-name`` from its
last checkpoint). Each round: send the global shared + per-class arrays (and the frozen common parts to nodes that
lack them), aggregate the replies group-wise, ask every site for per-class validation Dice of the new global
model, evaluate on the unseen hospital, checkpoint. The run ends with a per-class Dice table.
"""

from __future__ import annotations

import os as _os
from pathlib import Path as _Path

# the configs travel inside the Flower app bundle, next to this package
_os.environ.setdefault("FEDTEXTSEG_CONFIGS", str(_Path(__file__).resolve().parent.parent / "configs"))

import time
from datetime import datetime
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtextseg.config import compose_config
from fedtextseg.errors import ConfigError
from fedtextseg.federation.coordinator import Coordinator
from fedtextseg.flower_adapter import (arrays_to_record, attach_frozen, config_to_record, content_to_site_update,
                                       eval_reply_summary, is_missing_frozen, record_nbytes)
from fedtextseg.sites import ensure_data, federation_sites, unseen_site

app = ServerApp()


def _site_name(reply: Message) -> str:
    if reply.has_content() and "site" in reply.content.config_records:
        return str(reply.content.config_records["site"]["name"])
    return f"node-{reply.metadata.src_node_id}"


def _messages(coord: Coordinator, grid: Grid, round_: int, message_type: str) -> tuple[list[Message], dict[int, int]]:
    nodes = sorted(grid.get_node_ids())
    messages, sizes = [], {}
    for node in nodes:
        content = RecordDict({"arrays": arrays_to_record(coord.global_arrays),
                              "config": config_to_record(coord.round_config(round_))})
        attach_frozen(content, coord.frozen.content_hash, coord.frozen_payload(node))
        sizes[node] = record_nbytes(content)
        messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
    return messages, sizes


def _wait_for_nodes(grid: Grid, wanted: int, timeout: float = 120.0) -> None:
    start = time.time()
    while len(list(grid.get_node_ids())) < wanted and time.time() - start < timeout:
        time.sleep(1.0)


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = compose_config(str(rc.get("experiment", "demo")), str(rc.get("overrides", "")))
    if rc.get("data-root"):
        cfg.data.root = str(rc["data-root"])
    if rc.get("results-dir"):
        cfg.run.results_dir = str(rc["results-dir"])
    try:
        num_sites = len(ensure_data(cfg))
        wanted = min(num_sites, int(cfg.federation.get("min_sites", 1)))
    except ConfigError as exc:  # deployment: the images stay at the sites, each SuperNode names its own site-path
        num_sites, wanted = None, int(cfg.federation.get("min_sites", 1))
        print(f"no site list on the server ({exc}); waiting for federation.min_sites={wanted} SuperNodes")
    name = str(rc.get("run-name") or cfg.run.name or f"{cfg.run.experiment}-{datetime.now():%Y%m%d-%H%M%S}")
    run_dir = Path(cfg.run.results_dir).expanduser().resolve() / name
    coord = Coordinator(cfg, run_dir, resume=bool(rc.get("resume", False)), num_sites=num_sites)
    timeout = float(cfg.federation.get("round_timeout", 3600))
    _wait_for_nodes(grid, wanted)
    unseen = unseen_site(cfg) if cfg.federation.get("evaluate_unseen", True) else None

    secure = None
    if str(cfg.get("privacy", {}).get("secure_aggregation") or "none") == "secaggplus":
        from server.secure import SecureRounds  # Flower's SecAgg+ workflow, round by round (docs/privacy.md)

        secure = SecureRounds(coord, grid, context, timeout)
    names: dict[int, str] = {}  # node id -> site name, learned from replies (failures are recorded by site name)
    for round_ in range(coord.start_round, coord.total_rounds + 1):
        timeout = coord.round_timeout(round_)  # the first round may be given longer (sites preprocess then)
        # with SecAgg+ no plain train message is sent: the training part of the round is secure.train_round below
        messages, sent = _messages(coord, grid, round_, MessageType.TRAIN) if secure is None else ([], {})
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        updates, failures, sent_by_site, received = [], {}, {}, {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                if is_missing_frozen(reply):
                    coord.distributor.mark_missing(node)
                failures[names.get(node, f"node-{node}")] = str(reply.error.reason)
                continue
            site = names[node] = _site_name(reply)
            try:
                updates.append(content_to_site_update(reply.content, site))
            except Exception as exc:  # a malformed reply excludes that site, not the round
                failures[site] = str(exc)
                continue
            sent_by_site[site], received[site] = sent[node], record_nbytes(reply.content)
        answered = {reply.metadata.src_node_id for reply in replies}
        for node in sorted({m.metadata.dst_node_id for m in messages} - answered):  # crashed, hung or offline
            failures[names.get(node, f"node-{node}")] = f"no reply within {timeout:.0f}s (federation.round_timeout)"
        if secure is not None:  # SecAgg+: the sites' updates reach the server only as their (weighted) sum
            secure.train_round(round_)
        else:
            coord.finish_train_round(round_, updates, failures, sent_by_site, received)

        eval_messages, _ = _messages(coord, grid, round_, MessageType.EVALUATE)
        for reply in grid.send_and_receive(eval_messages, timeout=timeout):
            if reply.has_error():
                if is_missing_frozen(reply):
                    coord.distributor.mark_missing(reply.metadata.src_node_id)
                coord.recorder.log("failure", round_, site=names.get(reply.metadata.src_node_id,
                                                                     f"node-{reply.metadata.src_node_id}"),
                                   reason=f"evaluate: {reply.error.reason}")
                continue
            site = names[reply.metadata.src_node_id] = _site_name(reply)
            coord.record_site_eval(round_, site, eval_reply_summary(reply.content, coord.bank.class_names))
        if unseen is not None:
            coord.evaluate_unseen(round_, unseen)
        coord.checkpoint(round_)

    model_path = coord.save_model()
    print("\n" + coord.summary_table())
    print(f"\nresults: {run_dir} (metrics.jsonl, config.yaml, metadata.json, summary.txt, model {model_path.name})")
