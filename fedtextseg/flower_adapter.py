"""The one module of the library that imports Flower (1.41 Message API): arrays, metrics and configs <-> records,
and :class:`FlowerTransport`, the round protocol's transport over Flower's Grid (server/app.py runs it).

Facts this module relies on (checked against flwr 1.41):
- ``ArrayRecord`` is an insertion-ordered str -> ``Array`` mapping; the order survives serialisation. Arrays are
  stored as ``.npy`` bytes (any numeric numpy dtype, bool included; torch bfloat16 has no numpy dtype).
- ``MetricRecord`` keys may be any ``str``; values must be ``int``/``float`` (``bool`` is refused) or a
  list whose items all have one of those types. ``ConfigRecord`` also allows ``str``, ``bytes`` and ``bool``.
- Flower's strategies require every reply of a round to carry the same ArrayRecord keys and the same MetricRecord
  keys plus ``num-examples``. Sites that label different classes must therefore still send identical keys:
  ``site_reply_content`` always sends every wire array plus the annotated mask as the array ``meta.annotated``,
  and ``pack_site_metrics`` reports every vocabulary class as ``<metric>/<class>`` with a validity flag
  ``has/<class>`` (0 and 0 for classes the site does not label or could not score).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedtextseg import wire
from fedtextseg.errors import FedTextSegError
from fedtextseg.federation.aggregation import SiteUpdate
from fedtextseg.federation.frozen import FrozenBundle, FrozenCache, MissingFrozenError
from fedtextseg.federation.identity import IDENTITY_KEYS

# the wire names (fedtextseg.wire) under the names this module has always given them
ARRAYS_KEY, METRICS_KEY, CONFIG_KEY = wire.ARRAYS, wire.METRICS, wire.CONFIG
NUM_EXAMPLES_KEY, ANNOTATED_KEY, HAS_PREFIX = wire.NUM_EXAMPLES, wire.ANNOTATED, wire.HAS_PREFIX
FROZEN_ARRAYS_KEY, FROZEN_INFO_KEY, SITE_KEY = wire.FROZEN_ARRAYS, wire.FROZEN_INFO, wire.SITE


# ---------------------------------------------------------------- arrays
def _as_numpy(key: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor
        try:
            value = value.detach().cpu().numpy()
        except TypeError as e:
            raise FedTextSegError(f"array '{key}': {e}; convert it (e.g. .float()) before sending") from None
    a = np.asarray(value)
    if a.dtype.kind not in "biufc":
        raise FedTextSegError(f"array '{key}' has non-numeric dtype {a.dtype}")
    return a


def arrays_to_record(arrays: Mapping[str, Any]) -> ArrayRecord:
    """numpy arrays / torch tensors by name -> ``ArrayRecord`` (order kept)."""
    record = ArrayRecord()
    for k, v in arrays.items():
        if not isinstance(k, str) or not k:
            raise FedTextSegError(f"array names must be non-empty strings, got {k!r}")
        record[k] = Array(_as_numpy(k, v))
    return record


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``ArrayRecord`` -> writable numpy arrays by name (order kept)."""
    out = {}
    for k, v in record.items():
        a = v.numpy()
        out[k] = a if a.flags.writeable else a.copy()
    return out


