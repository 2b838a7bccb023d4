"""Property-based fuzzing (hypothesis) of the site readers, the preprocessing pipeline and ``check-site``: damaged and
odd NIfTI files (truncated, bytes flipped, header fields overwritten, any dtype, empty or degenerate shapes,
extreme spacings), site descriptions of any shape (``site.yaml`` / ``dataset.json``, duplicate or missing label-map
entries) and PNG+CSV sites (corrupt images, any image mode, broken CSVs).

The property everywhere: never a crash with a bare traceback. A reader returns a checked volume or raises a
``SiteError`` naming the file; ``check_site`` returns a report whose every problem names a file of the site (or
raises ``SiteError`` when the site itself cannot be read); ``check_site_main`` exits 0, 1 or 2.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from conftest import make_nifti_site, ras_affine

from fedtextseg.data.checks import check_site, check_site_main
from fedtextseg.data.io import read_label, read_nifti
from fedtextseg.data.site import load_site
from fedtextseg.data.transforms import PreprocessConfig, preprocess_transform
from fedtextseg.errors import FedTextSegError, SiteError

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# NIfTI-1 header fields (offset, struct format) a damaged or hand-made header gets wrong
HEADER_FIELDS = {"dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h"), "pixdim": (76, "<8f"),
                 "vox_offset": (108, "<f"), "scl_slope": (112, "<f"), "qform_code": (252, "<h"),
                 "sform_code": (254, "<h"), "srow_x": (280, "<4f")}
PRE = PreprocessConfig(spacing=(4.0, 4.0, 4.0), patch_size=(8, 8, 8), orientation="SAR")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A clean 3-case site; each example works on a fresh copy of it."""
    return make_nifti_site(tmp_path_factory.mktemp("pristine") / "site", n_cases=3, shape=(12, 14, 10))


@pytest.fixture
def fresh(pristine, tmp_path):
    counter = iter(range(10**6))

    def copy() -> Path:
        dest = tmp_path / f"site{next(counter)}"
        shutil.copytree(pristine, dest)
        return dest

    return copy


def assert_names_file(err: SiteError, path: Path) -> None:
    assert Path(err.path) == path and err.problem and str(path) in str(err)


def assert_report_sound(root: Path) -> None:
    """check_site and the CLI on a site with a damaged file: a report naming files inside the site, no crash."""
    try:
        report = check_site(root, full=True)
    except SiteError as exc:  # the site as a whole is unreadable: the error names where
        assert str(root) in exc.path
        assert check_site_main([str(root)]) == 2
        return
    for path, problem in report.problems:
        assert problem and Path(path).resolve().is_relative_to(root.resolve()), (path, problem)
    assert check_site_main([str(root), "--full"]) == (0 if report.ok else 1)


def read_all_ways(path: Path) -> None:
    for reader in (read_nifti, read_label):
        try:
            vol = reader(path)
        except SiteError as exc:
            assert_names_file(exc, path)
        else:
            assert vol.array.ndim == 3 and np.isfinite(vol.affine).all()


def run_pipeline(root: Path) -> None:
    """The cached preprocessing a site runs before training: each case preprocesses or fails naming its file."""
    site = load_site(root)
    transform = preprocess_transform(site, PRE)
    for case in site.labeled_cases:
        try:
            out = transform({"image": str(case.image), "label": str(case.label)})
        except SiteError as exc:
            assert Path(exc.path) in (case.image, case.label), exc
        else:
            assert out["image"].shape[1:] >= PRE.patch_size


@FUZZ
@given(which=st.sampled_from(["images", "labels"]), case=st.integers(0, 2), gz=st.booleans(),
       op=st.sampled_from(["truncate", "flip", "field"]), pos=st.floats(0, 1), nbytes=st.integers(1, 64),
       field=st.sampled_from(sorted(HEADER_FIELDS)), value=st.one_of(
           st.integers(-2**15, 2**15 - 1), st.sampled_from([0.0, -1.0, 1e-9, 1e9, float("nan"), float("inf")])))
