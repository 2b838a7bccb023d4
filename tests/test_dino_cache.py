"""The frozen DINOv2 branch: weight sources and provenance, and the exactness of the per-volume feature cache."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedtextseg.errors import ConfigError, FedTextSegError  # noqa: E402
from fedtextseg.models import (DinoConfig, DinoSliceEncoder, FeatureVolume, PretrainedWeightsWarning,  # noqa: E402
                               compute_volume_features, create_model, crop_features, volume_feature_fn)
from fedtextseg.vocab import get_vocabulary  # noqa: E402
from conftest import make_bank

SMALL_VIT = "vit_small_patch14_dinov2"




def encoder(**kw) -> DinoSliceEncoder:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DinoSliceEncoder(DinoConfig(**{"name": SMALL_VIT, "depth": 2, "layers": 2, **kw}))


@pytest.fixture
def offline_empty_hub(monkeypatch, tmp_path):
    """An offline Hugging Face hub with an empty cache, whatever this machine has cached."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))


def test_unavailable_hub_weights_fall_back_to_random_loudly(offline_empty_hub, caplog):
    with pytest.warns(PretrainedWeightsWarning, match="RANDOM"):
        model = create_model("cdpdnet_tiny", dino={"weights": "hub", "depth": 1, "layers": 1}, **make_bank())
    prov = model.provenance["dino"]
    assert prov["weights"] == "random" and prov["requested"] == "hub" and prov["name"] == SMALL_VIT
    assert "could not be loaded" in prov["reason"] and "RANDOM" in caplog.text
    assert model.provenance["model"] == "cdpdnet_tiny" and model.provenance["text_bank"]["num_classes"] == 32


def test_explicit_random_and_provided_weights_are_recorded():
    assert encoder().provenance["weights"] == "random"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # provided weights (a site receiving them from the server) do not warn
        assert DinoSliceEncoder(DinoConfig(SMALL_VIT, depth=1, layers=1, weights="provided")).provenance["weights"] \
            == "provided"


def test_local_weights_file_loads_and_truncates(tmp_path):
    import timm

    torch.manual_seed(123)
    source = timm.create_model(SMALL_VIT, pretrained=False, num_classes=0, depth=3)  # deeper than the encoder
    path = tmp_path / "dinov2_small.pth"
    torch.save(source.state_dict(), path)
    enc = encoder(weights=str(path))
    assert enc.provenance["weights"] == "file" and enc.provenance["path"] == str(path)
    assert len(enc.provenance["sha256"]) == 64
    loaded = enc.vit.state_dict()
    for name, value in source.state_dict().items():
        if not name.startswith("blocks.2."):
            torch.testing.assert_close(loaded[name], value, atol=0, rtol=0, msg=name)
    assert not any(p.requires_grad for p in enc.parameters())


