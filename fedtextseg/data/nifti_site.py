"""The NIfTI site format (``format: nifti``, the default): image and label volumes paired by case id.

Three layouts of it (see :mod:`fedtextseg.data.site` for the ``site.yaml`` keys):

* ``images/`` + ``labels/`` with one label map per case, paired by file name; nnU-Net's channel suffix
  (``case_001_0000.nii.gz`` image, ``case_001.nii.gz`` label) is understood;
* MSD / nnU-Net v2 raw datasets (``dataset.json`` + ``imagesTr/`` + ``labelsTr/``): the same pairing, the label
  map from ``dataset.json`` (chosen in :func:`fedtextseg.data.site.load_site`);
* TotalSegmentator output: ``labels/<case id>/<class>.nii.gz``, one binary mask per class; the masks' file names
  are the site's label map (:meth:`NiftiReader.label_names`).
"""

from __future__ import annotations

import re
from pathlib import Path

from fedtextseg.data.io import mask_files, mask_name
from fedtextseg.data.site import NIFTI_SUFFIXES, Case, SiteLayout, SiteReader, case_id_of, register_reader
from fedtextseg.errors import SiteError

__all__ = ["NiftiReader", "pair_nifti"]


_NNUNET_CHANNEL = re.compile(r"^(?P<base>.+)_(?P<channel>\d{4})$")


def _nnunet_base(case_id: str) -> str | None:
    match = _NNUNET_CHANNEL.match(case_id)
    return match.group("base") if match else None


def _looks_like_unlabeled_nnunet(ids: list[str]) -> bool:
    """Unlabeled folder in nnU-Net naming: every name ends in a 4-digit channel and each case has a ``_0000``.

    ``case_0000 .. case_0010`` (one "case" with 11 channels?) is read as 11 cases: at least two cases are required.
    """
    bases = [_nnunet_base(c) for c in ids]
    if not ids or any(b is None for b in bases):
        return False
    if all(c.endswith("_0000") for c in ids):
        return True
    groups = set(bases)
    return len(groups) > 1 and all(f"{b}_0000" in ids for b in groups)


def pair_nifti(images_dir: Path, labels_dir: Path | None, labels_required: bool = False) -> list[Case]:
    """Pair images with labels by case id.

    A label named like the image pairs with it (``case_0001.nii.gz`` both sides). nnU-Net names
    (image ``case_001_0000.nii.gz``, label ``case_001.nii.gz``) pair by the name without the channel suffix; in an
    unlabeled folder the suffix is dropped only when every image carries it (see ``_looks_like_unlabeled_nnunet``),
    so plain names that happen to end in 4 digits (``case_0001``) stay distinct cases.
    """
    if not images_dir.is_dir():
        raise SiteError(images_dir, "image folder does not exist")
    images = sorted(p for p in images_dir.iterdir() if p.name.lower().endswith(NIFTI_SUFFIXES) and p.is_file())
    if not images:
        raise SiteError(images_dir, "no NIfTI images (.nii/.nii.gz) found")
    labels: dict[str, Path] = {}
    if labels_dir is not None and labels_dir.is_dir():
        for p in labels_dir.iterdir():
            is_mask_folder = p.is_dir() and not p.name.startswith(".")  # TotalSegmentator: one folder per case
            if (p.name.lower().endswith(NIFTI_SUFFIXES) and p.is_file()) or is_mask_folder:
                case_id = p.name if is_mask_folder else case_id_of(p)
                if case_id in labels:
                    raise SiteError(p, f"two labels for case {case_id!r} ({labels[case_id].name})")
                labels[case_id] = p
        kinds = {p.is_dir() for p in labels.values()}
        if len(kinds) > 1:
            raise SiteError(labels_dir, "holds both label files and per-class mask folders; use one kind per site")
    elif labels_required and labels_dir is not None:
        raise SiteError(labels_dir, "label folder named in site.yaml does not exist")
    ids = [case_id_of(img) for img in images]
    strip_unlabeled = not labels and _looks_like_unlabeled_nnunet(ids)
    cases: list[Case] = []
    owner: dict[str, Path] = {}
    for img, cid in zip(images, ids):
        base = _nnunet_base(cid)
        if cid in labels:
            case_id = cid
        elif base is not None and (base in labels or strip_unlabeled):
            case_id = base
        else:
            case_id = cid
        if case_id in owner:
            raise SiteError(
                img,
                f"more than one image for case {case_id!r} (also {owner[case_id].name}); "
                "multi-channel input is not supported",
            )
        owner[case_id] = img
        cases.append(Case(case_id=case_id, image=img, label=labels.get(case_id)))
    orphans = sorted(set(labels) - set(owner))
    if orphans:
        raise SiteError(labels_dir, f"labels without an image: {', '.join(orphans[:5])}")
    return cases


def _mask_folder_names(cases: list[Case]) -> dict[int, str]:
    """Per-class mask folders (TotalSegmentator's ``<class>.nii.gz`` per case): {label value: mask name}, the
    values numbering the union of the cases' mask names in sorted order; {} when the labels are label files."""
    folders = [c.label for c in cases if c.label is not None and c.label.is_dir()]
    if not folders:
        return {}
    names = sorted({mask_name(m) for folder in folders for m in mask_files(folder)})
    if not names:
        raise SiteError(folders[0].parent, "the per-class mask folders hold no masks (<class>.nii.gz)")
    return {i + 1: name for i, name in enumerate(names)}


class NiftiReader(SiteReader):
    """``format: nifti``: image volumes paired with label volumes (or per-class mask folders) by case id."""

    name = "nifti"

    def _cases(self, layout: SiteLayout) -> list[Case]:
        if "cases" not in layout.scratch:
            layout.scratch["cases"] = pair_nifti(layout.images_dir, layout.labels_dir, layout.labels_required)
        return layout.scratch["cases"]

    def label_names(self, layout: SiteLayout) -> dict[int, str] | None:
        labels_dir = layout.labels_dir
        if not (labels_dir.is_dir() and any(p.is_dir() for p in labels_dir.iterdir())):
            return None  # label files: the site's label map names their values
        return _mask_folder_names(self._cases(layout)) or None

    def read_cases(self, layout: SiteLayout) -> list[Case]:
        return self._cases(layout)


register_reader(NiftiReader())
