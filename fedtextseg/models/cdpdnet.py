"""CDPDNet (Wu et al. 2025): a text-prompted 3D CT segmentation network with a frozen DINOv2 prior.

An nnU-Net-style 3D CNN (Conv3d + InstanceNorm + LeakyReLU, strided-conv down, transposed-conv up, skips) fused at
``fusion_stages`` with frozen DINOv2 slice features through windowed cross-attention (queries: DINO, keys/values: CNN),
conditioned on the *sample's own* task text by FiLM (bottleneck and every skip) and TTPG, with a head that generates
one sigmoid channel per vocabulary class from the class text (plus zero-initialised per-class residual rows).
See Wu et al. 2025 (arXiv 2505.18958); the public code's per-batch task id and BatchNorm adaptor are not repeated here.

    model = create_model("cdpdnet_tiny", class_embeddings=ce, task_embeddings=te, class_names=cn, task_names=tn)
    logits = model(image, task)                   # image [B, 1, D, H, W], task LongTensor [B] -> [B, C, D, H, W]
    logits = model(image, task, dino_features=f)  # f = model.dino_features(image), e.g. from the feature cache

``fusion_stages`` are 0-based encoder stage indices (stage 0 = full resolution): the paper's (2, 3, 4) are the
stages of widths 128/256/320. ``text_conditioning=False`` is the "no text / no TTPG" ablation (plain per-class head);
``dino.enabled=False`` is the CNN+text ablation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedtextseg.errors import ConfigError, FedTextSegError, PatchSizeError
from fedtextseg.models.blocks import (ConvStage, FiLM, TaskPromptGenerator, TextDrivenHead, WindowCrossAttention3d,
                                      as_triple)
from fedtextseg.models.dinov2 import DinoConfig, DinoSliceEncoder
from fedtextseg.models.registry import config_from_dict, merge_config, register_family
from fedtextseg.params import ParamGroups, build_param_groups, norm_parameter_names
from fedtextseg.vocab import UnknownClassError, UnknownTaskError, get_vocabulary, normalize_name

__all__ = ["CDPDNetConfig", "CDPDNet", "centred_text", "text_centre", "coordinate_grid"]


@dataclass
class CDPDNetConfig:
    """Architecture of a CDPDNet; defaults are the paper's sizes."""

    in_channels: int = 1
    widths: Sequence[int] = (32, 64, 128, 256, 320, 320)
    strides: Sequence = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    kernels: Sequence = ((1, 3, 3), 3, 3, 3, 3, 3)
    fusion_stages: Sequence[int] = (2, 3, 4)
    attn_heads: int = 4
    attn_window: int = 3
    attn_blocks: int = 2
    attn_mlp_ratio: float = 2.0
    adaptor_kernel: int = 3
    text_dim: int = 256
    text_conditioning: bool = True
    local_norms: bool = False
    coordinate_axes: Sequence[int] = ()  # volume axes given a coordinate input channel each (-1..1 across the body)
    patch_size: Sequence[int] = (96, 96, 96)  # default training / sliding-window patch (D, H, W)
    vocab: str = "abdomen-ct"
    dino: DinoConfig = field(default_factory=DinoConfig)

    def __post_init__(self):
        self.dino = config_from_dict(DinoConfig, self.dino, where="dino")
        self.widths = tuple(int(w) for w in self.widths)
        n = len(self.widths)
        self.strides = tuple(as_triple(s, f"strides[{i}]") for i, s in enumerate(self.strides))
        self.kernels = tuple(as_triple(k, f"kernels[{i}]") for i, k in enumerate(self.kernels))
        if n < 2 or len(self.strides) != n or len(self.kernels) != n:
            raise ConfigError(f"widths, strides and kernels need one entry per stage (at least 2): got "
                              f"{n}, {len(self.strides)}, {len(self.kernels)}")
        self.fusion_stages = tuple(sorted({int(s) for s in self.fusion_stages}))
        bad = [s for s in self.fusion_stages if not 0 <= s < n]
        if bad:
            raise ConfigError(f"fusion_stages {bad} out of range: stages are 0..{n - 1} (0-based)")
        for s in self.fusion_stages if self.dino.enabled else ():
            if self.widths[s] % self.attn_heads:
                raise ConfigError(f"width {self.widths[s]} of fusion stage {s} is not divisible by "
                                  f"attn_heads={self.attn_heads}")
        self.patch_size = as_triple(self.patch_size, "patch_size")
        self.coordinate_axes = tuple(int(a) for a in self.coordinate_axes)
        if len(set(self.coordinate_axes)) != len(self.coordinate_axes) or any(a not in (0, 1, 2)
                                                                             for a in self.coordinate_axes):
            raise ConfigError(f"coordinate_axes must be distinct volume axes among 0, 1, 2; got {self.coordinate_axes}")

    def to_dict(self) -> dict:
        return asdict(self)


