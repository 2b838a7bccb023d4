"""3D prediction: a trained model file + NIfTI CT volumes + class names -> masks on the input's own grid (the
command line, ``fedtextseg predict``, is :mod:`fedtextseg.predict_cli`).

    fedtextseg predict -m results/run/model.pt -i ct.nii.gz -o out/ --classes liver spleen "left kidney"
    fedtextseg predict -m model.pt -i scans/ -o out/ --multilabel          # every class the federation trained
    fedtextseg predict -m tgcnet.pt -i cxr.png --report "..." -o out/      # 2D models: fedtextseg.predict_xray

Class names go through the model's vocabulary (synonyms such as "IVC", composites such as "kidneys"); the default
is every class some training site annotated (``annotated_by`` of the model file). Each volume is preprocessed
exactly as in training (the file's ``preprocess`` settings: orientation, spacing, HU window, foreground crop,
padding), segmented by Gaussian-weighted sliding windows (GPU + bf16 when present), thresholded, cleaned up
(largest component per organ, never tumors) and resampled back with nearest-neighbour interpolation onto the input
image's voxel grid: same shape, affine and orientation as the input.

Outputs per case: ``<case>_<class>.nii.gz`` (uint8 0/1) and/or ``<case>_multilabel.nii.gz`` (value = vocabulary
class number, legend in ``multilabel_legend.json``/``.csv``; a tumor overrides its organ, overlapping organs go to
the most probable); ``volumes.csv`` (case, class, voxels, ml) for the whole batch. A bad input (unreadable, 2D)
is reported on stderr with its file name and the others still run: exit status 1 if any failed, 2 for usage errors.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from omegaconf import OmegaConf

from fedtextseg import engine
from fedtextseg.data.io import read_header
from fedtextseg.data.site import NIFTI_SUFFIXES, Site
from fedtextseg.data.transforms import PreprocessConfig, invert_to_input, preprocess_transform
from fedtextseg.errors import ConfigError, FedTextSegError
from fedtextseg.vocab import Vocabulary, get_vocabulary

__all__ = ["resolve_classes", "inference_site", "Predictor", "CasePrediction", "BatchResult", "collect_inputs",
           "write_prediction", "write_legend", "unique_cases", "predict_batch"]

log = logging.getLogger(__name__)

_BITS = 24  # class masks packed as bits of float32 planes (exact integers below 2**24) for one resampling each


def resolve_classes(info: Mapping[str, Any], names: Sequence[str] | None = None) -> list[str]:
    """Canonical class names, in vocabulary order, for user-written names (synonyms, composites) or the default.

    Default: the classes some training site annotated (``annotated_by``), or every class of the model when the
    file does not say. Unknown names raise :class:`~fedtextseg.vocab.UnknownClassError` with suggestions.
    """
    vocab = get_vocabulary(info.get("vocabulary"))
    model_classes = list(info["class_names"])
    if names:
        wanted = vocab.resolve_many(names)
    else:
        trained = set(info.get("annotated_by") or {})
        wanted = [c for c in model_classes if c in trained] or list(model_classes)
    missing = [c for c in wanted if c not in model_classes]
    if missing:
        raise FedTextSegError(f"class(es) {missing} are in vocabulary {vocab.name!r} but not in this model's head "
                              f"({len(model_classes)} classes)")
    return [c for c in model_classes if c in wanted]


def inference_site(vocab: Vocabulary, task: str) -> Site:
    """An in-memory, label-less Site: what the preprocessing pipeline needs to know (vocabulary, task)."""
    return Site(root=Path("."), name="inference", task=vocab.task(task).name, vocabulary=vocab, label_map={},
                annotated=[], cases=[])


@dataclass
class CasePrediction:
    """One case's masks on the input grid: class ``i`` is bit ``i % 24`` of plane ``i // 24``."""

    case_id: str
    path: Path
    classes: list[str]
    values: list[int]  # vocabulary class numbers (channel + 1)
    planes: np.ndarray  # int32 [P, *input shape]
    multilabel: np.ndarray | None  # uint8/uint16 [*input shape]
    affine: np.ndarray

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def mask(self, name: str) -> np.ndarray:
        i = self.classes.index(name)
        return ((self.planes[i // _BITS] >> (i % _BITS)) & 1).astype(np.uint8)

    def volumes(self) -> list[dict[str, Any]]:
        rows = []
        for name, value in zip(self.classes, self.values):
            n = int(self.mask(name).sum())
            rows.append({"case": self.case_id, "class": name, "value": value, "voxels": n,
                         "volume_ml": round(n * self.voxel_ml, 4)})
        return rows


class Predictor:
    """A loaded model + everything that decides how it segments a volume (classes, task, threshold, ...)."""

    def __init__(self, model: torch.nn.Module, info: Mapping[str, Any], *, classes: Sequence[str] | None = None,
                 task: str | None = None, threshold: float | None = None, overlap: float | None = None,
                 keep_largest: bool | None = None, device: str = "auto", precision: str = "auto",
                 progress: bool = False, sw_batch_size: int = 2):
        self.info = info
        self.vocab = get_vocabulary(info.get("vocabulary"))
        if self.vocab.spatial_dims != 3:
            raise ConfigError(f"this model speaks the {self.vocab.spatial_dims}D vocabulary {self.vocab.name!r}; "
                              "fedtextseg predict segments 3D NIfTI volumes with 3D models")
        self.model_classes = list(info["class_names"])
        self.classes = resolve_classes(info, classes)
        self.channels = [self.model_classes.index(c) for c in self.classes]
        self.values = [self.vocab.class_names.index(c) + 1 for c in self.classes]
        trained = set(info.get("annotated_by") or {})
        self.untrained = [c for c in self.classes if trained and c not in trained]
        task_names = list(info.get("task_names") or [])
        task = task or self.vocab.default_task or (task_names[0] if task_names else None)
        if task is None:
            raise ConfigError("the model file names no task and its vocabulary has no default task; pass --task")
        self.task = self.vocab.task(task).name
        if self.task not in task_names:
            raise ConfigError(f"task {self.task!r} is not in this model's text bank ({', '.join(task_names)})")
        self.task_index = task_names.index(self.task)
        ev = dict(info.get("eval") or {})
        self.threshold = float(ev.get("threshold", 0.5) if threshold is None else threshold)
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be between 0 and 1 (exclusive), got {self.threshold}")
        self.overlap = float(ev.get("overlap", 0.5) if overlap is None else overlap)
        keep = bool(ev.get("keep_largest", True) if keep_largest is None else keep_largest)
        # largest connected component for organs only: tumors are often multifocal
        self.keep_largest = [i for i, c in enumerate(self.classes) if keep and self.vocab.resolve(c).parent is None]
        self.pre = self._preprocess_config(model, info)
        self.site = inference_site(self.vocab, self.task)
        self.transform = preprocess_transform(self.site, self.pre, with_label=False)
        self.device = engine.resolve_device(device)
        self.precision, self.progress, self.sw_batch_size = precision, progress, int(sw_batch_size)
        self.model = engine.prepare_model(model, self.device).eval()

    @classmethod
    def from_file(cls, path: str | Path, **options: Any) -> "Predictor":
        from fedtextseg.model_card import check_model_file
        from fedtextseg.model_file import load_model_file

        model, info = load_model_file(check_model_file(path))
        return cls(model, info, **options)

    @staticmethod
    def _preprocess_config(model: torch.nn.Module, info: Mapping[str, Any]) -> PreprocessConfig:
        """The training pipeline's settings (with the feature cache's in-plane tile padding when training used it)."""
        from fedtextseg.runtime import preprocess_config

        cfg_model = dict((info.get("config") or {}).get("model") or {})
        node = OmegaConf.create({"data": {"preprocess": dict(info.get("preprocess") or {})},
                                 "model": {"dino_cache": bool(cfg_model.get("dino_cache", False))}})
        pre = preprocess_config(node, model)
        if hasattr(model, "check_patch_size"):
            model.check_patch_size(pre.patch_size)
        return pre

    # ------------------------------------------------------------------ on the model's grid
    def preprocess(self, path: str | Path) -> dict:
        """The training pipeline's deterministic part for one image (SiteError for unreadable or 2D files)."""
        return self.transform({"image": str(path)})

    def predict_preprocessed(self, image: torch.Tensor, task_index: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image [1, *spatial]`` (preprocessed) -> (probabilities, masks) ``[K, *spatial]`` for the classes."""
        x = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        logits = engine.predict_logits(
            self.model, x, self.task_index if task_index is None else int(task_index),
            roi_size=tuple(self.pre.patch_size), overlap=self.overlap, sw_batch_size=self.sw_batch_size,
            device=self.device, precision=self.precision, progress=self.progress)
        probs = torch.sigmoid(torch.as_tensor(logits)[self.channels].float())
        return probs, engine.postprocess(probs, self.threshold, self.keep_largest)

    def _multilabel(self, probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One label map: among positive classes the most probable, deeper classes (tumors) over their parents."""
        out = torch.zeros(masks.shape[1:], dtype=torch.int32)
        depth = [0 if self.vocab.resolve(c).parent is None else 1 for c in self.classes]
        for level in sorted(set(depth)):
            idx = [i for i, d in enumerate(depth) if d == level]
            p = torch.where(masks[idx].bool(), probs[idx], torch.full_like(probs[idx], -1.0))
            best, arg = p.max(0)
            values = torch.as_tensor([self.values[i] for i in idx], dtype=torch.int32)[arg]
            out = torch.where(best >= 0, values, out)
        return out

    # ------------------------------------------------------------------ on the input's grid
    def predict_file(self, path: str | Path, case_id: str | None = None, multilabel: bool = False) -> CasePrediction:
        """Segment one NIfTI volume; masks come back on its own voxel grid (shape and affine)."""
        path = Path(path)
        item = self.preprocess(path)
        image = item["image"]
        probs, masks = self.predict_preprocessed(image)
        planes = []
        for start in range(0, len(self.classes), _BITS):
            chunk = masks[start:start + _BITS].to(torch.int32)
            weights = (torch.ones((), dtype=torch.int32) << torch.arange(chunk.shape[0], dtype=torch.int32))
            planes.append((chunk * weights.view(-1, *[1] * (chunk.dim() - 1))).sum(0).float())
        if multilabel:
            planes.append(self._multilabel(probs, masks).float())
        stack = torch.stack(planes) if planes else torch.zeros((1, *masks.shape[1:]))
        inverted = invert_to_input(stack, image, self.site, self.pre, nearest=True)
        data = np.rint(inverted.detach().cpu().numpy()).astype(np.int32)
        affine, header = read_header(path)
        shape = tuple(header["shape"])
        if data.shape[1:] != shape or not np.allclose(np.asarray(inverted.affine), affine, atol=1e-4):
            raise FedTextSegError(f"{path}: internal error: the prediction did not map back onto the input grid "
                                  f"(shape {data.shape[1:]} vs {shape})")
        ml = None
        if multilabel:
            ml = data[-1].astype(np.uint8 if max(self.values, default=0) < 256 else np.uint16)
            data = data[:-1]
        return CasePrediction(case_id or _case_id(path), path, list(self.classes), list(self.values), data, ml,
                              affine)


# ---------------------------------------------------------------------- files
def _case_id(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def collect_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], dict[str, str]]:
    """NIfTI files from files and folders (sorted); problems (missing paths, empty folders) by path."""
    files: list[Path] = []
    problems: dict[str, str] = {}
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.name.lower().endswith(NIFTI_SUFFIXES))
            if not found:
                problems[str(p)] = "folder holds no NIfTI files (.nii/.nii.gz)"
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            problems[str(p)] = "no such file or folder"
    return files, problems


def _save_like(array: np.ndarray, reference: Path, path: Path) -> Path:
    """Write ``array`` with the reference image's qform/sform (codes included) and units: the same grid."""
    ref = nib.load(str(reference))
    cls = type(ref) if isinstance(ref, (nib.Nifti1Image, nib.Nifti2Image)) else nib.Nifti1Image
    img = cls(np.ascontiguousarray(array), None)
    hdr = ref.header
    img.set_qform(hdr.get_qform(), code=int(hdr["qform_code"]))
    img.set_sform(hdr.get_sform(), code=int(hdr["sform_code"]))
    if int(hdr["qform_code"]) == 0 and int(hdr["sform_code"]) == 0:
        img.set_sform(ref.affine, code=1)
    img.header.set_xyzt_units(*hdr.get_xyzt_units())
    img.header.set_data_dtype(array.dtype)
    tmp = path.with_name(".tmp-" + path.name)
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path


def _file_stem(name: str) -> str:
    return name.replace(" ", "_").replace("/", "-")


def write_prediction(pred: CasePrediction, out_dir: str | Path, *, per_class: bool = True) -> list[Path]:
    """``<case>_<class>.nii.gz`` per class and ``<case>_multilabel.nii.gz`` when the prediction holds one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if per_class:
        for name in pred.classes:
            written.append(_save_like(pred.mask(name), pred.path, out / f"{pred.case_id}_{_file_stem(name)}.nii.gz"))
    if pred.multilabel is not None:
        written.append(_save_like(pred.multilabel, pred.path, out / f"{pred.case_id}_multilabel.nii.gz"))
    return written


def write_legend(predictor: Predictor, out_dir: str | Path) -> list[Path]:
    """``multilabel_legend.json`` and ``.csv``: value -> class (canonical and display name)."""
    out = Path(out_dir)
    rows = [{"value": v, "class": c, "display": predictor.vocab.resolve(c).display}
            for c, v in zip(predictor.classes, predictor.values)]
    (out / "multilabel_legend.json").write_text(json.dumps(
        {"vocabulary": predictor.vocab.name, "background": 0, "labels": rows}, indent=2) + "\n")
    with open(out / "multilabel_legend.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["value", "class", "display"])
        writer.writeheader()
        writer.writerows(rows)
    return [out / "multilabel_legend.json", out / "multilabel_legend.csv"]


@dataclass
class BatchResult:
    """What a batch did: written files, its CSV's rows (volumes for 3D, predictions for 2D), failures by input."""

    written: list[Path] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    cases: list[str] = field(default_factory=list)
    err_fn: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr), repr=False)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def fail(self, path: Any, msg: str) -> None:
        self.failed[str(path)] = msg
        self.err_fn(f"fedtextseg predict: error: {msg}")

    def fail_with(self, path: Path, exc: Exception) -> None:
        """This input's failure, its message naming the file (the error's own where it already does)."""
        if isinstance(exc, FedTextSegError):
            self.fail(path, str(exc) if str(path) in str(exc) else f"{path}: {exc}")
        else:
            self.fail(path, f"{path}: cannot segment ({type(exc).__name__}: {(str(exc) or '?').splitlines()[0]})")

    def write_rows(self, path: Path, fieldnames: Sequence[str]) -> None:
        """The batch's CSV (nothing when no input was segmented)."""
        if self.rows:
            with open(path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(fieldnames))
                writer.writeheader()
                writer.writerows(self.rows)
            self.written.append(path)


