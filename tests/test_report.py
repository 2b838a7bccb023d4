"""fedtextseg report: HTML + Markdown from a tiny real centralized run, and from a federated run's records."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedtextseg.cli import main as cli_main  # noqa: E402
from fedtextseg.errors import FedTextSegError  # noqa: E402
from fedtextseg.report import build_report  # noqa: E402


def linked_images(page: str, pattern: str) -> list[str]:
    return re.findall(pattern, page)


def check_links(run: Path, paths: dict) -> tuple[str, str]:
    page, md = paths["html"].read_text(), paths["markdown"].read_text()
    images = linked_images(page, r'<img src="([^"]+)"')
    assert images and images == linked_images(md, r"!\[[^\]]*\]\(([^)]+)\)")
    for rel in images:
        assert not Path(rel).is_absolute() and (run / rel).is_file(), rel
    assert sorted(p.name for p in (run / "report_files").iterdir()) == sorted(Path(r).name for r in images)
    return page, md


def federated_rows() -> list[dict]:
    rows = []
    for rnd in (1, 2):
        for site, classes in (("site01-btcv", ["spleen", "liver"]), ("site02-lits", ["liver", "liver tumor"])):
            rows.append({"round": rnd, "kind": "train", "site": site, "train_loss": 1.0 / rnd, "num_examples": 4,
                         "bytes_sent": 1_000_000, "bytes_received": 1_000_000})
            rows += [{"round": rnd, "kind": "site_eval", "site": site, "class": c, "dice": 0.3 * rnd, "n": 1}
                     for c in classes]
            rows.append({"round": rnd, "kind": "privacy", "site": site, "epsilon": 1.5 * rnd, "delta": 1e-5,
                         "sigma": 1.1, "steps": 10})
        rows += [{"round": rnd, "kind": "unseen_eval", "site": "unseen:unseen", "class": c, "dice": 0.2 * rnd,
                  "hd95": 7.5, "n": 2} for c in ("spleen", "liver", "liver tumor")]
        rows.append({"round": rnd, "kind": "round", "sites": 2, "excluded": rnd - 1, "aggregated": True,
                     "bytes_sent": 2_000_000, "bytes_received": 2_000_000 + rnd})
    rows.append({"round": 2, "kind": "failure", "site": "site03-kits", "reason": "timed out after 3600 s"})
    return rows


def test_report_of_federated_records_without_model(tmp_path, capsys):
    run = tmp_path / "fed-run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in federated_rows()))
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"root": str(tmp_path / "gone"), "unseen": "unseen"},
                                                     "federation": {"rule": "fedadam"}, "privacy": {"enabled": True}}))
    (run / "metadata.json").write_text(json.dumps({"experiment": "demo", "wire_bytes": 123456, "provenance": {
        "dino": {"name": "vit_small_patch14_dinov2", "weights": "random", "reason": "dino.weights=None"}}}))
    assert cli_main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    page, md = check_links(run, {"html": run / "report.html", "markdown": run / "report.md"})
    for text in (page, md):
        assert "site01-btcv" in text and "unseen:unseen" in text and "fedadam" in text
        assert "timed out after 3600 s" in text and "epsilon" in text and "RANDOM" in text
        assert "No overlays" in text  # no model.pt: the section says so, the rest of the report is there
    assert {"bytes.png", "privacy.png", "dice_mean.png", "dice_per_site.png", "train_loss.png"} <= {
        p.name for p in (run / "report_files").iterdir()}
    assert "<th>liver tumor</th>" in page and "HD95" in page
    with pytest.raises(FedTextSegError, match="not a run folder"):
        build_report(tmp_path)


@pytest.mark.slow
def test_report_of_a_tiny_real_run(tmp_path):
    from fedtextseg.centralized import train_centralized
    from fedtextseg.config import compose_config
    from fedtextseg.synthetic.ct import generate_hospitals

    data = tmp_path / "data"
    generate_hospitals(data, sites=2, cases_per_site=2, seed=0, shape=(32, 32, 32))
    cfg = compose_config("demo", [
        f"data.root={data}", "data.generate=null",
        "data.preprocess.spacing=[12,12,12]",  # the 32^3 synthetic cases span ~11 mm voxels: one 32^3 window each
        "federation.rounds=1", "train.local_steps=2", "train.batch_size=1", "train.log_every=0", "eval.max_cases=1",
        "eval.hd95=false", f"run.results_dir={tmp_path / 'results'}"])
    run = train_centralized(cfg, tmp_path / "results" / "tiny", log_fn=lambda m: None)
    paths = build_report(run, overlays=1, device="cpu", log_fn=lambda m: None)
    page, md = check_links(run, paths)
    assert any(p.name.startswith("overlay_") for p in (run / "report_files").iterdir())
    for text in (page, md):
        assert "Final per-class Dice" in text and "site01-btcv" in text and "unseen:unseen" in text
        assert "centralized" in text and "no privacy accounting" in text and "config.yaml" in text
    assert re.search(r"<table><tr><th>class</th><th>site01-btcv</th>", page)
    assert "<th>liver</th>" in page
