"""TGC-Net (tiny config) and its report glossary: shapes, gradients, LoRA counts, ablation, text, param groups."""

from __future__ import annotations

import warnings

import pytest
import torch

from fedtextseg.errors import ConfigError, FedTextSegError
from fedtextseg.models import tgcnet as T
from fedtextseg.models.registry import create_model, list_models, model_config
from fedtextseg.params import GROUP_NAMES, check_groups, frozen_hash
from fedtextseg.text.glossary import Glossary, available_glossaries

CAPS = [
    "unilateral pulmonary infection, one infected area, lower right lung.",
    "bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tgcnet_tiny")


def _batch(b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, size, size, generator=g), torch.zeros(b, dtype=torch.long)


# ----------------------------------------------------------------------------- glossary
def test_glossary_terms_and_augmentation():
    g = Glossary.load()
    assert g.version == "chest_xray_v1" and "chest_xray_v1" in available_glossaries()
    assert len(g.hash) == 16 and g.hash == Glossary.load("chest_xray_v1").hash
    assert g.terms_in(CAPS[0]) == ["unilateral", "pulmonary infection", "infected areas", "lower zone", "right lung"]
    assert g.terms_in("Ground-glass opacity in both lungs") == ["ground-glass opacity", "opacity", "bilateral"]
    assert g.terms_in("") == [] and g.augment(None) == ""
    text = g.augment(CAPS[0])
    assert text.startswith(CAPS[0] + " Knowledge: unilateral: only one lung is affected;")
    assert "right lung: the patient's right lung, on the left side of a frontal image" in text
    assert g.augment("a normal heart.") == "a normal heart."


def test_glossary_hash_follows_content(tmp_path):
    g = Glossary.load()
    data = g.to_dict()
    data["terms"][0]["definition"] = "both lungs"
    assert Glossary.from_dict(data).hash != g.hash
    path = tmp_path / "mine.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    assert Glossary.load(path).hash == Glossary.from_dict(data).hash
    with pytest.raises(FedTextSegError, match="unknown glossary version 'chest_xray_v9'"):
        Glossary.load("chest_xray_v9")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: x\nterms:\n  - term: a\n    patterns: ['(']\n    definition: b\n")
    with pytest.raises(FedTextSegError, match="bad pattern"):
        Glossary.load(bad)


# ----------------------------------------------------------------------------- the network
def test_registered_configs():
    assert {"tgcnet_tiny", "tgcnet_small", "tgcnet_paper"} <= set(list_models("tgcnet*"))
    paper = model_config("tgcnet_paper")
    assert paper["clip_model"] == "ViT-B-16" and paper["image_size"] == 224 and paper["finetune"] == "lora"
    with pytest.raises(ConfigError, match="text_mode"):
        create_model("tgcnet_tiny", text_mode="captions")
    with pytest.raises(ConfigError, match="unknown option"):
        create_model("tgcnet_tiny", lora_rank=4)


def test_output_shapes_and_inputs(tiny):
    x, task = _batch()
    out = tiny(x, task, CAPS)
    assert out["logits"].shape == (2, 3, 64, 64) and out["aux_loss"].dim() == 0
    assert torch.isfinite(out["aux_loss"]) and out["aux_loss"] > 0
    rgb = tiny(x.expand(-1, 3, -1, -1), task, CAPS)["logits"]
    assert rgb.shape == (2, 3, 64, 64)
    odd = tiny(torch.rand(1, 1, 72, 56), task[:1], CAPS[:1])["logits"]  # not a multiple of the patch size
    assert odd.shape == (1, 3, 72, 56)
    with pytest.raises(ValueError, match="captions for a batch"):
        tiny(x, task, CAPS[:1])
    assert tiny(x, task, ["", None])["logits"].shape == (2, 3, 64, 64)  # falls back to the task prompt
    assert tiny.provenance["clip_weights"] == "random-init" and tiny.provenance["glossary"] == "chest_xray_v1"


