"""Federated rounds on real models and real synthetic NIfTI sites, without Flower: class-aware aggregation of the
head's per-class rows, frozen parts never on the wire, and resume equivalence (an interrupted run resumed from its
checkpoint ends exactly where an uninterrupted run with the same seed ends)."""

import json

import numpy as np
import pytest

from fedtextseg.config import compose_config
from fedtextseg.synthetic.ct import generate_hospitals
from fedtextseg.federation.aggregation import SiteUpdate
from fedtextseg.federation.coordinator import Coordinator
from fedtextseg.federation.inprocess import run_federation_inprocess
from fedtextseg.runtime import SiteRunner, build_model, prepare_bank
from fedtextseg.sites import federation_sites
from fedtextseg.text import build_bank


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory):
    root = tmp_path_factory.mktemp("hospitals")
    generate_hospitals(root, sites=3, cases_per_site=2, seed=0, shape=(32, 32, 32), unseen=True)
    # one embedding bank for the module (the packaged offline encoder), loaded from file by every run
    build_bank("abdomen-ct", encoder="sentence-minilm", log=lambda *_: None).save(root / "bank.pt")
    return root


def tiny_cfg(root, rounds=2, *extra):
    return compose_config("demo", [
        f"data.root={root}", f"text.bank={root / 'bank.pt'}", "model=cdpdnet_tiny",  # with its (frozen) DINOv2 branch
        f"federation.rounds={rounds}", "train.local_steps=2", "train.batch_size=1",
        "train.bce_weight=1.0",  # the paper's Dice + BCE: a crop without foreground still gives a gradient
        "data.preprocess.patch_size=[16,16,16]", "data.preprocess.spacing=[12,12,12]", "data.preprocess.num_crops=1",
        "data.val_fraction=0.5", "eval.max_cases=1", "eval.hd95=false", "run.threads=null", *extra,
    ])


def test_round_aggregates_head_rows_only_over_annotating_sites(hospitals, tmp_path):
    cfg = tiny_cfg(hospitals, 1)
    coord = Coordinator(cfg, tmp_path / "run", log_fn=lambda *_: None)
    before = {k: v.copy() for k, v in coord.global_arrays.items()}
    assert not set(coord.frozen.arrays) & set(coord.global_arrays)  # frozen parts never on the wire
    assert any(k.startswith("dino.") for k in coord.frozen.arrays)
    updates = []
    for path in federation_sites(cfg):
        runner = SiteRunner(cfg, path, build_model(cfg, frozen=coord.frozen.arrays, meta=coord.frozen.meta))
        runner.load_global(coord.global_arrays)
        stats = runner.train_round(round_=1, total_rounds=1)
        updates.append(SiteUpdate(runner.site.name, runner.wire_arrays(), runner.num_examples,
                                  runner.site.annotated_mask(), stats.as_metrics()))
    coord.finish_train_round(1, updates, {})
    names = coord.bank.class_names
    rows = coord.global_arrays["head.residual.weight"]
    by_site = {u.node: u for u in updates}
    lits = next(n for n in by_site if "lits" in n)
    tumor = names.index("liver tumor")  # only the LiTS-like site annotates it
    np.testing.assert_allclose(rows[tumor], by_site[lits].arrays["head.residual.weight"][tumor], rtol=1e-6)
    nobody = names.index("esophagus")  # no site annotates it: the row stays as it was
    np.testing.assert_array_equal(rows[nobody], before["head.residual.weight"][nobody])
    liver = names.index("liver")  # annotated by two sites: their sample-weighted mean
    annotating = [u for u in updates if u.annotated[liver]]
    assert len(annotating) == 2
    w = np.array([u.num_examples for u in annotating], float)
    want = sum(wi * u.arrays["head.residual.weight"][liver] for wi, u in zip(w, annotating)) / w.sum()
    np.testing.assert_allclose(rows[liver], want, rtol=1e-5)
    # a shared tensor is the weighted mean over all sites
    key = next(k for k in coord.groups.shared if k.startswith("encoder"))
    w_all = np.array([u.num_examples for u in updates], float)
    np.testing.assert_allclose(coord.global_arrays[key],
                               sum(wi * u.arrays[key] for wi, u in zip(w_all, updates)) / w_all.sum(), rtol=1e-5)



def test_site_identity_is_hashed_once_per_model(hospitals, monkeypatch):
    """The frozen arrays never train, so a site hashes them once, not on every train reply; a new model is re-hashed."""
    import fedtextseg.federation.identity as identity_module

    cfg = tiny_cfg(hospitals, 1)
    path = federation_sites(cfg)[0]
    bank = prepare_bank(cfg, log_fn=lambda *_: None)
    runner = SiteRunner(cfg, path, build_model(cfg, bank))
    calls = []
    real = identity_module.model_identity
    monkeypatch.setattr(identity_module, "model_identity", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = runner.identity()
    runner.train_round(round_=1, total_rounds=1)
    assert runner.identity() == first and len(calls) == 1
    runner.identity()["frozen-hash"] = "tampered"  # callers get a copy
    assert runner.identity() == first and len(calls) == 1
    runner.model = build_model(cfg, bank)
    runner.identity()
    assert len(calls) == 2

@pytest.mark.slow
def test_resumed_run_ends_exactly_where_an_uninterrupted_run_ends(hospitals, tmp_path):
    quiet = dict(log_fn=lambda *_: None)
    cfg = tiny_cfg(hospitals, 2, "federation.evaluate_unseen=false")
    full = run_federation_inprocess(cfg, tmp_path / "full", **quiet)
    run_federation_inprocess(cfg, tmp_path / "cut", stop_after=1, **quiet)  # "killed" after round 1
    resumed = run_federation_inprocess(cfg, tmp_path / "cut", resume=True, **quiet)
    assert resumed.start_round == 2
    for k, v in full.global_arrays.items():
        np.testing.assert_array_equal(resumed.global_arrays[k], v, err_msg=k)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    trained = [(r["round"], r["site"]) for r in rows if r["kind"] == "train"]
    assert len(trained) == len(set(trained)) == 3 * 2  # no round lost or counted twice
    assert (tmp_path / "cut" / "model.pt").is_file() and (tmp_path / "cut" / "summary.txt").is_file()
