"""Segmentation models behind one registry: ``create_model(name, **overrides)``, ``list_models()``.

Importing this package registers every architecture family (one module per family); the named sizes are data,
``configs/model/<name>.yaml``.
"""

from fedtextseg.models.registry import (architecture_changes, check_architecture, config_from_dict, create_model,
                                        is_model, list_models, merge_config, model_config, model_family,
                                        register_family)
from fedtextseg.models.cdpdnet import CDPDNet, CDPDNetConfig
from fedtextseg.models.dinov2 import (DinoConfig, DinoSliceEncoder, FeatureVolume, PretrainedWeightsWarning,
                                      compute_volume_features, crop_features, volume_feature_fn)
from fedtextseg.models import tgcnet as _tgcnet  # noqa: F401,E402  (registers the tgcnet family)

__all__ = [
    "register_family", "list_models", "is_model", "model_config", "model_family", "architecture_changes",
    "check_architecture", "create_model", "merge_config", "config_from_dict", "CDPDNet", "CDPDNetConfig",
    "DinoConfig", "DinoSliceEncoder", "FeatureVolume", "PretrainedWeightsWarning",
    "compute_volume_features", "crop_features", "volume_feature_fn",
]
