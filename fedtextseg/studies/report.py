"""A study's outputs: ``table.md`` (summary, per-class Dice, local-only cross-site matrix, figures), ``table.csv``
(one row per arm: mean and std of every figure over seeds), ``per_class.csv`` (arm x site x class), ``runs.csv``
(one row per arm x seed) and the PNG figures the study file lists (:mod:`fedtextseg.studies.plots`).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedtextseg.studies.collect import SCALARS, cell_rows, cell_stat, group_by_arm
from fedtextseg.studies.plots import draw_figures
from fedtextseg.studies.spec import ArmSpec, StudySpec

__all__ = ["write_study_outputs", "fmt_mean_std", "SUMMARY_COLUMNS"]

MB = 1e6
# (key, header, scale, digits): the summary table's columns; a column without any value is left out
SUMMARY_COLUMNS = (
    ("site_mean", "sites' mean Dice", 1.0, 3),
    ("unseen_mean", "unseen mean Dice", 1.0, 3),
    ("s_per_round", "wall s / round", 1.0, 1),
    ("train_s_per_round", "training s / round", 1.0, 1),
    ("peak_mb", "peak memory MB", 1.0, 0),
    ("wire_bytes", "MB / round / site (each way)", 1 / MB, 2),
    ("full_model_bytes", "full-model FedAvg MB / round / site", 1 / MB, 2),
    ("frozen_bytes", "frozen MB (once per site)", 1 / MB, 2),
    ("epsilon", "epsilon spent (max site)", 1.0, 2),
    ("declined", "site-rounds declined", 1.0, 0),
    ("failed", "site-rounds failed", 1.0, 0),
)
# columns a study file may add after those (``extra_columns``, spec.EXTRA_COLUMNS), e.g. QaTa-COV19's pooled Dice
EXTRA_COLUMNS = {"unseen_pooled_mean": ("unseen_pooled_mean", "unseen pooled Dice", 1.0, 3)}


def fmt_mean_std(stat: Sequence[float] | None, digits: int = 3, scale: float = 1.0) -> str:
    """``mean +- std`` (std only with more than one value), blank when there is no value."""
    if not stat or stat[2] == 0 or not math.isfinite(stat[0]):
        return ""
    mean, std, n = stat
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if n > 1 else "")


def _x_text(x: Any) -> str:
    if x is None:
        return ""
    return "inf" if math.isinf(x) else f"{x:g}"


def _summary_lines(spec: StudySpec, grouped) -> list[str]:
    cols = [c for c in (*SUMMARY_COLUMNS, *(EXTRA_COLUMNS[k] for k in spec.extra_columns))
            if any(agg["scalars"][c[0]][2] for _, agg in grouped)]
    xh = [spec.x_axis.get("label", "x")] if any(a.x is not None for a, _ in grouped) else []
    head = ["arm", "kind", *xh, "seeds", *[c[1] for c in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, agg in grouped:
        cells = [arm.title, arm.kind, *([_x_text(arm.x)] if xh else []), str(len(agg["seeds"]))]
        cells += [fmt_mean_std(agg["scalars"][k], digits, scale) for k, _, scale, digits in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _per_class_lines(grouped) -> list[str]:
    head = ["site", "class", *[arm.title for arm, _ in grouped]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for site, cls in cell_rows(grouped):
        lines.append("| " + " | ".join([site, cls, *[fmt_mean_std(cell_stat(agg, site, cls)) for _, agg in grouped]])
                     + " |")
    return lines


def _cross_site_lines(arm: ArmSpec, agg: Mapping) -> list[str]:
    matrix = agg["cross_site"]
    evaluated = list(dict.fromkeys(e for per in matrix.values() for e in per))
    lines = [f"### {arm.title}: every site's model on every site (mean Dice over the evaluated site's classes)", "",
             "| model trained on | " + " | ".join(evaluated) + " |", "|" + "---|" * (len(evaluated) + 1)]
    for model_site, per in matrix.items():
        lines.append(f"| {model_site} | " + " | ".join(fmt_mean_std(per.get(e)) for e in evaluated) + " |")
    return lines


def _write_csvs(grouped, records: Sequence[Mapping], folder: Path) -> None:
    with (folder / "table.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["arm", "label", "kind", "x", "seeds", *[f"{k}_{s}" for k in SCALARS for s in ("mean", "std")]])
        for arm, agg in grouped:
            w.writerow([arm.name, arm.title, arm.kind, _x_text(arm.x), len(agg["seeds"]),
                        *[v for k in SCALARS for v in agg["scalars"][k][:2]]])
    with (folder / "per_class.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["arm", "site", "class", "dice_mean", "dice_std", "seeds"])
        for site, cls in cell_rows(grouped):
            for arm, agg in grouped:
                stat = cell_stat(agg, site, cls)
                if stat:
                    w.writerow([arm.name, site, cls, *stat])
    keys = ["arm", "label", "kind", "seed", "x", "rounds", "local_steps", "sites", *SCALARS, "peak_mb_exact"]
    with (folder / "runs.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)


def write_study_outputs(spec: StudySpec, arms: Sequence[ArmSpec], records: Sequence[Mapping], info: Mapping,
                        folder: Path) -> list[Path]:
    """Write the tables and figures of a study into ``folder``; returns the figure paths."""
    grouped = group_by_arm(arms, records)
    figures = draw_figures(spec, grouped, folder)
    first = records[0]
    machine = info.get("machine") or {}
    lines = [f"# Study `{spec.name}`: {spec.title} ({info.get('size')} budget)", ""]
    if spec.question:
        lines += [spec.question.strip(), ""]
    lines += [f"Ran {info.get('date')} on {machine.get('cpu_model')} ({machine.get('cpus')} cores, "
              f"{machine.get('torch_threads')} torch threads"
              + (f" per run, {info['parallel_jobs']} runs at a time" if (info.get("parallel_jobs") or 1) > 1 else "")
              + f"), device {machine.get('device')}, torch "
              f"{machine.get('torch')}. Command: `{info.get('command')}`.",
              f"Budget: {first.get('rounds')} rounds x {first.get('local_steps')} local steps per site "
              f"(centralized: the same gradient steps on the pooled data; local only: the same steps per site), "
              f"base experiment `{spec.experiment_for(info.get('size') or 'cpu')}`, seeds "
              f"{list(info.get('seeds') or [])}; mean ± std over seeds. "
              f"Resolved configs: `configs/<arm>-seed<k>.yaml`.", "", "## Summary", "", *_summary_lines(spec, grouped),
              "", "## Per-class Dice", "",
              "Final model on each training site's validation cases (only where the site annotates the class) and "
              "on the unseen, fully labeled hospital (every case). Local only: a site's own model on its site; an "
              "unseen class by the models of the sites that annotate it.", "", *_per_class_lines(grouped)]
    for arm, agg in grouped:
        if agg["cross_site"]:
            lines += ["", *_cross_site_lines(arm, agg)]
    lines += ["", "## Arms", ""] + [f"- `{arm.name}` ({arm.kind}): {arm.title}"
                                    + (f"; overrides `{' '.join(arm.overrides)}`" if arm.overrides else "")
                                    for arm, _ in grouped]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    _write_csvs(grouped, records, folder)
    return figures
