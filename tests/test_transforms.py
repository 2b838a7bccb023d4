"""MONAI pipelines and cached datasets on real tiny NIfTI sites: shapes, ranges, sampling, tiles, DINO crops, caches."""

from __future__ import annotations

import os
from pathlib import PurePosixPath

import numpy as np
import pytest
import torch
from conftest import ras_affine

import fedtextseg.data.transforms as T
from fedtextseg.data.dataset import build_site_data, make_loader, split_cases
from fedtextseg.data.io import read_label
from fedtextseg.data.labels import labels_to_channels
from fedtextseg.data.site import load_site
from fedtextseg.data.transforms import (
    PreprocessConfig,
    invert_to_input,
    preprocess_transform,
    train_transform,
    val_transform,
)
from fedtextseg.errors import ConfigError, SiteError
from fedtextseg.vocab import get_vocabulary

VOCAB = get_vocabulary()
C = VOCAB.num_classes
NO_AUG = dict(flip_prob=0.0, rot90_prob=0.0, scale_intensity_prob=0.0, shift_intensity_prob=0.0, noise_prob=0.0,
              gamma_prob=0.0)


def item(case) -> dict:
    return {"image": str(case.image), "label": str(case.label), "case_id": case.case_id}


@pytest.fixture
def liver_site(make_nifti_site, tmp_path):
    return load_site(make_nifti_site(tmp_path / "liver", n_cases=3, label_map={1: "liver", 2: "liver tumor"}))


def test_config_validation_and_hash():
    cfg = PreprocessConfig()
    assert cfg.spacing == (1.5, 1.5, 1.5) and cfg.hu_window == (-175.0, 250.0) and cfg.patch_size == (96, 96, 96)
    assert cfg.pos_ratio == pytest.approx(2 / 3)
    assert PreprocessConfig.from_dict({"spacing": [1.5, 1.5, 1.5], "flip_prob": 0.5}).hash() == cfg.hash()
    assert PreprocessConfig(spacing=(2, 2, 2)).hash() != cfg.hash()
    with pytest.raises(ConfigError, match="unknown preprocessing option"):
        PreprocessConfig.from_dict({"spcing": [1, 1, 1]})
    with pytest.raises(ConfigError, match="multiple of the tile"):
        PreprocessConfig(patch_size=(96, 96, 96), tile=(14, 14))
    with pytest.raises(ConfigError, match="hu_window"):
        PreprocessConfig(hu_window=(250, -175))


def test_val_pipeline_keys_shapes_ranges(liver_site):
    cfg = PreprocessConfig(spacing=(2.0, 2.0, 2.0), patch_size=(16, 16, 16))
    out = val_transform(liver_site, cfg)(item(liver_site.cases[0]))
    image, label = out["image"], out["label"]
    assert image.dtype == torch.float32 and image.shape[0] == 1
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.max()) > 0.3
    assert label.dtype == torch.uint8 and label.shape == (C, *image.shape[1:])
    assert all(s >= 16 for s in image.shape[1:])
    np.testing.assert_allclose(np.diag(np.asarray(image.affine))[:3], (2.0, 2.0, 2.0))
    liver, tumor = label[VOCAB.index("liver")].bool(), label[VOCAB.index("liver tumor")].bool()
    assert tumor.any() and bool((liver | ~tumor).all())  # tumor voxels count toward the liver
    assert out["annotated"].dtype == torch.float32 and out["annotated"].shape == (C,)
    assert out["annotated"].nonzero().flatten().tolist() == [VOCAB.index("liver"), VOCAB.index("liver tumor")]
    assert out["task"] == VOCAB.task_index("lits") and out["case_id"] == "case_000"


