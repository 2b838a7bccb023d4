"""Study definitions as data: ``configs/study/<name>.yaml`` lists arms as Hydra overrides over a base experiment.

A study file::

    title: ...                 # one line for tables and the results page
    question: ...              # what the study answers
    experiment: demo           # the base experiment every arm composes (inherits its training recipe)
    figures: [dice_by_arm]     # figure kinds (fedtextseg.studies.plots.FIGURES)
    x_axis: {key: epsilon, label: "target epsilon", log: true}   # optional: arms' ``x`` values for line plots
    extra_columns: [unseen_pooled_mean]   # optional: summary columns after the standard ones (EXTRA_COLUMNS)
    export: benchmarks/results/qata.json  # optional: each arm's headline numbers as JSON (from the project root)
    arms:
      - name: fedtextseg       # folder and column name
        label: fedtextseg      # what tables and plots show
        kind: federated        # federated | centralized | local
        overrides: []          # Hydra overrides of this arm
        x: 8                   # optional x-axis value (.inf allowed)
        sites: 4               # optional: use the first N sites of the data root (scaling)
    sizes:                     # budgets: rounds, local steps, seeds, evaluation cases ...
      cpu:   {seeds: 3, overrides: [federation.rounds=3, ...], arms: [fedtextseg]}   # arms: optional subset
      paper: {seeds: 3, experiment: demo_paper, overrides: [...]}   # experiment: optional, this size's base

A size's ``arms`` (optional) are the arms a run of that size trains when the caller names none (``--arms``): a CPU
budget may measure fewer points of a curve than a GPU one. Its ``experiment`` (optional) replaces the study's base
experiment for that size (a GPU size that starts from the paper's recipe).

:func:`arm_overrides` is the full list an arm's run composes: size, then arm, then the caller's extra overrides,
then the run's own bookkeeping (seed, name, privacy ledger inside the run folder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from fedtextseg.config import configs_dir
from fedtextseg.errors import ConfigError

__all__ = ["ArmSpec", "StudySpec", "list_studies", "load_study", "arm_overrides", "ARM_KINDS"]

ARM_KINDS = ("federated", "centralized", "local")
EXTRA_COLUMNS = ("unseen_pooled_mean",)  # summary columns a study may add (their headers: studies.report)


@dataclass(frozen=True)
class ArmSpec:
    """One method of a study: how it trains (``kind``) and what it changes (``overrides``)."""

    name: str
    kind: str = "federated"
    label: str = ""
    overrides: tuple[str, ...] = ()
    x: float | None = None
    sites: int | None = None

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class StudySpec:
    """A parsed study file (see the module docstring)."""

    name: str
    title: str
    question: str
    experiment: str
    arms: tuple[ArmSpec, ...]
    sizes: dict[str, dict[str, Any]]
    figures: tuple[str, ...] = ()
    x_axis: dict[str, Any] = field(default_factory=dict)
    extra_columns: tuple[str, ...] = ()
    export: str | None = None
    path: Path | None = None

    def arm(self, name: str) -> ArmSpec:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"study {self.name!r} has no arm {name!r}; arms: {', '.join(a.name for a in self.arms)}")

    def size(self, name: str) -> dict[str, Any]:
        if name not in self.sizes:
            raise ConfigError(f"study {self.name!r} has no size {name!r}; sizes: {', '.join(self.sizes)}")
        return self.sizes[name]

    def experiment_for(self, size: str) -> str:
        """The base experiment a run of ``size`` composes: the size's own, else the study's."""
        return str(self.size(size).get("experiment") or self.experiment)


def _study_dir() -> Path:
    return configs_dir() / "study"


def list_studies() -> list[str]:
    return sorted(p.stem for p in _study_dir().glob("*.yaml"))


def _parse_x(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("inf", ".inf", "infinity"):
        return math.inf
    return float(value)


def _parse_arm(raw: Any, where: str) -> ArmSpec:
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"{where}: every arm needs at least a name (got {raw!r})")
    kind = str(raw.get("kind", "federated"))
    if kind not in ARM_KINDS:
        raise ConfigError(f"{where}: arm {raw['name']!r} has kind {kind!r}; choose one of {', '.join(ARM_KINDS)}")
    unknown = set(raw) - {"name", "kind", "label", "overrides", "x", "sites"}
    if unknown:
        raise ConfigError(f"{where}: arm {raw['name']!r} has unknown key(s) {sorted(unknown)}")
    return ArmSpec(name=str(raw["name"]), kind=kind, label=str(raw.get("label") or ""),
                   overrides=tuple(str(o) for o in raw.get("overrides") or ()), x=_parse_x(raw.get("x")),
                   sites=int(raw["sites"]) if raw.get("sites") is not None else None)


def load_study(name_or_path: str | Path) -> StudySpec:
    """Parse ``configs/study/<name>.yaml`` (or a path to a study file); errors name the file and the problem."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = _study_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown study {str(name_or_path)!r}; known: {', '.join(list_studies())} "
                          f"(files in {_study_dir()})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    arms = tuple(_parse_arm(a, str(path)) for a in raw.get("arms") or ())
    if not arms:
        raise ConfigError(f"{path}: a study needs at least one arm")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: arm names must be unique, got {names}")
    sizes = {str(k): dict(v or {}) for k, v in (raw.get("sizes") or {}).items()}
    if "cpu" not in sizes:
        raise ConfigError(f"{path}: a study needs a 'cpu' size (the 2-core default)")
    for size_name, budget in sizes.items():
        unknown = set(budget) - {"seeds", "overrides", "arms", "experiment"}
        if unknown:
            raise ConfigError(f"{path}: size {size_name!r} has unknown key(s) {sorted(unknown)}; "
                              "a size has seeds, overrides and (optional) arms and experiment")
        strangers = [a for a in budget.get("arms") or () if a not in names]
        if strangers:
            raise ConfigError(f"{path}: size {size_name!r} lists arm(s) {strangers} the study does not define; "
                              f"arms: {', '.join(names)}")
    strangers = [c for c in raw.get("extra_columns") or () if c not in EXTRA_COLUMNS]
    if strangers:
        raise ConfigError(f"{path}: unknown extra_columns {strangers}; choose from {', '.join(EXTRA_COLUMNS)}")
    return StudySpec(name=path.stem, title=str(raw.get("title") or path.stem), question=str(raw.get("question") or ""),
                     experiment=str(raw.get("experiment") or "demo"), arms=arms, sizes=sizes,
                     figures=tuple(raw.get("figures") or ()), x_axis=dict(raw.get("x_axis") or {}),
                     extra_columns=tuple(str(c) for c in raw.get("extra_columns") or ()),
                     export=str(raw["export"]) if raw.get("export") else None, path=path)


def arm_overrides(spec: StudySpec, arm: ArmSpec, size: str, seed: int, run_dir: Path,
                  extra: Sequence[str] = ()) -> list[str]:
    """Everything one run composes over ``spec.experiment_for(size)``: size budget, arm, caller's extras,
    bookkeeping."""
    budget = spec.size(size)
    return [*[str(o) for o in budget.get("overrides") or ()], *arm.overrides, *extra,
            f"run.seed={int(seed)}", f"run.name={spec.name}-{arm.name}-seed{int(seed)}",
            f"run.results_dir={run_dir.parent}",
            f"privacy.ledger_dir={run_dir / 'privacy-ledger'}"]  # a fresh DP accountant for every run
