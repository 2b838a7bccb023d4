"""``fedtextseg predict`` for 2D report-guided models (TGC-Net): chest X-ray PNG/JPEG + its report -> mask PNGs.

    fedtextseg predict -m results/run/model.pt -i cxr.png --report "bilateral pulmonary infection ..." -o out/
    fedtextseg predict -m model.pt -i images/ --reports reports.csv -o out/ --probabilities

``--reports`` is a CSV in the site format's own columns (``image``, ``caption``; ``mask`` and others are ignored):
each input image takes the caption of the row whose ``image`` is that file (relative to the CSV's folder) or has
its file name. An empty report (``--report ""`` or an empty caption) is defined behaviour, the same as in training:
the model is conditioned on the task prompt instead (column ``text`` of ``predictions.csv`` says which text each
image used). An image without a row in the CSV is an error for that image, never silently unconditioned.

Each image is preprocessed as in training (grey in [0, 1], resized to the model's input size with anti-aliasing),
segmented in one window (GPU + bf16 when present), and its per-class probabilities are resized back to the input's
own size before thresholding. Outputs per image: ``<case>_<class>.png`` (uint8 0/255, the input's size),
``<case>_<class>_prob.png`` (probability x 255, with ``--probabilities``) and ``<case>_overlay.png`` (the X-ray with
each class tinted, for reports); ``predictions.csv`` (case, class, pixels, fraction, text, note) for the batch.
Colour images are converted to grey and 16-bit images scaled by 65535, each with a note.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fedtextseg import engine
from fedtextseg.data.site import NIFTI_SUFFIXES
from fedtextseg.data.xray import load_png
from fedtextseg.errors import ConfigError, FedTextSegError
from fedtextseg.predict import BatchResult, _file_stem, resolve_classes, unique_cases  # shared with 3D
from fedtextseg.vocab import get_vocabulary

__all__ = ["IMAGE_SUFFIXES", "XrayPredictor", "XrayPrediction", "read_reports", "collect_images",
           "write_xray_prediction", "predict_xray_batch"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_TINTS = [(255, 40, 40), (40, 200, 255), (255, 210, 0), (80, 255, 80), (255, 80, 255)]  # overlay colour per class


def _colour_note(path: Path) -> str:
    """What the conversion to one grey [0, 1] channel did to this file ('' when it was already 8-bit grey)."""
    try:
        with Image.open(path) as im:
            mode = im.mode
    except Exception:  # noqa: BLE001 - load_png reports unreadable files with the file name
        return ""
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        return f"16-bit image (mode {mode}) scaled to [0, 1]"
    if mode not in ("L", "1"):
        return f"colour image (mode {mode}) converted to grey"
    return ""


@dataclass
class XrayPrediction:
    """One image's result at its own size: probabilities and masks ``[K, H, W]`` for ``classes``."""

    case_id: str
    path: Path
    classes: list[str]
    image: np.ndarray  # float32 [H, W] in [0, 1]
    probabilities: np.ndarray  # float32 [K, H, W]
    masks: np.ndarray  # uint8 0/1 [K, H, W]
    text: str  # "report", "task prompt (no report)" or "none (image-only model)"
    note: str = ""

    ROW_FIELDS = ("case", "image", "class", "pixels", "fraction", "text", "note")

    def rows(self) -> list[dict[str, Any]]:
        total = self.masks[0].size
        return [{"case": self.case_id, "image": str(self.path), "class": c, "pixels": int(m.sum()),
                 "fraction": round(float(m.sum()) / total, 6), "text": self.text, "note": self.note}
                for c, m in zip(self.classes, self.masks)]