# ---------------------------------------------------------------- metrics and configs
def _flatten(d: Mapping[str, Any], sep: str, prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Join nested names with ``sep``; names may already contain ``sep`` (already flat), collisions are errors."""
    out = {} if out is None else out
    for k, v in d.items():
        if not isinstance(k, str) or not k:
            raise FedTextSegError(f"metric/config name {k!r} under '{prefix or '<top>'}' must be a non-empty string")
        key = f"{prefix}{sep}{k}" if prefix else k
        if isinstance(v, Mapping):
            _flatten(v, sep, key, out)
        elif key in out:
            raise FedTextSegError(f"metric/config name '{key}' is given twice (nested and flat)")
        else:
            out[key] = v
    return out


def _unflatten(flat: Mapping[str, Any], sep: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise FedTextSegError(f"cannot nest '{key}': '{p}' is both a value and a group")
        node[leaf] = v
    return out


def _number(key: str, v: Any) -> int | float:
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    raise FedTextSegError(f"metric '{key}' must be a number, got {type(v).__name__} {v!r}")


def metrics_to_record(metrics: Mapping[str, Any], sep: str = "/") -> MetricRecord:
    """Nested dict of numbers -> flat ``MetricRecord`` (``{"dice": {"liver": .9}}`` -> ``dice/liver``).

    bools become 0/1, numpy scalars python numbers, lists of numbers stay lists (all float if mixed). Anything else
    (strings, None) is refused, naming the key.
    """
    record = MetricRecord()
    for key, v in _flatten(metrics, sep).items():
        if isinstance(v, (list, tuple, np.ndarray)):
            items = [_number(key, x) for x in np.asarray(v).reshape(-1).tolist()]
            if any(isinstance(x, float) for x in items):
                items = [float(x) for x in items]
            record[key] = items
        else:
            record[key] = _number(key, v)
    return record


def record_to_metrics(record: MetricRecord, nested: bool = False, sep: str = "/") -> dict[str, Any]:
    """``MetricRecord`` -> flat dict (or nested by ``sep`` when ``nested``)."""
    flat = {k: (list(v) if isinstance(v, list) else v) for k, v in record.items()}
    return _unflatten(flat, sep) if nested else flat


def _config_value(key: str, v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (str, bytes)):
        return v
    if isinstance(v, (list, tuple)):
        items = [_config_value(key, x) for x in v]
        if len({type(x) for x in items}) > 1:
            if all(type(x) in (int, float) for x in items):
                return [float(x) for x in items]
            raise FedTextSegError(f"config '{key}': list mixes types {sorted({type(x).__name__ for x in items})}")
        return items
    try:
        return _number(key, v)
    except FedTextSegError:
        raise FedTextSegError(f"config '{key}' must be bool/int/float/str/bytes or a list of one of them, "
                              f"got {type(v).__name__} {v!r}") from None


def config_to_record(config: Mapping[str, Any], sep: str = ".") -> ConfigRecord:
    """Nested dict -> flat ``ConfigRecord`` (``{"optim": {"lr": 1e-3}}`` -> ``optim.lr``)."""
    return ConfigRecord({k: _config_value(k, v) for k, v in _flatten(config, sep).items()})


def record_to_config(record: ConfigRecord, nested: bool = False, sep: str = ".") -> dict[str, Any]:
    """``ConfigRecord`` -> flat dict (or nested by ``sep`` when ``nested``)."""
    flat = {k: (list(v) if isinstance(v, list) else v) for k, v in record.items()}
    return _unflatten(flat, sep) if nested else flat


def record_nbytes(obj: RecordDict | ArrayRecord | MetricRecord | ConfigRecord | Message) -> int:
    """Payload bytes of a record, a ``RecordDict`` or a message's content (Flower's ``count_bytes``)."""
    if isinstance(obj, Message):
        return 0 if obj.has_error() else record_nbytes(obj.content)
    if isinstance(obj, RecordDict):
        return sum(record_nbytes(r) for r in obj.values())
    if isinstance(obj, (ArrayRecord, MetricRecord, ConfigRecord)):
        return int(obj.count_bytes())
    raise FedTextSegError(f"cannot measure a {type(obj).__name__}")


# ---------------------------------------------------------------- per-class metrics with identical keys
def pack_site_metrics(per_class: Mapping[str, float], class_names: Sequence[str],
                      metric: str = "dice") -> dict[str, float]:
    """Per-class values for some classes -> ``{metric}/{c}`` and ``has/{c}`` for EVERY class of the vocabulary.

    Classes absent from ``per_class`` or with a non-finite value get value 0.0 and ``has`` 0.0, so every site
    sends the same keys whatever it labels. A class name not in ``class_names`` is an error.
    """
    unknown = [c for c in per_class if c not in class_names]
    if unknown:
        raise FedTextSegError(f"per-class metric(s) for class(es) not in the vocabulary: {unknown}")
    out: dict[str, float] = {}
    for c in class_names:
        v = per_class.get(c)
        ok = v is not None and math.isfinite(float(v))
        out[f"{metric}/{c}"] = float(v) if ok else 0.0
        out[f"{HAS_PREFIX}/{c}"] = 1.0 if ok else 0.0
    return out


def unpack_site_metrics(flat: Mapping[str, Any], class_names: Sequence[str],
                        metric: str = "dice") -> dict[str, float]:
    """Inverse of ``pack_site_metrics``: only the classes whose ``has/{c}`` flag is set."""
    out = {}
    for c in class_names:
        if float(flat.get(f"{HAS_PREFIX}/{c}", 0.0)) > 0.5:
            out[c] = float(flat[f"{metric}/{c}"])
    return out


def mean_site_metrics(packed: Sequence[Mapping[str, Any]], class_names: Sequence[str], metric: str = "dice",
                      weights: Sequence[float] | None = None) -> dict[str, float]:
    """Per-class (weighted) mean over the sites that scored each class; classes no site scored are omitted.

    Use this instead of Flower's default metric averaging, which would average the 0 placeholders in.
    """
    w = [1.0] * len(packed) if weights is None else [float(x) for x in weights]
    out = {}
    for c in class_names:
        pairs = [(wi, v[c]) for wi, m in zip(w, packed) if c in (v := unpack_site_metrics(m, [c], metric))]
        total = sum(wi for wi, _ in pairs)
        if pairs and total > 0:
            out[c] = sum(wi * x for wi, x in pairs) / total
    return out


# ---------------------------------------------------------------- site replies
def site_reply_content(arrays: Mapping[str, Any], num_examples: int, annotated: Sequence[bool] | np.ndarray,
                       metrics: Mapping[str, Any] | None = None) -> RecordDict:
    """A client's train reply: every wire array + ``meta.annotated``, metrics with ``num-examples``."""
    if ANNOTATED_KEY in arrays:
        raise FedTextSegError(f"'{ANNOTATED_KEY}' is reserved for the annotated-class mask")
    record = arrays_to_record(arrays)
    record[ANNOTATED_KEY] = Array(np.asarray(annotated, dtype=bool).reshape(-1))
    mrec = metrics_to_record(dict(metrics or {}))
    if NUM_EXAMPLES_KEY in mrec:
        raise FedTextSegError(f"metric '{NUM_EXAMPLES_KEY}' is reserved; pass num_examples instead")
    mrec[NUM_EXAMPLES_KEY] = int(num_examples)
    return RecordDict({ARRAYS_KEY: record, METRICS_KEY: mrec})