def test_gradients_reach_lora_cnn_decoder_not_frozen_clip(tiny):
    tiny.zero_grad(set_to_none=True)
    x, task = _batch()
    out = tiny(x, task, CAPS)
    (out["logits"].square().mean() + out["aux_loss"]).backward()
    named = dict(tiny.named_parameters())
    lora_b = [n for n in named if "lora_B" in n]
    assert lora_b and all(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in lora_b)
    for prefix in ("stem.", "stages.0.", "adapters.0.", "fuse.2.", "calib.0.image_reads_text.", "ups.3.", "head.",
                   "text_in.", "img_embed."):
        grads = [p.grad for n, p in named.items() if n.startswith(prefix)]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), prefix
    frozen = [(n, p) for n, p in named.items() if n.startswith("clip.") and "lora_" not in n]
    assert frozen and all(not p.requires_grad and p.grad is None for _, p in frozen)
    tiny.zero_grad(set_to_none=True)


def test_lora_parameter_count_matches_hand_count(tiny):
    r = tiny.config.lora_r
    tiny_clip = model_config("tgcnet_tiny")["clip_cfg"]
    vis, txt = tiny_clip["vision_cfg"], tiny_clip["text_cfg"]
    # 4 square projections (q, k, v, out) of width w per block; LoRA adds A [r, w] + B [w, r] to each
    expected = 4 * 2 * r * (vis["width"] * vis["layers"] + txt["width"] * txt["layers"])
    trainable, total = tiny.clip.get_nb_trainable_parameters()
    assert trainable == expected == 4096
    counts = tiny.parameter_counts()
    assert counts["clip_trainable"] == expected and counts["clip_total"] == total
    assert counts["trainable"] == expected + counts["non_clip"]
    assert sum(p.numel() for n, p in tiny.named_parameters() if "lora_" in n) == expected


def test_finetune_modes_and_image_only_ablation():
    torch.manual_seed(0)
    full, frozen = create_model("tgcnet_tiny", finetune="full"), create_model("tgcnet_tiny", finetune="frozen")
    assert full.parameter_counts()["clip_trainable"] == full.parameter_counts()["clip_total"]
    assert frozen.parameter_counts()["clip_trainable"] == 0
    assert not [n for n, _ in frozen.named_parameters() if "lora_" in n]
    assert check_groups(full).frozen_common == [] and check_groups(frozen).frozen_common
    assert frozen_hash(frozen) == frozen_hash(create_model("tgcnet_tiny", finetune="frozen"))  # same at every site

    image_only = create_model("tgcnet_tiny", text_mode="none")
    assert not [n for n, _ in image_only.named_parameters() if ".text." in n or n.startswith("text_in")]
    x, task = _batch()
    out = image_only(x, task)
    assert out["logits"].shape == (2, 3, 64, 64) and out["aux_loss"].item() == 0.0
    assert torch.equal(out["logits"], image_only(x, task, CAPS)["logits"])  # captions are ignored
    assert image_only.parameter_counts()["total"] < full.parameter_counts()["total"]


def test_captions_change_the_output(tiny):
    tiny.eval()
    x, task = _batch(1)
    with torch.no_grad():
        a = tiny(x, task, CAPS[:1])["logits"]
        b = tiny(x, task, CAPS[1:])["logits"]
        a2 = tiny(x, task, CAPS[:1])["logits"]
    tiny.train()
    assert torch.equal(a, a2)
    assert (a - b).abs().max() > 1e-4


