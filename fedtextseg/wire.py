"""Every name that crosses the wire between the server and the sites, defined once.

The Flower adapter (:mod:`fedtextseg.flower_adapter`), the server and client apps, the SecAgg+ glue and the message
audit (:mod:`fedtextseg.privacy.audit`) all spell the records and keys of a message through these constants; what
each message holds is described in those modules. Nothing here imports Flower.
"""

from __future__ import annotations

__all__ = [
    "ARRAYS", "METRICS", "CONFIG", "NUM_EXAMPLES", "ANNOTATED", "HAS_PREFIX", "FROZEN_ARRAYS", "FROZEN_INFO", "SITE",
    "EVAL_METRICS", "EVAL_PREFIX", "eval_record", "ROUND", "TOTAL_ROUNDS", "PROX_MU", "RUN_KEY", "SECURE_FLAG",
    "IDENTITY_KEYS", "IDENTITY_FROZEN_HASH",
    "SECURE_PREPARE", "SECURE_TRAIN", "FROZEN_HASH", "CLIPPING_RANGE", "WEIGHTING", "WIRE_GROUPS", "TRAIN_VOLUMES",
    "SECAGG_RECORD", "LEGACY_PARAMS", "LEGACY_REPLY_PARAMS", "LEGACY_METRICS", "LEGACY_NUM_EXAMPLES", "LEGACY_STATUS",
    "MISSING_FROZEN", "MISSING_FROZEN_CODE",
]

# ---------------------------------------------------------------- records of a message (RecordDict keys)
ARRAYS = "arrays"  # ArrayRecord: the global (server -> site) or local (site -> server) wire arrays
METRICS = "metrics"  # MetricRecord of a reply, with NUM_EXAMPLES
CONFIG = "config"  # ConfigRecord of a server message: the round config below
SITE = "site"  # ConfigRecord of a reply: the site's name, task, annotated classes and model identity
FROZEN_ARRAYS = "frozen"  # ArrayRecord: the frozen common parts, sent once per node
FROZEN_INFO = "frozen-info"  # ConfigRecord: the frozen bundle's hash (and, with the arrays, its meta)
EVAL_PREFIX = "eval."  # MetricRecords of an evaluate reply: eval.dice, eval.dice_pooled, eval.hd95
EVAL_METRICS = ("dice", "dice_pooled", "hd95")

# ---------------------------------------------------------------- keys inside records
NUM_EXAMPLES = "num-examples"  # a reply's sample count (training volumes): the FedAvg weight
ANNOTATED = "meta.annotated"  # array of a train reply: the classes the site annotates (1-D bool mask)
HAS_PREFIX = "has"  # has/<class>: whether a per-class metric of a reply is a value or a placeholder
ROUND, TOTAL_ROUNDS, PROX_MU, RUN_KEY = "round", "total-rounds", "prox-mu", "run-key"  # the round config
# keys of a train reply's SITE record naming the model it trained (fedtextseg.federation.identity)
IDENTITY_FROZEN_HASH = "frozen-hash"
IDENTITY_KEYS = ("model", "model-arch", IDENTITY_FROZEN_HASH, "bank-hash", "fedtextseg-version")

# ---------------------------------------------------------------- SecAgg+ rounds
SECURE_FLAG = "secure-aggregation"  # round-config key: "prepare" (query) or "secaggplus" (the legacy fit config)
SECURE_PREPARE, SECURE_TRAIN = "prepare", "secaggplus"
FROZEN_HASH, CLIPPING_RANGE, WEIGHTING, WIRE_GROUPS = "frozen-hash", "clipping-range", "weighting", "wire-groups"
TRAIN_VOLUMES = "train-volumes"  # the prepare reply's sample count (SecAgg+'s max_weight)
SECAGG_RECORD = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants.RECORD_KEY_CONFIGS
LEGACY_PARAMS = "fitins.parameters"  # Flower's legacy records the SecAgg+ workflow speaks
LEGACY_REPLY_PARAMS = "fitres.parameters"  # emptied by secaggplus_mod: the arrays travel only masked
LEGACY_METRICS, LEGACY_NUM_EXAMPLES, LEGACY_STATUS = "fitres.metrics", "fitres.num_examples", "fitres.status"

# ---------------------------------------------------------------- error replies
MISSING_FROZEN = "missing-frozen"  # reason prefix of the reply of a site that lacks the announced frozen bundle
MISSING_FROZEN_CODE = 4601  # its Error code (outside Flower's own codes), what the server checks


def eval_record(metric: str) -> str:
    """The MetricRecord name of one evaluation metric (``eval.dice``)."""
    return f"{EVAL_PREFIX}{metric}"
