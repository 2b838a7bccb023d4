"""From run folders to study numbers: one record per (arm, seed), then mean and std over seeds.

A run record (:func:`summarise_run`) reads what the run wrote (``metrics.jsonl`` through
:mod:`fedtextseg.tracking`, ``metadata.json``) and what the study runner measured (wall time, peak memory):

* ``site_dice``: ``{site: {class: Dice}}`` of the final model on each training site's validation cases (only the
  classes that site annotates); ``unseen_dice``: ``{class: Dice}`` on the unseen, fully labeled hospital.
* ``site_mean`` / ``unseen_mean``: the means over those cells (NaNs skipped). ``unseen_pooled`` /
  ``unseen_pooled_mean``: the same with pooled Dice (voxels summed over the unseen hospital's cases; local-only
  runs have none).
* local-only runs (one model per site): a site's cell is its own model; an unseen class is the mean over the
  models of the sites that annotate it; ``cross_site`` is ``{model's site: {evaluated site: mean Dice}}``.
* ``wire_bytes`` (per round per site, each way), ``full_model_bytes`` (full-model FedAvg), ``frozen_bytes`` (sent
  once per site), ``epsilon`` (largest cumulative epsilon a site spent), ``declined`` (site-rounds refused for
  budget), ``failed`` (site-rounds lost to an error, see the run's ``failure`` rows), ``wall_s``, ``s_per_round``,
  ``train_s_per_round`` (sites' training time summed), ``peak_mb``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fedtextseg.baselines import CROSS_EVAL
from fedtextseg.studies.spec import ArmSpec
from fedtextseg.tracking import dice_table, read_metrics

__all__ = ["summarise_run", "aggregate_seeds", "mean_std", "finite_mean", "group_by_arm", "cell_rows", "cell_stat"]

UNSEEN_PREFIX = "unseen:"


def finite_mean(values: Iterable[Any]) -> float:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def mean_std(values: Sequence[Any]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of the finite values."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def _by_site(table: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{class: {site: v}} -> {site: {class: v}}."""
    out: dict[str, dict[str, Any]] = {}
    for cls, per_site in table.items():
        for site, v in per_site.items():
            out.setdefault(site, {})[cls] = v
    return out


def _unseen(rows: list[dict], key: str = "dice") -> dict[str, Any]:
    return {cls: next(iter(per.values())) for cls, per in dice_table(rows, "unseen_eval", key=key).items() if per}


def _train_seconds(rows: Iterable[Mapping]) -> float:
    """Local training time of a run: every site's (or the pooled model's) ``train_seconds``, summed."""
    return sum(float(r.get("train_seconds") or 0.0) for r in rows if r.get("kind") == "train")


def _read_metadata(run_dir: Path) -> dict:
    path = run_dir / "metadata.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _federated_like(run_dir: Path) -> dict[str, Any]:
    rows = read_metrics(run_dir)
    meta = _read_metadata(run_dir)
    privacy = [r for r in rows if r.get("kind") == "privacy"]
    return {
        "site_dice": _by_site(dice_table(rows, "site_eval")),
        "unseen_dice": _unseen(rows),
        "unseen_pooled": _unseen(rows, "dice_pooled"),
        "wire_bytes": meta.get("wire_bytes"),
        "full_model_bytes": meta.get("full_model_bytes"),
        "frozen_bytes": meta.get("frozen_bytes"),
        "epsilon": max((r["epsilon"] for r in privacy if isinstance(r.get("epsilon"), (int, float))), default=None),
        "declined": sum(1 for r in privacy if r.get("declined")) if privacy else None,
        "failed": sum(1 for r in rows if r.get("kind") == "failure" and "budget" not in str(r.get("reason", ""))),
        "train_s_total": _train_seconds(rows),
    }


def _local_only(run_dir: Path) -> dict[str, Any]:
    site_dice: dict[str, dict[str, Any]] = {}
    unseen_by_model: dict[str, dict[str, Any]] = {}
    cross: dict[str, dict[str, float]] = {}
    train_s = 0.0
    for sub in sorted(p for p in run_dir.iterdir() if (p / "metrics.jsonl").is_file()):
        rows = read_metrics(sub)
        own = _by_site(dice_table(rows, "site_eval"))
        model_site = next(iter(own), sub.name)
        site_dice[model_site] = own.get(model_site, {})
        unseen_by_model[model_site] = _unseen(rows)
        evaluated = {**own, **_by_site(dice_table(rows, CROSS_EVAL))}
        cross[model_site] = {s: finite_mean(v.values()) for s, v in evaluated.items()}
        cross[model_site]["unseen"] = finite_mean(unseen_by_model[model_site].values())
        train_s += _train_seconds(rows)
    unseen: dict[str, float] = {}
    classes = {c for per in unseen_by_model.values() for c in per}
    for cls in classes:  # each class by the models of the sites that annotate (and so trained) it
        experts = [unseen_by_model[s].get(cls) for s, annotated in site_dice.items() if cls in annotated]
        unseen[cls] = finite_mean(experts)
    return {"site_dice": site_dice, "unseen_dice": unseen, "cross_site": cross, "wire_bytes": 0,
            "full_model_bytes": None, "frozen_bytes": 0, "epsilon": None, "declined": None, "failed": 0,
            "train_s_total": train_s}


