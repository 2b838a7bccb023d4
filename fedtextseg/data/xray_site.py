"""The 2D report-guided site format (``format: png-csv``, chest X-rays): a CSV of image, mask and report per row.

A 2D site is a folder with a ``site.yaml``::

    name: hospital-a
    format: png-csv
    vocabulary: chest-xray
    task: qata-cov19
    label_map: {255: lung infection}     # mask value -> vocabulary class ({1: ...} works the same for 0/1 masks)
    csv: train.csv                       # columns image,mask,caption (+ anything else, e.g. infected_areas)
    root: .                              # optional: folder the CSV's paths are relative to (default: the site)

``csv`` and ``root`` may be absolute, so a site can point at a read-only collection (the shared QaTa-COV19 copy)
from a folder that holds nothing but its ``site.yaml``. An empty ``mask`` cell marks an unlabeled image.

:func:`read_xray_cases` (the format's reader, called by :func:`fedtextseg.data.site.load_site`) fails on what makes
a site unusable (no CSV, missing columns, image files that do not exist); :func:`check_xray_site` opens every file
and lists every problem at once. The MONAI pipelines over these sites: :mod:`fedtextseg.data.xray`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedtextseg.data.site import (SITE_FILE, Case, Site, SiteLayout, SiteReader, _load_yaml, _resolve_label_map,
                                  case_id_of, load_site, register_reader)
from fedtextseg.errors import SiteError
from fedtextseg.vocab import get_vocabulary

__all__ = ["REQUIRED_COLUMNS", "INFO", "read_xray_cases", "check_xray_site", "load_png", "mask_to_channels",
           "XrayReader"]

REQUIRED_COLUMNS = ("image", "mask", "caption")
INFO = "info: "  # prefix of check findings that are not errors
_NO_CAPTION = ("nan", "none", "null")  # what spreadsheets write into an empty cell


# ---------------------------------------------------------------------------- reading
def _site_paths(root: Path, spec: Mapping) -> tuple[Path, Path]:
    """(csv file, folder the CSV's paths are relative to)."""
    csv_path = Path(str(spec.get("csv", "train.csv"))).expanduser()
    csv_path = csv_path if csv_path.is_absolute() else root / csv_path
    base = Path(str(spec.get("root", "."))).expanduser()
    base = base if base.is_absolute() else root / base
    return csv_path, base


def _read_rows(root: Path, spec: Mapping) -> tuple[Path, Path, list[dict[str, str]]]:
    csv_path, base = _site_paths(root, spec)
    if not csv_path.is_file():
        raise SiteError(csv_path, "CSV file does not exist (set `csv:` in site.yaml)")
    if not base.is_dir():
        raise SiteError(base, "image root folder does not exist (set `root:` in site.yaml)")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise SiteError(csv_path, f"missing column(s) {', '.join(missing)} (found: {', '.join(header)})")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SiteError(csv_path, f"cannot read CSV: {exc}") from None
    if not rows:
        raise SiteError(csv_path, "CSV has a header but no rows")
    return csv_path, base, rows


def _resolve(base: Path, rel: str) -> Path:
    p = Path(rel).expanduser()
    return p if p.is_absolute() else base / p


def read_xray_cases(root: str | Path, spec: Mapping) -> list[Case]:
    """Cases of a ``png-csv`` site; raises :class:`SiteError` if the CSV or a listed image/mask file is missing."""
    root = Path(root)
    csv_path, base, rows = _read_rows(root, spec)
    cases, missing, seen = [], [], set()
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        if not row.get("image"):
            raise SiteError(csv_path, f"line {i}: empty image path")
        image = _resolve(base, row["image"])
        label = _resolve(base, row["mask"]) if row.get("mask") else None
        for p in (image, label):
            if p is not None and not p.is_file():
                missing.append(str(p))
        cid = case_id_of(image)
        if cid in seen:
            raise SiteError(csv_path, f"line {i}: image {row['image']!r} is listed twice")
        seen.add(cid)
        caption = row.get("caption") or None
        caption = None if caption is None or caption.lower() in _NO_CAPTION else caption
        cases.append(Case(case_id=cid, image=image, label=label, caption=caption))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SiteError(missing[0], f"file listed in {csv_path.name} does not exist{more}")
    return cases


# ---------------------------------------------------------------------------- pixels
def load_png(path: str | Path, *, mask: bool = False) -> np.ndarray:
    """A PNG/JPEG as a 2D array: grey float32 in [0, 1] for images, integer values for masks.

    RGB(A) and palette files are converted to grey (X-rays are often saved as RGB); 16-bit images are scaled by
    65535. Raises :class:`SiteError` for missing, unreadable or corrupt files.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                scale = 65535.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 255.0
            else:
                arr = np.asarray(im.convert("L"), dtype=np.float64)
                scale = 255.0
    except FileNotFoundError:
        raise SiteError(path, "file does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SiteError(path, f"unreadable or corrupt image: {exc}") from None
    if arr.ndim != 2 or arr.size == 0:
        raise SiteError(path, f"expected a 2D image, got shape {arr.shape}")
    if mask:
        return arr.astype(np.int64)
    return (arr / scale).astype(np.float32)


def _value_map(label_map: Mapping[int, str]) -> dict[int, str]:
    """Mask value -> class; a single-class map accepts both 1 and 255 (0/1 and 0/255 binary PNGs)."""
    out = {int(k): v for k, v in label_map.items()}
    if len(out) == 1:
        (value, name), = out.items()
        if value in (1, 255):
            out = {1: name, 255: name}
    return out


def mask_to_channels(mask: np.ndarray, label_map: Mapping[int, str], vocab, *, path: Any = "<mask>") -> np.ndarray:
    """A 2D label mask -> float32 ``[C, H, W]`` over the vocabulary's classes.

    A value mapped to a composite (``lung``) is split by body side: on a frontal chest X-ray the patient's right
    is the image's left half (radiological convention). A class's pixels also count toward its parent's channels.
    """
    values = _value_map(label_map)
    present = np.unique(mask)
    unknown = [int(v) for v in present if v != 0 and int(v) not in values]
    if unknown:
        raise SiteError(path, f"mask values {unknown[:8]} are not in the label map {sorted(label_map)}")
    h, w = mask.shape
    out = np.zeros((vocab.num_classes, h, w), dtype=np.float32)
    image_left = np.zeros((h, w), dtype=bool)
    image_left[:, : w // 2] = True
    for value, name in values.items():
        sel = mask == value
        if not sel.any():
            continue
        for member in vocab.expand(name):
            region = sel
            side = vocab.side_of(member)
            if len(vocab.expand(name)) > 1 and side is not None:
                region = sel & (image_left if side == "right" else ~image_left)
            out[vocab.index(member)][region] = 1.0
            for parent in vocab.parent_channels(member):
                out[vocab.index(parent)][region] = 1.0
    return out


# ---------------------------------------------------------------------------- validation
def _as_site(site: Site | str | Path) -> tuple[Site | None, list[tuple[str, str]]]:
    if isinstance(site, Site):
        return site, []
    try:
        return load_site(site), []
    except SiteError as exc:
        return None, [(exc.path, exc.problem)]


def _lenient_rows(site_root: Path, spec: Mapping) -> tuple[list[tuple[str, str]], list[tuple[int, dict]], Path]:
    try:
        csv_path, base, rows = _read_rows(site_root, spec)
    except SiteError as exc:
        return [(exc.path, exc.problem)], [], site_root
    return [], list(enumerate(rows, start=2)), base


def check_xray_site(site: Site | str | Path, *, max_cases: int | None = None) -> list[tuple[str, str]]:
    """Every problem of a 2D site as ``(path, problem)``; an empty list means the site is usable.

    Opens every listed image and mask (or the first ``max_cases``). Findings that are not errors (all-empty masks)
    start with ``"info: "``. A site folder whose loading fails is still checked row by row where possible.
    """
    loaded, issues = _as_site(site)
    if loaded is not None:
        root, spec, label_map, vocab = loaded.root, loaded.meta, loaded.label_map, loaded.vocabulary
    else:
        root = Path(site)
        try:
            spec = _load_yaml(root / SITE_FILE)
            vocab = get_vocabulary(spec.get("vocabulary"))
            label_map, _ = _resolve_label_map(spec.get("label_map") or {}, vocab, root / SITE_FILE)
        except SiteError as exc:
            return issues if (exc.path, exc.problem) in issues else issues + [(exc.path, exc.problem)]
        except Exception:  # unknown vocabulary: load_site already reported it
            return issues
    load_issues, issues = issues, []
    row_issues, rows, base = _lenient_rows(root, spec)
    issues.extend(row_issues)
    csv_path = _site_paths(root, spec)[0]
    values = _value_map(label_map)
    seen: dict[str, int] = {}
    for n, (line, row) in enumerate(rows):
        if max_cases is not None and n >= max_cases:
            break
        caption = row.get("caption", "")
        if not caption or caption.lower() in _NO_CAPTION:
            issues.append((f"{csv_path}:{line}", "missing or empty caption"))
        if not row.get("image"):
            issues.append((f"{csv_path}:{line}", "empty image path"))
            continue
        image_path = _resolve(base, row["image"])
        cid = case_id_of(image_path)
        if cid in seen:
            issues.append((f"{csv_path}:{line}", f"image {row['image']!r} already listed on line {seen[cid]}"))
        seen[cid] = line
        image = mask = None
        try:
            image = load_png(image_path)
        except SiteError as exc:
            issues.append((exc.path, exc.problem))
        if not row.get("mask"):
            continue  # unlabeled image
        mask_path = _resolve(base, row["mask"])
        try:
            mask = load_png(mask_path, mask=True)
        except SiteError as exc:
            issues.append((exc.path, exc.problem))
            continue
        if image is not None and image.shape != mask.shape:
            issues.append((str(mask_path), f"mask size {mask.shape[::-1]} differs from image size {image.shape[::-1]}"))
        present = [int(v) for v in np.unique(mask)]
        bad = [v for v in present if v != 0 and v not in values]
        if bad:
            kind = "non-binary mask" if len(present) > 2 else "mask"
            issues.append((str(mask_path), f"{kind}: values {bad[:8]} are not in the label map {sorted(label_map)}"))
        elif present == [0]:
            issues.append((str(mask_path), INFO + "mask is empty (no labeled pixel)"))
    found = {str(p) for p, _ in issues}
    return [i for i in load_issues if str(i[0]) not in found] + issues  # load errors not re-found file by file


class XrayReader(SiteReader):
    """``format: png-csv`` (also ``png``, ``xray``): the cases the site's CSV lists."""

    name = "png-csv"
    aliases = ("png", "xray")

    def read_cases(self, layout: SiteLayout) -> list[Case]:
        return read_xray_cases(layout.root, layout.spec)


register_reader(XrayReader())
