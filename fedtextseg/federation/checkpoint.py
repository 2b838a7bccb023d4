"""Crash-safe round checkpoints of a federated run, with RNG states so a resumed run continues identically.

A checkpoint is ``<run_dir>/checkpoints/round-000012.ckpt``: an uncompressed zip holding ``manifest.json``
(round, JSON-able strategy state and extras, RNG states, and for every array its dtype, shape and sha256) and one
``.npy`` entry per array. Arrays may appear anywhere inside ``strategy_state``/``extra`` (nested dicts/lists);
torch tensors are stored as numpy arrays and come back as numpy arrays; tuples come back as lists.

Writes go to a temp file in the same folder, are fsynced and then ``os.replace``d into place (and the folder is
fsynced), so a crash leaves either the old set of files or the new one, never a half-written checkpoint under a
final name. There is no separate ``latest`` pointer that could go stale: the latest checkpoint is the newest file
that validates. ``load_latest`` skips a corrupt newest file, says so (warning + ``Checkpoint.skipped``), and falls
back to the previous valid one. Only the last ``keep`` checkpoints are kept.

The archive helpers here (``write_archive``/``read_archive``/``atomic_path``) are also used by ``frozen.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedtextseg.errors import FedTextSegError

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^round-(\d{6,})\.ckpt$")
_ARRAY_TAG = "__ndarray__"


# ---------------------------------------------------------------- atomic files and array archives
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/file system can fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and ``os.replace`` it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def c_order(a: np.ndarray) -> np.ndarray:
    """``a`` as a C-contiguous array of the same shape (``np.ascontiguousarray`` turns 0-d into 1-d)."""
    return a if a.flags.c_contiguous else np.array(a, order="C")


def byte_view(a: np.ndarray) -> np.ndarray:
    """The bytes of ``a`` in C order as a flat uint8 array (no copy when already C-contiguous)."""
    return c_order(np.asarray(a)).reshape(-1).view(np.uint8)


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(byte_view(a)).hexdigest()


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "biufc":
        raise FedTextSegError(f"cannot store an array of dtype {a.dtype} (numbers only)")
    return a


def write_archive(path: str | Path, manifest: Mapping[str, Any], arrays: Mapping[str, Any]) -> None:
    """Atomically write ``manifest`` (JSON) + ``arrays`` (``.npy`` entries) as one zip at ``path``."""
    entries = {}
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for i, (key, value) in enumerate(arrays.items()):
                a = _to_numpy(value)
                entry = f"arrays/{i:06d}.npy"
                with zf.open(entry, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, c_order(a), allow_pickle=False)
                entries[key] = {"entry": entry, "dtype": a.dtype.str, "shape": list(a.shape), "sha256": _sha256(a)}
            zf.writestr("manifest.json", json.dumps({**manifest, "arrays": entries}, indent=1))


def read_archive(path: str | Path, what: str = "file") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and verify an archive written by ``write_archive``; any damage -> ``FedTextSegError`` naming it."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path, "r") as zf:
            manifest = json.loads(zf.read("manifest.json"))
            arrays = {}
            for key, info in manifest.pop("arrays").items():
                with zf.open(info["entry"]) as fh:
                    a = np.lib.format.read_array(fh, allow_pickle=False)
                if a.dtype.str != info["dtype"] or list(a.shape) != info["shape"] or _sha256(a) != info["sha256"]:
                    raise ValueError(f"array '{key}' does not match its recorded dtype/shape/sha256")
                arrays[key] = a
    except FileNotFoundError:
        raise FedTextSegError(f"{path}: {what} not found") from None
    except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise FedTextSegError(f"{path}: corrupt or incomplete {what} ({type(e).__name__}: {e})") from None
    return manifest, arrays


# ---------------------------------------------------------------- nested values with arrays <-> JSON + arrays
def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or (hasattr(x, "detach") and hasattr(x, "numpy"))


def _split(obj: Any, arrays: dict[str, Any], where: str) -> Any:
    if _is_array(obj):
        ref = f"a{len(arrays)}"
        arrays[ref] = obj
        return {_ARRAY_TAG: ref}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise FedTextSegError(f"checkpoint: key {k!r} at {where} is not a string")
            out[k] = _split(v, arrays, f"{where}/{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_split(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise FedTextSegError(f"checkpoint: cannot store a {type(obj).__name__} at {where}")


def _join(obj: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_ARRAY_TAG}:
            return arrays[obj[_ARRAY_TAG]]
        return {k: _join(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, arrays) for v in obj]
    return obj


# ---------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """The python, numpy (legacy global) and torch (CPU and, if initialised, CUDA) RNG states."""
    st = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"python": [st[0], list(st[1]), st[2]],
                             "numpy": [name, keys, int(pos), int(has_gauss), float(gauss)]}
    try:
        import torch
    except ImportError:  # torch is a dependency, but the RNG capture does not need it
        return state
    state["torch"] = torch.get_rng_state().numpy()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [s.numpy() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back the RNG states of ``capture_rng_state`` (as stored in a checkpoint)."""
    if "python" in state:
        v, keys, gauss = state["python"]
        random.setstate((int(v), tuple(int(k) for k in keys), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
    if "torch" in state:
        import torch

        torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"], dtype=np.uint8).copy()))
        if "torch_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.from_numpy(np.asarray(s, dtype=np.uint8).copy())
                                          for s in state["torch_cuda"]])


