"""``fedtextseg check-site``: validate a site before it joins a federation, and summarise it.

:func:`check_site` reads every case and reports, each as ``(file, problem)``: unreadable/corrupt/truncated files,
2D files where 3D volumes are expected, NaN/Inf intensities, non-invertible affines, image/label shape or affine
mismatches (affine tolerance :data:`fedtextseg.data.io.AFFINE_TOLERANCE`), voxel sizes outside
:data:`PLAUSIBLE_SPACING` (a header in metres, or a zero pixdim), non-integer or undeclared label values,
and annotated classes that are empty in every labeled case. ``full=True`` checks every case; ``full=False`` stops
after the first case with a problem. The :class:`SiteReport` also summarises cases, spacing and shape ranges and
voxels per vocabulary channel (as the model sees them: composites split by side, tumors counted in their organ).

2D report-guided sites (format ``png-csv``) are checked by ``fedtextseg.data.xray_site.check_xray_site``; its findings
that start with ``"info: "`` become ``notes`` (shown, but the site is still OK).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from fedtextseg.data.io import AFFINE_TOLERANCE, grid_mismatch, read_label, read_nifti
from fedtextseg.data.labels import LabelCoder, encode_labels
from fedtextseg.data.site import Site, load_site
from fedtextseg.data.xray_site import INFO as _INFO, check_xray_site  # 2D report-guided sites
from fedtextseg.errors import FedTextSegError, SiteError

__all__ = ["SiteReport", "check_site", "check_site_main"]

PLAUSIBLE_SPACING = (0.01, 50.0)  # mm per voxel axis: CT/MR voxels outside this mean a wrong header


@dataclass
class SiteReport:
    """Result of :func:`check_site`: a summary of the site and every problem found, each naming its file."""

    name: str
    root: str
    format: str
    task: str
    vocabulary: str
    annotated: list[str]
    n_cases: int
    n_labeled: int
    cases_checked: int = 0
    spacing_range: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (per-axis min, per-axis max), mm
    shape_range: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    voxel_counts: dict[str, int] = field(default_factory=dict)  # vocabulary channel -> voxels over labeled cases
    ignored_voxels: int = 0  # voxels of label values the site ignores (``unmapped: ignore``)
    ignored_classes: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  # findings that are not errors (e.g. an empty mask)
    stopped_early: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def _rel(self, path: str) -> str:
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)

    def format_text(self) -> str:
        """A readable multi-line summary (plain text)."""
        lines = [
            f"site {self.name!r} ({self.format}, task {self.task}, vocabulary {self.vocabulary})",
            f"  folder:    {self.root}",
            f"  cases:     {self.n_cases} ({self.n_labeled} labeled), {self.cases_checked} checked"
            + (" - stopped at the first bad case (use --full to check all)" if self.stopped_early else ""),
            f"  annotates: {', '.join(self.annotated) or 'nothing'}",
        ]
        if self.spacing_range:
            lo, hi = self.spacing_range
            lines.append("  spacing:   " + " x ".join(_span(a, b, "{:.3g}") for a, b in zip(lo, hi)) + " mm")
        if self.shape_range:
            lo, hi = self.shape_range
            lines.append("  shape:     " + " x ".join(_span(a, b, "{}") for a, b in zip(lo, hi)) + " voxels")
        if self.voxel_counts:
            lines.append("  voxels per class (labeled cases):")
            width = max(len(n) for n in self.voxel_counts)
            for name, count in self.voxel_counts.items():
                mark = "annotated" if name in self.annotated else "not annotated (ignored in training)"
                lines.append(f"    {name:<{width}}  {count:>12,}  {mark}")
        if self.ignored_classes:
            shown = ", ".join(self.ignored_classes[:12]) + (" ..." if len(self.ignored_classes) > 12 else "")
            lines.append(f"  ignored:   {self.ignored_voxels:,} voxels of {len(self.ignored_classes)} label value(s) "
                         f"outside the vocabulary (unmapped: ignore; not annotated, never background): {shown}")
        if self.notes:
            lines.append(f"  notes ({len(self.notes)}):")
            lines += [f"    {self._rel(path)}: {note}" for path, note in self.notes]
        if self.problems:
            lines.append(f"  problems ({len(self.problems)}):")
            lines += [f"    {self._rel(path)}: {problem}" for path, problem in self.problems]
            lines.append("RESULT: problems found")
        else:
            lines.append("RESULT: OK")
        return "\n".join(lines)


def _span(lo, hi, fmt: str) -> str:
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"


def _check_case(case, site: Site, coder: LabelCoder, atol: float):
    """(problems, image info or None, channel counts or None, ignored voxels) of one case."""
    problems: list[tuple[str, str]] = []
    image = label = None
    try:
        image = read_nifti(case.image, expect_dims=3)
    except SiteError as exc:
        problems.append((exc.path, exc.problem))
    if image is not None:
        spacing = image.info["spacing"]
        if not all(PLAUSIBLE_SPACING[0] <= s <= PLAUSIBLE_SPACING[1] for s in spacing):
            problems.append((str(case.image), f"implausible voxel size {tuple(round(s, 6) for s in spacing)} mm "
                             f"(expected {PLAUSIBLE_SPACING[0]:g}-{PLAUSIBLE_SPACING[1]:g} mm per axis); check the "
                             "header's pixdim / affine"))
    if case.label is None:
        return problems, image.info if image else None, None, 0
    try:
        label = read_label(case.label, expect_dims=3, mask_values=site.meta.get("mask_values"))
    except SiteError as exc:
        problems.append((exc.path, exc.problem))
        return problems, image.info if image else None, None, 0
    if image is not None:
        mismatch = grid_mismatch(image, label, atol)
        if mismatch:
            problems.append((str(case.label), mismatch))
    try:
        codes = encode_labels(label.array, label.affine, site, case.label, coder)
    except SiteError as exc:
        problems.append((exc.path, exc.problem))
        return problems, image.info if image else None, None, 0
    ignored = int((codes == coder.ignore_code).sum()) if coder.ignore_code is not None else 0
    return problems, image.info if image else None, coder.channel_counts(codes), ignored


def check_site(path_or_site: str | Path | Site, full: bool = True, vocabulary: str | None = None,
               atol: float = AFFINE_TOLERANCE) -> SiteReport:
    """Validate and summarise a site. Raises SiteError only when the site itself cannot be read (no site.yaml...)."""
    site = path_or_site if isinstance(path_or_site, Site) else load_site(path_or_site, vocabulary)
    report = SiteReport(
        name=site.name, root=str(site.root), format=site.format, task=site.task, vocabulary=site.vocabulary.name,
        annotated=list(site.annotated), n_cases=len(site.cases), n_labeled=len(site.labeled_cases),
        ignored_classes=[site.ignored_values[v] for v in sorted(site.ignored_values)],
    )
    if site.format == "png-csv":
        findings = [(str(p), str(msg)) for p, msg in check_xray_site(site)]
        problems = [f for f in findings if not f[1].startswith(_INFO)]
        report.notes = [(p, msg[len(_INFO):]) for p, msg in findings if msg.startswith(_INFO)]
        report.cases_checked = len(site.cases)
        report.problems = problems if full else problems[:1]
        report.stopped_early = not full and len(problems) > 1
        return report

    coder = LabelCoder.for_site(site)
    counts = np.zeros(site.vocabulary.num_classes, dtype=np.int64)
    spacings, shapes = [], []
    labeled_ok = 0
    for case in site.cases:
        problems, info, case_counts, ignored = _check_case(case, site, coder, atol)
        report.cases_checked += 1
        report.ignored_voxels += ignored
        report.problems += problems
        if info is not None:
            spacings.append(info["spacing"])
            shapes.append(info["shape"])
        if case_counts is not None:
            counts += case_counts
            labeled_ok += 1
        if problems and not full:
            report.stopped_early = report.cases_checked < len(site.cases)
            break
    if spacings:
        report.spacing_range = (tuple(np.min(spacings, 0).tolist()), tuple(np.max(spacings, 0).tolist()))
        report.shape_range = (tuple(int(v) for v in np.min(shapes, 0)), tuple(int(v) for v in np.max(shapes, 0)))
    names = site.vocabulary.class_names
    report.voxel_counts = {n: int(c) for n, c in zip(names, counts) if c or n in site.annotated}
    if labeled_ok and not report.stopped_early:
        for name in site.annotated:
            if counts[names.index(name)] == 0:
                label_dir = site.labeled_cases[0].label.parent if site.labeled_cases else site.root
                report.problems.append(
                    (str(label_dir), f"annotated class {name!r} is empty in every labeled case ({labeled_ok} read); "
                                     "check the label map, or drop it from 'annotated'")
                )
    return report


def check_site_main(argv: Sequence[str] | None = None) -> int:
    """``fedtextseg check-site PATH [--full] [--vocabulary V]``: 0 = OK, 1 = problems, 2 = site unreadable."""
    parser = argparse.ArgumentParser(prog="fedtextseg check-site", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="site folder (site.yaml and/or MSD dataset.json)")
    parser.add_argument("--full", action="store_true", help="check every case (default: stop at the first bad case)")
    parser.add_argument("--vocabulary", default=None, help="vocabulary name or YAML path (default: the site's)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        report = check_site(args.path, full=args.full, vocabulary=args.vocabulary)
    except (FedTextSegError, ImportError) as exc:
        print(f"error: cannot read site: {exc}", file=sys.stderr)
        return 2
    print(report.format_text())
    return 0 if report.ok else 1
