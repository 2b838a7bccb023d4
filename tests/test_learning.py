"""Can the demo's network learn at all? Regression tests of learning itself, on the real pipeline and real steps.

* One fixed batch of a synthetic hospital (BTCV-like: 9 organs), ``engine.train_steps`` with the production loss and
  optimizer: the demo network must overfit it (mean Dice > 0.9 over the batch's annotated classes within 200 steps),
  and so must a plain MONAI ``BasicUNet`` of similar size, the control that tells a model defect from a data or loss
  defect. Before the text bank was centred (``cdpdnet.centred_text``) the demo network stalled here at 0.55.
* Sided classes: the demo network trained on one hospital's crops must put "left kidney" on the patient's left, on
  an unseen case and on its mirror-stored (LAS) copy, through ``fedtextseg predict``'s whole path.
* Coordinate channels (``coordinate_axes``, a CDPDNet option the demo leaves off): a crop's channels are the whole
  volume's channels cropped, so training and sliding-window inference see the same thing.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from fedtextseg import engine
from fedtextseg.config import compose_config
from fedtextseg.data.dataset import make_loader
from fedtextseg.models.cdpdnet import coordinate_grid
from fedtextseg.runtime import SiteRunner, build_model, prepare_bank
from fedtextseg.sites import ensure_data


@pytest.fixture(scope="module")
def demo_site(tmp_path_factory):
    """The demo experiment on one generated BTCV-like hospital (4 cases at the demo's generation size)."""
    root = tmp_path_factory.mktemp("learning")
    cfg = compose_config("demo", [f"data.root={root / 'synthetic'}", "data.generate.sites=1",
                                  "data.generate.cases_per_site=4", "data.unseen=null", "data.val_fraction=0.25",
                                  "eval.max_cases=1"])
    sites = ensure_data(cfg, log_fn=lambda *_: None)
    return cfg, sites[0]


def _batch_dice(model, batch) -> list[float]:
    model.eval()
    with torch.no_grad(), engine.autocast(torch.device("cpu")):
        probs = torch.sigmoid(model.forward_batch(batch)["logits"].float())
    model.train()
    pred, truth = probs > 0.5, batch["label"].bool()
    scores = []
    for c in batch["annotated"][0].nonzero().flatten().tolist():
        inter = (pred[:, c] & truth[:, c]).sum().item()
        total = pred[:, c].sum().item() + truth[:, c].sum().item()
        scores.append(2 * inter / total if total else 1.0)
    return scores


class _PlainUNet(torch.nn.Module):
    """MONAI BasicUNet (no text, no TTPG) behind the engine's ``forward_batch`` contract: the control."""

    def __init__(self, num_classes: int):
        super().__init__()
        from monai.networks.nets import BasicUNet

        self.net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=num_classes, features=(8, 16, 32, 64, 64, 8))

    def forward_batch(self, batch):
        return {"logits": self.net(batch["image"])}


@pytest.mark.slow
@pytest.mark.parametrize("network", ["demo", "basic_unet"])
def test_one_fixed_batch_is_overfit_within_200_steps(demo_site, network):
    cfg, site = demo_site
    torch.manual_seed(0)
    model = build_model(cfg, prepare_bank(cfg, log_fn=lambda *_: None))
    runner = SiteRunner(cfg, site, model, cache_dir=False)
    loader = make_loader(runner.data.train_ds, batch_size=int(cfg.train.batch_size), shuffle=True,
                         generator=torch.Generator().manual_seed(0))
    batch = next(iter(loader))
    assert int(batch["annotated"][0].sum()) == 9 and batch["label"].sum() > 0
    if network == "basic_unet":
        model = _PlainUNet(len(runner.site.vocabulary.class_names))
    model = engine.prepare_model(model, torch.device("cpu"))
    batch = engine.move_batch(batch, torch.device("cpu"))
    before = float(np.mean(_batch_dice(model, batch)))
    optimizer = engine.make_optimizer(model, float(cfg.train.lr), float(cfg.train.weight_decay))
    engine.train_steps(model, [batch], loss_fn=runner.loss_fn, optimizer=optimizer, steps=200, device="cpu",
                       precision=cfg.run.precision, grad_clip=cfg.train.grad_clip)
    scores = _batch_dice(model, batch)
    assert before < 0.3
    assert float(np.mean(scores)) > 0.9, f"{network}: per-class Dice after 200 steps {np.round(scores, 2).tolist()}"


def test_crop_coordinates_are_the_whole_volume_coordinates_cropped():
    shape = (10, 7, 12)
    whole = coordinate_grid(torch.zeros(1, 3, dtype=torch.long), shape, torch.tensor([shape]))
    assert whole.shape == (1, 3, *shape)
    assert whole[0, 0, 0].unique().item() == -1 and whole[0, 0, -1].unique().item() == 1
    assert torch.allclose(whole[0, 2, :, :, 0], torch.tensor(-1.0)) and torch.allclose(whole[0, 2, :, :, -1],
                                                                                       torch.tensor(1.0))
    starts = torch.tensor([[2, 0, 5], [0, 3, 1]])
    crops = coordinate_grid(starts, (4, 4, 6), torch.tensor([shape, shape]))
    for i, (z, y, x) in enumerate(starts.tolist()):
        assert torch.equal(crops[i], whole[0, :, z:z + 4, y:y + 4, x:x + 6])