def test_bad_weights_sources_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        encoder(weights=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(FedTextSegError, match="not a checkpoint of"):
        encoder(weights=str(wrong))
    with pytest.raises(ConfigError, match="dino.name"):
        encoder(name="vit_smal_patch14_dinov2")


def test_slice_features_shape_and_slice_independence():
    enc = encoder(slice_batch=5)  # several ViT calls per patch
    x = torch.rand(2, 1, 7, 40, 30)  # 40 -> 42 = 3 tokens, 30 -> 28 = 2 tokens
    feats = enc(x)
    assert feats.shape == (2, enc.out_channels, 7, 3, 2)
    torch.testing.assert_close(enc(x[:, :, 2:5]), feats[:, :, 2:5], atol=1e-5, rtol=1e-5)  # z-crop is exact


def volume_and_padded():
    torch.manual_seed(0)
    vol = torch.rand(1, 11, 60, 50)  # [C, D, H, W]; 28x28 tiles -> padded to 84 x 56
    return vol, F.pad(vol, (0, 6, 0, 24))


def test_cached_crop_equals_recomputed_features():
    enc = encoder()
    vol, padded = volume_and_padded()
    exact = compute_volume_features(enc, vol, tile=(28, 28), dtype=torch.float32)
    half = compute_volume_features(enc, vol, tile=(28, 28))
    assert exact.features.shape == (enc.out_channels, 11, 3 * 2, 2 * 2) and half.features.dtype == torch.float16
    assert half.nbytes * 2 == exact.nbytes and exact.signature == enc.signature()
    for start in [(0, 0, 0), (3, 28, 28), (6, 56, 0)]:  # the last one reaches into the zero padding
        z, y, x = start
        patch = padded[None, :, z:z + 5, y:y + 28, x:x + 28]
        ref = enc(patch)[0]
        torch.testing.assert_close(crop_features(exact, start, (5, 28, 28)), ref, atol=1e-6, rtol=1e-6)
        # float16 storage is the only inexactness: within half precision (2^-11 relative)
        torch.testing.assert_close(crop_features(half, start, (5, 28, 28)).float(), ref, atol=2e-3, rtol=1e-3)


def test_crop_must_be_tile_aligned_and_inside():
    fv = compute_volume_features(encoder(), volume_and_padded()[0], tile=(28, 28))
    with pytest.raises(FedTextSegError, match="not aligned"):
        crop_features(fv, (0, 14, 0), (5, 28, 28))
    with pytest.raises(FedTextSegError, match="28x28"):
        crop_features(fv, (0, 0, 0), (5, 56, 28))
    with pytest.raises(FedTextSegError, match="outside"):
        crop_features(fv, (8, 0, 0), (5, 28, 28))
    with pytest.raises(FedTextSegError, match="outside"):
        crop_features(fv, (0, 84, 0), (5, 28, 28))


def test_model_output_with_cached_features_equals_recomputation(tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model("cdpdnet_tiny", **make_bank()).eval()
    vol = torch.rand(1, 24, 64, 40)
    padded = F.pad(vol, (0, 24))
    fv = compute_volume_features(model, vol, tile=(32, 32), dtype=torch.float32)
    fv.save(tmp_path / "features.pt")
    fv = FeatureVolume.load(tmp_path / "features.pt")
    assert fv.signature == model.dino.signature() and fv.volume_shape == (24, 64, 40)
    z, y, x = 8, 32, 32
    patch = padded[None, :, z:z + 16, y:y + 32, x:x + 32]
    task = torch.tensor([2])
    with torch.no_grad():
        ref = model(patch, task)
        cached = model(patch, task, dino_features=crop_features(fv, (z, y, x), (16, 32, 32))[None])
        half = compute_volume_features(model, vol, tile=(32, 32))
        approx = model(patch, task, dino_features=crop_features(half, (z, y, x), (16, 32, 32))[None])
    torch.testing.assert_close(cached, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(approx, ref, atol=5e-3, rtol=5e-3)


def test_cache_needs_a_dino_branch_and_rejects_foreign_files(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        no_dino = create_model("cdpdnet_tiny", dino={"enabled": False}, **make_bank())
    with pytest.raises(ConfigError, match="no DINOv2 branch"):
        compute_volume_features(no_dino, torch.rand(1, 4, 28, 28), tile=(28, 28))
    junk = tmp_path / "junk.pt"
    torch.save({"something": 1}, junk)
    with pytest.raises(FedTextSegError, match="feature cache"):
        FeatureVolume.load(junk)


def test_pipeline_feature_fn_feeds_forward_batch():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model("cdpdnet_tiny", **make_bank()).eval()
    vol = torch.rand(1, 16, 64, 64)
    out = volume_feature_fn(model, (32, 32))(vol)
    assert out["dino_tile"] == (32, 32, 2) and out["dino"].shape == (model.dino.out_channels, 16, 4, 4)
    th, tw, g = out["dino_tile"]
    z0, y0, x0 = 0, 32, 0  # the data pipeline's crop: dino[:, z0:z0+pd, y0//th*g:(y0+ph)//th*g, x0//tw*g:...]
    dino = out["dino"][:, z0:z0 + 16, y0 // th * g:(y0 + 32) // th * g, x0 // tw * g:(x0 + 32) // tw * g]
    patch = vol[None, :, z0:z0 + 16, y0:y0 + 32, x0:x0 + 32]
    batch = {"image": patch, "task": torch.tensor([3]), "dino": dino[None]}
    with torch.no_grad():
        logits = model.forward_batch(batch)["logits"]
        torch.testing.assert_close(logits, model(patch, torch.tensor([3])), atol=5e-3, rtol=5e-3)
    with pytest.raises(ConfigError, match="square"):
        volume_feature_fn(model, (32, 16))