def summarise_run(run_dir: str | Path, kind: str, *, measured: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One (arm, seed) record from its run folder plus the runner's measurements (``wall_s``, ``peak_mb``, ...)."""
    run_dir = Path(run_dir)
    record = _local_only(run_dir) if kind == "local" else _federated_like(run_dir)
    if kind == "centralized":
        record.update(wire_bytes=0, frozen_bytes=0, full_model_bytes=None)  # nothing crosses a wire
    record.update(dict(measured or {}))
    cells = [v for per in record["site_dice"].values() for v in per.values()]
    record["site_mean"] = finite_mean(cells)
    record["unseen_mean"] = finite_mean(record["unseen_dice"].values())
    record["unseen_pooled_mean"] = finite_mean((record.get("unseen_pooled") or {}).values())
    rounds = record.get("rounds")
    if rounds and record.get("wall_s") is not None:
        record["s_per_round"] = float(record["wall_s"]) / int(rounds)
    if rounds:
        record["train_s_per_round"] = float(record.pop("train_s_total")) / int(rounds)
    return record


SCALARS = ("site_mean", "unseen_mean", "unseen_pooled_mean", "wall_s", "s_per_round", "train_s_per_round", "peak_mb",
           "wire_bytes", "full_model_bytes", "frozen_bytes", "epsilon", "declined", "failed")


def aggregate_seeds(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean/std/n over seeds of every scalar, of every (site, class) and unseen class cell, and of the cross-site
    matrix: ``{"scalars": {key: (mean, std, n)}, "site_dice": {site: {class: (m, s, n)}}, "unseen_dice": ...}``."""
    out: dict[str, Any] = {"seeds": [r.get("seed") for r in records], "scalars": {}, "site_dice": {},
                           "unseen_dice": {}, "cross_site": {}}
    for key in SCALARS:
        out["scalars"][key] = mean_std([r.get(key) for r in records])
    sites = dict.fromkeys(s for r in records for s in r["site_dice"])
    for site in sites:
        classes = dict.fromkeys(c for r in records for c in r["site_dice"].get(site, {}))
        out["site_dice"][site] = {c: mean_std([r["site_dice"].get(site, {}).get(c) for r in records]) for c in classes}
    for cls in dict.fromkeys(c for r in records for c in r["unseen_dice"]):
        out["unseen_dice"][cls] = mean_std([r["unseen_dice"].get(cls) for r in records])
    for model_site in dict.fromkeys(s for r in records for s in r.get("cross_site") or {}):
        evaluated = dict.fromkeys(e for r in records for e in (r.get("cross_site") or {}).get(model_site, {}))
        out["cross_site"][model_site] = {
            e: mean_std([(r.get("cross_site") or {}).get(model_site, {}).get(e) for r in records]) for e in evaluated}
    return out


def group_by_arm(arms: Sequence[ArmSpec], records: Sequence[Mapping]) -> list[tuple[ArmSpec, dict[str, Any]]]:
    """(arm, aggregate over its seeds) for every arm with at least one finished run, in study order."""
    out = []
    for arm in arms:
        mine = [r for r in records if r.get("arm") == arm.name]
        if mine:
            out.append((arm, aggregate_seeds(mine)))
    return out


def cell_rows(grouped) -> list[tuple[str, str]]:
    """(site, class) rows in first-seen order: training sites, then the unseen hospital."""
    rows: dict[tuple[str, str], None] = {}
    for _, agg in grouped:
        for site, per in agg["site_dice"].items():
            for cls in per:
                rows[(site, cls)] = None
    for _, agg in grouped:
        for cls in agg["unseen_dice"]:
            rows[("unseen", cls)] = None
    return sorted(rows, key=lambda sc: (sc[0] == "unseen", sc[0]))


def cell_stat(agg: Mapping, site: str, cls: str):
    return agg["unseen_dice"].get(cls) if site == "unseen" else agg["site_dice"].get(site, {}).get(cls)
