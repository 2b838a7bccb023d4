"""Benchmark studies: the naive softmax baseline's loss and decision rule, study files, and the study runner end to end
on a minimal configuration (1 seed, 1 round) with a federated, a naive, a centralized and a local-only arm."""

import csv
import json
import math

import pytest
import torch
import yaml

from fedtextseg.config import compose_config
from fedtextseg.errors import ConfigError
from fedtextseg.losses import NaiveSoftmaxLoss, SoftmaxLabelSpace, build_loss
from fedtextseg.studies.collect import mean_std
from fedtextseg.studies.spec import arm_overrides, list_studies, load_study
from fedtextseg.vocab import get_vocabulary

VOCAB = get_vocabulary()
SPACE = ["liver", "liver tumor", "kidney", "kidney tumor"]  # kidney: both sides


def _target(n=6):
    """One sample over ``n`` voxels: 0-1 liver, 1 also liver tumour, 3 right kidney, 4 nothing, 5 spleen."""
    t = torch.zeros(1, VOCAB.num_classes, n)
    t[0, VOCAB.index("liver"), :2] = 1
    t[0, VOCAB.index("liver tumor"), 1] = 1
    t[0, VOCAB.index("right kidney"), 3] = 1
    t[0, VOCAB.index("spleen"), 5] = 1
    return t


def _annotated(*names):
    a = torch.zeros(1, VOCAB.num_classes)
    for n in names:
        a[0, VOCAB.index(n)] = 1
    return a


def test_naive_targets_use_only_the_sites_classes_and_the_tumor_wins_over_its_organ():
    space = SoftmaxLabelSpace(VOCAB, SPACE)
    assert space.names == ["right kidney", "left kidney", "liver", "kidney tumor", "liver tumor"]  # vocabulary order
    k = {c: i + 1 for i, c in enumerate(space.names)}  # softmax index; 0 is background
    liver_site = space.target_index(_target(), _annotated("liver", "liver tumor"))
    assert liver_site.tolist() == [[k["liver"], k["liver tumor"], 0, 0, 0, 0]]  # kidney voxel: background there
    kidney_site = space.target_index(_target(), _annotated("right kidney", "left kidney", "kidney tumor"))
    assert kidney_site.tolist() == [[0, 0, 0, k["right kidney"], 0, 0]]  # its liver voxels are background
    # spleen is outside the label space: background even where a site annotates it
    assert space.target_index(_target(), _annotated("spleen")).tolist() == [[0] * 6]


def test_naive_loss_trains_every_label_space_channel_and_no_other():
    logits = torch.randn(1, VOCAB.num_classes, 6, requires_grad=True)
    loss = build_loss("naive", VOCAB, label_space=SPACE)
    assert isinstance(loss, NaiveSoftmaxLoss)
    loss(logits, _target(), _annotated("liver", "liver tumor")).backward()
    trained = {VOCAB.class_names[c] for c in range(VOCAB.num_classes) if logits.grad[0, c].abs().sum() > 0}
    # the kidney channels get gradient at a liver-only site (pushed to background): the label conflict
    assert trained == set(loss.space.names)


def test_naive_loss_is_lower_for_logits_that_match_its_targets():
    space = SoftmaxLabelSpace(VOCAB, SPACE)
    target, annotated = _target(), _annotated("liver", "liver tumor")
    good = torch.full((1, VOCAB.num_classes, 6), -8.0)
    good[0, VOCAB.index("liver"), 0] = 8.0
    good[0, VOCAB.index("liver tumor"), 1] = 8.0
    loss = NaiveSoftmaxLoss(space)
    assert loss(good, target, annotated) < loss(-good, target, annotated)
    assert loss(good, target, annotated) < 0.1


def test_naive_decision_is_argmax_with_background_and_marks_a_tumors_organ():
    space = SoftmaxLabelSpace(VOCAB, SPACE)
    logits = torch.full((VOCAB.num_classes, 4), -5.0)
    logits[VOCAB.index("liver tumor"), 0] = 3.0
    logits[VOCAB.index("left kidney"), 1] = 2.0
    logits[VOCAB.index("kidney tumor"), 2] = 4.0
    logits[VOCAB.index("left kidney"), 2] = 1.0  # the likelier side for the tumour's organ
    logits[VOCAB.index("spleen"), 3] = 9.0  # outside the label space: never predicted; voxel 3 is background
    masks = space.decide(logits)
    on = {VOCAB.class_names[c]: masks[c].tolist() for c in range(VOCAB.num_classes) if masks[c].any()}
    assert on == {"liver tumor": [1, 0, 0, 0], "liver": [1, 0, 0, 0], "left kidney": [0, 1, 1, 0],
                  "kidney tumor": [0, 0, 1, 0]}


