"""A run's record on disk: resolved config, metadata (provenance), metrics.jsonl, and the readable summary.

Layout of ``results/<run>/``::

    config.yaml        the fully resolved Hydra config the run used
    metadata.json      what was really used: text encoder (or its fallback), DINOv2 weights (or random init),
                       versions, device, sites, hashes
    metrics.jsonl      one JSON object per line: {"round", "kind", "site", "class", ...values}
    checkpoints/       (federation) atomic per-round checkpoints

The printed summary is a per-class Dice table: classes as rows, sites (and the unseen hospital) as columns, each
cell only where that site annotates the class.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig

from fedtextseg.config import save_resolved
from fedtextseg.errors import ConfigError, FedTextSegError

log = logging.getLogger(__name__)

__all__ = ["RunRecorder", "read_metrics", "dice_table", "format_table", "environment_info", "cpu_model"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment_info() -> dict[str, Any]:
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpus": os.cpu_count(),
    }
    from fedtextseg import engine

    device = engine.resolve_device("auto")
    info["precision_auto"] = engine.resolve_precision(device, "auto")  # what run.precision=auto trains in here
    info["cpu_bf16_flags"] = sorted(engine.cpu_flags() & engine.CPU_BF16_FLAGS)
    try:
        import flwr
        import monai

        info.update(flwr=flwr.__version__, monai=monai.__version__)
    except ImportError:  # pragma: no cover - both are dependencies
        pass
    return info


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return _clean(value.item())
    return value


class RunRecorder:
    """Writes one run's files; checks the results folder is writable before any training starts."""

    def __init__(self, run_dir: str | Path, cfg: DictConfig | None = None, resume: bool = False):
        self.run_dir = Path(run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-test"
            probe.write_bytes(b"0" * 1024)
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"results folder {self.run_dir} is not writable ({exc.strerror or exc}); "
                "choose another with run.results_dir=... before training starts"
            ) from None
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if not resume and self.metrics_path.exists():
            self.metrics_path.unlink()
        if cfg is not None:
            save_resolved(cfg, self.run_dir / "config.yaml")
        self.metadata: dict[str, Any] = {}
        meta_path = self.run_dir / "metadata.json"
        if resume and meta_path.exists():
            self.metadata = json.loads(meta_path.read_text())

    def update_metadata(self, **items: Any) -> None:
        self.metadata.update(_clean(items))
        tmp = self.run_dir / "metadata.json.tmp"
        tmp.write_text(json.dumps(self.metadata, indent=2, sort_keys=True))
        os.replace(tmp, self.run_dir / "metadata.json")

    def log(self, kind: str, round: int | None = None, **values: Any) -> None:
        row = {"time": round_time(), "round": round, "kind": kind, **_clean(values)}
        try:
            with self.metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        except OSError as exc:  # disk full mid-run: say where and what to do, not a bare traceback
            raise FedTextSegError(f"{self.metrics_path}: cannot record the run ({exc.strerror or exc}); free space "
                                  "there and resume the run from its last checkpoint") from None

    def log_per_class(self, kind: str, round: int | None, site: str, summary: Mapping[str, Mapping[str, float]]) -> None:
        for cls, values in summary.items():
            self.log(kind, round, site=site, **{"class": cls}, **dict(values))

    def truncate_after(self, round: int) -> None:
        """Drop records of rounds after ``round`` (a resumed run repeats them), keeping everything else."""
        if not self.metrics_path.exists():
            return
        keep = [line for line in read_metrics(self.metrics_path) if line.get("round") is None or line["round"] <= round]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.metrics_path)


def round_time() -> float:
    return round(time.time(), 3)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    rows = []
    lines = path.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines):  # the last write of a killed process, cut short: that row never happened
                log.warning("%s: ignoring an incomplete last line (the run was interrupted while writing it)", path)
                break
            raise FedTextSegError(f"{path}: line {i} is not a JSON record ({exc})") from None
    return rows


def dice_table(rows: Iterable[Mapping], kind: str, round: int | None = None, key: str = "dice") -> dict[str, dict[str, float]]:
    """{class: {site: value}} for one kind of record at one round (default: the last round present)."""
    rows = [r for r in rows if r.get("kind") == kind and "class" in r]
    if not rows:
        return {}
    if round is None:
        round = max(r["round"] or 0 for r in rows)
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        if (r["round"] or 0) == round:
            table.setdefault(r["class"], {})[r["site"]] = r.get(key)
    return table


def format_table(table: Mapping[str, Mapping[str, float | None]], class_order: Iterable[str] | None = None, title: str = "") -> str:
    """A plain-text table, classes as rows and sites as columns; blank where a site does not annotate a class."""
    sites: list[str] = []
    for per_site in table.values():
        for s in per_site:
            if s not in sites:
                sites.append(s)
    classes = [c for c in (class_order or table) if c in table]
    width = max([len(c) for c in classes] + [5])
    colw = max([len(s) for s in sites] + [6])
    lines = [title] if title else []
    lines.append(f"{'class':<{width}}  " + "  ".join(f"{s:>{colw}}" for s in sites) + f"  {'mean':>{colw}}")
    for c in classes:
        vals = [table[c].get(s) for s in sites]
        cells = ["" if v is None else f"{v:.3f}" for v in vals]
        defined = [v for v in vals if v is not None]
        mean = f"{sum(defined) / len(defined):.3f}" if defined else ""
        lines.append(f"{c:<{width}}  " + "  ".join(f"{x:>{colw}}" for x in cells) + f"  {mean:>{colw}}")
    return "\n".join(lines)
