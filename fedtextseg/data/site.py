"""A hospital's dataset as fedtextseg sees it: a folder of images + labels and a label map (``site.yaml``).

Layouts understood by :func:`load_site`:

* **site.yaml** (the native layout)::

      name: hospital-b
      task: lits                     # vocabulary task whose prompt conditions the model (TTPG)
      vocabulary: abdomen-ct         # registered name or a YAML path (default abdomen-ct)
      format: nifti                  # nifti (3D, data/nifti_site.py) | png-csv (2D chest X-ray, data/xray_site.py)
      images: images                 # folder of images (default "images")
      labels: labels                 # folder of label maps (default "labels")
      label_map: {1: liver, 2: liver tumor}   # label value -> vocabulary class or composite ("kidney")
      annotated: [liver, liver tumor]        # optional; default = every class the label map names
      unmapped: refuse               # label values naming classes outside the vocabulary: refuse (default,
                                     # with the list of names) | ignore (those voxels count as not annotated:
                                     # no class's positive, no class's negative, left out of loss and metrics)
      privacy: {target_epsilon: 8.0, target_delta: 1.0e-5}   # optional per-site budget

  Images and labels pair by file name (``case_001.nii.gz``); nnU-Net's ``case_001_0000.nii.gz`` image names pair
  with ``case_001.nii.gz`` labels (names that merely end in 4 digits, ``case_0001``, stay as they are). Images
  without a label are allowed for unlabeled/inference sites; a ``labels`` folder named in site.yaml must exist.

* **TotalSegmentator output** (``labels/<case id>/<class>.nii.gz``, one binary mask per class, as
  ``TotalSegmentator -i images/<case id>.nii.gz -o labels/<case id>`` writes them): no ``label_map`` - the masks'
  file names are the classes (resolved through the vocabulary's synonyms; set ``unmapped: ignore`` for the ones it
  does not have). The masks of a case must share its image's grid and must not overlap.

* **Medical Segmentation Decathlon** (``dataset.json``, ``imagesTr/``, ``labelsTr/``): the label map comes from
  ``dataset.json``'s ``labels`` (MSD's ``{"1": "liver"}`` or nnU-Net v2's ``{"liver": 1}``) resolved through the
  vocabulary, or from a ``site.yaml`` beside it (needed where MSD's names are ambiguous, e.g. Task03_Liver's
  "cancer"; the error says so). Without a ``task``, it is guessed from dataset.json's ``name`` ("LITS" -> lits,
  "Liver" -> "msd liver" -> lits), else the vocabulary's "msd" task.

Label value 0 is background. A label value mapped to a composite ("kidney") is split by body side into its
lateral members when converted (see :func:`fedtextseg.data.labels.labels_to_channels`). Several values may map to one
class (TotalSegmentator's three right lung lobes -> right lung). Names resolve through the vocabulary's synonyms,
which include TotalSegmentator's (``kidney_left``, ``inferior_vena_cava``, ``lung_upper_lobe_left``, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedtextseg.errors import SiteError
from fedtextseg.vocab import UnknownClassError, UnknownTaskError, Vocabulary, get_vocabulary

__all__ = ["Case", "Site", "load_site", "SITE_FILE", "NIFTI_SUFFIXES", "UNMAPPED_CHOICES", "SiteLayout",
           "SiteReader", "register_reader", "site_formats", "case_id_of"]

SITE_FILE = "site.yaml"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
UNMAPPED_CHOICES = ("refuse", "ignore")  # site.yaml `unmapped`: label values whose class the vocabulary lacks


@dataclass(frozen=True)
class Case:
    """One image (and its label, when labeled) of a site."""

    case_id: str
    image: Path
    label: Path | None = None
    caption: str | None = None  # 2D report-guided sites: the report sentence of this image


@dataclass
class Site:
    """A partially labeled dataset: cases, label map, annotated classes, task, vocabulary."""

    root: Path
    name: str
    task: str
    vocabulary: Vocabulary
    label_map: dict[int, str]  # value -> canonical class or composite name
    annotated: list[str]  # canonical class names, vocabulary order
    cases: list[Case]
    format: str = "nifti"
    privacy: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    ignored_values: dict[int, str] = field(default_factory=dict)  # ``unmapped: ignore``: value -> name as written

    @property
    def spatial_dims(self) -> int:
        return self.vocabulary.spatial_dims

    @property
    def labeled_cases(self) -> list[Case]:
        return [c for c in self.cases if c.label is not None]

    @property
    def task_index(self) -> int:
        return self.vocabulary.task_index(self.task)

    def annotated_mask(self) -> np.ndarray:
        """Boolean [C]: which vocabulary channels this site's labels are authoritative for."""
        names = set(self.annotated)
        return np.array([c in names for c in self.vocabulary.class_names], dtype=bool)

    def describe(self) -> str:
        return (
            f"site {self.name!r} ({self.format}, task {self.task}): {len(self.cases)} cases, "
            f"{len(self.labeled_cases)} labeled; annotates {', '.join(self.annotated) or 'nothing'}"
        )