def test_every_study_file_parses_and_every_arm_composes(tmp_path):
    assert {"main", "privacy", "scaling", "communication"} <= set(list_studies())
    main = load_study("main")
    kinds = {a.name: a.kind for a in main.arms}
    assert kinds["local"] == "local" and kinds["centralized"] == "centralized" and kinds["naive"] == "federated"
    assert math.isinf(load_study("privacy").arm("nodp").x)
    assert [a.sites for a in load_study("scaling").arms] == [2, 4, 8, 16]
    for name in ("main", "privacy", "scaling", "communication", "qata"):
        spec = load_study(name)
        assert {"cpu", "paper"} <= set(spec.sizes)
        for arm in spec.arms:
            for size in ("cpu", "paper"):
                cfg = compose_config(spec.experiment_for(size), arm_overrides(spec, arm, size, 2, tmp_path / "r"))
                assert cfg.run.seed == 2 and cfg.run.name == f"{name}-{arm.name}-seed2"
                assert cfg.privacy.ledger_dir == str(tmp_path / "r" / "privacy-ledger")
    qata = load_study("qata")  # the GPU size starts from the paper's recipe, the CPU size from the 96 px one
    assert (qata.experiment_for("cpu"), qata.experiment_for("paper")) == ("tgcnet_qata", "tgcnet_qata_paper")
    paper = compose_config(qata.experiment_for("paper"), arm_overrides(qata, qata.arm("fed-image"), "paper", 0,
                                                                       tmp_path / "r"))
    assert paper.model.name == "tgcnet_paper" and paper.model.kwargs.text_mode == "none"
    naive = compose_config("demo", arm_overrides(main, main.arm("naive"), "cpu", 0, tmp_path / "r"))
    assert naive.train.loss == "naive" and naive.model.kwargs.text_conditioning is False


def test_a_size_may_name_the_arms_it_trains_and_only_arms_the_study_has(tmp_path):
    assert load_study("privacy").size("cpu")["arms"] == ["eps8", "eps32", "nodp"]  # the CPU curve's points
    assert "arms" not in load_study("privacy").size("paper")  # the GPU size trains every arm
    study = {"title": "t", "experiment": "demo", "arms": [{"name": "a"}, {"name": "b"}],
             "sizes": {"cpu": {"seeds": 1, "arms": ["a", "c"]}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError, match=r"size 'cpu' lists arm\(s\) \['c'\] the study does not define"):
        load_study(path)
    study["sizes"]["cpu"] = {"seeds": 1, "arm": ["a"]}
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError, match=r"size 'cpu' has unknown key\(s\) \['arm'\]"):
        load_study(path)
    study["sizes"]["cpu"] = {"seeds": 1}
    study["extra_columns"] = ["unseen_pooled_mean", "pooled"]
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(ConfigError, match=r"unknown extra_columns \['pooled'\]"):
        load_study(path)


def test_mean_std_skips_missing_values():
    assert mean_std([0.5, None, float("nan"), 0.7]) == pytest.approx((0.6, 0.1414213, 2))
    assert mean_std([0.4]) == (0.4, 0.0, 1)
    assert math.isnan(mean_std([None])[0])


def test_results_page_keeps_sections_of_studies_run_elsewhere(tmp_path):
    """Rebuilding the page on a machine that holds only some studies' outputs keeps the others' sections and rows
    (e.g. studies run on a GPU machine); a study that never ran stays "Not run yet"."""
    from fedtextseg.studies.results_page import build_results_page

    elsewhere, here, page = tmp_path / "gpu" / "studies", tmp_path / "cpu" / "studies", tmp_path / "docs" / "results.md"
    for root, study, figure in ((elsewhere, "privacy", "0.42"), (here, "performance", "1.23")):
        (root / study).mkdir(parents=True)
        (root / study / "table.md").write_text(f"# Study `{study}`\n\n| a | b |\n|---|---|\n| x | {figure} |\n")
        (root / study / "study.json").write_text(json.dumps({
            "date": "2026-12-01 10:00 UTC", "size": "cpu",
            "machine": {"cpu_model": f"cpu-of-{study}", "cpus": 2, "torch": "2.x", "device": "cpu"}}))
    build_results_page(elsewhere, page)
    build_results_page(here, page)
    text = page.read_text()
    assert "## Study `privacy`" in text and "| x | 0.42 |" in text and "cpu-of-privacy" in text  # kept
    assert "## Study `performance`" in text and "| x | 1.23 |" in text  # rebuilt from this machine's outputs
    assert "Not run yet: `python simulations/run_study.py main`" in text
    assert text.count('<a id="privacy"></a>') == 1 and text.count("| [privacy](#privacy)") == 1
    build_results_page(here, page)  # idempotent: the kept section does not grow
    assert page.read_text().split("\n", 2)[2] == text.split("\n", 2)[2]


