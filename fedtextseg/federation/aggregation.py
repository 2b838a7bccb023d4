"""Group-wise aggregation of site updates: FedAvg / equal weights / robust rules, class-aware per-class rows.

What crosses the wire each round is the ``shared`` group plus the ``per_class`` group of a model's parameter groups
(see ``fedtextseg.params``). ``aggregate`` combines the sites' arrays:

- shared arrays: a weighted mean over all sites (``site_weight``: ``weighting="examples"``: FedAvg by sample
  count; ``"equal"``: every site counts once, as ConDistFL does; ``"classes"``: sample count times the number of
  classes the site annotates, so a site labelling nine organs moves the shared encoder more than one labelling
  two), or a robust coordinate-wise rule (``"median"``, ``"trimmed_mean"``; both unweighted, like Flower's
  FedMedian / FedTrimmedAvg).
- per-class arrays: row by row along the declared class axis, a weighted mean over ONLY the sites that annotate
  that class; a row that no site annotates keeps the global value. A class labeled by one site of four is thus not
  diluted four times.

Sums are computed in float64 and cast back to the global dtype (integer arrays are rounded).
``validate_update`` lists what is wrong with one site's update so a server can exclude it and record why;
``screen_updates`` applies it, the model-identity check (``fedtextseg.federation.identity``) and the outlier screen
(``screen_outliers``: an update whose distance to the global model is ``outlier_factor`` times the median distance
of the round's other updates, or above an absolute ``max_update_norm``, is a diverged or hostile site).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtextseg.errors import FedTextSegError

RULES = ("mean", "median", "trimmed_mean")
WEIGHTINGS = ("examples", "equal", "classes")


@dataclass
class SiteUpdate:
    """One site's reply: its arrays (wire keys only), sample count, annotated-class mask [C] and flat metrics."""

    node: str
    arrays: dict[str, np.ndarray]
    num_examples: int
    annotated: np.ndarray
    metrics: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)  # what the site's model was built from (federation.identity)

    def __post_init__(self) -> None:
        self.node = str(self.node)
        self.annotated = np.asarray(self.annotated).astype(bool).reshape(-1)


@dataclass(frozen=True)
class Groups:
    """Normalised parameter groups: ``per_class`` maps a key to its (non-negative) class axis."""

    shared: tuple[str, ...]
    per_class: dict[str, int]
    frozen_common: tuple[str, ...] = ()
    local: tuple[str, ...] = ()

    @property
    def wire_keys(self) -> tuple[str, ...]:
        """Keys sent every round: shared then per-class."""
        return self.shared + tuple(self.per_class)


def as_groups(groups: Any, global_arrays: Mapping[str, np.ndarray] | None = None) -> Groups:
    """Normalise a ``ParamGroups``-like object or a mapping with ``shared``/``per_class``/... entries.

    ``per_class`` may be a mapping key -> class axis or a plain list of keys (class axis 0). Negative axes are
    resolved against ``global_arrays`` when given. A key in two groups is an error.
    """
    if isinstance(groups, Groups) and global_arrays is None:
        return groups

    def get(name: str) -> Any:
        if isinstance(groups, Mapping):
            return groups.get(name, ())
        return getattr(groups, name, ())

    shared = tuple(get("shared") or ())
    raw_pc = get("per_class") or {}
    per_class = dict(raw_pc) if isinstance(raw_pc, Mapping) else {k: 0 for k in raw_pc}
    frozen = tuple(get("frozen_common") or ())
    local = tuple(get("local") or ())
    seen: dict[str, str] = {}
    for gname, keys in (("shared", shared), ("per_class", tuple(per_class)), ("frozen_common", frozen),
                        ("local", local)):
        for k in keys:
            if k in seen:
                raise FedTextSegError(f"parameter '{k}' is in two groups: {seen[k]} and {gname}")
            seen[k] = gname
    resolved: dict[str, int] = {}
    for k, axis in per_class.items():
        axis = int(axis)
        if global_arrays is not None and k in global_arrays:
            ndim = np.ndim(global_arrays[k])
            if not -ndim <= axis < ndim:
                raise FedTextSegError(f"per-class parameter '{k}': class axis {axis} out of range for {ndim}-d array")
            axis %= ndim
        elif axis < 0:
            raise FedTextSegError(f"per-class parameter '{k}': negative class axis {axis} needs the global array")
        resolved[k] = axis
    return Groups(shared, resolved, frozen, local)


