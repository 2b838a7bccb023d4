"""The frozen DINOv2 slice encoder (through timm) and the per-volume feature cache.

:class:`DinoSliceEncoder` cuts a 3D patch ``[B, C, D, H, W]`` into its D axial slices, resizes each in-plane to
``14 * g`` (``g = max(1, round(H / 14))``: 96 -> 98 -> 7x7 tokens), repeats it to 3 channels, normalises it with
the ViT's mean/std and returns the tokens of the last ``layers`` blocks, concatenated:
``[B, layers * embed_dim, D, gh, gw]``.
It is frozen: no gradients, always in eval mode, never in an optimizer.

Weights (``DinoConfig.weights``): a local checkpoint path (timm or original DINOv2 format, .pth/.safetensors), or
``"hub"`` (timm ``pretrained=True``, which offline only works from the local Hugging Face cache), ``"provided"``
(the caller loads them, e.g. a federation site receiving the frozen_common group from the server), or ``None``.
When the hub cannot deliver, the encoder falls back to random weights with a loud warning; ``encoder.provenance``
records what was actually used, for the run metadata.

Feature cache: DINOv2 is frozen, so features can be computed once per preprocessed volume and cropped with each
training patch. Slices are independent along D (z-crops are exact); in-plane, the ViT attends over a whole slice, so
:func:`compute_volume_features` runs it on non-overlapping in-plane tiles the size of the training patch and
:func:`crop_features` only accepts tile-aligned crops of exactly one tile in-plane. Only crops commute with the cache:
intensity or in-plane spatial augmentation of the image requires recomputing the features (``dino_features=None``).
Features are stored as float16 by default (half the memory; relative error ~1e-3, the only inexactness); pass
``dtype=torch.float32`` for bit-level agreement with recomputation.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedtextseg.hashing import file_sha256
from fedtextseg.errors import ConfigError, FedTextSegError

__all__ = [
    "DinoConfig",
    "DinoSliceEncoder",
    "PretrainedWeightsWarning",
    "FeatureVolume",
    "compute_volume_features",
    "crop_features",
    "volume_feature_fn",
]

logger = logging.getLogger(__name__)


class PretrainedWeightsWarning(UserWarning):
    """Pretrained weights were asked for but could not be loaded; random weights are used instead."""


@dataclass
class DinoConfig:
    """The frozen DINOv2 branch. ``depth`` truncates the ViT (tiny test configs); ``layers`` = last n blocks used."""

    name: str = "vit_base_patch14_dinov2"
    depth: int | None = None
    layers: int = 3
    weights: str | None = None  # None (random), "hub", "provided" (loaded by the caller) or a checkpoint path
    enabled: bool = True
    slice_batch: int = 64  # slices per ViT call


class DinoSliceEncoder(nn.Module):
    """Frozen timm DINOv2 ViT applied slice by slice along the first spatial axis (see the module docstring)."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        import timm  # imported here: building the CNN-only ablation does not need timm

        self.config = config
        kwargs = dict(pretrained=False, num_classes=0, dynamic_img_size=True)
        if config.depth is not None:
            kwargs["depth"] = int(config.depth)
        try:
            self.vit = timm.create_model(config.name, **kwargs)
        except RuntimeError as exc:
            close = difflib.get_close_matches(config.name, timm.list_models("*dinov2*"), n=3, cutoff=0.4)
            raise ConfigError(f"dino.name: {exc}; try one of {close or timm.list_models('*dinov2*')[:4]}") from None
        depth = len(self.vit.blocks)
        if not 1 <= config.layers <= depth:
            raise ConfigError(f"dino.layers={config.layers} must be between 1 and the ViT depth {depth}")
        self.patch = int(self.vit.patch_embed.patch_size[0])
        self.embed_dim = int(self.vit.embed_dim)
        self.out_channels = config.layers * self.embed_dim
        self.slice_batch = max(1, int(config.slice_batch))
        cfg = self.vit.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1), False)
        self.provenance = self._load_weights(config)
        for p in self.vit.parameters():
            p.requires_grad_(False)
        self.vit.eval()

    # ------------------------------------------------------------------ weights
    def _load_weights(self, config: DinoConfig) -> dict:
        base = {"name": config.name, "depth": len(self.vit.blocks), "layers": config.layers,
                "hf_hub_id": self.vit.pretrained_cfg.get("hf_hub_id")}
        if config.weights is None:
            logger.warning("DINOv2 branch %s uses RANDOM weights (dino.weights=None): fine for tests and demos, "
                           "meaningless features for real training", config.name)
            return {**base, "weights": "random", "reason": "dino.weights=None"}
        if config.weights == "provided":
            logger.info("DINOv2 branch %s: weights provided by the caller (e.g. received from the server)",
                        config.name)
            return {**base, "weights": "provided"}
        if config.weights == "hub":
            try:
                import timm

                full = timm.create_model(config.name, pretrained=True, num_classes=0, dynamic_img_size=True)
                self._load_state(full.state_dict(), source="hub")
                return {**base, "weights": "hub"}
            except Exception as exc:  # offline without a cached copy, or any hub failure: random, loudly
                msg = (f"DINOv2 weights for {config.name} could not be loaded from the hub or the local Hugging Face "
                       f"cache ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); the DINOv2 branch uses RANDOM "
                       "weights. Set dino.weights to a local checkpoint file to use pretrained features.")
                logger.warning(msg)
                warnings.warn(msg, PretrainedWeightsWarning, stacklevel=3)
                return {**base, "weights": "random", "requested": "hub", "reason": msg}
        path = Path(config.weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"dino.weights: no such file {str(path)!r}; give a DINOv2 checkpoint file "
                              "(.pth/.safetensors, timm or original format), 'hub', or null for random weights")
        from timm.models import load_state_dict

        try:
            state = load_state_dict(str(path), use_ema=False, weights_only=True)
        except Exception as exc:
            raise FedTextSegError(f"{path}: cannot read DINOv2 checkpoint: {exc}") from exc
        self._load_state(state, source=str(path))
        return {**base, "weights": "file", "path": str(path), "sha256": file_sha256(path)}

    def _load_state(self, state: dict, source: str) -> None:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, self.vit)
        depth = len(self.vit.blocks)
        state = {k: v for k, v in state.items()
                 if not (k.startswith("blocks.") and int(k.split(".")[1]) >= depth) and not k.startswith("head.")}
        missing, unexpected = self.vit.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise FedTextSegError(f"{source}: not a checkpoint of {self.config.name}: missing keys {missing[:5]}, "
                                  f"unexpected keys {unexpected[:5]}")

    # ------------------------------------------------------------------ frozen behaviour
    def train(self, mode: bool = True) -> "DinoSliceEncoder":
        super().train(mode)
        self.vit.eval()  # frozen: never in training mode
        return self

    def grid(self, size: Sequence[int]) -> tuple[int, int]:
        """Token grid ``(gh, gw)`` for an in-plane size ``(H, W)``."""
        return tuple(max(1, round(n / self.patch)) for n in size[-2:])  # type: ignore[return-value]

    @torch.no_grad()
    def forward(self, image: Tensor) -> Tensor:
        """``[B, C, D, H, W]`` -> ``[B, layers * embed_dim, D, gh, gw]`` (several channels are averaged to one)."""
        b, c, d, h, w = image.shape
        gh, gw = self.grid((h, w))
        x = image if c in (1, 3) else image.mean(1, keepdim=True)
        slices = x.transpose(1, 2).reshape(b * d, x.shape[1], h, w).to(self.mean.dtype)
        if (h, w) != (gh * self.patch, gw * self.patch):
            slices = F.interpolate(slices, size=(gh * self.patch, gw * self.patch), mode="bilinear",
                                   align_corners=False)
        slices = (slices.expand(-1, 3, -1, -1) - self.mean) / self.std
        outs = []
        for chunk in slices.split(self.slice_batch):
            layers = self.vit.get_intermediate_layers(chunk, n=self.config.layers, reshape=True, norm=True)
            outs.append(torch.cat(list(layers), dim=1))
        feats = torch.cat(outs)  # [B*D, F, gh, gw]
        return feats.reshape(b, d, self.out_channels, gh, gw).transpose(1, 2).contiguous()

    def signature(self) -> str:
        """Identifies the frozen branch (architecture, layers used, weights) so caches are never mixed up."""
        params = list(self.vit.state_dict().items())
        key = tuple((t.data_ptr(), t._version) for _, t in params)
        if getattr(self, "_signature_key", None) != key:  # recomputed when weights are replaced or loaded
            h = hashlib.sha256(repr((self.config.name, len(self.vit.blocks), self.config.layers)).encode())
            for name, t in sorted(params):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._signature_key, self._signature = key, h.hexdigest()[:16]
        return self._signature