def test_ras_and_las_sites_give_the_same_kidneys(make_nifti_site, tmp_path):
    shape = (24, 28, 20)
    las = ras_affine()
    las[0, 0], las[0, 3] = -1.5, 1.5 * (shape[0] - 1)

    def flip(i, image, label):
        return image[::-1].copy(), label[::-1].copy()

    kw = dict(n_cases=1, label_map={1: "kidney", 2: "kidney tumor"}, task="kits")
    ras_site = load_site(make_nifti_site(tmp_path / "ras", **kw))
    las_site = load_site(make_nifti_site(tmp_path / "las", affine=las, case_fn=flip, **kw))
    cfg = PreprocessConfig(patch_size=(16, 16, 16))
    a = val_transform(ras_site, cfg)(item(ras_site.cases[0]))["label"]
    b = val_transform(las_site, cfg)(item(las_site.cases[0]))["label"]
    assert torch.equal(a, b)
    right, left = a[VOCAB.index("right kidney")], a[VOCAB.index("left kidney")]
    x = torch.arange(a.shape[1]).view(-1, 1, 1).float()
    assert right.sum() > 0 and left.sum() > 0
    assert (x * right).sum() / right.sum() > (x * left).sum() / left.sum()  # RAS+: right kidney at higher x


def test_prediction_can_be_inverted_to_the_input_grid(liver_site, tmp_path):
    cfg = PreprocessConfig(patch_size=(32, 32, 32))  # native spacing, padding in every axis
    for _ in range(2):  # the second build loads the volume from the disk cache (made by other transform instances)
        data = build_site_data(liver_site, cfg, cache_dir=tmp_path, val_fraction=0.34)
        out = data.val_ds[0]
    case = data.val_cases[0]
    assert out["image"].shape[1:] != (24, 28, 20)
    inverted = invert_to_input(out["label"].float(), out["image"], liver_site, cfg, nearest=True)
    label = read_label(case.label)
    expected = labels_to_channels(label.array, label.affine, liver_site)
    assert tuple(inverted.shape) == (C, 24, 28, 20)
    np.testing.assert_allclose(np.asarray(inverted.affine), label.affine)
    np.testing.assert_array_equal(inverted.numpy().round().astype(np.uint8), expected)


def test_positive_centres_are_class_balanced(liver_site):
    """1-voxel crops show the drawn centre itself: the small tumour is a centre about as often as its large organ."""
    from fedtextseg.vocab import get_vocabulary

    tumor = get_vocabulary().index("liver tumor")
    cfg = PreprocessConfig(patch_size=(1, 1, 1), num_crops=400, pos_neg=(1, 0), **NO_AUG)
    tf = train_transform(liver_site, cfg)
    tf.set_random_state(0)
    crops = tf(item(liver_site.cases[0]))
    labels = torch.stack([c["label"].as_tensor()[:, 0, 0, 0] for c in crops])  # [400, C]
    annotated = crops[0]["annotated"].bool()
    assert labels[:, annotated].any(1).all()  # every centre is annotated foreground
    volume = preprocess_transform(liver_site, cfg)(item(liver_site.cases[0]))["label"]
    decoded = T.decode_codes(volume, T.LabelCoder.for_site(liver_site), has_channel=True)
    voxel_share = float(decoded[tumor].sum() / decoded[annotated].any(0).sum())
    assert voxel_share < 0.25  # uniform over foreground voxels would rarely centre on the tumour
    assert 0.35 < float(labels[:, tumor].float().mean()) < 0.65  # one of two classes: about half the centres


def test_gamma_and_noise_augment_the_image_only(liver_site):
    """Scanner-like augmentation (gamma contrast, Gaussian noise) changes the image of a crop, never its label."""
    case = item(liver_site.cases[0])
    plain = PreprocessConfig(patch_size=(8, 8, 8), num_crops=1, **NO_AUG)
    outs = {}
    for name, extra in (("none", {}), ("gamma", dict(gamma_prob=1.0, gamma_range=(2.0, 2.0))),
                        ("noise", dict(noise_prob=1.0, noise_std=0.2))):
        tf = train_transform(liver_site, PreprocessConfig(**{**plain.to_dict(), **extra}))
        tf.set_random_state(3)
        outs[name] = tf(case)[0]
    base = outs["none"]["image"].as_tensor()
    for name in ("gamma", "noise"):
        assert outs[name]["crop_start"].tolist() == outs["none"]["crop_start"].tolist()
        torch.testing.assert_close(outs[name]["label"], outs["none"]["label"])
        assert (outs[name]["image"].as_tensor() - base).abs().max() > 0.01, name
    lo, hi = base.min(), base.max()  # gamma 2 on the crop's own range: (x - lo)^2 / (hi - lo) + lo
    torch.testing.assert_close(outs["gamma"]["image"].as_tensor(), ((base - lo) / (hi - lo)) ** 2 * (hi - lo) + lo,
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="gamma_range"):
        PreprocessConfig(gamma_range=(0.0, 1.0))
    with pytest.raises(ConfigError, match="noise_std"):
        PreprocessConfig(noise_std=-1.0)


