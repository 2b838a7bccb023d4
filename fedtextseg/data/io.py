"""Reading NIfTI volumes with checks that turn every bad file into a :class:`SiteError` naming file and problem.

``read_nifti`` returns a :class:`NiftiVolume` (``array, affine, info`` — unpacks like a 3-tuple) and refuses:
unreadable, corrupt or truncated files (nibabel, gzip, zlib and EOF errors), files with the wrong number of spatial
dimensions (a 2D slice where a 3D volume is expected, a 4D file holding several volumes), non-finite intensities
(NaN/Inf) and affines that cannot be inverted. ``read_label`` adds: values must be finite, non-negative integers.
``read_header`` checks only what the header says (shape, affine) without decompressing the voxel data.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from fedtextseg.errors import SiteError

__all__ = ["NiftiVolume", "read_nifti", "read_label", "read_header", "grid_mismatch", "READ_ERRORS", "AFFINE_TOLERANCE",
           "mask_files", "mask_name"]

# What nibabel, gzip and zlib raise on a damaged file: not-a-NIfTI, bad gzip stream, truncated data.
READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError, TypeError, MemoryError)

_SINGULAR_DET = 1e-12


class NiftiVolume(NamedTuple):
    """A checked volume: voxel array (spatial axes only), 4x4 voxel-to-world (RAS+ mm) affine, header summary."""

    array: np.ndarray
    affine: np.ndarray
    info: dict[str, Any]


def _load_image(path: Path):
    if not path.is_file():
        raise SiteError(path, "file does not exist")
    try:
        return nib.load(str(path), mmap=False)
    except READ_ERRORS as exc:
        raise SiteError(path, f"cannot read as NIfTI ({type(exc).__name__}: {exc})") from None


def _spatial_shape(path: Path, shape: tuple[int, ...], expect_dims: int) -> tuple[int, ...]:
    """Spatial shape after dropping trailing singleton axes (a 4D file with one volume is 3D)."""
    spatial = tuple(int(s) for s in shape)
    while len(spatial) > expect_dims and spatial[-1] == 1:
        spatial = spatial[:-1]
    if len(spatial) > expect_dims:
        extra = int(np.prod(spatial[expect_dims:]))
        raise SiteError(
            path, f"{len(spatial)}D file with {extra} volumes (shape {spatial}); expected one {expect_dims}D volume"
        )
    if len(spatial) < expect_dims:
        raise SiteError(path, f"{len(spatial)}D file (shape {spatial}); expected a {expect_dims}D volume")
    if expect_dims == 3 and min(spatial) == 1:
        raise SiteError(path, f"a single slice (shape {spatial}): a 2D image where a 3D volume is expected")
    if min(spatial) < 1:
        raise SiteError(path, f"empty volume (shape {spatial})")
    return spatial


def _checked_affine(path: Path, img) -> np.ndarray:
    affine = np.asarray(img.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise SiteError(path, f"affine is not a finite 4x4 matrix: {affine.tolist()}")
    det = float(np.linalg.det(affine[:3, :3]))
    if not np.isfinite(det) or abs(det) < _SINGULAR_DET:
        raise SiteError(path, f"affine cannot be inverted (determinant {det:.3g}; zero voxel size?)")
    return affine


def _info(path: Path, img, spatial: tuple[int, ...], affine: np.ndarray) -> dict[str, Any]:
    header = img.header
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return {
        "path": str(path),
        "shape": spatial,
        "spacing": spacing[: len(spatial)],
        "orientation": "".join(nib.aff2axcodes(affine)),
        "dtype": str(header.get_data_dtype()),
        "qform_code": int(header["qform_code"]) if "qform_code" in header else None,
        "sform_code": int(header["sform_code"]) if "sform_code" in header else None,
    }


def read_header(path: str | Path, expect_dims: int = 3) -> tuple[np.ndarray, dict[str, Any]]:
    """Affine and header summary, with the shape and affine checks, without reading the voxel data."""
    path = Path(path)
    img = _load_image(path)
    spatial = _spatial_shape(path, img.shape, expect_dims)
    affine = _checked_affine(path, img)
    return affine, _info(path, img, spatial, affine)


def read_nifti(path: str | Path, expect_dims: int = 3, *, check_finite: bool = True, dtype=np.float32) -> NiftiVolume:
    """Read and check one image volume; the array has the spatial axes only, cast to ``dtype``."""
    path = Path(path)
    img = _load_image(path)
    spatial = _spatial_shape(path, img.shape, expect_dims)
    affine = _checked_affine(path, img)
    try:
        data = np.asanyarray(img.dataobj)
    except READ_ERRORS as exc:
        problem = f"cannot read voxel data, file damaged or truncated ({type(exc).__name__}: {exc})"
        raise SiteError(path, problem) from None
    data = data.reshape(spatial)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if check_finite and np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        if not finite.all():
            bad = int(data.size - np.count_nonzero(finite))
            n_nan = int(np.isnan(data).sum())
            raise SiteError(path, f"{bad} non-finite voxel values ({n_nan} NaN, {bad - n_nan} Inf)")
    return NiftiVolume(data, affine, _info(path, img, spatial, affine))


def read_label(path: str | Path, expect_dims: int = 3, mask_values: Mapping[str, int] | None = None) -> NiftiVolume:
    """Read a label map: finite, non-negative, integer-valued; returned as an integer array.

    ``path`` may be a folder of per-class binary masks (TotalSegmentator's output: ``liver.nii.gz``,
    ``kidney_left.nii.gz``, ...): each mask's voxels get ``mask_values[<file name without suffix>]``; the masks must
    share one grid and must not overlap."""
    path = Path(path)
    if path.is_dir():
        return _read_mask_folder(path, expect_dims, mask_values)
    vol = read_nifti(path, expect_dims, check_finite=True, dtype=None)
    data = vol.array
    if np.issubdtype(data.dtype, np.floating):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            sample = np.unique(data[rounded != data])[:5]
            raise SiteError(path, f"label map has non-integer values (e.g. {', '.join(f'{v:g}' for v in sample)})")
        if data.size and (rounded.max() > np.iinfo(np.int32).max):
            raise SiteError(path, f"label value {rounded.max():g} is too large")
        data = rounded.astype(np.int32)
    elif not np.issubdtype(data.dtype, np.integer):
        raise SiteError(path, f"label map has non-numeric data type {data.dtype}")
    if data.size and data.min() < 0:
        raise SiteError(path, f"label map has negative values (min {int(data.min())})")
    return NiftiVolume(data, vol.affine, vol.info)


AFFINE_TOLERANCE = 1e-3  # absolute, on affine entries (mm for the origin, mm/voxel for the axes)
MASK_SUFFIXES = (".nii.gz", ".nii")


def mask_name(path: Path) -> str:
    """The class a per-class mask file names: its file name without ``.nii.gz`` / ``.nii``."""
    for suffix in MASK_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def mask_files(folder: Path) -> list[Path]:
    """The NIfTI masks of a per-class mask folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(MASK_SUFFIXES))