def infer_num_classes(global_arrays: Mapping[str, np.ndarray], groups: Any) -> int | None:
    """The vocabulary size C read off the per-class arrays' class axes (None if there are none)."""
    g = as_groups(groups, global_arrays)
    sizes = {k: np.shape(global_arrays[k])[ax] for k, ax in g.per_class.items() if k in global_arrays}
    if not sizes:
        return None
    if len(set(sizes.values())) > 1:
        raise FedTextSegError(f"per-class parameters disagree on the number of classes: {sizes}")
    return int(next(iter(sizes.values())))


def _check_global(global_arrays: Mapping[str, np.ndarray], g: Groups) -> None:
    missing = [k for k in g.wire_keys if k not in global_arrays]
    if missing:
        raise FedTextSegError(f"global arrays lack parameter(s) of the shared/per-class groups: {missing}")
    extra = [k for k in global_arrays if k not in g.shared and k not in g.per_class]
    if extra:
        raise FedTextSegError(f"global arrays hold key(s) in no shared/per-class group: {extra}")


def validate_update(global_arrays: Mapping[str, np.ndarray], update: SiteUpdate, groups: Any,
                    num_classes: int | None = None) -> list[str]:
    """Problems with one site's update (empty list: usable). Each message names the site and the key."""
    g = as_groups(groups, global_arrays)
    if num_classes is None:
        num_classes = infer_num_classes(global_arrays, g)
    site = f"site '{update.node}'"
    problems: list[str] = []
    for k in g.wire_keys:
        if k not in update.arrays:
            problems.append(f"{site}: missing array '{k}'")
    for k in update.arrays:
        if k in g.local:
            problems.append(f"{site}: sent local array '{k}', which must never leave the site")
        elif k in g.frozen_common:
            problems.append(f"{site}: sent frozen array '{k}' (frozen parts are not aggregated)")
        elif k not in g.shared and k not in g.per_class:
            problems.append(f"{site}: unexpected array '{k}' (in no shared/per-class group)")
    for k in g.wire_keys:
        if k not in update.arrays or k not in global_arrays:
            continue
        a, ref = np.asarray(update.arrays[k]), np.asarray(global_arrays[k])
        if a.shape != ref.shape:
            problems.append(f"{site}: array '{k}' has shape {a.shape}, expected {ref.shape}")
        if a.dtype != ref.dtype:
            problems.append(f"{site}: array '{k}' has dtype {a.dtype}, expected {ref.dtype}")
        if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            problems.append(f"{site}: array '{k}' contains {bad} NaN/Inf value(s)")
        elif a.dtype.kind not in "biufc":
            problems.append(f"{site}: array '{k}' has non-numeric dtype {a.dtype}")
    if num_classes is not None and update.annotated.shape[0] != num_classes:
        problems.append(f"{site}: annotated mask has {update.annotated.shape[0]} entries, "
                        f"expected {num_classes} (one per vocabulary class)")
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        problems.append(f"{site}: num_examples must be a non-negative integer, got {n!r}")
    return problems


