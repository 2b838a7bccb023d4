"""Shared test fixtures: tiny real NIfTI sites written with nibabel, and an isolated preprocessing cache.

``make_nifti_site(root, ...)`` (also available as the ``make_nifti_site`` fixture) writes a complete site folder:
synthetic CT volumes (air at -1000 HU around a soft-tissue body ellipsoid, organs as brighter spheres) with label
maps following any label map, in the native ``site.yaml`` layout or the MSD ``dataset.json`` layout. Composite
values ("kidney") get one sphere on each body side; tumors sit inside their organ's sphere. Every argument has a
default, so ``make_nifti_site(tmp_path)`` is a 3-case liver/liver-tumor site of 24x28x20 voxels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import nibabel as nib
import numpy as np
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["make_nifti_site", "write_nifti", "synthetic_case", "ras_affine"]

SHAPE = (24, 28, 20)


def ras_affine(spacing: Sequence[float] = (1.5, 1.5, 1.5), origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Diagonal voxel-to-world affine: axis 0 -> +x (patient right, RAS+), 1 -> +y (anterior), 2 -> +z (superior)."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = origin
    return affine


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray | None = None, dtype=None) -> Path:
    """Write ``array`` as NIfTI (``.nii`` or ``.nii.gz`` by suffix) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    nib.save(nib.Nifti1Image(array, ras_affine() if affine is None else np.asarray(affine, dtype=float)), str(path))
    return path


def _sphere(shape, centre, radius) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
    return dist2 <= radius**2


def synthetic_case(label_map: Mapping[int, str], shape: Sequence[int] = SHAPE, seed: int = 0,
                   vocabulary: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 HU, label uint8) with one sphere per organ value, two (one per side, along voxel axis 0) per
    lateral composite, and tumors inside their organ. Organ centres are spread along axis 2."""
    from fedtextseg.vocab import get_vocabulary

    vocab = get_vocabulary(vocabulary)
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    body = sum(((g - (s - 1) / 2) / (s * 0.45)) ** 2 for g, s in zip(grid[:2], shape[:2])) <= 1.0
    body = np.broadcast_to(body, shape)
    image = np.where(body, 40.0, -1000.0) + rng.normal(0, 5, shape)
    label = np.zeros(shape, np.uint8)
    organs = [v for v in sorted(label_map) if not any(vocab.resolve(c).parent for c in vocab.expand(label_map[v]))]
    tumors = [v for v in sorted(label_map) if v not in organs]
    centres: dict[str, list[tuple[float, ...]]] = {}
    radius = max(2.0, min(shape) / 7)
    for i, value in enumerate(organs):
        name = label_map[value]
        z = (i + 1) * shape[2] / (len(organs) + 1) + rng.uniform(-1, 1)
        members = vocab.expand(name)
        if len(members) > 1:  # lateral composite: one sphere per side of axis 0
            spots = [(shape[0] * 0.27, shape[1] / 2, z), (shape[0] * 0.73, shape[1] / 2, z)]
        else:
            spots = [(shape[0] / 2 + rng.uniform(-1, 1), shape[1] / 2 + rng.uniform(-1, 1), z)]
        for c in spots:
            label[_sphere(shape, c, radius)] = value
        for m in members:
            centres.setdefault(m, []).extend(spots)
    for value in tumors:
        parent = vocab.resolve(vocab.expand(label_map[value])[0]).parent
        spots = [c for m in vocab.expand(parent) for c in centres.get(m, [])] or [tuple(s / 2 for s in shape)]
        spot = spots[int(rng.integers(len(spots)))]
        label[_sphere(shape, spot, max(1.0, radius / 2))] = value
    image[label > 0] += 60.0 + 10.0 * label[label > 0]
    return image.astype(np.float32), label


def make_nifti_site(root: str | Path, *, name: str = "site", n_cases: int = 3, n_unlabeled: int = 0,
                    shape: Sequence[int] = SHAPE, label_map: Mapping[int, str] | None = None, task: str | None = "lits",
                    annotated: Sequence[str] | None = None, layout: str = "site", msd_labels: Mapping | None = None,
                    site_yaml: Mapping | None | bool = True,
                    affine: np.ndarray | Callable[[int], np.ndarray] | None = None,
                    suffix: str = ".nii.gz", seed: int = 0, vocabulary: str | None = None,
                    case_fn: Callable[[int, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
                    ) -> Path:
    """Write a tiny NIfTI site under ``root`` and return its folder.

    layout: ``"site"`` (site.yaml + images/ + labels/) or ``"msd"`` (dataset.json + imagesTr/ + labelsTr/, with
    ``msd_labels`` as dataset.json's labels; ``site_yaml=False`` writes no site.yaml there, a mapping writes it).
    ``affine``: one matrix or ``f(case_index)``. ``case_fn(i, image, label) -> (image, label)`` edits each case.
    """
    root = Path(root)
    label_map = dict(label_map or {1: "liver", 2: "liver tumor"})
    image_dir, label_dir = ("imagesTr", "labelsTr") if layout == "msd" else ("images", "labels")
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    for i in range(n_cases + n_unlabeled):
        image, label = synthetic_case(label_map, shape, seed=seed * 1000 + i, vocabulary=vocabulary)
        if case_fn is not None:
            image, label = case_fn(i, image, label)
        aff = affine(i) if callable(affine) else affine
        case = f"case_{i:03d}"
        write_nifti(root / image_dir / f"{case}{suffix}", image, aff)
        if i < n_cases:
            write_nifti(root / label_dir / f"{case}{suffix}", label, aff, dtype=np.uint8)
    if layout == "msd":
        labels = msd_labels or {"0": "background", **{str(k): v for k, v in label_map.items()}}
        (root / "dataset.json").write_text(json.dumps({
            "name": name, "labels": labels, "numTraining": n_cases, "tensorImageSize": "3D",
            "training": [
                {"image": f"./{image_dir}/case_{i:03d}{suffix}", "label": f"./{label_dir}/case_{i:03d}{suffix}"}
                for i in range(n_cases)
            ],
        }))
        if isinstance(site_yaml, Mapping):
            (root / "site.yaml").write_text(yaml.safe_dump(dict(site_yaml)))
        return root
    if site_yaml is not False:
        spec = {"name": name, "format": "nifti", "label_map": label_map}
        if task is not None:
            spec["task"] = task
        if annotated is not None:
            spec["annotated"] = list(annotated)
        if vocabulary is not None:
            spec["vocabulary"] = vocabulary
        if isinstance(site_yaml, Mapping):
            spec.update(site_yaml)
        (root / "site.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root


@pytest.fixture(name="make_nifti_site")
def make_nifti_site_fixture():
    """The :func:`make_nifti_site` factory: ``make_nifti_site(tmp_path / "a", label_map=..., ...)``."""
    return make_nifti_site


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the preprocessing cache out of ``~/.cache``: FEDTEXTSEG_CACHE points into pytest's temp dir."""
    monkeypatch.setenv("FEDTEXTSEG_CACHE", str(tmp_path_factory.mktemp("fedtextseg-cache")))


def make_bank(dim: int = 32, seed: int = 0) -> dict:
    """Random text-bank tensors for the abdominal vocabulary: the keyword arguments a CDPDNet needs."""
    import torch

    from fedtextseg.vocab import get_vocabulary

    vocab = get_vocabulary()
    g = torch.Generator().manual_seed(seed)
    return dict(class_embeddings=torch.randn(vocab.num_classes, dim, generator=g),
                task_embeddings=torch.randn(len(vocab.tasks), dim, generator=g),
                class_names=vocab.class_names, task_names=vocab.task_names)
