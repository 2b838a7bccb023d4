"""Checks a run makes before any training starts, so a bad setting fails in seconds, not after hours.

:func:`preflight` (called by the federation ``Coordinator`` once the model is built) raises a
:class:`~fedtextseg.errors.ConfigError` that says what to change for:

- federation options that would only fail at the first aggregation: ``robust``, ``weighting``, ``min_sites``
  (also more than the configured sites, when the server knows them), ``outlier_factor``, ``max_update_norm``,
  ``rounds``, ``round_timeout``, ``first_round_timeout``; an unknown ``train.loss`` (sites would fail in round 1);
- a patch size the model's downsampling cannot take (``data.preprocess.patch_size``);
- a results folder without room for what the run will write (checkpoints, model file, metrics): the free space
  is read with ``shutil.disk_usage``, so a full disk is reported before round 1 rather than at its checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fedtextseg.errors import ConfigError
from fedtextseg.federation.aggregation import WEIGHTINGS

__all__ = ["preflight", "check_federation_options", "check_patch_size", "check_disk_space"]

ROBUST_RULES = ("median", "trimmed_mean")


def _shown(value: Any) -> str:
    """A setting as the user wrote it: ``-1`` (the schema stores it as -1.0), ``'mediam'``, ``None``."""
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:g}"
    return repr(value)


def check_federation_options(cfg: DictConfig, num_sites: int | None = None) -> None:
    """Federation settings that are only used after the first local round, checked now."""
    from fedtextseg.losses import LOSS_MODES

    fed = cfg.federation
    problems = []
    robust = fed.robust
    if robust not in (None, "", "mean", *ROBUST_RULES):
        problems.append(f"federation.robust={robust!r} is not a rule; use null, {' or '.join(ROBUST_RULES)}")
    if fed.weighting not in WEIGHTINGS:
        problems.append(f"federation.weighting={fed.weighting!r}; use {', '.join(WEIGHTINGS)}")
    for key, low in (("rounds", 1), ("min_sites", 1)):
        value = fed[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"federation.{key}={_shown(value)}; use an integer >= {low}")
    min_sites = fed.min_sites
    if num_sites is not None and isinstance(min_sites, int) and min_sites > num_sites:
        problems.append(f"federation.min_sites={min_sites} but only {num_sites} site(s) are configured: no round "
                        f"could ever be aggregated; set federation.min_sites<={num_sites}")
    factor = fed.outlier_factor
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1):
        problems.append(f"federation.outlier_factor={_shown(factor)}; use null (off) or a number > 1 (e.g. 100)")
    norm = fed.max_update_norm
    if norm is not None and (isinstance(norm, bool) or not isinstance(norm, (int, float)) or norm <= 0):
        problems.append(f"federation.max_update_norm={_shown(norm)}; use null (off) or a positive number")
    for key in ("round_timeout", "first_round_timeout"):
        timeout = fed[key]
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            problems.append(f"federation.{key}={_shown(timeout)}; use a positive number of seconds")
    loss = cfg.train.loss
    if loss not in LOSS_MODES:
        problems.append(f"train.loss={loss!r}; use one of {', '.join(LOSS_MODES)}")
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))


def check_patch_size(cfg: DictConfig, model: Any) -> None:
    """The training/sliding-window patch must fit the model's total downsampling (3D models that say so)."""
    if not hasattr(model, "check_patch_size"):
        return
    patch = list(cfg.data.preprocess.get("patch_size") or [])  # free-form (config_schema): 2D runs have none
    try:
        model.check_patch_size(patch)
    except ConfigError as exc:
        raise ConfigError(f"data.preprocess.patch_size={patch}: {exc}") from None


def check_disk_space(folder: str | Path, needed_bytes: int, what: str = "the run") -> None:
    """Room for ``needed_bytes`` under ``folder`` (with a 20% + 1 MB margin), else a ConfigError before training."""
    folder = Path(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # cannot tell (e.g. a file system without statvfs): the write probe has passed
        return
    want = int(needed_bytes * 1.2) + (1 << 20)
    if free < want:
        raise ConfigError(f"results folder {folder} has {free / 1e6:.1f} MB free but {what} needs about "
                          f"{want / 1e6:.1f} MB; free some space or choose another folder with run.results_dir=...")


def preflight(cfg: DictConfig, model: Any, run_dir: str | Path, *, checkpoint_bytes: int, model_bytes: int,
              num_sites: int | None = None, keep_checkpoints: int = 3) -> None:
    """Every start-time check of a federated run (see the module docstring)."""
    check_federation_options(cfg, num_sites)
    check_patch_size(cfg, model)
    check_disk_space(run_dir, keep_checkpoints * checkpoint_bytes + model_bytes,
                     f"{keep_checkpoints} checkpoints of {checkpoint_bytes / 1e6:.1f} MB and a model file of "
                     f"{model_bytes / 1e6:.1f} MB")