def test_results_page_ends_with_every_benchmarks_latest_figures(tmp_path):
    from fedtextseg.studies.results_page import build_results_page

    bench, page = tmp_path / "benchmarks" / "results", tmp_path / "docs" / "results.md"
    bench.mkdir(parents=True)
    (bench / "cache_speed.md").write_text("# Preprocessing cache\n\n| cache | x memory |\n|---|---|\n| disk | 1.24 |\n")
    (bench / "cache_speed.json").write_text("{}")
    (bench / "bf16_conv3d_check.md").write_text("# CPU bf16 Conv3d\n\n| input | weight grad wrong |\n|---|---|\n"
                                                "| 2 x 8 x 8 | 100% |\n")
    build_results_page(tmp_path / "studies", page)  # benchmarks/results beside docs/
    text = page.read_text()
    assert text.count('<a id="benchmarks"></a>') == 1 and "## Benchmarks" in text
    assert "### Preprocessing cache" in text and "| disk | 1.24 |" in text
    assert "Raw numbers: `benchmarks/results/cache_speed.json`" in text
    assert "| 2 x 8 x 8 | 100% |" in text and text.index("CPU bf16") < text.index("Preprocessing cache")  # sorted
    build_results_page(tmp_path / "studies", page)  # idempotent
    assert page.read_text().split("\n", 2)[2] == text.split("\n", 2)[2]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """Two tiny synthetic hospitals + an unseen one, a prebuilt text bank, and a study file over them."""
    from fedtextseg.synthetic.ct import generate_hospitals
    from fedtextseg.text import build_bank

    root = tmp_path_factory.mktemp("study")
    generate_hospitals(root / "data", sites=2, cases_per_site=2, seed=0, shape=(32, 32, 32), unseen=True)
    build_bank("abdomen-ct", encoder="sentence-minilm", log=lambda *_: None).save(root / "bank.pt")
    study = {
        "title": "tiny", "question": "does the runner work?", "experiment": "demo",
        "figures": ["dice_by_arm", "class_dice", "local_cross_site"],
        "arms": [{"name": "fedtextseg"}, {"name": "naive", "overrides": ["train.loss=naive"]},
                 {"name": "centralized", "kind": "centralized"}, {"name": "local", "kind": "local"}],
        "sizes": {"cpu": {"seeds": 1, "overrides": [
            f"data.root={root / 'data'}", f"text.bank={root / 'bank.pt'}", "federation.rounds=1",
            "train.local_steps=1", "train.batch_size=1", "data.preprocess.patch_size=[16,16,16]",
            "data.preprocess.spacing=[12,12,12]", "data.preprocess.num_crops=1", "data.val_fraction=0.5",
            "eval.max_cases=1", "eval.hd95=false", "eval.overlap=0.0", "run.threads=null"]}},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(study))
    return root, path


@pytest.mark.slow
def test_study_runner_writes_tables_plots_configs_and_records(tiny_study, tmp_path):
    from fedtextseg.studies.results_page import build_results_page
    from fedtextseg.studies.runner import run_study

    root, path = tiny_study
    folder = run_study(str(path), out=tmp_path / "studies", log_fn=lambda *_: None)
    assert folder == tmp_path / "studies" / "tiny"
    for name in ("table.md", "table.csv", "per_class.csv", "runs.csv", "study.json", "dice_by_arm.png",
                 "class_dice.png", "local_cross_site.png"):
        assert (folder / name).is_file(), name
    arms = ["fedtextseg", "naive", "centralized", "local"]
    for arm in arms:
        assert (folder / "configs" / f"{arm}-seed0.yaml").is_file()
        record = json.loads((folder / "runs" / arm / "seed0" / "result.json").read_text())
        assert record["seed"] == 0 and record["rounds"] == 1 and record["sites"] == 2
        assert record["site_dice"] and record["unseen_dice"], arm  # evaluated on the sites and the unseen one
        assert 0.0 <= record["site_mean"] <= 1.0 and record["peak_mb"] > 0
    # the naive arm's softmax covers exactly the union of the two sites' classes
    naive = yaml.safe_load((folder / "configs" / "naive-seed0.yaml").read_text())
    site_classes = [yaml.safe_load((root / "data" / s / "site.yaml").read_text())["annotated"]
                    for s in ("site01-btcv", "site02-lits")]
    assert naive["train"]["naive_classes"] == VOCAB.resolve_many([c for cs in site_classes for c in cs])
    # local only: each site's model on its own site and on the other one
    local = json.loads((folder / "runs" / "local" / "seed0" / "result.json").read_text())
    assert set(local["cross_site"]) == {"site01-btcv", "site02-lits"}
    assert set(local["cross_site"]["site01-btcv"]) == {"site01-btcv", "site02-lits", "unseen"}
    assert local["wire_bytes"] == 0
    fed = json.loads((folder / "runs" / "fedtextseg" / "seed0" / "result.json").read_text())
    assert 0 < fed["wire_bytes"] < fed["full_model_bytes"]
    with (folder / "table.csv").open() as fh:
        assert [r["arm"] for r in csv.DictReader(fh)] == arms
    table = (folder / "table.md").read_text()
    assert "every site's model on every site" in table and "![class_dice](class_dice.png)" in table
    # the report can be rebuilt from the records on disk, and the results page includes it
    run_study(str(path), out=tmp_path / "studies", report_only=True, log_fn=lambda *_: None)
    page = build_results_page(tmp_path / "studies", tmp_path / "docs" / "results.md")
    text = page.read_text()
    assert "Study `tiny`" in text and "images/results/tiny-dice_by_arm.png" in text
    assert (tmp_path / "docs" / "images" / "results" / "tiny-class_dice.png").is_file()
    assert "Not run yet: `python simulations/run_study.py main`" in text


