"""What a site keeps on its own disk between messages (in deployment every Flower message runs in a fresh ClientApp
process): its ``local`` arrays (personalisation that never leaves it, e.g. ``local_norms``) and the frozen common
parts it was sent.

One file per run name and site under ``$FEDTEXTSEG_CACHE/site-state/``, written atomically, tagged with the Flower
run id: a later run that reuses the name starts fresh unless it resumes that run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedtextseg.data.dataset import default_cache_root
from fedtextseg.federation.frozen import FrozenCache

if TYPE_CHECKING:
    from fedtextseg.runtime import SiteRunner

__all__ = ["local_state_file", "save_local_state", "load_local_state", "site_frozen_cache"]

_RUN_ID = "__run_id__"


def site_frozen_cache(cfg) -> FrozenCache:
    """Where a site keeps the frozen common parts it was sent (``federation.frozen_cache``, else
    ``$FEDTEXTSEG_CACHE/frozen``), so they cross the wire once per site, not once per message."""
    return FrozenCache(cfg.federation.frozen_cache or str(default_cache_root() / "frozen"))


def local_state_file(runner: SiteRunner, run_name: str) -> Path | None:
    """Where ``runner``'s local arrays live for run ``run_name``; None when its model has no local group."""
    if not runner.model.param_groups().local:
        return None
    safe = [re.sub(r"[^\w.-]+", "_", name) for name in (run_name, runner.site.name)]
    return default_cache_root() / "site-state" / safe[0] / f"{safe[1]}.npz"


def save_local_state(runner: SiteRunner, run_name: str, run_id: object) -> Path | None:
    """Write the local arrays (temporary file + rename); returns the file, None when there is nothing local."""
    path = local_state_file(runner, run_name)
    if path is None:
        return None
    state = runner.model.state_dict()
    arrays = {k: state[k].detach().cpu().numpy() for k in runner.model.param_groups().local}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{_RUN_ID: np.array(str(run_id))}, **arrays)
    os.replace(tmp, path)
    return path


def load_local_state(runner: SiteRunner, run_name: str, run_id: object, resume: bool = False) -> bool:
    """Restore the saved local arrays of this Flower run, or of the run being resumed (same run name); returns
    whether anything was loaded."""
    path = local_state_file(runner, run_name)
    if path is None or not path.is_file():
        return False
    with np.load(path) as saved:
        if str(saved[_RUN_ID]) != str(run_id) and not resume:
            return False  # an earlier run that reused the name: start fresh
        arrays = {k: saved[k] for k in saved.files if k != _RUN_ID}
    runner.load_global(arrays)  # merges any named arrays into the model
    return True
