"""Dice/HD95 against hand-computed values, per-class accumulation only on annotated classes, pooled vs mean."""

import math

import pytest
import torch

from fedtextseg.metrics import MetricAccumulator, dice_score, hd95, mean_over_classes


def _cube(lo, hi, shape=(20, 20, 20)):
    m = torch.zeros(shape, dtype=torch.bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def test_dice_hand_values():
    a = _cube((5, 5, 5), (10, 10, 10))
    b = _cube((6, 5, 5), (11, 10, 10))
    assert dice_score(a, b) == 2 * 100 / 250  # overlap 4 slices of 25 voxels
    assert dice_score(a, a) == 1.0
    assert math.isnan(dice_score(torch.zeros(3), torch.zeros(3)))
    assert dice_score(a, torch.zeros_like(a)) == 0.0


def test_hd95_uses_spacing():
    a = _cube((5, 5, 5), (10, 10, 10))
    b = _cube((6, 5, 5), (11, 10, 10))
    assert hd95(a, a) == 0.0
    assert abs(hd95(a, b, spacing=(3.0, 1.0, 1.0)) - 3.0) < 1e-6
    assert math.isnan(hd95(a, torch.zeros_like(a)))


def test_accumulator_only_annotated_classes_and_pooled_dice():
    acc = MetricAccumulator(["liver", "spleen", "kidney"], with_hd95=False)
    big_ref, big_pred = _cube((0, 0, 0), (10, 10, 10)), _cube((0, 0, 0), (10, 10, 10))
    small_ref, small_pred = _cube((0, 0, 0), (1, 1, 2)), _cube((0, 0, 0), (1, 1, 1))
    empty = torch.zeros_like(big_ref)
    acc.add_case(torch.stack([big_pred, empty, big_pred]), torch.stack([big_ref, empty, empty]), [1, 1, 0])
    acc.add_case(torch.stack([small_pred, empty, empty]), torch.stack([small_ref, empty, empty]), [1, 1, 0])
    s = acc.summary()
    assert set(s) == {"liver", "spleen"}  # kidney never annotated
    assert abs(s["liver"]["dice"] - (1.0 + 2 / 3) / 2) < 1e-9
    assert abs(s["liver"]["dice_pooled"] - 2 * 1001 / (1001 + 1002)) < 1e-9
    assert math.isnan(s["spleen"]["dice"]) and s["spleen"]["n"] == 0
    assert abs(mean_over_classes(s) - s["liver"]["dice"]) < 1e-12


def test_dice_and_hd95_agree_with_monai_on_random_masks():
    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        a = torch.rand(12, 14, 10, generator=g) > 0.7
        b = torch.rand(12, 14, 10, generator=g) > 0.6
        assert abs(dice_score(a, b) - float(compute_dice(a[None, None].float(), b[None, None].float())[0, 0])) < 1e-6
        spacing = (2.0, 1.0, 0.5)
        ref = float(compute_hausdorff_distance(a[None, None].float(), b[None, None].float(), percentile=95,
                                               include_background=True, spacing=list(spacing))[0, 0])
        # the symmetric 95th percentile from MONAI's surface distances, as this module computed it before
        ea, eb = get_mask_edges(a, b, crop=True)
        d1 = torch.as_tensor(get_surface_distance(ea, eb, distance_metric="euclidean", spacing=spacing), dtype=torch.float64)
        d2 = torch.as_tensor(get_surface_distance(eb, ea, distance_metric="euclidean", spacing=spacing), dtype=torch.float64)
        by_hand = float(max(torch.quantile(d1, 0.95), torch.quantile(d2, 0.95)))
        assert hd95(a, b, spacing=spacing) == pytest.approx(ref, abs=1e-5) == pytest.approx(by_hand, abs=1e-3)
