"""DP-SGD for one site's local round with Opacus, run through the ordinary ``engine.train_steps`` loop.

The engine stays the one training loop: :func:`make_private` hands it private replacements for its parts.

* **Privacy unit = the training volume (patient).** Batches are drawn by Poisson sampling over the site's training
  *volumes* (``UniformWithReplacementSampler``: every volume joins a step independently with probability
  ``q = expected_batch_size / N``, so a step's batch can be empty and still gets its noise). A sampled volume
  yields ``num_crops`` patches; their per-patch gradients are grouped back to the volume (by ``case_id``) before
  clipping, so the clipping bound ``C`` and hence the sensitivity apply to a patient, not to a crop.
* **Per-sample gradients** come from Opacus' ``GradSampleModule`` hooks on the submodules (the wrapper's
  ``forward_batch`` calls the model's own ``forward_batch``, whose layers carry the hooks). Only trainable
  parameters get hooks; the frozen DINOv2 / CLIP parts and the text bank have ``requires_grad=False``.
* ``grad_sample_mode="microbatch"`` (default): a step's batch is cut into one micro-batch per sampled volume; each
  gets its own forward and backward pass with plain autograd, and its gradient (the mean over its crops) becomes
  one per-sample row of Opacus' ``DPOptimizer``, which clips it to ``C`` exactly, sums, noises and scales. No
  per-sample gradient is derived from a batched pass, so a step costs about what the plain step costs at the
  same crops (a few volumes per step, as at every site here), memory included; the run's precision (bf16 autocast
  where the device has it) applies, because the clipped values are the float32 parameter gradients. Terms that
  couple a batch's rows couple only one patient's crops here, which the clipping bounds.
* ``"hooks"``: per-patch gradients are materialised, summed per volume (mean over its
  crops), clipped per volume to ``C`` exactly (``DPOptimizer``). ``"fast"``: Opacus' fast gradient clipping
  (``GradSampleModuleFastGradientClipping``: per-layer per-sample gradients reduced to norms at once, never stored
  for the whole model) with two backward passes; ``"ghost"``: the same with ghost norms for ``nn.Linear`` (no
  per-sample gradient at all) - it supports neither model: Opacus' ghost norm sampler only handles 2-D/3-D Linear
  inputs (CDPDNet's window attention applies Linear layers to 5-D tensors) and refuses layers applied twice in one
  forward pass (TGC-Net); both fail with a clear error. In
  both, each patch is clipped to ``C`` and a volume contributes the mean of its clipped patches, whose norm is
  <= ``C`` (triangle inequality): the same sensitivity, slightly more clipping.
* The loss is made a **per-sample mean** whatever the loss object does (:class:`PerSampleMean` evaluates it on one
  row at a time): batch Dice, or the marginal loss's batch-normalised exclusion term, would otherwise couple
  samples, and Opacus' per-sample gradients would no longer bound one patient's influence.
* Noise: ``N(0, (sigma C)^2)`` on the clipped sum, divided by the *expected* batch size; the generator is seeded
  from ``os.urandom`` (the run seed is known to the server, which could otherwise regenerate the noise), and
  Opacus' ``secure_mode`` noise (sum of four Gaussians) guards against floating-point attacks.
* A volume whose gradient norm is not finite (with a finite loss: a broken kernel or an overflow) adds nothing to
  the step, noise still added (:func:`zero_non_finite_volumes`).
* FedProx's proximal term is data-independent: it is added to the privatised gradient (post-processing).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from fedtextseg.engine import Microbatching
from fedtextseg.errors import ConfigError, FedTextSegError
from fedtextseg.privacy.settings import GRAD_SAMPLE_MODES as MODES

log = logging.getLogger(__name__)

__all__ = ["validate_model", "poisson_loader", "volume_index", "VolumeMicrobatches", "PerSampleMean", "make_private",
           "PrivateParts", "MODES", "secure_seed"]


def secure_seed() -> int:
    """A 63-bit seed from the OS's entropy pool (never derived from the run seed the server knows)."""
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


