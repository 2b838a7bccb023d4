"""Wiring from a resolved config to running parts: text bank -> model, a site's cached data, local training,
evaluation. Centralized training, the Flower client and server, and the benchmarks all build through here, so
they share one definition of "a site trains for a round" (``engine`` does the loop itself).

Server side: :func:`prepare_bank` (the only place a text encoder or hub cache is touched) and
:func:`build_model`. Site side: :class:`SiteRunner` (site data cached once, then ``train_round`` / ``evaluate``),
which a Flower client keeps alive across rounds in simulation and rebuilds cheaply from the disk cache in
deployment, where every message starts a fresh process.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fedtextseg import engine
from fedtextseg.data.dataset import SiteData, build_site_data, make_loader
from fedtextseg.data.site import Site, load_site
from fedtextseg.data.transforms import PreprocessConfig
from fedtextseg.errors import ConfigError, PatchSizeError
from fedtextseg.losses import ConditionalDistillation, build_loss
from fedtextseg.models import check_architecture, create_model
from fedtextseg.privacy.site import SitePrivacy
from fedtextseg.text import EmbeddingBank
from fedtextseg.vocab import get_vocabulary

__all__ = [
    "prepare_bank",
    "build_model",
    "uses_text_bank",
    "provided_weights",
    "preprocess_config",
    "lr_for_round",
    "distill_weight_for_round",
    "SiteRunner",
    "derived_seed",
]

log = logging.getLogger(__name__)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def derived_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any parts (run seed, site name, round): the same in every process."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ----------------------------------------------------------------------------- server side: bank and model
def prepare_bank(cfg: DictConfig, log_fn=print) -> EmbeddingBank:
    """The text embedding bank the run uses: a prebuilt file (``text.bank``) or encoded now, offline-aware."""
    from fedtextseg.text import build_bank

    if not uses_text_bank(cfg):  # TGC-Net: encodes each image's report itself; the bank only names the classes
        return _names_only_bank(cfg)
    if cfg.text.bank:
        return EmbeddingBank.load(cfg.text.bank)
    vocab = cfg.data.vocabulary or "abdomen-ct"
    pretrained = cfg.text.pretrained
    return build_bank(
        vocabulary=vocab,
        encoder=cfg.text.encoder,
        model=cfg.text.model,
        pretrained=None if pretrained in (None, "none", "None") else pretrained,
        allow_fallback=bool(cfg.text.allow_fallback),
        log=log_fn,
    )


def build_model(cfg: DictConfig, bank: EmbeddingBank | None = None, *, frozen: Mapping[str, Any] | None = None,
                meta: Mapping[str, Any] | None = None) -> nn.Module:
    """The configured model, from a bank (server) or from a frozen bundle's arrays + meta (site).

    A site never loads pretrained weights itself: it builds the architecture with random frozen parts, then
    takes the server's frozen arrays (DINOv2 or CLIP weights, the text bank), so an air-gapped node needs no hub.
    Models that encode their own text (``model.text_bank: false``, TGC-Net) get the data's vocabulary instead.
    """
    check_architecture(cfg.model.name, cfg.model.family, _plain(cfg.model.architecture))
    kwargs = _with_pipeline_patch(cfg, dict(_plain(cfg.model.kwargs) or {}))
    if not uses_text_bank(cfg):
        if bank is None and (frozen is None or meta is None):
            raise ConfigError("build_model needs an embedding bank (server) or the frozen arrays + meta (site)")
        text = {} if "vocabulary" in kwargs else {"vocabulary": str(cfg.data.vocabulary or "chest-xray")}
        if frozen is not None:
            kwargs = provided_weights(cfg.model.name, kwargs)  # filled in below from the server's arrays
    elif bank is not None:
        text = dict(class_embeddings=bank.class_embeddings, task_embeddings=bank.task_embeddings,
                    class_names=bank.class_names, task_names=bank.task_names)
    elif frozen is not None and meta is not None:
        text = dict(class_embeddings=torch.as_tensor(np.array(frozen["class_embeddings"], copy=True)),
                    task_embeddings=torch.as_tensor(np.array(frozen["task_embeddings"], copy=True)),
                    class_names=list(meta["class_names"]), task_names=list(meta["task_names"]))
        kwargs = provided_weights(cfg.model.name, kwargs)  # filled in below from the server's arrays
    else:
        raise ConfigError("build_model needs an embedding bank (server) or the frozen arrays + meta (site)")
    try:
        model = create_model(cfg.model.name, **text, **kwargs)
    except PatchSizeError as exc:  # the patch came from data.preprocess (_with_pipeline_patch): name that key
        raise PatchSizeError(f"data.preprocess.patch_size={list(kwargs['patch_size'])}: {exc}") from None
    if frozen is not None:
        from fedtextseg.params import merge_into

        merge_into(model, {k: torch.as_tensor(np.array(v, copy=True)) for k, v in frozen.items()})
        if meta is not None and "dino" in meta:
            model.provenance["dino"] = dict(meta["dino"])
        if meta is not None and meta.get("clip"):  # where the server's CLIP weights came from
            model.provenance.update(dict(meta["clip"]))
    return model


def _with_pipeline_patch(cfg: DictConfig, kwargs: dict) -> dict:
    """One patch size: a 3D model that records a training / sliding-window patch gets the pipeline's
    (``data.preprocess.patch_size``); a different one in ``model.kwargs`` is refused, not silently ignored."""
    from fedtextseg.models import model_config

    patch = cfg.data.preprocess.get("patch_size")  # free-form (config_schema): 2D pipelines have none
    if patch is None or "patch_size" not in model_config(cfg.model.name):
        return kwargs
    patch = [int(p) for p in patch]
    if "patch_size" in kwargs and [int(p) for p in kwargs["patch_size"]] != patch:
        raise ConfigError(f"model.kwargs.patch_size={list(kwargs['patch_size'])} differs from "
                          f"data.preprocess.patch_size={patch}: the patch is set once, in data.preprocess")
    return {**kwargs, "patch_size": patch}


def uses_text_bank(cfg: DictConfig) -> bool:
    """Whether the model is conditioned on the embedding bank (CDPDNet) rather than encoding its own text (TGC-Net:
    each image's report, with its own CLIP text tower); set by ``text_bank`` in the model config."""
    return bool(cfg.model.text_bank)


def provided_weights(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus the switch that makes model ``name`` skip loading its pretrained frozen weights, because the
    caller loads them (a site from the server's frozen bundle, ``load_model_file`` from the file): DINOv2's
    ``dino.weights="provided"`` (CDPDNet), CLIP's ``pretrained="provided"`` (TGC-Net)."""
    from fedtextseg.models import model_config

    out, registered = dict(kwargs), model_config(name)
    if "dino" in registered:
        out["dino"] = {**dict(out.get("dino") or {}), "weights": "provided"}
    if "clip_model" in registered:
        out["pretrained"] = "provided"
    return out


def _names_only_bank(cfg: DictConfig) -> EmbeddingBank:
    """A bank that only names the vocabulary's classes and tasks (one-hot rows), for models that encode their own
    text: the coordinator still needs the class list (per-class aggregation, tables) and records where text came
    from."""
    vocab = get_vocabulary(cfg.data.vocabulary)
    eye = torch.eye(vocab.num_classes + len(vocab.task_names))
    return EmbeddingBank(
        class_names=vocab.class_names, class_embeddings=eye[: vocab.num_classes], task_names=vocab.task_names,
        task_embeddings=eye[vocab.num_classes:], class_template=vocab.class_template,
        task_template=vocab.task_template, vocabulary=vocab.name, vocabulary_hash=vocab.content_hash,
        encoder={"kind": "none", "model": str(cfg.model.name),
                 "note": "one-hot names only: the model encodes each image's report with its own text tower"},
        vocabulary_spec=vocab.to_dict(),
    )


def preprocess_config(cfg: DictConfig, model: nn.Module | None = None) -> PreprocessConfig:
    """The data pipeline's settings; with the DINOv2 feature cache on, in-plane tiles = the patch's in-plane size."""
    pre = dict(_plain(cfg.data.preprocess))
    if model is not None and _uses_feature_cache(cfg, model):
        pre["tile"] = tuple(pre["patch_size"][1:])
        pre["rot90_prob"] = 0.0  # in-plane rotations do not commute with cached ViT features
    return PreprocessConfig.from_dict(pre)


def _uses_feature_cache(cfg: DictConfig, model: nn.Module) -> bool:
    return bool(cfg.model.dino_cache) and getattr(model, "dino", None) is not None


def lr_for_round(cfg: DictConfig, round_: int, total_rounds: int) -> float:
    """Cosine decay of the learning rate over the whole run (per round), after optional warm-up rounds."""
    base = float(cfg.train.lr)
    if cfg.train.lr_schedule == "constant" or total_rounds <= 1:
        return base
    warm = int(cfg.train.warmup_rounds)
    if round_ <= warm:
        return base * round_ / max(1, warm)
    t = (round_ - 1 - warm) / max(1, total_rounds - warm)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def distill_weight_for_round(cfg: DictConfig, round_: int, total_rounds: int) -> float:
    if cfg.train.loss != "distill":
        return 0.0
    lo, hi = (float(v) for v in cfg.train.distill_weight)
    return lo + (hi - lo) * (round_ - 1) / max(1, total_rounds - 1)


# ----------------------------------------------------------------------------- site side
class SiteRunner:
    """One site's data (cached once) and model: ``train_round`` and ``evaluate`` for any entry point.

    3D NIfTI sites get cached patch datasets (``build_site_data``); 2D ``png-csv`` sites (chest X-rays with
    reports, TGC-Net) get resized image datasets (``build_xray_site_data``) and are evaluated in one window.
    """

    def __init__(self, cfg: DictConfig, site: Site | str | Path, model: nn.Module, *, device: str | None = None,
                 cache_dir: str | Path | None | bool = None):
        self.cfg = cfg
        self.site = site if isinstance(site, Site) else load_site(site, cfg.data.vocabulary)
        self.device = engine.resolve_device(device or cfg.run.device)
        self.model = model
        self._check_vocabulary()
        if self.site.format == "png-csv":  # 2D report-guided site (TGC-Net): see fedtextseg.data.xray_data
            from fedtextseg.data.xray_data import build_xray_site_data, image_size_for

            size = image_size_for(cfg, model)
            self.pre, self.roi_size = None, (size, size)  # evaluation: one window = the whole resized image
            self.data = build_xray_site_data(self.site, size, val_fraction=float(cfg.data.val_fraction),
                                             seed=int(cfg.run.seed))
        else:
            self.pre = preprocess_config(cfg, model)
            self.roi_size = tuple(self.pre.patch_size)
            feature_fn = feature_key = None
            if _uses_feature_cache(cfg, model):
                from fedtextseg.models import volume_feature_fn

                feature_fn = volume_feature_fn(model, self.pre.tile)
                feature_key = f"{model.dino.signature()}-{'x'.join(map(str, self.pre.tile))}"
            if cache_dir is None and cfg.data.cache_dir:
                cache_dir = cfg.data.cache_dir
            self.data: SiteData = build_site_data(
                self.site, self.pre, cache_dir=cache_dir, val_fraction=float(cfg.data.val_fraction),
                seed=int(cfg.run.seed), feature_fn=feature_fn, feature_key=feature_key,
            )
        vocab = self.site.vocabulary
        self.loss_fn = build_loss(cfg.train.loss, vocab, batch_dice=bool(cfg.train.batch_dice),
                                  bce_weight=float(cfg.train.bce_weight),
                                  label_space=cfg.train.naive_classes)
        # naive softmax runs (train.loss=naive) are evaluated by argmax over background + their label space
        self.softmax_space = getattr(self.loss_fn, "space", None)
        self.distill_fn = ConditionalDistillation(float(cfg.train.distill_temperature))
        # largest-connected-component clean-up: organs only (tumors are often multifocal)
        self.keep_largest = [i for i, c in enumerate(vocab.classes) if c.parent is None] if cfg.eval.keep_largest else []
        log.info("%s", self.data.describe())
        # DP-SGD settings of this site (run config + site.yaml privacy block; a client adds its node config and the
        # run key): None unless DP-SGD is on
        self.privacy = SitePrivacy.for_site(cfg, self.site)

    def _check_vocabulary(self) -> None:
        names = list(getattr(self.model, "class_names", []))
        if names and names != self.site.vocabulary.class_names:
            raise ConfigError(
                f"site {self.site.name!r} speaks vocabulary {self.site.vocabulary.name!r} "
                f"({self.site.vocabulary.num_classes} classes) but the model's head has {len(names)} classes "
                "from another vocabulary; encode the bank with the site's vocabulary"
            )

    def load_global(self, arrays: Mapping[str, Any]) -> None:
        """Take the round's global shared + per-class arrays (numpy or tensors) into the local model."""
        from fedtextseg.params import merge_into

        merge_into(self.model, {k: torch.as_tensor(np.array(v, copy=True)) for k, v in arrays.items()})

    def wire_arrays(self) -> dict[str, np.ndarray]:
        """What this site sends back: its shared + per-class arrays (never frozen or local ones)."""
        groups = self.model.param_groups()
        state = self.model.state_dict()
        return {k: state[k].detach().cpu().numpy().copy() for k in [*groups.shared, *groups.per_class]}

    def trained_classes_mask(self) -> np.ndarray:
        """Bool [C]: the classes whose per-class rows this site's training shapes, i.e. what class-aware aggregation
        counts it for: its annotated classes, or the whole label space under the naive softmax loss (which trains
        every class, unannotated ones towards background)."""
        if self.softmax_space is not None:
            return self.softmax_space.mask.numpy().copy()
        return self.site.annotated_mask()

    def identity(self) -> dict[str, str]:
        """What this site's model was built from (name, architecture, frozen and bank hashes, library version): sent
        with every train reply so the server refuses an update from a model that is not the run's. Computed once per
        model object: hashing the frozen arrays (all of DINOv2 at paper size) every round would be wasted work, since
        nothing trains them."""
        from fedtextseg.federation.identity import model_identity

        cached = getattr(self, "_identity", None)
        if cached is None or cached[0] is not self.model:
            cached = self._identity = (self.model, model_identity(self.cfg.model.name, self.model))
        return dict(cached[1])

    @property
    def num_examples(self) -> int:
        """Training volumes (the FedAvg weight of this site)."""
        return len(self.data.train_cases)

    def train_round(self, *, round_: int, total_rounds: int, steps: int | None = None,
                    prox_mu: float = 0.0, teacher: nn.Module | None = None, optimizer=None,
                    log_every: int | None = None) -> engine.TrainStats:
        """Local training for one round; deterministic given (run seed, site, round) whatever ran before."""
        cfg = self.cfg
        seed = derived_seed(cfg.run.seed, self.site.name, round_)
        torch.manual_seed(seed)
        self.data.train_ds.transform.set_random_state(seed=seed)
        generator = torch.Generator().manual_seed(seed)
        loader = make_loader(self.data.train_ds, batch_size=int(cfg.train.batch_size), shuffle=True,
                             generator=generator)
        self.model = engine.prepare_model(self.model, self.device)
        self.model.train()  # evaluation (the previous message) leaves it in eval mode; Opacus checks the mode
        lr = lr_for_round(cfg, round_, total_rounds)
        optimizer = optimizer or engine.make_optimizer(self.model, lr, float(cfg.train.weight_decay), cfg.train.optimizer)
        reference = None
        if prox_mu > 0:
            reference = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        distill_weight = distill_weight_for_round(cfg, round_, total_rounds)
        if distill_weight > 0 and teacher is None:
            teacher = copy.deepcopy(self.model).eval()
        train_kwargs = dict(
            loss_fn=self.loss_fn, optimizer=optimizer,
            steps=int(steps if steps is not None else cfg.train.local_steps), device=self.device,
            precision=cfg.run.precision, grad_clip=cfg.train.grad_clip, prox_mu=prox_mu, prox_reference=reference,
            teacher=teacher if distill_weight > 0 else None, distill_fn=self.distill_fn,
            distill_weight=distill_weight, log_every=int(log_every if log_every is not None else cfg.train.log_every),
            label=f"[{self.site.name}] round {round_}",
        )
        if self.privacy is not None:  # DP-SGD (fedtextseg.privacy): Poisson volumes, per-volume clipping, noise, ledger
            return self.privacy.train_round(self, round_=round_, total_rounds=total_rounds, train_kwargs=train_kwargs)
        return engine.train_steps(self.model, loader, **train_kwargs)

    def evaluate(self, dataset=None, max_cases: int | None = None, task_override: int | None = None):
        """Per-class Dice/HD95 of the current model on this site's validation cases (its annotated classes)."""
        ds = self.data.val_ds if dataset is None else dataset
        limit = self.cfg.eval.max_cases if dataset is None else max_cases
        items = (ds[i] for i in range(len(ds) if limit is None else min(len(ds), int(limit))))
        return engine.evaluate(
            self.model, items, self.site.vocabulary.class_names, roi_size=self.roi_size,
            overlap=float(self.cfg.eval.overlap), threshold=float(self.cfg.eval.threshold),
            keep_largest=self.keep_largest, device=self.device, precision=self.cfg.run.precision,
            with_hd95=bool(self.cfg.eval.hd95), task_override=task_override, softmax_space=self.softmax_space,
        )

    def all_cases_dataset(self):
        """Every labeled case as a validation item (for evaluating on a held-out hospital)."""
        if self.pre is None:  # 2D site
            from fedtextseg.data.xray_data import xray_case_dataset

            return xray_case_dataset(self.site, self.roi_size[0])
        from fedtextseg.data.dataset import SiteDataset, case_items
        from fedtextseg.data.transforms import val_transform

        return SiteDataset(case_items(self.site.labeled_cases), val_transform(self.site, self.pre))
