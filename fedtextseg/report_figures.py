"""The figures of a run report (PNG files, matplotlib without pyplot's global state, so it is thread-safe).

* :func:`dice_per_round` - per-class Dice against rounds, one panel per site (and the unseen hospital), one line
  per class; :func:`dice_mean_per_round` - per class averaged over the training sites that annotate it.
* :func:`train_loss` - training loss per round per site; :func:`bytes_per_round` - MB sent/received per round;
  :func:`privacy_spent` - cumulative epsilon per round per site.
* :func:`overlay_case` - axial slices of one case, predicted (solid) vs reference (dashed) contours per class.

Every function writes one PNG and returns its path; colours follow the class, the same in every figure.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

__all__ = ["class_colours", "present_classes", "dice_per_round", "dice_mean_per_round", "train_loss",
           "bytes_per_round", "privacy_spent", "overlay_case"]

DPI = 100


def class_colours(classes: Sequence[str]) -> dict[str, tuple]:
    """Distinct colours: tab10 for up to 10 classes, else tab20's dark shades first, then its light ones."""
    if len(classes) <= 10:
        return {c: colormaps["tab10"](i) for i, c in enumerate(classes)}
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {c: colormaps["tab20"](order[i % 20]) for i, c in enumerate(classes)}


def present_classes(rows: Sequence[Mapping], classes: Sequence[str]) -> list[str]:
    """The classes that occur in metric rows, in ``classes`` order (then any others)."""
    seen = {r["class"] for r in rows if "class" in r}
    return [c for c in classes if c in seen] + sorted(seen - set(classes))


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _series(rows: Sequence[Mapping], kind: str, key: str = "dice") -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{site: {class: [(round, value), ...]}} of one row kind, values that are numbers only."""
    out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        v = r.get(key)
        if r.get("kind") == kind and "class" in r and isinstance(v, (int, float)) and math.isfinite(v):
            out[r["site"]][r["class"]].append((int(r.get("round") or 0), float(v)))
    return out


def _lines(ax, per_class: Mapping[str, list], colours: Mapping[str, tuple], order: Sequence[str]) -> None:
    for c in [c for c in order if c in per_class]:
        pts = sorted(per_class[c])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1.5, color=colours.get(c), label=c)


def dice_per_round(rows: Sequence[Mapping], classes: Sequence[str], path: Path) -> Path | None:
    """One panel per evaluated site (site_eval) and unseen hospital (unseen_eval); one line per class."""
    panels = {**_series(rows, "site_eval"), **_series(rows, "unseen_eval")}
    if not panels:
        return None
    classes = present_classes(rows, classes)
    colours = class_colours(classes)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.3 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (site, per_class) in zip(axes, panels.items()):
        _lines(ax, per_class, colours, classes)
        ax.set_title(site, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("round")
        ax.set_ylabel("Dice")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", ncol=2 if len(per_class) > 6 else 1, framealpha=0.7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Per-class Dice per round, per site", fontsize=11)
    return _save(fig, path)


def dice_mean_per_round(rows: Sequence[Mapping], classes: Sequence[str], path: Path) -> Path | None:
    """Per class, the mean Dice over the training sites that annotate it, against rounds (dashed: overall mean)."""
    per_site = _series(rows, "site_eval")
    if not per_site:
        return None
    pooled: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for per_class in per_site.values():
        for c, pts in per_class.items():
            for rnd, v in pts:
                pooled[c][rnd].append(v)
    means = {c: [(rnd, float(np.mean(v))) for rnd, v in sorted(by.items())] for c, by in pooled.items()}
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    classes = present_classes(rows, classes)
    _lines(ax, means, class_colours(classes), classes)
    overall: dict[int, list[float]] = defaultdict(list)
    for pts in means.values():
        for rnd, v in pts:
            overall[rnd].append(v)
    xs = sorted(overall)
    ax.plot(xs, [np.mean(overall[x]) for x in xs], "k--", lw=2.2, label="mean over classes")
    ax.set_ylim(-0.02, 1.02)
    ax.set(xlabel="round", ylabel="Dice", title="Per-class Dice per round, averaged over the training sites")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def train_loss(rows: Sequence[Mapping], path: Path) -> Path | None:
    series = _series([{**r, "class": "loss"} for r in rows if r.get("kind") == "train"], "train", "train_loss")
    if not series:
        return None
    fig = Figure(figsize=(6.5, 3.4))
    ax = fig.subplots()
    for site, per_class in series.items():
        pts = sorted(per_class["loss"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=site)
    ax.set(xlabel="round", ylabel="mean training loss", title="Training loss per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def bytes_per_round(round_rows: Sequence[Mapping], path: Path) -> Path | None:
    rows = sorted((r for r in round_rows if r.get("round") is not None), key=lambda r: r["round"])
    if not rows:
        return None
    x = np.arange(len(rows))
    sent = [(r.get("bytes_sent") or 0) / 1e6 for r in rows]
    recv = [(r.get("bytes_received") or 0) / 1e6 for r in rows]
    fig = Figure(figsize=(6.5, 3.4))
    ax = fig.subplots()
    ax.bar(x - 0.2, sent, 0.4, label="sent to sites")
    ax.bar(x + 0.2, recv, 0.4, label="received from sites")
    ax.set_xticks(x, [str(r["round"]) for r in rows])
    ax.set(xlabel="round", ylabel="MB", title="Server traffic per round (all sites)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def privacy_spent(rows: Sequence[Mapping], path: Path) -> Path | None:
    pts: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        eps = r.get("epsilon")
        if isinstance(eps, (int, float)) and math.isfinite(eps) and r.get("round") is not None:
            pts[str(r.get("site", "?"))].append((int(r["round"]), float(eps)))
    if not pts:
        return None
    fig = Figure(figsize=(6.5, 3.4))
    ax = fig.subplots()
    for site, p in sorted(pts.items()):
        p = sorted(p)
        ax.plot([a for a, _ in p], [b for _, b in p], marker="o", ms=3, label=site)
    ax.set(xlabel="round", ylabel="cumulative epsilon", title="Privacy spent per site")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _slices(ref: np.ndarray, pred: np.ndarray, n: int = 3) -> list[int]:
    """Axial (last-axis) slices through the reference (else the prediction): spread over its extent."""
    fg = ref.any(0) if ref.any() else pred.any(0)
    zs = np.nonzero(fg.any((0, 1)))[0]
    if zs.size == 0:
        return [fg.shape[2] // 2]
    picks = np.quantile(zs, np.linspace(0.2, 0.8, n)) if zs.size > 1 else zs
    return sorted({int(round(float(z))) for z in picks})


def overlay_case(image: np.ndarray, ref: np.ndarray, pred: np.ndarray, classes: Sequence[str],
                 spacing: Sequence[float], title: str, path: Path, colours: Mapping[str, tuple] | None = None) -> Path:
    """``image [X, Y, Z]`` in RAS; ``ref``/``pred`` ``[K, X, Y, Z]``. Radiological view: patient right on the left,
    anterior up. Predicted contours solid, reference contours dashed."""
    colours = colours or class_colours(classes)
    zs = _slices(ref, pred)
    fig = Figure(figsize=(3.6 * len(zs) + 1.8, 3.9))
    axes = np.atleast_1d(fig.subplots(1, len(zs)))
    aspect = float(spacing[1]) / float(spacing[0])
    shown: list[str] = []
    for ax, z in zip(axes, zs):
        ax.imshow(image[:, :, z].T, cmap="gray", origin="lower", aspect=aspect, vmin=0, vmax=1,
                  interpolation="nearest")
        for k, c in enumerate(classes):
            for mask, style in ((pred[k], "solid"), (ref[k], "dashed")):
                sl = mask[:, :, z].T
                if sl.any() and not sl.all():
                    ax.contour(sl.astype(float), levels=[0.5], colors=[colours[c]], linestyles=style, linewidths=1.4)
                    if c not in shown:
                        shown.append(c)
        ax.invert_xaxis()  # radiological convention: the patient's right (+x in RAS) on the viewer's left
        ax.set_title(f"axial slice {z}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], color=colours[c], lw=2, label=c) for c in classes if c in shown]
    handles += [Line2D([], [], color="k", lw=1.4, label="predicted"),
                Line2D([], [], color="k", lw=1.4, ls="--", label="reference")]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