def test_damaged_nifti_bytes(fresh, which, case, gz, op, pos, nbytes, field, value):
    root = fresh()
    path = root / which / f"case_{case:03d}.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    if op == "truncate":
        raw = raw[: int(pos * len(raw))]
    elif op == "flip":
        start = int(pos * (len(raw) - 1))
        raw = raw[:start] + bytes(b ^ 0xFF for b in raw[start:start + nbytes]) + raw[start + nbytes:]
    else:
        offset, fmt = HEADER_FIELDS[field]
        n = struct.calcsize(fmt) // struct.calcsize(fmt[-1])
        kind = int if fmt[-1] == "h" else float
        v = kind(value) if kind is float or isinstance(value, int) else int(value) if np.isfinite(value) else 0
        if kind is int:
            v = max(-2**15, min(2**15 - 1, v))
        raw = raw[:offset] + struct.pack(fmt, *([v] * n)) + raw[offset + struct.calcsize(fmt):]
    if gz:
        path.write_bytes(gzip.compress(raw) if op != "truncate" else gzip.compress(raw)[: max(1, len(raw) // 2)])
    else:
        path.unlink()
        path = path.with_name(path.name[:-3])
        path.write_bytes(raw)
    read_all_ways(path)
    assert_report_sound(root)


DTYPES = ["uint8", "int8", "int16", "uint16", "int32", "int64", "float32", "float64", "complex64", "bool"]


@FUZZ
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 6), min_size=1, max_size=5),
       spacing=st.lists(st.sampled_from([1e-6, 1e-3, 0.5, 1.5, 4.0, 1e3, 1e6, 0.0, -1.5]), min_size=3, max_size=3),
       fill=st.sampled_from(["zeros", "ones", "random", "nan", "big"]), which=st.sampled_from(["images", "labels"]))
def test_odd_volumes_dtypes_shapes_and_spacings(fresh, dtype, shape, spacing, fill, which):
    root = fresh()
    path = root / which / "case_001.nii.gz"
    rng = np.random.default_rng(0)
    data = {"zeros": np.zeros(shape), "ones": np.ones(shape), "random": rng.uniform(-5, 5, shape),
            "nan": np.full(shape, np.nan), "big": np.full(shape, 1e30)}[fill]
    try:
        with np.errstate(invalid="ignore", over="ignore"):
            array = data.astype(dtype)
        nib.save(nib.Nifti1Image(array, ras_affine(spacing)), str(path))
    except Exception:  # nibabel refuses to write it at all: nothing a site could hold  # noqa: BLE001
        assume(False)
    read_all_ways(path)
    assert_report_sound(root)
    try:
        run_pipeline(root)
    except SiteError as exc:  # e.g. the label no longer lies on the image grid, named by file
        assert Path(exc.path).resolve().is_relative_to(root.resolve())


@FUZZ
@given(spacing=st.lists(st.sampled_from([1e-4, 0.02, 1.5, 40.0, 200.0, 1e5]), min_size=3, max_size=3))
def test_extreme_spacings_are_flagged_and_never_blow_up_the_pipeline(fresh, spacing):
    root = fresh()
    for sub in ("images", "labels"):
        path = root / sub / "case_000.nii.gz"
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), ras_affine(spacing)), str(path))
    report = check_site(root)
    flagged = [p for f, p in report.problems if "implausible voxel size" in p or "cannot be inverted" in p]
    assert bool(flagged) == any(not 0.01 <= s <= 50 for s in spacing)
    run_pipeline(root)  # a grid too large to resample is a SiteError naming the image, never an allocation


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True),
                    st.sampled_from(["liver", "liver tumor", "kidney", "spleen", "livr", "", "lits", "btcv", "msd",
                                     "nifti", "png-csv", "images", "labels", "abdomen-ct", "chest-xray", "nowhere"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(SCALARS.filter(lambda x: x is not None),
                                                                       inner, max_size=4)), max_leaves=12)
SPEC_KEYS = ["name", "task", "vocabulary", "format", "images", "labels", "label_map", "annotated", "privacy",
             "csv", "root"]


@FUZZ
@given(spec=st.dictionaries(st.sampled_from(SPEC_KEYS), VALUES, max_size=8),
       label_map=st.one_of(st.none(), st.dictionaries(SCALARS.filter(lambda x: x is not None), SCALARS, max_size=4)),
       duplicate=st.booleans(), as_msd=st.booleans())