def screen_updates(global_arrays: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate], groups: Any,
                   num_classes: int | None = None, *, expected_identity: Mapping[str, str] | None = None,
                   outlier_factor: float | None = None,
                   max_update_norm: float | None = None) -> tuple[list[SiteUpdate], dict[str, list[str]]]:
    """Split updates into usable ones and ``{node: problems}`` for the rejected (server records why).

    In order: malformed arrays (``validate_update``), a model identity other than ``expected_identity``
    (``identity_problems``), then among the well-formed ones the outliers (``screen_outliers``).
    """
    from fedtextseg.federation.identity import identity_problems

    good, rejected = [], {}
    for u in updates:
        p = validate_update(global_arrays, u, groups, num_classes)
        if not p and expected_identity:
            p = identity_problems(u, expected_identity)
        if p:
            rejected[u.node] = p
        else:
            good.append(u)
    good, outliers = screen_outliers(global_arrays, good, factor=outlier_factor, max_norm=max_update_norm)
    rejected.update(outliers)
    return good, rejected


def update_distance(global_arrays: Mapping[str, np.ndarray], update: SiteUpdate) -> float:
    """L2 distance (float64) between a site's arrays and the global ones, over every float array of the global."""
    total = 0.0
    for k, ref in global_arrays.items():
        ref = np.asarray(ref)
        if ref.dtype.kind in "fc" and k in update.arrays:
            diff = np.asarray(update.arrays[k], dtype=np.float64) - ref.astype(np.float64)
            total += float(np.vdot(diff, diff).real)
    return math.sqrt(total) if math.isfinite(total) else math.inf


def screen_outliers(global_arrays: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate], *,
                    factor: float | None = None,
                    max_norm: float | None = None) -> tuple[list[SiteUpdate], dict[str, list[str]]]:
    """Drop absurdly large updates (a diverged or hostile site): ``(kept, {node: [why]})``.

    ``max_norm``: an absolute limit on an update's distance to the global model. ``factor``: an update is an
    outlier when its distance exceeds ``factor`` times the median distance of the round's OTHER updates
    (leave-one-out, so with two sites the honest one is kept and the huge one dropped); not judged when that median
    is 0. A median tolerates outliers only while they are a minority: one of three sites, two of five.
    """
    if not updates or (not factor and max_norm is None):
        return list(updates), {}
    dist = [update_distance(global_arrays, u) for u in updates]
    kept, rejected = [], {}
    for i, u in enumerate(updates):
        d = dist[i]
        others = [x for j, x in enumerate(dist) if j != i]
        ref = float(np.median(others)) if others else 0.0
        if max_norm is not None and d > float(max_norm):
            rejected[u.node] = [f"site '{u.node}': update distance to the global model {d:.3g} exceeds "
                                f"federation.max_update_norm={float(max_norm):g} (diverged or hostile site)"]
        elif factor and ref > 0 and d > float(factor) * ref:
            rejected[u.node] = [f"site '{u.node}': update distance to the global model {d:.3g} is {d / ref:.3g}x "
                                f"the median of the other sites ({ref:.3g}), above federation.outlier_factor="
                                f"{float(factor):g} (diverged or hostile site)"]
        else:
            kept.append(u)
    return kept, rejected


def site_weight(weighting: str, num_examples: int, num_annotated: int) -> int:
    """One site's weight in the shared mean (in the clear here, and as the weight a site sends under SecAgg+)."""
    if weighting == "examples":
        return int(num_examples)
    if weighting == "equal":
        return 1
    if weighting == "classes":
        return int(num_examples) * int(num_annotated)
    raise FedTextSegError(f"unknown weighting '{weighting}'; choose one of {WEIGHTINGS}")


def _weights(updates: Sequence[SiteUpdate], weighting: str) -> np.ndarray:
    return np.array([float(site_weight(weighting, u.num_examples, int(u.annotated.sum()))) for u in updates])