def validate_model(model: nn.Module) -> None:
    """Opacus' ``ModuleValidator`` over the model; raises a FedTextSegError naming every offending module."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise FedTextSegError(f"{type(model).__name__} cannot be trained with DP-SGD (Opacus): "
                              + "; ".join(str(e) for e in errors))


# ----------------------------------------------------------------------------- Poisson batches of volumes
def _collate_or_empty(items: list) -> dict[str, Any]:
    if not items:  # Poisson sampling drew no volume: a step with zero gradients, still noised
        return {"image": torch.zeros(0, 1), "label": torch.zeros(0, 1), "annotated": torch.zeros(0, 1),
                "case_id": []}
    from monai.data import list_data_collate

    return list_data_collate(items)


def poisson_loader(dataset, sample_rate: float, steps: int, generator: torch.Generator | None = None):
    """Batches of whole volumes by Poisson sampling (each volume with probability ``sample_rate``), ``steps`` per
    pass; a volume's random crops are flattened into consecutive rows by MONAI's ``list_data_collate``.

    Opacus's own sampler draws the batches. Its ``DPDataLoader`` is not used: it fixes a pass at ``1/sample_rate``
    steps (a round takes ``train.local_steps``) and builds an empty batch from the first sample's shapes (here a
    sample is a list of crops); the accounting only needs the rate and the number of steps, which the ledger gets."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from torch.utils.data import DataLoader

    if not 0 < sample_rate <= 1:
        raise ConfigError(f"Poisson sampling rate must be in (0, 1], got {sample_rate}")
    sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=float(sample_rate),
                                            generator=generator, steps=max(1, int(steps)))
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate_or_empty, num_workers=0)