def content_to_site_update(content: RecordDict, node: Any) -> SiteUpdate:
    """Inverse of ``site_reply_content`` on the server: a ``SiteUpdate`` (errors name the node)."""
    if ARRAYS_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
        raise FedTextSegError(f"site '{node}': reply lacks the '{ARRAYS_KEY}' or '{METRICS_KEY}' record")
    arrays = record_to_arrays(content.array_records[ARRAYS_KEY])
    if ANNOTATED_KEY not in arrays:
        raise FedTextSegError(f"site '{node}': reply lacks the annotated-class mask '{ANNOTATED_KEY}'")
    annotated = arrays.pop(ANNOTATED_KEY).astype(bool)
    metrics = record_to_metrics(content.metric_records[METRICS_KEY])
    if NUM_EXAMPLES_KEY not in metrics:
        raise FedTextSegError(f"site '{node}': reply lacks metric '{NUM_EXAMPLES_KEY}'")
    n = metrics.pop(NUM_EXAMPLES_KEY)
    if isinstance(n, bool) or not isinstance(n, int):
        raise FedTextSegError(f"site '{node}': metric '{NUM_EXAMPLES_KEY}' must be an integer, got {n!r}")
    site = content.config_records.get(SITE_KEY)
    identity = {k: str(site[k]) for k in IDENTITY_KEYS if k in site} if site is not None else {}
    return SiteUpdate(node=str(node), arrays=arrays, num_examples=n, annotated=annotated, metrics=metrics,
                      identity=identity)


