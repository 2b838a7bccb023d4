"""Label values -> vocabulary channels: tumors in organs, composites split by body side, undeclared values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedtextseg.data.labels import LabelCoder, annotated_mask, decode_codes, encode_labels, labels_to_channels
from fedtextseg.data.site import Site
from fedtextseg.errors import SiteError
from fedtextseg.vocab import Vocabulary, get_vocabulary

VOCAB = get_vocabulary()
C = VOCAB.num_classes
SHAPE = (24, 28, 20)


def make_site(label_map: dict[int, str], annotated: list[str] | None = None, vocab: Vocabulary = VOCAB) -> Site:
    label_map = {v: vocab.canonical(n) for v, n in label_map.items()}
    return Site(root=Path("/sites/test"), name="test", task="kits", vocabulary=vocab, label_map=label_map,
                annotated=annotated if annotated is not None else vocab.resolve_many(label_map.values()), cases=[])


def ch(name: str) -> int:
    return VOCAB.index(name)


def las_copy(label: np.ndarray, ras_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same scan stored LAS: axis 0 reversed, affine x column negated and origin moved to the far end."""
    flipped = label[::-1].copy()
    affine = ras_affine.copy()
    affine[0, 0] = -ras_affine[0, 0]
    affine[0, 3] = ras_affine[0, 3] + ras_affine[0, 0] * (label.shape[0] - 1)
    return flipped, affine


def two_kidneys(tumor_in_right: bool = False) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[16:21, 10:16, 8:12] = 1  # high axis-0 index = high world x = patient right (RAS+)
    label[3:8, 10:16, 8:12] = 1
    if tumor_in_right:
        label[18:20, 12:14, 9:11] = 2
    return label


RAS = np.diag([1.5, 1.5, 2.0, 1.0])
RAS[:3, 3] = (-17.0, 30.0, 100.0)


def test_tumor_counts_toward_its_organ():
    site = make_site({1: "liver", 2: "liver tumor"})
    label = np.zeros(SHAPE, np.uint8)
    label[5:15, 5:15, 5:15] = 1
    label[8:10, 8:10, 8:10] = 2
    out = labels_to_channels(label, RAS, site)
    assert out.shape == (C, *SHAPE) and out.dtype == np.uint8
    assert out[ch("liver")].sum() == 1000  # organ includes its tumor voxels
    assert out[ch("liver tumor")].sum() == 8
    assert out.sum() == 1008  # nothing else set
    assert set(np.unique(out)) == {0, 1}


def test_kidney_composite_split_by_side_in_world_coordinates():
    site = make_site({1: "kidney"})
    label = two_kidneys()
    ras = labels_to_channels(label, RAS, site)
    assert ras[ch("right kidney"), 16:21].sum() == 5 * 6 * 4
    assert ras[ch("right kidney")].sum() == ras[ch("left kidney")].sum() == 5 * 6 * 4
    assert ras[ch("right kidney"), 3:8].sum() == 0 and ras[ch("left kidney"), 16:21].sum() == 0

    flipped, las_affine = las_copy(label, RAS)
    las = labels_to_channels(flipped, las_affine, site)
    # in the LAS array the right kidney sits at LOW axis-0 indices, yet it is the same anatomy
    assert las[ch("right kidney"), 3:8].sum() == 5 * 6 * 4
    np.testing.assert_array_equal(las[:, ::-1], ras)


def test_kidney_tumor_goes_to_the_kidney_on_its_side():
    site = make_site({1: "kidney", 2: "kidney tumor"})
    out = labels_to_channels(two_kidneys(tumor_in_right=True), RAS, site)
    tumor = out[ch("kidney tumor")].astype(bool)
    assert tumor.sum() == 8
    assert out[ch("right kidney")][tumor].all()
    assert not out[ch("left kidney")][tumor].any()
    assert out[ch("right kidney")].sum() == out[ch("left kidney")].sum() == 5 * 6 * 4


