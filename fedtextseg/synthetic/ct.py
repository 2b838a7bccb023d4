"""Synthetic partially labelled hospitals (``fedtextseg synth``): site folders of phantom CT that ``load_site`` reads.

:func:`generate_hospitals` writes ``out_dir/siteNN-<profile>/`` folders whose labels annotate different class subsets
the way public datasets do, cycling through four profiles with new scanner traits per site:

* ``btcv``: the modelled BTCV organs (BTCV label values; tumours are labelled as their organ);
* ``lits``: liver + liver tumour; ``kits``: one value for both kidneys (the composite "kidney") + kidney tumour;
* ``msd``: pancreas + pancreas tumour (MSD Task07).

Every organ is in every image; classes a site does not annotate are background in its labels. ``out_dir/unseen``
is a fully labelled held-out hospital (every modelled class, values = vocabulary class numbers, its own scanner).
``site.yaml``'s ``synthetic:`` block records the seed and scanner traits, so :func:`load_synthetic_case` rebuilds a
case's phantom and full ground truth (for "present but unlabelled" checks and evaluation of unannotated classes).
Output is byte-identical for the same arguments; site ``i``'s data does not depend on how many sites are made.
"""

from __future__ import annotations

import argparse
import gzip
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
import yaml
from scipy import ndimage as ndi

from fedtextseg.synthetic.phantom import FULL_LABEL_VALUES, TUMORS, draw_patient, fov_circle_mask
from fedtextseg.errors import ConfigError, FedTextSegError, SiteError
from fedtextseg.vocab import get_vocabulary

__all__ = ["ScannerTraits", "Phantom", "make_phantom", "SiteProfile", "PROFILES", "PROFILE_ORDER", "UNSEEN",
           "generate_hospitals", "site_traits", "load_synthetic_case", "synth_main", "GENERATOR"]

GENERATOR, VERSION = "fedtextseg.synthetic.ct", 1
_EARLIER_GENERATORS = ("fedtextseg.data.synthetic",)  # the same generator before it moved (folders it wrote)
VOCABULARY = "abdomen-ct"
_CASE_RE = re.compile(r"^case_\d{3}\.nii\.gz$")
_ORIENTATIONS = ("LPS", "RAS", "LAS", "LPI")
_UNSEEN_INDEX = 1000
_AXES = ("RL", "AP", "SI")  # first letter: direction of the canonical (unflipped) voxel axis


@dataclass(frozen=True)
class ScannerTraits:
    """What differs between hospitals' scanners and protocols (spacing in mm of the generated grid)."""

    spacing: tuple[float, float, float] = (3.5, 3.5, 3.5)
    orientation: str = "RAS"  # storage orientation of the voxel axes (nibabel aff2axcodes), e.g. "LPS"
    hu_offset: float = 0.0  # calibration offset added to every HU
    hu_gain: float = 1.0  # contrast scale of every HU
    noise_sd: float = 12.0  # HU standard deviation of scanner noise
    noise_corr: float = 0.7  # noise correlation length (gaussian sigma, voxels)
    blur: float = 0.6  # point spread (gaussian sigma, voxels)
    contrast: float = 1.0  # contrast-agent phase: scales vessel / kidney / parenchyma enhancement
    pad_value: int | None = None  # HU outside the reconstruction circle (None: no circle)
    table: bool = True  # patient table visible under the body
    patient_size: float = 1.0  # mean body size of this hospital's population
    world_origin: tuple[float, float, float] = (0.0, 0.0, -400.0)  # world (RAS+ mm) of the anatomical origin

    def __post_init__(self) -> None:
        orient = str(self.orientation).upper()
        if len(orient) != 3 or any(o not in pair for o, pair in zip(orient, _AXES)):
            raise ConfigError(f"orientation {self.orientation!r}: 3 letters from R/L, A/P, S/I in that order")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ConfigError(f"scanner spacing must be three positive numbers, got {self.spacing}")
        object.__setattr__(self, "orientation", orient)
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "world_origin", tuple(float(v) for v in self.world_origin))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ScannerTraits":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown scanner traits {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass
class Phantom:
    """One scanned case in storage orientation: int16 HU image, tissue codes, RAS+ affine, full ground truth."""

    image: np.ndarray
    tissue: np.ndarray  # uint8; ``codes[code] = (class or None, host organ of a tumour or None)``
    affine: np.ndarray
    codes: dict[int, tuple[str | None, str | None]]
    meta: dict = field(default_factory=dict)

    def label_for(self, value_of: Mapping[str, int]) -> np.ndarray:
        """Label map: ``value_of[class]`` for annotated classes, else 0, except that a tumour of an unannotated
        class takes its host organ's value when the organ is annotated (as BTCV labels tumours as organ)."""
        lut = np.zeros(256, np.uint8)
        for code, (cls, host) in self.codes.items():
            if cls is not None:
                lut[code] = value_of.get(cls, 0) or (value_of.get(host, 0) if host else 0)
        return lut[self.tissue]

    @property
    def label(self) -> np.ndarray:
        """Full ground truth: every modelled class, values of :data:`FULL_LABEL_VALUES`."""
        return self.label_for(FULL_LABEL_VALUES)

    def world_centroid(self, mask: np.ndarray) -> np.ndarray:
        """World centroid (RAS+ mm: +x towards the patient's right) of a boolean mask on this grid."""
        return self.affine[:3, :3] @ np.argwhere(mask).mean(axis=0) + self.affine[:3, 3]