# ---------------------------------------------------------------- frozen bundle on the wire
def attach_frozen(content: RecordDict, content_hash: str, bundle: FrozenBundle | None) -> RecordDict:
    """Announce the frozen ``content_hash`` in a server message; include the arrays only when ``bundle`` is given
    (i.e. when ``FrozenDistributor.payload_for`` returned it)."""
    info: dict[str, Any] = {"hash": content_hash}
    if bundle is not None:
        if bundle.content_hash != content_hash:
            raise FedTextSegError("attach_frozen: bundle does not have the announced hash")
        content[FROZEN_ARRAYS_KEY] = arrays_to_record(bundle.arrays)
        info["meta"] = json.dumps(bundle.meta)
    content[FROZEN_INFO_KEY] = ConfigRecord(info)
    return content


def announced_frozen_hash(content: RecordDict) -> str | None:
    """The content hash of the frozen bundle a message announces (None: it announces none)."""
    if FROZEN_INFO_KEY not in content.config_records:
        return None
    return str(content.config_records[FROZEN_INFO_KEY]["hash"])


def receive_frozen(content: RecordDict, cache: FrozenCache | None = None) -> FrozenBundle | None:
    """Client side: the announced frozen bundle, from the message (verified, then cached) or from ``cache``.

    Returns None when the message announces no bundle. Raises :class:`MissingFrozenError` when the bundle is
    announced but neither sent nor cached; reply with ``missing_frozen_error`` then.
    """
    h = announced_frozen_hash(content)
    if h is None:
        return None
    info = content.config_records[FROZEN_INFO_KEY]
    if FROZEN_ARRAYS_KEY in content.array_records:
        meta = json.loads(str(info.get("meta", "{}")))
        bundle = FrozenBundle(record_to_arrays(content.array_records[FROZEN_ARRAYS_KEY]), meta)
        bundle.verify(h, source="frozen bundle received from the server")
        if cache is not None:
            cache.put(bundle)
        return bundle
    bundle = cache.get(h) if cache is not None else None
    if bundle is None:
        raise MissingFrozenError(h)
    return bundle


def missing_frozen_error(content_hash: str) -> Error:
    """The ``Error`` a client replies with when it lacks the announced frozen bundle (its own code)."""
    return Error(code=wire.MISSING_FROZEN_CODE, reason=f"{wire.MISSING_FROZEN}: {content_hash}")


def is_missing_frozen(reply: Message) -> bool:
    """Whether a reply says the node lacks the frozen bundle (then ``FrozenDistributor.mark_missing``)."""
    return reply.has_error() and int(reply.error.code) == wire.MISSING_FROZEN_CODE


# ---------------------------------------------------------------- evaluation replies
EVAL_METRICS = wire.EVAL_METRICS


def eval_reply_content(summary: Mapping[str, Mapping[str, float]], class_names: Sequence[str],
                       num_examples: int) -> RecordDict:
    """A client's evaluate reply: one MetricRecord per metric (``eval.dice`` ...), each with a value and a ``has/``
    flag for EVERY vocabulary class, plus ``metrics`` with ``num-examples``: identical keys at every site."""
    content = RecordDict({METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: int(num_examples)})})
    for metric in EVAL_METRICS:
        per_class = {c: v[metric] for c, v in summary.items() if metric in v}
        content[wire.eval_record(metric)] = metrics_to_record(pack_site_metrics(per_class, class_names, metric=metric))
    return content