def test_total_segmentator_style_map_sets_its_own_channels():
    tseg = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
            7: "aorta", 8: "inferior_vena_cava", 9: "portal_vein_and_splenic_vein", 10: "pancreas",
            11: "adrenal_gland_right", 12: "adrenal_gland_left"}
    site = make_site(tseg)
    label = np.zeros(SHAPE, np.uint8)
    for v in tseg:  # one slab per value
        label[v, :3, :3] = v
    out = labels_to_channels(label, RAS, site)
    expected = ["spleen", "right kidney", "left kidney", "gall bladder", "liver", "stomach", "aorta", "postcava",
                "portal vein and splenic vein", "pancreas", "right adrenal gland", "left adrenal gland"]
    for value, name in zip(tseg, expected):
        assert out[ch(name), value].sum() == 9, name
        assert out[:, value].sum() == 9  # exactly one channel per voxel, no side splitting of lateral classes
    # a stated side wins over the body-side rule: "right kidney" at low x (the left half) stays right
    assert out[ch("right kidney"), 2].sum() == 9


def test_undeclared_values_name_file_and_values():
    site = make_site({1: "liver"})
    label = np.zeros(SHAPE, np.uint8)
    label[0, 0, :3] = [1, 7, 9]
    with pytest.raises(SiteError) as info:
        labels_to_channels(label, RAS, site, source="/sites/test/labels/case_007.nii.gz")
    assert info.value.path.endswith("case_007.nii.gz")
    assert "7, 9" in info.value.problem and "not declared" in info.value.problem and "1=liver" in info.value.problem


def test_composite_without_sides_cannot_be_split():
    vocab = Vocabulary.from_dict({"extends": "abdomen-ct", "name": "with-bowel",
                                  "composites": {"bowel parts": ["colon", "intestine"]}})
    with pytest.raises(SiteError, match="cannot be split by body side"):
        LabelCoder.for_site(make_site({1: "bowel parts"}, vocab=vocab))


def test_annotated_mask_and_positive_codes():
    site = make_site({1: "kidney", 2: "kidney tumor"}, annotated=["kidney tumor"])
    mask = annotated_mask(site)
    assert mask.dtype == bool and mask.shape == (C,) and np.flatnonzero(mask).tolist() == [ch("kidney tumor")]
    coder = LabelCoder.for_site(site)
    positive = coder.positive_codes()
    assert not positive[0]
    # plain kidney voxels are not positive (kidney not annotated), tumor voxels are
    kidney_codes = coder.value_codes[1]
    tumor_codes = coder.value_codes[2]
    assert not positive[list(kidney_codes)].any() and positive[list(tumor_codes)].all()


def test_channel_counts_match_decoded_channels():
    site = make_site({1: "kidney", 2: "kidney tumor"})
    coder = LabelCoder.for_site(site)
    codes = encode_labels(two_kidneys(tumor_in_right=True), RAS, site, coder=coder)
    assert codes.dtype == np.uint8 and codes.shape == SHAPE
    np.testing.assert_array_equal(coder.channel_counts(codes), decode_codes(codes, coder).sum(axis=(1, 2, 3)))


def _reference_channels(label, affine, site) -> np.ndarray:
    """Voxel-by-voxel reference implementation of the documented rule."""
    out = np.zeros((C, *label.shape), np.uint8)
    centre_x = (affine @ np.array([*((np.array(label.shape) - 1) / 2), 1.0]))[0]
    for idx in np.ndindex(label.shape):
        v = int(label[idx])
        if v == 0:
            continue
        side = "right" if (affine @ np.array([*idx, 1.0]))[0] > centre_x else "left"
        names = VOCAB.expand(site.label_map[v])
        cls = names[0] if len(names) == 1 else next(n for n in names if VOCAB.side_of(n) == side)
        out[(ch(cls), *idx)] = 1
        for parent in VOCAB.parent_channels(cls):
            if VOCAB.side_of(parent) in (None, side):
                out[(ch(parent), *idx)] = 1
    return out


@settings(max_examples=25, deadline=None)
@given(
    label=arrays(np.uint8, (5, 4, 3), elements=st.integers(0, 3)),
    flip_x=st.booleans(),
    rotate=st.booleans(),
)
def test_channels_match_reference_rule(label, flip_x, rotate):
    site = make_site({1: "kidney", 2: "kidney tumor", 3: "liver tumor"})
    affine = np.diag([-1.2 if flip_x else 1.2, 0.8, 3.0, 1.0])
    if rotate:  # voxel axes 0 and 1 swapped in world: world x now runs along voxel axis 1
        affine[:3, :2] = affine[:3, :2][:, ::-1]
    affine[:3, 3] = (5.0, -7.0, 11.0)
    np.testing.assert_array_equal(labels_to_channels(label, affine, site), _reference_channels(label, affine, site))
