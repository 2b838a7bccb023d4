"""A study's figures (PNG, matplotlib without pyplot's global state). A study file lists the kinds it wants:

* ``dice_by_arm``: sites' mean and unseen mean Dice per arm, error bars = std over seeds;
* ``class_dice``: heat map of per-class Dice, rows = (site, class), columns = arms;
* ``local_cross_site``: heat map of every local-only model (trained on one site) on every site and the unseen one;
* ``dice_vs_x``: Dice against the arms' ``x`` (target epsilon, number of sites); ``inf`` drawn at the right end;
* ``cost_vs_x``: wall time per round and peak memory against ``x``;
* ``bytes_by_arm``: MB per round per site each arm sends, against full-model FedAvg and the one-time frozen parts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from fedtextseg.studies.collect import cell_rows, cell_stat
from fedtextseg.studies.spec import StudySpec

__all__ = ["draw_figures", "FIGURES"]

DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _stat(agg: Mapping, key: str) -> tuple[float, float]:
    mean, std, n = agg["scalars"][key]
    return (mean, std if n > 1 else 0.0) if n else (float("nan"), 0.0)


def _bars_by_arm(grouped, path: Path, series: Sequence[tuple[str, str]], *, ylabel: str, title: str,
                 scale: float = 1.0, log: bool = False) -> Path | None:
    """Grouped bars: one group per arm, one bar per (key, label) of ``series``; error bars = std over seeds."""
    if not grouped:
        return None
    x = np.arange(len(grouped))
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(6.0, 1.1 * len(grouped) + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    for i, (key, label) in enumerate(series):
        stats = [_stat(agg, key) for _, agg in grouped]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [s[0] * scale for s in stats], width,
               yerr=[s[1] * scale for s in stats], capsize=3, label=label)
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1)
    ax.set_xticks(x, [arm.title for arm, _ in grouped], rotation=25, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def dice_by_arm(spec: StudySpec, grouped, path: Path) -> Path | None:
    return _bars_by_arm(grouped, path, (("site_mean", "training sites (their classes)"),
                                        ("unseen_mean", "unseen hospital (all classes)")),
                        ylabel="mean Dice", title=f"{spec.title}: mean Dice per method")


def _heatmap(ax, values: np.ndarray, rows: Sequence[str], cols: Sequence[str]) -> None:
    masked = np.ma.masked_invalid(values)
    image = ax.imshow(masked, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for (i, j), v in np.ndenumerate(values):
        if math.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
    ax.figure.colorbar(image, ax=ax, shrink=0.8, label="Dice")


def class_dice(spec: StudySpec, grouped, path: Path) -> Path | None:
    rows = cell_rows(grouped)
    if not rows:
        return None
    values = np.array([[(cell_stat(agg, s, c) or (float("nan"),))[0] for _, agg in grouped] for s, c in rows], float)
    fig = Figure(figsize=(max(5.0, 0.9 * len(grouped) + 3), 0.26 * len(rows) + 1.6), layout="constrained")
    ax = fig.subplots()
    _heatmap(ax, values, [f"{s}: {c}" for s, c in rows], [arm.title for arm, _ in grouped])
    ax.set_title("Per-class Dice (mean over seeds; blank: not annotated there)", fontsize=9)
    return _save(fig, path)


def local_cross_site(spec: StudySpec, grouped, path: Path) -> Path | None:
    local = [(arm, agg) for arm, agg in grouped if agg["cross_site"]]
    if not local:
        return None
    arm, agg = local[0]
    matrix = agg["cross_site"]
    models = list(matrix)
    evaluated = list(dict.fromkeys(e for per in matrix.values() for e in per))
    values = np.array([[matrix[m].get(e, (float("nan"),))[0] for e in evaluated] for m in models], float)
    fig = Figure(figsize=(1.1 * len(evaluated) + 3, 0.45 * len(models) + 1.6), layout="constrained")
    ax = fig.subplots()
    _heatmap(ax, values, models, evaluated)
    ax.set(xlabel="evaluated on", ylabel="model trained on")
    ax.set_title(f"{arm.title}: each site's model on every site (mean Dice)", fontsize=9)
    return _save(fig, path)


def _x_positions(grouped, log: bool) -> tuple[list[float], list[str]]:
    """Plot positions of the arms' x values; ``inf`` sits one step to the right of the largest finite value."""
    xs = [arm.x for arm, _ in grouped]
    finite = [x for x in xs if x is not None and math.isfinite(x)]
    top = max(finite) if finite else 1.0
    inf_at = top * 4 if log else top + max(1.0, (top - min(finite)) / 4 if finite else 1.0)
    pos = [inf_at if x is not None and math.isinf(x) else (float("nan") if x is None else x) for x in xs]
    return pos, ["inf" if x is not None and math.isinf(x) else f"{x:g}" for x in xs if x is not None]


