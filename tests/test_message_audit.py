"""The message audit: every reply a ClientApp sends is checked against an allow-list; a real Flower simulation
round (DP-SGD on, one site over budget) shows that no image or label content leaves a site and that sample counts
and metrics are the only data-dependent numbers sent."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedtextseg.privacy.audit import AuditViolation, audit_reply, message_audit_mod


def _meta(kind: str) -> Metadata:
    return Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                    created_at=0.0, ttl=60.0, message_type=kind)


def _incoming(kind: str = "train") -> Message:
    arrays = ArrayRecord({"enc.w": Array(np.zeros((4, 3), np.float32)),
                          "head.rows": Array(np.zeros((5, 4), np.float32))})
    return Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord({"round": 1})}), metadata=_meta(kind))


def _reply(content: RecordDict | None = None, error: Error | None = None) -> Message:
    meta = Metadata(run_id=1, message_id="", src_node_id=7, dst_node_id=0, reply_to_message_id="m1", group_id="1",
                    created_at=0.0, ttl=60.0, message_type="train")
    return Message(content=content, metadata=meta) if error is None else Message(error=error, metadata=meta)


def _train_content(**changes) -> RecordDict:
    arrays = {"enc.w": np.ones((4, 3), np.float32), "head.rows": np.ones((5, 4), np.float32),
              "meta.annotated": np.array([True, False, True, False, False])}
    arrays.update(changes.pop("arrays", {}))
    metrics = {"num-examples": 3, "train_steps": 2.0, "round_seconds": 1.5, "privacy/epsilon": 1.2}
    metrics.update(changes.pop("metrics", {}))
    site = {"name": "hospital-a", "task": "lits", **changes.pop("site", {})}
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items() if v is not None}),
                          "metrics": MetricRecord({k: v for k, v in metrics.items() if v is not None}),
                          "site": ConfigRecord(site)})
    for name, record in changes.items():
        content[name] = record
    return content


def test_a_proper_train_reply_passes():
    assert audit_reply(_reply(_train_content()), _incoming()) == []


@pytest.mark.parametrize("changes, problem", [
    (dict(arrays={"image": np.zeros((1, 16, 16, 16), np.float32)}), "not sent by the server"),
    (dict(arrays={"enc.w": np.ones((4, 4), np.float32)}), "the server sent"),
    (dict(arrays={"head.rows": None}), "missing"),
    (dict(arrays={"meta.annotated": np.zeros((5, 2), bool)}), "1-D bool"),
    (dict(metrics={"dice_case_007": 0.8}), "not on the allow-list"),
    (dict(metrics={"train_voxels": [0.1, 0.2]}), "only scalars"),
    (dict(metrics={"num-examples": -1}), "non-negative"),
    (dict(site={"patient": "John Doe"}), "not on the allow-list"),
    (dict(extra=ConfigRecord({"notes": "x"})), "record 'extra'"),
])
def test_train_reply_violations_are_named(changes, problem):
    problems = audit_reply(_reply(_train_content(**changes)), _incoming())
    assert any(problem in p for p in problems), problems


def test_evaluate_reply_allow_list():
    good = RecordDict({"metrics": MetricRecord({"num-examples": 2}),
                       "eval.dice": MetricRecord({"dice/liver": 0.9, "has/liver": 1.0}),
                       "site": ConfigRecord({"name": "hospital-a"})})
    assert audit_reply(_reply(good), _incoming("evaluate")) == []
    bad = RecordDict({"metrics": MetricRecord({"num-examples": 2, "mean_hu": 40.0}),
                      "eval.dice": MetricRecord({"hd95/liver": 3.0}),
                      "arrays": ArrayRecord({"pred": Array(np.zeros((8, 8), np.float32))})})
    problems = audit_reply(_reply(bad), _incoming("evaluate"))
    assert len(problems) == 3 and any("no arrays" in p for p in problems)
    assert audit_reply(_reply(error=Error(code=0, reason="missing-frozen: abc")), _incoming()) == []


def test_query_and_secagg_replies():
    site = ConfigRecord({"name": "hospital-a", "task": "lits", "annotated": ["liver"], "train-volumes": 6})
    assert audit_reply(_reply(RecordDict({"site": site})), _incoming("query")) == []
    bad = RecordDict({"site": ConfigRecord({"name": "a", "train-volumes": -1, "scanner": "X"}),
                      "metrics": MetricRecord({"n": 1})})
    assert len(audit_reply(_reply(bad), _incoming("query"))) == 3
    masked = RecordDict({"secaggplus_configs": ConfigRecord({"masked_params": [b"\x00" * 8]}),
                         "fitres.parameters": ArrayRecord(),
                         "fitres.metrics": ConfigRecord({"privacy/epsilon": 1.0, "train_steps": 2.0}),
                         "fitres.num_examples": MetricRecord({"num_examples": 3}),
                         "fitres.status": ConfigRecord({"code": 0, "message": "ok"})})
    assert audit_reply(_reply(masked), _incoming()) == []
    masked["fitres.parameters"] = ArrayRecord({"0": Array(np.zeros(3, np.float32))})  # a plain update
    assert any("must be empty" in p for p in audit_reply(_reply(masked), _incoming()))


def test_audit_mod_refuses_to_send_and_logs(caplog):
    ok = message_audit_mod(_incoming(), None, lambda m, c: _reply(_train_content()))
    assert ok.content.metric_records["metrics"]["num-examples"] == 3
    leak = _train_content(arrays={"label": np.zeros((2, 16, 16), np.uint8)})
    with pytest.raises(AuditViolation, match="not sent by the server"):
        message_audit_mod(_incoming(), None, lambda m, c: _reply(leak))
    assert "NOT sent" in caplog.text


def test_the_client_app_runs_the_audit():
    import client.app

    assert message_audit_mod in client.app.app._mods


# ----------------------------------------------------------------------------- a real Flower simulation round
def _write_configs(tmp: Path, privacy: dict | None = None) -> Path:
    from fedtextseg.config import configs_dir

    cdir = tmp / "configs"
    shutil.copytree(configs_dir(), cdir)
    demo = {  # the ServerApp composes experiment "demo" from FEDTEXTSEG_CONFIGS when run_simulation passes no config
        "run": {"name": "audit", "threads": 1, "results_dir": str(tmp / "results")},
        "data": {"root": str(tmp / "data"), "unseen": None, "val_fraction": 0.34,
                 "preprocess": {"patch_size": [16, 16, 16], "spacing": [12, 12, 12], "num_crops": 1}},
        "federation": {"rounds": 1, "min_sites": 1, "evaluate_unseen": False},
        "train": {"local_steps": 2, "batch_size": 1, "log_every": 0},
        "eval": {"max_cases": 1, "hd95": False},
        "privacy": privacy or {"enabled": True, "target_epsilon": 50.0, "min_samples_for_metrics": 0,
                               "ledger_dir": str(tmp / "ledgers")},
    }
    (cdir / "experiment" / "demo.yaml").write_text("# @package _global_\n" + yaml.safe_dump(demo))
    return cdir


def _site_content(root: Path) -> tuple[set[tuple[int, ...]], np.ndarray]:
    """Shapes of every image/label of the sites, and their distinct intensities (raw HU and windowed [0, 1])."""
    import nibabel as nib

    shapes, values = set(), []
    for path in sorted(root.rglob("*.nii.gz")):
        data = np.asarray(nib.load(str(path)).dataobj)
        shapes.add(tuple(data.shape))
        if "images" in path.parts:
            v = np.unique(data.astype(np.float32))
            values += [v, np.unique(np.clip((v + 175.0) / 425.0, 0, 1).astype(np.float32))]
    return shapes, np.unique(np.concatenate(values))


def _simulate(tmp_path, monkeypatch, privacy: dict | None = None, site2_privacy: dict | None = None):
    """Generate 2 tiny hospitals, run the real ServerApp + ClientApp in Flower's simulation for one round;
    returns (site folders, every message the server sent, every reply it received)."""
    from flwr.simulation import run_simulation
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    import client.app
    import server.app
    from fedtextseg.synthetic.ct import generate_hospitals

    sites = generate_hospitals(tmp_path / "data", sites=2, cases_per_site=3, seed=0, shape=(32, 32, 32), unseen=False)
    if site2_privacy:
        spec = yaml.safe_load((sites[1] / "site.yaml").read_text())
        spec["privacy"] = site2_privacy
        (sites[1] / "site.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("FEDTEXTSEG_CONFIGS", str(_write_configs(tmp_path, privacy)))
    # Ray's socket paths must stay under 107 bytes: a short RAY_TMPDIR, never one deep in pytest's tmp_path
    monkeypatch.setenv("RAY_TMPDIR", os.environ.get("RAY_TMPDIR") or f"/tmp/ray-fts-{os.getpid()}")
    monkeypatch.setenv("FLWR_HOME", os.environ.get("FLWR_HOME") or str(tmp_path / "flwr_home"))
    sent, received = [], []
    push, pull = InMemoryGrid.push_messages, InMemoryGrid.pull_messages
    monkeypatch.setattr(InMemoryGrid, "push_messages", lambda self, msgs: push(self, sent.extend(msgs) or msgs))
    monkeypatch.setattr(InMemoryGrid, "pull_messages",
                        lambda self, ids: received.extend(out := list(pull(self, ids))) or out)
    run_simulation(server_app=server.app.app, client_app=client.app.app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    return sites, sent, received


@pytest.mark.slow
@pytest.mark.timeout(600)  # a loaded 2-core machine needs several minutes for Ray + DP-SGD
def test_flower_simulation_sends_no_image_content(tmp_path, monkeypatch):
    # site 2 sets a budget it cannot afford in its site.yaml: it declines its round, site 1 trains with DP-SGD
    sites, sent, received = _simulate(tmp_path, monkeypatch,
                                      site2_privacy={"target_epsilon": 0.5, "noise_multiplier": 1.0})

    run_dir = tmp_path / "results" / "audit"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    privacy = {r["site"]: r for r in rows if r["kind"] == "privacy"}
    a, b = (yaml.safe_load((s / "site.yaml").read_text())["name"] for s in sites)
    assert set(privacy) == {a, b} and not privacy[a]["declined"] and privacy[b]["declined"]
    assert 0 < privacy[a]["epsilon"] <= 50.0 and privacy[b]["epsilon"] == 0.0
    assert any(r["kind"] == "failure" and r["site"] == b and "budget exhausted" in r["reason"] for r in rows)
    assert any(r["kind"] == "round" and r["aggregated"] for r in rows)  # the run went on with site a
    ledger = json.loads((run_dir / "privacy.json").read_text())
    assert ledger["sites"][b]["budget_exhausted"] and ledger["sites"][a]["rounds_trained"] == 1

    shapes, intensities = _site_content(tmp_path / "data")
    shapes |= {(16, 16, 16), (1, 16, 16, 16)}  # training patches
    replies = [m for m in received if not m.has_error()]
    assert len(replies) == 4, [m.error for m in received if m.has_error()]  # 2 sites x (train + evaluate)
    out_by_id = {m.metadata.message_id: m for m in sent}
    for reply in replies:
        request = out_by_id[reply.metadata.reply_to_message_id]
        assert audit_reply(reply, request) == []
        for record in reply.content.array_records.values():
            for key, arr in record.items():
                x = arr.numpy()
                assert tuple(x.shape) not in shapes and tuple(x.shape[-3:]) not in shapes, key
                values = x[(x != 0) & (x != 1)] if x.dtype.kind == "f" else x[:0]
                if values.size > 8:  # no voxel intensities hidden in an array
                    assert np.isin(values, intensities).mean() < 0.01, key
        for name, record in reply.content.metric_records.items():
            for key, value in record.items():
                assert isinstance(value, (int, float)) and (key == "num-examples" or "/" in key or
                                                            key.startswith(("train_", "round_"))), (name, key)
                if "train_loss" in key:
                    pytest.fail("the training loss left a DP site")
        kind = str(request.metadata.message_type)
        if kind == "train":
            got = reply.content.array_records["arrays"]
            want = request.content.array_records["arrays"]
            assert set(got) == set(want) | {"meta.annotated"}  # the model's shared + per-class arrays, nothing else
            if reply.content.metric_records["metrics"]["privacy/declined"] == 1.0:
                assert reply.content.metric_records["metrics"]["num-examples"] == 0
                for key in want:  # a declining site sends back exactly what it received: nothing data-dependent
                    np.testing.assert_array_equal(got[key].numpy(), want[key].numpy())
    assert math.isfinite(privacy[a]["noise_multiplier"])


@pytest.mark.slow
@pytest.mark.timeout(600)  # a loaded 2-core machine needs several minutes for Ray + DP-SGD
def test_secure_aggregation_server_only_holds_the_sum(tmp_path, monkeypatch):
    """privacy.secure_aggregation=secaggplus: no reply the server receives carries a plain array (the updates travel
    masked through Flower's SecAgg+), and the model the server ends with is the group-wise, class-aware FedAvg of
    the sites' updates, as an in-process run of the same round (no masking) computes it."""
    from fedtextseg.config import compose_config
    from fedtextseg.federation.checkpoint import load_latest
    from fedtextseg.federation.inprocess import run_federation_inprocess

    sites, sent, received = _simulate(tmp_path, monkeypatch, privacy={"secure_aggregation": "secaggplus"})
    rows = [json.loads(line) for line in (tmp_path / "results" / "audit" / "metrics.jsonl").read_text().splitlines()]
    assert [r["aggregated"] for r in rows if r["kind"] == "round"] == [True], rows
    assert not [r for r in rows if r["kind"] == "failure"]
    masked = 0
    for reply in received:
        assert not reply.has_error(), reply.error
        for record in reply.content.array_records.values():
            assert len(record) == 0  # no plain array reached the server
        secagg = reply.content.config_records.get("secaggplus_configs")
        if secagg is not None and "masked_params" in secagg:
            from flwr.common import bytes_to_ndarray

            vec = np.concatenate([bytes_to_ndarray(b).ravel() for b in secagg["masked_params"]])
            assert vec.min() >= 0 and vec.max() > 2 ** 31  # uniformly masked integers mod 2^32, not parameters
            masked += 1
    assert masked == 2
    # reference: the same round without masking (training is deterministic given run seed, site and round)
    cfg = compose_config("demo", [])
    cfg.privacy.secure_aggregation = "none"
    reference = run_federation_inprocess(cfg, tmp_path / "reference", log_fn=lambda *_: None)
    secure = load_latest(tmp_path / "results" / "audit")
    for k, want in reference.global_arrays.items():
        np.testing.assert_allclose(secure.global_arrays[k], want, atol=2e-5, err_msg=k)  # quantisation only
