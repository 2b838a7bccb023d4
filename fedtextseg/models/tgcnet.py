"""TGC-Net: report-guided 2D segmentation of chest X-rays (CLIP ViT + CNN, calibrated by the report's text).

Our design after Lin et al. 2025 (arXiv 2512.21135; the paper publishes no code):

* **Semantic-structural synergy encoder**: the open_clip ViT image tower gives semantic tokens from three of its
  blocks; a GroupNorm CNN gives structure at strides 2, 4, 8, 16. Adapters bring the ViT token grids to strides 4,
  8 and 16, where they are fused into the CNN stream (concat -> 1x1 conv -> residual 3x3 conv).
* **Domain-augmented text encoder**: the per-image report is tokenised inside the model and encoded by the CLIP
  text tower into token features. Glossary knowledge (``fedtextseg.text.glossary``) joins as extra tokens: every
  glossary definition is encoded once per forward (without gradient, so DP-SGD's per-sample gradients stay exact)
  and each image attends only to the definitions of the terms its report mentions. (Appending the definitions to
  the report itself would overflow CLIP's 77 tokens.)
  ``text_encoder="minilm"`` reads the report (and the definitions) through the packaged, pretrained MiniLM
  sentence encoder instead, frozen, word-piece features (``fedtextseg.text.sentence_tokens``): no CLIP text tower
  is built, and where no CLIP weights exist offline the report is still read by a real text encoder.
* **Vision-language calibration**: at strides 16, 8 and 4 of the decoder the text tokens first read the image
  (text calibration: cross-attention text -> image), then every pixel reads the calibrated text (cross-attention
  image -> text), then an MLP. An InfoNCE loss aligns the lesion-weighted pooled image embedding with the pooled
  report embedding over the batch (identical reports count as positives); it is returned as ``aux_loss``.
* **Parameter-efficient fine-tuning**: open_clip's ``nn.MultiheadAttention`` is rebuilt as four ``nn.Linear``
  (q/k/v/out, weights copied) so ``peft`` LoRA can target them and Opacus accepts them.

No BatchNorm, no ``nn.MultiheadAttention``. ``text_mode="none"`` is the image-only ablation: same network without
the text tower and the two cross-attentions. With DP-SGD set ``align_weight=0`` (the contrastive term couples the
samples of a batch). Named configs: ``tgcnet_tiny`` (tests), ``tgcnet_small`` (CPU), ``tgcnet_paper`` (ViT-B/16).

Federation (``param_groups``): the frozen CLIP weights are ``frozen_common`` (sent once per site by content hash; a
site builds the towers with ``pretrained="provided"`` and never loads CLIP weights itself); LoRA adapters, CNN,
adapters, fusion, calibration, text projection and decoder are ``shared``; the head's class rows are ``per_class``.
The CLIP parts live in ``clip_towers.py``, the 2D blocks in ``tgcnet_blocks.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedtextseg.errors import ConfigError
from fedtextseg.models.clip_towers import (CLIP_MEAN, CLIP_STD, PROVIDED, ClipTowers, PlainAttention,
                                           build_clip)
from fedtextseg.models.registry import config_from_dict, merge_config, register_family
from fedtextseg.models.tgcnet_blocks import (Calibration, Fuse, ResStage, TextIn, Up, VitAdapter,
                                             conv_gn)
from fedtextseg.params import ParamGroups, build_param_groups
from fedtextseg.vocab import get_vocabulary

__all__ = ["TGCNetConfig", "TGCNet", "PlainAttention", "build_clip", "PROVIDED"]

log = logging.getLogger(__name__)


@dataclass
class TGCNetConfig:
    """Everything that defines a TGC-Net (also recorded as ``model.config``)."""

    vocabulary: str = "chest-xray"
    image_size: int = 224
    clip_model: str | None = "ViT-B-16"  # open_clip name; None -> build from clip_cfg
    clip_cfg: dict | None = None  # custom open_clip config (embed_dim, vision_cfg, text_cfg), random init
    pretrained: str | None = "openai"  # tag (hub cache only), checkpoint path, None, or "provided" (caller loads)
    vit_layers: tuple = (3, 7, 11)  # ViT blocks feeding strides 4, 8, 16
    cnn_widths: tuple = (32, 64, 128, 256)  # CNN stages at strides 2, 4, 8, 16
    stem_width: int = 32  # full-resolution stem (last skip)
    text_dim: int = 256  # text tokens after projection
    heads: int = 8
    text_mode: str = "report"  # report | none (image-only ablation)
    text_encoder: str = "clip"  # clip: the CLIP text tower (LoRA) | minilm: the packaged pretrained MiniLM, frozen
    glossary: str | None = "chest_xray_v1"  # domain knowledge tokens; None = report only
    finetune: str = "lora"  # lora | full | frozen  (the CLIP towers)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "out_proj")
    align_weight: float = 0.1  # weight of the image-report InfoNCE term in aux_loss
    align_temperature: float = 0.07  # fixed (a learnable scale would be a raw parameter Opacus cannot handle)
    groups: int = 8  # GroupNorm groups (capped by the width)
    extra: dict = field(default_factory=dict)  # free-form notes kept with the config

    def __post_init__(self):
        self.vit_layers, self.cnn_widths, self.lora_targets = (tuple(v) for v in (self.vit_layers, self.cnn_widths,
                                                                                  self.lora_targets))

    def check(self) -> None:
        """Raise :class:`ConfigError` for inconsistent options."""
        if self.text_mode not in ("report", "none"):
            raise ConfigError(f"tgcnet: text_mode must be 'report' or 'none', got {self.text_mode!r}")
        if self.text_encoder not in ("clip", "minilm"):
            raise ConfigError(f"tgcnet: text_encoder must be 'clip' or 'minilm', got {self.text_encoder!r}")
        if self.finetune not in ("lora", "full", "frozen"):
            raise ConfigError(f"tgcnet: finetune must be 'lora', 'full' or 'frozen', got {self.finetune!r}")
        if len(self.vit_layers) != 3 or len(self.cnn_widths) != 4:
            raise ConfigError("tgcnet: vit_layers needs 3 block indices and cnn_widths 4 widths")
        if self.clip_model is None and not self.clip_cfg:
            raise ConfigError("tgcnet: give clip_model (an open_clip name) or clip_cfg (a custom config)")


# ----------------------------------------------------------------------------- the network
def _trim(ids: Tensor) -> Tensor:
    """Token ids [N, context] cut after the longest text's end-of-text token (the highest id, as open_clip finds it).

    Exact: CLIP's text transformer is causal, so a kept position never sees the padding that is cut. It makes
    the text tower (and the glossary definitions it encodes every step) ~3.5x cheaper for QaTa-length reports.
    """
    return ids[:, : int(ids.argmax(-1).max()) + 1]


class TGCNet(nn.Module):
    """``forward(image [B,1|3,H,W] in [0,1], task [B], captions list[str]) -> {"logits": [B,C,H,W], "aux_loss"}``."""

    spatial_dims = 2

    def __init__(self, config: TGCNetConfig | Mapping | None = None):
        super().__init__()
        cfg = config_from_dict(TGCNetConfig, config, where="tgcnet") if not isinstance(config, TGCNetConfig) else config
        cfg.check()
        self.config, self.with_text = cfg, cfg.text_mode == "report"
        self.sentences = None  # text_encoder="minilm": the frozen packaged MiniLM (fedtextseg.text.sentence_tokens)
        self.vocabulary = get_vocabulary(cfg.vocabulary)
        self.num_classes = self.vocabulary.num_classes
        clip, self.provenance = build_clip(cfg)
        vw, self.patch = clip.visual.transformer.width, clip.visual.patch_size[0]
        if max(cfg.vit_layers) >= len(clip.visual.transformer.resblocks):
            raise ConfigError(f"tgcnet: vit_layers {cfg.vit_layers} exceed the ViT's "
                              f"{len(clip.visual.transformer.resblocks)} blocks")
        tw, self.context_length = clip.transformer.width, clip.context_length
        towers = ClipTowers(clip, max(cfg.vit_layers), self.with_text and cfg.text_encoder == "clip")
        del clip  # unused heads (visual.proj, text_projection, logit_scale) and blocks are dropped
        if cfg.finetune == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=list(cfg.lora_targets), bias="none")
            self.clip = get_peft_model(towers, lora)
        else:
            self.clip = towers
            towers.requires_grad_(cfg.finetune == "full")
        g, (w1, w2, w3, w4), s = cfg.groups, cfg.cnn_widths, cfg.stem_width
        self.stem = nn.Sequential(conv_gn(1, s, g), conv_gn(s, s, g))
        self.stages = nn.ModuleList([ResStage(s, w1, g), ResStage(w1, w2, g), ResStage(w2, w3, g), ResStage(w3, w4, g)])
        self.adapters = nn.ModuleList([VitAdapter(vw, w, self.patch, st, g) for w, st in ((w2, 4), (w3, 8), (w4, 16))])
        self.fuse = nn.ModuleList([Fuse(w, g) for w in (w2, w3, w4)])
        self.calib = nn.ModuleList([Calibration(w, cfg.text_dim, cfg.heads, self.with_text) for w in (w4, w3, w2)])
        self.ups = nn.ModuleList([Up(w4, w3, g), Up(w3, w2, g), Up(w2, w1, g), Up(w1, s, g)])
        self.head = nn.Conv2d(s, self.num_classes, 1)
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.glossary = None
        self._knowledge_cache: tuple | None = None  # eval mode: (weights key, glossary features), see _knowledge
        if self.with_text and cfg.text_encoder == "minilm":
            from fedtextseg.text.sentence_tokens import WIDTH, sentence_tokens

            self.sentences = sentence_tokens()
            self.provenance.update(self.sentences.provenance)
            tw = WIDTH
        if self.with_text and self.sentences is None:
            import open_clip

            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)
        if self.with_text:
            self.text_in = TextIn(tw, cfg.text_dim)
            if cfg.align_weight > 0:  # unused layers would have no (per-sample) gradient
                self.img_embed, self.txt_embed = nn.Linear(w2, cfg.text_dim), nn.Linear(cfg.text_dim, cfg.text_dim)
            if cfg.glossary:
                from fedtextseg.text.glossary import Glossary

                self.glossary = Glossary.load(cfg.glossary)
                if self.sentences is None:  # the CLIP text tower encodes the definitions from their token ids
                    defs = [f"{t.term}: {t.definition}." for t in self.glossary.terms]
                    self.register_buffer("knowledge_ids", _trim(self.tokenizer(defs)), persistent=False)
                self.provenance.update(self.glossary.provenance())
        self.provenance.update(text_mode=cfg.text_mode, finetune=cfg.finetune, vocabulary=self.vocabulary.name,
                               vocabulary_hash=self.vocabulary.content_hash)

    @property
    def class_names(self) -> list[str]:
        """Output channels, in order: the vocabulary's classes (what a model file and a site's check read)."""
        return self.vocabulary.class_names

    @property
    def task_names(self) -> list[str]:
        """The vocabulary's tasks (a task prompt stands in for a missing report)."""
        return self.vocabulary.task_names

    @property
    def towers(self) -> ClipTowers:
        """The CLIP towers themselves (inside peft's wrapper when LoRA is on)."""
        return self.clip.base_model.model if self.config.finetune == "lora" else self.clip

    # ------------------------------------------------------------------ encoders
    def _vit_tokens(self, rgb: Tensor) -> tuple[list[Tensor], tuple[int, int]]:
        """Patch tokens of the tapped ViT blocks (class token dropped) and the token grid (h, w)."""
        v = self.towers.visual
        x = v.conv1(rgb)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls_pos, pos = v.positional_embedding[:1], v.positional_embedding[1:]
        side = int(math.isqrt(pos.shape[0]))
        if side * side != grid[0] * grid[1] or side != grid[0]:  # another input size: resample the position grid
            pos = F.interpolate(pos.T.reshape(1, -1, side, side), size=grid, mode="bicubic", align_corners=False)
            pos = pos.reshape(pos.shape[1], -1).T
        x = torch.cat([v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], 1)
        x = v.ln_pre(x + torch.cat([cls_pos, pos]).to(x.dtype))
        taken = {}
        for i, blk in enumerate(v.blocks):
            x = blk(x)
            if i in self.config.vit_layers:
                taken[i] = x[:, 1:]
        return [taken[i] for i in self.config.vit_layers], grid

    def _texts(self, captions: Sequence[str | None] | None, task: Tensor | None, b: int) -> list[str]:
        """One text per image: its report, or the site's task prompt where the report is missing."""
        if captions is not None and len(captions) != b:
            raise ValueError(f"tgcnet: {len(captions)} captions for a batch of {b} images")
        prompts = self.vocabulary.task_prompts()
        out = []
        for i in range(b):
            cap = captions[i] if captions is not None else None
            if not cap or not str(cap).strip():  # no report: fall back to the site's task prompt
                t = int(task[i]) if task is not None else self.vocabulary.task_index(self.vocabulary.default_task)
                cap = prompts[t]
            out.append(str(cap))
        return out

    def _encode_text(self, texts: list[str], device) -> tuple[Tensor, Tensor, int]:
        """(tokens [B, K, text_dim] before calibration, key mask [B, K], number of report tokens L)."""
        if self.sentences is not None:  # frozen pretrained MiniLM word-piece features (constants: no gradient)
            feats, mask = self.sentences.tokens(texts)
            feats, mask = feats.to(device), mask.to(device)
            b, length = mask.shape
            tokens = self.text_in(feats, 0)
        else:
            ids = _trim(self.tokenizer(texts)).to(device)
            b, length = ids.shape
            tokens = self.text_in(self.towers.text(ids), 0)
            mask = torch.arange(length, device=device)[None] <= ids.argmax(-1)[:, None]  # up to and with EOT
        if self.glossary is not None:
            k = self.text_in(self._knowledge().to(device)[None].expand(b, -1, -1), 1)  # batch-first, as Opacus needs
            names = [t.term for t in self.glossary.terms]
            present = torch.tensor([[n in set(self.glossary.terms_in(s)) for n in names] for s in texts],
                                   dtype=torch.bool, device=device)
            tokens, mask = torch.cat([tokens, k], 1), torch.cat([mask, present], 1)
        return tokens, mask, length

    def _knowledge(self) -> Tensor:
        """End-of-text features [G, width] of the glossary definitions, without gradient (fixed texts: no
        per-sample gradient through them under DP-SGD).

        Training recomputes them every step (the LoRA weights move). In eval mode they are reused while the text
        tower's weights are unchanged (same storage and version counters; ``load_state_dict`` and optimiser steps
        bump the counters): evaluation runs one image at a time, and the definitions cost more than the image.
        """
        if self.sentences is not None:  # frozen MiniLM: the definitions' sentence embeddings never change
            return self.sentences.pooled([f"{t.term}: {t.definition}." for t in self.glossary.terms])
        kid = self.knowledge_ids
        key = None
        if not self.training:
            key = (kid.device, torch.is_autocast_enabled(kid.device.type),
                   tuple((p.data_ptr(), p._version) for p in self.towers.text.parameters()))
            if self._knowledge_cache is not None and self._knowledge_cache[0] == key:
                return self._knowledge_cache[1]
        with torch.no_grad():
            k = self.towers.text(kid)[torch.arange(kid.shape[0], device=kid.device), kid.argmax(-1)]
        self._knowledge_cache = (key, k) if key is not None else None
        return k

    def _alignment(self, feat: Tensor, logits: Tensor, text: Tensor, mask: Tensor, texts: list[str]) -> Tensor:
        """Symmetric InfoNCE between lesion-weighted image features and the mean report token embedding."""
        w = F.adaptive_avg_pool2d(torch.sigmoid(logits.detach().float()).amax(1, keepdim=True), feat.shape[-2:])
        w = w + 1e-3
        img = (feat * w).sum((2, 3)) / w.sum((2, 3))
        m = mask.to(text.dtype)[..., None]
        txt = (text * m).sum(1) / m.sum(1)
        zi, zt = F.normalize(self.img_embed(img).float(), dim=-1), F.normalize(self.txt_embed(txt).float(), dim=-1)
        sim = zi @ zt.T / self.config.align_temperature
        same = torch.tensor([[a == c for c in texts] for a in texts], dtype=torch.float32, device=sim.device)
        target = same / same.sum(1, keepdim=True)
        loss = -(target * F.log_softmax(sim, 1)).sum(1).mean() - (target * F.log_softmax(sim.T, 1)).sum(1).mean()
        return 0.5 * loss

    # ------------------------------------------------------------------ forward
    def forward(self, image: Tensor, task: Tensor | None = None, captions: Sequence[str] | None = None) -> dict:
        """Logits [B, C, H, W] at the input size and the alignment ``aux_loss`` (0 without text)."""
        if image.dim() != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"tgcnet expects images [B, 1 or 3, H, W], got {tuple(image.shape)}")
        x = image.float()
        grey = x.mean(1, keepdim=True) if x.shape[1] == 3 else x
        rgb = (x.expand(-1, 3, -1, -1) - self.pixel_mean) / self.pixel_std
        p = self.patch
        if rgb.shape[-2] % p or rgb.shape[-1] % p:
            rgb = F.interpolate(rgb, size=(math.ceil(rgb.shape[-2] / p) * p, math.ceil(rgb.shape[-1] / p) * p),
                                mode="bilinear", align_corners=False)
        vit, grid = self._vit_tokens(rgb)
        skips = [self.stem(grey)]
        for i, stage in enumerate(self.stages):
            h = stage(skips[-1])
            skips.append(self.fuse[i - 1](h, self.adapters[i - 1](vit[i - 1], grid)) if i > 0 else h)
        text = mask = texts = None
        if self.with_text:
            texts = self._texts(captions, task, x.shape[0])
            text, mask, n_report = self._encode_text(texts, x.device)
            report, report_mask = text[:, :n_report], mask[:, :n_report]
        h = skips[4]
        for i in range(3):
            h, text = self.calib[i](h, text, mask)
            feat = h
            h = self.ups[i](h, skips[3 - i])
        logits = self.head(self.ups[3](h, skips[0]))
        aux = logits.new_zeros((), dtype=torch.float32)
        if self.with_text and self.config.align_weight > 0 and len(set(texts)) > 1:
            aux = self.config.align_weight * self._alignment(feat, logits, report, report_mask, texts)
        return {"logits": logits, "aux_loss": aux}

    def forward_batch(self, batch: Mapping[str, Any]) -> dict:
        """The engine's entry point: a pipeline batch with ``image``, ``task`` and (for reports) ``caption``."""
        captions = batch.get("caption")
        if isinstance(captions, str):
            captions = [captions] * batch["image"].shape[0]
        return self(batch["image"], batch.get("task"), captions)

    # ------------------------------------------------------------------ federation contract
    def param_groups(self) -> ParamGroups:
        """Frozen CLIP weights -> frozen_common; LoRA, CNN, fusion, calibration, decoder -> shared; head rows ->
        per_class (axis 0). Nothing is local."""
        params = dict(self.named_parameters())
        frozen = lambda n: n.startswith("clip.") and not (n in params and params[n].requires_grad)  # noqa: E731
        return build_param_groups(self, frozen_common=frozen, per_class={"head.weight": 0, "head.bias": 0},
                                  shared=lambda n: n.startswith(_SHARED_MODULES))

    def parameter_counts(self) -> dict[str, int]:
        """Trainable vs total parameters, overall and for the CLIP towers (peft's count when LoRA is on)."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if self.config.finetune == "lora":
            clip_trainable, clip_total = self.clip.get_nb_trainable_parameters()
        else:
            clip_total = sum(p.numel() for p in self.clip.parameters())
            clip_trainable = sum(p.numel() for p in self.clip.parameters() if p.requires_grad)
        return {"total": total, "trainable": trainable, "clip_total": clip_total, "clip_trainable": clip_trainable,
                "non_clip": total - clip_total}


# trained modules aggregated every round (CLIP's trainable parameters too: LoRA or fine-tuned towers)
_SHARED_MODULES = ("clip.", "stem.", "stages.", "adapters.", "img_embed.", "txt_embed.", "text_in.", "fuse.", "calib.",
                   "ups.")


# ----------------------------------------------------------------------------- named configurations
@register_family("tgcnet", config_class=TGCNetConfig)
def _create(name: str, config: dict, **overrides) -> TGCNet:
    """A named architecture (configs/model/<name>.yaml: tgcnet_tiny, tgcnet_small, tgcnet_paper) + ``overrides``
    (any TGCNetConfig field)."""
    cfg = merge_config(config, overrides, where=name)
    model = TGCNet(config_from_dict(TGCNetConfig, cfg, where=name))
    model.model_name = model.provenance["model"] = name
    return model
