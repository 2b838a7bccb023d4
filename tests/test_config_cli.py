"""Configs compose from configs/ with experiments and overrides, errors say what to change; the `fedtextseg`
command lists its subcommands and turns user errors into one clear line."""

import subprocess
import sys

import pytest

from fedtextseg.cli import COMMANDS, main
from fedtextseg.config import compose_config, list_experiments, save_resolved, split_overrides
from fedtextseg.errors import ConfigError
from fedtextseg.runtime import derived_seed, lr_for_round, preprocess_config


def test_experiment_and_overrides_compose():
    cfg = compose_config("demo", "federation=fedprox federation.rounds=7")
    assert cfg.federation.rounds == 7 and cfg.federation.prox_mu > 0
    assert cfg.run.experiment == "demo" and "demo" in list_experiments()
    assert split_overrides('a=1 "b=two words"') == ["a=1", "b=two words"]


def test_unknown_experiment_and_group_choice_name_the_options():
    with pytest.raises(ConfigError, match="known: .*demo"):
        compose_config("no-such-study")
    with pytest.raises(ConfigError, match="cdpdnet_tiny"):
        compose_config(None, ["model=cdpdnet_huge"])


def test_resolved_config_is_written(tmp_path):
    path = save_resolved(compose_config("demo"), tmp_path / "config.yaml")
    assert "cdpdnet_tiny" in path.read_text()


def test_cosine_lr_decays_over_rounds_and_seeds_are_stable():
    cfg = compose_config("demo", ["train.lr=0.01"])
    lrs = [lr_for_round(cfg, r, 5) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(0.01) and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0
    assert derived_seed(0, "site-a", 3) == derived_seed(0, "site-a", 3) != derived_seed(0, "site-b", 3)


def test_feature_cache_tiles_equal_the_patch_in_plane():
    from fedtextseg.runtime import build_model
    from fedtextseg.text import EmbeddingBank

    import torch

    cfg = compose_config("demo", ["model=cdpdnet_tiny", "data.preprocess.patch_size=[16,32,32]"])
    vocab_classes = 32
    bank = EmbeddingBank(class_names=[f"c{i}" for i in range(vocab_classes)], class_embeddings=torch.randn(32, 8),
                         task_names=["t"], task_embeddings=torch.randn(1, 8), class_template="{}",
                         task_template="{}", vocabulary="abdomen-ct", vocabulary_hash="x", encoder={"kind": "test"})
    pre = preprocess_config(cfg, build_model(cfg, bank))
    assert pre.tile == (32, 32) and pre.rot90_prob == 0.0


def test_cli_lists_subcommands_and_reports_user_errors(capsys, tmp_path):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("synth", "check-site", "embed-text", "simulate", "train"):
        assert name in out and name in COMMANDS
    assert main(["chek-site"]) == 2 and "check-site" in capsys.readouterr().err
    assert main(["check-site", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr()
    assert "missing" in err.err + err.out


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "fedtextseg.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "simulate" in result.stdout


def test_simulate_reserves_whole_cpus_per_site_and_refuses_fractions_up_front(tmp_path, monkeypatch):
    from fedtextseg import simulate

    cmd = simulate.flwr_run_command(tmp_path, 4, {"experiment": "demo"}, 2)
    assert "num-supernodes=4 client-resources-num-cpus=2" in cmd
    called = []
    monkeypatch.setattr(simulate, "ensure_data", lambda cfg: called.append(cfg))  # nothing may be generated
    for bad in ("0.5", "0", "two", "1.5"):
        with pytest.raises(ConfigError, match="whole number of CPUs"):
            simulate.simulate_main(["--cpus-per-site", bad])
    assert called == []


def test_a_simulated_site_trains_on_the_cpus_reserved_for_it_unless_run_threads_is_set():
    from fedtextseg.config import compose_config
    from fedtextseg.simulate import threads_per_site

    # the demo's own run.threads is 1 (sites side by side); a site given 2 CPUs must not train on 1 of them
    assert compose_config("demo", "").run.threads == 1
    overrides = threads_per_site("federation.rounds=2", 2)
    assert compose_config("demo", overrides).run.threads == 2
    assert compose_config("demo", threads_per_site("", 1)).run.threads == 1
    for own in ("run.threads=3 federation.rounds=2", "++run.threads=3"):  # the user's own choice is kept
        assert threads_per_site(own, 2) == own
