"""fedtextseg predict: class-name resolution, the input-grid round trip (LAS, anisotropic), outputs, bad inputs."""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import write_nifti  # noqa: E402
from fedtextseg.cli import main as cli_main  # noqa: E402
from fedtextseg.errors import ConfigError, FedTextSegError  # noqa: E402
from fedtextseg.model_file import save_model_file  # noqa: E402
from fedtextseg.predict import Predictor, predict_batch, resolve_classes  # noqa: E402
from fedtextseg.vocab import UnknownClassError, get_vocabulary  # noqa: E402

VOCAB = get_vocabulary()
PATCH = [16, 16, 16]
SHAPE = (40, 36, 12)
LAS = np.array([[-0.8, 0, 0, 30.0], [0, 0.8, 0, -10.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])  # x flipped, anisotropic
BODY = (slice(4, 36), slice(5, 31), slice(1, 11))
BLOB = (slice(6, 16), slice(10, 18), slice(3, 7))  # bright structure, off-centre in x (a lost flip would move it)
INFO = {"vocabulary": "abdomen-ct", "class_names": VOCAB.class_names, "task_names": VOCAB.task_names,
        "annotated_by": {"liver": ["site-a", "site-b"], "spleen": ["site-a"]},
        "preprocess": {"spacing": [1.5, 1.5, 1.5], "patch_size": PATCH},
        "eval": {"threshold": 0.5, "overlap": 0.25, "keep_largest": True}, "config": {}}


def ct_volume() -> np.ndarray:
    """Air around a box-shaped body (40 HU) holding a bright 200 HU structure."""
    image = np.full(SHAPE, -1000.0, np.float32)
    image[BODY] = 40.0
    image[BLOB] = 200.0
    return image


def make_model_file(path: Path, *, dino: bool = False, bias: dict[str, float] | None = None,
                    annotated_by: dict | None = None, training: dict | None = None) -> Path:
    """A real cdpdnet_tiny (random bank, random frozen parts) whose head predicts a constant logit per class."""
    from fedtextseg.models import create_model
    from fedtextseg.text import EmbeddingBank

    g = torch.Generator().manual_seed(0)
    bank = EmbeddingBank(
        class_names=VOCAB.class_names, class_embeddings=torch.randn(VOCAB.num_classes, 32, generator=g),
        task_names=VOCAB.task_names, task_embeddings=torch.randn(len(VOCAB.tasks), 32, generator=g),
        class_template=VOCAB.class_template, task_template=VOCAB.task_template, vocabulary=VOCAB.name,
        vocabulary_hash=VOCAB.content_hash,
        encoder={"kind": "sentence-minilm", "model": "sentence-transformers/all-MiniLM-L6-v2", "pretrained": "pkg",
                 "weights_source": "package", "fallback_reason": "no CLIP weights offline",
                 "requested": {"kind": "clip", "model": "ViT-B-32", "pretrained": "openai"}})
    kwargs = {"patch_size": PATCH, "dino": {"enabled": dino}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model("cdpdnet_tiny", class_embeddings=bank.class_embeddings,
                             task_embeddings=bank.task_embeddings, class_names=bank.class_names,
                             task_names=bank.task_names, **kwargs)
    with torch.no_grad():  # text-generated head off, residual rows = a constant logit per class
        for p in model.head.parameters():
            p.zero_()
        model.head.residual.bias.fill_(-20.0)
        for name, value in (bias or {"liver": 20.0}).items():
            model.head.residual.bias[VOCAB.index(name)] = value
    cfg = OmegaConf.create({
        "model": {"name": "cdpdnet_tiny", "kwargs": kwargs, "dino_cache": dino},
        "data": {"vocabulary": "abdomen-ct", "preprocess": {"spacing": [1.5, 1.5, 1.5], "patch_size": PATCH}},
        "eval": {"threshold": 0.5, "overlap": 0.25, "keep_largest": True},
        "federation": {"rounds": 3, "rule": "fedavg"}, "train": {"loss": "masked", "local_steps": 2},
        "privacy": {"enabled": False}})
    return save_model_file(path, model, cfg, bank=bank,
                           annotated_by=INFO["annotated_by"] if annotated_by is None else annotated_by,
                           training=training or {"rounds": 3, "sites": ["site-a", "site-b"]})


class BrightModel(torch.nn.Module):
    """Deterministic stand-in: liver where the preprocessed intensity is above 0.7 (the 200 HU structure)."""

    spatial_dims = 3

    def forward_batch(self, batch):
        x = batch["image"]
        logits = torch.full((x.shape[0], VOCAB.num_classes, *x.shape[2:]), -20.0)
        logits[:, VOCAB.index("liver")] = 40.0 * (x[:, 0] - 0.7)
        return {"logits": logits}


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).mean(0)
    return affine[:3, :3] @ idx + affine[:3, 3]


def test_class_names_through_synonyms_composites_and_defaults():
    assert resolve_classes(INFO, ["IVC", "kidneys", "Kidney_Left", "gallbladder"]) == [
        "right kidney", "left kidney", "gall bladder", "postcava"]
    assert resolve_classes(INFO, ["Liver", "liver", "hepar"]) == ["liver"]
    assert resolve_classes(INFO) == ["spleen", "liver"]  # what the federation trained on, vocabulary order
    assert resolve_classes({**INFO, "annotated_by": {}}) == VOCAB.class_names
    with pytest.raises(UnknownClassError) as err:
        resolve_classes(INFO, ["livr", "spleen", "kidny"])
    assert "'livr'" in str(err.value) and "'liver'" in str(err.value) and "'kidny'" in str(err.value)
    with pytest.raises(FedTextSegError, match="unknown task 'no such dataset'"):
        Predictor(BrightModel(), INFO, task="no such dataset")
    with pytest.raises(ConfigError, match="threshold"):
        Predictor(BrightModel(), INFO, threshold=1.5)


def test_round_trip_las_anisotropic_lands_at_the_same_world_position(tmp_path):
    src = write_nifti(tmp_path / "in" / "las_case.nii.gz", ct_volume(), LAS)
    assert "".join(nib.aff2axcodes(LAS)) == "LAS"
    predictor = Predictor(BrightModel(), INFO, classes=["liver", "spleen"], device="cpu")
    result = predict_batch(predictor, [src], tmp_path / "out", multilabel=True, log_fn=lambda m: None)
    assert result.exit_code == 0 and result.cases == ["las_case"]
    out = nib.load(str(tmp_path / "out" / "las_case_liver.nii.gz"))
    ref = nib.load(str(src))
    assert out.shape == SHAPE and np.allclose(out.affine, ref.affine, atol=1e-6)
    assert nib.aff2axcodes(out.affine) == ("L", "A", "S")
    mask = np.asarray(out.dataobj)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    blob = np.zeros(SHAPE, bool)
    blob[BLOB] = True
    dice = 2 * (mask.astype(bool) & blob).sum() / (mask.sum() + blob.sum())
    shift = np.linalg.norm(world_centroid(mask, out.affine) - world_centroid(blob, LAS))
    assert dice > 0.75, dice
    assert shift < 1.5, shift  # mm; a flipped x axis would put it ~13 mm away
    assert not np.asarray(nib.load(str(tmp_path / "out" / "las_case_spleen.nii.gz")).dataobj).any()
    labels = np.asarray(nib.load(str(tmp_path / "out" / "las_case_multilabel.nii.gz")).dataobj)
    assert set(np.unique(labels)) == {0, 6} and np.array_equal(labels == 6, mask.astype(bool))
    legend = json.loads((tmp_path / "out" / "multilabel_legend.json").read_text())
    assert {(r["value"], r["class"]) for r in legend["labels"]} == {(1, "spleen"), (6, "liver")}
    rows = list(csv.DictReader(open(tmp_path / "out" / "volumes.csv")))
    liver = next(r for r in rows if r["class"] == "liver")
    assert int(liver["voxels"]) == mask.sum()
    assert float(liver["volume_ml"]) == pytest.approx(mask.sum() * 0.8 * 0.8 * 2.5 / 1000, rel=1e-3)


def test_cli_batch_real_model_with_bad_inputs(tmp_path, capsys):
    model = make_model_file(tmp_path / "model.pt")
    inputs = tmp_path / "scans"
    write_nifti(inputs / "good.nii.gz", ct_volume(), LAS)
    write_nifti(inputs / "flat.nii.gz", np.zeros((30, 30, 1), np.float32))  # a 2D image for a 3D model
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")  # gzip header, then nothing usable
    out = tmp_path / "out"
    rc = cli_main(["predict", "-m", str(model), "-i", str(inputs), "-o", str(out), "--classes", "liver", "spleen",
                   "--multilabel", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "flat.nii.gz" in err and "2D" in err and "broken.nii.gz" in err and "1 of 3 inputs" in err
    # the good case still ran: constant "liver" logits -> the preprocessed body box, mapped back onto the input
    mask = np.asarray(nib.load(str(out / "good_liver.nii.gz")).dataobj).astype(bool)
    body = np.zeros(SHAPE, bool)
    body[BODY] = True
    core = np.zeros(SHAPE, bool)
    core[6:34, 7:29, 2:10] = True
    assert mask.shape == SHAPE and mask[core].all() and (mask & ~body).sum() <= 0.1 * body.sum()
    assert not np.asarray(nib.load(str(out / "good_spleen.nii.gz")).dataobj).any()
    assert sorted(p.name for p in out.iterdir()) == [
        "good_liver.nii.gz", "good_multilabel.nii.gz", "good_spleen.nii.gz", "multilabel_legend.csv",
        "multilabel_legend.json", "volumes.csv"]
    assert {r["case"] for r in csv.DictReader(open(out / "volumes.csv"))} == {"good"}

    assert cli_main(["predict", "-m", str(model), "-i", str(inputs / "good.nii.gz"), "-o", str(out),
                     "--classes", "livr"]) == 2
    assert "did you mean 'liver'" in capsys.readouterr().err
    assert cli_main(["predict", "-m", str(tmp_path / "scans" / "good.nii.gz"), "-i", str(inputs), "-o",
                     str(out)]) == 2
    assert "not a fedtextseg model file" in capsys.readouterr().err


def test_a_3d_model_refuses_a_png_and_report_options(tmp_path, capsys):
    from PIL import Image

    model = make_model_file(tmp_path / "ct.pt")
    image = tmp_path / "cxr.png"
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(image)
    assert cli_main(["predict", "-m", str(model), "-i", str(image), "-o", str(tmp_path / "out")]) == 1
    assert f"{image}: a 2D image, but this model (cdpdnet_tiny) segments 3D NIfTI" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["predict", "-m", str(model), "-i", str(image), "-o", str(tmp_path / "out"), "--report", "x"])
    assert exc.value.code == 2 and "for 2D report-guided models" in capsys.readouterr().err
