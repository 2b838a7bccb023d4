"""Real hospitals' label maps: TotalSegmentator's v2 name table resolves through the vocabulary's synonyms, classes
outside the vocabulary are refused with their names or, with ``unmapped: ignore``, become voxels nobody learns from
(not annotated, never background) in labels, losses, metrics and check-site."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from fedtextseg.data.checks import check_site
from fedtextseg.data.dataset import build_site_data
from fedtextseg.data.labels import LabelCoder, decode_codes, encode_labels
from fedtextseg.data.site import load_site
from fedtextseg.data.transforms import PreprocessConfig
from fedtextseg.errors import SiteError
from fedtextseg.losses import ConditionalDistillation, NaiveSoftmaxLoss, PartialLabelLoss, SoftmaxLabelSpace, \
    overlap_matrix
from fedtextseg.vocab import get_vocabulary

VOCAB = get_vocabulary()
TOTALSEG = {int(k): v for k, v in
            json.loads((Path(__file__).parent / "data" / "totalsegmentator_v2_total.json").read_text())["labels"].items()}
# what each TotalSegmentator class the vocabulary knows becomes (the rest: vertebrae, ribs, femurs, muscles, ...)
EXPECTED = {
    "spleen": "spleen", "kidney_right": "right kidney", "kidney_left": "left kidney", "gallbladder": "gall bladder",
    "liver": "liver", "stomach": "stomach", "pancreas": "pancreas", "adrenal_gland_right": "right adrenal gland",
    "adrenal_gland_left": "left adrenal gland", "lung_upper_lobe_left": "left lung", "lung_lower_lobe_left": "left lung",
    "lung_upper_lobe_right": "right lung", "lung_middle_lobe_right": "right lung", "lung_lower_lobe_right": "right lung",
    "esophagus": "esophagus", "small_bowel": "intestine", "duodenum": "duodenum", "colon": "colon",
    "urinary_bladder": "bladder", "prostate": "prostate", "kidney_cyst_left": "kidney cyst",
    "kidney_cyst_right": "kidney cyst", "aorta": "aorta", "inferior_vena_cava": "postcava",
    "portal_vein_and_splenic_vein": "portal vein and splenic vein",
}
VERTEBRA, LIVER, AORTA = 31, 5, 52  # vertebrae_L1 (ignored), liver, aorta


def _write_site(root: Path, label: np.ndarray, unmapped: str | None, label_map=None, n_cases: int = 2) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n_cases):
        image = np.where(label > 0, 80.0, 20.0).astype(np.float32)  # soft tissue everywhere: the body crop keeps all
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "images" / f"ct_{i}.nii.gz")
        nib.save(nib.Nifti1Image(label.astype(np.uint8), np.eye(4)), root / "labels" / f"ct_{i}.nii.gz")
    spec = {"name": "totalseg-site", "task": "btcv", "label_map": label_map or TOTALSEG}
    if unmapped:
        spec["unmapped"] = unmapped
    (root / "site.yaml").write_text(yaml.safe_dump(spec))
    return root


def _label(shape=(24, 24, 24)) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    label[4:14, 4:20, 4:20] = LIVER
    label[16:22, 10:14, 10:14] = AORTA
    label[16:22, 16:22, 2:8] = VERTEBRA
    return label


def test_the_whole_totalsegmentator_v2_table_resolves_and_the_rest_is_ignored(tmp_path):
    site = load_site(_write_site(tmp_path / "s", _label(), "ignore"))
    resolved = {TOTALSEG[v]: name for v, name in site.label_map.items()}
    assert resolved == EXPECTED
    assert set(site.ignored_values) == set(TOTALSEG) - set(site.label_map)
    assert {"vertebrae_L1", "rib_left_7", "femur_left", "iliac_artery_left", "heart", "sacrum"} <= set(
        site.ignored_values.values())
    assert "left kidney" in site.annotated and "right lung" in site.annotated and "postcava" in site.annotated


def test_classes_outside_the_vocabulary_are_refused_by_default_with_their_names(tmp_path):
    with pytest.raises(SiteError) as info:
        load_site(_write_site(tmp_path / "s", _label(), None))
    message = str(info.value)
    n_unknown = len(TOTALSEG) - len(EXPECTED)
    assert f"{n_unknown} label value(s) name classes outside vocabulary 'abdomen-ct'" in message
    assert "31=vertebrae_L1" in message and "116=sternum" in message and "unmapped: ignore" in message
    with pytest.raises(SiteError, match="'unmapped' must be one of refuse, ignore"):
        load_site(_write_site(tmp_path / "t", _label(), "drop"))
    with pytest.raises(SiteError, match="no foreground class of vocabulary 'abdomen-ct' \\(every value is ignored"):
        load_site(_write_site(tmp_path / "u", _label(), "ignore", label_map={31: "vertebrae_L1", 116: "sternum"}))


def test_ignored_values_get_a_code_that_sets_no_channel_and_is_not_known(tmp_path):
    site = load_site(_write_site(tmp_path / "s", _label(), "ignore"))
    coder = LabelCoder.for_site(site)
    label = _label()
    codes = encode_labels(label, np.eye(4), site, coder=coder)
    known = coder.known(codes)
    np.testing.assert_array_equal(known == 0, label == VERTEBRA)
    channels = decode_codes(codes, coder)
    assert channels[:, label == VERTEBRA].sum() == 0  # neither background of a class nor a class: just unknown
    assert channels[VOCAB.index("liver"), label == LIVER].all() and channels[VOCAB.index("aorta"), label == AORTA].all()
    torch.testing.assert_close(coder.known(torch.as_tensor(codes)), torch.as_tensor(known))
    # a site without ignored values knows every voxel
    plain = load_site(_write_site(tmp_path / "p", _label() * (_label() != VERTEBRA), None,
                                  label_map={LIVER: "liver", AORTA: "aorta"}))
    assert LabelCoder.for_site(plain).ignore_code is None and LabelCoder.for_site(plain).known(codes).all()


def test_the_pipelines_carry_the_unknown_voxels_and_check_site_counts_them(tmp_path):
    label_map = {LIVER: "liver", AORTA: "aorta", VERTEBRA: "vertebrae_L1"}  # each annotated class present
    site = load_site(_write_site(tmp_path / "s", _label(), "ignore", label_map=label_map, n_cases=3))
    cfg = PreprocessConfig(patch_size=(16, 16, 16), num_crops=2, spacing=(1.0, 1.0, 1.0), orientation="RAS")
    data = build_site_data(site, cfg, cache_dir=tmp_path / "cache", val_fraction=0.34)
    val = data.val_ds[0]
    assert val["known"].shape == (1, 24, 24, 24) and int((val["known"] == 0).sum()) == int((_label() == VERTEBRA).sum())
    assert val["label"][:, val["known"][0] == 0].sum() == 0
    crops = data.train_ds[0]
    assert all(c["known"].shape == (1, 16, 16, 16) for c in crops)
    report = check_site(site)
    assert report.ok, report.problems
    assert report.ignored_voxels == 3 * int((_label() == VERTEBRA).sum())
    assert report.voxel_counts["liver"] == 3 * int((_label() == LIVER).sum())  # counted independently: np.sum
    assert report.voxel_counts["aorta"] == 3 * int((_label() == AORTA).sum())
    assert "vertebrae_L1" in report.format_text() and "never background" in report.format_text()


@pytest.mark.parametrize("loss_name", ["masked", "marginal", "distill", "naive"])
def test_losses_leave_unknown_voxels_out(loss_name):
    torch.manual_seed(0)
    C = VOCAB.num_classes
    logits = torch.randn(2, C, 6, 6, 6)
    target = (torch.rand(2, C, 6, 6, 6) > 0.8).float()
    known = torch.ones(2, 1, 6, 6, 6)
    known[:, :, :3] = 0
    target = target * known  # unknown voxels set no channel (LabelCoder)
    annotated = torch.zeros(2, C)
    annotated[:, [VOCAB.index("liver"), VOCAB.index("aorta"), VOCAB.index("spleen")]] = 1
    teacher = torch.randn_like(logits)
    if loss_name == "naive":
        loss_fn = NaiveSoftmaxLoss(SoftmaxLabelSpace(VOCAB))
    elif loss_name == "distill":
        loss_fn = ConditionalDistillation(2.0)
    else:
        loss_fn = PartialLabelLoss(loss_name, overlaps=overlap_matrix(VOCAB) if loss_name == "marginal" else None)

    def loss(lg, **kw):
        return loss_fn(lg, teacher, target, annotated, **kw) if loss_name == "distill" else \
            loss_fn(lg, target, annotated, **kw)

    changed = logits.clone()
    changed[:, :, :3] = torch.randn_like(changed[:, :, :3]) * 10  # whatever the model says where nobody knows
    torch.testing.assert_close(loss(logits, known=known), loss(changed, known=known))
    assert not torch.allclose(loss(logits), loss(changed))  # without the mask those voxels would count
    torch.testing.assert_close(loss(logits), loss(logits, known=torch.ones_like(known)))


def test_evaluation_leaves_unknown_voxels_out(tmp_path):
    from fedtextseg import engine

    label_map = {LIVER: "liver", AORTA: "aorta", VERTEBRA: "vertebrae_L1"}
    cfg = PreprocessConfig(patch_size=(16, 16, 16), spacing=(1.0, 1.0, 1.0), orientation="RAS")

    class LiverEverywhere(torch.nn.Module):  # says "liver" at every voxel, unknown ones included
        def forward_batch(self, batch):
            logits = torch.full((batch["image"].shape[0], VOCAB.num_classes, *batch["image"].shape[2:]), -10.0)
            logits[:, VOCAB.index("liver")] = 10.0
            return {"logits": logits}

    dice = {}
    for unmapped in ("ignore", None):
        lm = label_map if unmapped else {LIVER: "liver", AORTA: "aorta"}
        lab = _label() if unmapped else _label() * (_label() != VERTEBRA)
        site = load_site(_write_site(tmp_path / str(unmapped), lab, unmapped, label_map=lm, n_cases=2))
        data = build_site_data(site, cfg, cache_dir=False, val_fraction=0.5)
        dice[unmapped] = engine.evaluate(LiverEverywhere(), data.val_ds, VOCAB.class_names, roi_size=(16, 16, 16),
                                         device="cpu", precision="fp32", with_hd95=False)["liver"]["dice"]
    liver, total, vertebra = (int((_label() == LIVER).sum()), _label().size, int((_label() == VERTEBRA).sum()))
    assert dice["ignore"] == pytest.approx(2 * liver / (liver + total - vertebra), abs=1e-4)
    assert dice[None] == pytest.approx(2 * liver / (liver + total), abs=1e-4)  # there the vertebra is background


def _write_totalseg_output_site(root: Path, n_cases: int = 2, extra_masks=None, spec_extra=None) -> Path:
    """Images + TotalSegmentator's output (`TotalSegmentator -i ct.nii.gz -o labels/<case>`): one binary mask per
    class, empty ones included."""
    label = _label()
    (root / "images").mkdir(parents=True)
    for i in range(n_cases):
        nib.save(nib.Nifti1Image(np.where(label > 0, 80.0, 20.0).astype(np.float32), np.eye(4)),
                 root / "images" / f"ct_{i}.nii.gz")
        out = root / "labels" / f"ct_{i}"
        out.mkdir(parents=True)
        for value, name in ((LIVER, "liver"), (AORTA, "aorta"), (VERTEBRA, "vertebrae_L1"), (0, "kidney_left")):
            nib.save(nib.Nifti1Image((label == value).astype(np.uint8) if value else np.zeros_like(label),
                                     np.eye(4)), out / f"{name}.nii.gz")
        for name, (array, affine) in (extra_masks or {}).items():
            nib.save(nib.Nifti1Image(array, affine), out / f"{name}.nii.gz")
    (root / "site.yaml").write_text(yaml.safe_dump({"name": "ts", "task": "btcv", "unmapped": "ignore",
                                                    **(spec_extra or {})}))
    return root


def test_a_totalsegmentator_output_folder_per_case_is_a_site(tmp_path):
    site = load_site(_write_totalseg_output_site(tmp_path / "s", n_cases=3))
    assert sorted(site.label_map.values()) == ["aorta", "left kidney", "liver"]
    assert list(site.ignored_values.values()) == ["vertebrae_L1"]
    assert all(c.label.is_dir() for c in site.cases) and site.annotated == ["left kidney", "liver", "aorta"]
    report = check_site(site)
    label = _label()
    assert report.voxel_counts["liver"] == 3 * int((label == LIVER).sum())  # counted independently of the reader
    assert report.voxel_counts["aorta"] == 3 * int((label == AORTA).sum())
    assert report.ignored_voxels == 3 * int((label == VERTEBRA).sum())
    assert [p for p in report.problems if "left kidney" not in p[1]] == []  # the empty kidney mask is reported
    cfg = PreprocessConfig(patch_size=(16, 16, 16), spacing=(1.0, 1.0, 1.0), orientation="RAS")
    data = build_site_data(site, cfg, cache_dir=tmp_path / "cache", val_fraction=0.34)
    val = data.val_ds[0]
    assert int(val["label"][VOCAB.index("liver")].sum()) == int((label == LIVER).sum())
    assert int((val["known"] == 0).sum()) == int((label == VERTEBRA).sum())
    assert data.train_ds[0][0]["image"].shape == (1, 16, 16, 16)


def test_bad_mask_folders_are_refused_naming_the_file(tmp_path):
    label = _label()
    overlapping = ((label == LIVER).astype(np.uint8), np.eye(4))  # "spleen" drawn over the liver
    with pytest.raises(SiteError, match=r"spleen.nii.gz: .* voxels are also in liver.nii.gz"):
        check = load_site(_write_totalseg_output_site(tmp_path / "a", 1, {"spleen": overlapping}))
        build_site_data(check, PreprocessConfig(patch_size=(16, 16, 16)), cache_dir=False, val_fraction=0.0)
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    report = check_site(load_site(_write_totalseg_output_site(tmp_path / "b", 1, {"spleen": (
        np.zeros(label.shape, np.uint8), shifted)})))
    assert any(p.endswith("spleen.nii.gz") and "not on the grid of aorta.nii.gz" in msg for p, msg in report.problems)
    with pytest.raises(SiteError, match="remove label_map"):
        load_site(_write_totalseg_output_site(tmp_path / "c", 1, spec_extra={"label_map": {1: "liver"}}))
