"""CDPDNet: registry, forward contract, gradients, per-sample task conditioning, ablations, DP-SGD compatibility."""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedtextseg.errors import ConfigError, FedTextSegError  # noqa: E402
from fedtextseg.models import CDPDNet, create_model, list_models, model_config  # noqa: E402
from fedtextseg.params import check_groups, count_params  # noqa: E402
from fedtextseg.vocab import UnknownClassError, get_vocabulary  # noqa: E402
from conftest import make_bank

PATCH = (16, 32, 32)  # the smallest patch the tiny config takes with a 2x2 DINO token grid: fast tests




def tiny(**overrides) -> CDPDNet:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model("cdpdnet_tiny", **make_bank(), **overrides)


@torch.no_grad()
def randomize_identity_inits(model: CDPDNet) -> None:
    """FiLM and TTPG modulation start at zero (identity); make them matter for equivalence tests."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.requires_grad and not p.abs().sum():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_registry_names_configs_and_errors():
    assert {"cdpdnet_paper", "cdpdnet_small", "cdpdnet_tiny"} <= set(list_models("cdpdnet*"))
    assert model_config("cdpdnet_paper")["widths"] == (32, 64, 128, 256, 320, 320)
    with pytest.raises(ConfigError, match="cdpdnet_tiny"):
        create_model("cdpdnet_tiyn", **make_bank())
    with pytest.raises(ConfigError, match="text_dim"):
        create_model("cdpdnet_tiny", text_dimm=16, **make_bank())
    with pytest.raises(ConfigError, match="layers"):
        create_model("cdpdnet_tiny", dino={"layerz": 1}, **make_bank())
    with pytest.raises(ConfigError, match="text bank"):
        create_model("cdpdnet_tiny")
    with pytest.raises(ConfigError, match="attn_heads"):
        create_model("cdpdnet_tiny", attn_heads=3, **make_bank())


def test_forward_shape_and_gradients_reach_trainable_groups_only():
    model = tiny().train()
    x = torch.rand(2, 1, *PATCH)
    logits = model(x, torch.tensor([0, 4]))
    assert logits.shape == (2, model.num_classes, *PATCH)
    logits.sigmoid().mean().backward()
    groups = check_groups(model)
    params = dict(model.named_parameters())
    for name in groups.shared + list(groups.per_class):
        if name in params:
            assert params[name].grad is not None and torch.isfinite(params[name].grad).all(), name
    # every class row of the head and both tasks' TTPG maps learn; unused tasks do not
    assert (params["head.residual.weight"].grad.abs().sum(1) > 0).all()
    task_rows = params["ttpg.task_maps.weight"].grad.flatten(1).abs().sum(1)
    assert task_rows[0] > 0 and task_rows[4] > 0 and task_rows[1] == 0
    for name in groups.frozen_common:
        if name in params:
            assert params[name].grad is None and not params[name].requires_grad, name
    assert all(not t.requires_grad for t in (model.class_embeddings, model.task_embeddings))


def test_dino_fusion_starts_closed_and_opens_with_its_gates():
    """Zero-initialised tanh gates: at init the DINOv2 features cannot change the output (the CNN learns undisturbed);
    the gates' own gradient is not zero, so training can open them, and then the features matter."""
    model = tiny().eval()
    x = torch.rand(1, 1, *PATCH)
    feats = model.dino_features(x)
    with torch.no_grad():
        base = model.forward_batch({"image": x, "task": torch.tensor([0]), "dino": feats})["logits"]
        other = model.forward_batch({"image": x, "task": torch.tensor([0]), "dino": feats.flip(1) * 3})["logits"]
    torch.testing.assert_close(base, other)
    model.train()
    model(x, torch.tensor([0])).sigmoid().mean().backward()
    gates = {n: p for n, p in model.named_parameters() if n.endswith(".alpha")}
    assert len(gates) == 2 * len(model.config.fusion_stages) * model.config.attn_blocks
    assert all(p.grad is not None and p.grad.abs().item() > 0 for p in gates.values())
    with torch.no_grad():
        for p in gates.values():
            p.fill_(0.5)
        opened = model.forward_batch({"image": x, "task": torch.tensor([0]), "dino": feats})["logits"]
        moved = model.forward_batch({"image": x, "task": torch.tensor([0]), "dino": feats.flip(1) * 3})["logits"]
    assert (opened - moved).abs().max() > 1e-4