# ---------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    """A loaded checkpoint. ``skipped`` lists newer files that were corrupt (``"path: reason"``)."""

    round: int
    global_arrays: dict[str, np.ndarray]
    strategy_state: dict[str, Any]
    extra: dict[str, Any]
    rng: dict[str, Any] | None
    path: Path
    skipped: list[str] = field(default_factory=list)

    def restore_rng(self) -> None:
        """Restore the RNG states saved with this checkpoint (no-op if none were saved)."""
        if self.rng:
            restore_rng_state(self.rng)


def checkpoint_path(run_dir: str | Path, round: int) -> Path:  # noqa: A002 - "round" is the domain word
    """Where the checkpoint of ``round`` lives."""
    return Path(run_dir) / CKPT_DIR / f"round-{int(round):06d}.ckpt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(round, path) of checkpoint files in ``run_dir``, oldest first (temp files ignored)."""
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(run_dir: str | Path, round: int, global_arrays: Mapping[str, Any],  # noqa: A002
                    strategy_state: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                    keep: int = 3, rng: bool = True) -> Path:
    """Atomically write the checkpoint of ``round`` (with RNG states unless ``rng=False``); keep the last ``keep``.

    Returns the file written. ``global_arrays`` is a flat name -> array mapping (order kept).
    """
    if keep < 1:
        raise FedTextSegError(f"checkpoint keep must be >= 1, got {keep}")
    arrays: dict[str, Any] = {}
    manifest = {
        "format": "fedtextseg-checkpoint/1",
        "round": int(round),
        "global": {k: _split(v, arrays, f"global/{k}") for k, v in global_arrays.items()},
        "strategy_state": _split(dict(strategy_state or {}), arrays, "strategy_state"),
        "extra": _split(dict(extra or {}), arrays, "extra"),
        "rng": _split(capture_rng_state(), arrays, "rng") if rng else None,
    }
    path = checkpoint_path(run_dir, round)
    _remove_stale_temp_files(path.parent)
    try:
        write_archive(path, manifest, arrays)
    except OSError as exc:  # disk full, folder gone or read-only: the previous checkpoints are untouched
        raise FedTextSegError(f"{path}: cannot write the round-{int(round)} checkpoint ({exc.strerror or exc}); "
                              f"the previous checkpoint is kept: free space in {path.parent} and resume the run"
                              ) from None
    for _, old in list_checkpoints(run_dir)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    return path


def _remove_stale_temp_files(folder: Path) -> None:
    """Temp files another (killed) process left half-written: never a checkpoint, only clutter and used space."""
    if not folder.is_dir():
        return
    for p in folder.glob(".round-*.ckpt.tmp-*"):
        if not p.name.endswith(f".tmp-{os.getpid()}"):
            with contextlib.suppress(OSError):
                p.unlink()


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load one checkpoint file, verifying every array; damage -> ``FedTextSegError`` naming the file."""
    manifest, arrays = read_archive(path, "checkpoint")
    if manifest.get("format") != "fedtextseg-checkpoint/1":
        raise FedTextSegError(f"{path}: not a fedtextseg checkpoint (format {manifest.get('format')!r})")
    try:
        return Checkpoint(round=int(manifest["round"]), global_arrays=_join(manifest["global"], arrays),
                          strategy_state=_join(manifest["strategy_state"], arrays),
                          extra=_join(manifest["extra"], arrays), rng=_join(manifest["rng"], arrays),
                          path=Path(path))
    except (KeyError, TypeError, ValueError) as e:
        raise FedTextSegError(f"{path}: corrupt checkpoint manifest ({type(e).__name__}: {e})") from None


def load_latest(run_dir: str | Path) -> Checkpoint | None:
    """The newest valid checkpoint of ``run_dir`` (None if there is none at all).

    Corrupt newer files are skipped with a warning and listed in ``Checkpoint.skipped``. If files exist but none
    is valid, raises ``FedTextSegError`` listing them rather than silently restarting from scratch.
    """
    skipped: list[str] = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            ckpt = load_checkpoint(path)
        except FedTextSegError as e:
            log.warning("skipping checkpoint: %s", e)
            skipped.append(str(e))
            continue
        if skipped:
            log.warning("resuming from %s (round %d) instead of a newer corrupt checkpoint", path, ckpt.round)
        ckpt.skipped = skipped
        return ckpt
    if skipped:
        raise FedTextSegError("no valid checkpoint in " + str(Path(run_dir) / CKPT_DIR) + ":\n  " +
                              "\n  ".join(skipped))
    return None