def _read_mask_folder(folder: Path, expect_dims: int, mask_values: Mapping[str, int] | None) -> NiftiVolume:
    if mask_values is None:
        raise SiteError(folder, "a folder of per-class masks is read with the site's class list (load it as a site)")
    masks = mask_files(folder)
    if not masks:
        raise SiteError(folder, "label folder holds no per-class masks (<class>.nii.gz)")
    out = first = None
    owner: np.ndarray | None = None
    for index, mask in enumerate(masks):
        name = mask_name(mask)
        if name not in mask_values:
            raise SiteError(mask, f"mask of class {name!r}, which the site's class list does not have")
        vol = read_label(mask, expect_dims)
        if first is None:
            first = vol
            out = np.zeros(vol.array.shape, dtype=np.int32)
            owner = np.full(vol.array.shape, -1, dtype=np.int16)
        else:
            problem = grid_mismatch(first, vol)
            if problem:
                raise SiteError(mask, f"not on the grid of {masks[0].name} in the same folder: {problem}")
        foreground = vol.array > 0
        clash = foreground & (owner >= 0)
        if clash.any():
            other = masks[int(owner[clash][0])].name
            raise SiteError(mask, f"{int(clash.sum())} voxels are also in {other}: per-class masks must not overlap")
        out[foreground] = int(mask_values[name])
        owner[foreground] = index
    info = dict(first.info)
    info["path"] = str(folder)
    return NiftiVolume(out, first.affine, info)


def grid_mismatch(image: NiftiVolume | tuple, label: NiftiVolume | tuple, atol: float = AFFINE_TOLERANCE) -> str | None:
    """Why a label does not lie on its image's voxel grid (shape or affine differ), or None when it does.

    Accepts volumes or ``(affine, info)`` pairs as returned by :func:`read_header`.
    """
    img_affine, img_info = (image.affine, image.info) if isinstance(image, NiftiVolume) else image
    lab_affine, lab_info = (label.affine, label.info) if isinstance(label, NiftiVolume) else label
    if tuple(img_info["shape"]) != tuple(lab_info["shape"]):
        return f"label shape {tuple(lab_info['shape'])} differs from image shape {tuple(img_info['shape'])}"
    diff = float(np.max(np.abs(np.asarray(img_affine) - np.asarray(lab_affine))))
    if diff > atol:
        return (
            f"label affine differs from the image affine by up to {diff:.4g} (tolerance {atol:g}); "
            f"image orientation {img_info['orientation']} origin {np.round(img_affine[:3, 3], 3).tolist()}, "
            f"label orientation {lab_info['orientation']} origin {np.round(lab_affine[:3, 3], 3).tolist()}"
        )
    return None