def test_coordinate_model_gives_the_same_logits_for_a_crop_and_its_window():
    from tests.conftest import make_bank
    from fedtextseg.models import create_model

    torch.manual_seed(0)
    model = create_model("cdpdnet_tiny", **make_bank(), coordinate_axes=(0, 2), dino={"enabled": False}).eval()
    volume = torch.rand(1, 1, 24, 40, 32)
    start = (8, 8, 0)
    crop = volume[:, :, 8:24, 8:24, 0:16]
    batch = {"image": crop, "task": torch.tensor([0]), "crop_start": torch.tensor([start]),
             "volume_shape": torch.tensor([volume.shape[2:]])}
    with torch.no_grad():
        from_crop = model.forward_batch(batch)["logits"]
        window = model.add_coordinates(volume)[:, :, 8:24, 8:24, 0:16]
        from_window = model(window, torch.tensor([0]))
    assert torch.allclose(from_crop, from_window, atol=1e-5)
    with pytest.raises(Exception, match="crop_start and volume_shape"):
        model.forward_batch({"image": crop, "task": torch.tensor([0])})


def _world_centroid_x(mask: np.ndarray, affine: np.ndarray) -> float:
    idx = np.argwhere(mask > 0)
    assert len(idx), "empty mask"
    world = nib.affines.apply_affine(affine, idx)
    return float(world[:, 0].mean())  # RAS+: x grows towards the patient's right


@pytest.mark.slow
def test_left_kidney_channel_lies_on_the_patients_left_also_in_a_mirror_stored_copy(demo_site, tmp_path):
    from fedtextseg.model_file import save_model_file
    from fedtextseg.predict import Predictor

    cfg, site = demo_site
    torch.manual_seed(0)
    model = build_model(cfg, prepare_bank(cfg, log_fn=lambda *_: None))
    runner = SiteRunner(cfg, site, model, cache_dir=False)
    for round_ in range(1, 6):  # 5 x 100 steps: the network finds kidneys first and their sides only later (3 x 100
        runner.train_round(round_=round_, total_rounds=5, steps=100, log_every=0)  # left one channel on both)
    model_file = save_model_file(tmp_path / "model.pt", runner.model, cfg,
                                 annotated_by={"left kidney": [site.name], "right kidney": [site.name]})

    case = runner.data.val_cases[0]  # not trained on
    img = nib.load(case.image)
    mirrored = tmp_path / "mirrored.nii.gz"  # the same scan stored with its first voxel axis reversed (RAS <-> LAS)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, img.shape[0] - 1
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine @ flip), mirrored)
    predictor = Predictor.from_file(model_file, classes=["left kidney", "right kidney"], device="cpu")
    for path in (case.image, mirrored):
        pred = predictor.predict_file(path)
        left, right = (_world_centroid_x(pred.mask(c), pred.affine) for c in ("left kidney", "right kidney"))
        assert left < right, f"{path}: left kidney centroid x={left:.0f} mm, right kidney x={right:.0f} mm"


def test_precision_follows_the_cpus_bf16_flags(monkeypatch):
    cpu = torch.device("cpu")
    engine.cpu_flags.cache_clear()
    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert engine.resolve_precision(cpu, "auto") == "fp32"  # bf16 would be emulated: slower, so not chosen
    with engine.autocast(cpu, "auto"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert engine.resolve_precision(cpu, "auto") == "fp32"  # AVX512-BF16 without AMX measured slower than fp32
    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    expected = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    assert engine.resolve_precision(cpu, "auto") == expected
    assert engine.resolve_precision(cpu, "fp32") == "fp32" and engine.resolve_precision(cpu, "bf16") == "bf16"
    assert engine.resolve_precision(cpu, "fp16") == "fp32"  # no fp16 autocast on CPU
    with engine.autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        engine.resolve_precision(cpu, "fp8")


def test_a_3d_network_trains_channels_last_on_an_amx_cpu_and_contiguous_elsewhere(monkeypatch):
    from tests.conftest import make_bank
    from fedtextseg.models import create_model

    cpu, amx = torch.device("cpu"), torch.ops.mkldnn._is_mkldnn_bf16_supported()

    def layouts():  # a convolution with several input channels and a 2-channel image (1 channel is both layouts)
        model = engine.prepare_model(create_model("cdpdnet_tiny", **make_bank(), dino={"enabled": False}), cpu)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1)
        image = engine.move_batch({"image": torch.rand(1, 2, 8, 8, 8)}, cpu)["image"]
        return [t.is_contiguous(memory_format=torch.channels_last_3d) for t in (conv.weight, image)]

    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    assert layouts() == [amx, amx]
    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert layouts() == [False, False]  # AVX512-BF16 without AMX: channels-last measured slower
