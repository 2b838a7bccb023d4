"""The text-embedding bank: frozen class and task embeddings of one vocabulary, with provenance and a content hash.

A bank is what the server computes once (``fedtextseg embed-text``) and sends to every site as a frozen common
parameter, identified by :attr:`EmbeddingBank.content_hash`. Rows follow the vocabulary's channel order (classes)
and task order (tasks); look-ups accept every name the vocabulary accepts (synonyms, case, composites)::

    bank = EmbeddingBank.load("bank.pt")         # verifies the stored hash
    bank.class_embedding("IVC")                  # row of "postcava"
    bank.select_classes(["kidney", "liver"])     # rows of right kidney, left kidney, liver
    bank.task_embedding("LiTS")

Banks computed elsewhere (e.g. the CLIP reference ``txt_encoding.npy``) load with :meth:`from_tensor_files`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from fedtextseg.hashing import file_sha256
from fedtextseg.errors import FedTextSegError
from fedtextseg.vocab import UnknownClassError, UnknownTaskError, Vocabulary, get_vocabulary

__all__ = ["EmbeddingBank", "EmbeddingBankError", "BANK_FORMAT", "ENCODER_IDENTITY_KEYS"]

BANK_FORMAT = "fedtextseg.embedding-bank"
BANK_FORMAT_VERSION = 1
# Entries of ``EmbeddingBank.encoder`` that identify the encoder in the content hash (paths and notes do not).
ENCODER_IDENTITY_KEYS = ("kind", "model", "pretrained")
_REENCODE_HINT = "re-encode the bank with `fedtextseg embed-text` to add a class"


class EmbeddingBankError(FedTextSegError):
    """An embedding bank that cannot be read, does not match its hash, or lacks a requested class or task."""


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    return value.numel() == 0 if isinstance(value, torch.Tensor) else np.asarray(value).size == 0


def _as_embedding_matrix(value: Any, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
    if tensor.ndim != 2:
        raise EmbeddingBankError(f"{what}: expected a 2-D [rows, dim] matrix, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise EmbeddingBankError(f"{what}: expected floating-point embeddings, got {tensor.dtype}")
    tensor = tensor.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(tensor).all():
        raise EmbeddingBankError(f"{what}: contains NaN or infinite values")
    return tensor


@dataclass
class EmbeddingBank:
    """Class embeddings ``[C, E]`` and task embeddings ``[T, E]`` of one vocabulary, plus how they were made."""

    class_names: list[str]
    class_embeddings: torch.Tensor = field(repr=False)
    task_names: list[str]
    task_embeddings: torch.Tensor = field(repr=False)
    class_template: str
    task_template: str
    vocabulary: str
    vocabulary_hash: str
    encoder: dict = field(default_factory=dict)
    # The vocabulary itself (Vocabulary.to_dict), so a site can resolve names without the vocabulary's YAML file.
    vocabulary_spec: dict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.class_names = [str(n) for n in self.class_names]
        self.task_names = [str(n) for n in self.task_names]
        self.class_embeddings = _as_embedding_matrix(self.class_embeddings, "class embeddings")
        if _is_empty(self.task_embeddings):
            self.task_embeddings = torch.zeros(0, self.class_embeddings.shape[1])
        self.task_embeddings = _as_embedding_matrix(self.task_embeddings, "task embeddings")
        if self.class_embeddings.shape[0] != len(self.class_names):
            raise EmbeddingBankError(
                f"embedding bank: {self.class_embeddings.shape[0]} class embedding rows for "
                f"{len(self.class_names)} class names"
            )
        if self.task_embeddings.shape[0] != len(self.task_names):
            raise EmbeddingBankError(
                f"embedding bank: {self.task_embeddings.shape[0]} task embedding rows for "
                f"{len(self.task_names)} task names"
            )
        if len(self.task_names) and self.task_embeddings.shape[1] != self.class_embeddings.shape[1]:
            raise EmbeddingBankError(
                f"embedding bank: class embeddings are {self.class_embeddings.shape[1]}-d but task embeddings are "
                f"{self.task_embeddings.shape[1]}-d"
            )
        for kind, names in (("class", self.class_names), ("task", self.task_names)):
            if len(set(names)) != len(names):
                duplicates = sorted({n for n in names if names.count(n) > 1})
                raise EmbeddingBankError(f"embedding bank lists the {kind} name(s) {duplicates} more than once")
        self.encoder = dict(self.encoder or {})
        self._vocab: Vocabulary | None = None

    # ------------------------------------------------------------------ identity
    @property
    def dim(self) -> int:
        return int(self.class_embeddings.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def content_hash(self) -> str:
        """Short sha256 of names, templates, vocabulary, encoder identity and the exact embedding bytes."""
        header = {
            "class_names": self.class_names,
            "task_names": self.task_names,
            "class_template": self.class_template,
            "task_template": self.task_template,
            "vocabulary": self.vocabulary,
            "vocabulary_hash": self.vocabulary_hash,
            "encoder": {k: self.encoder.get(k) for k in ENCODER_IDENTITY_KEYS},
            "class_shape": list(self.class_embeddings.shape),
            "task_shape": list(self.task_embeddings.shape),
        }
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        digest.update(self.class_embeddings.numpy().tobytes())
        digest.update(self.task_embeddings.numpy().tobytes())
        return digest.hexdigest()[:16]

    def provenance(self) -> dict:
        """A small JSON-able summary for run metadata."""
        return {
            "content_hash": self.content_hash,
            "vocabulary": self.vocabulary,
            "vocabulary_hash": self.vocabulary_hash,
            "num_classes": self.num_classes,
            "num_tasks": self.num_tasks,
            "dim": self.dim,
            "class_template": self.class_template,
            "task_template": self.task_template,
            "encoder": dict(self.encoder),
        }

    def describe(self) -> str:
        """One paragraph for people: what is in the bank and where it came from."""
        enc = self.encoder
        if enc.get("kind") == "tensor-file":
            made = f"precomputed tensors {enc.get('class_file')}" + (f" ({enc['model']})" if enc.get("model") else "")
        else:
            made = f"{enc.get('kind')} {enc.get('model')} (pretrained: {enc.get('pretrained')})"
        text = (
            f"{self.num_classes} classes and {self.num_tasks} tasks of vocabulary {self.vocabulary!r} "
            f"(vocabulary hash {self.vocabulary_hash}), {self.dim}-d embeddings from {made}, "
            f"bank content hash {self.content_hash}."
        )
        if enc.get("fallback_reason"):
            text += f" Fallback used: {enc['fallback_reason']}."
        return text

    # ------------------------------------------------------------------ look-up
    def _vocabulary(self) -> Vocabulary:
        if self._vocab is None:
            if self.vocabulary_spec:
                self._vocab = Vocabulary.from_dict(self.vocabulary_spec, source=f"bank vocabulary {self.vocabulary}")
            else:
                self._vocab = get_vocabulary(self.vocabulary)
        return self._vocab

    def _missing_class_error(self, name: str, detail: str | None, canonical: str | None = None) -> EmbeddingBankError:
        """``detail`` is the vocabulary's own message (it already suggests names); else suggest bank classes."""
        if detail is None:
            canonical = canonical or str(name)
            close = difflib.get_close_matches(canonical, self.class_names, n=4, cutoff=0.5)
            hint = f"; close matches in the bank: {', '.join(repr(c) for c in close)}" if close else ""
            asked = f" (asked as {name!r})" if canonical != name else ""
            detail = f"class {canonical!r}{asked} is not in this embedding bank{hint}"
        return EmbeddingBankError(
            f"{detail} (bank of vocabulary {self.vocabulary!r} with {self.num_classes} classes); {_REENCODE_HINT}"
        )

    def _class_rows(self, name: str) -> list[int]:
        try:
            canonical = self._vocabulary().expand(name)
        except UnknownClassError as exc:
            raise self._missing_class_error(name, str(exc)) from None
        rows = []
        for canon in canonical:
            if canon not in self.class_names:
                raise self._missing_class_error(name, None, canonical=canon)
            rows.append(self.class_names.index(canon))
        return rows

    def class_index(self, name: str) -> int:
        """Row of one class (synonyms allowed); a group such as ``"kidney"`` raises, use :meth:`select_classes`."""
        rows = self._class_rows(name)
        if len(rows) != 1:
            members = [self.class_names[r] for r in rows]
            raise EmbeddingBankError(
                f"{name!r} is a group of classes {members} in vocabulary {self.vocabulary!r}; "
                "name one of them or use select_classes"
            )
        return rows[0]

    def class_embedding(self, name: str) -> torch.Tensor:
        """Embedding ``[E]`` of one class."""
        return self.class_embeddings[self.class_index(name)]

    def class_indices(self, names: Iterable[str]) -> list[int]:
        """Rows of the named classes in the order asked, groups expanded in vocabulary order."""
        if isinstance(names, str):
            names = [names]
        return [row for name in names for row in self._class_rows(name)]

    def select_classes(self, names: Iterable[str]) -> torch.Tensor:
        """Embeddings ``[N, E]`` of the named classes, in the order asked (see :meth:`class_indices`)."""
        return self.class_embeddings[self.class_indices(names)]

    def task_index(self, name: str) -> int:
        try:
            canonical = self._vocabulary().task(name).name
        except UnknownTaskError as exc:
            raise EmbeddingBankError(f"{exc}; the bank holds tasks {self.task_names}") from None
        if canonical not in self.task_names:
            raise EmbeddingBankError(
                f"task {canonical!r} is not in this embedding bank (tasks: {self.task_names}); "
                "re-encode the bank with `fedtextseg embed-text` to add a task"
            )
        return self.task_names.index(canonical)

    def task_embedding(self, name: str) -> torch.Tensor:
        """Embedding ``[E]`` of one task (dataset), by any of its names or aliases."""
        return self.task_embeddings[self.task_index(name)]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """A plain dict (tensors, strings, lists, dicts) that ``torch.load(weights_only=True)`` can read back."""
        return {
            "format": BANK_FORMAT,
            "format_version": BANK_FORMAT_VERSION,
            "class_names": list(self.class_names),
            "class_embeddings": self.class_embeddings.clone(),
            "task_names": list(self.task_names),
            "task_embeddings": self.task_embeddings.clone(),
            "class_template": self.class_template,
            "task_template": self.task_template,
            "vocabulary": self.vocabulary,
            "vocabulary_hash": self.vocabulary_hash,
            "vocabulary_spec": self.vocabulary_spec,
            "encoder": dict(self.encoder),
            "content_hash": self.content_hash,
        }

    @classmethod
    def from_dict(cls, data: Mapping, *, source: str = "<dict>") -> "EmbeddingBank":
        """Rebuild a bank; when ``data`` carries a ``content_hash`` it must match the recomputed one."""
        if not isinstance(data, Mapping) or data.get("format") != BANK_FORMAT:
            raise EmbeddingBankError(f"{source}: not a fedtextseg embedding bank (no format {BANK_FORMAT!r})")
        if data.get("format_version", 0) > BANK_FORMAT_VERSION:
            raise EmbeddingBankError(
                f"{source}: embedding bank format version {data['format_version']} is newer than this fedtextseg "
                f"reads ({BANK_FORMAT_VERSION}); upgrade fedtextseg"
            )
        try:
            bank = cls(**{k: data[k] for k in (
                "class_names", "class_embeddings", "task_names", "task_embeddings", "class_template",
                "task_template", "vocabulary", "vocabulary_hash", "encoder",
            )}, vocabulary_spec=data.get("vocabulary_spec"))
        except KeyError as exc:
            raise EmbeddingBankError(f"{source}: embedding bank is missing the entry {exc}") from None
        except EmbeddingBankError as exc:
            raise EmbeddingBankError(f"{source}: {exc}") from None
        stored = data.get("content_hash")
        if stored is not None and stored != bank.content_hash:
            raise EmbeddingBankError(
                f"{source}: embedding bank content hash mismatch (stored {stored}, recomputed {bank.content_hash}): "
                "the file was modified or corrupted; re-create it with `fedtextseg embed-text`"
            )
        return bank

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file in the same folder, then ``os.replace``); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(self.to_dict(), handle)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingBank":
        """Read a bank written by :meth:`save`, verifying its content hash."""
        path = Path(path)
        if not path.is_file():
            raise EmbeddingBankError(f"{path}: embedding bank file not found")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for truncated / foreign files
            raise EmbeddingBankError(f"{path}: cannot read embedding bank ({type(exc).__name__}: {exc})") from None
        return cls.from_dict(data, source=str(path))

    # ------------------------------------------------------------------ banks computed elsewhere
    @classmethod
    def from_tensor_files(
        cls,
        class_file: str | Path,
        task_file: str | Path | None = None,
        vocabulary: str | Path | Vocabulary = "abdomen-ct",
        class_names: Sequence[str] | None = None,
        *,
        normalize: bool = True,
        source_model: str | None = None,
    ) -> "EmbeddingBank":
        """A bank from plain ``.npy`` / ``.pt`` matrices: class rows in ``class_names`` order (default: the
        vocabulary's channel order), task rows in the vocabulary's task order.

        ``normalize`` L2-normalises rows like :func:`fedtextseg.text.encode_texts` does (cosines are unchanged);
        ``source_model`` records what produced the vectors, when known.
        """
        vocab = get_vocabulary(vocabulary)
        if class_names is None:
            names = vocab.class_names
        else:
            try:
                names = [vocab.resolve(n).name for n in class_names]
            except UnknownClassError as exc:
                raise EmbeddingBankError(f"class list for {class_file}: {exc}") from None
        class_matrix = _read_matrix(class_file)
        _check_rows(class_matrix, len(names), class_file, "class", vocab, other=len(vocab.task_names))
        encoder: dict = {
            "kind": "tensor-file",
            "model": source_model,
            "pretrained": None,
            "class_file": str(Path(class_file).resolve()),
            "class_file_sha256": file_sha256(class_file),
            "normalized": normalize,
        }
        task_names: list[str] = []
        task_matrix = None
        if task_file is not None:
            task_matrix = _read_matrix(task_file)
            _check_rows(task_matrix, len(vocab.task_names), task_file, "task", vocab, other=len(names))
            if task_matrix.shape[1] != class_matrix.shape[1]:
                raise EmbeddingBankError(
                    f"{task_file}: task embeddings are {task_matrix.shape[1]}-d but the class embeddings in "
                    f"{class_file} are {class_matrix.shape[1]}-d"
                )
            task_names = vocab.task_names
            encoder["task_file"] = str(Path(task_file).resolve())
            encoder["task_file_sha256"] = file_sha256(task_file)
        if normalize:
            class_matrix = torch.nn.functional.normalize(class_matrix, dim=1)
            task_matrix = None if task_matrix is None else torch.nn.functional.normalize(task_matrix, dim=1)
        return cls(
            class_names=names,
            class_embeddings=class_matrix,
            task_names=task_names,
            task_embeddings=task_matrix,
            class_template=vocab.class_template,
            task_template=vocab.task_template,
            vocabulary=vocab.name,
            vocabulary_hash=vocab.content_hash,
            encoder=encoder,
            vocabulary_spec=vocab.to_dict(),
        )