def eval_reply_summary(content: RecordDict, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Inverse of ``eval_reply_content``: ``{class: {metric: value}}`` for the classes the site scored."""
    out: dict[str, dict[str, float]] = {}
    for metric in EVAL_METRICS:
        key = wire.eval_record(metric)
        if key not in content.metric_records:
            continue
        flat = record_to_metrics(content.metric_records[key])
        for c, v in unpack_site_metrics(flat, class_names, metric=metric).items():
            out.setdefault(c, {})[metric] = v
    return out


# ---------------------------------------------------------------- the round's messages over Flower
def send_and_receive(grid, messages: Sequence[Message], *, timeout: float | None, first_poll: float = 0.02,
                     max_poll: float = 0.2) -> list[Message]:
    """Push ``messages`` and pull their replies until all have come or ``timeout`` seconds have passed.

    Flower's own ``Grid.send_and_receive`` over a SuperLink (``HttpGrid``: the ServerApp of a deployment with
    SuperNodes) sleeps 3 s between pulls, so every train and evaluate exchange waits 1.5 s on average after its
    last reply, 3 s a round (the simulation's in-memory grid pulls every 0.1 s). Here the interval starts at
    ``first_poll``, grows by half each empty pull up to ``max_poll`` and restarts when a reply comes: a round's last
    reply waits at most ``max_poll`` (0.2 s; at most five small pull requests a second while a round trains)."""
    msg_ids = set(grid.push_messages(messages))
    end = time.monotonic() + timeout if timeout is not None else math.inf
    replies: list[Message] = []
    interval = first_poll
    while msg_ids:
        got = list(grid.pull_messages(msg_ids))
        replies.extend(got)
        msg_ids.difference_update(m.metadata.reply_to_message_id for m in got)
        if not msg_ids or time.monotonic() >= end:
            break
        time.sleep(min(interval, max(0.0, end - time.monotonic())))
        interval = first_poll if got else min(max_poll, interval * 1.5)
    return replies


class FlowerTransport:
    """The round protocol's transport over Flower's Grid (:mod:`fedtextseg.federation.rounds`): one train and one
    evaluate message per node, each with the global arrays, the round config and (to nodes that lack them) the
    frozen parts. Replies become :class:`SiteUpdate` objects; an error reply, a malformed reply or no reply within
    the round's timeout is that site's failure; a node that lacks the frozen parts gets them resent next time."""

    def __init__(self, grid):
        self.grid = grid
        self.names: dict[int, str] = {}  # node id -> site name, learned from replies (failures name the site)

    def _name(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    def _site_name(self, reply: Message) -> str:
        if reply.has_content() and SITE_KEY in reply.content.config_records:
            name = self.names[reply.metadata.src_node_id] = str(reply.content.config_records[SITE_KEY]["name"])
            return name
        return self._name(reply.metadata.src_node_id)

    def messages(self, coord, round_: int, message_type: str) -> tuple[list[Message], dict[int, int]]:
        """One message per node of the grid, and its size in bytes."""
        messages, sizes = [], {}
        for node in sorted(self.grid.get_node_ids()):
            content = RecordDict({ARRAYS_KEY: arrays_to_record(coord.global_arrays),
                                  CONFIG_KEY: config_to_record(coord.round_config(round_))})
            attach_frozen(content, coord.frozen.content_hash, coord.frozen_payload(node))
            sizes[node] = record_nbytes(content)
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages, sizes

    def _error(self, coord, reply: Message) -> str:
        if is_missing_frozen(reply):
            coord.distributor.mark_missing(reply.metadata.src_node_id)
        return str(reply.error.reason)

    def train(self, coord, round_: int, timeout: float):
        from flwr.app import MessageType

        from fedtextseg.federation.rounds import TrainRound

        messages, sent = self.messages(coord, round_, MessageType.TRAIN)
        replies = send_and_receive(self.grid, messages, timeout=timeout)
        out = TrainRound(bytes_sent={}, bytes_received={})
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                out.failures[self._name(node)] = self._error(coord, reply)
                continue
            site = self._site_name(reply)
            try:
                out.updates.append(content_to_site_update(reply.content, site))
            except Exception as exc:  # a malformed reply excludes that site, not the round
                out.failures[site] = str(exc)
                continue
            out.bytes_sent[site], out.bytes_received[site] = sent[node], record_nbytes(reply.content)
        answered = {reply.metadata.src_node_id for reply in replies}
        for node in sorted({m.metadata.dst_node_id for m in messages} - answered):  # crashed, hung or offline
            out.failures[self._name(node)] = f"no reply within {timeout:.0f}s (federation.round_timeout)"
        return out

    def evaluate(self, coord, round_: int, timeout: float):
        from flwr.app import MessageType

        from fedtextseg.federation.rounds import EvalReply

        messages, _ = self.messages(coord, round_, MessageType.EVALUATE)
        out = []
        for reply in send_and_receive(self.grid, messages, timeout=timeout):
            if reply.has_error():
                out.append(EvalReply(self._name(reply.metadata.src_node_id), failure=self._error(coord, reply)))
            else:
                out.append(EvalReply(self._site_name(reply),
                                     summary=eval_reply_summary(reply.content, coord.bank.class_names)))
        return out
