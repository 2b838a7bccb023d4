"""The synthetic KiTS-like site labels both kidneys with ONE value (the composite "kidney"); converting it to
universal channels must put each kidney in the channel of its true side, whatever the file's orientation."""

import numpy as np

from fedtextseg.data.labels import labels_to_channels
from fedtextseg.data.site import load_site
from fedtextseg.synthetic.ct import generate_hospitals, load_synthetic_case
from fedtextseg.vocab import get_vocabulary


def test_composite_kidney_label_splits_to_the_true_sides(tmp_path):
    paths = generate_hospitals(tmp_path / "h", sites=3, cases_per_site=1, seed=3, shape=(40, 40, 40), unseen=False)
    kits = load_site(paths[2])
    assert kits.task == "kits" and kits.label_map[1] == "kidney"
    vocab = get_vocabulary()
    phantom = load_synthetic_case(paths[2], 0)
    import nibabel as nib

    img = nib.load(kits.cases[0].label)
    channels = labels_to_channels(np.asarray(img.dataobj), img.affine, kits)
    truth = phantom.label
    for side in ("right kidney", "left kidney"):
        want = truth == vocab.index(side) + 1  # full ground truth: value = vocabulary class number
        got = channels[vocab.index(side)].astype(bool)
        overlap = (want & got).sum() / max(1, want.sum())
        assert want.sum() > 0 and overlap > 0.95, (side, overlap)
