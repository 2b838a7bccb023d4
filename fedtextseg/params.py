"""Parameter groups: the contract between a model and the federation (what crosses the wire, and how).

A model implements ``param_groups() -> ParamGroups`` naming every parameter and persistent buffer of its
``state_dict`` exactly once:

- ``shared``: aggregated every round (FedAvg, FedProx, FedAdam, ...);
- ``per_class``: tensors with a class axis (name -> axis): row ``c`` is aggregated only over sites labelling class c;
- ``frozen_common``: pretrained frozen weights and the text bank: sent once, identified by :func:`frozen_hash`;
- ``local``: personalisation that never leaves the site.

Everything here is model-agnostic (CDPDNet and TGC-Net alike) and accepts models wrapped by Opacus
(``GradSampleModule``) or ``torch.compile``.
"""

from __future__ import annotations

import difflib
import hashlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from fedtextseg.errors import FedTextSegError

__all__ = [
    "GROUP_NAMES",
    "ParamGroups",
    "unwrap",
    "build_param_groups",
    "norm_parameter_names",
    "split_state_dict",
    "merge_into",
    "check_groups",
    "count_params",
    "frozen_hash",
]

GROUP_NAMES = ("shared", "per_class", "frozen_common", "local")


@dataclass
class ParamGroups:
    """Names of state-dict entries per group; ``per_class`` maps a name to its class axis."""

    shared: list[str] = field(default_factory=list)
    per_class: dict[str, int] = field(default_factory=dict)
    frozen_common: list[str] = field(default_factory=list)
    local: list[str] = field(default_factory=list)

    def names(self, group: str) -> list[str]:
        if group not in GROUP_NAMES:
            raise FedTextSegError(f"unknown parameter group {group!r}; groups are {', '.join(GROUP_NAMES)}")
        return list(getattr(self, group))

    def group_of(self, name: str) -> str:
        for g in GROUP_NAMES:
            if name in getattr(self, g):
                return g
        raise FedTextSegError(f"{name!r} is in no parameter group")

    def to_dict(self) -> dict:
        return asdict(self)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside an Opacus ``GradSampleModule`` / ``torch.compile`` wrapper (or the model itself)."""
    while True:
        inner = next((m for m in (getattr(model, "_module", None), getattr(model, "_orig_mod", None))
                      if isinstance(m, nn.Module)), None)
        if inner is None:
            return model
        model = inner


def build_param_groups(model: nn.Module, *, frozen_common: Callable[[str], bool], per_class: Mapping[str, int],
                       shared: Callable[[str], bool], local: Callable[[str], bool] = lambda name: False) -> ParamGroups:
    """Classify every state-dict entry: frozen_common, else per_class (by exact name), else local, else shared.

    An entry none of them claims is an error naming it: a module added to a model without saying how the
    federation treats it is never sent (or kept) by default."""
    groups = ParamGroups()
    unclaimed = []
    for name in unwrap(model).state_dict().keys():
        if frozen_common(name):
            groups.frozen_common.append(name)
        elif name in per_class:
            groups.per_class[name] = int(per_class[name])
        elif local(name):
            groups.local.append(name)
        elif shared(name):
            groups.shared.append(name)
        else:
            unclaimed.append(name)
    if unclaimed:
        more = f" (+{len(unclaimed) - 8} more)" if len(unclaimed) > 8 else ""
        raise FedTextSegError(f"{type(unwrap(model)).__name__}.param_groups(): {', '.join(unclaimed[:8])}{more} "
                              "match(es) no parameter group; say whether each is shared, per_class, frozen_common or "
                              "local")
    return groups


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_parameter_names(model: nn.Module, *, exclude_prefixes: Iterable[str] = ()) -> set[str]:
    """Names of the affine parameters of normalisation layers (for a ``local`` personalisation group)."""
    excluded = tuple(exclude_prefixes)
    return {f"{mod_name}.{p_name}" if mod_name else p_name
            for mod_name, mod in unwrap(model).named_modules() if isinstance(mod, _NORMS)
            and not (mod_name + ".").startswith(excluded) for p_name, _ in mod.named_parameters(recurse=False)}


def _groups(model: nn.Module, groups: ParamGroups | None) -> ParamGroups:
    if groups is not None:
        return groups
    inner = unwrap(model)
    if not hasattr(inner, "param_groups"):
        raise FedTextSegError(f"{type(inner).__name__} does not declare parameter groups (no param_groups() method)")
    return inner.param_groups()


def split_state_dict(model: nn.Module, groups: ParamGroups | None = None) -> dict[str, "OrderedDict[str, Tensor]"]:
    """``{group: OrderedDict(name -> detached tensor)}`` for the four groups."""
    groups = _groups(model, groups)
    state = unwrap(model).state_dict()
    return {g: OrderedDict((n, state[n].detach()) for n in groups.names(g)) for g in GROUP_NAMES}


def merge_into(model: nn.Module, partial_state: Mapping[str, Tensor]) -> list[str]:
    """Load a subset of state-dict entries into ``model`` (in place); returns the names loaded.

    Unknown names and shape mismatches raise :class:`FedTextSegError` naming every offending key; nothing is loaded
    then.
    """
    inner = unwrap(model)
    current = inner.state_dict()
    problems = []
    for name, value in partial_state.items():
        if name not in current:
            close = difflib.get_close_matches(name, list(current), n=1, cutoff=0.6)
            problems.append(f"unknown key {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif tuple(torch.as_tensor(value).shape) != tuple(current[name].shape):
            problems.append(f"{name!r} has shape {tuple(torch.as_tensor(value).shape)}, the model expects "
                            f"{tuple(current[name].shape)}")
    if problems:
        raise FedTextSegError(f"cannot load state into {type(inner).__name__}: " + "; ".join(problems))
    inner.load_state_dict({n: torch.as_tensor(v) for n, v in partial_state.items()}, strict=False)
    return list(partial_state)


def check_groups(model: nn.Module, groups: ParamGroups | None = None) -> ParamGroups:
    """Check that the groups partition the state dict and make sense; returns them, raises listing every problem.

    Every parameter and persistent buffer is in exactly one group; per-class axes have length ``model.num_classes``;
    frozen_common parameters do not require gradients and every gradient-requiring parameter is in a trainable group.
    """
    inner = unwrap(model)
    groups = _groups(model, groups)
    state = inner.state_dict(keep_vars=True)
    problems = []
    seen: dict[str, str] = {}
    for g in GROUP_NAMES:
        for name in groups.names(g):
            if name in seen:
                problems.append(f"{name!r} is in both {seen[name]} and {g}")
            seen[name] = g
            if name not in state:
                problems.append(f"{name!r} (group {g}) is not in the model's state dict")
    missing = [n for n in state if n not in seen]
    if missing:
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        problems.append(f"in no group: {', '.join(missing[:8])}{more}")
    num_classes = getattr(inner, "num_classes", None)
    for name, axis in groups.per_class.items():
        if name in state:
            shape = tuple(state[name].shape)
            if not -len(shape) <= axis < len(shape):
                problems.append(f"per-class {name!r}: axis {axis} out of range for shape {shape}")
            elif num_classes is not None and shape[axis] != num_classes:
                problems.append(f"per-class {name!r}: axis {axis} has length {shape[axis]}, model has {num_classes} "
                                "classes")
    for name, t in state.items():
        requires = isinstance(t, nn.Parameter) and t.requires_grad
        if seen.get(name) == "frozen_common" and requires:
            problems.append(f"{name!r} is frozen_common but requires gradients")
    if problems:
        raise FedTextSegError(f"parameter groups of {type(inner).__name__} are inconsistent: " + "; ".join(problems))
    return groups


def count_params(model: nn.Module, groups: ParamGroups | None = None) -> dict[str, int]:
    """Parameter element counts: ``total``, ``trainable``, ``frozen``, one per group (parameters only), and
    ``buffers`` (persistent buffer elements, e.g. the text bank)."""
    inner = unwrap(model)
    groups = _groups(model, groups)
    params = dict(inner.named_parameters())
    counts = {"total": sum(p.numel() for p in params.values()),
              "trainable": sum(p.numel() for p in params.values() if p.requires_grad)}
    counts["frozen"] = counts["total"] - counts["trainable"]
    for g in GROUP_NAMES:
        counts[g] = sum(params[n].numel() for n in groups.names(g) if n in params)
    counts["buffers"] = sum(t.numel() for n, t in inner.state_dict().items() if n not in params)
    return counts


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach()
    if t.device.type == "meta":
        raise FedTextSegError("cannot hash tensors on the meta device; materialise the model first")
    return t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def frozen_hash(state: Mapping[str, Tensor] | nn.Module) -> str:
    """sha256 (hex) over names, dtypes, shapes and bytes of the frozen_common tensors.

    ``state``: a model (its frozen_common group is hashed) or a mapping such as
    ``split_state_dict(model)["frozen_common"]``. Independent of device and dict order.
    """
    if isinstance(state, nn.Module):
        state = split_state_dict(state)["frozen_common"]
    h = hashlib.sha256()
    for name in sorted(state):
        t = torch.as_tensor(state[name])
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()