class XrayPredictor:
    """A loaded 2D model + how it segments an image (classes, task, threshold, input size, device)."""

    def __init__(self, model: torch.nn.Module, info: Mapping[str, Any], *, classes: Sequence[str] | None = None,
                 task: str | None = None, threshold: float | None = None, keep_largest: bool | None = None,
                 device: str = "auto", precision: str = "auto"):
        self.info, self.vocab = info, get_vocabulary(info.get("vocabulary"))
        if self.vocab.spatial_dims != 2:
            raise ConfigError(f"this model speaks the {self.vocab.spatial_dims}D vocabulary {self.vocab.name!r}; "
                              "2D prediction needs a 2D report-guided model (TGC-Net)")
        self.model_classes = list(info["class_names"])
        self.classes = resolve_classes(info, classes)
        self.channels = [self.model_classes.index(c) for c in self.classes]
        task_names = list(info.get("task_names") or []) or self.vocab.task_names()
        task = task or self.vocab.default_task or task_names[0]
        self.task = self.vocab.task(task).name
        self.task_index = self.vocab.task_index(self.task)
        ev = dict(info.get("eval") or {})
        self.threshold = float(ev.get("threshold", 0.5) if threshold is None else threshold)
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be between 0 and 1 (exclusive), got {self.threshold}")
        keep = bool(ev.get("keep_largest", False) if keep_largest is None else keep_largest)
        self.keep_largest = [i for i, c in enumerate(self.classes) if keep and self.vocab.resolve(c).parent is None]
        pre = dict(info.get("preprocess") or {})
        self.size = int(pre.get("image_size") or getattr(getattr(model, "config", None), "image_size", 0) or 0)
        if self.size < 16:
            raise ConfigError("the model file names no input size (data.preprocess.image_size or the model's "
                              "config.image_size)")
        self.with_text = bool(getattr(model, "with_text", True))
        self.device, self.precision = engine.resolve_device(device), precision
        self.model = engine.prepare_model(model, self.device).eval()

    @classmethod
    def from_file(cls, path: str | Path, **options: Any) -> "XrayPredictor":
        from fedtextseg.model_card import check_model_file
        from fedtextseg.model_file import load_model_file

        model, info = load_model_file(check_model_file(path))
        return cls(model, info, **options)

    def text_used(self, report: str | None) -> str:
        if not self.with_text:
            return "none (image-only model)"
        return "report" if report and report.strip() else "task prompt (no report)"

    def predict_array(self, image: np.ndarray, report: str | None) -> tuple[np.ndarray, np.ndarray]:
        """``image [H, W]`` in [0, 1] -> (probabilities, masks) ``[K, H, W]`` at the input's size."""
        from monai.transforms import Resize

        h, w = image.shape
        x = Resize((self.size, self.size), mode="bilinear", anti_aliasing=True)(torch.from_numpy(image)[None])
        x = torch.as_tensor(x, dtype=torch.float32)
        logits = engine.predict_logits(self.model, x, self.task_index, roi_size=(self.size, self.size), overlap=0.0,
                                       sw_batch_size=1, device=self.device, precision=self.precision,
                                       extra={"caption": report or ""})
        probs = torch.sigmoid(logits[self.channels].float())[None]
        probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)[0].clamp_(0, 1)
        masks = engine.postprocess(probs, self.threshold, self.keep_largest)
        return probs.numpy().astype(np.float32), masks.numpy().astype(np.uint8)

    def predict_file(self, path: str | Path, report: str | None, case_id: str | None = None) -> XrayPrediction:
        path = Path(path)
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            raise FedTextSegError(f"{path}: a NIfTI volume, but this model ({self.info.get('model_name')}) segments "
                                  "2D chest X-ray images (PNG/JPEG)")
        image = load_png(path)  # SiteError naming the file when unreadable
        probs, masks = self.predict_array(image, report)
        return XrayPrediction(case_id or _case_id(path), path, list(self.classes), image, probs, masks,
                              self.text_used(report), _colour_note(path))