class CDPDNet(nn.Module):
    """See the module docstring. The text bank (``[C, E]`` class and ``[T, E]`` task embeddings, frozen) is given
    directly; any keyword of :class:`CDPDNetConfig` configures the architecture (or pass ``config=``)."""

    def __init__(self, class_embeddings: Tensor, task_embeddings: Tensor, class_names: Sequence[str],
                 task_names: Sequence[str], config: CDPDNetConfig | None = None, **overrides):
        super().__init__()
        if config is not None and overrides:
            raise ConfigError("pass either config= or individual options, not both")
        cfg = config if config is not None else config_from_dict(CDPDNetConfig, overrides, where="cdpdnet")
        self.config = cfg
        ce, te = torch.as_tensor(class_embeddings).float(), torch.as_tensor(task_embeddings).float()
        if ce.dim() != 2 or te.dim() != 2 or ce.shape[1] != te.shape[1]:
            raise ConfigError(f"text bank: class embeddings [C, E] and task embeddings [T, E] with the same E; got "
                              f"{tuple(ce.shape)} and {tuple(te.shape)}")
        if len(class_names) != ce.shape[0] or len(task_names) != te.shape[0]:
            raise ConfigError(f"text bank: {len(class_names)} class names for {ce.shape[0]} class embeddings, "
                              f"{len(task_names)} task names for {te.shape[0]} task embeddings")
        if cfg.text_conditioning and te.shape[0] == 0:
            raise ConfigError("text_conditioning=True needs at least one task embedding")
        self.register_buffer("class_embeddings", ce)
        self.register_buffer("task_embeddings", te)
        # the centres the text conditions are taken relative to (see centred_text): fixed with the bank the model is
        # built from, so a class added later (set_class_bank) leaves every other class's head as it was
        self.register_buffer("class_text_centre", text_centre(ce))
        self.register_buffer("task_text_centre", text_centre(te))
        self._set_names(class_names, task_names)
        self.model_name = "cdpdnet"
        w, text, emb = cfg.widths, cfg.text_conditioning, ce.shape[1]
        n = len(w)
        self.divisor = tuple(math.prod(s[a] for s in cfg.strides) for a in range(3))

        chans = (cfg.in_channels + len(cfg.coordinate_axes), *w)
        self.encoder = nn.ModuleList(ConvStage(chans[i], w[i], cfg.kernels[i], cfg.strides[i]) for i in range(n))
        self.dino = DinoSliceEncoder(cfg.dino) if cfg.dino.enabled else None
        if self.dino is not None:
            f = self.dino.out_channels
            self.adaptor_mix = nn.Conv3d(f, f, (3, 1, 1), padding=(1, 0, 0), groups=f, bias=False)  # across slices
            k = cfg.adaptor_kernel
            self.adaptors = nn.ModuleDict({str(s): nn.Sequential(
                nn.Conv3d(f, w[s], k, padding=k // 2, bias=False), nn.InstanceNorm3d(w[s], affine=True), nn.ReLU())
                for s in cfg.fusion_stages})
            self.fusion = nn.ModuleDict({str(s): nn.ModuleList(
                WindowCrossAttention3d(w[s], cfg.attn_heads, cfg.attn_window, shifted=j % 2 == 1,
                                       mlp_ratio=cfg.attn_mlp_ratio) for j in range(cfg.attn_blocks))
                for s in cfg.fusion_stages})
        if text:
            self.task_proj = nn.Sequential(nn.Linear(emb, cfg.text_dim), nn.ReLU())
            self.class_proj = nn.Sequential(nn.Linear(emb, cfg.text_dim), nn.ReLU())
            self.films = nn.ModuleList(FiLM(cfg.text_dim, w[i]) for i in range(n))  # skips 0..n-2, bottleneck n-1
            self.ttpg = TaskPromptGenerator(w[-1], te.shape[0], cfg.text_dim)
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in reversed(range(n - 1)):
            c_in = w[i + 1] + (1 if text and i == n - 2 else 0)  # the bottleneck carries the dynamic prompt
            self.up.append(nn.ConvTranspose3d(c_in, w[i], cfg.strides[i + 1], cfg.strides[i + 1], bias=False))
            self.decoder.append(ConvStage(2 * w[i], w[i], cfg.kernels[i], 1))
        self.head = TextDrivenHead(w[0], ce.shape[0], cfg.text_dim if text else None)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) and not name.startswith("dino."):
                nn.init.kaiming_normal_(m.weight, a=0.01)  # nnU-Net's He init
        self.check_patch_size(cfg.patch_size)
        self.provenance = {
            "model": self.model_name,
            "dino": dict(self.dino.provenance) if self.dino is not None else {"enabled": False},
            "text_bank": {"num_classes": ce.shape[0], "num_tasks": te.shape[0], "dim": emb},
        }

    # ------------------------------------------------------------------ names
    def _set_names(self, class_names, task_names) -> None:
        self.class_names, self.task_names = list(class_names), list(task_names)
        self.num_classes, self.num_tasks = len(self.class_names), len(self.task_names)
        self._class_lookup = {normalize_name(n): i for i, n in enumerate(self.class_names)}
        self._task_lookup = {normalize_name(n): i for i, n in enumerate(self.task_names)}

    def class_index(self, name: str) -> int:
        """Output channel of a class, by any vocabulary name or synonym (``"IVC"`` -> channel of postcava)."""
        key = normalize_name(name)
        if key not in self._class_lookup:
            vocab = get_vocabulary(self.config.vocab)
            key = vocab.canonical(name)  # raises UnknownClassError with the closest names
            if key in vocab.composites:
                raise UnknownClassError(f"{name!r} is a group of classes {list(vocab.composites[key])}; name one")
            if key not in self._class_lookup:
                raise UnknownClassError(f"class {key!r} is in vocabulary {vocab.name!r} but not in this model's text "
                                        f"bank ({self.num_classes} classes); add it with set_class_bank()")
        return self._class_lookup[key]

    def task_index(self, name: str) -> int:
        """Index of a task (dataset) by name or alias (``"msd liver"`` -> LiTS)."""
        key = normalize_name(name)
        if key not in self._task_lookup:
            key = get_vocabulary(self.config.vocab).task(name).name  # raises UnknownTaskError
            if key not in self._task_lookup:
                raise UnknownTaskError(f"task {key!r} is not in this model's text bank: {self.task_names}")
        return self._task_lookup[key]

    @torch.no_grad()
    def set_class_bank(self, class_embeddings: Tensor, class_names: Sequence[str]) -> None:
        """Replace the class text bank (e.g. with classes added); residual rows follow their class by name and new
        classes start from their text-generated head alone."""
        ce = torch.as_tensor(class_embeddings, dtype=torch.float32, device=self.class_embeddings.device)
        if ce.dim() != 2 or ce.shape[1] != self.class_embeddings.shape[1] or ce.shape[0] != len(class_names):
            raise ConfigError(f"new class bank must be [{len(class_names)}, {self.class_embeddings.shape[1]}], "
                              f"got {tuple(ce.shape)}")
        self.head.residual.remap(self.class_names, list(class_names))
        self.class_embeddings = ce
        self._set_names(class_names, self.task_names)
        self.provenance["text_bank"]["num_classes"] = self.num_classes

    # ------------------------------------------------------------------ sizes
    @property
    def patch_size(self) -> tuple[int, int, int]:
        """The configured default training / sliding-window patch (D, H, W)."""
        return tuple(self.config.patch_size)  # type: ignore[return-value]

    def check_patch_size(self, size: Sequence[int]) -> tuple[int, int, int]:
        """``size`` (D, H, W) as a tuple if the network can take it, else a PatchSizeError saying which sizes work."""
        size = tuple(int(s) for s in size)
        if len(size) != 3:
            raise PatchSizeError(f"patch size must be (D, H, W), got {size}")
        bad = [f"axis {a}: {n} -> use {max(d, n // d * d)} or {(n // d + 1) * d}"
               for a, (n, d) in enumerate(zip(size, self.divisor)) if n % d or n <= 0]
        if bad:
            raise PatchSizeError(f"patch size {size} does not fit this network: each axis must be a multiple of its total "
                              f"stride {self.divisor} ({'; '.join(bad)})")
        if math.prod(n // d for n, d in zip(size, self.divisor)) < 2:
            raise PatchSizeError(f"patch size {size} leaves a 1-voxel bottleneck (instance norm needs more); use at least "
                              f"{tuple(2 * d if a == 0 else d for a, d in enumerate(self.divisor))}")
        return size

    # ------------------------------------------------------------------ forward
    def dino_features(self, image: Tensor) -> Tensor:
        """The frozen part: ``[B, C, D, H, W]`` -> ``[B, F, D, gh, gw]`` (no gradients)."""
        if self.dino is None:
            raise ConfigError("this CDPDNet has no DINOv2 branch (dino.enabled=False)")
        return self.dino(image)

    def _task_tensor(self, task, batch: int, device) -> Tensor:
        if task is None:
            raise ConfigError("CDPDNet needs the task of every sample: forward(image, task) with task a LongTensor "
                              f"[B] of task indices ({', '.join(self.task_names)}); see model.task_index(name)")
        if isinstance(task, str) or (isinstance(task, (list, tuple)) and task and isinstance(task[0], str)):
            names = [task] if isinstance(task, str) else list(task)
            task = [self.task_index(t) for t in names]
        task = torch.as_tensor(task, dtype=torch.long, device=device)
        task = task.expand(batch) if task.dim() == 0 else task
        if tuple(task.shape) != (batch,):
            raise ConfigError(f"task must hold one task index per sample ({batch}), got shape {tuple(task.shape)}")
        if bool((task < 0).any() or (task >= self.num_tasks).any()):
            raise ConfigError(f"task indices {task.tolist()} out of range: this model has {self.num_tasks} tasks")
        return task

    def forward(self, image: Tensor, task: Tensor | None = None, dino_features: Tensor | None = None) -> Tensor:
        """``image [B, in_channels, D, H, W]``, ``task [B]`` -> logits ``[B, num_classes, D, H, W]`` (sigmoid each).

        ``dino_features`` (``model.dino_features(image)``, e.g. cropped from the feature cache) skips the ViT.
        """
        channels = self.config.in_channels + self.input_extras
        if image.dim() != 5 or image.shape[1] != channels:
            extra = " (image + coordinate channels: see add_coordinates)" if self.input_extras else ""
            raise ConfigError(f"expected image [B, {channels}, D, H, W]{extra}, got {tuple(image.shape)}")
        self.check_patch_size(image.shape[2:])
        b = image.shape[0]
        task_cond = class_cond = None
        if self.config.text_conditioning:
            task = self._task_tensor(task, b, image.device)
            task_cond = self.task_proj(centred_text(self.task_embeddings[task], self.task_text_centre))  # [B, dim]
            class_cond = self.class_proj(centred_text(self.class_embeddings, self.class_text_centre)
                                         .expand(b, -1, -1))  # batch-first for DP-SGD
        ctx = self._dino_context(image, dino_features)
        skips, x = [], image
        for i, stage in enumerate(self.encoder):
            x = stage(x)
            if ctx is not None and str(i) in self.fusion:
                c = F.interpolate(self.adaptors[str(i)](ctx), size=x.shape[2:], mode="trilinear", align_corners=False)
                for block in self.fusion[str(i)]:
                    x = block(x, c)
            skips.append(x)
        x = skips.pop()
        if task_cond is not None:
            x = self.films[-1](x, task_cond)
            x = torch.cat([x, self.ttpg(x, task, task_cond)], dim=1)
        for j, (up, block) in enumerate(zip(self.up, self.decoder)):
            skip = skips[-1 - j]
            if task_cond is not None:
                skip = self.films[len(skips) - 1 - j](skip, task_cond)
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x, class_cond)

    def forward_batch(self, batch: Mapping[str, Any]) -> dict:
        """The engine's entry point: a pipeline batch with ``image``, ``task`` and optionally cached ``dino``; with
        coordinates, training crops place themselves by ``crop_start`` and ``volume_shape``."""
        image = batch["image"]
        if self.input_extras and image.shape[1] == self.config.in_channels:
            if "crop_start" not in batch or "volume_shape" not in batch:
                raise ConfigError("this CDPDNet has coordinate channels: a batch of crops needs crop_start and "
                                  "volume_shape (the training pipeline's crops carry them), or pass the image with "
                                  "its coordinates (add_coordinates on the whole volume, then crop)")
            grid = coordinate_grid(batch["crop_start"], image.shape[2:], batch["volume_shape"], image.device)
            image = torch.cat([image, grid[:, list(self.config.coordinate_axes)].to(image.dtype)], dim=1)
        return {"logits": self(image, batch.get("task"), batch.get("dino"))}

    @property
    def input_extras(self) -> int:
        """Channels the model adds to an image itself (one per coordinate axis, or none)."""
        return len(self.config.coordinate_axes)

    def add_coordinates(self, volume: Tensor) -> Tensor:
        """``[B, in_channels, D, H, W]`` whole volumes -> the same with their coordinate channels appended (identity
        without coordinates): what sliding-window inference slides over, so every window knows where it lies."""
        if not self.input_extras:
            return volume
        b, shape = volume.shape[0], volume.shape[2:]
        start = torch.zeros(b, 3, dtype=torch.long)
        grid = coordinate_grid(start, shape, torch.as_tensor([tuple(shape)] * b), volume.device)
        return torch.cat([volume, grid[:, list(self.config.coordinate_axes)].to(volume.dtype)], dim=1)

    def _dino_context(self, image: Tensor, dino_features: Tensor | None) -> Tensor | None:
        if self.dino is None or not self.fusion:
            return None
        if dino_features is None:
            dino_features = self.dino(image[:, : self.config.in_channels])  # the scan, not its coordinates
        else:
            gh, gw = self.dino.grid(image.shape[-2:])
            want = (image.shape[0], self.dino.out_channels, image.shape[2], gh, gw)
            if tuple(dino_features.shape) != want:
                raise FedTextSegError(f"dino_features has shape {tuple(dino_features.shape)}; for this image it must "
                                      f"be {want} (model.dino_features(image), or a crop of the feature cache)")
        return self.adaptor_mix(dino_features.to(self.adaptor_mix.weight.dtype))

    # ------------------------------------------------------------------ federation / engine support
    def param_groups(self) -> ParamGroups:
        """DINOv2 + text bank: frozen_common; head residual rows: per_class (axis 0); norms: local if local_norms."""
        local = norm_parameter_names(self, exclude_prefixes=("dino.",)) if self.config.local_norms else set()
        return build_param_groups(
            self, frozen_common=lambda n: n.startswith("dino.") or n in _TEXT_BUFFERS,
            per_class={"head.residual.weight": 0, "head.residual.bias": 0}, local=local.__contains__,
            shared=lambda n: n.startswith(_SHARED_MODULES))

    def to(self, *args, **kwargs):
        """``nn.Module.to``; a ``memory_format`` applies to the 3D CNN only (the ViT's 2D weights cannot take it)."""
        device, dtype, non_blocking, fmt = torch._C._nn._parse_to(*args, **kwargs)
        if fmt is None or self.dino is None:
            return super().to(*args, **kwargs)
        super().to(device=device, dtype=dtype, non_blocking=non_blocking)
        for name, child in self.named_children():
            if name != "dino":
                child.to(memory_format=fmt)
        return self


def coordinate_grid(start: Tensor, size: Sequence[int], volume_shape: Tensor, device=None) -> Tensor:
    """``[B, 3, *size]``: the position of every voxel of crops starting at ``start [B, 3]`` in volumes of
    ``volume_shape [B, 3]``, scaled to -1..1 along each axis of the volume (MONAI's ``AddCoordinateChannels``
    convention, but for a crop of it). The pipeline orients every volume the same way (``data.preprocess.orientation``)
    and crops it to the body, so along the left-right axis these are body coordinates: the patient's left and right
    differ in sign, which lets one channel learn "left kidney" and another "right kidney" from 32^3 crops that show one
    kidney at a time. Along the body's long axis the scan range decides the extent (a kidney's normalised height was
    -0.43 at one synthetic hospital and -0.11 at another), and a network given that coordinate learnt positions that
    did not transfer (pooled, unseen hospital: kidneys 0.00 at 1000 steps against 0.26/0.57 without coordinates); so a
    model takes only the axes its ``coordinate_axes`` names. The demo names none: with the left-right axis alone the
    kidneys stayed at 0.00 on the unseen hospital too (docs/learning_speed.md)."""
    start = torch.as_tensor(start, dtype=torch.float32, device=device).reshape(-1, 3)
    extent = torch.as_tensor(volume_shape, dtype=torch.float32, device=device).reshape(-1, 3)
    axes = []
    for a, n in enumerate(size):
        idx = start[:, a : a + 1] + torch.arange(int(n), dtype=torch.float32, device=device)  # [B, n]
        axes.append(2 * idx / (extent[:, a : a + 1] - 1).clamp_min(1) - 1)
    d, h, w = (int(n) for n in size)
    b = start.shape[0]
    return torch.stack([axes[0][:, :, None, None].expand(b, d, h, w), axes[1][:, None, :, None].expand(b, d, h, w),
                        axes[2][:, None, None, :].expand(b, d, h, w)], dim=1)


_TEXT_BUFFERS = ("class_embeddings", "task_embeddings", "class_text_centre", "task_text_centre")
# the trained modules every round aggregates (the head's controller too; its residual rows are per-class)
_SHARED_MODULES = ("encoder.", "decoder.", "up.", "fusion.", "adaptors.", "adaptor_mix.", "films.", "ttpg.",
                   "class_proj.", "task_proj.", "head.")


def text_centre(embeddings: Tensor) -> Tensor:
    """The mean ``[E]`` of a bank's prompt embeddings ``[N, E]`` (zeros for a bank of fewer than two: nothing to
    centre on)."""
    if embeddings.shape[0] < 2:
        return embeddings.new_zeros(embeddings.shape[1])
    return embeddings.mean(dim=0)


def centred_text(embeddings: Tensor, centre: Tensor) -> Tensor:
    """Prompt embeddings ``[N, E]`` minus the bank's mean ``centre`` (:func:`text_centre`), re-normalised to unit
    length.

    Every class prompt shares its template ("A computerized tomography of a ..."), so raw embeddings are nearly
    parallel: mean pairwise cosine 0.87 for the real CLIP ViT-B/32 bank, 0.57 for the packaged MiniLM one. Heads and
    FiLM generated from them start out (almost) the same for every class, and the one-batch overfit test stalled at
    0.55 mean Dice with several organs near 0 where a plain U-Net reaches 0.97; centred, the classes differ from the
    first step and the same test reaches 0.94. The bank and its centre are frozen common parts, identical at every
    site."""
    centred = embeddings - centre.to(embeddings.dtype)
    return centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-6)


# ---------------------------------------------------------------------- named configurations
@register_family("cdpdnet", config_class=CDPDNetConfig)
def _create_cdpdnet(name: str, config: dict, *, class_embeddings=None, task_embeddings=None, class_names=None,
                    task_names=None, **overrides) -> CDPDNet:
    """A named architecture (configs/model/<name>.yaml: cdpdnet_paper, cdpdnet_small, cdpdnet_tiny) + overrides."""
    if class_embeddings is None or task_embeddings is None or class_names is None or task_names is None:
        raise ConfigError(f"{name} needs the frozen text bank: pass class_embeddings [C, E], task_embeddings [T, E], "
                          "class_names and task_names (an embedding bank from fedtextseg.text)")
    cfg = merge_config(config, overrides, where=name)
    model = CDPDNet(class_embeddings, task_embeddings, class_names, task_names, **cfg)
    model.model_name = model.provenance["model"] = name
    return model