def case_id_of(path: Path) -> str:
    """A file's case id: its name without the image suffix (``case_001.nii.gz`` -> ``case_001``)."""
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, ".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _resolve_label_map(raw: dict, vocab: Vocabulary, source: Path,
                       unmapped: str = "refuse") -> tuple[dict[int, str], dict[int, str]]:
    """(value -> canonical class, value -> name of an ignored class) of a raw label map.

    With ``unmapped="ignore"`` a value whose name the vocabulary does not know is returned in the second mapping
    instead of being an error; every other problem is still an error, all of them reported at once."""
    if not isinstance(raw, dict):
        raise SiteError(source, f"label map must be a mapping of label value -> class name, got {type(raw).__name__}")
    out: dict[int, str] = {}
    ignored: dict[int, str] = {}
    unknown: list[str] = []
    problems = []
    for key, name in raw.items():
        try:
            if isinstance(key, bool) or (isinstance(key, float) and not key.is_integer()):
                raise ValueError
            value = int(key)
        except (TypeError, ValueError, OverflowError):
            problems.append(f"label value {key!r} is not an integer")
            continue
        if not isinstance(name, str) or not name.strip():
            problems.append(f"label value {value}: class name must be a non-empty string, got {name!r}")
            continue
        if value in out or value in ignored:
            problems.append(f"label value {value} is given twice ({out.get(value, ignored.get(value))!r} and "
                            f"{name!r})")
            continue
        if value == 0:
            if str(name).strip().lower() not in ("background", "bg", "none", "0"):
                problems.append(f"label value 0 is background and cannot be mapped to {name!r}")
            continue
        if value < 0:
            problems.append(f"label value {value} is negative")
            continue
        try:
            out[value] = vocab.canonical(str(name))
        except UnknownClassError as exc:
            if unmapped == "ignore":
                ignored[value] = str(name)
            else:
                unknown.append(f"{value}={name}")
                if len(unknown) <= 3:  # the first few with the vocabulary's suggestions
                    problems.append(f"label value {value}: {exc}")
    if unknown:
        problems.append(f"{len(unknown)} label value(s) name classes outside vocabulary {vocab.name!r}: "
                        f"{', '.join(unknown)}; set `unmapped: ignore` in {SITE_FILE} to train on the others "
                        "(those voxels then count as not annotated, never as background), or map them to "
                        "vocabulary classes")
    if problems:
        hint = ""
        if source.name == "dataset.json":
            hint = (
                f" (to override dataset.json's names, add a {SITE_FILE} beside it with e.g. "
                "label_map: {1: liver, 2: liver tumor})"
            )
        raise SiteError(source, "invalid label map: " + "; ".join(problems) + hint)
    if not out:
        raise SiteError(source, "label map declares no foreground class"
                        + (f" of vocabulary {vocab.name!r} (every value is ignored)" if ignored else ""))
    return out, ignored


