"""MONAI dictionary pipelines for 3D CT sites: a deterministic (cached) part and a random (per-iteration) part.

Deterministic part, :func:`preprocess_transform` (what ``PersistentDataset``/``CacheDataset`` cache)::

    LoadNiftid           image + label via fedtextseg.data.io (clear SiteErrors); label must lie on the image grid
    EnsureChannelFirstd  [1, *spatial]
    EncodeLabelsd        label values -> compact per-voxel codes on the ORIGINAL grid (composites split by body side,
                         tumors into organs; see fedtextseg.data.labels) - before any resampling or cropping
    Orientationd RAS, Spacingd (bilinear image, nearest codes), ScaleIntensityRanged HU window -> [0, 1] (clip),
    CropForegroundd on the body (scaled image > body_threshold), SpatialPadd to the patch size,
    DivisiblePadd in-plane to the tile size (only with ``cfg.tile``),
    AddSiteInfod         ``annotated`` float32 [C], ``task`` int
    FeatureHookd         optional feature_fn(image [1, D, H, W]) -> {"dino": [F, D, Hg, Wg], "dino_tile": (th, tw, g)}

Random part, :func:`train_transform` = deterministic + ``RandTileCropByPosNegd`` (``num_crops`` patches per volume,
pos:neg 2:1, positive centres class-balanced, in-plane starts optionally snapped to the tile grid, ``dino`` cropped
alongside) + ``DecodeLabelsd`` (codes -> uint8 channels [C, *patch]) + flips and in-plane rot90 (not with ``dino``;
never a left-right mirror when the vocabulary has sided classes) + intensity scale/shift, gamma contrast and Gaussian
noise on ``image`` (with cached ``dino`` features the ViT saw the unaugmented slice: intensity augmentation reaches
the CNN input only).
Validation, :func:`val_transform`: the deterministic part + ``DecodeLabelsd`` on whole volumes.

Output keys: ``image`` MetaTensor float32 [1, *spatial] in [0, 1] (before intensity augmentation); ``label``
MetaTensor uint8 [C, *spatial]; ``annotated`` float32 [C]; ``task`` int; ``case_id`` str; train crops add
``crop_start`` int64 [3] (crop start in the cached volume) and ``volume_shape`` int64 [3] (its size; together they
place the crop in the body, for models with coordinate channels); with features ``dino`` [F, pd, ph/th*g, pw/tw*g] and
``dino_tile``. MONAI metadata and ``applied_operations`` are kept: :func:`invert_to_input` maps a prediction back
to the input image grid (also for volumes loaded from the cache).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (Compose, CropForegroundd, DivisiblePadd, EnsureChannelFirstd, Invertd, MapTransform,
                              Orientationd, RandAdjustContrastd, RandFlipd, RandGaussianNoised, Randomizable,
                              RandRotate90d, RandScaleIntensityd, RandShiftIntensityd, ScaleIntensityRanged, Spacingd,
                              SpatialCrop, SpatialPadd, Transform)
from monai.utils import MetaKeys, SpaceKeys, TraceKeys

from fedtextseg.data.io import AFFINE_TOLERANCE, grid_mismatch, read_label, read_nifti
from fedtextseg.data.labels import LabelCoder, decode_codes, encode_labels
from fedtextseg.data.site import Site
from fedtextseg.errors import ConfigError, FedTextSegError, SiteError

__all__ = [
    "PreprocessConfig", "PIPELINE_VERSION", "LoadNiftid", "EncodeLabelsd", "DecodeLabelsd", "AddSiteInfod",
    "FeatureHookd", "RandTileCropByPosNegd", "SiteCompose", "unwrap_site_error", "preprocess_transform",
    "train_transform", "val_transform", "invert_to_input",
]

PIPELINE_VERSION = "1"  # bump when the deterministic part changes meaning: it is part of every cache key

FeatureFn = Callable[[torch.Tensor], Mapping[str, Any]]


def unwrap_site_error(exc: BaseException) -> FedTextSegError | None:
    """The fedtextseg error behind MONAI's ``RuntimeError("applying transform ...")`` wrappers, if there is one."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, FedTextSegError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class SiteCompose(Compose):
    """``Compose`` that lets a SiteError/ConfigError through as itself instead of MONAI's RuntimeError wrapper."""

    def __call__(self, input_, *args, **kwargs):
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as exc:
            inner = unwrap_site_error(exc)
            if inner is None:
                raise
            raise inner.with_traceback(inner.__traceback__) from None


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing and augmentation settings; :meth:`hash` covers what the cached (deterministic) part depends on."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    orientation: str = "RAS"
    hu_window: tuple[float, float] = (-175.0, 250.0)
    body_threshold: float = 0.0  # CropForeground keeps the box of scaled image > this (0 = above the window floor)
    patch_size: tuple[int, int, int] = (96, 96, 96)
    num_crops: int = 2
    pos_neg: tuple[float, float] = (2.0, 1.0)
    tile: tuple[int, int] | None = None  # in-plane tile (th, tw): pad in-plane to multiples, snap crop starts
    flip_prob: float = 0.1
    rot90_prob: float = 0.1  # in-plane; skipped with DINO features or a non-square in-plane patch
    scale_intensity_prob: float = 0.2
    scale_intensity_factor: float = 0.1
    shift_intensity_prob: float = 0.2
    shift_intensity_offset: float = 0.1
    noise_prob: float = 0.15  # additive Gaussian noise (std drawn from [0, noise_std], scaled-intensity units)
    noise_std: float = 0.05  # 0.05 of the HU window (-175..250) = 21 HU: the noisier scanners of other hospitals
    gamma_prob: float = 0.15  # gamma contrast change (another contrast phase or reconstruction kernel)
    gamma_range: tuple[float, float] = (0.7, 1.5)

    def __post_init__(self) -> None:
        for name, cast in (("spacing", float), ("hu_window", float), ("patch_size", int), ("pos_neg", float),
                           ("tile", int), ("gamma_range", float)):
            # lists from YAML/Hydra -> tuples, so the config hashes and compares
            value = getattr(self, name)
            object.__setattr__(self, name, tuple(cast(v) for v in value) if value is not None else None)
        problems = []
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            problems.append(f"spacing must be 3 positive numbers, got {self.spacing}")
        if len(self.hu_window) != 2 or self.hu_window[0] >= self.hu_window[1]:
            problems.append(f"hu_window must be (low, high) with low < high, got {self.hu_window}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            problems.append(f"patch_size must be 3 positive integers, got {self.patch_size}")
        if self.num_crops < 1:
            problems.append(f"num_crops must be >= 1, got {self.num_crops}")
        if len(self.pos_neg) != 2 or min(self.pos_neg) < 0 or sum(self.pos_neg) <= 0:
            problems.append(f"pos_neg must be two non-negative weights, not both 0, got {self.pos_neg}")
        if len(self.gamma_range) != 2 or not 0 < self.gamma_range[0] <= self.gamma_range[1]:
            problems.append(f"gamma_range must be (low, high) with 0 < low <= high, got {self.gamma_range}")
        if self.noise_std < 0:
            problems.append(f"noise_std must be >= 0, got {self.noise_std}")
        if self.tile is not None:
            if len(self.tile) != 2 or min(self.tile) < 1:
                problems.append(f"tile must be 2 positive integers (in-plane), got {self.tile}")
            elif len(self.patch_size) == 3 and any(p % t for p, t in zip(self.patch_size[1:], self.tile)):
                problems.append(f"in-plane patch size {self.patch_size[1:]} must be a multiple of the tile {self.tile}")
        for f in fields(self):
            if f.name.endswith("_prob") and not 0.0 <= getattr(self, f.name) <= 1.0:
                problems.append(f"{f.name} must be in [0, 1], got {getattr(self, f.name)}")
        if problems:
            raise ConfigError("invalid preprocessing config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "PreprocessConfig":
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown preprocessing option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def pos_ratio(self) -> float:
        return self.pos_neg[0] / (self.pos_neg[0] + self.pos_neg[1])

    def hash(self) -> str:
        """Short hash of the settings the cached deterministic part depends on (not the augmentation ones)."""
        cached = {k: v for k, v in self.to_dict().items() if k in _CACHED_FIELDS}
        cached["pipeline_version"] = PIPELINE_VERSION
        return hashlib.sha256(json.dumps(cached, sort_keys=True).encode()).hexdigest()[:16]


MAX_RESAMPLED_VOXELS = 512**3  # a 77 cm cube at 1.5 mm; far beyond any body at the training spacing

_CACHED_FIELDS = ("spacing", "orientation", "hu_window", "body_threshold", "patch_size", "tile")


# ---------------------------------------------------------------------------------------------- deterministic part
class LoadNiftid(MapTransform):
    """Read ``image`` (and ``label``) with fedtextseg's checked readers into MetaTensors without a channel axis.

    Meta follows MONAI's NibabelReader (``affine``, ``original_affine``, ``spatial_shape``, ``filename_or_obj``,
    ``space`` RAS, ``original_channel_dim`` = no channel) so EnsureChannelFirstd and Invertd work as usual. A label
    that does not lie on the image grid (shape, or affine beyond ``atol``) is a SiteError.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", atol: float = AFFINE_TOLERANCE,
                 target_spacing: Sequence[float] | None = None, max_voxels: int = MAX_RESAMPLED_VOXELS,
                 mask_values: Mapping[str, int] | None = None):
        super().__init__([image_key, label_key], allow_missing_keys=True)
        self.image_key, self.label_key, self.atol = image_key, label_key, atol
        self.target_spacing, self.max_voxels = target_spacing, int(max_voxels)
        self.mask_values = dict(mask_values) if mask_values else None  # per-class mask folders (TotalSegmentator)

    def _check_resampled_size(self, vol) -> None:
        """A header whose voxel size is off by orders of magnitude (metres for millimetres) would make the resampled
        grid too large for memory: refuse it, naming the file, before Spacingd tries."""
        if self.target_spacing is None:
            return
        shape = [max(1, round(n * s / t)) for n, s, t in zip(vol.info["shape"], vol.info["spacing"],
                                                             self.target_spacing)]
        if math.prod(shape) > self.max_voxels:
            raise SiteError(vol.info["path"], f"voxel size {tuple(round(s, 4) for s in vol.info['spacing'])} mm "
                            f"resampled to {tuple(self.target_spacing)} mm gives a {tuple(shape)} grid "
                            f"({math.prod(shape) / 1e6:.0f} M voxels, limit {self.max_voxels / 1e6:.0f} M): the "
                            "header's voxel size (pixdim / affine) is probably wrong")

    @staticmethod
    def _to_meta_tensor(vol, dtype) -> MetaTensor:
        # torch tensors and plain Python only: the cache loads with torch.load(weights_only=True), no numpy arrays
        meta = {
            MetaKeys.AFFINE: torch.as_tensor(vol.affine, dtype=torch.float64),
            MetaKeys.ORIGINAL_AFFINE: torch.as_tensor(vol.affine, dtype=torch.float64),
            MetaKeys.SPATIAL_SHAPE: torch.as_tensor(vol.info["shape"], dtype=torch.int64),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            "filename_or_obj": vol.info["path"],
            "pixdim": torch.as_tensor([1.0, *vol.info["spacing"]], dtype=torch.float64),
        }
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(vol.array).astype(dtype, copy=False)), meta=meta)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        image = read_nifti(d[self.image_key])
        self._check_resampled_size(image)
        d[self.image_key] = self._to_meta_tensor(image, np.float32)
        if d.get(self.label_key) is not None:
            label = read_label(d[self.label_key], mask_values=self.mask_values)
            problem = grid_mismatch(image, label, self.atol)
            if problem:
                raise SiteError(label.info["path"], problem)
            wide = label.array.max(initial=0) > np.iinfo(np.int16).max
            d[self.label_key] = self._to_meta_tensor(label, np.int64 if wide else np.int16)
        else:
            d.pop(self.label_key, None)
        return d


def _like(source: MetaTensor, data: torch.Tensor) -> MetaTensor:
    """``data`` with the metadata and transform trace of ``source``."""
    out = MetaTensor(data, meta=dict(source.meta))
    out.applied_operations = list(source.applied_operations)
    return out


class EncodeLabelsd(MapTransform):
    """Label values [1, *spatial] -> compact codes (same shape) on the label's own grid, using its affine."""

    def __init__(self, site: Site, keys: str = "label", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.site = site
        self.coder = LabelCoder.for_site(site)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            values = label.as_subclass(torch.Tensor).numpy()[0]
            source = label.meta.get("filename_or_obj", "<label>")
            codes = encode_labels(values, np.asarray(label.affine), self.site, source, self.coder)
            d[key] = _like(label, torch.from_numpy(codes[None]))
        return d


class DecodeLabelsd(MapTransform):
    """Compact codes [1, *spatial] -> uint8 vocabulary channels [C, *spatial], metadata kept; adds ``known``
    (uint8 [1, *spatial], 0 at voxels of an ignored label value, see :meth:`LabelCoder.known`) beside the label.

    ``known`` is there for every site, all ones where nothing is ignored, so batches pooled from several sites
    collate alike."""

    def __init__(self, coder: LabelCoder, keys: str = "label", allow_missing_keys: bool = True,
                 known_key: str = "known"):
        super().__init__(keys, allow_missing_keys)
        self.coder, self.known_key = coder, known_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            codes = d[key]
            channels = decode_codes(codes, self.coder, has_channel=True)
            known = self.coder.known(codes)
            if isinstance(codes, MetaTensor):
                d[key], d[self.known_key] = _like(codes, channels), _like(codes, known)
            else:
                d[key], d[self.known_key] = channels, known
        return d


class AddSiteInfod(Transform):
    """Adds ``annotated`` (float32 [C], 1 where the site labels the channel) and ``task`` (int, TTPG task index)."""

    def __init__(self, site: Site):
        self.annotated = torch.as_tensor(site.annotated_mask(), dtype=torch.float32)
        self.task = int(site.task_index)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        d["annotated"] = self.annotated.clone()
        d["task"] = self.task
        return d


class FeatureHookd(MapTransform):
    """Runs ``feature_fn(image [1, D, H, W])`` and merges its dict (``dino`` [F, D, Hg, Wg], ``dino_tile``) in."""

    def __init__(self, feature_fn: FeatureFn, image_key: str = "image"):
        super().__init__([image_key])
        self.feature_fn, self.image_key = feature_fn, image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        image = d[self.image_key]
        with torch.no_grad():
            extra = dict(self.feature_fn(image))
        if "dino" in extra:
            if "dino_tile" not in extra:
                raise ConfigError("feature_fn returned 'dino' without 'dino_tile' = (tile_h, tile_w, tokens_per_tile)")
            th, tw, g = (int(v) for v in extra["dino_tile"])
            dino = torch.as_tensor(extra["dino"]).detach().cpu().as_subclass(torch.Tensor)
            d_, h, w = image.shape[1:]
            if dino.ndim != 4 or dino.shape[1] != d_ or dino.shape[2] < h // th * g or dino.shape[3] < w // tw * g:
                raise ConfigError(
                    f"feature_fn returned dino of shape {tuple(dino.shape)} for an image of spatial shape "
                    f"{(d_, h, w)} with tile {(th, tw, g)}; expected [F, {d_}, >={h // th * g}, >={w // tw * g}]"
                )
            extra["dino"], extra["dino_tile"] = dino, (th, tw, g)
        d.update(extra)
        return d


class _Above:
    """Picklable ``x > threshold`` for CropForegroundd (lambdas break DataLoader workers)."""

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    def __call__(self, x):
        return x > self.threshold


def preprocess_transform(site: Site, cfg: PreprocessConfig, feature_fn: FeatureFn | None = None,
                         with_label: bool = True) -> Compose:
    """The deterministic part (cached by the datasets; the ``transform`` :func:`invert_to_input` inverts).

    ``with_label=False`` for images without a label (inference on unlabeled cases).
    """
    keys = ["image", "label"] if with_label else ["image"]
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    steps: list = [LoadNiftid(target_spacing=cfg.spacing, mask_values=site.meta.get("mask_values")),
                   EnsureChannelFirstd(keys=keys, channel_dim="no_channel")]
    if with_label:
        steps.append(EncodeLabelsd(site))
    steps += [
        Orientationd(keys=keys, axcodes=cfg.orientation, labels=None),  # None: axis labels from meta "space"
        Spacingd(keys=keys, pixdim=cfg.spacing, mode=modes),
        ScaleIntensityRanged(keys="image", a_min=cfg.hu_window[0], a_max=cfg.hu_window[1], b_min=0.0, b_max=1.0,
                             clip=True),
        CropForegroundd(keys=keys, source_key="image", select_fn=_Above(cfg.body_threshold), allow_smaller=True,
                        start_coord_key=None, end_coord_key=None),
        SpatialPadd(keys=keys, spatial_size=cfg.patch_size),
    ]
    if cfg.tile is not None:
        steps.append(DivisiblePadd(keys=keys, k=(1, *cfg.tile)))
    steps.append(AddSiteInfod(site))
    if feature_fn is not None:
        steps.append(FeatureHookd(feature_fn))
    return SiteCompose(steps)


# ---------------------------------------------------------------------------------------------- random part
def _snapped_start(voxel: int, size: int, extent: int, tile: int | None) -> int:
    """Crop start along one axis: centred on ``voxel``, inside [0, extent - size], on the tile grid if ``tile``.

    On the grid, prefers a start whose window still contains ``voxel``, closest to the centred start.
    """
    ideal = voxel - size // 2
    last = max(extent - size, 0)
    if tile is None:
        return int(min(max(ideal, 0), last))
    starts = np.arange(0, last + 1, tile)
    contains = starts[(starts <= voxel) & (voxel < starts + size)]
    pool = contains if contains.size else starts
    return int(pool[np.argmin(np.abs(pool - ideal))])


class RandTileCropByPosNegd(Randomizable, MapTransform):
    """``num_samples`` random patches per volume, centred on a positive voxel with probability ``pos_ratio``.

    A positive centre is drawn class-balanced (as nnU-Net oversamples foreground): first one of the annotated classes
    present in the volume, uniformly, then one of its voxels, so a gall bladder is a crop centre as often as the liver
    that has fifty times its voxels. Negatives are voxels of no annotated class. With a tile (``tile`` or the data's
    ``dino_tile``) the in-plane (last two axes) crop starts are snapped to multiples of the tile, and ``dino``
    [F, D, Hg, Wg] is cropped to ``dino[:, z0:z0+pd, y0//th*g:(y0+ph)//th*g, x0//tw*g:(x0+pw)//tw*g]``. Returns a
    list of dicts (MONAI's multi-sample convention; Compose applies the following transforms to each).
    """

    backend = SpatialCrop.backend

    def __init__(self, keys: Sequence[str], label_key: str, coder: LabelCoder, spatial_size: Sequence[int],
                 num_samples: int = 2, pos_ratio: float = 2 / 3, tile: Sequence[int] | None = None,
                 dino_key: str = "dino", max_negative_tries: int = 64):
        MapTransform.__init__(self, keys)
        self.label_key, self.dino_key = label_key, dino_key
        self.positive_lut = torch.as_tensor(coder.positive_codes(), dtype=torch.bool)
        annotated = np.flatnonzero(coder.annotated)
        self.class_luts = torch.as_tensor(coder.table()[annotated].astype(bool))  # [annotated classes, codes]
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.num_samples, self.pos_ratio = int(num_samples), float(pos_ratio)
        self.tile = tuple(int(t) for t in tile) if tile is not None else None
        self.max_negative_tries = max_negative_tries
        self._starts: list[tuple[int, ...]] = []

    def _pick_voxel(self, codes: torch.Tensor, positive: torch.Tensor, present: list[int],
                    voxels_of: dict[int, torch.Tensor]) -> int:
        if present and self.R.rand() < self.pos_ratio:
            cls = present[self.R.randint(len(present))]
            if cls not in voxels_of:  # one pass over the volume per class, however many crops pick it
                voxels_of[cls] = torch.nonzero(self.class_luts[cls][codes].reshape(-1)).reshape(-1)
            voxels = voxels_of[cls]
            return int(voxels[self.R.randint(voxels.numel())])
        flat = positive.reshape(-1)
        for _ in range(self.max_negative_tries):
            idx = int(self.R.randint(flat.numel()))
            if not bool(flat[idx]):
                return idx
        return idx

    def randomize(self, codes: torch.Tensor, tile: tuple[int, int] | None) -> None:
        shape = tuple(codes.shape[1:])
        if any(s < p for s, p in zip(shape, self.spatial_size)):
            raise ValueError(f"volume {shape} is smaller than the patch {self.spatial_size}; pad it first")
        codes = codes[0].as_subclass(torch.Tensor).long()
        positive = self.positive_lut[codes]
        counts = torch.bincount(codes.reshape(-1), minlength=self.class_luts.shape[1])[: self.class_luts.shape[1]]
        present = [i for i in range(self.class_luts.shape[0]) if bool((counts[self.class_luts[i]] > 0).any())]
        self._starts, voxels_of = [], {}
        for _ in range(self.num_samples):
            voxel = np.unravel_index(self._pick_voxel(codes, positive, present, voxels_of), shape)
            tiles = (None, *(tile or (None, None)))
            self._starts.append(tuple(
                _snapped_start(int(v), p, s, t) for v, p, s, t in zip(voxel, self.spatial_size, shape, tiles)
            ))

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict]:
        d = dict(data)
        tile = self.tile
        if tile is None and self.dino_key in d and "dino_tile" in d:
            tile = tuple(int(v) for v in d["dino_tile"][:2])
        if tile is not None and (self.spatial_size[1] % tile[0] or self.spatial_size[2] % tile[1]):
            raise ConfigError(f"in-plane patch size {self.spatial_size[1:]} must be a multiple of the tile {tile}")
        self.randomize(d[self.label_key], tile)
        out = []
        for start in self._starts:
            end = tuple(s + p for s, p in zip(start, self.spatial_size))
            crop = SpatialCrop(roi_start=start, roi_end=end)
            sample = dict(d)
            for key in self.key_iterator(d):
                sample[key] = crop(d[key])
            if self.dino_key in d:
                th, tw, g = (int(v) for v in d["dino_tile"])
                z0, y0, x0 = start
                pd, ph, pw = self.spatial_size
                sample[self.dino_key] = d[self.dino_key][
                    :, z0:z0 + pd, y0 // th * g:(y0 + ph) // th * g, x0 // tw * g:(x0 + pw) // tw * g
                ].clone()
            sample["crop_start"] = torch.as_tensor(start, dtype=torch.int64)
            sample["volume_shape"] = torch.as_tensor(d[self.label_key].shape[1:], dtype=torch.int64)
            out.append(sample)
        return out


def train_transform(site: Site, cfg: PreprocessConfig, feature_fn: FeatureFn | None = None) -> Compose:
    """Deterministic part + random tile-aware pos/neg crops, label decoding and augmentation."""
    coder = LabelCoder.for_site(site)
    with_dino = feature_fn is not None
    steps = list(preprocess_transform(site, cfg, feature_fn).transforms)
    steps += [
        RandTileCropByPosNegd(keys=["image", "label"], label_key="label", coder=coder, spatial_size=cfg.patch_size,
                              num_samples=cfg.num_crops, pos_ratio=cfg.pos_ratio, tile=cfg.tile),
        DecodeLabelsd(coder),
    ]
    # a mirror across the body's midline turns a right kidney into a left one: with sided classes (left/right) in the
    # vocabulary, never flip the left-right axis and never rotate in-plane (a half turn is that mirror too)
    sided = any(site.vocabulary.side_of(c) for c in site.vocabulary.class_names)
    lr_axis = next((i for i, code in enumerate(cfg.orientation) if code in "LR"), None) if sided else None
    if cfg.flip_prob > 0:
        # in-plane flips do not commute with the 2D ViT features: with dino, flip only along the slice axis
        flip_keys = ["image", "label", "known", "dino"] if with_dino else ["image", "label", "known"]
        for axis in (0,) if with_dino else (0, 1, 2):
            if axis != lr_axis:
                steps.append(RandFlipd(keys=flip_keys, prob=cfg.flip_prob, spatial_axis=axis))
    if cfg.rot90_prob > 0 and not with_dino and not sided and cfg.patch_size[1] == cfg.patch_size[2]:
        steps.append(RandRotate90d(keys=["image", "label", "known"], prob=cfg.rot90_prob, max_k=3,
                                   spatial_axes=(1, 2)))
    if cfg.scale_intensity_prob > 0:
        steps.append(RandScaleIntensityd(keys="image", factors=cfg.scale_intensity_factor,
                                         prob=cfg.scale_intensity_prob))
    if cfg.shift_intensity_prob > 0:
        steps.append(RandShiftIntensityd(keys="image", offsets=cfg.shift_intensity_offset,
                                         prob=cfg.shift_intensity_prob))
    if cfg.gamma_prob > 0:
        steps.append(RandAdjustContrastd(keys="image", prob=cfg.gamma_prob, gamma=cfg.gamma_range))
    if cfg.noise_prob > 0 and cfg.noise_std > 0:
        steps.append(RandGaussianNoised(keys="image", prob=cfg.noise_prob, std=cfg.noise_std))
    return SiteCompose(steps)


def _reset_trace_ids(obj: Any) -> None:
    """Clear the transform-instance ids in recorded operations, nested ones too (CropForeground keeps its padding's
    record inside its own), so any instance of the same pipeline can invert them."""
    if isinstance(obj, dict):
        if TraceKeys.ID in obj:
            obj[TraceKeys.ID] = TraceKeys.NONE
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for value in obj:
            _reset_trace_ids(value)


def invert_to_input(pred: torch.Tensor, reference: MetaTensor, site: Site, cfg: PreprocessConfig,
                    nearest: bool = False) -> MetaTensor:
    """Resample a prediction [K, *spatial] made on a preprocessed volume back onto the input image's voxel grid.

    ``reference`` is the pipeline's ``image`` of that volume (its ``applied_operations`` say what was done; it may
    come from the cache, made by other transform instances, so trace ids are not checked). ``nearest=True`` for
    label maps, else bilinear (probabilities). Returns a MetaTensor [K, *input shape] with the input's affine.
    """
    ref = reference.clone()
    ops = copy.deepcopy(list(reference.applied_operations))
    _reset_trace_ids(ops)
    ref.applied_operations = ops
    data = {"image": ref, "pred": pred if isinstance(pred, MetaTensor) else MetaTensor(pred)}
    inverter = Invertd(keys="pred", transform=preprocess_transform(site, cfg, with_label=False), orig_keys="image",
                       nearest_interp=nearest)
    return inverter(data)["pred"]


def val_transform(site: Site, cfg: PreprocessConfig, feature_fn: FeatureFn | None = None) -> Compose:
    """Whole volumes: the deterministic part + label decoding."""
    steps = preprocess_transform(site, cfg, feature_fn).transforms
    return SiteCompose([*steps, DecodeLabelsd(LabelCoder.for_site(site))])
