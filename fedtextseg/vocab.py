"""The universal label space: vocabulary classes, synonyms, composite classes, dataset tasks, prompt templates.

Every site, model head, text bank and metric speaks in the channels of one :class:`Vocabulary`. The default one is
the 32-class abdominal CT vocabulary of the CLIP-Driven Universal Model / CDPDNet with its 11 dataset tasks
(Liu et al. 2023, arXiv 2301.00785), ``vocabularies/abdomen-ct.yaml``, beside ``chest-xray.yaml``. Deployments add
vocabularies from YAML files the same way, without code changes::

    vocab = get_vocabulary()                 # "abdomen-ct"
    vocab.index("IVC")                       # -> 8 (channel of "postcava")
    vocab.expand("kidney")                   # -> ["right kidney", "left kidney"]
    vocab = Vocabulary.from_yaml("my_vocab.yaml")

Name look-up is forgiving (case, underscores, "kidney_left" word order, synonyms) and exact about failure: an
unknown name raises :class:`UnknownClassError` listing the closest known names.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from fedtextseg.errors import FedTextSegError

__all__ = [
    "ClassDef",
    "TaskDef",
    "Vocabulary",
    "UnknownClassError",
    "UnknownTaskError",
    "normalize_name",
    "get_vocabulary",
    "register_vocabulary",
    "list_vocabularies",
]


class UnknownClassError(FedTextSegError, KeyError):
    """A class name that is neither a class, a synonym nor a composite of the vocabulary."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else ""


