"""Synthetic chest X-ray hospitals whose captions matter.

:func:`generate_xray_hospitals` draws chest-like radiographs (body, two dark lung fields, bright mediastinum and
spine, ribs, noise) with several look-alike opacities. Each lung is cut into upper/middle/lower zones; the opacities
in some zones are the "infection" (in the mask and named by the caption, in the QaTa grammar of
:mod:`fedtextseg.data.qata`: "bilateral pulmonary infection, two infected areas, upper left lung and lower right
lung."), the others are decoys drawn the same way and in neither. An image-only model cannot tell them apart; a
report-guided one can. Sites differ in lesion extent (non-IID, like QaTa's unilateral/one-area vs six-area cases)
and in scanner contrast and noise. :func:`prepare_synthetic_xray_federation` is what
``fedtextseg.sites.ensure_data`` calls for ``data.kind: xray``: the hospitals and the ``federation.yaml`` that lists
them.

Orientation: frontal image, patient's right lung on the image's left (radiological convention).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from scipy.ndimage import gaussian_filter

from fedtextseg.data.qata import SIDES, ZONES, generate_option, qata_caption, write_federation_file

__all__ = ["XraySample", "render_xray", "generate_xray_hospitals", "prepare_synthetic_xray_federation"]


@dataclass
class XraySample:
    """One synthetic radiograph: image in [0,1], binary mask, caption, and the zone geometry behind them."""

    image: np.ndarray  # float32 [S,S]
    mask: np.ndarray  # bool [S,S]
    caption: str
    infected: list[tuple[str, str]]  # (zone, side) pairs in the mask and the caption
    decoys: list[tuple[str, str]]  # (zone, side) pairs with an opacity that is not infection
    zone_masks: dict[tuple[str, str], np.ndarray]  # (zone, side) -> bool [S,S] region of that lung zone


def _ellipse(yy, xx, cy, cx, ry, rx):
    """Boolean mask of the ellipse centred at (cy, cx) with radii (ry, rx) on a normalised grid."""
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def render_xray(
    rng: np.random.Generator,
    size: int = 128,
    n_infected: int = 2,
    n_decoys: int = 1,
    *,
    contrast: float = 1.0,
    noise: float = 0.03,
) -> XraySample:
    """Draw one radiograph with ``n_infected`` infected zones and up to ``n_decoys`` decoy opacities."""
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    img = np.full((s, s), 0.05, dtype=np.float32)
    body = _ellipse(yy, xx, 0.56, 0.5, 0.52, 0.46)
    img[body] = 0.55
    lungs = {}
    cy = 0.47 + rng.uniform(-0.02, 0.02)
    for side, cx0 in (("right", 0.31), ("left", 0.69)):  # patient's right lung on the image's left
        ry, rx = 0.30 + rng.uniform(-0.02, 0.02), 0.14 + rng.uniform(-0.01, 0.01)
        cx = cx0 + rng.uniform(-0.015, 0.015)
        lungs[side] = (cy + rng.uniform(-0.01, 0.01), cx, ry, rx)
        img[_ellipse(yy, xx, *lungs[side])] = 0.18
    heart = _ellipse(yy, xx, 0.62, 0.54, 0.16, 0.12)
    spine = (np.abs(xx - 0.5) < 0.035) & body
    img[heart] = 0.72
    img[spine] = 0.8  # spine / mediastinum
    for k in range(9):  # ribs: bright arcs across the lung fields
        y0 = 0.16 + 0.075 * k + rng.uniform(-0.008, 0.008)
        arc = y0 + 0.9 * (xx - 0.5) ** 2
        img[(np.abs(yy - arc) < 0.012) & body] += 0.1
    lung_mask = {side: _ellipse(yy, xx, *lungs[side]) & ~heart & ~spine for side in SIDES}
    zone_masks = {}
    for side, (ly, lx, ry, rx) in lungs.items():
        top = ly - ry
        for i, zone in enumerate(ZONES):
            band = (yy >= top + i * 2 * ry / 3) & (yy < top + (i + 1) * 2 * ry / 3)
            zone_masks[(zone, side)] = band & lung_mask[side]

    all_zones = [(z, sd) for sd in SIDES for z in ZONES]
    order = rng.permutation(len(all_zones))
    infected = [all_zones[i] for i in order[:n_infected]]
    decoys = [all_zones[i] for i in order[n_infected : n_infected + n_decoys]]
    mask = np.zeros((s, s), dtype=bool)
    opacity = np.zeros((s, s), dtype=np.float32)
    for zone_side in infected + decoys:
        region = zone_masks[zone_side]
        ys, xs = np.nonzero(region)
        blob = np.zeros((s, s), dtype=np.float32)
        for _ in range(rng.integers(2, 4)):  # irregular lesion: a few overlapping Gaussians
            j = rng.integers(len(ys))
            sig = rng.uniform(0.035, 0.06)
            blob += np.exp(-(((yy - ys[j] / s) ** 2 + (xx - xs[j] / s) ** 2) / (2 * sig**2)))
        blob = np.clip(blob, 0, 1) * region
        lesion = blob > 0.45
        if not lesion.any():  # a tiny zone: keep at least its centre pixel
            lesion[ys[len(ys) // 2], xs[len(xs) // 2]] = True
        opacity = np.maximum(opacity, np.where(lesion, 0.28 + 0.08 * blob, 0.0))
        if zone_side in infected:
            mask |= lesion
    img = img + gaussian_filter(opacity, 0.8 * s / 128)
    img = gaussian_filter(img, 1.0 * s / 128)
    img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    img = np.clip(img, 0, 1) ** (1.0 / contrast)
    return XraySample(
        image=img.astype(np.float32),
        mask=mask,
        caption=qata_caption(infected),
        infected=sorted(infected),
        decoys=sorted(decoys),
        zone_masks=zone_masks,
    )


def _extent_weights(site: int, n_sites: int) -> np.ndarray:
    """Probability of 1..6 infected zones at a site: site 0 mostly small, the last mostly extensive disease."""
    mu = 1.0 + 5.0 * (site / max(n_sites - 1, 1))
    k = np.arange(1, 7)
    w = np.exp(-((k - mu) ** 2) / (2 * 1.3**2))
    return w / w.sum()


def _n_decoys(rng: np.random.Generator, n_infected: int, max_decoys: int) -> int:
    """1..max_decoys decoys where a free zone is left (so most images hold a lesion the report does not name)."""
    free = min(max_decoys, 6 - n_infected)
    return int(rng.integers(min(1, free), free + 1))


def _write_site(folder: Path, name: str, samples: list[tuple[str, XraySample]]) -> None:
    """Write one synthetic site: PNG images and masks, train.csv and site.yaml."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    with (folder / "train.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "mask", "caption", "infected_areas"])
        for cid, smp in samples:
            Image.fromarray(np.round(smp.image * 255).astype(np.uint8), mode="L").save(folder / "images" / f"{cid}.png")
            Image.fromarray(smp.mask.astype(np.uint8) * 255, mode="L").save(folder / "masks" / f"mask_{cid}.png")
            w.writerow([f"images/{cid}.png", f"masks/mask_{cid}.png", smp.caption, len(smp.infected)])
    spec = {
        "name": name,
        "format": "png-csv",
        "vocabulary": "chest-xray",
        "task": "qata-cov19",
        "label_map": {255: "lung infection"},
        "csv": "train.csv",
        "synthetic": True,
    }
    (folder / "site.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def generate_xray_hospitals(
    out_dir: str | Path,
    sites: int = 3,
    images_per_site: int = 40,
    size: int = 128,
    seed: int = 0,
    *,
    max_decoys: int = 3,
    test_images: int = 0,
) -> list[Path]:
    """Write ``sites`` synthetic 2D hospitals (``hospital-0`` ...) under ``out_dir``; returns their folders.

    Deterministic for a seed. Sites are non-IID in lesion extent and in contrast/noise. ``test_images > 0`` also
    writes an IID ``test`` site (all extents, middle scanner settings), which is not in the returned list.
    """
    if sites < 1 or images_per_site < 1:
        raise ValueError("need at least one site and one image per site")
    out = Path(out_dir)
    folders = []
    for i in range(sites):
        rng = np.random.default_rng([seed, i])
        contrast = 0.85 + 0.3 * i / max(sites - 1, 1)
        noise = 0.02 + 0.02 * ((i * 7) % sites) / max(sites - 1, 1)
        weights = _extent_weights(i, sites)
        samples = []
        for j in range(images_per_site):
            k = int(rng.choice(np.arange(1, 7), p=weights))
            d = _n_decoys(rng, k, max_decoys)
            samples.append((f"h{i}_{j:04d}", render_xray(rng, size, k, d, contrast=contrast, noise=noise)))
        folder = out / f"hospital-{i}"
        _write_site(folder, f"hospital-{i}", samples)
        folders.append(folder)
    if test_images > 0:
        rng = np.random.default_rng([seed, 10_000])
        samples = []
        for j in range(test_images):
            k = int(rng.integers(1, 7))
            d = _n_decoys(rng, k, max_decoys)
            samples.append((f"test_{j:04d}", render_xray(rng, size, k, d)))
        _write_site(out / "test", "test", samples)
    return folders


def prepare_synthetic_xray_federation(root: str | Path, gen, *, unseen: str | None = None,
                                      log_fn=print) -> list[Path]:
    """Synthetic hospitals from a data config's ``generate`` block (``sites``, ``images_per_site``, ``size``,
    ``seed``, ``test_images``; the IID ``test`` site is the unseen one) and their ``federation.yaml`` under
    ``root``; returns the training sites."""
    root = Path(root).expanduser()
    get = lambda key, default: generate_option(gen, key, default)  # noqa: E731
    n, per = int(get("sites", 3)), int(get("images_per_site", 40))
    size, seed = int(get("size", 128)), int(get("seed", 0))
    test = int(get("test_images", 0) or 0) if unseen else 0
    log_fn(f"generating synthetic chest X-ray hospitals in {root} ({n} sites x {per} images, {size}x{size}, "
           f"seed {seed}{f', unseen test site of {test} images' if test else ''}) ...")
    sites = generate_xray_hospitals(root, sites=n, images_per_site=per, size=size, seed=seed, test_images=test)
    held_out = root / "test" if test else None
    write_federation_file(root, sites, held_out, name="synthetic-chest-xray", generator=__name__, seed=seed,
                          size=size, images_per_site=per)
    return sites
