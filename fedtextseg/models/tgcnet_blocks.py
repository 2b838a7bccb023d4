"""TGC-Net's 2D building blocks: GroupNorm conv stages, ViT-token adapters, fusion, cross-attention, calibration.

No BatchNorm and no ``nn.MultiheadAttention`` anywhere (Opacus' per-sample gradients and small federated batches):
normalisation is GroupNorm / LayerNorm and attention is built from ``nn.Linear`` + ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResStage", "VitAdapter", "Fuse", "CrossAttention", "Calibration", "TextIn", "Up", "conv_gn"]


def _gn(c: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with as many groups as divide ``c`` (at most ``groups``)."""
    return nn.GroupNorm(math.gcd(c, groups), c)


def _conv(cin: int, cout: int, g: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    """Conv (no bias) -> GroupNorm -> GELU."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), _gn(cout, g), nn.GELU())


class ResStage(nn.Module):
    """Strided conv, then a residual 3x3 conv pair (GroupNorm, GELU)."""

    def __init__(self, cin: int, cout: int, g: int, stride: int = 2):
        super().__init__()
        self.down = _conv(cin, cout, g, stride)
        self.body = nn.Sequential(_conv(cout, cout, g), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _gn(cout, g))

    def forward(self, x: Tensor) -> Tensor:
        """Downsample, then add the residual body."""
        x = self.down(x)
        return F.gelu(x + self.body(x))


class VitAdapter(nn.Module):
    """ViT tokens [B, N, W] on a stride-``patch`` grid -> feature map [B, C, ...] at stride ``stride``."""

    def __init__(self, width: int, cout: int, patch: int, stride: int, g: int):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(width), nn.Linear(width, cout)
        ups = []
        for _ in range(int(round(math.log2(patch / stride)))):
            ups += [nn.ConvTranspose2d(cout, cout, 2, 2), _gn(cout, g), nn.GELU()]
        self.up = nn.Sequential(*ups)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """Tokens [B, N, W] on ``grid`` -> features [B, C, grid * patch / stride]."""
        x = self.proj(self.norm(tokens)).transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
        return self.up(x)


class Fuse(nn.Module):
    """CNN + ViT features -> CNN stream (concat, 1x1 conv, residual 3x3 conv)."""

    def __init__(self, c: int, g: int):
        super().__init__()
        self.mix, self.refine = _conv(2 * c, c, g, k=1), _conv(c, c, g)

    def forward(self, cnn: Tensor, vit: Tensor) -> Tensor:
        """Fuse ViT features (resized to the CNN's grid if needed) into the CNN features."""
        vit = vit if vit.shape[-2:] == cnn.shape[-2:] else F.interpolate(vit, cnn.shape[-2:], mode="bilinear")
        x = cnn + self.mix(torch.cat([cnn, vit], 1))
        return x + self.refine(x)


class CrossAttention(nn.Module):
    """Multi-head cross-attention with ``nn.Linear`` projections and a boolean key mask [B, K]."""

    def __init__(self, q_dim: int, kv_dim: int, dim: int, heads: int):
        super().__init__()
        self.heads = max(1, min(heads, dim // 8))
        self.q, self.k, self.v, self.o = (nn.Linear(q_dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim),
                                          nn.Linear(dim, q_dim))

    def forward(self, x: Tensor, ctx: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``x`` [B, N, q_dim] attends to ``ctx`` [B, K, kv_dim] (True in ``key_mask`` = attend)."""
        b, n, _ = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(ctx)), split(self.v(ctx)), attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


def _fourier_grid(b: int, h: int, w: int, like: Tensor, n_freq: int = 4) -> Tensor:
    """[B, h*w, 4*n_freq] sin/cos features of the normalised (y, x) position of every pixel."""
    ys, xs = torch.linspace(-1, 1, h, device=like.device), torch.linspace(-1, 1, w, device=like.device)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 1, 2)
    ang = grid * (math.pi * 2.0 ** torch.arange(n_freq, device=like.device)).view(1, -1, 1)
    return torch.cat([ang.sin(), ang.cos()], -1).reshape(1, h * w, -1).expand(b, -1, -1).to(like.dtype)


class Calibration(nn.Module):
    """One vision-language calibration stage on a feature map; without text only the MLP remains.

    Pixels first get an absolute position code: reports locate findings ("upper left lung"), so matching a pixel
    with the words naming its zone needs to know where the pixel is.
    """

    def __init__(self, c: int, text_dim: int, heads: int, with_text: bool):
        super().__init__()
        self.with_text = with_text
        self.pos = nn.Linear(16, c)
        if with_text:
            self.t_norm, self.t_img_norm = nn.LayerNorm(text_dim), nn.LayerNorm(c)
            self.text_reads_image = CrossAttention(text_dim, c, text_dim, heads)
            self.x_norm, self.ctx_norm = nn.LayerNorm(c), nn.LayerNorm(text_dim)
            self.image_reads_text = CrossAttention(c, text_dim, c, heads)
        self.mlp_norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x: Tensor, text: Tensor | None, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Position code, text reads image, image reads text, MLP; returns the map and the calibrated text."""
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.pos(_fourier_grid(b, h, w, t))
        if self.with_text:
            text = text + self.text_reads_image(self.t_norm(text), self.t_img_norm(t))
            t = t + self.image_reads_text(self.x_norm(t), self.ctx_norm(text), mask)
        t = t + self.mlp(self.mlp_norm(t))
        return t.transpose(1, 2).reshape(b, c, h, w), text


class TextIn(nn.Module):
    """CLIP text token features -> ``text_dim`` plus a segment embedding (0: report, 1: glossary knowledge)."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.norm, self.proj, self.segment = nn.LayerNorm(width), nn.Linear(width, dim), nn.Embedding(2, dim)

    def forward(self, tokens: Tensor, segment: int) -> Tensor:
        """Project tokens and add the segment embedding (0: report, 1: glossary knowledge)."""
        seg = torch.full(tokens.shape[:2], segment, dtype=torch.long, device=tokens.device)
        return self.proj(self.norm(tokens)) + self.segment(seg)


class Up(nn.Module):
    """Bilinear x2, 1x1 conv to the skip width, concat the skip, two 3x3 convs."""

    def __init__(self, cin: int, cskip: int, g: int):
        super().__init__()
        self.reduce, self.body = _conv(cin, cskip, g, k=1), nn.Sequential(_conv(2 * cskip, cskip, g),
                                                                          _conv(cskip, cskip, g))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """Upsample ``x`` to the skip's size and merge the skip."""
        x = self.reduce(F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False))
        return self.body(torch.cat([x, skip], 1))


conv_gn = _conv  # public name for the conv -> GroupNorm -> GELU unit (the network's stem)
