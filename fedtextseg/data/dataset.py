"""Per-site training/validation datasets: a deterministic case split and cached preprocessing.

A site's deterministic preprocessing (load, label encoding, resampling, windowing, body crop, optional DINOv2
features) runs once, not every federated round:

* ``cache_dir=None`` (default): MONAI ``PersistentDataset`` on disk under ``$FEDTEXTSEG_CACHE`` or
  ``~/.cache/fedtextseg``, in a folder named after the site and a key over the site's label semantics (vocabulary,
  label map, annotated classes, task), :meth:`PreprocessConfig.hash` and ``feature_key``. Each case's file is keyed
  by its paths, sizes and modification times, so an edited image is preprocessed again;
* ``cache_dir=PATH``: the same under PATH;
* ``cache_dir=False``: MONAI ``CacheDataset`` in memory (filled when the dataset is built).

Only labeled cases are used. The validation split is deterministic: cases are ranked by a hash of
``(seed, case_id)`` and the first ``round(n * val_fraction)`` (at least 1 when there are 2+ cases and
``val_fraction > 0``) go to validation, so adding a case rarely moves the others.

Errors raised while preprocessing come out as the :class:`SiteError` naming the file, not MONAI's RuntimeError.
"""

from __future__ import annotations

import enum
import hashlib
import importlib
import json
import os
import uuid
import warnings
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor, PersistentDataset, list_data_collate
from monai.data.utils import pickle_hashing
from monai.utils import convert_to_tensor

from fedtextseg.data.labels import LabelCoder
from fedtextseg.data.site import Case, Site
from fedtextseg.data.transforms import (
    DecodeLabelsd,
    FeatureFn,
    PreprocessConfig,
    SiteCompose,
    preprocess_transform,
    train_transform,
    unwrap_site_error,
)
from fedtextseg.errors import ConfigError, SiteError

__all__ = [
    "SiteData",
    "build_site_data",
    "build_site_datasets",
    "make_loader",
    "split_cases",
    "case_items",
    "cache_key",
    "default_cache_root",
    "CACHE_ENV",
]

CACHE_ENV = "FEDTEXTSEG_CACHE"

try:  # how numpy arrays are pickled (numpy 2 moved it)
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


def default_cache_root() -> Path:
    """``$FEDTEXTSEG_CACHE`` or ``~/.cache/fedtextseg``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedtextseg"


def split_cases(cases: Sequence[Case], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """Deterministic (train, val) split of the labeled cases; both keep the site's case order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labeled = [c for c in cases if c.label is not None]
    n_val = int(round(len(labeled) * val_fraction))
    if val_fraction > 0 and len(labeled) >= 2:
        n_val = min(max(n_val, 1), len(labeled) - 1)
    ranked = sorted(labeled, key=lambda c: hashlib.sha256(f"{seed}:{c.case_id}".encode()).hexdigest())
    val_ids = {c.case_id for c in ranked[:n_val]}
    return [c for c in labeled if c.case_id not in val_ids], [c for c in labeled if c.case_id in val_ids]


def case_items(cases: Sequence[Case]) -> list[dict[str, Any]]:
    """MONAI data dicts: ``{"image": path, "label": path, "case_id": id}``."""
    return [
        {"image": str(c.image), **({"label": str(c.label)} if c.label is not None else {}), "case_id": c.case_id}
        for c in cases
    ]


def _item_hash(item: dict) -> bytes:
    """Cache file key of one case: its data dict plus size and mtime of each file (an edited file is redone)."""
    stats = {}
    for key in ("image", "label"):
        if item.get(key) is not None:
            try:
                path = Path(item[key])
                if path.is_dir():  # a folder of per-class masks: every mask's name, size and mtime
                    stats[key] = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir())]
                else:
                    st = path.stat()
                    stats[key] = (st.st_size, st.st_mtime_ns)
            except OSError:
                stats[key] = None  # the reader reports the missing file
    return pickle_hashing({"item": dict(item), "stats": stats})