@pytest.mark.slow
def test_site_runner_counts_a_naive_site_for_its_whole_label_space(tiny_study):
    from fedtextseg.runtime import SiteRunner, build_model, prepare_bank

    root, _ = tiny_study
    overrides = [f"data.root={root / 'data'}", f"text.bank={root / 'bank.pt'}", "data.preprocess.patch_size=[16,16,16]",
                 "data.preprocess.spacing=[12,12,12]", "data.preprocess.num_crops=1"]
    cfg = compose_config("demo", overrides + ["train.loss=naive", "train.naive_classes=[liver,spleen]"])
    model = build_model(cfg, prepare_bank(cfg))
    runner = SiteRunner(cfg, root / "data" / "site02-lits", model)
    mask = runner.trained_classes_mask()
    assert [VOCAB.class_names[i] for i in mask.nonzero()[0]] == ["spleen", "liver"]
    masked = SiteRunner(compose_config("demo", overrides), root / "data" / "site02-lits", model)
    assert [VOCAB.class_names[i] for i in masked.trained_classes_mask().nonzero()[0]] == ["liver", "liver tumor"]


@pytest.mark.slow
def test_parallel_runs_write_the_same_records_as_one_at_a_time(tiny_study, tmp_path):
    """--jobs 2: two arm runs in their own processes; their records and the table are those of a serial run."""
    from fedtextseg.studies.runner import run_study

    _, path = tiny_study
    folder = run_study(str(path), out=tmp_path / "par", arms=["fedtextseg", "centralized"], jobs=2,
                       log_fn=lambda *_: None)
    info = json.loads((folder / "study.json").read_text())
    assert info["parallel_jobs"] == 2
    serial = run_study(str(path), out=tmp_path / "ser", arms=["fedtextseg", "centralized"], jobs=1,
                       log_fn=lambda *_: None)
    for arm in ("fedtextseg", "centralized"):
        a = json.loads((folder / "runs" / arm / "seed0" / "result.json").read_text())
        b = json.loads((serial / "runs" / arm / "seed0" / "result.json").read_text())
        flat_a, flat_b = (dict(_flat_numbers({k: r[k] for k in ("site_dice", "unseen_dice")})) for r in (a, b))
        assert flat_a.keys() == flat_b.keys() and len(flat_a) > 2, arm  # same seed, same training, same Dice
        assert list(flat_a.values()) == pytest.approx([flat_b[k] for k in flat_a], abs=1e-4), arm
    with (folder / "table.csv").open() as fh:
        assert [r["arm"] for r in csv.DictReader(fh)] == ["fedtextseg", "centralized"]


def _flat_numbers(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat_numbers(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def test_parallel_jobs_auto_is_one_per_core_on_a_cpu_and_a_bad_count_is_refused(monkeypatch):
    from fedtextseg.errors import ConfigError
    from fedtextseg.studies.runner import resolve_jobs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert resolve_jobs("auto") == 6 and resolve_jobs(3) == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_jobs("auto") == 1
    with pytest.raises(ConfigError, match="--jobs"):
        resolve_jobs(0)


def test_study_overrides_may_follow_the_options():
    """`fedtextseg study qata --arms fed-text ++model.kwargs.x=1`: argparse takes the overrides after the options
    (a plain parse_args refused them with 'unrecognized arguments')."""
    from fedtextseg.studies.runner import study_main

    with pytest.raises(ConfigError, match="unknown study 'nosuch'"):
        study_main(["nosuch", "--seeds", "1", "--arms", "a", "++model.kwargs.text_encoder=minilm", "train.lr=1e-3"])
