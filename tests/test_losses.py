"""Partial-label losses: unannotated channels get exactly zero gradient; marginal and distillation terms act where
they should and nowhere else."""

import torch

from fedtextseg.losses import ConditionalDistillation, PartialLabelLoss, build_loss, overlap_matrix
from fedtextseg.vocab import get_vocabulary


def _batch(b=2, c=5, shape=(6, 7, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, *shape, generator=g, requires_grad=True)
    target = (torch.rand(b, c, *shape, generator=g) > 0.7).float()
    return logits, target


def test_masked_loss_gives_exactly_zero_gradient_to_unannotated_channels():
    logits, target = _batch()
    annotated = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 0, 1]], dtype=torch.bool)
    PartialLabelLoss("masked")(logits, target, annotated).backward()
    grad = logits.grad
    for b in range(2):
        for c in range(5):
            nonzero = grad[b, c].abs().sum().item()
            if annotated[b, c]:
                assert nonzero > 0, (b, c)
            else:
                assert nonzero == 0.0, (b, c)


def test_masked_loss_ignores_unannotated_targets_and_nonfinite_logits():
    logits, target = _batch()
    annotated = torch.tensor([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    loss = PartialLabelLoss("masked")
    base = loss(logits, target, annotated)
    t2 = target.clone()
    t2[:, 1:] = 1 - t2[:, 1:]
    l2 = logits.detach().clone()
    l2[:, 3] = float("inf")
    assert torch.allclose(base, loss(l2, t2, annotated))


def test_loss_is_low_for_perfect_prediction_and_high_for_inverted():
    _, target = _batch()
    annotated = torch.ones(2, 5, dtype=torch.bool)
    loss = PartialLabelLoss("masked")
    good = loss((target * 2 - 1) * 20, target, annotated)
    bad = loss((1 - 2 * target) * 20, target, annotated)
    assert good < 0.01 < 1.0 < bad


def test_overlap_matrix_allows_tumor_in_organ_and_excludes_distinct_organs():
    vocab = get_vocabulary()
    may = overlap_matrix(vocab)
    i = vocab.index
    assert may[i("liver tumor"), i("liver")] and may[i("liver"), i("liver tumor")]
    assert may[i("kidney tumor"), i("left kidney")] and may[i("kidney tumor"), i("right kidney")]
    assert not may[i("liver"), i("spleen")]
    assert not may[i("liver tumor"), i("spleen")]


def test_marginal_loss_pushes_unannotated_exclusive_classes_down_on_labeled_organs_only():
    vocab = get_vocabulary()
    c = vocab.num_classes
    liver, tumor, spleen = vocab.index("liver"), vocab.index("liver tumor"), vocab.index("spleen")
    target = torch.zeros(1, c, 4, 4, 4)
    target[0, liver, :2] = 1  # half the volume is liver (annotated)
    annotated = torch.zeros(1, c, dtype=torch.bool)
    annotated[0, [liver, tumor]] = True
    logits = torch.zeros(1, c, 4, 4, 4, requires_grad=True)
    build_loss("marginal", vocab)(logits, target, annotated).backward()
    g = logits.grad[0]
    assert g[spleen, :2].gt(0).all()  # spleen pushed down where liver is labeled
    assert g[spleen, 2:].eq(0).all()  # nothing known elsewhere
    # masked mode leaves spleen untouched
    logits.grad = None
    build_loss("masked", vocab)(logits, target, annotated).backward()
    assert logits.grad[0, spleen].eq(0).all()


def test_distillation_only_on_unannotated_channels_off_local_foreground():
    logits, target = _batch(b=1, c=3)
    teacher = torch.randn_like(logits)
    annotated = torch.tensor([[1, 0, 0]], dtype=torch.bool)
    ConditionalDistillation(2.0)(logits, teacher, target, annotated).backward()
    g = logits.grad[0]
    assert g[0].eq(0).all()  # annotated channel: no distillation
    fg = target[0, 0] > 0
    assert g[1][fg].eq(0).all() and g[2][fg].eq(0).all()
    assert g[1][~fg].abs().sum() > 0


def test_batch_dice_keeps_zero_gradient_for_unannotated_and_couples_annotated_samples():
    logits, target = _batch(b=3, c=4)
    annotated = torch.tensor([[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    loss = PartialLabelLoss("masked", batch_dice=True)
    loss(logits, target, annotated).backward()
    g = logits.grad
    for b in range(3):
        for c in range(4):
            assert (g[b, c].abs().sum() > 0) == bool(annotated[b, c]), (b, c)
    # channel 0's Dice pools samples 0 and 1: it is not the mean of the two per-sample Dice losses
    per_sample = PartialLabelLoss("masked", batch_dice=False, bce_weight=0.0)
    pooled = PartialLabelLoss("masked", batch_dice=True, bce_weight=0.0)
    one = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert not torch.allclose(per_sample(logits.detach(), target, one), pooled(logits.detach(), target, one))


def test_bce_weight_scales_only_the_bce_term():
    logits, target = _batch(seed=3)
    annotated = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)
    vocab = get_vocabulary("abdomen-ct")
    dice_only = build_loss("masked", vocab, bce_weight=0.0, batch_dice=True)(logits, target, annotated)
    bce_only = build_loss("masked", vocab, dice_weight=0.0, batch_dice=True)(logits, target, annotated)
    mixed = build_loss("masked", vocab, bce_weight=0.2, batch_dice=True)(logits, target, annotated)
    assert torch.allclose(mixed, dice_only + 0.2 * bce_only)
    assert dice_only.item() > 0 and bce_only.item() > 0
