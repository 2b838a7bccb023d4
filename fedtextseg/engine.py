"""The one training/evaluation/prediction loop, shared by centralized training, Flower clients and benchmarks.

Models are used through one contract: ``model.forward_batch(batch) -> {"logits": [B, C, *spatial],
"aux_loss": optional scalar}``, where ``batch`` is the dict a site pipeline produces (``image``, ``label``,
``annotated``, ``task`` and model-specific keys such as cached ``dino`` features or ``caption``). So the same
loop trains CDPDNet (3D) and TGC-Net (2D).

Device and precision are chosen automatically: CUDA when present, else the CPU; bf16 autocast where the device
computes bf16 natively (CUDA; a CPU with AVX512-BF16 or AMX, read from its flags, not assumed), float32 elsewhere;
channels-last memory format for 3D convolutions on both (faster oneDNN and cuDNN kernels). benchmarks/train_step.py
measures each choice side by side. Nothing here requires a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import KeepLargestConnectedComponent
from torch import nn

from fedtextseg.metrics import MetricAccumulator

__all__ = [
    "resolve_device",
    "cpu_flags",
    "cpu_has_amx",
    "CPU_BF16_FLAGS",
    "resolve_precision",
    "autocast",
    "prepare_model",
    "make_optimizer",
    "TrainStats",
    "Microbatching",
    "train_steps",
    "predict_logits",
    "evaluate",
    "move_batch",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- device & precision
def resolve_device(preference: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else CPU; otherwise the named device."""
    if isinstance(preference, torch.device):
        return preference
    if preference in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where the system does not say)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


# the CPU flags that say how it computes bf16 (recorded in run metadata and benchmarks); AMX needs the last two
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "amx_tile"})


def cpu_has_amx() -> bool:
    """True where the CPU has AMX tiles with bf16 (``amx_bf16`` and ``amx_tile``) and oneDNN computes bf16.

    Measured with the demo's training step (benchmarks/train_step.py, one thread): on a Xeon with AMX, bf16 autocast
    ran 1.54x and fp32 channels-last 1.28x faster than fp32 contiguous; on a Xeon with AVX512-BF16 but AMX off, bf16
    ran 0.88x, channels-last 0.89x and both 0.79x as fast. So both are chosen on AMX CPUs only; elsewhere the CPU
    trains in fp32, contiguous."""
    if not {"amx_bf16", "amx_tile"} <= cpu_flags():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - torch built without oneDNN
        return False


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """``auto`` -> ``bf16`` on CUDA with bf16 (else ``fp16``) and on a CPU with AMX (:func:`cpu_has_amx`), else
    ``fp32``."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"unknown precision {precision!r} (auto | bf16 | fp16 | fp32)")
    if precision != "auto":
        return "fp32" if precision == "fp16" and device.type != "cuda" else precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_amx() else "fp32"


def autocast(device: torch.device, precision: str = "auto"):
    """Autocast for :func:`resolve_precision`'s choice: bf16 (CUDA or CPU), fp16 (CUDA only), nothing for fp32."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cuda", dtype=torch.float16)


