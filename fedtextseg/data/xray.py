"""MONAI dict pipelines over 2D report-guided sites (chest X-ray PNG + CSV; the format itself, its reading and
checking: :mod:`fedtextseg.data.xray_site`, whose names are re-exported here).

:func:`xray_transforms` / :func:`xray_dataset` give the training/evaluation pipelines: image
``[1,H,W]`` in [0,1], ``label`` ``[C,H,W]`` over the vocabulary's classes, ``annotated`` ``[C]``, ``task`` (int),
``caption`` (str) and ``case_id`` passed through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import apply_transform

from fedtextseg.data.site import Case, Site
from fedtextseg.data.xray_site import (REQUIRED_COLUMNS, check_xray_site, load_png, mask_to_channels,
                                       read_xray_cases)
from fedtextseg.errors import SiteError

__all__ = [
    "REQUIRED_COLUMNS",
    "read_xray_cases",
    "check_xray_site",
    "load_png",
    "mask_to_channels",
    "LoadXrayd",
    "MaskToChannelsd",
    "xray_items",
    "xray_transforms",
    "xray_dataset",
    "XrayDataset",
]


# ---------------------------------------------------------------------------- MONAI pipelines
class LoadXrayd:
    """MONAI-style dict transform: paths under ``image``/``label`` -> ``image`` [1,H,W] float, ``label`` [C,H,W].

    The mask is converted to vocabulary channels here, at its stored size; resizing happens afterwards (nearest).
    """

    def __init__(self, label_map: Mapping[int, str], vocab, image_key: str = "image", label_key: str = "label"):
        self.label_map, self.vocab = dict(label_map), vocab
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        image = load_png(d[self.image_key])
        d[self.image_key] = torch.from_numpy(image)[None]
        lab = d.get(self.label_key)
        if isinstance(lab, (str, Path)):
            mask = load_png(lab, mask=True)
            if mask.shape != image.shape:
                raise SiteError(lab, f"mask size {mask.shape[::-1]} differs from image size {image.shape[::-1]}")
            d[self.label_key] = torch.from_numpy(mask_to_channels(mask, self.label_map, self.vocab, path=lab))
        else:  # unlabeled: an all-zero target whose `annotated` is all False
            d[self.label_key] = torch.zeros((self.vocab.num_classes, *image.shape), dtype=torch.float32)
            d["annotated"] = torch.zeros(self.vocab.num_classes, dtype=torch.bool)
        return d


class MaskToChannelsd:
    """Dict transform for in-memory masks: ``label`` [H,W] or [1,H,W] integer array -> [C,H,W] float tensor."""

    def __init__(self, label_map: Mapping[int, str], vocab, key: str = "label"):
        self.label_map, self.vocab, self.key = dict(label_map), vocab, key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        m = np.asarray(d[self.key])
        m = m[0] if m.ndim == 3 and m.shape[0] == 1 else m
        d[self.key] = torch.from_numpy(mask_to_channels(m.astype(np.int64), self.label_map, self.vocab))
        return d


def xray_items(site: Site, cases: Sequence[Case] | None = None) -> list[dict]:
    """Pipeline input dicts for a site's cases: paths plus ``caption``, ``task``, ``annotated``, ``case_id``."""
    annotated = torch.from_numpy(site.annotated_mask())
    items = []
    for c in site.cases if cases is None else cases:
        items.append(
            {
                "image": str(c.image),
                "label": str(c.label) if c.label is not None else None,
                "caption": c.caption or "",
                "task": site.task_index,
                "annotated": annotated.clone(),
                "case_id": c.case_id,
            }
        )
    return items


def xray_transforms(site: Site, *, size: int | Sequence[int] = 224, train: bool = False, load: bool = True):
    """The 2D dict pipeline: load, scale to [0,1], resize to ``size``, label -> channels, augment if ``train``.

    ``load=False`` leaves out the first step (:class:`LoadXrayd`), for data already loaded.

    Augmentation is deliberately mild and has NO flips: reports name the left and right lung ("lower right lung"),
    so a horizontal flip would make the image contradict its caption (and a vertical flip would swap upper and
    lower zones). Small rotations, scaling, translation and intensity changes keep the report true.
    """
    from monai.transforms import (
        Compose,
        EnsureTyped,
        RandAdjustContrastd,
        RandAffined,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
        Resized,
    )

    spatial = (size, size) if isinstance(size, int) else tuple(size)
    steps: list = [LoadXrayd(site.label_map, site.vocabulary)] if load else []
    steps += [
        Resized(keys="image", spatial_size=spatial, mode="bilinear", anti_aliasing=True),
        Resized(keys="label", spatial_size=spatial, mode="nearest"),
    ]
    if train:
        steps += [
            RandAffined(
                keys=("image", "label"),
                prob=0.5,
                rotate_range=(np.deg2rad(8),),
                scale_range=(0.08, 0.08),
                translate_range=(0.04 * spatial[0], 0.04 * spatial[1]),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
            RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.3),
            RandGaussianNoised(keys="image", std=0.01, prob=0.2),
        ]
    steps.append(EnsureTyped(keys=("image", "label"), dtype=torch.float32, track_meta=False))
    return Compose(steps)


def xray_dataset(site: Site, *, size: int | Sequence[int] = 224, train: bool = False, cases=None):
    """A ``monai.data.Dataset`` over a 2D site (batches collate to image [B,1,H,W], label [B,C,H,W], ...).

    Files are loaded outside MONAI's ``Compose`` so a broken file raises :class:`SiteError` itself (MONAI would
    wrap it in a ``RuntimeError``).
    """
    if site.format != "png-csv":
        raise SiteError(site.root, f"xray_dataset needs a png-csv site, got format {site.format!r}")
    return XrayDataset(xray_items(site, cases), LoadXrayd(site.label_map, site.vocabulary),
                       xray_transforms(site, size=size, train=train, load=False))


class XrayDataset(Dataset):
    """``monai.data.Dataset`` that loads with :class:`LoadXrayd` first, then applies the MONAI pipeline."""

    def __init__(self, items: list[dict], loader: LoadXrayd, transform):
        super().__init__(items, transform=transform)
        self.loader = loader

    def _transform(self, index: int):
        return apply_transform(self.transform, self.loader(self.data[index]))
