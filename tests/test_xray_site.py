"""2D chest X-ray sites (png-csv): reading, validation of broken files, MONAI pipelines, the real QaTa folder."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fedtextseg.data.site import load_site
from fedtextseg.data.qata import split_qata
from fedtextseg.data.xray import check_xray_site, load_png, mask_to_channels, xray_dataset, xray_transforms
from fedtextseg.errors import SiteError
from fedtextseg.vocab import get_vocabulary

QATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "qata-cov19"
CAPTION = "unilateral pulmonary infection, one infected area, lower right lung."


def _png(path: Path, arr: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode=mode).save(path)


def _mask(size=32, value=255) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[20:28, 4:12] = value  # patient's right lower zone = image left, bottom
    return m


def make_site(root: Path, n: int = 3, *, label_value: int = 255, mask_value: int = 255, rows=None, spec=None) -> Path:
    """A valid 2D site with ``n`` 32x32 images; ``rows`` replaces the CSV rows, ``spec`` updates site.yaml."""
    rng = np.random.default_rng(0)
    default_rows = []
    for i in range(n):
        _png(root / "images" / f"img{i}.png", rng.integers(0, 255, (32, 32)))
        _png(root / "masks" / f"mask{i}.png", _mask(value=mask_value))
        default_rows.append({"image": f"images/img{i}.png", "mask": f"masks/mask{i}.png", "caption": CAPTION})
    rows = default_rows if rows is None else rows
    with (root / "train.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["image", "mask", "caption"])
        w.writeheader()
        w.writerows(rows)
    site = {"format": "png-csv", "vocabulary": "chest-xray", "task": "qata-cov19",
            "label_map": {label_value: "lung infection"}, "csv": "train.csv"}
    site.update(spec or {})
    (root / "site.yaml").write_text(yaml.safe_dump(site))
    return root


def _problems(issues, needle: str) -> list:
    return [(p, msg) for p, msg in issues if needle in msg]


# ----------------------------------------------------------------------------- the format
def test_valid_site_loads_and_checks_clean(tmp_path):
    site = load_site(make_site(tmp_path))
    assert site.format == "png-csv" and site.spatial_dims == 2
    assert [c.case_id for c in site.cases] == ["img0", "img1", "img2"]
    assert site.cases[0].caption == CAPTION and site.cases[0].label.name == "mask0.png"
    assert site.annotated == ["lung infection"] and site.task == "qata cov19"
    assert check_xray_site(site) == []
    assert check_xray_site(tmp_path) == []  # by path too


def test_root_and_csv_may_point_elsewhere(tmp_path):
    data = make_site(tmp_path / "data")
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    spec = yaml.safe_load((data / "site.yaml").read_text())
    spec.update(root=str(data), csv=str(data / "train.csv"))
    (spec_dir / "site.yaml").write_text(yaml.safe_dump(spec))
    site = load_site(spec_dir)
    assert len(site.cases) == 3 and site.cases[0].image == data / "images" / "img0.png"
    assert sorted(p.name for p in spec_dir.iterdir()) == ["site.yaml"]


# ----------------------------------------------------------------------------- broken inputs
def test_missing_csv(tmp_path):
    make_site(tmp_path)
    (tmp_path / "train.csv").unlink()
    with pytest.raises(SiteError, match="CSV file does not exist") as exc:
        load_site(tmp_path)
    assert exc.value.path.endswith("train.csv")
    assert _problems(check_xray_site(tmp_path), "CSV file does not exist")


def test_missing_caption_column(tmp_path):
    rows = [{"image": "images/img0.png", "mask": "masks/mask0.png"}]
    make_site(tmp_path, rows=rows)
    with pytest.raises(SiteError, match="missing column.*caption"):
        load_site(tmp_path)
    assert _problems(check_xray_site(tmp_path), "missing column")


def test_missing_or_empty_caption(tmp_path):
    rows = [{"image": f"images/img{i}.png", "mask": f"masks/mask{i}.png", "caption": c}
            for i, c in enumerate([CAPTION, "", "  ", "nan"])]
    make_site(tmp_path, n=4, rows=rows)
    site = load_site(tmp_path)  # loadable: the model falls back to the task prompt
    assert [c.caption for c in site.cases] == [CAPTION, None, None, None]
    found = _problems(check_xray_site(site), "caption")
    assert [p.rsplit(":", 1)[1] for p, _ in found] == ["3", "4", "5"]  # CSV lines of the empty captions


def test_missing_image_file(tmp_path):
    make_site(tmp_path)
    (tmp_path / "images" / "img1.png").unlink()
    with pytest.raises(SiteError, match="does not exist") as exc:
        load_site(tmp_path)
    assert exc.value.path.endswith("img1.png")
    issues = check_xray_site(tmp_path)
    assert [Path(p).name for p, _ in issues] == ["img1.png"]


def test_corrupt_and_truncated_png(tmp_path):
    make_site(tmp_path)
    (tmp_path / "images" / "img0.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    good = (tmp_path / "masks" / "mask2.png").read_bytes()
    (tmp_path / "masks" / "mask2.png").write_bytes(good[: len(good) // 2])
    issues = check_xray_site(load_site(tmp_path))
    assert {Path(p).name for p, m in issues if "corrupt" in m} == {"img0.png", "mask2.png"}
    with pytest.raises(SiteError, match="corrupt"):
        load_png(tmp_path / "images" / "img0.png")


def test_size_mismatch(tmp_path):
    make_site(tmp_path)
    _png(tmp_path / "masks" / "mask1.png", np.zeros((16, 24), np.uint8))
    issues = _problems(check_xray_site(load_site(tmp_path)), "differs from image size")
    assert len(issues) == 1 and Path(issues[0][0]).name == "mask1.png" and "(24, 16)" in issues[0][1]
    item = load_site(tmp_path)
    with pytest.raises(SiteError, match="differs"):
        xray_dataset(item, size=32)[1]


def test_non_binary_mask(tmp_path):
    make_site(tmp_path)
    soft = np.tile(np.linspace(0, 255, 32), (32, 1))  # anti-aliased / JPEG-like mask
    _png(tmp_path / "masks" / "mask0.png", soft)
    issues = _problems(check_xray_site(load_site(tmp_path)), "non-binary")
    assert len(issues) == 1 and Path(issues[0][0]).name == "mask0.png"
    with pytest.raises(SiteError, match="not in the label map"):
        mask_to_channels(soft.astype(np.int64), {255: "lung infection"}, get_vocabulary("chest-xray"))


def test_empty_mask_is_info_and_rgb_is_fine(tmp_path):
    make_site(tmp_path)
    _png(tmp_path / "masks" / "mask2.png", np.zeros((32, 32), np.uint8))
    rgb = np.stack([np.full((32, 32), 200)] * 3, -1)
    _png(tmp_path / "images" / "img1.png", rgb, mode="RGB")
    issues = check_xray_site(load_site(tmp_path))
    assert issues == [(str(tmp_path / "masks" / "mask2.png"), "info: mask is empty (no labeled pixel)")]
    grey = load_png(tmp_path / "images" / "img1.png")
    assert grey.shape == (32, 32) and np.allclose(grey, 200 / 255, atol=1 / 255)


@pytest.mark.parametrize("label_value,mask_value", [(1, 255), (255, 1), (1, 1)])
def test_binary_masks_accept_one_or_255(tmp_path, label_value, mask_value):
    site = load_site(make_site(tmp_path, label_value=label_value, mask_value=mask_value))
    assert check_xray_site(site) == []
    assert xray_dataset(site, size=32)[0]["label"][0].sum() == 64


def test_composite_lung_label_splits_by_side():
    vocab = get_vocabulary("chest-xray")
    mask = np.zeros((8, 8), np.int64)
    mask[2:6, 1:7] = 1
    ch = mask_to_channels(mask, {1: "lung"}, vocab)
    right, left = ch[vocab.index("right lung")], ch[vocab.index("left lung")]
    assert right[:, :4].sum() == 12 and right[:, 4:].sum() == 0  # patient's right = image left
    assert left[:, 4:].sum() == 12 and left[:, :4].sum() == 0
    assert ch[vocab.index("lung infection")].sum() == 0


# ----------------------------------------------------------------------------- pipelines
def test_pipeline_items(tmp_path):
    site = load_site(make_site(tmp_path))
    item = xray_dataset(site, size=64)[0]
    assert item["image"].shape == (1, 64, 64) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["label"].shape == (3, 64, 64)
    assert set(torch.unique(item["label"]).tolist()) == {0.0, 1.0}
    assert item["label"][0].sum() == 4 * 64  # 8x8 square at 32 -> 16x16 at 64, nearest
    assert item["label"][0, 40:56, 8:24].all()  # still on the image's left, bottom (right lower zone)
    assert item["annotated"].tolist() == [True, False, False]
    assert item["task"] == 0 and item["caption"] == CAPTION and item["case_id"] == "img0"


def test_train_pipeline_augments_without_flips(tmp_path):
    site = load_site(make_site(tmp_path))
    names = [type(t).__name__ for t in xray_transforms(site, size=32, train=True).transforms]
    assert not [n for n in names if "Flip" in n or "Rotate90" in n]
    assert "RandAffined" in names
    torch.manual_seed(0)
    ds = xray_dataset(site, size=32, train=True)
    items = [ds[0] for _ in range(6)]
    assert all(i["label"].shape == (3, 32, 32) for i in items)
    assert all(set(torch.unique(i["label"]).tolist()) <= {0.0, 1.0} for i in items)
    assert any(not torch.equal(items[0]["image"], i["image"]) for i in items[1:])  # it does augment
    for i in items:  # mild: the lesion stays in the image's left half (the patient's right lung)
        ys, xs = torch.nonzero(i["label"][0], as_tuple=True)
        assert xs.float().mean() < 16


def test_unlabeled_case_gets_empty_target(tmp_path):
    rows = [{"image": "images/img0.png", "mask": "", "caption": CAPTION}]
    site = load_site(make_site(tmp_path, rows=rows))
    item = xray_dataset(site, size=32)[0]
    assert item["label"].shape == (3, 32, 32) and item["label"].sum() == 0
    assert not item["annotated"].any()


# ----------------------------------------------------------------------------- the real QaTa-COV19 data
@pytest.mark.skipif(not QATA.is_dir(), reason="shared QaTa-COV19 data (../shared/data/qata-cov19) is absent")
def test_real_qata_folder(tmp_path):
    before = sorted(p.name for p in QATA.iterdir())
    spec = {"format": "png-csv", "vocabulary": "chest-xray", "task": "qata-cov19",
            "label_map": {255: "lung infection"}, "root": str(QATA / "train"), "csv": str(QATA / "train.csv")}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(spec))
    site = load_site(tmp_path)
    assert len(site.cases) == 1500 and all(c.caption for c in site.cases[:50])
    assert check_xray_site(site, max_cases=8) == []
    item = xray_dataset(site, size=224)[0]
    assert item["image"].shape == (1, 224, 224) and item["label"].shape == (3, 224, 224)
    assert item["label"][0].sum() > 0 and item["caption"].endswith("lung.")
    assert sorted(p.name for p in QATA.iterdir()) == before


@pytest.mark.skipif(not QATA.is_dir(), reason="shared QaTa-COV19 data (../shared/data/qata-cov19) is absent")
def test_split_qata_non_iid_by_extent(tmp_path):
    folders = split_qata(QATA, tmp_path, n_sites=3, by="extent")
    means, seen = [], set()
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == ["site.yaml", "train.csv"]
        site = load_site(folder)
        ids = {c.case_id for c in site.cases}
        assert not ids & seen
        seen |= ids
        with (folder / "train.csv").open() as fh:
            means.append(np.mean([int(r["infected_areas"]) for r in csv.DictReader(fh)]))
    assert len(seen) == 1500
    assert means[0] < means[1] < means[2] and means[2] - means[0] > 2
    iid = split_qata(QATA, tmp_path / "iid", n_sites=3, by="random")
    assert len(iid) == 3
    with pytest.raises(ValueError, match="unknown split"):
        split_qata(QATA, tmp_path / "bad", by="age")