def _annotated_from(label_map: dict[int, str], raw: list | None, vocab: Vocabulary, source: Path) -> list[str]:
    try:
        if raw is None:
            return vocab.resolve_many(label_map.values())
        annotated = vocab.resolve_many(raw)
    except UnknownClassError as exc:
        raise SiteError(source, f"annotated classes: {exc}") from None
    labeled = set(vocab.resolve_many(label_map.values()))
    frontier = list(labeled)
    while frontier:  # a tumor's voxels also count toward its organ (fedtextseg.data.labels)
        for parent in vocab.parent_channels(frontier.pop()):
            if parent not in labeled:
                labeled.add(parent)
                frontier.append(parent)
    unlabeled = [c for c in annotated if c not in labeled]
    if unlabeled:
        raise SiteError(source, f"annotated class(es) {', '.join(map(repr, unlabeled))} have no value in the label "
                                "map: every voxel would teach the model 'absent'; add them to label_map or drop them "
                                "from 'annotated'")
    return annotated


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: let PyYAML report it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep)


# site.yaml keys whose values must be of one kind (anything else would fail later, less clearly)
_SPEC_TYPES = {"name": (str, int), "task": (str,), "vocabulary": (str,), "format": (str,), "images": (str,),
               "labels": (str,), "csv": (str,), "root": (str,), "label_map": (dict,), "annotated": (list,),
               "privacy": (dict,), "unmapped": (str,)}


def _check_spec(spec: dict, path: Path) -> None:
    for key, kinds in _SPEC_TYPES.items():
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            want = " or ".join({"str": "a string", "int": "an integer", "dict": "a mapping",
                                "list": "a list"}[k.__name__] for k in kinds)
            raise SiteError(path, f"'{key}' must be {want}, got {type(value).__name__} {value!r:.60}")
    if isinstance(spec.get("annotated"), list) and not all(isinstance(c, str) for c in spec["annotated"]):
        raise SiteError(path, f"'annotated' must be a list of class names, got {spec['annotated']!r:.80}")
    if spec.get("unmapped") is not None and spec["unmapped"] not in UNMAPPED_CHOICES:
        raise SiteError(path, f"'unmapped' must be one of {', '.join(UNMAPPED_CHOICES)}, got {spec['unmapped']!r}")


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader subclass
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as exc:
        raise SiteError(path, f"cannot read site description: {exc}") from None
    if not isinstance(data, dict):
        raise SiteError(path, "site description must be a YAML mapping")
    _check_spec(data, path)
    return data


def _msd_task_guess(name: str, vocab: Vocabulary) -> str:
    """The task of an MSD/nnU-Net dataset: its ``name`` ("LiTS"), else "msd <name>" ("MSD Liver"), else "msd"."""
    for candidate in (name, f"msd {name}", "msd"):
        if not str(candidate).strip():
            continue
        try:
            return vocab.task(str(candidate)).name
        except UnknownTaskError:
            continue
    return vocab.default_task or vocab.task_names[0]


def _msd_labels(msd: dict) -> dict | None:
    """dataset.json labels as value -> name: MSD writes {"1": "liver"}, nnU-Net v2 writes {"liver": 1}."""
    labels = msd.get("labels")
    if not isinstance(labels, dict):
        return labels
    if labels and all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        return {v: k for k, v in labels.items()}
    return labels


# ---------------------------------------------------------------------------- site formats
@dataclass
class SiteLayout:
    """Where a site's files are, as its description says: what a :class:`SiteReader` reads."""

    root: Path
    spec: dict  # site.yaml ({} when there is none)
    spec_path: Path
    dataset_json: dict  # MSD / nnU-Net dataset.json ({} when there is none)
    images_dir: Path
    labels_dir: Path
    labels_required: bool  # the labels folder was named in site.yaml, so it must exist
    scratch: dict = field(default_factory=dict)  # a reader's own notes between its two calls


class SiteReader:
    """How one site format's files become cases. :func:`load_site` calls :meth:`label_names` before it resolves the
    site's label map (a format whose files name their classes returns ``{value: name}``, else None) and
    :meth:`read_cases` after; both raise :class:`SiteError` naming the file and the problem."""

    name: str = ""
    aliases: tuple[str, ...] = ()

    def label_names(self, layout: SiteLayout) -> dict[int, str] | None:
        return None

    def read_cases(self, layout: SiteLayout) -> list[Case]:
        raise NotImplementedError


_READERS: dict[str, SiteReader] = {}


