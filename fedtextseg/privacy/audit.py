"""The message audit: every reply a ClientApp sends is checked against an allow-list before it leaves the site.

What a site may send (anything else is a violation: the reply is not sent, the violation is logged and raised):

* **train reply** - one ArrayRecord ``arrays`` whose keys are exactly the arrays the server sent this round (the
  model's shared + per-class parameters, which the site has just loaded into its model, so they are model-shaped)
  with the same shapes and dtypes, plus ``meta.annotated`` (a 1-D bool mask over the vocabulary); one MetricRecord
  ``metrics`` with ``num-examples`` (a non-negative int) and scalar metrics named ``train_*``, ``round_seconds`` or
  ``privacy/*``; one ConfigRecord ``site`` with the site's ``name`` and ``task`` and its model identity (short
  strings: model name, architecture/frozen/bank hashes, library version; ``fedtextseg.federation.identity``);
* **evaluate reply** - MetricRecords ``metrics`` (``num-examples``) and ``eval.dice``, ``eval.dice_pooled``,
  ``eval.hd95`` whose keys are ``<metric>/<class>`` or ``has/<class>`` scalars; a ConfigRecord ``site`` (``name``);
  no arrays;
* **SecAgg+ stages** (only with ``privacy.secure_aggregation=secaggplus``) - Flower's ``secaggplus_configs``
  ConfigRecord (public keys, encrypted key shares, masked integer vectors, Shamir shares) and the legacy
  ``fitres.*`` records the protocol carries: ``fitres.metrics``/``fitres.num_examples`` with the same metric rules,
  an emptied ``fitres.parameters`` (the arrays travel only masked);
* **query reply** (SecAgg+ round preparation) - a ConfigRecord ``site`` with ``name``, ``task``, ``annotated``
  (class names) and ``train-volumes`` (the sample count);
* **error replies** (e.g. ``missing-frozen: <hash>``) - Flower's ``Error`` with a code and a reason.

Metric values must be scalars (no lists: a list of numbers could carry anything). The audit does not import Flower:
it reads the records through the attributes Flower's ``RecordDict``/``Array`` have.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping

from fedtextseg import wire
from fedtextseg.errors import FedTextSegError
from fedtextseg.federation.identity import IDENTITY_KEYS

__all__ = ["AuditViolation", "audit_reply", "message_audit_mod", "TRAIN_METRIC_PREFIXES", "EVAL_RECORDS"]

log = logging.getLogger("fedtextseg.audit")

ANNOTATED_KEY = wire.ANNOTATED
NUM_EXAMPLES = wire.NUM_EXAMPLES
TRAIN_METRIC_PREFIXES = ("train_", "privacy/")
TRAIN_METRIC_NAMES = ("round_seconds",)
EVAL_RECORDS = {wire.eval_record(m): m for m in wire.EVAL_METRICS}
SECAGG_RECORD = wire.SECAGG_RECORD
MAX_NAME = 200


class AuditViolation(FedTextSegError):
    """A reply that does not match the allow-list; nothing of it was sent."""


def _records(content: Any, kind: str) -> Mapping[str, Any]:
    return getattr(content, kind, {}) or {}


def _scalar_metrics(name: str, record: Mapping[str, Any], allowed: Callable[[str], bool], problems: list[str]) -> None:
    for key, value in record.items():
        if not allowed(key):
            problems.append(f"metric record '{name}': key '{key}' is not on the allow-list")
        elif isinstance(value, (list, tuple)):
            problems.append(f"metric record '{name}': '{key}' is a list; only scalars may leave a site")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"metric record '{name}': '{key}' is not a number")
    if NUM_EXAMPLES in record:
        n = record[NUM_EXAMPLES]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            problems.append(f"metric record '{name}': '{NUM_EXAMPLES}' must be a non-negative int, got {n!r}")


def _train_metric_ok(key: str) -> bool:
    return key == NUM_EXAMPLES or key in TRAIN_METRIC_NAMES or key.startswith(TRAIN_METRIC_PREFIXES)


def _site_config(record: Mapping[str, Any], allowed: Iterable[str], problems: list[str]) -> None:
    allowed = set(allowed)
    for key, value in record.items():
        if key not in allowed:
            problems.append(f"config record 'site': key '{key}' is not on the allow-list "
                            f"({', '.join(sorted(allowed))})")
        elif key == "annotated":  # class names (vocabulary words), as in site.yaml
            if not isinstance(value, list) or not all(isinstance(v, str) and len(v) <= MAX_NAME for v in value):
                problems.append("config record 'site': 'annotated' must be a list of class names")
        elif key == wire.TRAIN_VOLUMES:  # the site's sample count, as num-examples
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append("config record 'site': 'train-volumes' must be a non-negative int")
        elif not isinstance(value, str) or len(value) > MAX_NAME:
            problems.append(f"config record 'site': '{key}' must be a short string")


def _audit_query(content: Any, problems: list[str]) -> None:
    """SecAgg+ round preparation: the site's name, task, annotated classes and training-volume count only."""
    for kind in ("array_records", "metric_records"):
        for name in _records(content, kind):
            problems.append(f"a query reply carries no {kind.split('_')[0]}s, got record '{name}'")
    for name, record in _records(content, "config_records").items():
        if name == wire.SITE:
            _site_config(record, ("name", "task", "annotated", wire.TRAIN_VOLUMES), problems)
        else:
            problems.append(f"config record '{name}' is not on the allow-list of a query reply")


