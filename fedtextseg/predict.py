"""``fedtextseg predict``: a trained model file + NIfTI CT volumes + class names -> masks on the input's own grid.

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

import argparse
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
           "write_prediction", "write_legend", "unique_cases", "predict_batch", "predict_main"]

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


def predict_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedtextseg predict", description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", required=True, help="trained model file (results/<run>/model.pt)")
    p.add_argument("-i", "--input", nargs="+",
                   help="NIfTI volume(s) and/or folder(s) of them (2D models: PNG/JPEG images or folders)")
    p.add_argument("-o", "--out", help="output folder")
    p.add_argument("--classes", nargs="+", default=None,
                   help="class names, synonyms or groups (default: every class the federation was trained on)")
    p.add_argument("--task", default=None, help="task prompt (dataset) to condition on (default: the vocabulary's)")
    p.add_argument("--threshold", type=float, default=None, help="probability threshold (default: the model's)")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the model's)")
    p.add_argument("--keep-largest", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the largest connected component of each organ (default: as in training)")
    p.add_argument("--multilabel", action="store_true", help="also write one multi-label map per case + legend")
    p.add_argument("--no-per-class", action="store_true", help="no per-class files (with --multilabel)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="sliding-window progress bar (default: when stderr is a terminal)")
    p.add_argument("--report", default=None,
                   help="2D models: the report conditioning every input image (\"\": none, the task prompt)")
    p.add_argument("--reports", default=None,
                   help="2D models: CSV with columns image,caption giving each input image its own report")
    p.add_argument("--probabilities", action="store_true", help="2D models: also write probability PNGs")
    p.add_argument("--list-classes", action="store_true", help="print the model's classes and exit")
    args = p.parse_args(argv)
    if not args.list_classes and not (args.input and args.out):
        p.error("the following arguments are required: -i/--input, -o/--out")
    if args.no_per_class and not args.multilabel:
        p.error("--no-per-class writes nothing without --multilabel")
    from fedtextseg.model_card import check_model_file
    from fedtextseg.model_file import load_model_file

    model, info = load_model_file(check_model_file(args.model))
    if args.list_classes:
        trained = info.get("annotated_by") or {}
        print("\n".join(c + (f"  (annotated by {', '.join(trained[c])})" if c in trained else "")
                        for c in info["class_names"]))
        return 0
    if get_vocabulary(info.get("vocabulary")).spatial_dims == 2:
        return _predict_xray_main(p, args, model, info)
    if args.report is not None or args.reports or args.probabilities:
        p.error(f"--report, --reports and --probabilities are for 2D report-guided models; {info['model_name']} "
                "segments 3D volumes")
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    predictor = Predictor(model, info, classes=args.classes, task=args.task, threshold=args.threshold,
                          overlap=args.overlap, keep_largest=args.keep_largest, device=args.device, progress=progress)
    if predictor.untrained:
        print(f"fedtextseg predict: warning: no training site annotated {', '.join(predictor.untrained)}; "
              "those masks come from the text prompt alone", file=sys.stderr)
    print(f"model {info['model_name']} on {predictor.device}, task {predictor.task}, threshold {predictor.threshold}, "
          f"{len(predictor.classes)} classes", file=sys.stderr)
    result = predict_batch(predictor, args.input, args.out, per_class=not args.no_per_class,
                           multilabel=args.multilabel, log_fn=lambda m: print(m, file=sys.stderr))
    total = len(result.cases) + len(result.failed)
    print(f"fedtextseg predict: {len(result.cases)} of {total} inputs segmented -> {args.out}"
          + (f"; {len(result.failed)} failed" if result.failed else ""), file=sys.stderr)
    return result.exit_code


def _predict_xray_main(p: argparse.ArgumentParser, args: argparse.Namespace, model, info) -> int:
    """The 2D half of ``predict_main``: a TGC-Net model file, X-ray images and their reports."""
    from fedtextseg.predict_xray import XrayPredictor, predict_xray_batch, read_reports

    if args.report is not None and args.reports:
        p.error("give one report for every image (--report) or a CSV of reports (--reports), not both")
    if args.multilabel or args.no_per_class:
        p.error("--multilabel/--no-per-class are for 3D models; a 2D model writes one mask PNG per class")
    reports = read_reports(args.reports) if args.reports else None
    predictor = XrayPredictor(model, info, classes=args.classes, task=args.task, threshold=args.threshold,
                              keep_largest=args.keep_largest, device=args.device)
    if args.report is None and reports is None and predictor.with_text:
        print("fedtextseg predict: warning: no --report or --reports given: every image is conditioned on the task "
              f"prompt of {predictor.task!r}, not on its report", file=sys.stderr)
    print(f"model {info['model_name']} on {predictor.device}, task {predictor.task}, threshold {predictor.threshold}, "
          f"input {predictor.size}x{predictor.size}, {len(predictor.classes)} classes", file=sys.stderr)
    result = predict_xray_batch(predictor, args.input, args.out, report=args.report, reports=reports,
                                reports_name=str(args.reports), probabilities=args.probabilities,
                                log_fn=lambda m: print(m, file=sys.stderr))
    total = len(result.cases) + len(result.failed)
    print(f"fedtextseg predict: {len(result.cases)} of {total} images segmented -> {args.out}"
          + (f"; {len(result.failed)} failed" if result.failed else ""), file=sys.stderr)
    return result.exit_code
