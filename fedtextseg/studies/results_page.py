"""``docs/results.md``: the latest table and plots of every study under ``results/studies/``, with date and machine.

    python scripts/update_results_page.py [--studies results/studies] [--page docs/results.md]

Each study's ``table.md`` is included with its figures copied to ``docs/images/results/<study>-<figure>.png`` (so
the page renders on GitHub without the untracked ``results/`` folder). A study whose outputs are not on this machine
keeps its section and summary row from the existing page (the page records runs made elsewhere, e.g. a GPU
machine); one that has never run is listed with the command that produces it. The page ends with every benchmark's
latest figures (``benchmarks/results/*.md``: cache, training step, DP overhead, bf16 check), each stating its date and
machine.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from fedtextseg.studies.spec import list_studies

__all__ = ["build_results_page", "STUDY_COMMANDS"]

STUDY_COMMANDS = {name: f"python simulations/run_study.py {name}" for name in ("main", "privacy", "scaling",
                                                                               "communication")}
PERFORMANCE = "performance"
PERFORMANCE_COMMAND = "python benchmarks/performance.py"


def _command(study: str) -> str:
    return PERFORMANCE_COMMAND if study == PERFORMANCE else STUDY_COMMANDS.get(study, f"fedtextseg study {study}")


def _study_section(folder: Path, images: Path, page_dir: Path) -> list[str]:
    """A study's ``table.md`` with its headings one level down and its images pointing at copies under ``images``."""
    study = folder.name
    text = (folder / "table.md").read_text()

    def copy_image(match: re.Match) -> str:
        alt, name = match.group(1), match.group(2)
        source = folder / name
        if not source.is_file():
            return match.group(0)
        target = images / f"{study}-{Path(name).name}"
        shutil.copyfile(source, target)
        return f"![{alt}]({target.relative_to(page_dir).as_posix()})"

    text = re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", copy_image, text)
    text = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M)
    return [text.rstrip(), "", f"Produced by `{_command(study)}`; raw numbers: `results/studies/{study}/` "
            "(table.csv, per_class.csv, runs.csv, configs/).", ""]


def _previous_page(page: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Summary rows and sections (``<a id=...>`` to the next anchor) of an existing page, by study name."""
    if not page.is_file():
        return {}, {}
    lines = page.read_text().splitlines()
    rows = {m.group(1): line for line in lines if (m := re.match(r"\| \[([^\]]+)\]\(#", line))}
    sections: dict[str, list[str]] = {}
    current = None
    for line in lines:
        m = re.fullmatch(r'<a id="([^"]+)"></a>', line.strip())
        if m:
            current = m.group(1)
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    kept = {n: "\n".join(body).strip("\n").splitlines() + [""] for n, body in sections.items()
            if not any(b.startswith("Not run yet:") for b in body)}
    return {n: r for n, r in rows.items() if n in kept}, kept


def _benchmark_sections(folder: Path) -> list[str]:
    """Every ``benchmarks/results/*.md`` with its headings two levels down, under one ``Benchmarks`` section."""
    files = sorted(folder.glob("*.md")) if folder.is_dir() else []
    if not files:
        return []
    lines = ['<a id="benchmarks"></a>', "", "## Benchmarks", "",
             "The latest figures of `benchmarks/*.py` (`benchmarks/results/`), each with its date and machine.", ""]
    for f in files:
        text = re.sub(r"^(#+) ", lambda m: "##" + m.group(1) + " ", f.read_text(), flags=re.M)
        lines += [text.rstrip(), "", f"Raw numbers: `benchmarks/results/{f.stem}.json`." if
                  f.with_suffix(".json").is_file() else "", ""]
    return lines


def build_results_page(studies_dir: str | Path = "results/studies", page: str | Path = "docs/results.md",
                       benchmarks_dir: str | Path | None = None) -> Path:
    """Write the results page from whatever studies have finished, then the benchmarks' figures
    (``benchmarks_dir``, default ``benchmarks/results`` beside the page's folder); returns its path."""
    studies_dir, page = Path(studies_dir), Path(page)
    benchmarks_dir = Path(benchmarks_dir) if benchmarks_dir is not None else \
        page.resolve().parent.parent / "benchmarks" / "results"
    images = page.parent / "images" / "results"
    images.mkdir(parents=True, exist_ok=True)
    found = sorted(d.name for d in studies_dir.glob("*") if (d / "table.md").is_file() and d.name != PERFORMANCE)
    names = list(dict.fromkeys([*STUDY_COMMANDS, *list_studies(), *found, PERFORMANCE]))
    done = [n for n in names if (studies_dir / n / "table.md").is_file()]
    old_rows, old_sections = _previous_page(page)
    lines = ["# Benchmark results", "",
             f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by `python scripts/update_results_page.py` "
             "from `results/studies/*`. Each section states when and on which machine its numbers were produced. "
             "The CPU-sized budgets (`--config cpu`, the default) train the demo's network on coarse (6 mm) "
             "synthetic CT at the demo's own budget, 8 rounds x 25 local steps a site (800 gradient steps for 4 "
             "sites), short of the centralized plateau (docs/learning_speed.md); each section states its budget. "
             "The `paper` budgets (`--config paper`) are for GPUs.", "", "| study | last run | machine | command |", "|---|---|---|---|"]
    for name in names:
        info_path = studies_dir / name / "study.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        machine = info.get("machine") or {}
        where = (f"{machine.get('cpu_model')}, {machine.get('cpus')} cores, torch {machine.get('torch')}, "
                 f"{machine.get('device')}") if machine else ""
        when = f"{info.get('date')} ({info.get('size')} budget)" if info else "not run yet"
        if name not in done and name in old_rows:
            lines.append(old_rows[name])
            continue
        lines.append(f"| [{name}](#{name}) | {when} | {where} | `{_command(name)}` |")
    lines.append("")
    for name in names:
        lines += [f'<a id="{name}"></a>', ""]
        if name in done:
            lines += _study_section(studies_dir / name, images, page.parent)
        elif name in old_sections:
            lines += old_sections[name]
        else:
            lines += [f"## {name}", "", f"Not run yet: `{_command(name)}`.", ""]
    lines += _benchmark_sections(benchmarks_dir)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines))
    return page
