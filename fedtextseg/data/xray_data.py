"""A 2D report-guided site's training and validation datasets (the png-csv counterpart of ``dataset.SiteData``).

:func:`build_xray_site_data` splits a site's labeled images with the same deterministic rule as the 3D sites
(:func:`fedtextseg.data.dataset.split_cases`: a hash of ``(seed, case_id)`` picks the validation images, so adding
an image rarely moves the others) and builds the pipelines of :mod:`fedtextseg.data.xray`: every image is resized
to the model's input size (masks nearest-neighbour); training adds mild augmentation without flips (the report names
the left and right lung). Nothing is cached on disk: decoding a PNG and resizing it costs a few milliseconds, far
less than a training step, and the images may live on a read-only share.

Items hold ``image`` ``[1, S, S]`` in [0, 1], ``label`` ``[C, S, S]``, ``annotated`` ``[C]``, ``task``, ``caption``
(the image's report) and ``case_id``, which is what ``engine.train_steps`` / ``engine.evaluate`` and
``TGCNet.forward_batch`` read. Validation Dice is therefore measured at the model's input resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fedtextseg.data.site import Case, Site
from fedtextseg.errors import ConfigError, SiteError

__all__ = ["XraySiteData", "build_xray_site_data", "xray_case_dataset", "image_size_for"]


@dataclass
class XraySiteData:
    """A 2D site's datasets and what they were built from (same attribute names as ``SiteData``)."""

    site: Site
    size: int  # images and masks are resized to size x size
    train_cases: list[Case]
    val_cases: list[Case]
    train_ds: Any
    val_ds: Any
    cache_dir: Path | None = None  # nothing cached on disk

    def describe(self) -> str:
        """One line for logs."""
        return (f"site {self.site.name!r} (2D, png-csv): {len(self.train_cases)} train / {len(self.val_cases)} val "
                f"images, resized to {self.size}x{self.size}, reports from {self.site.meta.get('csv', 'train.csv')}")


def image_size_for(cfg: Any, model: Any = None) -> int:
    """The square input size of a 2D run: ``data.preprocess.image_size`` if set, else the model's ``image_size``."""
    size = cfg.data.preprocess.get("image_size")  # free-form (config_schema): 3D pipelines have none
    if size is None:
        size = getattr(getattr(model, "config", None), "image_size", None)
    if size is None:
        raise ConfigError("a 2D site needs an input size: set data.preprocess.image_size or use a model with "
                          "config.image_size (tgcnet_*)")
    size = int(size)
    if size < 16:
        raise ConfigError(f"data.preprocess.image_size must be at least 16 pixels, got {size}")
    return size


def build_xray_site_data(site: Site, size: int, *, val_fraction: float = 0.2, seed: int = 0) -> XraySiteData:
    """Split a png-csv site's labeled images (deterministically) and build its train/val datasets at ``size``."""
    from fedtextseg.data.dataset import split_cases
    from fedtextseg.data.xray import xray_dataset

    if site.format != "png-csv":
        raise ConfigError(f"site {site.name!r} has format {site.format!r}; these datasets read 2D png-csv sites")
    train_cases, val_cases = split_cases(site.cases, val_fraction, seed)
    if not train_cases:
        raise SiteError(site.root, "no labeled images to train on (every mask cell of the CSV is empty)")
    return XraySiteData(
        site=site, size=int(size), train_cases=train_cases, val_cases=val_cases,
        train_ds=xray_dataset(site, size=size, train=True, cases=train_cases),
        val_ds=xray_dataset(site, size=size, train=False, cases=val_cases),
    )


def xray_case_dataset(site: Site, size: int, cases: Sequence[Case] | None = None):
    """Evaluation items (no augmentation) for ``cases`` (default: every labeled image of the site)."""
    from fedtextseg.data.xray import xray_dataset

    chosen = list(site.labeled_cases if cases is None else cases)
    if not chosen:
        raise SiteError(site.root, "no labeled images to evaluate on")
    return xray_dataset(site, size=size, train=False, cases=chosen)
