"""``fedtextseg report RUN_DIR``: a run folder rendered as ``report.html`` and ``report.md`` (same content).

Reads what a run wrote (``config.yaml``, ``metadata.json``, ``metrics.jsonl``, ``privacy.jsonl`` if any,
``model.pt``; layout in :mod:`fedtextseg.tracking`) and writes, beside them, the report and its figures as PNG
files in ``report_files/`` (linked relatively, so the folder can be copied or zipped as a whole):

* summary (mode, model, rounds, sites, final mean Dice, warnings about random weights or fallback encoders);
* the final per-class Dice table (classes x sites, blank where a site does not annotate a class; HD95 if logged);
* per-class Dice per round, per site and averaged over sites; training loss per round;
* bytes sent/received per round (federated runs), failures, the privacy ledger (when the run accounted privacy);
* contour overlays on the unseen hospital: the run's ``model.pt`` re-predicts 1-2 of its cases
  (``data.root``/``data.unseen`` of config.yaml, or ``--data-root``) - predicted vs reference per class;
* the metadata: text bank and DINOv2 provenance, fallbacks, environment, the full metadata and config.

Sections without data (no privacy accounting, a centralized run's traffic, no unseen hospital) say so and move on.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import yaml

from fedtextseg import report_figures as figs
from fedtextseg.errors import FedTextSegError
from fedtextseg.tracking import dice_table, read_metrics

__all__ = ["Section", "load_run", "build_sections", "render_html", "render_markdown", "build_report", "report_main"]

FILES = "report_files"


@dataclass
class Section:
    """A titled list of blocks: ``("p", text)``, ``("warn", text)``, ``("table", headers, rows, shade)``,
    ``("img", relative path, caption)``, ``("pre", summary, text)`` (collapsible)."""

    title: str
    blocks: list[tuple] = field(default_factory=list)


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """config (dict), metadata (dict), metrics rows, privacy rows of a run folder; an error if it is not one."""
    run = Path(run_dir).expanduser()
    if not (run / "metrics.jsonl").is_file():
        raise FedTextSegError(f"{run}: not a run folder (no metrics.jsonl)")
    try:
        rows = read_metrics(run / "metrics.jsonl")
        config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
        meta = json.loads((run / "metadata.json").read_text()) if (run / "metadata.json").is_file() else {}
        privacy = read_metrics(run / "privacy.jsonl") if (run / "privacy.jsonl").is_file() else []
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise FedTextSegError(f"{run}: cannot read the run's records: {exc}") from None
    privacy += [r for r in rows if r.get("kind") == "privacy"]
    if not privacy:  # sites may report their spending with their training metrics
        privacy = [r for r in rows if r.get("kind") == "train" and isinstance(r.get("epsilon"), (int, float))]
    return {"dir": run, "config": config or {}, "meta": meta, "rows": rows, "privacy": privacy}


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.2g}" if 0 < abs(v) < 0.01 else f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return str(v)


def _class_order(run: Mapping) -> list[str]:
    from fedtextseg.vocab import get_vocabulary

    try:
        return get_vocabulary((run["config"].get("data") or {}).get("vocabulary")).class_names
    except FedTextSegError:
        return sorted({r["class"] for r in run["rows"] if "class" in r})


def _dice_section(run: Mapping, classes: list[str]) -> tuple[Section, dict]:
    rows = run["rows"]
    sec = Section("Final per-class Dice")
    table = dice_table(rows, "site_eval")
    for cls, per_site in dice_table(rows, "unseen_eval").items():
        table.setdefault(cls, {}).update(per_site)
    if not table:
        sec.blocks.append(("p", "No evaluation was recorded in this run."))
        return sec, {}
    sites = list(dict.fromkeys(s for per in table.values() for s in per))
    sites = sorted(s for s in sites if not s.startswith("unseen:")) + [s for s in sites if s.startswith("unseen:")]
    last = max((r.get("round") or 0) for r in rows if r.get("kind") in ("site_eval", "unseen_eval"))
    body = []
    for c in [c for c in classes if c in table] + [c for c in table if c not in classes]:
        vals = [table[c].get(s) for s in sites]
        ok = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
        body.append([c, *map(_fmt, vals), _fmt(float(np.mean(ok)) if ok else None)])
    sec.blocks += [("p", f"Round {last}: Dice of the final model on each site's validation cases and on the unseen "
                         "hospital. Blank: the site does not annotate the class."),
                   ("table", ["class", *sites, "mean"], body, True)]
    hd = dice_table(rows, "site_eval", key="hd95")
    for cls, per_site in dice_table(rows, "unseen_eval", key="hd95").items():
        hd.setdefault(cls, {}).update(per_site)
    if any(isinstance(v, (int, float)) for per in hd.values() for v in per.values()):
        sec.blocks += [("p", "HD95 (mm) of the same evaluation:"),
                       ("table", ["class", *sites], [[c, *(_fmt(hd.get(c, {}).get(s)) for s in sites)]
                                                     for c in classes if c in hd], False)]
    return sec, table


def _mean(table: Mapping, pick: Callable[[str], bool]) -> float | None:
    vals = [v for per in table.values() for s, v in per.items() if pick(s) and isinstance(v, (int, float))
            and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _summary(run: Mapping, table: Mapping) -> Section:
    cfg, meta, rows = run["config"], run["meta"], run["rows"]
    mode = meta.get("mode") or ("federated" if any(r.get("kind") == "round" for r in rows) else "unknown")
    rounds = max([r.get("round") or 0 for r in rows] or [0])
    prov = meta.get("provenance") or {}
    sites = meta.get("sites") or sorted({r["site"] for r in rows if r.get("kind") == "site_eval"})
    fed = cfg.get("federation") or {}
    facts = [["run folder", str(run["dir"])], ["mode", mode], ["experiment", meta.get("experiment", "")],
             ["model", (cfg.get("model") or {}).get("name") or prov.get("model", "")],
             ["rounds" if mode != "centralized" else "epochs", str(rounds)],
             ["sites", ", ".join(sites)], ["unseen hospital", str((cfg.get("data") or {}).get("unseen") or "none")],
             ["mean Dice, training sites", _fmt(_mean(table, lambda s: not s.startswith("unseen:")))],
             ["mean Dice, unseen hospital", _fmt(_mean(table, lambda s: s.startswith("unseen:")))]]
    if mode != "centralized":
        facts.insert(4, ["aggregation", f"{fed.get('rule', '?')} (weighting {fed.get('weighting', '?')}, "
                                        f"robust {fed.get('robust') or 'no'})"])
    sec = Section("Summary", [("table", ["", ""], facts, False)])
    for w in _warnings(meta):
        sec.blocks.append(("warn", w))
    return sec


def _warnings(meta: Mapping) -> list[str]:
    out = []
    dino = (meta.get("provenance") or {}).get("dino") or {}
    if dino.get("weights") == "random":
        out.append(f"The frozen DINOv2 branch had RANDOM weights ({dino.get('reason', '')}): a test/demo run, "
                   "not a result about pretrained features.")
    enc = (meta.get("text_bank") or {}).get("encoder") or {}
    if enc.get("fallback_reason"):
        out.append(f"The text bank was encoded with the fallback encoder {enc.get('kind')} {enc.get('model')}: "
                   f"{enc['fallback_reason']}")
    if enc.get("pretrained") == "random-init":
        out.append("The text encoder had RANDOM weights: the class and task embeddings carry no meaning.")
    return out


def _curves(run: Mapping, classes: list[str], files: Path) -> Section:
    sec = Section("Dice per round")
    for fn, name, caption in ((figs.dice_mean_per_round, "dice_mean.png", "Per class, averaged over the training "
                               "sites that annotate it (dashed: mean over classes)."),
                              (figs.dice_per_round, "dice_per_site.png", "Per site and on the unseen hospital, "
                               "one line per annotated class.")):
        path = fn(run["rows"], classes, files / name)
        if path:
            sec.blocks.append(("img", f"{FILES}/{name}", caption))
    loss = figs.train_loss(run["rows"], files / "train_loss.png")
    if loss:
        sec.blocks.append(("img", f"{FILES}/train_loss.png", "Mean training loss per round."))
    if not sec.blocks:
        sec.blocks.append(("p", "No per-round metrics were recorded."))
    return sec


def _traffic(run: Mapping, files: Path) -> Section:
    sec = Section("Communication and failures")
    rounds = [r for r in run["rows"] if r.get("kind") == "round"]
    if rounds:
        path = figs.bytes_per_round(rounds, files / "bytes.png")
        if path:
            sec.blocks.append(("img", f"{FILES}/bytes.png", "Bytes the server sent and received per round."))
        sec.blocks.append(("table", ["round", "sites", "excluded", "aggregated", "MB sent", "MB received"],
                           [[r.get("round"), r.get("sites"), r.get("excluded"), r.get("aggregated"),
                             _fmt((r.get("bytes_sent") or 0) / 1e6), _fmt((r.get("bytes_received") or 0) / 1e6)]
                            for r in rounds], False))
        meta = run["meta"]
        if meta.get("wire_bytes"):
            frozen = (f"; the frozen common parts ({meta['frozen_bytes'] / 1e6:.2f} MB, hash "
                      f"{meta.get('frozen_hash', '?')}) are sent once per site" if meta.get("frozen_bytes") else "")
            sec.blocks.append(("p", f"Per site and direction each round: {meta['wire_bytes'] / 1e6:.2f} MB of shared "
                                    f"and per-class arrays{frozen}."))
    else:
        sec.blocks.append(("p", "No communication rounds recorded (a centralized run)."))
    failures = [r for r in run["rows"] if r.get("kind") == "failure"]
    if failures:
        sec.blocks.append(("table", ["round", "site", "reason"],
                           [[r.get("round"), r.get("site"), r.get("reason")] for r in failures], False))
    elif rounds:
        sec.blocks.append(("p", "No site failed or was excluded."))
    return sec


def _privacy(run: Mapping, files: Path) -> Section:
    sec = Section("Privacy ledger")
    rows = run["privacy"]
    if not rows:
        enabled = ((run["config"].get("privacy") or {}).get("enabled"))
        sec.blocks.append(("p", "This run did no privacy accounting (privacy.enabled = "
                                f"{str(bool(enabled)).lower()}); no ledger to show."))
        return sec
    if figs.privacy_spent(rows, files / "privacy.png"):
        sec.blocks.append(("img", f"{FILES}/privacy.png", "Cumulative epsilon per site."))
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("time", "kind", "history")]
    sec.blocks.append(("table", keys, [[_fmt(r.get(k)) for k in keys] for r in rows], False))
    return sec


def _metadata(run: Mapping) -> Section:
    meta, cfg = run["meta"], run["config"]
    bank = meta.get("text_bank") or {}
    enc = bank.get("encoder") or {}
    dino = (meta.get("provenance") or {}).get("dino") or {}
    params = meta.get("params") or {}
    env = meta.get("environment") or {}
    facts = [["text encoder", f"{enc.get('kind', '?')} {enc.get('model') or ''} (pretrained {enc.get('pretrained')})"],
             ["text fallback", enc.get("fallback_reason") or "none"],
             ["text bank", f"hash {bank.get('content_hash', '?')}, vocabulary {bank.get('vocabulary', '?')} "
                           f"({bank.get('num_classes', '?')} classes, {bank.get('num_tasks', '?')} tasks, "
                           f"{bank.get('dim', '?')}-d)"],
             ["DINOv2", f"{dino.get('name', 'none')}: weights {dino.get('weights', '?')}"
                        + (f" ({dino['reason']})" if dino.get("reason") else "")]]
    if params:
        facts.append(["parameters", f"{params.get('total', 0):,} total, {params.get('trainable', 0):,} trainable"])
    if meta.get("frozen_hash"):
        facts.append(["frozen hash", str(meta["frozen_hash"])])
    facts.append(["environment", ", ".join(f"{k} {v}" for k, v in env.items() if v is not None)])
    return Section("Metadata and provenance", [
        ("table", ["", ""], facts, False),
        ("pre", "metadata.json", json.dumps(meta, indent=2, sort_keys=True)),
        ("pre", "config.yaml (resolved)", yaml.safe_dump(cfg, sort_keys=False)),
    ])


def _find_unseen(run: Mapping, data_root: str | Path | None) -> Path | None:
    data = run["config"].get("data") or {}
    name = data.get("unseen")
    if not name:
        return None
    roots = [Path(data_root).expanduser()] if data_root else []
    root = Path(str(data.get("root", "")))
    roots += [root] if root.is_absolute() else [Path.cwd() / root, run["dir"].resolve().parent.parent / root]
    for r in roots:
        if (r / str(name)).is_dir():
            return r / str(name)
    return None


def _overlays(run: Mapping, files: Path, n: int, data_root, device: str, log_fn, order: list[str]) -> Section:
    sec = Section("Unseen hospital: predicted vs reference")
    model_path = run["dir"] / "model.pt"
    site_path = _find_unseen(run, data_root)
    if n <= 0 or not model_path.is_file() or site_path is None:
        why = ("overlays turned off" if n <= 0 else "the run has no model.pt" if not model_path.is_file()
               else "the unseen hospital's folder was not found (data.root/data.unseen; pass --data-root)")
        sec.blocks.append(("p", f"No overlays: {why}."))
        return sec
    from fedtextseg.data.site import load_site
    from fedtextseg.data.transforms import val_transform
    from fedtextseg.metrics import dice_score
    from fedtextseg.predict import Predictor

    site = load_site(site_path, (run["config"].get("data") or {}).get("vocabulary"))
    predictor = Predictor.from_file(model_path, device=device)
    classes = [c for c in predictor.classes if c in site.annotated]
    if not classes or not site.labeled_cases:
        sec.blocks.append(("p", f"No overlays: {site.name} has no labeled case of a class the model learned."))
        return sec
    predictor = Predictor(predictor.model, predictor.info, classes=classes, task=site.task, device=device)
    vocab_idx = [site.vocabulary.class_names.index(c) for c in classes]
    colours = figs.class_colours(figs.present_classes(run["rows"], order) or classes)
    colours = {c: colours.get(c, (0.3, 0.3, 0.3, 1.0)) for c in classes}
    tf = val_transform(site, predictor.pre)
    for case in site.labeled_cases[:n]:
        log_fn(f"report: predicting {site.name}/{case.case_id} for the overlays ...")
        item = tf({"image": str(case.image), "label": str(case.label), "case_id": case.case_id})
        _, masks = predictor.predict_preprocessed(item["image"])
        ref = np.asarray(item["label"][vocab_idx]).astype(bool)
        pred = masks.numpy().astype(bool)
        scores = [f"{c} {dice_score(p, r):.2f}" for c, p, r in zip(classes, pred, ref) if r.any() or p.any()]
        name = f"overlay_{case.case_id}.png"
        figs.overlay_case(np.asarray(item["image"][0]), ref, pred, classes, predictor.pre.spacing,
                          f"{site.name} / {case.case_id} (task {site.task})", files / name, colours)
        sec.blocks.append(("img", f"{FILES}/{name}", f"{case.case_id}: Dice " + ", ".join(scores)))
    sec.blocks.insert(0, ("p", f"{site.name} ({site_path}): model.pt re-predicts {min(n, len(site.labeled_cases))} "
                               f"case(s) with the run's preprocessing; solid = predicted, dashed = reference. "
                               "Radiological view (patient's right on the left)."))
    return sec


def build_sections(run: Mapping, files: Path, *, overlays: int = 2, data_root=None, device: str = "auto",
                   log_fn: Callable[[str], None] = print) -> list[Section]:
    classes = _class_order(run)
    dice, table = _dice_section(run, classes)
    sections = [_summary(run, table), dice, _curves(run, classes, files), _traffic(run, files), _privacy(run, files)]
    try:
        sections.append(_overlays(run, files, overlays, data_root, device, log_fn, classes))
    except FedTextSegError as exc:  # a moved data folder or model must not cost the rest of the report
        sections.append(Section("Unseen hospital: predicted vs reference", [("p", f"No overlays: {exc}")]))
    sections.append(_metadata(run))
    return sections


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1150px;
color:#1f2328;padding:0 1em}h1{font-size:1.6em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #d0d7de;padding:.25em .6em}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%;
border:1px solid #eee}figure{margin:1em 0}figcaption{color:#57606a;font-size:.9em}.warn{background:#fff8c5;
border:1px solid #d4a72c;padding:.5em .8em;border-radius:6px;margin:.5em 0}pre{background:#f6f8fa;padding:.8em;
overflow:auto;font-size:.8em}"""