def test_glossary_knowledge_tokens(tiny):
    texts = [CAPS[0], "a chest x-ray"]
    tokens, mask, n_report = tiny._encode_text(texts, torch.device("cpu"))
    n_terms = len(tiny.glossary.terms)
    assert tokens.shape == (2, n_report + n_terms, tiny.config.text_dim) and mask.shape == (2, n_report + n_terms)
    names = [t.term for t in tiny.glossary.terms]
    on = {names[i] for i in torch.nonzero(mask[0, n_report:]).flatten().tolist()}
    assert on == set(tiny.glossary.terms_in(CAPS[0])) and not mask[1, n_report:].any()
    plain = create_model("tgcnet_tiny", glossary=None)
    assert plain._encode_text(texts, torch.device("cpu"))[0].shape[1] == n_report


def test_param_groups_complete_and_disjoint(tiny):
    groups = check_groups(tiny)
    names = [n for g in GROUP_NAMES for n in groups.names(g)]
    assert len(names) == len(set(names)) and set(names) == set(tiny.state_dict())
    assert groups.per_class == {"head.weight": 0, "head.bias": 0} and groups.local == []
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable == set(groups.shared) | set(groups.per_class)
    assert all("lora_" in n for n in groups.shared if n.startswith("clip."))
    assert all("lora_" not in n for n in groups.frozen_common)


def test_trains_on_a_synthetic_site_batch(tmp_path):
    from monai.data import DataLoader

    from fedtextseg.data.site import load_site
    from fedtextseg.synthetic.xray import generate_xray_hospitals
    from fedtextseg.data.xray import xray_dataset

    site = load_site(generate_xray_hospitals(tmp_path, sites=1, images_per_site=4, size=64, seed=0)[0])
    batch = next(iter(DataLoader(xray_dataset(site, size=64, train=True), batch_size=4)))
    torch.manual_seed(0)
    model = create_model("tgcnet_tiny")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):
        out = model.forward_batch(batch)
        assert out["logits"].shape == batch["label"].shape
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out["logits"][:, 0], batch["label"][:, 0])
        opt.zero_grad()
        (loss + out["aux_loss"]).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ----------------------------------------------------------------------------- CLIP weights, offline
def _named_cfg(**kw) -> T.TGCNetConfig:
    return T.TGCNetConfig(clip_model="ViT-S-32-alt", image_size=64, vit_layers=(0, 1, 2), cnn_widths=(8, 8, 16, 16),
                          stem_width=8, text_dim=32, heads=2, lora_r=2, **kw)