def test_dino_stays_frozen_in_eval_mode():
    model = tiny().train()
    assert model.training and model.encoder.training
    assert not model.dino.vit.training and not any(m.training for m in model.dino.vit.modules())
    model.eval().train(True)
    assert not model.dino.vit.training


def test_task_is_chosen_per_sample():
    model = tiny().eval()
    randomize_identity_inits(model)
    x = torch.rand(2, 1, *PATCH)
    with torch.no_grad():
        both = model(x, torch.tensor([2, 7]))
        first, second = model(x[:1], torch.tensor([2])), model(x[1:], torch.tensor([7]))
        other = model(x[:1], torch.tensor([7]))
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=1e-5)
    assert (other - first).abs().max() > 1e-3  # the task really changes the output
    with torch.no_grad():
        by_name = model(x[:1], "kits")
    torch.testing.assert_close(by_name, model(x[:1], torch.tensor([model.task_index("KiTS19")])))
    with pytest.raises(ConfigError, match="task"):
        model(x)
    with pytest.raises(ConfigError, match="out of range"):
        model(x, torch.tensor([0, 99]))


def test_class_lookup_by_name():
    model = tiny()
    vocab = get_vocabulary()
    assert model.class_index("IVC") == vocab.index("postcava")
    assert model.class_index("Kidney_Left") == vocab.index("left kidney")
    with pytest.raises(UnknownClassError, match="liver"):
        model.class_index("livr")
    with pytest.raises(UnknownClassError, match="group"):
        model.class_index("kidney")


def test_patch_size_is_validated():
    model = tiny()
    assert model.check_patch_size((32, 32, 32)) == (32, 32, 32)
    with pytest.raises(ConfigError, match=r"multiple of its total stride \(8, 8, 8\).*use 24 or 32"):
        model.check_patch_size((30, 32, 32))
    with pytest.raises(ConfigError, match="bottleneck"):
        model.check_patch_size((8, 8, 8))
    with pytest.raises(ConfigError, match="multiple"):
        model(torch.rand(1, 1, 16, 36, 32), torch.tensor([0]))
    with pytest.raises(ConfigError, match="use 32 or 40"):
        create_model("cdpdnet_tiny", patch_size=(32, 36, 32), **make_bank())
    assert model.patch_size == (32, 32, 32)


def test_opacus_validator_accepts_tiny_and_small():
    from opacus.validators import ModuleValidator

    assert ModuleValidator.validate(tiny().train(), strict=False) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = create_model("cdpdnet_small", dino={"weights": None}, **make_bank())
    assert ModuleValidator.validate(small.train(), strict=False) == []


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_opacus_per_sample_gradients_are_correct():
    from opacus import GradSampleModule

    model = tiny().train()
    randomize_identity_inits(model)
    x, task = torch.rand(2, 1, *PATCH), torch.tensor([1, 5])
    model(x[:1], task[:1]).square().mean().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    dp = GradSampleModule(model, loss_reduction="sum")
    dp(x, task).square().mean(dim=(1, 2, 3, 4)).sum().backward()
    for name, p in dp.named_parameters():
        if p.requires_grad:
            ref = reference[name.removeprefix("_module.")]
            err = (p.grad_sample[0] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
            assert err < 2e-3, (name, float(err))


def test_ablations_text_off_and_dino_off():
    no_text = tiny(text_conditioning=False)
    x = torch.rand(1, 1, *PATCH)
    assert no_text(x).shape == (1, no_text.num_classes, *PATCH)  # no task needed
    assert not hasattr(no_text, "ttpg") and no_text.head.residual.weight.abs().sum() > 0
    check_groups(no_text)
    no_dino = tiny(dino={"enabled": False})
    assert no_dino.dino is None and no_dino(x, torch.tensor([0])).shape == (1, no_dino.num_classes, *PATCH)
    assert count_params(no_dino)["frozen_common"] == 0
    with pytest.raises(ConfigError, match="dino.enabled"):
        no_dino.dino_features(x)


def test_autocast_bf16_and_channels_last_3d():
    model = tiny().eval()
    x, task = torch.rand(1, 1, *PATCH), torch.tensor([3])
    with torch.no_grad():
        ref = model(x, task)
        model.to(memory_format=torch.channels_last_3d)
        assert model.encoder[0][0].conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last_3d), task), ref, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, task)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_dino_features_shape_and_given_features_skip_the_vit(monkeypatch):
    model = tiny().eval()
    x, task = torch.rand(1, 1, *PATCH), torch.tensor([0])
    feats = model.dino_features(x)
    assert feats.shape == (1, model.dino.out_channels, PATCH[0], 2, 2) and not feats.requires_grad
    with torch.no_grad():
        ref = model(x, task)
        monkeypatch.setattr(model.dino, "forward", lambda *_: pytest.fail("the ViT ran although features were given"))
        torch.testing.assert_close(model(x, task, dino_features=feats), ref)
    with pytest.raises(FedTextSegError, match="must be"):
        model(x, task, dino_features=feats[:, :, :4])