def make_phantom(rng: np.random.Generator, shape: Sequence[int], traits: ScannerTraits,
                 tumors: Sequence[str] = ()) -> Phantom:
    """Draw a patient (:func:`~fedtextseg.synthetic.phantom.draw_patient`) and scan it with ``traits``."""
    pat = draw_patient(rng, shape, traits.spacing, patient_size=traits.patient_size, table=traits.table,
                       fov_circle=traits.pad_value is not None, tumors=tumors)
    hu = pat.hu_image(traits.contrast)
    if traits.blur > 0:
        hu = ndi.gaussian_filter(hu, traits.blur, truncate=2.5)
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    if traits.noise_corr > 0:
        noise = ndi.gaussian_filter(noise, traits.noise_corr, truncate=2.5)
    noise *= np.float32(traits.noise_sd / max(float(noise.std()), 1e-6))
    image = np.clip(np.rint(hu * np.float32(traits.hu_gain) + np.float32(traits.hu_offset) + noise), -1024, 3071)
    image, tissue = image.astype(np.int16), pat.tissue
    if traits.pad_value is not None:  # outside the reconstruction circle: no data (and no tissue, see draw_patient)
        image[np.broadcast_to(fov_circle_mask(hu.shape), hu.shape)] = int(traits.pad_value)
    shape, sp = np.asarray(hu.shape), np.asarray(pat.spacing)
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = -(shape - 1) / 2 * sp + np.asarray(pat.centre) + np.asarray(traits.world_origin)
    flips = [k for k, o in enumerate(traits.orientation) if o != _AXES[k][0]]
    for k in flips:
        flip = np.eye(4)
        flip[k, k], flip[k, 3] = -1, shape[k] - 1
        affine = affine @ flip
    if flips:
        image, tissue = (np.ascontiguousarray(np.flip(a, flips)) for a in (image, tissue))
    lesions = [{**les, "centre_world": [round(c + o, 1) for c, o in zip(les["centre_mm"], traits.world_origin)]}
               for les in pat.lesions]
    meta = {"midline_world_x": float(traits.world_origin[0]), "patient": pat.body, "tumors": lesions}
    return Phantom(image=image, tissue=tissue, affine=affine, codes=pat.codes, meta=meta)


@dataclass(frozen=True)
class SiteProfile:
    """How a kind of public dataset labels its scans and which tumours its patients tend to have."""

    key: str
    task: str
    label_map: dict[int, str]  # label value -> vocabulary class or composite, as written to site.yaml
    focus: tuple[str, ...] = ()  # tumour classes the dataset was collected for: case 0 has them, case 1 not
    focus_rate: float = 0.75  # chance of each focus tumour in the other cases
    other_rate: float = 0.15  # chance of each other tumour (present in the image, maybe unlabelled)


