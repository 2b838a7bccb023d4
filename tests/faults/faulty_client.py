"""A ClientApp variant for the fault simulation: the real ``client.app`` handlers and mods, plus an outer fault mod.

``test_flower_faults.py`` copies this file into a temporary copy of the Flower app as ``client/faulty.py`` and
points the app's ``clientapp`` component at it; nothing of it is in the product. Faults, by (partition, round):

- partition 1, round 1: crashes in the middle of local training (one real optimizer step, then an exception);
- partition 2, round 2: hangs for ``HANG_SECONDS`` (past the run's ``federation.round_timeout``), then trains;
- partition 0, round 3: a hostile site: its reply's arrays are pushed 1e6 times further from the global model,
  after the site's own message audit (a hostile node would not run it).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.clientapp import ClientApp

from client.app import evaluate, query, train  # the real handlers
from client.secure import secure_aggregation_mod
from fedtextseg import engine
from fedtextseg.privacy.audit import message_audit_mod

HANG_SECONDS = 30.0


def _crashing_train_steps(real):
    def train_steps(model, loader, **kw):
        real(model, loader, **{**kw, "steps": 1})
        raise RuntimeError("injected fault: node rebooted during local training")

    return train_steps


def fault_mod(msg: Message, context, call_next) -> Message:
    if not str(msg.metadata.message_type).startswith("train"):
        return call_next(msg, context)
    where = (int(context.node_config.get("partition-id", -1)), int(msg.content.config_records["config"]["round"]))
    if where == (1, 1):
        real = engine.train_steps
        engine.train_steps = _crashing_train_steps(real)
        try:
            return call_next(msg, context)
        finally:
            engine.train_steps = real
    if where == (2, 2):
        time.sleep(HANG_SECONDS)
    reply = call_next(msg, context)
    if where == (0, 3) and not reply.has_error():
        sent = msg.content.array_records["arrays"]
        arrays = ArrayRecord()
        for k, a in reply.content.array_records["arrays"].items():
            x = a.numpy()
            arrays[k] = Array(x if k not in sent or x.dtype.kind != "f" else
                              (sent[k].numpy() + 1e6 * (x - sent[k].numpy())).astype(x.dtype))
        reply.content["arrays"] = arrays
    return reply


app = ClientApp(mods=[fault_mod, message_audit_mod, secure_aggregation_mod])
app.train()(train)
app.evaluate()(evaluate)
app.query()(query)
np.seterr(over="ignore")