def _reduce(stack: np.ndarray, w: np.ndarray, rule: str, beta: float) -> np.ndarray:
    """Combine ``stack`` [N, ...] (float64) over axis 0 by ``rule``; ``w`` are weights for the mean."""
    if rule == "mean":
        return np.tensordot(w / w.sum(), stack, axes=(0, 0))
    if rule == "median":
        return np.median(stack, axis=0)
    if rule == "trimmed_mean":
        n = stack.shape[0]
        cut = int(beta * n)
        if n - 2 * cut < 1:
            raise FedTextSegError(f"trimmed_mean(beta={beta}) trims all {n} update(s)")
        return np.sort(stack, axis=0)[cut:n - cut].mean(axis=0)
    raise FedTextSegError(f"unknown aggregation rule '{rule}'; choose one of {RULES}")


def _cast_like(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    if ref.dtype.kind in "biu":
        x = np.rint(x)
    return np.array(x, dtype=ref.dtype, order="C")


def class_coverage(updates: Sequence[SiteUpdate], num_classes: int, weighting: str = "examples") -> np.ndarray:
    """Bool [C]: the classes whose per-class rows ``aggregate`` updates this round (some annotating site with
    positive weight). Rows outside it keep the global value; pass it to a server optimiser's ``step``."""
    cov = np.zeros(num_classes, dtype=bool)
    for u, w in zip(updates, _weights(updates, weighting)):
        if w > 0:
            cov |= u.annotated[:num_classes]
    return cov


def aggregate(global_arrays: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate], groups: Any,
              rule: str = "mean", weighting: str = "examples", beta: float = 0.1,
              robust_per_class: bool = False) -> dict[str, np.ndarray]:
    """Aggregate site updates into new global arrays (shared + per-class keys, in the global's order).

    ``rule`` applies to the shared group ("mean" uses ``weighting``; "median" and "trimmed_mean(beta)" are
    unweighted, coordinate-wise). Per-class rows always use the weighted mean over annotating sites, unless
    ``robust_per_class`` applies ``rule`` to them too. Raises ``FedTextSegError`` listing every problem if any
    update is invalid; use ``screen_updates`` first to drop bad sites instead.
    """
    if rule not in RULES:
        raise FedTextSegError(f"unknown aggregation rule '{rule}'; choose one of {RULES}")
    if rule == "trimmed_mean" and not 0.0 <= beta < 0.5:
        raise FedTextSegError(f"trimmed_mean needs 0 <= beta < 0.5, got {beta}")
    if not updates:
        raise FedTextSegError("no site updates to aggregate")
    g = as_groups(groups, global_arrays)
    _check_global(global_arrays, g)
    num_classes = infer_num_classes(global_arrays, g)
    problems = [p for u in updates for p in validate_update(global_arrays, u, g, num_classes)]
    if problems:
        raise FedTextSegError("invalid site update(s):\n  " + "\n  ".join(problems))
    nodes = [u.node for u in updates]
    if len(set(nodes)) != len(nodes):
        raise FedTextSegError(f"several updates from the same site: {nodes}")
    w = _weights(updates, weighting)
    if rule == "mean" and g.shared and w.sum() <= 0:
        raise FedTextSegError("all sites report 0 examples: nothing to weight the shared mean by")

    out: dict[str, np.ndarray] = {}
    for k, ref in global_arrays.items():
        ref = np.asarray(ref)
        stack = np.stack([np.asarray(u.arrays[k], dtype=np.float64) for u in updates])
        if k in g.shared:
            out[k] = _cast_like(_reduce(stack, w, rule, beta), ref)
            continue
        axis = g.per_class[k]
        new = ref.astype(np.float64, copy=True)
        for c in range(ref.shape[axis]):
            sel = np.array([bool(u.annotated[c]) for u in updates]) & (w > 0)
            if not sel.any():
                continue  # nobody (with weight) annotates class c: keep the global row
            rows = np.take(stack[sel], c, axis=axis + 1)
            idx = (slice(None),) * axis + (c,)
            new[idx] = _reduce(rows, w[sel], rule if robust_per_class else "mean", beta)
        out[k] = _cast_like(new, ref)
    return out