def unique_cases(files: Sequence[Path], problems: Mapping[str, str], case_id: Callable[[Path], str],
                 fail: Callable[[Any, str], None]) -> Iterable[tuple[int, Path, str]]:
    """``(n, path, case)`` for every input whose case name is new; ``fail`` for the problems and the repeats."""
    for path, why in problems.items():
        fail(path, f"{path}: {why}")
    seen: dict[str, Path] = {}
    for n, path in enumerate(files, 1):
        case = case_id(path)
        if case in seen:
            fail(path, f"{path}: same case name {case!r} as {seen[case]}; rename one")
            continue
        seen[case] = path
        yield n, path, case


def predict_batch(predictor: Predictor, inputs: Iterable[str | Path], out_dir: str | Path, *, per_class: bool = True,
                  multilabel: bool = False, log_fn: Callable[[str], None] = print,
                  err_fn: Callable[[str], None] | None = None) -> BatchResult:
    """Segment every input file (a failure is reported and skipped); writes masks and ``volumes.csv``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, problems = collect_inputs(inputs)
    result = BatchResult(err_fn=err_fn) if err_fn else BatchResult()
    for n, path, case in unique_cases(files, problems, _case_id, result.fail):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            result.fail(path, f"{path}: a 2D image, but this model ({predictor.info.get('model_name')}) segments 3D NIfTI "
                       "volumes (.nii/.nii.gz)")
            continue
        log_fn(f"[{n}/{len(files)}] {path.name}: {', '.join(predictor.classes)}")
        try:
            pred = predictor.predict_file(path, case, multilabel=multilabel)
            result.written += write_prediction(pred, out, per_class=per_class)
            result.rows += pred.volumes()
            result.cases.append(case)
        except (FedTextSegError, RuntimeError, ValueError, OSError, MemoryError) as exc:  # this input only
            result.fail_with(path, exc)
    if multilabel and result.cases:
        result.written += write_legend(predictor, out)
    result.write_rows(out / "volumes.csv", ["case", "class", "value", "voxels", "volume_ml"])
    return result
