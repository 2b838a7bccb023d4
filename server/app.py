"""Flower ServerApp: thin glue - the run's Coordinator, the Flower transport (SecAgg+ when configured) and the one
round protocol (``fedtextseg.federation.rounds.run_rounds``).

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

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtextseg.config import compose_config
from fedtextseg.errors import ConfigError
from fedtextseg.federation.coordinator import Coordinator
from fedtextseg.federation.rounds import run_rounds
from fedtextseg.flower_adapter import FlowerTransport
from fedtextseg.sites import ensure_data, unseen_site

app = ServerApp()


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
        wanted = min(num_sites, int(cfg.federation.min_sites))
    except ConfigError as exc:  # deployment: the images stay at the sites, each SuperNode names its own site-path
        num_sites, wanted = None, int(cfg.federation.min_sites)
        print(f"no site list on the server ({exc}); waiting for federation.min_sites={wanted} SuperNodes")
    name = str(rc.get("run-name") or cfg.run.name or f"{cfg.run.experiment}-{datetime.now():%Y%m%d-%H%M%S}")
    run_dir = Path(cfg.run.results_dir).expanduser().resolve() / name
    coord = Coordinator(cfg, run_dir, resume=bool(rc.get("resume", False)), num_sites=num_sites)
    _wait_for_nodes(grid, wanted)
    if cfg.privacy.secure_aggregation == "secaggplus":
        from server.secure import SecureFlowerTransport  # Flower's SecAgg+ workflow, round by round (docs/privacy.md)

        transport = SecureFlowerTransport(coord, grid, context)
    else:
        transport = FlowerTransport(grid)
    unseen = unseen_site(cfg) if cfg.federation.evaluate_unseen else None
    summary = run_rounds(coord, transport, unseen=unseen)
    print("\n" + str(summary))
    print(f"\nresults: {run_dir} (metrics.jsonl, config.yaml, metadata.json, summary.txt, model model.pt)")
