"""A versioned glossary of chest X-ray report terms: TGC-Net's domain-augmented text.

TGC-Net's "Domain-Augmented Text Encoder" adds medical knowledge to each clinical report before encoding it. Here the
knowledge is a curated glossary (``glossaries/<version>.yaml``): for every term a report mentions ("bilateral",
"lower zone", "infected areas", ...) its short definition is appended::

    g = Glossary.load("chest_xray_v1")
    g.terms_in("unilateral pulmonary infection, one infected area, lower right lung.")
    # -> ['unilateral', 'pulmonary infection', 'infected areas', 'lower zone', 'right lung']
    g.augment(caption)   # caption + " Knowledge: unilateral: only one lung is affected; ..."
    g.version, g.hash    # recorded with a trained model, so its text conditioning can be reproduced

An LLM could draft such a glossary (as the paper does); the shipped one is reviewed by hand and versioned, and
loading it never touches the network. A deployment can pass its own YAML file path to :meth:`Glossary.load`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from fedtextseg.errors import FedTextSegError

__all__ = ["GlossaryTerm", "Glossary", "available_glossaries", "DEFAULT_GLOSSARY"]

DEFAULT_GLOSSARY = "chest_xray_v1"
_PACKAGE_DIR = "glossaries"


@dataclass(frozen=True)
class GlossaryTerm:
    """One term: its name, the regular expressions that find it in a report, and its definition."""

    term: str
    definition: str
    patterns: tuple[str, ...]
    category: str = ""

    def first_match(self, text: str) -> int | None:
        """Character offset of the earliest match in ``text`` (lower-cased), or None."""
        best = None
        for pat in self.patterns:
            m = re.search(rf"\b(?:{pat})\b", text, flags=re.IGNORECASE)
            if m is not None and (best is None or m.start() < best):
                best = m.start()
        return best


class Glossary:
    """An ordered, versioned set of :class:`GlossaryTerm` with a content hash."""

    def __init__(self, version: str, terms: list[GlossaryTerm], description: str = "", source: str = "<dict>"):
        if not terms:
            raise FedTextSegError(f"{source}: glossary {version!r} has no terms")
        names = [t.term for t in terms]
        if len(set(names)) != len(names):
            raise FedTextSegError(f"{source}: glossary {version!r} lists a term twice")
        self.version = version
        self.terms = list(terms)
        self.description = description
        self.source = source

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: dict, *, source: str = "<dict>") -> "Glossary":
        if not isinstance(data, dict) or "version" not in data or "terms" not in data:
            raise FedTextSegError(f"{source}: a glossary needs the keys 'version' and 'terms'")
        terms = []
        for i, entry in enumerate(data["terms"] or []):
            try:
                patterns = tuple(str(p) for p in (entry.get("patterns") or [re.escape(entry["term"])]))
                for p in patterns:
                    re.compile(p)
                terms.append(
                    GlossaryTerm(
                        term=str(entry["term"]),
                        definition=str(entry["definition"]).strip().rstrip("."),
                        patterns=patterns,
                        category=str(entry.get("category", "")),
                    )
                )
            except KeyError as exc:
                raise FedTextSegError(f"{source}: glossary term #{i + 1} is missing the key {exc}") from None
            except re.error as exc:
                raise FedTextSegError(f"{source}: glossary term #{i + 1} has a bad pattern: {exc}") from None
        return cls(str(data["version"]), terms, str(data.get("description", "")), source)

    @classmethod
    def load(cls, version: str | Path = DEFAULT_GLOSSARY) -> "Glossary":
        """A shipped glossary by version name (``"chest_xray_v1"``) or a glossary YAML file path."""
        key = str(version)
        path = Path(key)
        if key.endswith((".yaml", ".yml")) or path.is_file():
            try:
                text = path.read_text()
            except OSError as exc:
                raise FedTextSegError(f"{path}: cannot read glossary: {exc}") from None
            source = str(path)
        else:
            entry = resources.files("fedtextseg.text") / _PACKAGE_DIR / f"{key}.yaml"
            if not entry.is_file():
                known = ", ".join(available_glossaries()) or "none"
                raise FedTextSegError(f"unknown glossary version {key!r}; shipped: {known} (or a YAML path)")
            text = entry.read_text()
            source = f"fedtextseg/text/{_PACKAGE_DIR}/{key}.yaml"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise FedTextSegError(f"{source}: glossary is not valid YAML: {exc}") from None
        glossary = cls.from_dict(data, source=source)
        if not path.is_file() and glossary.version != key:
            raise FedTextSegError(f"{source}: file declares version {glossary.version!r}, expected {key!r}")
        return glossary

    # ------------------------------------------------------------------ identity
    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "description": self.description,
            "terms": [
                {"term": t.term, "category": t.category, "patterns": list(t.patterns), "definition": t.definition}
                for t in self.terms
            ],
        }

    @property
    def hash(self) -> str:
        """Hash of the version and every term (not of comments or formatting)."""
        blob = json.dumps({"version": self.version, "terms": self.to_dict()["terms"]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def provenance(self) -> dict:
        return {"glossary": self.version, "glossary_hash": self.hash, "glossary_source": self.source}

    # ------------------------------------------------------------------ use
    def terms_in(self, caption: str | None) -> list[str]:
        """The glossary terms a caption mentions, in order of first appearance (each once)."""
        if not caption:
            return []
        found = []
        for t in self.terms:
            pos = t.first_match(caption)
            if pos is not None:
                found.append((pos, self.terms.index(t), t.term))
        return [name for _, _, name in sorted(found)]

    def definition(self, term: str) -> str:
        for t in self.terms:
            if t.term == term:
                return t.definition
        raise KeyError(f"term {term!r} is not in glossary {self.version!r}")

    def knowledge(self, caption: str | None) -> str:
        """The definitions of the terms in ``caption`` as one sentence ("" when none is found)."""
        terms = self.terms_in(caption)
        if not terms:
            return ""
        return "Knowledge: " + "; ".join(f"{t}: {self.definition(t)}" for t in terms) + "."

    def augment(self, caption: str | None) -> str:
        """The caption followed by the definitions of the terms it mentions (domain-augmented text)."""
        caption = (caption or "").strip()
        extra = self.knowledge(caption)
        return f"{caption} {extra}".strip() if extra else caption

    def __repr__(self) -> str:
        return f"Glossary(version={self.version!r}, terms={len(self.terms)}, hash={self.hash})"


def available_glossaries() -> list[str]:
    """Versions of the glossaries shipped with the package."""
    folder = resources.files("fedtextseg.text") / _PACKAGE_DIR
    try:
        return sorted(e.name[:-5] for e in folder.iterdir() if e.name.endswith(".yaml"))
    except (FileNotFoundError, NotADirectoryError):
        return []
