"""Parameter groups: completeness, splitting and merging state, counting and hashing the frozen part."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedtextseg.errors import FedTextSegError  # noqa: E402
from fedtextseg.models import create_model  # noqa: E402
from fedtextseg.params import (GROUP_NAMES, ParamGroups, check_groups, count_params, frozen_hash,  # noqa: E402
                               merge_into, split_state_dict)
from fedtextseg.vocab import get_vocabulary  # noqa: E402


def tiny(seed: int = 0, **overrides):
    vocab = get_vocabulary()
    g = torch.Generator().manual_seed(0)  # the same text bank for every model
    bank = dict(class_embeddings=torch.randn(vocab.num_classes, 32, generator=g),
                task_embeddings=torch.randn(len(vocab.tasks), 32, generator=g),
                class_names=vocab.class_names, task_names=vocab.task_names)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model("cdpdnet_tiny", **bank, **overrides)


def test_groups_partition_the_state_dict():
    model = tiny()
    groups = check_groups(model)
    names = [n for g in GROUP_NAMES for n in groups.names(g)]
    assert sorted(names) == sorted(model.state_dict()) and len(names) == len(set(names))
    assert groups.per_class == {"head.residual.weight": 0, "head.residual.bias": 0}
    assert {"class_embeddings", "task_embeddings"} <= set(groups.frozen_common)
    assert {n for n, _ in model.dino.named_parameters(prefix="dino")} <= set(groups.frozen_common)
    assert groups.local == [] and any(n.startswith("fusion.") for n in groups.shared)
    assert groups.group_of("head.residual.bias") == "per_class"


def test_local_norms_moves_norm_affines_to_local():
    model = tiny(local_norms=True)
    groups = check_groups(model)
    assert "encoder.0.0.norm.weight" in groups.local and "fusion.1.0.norm_q.bias" in groups.local
    assert not any(n.startswith("dino.") for n in groups.local)
    assert "encoder.0.0.conv.weight" in groups.shared


def test_check_groups_reports_every_problem():
    model = tiny()
    good = model.param_groups()
    missing = ParamGroups(good.shared[1:], good.per_class, good.frozen_common, good.local)
    with pytest.raises(FedTextSegError, match="in no group: " + good.shared[0]):
        check_groups(model, missing)
    twice = ParamGroups(good.shared, good.per_class, good.frozen_common, good.local + [good.shared[0]])
    with pytest.raises(FedTextSegError, match="both shared and local"):
        check_groups(model, twice)
    wrong_axis = ParamGroups(good.shared, {"head.residual.weight": 1, "head.residual.bias": 0},
                             good.frozen_common, good.local)
    with pytest.raises(FedTextSegError, match="axis 1 has length 8, model has 32 classes"):
        check_groups(model, wrong_axis)
    trainable_frozen = ParamGroups(good.shared[1:], good.per_class, good.frozen_common + good.shared[:1], good.local)
    with pytest.raises(FedTextSegError, match="requires gradients"):
        check_groups(model, trainable_frozen)
    with pytest.raises(FedTextSegError, match="not in the model"):
        check_groups(model, ParamGroups(good.shared + ["nope.weight"], good.per_class, good.frozen_common))


def test_split_and_merge_round_trip():
    a, b = tiny(seed=1), tiny(seed=2)
    parts = split_state_dict(a)
    assert set(parts) == set(GROUP_NAMES)
    loaded = merge_into(b, {**parts["shared"], **parts["per_class"]})
    assert len(loaded) == len(parts["shared"]) + len(parts["per_class"])
    state_b = b.state_dict()
    for name, value in {**parts["shared"], **parts["per_class"]}.items():
        torch.testing.assert_close(state_b[name], value, atol=0, rtol=0)
    assert not torch.equal(state_b["dino.vit.pos_embed"], a.state_dict()["dino.vit.pos_embed"])  # untouched


def test_merge_rejects_unknown_and_misshaped_keys_without_loading():
    model = tiny()
    before = model.state_dict()["head.residual.bias"].clone()
    bad = {"head.residual.bias": torch.ones(32), "head.residual.wieght": torch.zeros(32, 8),
           "head.controller.weight": torch.zeros(3, 3)}
    with pytest.raises(FedTextSegError) as err:
        merge_into(model, bad)
    msg = str(err.value)
    assert "'head.residual.wieght'" in msg and "did you mean 'head.residual.weight'" in msg
    assert "'head.controller.weight' has shape (3, 3), the model expects (9, 32)" in msg
    torch.testing.assert_close(model.state_dict()["head.residual.bias"], before)


def test_count_params_adds_up():
    model = tiny(local_norms=True)
    c = count_params(model)
    assert c["trainable"] == c["shared"] + c["per_class"] + c["local"]
    assert c["frozen"] == c["frozen_common"] == sum(p.numel() for p in model.dino.parameters())
    assert c["per_class"] == 32 * 8 + 32 and c["buffers"] == 32 * 32 + 11 * 32 + 2 * 32  # bank + its two centres


def test_frozen_hash_identifies_the_frozen_part():
    a, b, c = tiny(seed=5), tiny(seed=5), tiny(seed=6)
    h = frozen_hash(a)
    assert len(h) == 64 and h == frozen_hash(b) and h != frozen_hash(c)
    frozen = split_state_dict(a)["frozen_common"]
    assert frozen_hash(dict(reversed(list(frozen.items())))) == h  # order does not matter
    merge_into(b, {"head.residual.bias": torch.ones(32)})  # trainable changes do not move it
    assert frozen_hash(b) == h
    b.task_embeddings[0, 0] += 1  # the text bank is part of it
    assert frozen_hash(b) != h


def test_helpers_see_through_an_opacus_wrapper():
    from opacus import GradSampleModule

    model = tiny()
    wrapped = GradSampleModule(model)
    assert split_state_dict(wrapped)["per_class"].keys() == split_state_dict(model)["per_class"].keys()
    check_groups(wrapped)
    assert count_params(wrapped) == count_params(model)


def test_a_parameter_no_group_claims_is_an_error_not_silently_shared():
    from fedtextseg.params import build_param_groups

    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.Conv3d(2, 2, 1))
    groups = build_param_groups(model, frozen_common=lambda n: False, per_class={}, shared=lambda n: True)
    assert groups.shared == ["0.weight", "0.bias", "1.weight", "1.bias"]
    with pytest.raises(FedTextSegError, match=r"Sequential.param_groups\(\): 1.weight, 1.bias match\(es\) no "
                                              r"parameter group"):
        build_param_groups(model, frozen_common=lambda n: False, per_class={}, shared=lambda n: n.startswith("0."))