def _read_matrix(path: str | Path) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise EmbeddingBankError(f"{path}: embedding file not found")
    try:
        if path.suffix == ".npy":
            value = np.load(path, allow_pickle=False)
        elif path.suffix in (".pt", ".pth"):
            value = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise EmbeddingBankError(f"{path}: unsupported embedding file type {path.suffix!r} (use .npy or .pt)")
    except EmbeddingBankError:
        raise
    except Exception as exc:
        raise EmbeddingBankError(f"{path}: cannot read embeddings ({type(exc).__name__}: {exc})") from None
    if isinstance(value, Mapping):
        raise EmbeddingBankError(
            f"{path}: holds a dict (keys {sorted(map(str, value))[:8]}), expected one [rows, dim] tensor"
        )
    try:
        return _as_embedding_matrix(value, str(path))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise EmbeddingBankError(f"{path}: not a numeric matrix ({exc})") from None


def _check_rows(matrix: torch.Tensor, expected: int, path, kind: str, vocab: Vocabulary, other: int) -> None:
    rows = matrix.shape[0]
    if rows == expected:
        return
    swap = " (it has as many rows as the other list: are the class and task files swapped?)" if rows == other else ""
    raise EmbeddingBankError(
        f"{path}: has {rows} rows but vocabulary {vocab.name!r} needs {expected} {kind} embeddings{swap}"
    )


