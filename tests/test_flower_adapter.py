"""Flower adapter: arrays/metrics/configs <-> records, identical reply keys across sites, frozen bundle on the wire."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedtextseg import flower_adapter as fa
from fedtextseg.errors import FedTextSegError
from fedtextseg.federation import FrozenBundle, FrozenCache, FrozenDistributor, aggregate

CLASSES = ["liver", "liver tumor", "spleen", "kidney"]


def _message(content: RecordDict | None = None, error: Error | None = None) -> Message:
    """A message as a ServerApp receives it (Message() outside a running app has no run id to take)."""
    meta = Metadata(run_id=1, message_id="", src_node_id=7, dst_node_id=0, reply_to_message_id="m1", group_id="1",
                    created_at=0.0, ttl=60.0, message_type="train")
    return Message(content=content, metadata=meta) if error is None else Message(error=error, metadata=meta)


def test_arrays_round_trip_keeps_order_dtype_shape():
    arrays = {"z.last": np.arange(6, dtype=np.float32).reshape(2, 3), "a.first": np.array(3, np.int64),
              "m.mask": np.array([True, False]), "t.tensor": torch.tensor([[1.0, 2.0]], dtype=torch.float16),
              "e.empty": np.zeros((0, 4), np.float64)}
    rec = fa.arrays_to_record(arrays)
    assert list(rec) == list(arrays)
    inflated = ArrayRecord.inflate(rec.deflate(), children=rec.children)  # what crosses the wire
    back = fa.record_to_arrays(inflated)
    assert list(back) == list(arrays)
    for k, v in arrays.items():
        v = v.numpy() if isinstance(v, torch.Tensor) else v
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
    back["z.last"][0, 0] = 7.0  # writable copies
    with pytest.raises(FedTextSegError, match="'bf'"):
        fa.arrays_to_record({"bf": torch.ones(2, dtype=torch.bfloat16)})


def test_metrics_flatten_and_back():
    metrics = {"loss": np.float32(0.25), "steps": np.int64(10), "dp": True,
               "dice": {"liver": 0.9, "kidney": {"left": 0.8}}, "curve": [1, 2.5]}
    rec = fa.metrics_to_record(metrics)
    assert isinstance(rec, MetricRecord)
    assert dict(rec) == {"loss": 0.25, "steps": 10, "dp": 1, "dice/liver": 0.9, "dice/kidney/left": 0.8,
                         "curve": [1.0, 2.5]}
    assert type(rec["steps"]) is int and type(rec["loss"]) is float
    nested = fa.record_to_metrics(rec, nested=True)
    assert nested["dice"] == {"liver": 0.9, "kidney": {"left": 0.8}}
    with pytest.raises(FedTextSegError, match="metric 'name' must be a number"):
        fa.metrics_to_record({"name": "x"})
    assert dict(fa.metrics_to_record({"dice/spleen": 0.7, "dice": {"liver": 0.9}})) == {
        "dice/spleen": 0.7, "dice/liver": 0.9}  # already-flat names are kept
    with pytest.raises(FedTextSegError, match="'dice/liver' is given twice"):
        fa.metrics_to_record({"dice/liver": 1.0, "dice": {"liver": 0.9}})


def test_config_round_trip():
    cfg = {"server-round": 3, "optim": {"lr": np.float64(1e-3), "name": "adamw", "amp": False},
           "classes": ["liver", "spleen"], "blob": b"\x00\x01", "mix": [1, 2.0]}
    rec = fa.config_to_record(cfg)
    assert isinstance(rec, ConfigRecord) and rec["optim.lr"] == 1e-3 and rec["mix"] == [1.0, 2.0]
    assert fa.record_to_config(rec, nested=True) == {**cfg, "optim": {"lr": 1e-3, "name": "adamw", "amp": False},
                                                    "mix": [1.0, 2.0]}
    with pytest.raises(FedTextSegError, match="config 'x'"):
        fa.config_to_record({"x": None})


def test_record_nbytes():
    arrays = fa.arrays_to_record({"w": np.zeros(100, np.float32)})
    n_arr = fa.record_nbytes(arrays)
    assert 400 < n_arr < 600  # 400 data bytes + .npy header + key
    rd = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 3})})
    assert fa.record_nbytes(rd) == n_arr + 8 + len("num-examples")
    assert fa.record_nbytes(_message(rd)) == fa.record_nbytes(rd)
    assert fa.record_nbytes(_message(error=Error(code=0, reason="x"))) == 0


def test_pack_site_metrics_identical_keys_across_sites():
    liver_site = fa.pack_site_metrics({"liver": 0.95, "liver tumor": 0.6}, CLASSES)
    kidney_site = fa.pack_site_metrics({"kidney": 0.9, "liver tumor": float("nan")}, CLASSES)
    assert set(liver_site) == set(kidney_site)
    assert set(fa.metrics_to_record(liver_site)) == set(fa.metrics_to_record(kidney_site))
    assert liver_site["dice/spleen"] == 0.0 and liver_site["has/spleen"] == 0.0
    assert kidney_site["has/liver tumor"] == 0.0  # NaN (e.g. empty ground truth) -> not scored
    assert fa.unpack_site_metrics(liver_site, CLASSES) == {"liver": 0.95, "liver tumor": 0.6}
    assert fa.unpack_site_metrics(kidney_site, CLASSES) == {"kidney": 0.9}
    third = fa.pack_site_metrics({"liver": 0.85}, CLASSES)
    mean = fa.mean_site_metrics([liver_site, kidney_site, third], CLASSES)
    assert mean == pytest.approx({"liver": 0.9, "liver tumor": 0.6, "kidney": 0.9})  # spleen: nobody scored it
    assert fa.mean_site_metrics([liver_site, third], ["liver"], weights=[3, 1]) == pytest.approx(
        {"liver": (3 * 0.95 + 0.85) / 4})
    with pytest.raises(FedTextSegError, match="pancreas"):
        fa.pack_site_metrics({"pancreas": 0.5}, CLASSES)


def test_site_replies_have_identical_keys_and_aggregate():
    glob = {"enc.w": np.zeros(2, np.float32), "head.w": np.zeros((4, 3), np.float32)}
    groups = {"shared": ["enc.w"], "per_class": {"head.w": 0}}
    replies = []
    for node, classes, n in ((11, [0, 1], 2), (12, [3], 6)):
        mask = np.isin(np.arange(4), classes)
        arrays = {"enc.w": np.full(2, float(node), np.float32), "head.w": np.full((4, 3), float(node), np.float32)}
        dice = {CLASSES[c]: 0.5 for c in classes}
        replies.append(fa.site_reply_content(arrays, n, mask, {"loss": 0.1, **fa.pack_site_metrics(dice, CLASSES)}))
    keys = [(set(r["arrays"]), set(r["metrics"])) for r in replies]
    assert keys[0] == keys[1]
    assert fa.ANNOTATED_KEY in keys[0][0] and fa.NUM_EXAMPLES_KEY in keys[0][1]
    updates = [fa.content_to_site_update(r, node) for r, node in zip(replies, (11, 12))]
    assert updates[0].node == "11" and updates[1].num_examples == 6
    np.testing.assert_array_equal(updates[1].annotated, [False, False, False, True])
    assert set(updates[0].arrays) == {"enc.w", "head.w"} and "num-examples" not in updates[0].metrics
    out = aggregate(glob, updates, groups)
    np.testing.assert_allclose(out["enc.w"], (2 * 11 + 6 * 12) / 8)
    np.testing.assert_allclose(out["head.w"][:, 0], [11, 11, 0, 12])
    with pytest.raises(FedTextSegError, match="reserved"):
        fa.site_reply_content({fa.ANNOTATED_KEY: np.zeros(1)}, 1, [True])
    with pytest.raises(FedTextSegError, match="site '5': reply lacks the annotated"):
        fa.content_to_site_update(RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord()}), 5)


def test_frozen_bundle_over_the_wire(tmp_path):
    bundle = FrozenBundle({"dino.w": np.arange(12, dtype=np.float32).reshape(3, 4)}, {"source": "random-init"})
    dist = FrozenDistributor(bundle)
    cache = FrozenCache(tmp_path / "site-cache")

    first = fa.attach_frozen(RecordDict(), bundle.content_hash, dist.payload_for(7))
    got = fa.receive_frozen(first, cache)
    assert got.content_hash == bundle.content_hash and got.meta == {"source": "random-init"}
    assert cache.hashes() == [bundle.content_hash]

    second = fa.attach_frozen(RecordDict(), bundle.content_hash, dist.payload_for(7))
    assert fa.FROZEN_ARRAYS_KEY not in second.array_records  # not resent
    assert fa.record_nbytes(second) < fa.record_nbytes(first) - bundle.nbytes + 100
    assert fa.receive_frozen(second, FrozenCache(tmp_path / "site-cache")).content_hash == bundle.content_hash

    with pytest.raises(FedTextSegError, match="missing-frozen") as exc:
        fa.receive_frozen(second, FrozenCache(tmp_path / "empty-cache"))
    reply = _message(error=fa.missing_frozen_error(bundle.content_hash))
    assert fa.is_missing_frozen(reply) and "missing-frozen" in str(exc.value)
    assert not fa.is_missing_frozen(_message(RecordDict()))
    assert not fa.is_missing_frozen(_message(error=Error(code=2, reason="ValueError: boom")))
    dist.mark_missing(7)
    assert dist.payload_for(7) is bundle

    tampered = fa.attach_frozen(RecordDict(), bundle.content_hash, bundle)
    tampered["frozen"] = fa.arrays_to_record({"dino.w": np.zeros((3, 4), np.float32)})
    with pytest.raises(FedTextSegError, match="does not match"):
        fa.receive_frozen(tampered, cache)
    assert fa.receive_frozen(RecordDict(), cache) is None


class _SlowGrid:
    """A Grid whose nodes answer after a given number of pulls (None: never)."""

    def __init__(self, answer_after: dict[str, int | None]):
        self.answer_after, self.pulls, self.pushed = answer_after, 0, []

    def push_messages(self, messages):
        self.pushed = list(messages)
        return list(self.answer_after)

    def pull_messages(self, message_ids):
        self.pulls += 1
        due = [m for m in message_ids if self.answer_after[m] is not None and self.answer_after[m] <= self.pulls]
        out = []
        for mid in due:
            meta = Metadata(run_id=1, message_id="", src_node_id=7, dst_node_id=0, reply_to_message_id=mid,
                            group_id="1", created_at=0.0, ttl=60.0, message_type="train")
            out.append(Message(content=RecordDict(), metadata=meta))
        return out


def test_send_and_receive_polls_quickly_and_stops_at_the_last_reply_or_the_timeout(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(fa.time, "sleep", lambda s: slept.append(s))
    grid = _SlowGrid({"a": 1, "b": 4, "c": 9})
    replies = fa.send_and_receive(grid, ["m"], timeout=60.0, first_poll=0.02, max_poll=0.5)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"]
    assert grid.pulls == 9  # not one pull after the last reply
    assert slept and max(slept) <= 0.5 and sum(slept) < 3.0  # Flower's HttpGrid sleeps 3 s between pulls
    assert slept[0] == pytest.approx(0.02)  # a reply restarts the short interval

    # a node that never answers: the replies that came, once the timeout has passed
    clock = iter(range(0, 1000))
    monkeypatch.setattr(fa.time, "monotonic", lambda: float(next(clock)))
    grid = _SlowGrid({"a": 2, "never": None})
    replies = fa.send_and_receive(grid, ["m"], timeout=5.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 2 <= grid.pulls <= 6
    assert fa.send_and_receive(_SlowGrid({}), [], timeout=1.0) == []