PROFILES = {
    "btcv": SiteProfile("btcv", "btcv", {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gall bladder",
                                         6: "liver", 7: "stomach", 8: "aorta", 9: "postcava", 11: "pancreas"},
                        other_rate=0.2),
    "lits": SiteProfile("lits", "lits", {1: "liver", 2: "liver tumor"}, ("liver tumor",)),
    "kits": SiteProfile("kits", "kits", {1: "kidney", 2: "kidney tumor"}, ("kidney tumor",)),
    "msd": SiteProfile("msd", "msd", {1: "pancreas", 2: "pancreas tumor"}, ("pancreas tumor",)),
}
PROFILE_ORDER = ("btcv", "lits", "kits", "msd")
UNSEEN = SiteProfile("unseen", get_vocabulary(VOCABULARY).default_task or "btcv",
                     {v: c for c, v in FULL_LABEL_VALUES.items()}, TUMORS, focus_rate=0.5)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def site_traits(seed: int, site_index: int, shape: Sequence[int]) -> ScannerTraits:
    """Scanner traits of site ``site_index`` (the unseen hospital is index 1000). Spacings are drawn for a 96-voxel
    grid (in-plane 2.6-4.2 mm, slices 2.5-4.5 mm) and scaled so smaller grids cover the same field of view."""
    rng = _rng(seed, 7919, site_index)
    inplane, thick = rng.uniform(2.6, 4.2), rng.uniform(2.5, 4.5)
    s_xy, s_z = inplane * 96 / max(shape[0], shape[1]), thick * 96 / shape[2]
    return ScannerTraits(
        spacing=(round(s_xy, 4), round(s_xy, 4), round(s_z, 4)),
        orientation=_ORIENTATIONS[site_index % len(_ORIENTATIONS)],
        hu_offset=round(rng.uniform(-25, 25), 2), hu_gain=round(rng.uniform(0.9, 1.1), 3),
        noise_sd=round(rng.uniform(6, 28), 2), noise_corr=round(rng.uniform(0.4, 1.1), 2),
        blur=round(rng.uniform(0.35, 0.9), 2), contrast=round(rng.uniform(0.6, 1.3), 3),
        pad_value=[None, -1024, -2048][int(rng.integers(3))], table=bool(rng.random() < 0.75),
        patient_size=round(rng.uniform(0.92, 1.08), 3),
        world_origin=(round(rng.uniform(-5, 5), 2), round(rng.uniform(-30, 30), 2), round(rng.uniform(-700, -200), 1)),
    )


def _case_tumors(rng: np.random.Generator, profile: SiteProfile, case_index: int) -> list[str]:
    out = []
    for t in TUMORS:
        draw = rng.random()
        if t in profile.focus:
            present = case_index == 0 or (case_index != 1 and draw < profile.focus_rate)
        else:
            present = draw < profile.other_rate
        if present:
            out.append(t)
    return out


def _make_case(seed, site_index, case_index, profile: SiteProfile, traits, shape) -> Phantom:
    rng = _rng(seed, site_index, case_index)
    return make_phantom(rng, shape, traits, tumors=_case_tumors(rng, profile, case_index))


def _values_of(label_map: dict[int, str]) -> dict[str, int]:
    vocab = get_vocabulary(VOCABULARY)
    return {m: int(v) for v, name in label_map.items() for m in vocab.expand(name)}


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, level: int) -> bytes:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = b"fedtextseg synthetic phantom"
    return gzip.compress(img.to_bytes(), compresslevel=level, mtime=0)  # mtime=0: same bytes every run


def _write_case(job: tuple) -> dict:
    root, seed, site_index, case_index, profile, traits, shape, full_labels, level = job
    ph = _make_case(seed, site_index, case_index, profile, traits, shape)
    name = f"case_{case_index:03d}.nii.gz"
    (root / "images" / name).write_bytes(_nifti_bytes(ph.image, ph.affine, level))
    (root / "labels" / name).write_bytes(_nifti_bytes(ph.label_for(_values_of(profile.label_map)), ph.affine, level))
    if full_labels:
        (root / "full_labels" / name).write_bytes(_nifti_bytes(ph.label, ph.affine, level))
    return {"case": name[:-7], "tumors": [t for t in TUMORS if any(m["class"] == t for m in ph.meta["tumors"])]}