def _channels_last(device: torch.device) -> bool:
    """3D convolutions channels-last: on cuDNN, and with oneDNN on AMX CPUs only (:func:`cpu_has_amx` has the
    figures; benchmarks/train_step.py replaces this function to measure both layouts side by side)."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_amx())


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to the device; channels-last-3d for 3D conv nets (see :func:`_channels_last`)."""
    model = model.to(device)
    if _channels_last(device) and getattr(model, "spatial_dims", 3) == 3:
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def move_batch(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if k == "image" and _channels_last(device) and v.dim() == 5:
                v = v.contiguous(memory_format=torch.channels_last_3d)
        out[k] = v
    return out


def make_optimizer(model: nn.Module, lr: float = 4e-4, weight_decay: float = 1e-5, name: str = "adamw"):
    """AdamW (default) or SGD over the trainable parameters only (frozen DINOv2/CLIP never enter)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (adamw | sgd)")


# ----------------------------------------------------------------------------- training
@dataclass
class TrainStats:
    steps: int = 0
    samples: int = 0
    loss: float = float("nan")  # mean over the steps of this call
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)
    precision: str = ""  # what the steps ran in (fp32 where a CPU's bf16 kernels failed their check)

    def as_metrics(self) -> dict[str, float]:
        return {"train_loss": self.loss, "train_steps": float(self.steps), "train_seconds": self.seconds}


def _unknown_voxels(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``{"known": mask}`` when some voxels' labels are unknown (a site's ignored label values), else ``{}`` (the
    losses and metrics then run exactly as without the mask)."""
    known = batch.get("known")
    if known is None or bool(torch.as_tensor(known).all()):
        return {}
    return {"known": known}


def _cycle(loader: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training loader yielded no batch (is the site's training split empty?)")


def _proximal_term(model: nn.Module, reference: Mapping[str, torch.Tensor]) -> torch.Tensor:
    terms = [((p - reference[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad and n in reference]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class Microbatching:
    """How one optimizer step is split into parts, each with its own forward and backward pass (DP-SGD's per-patient
    micro-batches, :mod:`fedtextseg.privacy.dpsgd`): ``split`` cuts a batch into parts (none: a step that only
    moves by what the optimizer adds, e.g. noise), ``collect`` runs after each part's backward pass."""

    def split(self, batch: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        raise NotImplementedError

    def collect(self) -> None:
        raise NotImplementedError


def _batch_loss(model, batch, loss_fn, device, precision, teacher, distill_fn, distill_weight, prox_mu, ref):
    """The training objective of one batch (or one micro-batch): loss + auxiliary + distillation + FedProx."""
    with autocast(device, precision):
        out = model.forward_batch(batch)
        logits = out["logits"].float()  # the loss's sums over whole patches stay in float32 under bf16 autocast
        unknown = _unknown_voxels(batch)
        loss = loss_fn(logits, batch["label"], batch["annotated"], **unknown)
        if out.get("aux_loss") is not None:
            loss = loss + out["aux_loss"]
        if teacher is not None and distill_fn is not None and distill_weight > 0:
            with torch.no_grad():
                teacher_logits = teacher.forward_batch(batch)["logits"]
            loss = loss + distill_weight * distill_fn(
                logits, teacher_logits.float(), batch["label"], batch["annotated"], **unknown
            )
    if ref is not None:
        loss = loss + 0.5 * prox_mu * _proximal_term(model, ref)
    return loss


_CPU_BF16_CHECKED: dict[tuple, tuple[bool, str]] = {}


def _training_precision(model: nn.Module, batch: Mapping[str, Any], device: torch.device, precision: str,
                        label: str) -> str:
    """The run's precision, except float32 on a CPU whose bf16 kernels get this model's convolution weight gradients
    wrong at this batch's shapes (:mod:`fedtextseg.bf16_check`); said once per model and shape."""
    if device.type != "cpu" or resolve_precision(device, precision) != "bf16" or not hasattr(model, "forward_batch"):
        return precision
    key = (type(model).__name__, sum(p.numel() for p in model.parameters()), tuple(batch["image"].shape[1:]))
    if key not in _CPU_BF16_CHECKED:
        from fedtextseg.bf16_check import cpu_bf16_trains_correctly

        _CPU_BF16_CHECKED[key] = cpu_bf16_trains_correctly(model, batch)
        if not _CPU_BF16_CHECKED[key][0]:
            log.warning("%s: training in fp32, not bf16: this CPU's bf16 kernels are wrong for %s", label,
                        _CPU_BF16_CHECKED[key][1])
    return precision if _CPU_BF16_CHECKED[key][0] else "fp32"


def train_steps(
    model: nn.Module,
    loader: Iterable,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    device: torch.device | str = "auto",
    precision: str = "auto",
    grad_clip: float | None = 12.0,
    prox_mu: float = 0.0,
    prox_reference: Mapping[str, torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    distill_fn: Callable | None = None,
    distill_weight: float = 0.0,
    microbatching: Microbatching | None = None,
    log_every: int = 0,
    label: str = "train",
    step_hook: Callable[[int, float], None] | None = None,
) -> TrainStats:
    """Run ``steps`` optimizer steps over ``loader`` (cycled).

    ``prox_mu``/``prox_reference``: FedProx's proximal term to the round's global weights. ``teacher`` +
    ``distill_fn``: distillation of unannotated classes from the global model (ConDistFL). ``microbatching``: each
    step's batch in parts with a backward pass each (the logged loss is their row-weighted mean). Progress is logged
    every ``log_every`` steps (0: once at the end) so client logs stay readable.
    """
    device = resolve_device(device)
    model.train()
    if teacher is not None:
        teacher.eval()
    stats = TrainStats()
    start = time.perf_counter()
    batches = _cycle(loader)
    ref = {k: v.to(device) for k, v in (prox_reference or {}).items()} if prox_mu > 0 else None
    for step in range(1, steps + 1):
        batch = move_batch(next(batches), device)
        if step == 1:
            precision = _training_precision(model, batch, device, precision, label)
        rows = int(batch["image"].shape[0])
        optimizer.zero_grad(set_to_none=True)
        parts = microbatching.split(batch) if microbatching is not None else [batch]
        value = 0.0
        for part in parts:
            loss = _batch_loss(model, part, loss_fn, device, precision, teacher, distill_fn, distill_weight, prox_mu,
                               ref)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{label}: non-finite loss at step {step} ({loss.item()})")
            loss.backward()
            if microbatching is not None:
                microbatching.collect()
            weight = 1.0 if len(parts) == 1 else int(part["image"].shape[0]) / rows
            value += float(loss.detach()) * weight
        if grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        optimizer.step()
        stats.history.append(value)
        stats.samples += rows
        if step_hook is not None:
            step_hook(step, value)
        if log_every and (step % log_every == 0 or step == steps):
            recent = np.mean(stats.history[-log_every:])
            log.info("%s step %d/%d loss %.4f (%.1fs)", label, step, steps, recent, time.perf_counter() - start)
    stats.steps = steps
    stats.precision = resolve_precision(device, precision)
    stats.seconds = time.perf_counter() - start
    stats.loss = float(np.mean(stats.history)) if stats.history else float("nan")
    if not log_every:
        log.info("%s: %d steps, mean loss %.4f, %.1fs", label, steps, stats.loss, stats.seconds)
    return stats


# ----------------------------------------------------------------------------- inference & evaluation
@torch.no_grad()
def predict_logits(
    model: nn.Module,
    image: torch.Tensor,
    task: int,
    *,
    roi_size: tuple[int, ...],
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    device: torch.device | str = "auto",
    precision: str = "auto",
    progress: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Sliding-window logits (Gaussian weighting) for one image ``[1, *spatial]`` -> ``[C, *spatial]`` on CPU."""
    device = resolve_device(device)
    model.eval()
    x = image.unsqueeze(0).to(device)
    if getattr(model, "input_extras", 0):  # e.g. coordinate channels, made on the whole volume before sliding
        x = model.add_coordinates(x)
    if _channels_last(device) and x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)

    def predictor(window: torch.Tensor) -> torch.Tensor:
        batch = {"image": window, "task": torch.full((window.shape[0],), int(task), device=device, dtype=torch.long)}
        for k, v in (extra or {}).items():
            batch[k] = [v] * window.shape[0] if isinstance(v, str) else v
        with autocast(device, precision):
            return model.forward_batch(batch)["logits"].float()

    logits = sliding_window_inference(
        x, roi_size=roi_size, sw_batch_size=sw_batch_size, predictor=predictor, overlap=overlap, mode="gaussian",
        progress=progress,
    )
    return logits[0].float().cpu()


def postprocess(
    probs: torch.Tensor, threshold: float = 0.5, keep_largest: Iterable[int] = ()
) -> torch.Tensor:
    """Threshold probabilities ``[C, *spatial]``; keep the largest connected component of the listed channels."""
    masks = (probs >= threshold).to(torch.uint8)
    idx = list(keep_largest)
    if idx:
        masks = KeepLargestConnectedComponent(applied_labels=idx, is_onehot=True, independent=True)(masks)
        masks = torch.as_tensor(masks).to(torch.uint8)
    return masks


def _spacing_of(item: Mapping[str, Any]) -> tuple[float, ...] | None:
    image = item["image"]
    meta = getattr(image, "meta", None)
    if meta is not None and "pixdim" in meta:
        pixdim = torch.as_tensor(meta["pixdim"]).flatten().tolist()
        nd = image.dim() - 1
        return tuple(float(s) for s in pixdim[1 : 1 + nd])
    return None


def evaluate(
    model: nn.Module,
    dataset: Iterable[Mapping[str, Any]],
    class_names: list[str],
    *,
    roi_size: tuple[int, ...],
    overlap: float = 0.5,
    threshold: float = 0.5,
    keep_largest: Iterable[int] = (),
    device: torch.device | str = "auto",
    precision: str = "auto",
    with_hd95: bool = True,
    task_override: int | None = None,
    softmax_space: Any = None,
) -> dict[str, dict[str, float]]:
    """Per-class Dice (mean and pooled) and HD95 over whole cases, only on each case's annotated classes.

    Masks come from per-class sigmoids over ``threshold``, or, for a model trained with the naive softmax loss, by
    argmax over background + its label space (``softmax_space``, a :class:`fedtextseg.losses.SoftmaxLabelSpace`).
    """
    acc = MetricAccumulator(class_names, with_hd95=with_hd95)
    keep = list(keep_largest)
    for item in dataset:
        task = int(task_override if task_override is not None else torch.as_tensor(item["task"]).item())
        extra = {"caption": item["caption"]} if "caption" in item else None
        logits = predict_logits(
            model, item["image"], task, roi_size=roi_size, overlap=overlap, device=device, precision=precision,
            extra=extra,
        )
        if softmax_space is not None:
            masks = postprocess(softmax_space.decide(logits).float(), 0.5, keep)
        else:
            masks = postprocess(torch.sigmoid(logits), threshold, keep)
        truth = torch.as_tensor(item["label"]) > 0.5
        if _unknown_voxels(item):  # ignored label values: neither right nor wrong, left out of every class
            known = torch.as_tensor(item["known"]).as_subclass(torch.Tensor).cpu() > 0
            masks, truth = masks.cpu().bool() & known, truth.cpu() & known
        acc.add_case(masks, truth, item["annotated"], _spacing_of(item))
    summary = acc.summary()
    for values in summary.values():
        for k, v in values.items():
            if isinstance(v, float) and math.isinf(v):
                values[k] = float("nan")
    return summary
