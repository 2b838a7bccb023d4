"""A trained model as one self-describing file: weights, architecture, text bank provenance, classes and who
annotated them, preprocessing, and a training summary. ``fedtextseg info MODEL`` prints it as a model card.

The file is a ``torch.save`` of plain Python containers and tensors (loadable with ``weights_only=True``), written
atomically. :func:`load_model_file` rebuilds the network without any hub or text encoder: the embedding bank and
the frozen pretrained weights are inside the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from fedtextseg.errors import FedTextSegError

__all__ = ["FORMAT", "save_model_file", "load_model_file", "read_model_info"]

FORMAT = "fedtextseg-model/1"


def save_model_file(path: str | Path, model: torch.nn.Module, cfg: DictConfig, *, bank=None,
                    annotated_by: Mapping[str, list[str]] | None = None, training: Mapping[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    container = OmegaConf.to_container(cfg, resolve=True)
    payload = {
        "format": FORMAT,
        "model_name": str(cfg.model.name),
        "model_kwargs": container["model"].get("kwargs") or {},
        "class_names": list(model.class_names),
        "task_names": list(getattr(model, "task_names", [])),
        "vocabulary": container["data"].get("vocabulary", "abdomen-ct"),
        "preprocess": container["data"]["preprocess"],
        "eval": container.get("eval", {}),
        "text_bank": bank.provenance() if bank is not None else None,
        "provenance": _plain(getattr(model, "provenance", {})),
        "annotated_by": {k: list(v) for k, v in (annotated_by or {}).items()},
        "training": dict(training or {}),
        "config": container,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def read_model_info(path: str | Path) -> dict[str, Any]:
    """The file's contents (state dict included); a clear error for anything that is not a model file."""
    path = Path(path)
    if not path.is_file():
        raise FedTextSegError(f"{path}: no such model file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated/corrupt/not a torch file
        raise FedTextSegError(f"{path}: cannot read model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FedTextSegError(f"{path}: not a fedtextseg model file (expected format {FORMAT})")
    return data


def _trained_architecture(path: Path, info: Mapping[str, Any]) -> dict[str, Any]:
    """The model's kwargs that rebuild the architecture it was trained with: its ``model.kwargs``, plus every field
    of the recorded ``model.architecture`` that ``configs/model/<name>.yaml`` has changed since (none usually)."""
    from fedtextseg.models import architecture_changes, merge_config

    kwargs = dict(info.get("model_kwargs") or {})
    recorded = ((info.get("config") or {}).get("model") or {}).get("architecture")
    if not recorded:  # written before architectures were recorded: the file's name and kwargs are all there is
        return kwargs
    trained = merge_config(recorded, kwargs, where=f"{path}: model.kwargs")
    changes = architecture_changes(info["model_name"], trained, where=f"{path}: model.architecture")
    if "vocabulary" not in kwargs:
        changes.pop("vocabulary", None)  # TGC-Net reads the data's vocabulary (below), as build_model does
    return changes


def load_model_file(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the network from the file (no hub, no text encoder) and load its weights.

    The frozen pretrained weights (DINOv2, CLIP) are in the file: the model is built with its "provided" switch
    (``runtime.provided_weights``) so it never looks for them elsewhere.
    """
    from fedtextseg.models import create_model
    from fedtextseg.runtime import provided_weights

    info = read_model_info(path)
    state = info["state_dict"]
    kwargs = provided_weights(info["model_name"], _trained_architecture(path, info))
    if "class_embeddings" in state:  # conditioned on the embedding bank (CDPDNet)
        text = dict(class_embeddings=state["class_embeddings"], task_embeddings=state["task_embeddings"],
                    class_names=info["class_names"], task_names=info["task_names"])
    else:  # encodes its own text (TGC-Net): only the vocabulary
        text = {} if "vocabulary" in kwargs else {"vocabulary": info.get("vocabulary")}
    model = create_model(info["model_name"], **text, **kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FedTextSegError(f"{path}: weights do not fit {info['model_name']}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.provenance = info.get("provenance", {})
    model.eval()
    return model, info
