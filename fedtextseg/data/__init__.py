"""Sites and their data: site folders and label maps, checked NIfTI reading, label -> vocabulary channels,
``check-site`` validation, MONAI preprocessing/augmentation pipelines and cached per-site datasets.

Typical use::

    from fedtextseg.data import load_site, check_site, build_site_data, make_loader, PreprocessConfig
    site = load_site("sites/hospital-b")
    report = check_site(site)                        # report.ok, report.problems, report.format_text()
    data = build_site_data(site, PreprocessConfig(patch_size=(96, 96, 96)))
    loader = make_loader(data.train_ds, batch_size=1, shuffle=True)

Names are re-exported lazily, so ``import fedtextseg.data.site`` does not pay for importing MONAI and torch. Site
formats are readers registered with :func:`fedtextseg.data.site.register_reader`; the built-in ones (``nifti``,
``png-csv``) register when this package is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedtextseg.data import nifti_site, xray_site  # noqa: F401  the built-in site formats register their readers

_EXPORTS = {
    "site": ["Case", "Site", "load_site"],
    "io": ["NiftiVolume", "read_nifti", "read_label", "read_header", "grid_mismatch"],
    "labels": ["LabelCoder", "labels_to_channels", "encode_labels", "decode_codes", "annotated_mask"],
    "checks": ["SiteReport", "check_site", "check_site_main"],
    "transforms": ["PreprocessConfig", "RandTileCropByPosNegd", "preprocess_transform", "train_transform",
                   "val_transform"],
    "dataset": ["SiteData", "build_site_data", "build_site_datasets", "make_loader", "split_cases", "case_items",
                "cache_key", "default_cache_root"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'fedtextseg.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedtextseg.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
