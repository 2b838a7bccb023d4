"""A site that crashes in the middle of local training, in the in-process runner (the same Coordinator and SiteRunner
rounds as the Flower apps): the round completes with the remaining sites when ``federation.min_sites`` is met, the
failure is recorded per round, and the site rejoins the next round. Below the minimum the global model stays as
it was; a round where every site fails stops the run with each site's reason.

The crash is injected from the test side: ``engine.train_steps`` is wrapped so that one site really trains one
optimizer step of the round and then raises, as a node that reboots mid-round would.
"""

from __future__ import annotations

import numpy as np
import pytest

from faults.helpers import QUIET, hospitals, rows, tiny_cfg, trained  # noqa: F401 - fixture
from fedtextseg import engine
from fedtextseg.errors import FedTextSegError
from fedtextseg.federation.checkpoint import checkpoint_path, load_checkpoint
from fedtextseg.federation.inprocess import run_federation_inprocess

SITES = ("site01-btcv", "site02-lits", "site03-kits")


def crash_site(monkeypatch, site: str, rounds: set[int]) -> list[str]:
    """Make ``site`` die after its first local step in ``rounds``; returns the labels of every local round run."""
    real, seen = engine.train_steps, []

    def train_steps(model, loader, **kw):
        seen.append(kw["label"])
        if kw["label"].startswith(f"[{site}]") and int(kw["label"].rsplit(" ", 1)[1]) in rounds:
            real(model, loader, **{**kw, "steps": 1})  # real work done, then the node goes down
            raise RuntimeError("injected fault: node rebooted during local training")
        return real(model, loader, **kw)

    monkeypatch.setattr(engine, "train_steps", train_steps)
    return seen


@pytest.mark.slow
def test_crashed_site_is_left_out_of_its_round_and_rejoins(hospitals, tmp_path, monkeypatch):
    seen = crash_site(monkeypatch, "site02-lits", {1})
    cfg = tiny_cfg(hospitals, 2, "federation.evaluate_unseen=false", "federation.min_sites=2")
    run_federation_inprocess(cfg, tmp_path / "run", **QUIET)
    assert trained(tmp_path / "run") == {(1, "site01-btcv"): 1, (1, "site03-kits"): 1,
                                         **{(2, s): 1 for s in SITES}}
    (failure,) = rows(tmp_path / "run", "failure")
    assert failure["round"] == 1 and failure["site"] == "site02-lits"
    assert "RuntimeError: injected fault: node rebooted" in failure["reason"]
    assert [(r["round"], r["sites"], r["excluded"], r["aggregated"]) for r in rows(tmp_path / "run", "round")] == \
        [(1, 2, 1, True), (2, 3, 0, True)]
    assert len(seen) == 6 and (tmp_path / "run" / "model.pt").is_file()
    evaluated = {r["site"] for r in rows(tmp_path / "run", "site_eval") if r["round"] == 1}
    assert evaluated == set(SITES)  # the crashed site still evaluates the new global model


def test_below_min_sites_the_global_model_is_kept(hospitals, tmp_path, monkeypatch):
    crash_site(monkeypatch, "site01-btcv", {1})
    cfg = tiny_cfg(hospitals, 1, "federation.evaluate_unseen=false", "federation.min_sites=3")
    coord = run_federation_inprocess(cfg, tmp_path / "run", **QUIET)
    (r,) = rows(tmp_path / "run", "round")
    assert r["aggregated"] is False and r["sites"] == 2
    fresh = run_federation_inprocess(cfg, tmp_path / "fresh", stop_after=0, **QUIET)  # the initial global model
    saved = load_checkpoint(checkpoint_path(tmp_path / "run", 1)).global_arrays
    for k, v in fresh.global_arrays.items():
        np.testing.assert_array_equal(coord.global_arrays[k], v)
        np.testing.assert_array_equal(saved[k], v)


def test_every_site_failing_stops_the_run_with_each_reason(hospitals, tmp_path, monkeypatch):
    def broken(*_a, **kw):
        raise OSError(f"injected fault: disk of {kw['label'].split(']')[0][1:]} unplugged")

    monkeypatch.setattr(engine, "train_steps", broken)
    cfg = tiny_cfg(hospitals, 2, "federation.evaluate_unseen=false")
    with pytest.raises(FedTextSegError, match="round 1: every site failed") as err:
        run_federation_inprocess(cfg, tmp_path / "run", **QUIET)
    assert all(f"{s}: OSError: injected fault: disk of {s} unplugged" in str(err.value) for s in SITES)
