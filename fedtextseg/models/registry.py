"""A timm-style registry of named model configurations: ``create_model(name, **overrides)``.

Each architecture module registers one builder function per named configuration (``cdpdnet_tiny``, ``tgcnet_...``)
together with that configuration as plain data, so a run can record exactly what it built::

    @register_model(config={"widths": (8, 16, 32), ...})
    def cdpdnet_tiny(**kwargs):
        return _create_cdpdnet("cdpdnet_tiny", **kwargs)

    list_models("cdpdnet*")                     # -> ["cdpdnet_paper", "cdpdnet_small", "cdpdnet_tiny"]
    model_config("cdpdnet_tiny")                # -> a deep copy of the registered config dict
    create_model("cdpdnet_tiny", text_dim=64, dino={"weights": "hub"}, class_embeddings=..., ...)

Unknown names raise :class:`~fedtextseg.errors.ConfigError` listing the closest registered names.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
from typing import Any, Callable, Mapping

from fedtextseg.errors import ConfigError

__all__ = [
    "register_model", "list_models", "is_model", "model_config", "create_model", "merge_config", "config_from_dict",
]

_BUILDERS: dict[str, Callable[..., Any]] = {}
_CONFIGS: dict[str, dict] = {}


def register_model(fn: Callable | None = None, *, name: str | None = None, config: Mapping | None = None):
    """Register ``fn(**kwargs) -> nn.Module`` under ``name`` (default: the function's name).

    Usable bare (``@register_model``) or with arguments (``@register_model(config={...})``). ``config`` is the named
    configuration as data; :func:`model_config` returns a copy of it. Registering a name twice is an error.
    """

    def decorate(builder: Callable) -> Callable:
        key = name or builder.__name__
        if key in _BUILDERS and _BUILDERS[key] is not builder:
            raise ConfigError(f"model name {key!r} is registered twice; pick another name")
        _BUILDERS[key] = builder
        _CONFIGS[key] = copy.deepcopy(dict(config)) if config is not None else {}
        return builder

    return decorate(fn) if fn is not None else decorate


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _BUILDERS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _BUILDERS


def _lookup(name: str) -> str:
    if name in _BUILDERS:
        return name
    close = difflib.get_close_matches(str(name), list(_BUILDERS), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    known = ", ".join(list_models()) or "(none registered)"
    raise ConfigError(f"unknown model {name!r}{hint} Registered models: {known}")


def model_config(name: str) -> dict:
    """A deep copy of the configuration registered for ``name``."""
    return copy.deepcopy(_CONFIGS[_lookup(name)])


def create_model(name: str, **kwargs: Any):
    """Build the registered model ``name``; keyword arguments override its configuration or are passed through."""
    return _BUILDERS[_lookup(name)](**kwargs)


def merge_config(base: Mapping, overrides: Mapping, *, where: str = "config") -> dict:
    """``base`` updated with ``overrides``; nested mappings merge key by key, other values replace.

    Keys of ``overrides`` that ``base`` lacks raise :class:`ConfigError` naming the valid keys.
    """
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if key not in out:
            close = difflib.get_close_matches(key, list(out), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{where}: unknown option {key!r}{hint} Valid options: {', '.join(sorted(out))}")
        if isinstance(out[key], Mapping) and isinstance(value, Mapping):
            out[key] = merge_config(out[key], value, where=f"{where}.{key}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_from_dict(cls, data: Mapping | None, *, where: str = "config"):
    """Build the dataclass ``cls`` from a mapping; unknown keys raise :class:`ConfigError` naming the valid ones."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of options, got {type(data).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in valid]
    if unknown:
        hints = [f"{k!r} (did you mean {difflib.get_close_matches(k, valid, n=1, cutoff=0.5)[0]!r}?)"
                 if difflib.get_close_matches(k, valid, n=1, cutoff=0.5) else repr(k) for k in unknown]
        raise ConfigError(f"{where}: unknown option(s) {', '.join(hints)}; valid options: {', '.join(valid)}")
    return cls(**data)