def register_reader(reader: SiteReader) -> SiteReader:
    """Make ``reader`` the reader of ``format: <reader.name>`` (and its aliases) in site.yaml."""
    for key in (reader.name, *reader.aliases):
        if key in _READERS and _READERS[key] is not reader:
            raise ValueError(f"site format {key!r} is registered twice")
        _READERS[key] = reader
    return reader


def site_formats() -> list[str]:
    """The registered site formats' names (aliases left out)."""
    return sorted({r.name for r in _READERS.values()})


def reader_for(fmt: str, source: Path) -> SiteReader:
    try:
        return _READERS[fmt]
    except KeyError:
        raise SiteError(source, f"unknown site format {fmt!r} (expected one of: "
                                f"{', '.join(map(repr, site_formats()))})") from None


def load_site(path: str | Path, vocabulary: Vocabulary | str | None = None) -> Site:
    """Read a site folder (``site.yaml`` and/or MSD ``dataset.json``) into a :class:`Site`, its files through the
    reader of its ``format`` (:func:`register_reader`; the built-in ones: ``nifti`` in
    :mod:`fedtextseg.data.nifti_site`, ``png-csv`` in :mod:`fedtextseg.data.xray_site`)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise SiteError(root, "site folder does not exist")
    spec_path = root / SITE_FILE
    msd_path = root / "dataset.json"
    spec = _load_yaml(spec_path) if spec_path.is_file() else {}
    msd: dict = {}
    if msd_path.is_file():
        try:
            msd = json.loads(msd_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SiteError(msd_path, f"cannot read dataset.json: {exc}") from None
        if not isinstance(msd, dict):
            raise SiteError(msd_path, f"dataset.json must hold a JSON object, got {type(msd).__name__}")
    if not spec and not msd:
        raise SiteError(root, f"not a site: neither {SITE_FILE} nor dataset.json found")
    source = spec_path if spec else msd_path
    try:
        vocab = get_vocabulary(vocabulary or spec.get("vocabulary"))
    except Exception as exc:  # unknown vocabulary name or unreadable vocabulary file
        raise SiteError(source, str(exc)) from None

    reader = reader_for(str(spec.get("format", "nifti")).lower(), source)
    if msd and "images" not in spec:
        images_dir, labels_dir, labels_required = root / "imagesTr", root / "labelsTr", False
    else:
        images_dir, labels_dir = root / spec.get("images", "images"), root / spec.get("labels", "labels")
        labels_required = "labels" in spec
    layout = SiteLayout(root, spec, spec_path, msd, images_dir, labels_dir, labels_required)
    raw_map = spec.get("label_map")
    named_by_files = reader.label_names(layout)
    if named_by_files:
        if raw_map is not None:
            raise SiteError(spec_path, "labels are folders of per-class masks, whose file names name the classes: "
                                       "remove label_map (rename a mask file to change its class)")
        raw_map = named_by_files
    if raw_map is None and msd:
        raw_map = _msd_labels(msd)
        source = msd_path
    if raw_map is None:
        raise SiteError(spec_path, "no label_map (and no dataset.json labels) declared")
    label_map, ignored = _resolve_label_map(raw_map, vocab, source, str(spec.get("unmapped") or "refuse"))
    annotated = _annotated_from(label_map, spec.get("annotated"), vocab, spec_path if spec else msd_path)

    task_name = spec.get("task") or (_msd_task_guess(msd.get("name", ""), vocab) if msd else vocab.default_task)
    if task_name is None:
        raise SiteError(source, "no task declared and the vocabulary has no default task")
    try:
        task = vocab.task(str(task_name)).name
    except UnknownTaskError as exc:
        raise SiteError(source, str(exc)) from None
    cases = reader.read_cases(layout)
    mask_values = {name: value for value, name in named_by_files.items()} if named_by_files else {}

    return Site(
        root=root,
        name=str(spec.get("name") or msd.get("name") or root.name),
        task=task,
        vocabulary=vocab,
        label_map=label_map,
        annotated=annotated,
        cases=cases,
        format=reader.name,
        privacy=dict(spec.get("privacy") or {}),
        meta={**{k: v for k, v in spec.items() if k not in {"label_map", "annotated", "privacy"}},
              **({"mask_values": mask_values} if mask_values else {})},
        ignored_values=ignored,
    )