def _x_panel(ax, spec: StudySpec, grouped, series: Sequence[tuple[str, str]], ylabel: str) -> None:
    log = bool(spec.x_axis.get("log"))
    pos, labels = _x_positions(grouped, log)
    order = np.argsort(pos)
    for key, label in series:
        stats = [_stat(agg, key) for _, agg in grouped]
        ax.errorbar([pos[i] for i in order], [stats[i][0] for i in order], yerr=[stats[i][1] for i in order],
                    marker="o", capsize=3, label=label)
    if log:
        ax.set_xscale("log")
    ax.set_xticks([pos[i] for i in order], [labels[i] for i in order])
    ax.minorticks_off()
    ax.set(xlabel=spec.x_axis.get("label", "x"), ylabel=ylabel)
    ax.grid(alpha=0.3)


def dice_vs_x(spec: StudySpec, grouped, path: Path) -> Path | None:
    grouped = [(a, g) for a, g in grouped if a.x is not None]
    if not grouped:
        return None
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.subplots()
    _x_panel(ax, spec, grouped, (("site_mean", "training sites"), ("unseen_mean", "unseen hospital")), "mean Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(spec.title, fontsize=10)
    return _save(fig, path)


def cost_vs_x(spec: StudySpec, grouped, path: Path) -> Path | None:
    grouped = [(a, g) for a, g in grouped if a.x is not None]
    if not grouped:
        return None
    fig = Figure(figsize=(10.0, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    _x_panel(left, spec, grouped, (("s_per_round", "wall (training + evaluation)"),
                                   ("train_s_per_round", "local training, all sites")), "seconds per round")
    left.legend(fontsize=8)
    _x_panel(right, spec, grouped, (("peak_mb", "peak memory"),), "MB")
    fig.suptitle(f"{spec.title}: cost vs {spec.x_axis.get('label', 'x')}", fontsize=10)
    return _save(fig, path)


def bytes_by_arm(spec: StudySpec, grouped, path: Path) -> Path | None:
    return _bars_by_arm([(a, g) for a, g in grouped if _stat(g, "wire_bytes")[0] > 0], path,
                        (("wire_bytes", "sent per round (each way)"),
                         ("full_model_bytes", "full-model FedAvg per round"),
                         ("frozen_bytes", "frozen parts, once per site")),
                        ylabel="MB per site", title=f"{spec.title}: bytes per site", scale=1e-6, log=True)


FIGURES: dict[str, Callable[[StudySpec, Any, Path], Path | None]] = {
    "dice_by_arm": dice_by_arm, "class_dice": class_dice, "local_cross_site": local_cross_site,
    "dice_vs_x": dice_vs_x, "cost_vs_x": cost_vs_x, "bytes_by_arm": bytes_by_arm,
}


def draw_figures(spec: StudySpec, grouped, folder: Path) -> list[Path]:
    """Every figure the study lists, as ``<folder>/<kind>.png`` (kinds with nothing to show are skipped)."""
    unknown = [f for f in spec.figures if f not in FIGURES]
    if unknown:
        from fedtextseg.errors import ConfigError

        raise ConfigError(f"study {spec.name!r}: unknown figure kind(s) {unknown}; known: {', '.join(FIGURES)}")
    out = []
    for kind in spec.figures:
        path = FIGURES[kind](spec, grouped, folder / f"{kind}.png")
        if path is not None:
            out.append(path)
    return out