def test_missing_pretrained_weights_warn_and_use_random_init(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty hub cache
    cfg = T.TGCNetConfig(clip_model="ViT-B-32", pretrained="openai")
    with pytest.warns(UserWarning, match="RANDOM-INIT CLIP"):
        _, prov = T.build_clip(cfg)
    assert prov["clip_weights"] == "random-init" and "not in the hub cache" in prov["reason"]


def test_pretrained_weights_from_a_local_file(tmp_path):
    import open_clip

    torch.manual_seed(123)
    ref = open_clip.create_model("ViT-S-32-alt", force_image_size=64)
    path = tmp_path / "clip.pt"
    torch.save(ref.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found weights: no random-init warning
        model = T.TGCNet(_named_cfg(pretrained=str(path)))
    assert model.provenance["clip_weights"] == str(path.resolve())
    q = model.towers.visual.blocks[1].attn.q_proj.base_layer.weight
    assert torch.equal(q, ref.visual.transformer.resblocks[1].attn.in_proj_weight[:384])
    x, task = _batch(1)
    assert model(x, task, CAPS[:1])["logits"].shape == (1, 3, 64, 64)  # patch 32: ViT grid coarser than 1/16


def _per_sample_and_single_gradients(model, **kwargs):
    """Opacus' per-sample gradients of ``model`` on a 3-image batch (the third without a report) and the plain
    gradients of a copy on the third image alone: {name: parameter} of the copy, whose ``.grad`` is the reference."""
    from opacus import GradSampleModule

    single = create_model("tgcnet_tiny", **kwargs)
    single.load_state_dict(model.state_dict())
    x, task = _batch(3)
    caps = CAPS + [""]
    GradSampleModule(model, loss_reduction="sum")(x, task, caps)["logits"].square().sum().backward()
    single(x[2:], task[2:], caps[2:])["logits"].square().sum().backward()
    return dict(single.named_parameters())


def test_opacus_per_sample_gradients_are_exact():
    """DP-SGD: every trainable layer gets per-sample gradients equal to a single-sample backward."""
    torch.manual_seed(0)
    model = create_model("tgcnet_tiny", align_weight=0.0)  # the contrastive term couples samples: off under DP
    ref = _per_sample_and_single_gradients(model, align_weight=0.0)
    checked = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 3, name
        g = ref[name].grad
        if g.abs().max() > 1e-3:  # key biases have (mathematically) zero gradient: nothing to compare
            torch.testing.assert_close(p.grad_sample[2], g, rtol=1e-3, atol=1e-4 * g.abs().max().item())
            checked += 1
    assert checked > 100


def test_trimmed_text_tokens_are_exact(tiny):
    """Cutting the padding after the longest report's end-of-text token changes nothing (causal text tower)."""
    ids = tiny.tokenizer(CAPS)
    trimmed = T._trim(ids)
    assert trimmed.shape[1] == int(ids.argmax(-1).max()) + 1 < ids.shape[1]
    with torch.no_grad():
        full = tiny.towers.text(ids)[:, : trimmed.shape[1]]
        torch.testing.assert_close(tiny.towers.text(trimmed), full, rtol=1e-5, atol=1e-5)


def test_provided_weights_mode_builds_quietly():
    """``pretrained="provided"``: the caller loads the CLIP weights (a federated site, a model file); no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, prov = T.build_clip(_named_cfg(pretrained="provided"))
    assert prov["clip_weights"] == "provided" and prov["pretrained"] is None and "caller" in prov["loaded_by"]


def test_a_pretrained_frozen_minilm_can_read_the_reports_instead_of_a_clip_text_tower():
    """text_encoder="minilm": no CLIP text tower is built (nothing of it is sent or trained), the reports and the
    glossary go through the packaged MiniLM's frozen word-piece features, different reports give different masks,
    a copied model shares the one encoder, and the per-sample gradients DP-SGD needs stay exact."""
    import copy

    torch.manual_seed(0)
    model = create_model("tgcnet_tiny", text_encoder="minilm", align_weight=0.0)
    clip_text = create_model("tgcnet_tiny", align_weight=0.0)
    assert not [n for n in model.state_dict() if n.startswith("clip.") and ".text." in n]
    assert [n for n in clip_text.state_dict() if n.startswith("clip.") and ".text." in n]
    assert model.provenance["text_encoder"] == "sentence-minilm"
    assert check_groups(model).frozen_common and model.text_in.proj.in_features == 384
    tokens, mask, n_report = model._encode_text([CAPS[0], "a chest x-ray"], torch.device("cpu"))
    assert tokens.shape[0] == 2 and mask[0, :n_report].sum() > mask[1, :n_report].sum()  # its own word pieces
    assert set(model.glossary.terms_in(CAPS[0])) and mask[0, n_report:].any() and not mask[1, n_report:].any()
    model.eval()
    x, task = _batch(1)
    with torch.no_grad():
        a, b = (model(x, task, [c])["logits"] for c in CAPS[:2])
    assert (a - b).abs().max() > 1e-4
    assert copy.deepcopy(model).sentences is model.sentences
    model.train()
    ref = _per_sample_and_single_gradients(model, text_encoder="minilm", align_weight=0.0)
    for name in ("text_in.proj.weight", "calib.0.image_reads_text.q.weight", "calib.0.image_reads_text.k.weight"):
        got, want = dict(model.named_parameters())[name].grad_sample[2], ref[name].grad
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())
    with pytest.raises(ConfigError, match="text_encoder"):
        create_model("tgcnet_tiny", text_encoder="bert")
