"""Site folders: native site.yaml, MSD dataset.json (with and without a site.yaml override), nnU-Net names."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from conftest import write_nifti

from fedtextseg.data.io import read_header, read_label, read_nifti
from fedtextseg.data.site import load_site
from fedtextseg.errors import SiteError

TASK03_LABELS = {"0": "background", "1": "liver", "2": "cancer"}


def test_native_site_pairs_cases_and_resolves_names(make_nifti_site, tmp_path):
    root = make_nifti_site(tmp_path / "h", label_map={1: "Kidney", 2: "kidney_tumour"}, task="KiTS19",
                           n_cases=2, n_unlabeled=1)
    site = load_site(root)
    assert site.label_map == {1: "kidney", 2: "kidney tumor"}
    assert site.annotated == ["right kidney", "left kidney", "kidney tumor"]
    assert site.task == "kits" and site.task_index == 4
    assert [c.case_id for c in site.cases] == ["case_000", "case_001", "case_002"]
    assert [c.case_id for c in site.labeled_cases] == ["case_000", "case_001"]
    assert site.cases[2].label is None


def test_total_segmentator_style_label_map(make_nifti_site, tmp_path):
    tseg = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
            7: "aorta", 8: "inferior_vena_cava", 9: "portal_vein_and_splenic_vein", 10: "pancreas",
            11: "adrenal_gland_right", 12: "adrenal_gland_left", 13: "esophagus"}
    site = load_site(make_nifti_site(tmp_path / "ts", label_map=tseg, task="btcv", n_cases=1))
    assert site.label_map[2] == "right kidney" and site.label_map[8] == "postcava"
    assert site.label_map[11] == "right adrenal gland" and site.label_map[4] == "gall bladder"
    assert len(site.annotated) == 13


def test_msd_task03_without_override_suggests_close_matches(make_nifti_site, tmp_path):
    root = make_nifti_site(tmp_path / "Task03_Liver", name="LITS", layout="msd", msd_labels=TASK03_LABELS,
                           site_yaml=False, label_map={1: "liver", 2: "liver tumor"})
    with pytest.raises(SiteError) as info:
        load_site(root)
    err = info.value
    assert err.path.endswith("dataset.json")
    assert "'cancer'" in err.problem and "did you mean" in err.problem and "liver cancer" in err.problem
    assert "site.yaml" in err.problem  # says how to fix it


def test_msd_task03_with_site_yaml_override(make_nifti_site, tmp_path):
    root = make_nifti_site(tmp_path / "Task03_Liver", name="LITS", layout="msd", msd_labels=TASK03_LABELS,
                           site_yaml={"label_map": {1: "liver", 2: "liver tumor"}},
                           label_map={1: "liver", 2: "liver tumor"})
    site = load_site(root)
    assert site.label_map == {1: "liver", 2: "liver tumor"}
    assert site.task == "lits"  # guessed from dataset.json's name
    assert len(site.labeled_cases) == 3 and site.cases[0].image.parent.name == "imagesTr"


def test_nnunet_v2_dataset_json_labels_are_inverted(make_nifti_site, tmp_path):
    root = make_nifti_site(tmp_path / "Dataset009_Spleen", name="Spleen", layout="msd", site_yaml=False,
                           msd_labels={"background": 0, "spleen": 1}, label_map={1: "spleen"})
    site = load_site(root)
    assert site.label_map == {1: "spleen"} and site.task == "msd"


def test_nnunet_channel_suffix_pairs_with_label(tmp_path):
    root = tmp_path / "nn"
    for case in ("liver_001", "liver_002"):
        write_nifti(root / "images" / f"{case}_0000.nii.gz", np.zeros((4, 5, 6), np.float32))
        write_nifti(root / "labels" / f"{case}.nii.gz", np.zeros((4, 5, 6), np.uint8))
    (root / "site.yaml").write_text(yaml.safe_dump({"task": "lits", "label_map": {1: "liver"}}))
    site = load_site(root)
    assert [(c.case_id, c.label.name) for c in site.cases] == [("liver_001", "liver_001.nii.gz"),
                                                               ("liver_002", "liver_002.nii.gz")]


def test_four_digit_case_names_are_not_mistaken_for_channels(tmp_path):
    root = tmp_path / "plain"
    for i in range(1, 4):  # case_0001 .. case_0003, unlabeled: must stay three cases
        write_nifti(root / "images" / f"case_{i:04d}.nii.gz", np.zeros((4, 5, 6), np.float32))
    (root / "site.yaml").write_text(yaml.safe_dump({"task": "lits", "label_map": {1: "liver"}}))
    assert [c.case_id for c in load_site(root).cases] == ["case_0001", "case_0002", "case_0003"]


def test_two_channels_of_one_case_are_refused(tmp_path):
    root = tmp_path / "multi"
    for ch in (0, 1):
        write_nifti(root / "images" / f"a_{ch:04d}.nii.gz", np.zeros((4, 5, 6), np.float32))
    write_nifti(root / "labels" / "a.nii.gz", np.zeros((4, 5, 6), np.uint8))
    (root / "site.yaml").write_text(yaml.safe_dump({"task": "lits", "label_map": {1: "liver"}}))
    with pytest.raises(SiteError, match="more than one image for case 'a'"):
        load_site(root)


def test_orphan_labels_and_missing_label_folder(make_nifti_site, tmp_path):
    root = make_nifti_site(tmp_path / "o", n_cases=1)
    write_nifti(root / "labels" / "ghost.nii.gz", np.zeros((4, 5, 6), np.uint8))
    with pytest.raises(SiteError, match="labels without an image: ghost"):
        load_site(root)
    root2 = make_nifti_site(tmp_path / "m", n_cases=1, site_yaml={"labels": "segmentations"})
    with pytest.raises(SiteError, match="label folder named in site.yaml does not exist"):
        load_site(root2)


def test_not_a_site_and_bad_json(tmp_path):
    with pytest.raises(SiteError, match="not a site"):
        load_site(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(SiteError, match="cannot read dataset.json"):
        load_site(tmp_path)


def test_readers_return_checked_volumes(make_nifti_site, tmp_path):
    root = make_nifti_site(tmp_path / "r", n_cases=1)
    site = load_site(root)
    image, affine, info = read_nifti(site.cases[0].image)
    assert image.shape == (24, 28, 20) and image.dtype == np.float32 and affine.shape == (4, 4)
    assert info["spacing"] == (1.5, 1.5, 1.5) and info["orientation"] == "RAS"
    label = read_label(site.cases[0].label)
    assert np.issubdtype(label.array.dtype, np.integer) and set(np.unique(label.array)) <= {0, 1, 2}
    header_affine, header_info = read_header(site.cases[0].image)
    np.testing.assert_array_equal(header_affine, affine)
    assert header_info["shape"] == (24, 28, 20)


def test_single_volume_4d_file_reads_as_3d(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", np.ones((6, 7, 8, 1), np.float32))
    assert read_nifti(path).array.shape == (6, 7, 8)


def test_float_labels_must_be_integers(tmp_path):
    path = write_nifti(tmp_path / "lab.nii.gz", np.full((4, 5, 6), 1.5, np.float32))
    with pytest.raises(SiteError, match="non-integer values"):
        read_label(path)
    path = write_nifti(tmp_path / "lab2.nii.gz", np.full((4, 5, 6), 2.0, np.float32))
    assert read_label(path).array.dtype == np.int32
