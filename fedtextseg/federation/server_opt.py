"""Server-side optimisers on the aggregated pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization").

Each round the server holds the global arrays ``x`` and the aggregate of the sites' arrays (``aggregate``); the
pseudo-gradient is ``delta = aggregate - x`` and an optimiser turns it into the next global arrays:

- ``fedavg``:     x + delta (= the aggregate; server lr 1). FedProx is FedAvg on the server: its proximal term
                  ``mu/2 ||w - x||^2`` is added to the local loss by the engine on the client side.
- ``fedavgm``:    b = momentum * b + delta; x + lr * b (Hsu et al. 2019; the same as Flower's FedAvgM, whose
                  pseudo-gradient has the opposite sign).
- ``fedadagrad``: m = b1 m + (1-b1) delta; v = v + delta^2;                                x + eta m / (sqrt(v)+tau)
- ``fedadam``:    m as above;             v = b2 v + (1-b2) delta^2;                       x + eta m / (sqrt(v)+tau)
- ``fedyogi``:    m as above;             v = v - (1-b2) delta^2 sign(v - delta^2);        x + eta m / (sqrt(v)+tau)

As in the paper (Algorithm 2) ``v`` starts at ``tau**2`` and there is no bias correction unless
``bias_correction=True`` (Adam only; Flower's FedAdam uses it).

Per-class rows that no site annotated this round (``coverage[c]`` false) have delta 0. Letting the moments run
over them would still move them (decaying momentum) and shrink their ``v``. Instead such rows are frozen for the
round: parameter AND optimiser state (m, v, step count) stay exactly as they were, like a sparse/lazy optimiser.
Each class therefore has its own step count (used by bias correction). Integer arrays are not optimised: they take
the aggregate as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedtextseg.errors import FedTextSegError
from fedtextseg.federation.aggregation import as_groups

OPTIMIZERS = ("fedavg", "fedprox", "fedavgm", "fedadagrad", "fedadam", "fedyogi")

_DEFAULTS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedavgm": {"lr": 1.0, "momentum": 0.9},
    "fedadagrad": {"eta": 1e-2, "beta1": 0.0, "tau": 1e-3},
    "fedadam": {"eta": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3, "bias_correction": False},
    "fedyogi": {"eta": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
}


class ServerOptimizer:
    """A server optimiser with saveable state. Make one with ``make_server_optimizer(name, **hparams)``."""

    def __init__(self, name: str, **hparams: Any):
        name = name.lower()
        if name == "fedprox":  # server side of FedProx is plain FedAvg
            name = "fedavg"
        if name not in _DEFAULTS:
            raise FedTextSegError(f"unknown server optimiser '{name}'; choose one of {OPTIMIZERS}")
        unknown = set(hparams) - set(_DEFAULTS[name])
        if unknown:
            raise FedTextSegError(f"server optimiser '{name}' has no option(s) {sorted(unknown)}; "
                                  f"it takes {sorted(_DEFAULTS[name])}")
        self.name = name
        self.hparams = {**_DEFAULTS[name], **hparams}
        for key in ("beta1", "beta2", "momentum"):
            if key in self.hparams and not 0.0 <= float(self.hparams[key]) < 1.0:
                raise FedTextSegError(f"{name}: {key} must be in [0, 1), got {self.hparams[key]}")
        if float(self.hparams.get("tau", 1.0)) <= 0:
            raise FedTextSegError(f"{name}: tau must be > 0, got {self.hparams['tau']}")
        self.round = 0
        self.class_rounds: np.ndarray | None = None
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically (arrays are copies)."""
        return {"name": self.name, "hparams": dict(self.hparams), "round": self.round,
                "class_rounds": None if self.class_rounds is None else self.class_rounds.copy(),
                "m": {k: v.copy() for k, v in self.m.items()}, "v": {k: v.copy() for k, v in self.v.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict``; the optimiser name must match."""
        if state.get("name") != self.name:
            raise FedTextSegError(f"server optimiser state is for '{state.get('name')}', not '{self.name}'")
        self.hparams = {**_DEFAULTS[self.name], **dict(state.get("hparams", {}))}
        self.round = int(state.get("round", 0))
        cr = state.get("class_rounds")
        self.class_rounds = None if cr is None else np.asarray(cr, dtype=np.int64).copy()
        self.m = {k: np.array(v) for k, v in dict(state.get("m", {})).items()}
        self.v = {k: np.array(v) for k, v in dict(state.get("v", {})).items()}

    # ---------------------------------------------------------------- step
    def step(self, global_arrays: Mapping[str, np.ndarray], aggregated: Mapping[str, np.ndarray],
             groups: Any = None, coverage: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Next global arrays from the current ones and this round's aggregate.

        ``groups`` tells which keys are per-class (and their class axis); without it every key is treated as
        shared. ``coverage`` (bool [C], see ``aggregation.class_coverage``) is required when there are per-class
        keys (except for ``fedavg``, which has no state): rows outside it are left untouched, state included.
        """
        saved = (self.round, self.class_rounds, dict(self.m), dict(self.v))
        try:
            return self._step(global_arrays, aggregated, groups, coverage)
        except Exception:  # a failed step leaves the optimiser as it was
            self.round, self.class_rounds, self.m, self.v = saved
            raise

    def _step(self, global_arrays: Mapping[str, np.ndarray], aggregated: Mapping[str, np.ndarray],
              groups: Any, coverage: np.ndarray | None) -> dict[str, np.ndarray]:
        g = as_groups(groups or {"shared": list(global_arrays)}, global_arrays)
        if set(aggregated) != set(global_arrays):
            raise FedTextSegError(f"aggregate keys differ from global keys: "
                                  f"{sorted(set(aggregated) ^ set(global_arrays))}")
        per_class = {k: ax for k, ax in g.per_class.items() if k in global_arrays}
        cov = None
        if per_class:
            if coverage is None and self.name == "fedavg":
                coverage = np.ones(_num_classes(global_arrays, per_class), dtype=bool)
            if coverage is None:
                raise FedTextSegError("server optimiser step needs `coverage` (classes annotated this round) "
                                      "when there are per-class parameters")
            cov = np.asarray(coverage, dtype=bool).reshape(-1)
            if self.class_rounds is None:
                self.class_rounds = np.zeros(cov.shape[0], dtype=np.int64)
            if self.class_rounds.shape != cov.shape:
                raise FedTextSegError(f"coverage has {cov.shape[0]} classes, optimiser state has "
                                      f"{self.class_rounds.shape[0]}")
            self.class_rounds = self.class_rounds + cov
        self.round += 1
        out: dict[str, np.ndarray] = {}
        for k, x in global_arrays.items():
            x = np.asarray(x)
            agg = np.asarray(aggregated[k])
            if agg.shape != x.shape:
                raise FedTextSegError(f"aggregate '{k}' has shape {agg.shape}, global has {x.shape}")
            if x.dtype.kind not in "fc" or self.name == "fedavg":
                out[k] = np.array(agg, dtype=x.dtype)
                continue
            mask = None
            t: np.ndarray | float = float(self.round)
            if k in per_class:
                shape = [1] * x.ndim
                shape[per_class[k]] = x.shape[per_class[k]]
                if x.shape[per_class[k]] != cov.shape[0]:
                    raise FedTextSegError(f"'{k}' has {x.shape[per_class[k]]} classes, coverage {cov.shape[0]}")
                mask = cov.reshape(shape)
                t = np.maximum(self.class_rounds, 1).astype(np.float64).reshape(shape)
            out[k] = self._update(k, x, agg, mask, t)
        return out

    def _update(self, k: str, x: np.ndarray, agg: np.ndarray, mask: np.ndarray | None,
                t: np.ndarray | float) -> np.ndarray:
        h = self.hparams
        sdtype = np.result_type(x.dtype, np.float32)
        xs = x.astype(sdtype)
        delta = agg.astype(sdtype) - xs
        keep = (lambda new, old: new) if mask is None else (lambda new, old: np.where(mask, new, old))
        if self.name == "fedavgm":
            b_old = self.m.get(k, np.zeros_like(xs))
            b = keep(h["momentum"] * b_old + delta, b_old)
            self.m[k] = b.astype(sdtype)
            new = xs + h["lr"] * b
        else:
            b1, tau = h["beta1"], h["tau"]
            m_old = self.m.get(k, np.zeros_like(xs))
            v_old = self.v.get(k, np.full_like(xs, tau ** 2))
            m = b1 * m_old + (1 - b1) * delta
            d2 = delta * delta
            if self.name == "fedadagrad":
                v = v_old + d2
            elif self.name == "fedadam":
                v = h["beta2"] * v_old + (1 - h["beta2"]) * d2
            else:  # fedyogi
                v = v_old - (1 - h["beta2"]) * d2 * np.sign(v_old - d2)
            m, v = keep(m, m_old).astype(sdtype), keep(v, v_old).astype(sdtype)
            self.m[k], self.v[k] = m, v
            eta = h["eta"]
            if self.name == "fedadam" and h["bias_correction"]:
                eta = eta * np.sqrt(1 - h["beta2"] ** t) / (1 - b1 ** t)
            new = xs + eta * m / (np.sqrt(v) + tau)
        return keep(new, xs).astype(x.dtype)


def _num_classes(arrays: Mapping[str, np.ndarray], per_class: Mapping[str, int]) -> int:
    """Number of classes along the class axis of the per-class arrays."""
    k, ax = next(iter(per_class.items()))
    return int(np.shape(arrays[k])[ax])


def make_server_optimizer(name: str = "fedavg", **hparams: Any) -> ServerOptimizer:
    """Build a server optimiser by name (``fedavg``, ``fedprox`` (= fedavg), ``fedavgm``, ``fedadagrad``,
    ``fedadam``, ``fedyogi``) with its hyper-parameters (see the module docstring for names and defaults)."""
    return ServerOptimizer(name, **hparams)
