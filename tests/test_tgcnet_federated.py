"""TGC-Net on the shared federated machinery: 2D SiteRunner, bank-free build, frozen CLIP bundle, model file, data.

Tiny and CPU-only: tgcnet_tiny (64x64, 2-block towers) on a few synthetic 64x64 chest X-rays. The Flower simulation
of the same path is in ``test_tgcnet_simulation.py`` (slow).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fedtextseg.config import compose_config
from fedtextseg.errors import SiteError
from fedtextseg.runtime import SiteRunner, build_model, prepare_bank, provided_weights, uses_text_bank
from fedtextseg.sites import ensure_data, federation_sites, unseen_site

TINY = ("data.generate.images_per_site=6 data.generate.size=64 data.generate.test_images=3 run.device=cpu "
        "train.local_steps=2 train.batch_size=2")


def _cfg(root: Path, extra: str = ""):
    """The tgcnet_demo experiment shrunk to a few 64x64 images under ``root``."""
    return compose_config("tgcnet_demo", f"data.root={root} {TINY} run.results_dir={root}/results {extra}")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """Generated synthetic hospitals, the server model, its frozen bundle arrays and wire arrays."""
    root = tmp_path_factory.mktemp("xray-fed")
    cfg = _cfg(root)
    sites = ensure_data(cfg, log_fn=lambda *_: None)
    torch.manual_seed(0)
    bank = prepare_bank(cfg, log_fn=lambda *_: None)
    server = build_model(cfg, bank)
    groups, state = server.param_groups(), server.state_dict()
    frozen = {k: state[k].numpy().copy() for k in groups.frozen_common}
    wire = {k: state[k].numpy().copy() for k in [*groups.shared, *groups.per_class]}
    meta = {"class_names": bank.class_names, "task_names": bank.task_names,
            "clip": {"clip_weights": server.provenance["clip_weights"]}}
    return dict(cfg=cfg, root=root, sites=sites, bank=bank, server=server, frozen=frozen, wire=wire, meta=meta)


def test_configs_and_data_generation(fed):
    """data.kind=xray generates the hospitals + federation.yaml once; the QaTa experiments compose."""
    cfg, root = fed["cfg"], fed["root"]
    assert not uses_text_bank(cfg) and cfg.data.kind == "xray" and cfg.data.vocabulary == "chest-xray"
    assert [p.name for p in fed["sites"]] == ["hospital-0", "hospital-1", "hospital-2"]
    assert federation_sites(cfg) == fed["sites"] and unseen_site(cfg) == (root / "test").resolve()
    listed = yaml.safe_load((root / "federation.yaml").read_text())
    assert [s["path"] for s in listed["sites"]] == ["hospital-0", "hospital-1", "hospital-2"]
    assert ensure_data(cfg, log_fn=lambda *_: pytest.fail("regenerated")) == fed["sites"]  # second call: reused
    for name in ("tgcnet_qata", "tgcnet_qata_paper"):
        c = compose_config(name)
        assert c.data.kind == "qata" and c.data.unseen == "qata-valid" and not uses_text_bank(c)


def test_names_only_bank_and_provided_switch(fed):
    """No text encoder for TGC-Net; frozen CLIP in the bundle, the rest on the wire."""
    bank = fed["bank"]
    assert bank.class_names == ["lung infection", "right lung", "left lung"] and bank.encoder["kind"] == "none"
    assert provided_weights("tgcnet_tiny", {"lora_r": 2}) == {"lora_r": 2, "pretrained": "provided"}
    assert provided_weights("cdpdnet_tiny", {})["dino"]["weights"] == "provided"
    # frozen CLIP towers go in the bundle; LoRA, CNN, fusion, calibration, decoder are shared; head rows per class
    assert fed["frozen"] and all(k.startswith("clip.") and "lora_" not in k for k in fed["frozen"])
    assert any("lora_A" in k for k in fed["wire"]) and "head.weight" in fed["wire"]
    assert any(k.startswith("calib.") for k in fed["wire"]) and any(k.startswith("stages.") for k in fed["wire"])
    full = sum(v.numel() * v.element_size() for v in fed["server"].state_dict().values())
    wire = sum(a.nbytes for a in fed["wire"].values())
    assert wire + sum(a.nbytes for a in fed["frozen"].values()) == full and wire < 0.5 * full


def test_site_model_takes_the_servers_frozen_weights(fed):
    """A site builds the towers with pretrained='provided' and takes the server's arrays."""
    site = build_model(fed["cfg"], frozen=fed["frozen"], meta=fed["meta"])
    assert site.provenance["loaded_by"].startswith("the caller")
    state = site.state_dict()
    assert all(np.array_equal(state[k].numpy(), v) for k, v in fed["frozen"].items())
    with pytest.raises(Exception, match="embedding bank"):
        build_model(fed["cfg"])


