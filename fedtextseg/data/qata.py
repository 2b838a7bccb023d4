"""QaTa-COV19 (real chest X-rays with expert infection masks and report sentences) as federated sites.

The report grammar: :func:`qata_caption` writes and :func:`parse_qata_caption` reads QaTa's one-sentence reports
("bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."). :func:`split_qata`
cuts QaTa's training CSV into simulated hospitals, non-IID by infection extent, writing only ``site.yaml`` +
``train.csv`` per site (the CSVs reference the original, read-only images); :func:`qata_eval_site` makes a held-out
site of the ``valid`` split the same way; :func:`prepare_qata_federation` is what ``fedtextseg.sites.ensure_data``
calls for ``data.kind: qata``. :func:`write_federation_file` writes the ``federation.yaml`` of any 2D federation
(also of the synthetic X-ray hospitals, :mod:`fedtextseg.synthetic.xray`).

Sides: QaTa-COV19's reports call "right" the lung on the image's right half (measured: the expert masks of its
unilateral valid/ reports lie 97 % on the half the report names, ``benchmarks/qata_report_swap.py``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import yaml

from fedtextseg.errors import SiteError

__all__ = ["ZONES", "SIDES", "qata_caption", "parse_qata_caption", "split_qata", "qata_eval_site",
           "write_federation_file", "generate_option", "prepare_qata_federation"]

ZONES = ("upper", "middle", "lower")
SIDES = ("left", "right")  # patient sides; QaTa lists the left lung first
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")


def qata_caption(infected: list[tuple[str, str]]) -> str:
    """The QaTa report sentence for a set of infected (zone, side) pairs."""
    if not infected:
        return "no pulmonary infection, zero infected areas."
    sides = [s for s in SIDES if any(side == s for _, side in infected)]
    n = len(infected)
    parts = []
    for s in sides:
        zones = [z for z in ZONES if (z, s) in infected]
        parts.append(f"{' '.join(zones)} {s} lung")
    lateral = "bilateral" if len(sides) == 2 else "unilateral"
    area = "infected area" if n == 1 else "infected areas"
    return f"{lateral} pulmonary infection, {_NUMBERS[n]} {area}, {' and '.join(parts)}."


def parse_qata_caption(caption: str) -> set[tuple[str, str]]:
    """The (zone, side) pairs a QaTa-style caption names ("upper middle lower left lung and lower right lung")."""
    out: set[tuple[str, str]] = set()
    regions = caption.rsplit(",", 1)[-1].strip().rstrip(".")
    for part in regions.split(" and "):
        words = part.split()
        if len(words) < 3 or words[-1] != "lung" or words[-2] not in SIDES:
            continue
        out.update((z, words[-2]) for z in words[:-2] if z in ZONES)
    return out


def split_qata(
    qata_root: str | Path,
    out_dir: str | Path,
    n_sites: int = 3,
    by: str = "extent",
    *,
    split: str = "train",
    mix: float = 0.15,
    seed: int = 0,
) -> list[Path]:
    """Cut QaTa-COV19's ``{split}.csv`` into ``n_sites`` simulated hospitals (site.yaml + train.csv each).

    ``by="extent"``: sites ordered by number of infected areas (site 0 the smallest), with ``mix`` blurring the
    borders; ``by="random"``: IID. No image is copied: each site's ``root`` is the original split folder.
    """
    qata_root = Path(qata_root).expanduser().resolve()
    src = qata_root / f"{split}.csv"
    if not src.is_file():
        raise SiteError(src, "QaTa-COV19 CSV not found")
    with src.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    for col in ("image", "mask", "caption"):
        if col not in header:
            raise SiteError(src, f"missing column {col!r}")
    if not 1 <= n_sites <= len(rows):
        raise ValueError(f"n_sites must be between 1 and {len(rows)}")
    rng = np.random.default_rng(seed)
    n = len(rows)
    if by == "extent":
        extent = np.array([int(r.get("infected_areas") or len(parse_qata_caption(r["caption"]))) for r in rows])
        rank = np.argsort(np.argsort(extent + rng.uniform(0, 0.5, n), kind="stable"), kind="stable") / n
        key = rank + mix * rng.uniform(0, 1, n)
    elif by == "random":
        key = rng.uniform(0, 1, n)
    else:
        raise ValueError(f"unknown split criterion {by!r} (expected 'extent' or 'random')")
    order = np.argsort(key, kind="stable")
    folders = []
    for i, chunk in enumerate(np.array_split(order, n_sites)):
        folder = Path(out_dir) / f"qata-site-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "train.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=header)
            w.writeheader()
            for j in sorted(chunk.tolist()):
                w.writerow(rows[j])
        spec = {
            "name": f"qata-site-{i}",
            "format": "png-csv",
            "vocabulary": "chest-xray",
            "task": "qata-cov19",
            "label_map": {255: "lung infection"},
            "csv": "train.csv",
            "root": str(qata_root / split),
            "source": f"QaTa-COV19 {split} split, part {i + 1}/{n_sites} by {by}",
        }
        (folder / "site.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        folders.append(folder)
    return folders


def qata_eval_site(qata_root: str | Path, out_dir: str | Path, split: str = "valid", name: str | None = None) -> Path:
    """A site folder (``site.yaml`` only) over QaTa-COV19's ``{split}.csv``: the held-out evaluation hospital."""
    qata_root = Path(qata_root).expanduser().resolve()
    src = qata_root / f"{split}.csv"
    if not src.is_file():
        raise SiteError(src, "QaTa-COV19 CSV not found")
    name = name or f"qata-{split}"
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"name": name, "format": "png-csv", "vocabulary": "chest-xray", "task": "qata-cov19",
            "label_map": {255: "lung infection"}, "csv": str(src), "root": str(qata_root / split),
            "source": f"QaTa-COV19 {split} split (held out from training)"}
    (folder / "site.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


def write_federation_file(out_dir: str | Path, sites: list[Path], unseen: Path | None = None, **info) -> Path:
    """``<out_dir>/federation.yaml`` listing the training ``sites`` (in partition order) and the ``unseen`` one."""
    out = Path(out_dir)

    def entry(p: Path) -> dict:
        """The federation.yaml entry of a site folder (path relative to the federation root where possible)."""
        return {"name": p.name, "path": str(Path(p).relative_to(out)) if Path(p).is_relative_to(out) else str(p)}

    fed = {"name": info.pop("name", out.name), **info, "vocabulary": "chest-xray",
           "sites": [entry(Path(p)) for p in sites], "unseen": entry(Path(unseen)) if unseen else None}
    path = out / "federation.yaml"
    path.write_text(yaml.safe_dump(fed, sort_keys=False))
    return path


def generate_option(gen, key: str, default):
    """``key`` of a data config's ``generate`` block, ``default`` where it is absent or null (the schema declares
    every generator's keys, so the ones a 2D generator does not set are null)."""
    value = gen.get(key) if hasattr(gen, "get") else None
    return default if value is None else value


def prepare_qata_federation(root: str | Path, gen, *, unseen: str | None = None, log_fn=print,
                            project_root: str | Path | None = None) -> list[Path]:
    """:func:`split_qata` of ``<source>/train`` into ``sites`` hospitals (``by``, ``mix``, ``seed`` of a data config's
    ``generate`` block) plus :func:`qata_eval_site` of ``<source>/<eval_split>`` named ``unseen``, and the
    ``federation.yaml`` under ``root``; returns the training sites. A relative ``source`` is taken from
    ``project_root`` (the folder holding ``configs/``)."""
    root = Path(root).expanduser()
    get = lambda key, default: generate_option(gen, key, default)  # noqa: E731
    source = Path(str(get("source", "../shared/data/qata-cov19"))).expanduser()
    if not source.is_absolute():
        source = Path(project_root or Path.cwd()) / source
    if not (source / "train.csv").is_file():
        raise SiteError(source, "QaTa-COV19 not found (expected train.csv, train/, valid.csv, valid/); set "
                                "data.generate.source or FEDTEXTSEG_QATA to the dataset folder")
    n, by, seed = int(get("sites", 3)), str(get("by", "extent")), int(get("seed", 0))
    log_fn(f"splitting QaTa-COV19 {source}/train into {n} hospitals (non-IID by {by}) under {root} ...")
    sites = split_qata(source, root, n_sites=n, by=by, mix=float(get("mix", 0.15)), seed=seed)
    held_out = qata_eval_site(source, root, str(get("eval_split", "valid")), name=unseen) if unseen else None
    write_federation_file(root, sites, held_out, name="qata-cov19", source=str(source.resolve()), by=by, seed=seed)
    return sites
