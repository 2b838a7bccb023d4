"""A site at a real CT's resolution (1 x 1 x 2 mm, 384 x 384 x 240 voxels, stored LPS as DICOM converters write it)
trains a federated round and is predicted back on its own grid, in the memory of a 24 GiB machine."""

from __future__ import annotations

import resource

import nibabel as nib
import numpy as np
import pytest
import yaml

from fedtextseg.cli import main as cli_main
from fedtextseg.config import compose_config
from fedtextseg.synthetic.ct import PROFILES, ScannerTraits, _rng, _values_of, make_phantom
from fedtextseg.federation.inprocess import run_federation_inprocess
from fedtextseg.text import build_bank

pytestmark = pytest.mark.slow

SHAPE, SPACING = (384, 384, 240), (1.0, 1.0, 2.0)


def test_a_real_resolution_lps_site_trains_a_round_and_predicts_back_on_its_own_grid(tmp_path):
    phantom = make_phantom(_rng(0, 0, 0), SHAPE, ScannerTraits(spacing=SPACING, orientation="LPS"))
    assert "".join(nib.aff2axcodes(phantom.affine)) == "LPS"
    site = tmp_path / "hospitals" / "big-ct"
    for sub in ("images", "labels"):
        (site / sub).mkdir(parents=True)
    label = phantom.label_for(_values_of(PROFILES["btcv"].label_map))
    for case in ("ct_a", "ct_b"):  # one scan twice: a train and a validation case
        nib.save(nib.Nifti1Image(phantom.image, phantom.affine), site / "images" / f"{case}.nii")
        nib.save(nib.Nifti1Image(label, phantom.affine), site / "labels" / f"{case}.nii")
    (site / "site.yaml").write_text(yaml.safe_dump({"name": "big-ct", "task": "btcv",
                                                    "label_map": dict(PROFILES["btcv"].label_map)}))
    del phantom, label
    build_bank("abdomen-ct", encoder="sentence-minilm", log=lambda *_: None).save(tmp_path / "bank.pt")
    cfg = compose_config("demo", [
        f"data.root={tmp_path / 'hospitals'}", "data.sites=[big-ct]", "data.unseen=null", "data.generate=null",
        f"text.bank={tmp_path / 'bank.pt'}", "federation.rounds=1", "train.local_steps=2", "data.val_fraction=0.5",
        "federation.min_sites=1", "eval.max_cases=1", "eval.hd95=false", f"run.results_dir={tmp_path / 'results'}",
        "run.name=big"])
    coord = run_federation_inprocess(cfg, tmp_path / "results" / "big", log_fn=lambda *a: None)
    model = coord.recorder.run_dir / "model.pt"
    assert model.is_file()
    assert cli_main(["predict", "--model", str(model), "-i", str(site / "images" / "ct_b.nii"),
                     "-o", str(tmp_path / "out"), "--classes", "liver", "spleen"]) == 0
    out = nib.load(str(tmp_path / "out" / "ct_b_liver.nii.gz"))
    ref = nib.load(str(site / "images" / "ct_b.nii"))
    assert out.shape == SHAPE and np.allclose(out.affine, ref.affine, atol=1e-6)
    assert "".join(nib.aff2axcodes(out.affine)) == "LPS"
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"peak resident memory of the test process: {peak_gib:.1f} GiB")
    assert peak_gib < 12, f"{peak_gib:.1f} GiB: a 24 GiB hospital machine would be at risk with 2 such processes"