def _expected_arrays(incoming: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    records = _records(getattr(incoming, "content", None), "array_records")
    if wire.ARRAYS not in records:
        return {}
    return {k: (tuple(int(s) for s in a.shape), str(a.dtype)) for k, a in records[wire.ARRAYS].items()}


def _audit_train(content: Any, incoming: Any, problems: list[str]) -> None:
    arrays, metrics, configs = (_records(content, k) for k in ("array_records", "metric_records", "config_records"))
    secagg = SECAGG_RECORD in configs
    allowed_arrays = {wire.LEGACY_REPLY_PARAMS} if secagg else {wire.ARRAYS}
    allowed_metrics = {wire.LEGACY_METRICS, wire.LEGACY_NUM_EXAMPLES} if secagg else {wire.METRICS}
    allowed_configs = {wire.SITE, SECAGG_RECORD, wire.LEGACY_STATUS, wire.LEGACY_METRICS} if secagg else {wire.SITE}
    for kind, got, allowed in (("array", arrays, allowed_arrays), ("metric", metrics, allowed_metrics),
                               ("config", configs, allowed_configs)):
        for name in got:
            if name not in allowed:
                problems.append(f"{kind} record '{name}' is not on the allow-list of a train reply")
    if secagg:
        for name, record in arrays.items():
            if len(record):
                problems.append(f"SecAgg+ reply: array record '{name}' must be empty (arrays travel only masked)")
        legacy = [(n, r) for n, r in configs.items() if n == wire.LEGACY_METRICS]  # legacy metrics: a ConfigRecord
        for name, record in list(metrics.items()) + legacy:
            _scalar_metrics(name, record, lambda k: k == "num_examples" or _train_metric_ok(k), problems)
        status = configs.get(wire.LEGACY_STATUS, {})
        for key, value in status.items():
            if key not in ("code", "message") or (isinstance(value, str) and len(value) > MAX_NAME):
                problems.append(f"config record 'fitres.status': '{key}' is not on the allow-list")
    elif wire.ARRAYS in arrays:
        expected = _expected_arrays(incoming)
        sent = {k: (tuple(int(s) for s in a.shape), str(a.dtype)) for k, a in arrays[wire.ARRAYS].items()}
        extra = sorted(set(sent) - set(expected) - {ANNOTATED_KEY})
        missing = sorted(set(expected) - set(sent))
        if extra:
            problems.append(f"array(s) {extra[:5]} were not sent by the server this round (only the model's shared + "
                            "per-class arrays may go back)")
        if missing:
            problems.append(f"array(s) {missing[:5]} of the round are missing from the reply")
        for k in sorted(set(sent) & set(expected)):
            if sent[k] != expected[k]:
                problems.append(f"array '{k}' is {sent[k][0]} {sent[k][1]}, the server sent {expected[k][0]} "
                                f"{expected[k][1]}")
        mask = sent.get(ANNOTATED_KEY)
        if mask is None:
            problems.append(f"train reply lacks '{ANNOTATED_KEY}'")
        elif len(mask[0]) != 1 or mask[1] != "bool":
            problems.append(f"'{ANNOTATED_KEY}' must be a 1-D bool mask, got {mask[0]} {mask[1]}")
    for name, record in metrics.items() if not secagg else ():
        _scalar_metrics(name, record, _train_metric_ok, problems)
        if NUM_EXAMPLES not in record:
            problems.append(f"metric record '{name}' lacks '{NUM_EXAMPLES}'")
    if wire.SITE in configs:  # name, task and the model identity (fedtextseg.federation.identity)
        _site_config(configs[wire.SITE], ("name", "task", *IDENTITY_KEYS), problems)


def _audit_evaluate(content: Any, problems: list[str]) -> None:
    arrays, metrics, configs = (_records(content, k) for k in ("array_records", "metric_records", "config_records"))
    for name in arrays:
        problems.append(f"an evaluate reply carries no arrays, got array record '{name}'")
    for name, record in metrics.items():
        if name == wire.METRICS:
            _scalar_metrics(name, record, lambda k: k == NUM_EXAMPLES, problems)
        elif name in EVAL_RECORDS:
            metric = EVAL_RECORDS[name]
            _scalar_metrics(name, record, lambda k, m=metric: k.startswith((f"{m}/", f"{wire.HAS_PREFIX}/")), problems)
        else:
            problems.append(f"metric record '{name}' is not on the allow-list of an evaluate reply")
    for name, record in configs.items():
        if name == wire.SITE:
            _site_config(record, ("name",), problems)
        else:
            problems.append(f"config record '{name}' is not on the allow-list of an evaluate reply")


def audit_reply(reply: Any, incoming: Any) -> list[str]:
    """Problems of a reply (empty: it may be sent). ``incoming`` is the message it answers."""
    if reply.has_error():
        reason = str(getattr(reply.error, "reason", "") or "")
        return [f"error reason is {len(reason)} characters long"] if len(reason) > 2000 else []
    kind = str(incoming.metadata.message_type)
    problems: list[str] = []
    if kind.startswith("train"):
        _audit_train(reply.content, incoming, problems)
    elif kind.startswith("evaluate"):
        _audit_evaluate(reply.content, problems)
    elif kind.startswith("query"):
        _audit_query(reply.content, problems)
    else:
        problems.append(f"no reply of message type '{kind}' is on the allow-list")
    return problems


def message_audit_mod(msg: Any, context: Any, call_next: Callable) -> Any:
    """Flower client mod: run the handler, audit its reply, send it only if it passes."""
    reply = call_next(msg, context)
    problems = audit_reply(reply, msg)
    if problems:
        text = "; ".join(problems)
        log.error("message audit: reply to a %s message NOT sent: %s", msg.metadata.message_type, text)
        raise AuditViolation(f"message audit refused the reply ({len(problems)} problem(s)): {text}")
    return reply
