"""Text side of fedtextseg: offline text encoders and the frozen embedding bank every site shares.

``build_bank`` / ``fedtextseg embed-text`` encode a vocabulary's class and task prompts (CLIP via open_clip, or the
packaged MiniLM sentence encoder as a declared fallback) into an :class:`EmbeddingBank` file with provenance and a
content hash; ``encode_texts`` encodes arbitrary sentences (e.g. per-image reports); ``load_clip_text_tower`` gives a
fresh CLIP model to fine-tune. Heavy libraries (open_clip, sentence-transformers) are imported only when used.
"""

from fedtextseg.text.bank import EmbeddingBank, EmbeddingBankError
from fedtextseg.text.encoders import (
    MINILM_MODEL_ID,
    ClipTextTower,
    EncoderConfig,
    EncoderWeightsUnavailable,
    LoadedTextEncoder,
    TextEncoderError,
    build_bank,
    clear_encoder_cache,
    embed_text_main,
    encode_texts,
    get_text_encoder,
    list_text_encoders,
    load_clip_text_tower,
    register_text_encoder,
    resolve_clip_weights,
)

__all__ = [
    "EmbeddingBank",
    "EmbeddingBankError",
    "MINILM_MODEL_ID",
    "ClipTextTower",
    "EncoderConfig",
    "EncoderWeightsUnavailable",
    "LoadedTextEncoder",
    "TextEncoderError",
    "build_bank",
    "clear_encoder_cache",
    "embed_text_main",
    "encode_texts",
    "get_text_encoder",
    "list_text_encoders",
    "load_clip_text_tower",
    "register_text_encoder",
    "resolve_clip_weights",
]
