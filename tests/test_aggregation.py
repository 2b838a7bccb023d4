"""Aggregation and server optimisers against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtextseg.errors import FedTextSegError
from fedtextseg.federation import (
    SiteUpdate,
    aggregate,
    class_coverage,
    make_server_optimizer,
    screen_updates,
    validate_update,
)

C = 4
GROUPS = {"shared": ["enc.w"], "per_class": {"head.w": 0, "film.w": 1}, "local": ["norm.w"],
          "frozen_common": ["dino.w"]}


def _global() -> dict[str, np.ndarray]:
    return {"enc.w": np.zeros(2, np.float32), "head.w": np.full((C, 2), 10.0, np.float32),
            "film.w": np.full((2, C), 10.0, np.float32)}


def _site(node: str, base: float, n: int, classes: list[int]) -> SiteUpdate:
    offset = 100.0 * np.arange(C, dtype=np.float32)  # row c of site s holds base_s + 100 c
    arrays = {"enc.w": np.array([base, base + 1], np.float32),
              "head.w": np.repeat((base + offset)[:, None], 2, axis=1),
              "film.w": np.repeat((base + offset)[None, :], 2, axis=0)}
    mask = np.zeros(C, bool)
    mask[classes] = True
    return SiteUpdate(node, arrays, n, mask)


def _three_sites() -> list[SiteUpdate]:
    # A labels {0,1}, B {1,2}, S3 {2}; nobody labels 3.
    return [_site("A", 1.0, 1, [0, 1]), _site("B", 3.0, 3, [1, 2]), _site("S3", 5.0, 4, [2])]


def test_fedavg_weighted_mean_by_examples():
    out = aggregate(_global(), _three_sites(), GROUPS)
    np.testing.assert_allclose(out["enc.w"], [30 / 8, 38 / 8], rtol=1e-6)  # (1*1+3*3+4*5)/8, (2+12+24)/8
    assert out["enc.w"].dtype == np.float32
    assert list(out) == ["enc.w", "head.w", "film.w"]


def test_equal_weighting():
    out = aggregate(_global(), _three_sites(), GROUPS, weighting="equal")
    np.testing.assert_allclose(out["enc.w"], [3.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(out["head.w"][:, 0], [1.0, 2.0 + 100, 4.0 + 200, 10.0], rtol=1e-6)


def test_class_count_weighting():
    """weighting=classes: examples x annotated classes (A 1x2, B 3x2, S3 4x1), shared and per-class rows alike."""
    out = aggregate(_global(), _three_sites(), GROUPS, weighting="classes")
    np.testing.assert_allclose(out["enc.w"], [(2 * 1 + 6 * 3 + 4 * 5) / 12, (2 * 2 + 6 * 4 + 4 * 6) / 12], rtol=1e-6)
    np.testing.assert_allclose(out["head.w"][:, 0], [1.0, (2 * 1 + 6 * 3) / 8 + 100, (6 * 3 + 4 * 5) / 10 + 200, 10.0],
                               rtol=1e-6)


@pytest.mark.parametrize("key,axis", [("head.w", 0), ("film.w", 1)])
def test_class_aware_rows(key, axis):
    out = aggregate(_global(), _three_sites(), GROUPS)
    expected = np.array([1.0,                          # row 0: A only
                         (1 * 1 + 3 * 3) / 4 + 100,    # row 1: A (n=1), B (n=3)
                         (3 * 3 + 4 * 5) / 7 + 200,    # row 2: B (n=3), S3 (n=4)
                         10.0])                        # row 3: nobody -> global
    rows = np.moveaxis(out[key], axis, 0)
    for other in range(2):
        np.testing.assert_allclose(rows[:, other], expected, rtol=1e-6)


def test_class_coverage():
    sites = _three_sites()
    np.testing.assert_array_equal(class_coverage(sites, C), [True, True, True, False])
    sites[0].num_examples = 0  # A trains on nothing: class 0 gets no contribution
    np.testing.assert_array_equal(class_coverage(sites, C), [False, True, True, False])
    out = aggregate(_global(), sites, GROUPS)
    assert out["head.w"][0, 0] == 10.0
    np.testing.assert_array_equal(class_coverage(sites, C, weighting="equal"), [True, True, True, False])


def test_median_and_trimmed_mean():
    g = {"w": np.zeros(2)}
    groups = {"shared": ["w"], "per_class": {}}
    sites = [SiteUpdate(f"s{i}", {"w": np.array([v, -v])}, n, np.zeros(0, bool))
             for i, (v, n) in enumerate([(1.0, 100), (2.0, 1), (3.0, 1), (4.0, 1), (100.0, 1)])]
    np.testing.assert_allclose(aggregate(g, sites, groups, rule="median")["w"], [3.0, -3.0])
    np.testing.assert_allclose(aggregate(g, sites, groups, rule="trimmed_mean", beta=0.2)["w"], [3.0, -3.0])
    np.testing.assert_allclose(aggregate(g, sites, groups, rule="trimmed_mean", beta=0.0)["w"], [22.0, -22.0])
    with pytest.raises(FedTextSegError, match="beta"):
        aggregate(g, sites, groups, rule="trimmed_mean", beta=0.5)
    with pytest.raises(FedTextSegError, match="unknown aggregation rule"):
        aggregate(g, sites, groups, rule="krum")


def test_robust_per_class_rows():
    sites = _three_sites() + [_site("D", 50.0, 1, [1])]
    out = aggregate(_global(), sites, GROUPS, rule="median", robust_per_class=True)
    # row 1 annotated by A (1), B (3), D (50) -> median 3 (+100); shared median of bases 1, 3, 5, 50 -> 4
    assert out["head.w"][1, 0] == pytest.approx(103.0)
    assert out["enc.w"][0] == pytest.approx(4.0)
    out = aggregate(_global(), sites, GROUPS, rule="median")  # per-class rows stay weighted means
    assert out["head.w"][1, 0] == pytest.approx((1 + 9 + 50) / 5 + 100)


def test_integer_arrays_are_rounded():
    g = {"count": np.array([0], np.int64)}
    sites = [SiteUpdate("a", {"count": np.array([1])}, 1, []), SiteUpdate("b", {"count": np.array([2])}, 2, [])]
    out = aggregate(g, sites, {"shared": ["count"]})
    assert out["count"].dtype == np.int64 and out["count"][0] == 2  # 5/3 -> 2


def test_validation_messages_name_site_and_key():
    bad = _site("Bad", 1.0, 2, [0])
    del bad.arrays["film.w"]
    bad.arrays["norm.w"] = np.zeros(3, np.float32)
    bad.arrays["enc.w"] = np.array([np.nan, 1.0], np.float32)
    bad.arrays["head.w"] = bad.arrays["head.w"].astype(np.float64)[:3]
    bad.annotated = np.zeros(5, bool)
    problems = validate_update(_global(), bad, GROUPS)
    text = "\n".join(problems)
    assert "site 'Bad': missing array 'film.w'" in text
    assert "site 'Bad': sent local array 'norm.w'" in text
    assert "site 'Bad': array 'enc.w' contains 1 NaN/Inf" in text
    assert "site 'Bad': array 'head.w' has shape (3, 2), expected (4, 2)" in text
    assert "site 'Bad': array 'head.w' has dtype float64, expected float32" in text
    assert "site 'Bad': annotated mask has 5 entries, expected 4" in text
    assert len(problems) == 6
    assert validate_update(_global(), _site("ok", 1.0, 2, [0]), GROUPS) == []
    with pytest.raises(FedTextSegError, match="missing array 'film.w'"):
        aggregate(_global(), _three_sites() + [bad], GROUPS)


def test_screen_updates_excludes_bad_site():
    bad = _site("Bad", 1.0, 2, [0])
    bad.arrays["extra.w"] = np.zeros(1, np.float32)
    bad.arrays["dino.w"] = np.zeros(1, np.float32)
    good, rejected = screen_updates(_global(), _three_sites() + [bad], GROUPS)
    assert [u.node for u in good] == ["A", "B", "S3"]
    assert set(rejected) == {"Bad"}
    assert any("unexpected array 'extra.w'" in p for p in rejected["Bad"])
    assert any("sent frozen array 'dino.w'" in p for p in rejected["Bad"])
    np.testing.assert_allclose(aggregate(_global(), good, GROUPS)["enc.w"], [3.75, 4.75], rtol=1e-6)


def test_group_and_global_errors():
    with pytest.raises(FedTextSegError, match="in two groups"):
        aggregate(_global(), _three_sites(), {"shared": ["enc.w"], "per_class": {"enc.w": 0}})
    with pytest.raises(FedTextSegError, match="lack parameter"):
        aggregate({"enc.w": np.zeros(2, np.float32)}, _three_sites(), GROUPS)
    with pytest.raises(FedTextSegError, match="same site"):
        aggregate(_global(), _three_sites() + [_site("A", 1.0, 1, [0])], GROUPS)
    with pytest.raises(FedTextSegError, match="no site updates"):
        aggregate(_global(), [], GROUPS)


# ---------------------------------------------------------------- server optimisers
def test_fedavg_and_fedprox_are_identity_on_the_aggregate():
    x, agg = {"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, 5.0])}
    for name in ("fedavg", "fedprox"):
        np.testing.assert_array_equal(make_server_optimizer(name).step(x, agg)["w"], [3.0, 5.0])
    out = make_server_optimizer("fedavg").step(x, agg, {"per_class": {"w": 0}})  # stateless: no coverage needed
    np.testing.assert_array_equal(out["w"], [3.0, 5.0])


def test_fedavgm_two_steps():
    opt = make_server_optimizer("fedavgm", lr=1.0, momentum=0.9)
    x = opt.step({"w": np.array([0.0])}, {"w": np.array([1.0])})  # b = 1, x = 1
    x = opt.step(x, {"w": x["w"] + 1.0})  # b = 0.9 * 1 + 1 = 1.9, x = 2.9
    assert x["w"][0] == pytest.approx(2.9)


def test_fedadam_one_step_by_hand():
    opt = make_server_optimizer("fedadam", eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    out = opt.step({"w": np.array([1.0, 1.0])}, {"w": np.array([1.5, 0.8])})
    # delta 0.5: m = 0.1 * 0.5 = 0.05; v = 0.99 * tau^2 + 0.01 * 0.25 (v starts at tau^2 as in Reddi et al.)
    exp0 = 1.0 + 0.1 * 0.05 / (math.sqrt(0.99e-6 + 0.0025) + 1e-3)
    exp1 = 1.0 + 0.1 * -0.02 / (math.sqrt(0.99e-6 + 0.01 * 0.04) + 1e-3)
    np.testing.assert_allclose(out["w"], [exp0, exp1], rtol=1e-12)


def test_fedyogi_and_fedadagrad_one_step_by_hand():
    x, agg = {"w": np.array([0.0])}, {"w": np.array([0.2])}
    yogi = make_server_optimizer("fedyogi", eta=1.0, beta1=0.5, beta2=0.9, tau=0.1).step(x, agg)
    # v = 0.01 - 0.1 * 0.04 * sign(0.01 - 0.04) = 0.014; m = 0.1
    assert yogi["w"][0] == pytest.approx(0.1 / (math.sqrt(0.014) + 0.1))
    ada = make_server_optimizer("fedadagrad", eta=1.0, beta1=0.0, tau=0.1).step(x, agg)
    assert ada["w"][0] == pytest.approx(0.2 / (math.sqrt(0.01 + 0.04) + 0.1))  # v = tau^2 + delta^2


def test_uncovered_per_class_rows_do_not_move():
    groups = {"shared": ["s"], "per_class": {"h": 1}}
    x = {"s": np.zeros(1, np.float32), "h": np.zeros((2, 3), np.float32)}
    opt = make_server_optimizer("fedadam", eta=0.1)
    x = opt.step(x, {"s": np.ones(1, np.float32), "h": np.ones((2, 3), np.float32)}, groups, np.ones(3, bool))
    m_before = opt.m["h"].copy()
    agg = {"s": x["s"] + 1, "h": x["h"].copy()}
    agg["h"][:, 0] += 1.0  # only class 0 annotated this round; rows of classes 1 and 2 equal the global
    new = opt.step(x, agg, groups, np.array([True, False, False]))
    np.testing.assert_array_equal(new["h"][:, 1:], x["h"][:, 1:])
    np.testing.assert_array_equal(opt.m["h"][:, 1:], m_before[:, 1:])
    assert np.all(new["h"][:, 0] > x["h"][:, 0]) and new["s"][0] > x["s"][0]
    np.testing.assert_array_equal(opt.class_rounds, [2, 1, 1])
    with pytest.raises(FedTextSegError, match="coverage"):
        opt.step(x, agg, groups)
    state = opt.state_dict()
    with pytest.raises(FedTextSegError, match="has shape"):  # a failed step leaves the state untouched
        opt.step(x, {"s": agg["s"], "h": agg["h"][:1]}, groups, np.ones(3, bool))
    assert opt.round == state["round"] == 2
    np.testing.assert_array_equal(opt.class_rounds, state["class_rounds"])
    np.testing.assert_array_equal(opt.m["s"], state["m"]["s"])


def test_server_opt_state_round_trip():
    rng = np.random.default_rng(0)
    x = {"w": rng.normal(size=(3, 2))}
    a = make_server_optimizer("fedyogi", eta=0.05)
    for _ in range(2):
        x = a.step(x, {"w": x["w"] + rng.normal(size=(3, 2))})
    b = make_server_optimizer("fedyogi")
    b.load_state_dict(a.state_dict())
    agg = {"w": x["w"] + 0.3}
    np.testing.assert_array_equal(a.step(x, agg)["w"], b.step(x, agg)["w"])
    assert b.round == 3 and b.hparams["eta"] == 0.05
    with pytest.raises(FedTextSegError, match="is for 'fedyogi'"):
        make_server_optimizer("fedadam").load_state_dict(a.state_dict())
    with pytest.raises(FedTextSegError, match="no option"):
        make_server_optimizer("fedadam", momentum=0.9)
