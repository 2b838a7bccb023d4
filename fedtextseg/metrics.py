"""Segmentation metrics per class per site: Dice and HD95 (MONAI), only on the classes a site annotates.

Conventions (stated once, used everywhere):
* A class is *evaluable* in a case when the site annotates it. Dice of a case where reference and prediction are
  both empty is skipped (NaN), as MONAI's ``ignore_empty`` does; an empty prediction of a non-empty reference
  scores 0.
* HD95 is in millimetres (the case's voxel spacing); it is NaN when either mask is empty.
* :class:`MetricAccumulator` keeps per-case values and reports per-class means over the cases where the value is
  defined, plus *pooled* Dice (intersections and sizes summed over all cases), since the two differ (the
  QaTa-COV19 literature reports both).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

__all__ = ["dice_score", "hd95", "MetricAccumulator", "mean_over_classes"]


def _batched(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A binary mask as MONAI's metrics take it: ``[batch=1, channel=1, *spatial]``."""
    return torch.as_tensor(mask).bool()[None, None].float()


def dice_score(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    """Dice of two binary masks; NaN when both are empty. Exact integer counts: MONAI's ``compute_dice`` gives the
    same value in float32 (``tests/test_metrics.py`` checks that they agree)."""
    p = torch.as_tensor(pred).bool()
    r = torch.as_tensor(ref).bool()
    denom = int(p.sum()) + int(r.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int((p & r).sum()) / denom


def hd95(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance (MONAI's ``compute_hausdorff_distance``; mm when spacing is
    given); NaN if either mask is empty."""
    p, r = _batched(pred), _batched(ref)
    if not p.any() or not r.any():
        return float("nan")
    spacing = None if spacing is None else [float(x) for x in spacing]
    return float(compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)[0, 0])


class MetricAccumulator:
    """Collects per-case, per-class Dice/HD95 and reports per-class summaries."""

    def __init__(self, class_names: Sequence[str], with_hd95: bool = True):
        self.class_names = list(class_names)
        self.with_hd95 = with_hd95
        self.dice: dict[str, list[float]] = defaultdict(list)
        self.hd: dict[str, list[float]] = defaultdict(list)
        self.inter: dict[str, int] = defaultdict(int)
        self.sizes: dict[str, int] = defaultdict(int)
        self.cases = 0

    def add_case(
        self,
        pred: torch.Tensor,
        ref: torch.Tensor,
        annotated: Iterable[bool] | torch.Tensor,
        spacing: Sequence[float] | None = None,
    ) -> dict[str, dict[str, float]]:
        """Add one case: ``pred``/``ref`` binary ``[C, *spatial]``; returns this case's per-class values."""
        pred = torch.as_tensor(pred).bool().cpu()
        ref = torch.as_tensor(ref).bool().cpu()
        annotated = [bool(a) for a in torch.as_tensor(annotated).flatten().tolist()]
        out: dict[str, dict[str, float]] = {}
        for c, name in enumerate(self.class_names):
            if not annotated[c]:
                continue
            d = dice_score(pred[c], ref[c])
            values = {"dice": d}
            self.inter[name] += int((pred[c] & ref[c]).sum())
            self.sizes[name] += int(pred[c].sum()) + int(ref[c].sum())
            if not math.isnan(d):
                self.dice[name].append(d)
            if self.with_hd95:
                h = hd95(pred[c], ref[c], spacing)
                values["hd95"] = h
                if not math.isnan(h):
                    self.hd[name].append(h)
            out[name] = values
        self.cases += 1
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        """Per class: mean Dice over cases, pooled Dice, mean HD95, and the number of cases behind each."""
        result = {}
        for name in self.class_names:
            if name not in self.sizes:
                continue
            d = self.dice.get(name, [])
            h = self.hd.get(name, [])
            result[name] = {
                "dice": float(np.mean(d)) if d else float("nan"),
                "dice_pooled": (2.0 * self.inter[name] / self.sizes[name]) if self.sizes[name] else float("nan"),
                "n": len(d),
            }
            if self.with_hd95:
                result[name]["hd95"] = float(np.mean(h)) if h else float("nan")
        return result


def mean_over_classes(summary: dict[str, dict[str, float]], key: str = "dice", classes: Iterable[str] | None = None) -> float:
    """Mean of a per-class metric over classes (NaNs skipped); NaN when nothing is defined."""
    names = list(classes) if classes is not None else list(summary)
    vals = [summary[c][key] for c in names if c in summary and not math.isnan(summary[c].get(key, float("nan")))]
    return float(np.mean(vals)) if vals else float("nan")
