"""Hash-once transfer of the frozen common parts (pretrained DINOv2 weights, the text-embedding bank).

- ``FrozenBundle``: the frozen arrays plus JSON-able ``meta`` (provenance), identified by ``content_hash`` =
  sha256 over the sorted keys with each array's dtype, shape and bytes. ``meta`` is not part of the hash: two
  bundles with the same arrays are the same content whatever their description.
- ``FrozenDistributor`` (server): remembers which node holds which hash, hands out the bundle only to nodes that
  do not hold the current one (marked as held when handed out), and resends to a node reported as having lost
  it (e.g. it replied "missing-frozen"). Its state can be checkpointed.
- ``FrozenCache`` (client): bundles on disk by hash, so a SuperNode whose ClientApp process is restarted for
  every message (deployment mode) still has them. A corrupt cached file is removed and reported as missing, so
  the client asks for the bundle again rather than failing for ever.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedtextseg.errors import FedTextSegError
from fedtextseg.federation.checkpoint import byte_view, c_order, read_archive, write_archive
from fedtextseg.wire import MISSING_FROZEN

log = logging.getLogger(__name__)

class MissingFrozenError(FedTextSegError):
    """A site was told the frozen bundle ``content_hash`` but has neither received nor cached it; it answers with
    :func:`fedtextseg.flower_adapter.missing_frozen_error` and the server resends the bundle
    (:meth:`FrozenDistributor.mark_missing`)."""

    def __init__(self, content_hash: str):
        self.content_hash = str(content_hash)
        super().__init__(f"{MISSING_FROZEN}: frozen bundle {content_hash} was not sent and is not in the local cache")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def content_hash(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over sorted keys, each array's dtype, shape and C-order bytes (framed, so nothing can collide)."""
    h = hashlib.sha256(b"fedtextseg-frozen/1\n")
    for key in sorted(arrays):
        a = c_order(np.asarray(arrays[key]))
        h.update(json.dumps([key, a.dtype.str, list(a.shape), a.nbytes]).encode() + b"\n")
        h.update(byte_view(a))
    return h.hexdigest()