def test_new_class_gets_a_text_head_and_old_rows_are_kept():
    model = tiny().eval()
    randomize_identity_inits(model)
    x, task = torch.rand(1, 1, *PATCH), torch.tensor([0])
    with torch.no_grad():
        before = model(x, task)
        bank = make_bank()
        names = bank["class_names"] + ["left ovary"]
        model.set_class_bank(torch.cat([bank["class_embeddings"], torch.randn(1, bank["class_embeddings"].shape[1])]), names)
        after = model(x, task)
    assert after.shape[1] == before.shape[1] + 1 and model.class_index("left ovary") == before.shape[1]
    torch.testing.assert_close(after[:, :-1], before)
    check_groups(model)


def test_tiny_cpu_step_time_and_paper_param_count(capsys):
    model = tiny().train()
    x, task = torch.rand(2, 1, 32, 32, 32), torch.tensor([0, 1])
    model(x, task).mean().backward()  # warm-up
    start = time.perf_counter()
    model(x, task).mean().backward()
    step = time.perf_counter() - start
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        paper = create_model("cdpdnet_paper", dino={"weights": None}, **make_bank(512))
    counts = count_params(paper)
    with capsys.disabled():
        print(f"\ncdpdnet_tiny fwd+bwd batch 2 @32^3: {step:.2f} s; cdpdnet_paper params: {counts}")
    assert counts["frozen_common"] == 86_579_712  # ViT-B/14 DINOv2 (REFERENCE: ~86 M frozen)
    assert 60e6 < counts["trainable"] < 90e6  # REFERENCE: ~66 M trainable (see the report for the difference)


def test_window_attention_is_local_padded_and_shifted_exactly():
    from fedtextseg.models.blocks import WindowCrossAttention3d

    torch.manual_seed(0)
    plain = WindowCrossAttention3d(8, heads=2, window=3, shifted=False).eval()
    shifted = WindowCrossAttention3d(8, heads=2, window=3, shifted=True).eval()
    with torch.no_grad():  # open the zero-initialised gates, or the block is the identity
        plain.gate_attn.alpha.fill_(0.8)
        plain.gate_mlp.alpha.fill_(-0.5)
    shifted.load_state_dict(plain.state_dict())
    x, ctx = torch.randn(2, 8, 5, 6, 6), torch.randn(2, 8, 5, 6, 6)

    def alone(module, d, h, w):  # the block run on one window's voxels only
        return module(x[:, :, d, h, w], ctx[:, :, d, h, w])

    with torch.no_grad():
        out = plain(x, ctx)  # D=5: windows [0:3) and [3:5) + one padded, masked slice
        torch.testing.assert_close(out[:, :, :3, :3, 3:], alone(plain, slice(0, 3), slice(0, 3), slice(3, 6)))
        torch.testing.assert_close(out[:, :, 3:, 3:, :3], alone(plain, slice(3, 5), slice(3, 6), slice(0, 3)))
        out = shifted(x, ctx)  # shift 1: windows are [1:4) and {4, 5} (+ the wrapped 0, masked as another region)
        torch.testing.assert_close(out[:, :, 1:4, 1:4, 1:4], alone(plain, slice(1, 4), slice(1, 4), slice(1, 4)))
        torch.testing.assert_close(out[:, :, :1, 4:, 4:], alone(plain, slice(0, 1), slice(4, 6), slice(4, 6)))