def _case_id(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix.lower() in IMAGE_SUFFIXES else path.name


def read_reports(csv_path: str | Path) -> dict[str, str]:
    """``{resolved image path: caption, file name: caption}`` from a site-format CSV (columns image, caption)."""
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise ConfigError(f"{csv_path}: reports CSV does not exist")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            missing = [c for c in ("image", "caption") if c not in header]
            if missing:
                raise ConfigError(f"{csv_path}: missing column(s) {', '.join(missing)} (found: "
                                  f"{', '.join(header) or 'none'}); the site format's columns are image,mask,caption")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{csv_path}: cannot read reports CSV: {exc}") from None
    reports: dict[str, str] = {}
    names: dict[str, list[str]] = {}
    for row in rows:
        rel = (row.get("image") or "").strip()
        if not rel:
            continue
        caption = row.get("caption") or ""
        reports[str((csv_path.parent / rel).resolve())] = caption
        names.setdefault(Path(rel).name, []).append(caption)
    for name, captions in names.items():  # a bare file name only where it is unambiguous
        if len(captions) == 1:
            reports.setdefault(name, captions[0])
    return reports


def collect_images(inputs: Iterable[str | Path]) -> tuple[list[Path], dict[str, str]]:
    """Image files from files and folders (sorted); problems (missing paths, empty folders) by path."""
    files: list[Path] = []
    problems: dict[str, str] = {}
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems[str(p)] = "folder holds no PNG/JPEG images"
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            problems[str(p)] = "no such file or folder"
    return files, problems


def _write_png(array: np.ndarray, path: Path) -> Path:
    tmp = path.with_name(".tmp-" + path.name)
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)  # never a half-written PNG under the final name
    return path


def _overlay(pred: XrayPrediction, alpha: float = 0.45) -> np.ndarray:
    grey = (np.clip(pred.image, 0, 1) * 255).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for k, mask in enumerate(pred.masks):
        on = mask.astype(bool)
        rgb[on] = (1 - alpha) * rgb[on] + alpha * np.asarray(_TINTS[k % len(_TINTS)], np.float32)
    return np.rint(rgb).astype(np.uint8)


def write_xray_prediction(pred: XrayPrediction, out_dir: str | Path, *, probabilities: bool = False,
                          overlay: bool = True) -> list[Path]:
    """Mask PNGs (0/255) per class, probability PNGs on request, and the overlay; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, mask, prob in zip(pred.classes, pred.masks, pred.probabilities):
        stem = f"{pred.case_id}_{_file_stem(name)}"
        written.append(_write_png((mask * 255).astype(np.uint8), out / f"{stem}.png"))
        if probabilities:
            written.append(_write_png(np.rint(prob * 255).astype(np.uint8), out / f"{stem}_prob.png"))
    if overlay:
        written.append(_write_png(_overlay(pred), out / f"{pred.case_id}_overlay.png"))
    return written


def predict_xray_batch(predictor: XrayPredictor, inputs: Iterable[str | Path], out_dir: str | Path, *,
                       report: str | None = None, reports: Mapping[str, str] | None = None,
                       reports_name: str = "the reports CSV", probabilities: bool = False,
                       log_fn: Callable[[str], None] = print,
                       err_fn: Callable[[str], None] | None = None) -> BatchResult:
    """Segment every input image (a failure is reported and skipped); writes PNGs and ``predictions.csv``.

    ``report`` conditions every image on one text; ``reports`` (from :func:`read_reports`) gives each its own.
    With neither, every image is conditioned on the task prompt."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, problems = collect_images(inputs)
    result = BatchResult(err_fn=err_fn) if err_fn else BatchResult()
    for n, path, case in unique_cases(files, problems, _case_id, result.fail):
        text = report
        if reports is not None:
            text = reports.get(str(path.resolve()), reports.get(path.name))
            if text is None:
                result.fail(path, f"{path}: no row for this image in {reports_name} (column image); add one (an empty "
                           "caption segments it with the task prompt)")
                continue
        try:
            pred = predictor.predict_file(path, text, case)
        except (FedTextSegError, RuntimeError, ValueError, OSError, MemoryError) as exc:  # this input only
            result.fail_with(path, exc)
            continue
        log_fn(f"[{n}/{len(files)}] {path.name}: {', '.join(predictor.classes)} (text: {pred.text})"
               + (f"; note: {pred.note}" if pred.note else ""))
        result.written += write_xray_prediction(pred, out, probabilities=probabilities)
        result.rows += pred.rows()
        result.cases.append(case)
    result.write_rows(out / "predictions.csv", list(XrayPrediction.ROW_FIELDS))
    return result