class FrozenBundle:
    """Frozen arrays (read-only views) + ``meta``; ``content_hash`` is computed once, on first use."""

    def __init__(self, arrays: Mapping[str, Any], meta: Mapping[str, Any] | None = None):
        self.arrays: dict[str, np.ndarray] = {}
        for k, v in arrays.items():
            if hasattr(v, "detach"):
                v = v.detach().cpu().numpy()
            a = np.asarray(v)
            if a.dtype.kind not in "biufc":
                raise FedTextSegError(f"frozen array '{k}' has non-numeric dtype {a.dtype}")
            view = a.view()
            view.flags.writeable = False
            self.arrays[k] = view
        self.meta: dict[str, Any] = dict(meta or {})
        try:
            json.dumps(self.meta)
        except TypeError as e:
            raise FedTextSegError(f"frozen bundle meta must be JSON-able: {e}") from None
        self._hash: str | None = None

    @property
    def content_hash(self) -> str:
        """sha256 hex digest of the arrays (see ``content_hash``)."""
        if self._hash is None:
            self._hash = content_hash(self.arrays)
        return self._hash

    @property
    def nbytes(self) -> int:
        """Total bytes of the arrays."""
        return int(sum(a.nbytes for a in self.arrays.values()))

    def verify(self, expected_hash: str, source: str = "frozen bundle") -> None:
        """Raise ``FedTextSegError`` if the content hash is not ``expected_hash``."""
        if self.content_hash != expected_hash:
            raise FedTextSegError(f"{source}: content hash {self.content_hash[:12]}... does not match the "
                                  f"announced {expected_hash[:12]}...")

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + fsync + rename); the hash is recorded and checked by ``load``."""
        manifest = {"format": "fedtextseg-frozen/1", "content_hash": self.content_hash, "meta": self.meta}
        write_archive(path, manifest, self.arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> FrozenBundle:
        """Read a bundle written by ``save``, verifying its hash; damage -> ``FedTextSegError`` naming the file."""
        manifest, arrays = read_archive(path, "frozen bundle")
        if manifest.get("format") != "fedtextseg-frozen/1":
            raise FedTextSegError(f"{path}: not a fedtextseg frozen bundle (format {manifest.get('format')!r})")
        bundle = cls(arrays, manifest.get("meta"))
        bundle.verify(str(manifest.get("content_hash")), source=str(path))
        return bundle

    def __repr__(self) -> str:
        return (f"FrozenBundle({len(self.arrays)} arrays, {self.nbytes / 2**20:.1f} MiB, "
                f"hash={self.content_hash[:12]})")


class FrozenDistributor:
    """Server side: send the frozen bundle once per node; resend after the node reports it missing."""

    def __init__(self, bundle: FrozenBundle | None = None):
        self.bundle = bundle
        self._held: dict[str, str] = {}  # node id (as str) -> hash it holds

    @property
    def current_hash(self) -> str | None:
        """The hash nodes should hold (None if there is no bundle)."""
        return None if self.bundle is None else self.bundle.content_hash

    def set_bundle(self, bundle: FrozenBundle | None) -> None:
        """Switch to another bundle; nodes holding an older hash get the new one on their next message."""
        self.bundle = bundle

    def payload_for(self, node_id: Hashable) -> FrozenBundle | None:
        """The bundle if ``node_id`` does not hold the current hash yet (then it counts as held), else None."""
        if self.bundle is None or self.holds(node_id):
            return None
        self._held[str(node_id)] = self.bundle.content_hash
        return self.bundle

    def holds(self, node_id: Hashable) -> bool:
        """Whether ``node_id`` is believed to hold the current bundle."""
        return self.bundle is not None and self._held.get(str(node_id)) == self.bundle.content_hash

    def mark_missing(self, node_id: Hashable) -> None:
        """The node lost the bundle (replied ``MISSING_FROZEN``, its message failed, ...): resend next time."""
        self._held.pop(str(node_id), None)

    def mark_holding(self, node_id: Hashable, content_hash: str) -> None:
        """The node reported holding ``content_hash`` (e.g. from its cache): no need to send that one."""
        self._held[str(node_id)] = str(content_hash)

    def state_dict(self) -> dict[str, Any]:
        """Which node holds which hash (for checkpoints; the bundle itself is not included)."""
        return {"held": dict(self._held)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict``."""
        self._held = {str(k): str(v) for k, v in dict(state.get("held", {})).items()}


class FrozenCache:
    """Client side: frozen bundles stored on disk as ``<cache_dir>/<hash>.frozen``."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)

    def path_for(self, content_hash: str) -> Path:
        """File of the bundle with ``content_hash`` (which must be a sha256 hex digest)."""
        if not _HASH_RE.match(str(content_hash)):
            raise FedTextSegError(f"not a frozen-bundle hash: {content_hash!r}")
        return self.cache_dir / f"{content_hash}.frozen"

    def has(self, content_hash: str) -> bool:
        """Whether a file for ``content_hash`` exists (not verified; ``get`` verifies)."""
        return self.path_for(content_hash).is_file()

    def get(self, content_hash: str) -> FrozenBundle | None:
        """The cached bundle, verified; None if absent or corrupt (a corrupt file is removed, with a warning)."""
        path = self.path_for(content_hash)
        if not path.is_file():
            return None
        try:
            bundle = FrozenBundle.load(path)
            bundle.verify(content_hash, source=str(path))
        except FedTextSegError as e:
            log.warning("dropping corrupt cached frozen bundle: %s", e)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            return None
        return bundle

    def put(self, bundle: FrozenBundle) -> Path:
        """Store ``bundle`` under its hash (no-op if already there); returns its file."""
        path = self.path_for(bundle.content_hash)
        if not path.is_file():
            bundle.save(path)
        return path

    def hashes(self) -> list[str]:
        """Hashes of the cached bundles (sorted)."""
        if not self.cache_dir.is_dir():
            return []
        return sorted(p.stem for p in self.cache_dir.glob("*.frozen") if _HASH_RE.match(p.stem))

    def prune(self, keep: set[str]) -> list[str]:
        """Delete cached bundles whose hash is not in ``keep``; returns the removed hashes."""
        removed = [h for h in self.hashes() if h not in keep]
        for h in removed:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path_for(h))
        return removed