def test_site_runner_trains_one_round_and_evaluates(fed):
    """SiteRunner's 2D branch: deterministic split, one local round, per-class Dice."""
    torch.manual_seed(0)
    runner = SiteRunner(fed["cfg"], fed["sites"][0], build_model(fed["cfg"], frozen=fed["frozen"], meta=fed["meta"]))
    runner.load_global(fed["wire"])
    assert runner.pre is None and runner.roi_size == (64, 64)
    assert len(runner.data.train_cases) + len(runner.data.val_cases) == 6 and runner.num_examples >= 4
    again = SiteRunner(fed["cfg"], fed["sites"][0], runner.model)
    assert [c.case_id for c in again.data.val_cases] == [c.case_id for c in runner.data.val_cases]  # deterministic
    batch = next(iter(torch.utils.data.DataLoader(runner.data.train_ds, batch_size=2)))
    assert batch["image"].shape == (2, 1, 64, 64) and batch["label"].shape == (2, 3, 64, 64)
    assert len(batch["caption"]) == 2 and "pulmonary infection" in batch["caption"][0]
    before = {k: v.copy() for k, v in runner.wire_arrays().items()}
    stats = runner.train_round(round_=1, total_rounds=2)
    assert stats.steps == 2 and math.isfinite(stats.loss)
    after = runner.wire_arrays()
    assert set(after) == set(fed["wire"]) and any(not np.array_equal(before[k], after[k]) for k in after)
    summary = runner.evaluate()
    assert list(summary) == ["lung infection"]  # only the annotated class
    assert {"dice", "dice_pooled", "n"} <= set(summary["lung infection"])
    assert 0.0 <= summary["lung infection"]["dice_pooled"] <= 1.0 and summary["lung infection"]["n"] >= 1
    assert len(runner.all_cases_dataset()) == 6


