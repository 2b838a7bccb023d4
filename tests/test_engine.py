"""``engine.train_steps``, the loop every client and the centralized arm run: the loss it optimises (FedProx term,
distillation mix, unknown voxels), what it refuses (non-finite losses, empty loaders) and gradient clipping."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedtextseg import engine
from fedtextseg.losses import ConditionalDistillation, PartialLabelLoss

C = 3


class TinyNet(nn.Module):
    """A 1x1x1 convolution with the models' ``forward_batch`` interface."""

    spatial_dims = 3

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv3d(1, C, 1)

    def forward_batch(self, batch):
        return {"logits": self.conv(batch["image"])}


def _batch(seed: int = 0, nan: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 1, 4, 4, 4, generator=g)
    if nan:
        image[0, 0, 0, 0, 0] = float("nan")
    return {"image": image, "label": (torch.rand(2, C, 4, 4, 4, generator=g) > 0.6).float(),
            "annotated": torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]), "task": torch.zeros(2, dtype=torch.long)}


def _run(model, batches, steps=1, lr=0.0, **kw):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    kw.setdefault("loss_fn", PartialLabelLoss())
    return engine.train_steps(model, batches, optimizer=optimizer, steps=steps, device="cpu", precision="fp32",
                              grad_clip=kw.pop("grad_clip", None), **kw)


def _loss_of(model, batch, **kw):
    with torch.no_grad():
        return float(PartialLabelLoss()(model.forward_batch(batch)["logits"], batch["label"], batch["annotated"], **kw))


def test_fedprox_adds_half_mu_times_the_squared_distance_to_the_global_weights():
    model, batch = TinyNet(), _batch()
    reference = {n: p.detach() + 0.1 for n, p in model.named_parameters()}  # the round's global weights
    distance = sum(((p.detach() - reference[n]) ** 2).sum() for n, p in model.named_parameters())
    stats = _run(model, [batch], prox_mu=0.5, prox_reference=reference)
    assert stats.history[0] == pytest.approx(_loss_of(model, batch) + 0.25 * float(distance), rel=1e-5)
    assert _run(TinyNet(), [batch], prox_mu=0.0, prox_reference=reference).history[0] == pytest.approx(
        _loss_of(model, batch), rel=1e-6)  # mu = 0: the term is off


def test_distillation_is_mixed_in_with_its_weight():
    model, teacher, batch = TinyNet(0), TinyNet(1).eval(), _batch()
    distill = ConditionalDistillation(2.0)
    with torch.no_grad():
        expected = _loss_of(model, batch) + 0.3 * float(distill(
            model.forward_batch(batch)["logits"], teacher.forward_batch(batch)["logits"], batch["label"],
            batch["annotated"]))
    stats = _run(model, [batch], teacher=teacher, distill_fn=distill, distill_weight=0.3)
    assert stats.history[0] == pytest.approx(expected, rel=1e-5)
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())  # the teacher is not trained


def test_unknown_voxels_of_a_batch_reach_the_loss():
    model, batch = TinyNet(), _batch()
    known = torch.ones(2, 1, 4, 4, 4)
    known[:, :, :2] = 0
    batch["label"] = batch["label"] * known
    stats = _run(model, [{**batch, "known": known}])
    assert stats.history[0] == pytest.approx(_loss_of(model, batch, known=known), rel=1e-6)
    assert stats.history[0] != pytest.approx(_loss_of(model, batch), rel=1e-3)
    all_known = _run(TinyNet(), [{**batch, "known": torch.ones_like(known)}])  # all ones: exactly as without
    assert all_known.history[0] == _run(TinyNet(), [batch]).history[0]


def test_a_non_finite_loss_stops_before_the_weights_move():
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FloatingPointError, match=r"site-x: non-finite loss at step 2"):
        _run(model, [_batch(0), _batch(1, nan=True)], steps=2, lr=0.1, label="site-x")
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # step 1 trained ...
    moved = copy.deepcopy(after)
    with pytest.raises(FloatingPointError):
        _run(model, [_batch(1, nan=True)], lr=0.1)
    assert all(torch.equal(moved[k], model.state_dict()[k]) for k in moved)  # ... the bad step did not


def test_gradient_clipping_bounds_the_update_of_trainable_parameters():
    def update_norm(clip):
        model = TinyNet()
        before = [p.detach().clone() for p in model.parameters()]
        _run(model, [_batch()], lr=1.0, grad_clip=clip)
        return float(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before))))

    free = update_norm(None)
    assert free > 1e-2
    assert update_norm(1e-3) == pytest.approx(1e-3, rel=1e-3)  # SGD lr 1: the update is the clipped gradient


def test_an_empty_loader_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="yielded no batch"):
        _run(TinyNet(), [], steps=1)
