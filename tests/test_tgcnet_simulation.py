"""End to end (slow): TGC-Net federated by Flower over 3 synthetic chest X-ray hospitals for 2 rounds.

Runs ``fedtextseg simulate --experiment tgcnet_demo`` (``flwr run`` in a subprocess, Ray backend) with its own
``FLWR_HOME``, ``RAY_TMPDIR`` and result folder, then reads ``metrics.jsonl``: every site trained in every round,
and round 2 sent fewer bytes than round 1 because the frozen CLIP towers travel only once (by content hash).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_flower_simulation_3_sites_2_rounds(tmp_path, monkeypatch):
    """flwr run: 3 sites x 2 rounds trained, and round 2 sent fewer bytes than round 1."""
    from fedtextseg.simulate import simulate_main

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    monkeypatch.setenv("RAY_TMPDIR", str(Path(os.environ.get("RAY_TMPDIR", "/tmp")) / f"tgc-{os.getpid()}"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    overrides = (f"data.root={tmp_path}/data run.results_dir={tmp_path}/results federation.rounds=2 "
                 "data.generate.images_per_site=6 data.generate.size=64 data.generate.test_images=3 "
                 "train.local_steps=2 train.batch_size=2 run.device=cpu")
    rc = simulate_main(["--experiment", "tgcnet_demo", "--overrides", overrides, "--run-name", "tgc-sim"])
    run_dir = tmp_path / "results" / "tgc-sim"
    assert rc == 0, (run_dir / "metrics.jsonl").read_text() if (run_dir / "metrics.jsonl").exists() else "no run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    assert sorted((r["round"], r["site"]) for r in train) == [
        (rnd, f"hospital-{i}") for rnd in (1, 2) for i in range(3)]
    rounds = {r["round"]: r for r in rows if r.get("kind") == "round"}
    assert rounds[1]["sites"] == rounds[2]["sites"] == 3
    assert 0 < rounds[2]["bytes_sent"] < rounds[1]["bytes_sent"]  # frozen CLIP sent once
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert meta["frozen_bytes"] > 0 and meta["wire_bytes"] > 0
    assert meta["full_model_bytes"] == meta["wire_bytes"] + meta["frozen_bytes"]  # nothing local in TGC-Net
    per_site_round1 = rounds[1]["bytes_sent"] / 3
    assert per_site_round1 > meta["frozen_bytes"]  # round 1 carried the bundle to each site
    assert rounds[2]["bytes_sent"] / 3 < meta["wire_bytes"] * 1.1  # round 2: only the shared arrays (+ config)
    evals = [r for r in rows if r.get("kind") in ("site_eval", "unseen_eval")]
    assert evals and (run_dir / "model.pt").is_file() and (run_dir / "summary.txt").is_file()