# ---------------------------------------------------------------------- the per-volume feature cache
@dataclass
class FeatureVolume:
    """DINOv2 features of a whole volume computed on in-plane tiles.

    ``features``: ``[F, D, ny * gh, nx * gw]`` for a volume padded in-plane to ``(ny * th, nx * tw)``;
    ``tile``: ``(th, tw)`` in voxels; ``grid``: ``(gh, gw)`` tokens per tile; ``volume_shape``: ``(D, H, W)`` unpadded.
    """

    features: Tensor
    tile: tuple[int, int]
    grid: tuple[int, int]
    volume_shape: tuple[int, int, int]
    signature: str

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def save(self, path: str | Path) -> None:
        meta = {k: v for k, v in asdict(self).items() if k != "features"}
        torch.save({"features": self.features, **meta}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "FeatureVolume":
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
            return cls(features=data["features"], tile=tuple(data["tile"]), grid=tuple(data["grid"]),
                       volume_shape=tuple(data["volume_shape"]), signature=data["signature"])
        except Exception as exc:
            raise FedTextSegError(f"{path}: not a DINOv2 feature cache ({exc}); delete it to recompute") from exc


def _encoder_of(model) -> DinoSliceEncoder:
    enc = model if isinstance(model, DinoSliceEncoder) else getattr(model, "dino", None)
    if not isinstance(enc, DinoSliceEncoder):
        raise ConfigError("this model has no DINOv2 branch (dino.enabled=False); there are no features to cache")
    return enc


@torch.no_grad()
def compute_volume_features(model, volume: Tensor, tile: Sequence[int], *, dtype: torch.dtype = torch.float16,
                            tiles_per_call: int = 4) -> FeatureVolume:
    """Features of ``volume`` (``[C, D, H, W]``, as the model sees it) on non-overlapping ``tile`` = ``(th, tw)``
    in-plane tiles (the training patch's in-plane size). H and W are zero-padded up to tile multiples.

    ``model`` is a CDPDNet or a :class:`DinoSliceEncoder`. Runs on the encoder's device, stores on the CPU.
    """
    enc = _encoder_of(model)
    volume = torch.as_tensor(volume)
    volume = volume if type(volume) is Tensor else volume.as_subclass(Tensor)  # e.g. a MONAI MetaTensor
    if volume.dim() != 4:
        raise FedTextSegError(f"volume must be [C, D, H, W], got shape {tuple(volume.shape)}")
    th, tw = (int(t) for t in tile)
    _, d, h, w = volume.shape
    ny, nx = math.ceil(h / th), math.ceil(w / tw)
    device = enc.mean.device
    padded = F.pad(volume.float(), (0, nx * tw - w, 0, ny * th - h)).to(device)
    gh, gw = enc.grid((th, tw))
    out = torch.empty(enc.out_channels, d, ny * gh, nx * gw, dtype=dtype)
    tiles = [(iy, ix) for iy in range(ny) for ix in range(nx)]
    for start in range(0, len(tiles), max(1, tiles_per_call)):
        group = tiles[start:start + max(1, tiles_per_call)]
        batch = torch.stack([padded[:, :, iy * th:(iy + 1) * th, ix * tw:(ix + 1) * tw] for iy, ix in group])
        feats = enc(batch).to("cpu", dtype)
        for (iy, ix), f in zip(group, feats):
            out[:, :, iy * gh:(iy + 1) * gh, ix * gw:(ix + 1) * gw] = f
    return FeatureVolume(out, (th, tw), (gh, gw), (d, h, w), enc.signature())


def crop_features(fv: FeatureVolume, start: Sequence[int], size: Sequence[int]) -> Tensor:
    """Features ``[F, pd, gh, gw]`` of the patch ``image[:, z0:z0+pd, y0:y0+ph, x0:x0+pw]`` of the (zero-padded)
    volume: exactly ``model.dino_features(patch[None])[0]`` up to the storage dtype.

    ``(ph, pw)`` must equal the cache's tile and ``y0, x0`` be multiples of it; any ``z0, pd`` inside the volume work.
    """
    (z0, y0, x0), (pd, ph, pw) = (tuple(int(v) for v in start), tuple(int(v) for v in size))
    (th, tw), (gh, gw) = fv.tile, fv.grid
    if (ph, pw) != (th, tw):
        raise FedTextSegError(f"feature cache was computed on {th}x{tw} in-plane tiles; a {ph}x{pw} patch cannot use "
                              f"it (crop patches of in-plane size {th}x{tw}, or recompute the cache)")
    if y0 % th or x0 % tw:
        raise FedTextSegError(f"patch start (y={y0}, x={x0}) is not aligned to the {th}x{tw} tiles of the feature "
                              f"cache; use starts that are multiples of the tile ({th}, {tw}) or recompute features")
    ty, tx = y0 // th, x0 // tw
    _, depth, rows, cols = fv.features.shape
    if z0 < 0 or pd < 1 or z0 + pd > depth or y0 < 0 or x0 < 0 or (ty + 1) * gh > rows or (tx + 1) * gw > cols:
        raise FedTextSegError(f"patch start {tuple(start)} size {tuple(size)} lies outside the cached volume "
                              f"(D={depth}, padded H={rows // gh * th}, W={cols // gw * tw})")
    return fv.features[:, z0:z0 + pd, ty * gh:(ty + 1) * gh, tx * gw:(tx + 1) * gw]


def volume_feature_fn(model, tile: Sequence[int], *, dtype: torch.dtype = torch.float16):
    """A ``feature_fn`` for the data pipeline (``FeatureHookd``): ``image [C, D, H, W]`` ->
    ``{"dino": [F, D, ny * g, nx * g], "dino_tile": (th, tw, g)}``.

    Exact only for training patches whose in-plane size *equals* the tile (one ViT pass per slice, as
    ``model.dino_features`` does); a patch spanning several tiles gets tiled features, which differ.
    """
    th, tw = (int(t) for t in tile)
    grid = _encoder_of(model).grid((th, tw))
    if grid[0] != grid[1]:
        raise ConfigError(f"tile {th}x{tw} gives a {grid[0]}x{grid[1]} token grid; the data pipeline needs square "
                          "token grids (use equal tile sides)")

    def feature_fn(image: Tensor) -> dict:
        fv = compute_volume_features(model, image, (th, tw), dtype=dtype)
        return {"dino": fv.features, "dino_tile": (th, tw, grid[0])}

    return feature_fn
