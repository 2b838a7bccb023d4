"""The CPU bf16 check: a run trains in bf16 on a CPU only where that CPU's bf16 kernels compute this model's 3D
convolution weight gradients right at the batch's shapes; elsewhere it trains in fp32 and says why."""

from __future__ import annotations

import logging
import warnings

import torch

from fedtextseg import bf16_check, engine
from fedtextseg.losses import PartialLabelLoss
from fedtextseg.models import create_model
from conftest import make_bank


def _model():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model("cdpdnet_tiny", **make_bank(), dino={"enabled": False})


def _batch(depth: int) -> dict:
    g = torch.Generator().manual_seed(0)
    classes = 32
    return {"image": torch.rand(2, 1, depth, 32, 32, generator=g),
            "label": (torch.rand(2, classes, depth, 32, 32, generator=g) > 0.7).to(torch.uint8),
            "annotated": torch.ones(2, classes), "task": torch.ones(2, dtype=torch.long)}


def test_every_3d_convolution_is_checked_at_the_shape_the_batch_gives_it():
    model = _model().train()
    rng = torch.get_rng_state()
    shapes = bf16_check._conv_shapes(model, _batch(8))
    assert torch.equal(rng, torch.get_rng_state())  # the run's random stream is where it was
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    assert set(map(id, shapes.values())) <= set(map(id, convs))
    inputs = {key[-1] for key in shapes}
    assert (1, 1, 8, 32, 32) in inputs  # the stem, one row of the batch
    assert any(s[2:] == (2, 8, 8) for s in inputs)  # a level 2 voxels deep (what torch 2.14's bf16 gets wrong here)


def test_the_weight_gradient_error_is_that_of_bf16_against_float32():
    conv = torch.nn.Conv3d(4, 8, 3, padding=1)
    error = bf16_check._weight_grad_error(conv, (1, 4, 4, 8, 8))
    assert 0 < error  # bf16 rounds: never exactly float32
    # a corrupted bf16 kernel is measured as such
    real_conv3d = torch.nn.functional.conv3d

    def broken(x, w, *args, **kw):
        out = real_conv3d(x, w, *args, **kw)
        return out * 3 if torch.is_autocast_enabled("cpu") else out

    torch.nn.functional.conv3d = broken
    try:
        assert bf16_check._weight_grad_error(conv, (1, 4, 4, 8, 8)) > 1.0
    finally:
        torch.nn.functional.conv3d = real_conv3d


def _train(model, batch, precision):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return engine.train_steps(model, [batch], loss_fn=PartialLabelLoss(), optimizer=optimizer, steps=1, device="cpu",
                              precision=precision, grad_clip=None)


def test_a_cpu_whose_bf16_kernels_fail_the_check_trains_in_fp32_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(engine, "_CPU_BF16_CHECKED", {})
    monkeypatch.setattr(bf16_check, "_weight_grad_error", lambda module, shape: 7.0 if shape[2] == 2 else 0.004)
    with caplog.at_level(logging.WARNING, logger="fedtextseg.engine"):
        assert _train(_model(), _batch(8), "bf16").precision == "fp32"  # has a level 2 voxels deep
    assert "training in fp32, not bf16" in caplog.text and ", 2, 8, 8]" in caplog.text
    assert _train(_model(), _batch(24), "bf16").precision == "bf16"  # 24 -> 12 -> 6 -> 3: no such level
    assert _train(_model(), _batch(8), "fp32").precision == "fp32"