def test_model_file_round_trip(fed, tmp_path):
    """load_model_file rebuilds TGC-Net (no CLIP weights looked up) with identical outputs."""
    from fedtextseg.model_file import load_model_file, save_model_file

    model = fed["server"].eval()
    path = save_model_file(tmp_path / "model.pt", model, fed["cfg"], bank=fed["bank"])
    loaded, info = load_model_file(path)
    assert info["class_names"] == ["lung infection", "right lung", "left lung"]
    x = torch.rand(1, 1, 64, 64)
    caption = ["bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, None, caption)["logits"], model(x, None, caption)["logits"])


def _fake_qata(root: Path, n_train: int = 9, n_valid: int = 3) -> Path:
    """A miniature QaTa-COV19 folder (train/valid PNGs + CSVs) under ``root``."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("valid", n_valid)):
        (root / split).mkdir(parents=True)
        rows = []
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32)).astype(np.uint8)).save(root / split / f"img{i}.png")
            mask = np.zeros((32, 32), np.uint8)
            mask[4:10, 4:4 + 2 * (i % 3 + 1)] = 255
            Image.fromarray(mask).save(root / split / f"mask{i}.png")
            k = i % 3 + 1
            rows.append({"image": f"img{i}.png", "mask": f"mask{i}.png", "infected_areas": k,
                         "caption": "unilateral pulmonary infection, one infected area, lower right lung."})
        with (root / f"{split}.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["image", "mask", "caption", "infected_areas"])
            w.writeheader()
            w.writerows(rows)
    return root


def test_qata_kind_splits_and_holds_out_valid(tmp_path):
    """data.kind=qata: 3 hospitals from train/, valid/ as the unseen site; absent data fails clearly."""
    source = _fake_qata(tmp_path / "qata-src")
    cfg = compose_config("tgcnet_qata", f"data.root={tmp_path}/qata data.generate.source={source}")
    sites = ensure_data(cfg, log_fn=lambda *_: None)
    assert [p.name for p in sites] == ["qata-site-0", "qata-site-1", "qata-site-2"]
    held = unseen_site(cfg)
    assert held is not None and held.name == "qata-valid"
    from fedtextseg.data.site import load_site

    valid = load_site(held)
    assert len(valid.labeled_cases) == 3 and valid.format == "png-csv"
    assert sum(len(load_site(s).cases) for s in sites) == 9
    missing = compose_config("tgcnet_qata", f"data.root={tmp_path}/none data.generate.source={tmp_path}/absent")
    with pytest.raises(SiteError, match="QaTa-COV19 not found"):
        ensure_data(missing, log_fn=lambda *_: None)


def test_qata_is_a_study_of_the_one_runner_with_both_dice_definitions(tmp_path):
    """``fedtextseg study qata``: the study runner trains a federated and a centralized arm on QaTa-shaped data, and
    the table and records carry the unseen (valid/) per-image mean and pooled Dice; a smoke run (extra overrides)
    never replaces the exported figures, a full one writes them as {arm: {"dice_per_image", "dice_pooled"}}."""
    import dataclasses
    import json

    from fedtextseg.studies.runner import export_figures, run_study
    from fedtextseg.studies.spec import load_study

    source = _fake_qata(tmp_path / "qata-src")
    spec = load_study("qata")
    exported = Path(spec.export) if Path(spec.export).is_absolute() else Path(__file__).resolve().parents[1] / spec.export
    before = exported.read_bytes() if exported.is_file() else None
    extra = [f"data.root={tmp_path}/qata", f"data.generate.source={source}", "model=tgcnet_tiny",
             "model.kwargs.image_size=64", "federation.rounds=1", "train.local_steps=1", "train.batch_size=2",
             "run.device=cpu"]
    folder = run_study("qata", out=tmp_path / "studies", arms=["fed-text", "central-text"], extra=extra, jobs=1,
                       log_fn=lambda *_: None)
    assert (exported.read_bytes() if exported.is_file() else None) == before  # the smoke run left it alone
    table = (folder / "table.md").read_text()
    header = table.splitlines()[table.splitlines().index("## Summary") + 2]
    assert header.index("unseen mean Dice") < header.index("unseen pooled Dice")  # per-image mean, then pooled
    records = [json.loads((folder / "runs" / arm / "seed0" / "result.json").read_text())
               for arm in ("fed-text", "central-text")]
    for record in records:
        assert set(record["unseen_dice"]) == {"lung infection"} == set(record["unseen_pooled"])
        assert 0.0 <= record["unseen_pooled_mean"] <= 1.0 and 0.0 <= record["unseen_mean"] <= 1.0
    info = json.loads((folder / "study.json").read_text())
    target = tmp_path / "qata.json"
    export_figures(dataclasses.replace(spec, export=str(target)), [spec.arm("fed-text")], records, info)
    figures = json.loads(target.read_text())
    assert set(figures) == {"fed-text"}
    assert figures["fed-text"]["dice_per_image"] == pytest.approx(records[0]["unseen_mean"])
    assert figures["fed-text"]["dice_pooled"] == pytest.approx(records[0]["unseen_pooled_mean"])
    export_figures(dataclasses.replace(spec, export=str(target)), [spec.arm("central-text")], records, info)
    assert set(json.loads(target.read_text())) == {"fed-text", "central-text"}  # other arms' entries kept
    with pytest.raises(SiteError, match="QaTa-COV19 not found"):
        run_study("qata", out=tmp_path / "none", arms=["fed-text"], jobs=1, log_fn=lambda *_: None,
                  extra=[f"data.root={tmp_path}/none", f"data.generate.source={tmp_path}/absent"])
