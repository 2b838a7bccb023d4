"""``fedtextseg predict`` for TGC-Net: X-ray PNG + report -> mask PNGs of the input's size, probability maps,
overlays, per-image reports from a CSV, the empty-report rule, and clear errors naming the file.

A real tgcnet_tiny model file (random weights: the behaviour under test is the prediction path, not accuracy) on
synthetic X-rays and, where ``../shared/data/qata-cov19`` is present, on real QaTa-COV19 images.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from fedtextseg.cli import main as cli_main
from fedtextseg.config import compose_config
from fedtextseg.predict_xray import XrayPredictor, predict_xray_batch, read_reports
from fedtextseg.vocab import get_vocabulary

QATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "qata-cov19"
REPORT = "bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from fedtextseg.model_file import save_model_file
    from fedtextseg.runtime import build_model, prepare_bank

    root = tmp_path_factory.mktemp("xray-predict")
    cfg = compose_config("tgcnet_demo", [f"data.root={root / 'data'}", "run.device=cpu"])
    torch.manual_seed(0)
    bank = prepare_bank(cfg, log_fn=lambda *_: None)
    model = build_model(cfg, bank).eval()
    return save_model_file(root / "model.pt", model, cfg, bank=bank,
                           annotated_by={"lung infection": ["hospital-0"]})


@pytest.fixture(scope="module")
def predictor(model_file):
    return XrayPredictor.from_file(model_file, classes=["lung infection", "right lung", "left lung"], device="cpu",
                                   precision="fp32")


def _xray(path: Path, shape=(52, 80), mode="L", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    grey = rng.integers(0, 255, shape).astype(np.uint8)
    if mode == "RGB":
        Image.fromarray(np.stack([grey] * 3, -1)).save(path)
    elif mode == "I;16":
        Image.fromarray(grey.astype(np.uint16) * 257).save(path)
    else:
        Image.fromarray(grey).save(path)
    return path


def test_one_image_gives_masks_of_its_own_size_probabilities_and_an_overlay(predictor, tmp_path):
    image = _xray(tmp_path / "cxr.png")
    result = predict_xray_batch(predictor, [image], tmp_path / "out", report=REPORT, probabilities=True,
                                log_fn=lambda *_: None)
    assert result.exit_code == 0 and result.cases == ["cxr"]
    probs, masks = predictor.predict_array(np.asarray(Image.open(image), np.float32) / 255.0, REPORT)
    for k, name in enumerate(["lung_infection", "right_lung", "left_lung"]):
        mask = np.asarray(Image.open(tmp_path / "out" / f"cxr_{name}.png"))
        assert mask.shape == (52, 80) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask // 255, masks[k])
        np.testing.assert_array_equal(masks[k], (probs[k] >= predictor.threshold).astype(np.uint8))
        prob = np.asarray(Image.open(tmp_path / "out" / f"cxr_{name}_prob.png"))
        np.testing.assert_array_equal(prob, np.rint(probs[k] * 255).astype(np.uint8))
    overlay = Image.open(tmp_path / "out" / "cxr_overlay.png")
    assert overlay.mode == "RGB" and overlay.size == (80, 52)
    with open(tmp_path / "out" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class"] for r in rows] == ["lung infection", "right lung", "left lung"]
    assert {r["text"] for r in rows} == {"report"} and rows[0]["pixels"] == str(int(masks[0].sum()))


def test_the_report_conditions_the_prediction_and_an_empty_one_means_the_task_prompt(predictor, tmp_path):
    image = np.asarray(Image.open(_xray(tmp_path / "cxr.png")), np.float32) / 255.0
    with_report, _ = predictor.predict_array(image, REPORT)
    other, _ = predictor.predict_array(image, "unilateral pulmonary infection, one infected area, lower left lung.")
    assert np.abs(with_report - other).max() > 1e-4  # the text reaches the output
    empty, _ = predictor.predict_array(image, "")
    prompt = get_vocabulary("chest-xray").task_prompts()[predictor.task_index]
    explicit, _ = predictor.predict_array(image, prompt)
    np.testing.assert_allclose(empty, explicit, atol=1e-6)
    assert predictor.text_used("  ") == "task prompt (no report)" and predictor.text_used(REPORT) == "report"


def test_a_folder_with_a_reports_csv_gives_each_image_its_report_and_a_missing_row_fails_alone(model_file, tmp_path,
                                                                                              capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        _xray(folder / f"img{i}.png", seed=i)
    (tmp_path / "reports.csv").write_text(
        "image,mask,caption\n"
        f"images/img0.png,masks/m0.png,\"{REPORT}\"\n"
        "img1.png,,\n")  # by file name, and an empty report; img2 has no row
    code = cli_main(["predict", "-m", str(model_file), "-i", str(folder), "--reports", str(tmp_path / "reports.csv"),
                     "-o", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{folder / 'img2.png'}: no row for this image in {tmp_path / 'reports.csv'}" in err
    with open(tmp_path / "out" / "predictions.csv") as fh:
        texts = {r["case"]: r["text"] for r in csv.DictReader(fh)}
    assert texts == {"img0": "report", "img1": "task prompt (no report)"}
    assert (tmp_path / "out" / "img0_lung_infection.png").is_file()
    assert not (tmp_path / "out" / "img2_lung_infection.png").exists()


def test_bad_inputs_get_errors_naming_the_file(model_file, predictor, tmp_path, capsys):
    bad_csv = tmp_path / "reports.csv"
    bad_csv.write_text("image,mask\nimg0.png,m0.png\n")
    with pytest.raises(Exception, match=r"reports\.csv: missing column\(s\) caption"):
        read_reports(bad_csv)
    assert cli_main(["predict", "-m", str(model_file), "-i", str(tmp_path), "--reports", str(bad_csv),
                     "-o", str(tmp_path / "o")]) == 2
    assert "missing column(s) caption" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    volume = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(volume))
    colour, deep = _xray(tmp_path / "colour.png", mode="RGB"), _xray(tmp_path / "deep.png", mode="I;16", seed=1)
    errors = []
    result = predict_xray_batch(predictor, [broken, volume, colour, deep, tmp_path / "absent.png"], tmp_path / "out",
                                report=REPORT, log_fn=lambda *_: None, err_fn=errors.append)
    assert result.cases == ["colour", "deep"]
    assert str(broken) in result.failed and "unreadable or corrupt image" in result.failed[str(broken)]
    assert "a NIfTI volume, but this model (tgcnet_tiny) segments 2D chest X-ray" in result.failed[str(volume)]
    assert "no such file" in result.failed[str(tmp_path / "absent.png")]
    with open(tmp_path / "out" / "predictions.csv") as fh:
        notes = {r["case"]: r["note"] for r in csv.DictReader(fh)}
    assert "colour image (mode RGB) converted to grey" == notes["colour"]
    assert notes["deep"].startswith("16-bit image")
    assert len(errors) == 3


@pytest.mark.skipif(not QATA.is_dir(), reason="shared QaTa-COV19 data (../shared/data/qata-cov19) is absent")
def test_real_qata_images_with_their_own_reports(predictor, tmp_path):
    with open(QATA / "valid.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:2]
    images = [QATA / "valid" / r["image"] for r in rows]  # the CSV's paths are relative to valid/: matched by name
    result = predict_xray_batch(predictor, images, tmp_path / "out", reports=read_reports(QATA / "valid.csv"),
                                log_fn=lambda *_: None)
    assert result.exit_code == 0 and len(result.cases) == 2
    for path, case in zip(images, result.cases):
        with Image.open(path) as im:
            size = im.size
        assert Image.open(tmp_path / "out" / f"{case}_lung_infection.png").size == size
    assert {r["text"] for r in result.rows} == {"report"}
