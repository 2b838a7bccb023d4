"""The one config source: Hydra composes ``configs/`` over the schema of :mod:`fedtextseg.config_schema` into a
resolved config; runs record it beside their results.

``compose_config("demo", ["federation.rounds=2"])`` is what the CLI, the Flower apps and the study runner call.
The configs folder is found in this order: the ``FEDTEXTSEG_CONFIGS`` environment variable, ``configs/`` in the
current directory (a Flower app bundle runs from its own root), ``configs/`` beside the installed package (the
source checkout).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Iterable

import yaml
from omegaconf import DictConfig, OmegaConf

from fedtextseg.errors import ConfigError

__all__ = ["configs_dir", "compose_config", "split_overrides", "list_experiments", "save_resolved", "to_container"]


def configs_dir() -> Path:
    candidates = []
    if os.environ.get("FEDTEXTSEG_CONFIGS"):
        candidates.append(Path(os.environ["FEDTEXTSEG_CONFIGS"]))
    candidates += [Path.cwd() / "configs", Path(__file__).resolve().parent.parent / "configs"]
    for c in candidates:
        if (c / "config.yaml").is_file():
            return c.resolve()
    raise ConfigError(
        "cannot find the configs folder (looked in: " + ", ".join(str(c) for c in candidates) + "); "
        "set FEDTEXTSEG_CONFIGS to the project's configs/ directory"
    )


def list_experiments() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "experiment").glob("*.yaml"))


def split_overrides(overrides: str | Iterable[str] | None) -> list[str]:
    """Flower's run-config carries overrides as one string: ``"model=cdpdnet_small federation.rounds=3"``."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return shlex.split(overrides)
    return [o for o in overrides if o]


def compose_config(experiment: str | None = None, overrides: str | Iterable[str] | None = None) -> DictConfig:
    """Compose ``configs/config.yaml`` with an experiment and overrides; errors say what to change."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fedtextseg.config_schema import register_schema, undeclared_keys

    register_schema()
    cdir = configs_dir()
    args = split_overrides(overrides)
    if experiment:
        if experiment not in list_experiments():
            raise ConfigError(
                f"unknown experiment {experiment!r}; known: {', '.join(list_experiments())} "
                f"(files in {cdir / 'experiment'})"
            )
        args = [f"experiment={experiment}"] + args
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(cdir), version_base="1.3"):
            cfg = compose(config_name="config", overrides=args)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"invalid configuration ({' '.join(args) or 'defaults'}): {exc}") from None
    finally:
        GlobalHydra.instance().clear()
    strangers = undeclared_keys(cfg)  # Hydra's `+key=value` appends even to a structured node
    if strangers:
        raise ConfigError(f"invalid configuration ({' '.join(args) or 'defaults'}): {', '.join(strangers)} "
                          "not in the schema (fedtextseg/config_schema.py); check the spelling")
    cfg.run.experiment = experiment or "default"
    return cfg  # struct mode stays on: reading or writing a key the schema does not declare is an error


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_resolved(cfg: DictConfig, path: str | Path) -> Path:
    """Write the fully resolved config (what the run really used) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_container(cfg), sort_keys=False))
    return path