def volume_index(batch: Mapping[str, Any], rows: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
    """Row -> volume index (0..V-1, by ``case_id`` in order of appearance) and V; one volume per row without ids."""
    ids = batch.get("case_id")
    if isinstance(ids, (list, tuple)) and len(ids) == rows and rows:
        order: dict[Any, int] = {}
        idx = [order.setdefault(str(i), len(order)) for i in ids]
        return torch.tensor(idx, dtype=torch.long, device=device), len(order)
    return torch.arange(rows, device=device), rows


def _rows_of(batch: Mapping[str, Any], index: list[int], rows: int) -> dict[str, Any]:
    """The rows ``index`` of every per-row entry of a batch (tensors and lists of length ``rows``)."""
    part: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
            part[key] = value[torch.as_tensor(index, device=value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == rows:
            part[key] = [value[i] for i in index]
        else:
            part[key] = value
    return part


class VolumeMicrobatches(Microbatching):
    """One micro-batch per volume (patient) of a step's batch; after each one's backward pass its gradient is kept
    as that volume's per-sample gradient row (float32) and ``p.grad`` is cleared for the next volume."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.rows: list[list[torch.Tensor]] = [[] for _ in params]

    def split(self, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        self.rows = [[] for _ in self.params]
        rows = int(batch["image"].shape[0])
        if rows == 0:  # Poisson sampling drew no volume: no pass at all, the step is noise only
            return []
        idx, volumes = volume_index(batch, rows)
        return [_rows_of(batch, (idx == v).nonzero().flatten().tolist(), rows) for v in range(volumes)]

    def collect(self) -> None:
        for store, p in zip(self.rows, self.params):
            store.append(torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.detach().float())
            p.grad = None

    def grad_samples(self) -> list[torch.Tensor]:
        """Per parameter ``[volumes, *shape]`` (``[0, *shape]`` after an empty batch)."""
        return [torch.stack(store) if store else torch.zeros((0, *p.shape), device=p.device, dtype=torch.float32)
                for store, p in zip(self.rows, self.params)]


# ----------------------------------------------------------------------------- losses
class PerSampleMean:
    """``fn(logits, *targets, **masks)`` evaluated on each row alone and averaged: a loss Opacus can decompose per
    sample (keyword tensors, e.g. the ``known`` voxel mask, are cut by row too)."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn

    def per_sample(self, logits: torch.Tensor, *rest: torch.Tensor, **masks: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.fn(logits[i:i + 1], *(r[i:i + 1] for r in rest),
                                    **{k: m[i:i + 1] for k, m in masks.items()}) for i in range(logits.shape[0])])

    def __call__(self, logits: torch.Tensor, *rest: torch.Tensor, **masks: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        return self.per_sample(logits, *rest, **masks).mean()


class _GhostClippedLoss(PerSampleMean):
    """Ghost clipping folded into the loss: pass 1 (here) computes per-row gradient norms through Opacus' hooks,
    the value returned makes the engine's ``backward`` (pass 2, hooks off) produce the clipped sum
    ``sum_volumes mean_crops(clip_C(g_row))``; its value is the plain mean loss, for logging."""

    def __init__(self, fn, model: "nn.Module"):
        super().__init__(fn)
        self.model = model

    def __call__(self, logits: torch.Tensor, *rest: torch.Tensor, **masks: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        per = self.per_sample(logits, *rest, **masks)
        per.mean().backward(retain_graph=True)
        missing = [n for n, p in self.model._module.named_parameters() if p.requires_grad
                   and not hasattr(p, "_norm_sample")]
        if missing:
            raise ConfigError(
                f"privacy.grad_sample_mode=ghost does not support {type(self.model._module).__name__}: Opacus' ghost "
                f"norm sampler for nn.Linear only handles 2-D/3-D inputs, and {len(missing)} parameter(s) (e.g. "
                f"{', '.join(missing[:3])}) got no per-sample norm. Use grad_sample_mode=fast (Opacus' fast gradient "
                "clipping, per-layer norms) or hooks")
        coeff = self.model.get_clipping_coef().to(per.device, per.dtype)
        for p in self.model.parameters():
            p.grad = None
        idx, v = self.model.volume_index, self.model.num_volumes
        counts = torch.zeros(v, device=per.device, dtype=per.dtype).index_add_(0, idx.to(per.device),
                                                                              torch.ones_like(per))
        weights = (coeff / counts[idx.to(per.device)]).detach()
        self.model.disable_hooks()  # re-enabled by the optimizer after the engine's backward
        second = (weights * per).sum()
        return second - second.detach() + per.mean().detach()


# ----------------------------------------------------------------------------- model wrappers
class _DPForward:
    """``forward_batch`` for Opacus' wrappers: records which rows belong to which volume, refuses terms that
    couple samples, and answers an empty Poisson batch without running the model."""

    volume_index: torch.Tensor
    num_volumes: int

    def forward_batch(self, batch: Mapping[str, Any]) -> dict:
        rows = int(batch["image"].shape[0])
        trainable = [p for p in self._module.parameters() if p.requires_grad]
        self.volume_index, self.num_volumes = volume_index(batch, rows, trainable[0].device)
        if rows == 0:
            return {"logits": trainable[0].new_zeros((0, 1)) + 0.0 * trainable[0].sum()}
        try:
            out = self._module.forward_batch(batch)
        except NotImplementedError as exc:  # Opacus' ghost clipping: a layer used twice in one forward
            raise ConfigError(f"privacy.grad_sample_mode=ghost does not support {type(self._module).__name__}: {exc} "
                              "(a layer applied twice in one forward pass). Use grad_sample_mode=fast or hooks"
                              ) from None
        aux = out.get("aux_loss")
        if isinstance(aux, torch.Tensor) and aux.requires_grad:  # a constant 0 (term switched off) is harmless
            raise ConfigError(f"{type(self._module).__name__} returned an auxiliary loss that couples the samples of a "
                              "batch (e.g. TGC-Net's contrastive alignment); per-sample clipping would not bound one "
                              "patient's influence. Turn it off under DP-SGD (TGC-Net: model.kwargs.align_weight=0)")
        return out


def _wrapper_classes():
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    class HooksDPModel(_DPForward, GradSampleModule):
        """``GradSampleModule`` (per-sample gradients materialised) with the engine's ``forward_batch``."""

    class GhostDPModel(_DPForward, GradSampleModuleFastGradientClipping):
        """``GradSampleModuleFastGradientClipping`` (ghost / fast gradient clipping) with ``forward_batch``."""

    return HooksDPModel, GhostDPModel


class _EmptySafeTeacher:
    """The distillation teacher, answering an empty Poisson batch with empty logits."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher

    def eval(self):
        self.teacher.eval()
        return self

    def forward_batch(self, batch):
        if int(batch["image"].shape[0]) == 0:
            p = next(self.teacher.parameters())
            return {"logits": p.new_zeros((0, 1))}
        return self.teacher.forward_batch(batch)


# ----------------------------------------------------------------------------- optimizers
def _prox_step(params, refs, mu: float) -> None:
    if mu > 0:
        for p, ref in zip(params, refs):
            if ref is not None and p.grad is not None:
                p.grad.add_(p.detach() - ref.to(p.device), alpha=mu)


def zero_non_finite_volumes(grad_samples: list[torch.Tensor]) -> list[int]:
    """Zero (in place) the per-volume gradient rows whose norm is not finite; return their indices.

    Opacus would give a volume with an inf norm a clip factor of 0 and one with a NaN norm NaN weights (which
    poison the model). A zero row is the DP-safe reading of both: the volume adds nothing (within the sensitivity
    C), the noise is still added, and nothing about it leaves the site; the site's own log says which volumes."""
    if not grad_samples or not len(grad_samples[0]):
        return []
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples], dim=1).norm(2, dim=1)
    bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
    if bad:
        for g in grad_samples:
            g[bad] = 0
        log.warning("DP-SGD: volume(s) %s of this step have a non-finite gradient although the loss is finite; "
                    "they add nothing to the step (a broken kernel or an overflow: try run.precision=fp32)", bad)
    return bad


def _optimizer_classes():
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    class MicrobatchDPOptimizer(DPOptimizer):
        """Opacus' DPOptimizer over the per-volume gradients the micro-batches collected."""

        def __init__(self, optimizer, *, microbatches: VolumeMicrobatches, prox_mu=0.0, prox_refs=(), **kwargs):
            super().__init__(optimizer, loss_reduction="mean", **kwargs)
            self.microbatches, self.prox_mu, self.prox_refs = microbatches, float(prox_mu), list(prox_refs)

        def pre_step(self, closure=None):
            rows = self.microbatches.grad_samples()
            zero_non_finite_volumes(rows)
            for p, row in zip(self.params, rows):
                p.grad_sample = row
            ok = super().pre_step(closure)
            if ok:
                _prox_step(self.params, self.prox_refs, self.prox_mu)
            return ok

    class HooksDPOptimizer(DPOptimizer):
        """Opacus' DPOptimizer, clipping per *volume*: per-row gradients are averaged over each volume's rows first."""

        def __init__(self, optimizer, *, model, prox_mu=0.0, prox_refs=(), **kwargs):
            super().__init__(optimizer, loss_reduction="mean", **kwargs)
            self.dp_model, self.prox_mu, self.prox_refs = model, float(prox_mu), list(prox_refs)

        def _group_per_volume(self) -> None:
            idx, v = self.dp_model.volume_index, self.dp_model.num_volumes
            for p in self.params:
                gs = getattr(p, "grad_sample", None)
                if isinstance(gs, list):
                    gs = torch.cat(gs, dim=0)
                if v == 0:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=torch.float32)
                    continue
                if gs is None:  # a parameter this batch did not reach: zero gradient for every volume
                    p.grad_sample = torch.zeros((v, *p.shape), device=p.device, dtype=torch.float32)
                    continue
                # float32 before the norms: clipping is exact on exactly the values that are summed
                gs = gs.to(torch.float32)
                i = idx.to(gs.device)
                grouped = torch.zeros((v, *p.shape), device=gs.device, dtype=torch.float32).index_add_(0, i, gs)
                counts = torch.zeros(v, device=gs.device).index_add_(0, i, torch.ones(len(i), device=gs.device))
                p.grad_sample = grouped / counts.view(-1, *([1] * p.dim()))

        def pre_step(self, closure=None):
            self._group_per_volume()
            zero_non_finite_volumes([p.grad_sample for p in self.params])
            ok = super().pre_step(closure)
            if ok:
                _prox_step(self.params, self.prox_refs, self.prox_mu)
            return ok

    class GhostDPOptimizer(DPOptimizerFastGradientClipping):
        """Opacus' ghost-clipping optimizer: noise on the clipped sum the engine's backward produced."""

        def __init__(self, optimizer, *, model, prox_mu=0.0, prox_refs=(), **kwargs):
            super().__init__(optimizer, loss_reduction="mean", **kwargs)
            self.dp_model, self.prox_mu, self.prox_refs = model, float(prox_mu), list(prox_refs)

        def pre_step(self, closure=None):
            self.dp_model.enable_hooks()
            for p in self.params:
                if p.grad is None:  # empty batch / unreached parameter
                    p.grad = torch.zeros_like(p)
            ok = super().pre_step(closure)
            if ok:
                _prox_step(self.params, self.prox_refs, self.prox_mu)
            return ok

    return MicrobatchDPOptimizer, HooksDPOptimizer, GhostDPOptimizer


# ----------------------------------------------------------------------------- assembly
@dataclass
class PrivateParts:
    """What ``engine.train_steps`` runs under DP-SGD (:meth:`train_steps` runs it); ``close()`` removes Opacus'
    hooks from the model."""

    model: nn.Module
    loader: Any
    loss_fn: Callable
    distill_fn: Callable | None
    teacher: Any
    optimizer: torch.optim.Optimizer
    mode: str
    microbatching: VolumeMicrobatches | None = None

    def train_steps(self, **kwargs):
        """``engine.train_steps`` with these parts; clipping is DP-SGD's own (no global-norm clipping). Modes that
        clip per-sample gradients Opacus derives run in float32 so the bound holds on exactly the summed values;
        ``microbatch`` clips float32 parameter gradients and keeps the run's precision."""
        from fedtextseg import engine

        kwargs["grad_clip"] = None
        if self.mode != "microbatch":
            kwargs["precision"] = "fp32"
        return engine.train_steps(self.model, self.loader, loss_fn=self.loss_fn, optimizer=self.optimizer,
                                  distill_fn=self.distill_fn, teacher=self.teacher, microbatching=self.microbatching,
                                  **kwargs)

    def close(self) -> None:
        if self.microbatching is None:
            self.model._close()
            return
        for p in self.microbatching.params:  # what DPOptimizer left on the parameters
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)


