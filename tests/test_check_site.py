"""check-site on a clean site and on each kind of broken file, written for real to disk."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from conftest import ras_affine, write_nifti

from fedtextseg.data.checks import check_site, check_site_main
from fedtextseg.errors import SiteError


@pytest.fixture
def site_root(make_nifti_site, tmp_path):
    return make_nifti_site(tmp_path / "hospital", n_cases=3, label_map={1: "liver", 2: "liver tumor"})


def problems_for(report, filename):
    return [p for path, p in report.problems if os.path.basename(path) == filename]


def test_clean_site_is_ok_and_summarised(site_root, capsys):
    report = check_site(site_root)
    assert report.ok and report.problems == [] and report.cases_checked == 3
    assert report.n_cases == report.n_labeled == 3
    assert report.spacing_range == ((1.5, 1.5, 1.5), (1.5, 1.5, 1.5))
    assert report.shape_range == ((24, 28, 20), (24, 28, 20))
    assert report.voxel_counts["liver"] > report.voxel_counts["liver tumor"] > 0  # tumor counted in the liver
    text = report.format_text()
    assert "RESULT: OK" in text and "liver tumor" in text and "24 x 28 x 20" in text
    assert check_site_main([str(site_root)]) == 0
    assert "RESULT: OK" in capsys.readouterr().out


def test_truncated_gzip(site_root):
    path = site_root / "images" / "case_001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    (problem,) = problems_for(check_site(site_root), "case_001.nii.gz")
    assert "damaged or truncated" in problem


def test_random_bytes_named_nii_gz(site_root):
    (site_root / "labels" / "case_002.nii.gz").write_bytes(np.random.default_rng(0).bytes(4000))
    (problem,) = problems_for(check_site(site_root), "case_002.nii.gz")
    assert "cannot read as NIfTI" in problem and "not a gzip file" in problem


def test_shape_mismatch(site_root):
    write_nifti(site_root / "labels" / "case_000.nii.gz", np.zeros((24, 28, 19), np.uint8))
    problems = problems_for(check_site(site_root), "case_000.nii.gz")
    assert any("label shape (24, 28, 19) differs from image shape (24, 28, 20)" in p for p in problems)


def test_affine_mismatch(site_root):
    path = site_root / "labels" / "case_000.nii.gz"
    label = np.asarray(nib.load(path).dataobj)
    write_nifti(path, label, ras_affine(origin=(0.0, 0.0, 3.0)))
    (problem,) = problems_for(check_site(site_root), "case_000.nii.gz")
    assert "affine differs" in problem and "by up to 3" in problem
    # below the tolerance is fine
    write_nifti(path, label, ras_affine(origin=(0.0, 0.0, 1e-5)))
    assert check_site(site_root).ok


def test_undeclared_label_values(site_root):
    path = site_root / "labels" / "case_001.nii.gz"
    label = np.asarray(nib.load(path).dataobj).copy()
    label[0, 0, 0], label[1, 0, 0] = 5, 9
    write_nifti(path, label)
    (problem,) = problems_for(check_site(site_root), "case_001.nii.gz")
    assert "label values 5, 9 are not declared" in problem


def test_annotated_class_empty_everywhere(make_nifti_site, tmp_path):
    def no_tumor(i, image, label):
        return image, np.where(label == 2, 1, label).astype(np.uint8)

    root = make_nifti_site(tmp_path / "nt", label_map={1: "liver", 2: "liver tumor"}, case_fn=no_tumor)
    report = check_site(root)
    assert len(report.problems) == 1
    path, problem = report.problems[0]
    assert path.endswith("labels") and "'liver tumor' is empty in every labeled case" in problem


def test_nan_intensities(site_root):
    path = site_root / "images" / "case_002.nii.gz"
    image = np.asarray(nib.load(path).dataobj).astype(np.float32)
    image[3, 4, 5], image[6, 7, 8] = np.nan, np.inf
    write_nifti(path, image)
    (problem,) = problems_for(check_site(site_root), "case_002.nii.gz")
    assert "2 non-finite voxel values (1 NaN, 1 Inf)" in problem


def test_2d_file_where_3d_expected(site_root):
    write_nifti(site_root / "images" / "case_000.nii.gz", np.zeros((24, 28), np.float32))
    problems = problems_for(check_site(site_root), "case_000.nii.gz")
    assert problems == ["2D file (shape (24, 28)); expected a 3D volume"]


def test_4d_file_and_singular_affine(site_root):
    write_nifti(site_root / "images" / "case_000.nii.gz", np.zeros((24, 28, 20, 3), np.float32))
    singular = ras_affine()
    singular[:, 2] = 0.0  # nibabel refuses to derive a qform from it: store it as the sform only
    img = nib.Nifti1Image(np.zeros((24, 28, 20), np.float32), None)
    img.set_sform(singular, code=2)
    img.set_qform(None, code=0)
    nib.save(img, str(site_root / "images" / "case_001.nii.gz"))
    report = check_site(site_root)
    assert "4D file with 3 volumes" in problems_for(report, "case_000.nii.gz")[0]
    assert "affine cannot be inverted" in problems_for(report, "case_001.nii.gz")[0]


def break_three_cases(root):
    (root / "images" / "case_000.nii.gz").write_bytes(b"garbage")
    write_nifti(root / "labels" / "case_001.nii.gz", np.full((24, 28, 20), 4, np.uint8))
    write_nifti(root / "images" / "case_002.nii.gz", np.full((24, 28, 20), np.nan, np.float32))


def test_full_reports_every_bad_case_and_quick_stops_at_first(site_root, capsys):
    break_three_cases(site_root)
    full = check_site(site_root, full=True)
    bad_files = sorted({os.path.relpath(p, site_root) for p, _ in full.problems})
    assert bad_files == ["images/case_000.nii.gz", "images/case_002.nii.gz", "labels/case_001.nii.gz"]
    assert not full.stopped_early and full.cases_checked == 3

    quick = check_site(site_root, full=False)
    assert [os.path.relpath(p, site_root) for p, _ in quick.problems] == ["images/case_000.nii.gz"]
    assert quick.stopped_early and quick.cases_checked == 1

    assert check_site_main([str(site_root), "--full"]) == 1
    out = capsys.readouterr().out
    assert "problems (3)" in out and "labels/case_001.nii.gz: label value 4 is not declared" in out and "RESULT: problems found" in out
    assert check_site_main([str(site_root)]) == 1
    assert "stopped at the first bad case" in capsys.readouterr().out


def test_unreadable_site_exits_2(tmp_path, capsys):
    assert check_site_main([str(tmp_path / "nowhere")]) == 2
    assert "site folder does not exist" in capsys.readouterr().err
    (tmp_path / "site.yaml").write_text("task: lits\nlabel_map: {1: cancer}\n")
    assert check_site_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "site.yaml" in err and "'cancer'" in err
    with pytest.raises(SiteError):
        check_site(tmp_path / "nowhere")


def test_vocabulary_option_is_used(site_root, capsys):
    assert check_site_main([str(site_root), "--vocabulary", "chest-xray"]) == 2  # liver is not an X-ray class
    assert "unknown class name 'liver'" in capsys.readouterr().err


def test_xray_sites_are_delegated_and_notes_do_not_fail(tmp_path, capsys):
    from PIL import Image

    from fedtextseg.synthetic.xray import generate_xray_hospitals

    (root,) = generate_xray_hospitals(tmp_path, sites=1, images_per_site=3, size=32)
    report = check_site(root)
    assert report.format == "png-csv" and report.ok and report.cases_checked == 3
    masks = sorted(p for p in root.rglob("*.png") if "mask" in str(p.relative_to(root)))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks[0])  # an empty mask: a note, not a problem
    report = check_site(root)
    assert report.ok and len(report.notes) == 1 and "empty" in report.notes[0][1]
    masks[1].write_bytes(b"not a png")
    report = check_site(root)
    assert not report.ok and [os.path.basename(p) for p, _ in report.problems] == [masks[1].name]
    assert check_site_main([str(root)]) == 1 and "notes (1)" in capsys.readouterr().out
