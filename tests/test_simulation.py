"""The product's main job end to end: `fedtextseg simulate` runs a real Flower simulation (SuperLink, simulated
SuperNodes, ServerApp, ClientApps) of 3 partially labeled synthetic hospitals for 2 rounds."""

import json

import pytest

from fedtextseg.simulate import simulate_main
from fedtextseg.text import build_bank

pytestmark = pytest.mark.slow


def tiny_simulation(tmp_path, monkeypatch, *extra: str) -> tuple:
    """(results folder, overrides) of a tiny 3-site simulation in ``tmp_path``: Flower's state kept there, a MiniLM
    bank on disk, 3 synthetic hospitals of 2 cases at 32^3 generated on first use; ``extra`` overrides appended."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    monkeypatch.setenv("RAY_TMPDIR", "/tmp/ray-fts-test")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    data, results = tmp_path / "hospitals", tmp_path / "results"
    data.mkdir()
    build_bank("abdomen-ct", encoder="sentence-minilm", log=lambda *_: None).save(data / "bank.pt")
    return results, " ".join([
        f"data.root={data}", f"run.results_dir={results}", f"text.bank={data / 'bank.pt'}",
        "data.generate.sites=3", "data.generate.cases_per_site=2", "data.generate.shape=[32,32,32]",
        "train.local_steps=2", "train.batch_size=1", "data.preprocess.num_crops=1",
        "data.preprocess.patch_size=[16,16,16]", "data.preprocess.spacing=[12,12,12]", "data.val_fraction=0.5",
        "eval.max_cases=1", "eval.hd95=false", *extra,
    ])


def test_three_sites_two_rounds_flower_simulation(tmp_path, monkeypatch, capsys):
    # cdpdnet_tiny: the demo's network with its frozen DINOv2 branch, so the frozen bundle is worth measuring
    results, overrides = tiny_simulation(tmp_path, monkeypatch, "federation.rounds=2", "model=cdpdnet_tiny")
    code = simulate_main(["--experiment", "demo", "--overrides", overrides, "--run-name", "sim"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    run = results / "sim"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = {(r["round"], r["site"]) for r in rows if r["kind"] == "train"}
    assert trained == {(r, s) for r in (1, 2) for s in ("site01-btcv", "site02-lits", "site03-kits")}
    sent = {r["round"]: r["bytes_sent"] for r in rows if r["kind"] == "round"}
    frozen = json.loads((run / "metadata.json").read_text())["frozen_bytes"]
    assert sent[1] > 3 * frozen > sent[2]  # frozen DINOv2 + text bank go once per site, in round 1 only
    evaluated = {(r["site"], r["class"]) for r in rows if r["kind"] == "site_eval" and r["round"] == 2}
    assert ("site02-lits", "liver tumor") in evaluated and ("site02-lits", "spleen") not in evaluated
    assert any(r["kind"] == "unseen_eval" for r in rows)
    assert "Per-class Dice" in out and (run / "model.pt").is_file()


def test_two_simulations_at_once_each_keep_their_own_superlink(tmp_path):
    """Two `fedtextseg simulate` at the same time, each with its own FLWR_HOME: both finish with their own metrics,
    on SuperLinks of their own ports, and each run's clean-up stops its own SuperLink only."""
    import os
    import subprocess
    import sys

    procs = {}
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        data, results = root / "hospitals", root / "results"
        data.mkdir()
        build_bank("abdomen-ct", encoder="sentence-minilm", log=lambda *_: None).save(data / "bank.pt")
        overrides = " ".join([
            f"data.root={data}", f"run.results_dir={results}", f"text.bank={data / 'bank.pt'}",
            "data.generate.sites=2", "data.generate.cases_per_site=2", "data.generate.shape=[32,32,32]",
            "federation.rounds=2", "train.local_steps=2", "train.batch_size=1", "data.preprocess.num_crops=1",
            "data.preprocess.patch_size=[16,16,16]", "data.preprocess.spacing=[12,12,12]", "data.val_fraction=0.5",
            "eval.max_cases=1", "eval.hd95=false", "data.unseen=null",
        ])
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_LOCAL_")}
        env.update(FLWR_HOME=str(root / "flwr"), RAY_TMPDIR=f"/tmp/ray-fts-{name}",
                   FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-c", "import sys; from fedtextseg.cli import main; sys.exit(main(sys.argv[1:]))",
               "simulate", "--experiment", "demo", "--overrides", overrides, "--run-name", "sim"]
        procs[name] = (results / "sim", subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                          stderr=subprocess.STDOUT, text=True))
    links = {}
    for name, (run, proc) in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"run {name}:\n{out[-4000:]}"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert {(r["round"], r["site"]) for r in rows if r["kind"] == "train"} == {
            (r, s) for r in (1, 2) for s in ("site01-btcv", "site02-lits")}
        links[name] = json.loads((run / "superlink.json").read_text())
        assert f"127.0.0.1:{links[name]['http_api_port']}" in out
        assert links[name]["flwr_home"] == str(tmp_path / name / "flwr")
    a, b = links["a"], links["b"]
    assert {a["http_api_port"], a["control_api_port"]}.isdisjoint({b["http_api_port"], b["control_api_port"]})
    assert len(a["stopped_pids"]) == 1 and len(b["stopped_pids"]) == 1
    assert a["stopped_pids"] != b["stopped_pids"]
