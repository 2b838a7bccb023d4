"""The named architectures are data: configs/model/<name>.yaml, read by the model registry (and composed by Hydra)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from fedtextseg.config import compose_config, configs_dir
from fedtextseg.errors import ConfigError
from fedtextseg.model_file import load_model_file, save_model_file
from fedtextseg.models import (CDPDNetConfig, create_model, is_model, list_models, model_config, model_family)
from fedtextseg.models.tgcnet import TGCNetConfig
from fedtextseg.runtime import build_model
from fedtextseg.text import EmbeddingBank
from fedtextseg.vocab import get_vocabulary
from conftest import make_bank

FAMILIES = {"cdpdnet": CDPDNetConfig, "tgcnet": TGCNetConfig}
NAMED = ["cdpdnet_paper", "cdpdnet_small", "cdpdnet_tiny", "tgcnet_paper", "tgcnet_small", "tgcnet_tiny"]


@pytest.fixture
def configs_copy(tmp_path, monkeypatch) -> Path:
    """A user's own copy of the configs folder, selected the documented way (FEDTEXTSEG_CONFIGS)."""
    folder = tmp_path / "configs"
    shutil.copytree(configs_dir(), folder)
    monkeypatch.setenv("FEDTEXTSEG_CONFIGS", str(folder))
    return folder


def _edit(path: Path, **architecture) -> None:
    data = yaml.safe_load(path.read_text())
    data["architecture"].update(architecture)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _bank() -> EmbeddingBank:
    vocab = get_vocabulary()
    b = make_bank()
    return EmbeddingBank(class_names=b["class_names"], class_embeddings=b["class_embeddings"],
                         task_names=b["task_names"], task_embeddings=b["task_embeddings"],
                         class_template=vocab.class_template, task_template=vocab.task_template,
                         vocabulary=vocab.name, vocabulary_hash=vocab.content_hash,
                         encoder={"kind": "test", "model": "random"})


def test_every_named_architecture_is_a_whole_file():
    assert set(NAMED) <= set(list_models())
    for name in NAMED:
        data = yaml.safe_load((configs_dir() / "model" / f"{name}.yaml").read_text())
        assert data["name"] == name and model_family(name) == data["family"]
        schema = FAMILIES[data["family"]]
        fields = [f.name for f in dataclasses.fields(schema)]
        assert sorted(data["architecture"]) == sorted(fields), name  # nothing hides in the dataclass defaults
        assert model_config(name) == dataclasses.asdict(schema(**data["architecture"]))
    assert model_config("cdpdnet_tiny")["strides"][1] == (2, 2, 2)  # normalised: tuples, as the dataclass makes them
    assert model_config("tgcnet_small")["clip_cfg"]["vision_cfg"]["width"] == 256
    assert not is_model("cdpdnet_tiny_nodino")  # a Hydra option that selects cdpdnet_tiny with kwargs, not a size


def test_a_new_size_is_a_new_file(configs_copy):
    wide = yaml.safe_load((configs_copy / "model" / "cdpdnet_tiny.yaml").read_text())
    wide["name"] = "cdpdnet_wide"
    wide["architecture"].update(widths=[16, 24, 48, 96], text_dim=48)
    wide["architecture"]["dino"]["enabled"] = False
    (configs_copy / "model" / "cdpdnet_wide.yaml").write_text(yaml.safe_dump(wide, sort_keys=False))
    assert "cdpdnet_wide" in list_models("cdpdnet*")
    model = create_model("cdpdnet_wide", **make_bank())
    assert model.config.widths == (16, 24, 48, 96) and model.config.text_dim == 48 and model.model_name == "cdpdnet_wide"
    cfg = compose_config("demo", ["model=cdpdnet_wide"])  # and Hydra composes the same file as the model option
    assert cfg.model.family == "cdpdnet" and list(cfg.model.architecture.widths) == [16, 24, 48, 96]
    built = build_model(cfg, _bank())
    assert built.config.widths == (16, 24, 48, 96) and built.config.patch_size == tuple(cfg.data.preprocess.patch_size)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(name="cdpdnet_other"), "'name' must be its file name"),
    (lambda d: d.update(family="unet"), "unknown model family 'unet'"),
    (lambda d: d["architecture"].pop("text_dim"), "lacks text_dim"),
    (lambda d: d["architecture"].update(text_dimm=3), "text_dimm"),
    (lambda d: d["architecture"].update(widths=[8]), "at least 2"),
])
def test_a_malformed_architecture_file_names_itself(configs_copy, change, message):
    path = configs_copy / "model" / "cdpdnet_tiny.yaml"
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=message) as err:
        list_models()
    assert str(path) in str(err.value)


def test_tgcnet_architecture_is_checked_when_read(configs_copy):
    path = configs_copy / "model" / "tgcnet_tiny.yaml"
    _edit(path, cnn_widths=[8, 16, 32])
    with pytest.raises(ConfigError, match="cnn_widths 4 widths") as err:
        model_config("tgcnet_small")  # any lookup reads every file
    assert "tgcnet" in str(err.value)


def test_the_composed_architecture_is_not_edited_in_place():
    cfg = compose_config("demo", ["model.architecture.text_dim=64"])
    with pytest.raises(ConfigError, match=r"model\.architecture\.text_dim differs .*model\.kwargs\.text_dim"):
        build_model(cfg, _bank())
    cfg = compose_config("demo", ["model.name=cdpdnet_small"])  # the option's architecture is cdpdnet_tiny's
    with pytest.raises(ConfigError, match="model.architecture"):
        build_model(cfg, _bank())
    cfg = compose_config("demo", ["model.family=tgcnet"])
    with pytest.raises(ConfigError, match="model.family='tgcnet'"):
        build_model(cfg, _bank())


def test_a_model_file_rebuilds_the_architecture_it_was_trained_with(configs_copy, tmp_path):
    cfg = compose_config("demo")  # cdpdnet_tiny_nodino: cdpdnet_tiny's architecture plus kwargs
    model = build_model(cfg, _bank())
    path = save_model_file(tmp_path / "model.pt", model, cfg)
    _edit(configs_copy / "model" / "cdpdnet_tiny.yaml", text_dim=48, attn_heads=4)  # the file changes later
    assert create_model("cdpdnet_tiny", **make_bank()).config.text_dim == 48  # read again
    loaded, _ = load_model_file(path)
    assert loaded.config.text_dim == 32 and loaded.config.attn_heads == 2 and loaded.config.widths == (16, 16, 32, 64)
    assert not loaded.config.dino.enabled