def test_train_crops_patch_shape_and_positive_sampling(liver_site):
    cfg = PreprocessConfig(patch_size=(8, 8, 8), num_crops=6, pos_neg=(1, 0), **NO_AUG)
    tf = train_transform(liver_site, cfg)
    tf.set_random_state(0)
    crops = tf(item(liver_site.cases[0]))
    assert len(crops) == 6
    annotated = crops[0]["annotated"].bool()
    for crop in crops:
        assert crop["image"].shape == (1, 8, 8, 8) and crop["label"].shape == (C, 8, 8, 8)
        assert crop["label"].dtype == torch.uint8
        assert 0.0 <= float(crop["image"].min()) <= float(crop["image"].max()) <= 1.0
        assert crop["label"][annotated].sum() > 0  # positive crops hold annotated foreground
    neg = train_transform(liver_site, PreprocessConfig(patch_size=(8, 8, 8), num_crops=6, pos_neg=(0, 1), **NO_AUG))
    neg.set_random_state(0)
    assert sum(int(c["label"][annotated].sum() > 0) for c in neg(item(liver_site.cases[0]))) < 6


def test_crop_starts_snap_to_the_tile_grid(liver_site):
    cfg = PreprocessConfig(patch_size=(8, 8, 8), num_crops=4, tile=(4, 4), pos_neg=(1, 0), **NO_AUG)
    cached = preprocess_transform(liver_site, cfg)(item(liver_site.cases[0]))
    assert cached["image"].shape[2] % 4 == 0 and cached["image"].shape[3] % 4 == 0
    tf = train_transform(liver_site, cfg)
    for seed in range(5):
        tf.set_random_state(seed)
        for crop in tf(item(liver_site.cases[0])):
            z0, y0, x0 = crop["crop_start"].tolist()
            assert y0 % 4 == 0 and x0 % 4 == 0
            assert crop["label"][crop["annotated"].bool()].sum() > 0  # snapping keeps the sampled voxel inside
            np.testing.assert_array_equal(crop["image"].numpy(), cached["image"][:, z0:z0 + 8, y0:y0 + 8, x0:x0 + 8])


