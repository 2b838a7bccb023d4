"""What a model was built from, so the server refuses an update from a site whose model is not the run's.

A site's train reply carries its model identity (in Flower, in the reply's ``site`` ConfigRecord; the message audit
allows exactly these keys):

- ``model``: the model's registered name (``cdpdnet_tiny``);
- ``model-arch``: a hash over every parameter/buffer name, dtype and shape of the model (frozen and local parts
  included), i.e. the architecture the config built;
- ``frozen-hash``: the content hash of the frozen common arrays the model really holds (pretrained weights + text
  bank, as in :func:`fedtextseg.federation.frozen.content_hash`);
- ``bank-hash``: the content hash of the text-embedding bank arrays alone (``none`` for models without a bank:
  Flower's ConfigRecord cannot size an empty string);
- ``fedtextseg-version``: the library version the site runs.

The server computes the same for its own model and excludes, for that round, an update whose identity differs in
any key it carries (:func:`identity_problems`, called by ``screen_updates``), with a reason saying what to change.
A reply without identity keys (the in-process runner's tests, SecAgg+ rounds) is judged by its arrays alone: this
is a consistency check against misconfigured or stale sites, not authentication.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from fedtextseg import wire
from fedtextseg.federation.frozen import content_hash

__all__ = ["IDENTITY_KEYS", "model_identity", "identity_problems"]

IDENTITY_KEYS = wire.IDENTITY_KEYS
_BANK_SUFFIXES = ("class_embeddings", "task_embeddings")

_WHAT = {
    "model": ("model", "run the model the run uses (model=... in the run config)"),
    "model-arch": ("model architecture", "use the run's model config (no site-side model overrides)"),
    wire.IDENTITY_FROZEN_HASH: ("frozen bundle (pretrained weights + text bank)",
                    "clear the site's frozen cache so it receives the run's bundle again"),
    "bank-hash": ("text-embedding bank", "use the run's embedding bank (text.bank=...)"),
    "fedtextseg-version": ("fedtextseg version", "install the server's fedtextseg version at the site"),
}


def model_identity(model_name: str, model: Any) -> dict[str, str]:
    """The identity of ``model`` (a torch module with ``param_groups()``), as strings for a ConfigRecord."""
    from fedtextseg import __version__

    state = model.state_dict()
    layout = [[k, str(v.dtype), list(v.shape)] for k, v in state.items()]
    frozen_keys = list(model.param_groups().frozen_common)
    frozen = {k: state[k].detach().cpu().numpy() for k in frozen_keys}
    bank = {k: a for k, a in frozen.items() if k.endswith(_BANK_SUFFIXES)}
    return {
        "model": str(model_name),
        "model-arch": hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16],
        wire.IDENTITY_FROZEN_HASH: content_hash(frozen),
        "bank-hash": content_hash(bank) if bank else "none",
        "fedtextseg-version": str(__version__),
    }


def identity_problems(update: Any, expected: Mapping[str, str]) -> list[str]:
    """Why ``update`` (a ``SiteUpdate``) was not built like the run's model (empty: it was, or says nothing)."""
    got = getattr(update, "identity", None) or {}
    problems = []
    for key in IDENTITY_KEYS:
        if key in got and key in expected and str(got[key]) != str(expected[key]):
            what, fix = _WHAT[key]
            problems.append(f"site '{update.node}': {what} {str(got[key])[:16]!r} differs from the run's "
                            f"{str(expected[key])[:16]!r}; {fix}")
    return problems
