"""Synthetic chest X-ray hospitals: determinism, captions that match the masks, decoys, non-IID sites."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedtextseg.data.site import load_site
from fedtextseg.data.qata import SIDES, ZONES, parse_qata_caption, qata_caption
from fedtextseg.synthetic.xray import generate_xray_hospitals, render_xray
from fedtextseg.data.xray import check_xray_site

QATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "qata-cov19"


def _rows(folder: Path) -> list[dict]:
    with (folder / "train.csv").open() as fh:
        return list(csv.DictReader(fh))


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generation_is_deterministic_per_seed(tmp_path):
    a = generate_xray_hospitals(tmp_path / "a", sites=2, images_per_site=4, size=64, seed=3)
    b = generate_xray_hospitals(tmp_path / "b", sites=2, images_per_site=4, size=64, seed=3)
    c = generate_xray_hospitals(tmp_path / "c", sites=2, images_per_site=4, size=64, seed=4)
    assert [p.name for p in a] == ["hospital-0", "hospital-1"]
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert _tree(tmp_path / "a") != _tree(tmp_path / "c")


def test_sites_load_and_pass_the_check(tmp_path):
    folders = generate_xray_hospitals(tmp_path, sites=3, images_per_site=5, size=64, seed=0, test_images=3)
    for folder in folders + [tmp_path / "test"]:
        site = load_site(folder)
        assert site.vocabulary.name == "chest-xray" and site.task == "qata cov19"
        assert check_xray_site(site) == []
        img = np.asarray(Image.open(site.cases[0].image))
        assert img.shape == (64, 64) and img.dtype == np.uint8
    assert len(load_site(tmp_path / "test").cases) == 3


@pytest.mark.parametrize("seed", range(6))
def test_captions_match_mask_regions(seed):
    rng = np.random.default_rng(seed)
    for n_inf in range(1, 7):
        s = render_xray(rng, 96, n_infected=n_inf, n_decoys=min(2, 6 - n_inf))
        assert parse_qata_caption(s.caption) == set(s.infected) and len(s.infected) == n_inf
        for zone_side, region in s.zone_masks.items():
            in_zone = (s.mask & region).sum()
            assert (in_zone > 0) == (zone_side in s.infected), (s.caption, zone_side)
        union = np.any([s.zone_masks[z] for z in s.infected], axis=0)
        assert not (s.mask & ~union).any()  # no infected pixel outside the zones the caption names
        assert set(s.decoys).isdisjoint(s.infected)


def test_decoys_look_like_infections():
    rng = np.random.default_rng(0)
    infected_means, decoy_means = [], []
    for _ in range(20):
        s = render_xray(rng, 128, n_infected=2, n_decoys=2, noise=0.0)
        lung_bg = np.median(s.image[np.any(list(s.zone_masks.values()), axis=0) & ~s.mask])
        for zone_side in s.infected:
            infected_means.append(s.image[s.zone_masks[zone_side] & s.mask].mean() - lung_bg)
        for zone_side in s.decoys:
            region = s.zone_masks[zone_side]
            decoy_means.append(np.sort(s.image[region])[-max(1, region.sum() // 4):].mean() - lung_bg)
    assert np.mean(infected_means) > 0.15 and np.mean(decoy_means) > 0.15
    assert abs(np.mean(infected_means) - np.mean(decoy_means)) < 0.08


def test_written_captions_agree_with_written_masks(tmp_path):
    for folder in generate_xray_hospitals(tmp_path, sites=2, images_per_site=8, size=64, seed=1):
        for row in _rows(folder):
            mask = np.asarray(Image.open(folder / row["mask"])) > 0
            named = parse_qata_caption(row["caption"])
            assert int(row["infected_areas"]) == len(named) and mask.any()
            sides = {side for _, side in named}
            # patient's right lung = image's left half
            assert mask[:, :30].any() == ("right" in sides) and mask[:, 34:].any() == ("left" in sides)
            assert set(np.unique(mask.astype(np.uint8) * 255)) <= {0, 255}


def test_sites_are_non_iid_in_extent(tmp_path):
    folders = generate_xray_hospitals(tmp_path, sites=3, images_per_site=30, size=32, seed=0)
    means = [np.mean([int(r["infected_areas"]) for r in _rows(f)]) for f in folders]
    assert means[0] < means[1] < means[2] and means[2] - means[0] > 2


def test_caption_grammar_matches_qata():
    pairs = [("upper", "left"), ("middle", "left"), ("lower", "left"), ("middle", "right"), ("lower", "right")]
    assert qata_caption(pairs) == (
        "bilateral pulmonary infection, five infected areas, upper middle lower left lung and middle lower right lung."
    )
    assert qata_caption([("lower", "right")]) == "unilateral pulmonary infection, one infected area, lower right lung."
    every = [(z, s) for s in SIDES for z in ZONES]
    assert parse_qata_caption(qata_caption(every)) == set(every)


@pytest.mark.skipif(not QATA.is_dir(), reason="shared QaTa-COV19 data (../shared/data/qata-cov19) is absent")
def test_caption_grammar_round_trips_every_real_qata_caption():
    with (QATA / "train.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        named = parse_qata_caption(row["caption"])
        assert len(named) == int(row["infected_areas"]), row["caption"]
        assert qata_caption(sorted(named)) == row["caption"]