def test_any_site_description(fresh, spec, label_map, duplicate, as_msd):
    root = fresh()
    if label_map is not None:
        spec["label_map"] = label_map
    if as_msd:
        (root / "site.yaml").unlink()
        (root / "dataset.json").write_text(json.dumps({"name": spec.get("name"), "labels": spec.get("label_map")},
                                                      default=str))
    else:
        text = yaml.safe_dump(spec, sort_keys=False) if spec else ""
        if duplicate:  # a label value given twice: PyYAML alone would keep the last silently
            text += "label_map:\n  1: liver\n  1: spleen\n" if "label_map" not in spec else ""
        (root / "site.yaml").write_text(text)
    try:
        site = load_site(root)
    except SiteError as exc:
        assert str(root) in exc.path and exc.problem
        if duplicate and not as_msd and "label_map" not in spec:
            assert "given twice" in exc.problem or "site.yaml" in exc.path
    else:
        assert site.annotated and set(site.annotated) <= set(site.vocabulary.class_names)
        assert not (duplicate and not as_msd and "label_map" not in spec)
    assert_report_sound(root)


# ---------------------------------------------------------------- PNG + CSV sites
@pytest.fixture(scope="module")
def xray_pristine(tmp_path_factory):
    from fedtextseg.synthetic.xray import generate_xray_hospitals

    (root,) = generate_xray_hospitals(tmp_path_factory.mktemp("xray"), sites=1, images_per_site=3, size=24)
    return root


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"]  # every mode PIL writes as PNG


@FUZZ
@given(target=st.sampled_from(["image", "mask"]), op=st.sampled_from(["truncate", "flip", "mode", "garbage"]),
       pos=st.floats(0, 1), mode=st.sampled_from(MODES), size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
       csv_damage=st.sampled_from([None, "empty", "header-only", "no-caption", "binary", "duplicate", "missing-file"]))
def test_damaged_png_csv_sites(xray_pristine, tmp_path, target, op, pos, mode, size, csv_damage):
    from PIL import Image

    from fedtextseg.data.xray import check_xray_site, load_png, xray_dataset

    root = Path(tempfile.mkdtemp(dir=tmp_path))
    shutil.copytree(xray_pristine, root, dirs_exist_ok=True)
    files = sorted(p for p in root.rglob("*.png") if ("mask" in str(p.relative_to(root))) == (target == "mask"))
    path = files[0]
    if op == "mode":
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8)).convert(mode).save(path)
    elif op == "garbage":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    else:
        raw = path.read_bytes()
        cut = int(pos * len(raw))
        path.write_bytes(raw[:cut] if op == "truncate" else raw[:cut] + bytes(b ^ 0x5A for b in raw[cut:cut + 16])
                         + raw[cut + 16:])
    try:
        load_png(path, mask=target == "mask")
    except SiteError as exc:
        assert_names_file(exc, path)
    csv = next(root.glob("*.csv"))
    lines = csv.read_text().splitlines()
    if csv_damage == "empty":
        csv.write_text("")
    elif csv_damage == "header-only":
        csv.write_text(lines[0] + "\n")
    elif csv_damage == "no-caption":
        csv.write_text("\n".join(",".join(c for c in line.split(",")[:2]) for line in lines) + "\n")
    elif csv_damage == "binary":
        csv.write_bytes(b"\xff\xfe\x00garbage\x00\n")
    elif csv_damage == "duplicate":
        csv.write_text("\n".join(lines + lines[1:2]) + "\n")
    elif csv_damage == "missing-file":
        csv.write_text("\n".join(lines + ["images/ghost.png,masks/ghost.png,a caption"]) + "\n")
    assert_report_sound(root)
    try:
        site = load_site(root)
    except SiteError:
        return
    for p, problem in check_xray_site(site):
        assert problem and Path(p).resolve().is_relative_to(root.resolve())
    ds = xray_dataset(site, size=16)
    for i in range(len(ds)):
        try:
            ds[i]
        except SiteError as exc:
            assert Path(exc.path).resolve().is_relative_to(root.resolve())
        except FedTextSegError as exc:  # pragma: no cover - any other user-facing error must still say where
            assert str(root) in str(exc)