def _is_ours(yaml_path: Path) -> bool:
    try:
        data = yaml.safe_load(yaml_path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    block = data.get("synthetic") if isinstance(data, dict) else None
    ours = (GENERATOR, *_EARLIER_GENERATORS)
    return isinstance(data, dict) and (data.get("generator") in ours
                                       or (isinstance(block, dict) and block.get("generator") in ours))


def _clear_previous(out: Path, targets: list[str]) -> None:
    """With --force: remove earlier outputs of this generator only; refuse if a target folder holds other files."""
    ours = [d for d in sorted(out.iterdir()) if d.is_dir() and _is_ours(d / "site.yaml")]
    for name in targets:
        d = out / name
        if d.exists() and d not in ours and (not d.is_dir() or any(d.iterdir())):
            raise ConfigError(f"{d} exists and was not written by `fedtextseg synth`; "
                              "remove it or choose another --out")
    for d in ours:
        for sub in ("images", "labels", "full_labels"):
            foreign = [p.name for p in (d / sub).glob("*") if not _CASE_RE.match(p.name)] if (d / sub).is_dir() else []
            if foreign and d.name in targets:
                raise ConfigError(f"{d / sub} holds files synth did not write ({', '.join(foreign[:3])}); "
                                  "move them away or choose another --out")
    for d in ours:
        for sub in ("images", "labels", "full_labels"):
            for p in (d / sub).glob("case_*.nii.gz") if (d / sub).is_dir() else ():
                if _CASE_RE.match(p.name):
                    p.unlink()
            if (d / sub).is_dir() and not any((d / sub).iterdir()):
                (d / sub).rmdir()
        (d / "site.yaml").unlink()
        if not any(d.iterdir()):
            d.rmdir()
    if (out / "federation.yaml").is_file() and _is_ours(out / "federation.yaml"):
        (out / "federation.yaml").unlink()


def generate_hospitals(out_dir: str | Path, sites: int = 4, cases_per_site: int = 8, seed: int = 0,
                       shape: Sequence[int] = (96, 96, 96), unseen: bool = True, *, force: bool = False,
                       full_labels: bool = False, workers: int = 1, compresslevel: int = 1) -> list[Path]:
    """Write ``sites`` partially labelled site folders (+ ``unseen``) and ``federation.yaml``; return the site
    folders (training sites in order, then ``unseen``). Refuses a non-empty ``out_dir`` unless ``force``, and then
    deletes only files an earlier run of this generator wrote. ``full_labels`` also writes each case's complete
    ground truth to ``full_labels/`` (values of :data:`FULL_LABEL_VALUES`; ``load_site`` ignores that folder)."""
    shape = tuple(int(s) for s in shape)
    if not (1 <= sites < _UNSEEN_INDEX and 1 <= cases_per_site <= 999):
        raise ConfigError(f"need 1-999 sites and 1-999 cases per site (got sites={sites}, cases={cases_per_site})")
    if len(shape) != 3 or min(shape) < 16:
        raise ConfigError(f"shape must be three sizes of at least 16 voxels, got {list(shape)}")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    plan = [(f"site{i + 1:02d}-{PROFILE_ORDER[i % 4]}", i, PROFILES[PROFILE_ORDER[i % 4]]) for i in range(sites)]
    if unseen:
        plan.append(("unseen", _UNSEEN_INDEX, UNSEEN))
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"{out} is not empty; pass --force to replace an earlier synthetic federation there "
                              "(only its own files are deleted) or choose another --out")
        _clear_previous(out, [name for name, _, _ in plan])
    vocab, jobs, specs = get_vocabulary(VOCABULARY), [], []
    for name, index, profile in plan:
        root = out / name
        for sub in ("images", "labels") + (("full_labels",) if full_labels else ()):
            (root / sub).mkdir(parents=True, exist_ok=True)
        traits = site_traits(seed, index, shape)
        spec = {
            "name": name, "task": profile.task, "vocabulary": VOCABULARY, "format": "nifti",
            "images": "images", "labels": "labels",
            "label_map": {int(v): c for v, c in sorted(profile.label_map.items())},
            "annotated": vocab.resolve_many(profile.label_map.values()),
            "synthetic": {
                "generator": GENERATOR, "version": VERSION, "seed": int(seed), "site_index": index,
                "profile": profile.key, "shape": list(shape), "cases": cases_per_site, "scanner": traits.to_dict(),
                **({"full_labels": "full_labels", "full_label_map": {v: c for c, v in FULL_LABEL_VALUES.items()}}
                   if full_labels else {}),
            },
        }
        (root / "site.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))  # first: marks the folder as ours
        specs.append(spec)
        jobs += [(root, seed, index, c, profile, traits, shape, full_labels, compresslevel)
                 for c in range(cases_per_site)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_write_case, jobs, chunksize=2))
    else:
        results = [_write_case(j) for j in jobs]
    entries = []
    for k, spec in enumerate(specs):
        cases = results[k * cases_per_site:(k + 1) * cases_per_site]
        spec["synthetic"]["tumors"] = {r["case"]: r["tumors"] for r in cases}
        (out / spec["name"] / "site.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        entries.append({"name": spec["name"], "path": spec["name"], "task": spec["task"],
                        "profile": spec["synthetic"]["profile"], "annotated": spec["annotated"],
                        "cases": cases_per_site})
    fed = {"name": "synthetic-abdomen-ct", "generator": GENERATOR, "version": VERSION, "vocabulary": VOCABULARY,
           "seed": int(seed), "shape": list(shape), "cases_per_site": cases_per_site,
           "sites": [e for e in entries if e["name"] != "unseen"],
           "unseen": next((e for e in entries if e["name"] == "unseen"), None)}
    (out / "federation.yaml").write_text(yaml.safe_dump(fed, sort_keys=False))
    return [out / name for name, _, _ in plan]