class UnknownTaskError(FedTextSegError, KeyError):
    """A task (dataset) name the vocabulary does not define."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_SIDES = ("left", "right")


def normalize_name(name: str) -> str:
    """Canonical form of a user-written name: lower case, single spaces, side word first.

    ``"Kidney_Left"``, ``"kidney-left"`` and ``"left  kidney"`` all become ``"left kidney"``.
    """
    text = re.sub(r"[_\-/]+", " ", str(name).strip().lower())
    text = re.sub(r"[()]", " ", text)
    text = re.sub(r"\s+", " ", text).strip()
    words = text.split(" ")
    if len(words) > 1 and words[-1] in _SIDES:
        words = [words[-1]] + words[:-1]
    return " ".join(words)


@dataclass(frozen=True)
class ClassDef:
    """One output channel of the universal label space."""

    name: str  # canonical, lower case ("postcava")
    display: str  # as written in prompts ("Postcava")
    synonyms: tuple[str, ...] = ()
    parent: str | None = None  # a tumor's organ (a class or a composite); its voxels also count there
    side: str | None = None  # "left"/"right" for lateral organs


@dataclass(frozen=True)
class TaskDef:
    """A source dataset / task: its prompt name and the classes it labels."""

    name: str  # canonical key ("lits")
    display: str  # as written in the task prompt ("LiTS")
    classes: tuple[str, ...]  # canonical class names it labels
    aliases: tuple[str, ...] = ()


@dataclass
class Vocabulary:
    """An ordered set of classes (channel ``i`` = ``classes[i]``), composites, tasks and prompt templates."""

    name: str
    classes: list[ClassDef]
    tasks: list[TaskDef] = field(default_factory=list)
    composites: dict[str, tuple[str, ...]] = field(default_factory=dict)  # "kidney" -> (right, left)
    class_template: str = "A computerized tomography of a {}"
    task_template: str = "A task of segmenting {} in computerized tomography"
    modality: str = "CT"
    spatial_dims: int = 3
    default_task: str | None = None

    def __post_init__(self) -> None:
        self._lookup: dict[str, str] = {}
        for c in self.classes:
            for alias in (c.name, c.display, *c.synonyms):
                key = normalize_name(alias)
                other = self._lookup.get(key)
                if other is not None and other != c.name:
                    raise FedTextSegError(
                        f"vocabulary {self.name!r}: name {alias!r} is used by both {other!r} and {c.name!r}"
                    )
                self._lookup[key] = c.name
        self._index = {c.name: i for i, c in enumerate(self.classes)}
        if len(self._index) != len(self.classes):
            raise FedTextSegError(f"vocabulary {self.name!r} lists a class twice")
        for comp, members in self.composites.items():
            for m in members:
                if m not in self._index:
                    raise FedTextSegError(f"vocabulary {self.name!r}: composite {comp!r} names unknown class {m!r}")
        for c in self.classes:
            if c.parent is not None and c.parent not in self._index and c.parent not in self.composites:
                raise FedTextSegError(f"vocabulary {self.name!r}: {c.name!r} has unknown parent {c.parent!r}")
        self._task_lookup: dict[str, str] = {}
        for t in self.tasks:
            for alias in (t.name, t.display, *t.aliases):
                self._task_lookup[normalize_name(alias)] = t.name
            for cname in t.classes:
                if cname not in self._index:
                    raise FedTextSegError(f"vocabulary {self.name!r}: task {t.name!r} labels unknown class {cname!r}")
        if self.default_task is not None:
            self.default_task = self.task(self.default_task).name

    # ------------------------------------------------------------------ classes
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def _known_names(self) -> list[str]:
        return sorted(set(self._lookup) | {normalize_name(k) for k in self.composites})

    def canonical(self, name: str) -> str:
        """Canonical name of a class or composite (``"IVC"`` -> ``"postcava"``, ``"Kidneys"`` -> ``"kidney"``)."""
        key = normalize_name(name)
        if key in self._lookup:
            return self._lookup[key]
        for comp in self.composites:
            if key == normalize_name(comp) or key == normalize_name(comp) + "s":
                return comp
        if key.endswith("s") and key[:-1] in self._lookup:  # "kidneys"
            return self._lookup[key[:-1]]
        close = difflib.get_close_matches(key, self._known_names(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownClassError(f"unknown class name {name!r} in vocabulary {self.name!r}{hint}")

    def resolve(self, name: str) -> ClassDef:
        """The class a name denotes; composites raise (use :meth:`expand`)."""
        canon = self.canonical(name)
        if canon in self.composites:
            raise UnknownClassError(
                f"{name!r} is a group of classes {list(self.composites[canon])} in vocabulary {self.name!r}; "
                "name one of them"
            )
        return self.classes[self._index[canon]]

    def index(self, name: str) -> int:
        """Channel index (0-based) of a class."""
        return self._index[self.resolve(name).name]

    def expand(self, name: str) -> list[str]:
        """Canonical class names a name covers: itself, or the members of a composite."""
        canon = self.canonical(name)
        if canon in self.composites:
            return list(self.composites[canon])
        return [canon]

    def resolve_many(self, names: Iterable[str]) -> list[str]:
        """Expand and de-duplicate names, keeping vocabulary order; reports every unknown name at once."""
        wanted: set[str] = set()
        errors = []
        for n in names:
            try:
                wanted.update(self.expand(n))
            except UnknownClassError as exc:
                errors.append(str(exc))
        if errors:
            raise UnknownClassError("; ".join(errors))
        return [c for c in self.class_names if c in wanted]

    def parent_channels(self, name: str) -> list[str]:
        """Classes that a class's voxels also count toward (a tumor's organ), by composite expansion."""
        c = self.resolve(name)
        return self.expand(c.parent) if c.parent else []

    def side_of(self, name: str) -> str | None:
        return self.resolve(name).side

    # ------------------------------------------------------------------ tasks
    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskDef:
        key = normalize_name(name)
        if key in self._task_lookup:
            return self.tasks[self.task_names.index(self._task_lookup[key])]
        close = difflib.get_close_matches(key, sorted(self._task_lookup), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        known = ", ".join(self.task_names)
        raise UnknownTaskError(f"unknown task {name!r} in vocabulary {self.name!r} (known: {known}){hint}")

    def task_index(self, name: str) -> int:
        return self.task_names.index(self.task(name).name)

    # ------------------------------------------------------------------ prompts
    def class_prompts(self) -> list[str]:
        return [self.class_template.format(c.display) for c in self.classes]

    def task_prompts(self) -> list[str]:
        return [self.task_template.format(t.display) for t in self.tasks]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "modality": self.modality,
            "spatial_dims": self.spatial_dims,
            "class_template": self.class_template,
            "task_template": self.task_template,
            "default_task": self.default_task,
            "classes": [
                {
                    k: v
                    for k, v in {
                        "name": c.name,
                        "display": c.display,
                        "synonyms": list(c.synonyms),
                        "parent": c.parent,
                        "side": c.side,
                    }.items()
                    if v not in (None, [])
                }
                for c in self.classes
            ],
            "composites": {k: list(v) for k, v in self.composites.items()},
            "tasks": [
                {"name": t.name, "display": t.display, "classes": list(t.classes), "aliases": list(t.aliases)}
                for t in self.tasks
            ],
        }

    @property
    def content_hash(self) -> str:
        """Hash of everything that changes the meaning of a channel or a prompt."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Mapping, *, source: str = "<dict>") -> "Vocabulary":
        """Build from a mapping; ``extends: NAME`` starts from a registered vocabulary and appends."""
        try:
            base = get_vocabulary(data["extends"]) if data.get("extends") else None
            classes = list(base.classes) if base else []
            tasks = list(base.tasks) if base else []
            composites = dict(base.composites) if base else {}
            for c in data.get("classes", []):
                if isinstance(c, str):
                    c = {"name": c}
                display = c.get("display", c["name"])
                classes.append(
                    ClassDef(
                        name=normalize_name(c["name"]),
                        display=display,
                        synonyms=tuple(c.get("synonyms", ())),
                        parent=normalize_name(c["parent"]) if c.get("parent") else None,
                        side=c.get("side"),
                    )
                )
            for k, v in (data.get("composites") or {}).items():
                composites[normalize_name(k)] = tuple(normalize_name(m) for m in v)
            for t in data.get("tasks", []):
                tasks.append(
                    TaskDef(
                        name=normalize_name(t["name"]),
                        display=t.get("display", t["name"]),
                        classes=tuple(normalize_name(n) for n in t.get("classes", ())),
                        aliases=tuple(t.get("aliases", ())),
                    )
                )

            def pick(key, default):
                return data.get(key, getattr(base, key) if base else default)

            return cls(
                name=data.get("name", base.name if base else Path(source).stem),
                classes=classes,
                tasks=tasks,
                composites=composites,
                class_template=pick("class_template", cls.class_template),
                task_template=pick("task_template", cls.task_template),
                modality=pick("modality", "CT"),
                spatial_dims=int(pick("spatial_dims", 3)),
                default_task=pick("default_task", None),
            )
        except FedTextSegError as exc:  # unknown names, duplicates (before KeyError: UnknownClassError is one)
            raise FedTextSegError(f"{source}: {exc}") from None
        except KeyError as exc:
            raise FedTextSegError(f"{source}: vocabulary entry is missing the key {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Vocabulary":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise FedTextSegError(f"{path}: cannot read vocabulary file: {exc}") from exc
        if not isinstance(data, dict):
            raise FedTextSegError(f"{path}: a vocabulary file must be a mapping")
        return cls.from_dict(data, source=str(path))


_REGISTRY: dict[str, Vocabulary] = {}


def register_vocabulary(vocab: Vocabulary) -> Vocabulary:
    _REGISTRY[vocab.name] = vocab
    return vocab


def list_vocabularies() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    """The packaged vocabularies (``fedtextseg/vocabularies/*.yaml``), the default ``abdomen-ct`` first (others may
    ``extends:`` it)."""
    if "abdomen-ct" in _REGISTRY:
        return
    pkg = resources.files("fedtextseg") / "vocabularies"
    entries = sorted((e for e in pkg.iterdir() if e.name.endswith(".yaml")),
                     key=lambda e: (e.name != "abdomen-ct.yaml", e.name))
    for entry in entries:
        register_vocabulary(Vocabulary.from_dict(yaml.safe_load(entry.read_text()), source=entry.name))


def get_vocabulary(name_or_path: str | Path | None = None) -> Vocabulary:
    """A registered vocabulary by name (default ``"abdomen-ct"``) or one loaded from a YAML file path."""
    _load_builtin()
    if name_or_path is None:
        return _REGISTRY["abdomen-ct"]
    if isinstance(name_or_path, Vocabulary):
        return name_or_path
    key = str(name_or_path)
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key.endswith((".yaml", ".yml")) or Path(key).is_file():
        return Vocabulary.from_yaml(key)
    raise FedTextSegError(f"unknown vocabulary {key!r}; known: {', '.join(sorted(_REGISTRY))} (or a YAML path)")
