"""Group-wise, class-aware aggregation through a secure *sum*: the linear encoding that lets Flower's SecAgg+ carry
fedtextseg's updates (the coordinator's ``finish_secure_round`` decodes it: one round protocol for every transport).

SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``) reveals to the server only ``sum_i w_i x_i / sum_i w_i`` for
one scalar weight ``w_i`` per site (its ``num_examples``) and one vector ``x_i`` per site. fedtextseg's FedAvg is
linear, so it fits once each site encodes its update as ::

    x_i = [ delta_i(shared) ..., a_i[c] * delta_i(per-class row c) ..., a_i (float mask over the C classes) ]

with ``delta_i = local_i - global`` (small values quantize well) and ``a_i`` the classes site i annotates. The mean
gives the shared update directly and, per class c, ``sum w a_c delta_c / sum w`` and ``sum w a_c / sum w``: their
ratio is exactly the class-aware row of :func:`fedtextseg.federation.aggregation.aggregate` (rows of classes no
contributing site annotates keep the global value). ``weighting=equal`` sends ``w_i = 1``; a declining site
(privacy budget spent) sends ``w_i = 0`` and a zero vector, so it still completes the protocol.

What cannot be done on a secure sum (checked before the run starts): robust rules (median, trimmed mean) and any
screening of an individual update (shape/NaN checks, per-site rejection): a site checks its own update instead
(:func:`encode_update` refuses non-finite values).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from fedtextseg.errors import ConfigError, FedTextSegError
from fedtextseg.federation.aggregation import WEIGHTINGS, site_weight

__all__ = ["encode_update", "decode_mean", "check_secure_config", "secure_weight"]


def _wire(groups) -> tuple[list[str], dict[str, int]]:
    per_class = dict(getattr(groups, "per_class", {}) or {})
    return list(getattr(groups, "shared", [])) + list(per_class), per_class


def check_secure_config(cfg) -> None:
    """Raise ConfigError when the run's aggregation cannot be computed from a secure sum."""
    robust = cfg.federation.robust
    if robust:
        raise ConfigError(f"privacy.secure_aggregation=secaggplus gives the server only the sum of the updates; the "
                          f"robust rule federation.robust={robust} needs the individual updates. Use robust=null")
    if cfg.federation.weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown federation.weighting {cfg.federation.weighting!r}")


def secure_weight(weighting: str, num_examples: int, declined: bool, num_annotated: int = 1) -> int:
    """The SecAgg+ weight a site sends: ``aggregation.site_weight``, as the clear mean weights it; 0 when it
    declines."""
    if declined or num_examples <= 0:
        return 0
    return site_weight(weighting, num_examples, num_annotated)


def encode_update(global_arrays: Mapping[str, np.ndarray], local_arrays: Mapping[str, np.ndarray],
                  annotated: Sequence[bool], groups, *, clip: float | None = None) -> list[np.ndarray]:
    """A site's update as the vector list SecAgg+ sums (order: shared, per-class, then the class mask)."""
    names, per_class = _wire(groups)
    mask = np.asarray(annotated, dtype=bool).reshape(-1)
    out = []
    for k in names:
        d = np.asarray(local_arrays[k], dtype=np.float64) - np.asarray(global_arrays[k], dtype=np.float64)
        if not np.all(np.isfinite(d)):
            raise FedTextSegError(f"update of '{k}' has NaN/Inf values: not sent (a secure sum cannot screen it)")
        if k in per_class:
            axis = per_class[k] % d.ndim
            shape = [1] * d.ndim
            shape[axis] = -1
            d = d * mask[: d.shape[axis]].reshape(shape)
        if clip is not None:
            d = np.clip(d, -clip, clip)
        out.append(d.astype(np.float32))
    out.append(mask.astype(np.float32))
    return out


def decode_mean(global_arrays: Mapping[str, np.ndarray], mean: Sequence[np.ndarray], groups,
                eps: float = 1e-6) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """New global arrays (before the server optimiser) and the class coverage from the weighted mean vector."""
    names, per_class = _wire(groups)
    if len(mean) != len(names) + 1:
        raise FedTextSegError(f"secure aggregate has {len(mean)} arrays, expected {len(names) + 1}")
    coverage = np.asarray(mean[-1], dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for k, m in zip(names, mean):
        ref = np.asarray(global_arrays[k])
        m = np.asarray(m, dtype=np.float64).reshape(ref.shape)
        if k in per_class:
            axis = per_class[k] % ref.ndim
            shape = [1] * ref.ndim
            shape[axis] = -1
            cov = coverage[: ref.shape[axis]].reshape(shape)
            m = np.where(cov > eps, m / np.maximum(cov, eps), 0.0)
        out[k] = (ref.astype(np.float64) + m).astype(ref.dtype)
    return out, coverage > eps
