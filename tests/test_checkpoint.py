"""Round checkpoints: atomic writes, keep-last-K, fallback past a corrupt newest file, RNG restore."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fedtextseg.errors import FedTextSegError
from fedtextseg.federation import list_checkpoints, load_latest, make_server_optimizer, save_checkpoint
from fedtextseg.federation.checkpoint import checkpoint_path, load_checkpoint


def _arrays(r: int) -> dict[str, np.ndarray]:
    return {"enc.w": np.full((3, 2), float(r), np.float32), "head.b": np.arange(4, dtype=np.float64) + r,
            "scalar": np.array(r, np.int64)}


def test_round_trip_with_nested_state(tmp_path):
    state = {"server_opt": {"name": "fedadam", "m": {"w": np.ones(3)}, "class_rounds": np.array([1, 0])},
             "frozen": {"held": {"1": "ab" * 32}}, "history": [{"round": 1, "loss": 0.5}, None, (1, 2)]}
    extra = {"config": {"rounds": 10, "model": "cdpdnet_tiny"}, "tensor": torch.tensor([1.5, 2.5])}
    path = save_checkpoint(tmp_path, 1, _arrays(1), state, extra)
    assert path == checkpoint_path(tmp_path, 1) and path.name == "round-000001.ckpt"
    ck = load_latest(tmp_path)
    assert ck.round == 1 and ck.skipped == [] and ck.path == path
    assert list(ck.global_arrays) == ["enc.w", "head.b", "scalar"]
    for k, v in _arrays(1).items():
        np.testing.assert_array_equal(ck.global_arrays[k], v)
        assert ck.global_arrays[k].dtype == v.dtype and ck.global_arrays[k].shape == v.shape
    np.testing.assert_array_equal(ck.strategy_state["server_opt"]["m"]["w"], np.ones(3))
    assert ck.strategy_state["frozen"] == state["frozen"]
    assert ck.strategy_state["history"] == [{"round": 1, "loss": 0.5}, None, [1, 2]]
    assert ck.extra["config"] == extra["config"]
    np.testing.assert_array_equal(ck.extra["tensor"], [1.5, 2.5])


def test_no_checkpoint_is_none(tmp_path):
    assert load_latest(tmp_path) is None


def test_keeps_last_k(tmp_path):
    for r in range(1, 6):
        save_checkpoint(tmp_path, r, _arrays(r), keep=2)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]
    with pytest.raises(FedTextSegError, match="keep"):
        save_checkpoint(tmp_path, 6, _arrays(6), keep=0)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_corrupt_newest_falls_back_and_says_so(tmp_path, damage, caplog):
    save_checkpoint(tmp_path, 1, _arrays(1))
    newest = save_checkpoint(tmp_path, 2, _arrays(2))
    data = newest.read_bytes()
    if damage == "truncate":  # a crash in the middle of writing a file under its final name
        data = data[: len(data) // 2]
    elif damage == "flip":
        b = bytearray(data)
        b[200] ^= 0xFF  # inside the first array's bytes
        data = bytes(b)
    else:
        data = b""
    newest.write_bytes(data)
    with caplog.at_level("WARNING"):
        ck = load_latest(tmp_path)
    assert ck.round == 1
    np.testing.assert_array_equal(ck.global_arrays["enc.w"], _arrays(1)["enc.w"])
    assert len(ck.skipped) == 1 and "round-000002.ckpt" in ck.skipped[0]
    assert "round-000002.ckpt" in caplog.text and "instead of a newer corrupt checkpoint" in caplog.text
    with pytest.raises(FedTextSegError, match="round-000002.ckpt: corrupt or incomplete checkpoint"):
        load_checkpoint(newest)


def test_interrupted_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, _arrays(1))

    class Crash(Exception):
        pass

    def crash(*_a, **_k):
        raise Crash

    monkeypatch.setattr("fedtextseg.federation.checkpoint.os.replace", crash)  # dies before the rename
    with pytest.raises(Crash):
        save_checkpoint(tmp_path, 2, _arrays(2))
    monkeypatch.undo()
    assert [r for r, _ in list_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-000001.ckpt"]
    assert load_latest(tmp_path).round == 1


def test_all_corrupt_raises_instead_of_restarting(tmp_path):
    p = save_checkpoint(tmp_path, 1, _arrays(1))
    p.write_bytes(b"garbage")
    with pytest.raises(FedTextSegError, match="no valid checkpoint"):
        load_latest(tmp_path)


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.normal()), torch.rand(3).tolist()


def test_rng_restore_continues_identically(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's legacy state
    save_checkpoint(tmp_path, 7, _arrays(7))
    expected = [_draws() for _ in range(3)]
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    ck = load_latest(tmp_path)
    ck.restore_rng()
    assert [_draws() for _ in range(3)] == expected


def test_server_optimizer_state_survives_checkpoint(tmp_path):
    x = {"w": np.linspace(0, 1, 6).reshape(3, 2)}
    opt = make_server_optimizer("fedadam", eta=0.05, bias_correction=True)
    groups, cov = {"shared": [], "per_class": {"w": 0}}, np.array([True, False, True])
    x = opt.step(x, {"w": x["w"] + 0.1}, groups, cov)
    save_checkpoint(tmp_path, 1, x, {"server_opt": opt.state_dict()})
    ck = load_latest(tmp_path)
    resumed = make_server_optimizer("fedadam")
    resumed.load_state_dict(ck.strategy_state["server_opt"])
    agg = {"w": x["w"] - 0.2}
    np.testing.assert_array_equal(opt.step(x, agg, groups, cov)["w"],
                                  resumed.step(ck.global_arrays, agg, groups, cov)["w"])
