"""A timm-style registry of named model configurations: ``create_model(name, **overrides)``.

The named architectures are data: ``configs/model/<name>.yaml`` (the Hydra ``model`` option of the same name)
spells out every field of its family's config under ``architecture:`` and names the family (``family: cdpdnet``).
Each architecture module registers its family once, in Python: the builder and the config dataclass that
validates and normalises a file's ``architecture`` (open_clip keeps its model configs as data files the same way)::

    @register_family("cdpdnet", config_class=CDPDNetConfig)
    def _create_cdpdnet(name, config, **kwargs): ...

    list_models("cdpdnet*")                     # -> ["cdpdnet_paper", "cdpdnet_small", "cdpdnet_tiny"]
    model_config("cdpdnet_tiny")                # -> the file's architecture, normalised by CDPDNetConfig
    create_model("cdpdnet_tiny", text_dim=64, dino={"weights": "hub"}, class_embeddings=..., ...)

A new size is a new file (in the project's ``configs/model/`` or the folder ``FEDTEXTSEG_CONFIGS`` names), no code.
The files are read on first use and again when one changes. Unknown names raise
:class:`~fedtextseg.errors.ConfigError` listing the closest registered names; a malformed file names itself.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from fedtextseg.errors import ConfigError

__all__ = [
    "register_family", "list_models", "is_model", "model_config", "model_family", "architecture_changes",
    "check_architecture", "create_model", "merge_config", "config_from_dict",
]


@dataclass(frozen=True)
class _Family:
    build: Callable[..., Any]  # build(name, config: dict, **kwargs) -> nn.Module
    config_class: type  # a dataclass: validates a file's architecture; asdict() of it is the normalised config


@dataclass(frozen=True)
class _Named:
    family: str
    config: dict
    path: Path


_FAMILIES: dict[str, _Family] = {}
_CACHE: dict[str, tuple[tuple, dict[str, _Named]]] = {}  # configs/model folder -> (its files, named configs)


def register_family(family: str, *, config_class: type):
    """Register ``build(name, config, **kwargs) -> nn.Module`` for the architecture files naming ``family``."""

    def decorate(build: Callable) -> Callable:
        if family in _FAMILIES and _FAMILIES[family].build is not build:
            raise ConfigError(f"model family {family!r} is registered twice; pick another name")
        _FAMILIES[family] = _Family(build, config_class)
        return build

    return decorate


def _normalise(family: _Family, architecture: Any, where: str) -> dict:
    """The architecture through its family's dataclass: every field present, types normalised (tuples)."""
    if not isinstance(architecture, Mapping):
        raise ConfigError(f"{where}: 'architecture' must be a mapping of {family.config_class.__name__} fields")
    fields = [f.name for f in dataclasses.fields(family.config_class)]
    missing = [f for f in fields if f not in architecture]
    if missing:  # the file is the whole architecture: no size hides in the dataclass defaults
        raise ConfigError(f"{where}: 'architecture' lacks {', '.join(missing)} (spell out every field of "
                          f"{family.config_class.__name__})")
    try:
        config = config_from_dict(family.config_class, dict(architecture), where=where)
        check = getattr(config, "check", None)
        if callable(check):
            check()
    except ConfigError as exc:
        raise ConfigError(str(exc) if where in str(exc) else f"{where}: {exc}") from None
    return dataclasses.asdict(config)


def _read(path: Path) -> _Named | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read it as YAML ({exc})") from None
    if not isinstance(data, Mapping) or "architecture" not in data:
        return None  # a Hydra model option that selects a named architecture (e.g. cdpdnet_tiny_nodino)
    if data.get("name") != path.stem:
        raise ConfigError(f"{path}: an architecture file's 'name' must be its file name {path.stem!r}, "
                          f"got {data.get('name')!r}")
    family = data.get("family")
    if family not in _FAMILIES:
        raise ConfigError(f"{path}: unknown model family {family!r}; registered families: "
                          f"{', '.join(sorted(_FAMILIES)) or '(none)'}")
    return _Named(family, _normalise(_FAMILIES[family], data["architecture"], str(path)), path)


def _named() -> dict[str, _Named]:
    """Every architecture file of the configs folder, read again when a file changes."""
    from fedtextseg.config import configs_dir

    folder = configs_dir() / "model"
    files = sorted(folder.glob("*.yaml"))
    stamps = tuple((p.name, p.read_bytes()) for p in files)  # a few kB: compared whole, parsed when changed
    cached = _CACHE.get(str(folder))
    if cached is None or cached[0] != stamps:
        named = {p.stem: n for p in files if (n := _read(p)) is not None}
        _CACHE[str(folder)] = cached = (stamps, named)
    return cached[1]


def list_models(pattern: str = "*") -> list[str]:
    """Named architectures matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _named() if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _named()


def _lookup(name: str) -> _Named:
    named = _named()
    if name in named:
        return named[name]
    close = difflib.get_close_matches(str(name), list(named), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    known = ", ".join(sorted(named)) or "(none)"
    raise ConfigError(f"unknown model {name!r}{hint} Named architectures (configs/model/*.yaml): {known}")


def model_config(name: str) -> dict:
    """A deep copy of the architecture ``configs/model/<name>.yaml`` declares, normalised by its family."""
    return copy.deepcopy(_lookup(name).config)


def model_family(name: str) -> str:
    """The family (``cdpdnet``, ``tgcnet``) that builds the named architecture."""
    return _lookup(name).family


def architecture_changes(name: str, architecture: Mapping, *, where: str) -> dict:
    """The fields of ``architecture`` (a full one, e.g. recorded in a run's config) that differ from what
    ``configs/model/<name>.yaml`` declares now, normalised by the family."""
    named = _lookup(name)
    given = _normalise(_FAMILIES[named.family], architecture, where)
    return {k: v for k, v in given.items() if v != named.config[k]}


def check_architecture(name: str, family: str | None, architecture: Mapping | None) -> None:
    """Refuse a composed ``model.architecture`` (or ``model.family``) that is not the one
    ``configs/model/<name>.yaml`` declares: the named architecture is read from its file, and changed through
    ``model.kwargs``. ``None`` (a config that does not carry it) passes."""
    named = _lookup(name)
    if family is not None and family != named.family:
        raise ConfigError(f"model.family={family!r}, but {named.path} builds {name!r} with family {named.family!r}")
    if architecture is None:
        return
    changed = sorted(architecture_changes(name, architecture, where=f"model.architecture of {name!r}"))
    if changed:
        raise ConfigError(f"model.architecture.{changed[0]} differs from {named.path} (changed: {', '.join(changed)}): "
                          f"the named architecture is not edited in place (set model.kwargs.{changed[0]}=... or add "
                          "an architecture file)")


def create_model(name: str, **kwargs: Any):
    """Build the named architecture; keyword arguments override its configuration or are passed through."""
    named = _lookup(name)
    return _FAMILIES[named.family].build(name, copy.deepcopy(named.config), **kwargs)


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
