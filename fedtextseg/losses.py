"""Partial-label losses: every site supervises only the vocabulary channels it annotates.

All losses take logits ``[B, C, *spatial]``, universal multi-channel targets ``[B, C, *spatial]`` and an
``annotated`` mask ``[B, C]`` (per sample, so a pooled batch may mix sites). Channels a sample's site does not
annotate receive exactly zero gradient from :class:`PartialLabelLoss` in ``"masked"`` mode.

* ``masked``   – Dice + BCE over annotated channels only (CDPDNet, Wu et al. 2025, arXiv 2505.18958).
* ``marginal`` – masked, plus the sigmoid counterpart of ConDistFL's marginal loss (Shi et al. 2021's exclusion
  term): a voxel a site labels as one of its organs is a known negative for every *unannotated* class that cannot
  overlap that organ, so those channels are pushed down there. What may overlap is derived from the vocabulary
  (a tumor and its organ) plus :data:`DEFAULT_OVERLAPS`.
* :class:`ConditionalDistillation` – ConDistFL's distillation of unannotated classes from the round's global model
  (temperature-softened sigmoid targets), on voxels that are not local foreground.
* ``naive``    – the baseline the partial-label losses exist to beat (:class:`NaiveSoftmaxLoss`): one softmax over
  background + a fixed label space (the federation's union of classes), every class a site does not annotate
  treated as background, so sites contradict each other about the same anatomy. Background is a constant zero
  logit; :meth:`SoftmaxLabelSpace.decide` turns logits into masks by argmax for evaluating such runs.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fedtextseg.vocab import Vocabulary

__all__ = ["PartialLabelLoss", "ConditionalDistillation", "SoftmaxLabelSpace", "NaiveSoftmaxLoss", "overlap_matrix",
           "DEFAULT_OVERLAPS", "build_loss", "LOSS_MODES"]

LOSS_MODES = ("masked", "marginal", "distill", "naive")

# Pairs of classes that may share voxels besides tumor-in-organ (vessels run through the liver, etc.).
DEFAULT_OVERLAPS: tuple[tuple[str, str], ...] = (
    ("hepatic vessel", "liver"),
    ("portal vein and splenic vein", "liver"),
    ("portal vein and splenic vein", "pancreas"),
    ("hepatic vessel tumor", "hepatic vessel"),
    ("kidney cyst", "kidney tumor"),
    ("celiac trunk", "aorta"),
)


def overlap_matrix(vocab: Vocabulary, extra: Iterable[tuple[str, str]] = DEFAULT_OVERLAPS) -> torch.Tensor:
    """Boolean [C, C]: True where two classes may overlap (same class, tumor and its organ, listed pairs)."""
    n = vocab.num_classes
    may = torch.eye(n, dtype=torch.bool)
    names = vocab.class_names
    pairs: list[tuple[str, str]] = []
    for c in names:
        pairs.extend((c, p) for p in vocab.parent_channels(c))
    for a, b in extra:
        try:
            for ea in vocab.expand(a):
                pairs.extend((ea, eb) for eb in vocab.expand(b))
        except KeyError:  # a vocabulary without these classes (e.g. chest X-ray)
            continue
    for a, b in pairs:
        i, j = names.index(a), names.index(b)
        may[i, j] = may[j, i] = True
    return may


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1)


class PartialLabelLoss(nn.Module):
    """Dice + BCE over the annotated channels of each sample (optionally with the exclusion/marginal term)."""

    def __init__(
        self,
        mode: str = "masked",
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        smooth: float = 1e-5,
        overlaps: torch.Tensor | None = None,
        exclusion_weight: float = 1.0,
        batch_dice: bool = False,
    ):
        super().__init__()
        if mode not in ("masked", "marginal"):
            raise ValueError(f"unknown partial-label loss mode {mode!r} (masked | marginal)")
        if mode == "marginal" and overlaps is None:
            raise ValueError("marginal mode needs the vocabulary's overlap matrix (see overlap_matrix)")
        self.mode = mode
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.smooth = smooth
        self.exclusion_weight = exclusion_weight
        self.batch_dice = batch_dice
        self.register_buffer("overlaps", overlaps if overlaps is not None else torch.zeros(0, 0, dtype=torch.bool))

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                known: torch.Tensor | None = None) -> torch.Tensor:
        """``known`` (optional, [B, 1, *spatial]): 0 at voxels whose label is unknown (an ignored label value);
        they are left out of every channel's BCE and Dice."""
        logits = _flat(logits.float())
        target = _flat(target.float())
        mask = annotated.to(logits.dtype)  # [B, C]
        n_annotated = mask.sum().clamp_min(1.0)

        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # [B, C, N]
        prob = torch.sigmoid(logits)
        if known is None:
            bce = bce.mean(-1)  # [B, C]
        else:
            weight = _flat(known.float())  # [B, 1, N]
            bce = (bce * weight).sum(-1) / weight.sum(-1).clamp_min(1.0)
            prob, target = prob * weight, target * weight
        # where() rather than multiplication: unannotated channels contribute exactly zero, even if non-finite
        bce = torch.where(mask > 0, bce, torch.zeros_like(bce))
        inter = (prob * target).sum(-1)
        denom = prob.sum(-1) + target.sum(-1)
        if self.batch_dice:
            # one Dice per channel over the samples that annotate it (nnU-Net's batch Dice): small structures
            # absent from most patches stop dominating the loss; samples are coupled, so not for DP-SGD
            inter = torch.where(mask > 0, inter, torch.zeros_like(inter)).sum(0)
            denom = torch.where(mask > 0, denom, torch.zeros_like(denom)).sum(0)
            has = mask.sum(0) > 0
            dice = torch.where(has, 1.0 - (2.0 * inter + self.smooth) / (denom + self.smooth), torch.zeros_like(inter))
            loss = self.bce_weight * bce.sum() / n_annotated + self.dice_weight * dice.sum() / has.sum().clamp_min(1)
        else:
            dice = 1.0 - (2.0 * inter + self.smooth) / (denom + self.smooth)  # [B, C]
            dice = torch.where(mask > 0, dice, torch.zeros_like(dice))
            loss = (self.bce_weight * bce + self.dice_weight * dice).sum() / n_annotated
        if self.mode == "marginal":
            loss = loss + self.exclusion_weight * self._exclusion(logits, target, mask)
        return loss

    def _exclusion(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """BCE towards 0 on unannotated channels at voxels labeled as an annotated class they cannot overlap
        (``target`` is 0 at unknown voxels, so they are never such negatives)."""
        exclusive = (~self.overlaps).to(logits.dtype)  # [C, C]: 1 where classes are mutually exclusive
        known_fg = target * mask.unsqueeze(-1)  # [B, C, N] annotated foreground
        # for unannotated channel u: voxels where some annotated class a with exclusive[u, a] is foreground
        negatives = torch.einsum("ua,ban->bun", exclusive, known_fg).clamp(max=1.0)
        negatives = negatives * (1.0 - mask).unsqueeze(-1)
        if negatives.sum() == 0:
            return logits.sum() * 0.0
        bce0 = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
        return (bce0 * negatives).sum() / negatives.sum()


class ConditionalDistillation(nn.Module):
    """Distil unannotated channels from a teacher (the round's global model), off local foreground (ConDistFL)."""

    def __init__(self, temperature: float = 2.0):
        super().__init__()
        self.temperature = temperature

    def forward(
        self, logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
        known: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = self.temperature
        logits, teacher_logits, target = _flat(logits.float()), _flat(teacher_logits.float()), _flat(target.float())
        unannotated = (1.0 - annotated.to(logits.dtype)).unsqueeze(-1)  # [B, C, 1]
        local_fg = (target * annotated.to(logits.dtype).unsqueeze(-1)).amax(1, keepdim=True)  # [B, 1, N]
        weight = unannotated * (1.0 - local_fg)
        if known is not None:  # an ignored label value may be local foreground of a class outside the vocabulary
            weight = weight * _flat(known.float())
        if weight.sum() == 0:
            return logits.sum() * 0.0
        soft = torch.sigmoid(teacher_logits.detach() / t)
        kd = F.binary_cross_entropy_with_logits(logits / t, soft, reduction="none") * (t * t)
        return (kd * weight).sum() / weight.sum()


class SoftmaxLabelSpace:
    """Background + ``classes`` as one softmax: target indices from multi-channel labels, masks from logits.

    Index 0 is background (a constant zero logit), index ``k >= 1`` is ``classes[k - 1]`` (vocabulary order). A
    voxel labeled with both a tumor and its organ is the tumor (the more specific class); in the masks
    :meth:`decide` returns, a tumor voxel also counts toward its organ, as in the universal targets.
    """

    def __init__(self, vocab: Vocabulary, classes: Iterable[str] | None = None):
        names = vocab.resolve_many(classes) if classes else list(vocab.class_names)
        self.num_classes = vocab.num_classes
        self.names = names
        self.indices = torch.tensor([vocab.index(c) for c in names], dtype=torch.long)
        self.mask = torch.zeros(vocab.num_classes, dtype=torch.bool)
        self.mask[self.indices] = True
        # more specific classes (tumors: their voxels also carry the organ) win a voxel
        self.priority = torch.tensor([1.0 + len(vocab.parent_channels(c)) for c in names])
        self.parents = {i: [names.index(p) for p in vocab.parent_channels(c) if p in names]
                        for i, c in enumerate(names)}

    def target_index(self, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        """``target [B, C, N]`` + ``annotated [B, C]`` -> class index ``[B, N]`` (0: background, which includes
        every voxel of a class the sample's site does not annotate)."""
        idx = self.indices.to(target.device)
        known = target[:, idx] * annotated[:, idx].to(target.dtype).unsqueeze(-1)  # [B, K, N]
        score = known * self.priority.to(target.device, target.dtype)[None, :, None]
        best = score.argmax(1) + 1
        return torch.where(known.amax(1) > 0, best, torch.zeros_like(best))

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, C, ...]`` -> ``[B, 1 + K, ...]``: a zero background logit, then the label space's channels."""
        picked = logits[:, self.indices.to(logits.device)]
        return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``[C, *spatial]`` of one case -> binary masks ``[C, *spatial]`` by argmax over background + the
        label space; a tumor voxel is also marked in its organ's channel (the likeliest side of a composite)."""
        full = self.full_logits(logits.unsqueeze(0))[0]
        winner = full.argmax(0)
        masks = torch.zeros((self.num_classes, *logits.shape[1:]), dtype=torch.uint8)
        for k, channel in enumerate(self.indices.tolist()):
            here = winner == k + 1
            masks[channel] |= here.to(torch.uint8)
            parents = self.parents[k]
            if parents and here.any():
                side = full[[p + 1 for p in parents]].argmax(0)
                for j, p in enumerate(parents):
                    masks[int(self.indices[p])] |= (here & (side == j)).to(torch.uint8)
        return masks


class NaiveSoftmaxLoss(nn.Module):
    """Cross-entropy + soft Dice over one softmax (background + the label space), unannotated classes = background.
    The Dice term is one Dice per class over the batch, averaged over the classes present in its targets.

    Every channel of the label space receives gradient at every site, whether or not the site annotates it: this
    is the label conflict of naive FedAvg on partially labeled data (a liver site teaches "kidney = background").
    Channels outside the label space are not used.
    """

    def __init__(self, space: SoftmaxLabelSpace, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 smooth: float = 1e-5):
        super().__init__()
        self.space = space
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                known: torch.Tensor | None = None) -> torch.Tensor:
        full = self.space.full_logits(_flat(logits.float()))  # [B, 1 + K, N]
        index = self.space.target_index(_flat(target.float()), annotated)  # [B, N]
        prob = torch.softmax(full, dim=1)[:, 1:]  # foreground classes
        onehot = F.one_hot(index, full.shape[1]).permute(0, 2, 1)[:, 1:].to(prob.dtype)
        if known is None:
            ce = F.cross_entropy(full, index)
        else:  # unknown voxels (ignored label values): no cross-entropy, no Dice
            weight = _flat(known.float())[:, 0]  # [B, N]
            ce = F.cross_entropy(full, torch.where(weight > 0, index, torch.full_like(index, -100)))
            ce = torch.nan_to_num(ce)  # every voxel unknown: nothing to learn from this batch
            prob, onehot = prob * weight[:, None], onehot * weight[:, None]
        inter = (prob * onehot).sum((0, 2))
        denom = prob.sum((0, 2)) + onehot.sum((0, 2))
        dice = 1.0 - (2.0 * inter + self.smooth) / (denom + self.smooth)  # one per class, over the batch
        present = onehot.sum((0, 2)) > 0  # classes absent from the batch are left to the cross-entropy
        dice = torch.where(present, dice, torch.zeros_like(dice)).sum() / present.sum().clamp_min(1)
        return self.ce_weight * ce + self.dice_weight * dice


def build_loss(mode: str, vocab: Vocabulary, dice_weight: float = 1.0, bce_weight: float = 1.0,
               batch_dice: bool = False, label_space: Iterable[str] | None = None) -> nn.Module:
    """The loss a config names: ``masked`` | ``marginal`` | ``distill`` (masked + distillation) | ``naive``
    (softmax over background + ``label_space``, default every vocabulary class)."""
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown loss {mode!r} ({' | '.join(LOSS_MODES)})")
    if mode == "naive":
        return NaiveSoftmaxLoss(SoftmaxLabelSpace(vocab, label_space), dice_weight=dice_weight, ce_weight=bce_weight)
    base = "masked" if mode in ("masked", "distill") else mode
    overlaps = overlap_matrix(vocab) if base == "marginal" else None
    return PartialLabelLoss(base, dice_weight=dice_weight, bce_weight=bce_weight, overlaps=overlaps,
                            batch_dice=batch_dice)
