"""The open_clip parts TGC-Net builds on: CLIP ViT and text towers rebuilt for LoRA and Opacus, and their weights.

* :class:`PlainAttention` replaces open_clip's ``nn.MultiheadAttention`` by four ``nn.Linear`` (q/k/v/out, weights
  copied), so ``peft`` LoRA can target them and Opacus computes per-sample gradients for them;
* :class:`ClipTowers` keeps only what TGC-Net uses: the ViT up to its last tapped block and (with reports) the text
  transformer; the projection heads and ``logit_scale`` are dropped;
* :func:`build_clip` makes the open_clip model from a named architecture (pretrained weights from the hub cache or a
  file, never downloaded) or from a custom config (random init), or, with ``pretrained="provided"``, a random
  init whose weights the caller loads (what a federated site does with the server's frozen bundle).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PlainAttention", "TextTower", "ClipTowers", "build_clip", "CLIP_MEAN", "CLIP_STD", "PROVIDED"]

log = logging.getLogger(__name__)

PROVIDED = "provided"  # pretrained=...: the caller loads the frozen CLIP weights (federated sites, model files)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # preprocessing

class PlainAttention(nn.Module):
    """Drop-in for open_clip's ``nn.MultiheadAttention`` (batch-first) with separate q/k/v/out ``nn.Linear``."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        d, self.heads = mha.embed_dim, mha.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        with torch.no_grad():
            for i, lin in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                lin.weight.copy_(mha.in_proj_weight[i * d : (i + 1) * d])
                lin.bias.copy_(mha.in_proj_bias[i * d : (i + 1) * d])
            self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None):
        """Attention of ``q_x`` over ``k_x``/``v_x`` (default: self-attention); returns ``(out, None)`` like
        ``nn.MultiheadAttention``."""
        k_x = q_x if k_x is None else k_x
        v_x = q_x if v_x is None else v_x
        b, n, d = q_x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(q_x)), split(self.k_proj(k_x)), split(self.v_proj(v_x))
        mask = attn_mask.to(q.dtype) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), None


class TextTower(nn.Module):
    """The parts of open_clip's text transformer that produce token features (no projection head)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.token_embedding, self.positional_embedding = clip.token_embedding, clip.positional_embedding
        self.transformer, self.ln_final = clip.transformer, clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        """Token ids [B, L] -> token features [B, L, width] (causal)."""
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        return self.ln_final(self.transformer(x, attn_mask=self.attn_mask[: ids.shape[1], : ids.shape[1]]))


class ClipTowers(nn.Module):
    """The CLIP parts TGC-Net uses: the ViT (up to its last used block) and, with text, the text tower."""

    def __init__(self, clip: nn.Module, last_block: int, with_text: bool):
        super().__init__()
        v = clip.visual
        self.visual = nn.Module()
        self.visual.conv1, self.visual.ln_pre = v.conv1, v.ln_pre
        self.visual.class_embedding, self.visual.positional_embedding = v.class_embedding, v.positional_embedding
        self.visual.blocks = nn.ModuleList(v.transformer.resblocks[: last_block + 1])
        self.text = TextTower(clip) if with_text else None
        for blk in list(self.modules()):
            if isinstance(getattr(blk, "attn", None), nn.MultiheadAttention):
                blk.attn = PlainAttention(blk.attn)


class _DropRandomInitNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded" record (logged on the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init(active: bool):
    """While building a model whose weights the caller provides, hide open_clip's random-init notice."""
    if not active:
        yield
        return
    filt, root = _DropRandomInitNotice(), logging.getLogger()
    handlers = [root, *root.handlers]
    for h in handlers:
        h.addFilter(filt)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(filt)


def build_clip(cfg: Any) -> tuple[nn.Module, dict]:
    """An open_clip CLIP model per ``cfg`` (a :class:`~fedtextseg.models.tgcnet.TGCNetConfig`) and where its weights
    came from; never downloads.

    ``cfg.pretrained``: an open_clip tag looked up in the hub cache, a checkpoint path, ``None`` (random init) or
    ``"provided"``: random init, quietly, because the caller loads the frozen weights afterwards (a federated site
    receives them from the server in the frozen bundle; a model file carries them). Missing pretrained weights ->
    random init with a loud warning, recorded in the provenance. A random init is seeded, so it is identical in
    every process (and at every site).
    """
    import open_clip

    prov: dict[str, Any] = {"clip_model": cfg.clip_model or "custom", "library": f"open_clip {open_clip.__version__}"}
    provided = cfg.pretrained == PROVIDED
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if cfg.clip_model is None:
            c = cfg.clip_cfg
            vision = dict(c["vision_cfg"], image_size=cfg.image_size)
            clip = open_clip.model.CLIP(c["embed_dim"], vision, dict(c["text_cfg"]))
            if provided:
                prov.update(clip_weights=PROVIDED, loaded_by="the caller (frozen bundle or model file)")
            else:
                prov.update(clip_weights="random-init", reason="custom config (tests / small models)")
            return clip, prov
        from fedtextseg.models.dinov2 import PretrainedWeightsWarning
        from fedtextseg.text.encoders import EncoderWeightsUnavailable, resolve_clip_weights

        weights = {"path": None, "quick_gelu": False}
        if cfg.pretrained is not None and not provided:
            try:
                weights = resolve_clip_weights(cfg.clip_model, cfg.pretrained)
            except EncoderWeightsUnavailable as exc:
                msg = (f"TGC-Net: CLIP {cfg.clip_model} weights {cfg.pretrained!r} not found ({exc.missing}); "
                       "USING RANDOM-INIT CLIP: results will not reflect a pretrained model")
                warnings.warn(msg, PretrainedWeightsWarning, stacklevel=3)
                log.warning(msg)
                prov["reason"] = exc.missing
        with _quiet_random_init(provided):  # "provided": open_clip's "no pretrained weights" line would mislead
            clip = open_clip.create_model(cfg.clip_model, pretrained=weights["path"], force_image_size=cfg.image_size,
                                          force_quick_gelu=weights["quick_gelu"], pretrained_text=False)
    if provided:
        prov.update(clip_weights=PROVIDED, pretrained=None, loaded_by="the caller (frozen bundle or model file)")
        return clip, prov
    prov["clip_weights"] = weights["path"] or "random-init"
    prov["pretrained"] = cfg.pretrained if weights["path"] else None
    return clip, prov