def _cell(value: Any, shade: bool, plain: bool = False) -> str:
    text = html.escape(_fmt(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return f"<td>{text}</td>"
    if plain:
        return f"<td>{text}</td>"
    style = f' style="background:rgba(46,160,67,{0.08 + 0.6 * min(max(v, 0), 1):.2f})"' if shade and text else ""
    return f'<td class="num"{style}>{text}</td>'


def render_html(title: str, sections: Sequence[Section]) -> str:
    out = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for sec in sections:
        out.append(f"<h2>{html.escape(sec.title)}</h2>")
        for b in sec.blocks:
            if b[0] == "p":
                out.append(f"<p>{html.escape(b[1])}</p>")
            elif b[0] == "warn":
                out.append(f'<p class="warn">&#9888; {html.escape(b[1])}</p>')
            elif b[0] == "table":
                plain = not any(b[1])  # a key-value table: no header, no number alignment
                head = "" if plain else "".join(f"<th>{html.escape(str(h))}</th>" for h in b[1])
                body = "".join(f"<tr><th>{html.escape(str(r[0]))}</th>"
                               + "".join(_cell(v, b[3], plain) for v in r[1:]) + "</tr>" for r in b[2])
                out.append(f"<table>{'<tr>' + head + '</tr>' if head else ''}{body}</table>")
            elif b[0] == "img":
                out.append(f'<figure><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}">'
                           f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
            elif b[0] == "pre":
                out.append(f"<details><summary>{html.escape(b[1])}</summary><pre>{html.escape(b[2])}</pre></details>")
    out.append(f"<p><small>generated by fedtextseg report, {time.strftime('%Y-%m-%d %H:%M')}</small></p></body></html>")
    return "\n".join(out)


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for b in sec.blocks:
            if b[0] in ("p", "warn"):
                out += [("**Warning:** " if b[0] == "warn" else "") + b[1], ""]
            elif b[0] == "table":
                cells = [[_fmt(v).replace("|", "\\|") for v in r] for r in b[2]]
                out += ["| " + " | ".join(str(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
                out += ["| " + " | ".join(r) + " |" for r in cells] + [""]
            elif b[0] == "img":
                out += [f"![{b[2]}]({b[1]})", "", f"*{b[2]}*", ""]
            elif b[0] == "pre":
                out += [f"<details><summary>{b[1]}</summary>", "", "```", b[2].rstrip(), "```", "", "</details>", ""]
    return "\n".join(out)


def build_report(run_dir: str | Path, *, overlays: int = 2, data_root: str | Path | None = None,
                 device: str = "auto", log_fn: Callable[[str], None] = print) -> dict[str, Path]:
    """Write ``report.html``, ``report.md`` and ``report_files/*.png`` into the run folder; returns their paths."""
    run = load_run(run_dir)
    files = run["dir"] / FILES
    files.mkdir(exist_ok=True)
    for old in files.glob("*.png"):  # figures of an earlier report that this one may not redraw
        old.unlink()
    sections = build_sections(run, files, overlays=overlays, data_root=data_root, device=device, log_fn=log_fn)
    title = f"fedtextseg run report: {run['dir'].name}"
    paths = {"html": run["dir"] / "report.html", "markdown": run["dir"] / "report.md"}
    paths["html"].write_text(render_html(title, sections))
    paths["markdown"].write_text(render_markdown(title, sections))
    return paths


def report_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedtextseg report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run folder (results/<run>) with metrics.jsonl, config.yaml, metadata.json")
    p.add_argument("--overlays", type=int, default=2, help="unseen-hospital cases to overlay (0: none)")
    p.add_argument("--data-root", default=None, help="where the run's data.root is now, if it moved")
    p.add_argument("--device", default="auto", help="device for the overlay predictions (auto, cpu, cuda)")
    args = p.parse_args(argv)
    paths = build_report(args.run_dir, overlays=args.overlays, data_root=args.data_root, device=args.device)
    print(f"report: {paths['html']}\n        {paths['markdown']}")
    return 0
