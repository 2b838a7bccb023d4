"""``fedtextseg info MODEL``: a trained model file read as a model card.

What the card says: the file (size, sha256), the architecture and its parameter counts (trainable / frozen, per
parameter group), where the text-embedding bank came from (encoder, fallback, content hash) and the frozen DINOv2
weights (random / hub / file), the vocabulary and the classes the federation trained on with the sites that
annotated each, the preprocessing the model expects, its evaluation defaults, and a training summary (rounds,
sites, rule, privacy). Warnings stand out: random frozen weights, a fallback text encoder, an untraceable head.

    card = model_card("results/run/model.pt")    # a JSON-able dict
    print(format_card(card))                       # what `fedtextseg info` prints (`--json` prints the dict)
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path
from typing import Any, Mapping

from fedtextseg.hashing import file_sha256
from fedtextseg.errors import FedTextSegError
from fedtextseg.vocab import get_vocabulary

__all__ = ["check_model_file", "model_card", "format_card", "info_main"]


def check_model_file(path: str | Path) -> Path:
    """Cheap checks before unpickling: exists, not empty, a complete PyTorch archive (clear message otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise FedTextSegError(f"{path}: no such model file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(4)
    if size == 0:
        raise FedTextSegError(f"{path}: empty file, not a model file")
    if head != b"PK\x03\x04":
        raise FedTextSegError(f"{path}: not a fedtextseg model file (not a PyTorch archive: it starts with {head!r})")
    if not zipfile.is_zipfile(path):
        raise FedTextSegError(f"{path}: model file is truncated or corrupt ({size:,} bytes, the archive's directory "
                              "is missing); copy it again")
    return path


def _architecture(name: str, kwargs: Mapping[str, Any]) -> tuple[dict, str]:
    """The model's full configuration (registered defaults + the file's overrides) and a one-line summary."""
    from fedtextseg.models.registry import is_model, merge_config, model_config

    if not is_model(name):
        return dict(kwargs), f"{name} (not a registered model here; overrides {dict(kwargs)})"
    cfg = merge_config(model_config(name), dict(kwargs), where=name)
    cfg = json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
    if name.startswith("cdpdnet"):
        dino = cfg.get("dino") or {}
        widths = "-".join(str(w) for w in cfg.get("widths", []))
        parts = [f"CDPDNet 3D U-Net, {len(cfg.get('widths', []))} stages (widths {widths})"]
        if dino.get("enabled", True):
            depth = f"{dino['depth']} blocks, " if dino.get("depth") else ""
            parts.append(f"DINOv2 {dino.get('name')} ({depth}last {dino.get('layers')} layers) fused at stages "
                         f"{', '.join(str(s) for s in cfg.get('fusion_stages', []))}")
        else:
            parts.append("no DINOv2 branch")
        parts.append(f"text conditioning {'on' if cfg.get('text_conditioning', True) else 'off'} "
                     f"(dim {cfg.get('text_dim')}, FiLM + TTPG)")
        parts.append("patch " + "x".join(str(p) for p in cfg.get("patch_size", [])))
        return cfg, "; ".join(parts)
    simple = {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return cfg, f"{name}: " + ", ".join(f"{k}={v}" for k, v in list(simple.items())[:10])


def model_card(path: str | Path) -> dict[str, Any]:
    """Everything the card shows, as plain JSON-able data; a clear FedTextSegError for non-model files."""
    from fedtextseg.model_file import load_model_file, read_model_info

    path = check_model_file(path)
    warnings: list[str] = []
    params = frozen_hash = None
    try:
        model, info = load_model_file(path)
        from fedtextseg.params import count_params, frozen_hash as _frozen_hash

        groups = model.param_groups() if hasattr(model, "param_groups") else None
        params = count_params(model, groups)
        frozen_hash = _frozen_hash(model)[:16] if groups is not None else None
    except FedTextSegError as exc:
        info = read_model_info(path)  # a non-model file fails here with its own clear message
        warnings.append(f"the architecture could not be rebuilt from the file: {exc}")
    name = str(info.get("model_name"))
    arch, summary = _architecture(name, info.get("model_kwargs") or {})
    bank = dict(info.get("text_bank") or {})
    encoder = dict(bank.get("encoder") or {})
    provenance = dict(info.get("provenance") or {})
    dino = dict(provenance.get("dino") or {})
    if dino.get("weights") == "provided":  # a model rebuilt from frozen arrays: the server's record says more
        dino.setdefault("note", "weights received from the server; their origin is not recorded")
    vocab_name = info.get("vocabulary") or "abdomen-ct"
    try:
        vocab = get_vocabulary(vocab_name)
        values = {c: i + 1 for i, c in enumerate(vocab.class_names)}
        vocab_summary = {"name": vocab.name, "num_classes": vocab.num_classes, "tasks": vocab.task_names,
                         "default_task": vocab.default_task, "hash": vocab.content_hash}
    except FedTextSegError as exc:
        values, vocab_summary = {}, {"name": str(vocab_name), "error": str(exc)}
        warnings.append(f"vocabulary {vocab_name!r} is not available here: {exc}")
    annotated_by = {k: list(v) for k, v in (info.get("annotated_by") or {}).items()}
    classes = [{"class": c, "value": values.get(c), "sites": annotated_by.get(c, [])}
               for c in info.get("class_names", []) if not annotated_by or c in annotated_by]
    config = dict(info.get("config") or {})
    training = dict(info.get("training") or {})
    fed, train_cfg, privacy_cfg = (dict(config.get(k) or {}) for k in ("federation", "train", "privacy"))
    if training.get("mode") != "centralized" and fed:
        training.setdefault("rule", fed.get("rule"))
        training.setdefault("rounds", fed.get("rounds"))
    if train_cfg:
        training.setdefault("loss", train_cfg.get("loss"))
        training.setdefault("local_steps", train_cfg.get("local_steps"))
    privacy = training.pop("privacy", None)
    if privacy is None:
        privacy = ({"enabled": True, "spent": "not recorded in the model file", **privacy_cfg}
                   if privacy_cfg.get("enabled") else {"enabled": False})
    if dino.get("weights") == "random":
        warnings.append(f"the frozen DINOv2 weights were RANDOM ({dino.get('reason', 'no reason recorded')}): "
                        "its features carry no pretrained knowledge; fine for tests and demos only")
    if encoder.get("pretrained") == "random-init":
        warnings.append("the text encoder had RANDOM weights: the class/task embeddings carry no meaning")
    if encoder.get("fallback_reason"):
        req = encoder.get("requested") or {}
        warnings.append(f"text bank made with the fallback encoder {encoder.get('kind')} {encoder.get('model')} "
                        f"instead of {req.get('kind')} {req.get('model')}/{req.get('pretrained')}: "
                        f"{encoder['fallback_reason']}")
    if not bank:
        warnings.append("no text-bank provenance in the file")
    if not annotated_by:
        warnings.append("the file does not record which sites annotated which classes")
    ev = dict(info.get("eval") or {})
    return {
        "file": {"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path),
                 "format": info.get("format")},
        "model": {"name": name, "summary": summary, "config": arch, "parameters": params, "frozen_hash": frozen_hash},
        "text_bank": bank,
        "dino": dino,
        "vocabulary": vocab_summary,
        "classes": classes,
        "num_model_classes": len(info.get("class_names", [])),
        "tasks": list(info.get("task_names", [])),
        "preprocess": dict(info.get("preprocess") or {}),
        "eval": {k: ev[k] for k in ("threshold", "overlap", "keep_largest") if k in ev},
        "training": training,
        "privacy": privacy,
        "warnings": warnings,
    }


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _joined(value: Any, sep: str = "x") -> str:
    return sep.join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def format_card(card: Mapping[str, Any]) -> str:
    """The card as aligned text for a terminal."""
    lines: list[str] = []

    def row(key: str, value: Any) -> None:
        lines.append(f"  {key:<13} {value}")

    f, m = card["file"], card["model"]
    lines.append(f"Model card: {f['path']}")
    row("file", f"{f['bytes'] / 1e6:.2f} MB, sha256 {f['sha256'][:16]}..., format {f['format']}")
    lines.append("Model")
    row("name", m["name"])
    row("architecture", m["summary"])
    p = m.get("parameters")
    if p:
        row("parameters", f"{_n(p['total'])} total: {_n(p['trainable'])} trainable, {_n(p['frozen'])} frozen")
        row("groups", f"shared {_n(p.get('shared', 0))}, per-class {_n(p.get('per_class', 0))}, frozen common "
                      f"{_n(p.get('frozen_common', 0))}, local {_n(p.get('local', 0))}; "
                      f"{_n(p.get('buffers', 0))} buffer elements (text bank, ...)")
    if m.get("frozen_hash"):
        row("frozen hash", f"{m['frozen_hash']} (pretrained weights + text bank, as the federation sends them)")
    bank, enc = card["text_bank"], dict(card["text_bank"].get("encoder") or {})
    lines.append("Text embedding bank")
    if bank:
        src = enc.get("weights_source") or enc.get("weights_path") or "?"
        row("encoder", f"{enc.get('kind')} {enc.get('model') or ''} (pretrained {enc.get('pretrained')}, from {src})")
        if enc.get("fallback_reason"):
            req = enc.get("requested") or {}
            row("FALLBACK", f"used instead of {req.get('kind')} {req.get('model')}/{req.get('pretrained')}: "
                            f"{enc['fallback_reason']}")
        row("hash", f"{bank.get('content_hash')} (vocabulary {bank.get('vocabulary')} hash "
                    f"{bank.get('vocabulary_hash')}); {bank.get('num_classes')} classes x {bank.get('num_tasks')} "
                    f"tasks, {bank.get('dim')}-d")
        row("prompts", f"{bank.get('class_template')!r} / {bank.get('task_template')!r}")
    else:
        row("encoder", "not recorded")
    d = card["dino"]
    lines.append("DINOv2 (frozen)")
    if d:
        where = {"random": "RANDOM weights", "hub": "pretrained, from the Hugging Face hub",
                 "file": f"pretrained, from file {d.get('path')} (sha256 {str(d.get('sha256', ''))[:16]})",
                 "provided": "provided by the server"}.get(str(d.get("weights")), str(d.get("weights")))
        row("weights", f"{d.get('name')} ({d.get('depth')} blocks, last {d.get('layers')} layers): {where}"
                       + (f" - {d['reason']}" if d.get("reason") and d.get("weights") == "random" else ""))
    else:
        row("weights", "no DINOv2 branch")
    v = card["vocabulary"]
    lines.append("Vocabulary and classes")
    row("vocabulary", f"{v.get('name')} ({v.get('num_classes')} classes, tasks: {', '.join(v.get('tasks') or [])}; "
                      f"default task {v.get('default_task')})")
    row("trained on", f"{len(card['classes'])} of {card['num_model_classes']} classes (value  class  <- sites)")
    width = max([len(c["class"]) for c in card["classes"]] + [5])
    for c in card["classes"]:
        lines.append(f"    {str(c['value'] or ''):>3}  {c['class']:<{width}}  <- {', '.join(c['sites']) or '?'}")
    pre = card["preprocess"]
    lines.append("Preprocessing (as in training)")
    row("grid", f"orientation {pre.get('orientation', 'RAS')}, spacing {_joined(pre.get('spacing', '?'))} mm")
    row("intensity", f"HU window {_joined(pre.get('hu_window', '?'), ' .. ')} -> [0, 1]")
    row("patch", f"{_joined(pre.get('patch_size', '?'))} (sliding window)")
    other = {k: v for k, v in pre.items() if k not in ("orientation", "spacing", "hu_window", "patch_size")}
    if other:
        row("other", ", ".join(f"{k}={_joined(v, ',')}" for k, v in other.items()))
    if card["eval"]:
        row("inference", ", ".join(f"{k} {v}" for k, v in card["eval"].items()))
    lines.append("Training")
    for k, val in card["training"].items():
        row(k, ", ".join(map(str, val)) if isinstance(val, list) else val)
    pv = card["privacy"]
    row("privacy", "disabled" if not pv or pv.get("enabled") is False else
        ", ".join(f"{k} {json.dumps(val) if isinstance(val, (dict, list)) else val}" for k, val in pv.items()))
    for w in card["warnings"]:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def info_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedtextseg info", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a model file (results/<run>/model.pt)")
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    args = p.parse_args(argv)
    card = model_card(args.model)
    print(json.dumps(card, indent=2, default=str) if args.json else format_card(card))
    return 0
