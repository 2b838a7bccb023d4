"""A diverged or hostile site, and one sending malformed or foreign updates: excluded for that round, with the
reason recorded, while the others are aggregated and the run goes on.

Through a real ``Coordinator`` (tiny CDPDNet, real text bank) with updates derived from its global arrays, and
through Flower's records exactly as a ClientApp builds them (``site_reply_content`` + the ``site`` ConfigRecord
with the model identity), audited by the site's allow-list and parsed by the server's adapter.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faults.helpers import QUIET, honest_updates, hospitals, rows, tiny_cfg  # noqa: F401 - fixture
from fedtextseg.errors import FedTextSegError
from fedtextseg.federation.aggregation import SiteUpdate, screen_outliers
from fedtextseg.federation.coordinator import Coordinator
from fedtextseg.flower_adapter import content_to_site_update, site_reply_content


@pytest.fixture
def coord(hospitals, tmp_path):
    return Coordinator(tiny_cfg(hospitals, 3, "federation.evaluate_unseen=false"), tmp_path / "run", **QUIET)


def _key(coord, kind="f"):
    return next(k for k in coord.groups.shared if coord.global_arrays[k].dtype.kind == kind)


def _hostile(coord, how: str) -> SiteUpdate:
    (u,) = honest_updates(coord, names=["evil"], seed=9)
    k = _key(coord)
    if how == "nan":
        u.arrays[k] = u.arrays[k].copy()
        u.arrays[k].flat[0] = np.nan
    elif how == "inf":
        u.arrays[k] = np.full_like(u.arrays[k], np.inf)
    elif how == "huge":  # finite but absurd: every array moved 1e6 times further than the honest sites
        u.arrays = {n: (coord.global_arrays[n] + 1e6 * (a - coord.global_arrays[n])).astype(a.dtype)
                    for n, a in u.arrays.items()}
    elif how == "missing-key":
        del u.arrays[k]
    elif how == "extra-key":
        u.arrays["attacker.w"] = np.zeros(3, np.float32)
    elif how == "frozen-key":
        u.arrays[next(iter(coord.frozen.arrays))] = np.zeros(1, np.float32)
    elif how == "shape":
        u.arrays[k] = u.arrays[k].reshape(-1)[:-1]
    elif how == "dtype":
        u.arrays[k] = u.arrays[k].astype(np.float64)
    elif how in ("frozen-hash", "bank-hash", "model", "model-arch", "fedtextseg-version"):
        u.identity[how] = "0" * 64 if how.endswith("hash") else "something-else"
    return u


REASONS = {"nan": "NaN/Inf", "inf": "NaN/Inf", "huge": "outlier_factor", "missing-key": "missing array",
           "extra-key": "unexpected array 'attacker.w'", "frozen-key": "sent frozen array", "shape": "has shape",
           "dtype": "has dtype float64", "frozen-hash": "frozen bundle", "bank-hash": "text-embedding bank",
           "model": "model 'something-else'", "model-arch": "model architecture",
           "fedtextseg-version": "fedtextseg version"}


@pytest.mark.parametrize("how", list(REASONS))
def test_bad_update_is_excluded_with_its_reason_and_the_run_goes_on(coord, how):
    before = {k: v.copy() for k, v in coord.global_arrays.items()}
    good = honest_updates(coord)
    out = coord.finish_train_round(1, good + [_hostile(coord, how)], {})
    assert out["aggregated"] and out["sites"] == ["a", "b", "c"]
    assert REASONS[how] in out["excluded"]["evil"]
    (failure,) = rows(coord.recorder.run_dir, "failure")
    assert failure["round"] == 1 and failure["site"] == "evil" and REASONS[how] in failure["reason"]
    k = _key(coord)
    assert np.all(np.isfinite(coord.global_arrays[k])) and not np.array_equal(coord.global_arrays[k], before[k])
    lo = np.min([u.arrays[k] for u in good], axis=0) - 1e-6
    hi = np.max([u.arrays[k] for u in good], axis=0) + 1e-6
    assert np.all((coord.global_arrays[k] >= lo) & (coord.global_arrays[k] <= hi))  # nothing of 'evil' got in
    # next round the same site behaves and counts again
    out = coord.finish_train_round(2, honest_updates(coord, names=["a", "b", "c", "evil"], seed=2), {})
    assert out["sites"] == ["a", "b", "c", "evil"] and not out["excluded"]


def test_max_update_norm_and_robust_median(hospitals, tmp_path):
    cfg = tiny_cfg(hospitals, 2, "federation.outlier_factor=null", "federation.robust=median")
    coord = Coordinator(cfg, tmp_path / "run", **QUIET)
    good = honest_updates(coord)
    out = coord.finish_train_round(1, good + [_hostile(coord, "huge")], {})
    assert out["sites"] == ["a", "b", "c", "evil"]  # screen off: the median keeps the hostile site harmless
    k = _key(coord)
    assert np.abs(coord.global_arrays[k]).max() < np.abs(np.stack([u.arrays[k] for u in good])).max() + 1e-3
    cfg = tiny_cfg(hospitals, 2, "federation.outlier_factor=null", "federation.max_update_norm=10.0")
    coord = Coordinator(cfg, tmp_path / "run2", **QUIET)
    out = coord.finish_train_round(1, honest_updates(coord) + [_hostile(coord, "huge")], {})
    assert "exceeds federation.max_update_norm=10" in out["excluded"]["evil"]


def test_too_few_usable_updates_leave_the_global_model_unchanged(coord):
    before = {k: v.copy() for k, v in coord.global_arrays.items()}
    (a,) = honest_updates(coord, names=["a"])
    out = coord.finish_train_round(1, [a, _hostile(coord, "nan")], {"c": "no reply within 60s"})
    assert not out["aggregated"] and set(out["excluded"]) == {"evil", "c"}  # 1 usable < min_sites=2
    for k, v in before.items():
        np.testing.assert_array_equal(coord.global_arrays[k], v)
    (r,) = rows(coord.recorder.run_dir, "round")
    assert r["aggregated"] is False and r["sites"] == 1 and r["excluded"] == 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_honest=st.integers(1, 6), spread=st.floats(1.0, 10.0), exponent=st.floats(3.0, 30.0),
       sign=st.sampled_from([-1.0, 1.0]), seed=st.integers(0, 2**16), position=st.integers(0, 6))
def test_outlier_screen_drops_exactly_the_absurd_update(n_honest, spread, exponent, sign, seed, position):
    """Property: honest updates whose sizes differ up to 10x are all kept; one 1e3..1e30 times larger is dropped."""
    rng = np.random.default_rng(seed)
    g = {"w": rng.standard_normal(50).astype(np.float32), "b": np.zeros(3, np.float32)}
    scales = rng.uniform(1.0, spread, n_honest)
    ups = [SiteUpdate(f"s{i}", {k: (v + s * 1e-2 * rng.standard_normal(v.shape)).astype(np.float32)
                                for k, v in g.items()}, 1, [True]) for i, s in enumerate(scales)]
    step = sign * 10.0**exponent * 1e-2 * scales.max()
    bad = SiteUpdate("bad", {k: (v + step * rng.standard_normal(v.shape)).astype(np.float32) for k, v in g.items()},
                     1, [True])
    ups.insert(min(position, len(ups)), bad)
    kept, rejected = screen_outliers(g, ups, factor=100.0)
    assert [u.node for u in kept] == [f"s{i}" for i in range(n_honest)] and list(rejected) == ["bad"]


def test_outlier_screen_does_not_judge_against_a_zero_median():
    g = {"w": np.zeros(4, np.float32)}
    same = [SiteUpdate(n, {"w": np.zeros(4, np.float32)}, 1, [True]) for n in "ab"]
    moved = SiteUpdate("c", {"w": np.ones(4, np.float32)}, 1, [True])
    kept, rejected = screen_outliers(g, same + [moved], factor=100.0)
    assert len(kept) == 3 and not rejected


# ---------------------------------------------------------------- over Flower's records, as a ClientApp sends them
def _client_reply(coord, arrays=None, identity=None) -> RecordDict:
    content = site_reply_content(arrays or coord.global_arrays, 2, np.ones(len(coord.bank.class_names), bool),
                                 {"train_loss": 0.5})
    content["site"] = ConfigRecord({"name": "h", "task": "lits", **(identity or coord.identity)})
    return content


def test_identity_travels_through_the_audit_and_a_foreign_model_is_refused(coord):
    from fedtextseg.privacy.audit import audit_reply

    class Incoming:  # what the audit reads of the server's message: its type and the arrays it sent
        metadata = type("M", (), {"message_type": "train"})()
        content = RecordDict({"arrays": site_reply_content(coord.global_arrays, 0, [True])["arrays"]})

    class Reply:
        def __init__(self, content):
            self.content = content

        def has_error(self):
            return False

    del Incoming.content["arrays"]["meta.annotated"]
    assert audit_reply(Reply(_client_reply(coord)), Incoming) == []
    update = content_to_site_update(_client_reply(coord), "h")
    assert update.identity == coord.identity
    stale = content_to_site_update(_client_reply(coord, identity={**coord.identity, "frozen-hash": "f" * 64}), "h")
    out = coord.finish_train_round(1, honest_updates(coord, names=["a", "b"]) + [stale], {})
    assert out["sites"] == ["a", "b"] and "clear the site's frozen cache" in out["excluded"]["h"]


@pytest.mark.parametrize("damage,message", [
    ("no-arrays", "lacks the 'arrays' or 'metrics' record"),
    ("no-mask", "annotated-class mask"),
    ("no-count", "lacks metric 'num-examples'"),
    ("float-count", "must be an integer"),
])
def test_malformed_reply_records_name_the_site(coord, damage, message):
    content = _client_reply(coord)
    if damage == "no-arrays":
        del content["arrays"]
    elif damage == "no-mask":
        content["arrays"] = ArrayRecord({k: v for k, v in content["arrays"].items() if k != "meta.annotated"})
    elif damage == "no-count":
        content["metrics"] = MetricRecord({"train_loss": 0.5})
    else:
        content["metrics"] = MetricRecord({"num-examples": 1e12, "train_loss": 0.5})
    with pytest.raises(FedTextSegError, match=message) as err:
        content_to_site_update(content, "hospital-x")
    assert "hospital-x" in str(err.value)


def test_identity_of_a_model_without_text_bank_fits_a_flower_config_record():
    # TGC-Net has no embedding bank: its identity must still be sizeable by Flower (an empty string is not)
    from flwr.app import ConfigRecord

    from fedtextseg.config import compose_config
    from fedtextseg.federation.identity import model_identity
    from fedtextseg.runtime import build_model, prepare_bank

    cfg = compose_config("tgcnet_demo", "")
    model = build_model(cfg, prepare_bank(cfg, log_fn=lambda *_: None))
    identity = model_identity(cfg.model.name, model)
    assert identity["bank-hash"] == "none"
    assert ConfigRecord(identity).count_bytes() > 0
