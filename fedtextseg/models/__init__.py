"""Segmentation models behind one registry: ``create_model(name, **overrides)``, ``list_models()``.

Importing this package registers every architecture (one module per architecture, configs as data).
"""

from fedtextseg.models.registry import (config_from_dict, create_model, is_model, list_models, merge_config,
                                        model_config, register_model)
from fedtextseg.models.cdpdnet import CDPDNET_CONFIGS, CDPDNet, CDPDNetConfig
from fedtextseg.models.dinov2 import (DinoConfig, DinoSliceEncoder, FeatureVolume, PretrainedWeightsWarning,
                                      compute_volume_features, crop_features, volume_feature_fn)
from fedtextseg.models import tgcnet as _tgcnet  # noqa: F401,E402  (registers tgcnet_*)

__all__ = [
    "register_model", "list_models", "is_model", "model_config", "create_model", "merge_config", "config_from_dict",
    "CDPDNet", "CDPDNetConfig", "CDPDNET_CONFIGS",
    "DinoConfig", "DinoSliceEncoder", "FeatureVolume", "PretrainedWeightsWarning",
    "compute_volume_features", "crop_features", "volume_feature_fn",
]