def coordinate_features(tile=(4, 4, 2)):
    """feature_fn whose 'dino' encodes (slice, token row, token column) in its 3 feature channels."""
    th, tw, g = tile

    def feature_fn(image):
        d, h, w = image.shape[1:]
        hg, wg = -(-h // th) * g, -(-w // tw) * g
        zz, yy, xx = torch.meshgrid(torch.arange(d), torch.arange(hg), torch.arange(wg), indexing="ij")
        return {"dino": torch.stack([zz, yy, xx]).float(), "dino_tile": tile}

    return feature_fn


def test_dino_features_are_cropped_with_the_image(liver_site):
    cfg = PreprocessConfig(patch_size=(8, 8, 8), num_crops=3, **NO_AUG)
    tf = train_transform(liver_site, cfg, feature_fn=coordinate_features())
    for seed in range(4):
        tf.set_random_state(seed)
        for crop in tf(item(liver_site.cases[0])):
            z0, y0, x0 = crop["crop_start"].tolist()
            assert y0 % 4 == 0 and x0 % 4 == 0  # snapped to the feature tile even without cfg.tile
            dino = crop["dino"]
            assert tuple(dino.shape) == (3, 8, 4, 4)  # 8/4 tiles x 2 tokens per tile in-plane
            assert dino[0, :, 0, 0].tolist() == list(range(z0, z0 + 8))
            assert dino[1, 0, :, 0].tolist() == list(range(y0 // 4 * 2, y0 // 4 * 2 + 4))
            assert dino[2, 0, 0, :].tolist() == list(range(x0 // 4 * 2, x0 // 4 * 2 + 4))


def test_flips_with_dino_only_along_slices(liver_site):
    case = item(liver_site.cases[0])
    flip_all = dict(NO_AUG, flip_prob=1.0)
    cfg = PreprocessConfig(patch_size=(8, 8, 8), num_crops=1, orientation="SAR", **flip_all)  # slices first
    cached = preprocess_transform(liver_site, cfg)(case)["image"]

    crop = train_transform(liver_site, cfg, feature_fn=coordinate_features())(case)[0]
    z0, y0, x0 = crop["crop_start"].tolist()
    window = cached[:, z0:z0 + 8, y0:y0 + 8, x0:x0 + 8]
    np.testing.assert_array_equal(crop["image"].numpy(), window.flip(1).numpy())
    assert crop["dino"][0, :, 0, 0].tolist() == list(range(z0 + 7, z0 - 1, -1))  # features flipped alike
    assert crop["dino"][1, 0, :, 0].tolist() == sorted(crop["dino"][1, 0, :, 0].tolist())  # in-plane untouched

    crop = train_transform(liver_site, cfg)(case)[0]
    z0, y0, x0 = crop["crop_start"].tolist()
    window = cached[:, z0:z0 + 8, y0:y0 + 8, x0:x0 + 8]
    # SAR: axis 2 is left-right; the vocabulary has sided classes (kidneys), so that axis is never mirrored
    np.testing.assert_array_equal(crop["image"].numpy(), window.flip(1, 2).numpy())


def test_no_left_right_mirror_or_rotation_with_sided_classes(liver_site, make_nifti_site, tmp_path):
    """A right kidney mirrored is a left kidney: with sided classes neither the L-R flip nor in-plane rot90 runs,
    whichever axis the orientation puts left-right on."""
    from monai.transforms import RandFlipd, RandRotate90d

    for orientation, lr_axis in (("RAS", 0), ("SAR", 2), ("PLS", 1)):
        cfg = PreprocessConfig(patch_size=(8, 8, 8), num_crops=1, orientation=orientation, flip_prob=0.5,
                               rot90_prob=0.5)
        steps = train_transform(liver_site, cfg).transforms
        axes = sorted(int(t.flipper.spatial_axis) for t in steps if isinstance(t, RandFlipd))
        assert axes == sorted({0, 1, 2} - {lr_axis}), orientation
        assert not any(isinstance(t, RandRotate90d) for t in steps)


def test_persistent_cache_is_reused(liver_site, tmp_path, monkeypatch):
    reads = []
    real = T.read_nifti
    monkeypatch.setattr(T, "read_nifti", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    cfg = PreprocessConfig(patch_size=(16, 16, 16), num_crops=2)

    def run_epoch(**kw):
        data = build_site_data(liver_site, cfg, cache_dir=tmp_path / "cache", **kw)
        for ds in (data.train_ds, data.val_ds):
            for i in range(len(ds)):
                ds[i]
        return data

    data = run_epoch()
    assert len(reads) == 3 and data.cache_dir.parent == tmp_path / "cache"
    cached = list(data.cache_dir.glob("*.pt")) + list((data.cache_dir / "val").glob("*.pt"))  # val: own folder
    assert len(cached) == 3 and (data.cache_dir / "cache_info.json").is_file()
    run_epoch()
    assert len(reads) == 3  # second build: everything from the cache, no file read

    cfg = PreprocessConfig(patch_size=(16, 16, 16), num_crops=2, flip_prob=0.5)  # augmentation only: same cache
    assert run_epoch().cache_dir == data.cache_dir and len(reads) == 3
    case = liver_site.cases[0].image
    os.utime(case, ns=(os.stat(case).st_atime_ns, os.stat(case).st_mtime_ns + 10**9))  # an edited image is redone
    run_epoch()
    assert reads[3:] == [str(case)]
    cfg = PreprocessConfig(patch_size=(16, 16, 16), spacing=(2.0, 2.0, 2.0))
    assert run_epoch().cache_dir != data.cache_dir and len(reads) == 7


def test_a_half_filled_disk_cache_gives_batches_that_collate(liver_site, tmp_path):
    """An interrupted run leaves some cases cached: a batch of one cached and one freshly computed volume collates."""
    cfg = PreprocessConfig(patch_size=(16, 16, 16), num_crops=2)
    build_site_data(liver_site, cfg, cache_dir=tmp_path, val_fraction=0.0).train_ds[0]  # only case 0 is cached
    data = build_site_data(liver_site, cfg, cache_dir=tmp_path, val_fraction=0.0)
    assert len(list(data.cache_dir.glob("*.pt"))) == 1
    batch = next(iter(make_loader(data.train_ds, batch_size=2, shuffle=False)))  # case 0 from disk, case 1 computed
    assert batch["image"].shape == (4, 1, 16, 16, 16) and batch["annotated"].shape == (4, C)


def test_tampered_cache_file_is_not_unpickled(liver_site, tmp_path, monkeypatch):
    cfg = PreprocessConfig(patch_size=(16, 16, 16))
    data = build_site_data(liver_site, cfg, cache_dir=tmp_path, val_fraction=0.0)
    data.train_ds[0]
    (cached,) = [p for p in data.cache_dir.glob("*.pt")]
    torch.save({"image": PurePosixPath("/etc/passwd")}, cached)  # a global outside the allow-list
    reads = []
    real = T.read_nifti
    monkeypatch.setattr(T, "read_nifti", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    with pytest.warns(UserWarning, match="outside the allow-list"):
        crops = build_site_data(liver_site, cfg, cache_dir=tmp_path, val_fraction=0.0).train_ds[0]
    assert len(reads) == 1 and crops[0]["image"].shape == (1, 16, 16, 16)  # recomputed from the NIfTI file


def test_memory_cache_and_loader_collation(liver_site, monkeypatch):
    reads = []
    real = T.read_nifti
    monkeypatch.setattr(T, "read_nifti", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    cfg = PreprocessConfig(patch_size=(16, 16, 16), num_crops=2)
    data = build_site_data(liver_site, cfg, cache_dir=False, val_fraction=0.34)
    assert data.cache_dir is None and len(reads) == 3  # filled once when built
    loader = make_loader(data.train_ds, batch_size=2, shuffle=False)
    for _ in range(2):
        batch = next(iter(loader))
    assert len(reads) == 3
    assert batch["image"].shape == (4, 1, 16, 16, 16) and batch["label"].shape == (4, C, 16, 16, 16)
    assert batch["annotated"].shape == (4, C) and batch["task"].tolist() == [VOCAB.task_index("lits")] * 4
    val = next(iter(make_loader(data.val_ds, batch_size=1, shuffle=False)))
    assert val["label"].shape[:2] == (1, C) and val["label"].dtype == torch.uint8


def test_feature_key_required_for_disk_cache_and_part_of_the_key(liver_site, tmp_path):
    cfg = PreprocessConfig(patch_size=(16, 16, 16))
    with pytest.raises(ConfigError, match="feature_key"):
        build_site_data(liver_site, cfg, cache_dir=tmp_path, feature_fn=coordinate_features())
    a = build_site_data(liver_site, cfg, cache_dir=tmp_path, feature_fn=coordinate_features(), feature_key="dino-a")
    b = build_site_data(liver_site, cfg, cache_dir=tmp_path, feature_fn=coordinate_features(), feature_key="dino-b")
    assert a.cache_dir != b.cache_dir
    crop = a.train_ds[0][0]
    assert "dino" in crop and tuple(crop["dino_tile"]) == (4, 4, 2)
    assert "dino" not in a.val_ds[0]  # whole validation volumes: sliding windows compute their own features


def test_split_is_deterministic_and_disjoint(make_nifti_site, tmp_path):
    site = load_site(make_nifti_site(tmp_path / "s", n_cases=10, n_unlabeled=2, shape=(6, 7, 8)))
    train, val = split_cases(site.cases, 0.2, seed=0)
    assert len(val) == 2 and len(train) == 8 and not {c.case_id for c in train} & {c.case_id for c in val}
    assert split_cases(site.cases, 0.2, seed=0) == (train, val)
    assert {c.case_id for c in split_cases(site.cases, 0.2, seed=1)[1]} != {c.case_id for c in val}
    assert all(c.label is not None for c in train + val)


def test_bad_file_surfaces_as_site_error_through_the_dataset(liver_site, tmp_path):
    liver_site.cases[0].image.write_bytes(b"not a nifti")
    data = build_site_data(liver_site, PreprocessConfig(patch_size=(16, 16, 16)), cache_dir=tmp_path,
                           val_fraction=0.0)
    with pytest.raises(SiteError) as info:
        for i in range(len(data.train_ds)):
            data.train_ds[i]
    assert info.value.path == str(liver_site.cases[0].image) and "cannot read as NIfTI" in info.value.problem
    with pytest.raises(SiteError, match="cannot read as NIfTI"):
        build_site_data(liver_site, PreprocessConfig(patch_size=(16, 16, 16)), cache_dir=False)


def _fill_cache_in_a_process(site_root: str, cache_dir: str, barrier) -> int:
    """Child of the two-writer test: wait for the other writer, then preprocess every case into one cache."""
    from fedtextseg.data.dataset import build_site_data
    from fedtextseg.data.site import load_site
    from fedtextseg.data.transforms import PreprocessConfig

    data = build_site_data(load_site(site_root), PreprocessConfig(patch_size=(16, 16, 16), num_crops=2),
                           cache_dir=cache_dir, val_fraction=0.0)
    barrier.wait(timeout=60)
    for _ in range(3):  # both processes write every entry, over and over, while the other reads them
        for i in range(len(data.train_ds)):
            assert data.train_ds[i][0]["image"].shape == (1, 16, 16, 16)
    return len(data.train_ds)


def test_two_processes_filling_one_cache_leave_every_entry_whole(make_nifti_site, tmp_path):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    site = load_site(make_nifti_site(tmp_path / "site", n_cases=4, shape=(20, 20, 20)))
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        futures = [pool.submit(_fill_cache_in_a_process, str(site.root), str(tmp_path / "cache"), barrier)
                   for _ in range(2)]
        assert [f.result(timeout=300) for f in futures] == [4, 4]
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    entries = sorted(folder.glob("*.pt"))
    assert len(entries) == 4
    cfg = PreprocessConfig(patch_size=(16, 16, 16), num_crops=2)
    data = build_site_data(site, cfg, cache_dir=tmp_path / "cache", val_fraction=0.0)
    ids = set()
    for entry in entries:  # every entry is a whole case, each case once
        cached = torch.load(entry, weights_only=False)
        assert cached["image"].shape == cached["label"].shape[:1] + cached["image"].shape[1:]
        ids.add(cached["case_id"])
    assert ids == {c.case_id for c in data.train_cases}


@pytest.mark.parametrize("damage", ["truncated", "not a torch file", "another case's entry", "not a dict"])
def test_a_damaged_or_foreign_cache_entry_is_rebuilt_not_loaded(liver_site, tmp_path, monkeypatch, damage):
    cfg = PreprocessConfig(patch_size=(16, 16, 16))
    data = build_site_data(liver_site, cfg, cache_dir=tmp_path, val_fraction=0.0)
    data.train_ds[0], data.train_ds[1]
    first, second = (data.cache_dir / f"{data.train_ds.hash_func(it).decode()}.pt" for it in data.train_ds.data[:2])
    assert first.is_file() and second.is_file()
    if damage == "truncated":  # a writer killed mid-file (what a non-atomic cache could leave)
        first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    elif damage == "not a torch file":
        first.write_text("not a tensor")
    elif damage == "another case's entry":
        first.write_bytes(second.read_bytes())
    else:
        torch.save([torch.zeros(3)], first)
    reads = []
    real = T.read_nifti
    monkeypatch.setattr(T, "read_nifti", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    fresh = build_site_data(liver_site, cfg, cache_dir=tmp_path, val_fraction=0.0)
    with pytest.warns(UserWarning, match=f"{first.name}: cache entry .*preprocessing the case again"):
        crops = fresh.train_ds[0]
    assert reads == [str(liver_site.cases[0].image)]  # recomputed from its own NIfTI file
    assert crops[0]["case_id"] == fresh.train_cases[0].case_id
    assert torch.load(first, weights_only=False)["case_id"] == fresh.train_cases[0].case_id  # and rewritten whole
    fresh.train_ds[0]
    assert len(reads) == 1  # the rebuilt entry is used from now on
