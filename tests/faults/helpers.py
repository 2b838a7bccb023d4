"""Shared pieces of the fault suite: tiny federations on real synthetic NIfTI hospitals, and their records.

``tiny_cfg`` and the module-scoped ``hospitals`` fixture come from ``tests/test_federation_inprocess.py`` (3
synthetic partially labeled sites of 2 cases at 32^3 + an unseen one, a MiniLM text bank on disk), so the fault
tests run the same real federation as the federation tests, only with faults injected.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from fedtextseg.federation.aggregation import SiteUpdate
from fedtextseg.tracking import read_metrics
from test_federation_inprocess import hospitals, tiny_cfg  # noqa: F401 - re-exported fixture and config helper

QUIET = {"log_fn": lambda *_: None}


def rows(run_dir: str | Path, kind: str) -> list[dict]:
    """The ``kind`` rows of a run's metrics.jsonl."""
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


def trained(run_dir: str | Path) -> Counter:
    """How often each (round, site) was counted as a training contribution."""
    return Counter((r["round"], r["site"]) for r in rows(run_dir, "train"))


def honest_updates(coord, names=("a", "b", "c"), scale: float = 1e-3, seed: int = 0) -> list[SiteUpdate]:
    """Updates that moved the coordinator's global arrays a little (as a local round would), with its identity."""
    rng = np.random.default_rng(seed)
    out = []
    for i, name in enumerate(names):
        arrays = {k: (v + scale * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v.copy()
                  for k, v in coord.global_arrays.items()}
        mask = np.zeros(len(coord.bank.class_names), bool)
        mask[i % len(mask)] = True
        out.append(SiteUpdate(name, arrays, 2 + i, mask, {"train_loss": 1.0}, identity=dict(coord.identity)))
    return out
