"""The federation core: pure, model-agnostic, Flower-free.

- ``aggregation``: ``SiteUpdate``, group-wise ``aggregate`` (FedAvg / equal weights / median / trimmed mean;
  class-aware per-class rows), ``validate_update`` / ``screen_updates``, ``class_coverage``.
- ``server_opt``: server optimisers on the pseudo-gradient (fedavg, fedavgm, fedadagrad, fedadam, fedyogi).
- ``frozen``: hash-once transfer of frozen common arrays (``FrozenBundle``, ``FrozenDistributor``, ``FrozenCache``).
- ``checkpoint``: atomic round checkpoints with RNG states (``save_checkpoint``, ``load_latest``).

Flower records are handled only by ``fedtextseg.flower_adapter``.
"""

from fedtextseg.federation.aggregation import (
    Groups,
    SiteUpdate,
    aggregate,
    as_groups,
    class_coverage,
    infer_num_classes,
    screen_updates,
    validate_update,
)
from fedtextseg.federation.checkpoint import (
    Checkpoint,
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    restore_rng_state,
    save_checkpoint,
)
from fedtextseg.federation.frozen import (MISSING_FROZEN, FrozenBundle, FrozenCache, FrozenDistributor,
                                         MissingFrozenError, content_hash)
from fedtextseg.federation.server_opt import OPTIMIZERS, ServerOptimizer, make_server_optimizer

__all__ = [
    "MISSING_FROZEN", "MissingFrozenError", "OPTIMIZERS", "Checkpoint", "FrozenBundle", "FrozenCache", "FrozenDistributor", "Groups",
    "ServerOptimizer", "SiteUpdate", "aggregate", "as_groups", "capture_rng_state", "class_coverage",
    "content_hash", "infer_num_classes", "list_checkpoints", "load_checkpoint", "load_latest",
    "make_server_optimizer", "restore_rng_state", "save_checkpoint", "screen_updates", "validate_update",
]