def load_synthetic_case(site_dir: str | Path, case: int | str) -> Phantom:
    """Rebuild the phantom (image, full ground truth, affine) of one case of a synthetic site from its site.yaml."""
    root = Path(site_dir)
    spec_path = root / "site.yaml"
    try:
        spec = yaml.safe_load(spec_path.read_text())
        block = spec["synthetic"]
        profile = UNSEEN if block["profile"] == "unseen" else PROFILES[block["profile"]]
        traits = ScannerTraits.from_dict(block["scanner"])
        args = (int(block["seed"]), int(block["site_index"]))
        shape = tuple(block["shape"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise SiteError(spec_path, f"not a synthetic site description ({type(exc).__name__}: {exc})") from None
    index = int(case) if isinstance(case, int) or str(case).isdigit() else int(str(case).rsplit("_", 1)[-1])
    return _make_case(*args, index, profile, traits, shape)


def synth_main(argv: Sequence[str] | None = None) -> int:
    """``fedtextseg synth``: write a synthetic partially labelled federation; prints a summary table."""
    ap = argparse.ArgumentParser(prog="fedtextseg synth", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (one sub-folder per site)")
    ap.add_argument("--sites", type=int, default=4, help="training sites; profiles cycle btcv, lits, kits, msd")
    ap.add_argument("--cases-per-site", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96], metavar=("X", "Y", "Z"))
    ap.add_argument("--no-unseen", action="store_true", help="do not write the fully labelled held-out hospital")
    ap.add_argument("--full-labels", action="store_true", help="also write complete ground truth to full_labels/")
    ap.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    ap.add_argument("--force", action="store_true", help="replace an earlier synth output in --out")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        paths = generate_hospitals(args.out, args.sites, args.cases_per_site, args.seed, args.shape,
                                   unseen=not args.no_unseen, force=args.force, full_labels=args.full_labels,
                                   workers=args.workers)
    except FedTextSegError as exc:
        print(f"fedtextseg synth: error: {exc}", file=sys.stderr)
        return 2
    rows = [("site", "task", "cases", "spacing (mm)", "orient", "annotated classes")]
    for p in paths:
        spec = yaml.safe_load((p / "site.yaml").read_text())
        sc = spec["synthetic"]["scanner"]
        rows.append((spec["name"], spec["task"], str(spec["synthetic"]["cases"]),
                     "x".join(f"{s:.2f}" for s in sc["spacing"]), sc["orientation"], ", ".join(spec["annotated"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    print(f"wrote {len(paths)} sites to {args.out} in {time.perf_counter() - t0:.1f} s (federation.yaml lists them)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(synth_main())