def make_private(model: nn.Module, dataset, optimizer: torch.optim.Optimizer, loss_fn: Callable, *,
                 noise_multiplier: float, max_grad_norm: float, sample_rate: float, steps: int,
                 mode: str = "microbatch", distill_fn: Callable | None = None, teacher: nn.Module | None = None,
                 prox_mu: float = 0.0, prox_reference: Mapping[str, torch.Tensor] | None = None,
                 sampler_seed: int | None = None, noise_seed: int | None = None) -> PrivateParts:
    """Wrap a model (already on its device), its optimizer and loss for DP-SGD over Poisson batches of volumes.

    Seeds default to fresh OS entropy; pass them only in tests.
    """
    validate_model(model)
    if mode not in MODES:
        raise ConfigError(f"privacy.grad_sample_mode {mode!r} is not one of {', '.join(MODES)}")
    if mode in ("fast", "ghost") and teacher is not None and distill_fn is not None:
        raise ConfigError(f"privacy.grad_sample_mode={mode} cannot clip the distillation term the engine adds after "
                          "the loss (train.loss=distill); use grad_sample_mode=microbatch or hooks")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise FedTextSegError(f"{type(model).__name__} has no trainable parameters to train with DP-SGD")
    device = trainable[0][1].device
    HooksDPModel, GhostDPModel = _wrapper_classes()
    MicrobatchDPOptimizer, HooksDPOptimizer, GhostDPOptimizer = _optimizer_classes()
    noise_gen = torch.Generator(device=device).manual_seed(noise_seed if noise_seed is not None else secure_seed())
    sample_gen = torch.Generator().manual_seed(sampler_seed if sampler_seed is not None else secure_seed())
    refs = [(prox_reference or {}).get(n) for n, _ in trainable] if prox_mu > 0 else []
    expected = float(sample_rate) * len(dataset)
    common = dict(noise_multiplier=float(noise_multiplier), max_grad_norm=float(max_grad_norm),
                  expected_batch_size=expected, generator=noise_gen, secure_mode=True, prox_mu=prox_mu,
                  prox_refs=refs)
    loader = poisson_loader(dataset, sample_rate, steps, sample_gen)
    distill = PerSampleMean(distill_fn) if distill_fn is not None else None
    if mode == "microbatch":
        microbatches = VolumeMicrobatches([p for _, p in trainable])
        dp_opt = MicrobatchDPOptimizer(optimizer, microbatches=microbatches, **common)
        return PrivateParts(model=model, loader=loader, loss_fn=PerSampleMean(loss_fn), distill_fn=distill,
                            teacher=teacher, optimizer=dp_opt, mode=mode, microbatching=microbatches)
    if mode == "hooks":
        dp_model = HooksDPModel(model, batch_first=True, loss_reduction="mean", strict=True)
        dp_opt = HooksDPOptimizer(optimizer, model=dp_model, **common)
        dp_loss = PerSampleMean(loss_fn)
    else:
        dp_model = GhostDPModel(model, batch_first=True, loss_reduction="mean", strict=True,
                                max_grad_norm=float(max_grad_norm), use_ghost_clipping=mode == "ghost")
        dp_opt = GhostDPOptimizer(optimizer, model=dp_model, **common)
        dp_loss = _GhostClippedLoss(loss_fn, dp_model)
    return PrivateParts(
        model=dp_model, loader=loader, loss_fn=dp_loss, distill_fn=distill,
        teacher=_EmptySafeTeacher(teacher) if teacher is not None else None, optimizer=dp_opt, mode=mode)
