"""Synthetic hospitals: site folders load, labels are partial as declared, anatomy is plausible and deterministic."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from scipy import ndimage as ndi

from fedtextseg.synthetic.phantom import FULL_LABEL_VALUES as FULL
from fedtextseg.synthetic.phantom import MODELED_CLASSES, TUMOR_HOSTS
from fedtextseg.data.site import load_site
from fedtextseg.synthetic.ct import (
    ScannerTraits,
    generate_hospitals,
    load_synthetic_case,
    make_phantom,
    synth_main,
)
from fedtextseg.errors import ConfigError

SHAPE = (48, 48, 48)
NAMES = ["site01-btcv", "site02-lits", "site03-kits", "site04-msd", "unseen"]
ORGANS_BTCV = ["spleen", "right kidney", "left kidney", "gall bladder", "liver", "stomach", "aorta", "postcava",
               "pancreas"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "fed"
    paths = generate_hospitals(out, sites=4, cases_per_site=2, seed=3, shape=SHAPE, full_labels=True)
    assert [p.name for p in paths] == NAMES
    return out


def _arr(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_sites_load_with_declared_task_classes_and_layout(fed):
    expected = {
        "site01-btcv": ("btcv", ORGANS_BTCV),
        "site02-lits": ("lits", ["liver", "liver tumor"]),
        "site03-kits": ("kits", ["right kidney", "left kidney", "kidney tumor"]),
        "site04-msd": ("msd", ["pancreas", "pancreas tumor"]),
        "unseen": ("btcv", list(MODELED_CLASSES)),
    }
    for name, (task, classes) in expected.items():
        site = load_site(fed / name)
        assert site.task == task and site.name == name
        assert sorted(site.annotated) == sorted(classes)
        assert [c.case_id for c in site.labeled_cases] == ["case_000", "case_001"]
        spec = yaml.safe_load((fed / name / "site.yaml").read_text())
        assert spec["synthetic"]["seed"] == 3 and spec["format"] == "nifti" and spec["vocabulary"] == "abdomen-ct"
        traits = spec["synthetic"]["scanner"]
        img, lab = nib.load(site.cases[0].image), nib.load(site.cases[0].label)
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        assert img.shape == lab.shape == SHAPE and np.allclose(img.affine, lab.affine)
        assert np.allclose(img.header.get_zooms(), traits["spacing"], atol=1e-4)
        assert "".join(nib.aff2axcodes(img.affine)) == traits["orientation"]
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert load_site(fed / "site03-kits").label_map == {1: "kidney", 2: "kidney tumor"}
    fedspec = yaml.safe_load((fed / "federation.yaml").read_text())
    assert [s["path"] for s in fedspec["sites"]] == NAMES[:4] and fedspec["unseen"]["path"] == "unseen"


def test_deterministic_bytes_and_seed_dependence(fed, tmp_path):
    again = generate_hospitals(tmp_path / "again", sites=4, cases_per_site=2, seed=3, shape=SHAPE, full_labels=True)
    for site in again:
        for f in sorted(p for p in site.rglob("*") if p.is_file()):
            assert f.read_bytes() == (fed / f.relative_to(tmp_path / "again")).read_bytes(), f
    # more sites, fewer cases: the first sites' cases are unchanged; a 5th site cycles back to the BTCV profile
    more = generate_hospitals(tmp_path / "more", sites=5, cases_per_site=1, seed=3, shape=SHAPE, unseen=False)
    for name in NAMES[:4]:
        assert (tmp_path / "more" / name / "images/case_000.nii.gz").read_bytes() == \
            (fed / name / "images/case_000.nii.gz").read_bytes()
    assert more[-1].name == "site05-btcv" and load_site(more[-1]).task == "btcv"
    s1 = yaml.safe_load((fed / "site01-btcv/site.yaml").read_text())["synthetic"]["scanner"]
    s5 = yaml.safe_load((more[-1] / "site.yaml").read_text())["synthetic"]["scanner"]
    assert s1["spacing"] != s5["spacing"] and s1["noise_sd"] != s5["noise_sd"]
    other = generate_hospitals(tmp_path / "other", sites=1, cases_per_site=1, seed=4, shape=SHAPE, unseen=False)
    a, b = _arr(other[0] / "images/case_000.nii.gz"), _arr(fed / "site01-btcv/images/case_000.nii.gz")
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_parallel_workers_write_the_same_bytes(tmp_path):
    kw = dict(sites=2, cases_per_site=2, seed=5, shape=(24, 24, 24), unseen=False)
    serial, parallel = generate_hospitals(tmp_path / "s", **kw), generate_hospitals(tmp_path / "p", workers=2, **kw)
    for a, b in zip(serial, parallel):
        files = sorted(f.relative_to(a) for f in a.rglob("*") if f.is_file())
        assert files == sorted(f.relative_to(b) for f in b.rglob("*") if f.is_file()) and len(files) == 5
        assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_labels_are_partial_organs_present_but_background(fed):
    for name, value_of in [("site02-lits", {1: ["liver"], 2: ["liver tumor"]}),
                           ("site03-kits", {1: ["right kidney", "left kidney"], 2: ["kidney tumor"]}),
                           ("site04-msd", {1: ["pancreas"], 2: ["pancreas tumor"]})]:
        for case in (0, 1):
            ph = load_synthetic_case(fed / name, case)
            img = _arr(fed / name / f"images/case_{case:03d}.nii.gz")
            lab = _arr(fed / name / f"labels/case_{case:03d}.nii.gz")
            assert np.array_equal(ph.image, img)  # the synthetic block rebuilds the exact case
            full = ph.label
            assert np.array_equal(full, _arr(fed / name / f"full_labels/case_{case:03d}.nii.gz"))
            assert set(np.unique(lab)) <= {0, 1, 2}
            for v, classes in value_of.items():
                assert np.array_equal(lab == v, np.isin(full, [FULL[c] for c in classes]))
            labelled = [c for cs in value_of.values() for c in cs]
            for organ in ("liver", "spleen", "right kidney", "left kidney", "pancreas", "aorta"):
                if organ in labelled:
                    continue
                where = full == FULL[organ]
                assert where.sum() > 10, (name, organ)  # present in the patient ...
                assert (lab[where] == 0).all()  # ... but background in this site's labels
                assert 0 < np.median(img[where]) < 400  # and visible as soft tissue in the image
    # BTCV labels tumours as their organ; the unseen hospital labels everything with vocabulary numbers
    ph = load_synthetic_case(fed / "site01-btcv", 0)
    lab = _arr(fed / "site01-btcv/labels/case_000.nii.gz")
    assert set(np.unique(lab)) <= {0, 1, 2, 3, 4, 6, 7, 8, 9, 11}
    assert (lab[ph.label == FULL["liver"]] == 6).all() and (lab[ph.label == FULL["liver tumor"]] == 6).all()
    unseen = _arr(fed / "unseen/labels/case_000.nii.gz")
    assert np.array_equal(unseen, load_synthetic_case(fed / "unseen", 0).label)
    assert set(np.unique(unseen)) == {0, *FULL.values()}  # case 0 of the unseen site has every class


def test_organs_on_anatomical_sides_in_world_coordinates(fed):
    orientations = set()
    for name in NAMES:
        ph = load_synthetic_case(fed / name, 0)
        orientations.add("".join(nib.aff2axcodes(ph.affine)))
        full, mid = ph.label, ph.meta["midline_world_x"]
        fov_centre = ph.affine[:3, :3] @ ((np.array(SHAPE) - 1) / 2) + ph.affine[:3, 3]
        c = {k: ph.world_centroid(np.isin(full, [FULL[k]] + ([FULL["liver tumor"]] if k == "liver" else [])))
             for k in ("liver", "spleen", "right kidney", "left kidney", "aorta", "postcava", "stomach")}
        # RAS+: +x is the patient's right; the liver and right kidney lie at larger world x than the midline
        assert c["liver"][0] > mid + 10 and c["spleen"][0] < mid - 30 and c["stomach"][0] < mid
        assert c["right kidney"][0] > fov_centre[0] + 20 and c["left kidney"][0] < fov_centre[0] - 20
        assert c["aorta"][0] < mid < c["postcava"][0]
        assert c["liver"][2] > c["right kidney"][2] and c["spleen"][2] > c["left kidney"][2]  # superior
        assert c["aorta"][1] < c["liver"][1] and c["right kidney"][1] < c["liver"][1]  # posterior
    assert len(orientations) >= 3  # flipped storage did not change the anatomy


def test_tumors_lie_inside_their_organ(fed):
    seen = set()
    for name in NAMES:
        for case in (0, 1):
            full = load_synthetic_case(fed / name, case).label
            for tumor, hosts in TUMOR_HOSTS.items():
                t = full == FULL[tumor]
                if not t.any():
                    continue
                seen.add(tumor)
                ring = ndi.binary_dilation(t) & ~t
                assert np.isin(full[ring], [FULL[h] for h in hosts]).all(), (name, case, tumor)
    assert seen == set(TUMOR_HOSTS)
    # focus tumours: in case 0 of their site, not in case 1
    for name, value in (("site02-lits", 2), ("site03-kits", 2), ("site04-msd", 2)):
        assert (_arr(fed / name / "labels/case_000.nii.gz") == value).any()
        assert not (_arr(fed / name / "labels/case_001.nii.gz") == value).any()


def test_hu_ranges_plausible(fed):
    ph = load_synthetic_case(fed / "unseen", 0)
    img, full = ph.image, ph.label

    def med(*classes):
        return float(np.median(img[np.isin(full, [FULL[c] for c in classes])]))

    assert 20 < med("liver") < 160 and 20 < med("spleen") < 160
    assert med("aorta") > med("liver") + 30 and med("right kidney") > med("liver")
    assert med("gall bladder") < med("liver") - 20
    assert abs(med("liver tumor") - med("liver")) > 10
    assert img.max() > 300  # bone
    assert np.percentile(img, 5) < -800  # air around the patient
    assert ((img > -200) & (img < -50)).mean() > 0.03  # fat


def test_scanner_traits_differ_between_sites(fed):
    specs = [yaml.safe_load((fed / n / "site.yaml").read_text())["synthetic"]["scanner"] for n in NAMES]
    for key in ("spacing", "hu_offset", "hu_gain", "noise_sd", "contrast"):
        values = [str(s[key]) for s in specs]
        assert len(set(values)) == len(values), key
    zooms = [nib.load(fed / n / "images/case_000.nii.gz").header.get_zooms() for n in NAMES]
    assert len(set(zooms)) == len(NAMES)
    aorta = [float(np.median(p.image[p.label == FULL["aorta"]])) for p in
             (load_synthetic_case(fed / n, 0) for n in NAMES)]
    assert max(aorta) - min(aorta) > 20  # contrast phase / calibration really differ


def test_refuses_to_overwrite_and_force_removes_only_own_files(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    kw = dict(cases_per_site=1, shape=(24, 24, 24), unseen=False)
    with pytest.raises(ConfigError, match="--force"):
        generate_hospitals(out, sites=2, **kw)
    generate_hospitals(out, sites=2, force=True, **kw)
    (out / "site01-btcv" / "extra.txt").write_text("keep me")
    generate_hospitals(out, sites=1, force=True, **kw)  # site02 was ours: removed
    assert not (out / "site02-lits").exists() and (out / "notes.txt").read_text() == "mine"
    assert (out / "site01-btcv" / "extra.txt").exists()
    (out / "site01-btcv" / "images" / "scan.nii.gz").write_bytes(b"x")
    with pytest.raises(ConfigError, match="did not write"):
        generate_hospitals(out, sites=1, force=True, **kw)
    assert (out / "site01-btcv" / "images" / "case_000.nii.gz").exists()  # nothing deleted on refusal
    foreign = tmp_path / "f"
    (foreign / "site01-btcv").mkdir(parents=True)
    (foreign / "site01-btcv" / "data.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not written by"):
        generate_hospitals(foreign, sites=1, force=True, **kw)


def test_cli_summary_and_errors(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "c"), "--sites", "2", "--cases-per-site", "1", "--shape", "24", "24", "24",
            "--no-unseen", "--seed", "7"]
    assert synth_main(argv) == 0
    printed = capsys.readouterr().out
    assert "site01-btcv" in printed and "site02-lits" in printed and "liver tumor" in printed
    assert not (tmp_path / "c" / "unseen").exists()
    assert synth_main(argv) == 2 and "--force" in capsys.readouterr().err
    assert synth_main(argv + ["--force"]) == 0


def test_invalid_inputs_are_refused():
    with pytest.raises(ConfigError):
        ScannerTraits(orientation="XYZ")
    with pytest.raises(ConfigError):
        make_phantom(np.random.default_rng(0), (24, 24, 24), ScannerTraits(), tumors=["lung tumor"])
    with pytest.raises(ConfigError):
        generate_hospitals("/nonexistent-never-written", sites=0)
