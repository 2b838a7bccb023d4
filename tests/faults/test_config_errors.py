"""Configuration errors are caught at start, before any training, with a message saying what to change; the CLI
turns them into one line and exit status 2 (no traceback)."""

from __future__ import annotations

import pytest

from faults.helpers import QUIET, hospitals, tiny_cfg  # noqa: F401 - fixture
from fedtextseg import engine
from fedtextseg.cli import main as cli
from fedtextseg.config import compose_config
from fedtextseg.errors import ConfigError, FedTextSegError
from fedtextseg.federation.inprocess import run_federation_inprocess


@pytest.fixture
def no_training(monkeypatch):
    def train_steps(*_a, **_k):
        raise AssertionError("training started with a configuration that cannot work")

    monkeypatch.setattr(engine, "train_steps", train_steps)


@pytest.mark.parametrize("override,message", [
    ("data.preprocess.patch_size=[20,20,20]", r"patch_size=\[20, 20, 20\].*multiple of its total stride.*use 16 or 24"),
    ("federation.robust=mediam", "federation.robust='mediam' is not a rule; use null, median or trimmed_mean"),
    ("federation.weighting=votes", "federation.weighting='votes'; use examples, equal, classes"),
    ("federation.min_sites=5", r"min_sites=5 but only 3 site\(s\) are configured.*min_sites<=3"),
    ("federation.min_sites=0", "federation.min_sites=0; use an integer >= 1"),
    ("federation.outlier_factor=0.5", "outlier_factor=0.5; use null"),
    ("federation.max_update_norm=-1", "max_update_norm=-1; use null"),
    ("train.loss=dice", "train.loss='dice'; use one of masked, marginal, distill, naive"),
    ("federation.first_round_timeout=0", "first_round_timeout=0; use a positive number of seconds"),
])
def test_impossible_settings_fail_before_training(hospitals, tmp_path, no_training, override, message):
    with pytest.raises(ConfigError, match=message):
        run_federation_inprocess(tiny_cfg(hospitals, 2, override), tmp_path / "run", **QUIET)


@pytest.mark.parametrize("experiment,overrides,message", [
    ("demoo", "", r"unknown experiment 'demoo'; known: .*demo"),
    ("demo", "federation.roundz=3", "invalid configuration .*roundz"),
    ("demo", "model=cdpdnet_huge", "invalid configuration .*cdpdnet_huge"),
])
def test_unknown_names_in_the_config(experiment, overrides, message, capsys):
    with pytest.raises(ConfigError, match=message):
        compose_config(experiment, overrides)
    assert cli(["simulate", "--experiment", experiment, "--overrides", overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("fedtextseg simulate: error: ") and "Traceback" not in "\n".join(err)


def test_unknown_class_names_say_what_is_known(make_nifti_site, tmp_path, capsys):
    root = make_nifti_site(tmp_path / "site")
    (root / "site.yaml").write_text("name: s\ntask: lits\nlabel_map: {1: livr, 2: liver tumor}\n")
    assert cli(["check-site", str(root)]) == 2
    err = capsys.readouterr().err
    assert "site.yaml" in err and "'livr'" in err and "liver" in err
    from fedtextseg.predict import resolve_classes
    from fedtextseg.vocab import get_vocabulary

    info = {"class_names": get_vocabulary().class_names}  # what a model file says about its head
    with pytest.raises(FedTextSegError, match="'spleeen'.*spleen"):
        resolve_classes(info, ["spleeen"])
