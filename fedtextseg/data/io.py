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
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from fedtextseg.errors import SiteError

__all__ = ["NiftiVolume", "read_nifti", "read_label", "read_header", "grid_mismatch", "READ_ERRORS", "AFFINE_TOLERANCE"]

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


def read_label(path: str | Path, expect_dims: int = 3) -> NiftiVolume:
    """Read a label map: finite, non-negative, integer-valued; returned as an integer array."""
    path = Path(path)
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
