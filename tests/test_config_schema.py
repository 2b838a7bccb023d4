"""The config schema (fedtextseg.config_schema): Hydra composes configs/ over it in struct mode, so an undeclared key
or a wrong type fails at composition, naming the key, and a composed config cannot grow keys later."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from fedtextseg.config import compose_config, configs_dir, list_experiments
from fedtextseg.config_schema import FedTextSegConfig
from fedtextseg.errors import ConfigError


@pytest.fixture
def own_configs(tmp_path, monkeypatch):
    """A copy of configs/ that the test may add files to (FEDTEXTSEG_CONFIGS points at it)."""
    copy = tmp_path / "configs"
    shutil.copytree(configs_dir(), copy)
    monkeypatch.setenv("FEDTEXTSEG_CONFIGS", str(copy))
    return copy


@pytest.mark.parametrize("override,key", [
    ("federation.round=3", "federation.round"),     # a typo of federation.rounds
    ("+federation.round=3", "round"),               # appending is refused too: the schema is closed
    ("train.learning_rate=1e-3", "train.learning_rate"),
])
def test_an_undeclared_key_on_the_command_line_fails_at_composition(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config("demo", override)


def test_a_value_of_the_wrong_type_fails_at_composition():
    with pytest.raises(ConfigError, match="federation.rounds=eight"):
        compose_config("demo", "federation.rounds=eight")
    with pytest.raises(ConfigError, match="eval.hd95"):
        compose_config("demo", "eval.hd95=maybe")


def test_an_undeclared_key_in_an_experiment_file_fails_naming_it(own_configs):
    (own_configs / "experiment" / "typo.yaml").write_text(
        "# @package _global_\nfederation:\n  rounds: 2\n  min_site: 1\n")
    with pytest.raises(ConfigError, match="min_site"):
        compose_config("typo")
    (own_configs / "model" / "bad.yaml").write_text("name: cdpdnet_tiny\nkwarg: {}\n")  # a group file, too
    with pytest.raises(ConfigError, match="kwarg"):
        compose_config("demo", "model=bad")


def test_a_composed_config_can_neither_read_nor_grow_an_undeclared_key():
    cfg = compose_config("demo")
    with pytest.raises(ConfigAttributeError):
        _ = cfg.federation.round
    with pytest.raises((ConfigAttributeError, ConfigKeyError)):
        cfg.data.sitez = ["a"]
    cfg.data.sites = ["site01-btcv"]  # declared keys are writable (the study runner selects sites)
    assert cfg.data.sites == ["site01-btcv"]


def test_free_form_sections_stay_open_for_their_own_validators():
    """model.kwargs (each architecture's options) and data.preprocess (each pipeline's) are validated where they
    are used, with their own lists of known options."""
    cfg = compose_config("demo", "++model.kwargs.text_conditioning=false ++data.preprocess.flip_prob=0.3")
    assert cfg.model.kwargs.text_conditioning is False and cfg.data.preprocess.flip_prob == 0.3
    from fedtextseg.runtime import preprocess_config

    with pytest.raises(ConfigError, match="flip_probability"):
        preprocess_config(compose_config("demo", "++data.preprocess.flip_probability=0.3"))


def test_every_experiment_and_group_file_composes_over_the_schema():
    schema_sections = set(OmegaConf.structured(FedTextSegConfig))
    groups = {group: sorted(p.stem for p in (configs_dir() / group).glob("*.yaml"))
              for group in ("model", "data", "federation", "privacy")}
    for experiment in list_experiments():
        assert set(compose_config(experiment)) == schema_sections
    for group, options in groups.items():
        for option in options:
            cfg = compose_config(None, [f"{group}={option}"])
            assert OmegaConf.is_struct(cfg) and set(cfg) == schema_sections, (group, option)


def test_one_patch_size_the_pipelines_which_the_model_records():
    """The 3D model records the patch it trains and slides with: data.preprocess.patch_size, not a second default
    of its own; a different patch in model.kwargs is refused."""
    from fedtextseg.runtime import build_model, prepare_bank

    cfg = compose_config("demo", "data.preprocess.patch_size=[16,32,32]")
    bank = prepare_bank(cfg, log_fn=lambda *_: None)
    assert build_model(cfg, bank).patch_size == (16, 32, 32)
    clash = compose_config("demo", "data.preprocess.patch_size=[16,32,32] ++model.kwargs.patch_size=[32,32,32]")
    with pytest.raises(ConfigError, match=r"model.kwargs.patch_size=\[32, 32, 32\] differs"):
        build_model(clash, bank)
    with pytest.raises(ConfigError, match=r"data.preprocess.patch_size=\[20, 20, 20\]: .*multiple of its total"):
        build_model(compose_config("demo", "data.preprocess.patch_size=[20,20,20]"), bank)
