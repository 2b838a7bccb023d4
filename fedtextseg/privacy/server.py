"""The server's view of privacy: which replies are declines, per-round privacy records, the run's ledger.

Sites report their own cumulative spending in every train reply (``privacy/*`` metrics; see
:class:`fedtextseg.privacy.site.SitePrivacy`). The coordinator

* keeps declined replies (``privacy/declined`` = 1: the site's budget would be exceeded; it sent back the global
  arrays unchanged with 0 examples) out of screening and aggregation and records them as
  ``budget exhausted`` failures, so the run carries on with the other sites (:func:`split_declined`);
* logs one ``kind: "privacy"`` row per site and round in metrics.jsonl (round, site, epsilon, delta,
  noise_multiplier, steps, declined, ...) (:func:`record_privacy`);
* keeps ``results/<run>/privacy.json`` (:func:`write_privacy_ledger`), rebuilt from metrics.jsonl after every
  round, so it is complete at the end of the run and consistent after a resume.

The run key that names the sites' ledgers (``run-key`` in each round's config) is the run's folder name plus a
random suffix drawn once and kept in metadata.json, so a resumed run continues the same ledgers and a new run
with a reused name does not inherit old spending (:func:`run_key_for`).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

from fedtextseg import wire

__all__ = ["split_declined", "privacy_rows", "record_privacy", "write_privacy_ledger", "run_key_for",
           "RUN_KEY_CONFIG"]

RUN_KEY_CONFIG = wire.RUN_KEY
_PREFIX = "privacy/"
_FIELDS = {"epsilon": "epsilon", "delta": "delta", "noise_multiplier": "noise_multiplier", "steps": "steps",
           "declined": "declined", "rounds": "rounds_trained", "sample_rate": "sample_rate",
           "max_grad_norm": "max_grad_norm", "target_epsilon": "target_epsilon",
           "epsilon_if_trained": "epsilon_if_trained"}


def _metric(update: Any, key: str, default: float | None = None) -> float | None:
    value = getattr(update, "metrics", {}).get(f"{_PREFIX}{key}", default)
    return None if value is None else float(value)


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.3g}"


def split_declined(updates: Sequence[Any]) -> tuple[list[Any], dict[str, str]]:
    """(replies to screen and aggregate, ``{site: "privacy budget exhausted ..."}`` for the declines)."""
    keep, declined = [], {}
    for u in updates:
        if (_metric(u, "declined", 0.0) or 0.0) > 0.5:
            spent, would, target = (_fmt(_metric(u, k)) for k in ("epsilon", "epsilon_if_trained", "target_epsilon"))
            declined[u.node] = (f"privacy budget exhausted: epsilon spent {spent}, another round would reach "
                                f"{would} > target {target}; the site declined to train")
        else:
            keep.append(u)
    return keep, declined


def privacy_rows(updates: Iterable[Any]) -> list[dict[str, Any]]:
    """One record per reply that carries ``privacy/*`` metrics."""
    rows = []
    for u in updates:
        if not any(k.startswith(_PREFIX) for k in getattr(u, "metrics", {})):
            continue
        row: dict[str, Any] = {"site": u.node}
        for key, name in _FIELDS.items():
            v = _metric(u, key)
            if v is not None:
                row[name] = v
        row["declined"] = bool(row.get("declined", 0.0) > 0.5)
        for k in ("steps", "rounds_trained"):
            if k in row:
                row[k] = int(row[k])
        if row.get("target_epsilon", 0) < 0:
            row["target_epsilon"] = None  # no cap
        if row.get("epsilon_if_trained", 0) < 0:
            row["epsilon_if_trained"] = None
        rows.append(row)
    return rows


def record_privacy(recorder, round_: int, updates: Sequence[Any]) -> list[dict[str, Any]]:
    """Log the round's ``privacy`` rows in metrics.jsonl and refresh ``privacy.json``; returns the rows."""
    rows = privacy_rows(updates)
    for row in rows:
        recorder.log("privacy", round_, **row)
    if rows or (recorder.run_dir / "privacy.json").exists():
        write_privacy_ledger(recorder.run_dir)
    return rows


def write_privacy_ledger(run_dir: str | Path) -> Path:
    """``privacy.json``: per site, every round's record and the final cumulative epsilon (from metrics.jsonl)."""
    run_dir = Path(run_dir)
    rows = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    sites: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("kind") != "privacy":
            continue
        s = sites.setdefault(r["site"], {"rounds": []})
        s["rounds"].append({k: v for k, v in r.items() if k not in ("kind", "site", "time")})
    for s in sites.values():
        s["rounds"].sort(key=lambda r: r.get("round") or 0)
        last = s["rounds"][-1]
        trained = [r for r in s["rounds"] if not r.get("declined")]
        s.update(epsilon=last.get("epsilon"), delta=last.get("delta"), target_epsilon=last.get("target_epsilon"),
                 noise_multiplier=last.get("noise_multiplier"), steps=last.get("steps"),
                 rounds_trained=len(trained), rounds_declined=len(s["rounds"]) - len(trained),
                 budget_exhausted=bool(last.get("declined")))
    meta = {}
    if (run_dir / "metadata.json").is_file():
        meta = json.loads((run_dir / "metadata.json").read_text())
    ledger = {"run": run_dir.name, "run_key": meta.get("privacy_run_key"),
              "note": "per-site cumulative (epsilon, delta) as reported by each site's own accountant; "
                      "see docs/privacy.md for what the guarantee covers",
              "sites": dict(sorted(sites.items()))}
    path = run_dir / "privacy.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(ledger, indent=2))
    os.replace(tmp, path)
    return path


def run_key_for(recorder) -> str:
    """The run's ledger key: kept in metadata.json (``privacy_run_key``) so a resumed run keeps it."""
    key = recorder.metadata.get("privacy_run_key")
    if not key:
        key = f"{recorder.run_dir.name}-{uuid.uuid4().hex[:8]}"
        recorder.update_metadata(privacy_run_key=key)
    return str(key)

