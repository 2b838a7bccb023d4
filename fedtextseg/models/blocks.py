"""Building blocks shared by the segmentation networks: conv stages, FiLM, windowed cross-attention, text heads.

Every block is DP-SGD compatible: no BatchNorm, no ``nn.MultiheadAttention``, and every trainable module sees
batch-first inputs whose first axis is the image batch, so Opacus computes correct per-sample gradients (windows are
formed *after* the linear projections and never merged into the batch axis).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedtextseg.errors import ConfigError

__all__ = [
    "as_triple",
    "ConvNormAct",
    "ConvStage",
    "FiLM",
    "TanhGate",
    "WindowCrossAttention3d",
    "TaskPromptGenerator",
    "ClassRows",
    "TextDrivenHead",
]


def as_triple(value: int | Sequence[int], what: str = "value") -> tuple[int, int, int]:
    """``3`` -> ``(3, 3, 3)``; a 3-sequence of positive ints stays; anything else is a ConfigError."""
    out = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(out) != 3 or not all(isinstance(v, int) and v > 0 for v in out):
        raise ConfigError(f"{what} must be a positive int or three positive ints, got {value!r}")
    return out  # type: ignore[return-value]


class ConvNormAct(nn.Module):
    """Conv3d (no bias: the norm removes it) + InstanceNorm3d(affine) + LeakyReLU(0.01), nnU-Net style."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | Sequence[int] = 3,
                 stride: int | Sequence[int] = 1):
        super().__init__()
        k = as_triple(kernel, "kernel")
        self.conv = nn.Conv3d(in_channels, out_channels, k, as_triple(stride, "stride"),
                              padding=tuple(v // 2 for v in k), bias=False)
        self.norm = nn.InstanceNorm3d(out_channels, affine=True)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class ConvStage(nn.Sequential):
    """Two ConvNormAct; the first one strided (downsampling by strided convolution)."""

    def __init__(self, in_channels: int, out_channels: int, kernel, stride=1):
        super().__init__(ConvNormAct(in_channels, out_channels, kernel, stride),
                         ConvNormAct(out_channels, out_channels, kernel, 1))


class FiLM(nn.Module):
    """Per-sample, per-channel ``x * (1 + gamma) + beta`` from a condition vector; starts as the identity."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.to_scale_shift = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        gamma, beta = self.to_scale_shift(cond).chunk(2, dim=1)
        shape = (*gamma.shape, *([1] * (x.dim() - 2)))
        return x * (1 + gamma.reshape(shape)) + beta.reshape(shape)


def _partition(t: Tensor, win: Sequence[int]) -> Tensor:
    """[B, Pd, Ph, Pw, C] -> [B, nWindows, wd*wh*ww, C]."""
    b, pd, ph, pw, c = t.shape
    wd, wh, ww = win
    t = t.reshape(b, pd // wd, wd, ph // wh, wh, pw // ww, ww, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return t.reshape(b, -1, wd * wh * ww, c)


def _merge(t: Tensor, win: Sequence[int], padded: Sequence[int]) -> Tensor:
    """Inverse of :func:`_partition`."""
    b, _, _, c = t.shape
    (wd, wh, ww), (pd, ph, pw) = win, padded
    t = t.reshape(b, pd // wd, ph // wh, pw // ww, wd, wh, ww, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return t.reshape(b, pd, ph, pw, c)


def _window_mask(size, padded, win, shift, device) -> Tensor | None:
    """Boolean [nW, 1, N, N] mask (True = may attend): no padded keys, no keys from another shifted region.

    A query may always attend to itself, so no row is empty (padded queries are cropped away afterwards).
    """
    if not any(shift) and tuple(size) == tuple(padded):
        return None
    coords = torch.meshgrid(*[torch.arange(p, device=device) for p in padded], indexing="ij")
    valid = torch.ones(tuple(padded), dtype=torch.bool, device=device)
    region = torch.zeros(tuple(padded), dtype=torch.long, device=device)
    for a in range(3):
        c = coords[a]
        valid &= (c + shift[a]) % padded[a] < size[a]  # rolled position c holds original (c + shift) mod P
        r = (c >= padded[a] - win[a]).long() + (c >= padded[a] - shift[a]).long() if shift[a] else 0
        region = region * 3 + r
    v = _partition(valid[None, ..., None], win)[0, ..., 0]  # [nW, N]
    r = _partition(region[None, ..., None], win)[0, ..., 0]
    allowed = (r[:, :, None] == r[:, None, :]) & v[:, None, :]
    allowed |= torch.eye(allowed.shape[-1], dtype=torch.bool, device=device)
    return allowed[:, None]


class TanhGate(nn.Module):
    """``x * tanh(alpha)`` with one learnable scalar ``alpha``, zero at init (Flamingo's gated cross-attention): a
    residual branch added through it starts switched off and opens only as far as training finds it useful."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.tanh(self.alpha).to(x.dtype)


class WindowCrossAttention3d(nn.Module):
    """One (shifted-)window cross-attention block: CNN stream ``x`` attended by queries from ``context``.

    ``x <- x + g1 * proj(attn(q=LN(context), k,v=LN(x)))`` in local ``window``^3 windows, then
    ``x <- x + g2 * MLP(LN(x))``, with zero-initialised tanh gates ``g1, g2`` (:class:`TanhGate`): at init the block is
    the identity, so the CNN learns undisturbed by the frozen ViT's features (meaningless ones, for a randomly
    initialised ViT) until the gates open. Both inputs are ``[B, C, D, H, W]`` on the same grid. Sizes that are not
    window multiples are padded (padded keys masked) and cropped back; an axis shorter than the window uses one
    window of its length and no shift.
    """

    def __init__(self, dim: int, heads: int = 4, window: int = 3, shifted: bool = False, mlp_ratio: float = 2.0):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"attention width {dim} is not divisible by attn_heads={heads}; change one of them")
        self.heads, self.window, self.shifted = heads, window, shifted
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q, self.to_kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.gate_attn, self.gate_mlp = TanhGate(), TanhGate()
        self._masks: dict[tuple, Tensor | None] = {}

    def _geometry(self, size):
        win = tuple(min(self.window, n) for n in size)
        shift = tuple(w // 2 if self.shifted and n > self.window else 0 for w, n in zip(win, size))
        padded = tuple(n + (-n) % w for n, w in zip(size, win))
        return win, shift, padded

    def _mask(self, size, padded, win, shift, device):
        key = (tuple(size), padded, win, shift, str(device))
        if key not in self._masks:
            self._masks[key] = _window_mask(size, padded, win, shift, device)
        return self._masks[key]

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        size = tuple(x.shape[2:])
        win, shift, padded = self._geometry(size)
        xt, ct = x.permute(0, 2, 3, 4, 1), context.permute(0, 2, 3, 4, 1)  # channels last, batch first
        q = self.to_q(self.norm_q(ct))
        k, v = self.to_kv(self.norm_kv(xt)).chunk(2, dim=-1)
        pad = (0, 0, 0, padded[2] - size[2], 0, padded[1] - size[1], 0, padded[0] - size[0])
        b, c, h = x.shape[0], x.shape[1], self.heads
        parts = []
        for t in (q, k, v):
            t = F.pad(t, pad) if padded != size else t
            t = torch.roll(t, shifts=tuple(-s for s in shift), dims=(1, 2, 3)) if any(shift) else t
            t = _partition(t, win)  # [B, nW, N, C]
            parts.append(t.reshape(*t.shape[:3], h, c // h).transpose(2, 3))  # [B, nW, heads, N, C/heads]
        mask = self._mask(size, padded, win, shift, x.device)
        out = F.scaled_dot_product_attention(*parts, attn_mask=mask)
        out = out.transpose(2, 3).reshape(b, -1, math.prod(win), c)
        out = _merge(out, win, padded)
        out = torch.roll(out, shifts=shift, dims=(1, 2, 3)) if any(shift) else out
        out = out[:, : size[0], : size[1], : size[2]]
        xt = xt + self.gate_attn(self.proj(out))
        xt = xt + self.gate_mlp(self.mlp(self.norm_mlp(xt)))
        return xt.permute(0, 4, 1, 2, 3)


class TaskPromptGenerator(nn.Module):
    """TTPG, per sample: one map per task from the bottleneck; the sample's own map, FiLM-modulated by its task
    embedding, is fused with the bottleneck into a one-channel dynamic prompt ``[B, 1, ...]``."""

    def __init__(self, channels: int, num_tasks: int, cond_dim: int):
        super().__init__()
        self.task_maps = nn.Conv3d(channels, num_tasks, 1)
        self.map_film = nn.Linear(cond_dim, 2)  # scalar scale/shift of the own task map; zero init = identity
        nn.init.zeros_(self.map_film.weight)
        nn.init.zeros_(self.map_film.bias)
        hidden = max(8, channels // 4)
        self.fuse = nn.Sequential(ConvNormAct(channels + 1, hidden, 3), nn.Conv3d(hidden, 1, 1))

    def forward(self, x: Tensor, task: Tensor, task_cond: Tensor) -> Tensor:
        maps = self.task_maps(x)
        index = task.reshape(-1, 1, 1, 1, 1).expand(-1, 1, *maps.shape[2:])
        own = maps.gather(1, index)
        gamma, beta = self.map_film(task_cond).reshape(-1, 2, 1, 1, 1).unbind(1)
        own = own * (1 + gamma[:, None]) + beta[:, None]
        return self.fuse(torch.cat([x, own.to(x.dtype)], dim=1))


class ClassRows(nn.Module):
    """Per-class linear rows over channels: ``out[b, c] = <weight[c], x[b]> + bias[c]`` at every voxel.

    ``weight`` is ``[C, in_channels]`` and ``bias`` ``[C]``: axis 0 is the class axis the federation aggregates.
    """

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_channels))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.uniform_(self.weight, -1 / math.sqrt(in_channels), 1 / math.sqrt(in_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.einsum("bdn,cd->bcn", x.flatten(2), self.weight.to(x.dtype))
        return (out + self.bias.to(out.dtype)[:, None]).reshape(x.shape[0], -1, *x.shape[2:])

    @torch.no_grad()
    def remap(self, old_names: Sequence[str], new_names: Sequence[str]) -> None:
        """Re-order rows to ``new_names``: rows of kept names move, new names get zero rows."""
        weight = self.weight.new_zeros(len(new_names), self.weight.shape[1])
        bias = self.bias.new_zeros(len(new_names))
        old = {n: i for i, n in enumerate(old_names)}
        for i, n in enumerate(new_names):
            if n in old:
                weight[i], bias[i] = self.weight[old[n]], self.bias[old[n]]
        self.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        self.bias = nn.Parameter(bias, requires_grad=self.bias.requires_grad)


class TextDrivenHead(nn.Module):
    """One logit channel per class: a 1x1 conv whose per-class weights a shared controller generates from the class
    text embedding, plus per-class residual rows (:class:`ClassRows`).

    The residual rows start at random, as the no-text head's rows do: similar class names (the two kidneys' texts
    have cosine 0.91 even in the centred bank) would otherwise start as near-copies of one channel, and the sided
    kidneys were then learned late or not at all (docs/learning_speed.md, fifth study: +0.10 unseen Dice over 3
    seeds). A class added to the text bank later (:meth:`ClassRows.remap`) gets zero rows: a head from its text
    alone. With ``cond_dim=None`` (no text conditioning) the head is the per-class rows only.
    """

    def __init__(self, in_channels: int, num_classes: int, cond_dim: int | None):
        super().__init__()
        self.controller = nn.Linear(cond_dim, in_channels + 1) if cond_dim else None
        self.residual = ClassRows(num_classes, in_channels)
        self.scale = 1.0 / math.sqrt(in_channels)

    def forward(self, x: Tensor, class_cond: Tensor | None = None) -> Tensor:
        out = self.residual(x)
        if self.controller is not None:
            if class_cond is None:
                raise ConfigError("this head generates class weights from text: pass the class conditions")
            wb = self.controller(class_cond)  # [B, C, in+1]
            w, b = wb[..., :-1], wb[..., -1]
            dyn = torch.einsum("bdn,bcd->bcn", x.flatten(2), w.to(x.dtype)) * self.scale + b.to(x.dtype)[..., None]
            out = out + dyn.reshape(out.shape).to(out.dtype)
        return out
