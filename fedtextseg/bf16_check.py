"""Whether this CPU's bf16 kernels compute a model's convolution gradients correctly, checked on the model's own
layer shapes before a CPU run trains under bf16 autocast.

Why: on torch 2.14.1 (oneDNN) on an AMD EPYC (Zen 4, AVX512-BF16, no AMX), the weight gradient of a bf16
``Conv3d`` whose input is 2 voxels deep is wrong on every call (sometimes by 1e25: a DP step then clips it away to
nothing), while the forward pass and the input gradient are right (``benchmarks/bf16_conv3d_check.py`` measures it;
cf. pytorch/pytorch#169688 for another shape class). CDPDNet has such a level for patches 8 or 16 voxels deep, so
such a run must train in float32. The check costs one small backward pass per distinct convolution and input shape;
the engine runs it once per model and batch shape in a process.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

TOLERANCE = 0.05  # relative max error of a bf16 weight gradient against float32 (bf16 alone gives under 1 %)


def _conv_key(module: nn.Module, shape: tuple[int, ...]) -> tuple:
    return (type(module).__name__, module.in_channels, module.out_channels, module.kernel_size, module.stride,
            module.padding, module.dilation, module.groups, getattr(module, "output_padding", None), shape)


def _conv_shapes(model: nn.Module, batch: Mapping[str, Any]) -> dict[tuple, nn.Module]:
    """Every 3D (transposed) convolution of ``model`` with the input shape one row of ``batch`` gives it."""
    seen: dict[tuple, nn.Module] = {}

    def record(module: nn.Module, args: tuple, output: Any) -> None:
        seen.setdefault(_conv_key(module, (1, *args[0].shape[1:])), module)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    one = {k: (v[:1] if isinstance(v, torch.Tensor) and v.dim() else v[:1] if isinstance(v, list) else v)
           for k, v in batch.items()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # dropout here must not shift the run's RNG stream
            model.forward_batch(one)
    finally:
        for h in hooks:
            h.remove()
    return seen


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max absolute error over max magnitude (inf where ``got`` is not finite)."""
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _weight_grad_error(module: nn.Module, shape: tuple[int, ...]) -> float:
    """Relative max error of the bf16-autocast weight gradient of a copy of ``module`` on a random input."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    weight = module.weight.detach().float().clone()
    functional = torch.nn.functional.conv_transpose3d if isinstance(module, nn.ConvTranspose3d) else \
        torch.nn.functional.conv3d
    extra = {"output_padding": module.output_padding} if isinstance(module, nn.ConvTranspose3d) else {}

    def grad(autocast: bool) -> torch.Tensor:
        w = weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = functional(x, w, None, module.stride, module.padding, dilation=module.dilation, groups=module.groups,
                           **extra)
        y.float().backward(torch.ones_like(y, dtype=torch.float32))
        return w.grad

    want, got = grad(False), grad(True)
    return relative_error(got, want)


def cpu_bf16_trains_correctly(model: nn.Module, batch: Mapping[str, Any]) -> tuple[bool, str]:
    """``(True, "")`` when every 3D convolution of ``model``, at the shapes ``batch`` gives it, gets a bf16 weight
    gradient within :data:`TOLERANCE` of float32 on this CPU; else ``(False, what was wrong)``. Not cached: the
    engine asks once per model and batch shape."""
    for key, module in _conv_shapes(model, batch).items():
        error = _weight_grad_error(module, key[-1])
        if not error <= TOLERANCE:
            return False, (f"{key[0]}({key[1]}->{key[2]}, kernel {key[3]}, stride {key[4]}) on input "
                           f"{list(key[-1][1:])}: bf16 weight gradient off by {error:.3g} (relative max)")
    return True, ""
