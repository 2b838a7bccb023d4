"""The config's schema: one dataclass per section of ``configs/``, registered in Hydra's ConfigStore as
``base_config`` (the first entry of ``configs/config.yaml``'s defaults list).

Hydra merges every YAML file it composes into these dataclasses with struct mode on, so a key the schema does not
declare (a typo in an experiment file, ``federation.round=3`` on the command line) fails at composition with the
file or override that carries it, and a value of the wrong type ("eight" for ``federation.rounds``) fails the same
way. The values live in the YAML files; the defaults here are what a section means when a file leaves a key out
(``data.kind`` of a NIfTI federation, ``generate`` of real data). ``model.kwargs`` and ``data.preprocess`` are
free-form on purpose: each architecture validates its own options (``fedtextseg.models.registry.config_from_dict``),
each data pipeline its own (``fedtextseg.data.transforms.PreprocessConfig.from_dict``), naming the ones it knows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, get_type_hints

__all__ = ["FedTextSegConfig", "register_schema", "undeclared_keys", "SCHEMA_NAME"]

SCHEMA_NAME = "base_config"


@dataclass
class RunConfig:
    name: Optional[str] = None
    seed: int = 0
    results_dir: str = "results"
    device: str = "auto"
    precision: str = "auto"
    threads: Optional[int] = None
    experiment: str = "default"  # set by compose_config: the experiment file the run composed


@dataclass
class TextConfig:
    bank: Optional[str] = None
    encoder: str = "clip"
    model: str = "ViT-B-32"
    pretrained: Optional[str] = "openai"
    allow_fallback: bool = True


@dataclass
class TrainConfig:
    local_steps: int = 20
    batch_size: int = 2
    lr: float = 4.0e-4
    lr_schedule: str = "cosine"
    warmup_rounds: int = 0
    weight_decay: float = 1.0e-5
    optimizer: str = "adamw"
    grad_clip: Optional[float] = 12.0
    loss: str = "masked"
    naive_classes: Optional[List[str]] = None
    bce_weight: float = 1.0
    batch_dice: bool = True
    distill_temperature: float = 2.0
    distill_weight: List[float] = field(default_factory=lambda: [0.01, 1.0])
    log_every: int = 10


@dataclass
class EvalConfig:
    overlap: float = 0.5
    threshold: float = 0.5
    keep_largest: bool = True
    hd95: bool = True
    max_cases: Optional[int] = None


@dataclass
class FederationConfig:
    rounds: int = 3
    rule: str = "fedavg"
    server_opt: Dict[str, float] = field(default_factory=dict)
    weighting: str = "examples"
    robust: Optional[str] = None
    min_sites: int = 2
    outlier_factor: Optional[float] = 100.0
    max_update_norm: Optional[float] = None
    round_timeout: float = 3600.0
    first_round_timeout: Optional[float] = None
    frozen_cache: Optional[str] = None
    fraction_train: float = 1.0
    evaluate_unseen: bool = True
    prox_mu: float = 0.0


@dataclass
class SecAggConfig:
    num_shares: float = 1.0
    reconstruction_threshold: float = 1.0
    clipping_range: float = 1.0
    quantization_range: int = 4194304


@dataclass
class PrivacyConfig:
    enabled: bool = False
    accountant: str = "rdp"
    target_epsilon: Optional[float] = None
    target_delta: float = 1.0e-5
    noise_multiplier: Optional[float] = None
    max_grad_norm: float = 1.0
    expected_batch_size: Optional[int] = None
    grad_sample_mode: str = "microbatch"
    min_samples_for_metrics: int = 0
    metric_decimals: Optional[int] = None
    report_train_loss: bool = False
    ledger_dir: Optional[str] = None
    run_key: Optional[str] = None
    secure_aggregation: str = "none"
    secagg: SecAggConfig = field(default_factory=SecAggConfig)


@dataclass
class GenerateConfig:
    """How ``fedtextseg.sites.ensure_data`` makes the data on first use: synthetic CT (``cases_per_site``,
    ``shape``), synthetic X-rays (``images_per_site``, ``size``, ``test_images``) or the QaTa-COV19 split
    (``source``, ``by``, ``mix``, ``eval_split``)."""

    sites: int = 4
    seed: int = 0
    cases_per_site: Optional[int] = None
    shape: Optional[List[int]] = None
    images_per_site: Optional[int] = None
    size: Optional[int] = None
    test_images: Optional[int] = None
    source: Optional[str] = None
    by: Optional[str] = None
    mix: Optional[float] = None
    eval_split: Optional[str] = None


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic (3D CT, NIfTI sites) | xray (synthetic chest X-rays) | qata (QaTa-COV19)
    root: str = "data/synthetic"
    sites: Optional[List[str]] = None
    unseen: Optional[str] = None
    vocabulary: Optional[str] = None  # null: each site's own (site.yaml), else the abdominal CT vocabulary
    generate: Optional[GenerateConfig] = None
    # free-form like model.kwargs: the site's pipeline validates it (3D: fedtextseg.data.transforms.PreprocessConfig,
    # with every augmentation option; 2D: image_size) and names the options it knows
    preprocess: Dict[str, Any] = field(default_factory=dict)
    val_fraction: float = 0.2
    cache_dir: Optional[str] = None


@dataclass
class ModelConfig:
    name: str = "cdpdnet_tiny"
    family: Optional[str] = None  # written by configs/model/<name>.yaml with the architecture it names
    architecture: Optional[Dict[str, Any]] = None  # the named architecture, as read (change it via kwargs)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    dino_cache: bool = False
    text_bank: bool = True


@dataclass
class FedTextSegConfig:
    run: RunConfig = field(default_factory=RunConfig)
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)


_REGISTERED = False


def register_schema() -> None:
    """Store the schema in Hydra's ConfigStore (once per process) so ``configs/config.yaml`` can start from it."""
    global _REGISTERED
    if _REGISTERED:
        return
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=FedTextSegConfig)
    _REGISTERED = True


def _section_type(hint: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``Optional[X]``), else None (a value or a free-form mapping)."""
    for candidate in (hint, *getattr(hint, "__args__", ())):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def undeclared_keys(cfg: Mapping, schema: type = FedTextSegConfig, prefix: str = "") -> list[str]:
    """Dotted keys of ``cfg`` that ``schema`` does not declare (free-form mappings such as ``model.kwargs`` are
    not looked into). Hydra's ``+key=value`` appends even to a structured node; this is the check that refuses it."""
    hints = get_type_hints(schema)
    out = []
    for key in cfg:
        if key not in hints:
            out.append(f"{prefix}{key}")
            continue
        section = _section_type(hints[key])
        if section is not None and cfg[key] is not None:
            out += undeclared_keys(cfg[key], section, f"{prefix}{key}.")
    return out