def cache_key(site: Site, cfg: PreprocessConfig, feature_key: str | None = None) -> str:
    """Key of a site's cache folder: label semantics + preprocessing hash + feature extractor identity."""
    blob = json.dumps(
        {
            "root": str(Path(site.root).resolve()),
            "vocabulary": site.vocabulary.content_hash,
            "label_map": {str(k): v for k, v in sorted(site.label_map.items())},
            "annotated": list(site.annotated),
            "task": site.task,
            "preprocess": cfg.hash(),
            "features": feature_key,
            **({"ignored": {str(k): v for k, v in sorted(site.ignored_values.items())}} if site.ignored_values else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _SiteErrorsMixin:
    """Re-raise the SiteError behind MONAI's RuntimeError wrappers (building and indexing the dataset)."""

    def __init__(self, *args, **kwargs):
        try:
            super().__init__(*args, **kwargs)
        except RuntimeError as exc:
            _reraise(exc)

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except RuntimeError as exc:
            _reraise(exc)


def _reraise(exc: RuntimeError):
    inner = unwrap_site_error(exc)
    if inner is None:
        raise exc
    raise inner.with_traceback(inner.__traceback__) from None


def _cache_safe_globals(path: Path) -> list | None:
    """Globals a cache file needs beyond ``torch.load(weights_only=True)``'s defaults, or None if it asks for others.

    MONAI's ``applied_operations`` hold numpy arrays/dtypes and MONAI enums; those (and MetaTensor) are allowed,
    nothing else, so a tampered cache file cannot run code: it is deleted and recomputed instead.
    """
    allowed = [np.ndarray, np.dtype, _np_reconstruct, *(t for t in vars(np.dtypes).values() if isinstance(t, type))]
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # unreadable: let MONAI's own corrupt-file handling deal with it
        return allowed
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            trusted_module = f"{module}.".startswith(("monai.", "numpy."))
            obj = getattr(importlib.import_module(module), attr) if trusted_module else None
        except (ImportError, AttributeError):
            obj = None
        if obj in allowed:
            continue
        if module.startswith("monai.") and isinstance(obj, type) and issubclass(obj, (enum.Enum, MetaTensor)):
            allowed.append(obj)
            continue
        return None
    return allowed


class SitePersistentDataset(_SiteErrorsMixin, PersistentDataset):
    """PersistentDataset whose entries are safe with several writers and never loaded half-written or foreign.

    * an entry is written to a temporary file in its own folder and renamed into place (``os.replace``, atomic on
      one file system), so a reader in another process sees either no entry or a whole one, and an interrupted
      write leaves no entry behind;
    * an entry that cannot be read (truncated, not a torch file), refers to objects outside the allow-list
      (``_cache_safe_globals``) or is not this case's (another case's item, not a dict of tensors) is deleted with
      a warning naming the file, and the case is preprocessed again;
    * cached items keep their MetaTensor metadata (``track_meta=True``) for inverting predictions later; loading
      stays ``weights_only`` and memory-maps the tensors (``mmap=True``: pages are read as a crop touches them).
    """

    def _cachecheck(self, item_transformed):
        item = self._cached_or_computed(item_transformed)
        # a freshly computed item is returned as it was computed, a cached one as saved (plain tensors ->
        # MetaTensor): convert that one alike, so a half-filled cache (an interrupted run, new cases) yields
        # batches that collate
        return convert_to_tensor(item, convert_numeric=False, track_meta=self.track_meta) if self.track_meta else item

    def _entry_path(self, item_transformed) -> Path:
        return self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"

    def _cached_or_computed(self, item_transformed):
        if self.cache_dir is None:
            return self._pre_transform(deepcopy(item_transformed))
        entry = self._entry_path(item_transformed)
        cached = self._load_entry(entry, item_transformed)
        if cached is not None:
            return cached
        computed = self._pre_transform(deepcopy(item_transformed))  # keep the hashed original as it was
        self._store_entry(entry, computed)
        return computed

    def _load_entry(self, entry: Path, item_transformed: dict):
        """The cached item of ``entry``, or None (absent; unreadable, untrusted or foreign ones are deleted)."""
        if not entry.is_file():
            return None
        safe = _cache_safe_globals(entry)
        problem = None
        if safe is None:
            problem = "refers to objects outside the allow-list"
        else:
            try:
                with torch.serialization.safe_globals(safe):
                    cached = torch.load(entry, weights_only=True, mmap=True)
            except FileNotFoundError:  # another process replaced or removed it meanwhile
                return None
            except Exception as exc:  # truncated, not a torch file, or an object the allow-list refuses
                problem = f"cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            else:
                problem = _foreign_entry_problem(cached, item_transformed)
        if problem is None:
            return cached
        warnings.warn(f"{entry}: cache entry {problem}; deleting it and preprocessing the case again")
        entry.unlink(missing_ok=True)
        return None

    def _store_entry(self, entry: Path, computed) -> None:
        """Write ``computed`` to a temporary file beside ``entry`` and rename it into place."""
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            torch.save(convert_to_tensor(computed, convert_numeric=False, track_meta=self.track_meta), tmp,
                       pickle_protocol=self.pickle_protocol)
            os.replace(tmp, entry)
        except OSError as exc:  # full disk, read-only cache: train on without caching this case
            warnings.warn(f"{entry}: cannot write the cache entry ({exc}); the case is preprocessed each time")
        finally:
            tmp.unlink(missing_ok=True)


def _foreign_entry_problem(cached, item_transformed: dict) -> str | None:
    """Why ``cached`` is not the preprocessed ``item_transformed`` (None when it is)."""
    if not isinstance(cached, dict):
        return f"holds a {type(cached).__name__}, not a preprocessed case"
    keys = [k for k in ("image", "label") if item_transformed.get(k) is not None]
    missing = [k for k in keys if not isinstance(cached.get(k), torch.Tensor)]
    if missing:
        return f"has no {' or '.join(missing)} tensor"
    if cached.get("case_id") != item_transformed.get("case_id"):
        return f"belongs to case {cached.get('case_id')!r}, not {item_transformed.get('case_id')!r}"
    return None


class SiteCacheDataset(_SiteErrorsMixin, CacheDataset):
    """CacheDataset that reports site problems as SiteError."""


class SiteDataset(_SiteErrorsMixin, Dataset):
    """Dataset (here: a transform applied over a cached dataset) that reports site problems as SiteError."""


@dataclass
class SiteData:
    """A site's datasets and what they were built from."""

    site: Site
    cfg: PreprocessConfig
    train_cases: list[Case]
    val_cases: list[Case]
    train_ds: Dataset
    val_ds: Dataset
    cache_dir: Path | None  # None = in memory

    def describe(self) -> str:
        where = str(self.cache_dir) if self.cache_dir is not None else "memory"
        return (
            f"site {self.site.name!r}: {len(self.train_cases)} train / {len(self.val_cases)} val cases, "
            f"patch {self.cfg.patch_size} x{self.cfg.num_crops}, cache: {where}"
        )


def build_site_data(site: Site, cfg: PreprocessConfig | None = None, cache_dir: str | Path | None | bool = None,
                    val_fraction: float = 0.2, seed: int = 0, feature_fn: FeatureFn | None = None,
                    feature_key: str | None = None) -> SiteData:
    """Split a site's labeled cases and build cached train (random crops) and val (whole volumes) datasets.

    ``feature_fn(image [1, D, H, W]) -> dict`` runs in the cached part (e.g. frozen DINOv2 features); with a disk
    cache, ``feature_key`` (the extractor's identity, e.g. model name + weights hash) is required so features from
    different extractors never mix.
    """
    cfg = cfg or PreprocessConfig()
    if site.format != "nifti":
        raise ConfigError(f"site {site.name!r} has format {site.format!r}; these datasets read 3D NIfTI sites")
    train_cases, val_cases = split_cases(site.cases, val_fraction, seed)
    if not train_cases:
        raise SiteError(site.root, "no labeled cases to train on")
    det = preprocess_transform(site, cfg)  # validation runs whole volumes; sliding windows compute their own features
    train_tf = train_transform(site, cfg, feature_fn)
    decode = SiteCompose([DecodeLabelsd(LabelCoder.for_site(site))])

    if cache_dir is False:
        folder = None
        train_ds = SiteCacheDataset(case_items(train_cases), train_tf, cache_rate=1.0, num_workers=1, progress=False)
        val_base = SiteCacheDataset(case_items(val_cases), det, cache_rate=1.0, num_workers=1, progress=False)
    else:
        if feature_fn is not None and not feature_key:
            raise ConfigError("a feature_fn with a disk cache needs feature_key (the extractor's name + weights hash)")
        root = default_cache_root() if cache_dir in (None, True) else Path(cache_dir).expanduser()
        safe_name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in site.name) or "site"
        folder = root / f"{safe_name}-{cache_key(site, cfg, feature_key)}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            info = folder / "cache_info.json"
            if not info.is_file():
                info.write_text(json.dumps({"site": site.name, "root": str(site.root), "preprocess": cfg.to_dict(),
                                            "feature_key": feature_key}, indent=2, default=str))
        except OSError as exc:
            raise SiteError(folder, f"cannot create the preprocessing cache folder: {exc}") from None
        train_ds = SitePersistentDataset(case_items(train_cases), train_tf, cache_dir=folder, hash_func=_item_hash,
                                         track_meta=True)
        val_base = SitePersistentDataset(case_items(val_cases), det, cache_dir=folder / "val", hash_func=_item_hash,
                                         track_meta=True)
    val_ds = SiteDataset(val_base, decode)
    return SiteData(site, cfg, train_cases, val_cases, train_ds, val_ds, folder)


def build_site_datasets(site: Site, cfg: PreprocessConfig | None = None, cache_dir: str | Path | None | bool = None,
                        val_fraction: float = 0.2, seed: int = 0, feature_fn: FeatureFn | None = None,
                        feature_key: str | None = None) -> tuple[Dataset, Dataset]:
    """(train_ds, val_ds) of :func:`build_site_data`."""
    data = build_site_data(site, cfg, cache_dir, val_fraction, seed, feature_fn, feature_key)
    return data.train_ds, data.val_ds


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, **kwargs) -> DataLoader:
    """MONAI DataLoader with ``list_data_collate``: the crops of each volume become separate batch entries.

    A batch of ``batch_size`` volumes with ``num_crops`` crops each holds ``batch_size * num_crops`` patches.
    Whole validation volumes differ in shape: use ``batch_size=1`` for them.
    """
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=list_data_collate, **kwargs)
