"""Faults in a real Flower simulation (SuperLink, simulated SuperNodes, ServerApp, ClientApps; ``flwr run`` through
``fedtextseg simulate``): one site crashes mid-training in round 1, another never answers in round 2 (it hangs past
``federation.round_timeout``, 20 s), a third turns hostile in round 3. Every round completes with the remaining
sites (``federation.min_sites=2``), each failure is recorded with its round, site and reason, and each site is back
in the next round. The first round, where Ray actors start and every site builds its model and preprocesses its
data, gets ``federation.first_round_timeout`` (300 s) instead.

The faults come from a ClientApp variant (``faulty_client.py``: the real handlers plus an outer fault mod), set
as the ``clientapp`` component of a temporary copy of the Flower app; the product code is unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from faults.helpers import rows, trained
from fedtextseg.simulate import simulate_main
from test_simulation import tiny_simulation

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SITES = ("site01-btcv", "site02-lits", "site03-kits")


def faulty_app(dest: Path) -> Path:
    for part in ("server", "client", "configs"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(__file__).with_name("faulty_client.py"), dest / "client" / "faulty.py")
    text = (ROOT / "pyproject.toml").read_text()
    (dest / "pyproject.toml").write_text(text.replace('clientapp = "client.app:app"', 'clientapp = "client.faulty:app"'))
    return dest


def test_crashing_silent_and_hostile_sites_in_a_flower_simulation(tmp_path, monkeypatch, capsys):
    project = faulty_app(tmp_path / "app")
    monkeypatch.setenv("FEDTEXTSEG_CONFIGS", str(project / "configs"))  # simulate runs the app holding them
    results, overrides = tiny_simulation(tmp_path, monkeypatch, "data.unseen=null", "federation.rounds=3",
                                         "federation.min_sites=2", "federation.round_timeout=20",
                                         "federation.first_round_timeout=300",
                                         "federation.evaluate_unseen=false")
    code = simulate_main(["--experiment", "demo", "--overrides", overrides, "--run-name", "faults"])
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    run = results / "faults"
    assert trained(run) == {(1, "site01-btcv"): 1, (1, "site03-kits"): 1,
                            (2, "site01-btcv"): 1, (2, "site02-lits"): 1,
                            (3, "site02-lits"): 1, (3, "site03-kits"): 1}
    failures = {(r["round"], r["reason"]) for r in rows(run, "failure") if not r["reason"].startswith("evaluate")}
    assert len(failures) == 3, failures
    reasons = dict(failures)
    assert "injected fault: node rebooted during local training" in reasons[1]
    assert "no reply within 20s (federation.round_timeout)" in reasons[2]
    assert "site 'site01-btcv'" in reasons[3] and "outlier_factor" in reasons[3]
    named = {r["round"]: r["site"] for r in rows(run, "failure") if not r["reason"].startswith("evaluate")}
    assert named[2] == "site03-kits" and named[3] == "site01-btcv"  # node ids named by the sites' earlier replies
    assert [(r["round"], r["sites"], r["aggregated"]) for r in rows(run, "round")] == \
        [(1, 2, True), (2, 2, True), (3, 2, True)]
    assert (run / "model.pt").is_file() and "Per-class Dice" in out
