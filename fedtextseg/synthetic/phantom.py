"""Synthetic abdominal CT patients: tissue map, per-tissue HU and texture, full ground truth (before the scanner).

Anatomy is built in millimetres in an anatomical frame whose axes are the NIfTI RAS+ world axes (+x towards the
patient's RIGHT, +y anterior, +z superior; origin = centre of the abdominal cavity at about L1): a body with a fat
rim, muscle wall, back muscles, a vertebral column (cortical rim, discs, canal, arch), lower ribs, psoas, bowel
loops with gas, lung bases over diaphragm domes, and the modelled organs as superellipsoids / tubes bent by a smooth
random displacement field and roughened by smooth random perturbations. Tumours are painted strictly inside their
organ (a rim of organ surrounds every tumour voxel). :func:`draw_patient` returns a :class:`Patient`: tissue codes
on the canonical grid, per-tissue HU (a + b * contrast phase) and texture; the scanner (noise, blur, calibration,
storage orientation, affine) is modelled in :mod:`fedtextseg.synthetic.ct`. Deterministic for a given
:class:`numpy.random.Generator` state; smooth fields are drawn on millimetre node grids, so a seed's anatomy hardly
depends on the voxel grid.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from fedtextseg.errors import ConfigError
from fedtextseg.vocab import get_vocabulary

try:  # the B-spline products are small: threaded BLAS only adds synchronisation (10-100x slower on busy cores)
    from threadpoolctl import threadpool_limits as _blas_limits
except ImportError:  # pragma: no cover - threadpoolctl is optional
    _blas_limits = None

__all__ = ["Patient", "draw_patient", "ORGANS", "TUMORS", "MODELED_CLASSES", "FULL_LABEL_VALUES", "TUMOR_HOSTS",
           "smooth_field", "fov_circle_mask"]

_VOCAB = get_vocabulary("abdomen-ct")
ORGANS = ("spleen", "right kidney", "left kidney", "gall bladder", "liver", "stomach", "aorta", "postcava", "pancreas")
TUMORS = ("kidney tumor", "liver tumor", "pancreas tumor")
MODELED_CLASSES = tuple(c for c in _VOCAB.class_names if c in ORGANS + TUMORS)  # vocabulary order
FULL_LABEL_VALUES = {c: _VOCAB.index(c) + 1 for c in MODELED_CLASSES}  # BTCV-style: value = class number
TUMOR_HOSTS = {"liver tumor": ("liver",), "kidney tumor": ("right kidney", "left kidney"),
               "pancreas tumor": ("pancreas",)}

# tissue: (labelled class, HU = a + b * contrast, texture amplitude in HU); the code is the position in this table
_TISSUES: dict[str, tuple[str | None, float, float, float]] = {
    "air": (None, -1000, 0, 0), "fat": (None, -100, 0, 10), "muscle": (None, 50, 0, 7),
    "cancellous": (None, 260, 0, 35), "cortical": (None, 750, 0, 60), "disc": (None, 85, 0, 8),
    "csf": (None, 12, 0, 4), "lung": (None, -860, 0, 35), "heart": (None, 40, 90, 8), "bowel": (None, 30, 25, 12),
    "gas": (None, -900, 0, 50), "rib": (None, 550, 0, 60), "table": (None, 120, 0, 10),
    "iliac artery": (None, 60, 150, 5), "iliac vein": (None, 55, 85, 5),
    "liver": ("liver", 50, 30, 6), "hepatic vessel": ("liver", 55, 110, 6), "gall bladder": ("gall bladder", 8, 0, 3),
    "spleen": ("spleen", 45, 40, 5), "pancreas": ("pancreas", 38, 35, 9),
    "rk cortex": ("right kidney", 40, 140, 8), "rk medulla": ("right kidney", 35, 70, 8),
    "rk sinus": ("right kidney", -30, 0, 15), "lk cortex": ("left kidney", 40, 140, 8),
    "lk medulla": ("left kidney", 35, 70, 8), "lk sinus": ("left kidney", -30, 0, 15),
    "stomach wall": ("stomach", 40, 40, 6), "stomach fluid": ("stomach", 10, 0, 5),
    "stomach gas": ("stomach", -850, 0, 40),
    "aorta": ("aorta", 60, 150, 5), "postcava": ("postcava", 55, 85, 5),
}
_CODE = {name: i for i, name in enumerate(_TISSUES)}
_LESION0 = 64  # first tissue code of per-case tumour lesions


@dataclass
class Patient:
    """One drawn patient on the canonical grid (voxel axes along +x right, +y anterior, +z superior)."""

    tissue: np.ndarray  # uint8 tissue codes; ``codes[code] = (class or None, host organ of a tumour or None)``
    codes: dict[int, tuple[str | None, str | None]]
    hu: np.ndarray  # [256, 2] float32: a tissue's HU is hu[code, 0] + hu[code, 1] * contrast
    texture: np.ndarray  # float32 per-voxel texture in HU units (amplitude already per tissue)
    centre: tuple[float, float, float]  # anatomical mm of the grid centre (origin = abdominal cavity centre, ~L1)
    spacing: tuple[float, float, float]
    body: dict = field(default_factory=dict)
    lesions: list = field(default_factory=list)  # one record per tumour lesion (centre in anatomical mm)

    def hu_image(self, contrast: float = 1.0) -> np.ndarray:
        """Noise-free HU volume for a contrast-agent phase factor."""
        table = self.hu[:, 0] + self.hu[:, 1] * np.float32(contrast)
        return table[self.tissue] + self.texture


# ---------------------------------------------------------------------------------------------- smooth fields
def _bspline_weights(coords: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray:
    t = np.clip((np.asarray(coords, np.float64) - lo) / max(hi - lo, 1e-6) * (n - 1), 0, n - 1)
    d = np.abs(t[:, None] - np.arange(-1, n + 1)[None, :])
    w = np.where(d < 1, (4 - 6 * d**2 + 3 * d**3) / 6, np.where(d < 2, (2 - np.minimum(d, 2)) ** 3 / 6, 0.0))
    return w.astype(np.float32)


def smooth_field(rng: np.random.Generator, coords: Sequence[np.ndarray], lo, hi, nodes: Sequence[int]) -> np.ndarray:
    """About unit-variance smooth noise on the grid ``coords`` (three 1-D mm axes): cubic B-spline through random
    nodes spread over the box ``[lo, hi]`` (mm). Always draws the same numbers for the same ``nodes``."""
    coarse = rng.standard_normal(tuple(n + 2 for n in nodes), dtype=np.float32)
    w = [_bspline_weights(c, a, b, n) for c, a, b, n in zip(coords, lo, hi, nodes)]
    out = np.matmul(w[1], coarse @ w[2].T)  # (a, Y, Z)
    out = (w[0] * np.float32(1 / 0.48**1.5)) @ out.reshape(out.shape[0], -1)
    return out.reshape(len(w[0]), len(w[1]), len(w[2]))


def _rot(deg: Sequence[float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Grid:
    """Canonical (RAS-ordered) voxel grid: 1-D anatomical mm axes and a smooth displacement field."""

    def __init__(self, rng, shape, spacing, centre, deform_mm):
        self.shape, self.sp = tuple(shape), np.asarray(spacing, np.float64)
        self.ax = [((np.arange(n) - (n - 1) / 2) * s + c).astype(np.float32) for n, s, c in zip(shape, spacing, centre)]
        lo, hi, nodes = (-260.0, -260.0, -320.0), (260.0, 260.0, 320.0), (9, 9, 11)
        self.disp = [smooth_field(rng, self.ax, lo, hi, nodes) * np.float32(deform_mm) for _ in range(3)]

    def box(self, lo, hi) -> tuple[slice, slice, slice]:
        return tuple(slice(int(np.searchsorted(a, l)), int(np.searchsorted(a, h, "right")))
                     for a, l, h in zip(self.ax, lo, hi))

    def bcast(self, k, sl=slice(None)):
        return self.ax[k][sl].reshape([-1 if j == k else 1 for j in range(3)])

    def coords(self, sl, deformed=True):
        return [self.bcast(k, sl[k]) + self.disp[k][sl] if deformed else self.bcast(k, sl[k]) for k in range(3)]


def _superellipsoid(P, c, axes, R, p=2.0):
    acc = 0.0
    for i in range(3):
        u = (R[0, i] * (P[0] - c[0]) + R[1, i] * (P[1] - c[1]) + R[2, i] * (P[2] - c[2])) * np.float32(1 / axes[i])
        acc = acc + (u * u if p == 2.0 else np.abs(u) ** p)
    return (np.sqrt(acc) if p == 2.0 else acc ** (1.0 / p)) - 1.0


def _tube(g: "_Grid", sl, pts, radii) -> np.ndarray:
    """min_k |p - pts_k| / r_k - 1 on box ``sl`` (deformed coordinates), each point only near itself."""
    P = g.coords(sl)
    f = np.full(P[0].shape, np.inf, np.float32)
    reach = float(np.abs(np.stack([d[sl] for d in g.disp])).max(initial=0)) + 2 * float(g.sp.max())
    for q, r in zip(pts, radii):
        sub = tuple(slice(max(b.start - s.start, 0), max(b.stop - s.start, 0))
                    for b, s in zip(g.box(q - 1.6 * r - reach, q + 1.6 * r + reach), sl))
        d2 = (P[0][sub] - q[0]) ** 2 + (P[1][sub] - q[1]) ** 2 + (P[2][sub] - q[2]) ** 2
        np.minimum(f[sub], np.sqrt(d2) * np.float32(1 / r), out=f[sub])
    return np.minimum(f, 2.0) - 1.0


def _spline(ctrl: np.ndarray, radii: np.ndarray, step: float):
    """Catmull-Rom curve through control points, sampled every ``step`` mm (with linearly varying radius)."""
    ctrl = np.vstack([2 * ctrl[0] - ctrl[1], ctrl, 2 * ctrl[-1] - ctrl[-2]])
    pts, rad = [], []
    for i in range(1, len(ctrl) - 2):
        p0, p1, p2, p3 = ctrl[i - 1 : i + 3]
        n = max(2, int(np.ceil(np.linalg.norm(p2 - p1) / step)))
        t = np.linspace(0, 1, n, endpoint=False)[:, None]
        pts.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3))
        rad.append(radii[i - 1] + (radii[i] - radii[i - 1]) * t[:, 0])
    return np.vstack(pts + [ctrl[-2][None]]), np.concatenate(rad + [radii[-1:]])


def _bounds(mask: np.ndarray) -> tuple[slice, slice, slice]:
    idx = [np.flatnonzero(mask.any(axis=tuple(j for j in range(3) if j != k))) for k in range(3)]
    return tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)


# ------------------------------------------------------------------------------------------------- the patient
def draw_patient(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], *,
                 patient_size: float = 1.0, table: bool = True, fov_circle: bool = False,
                 tumors: Sequence[str] = ()) -> Patient:
    """Draw one patient on a ``shape`` grid of ``spacing`` mm; ``tumors`` lists the tumour classes it has.
    ``fov_circle``: only the inscribed in-plane circle is reconstructed (tissue outside it is air)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ConfigError(f"phantom shape must be three sizes of at least 8 voxels, got {list(shape)}")
    bad = [t for t in tumors if t not in TUMORS]
    if bad:
        raise ConfigError(f"cannot model tumours {bad}; known: {list(TUMORS)}")
    with _blas_limits(1, user_api="blas") if _blas_limits else contextlib.nullcontext():
        return _draw(rng, shape, np.asarray(spacing, np.float64), patient_size, table, fov_circle, tumors)


def fov_circle_mask(shape: Sequence[int]) -> np.ndarray:
    """[X, Y, 1] bool: voxels outside the circle inscribed in the in-plane field of view."""
    ii = [(np.arange(n) - (n - 1) / 2) / (n / 2) for n in shape[:2]]
    return ((ii[0][:, None] ** 2 + ii[1][None, :] ** 2) > 1)[..., None]


def _draw(rng, shape, sp, patient_size, table, fov_circle, tumors) -> Patient:
    body = _draw_body(rng, patient_size, sp * np.asarray(shape))
    centre = (rng.normal(0, 5), (body["Ba"] - body["Bp"]) / 2 + rng.normal(0, 5), rng.uniform(-15, 30) * body["kz"])
    grid = _Grid(rng, shape, sp, centre, deform_mm=rng.uniform(4, 8))
    tissue = np.zeros(shape, np.uint8)
    _paint_anatomy(rng, grid, tissue, body, table)
    if fov_circle:
        tissue[np.broadcast_to(fov_circle_mask(shape), shape)] = 0
    codes = {c: (cls, None) for c, (cls, *_rest) in enumerate(_TISSUES.values())}
    hu = np.zeros((256, 2), np.float32)
    hu[: len(_TISSUES)] = [(a, b) for (_c, a, b, _t) in _TISSUES.values()]
    lesions = []
    for cls in tumors:
        for _ in range(int(rng.integers(1, 4)) if cls == "liver tumor" else 1):
            info = _paint_tumor(rng, grid, tissue, cls, codes, hu)
            if info:
                lesions.append(info)
    amp = np.full(256, 10.0, np.float32)
    amp[: len(_TISSUES)] = [t for (*_x, t) in _TISSUES.values()]
    lo, hi = (-260.0, -260.0, -320.0), (260.0, 260.0, 320.0)
    fine = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.0, truncate=2.5)
    fine *= np.float32(0.45 / max(float(fine.std()), 1e-6))
    texture = amp[tissue] * (0.75 * smooth_field(rng, grid.ax, lo, hi, (32, 32, 38)) + fine)
    return Patient(tissue=tissue, codes=codes, hu=hu, texture=texture, centre=tuple(float(c) for c in centre),
                   spacing=tuple(float(v) for v in sp), body={k: round(float(v), 2) for k, v in body.items()},
                   lesions=lesions)


def _draw_body(rng, size: float, fov) -> dict:
    kx, ky = size * rng.normal(1, 0.06), size * rng.normal(1, 0.06)
    t_fat, t_m, back = rng.uniform(8, 32) * size, rng.uniform(8, 14), 48.0
    Ac, Bc = 118 * kx, 80 * ky
    A, Ba, Bp = Ac + t_m + t_fat, Bc + t_m + t_fat, Bc + back * ky + t_fat
    fit = min(1.0, 0.46 * fov[0] / A, 0.9 * fov[1] / (Ba + Bp))  # small field of view: a smaller patient
    return dict(kx=kx * fit, ky=ky * fit, kz=rng.normal(1, 0.05), Ac=Ac * fit, Bc=Bc * fit, A=A * fit, Ba=Ba * fit,
                Bp=Bp * fit, t_fat=t_fat * fit, t_m=t_m * fit)


# ------------------------------------------------------------------------------------------------- anatomy
def _paint_anatomy(rng, g: _Grid, tissue: np.ndarray, b: dict, table: bool) -> None:
    C, S = _CODE, np.array([b["kx"], b["ky"], b["kz"]])
    X, Y, Z = g.bcast(0), g.bcast(1), g.bcast(2)

    def put(mask, code):
        tissue[np.broadcast_to(mask, tissue.shape)] = code
    wz = (1 + 0.04 * np.sin(Z / 95.0 + rng.uniform(0, 6.3))).astype(np.float32)

    def inside(a, ba, bp, p=2.0):
        return (np.abs(X / (a * wz)) ** p + np.abs(Y / (np.where(Y > 0, ba, bp) * wz)) ** p) <= 1

    Ac, Bc, tf, tm = b["Ac"], b["Bc"], b["t_fat"], b["t_m"]
    put(inside(b["A"], b["Ba"], b["Bp"], 2.3), C["fat"])
    shrunk = inside(b["A"] - tf, b["Ba"] - tf, b["Bp"] - tf, 2.3)
    put(shrunk, C["muscle"])
    cavity = inside(Ac, Bc, Bc)
    put(cavity, C["fat"])
    # lower ribs in the lateral/anterior wall, sloping down anteriorly
    band = inside(Ac + 0.8 * tm, Bc + 0.8 * tm, Bc + 0.8 * tm) & ~inside(Ac + 0.2 * tm, Bc + 0.2 * tm, Bc + 0.2 * tm)
    zr = Z + 0.35 * Y - rng.uniform(0, 28)
    put(band & (Y > -0.6 * Bc) & (np.mod(zr, 28 * S[2]) < 9) & (Z > -35 * S[2] + 0.8 * np.maximum(Y, 0)), C["rib"])
    # psoas muscles below L1, growing caudally
    r = 6 + 16 * np.clip((-25 * S[2] - Z) / 90, 0, 1) * (Z < -25 * S[2])
    for side in (1, -1):
        put((X - side * (24 * S[0] + 0.7 * r)) ** 2 + (Y + Bc - 12 * S[1] - 0.3 * r) ** 2 < r**2, C["muscle"])
    # diaphragm domes (right higher), lungs and heart above them
    xr, yr = X / S[0], Y / S[1]
    dome = np.maximum(112 - 0.0045 * (xr - 55) ** 2, 100 - 0.0045 * (xr + 55) ** 2) - 0.003 * (yr - 10) ** 2
    zd = (dome - 0.15 * np.maximum(-yr, 0)) * S[2] + rng.normal(0, 6)
    above = Z > zd
    lo, hi = (-260.0, -260.0, -320.0), (260.0, 260.0, 320.0)
    loops = smooth_field(rng, g.ax, lo, hi, (34, 34, 40))
    gas = smooth_field(rng, g.ax, lo, hi, (24, 24, 28))
    bowel_zone = cavity & ~above & (Z < 35 * S[2]) & (Y > -0.55 * Bc)
    put(bowel_zone & (loops > -0.2), C["bowel"])
    put(bowel_zone & (loops > -0.2) & (gas > 1.5), C["gas"])
    put(cavity & above, C["lung"])
    heart_c = np.array([-15, 25, 0]) * S + [0, 0, float(zd.max()) + 45 * S[2]]
    sl = g.box(heart_c - 70, heart_c + 70)
    heart = (_superellipsoid(g.coords(sl, False), heart_c, np.array([60, 50, 55]) * S, np.eye(3)) < 0)
    tissue[sl][heart & cavity[sl] & above[sl]] = C["heart"]
    peri = cavity & ~above
    margin = float(np.abs(np.stack(g.disp)).max(initial=0)) + 5

    def organ(specs, pert=0.12):
        parts = []
        for ref_c, ref_ax, rot, p, jit, size_sd in specs:
            c = (np.array(ref_c) + rng.normal(0, jit, 3)) * S
            ax = np.array(ref_ax) * S * rng.normal(1, size_sd) * rng.normal(1, 0.05, 3)
            parts.append((c, ax, _rot(np.array(rot) + rng.normal(0, 6, 3)), p))
        lo_ = np.min([c - a.max() * 1.3 for c, a, _, _ in parts], axis=0) - margin
        hi_ = np.max([c + a.max() * 1.3 for c, a, _, _ in parts], axis=0) + margin
        sl_ = g.box(lo_, hi_)
        P = g.coords(sl_)
        f = np.min([_superellipsoid(P, c, a, R, p) for c, a, R, p in parts], axis=0)
        f = f + pert * np.clip(smooth_field(rng, [g.ax[k][sl_[k]] for k in range(3)], lo_, hi_, (5, 5, 5)), -2, 2)
        return sl_, f, P, parts

    def paint(sl_, mask, code, where=None):
        view = tissue[sl_]
        view[mask & (where[sl_] if where is not None else True)] = code

    # stomach (gas anterior over fluid, wall rim), liver (+ vessels), gall bladder, spleen
    sl, f, P, parts = organ([((-50, 25, 68), (40, 34, 52), (0, 25, 0), 2.0, 6, 0.1),
                             ((5, 48, 25), (38, 17, 17), (0, 0, -20), 2.0, 5, 0.1)])
    level = parts[0][0][1] + parts[0][1][1] * rng.uniform(-0.1, 0.7)
    content = np.where(P[1] > level, C["stomach gas"], C["stomach fluid"])
    view = tissue[sl]
    sel = (f < 0) & peri[sl]
    view[sel] = np.where(f > -0.12, C["stomach wall"], content)[sel]
    sl, f, P, parts = organ([((55, 2, 60), (62, 72, 66), (0, 0, 10), 2.0, 6, 0.07),
                             ((-15, 36, 76), (55, 32, 34), (0, -10, -15), 2.0, 6, 0.1)])
    paint(sl, f < 0, C["liver"], peri)
    hilum = np.array([25, 5, 35]) * S
    for _ in range(int(rng.integers(4, 7))):
        c0, a0 = parts[0][0], parts[0][1]
        target = c0 + rng.uniform(-0.75, 0.75, 3) * a0
        mid = (hilum + target) / 2 + rng.normal(0, 8, 3)
        rad = np.maximum(np.array([5.0, 3.5, 2.5]), 0.55 * g.sp.max())
        pts, rad = _spline(np.array([hilum, mid, target]), rad, 0.7 * rad.min())
        vsl = g.box(pts.min(0) - margin, pts.max(0) + margin)
        view = tissue[vsl]
        view[(_tube(g, vsl, pts, rad) < 0) & (view == C["liver"])] = C["hepatic vessel"]
    sl, f, _, _ = organ([((40, 42, -6), (13, 14, 30), (-30, 15, 0), 2.0, 5, 0.15)], pert=0.08)
    paint(sl, f < 0, C["gall bladder"], peri)
    sl, f, _, _ = organ([((-80, -28, 58), (20, 46, 45), (15, 0, 35), 2.0, 5, 0.12)])
    paint(sl, f < 0, C["spleen"], peri)
    # pancreas: a tube from the head (by the duodenum) to the tail (at the splenic hilum)
    ctrl = np.array([(28, -18, -12), (8, -8, 0), (-25, -10, 8), (-55, -18, 15), (-80, -32, 25)]) * S
    ctrl = ctrl + rng.normal(0, 4, ctrl.shape)
    pts, rad = _spline(ctrl, np.array([17, 12, 12, 11, 9]) * (S[0] + S[1]) / 2 * rng.uniform(0.85, 1.15), 3.0)
    lo_, hi_ = pts.min(0) - 25 - margin, pts.max(0) + 25 + margin
    sl = g.box(lo_, hi_)
    f = _tube(g, sl, pts, rad) + 0.15 * smooth_field(rng, [g.ax[k][sl[k]] for k in range(3)], lo_, hi_, (7, 5, 5))
    paint(sl, f < 0, C["pancreas"], peri)
    # kidneys: cortex rim, medulla, sinus fat towards the hilum (medial)
    for side, name, ref_c, rot in ((1, "rk", (68, -50, -32), (-15, -12, 30)),
                                   (-1, "lk", (-68, -50, -18), (-15, 12, -30))):
        sl, f, P, parts = organ([(ref_c, (24, 22, 52), rot, 2.0, 6, 0.1)], pert=0.06)
        (c, ax, R, _p), = parts
        u = (R[0, 0] * (P[0] - c[0]) + R[1, 0] * (P[1] - c[1]) + R[2, 0] * (P[2] - c[2])) / ax[0]
        code = np.where(f > -0.28, C[name + " cortex"], C[name + " medulla"])
        code = np.where((f < -0.45) & (u * side < -0.1), C[name + " sinus"], code)
        view = tissue[sl]
        sel = (f < 0) & shrunk[sl]
        view[sel] = code[sel]
    # vertebral column (undeformed): body with cortical rim and discs, canal, arch, spinous/transverse processes
    yv, rx, ry = -Bc - 2 * S[1], 21 * S[0], 17 * S[1]
    period, phase = 30 * S[2], rng.uniform(0, 30)
    zp = np.mod(Z - phase, period)
    ya = yv + ry  # anterior edge of the vertebral bodies
    for name, x0, y0, rxv, ryv, zbif in (("aorta", -14, 12, 11, 11, -115), ("postcava", 22, 6, 12, 9, -125)):
        x0, y0, rxv, ryv, zbif = x0 * S[0], ya + (y0 + 0.8 * rxv) * S[1], rxv * S[0], ryv * S[1], zbif * S[2]
        xc = x0 + 3 * np.sin(Z / 70 + rng.uniform(0, 6.3))
        top = (zd.max() + 30 * S[2]) if name == "postcava" else np.inf
        trunk = ((X - xc) / rxv) ** 2 + ((Y - y0) / ryv) ** 2 < 1
        put(trunk & (Z > zbif) & (Z < top) & shrunk, C[name])
        iliac = "iliac artery" if name == "aorta" else "iliac vein"
        for sgn in (1, -1):
            xi = xc + sgn * 0.45 * np.maximum(zbif - Z, 0)
            put((((X - xi) / (0.7 * rxv)) ** 2 + ((Y - y0) / (0.7 * ryv)) ** 2 < 1) & (Z <= zbif) & shrunk, C[iliac])
    vb = (X / rx) ** 2 + ((Y - yv) / ry) ** 2 < 1
    inner = (X / (rx - 3)) ** 2 + ((Y - yv) / (ry - 3)) ** 2 < 1
    disc = zp < 7 * S[2]
    put(vb & disc, C["disc"])
    put(vb & ~disc & inner, C["cancellous"])
    put(vb & ~disc & ~inner, C["cortical"])
    yc = yv - ry - 10
    rc = np.sqrt(X**2 + (Y - yc) ** 2)
    put((rc >= 9) & (rc < 15) & (Y < yc + 6), C["cortical"])
    put(rc < 9, C["csf"])
    put((np.abs(X) < 4) & (Y < yc - 12) & (Y > yc - 42 * S[1]) & (zp > 8) & (zp < 0.8 * period), C["cortical"])
    put((np.abs(X) > 12) & (np.abs(X) < 42 * S[0]) & (np.abs(Y - yc - 3) < 5) & (zp > 10) & (zp < 20), C["cortical"])
    if table:
        ytop = -b["Bp"] * float(wz.max()) - rng.uniform(2, 10) + 0.0006 * X**2
        put((np.abs(X) < 0.85 * b["A"]) & (Y < ytop) & (Y > ytop - 10) & (tissue == 0), C["table"])


_TUMOR_RADIUS = {"liver tumor": (5.0, 24.0), "kidney tumor": (8.0, 28.0), "pancreas tumor": (6.0, 16.0)}
_HOST_MAIN = {"liver": "liver", "right kidney": "rk cortex", "left kidney": "lk cortex", "pancreas": "pancreas"}


def _paint_tumor(rng, g: _Grid, tissue, cls: str, codes: dict, hu: np.ndarray) -> dict | None:
    """One lesion strictly inside its host organ (kidney and pancreas hosts swell around it); None if no host."""
    hosts = list(TUMOR_HOSTS[cls])
    if len(hosts) > 1 and rng.random() < 0.5:
        hosts.reverse()
    r_mm = max(rng.uniform(*_TUMOR_RADIUS[cls]), 1.6 * float(g.sp.max()))
    axes, R = r_mm * rng.uniform(0.8, 1.15, 3), _rot(rng.uniform(0, 180, 3))
    kind, delta, pick = rng.random(), rng.uniform(0, 1), rng.random()
    for host in hosts:
        host_codes = [k for k, (c, h) in codes.items() if c == host and h is None]
        mask = np.isin(tissue, host_codes)
        if mask.any():
            break
    else:
        return None
    bsl = _bounds(mask)
    dist = ndi.distance_transform_edt(mask[bsl], sampling=g.sp)
    need = min(0.9 * r_mm if cls == "liver tumor" else 0.5 * float(dist.max()), 0.8 * float(dist.max()))
    cand = np.flatnonzero(dist >= need)
    idx = np.unravel_index(cand[min(int(pick * len(cand)), len(cand) - 1)], dist.shape)
    centre = np.array([g.ax[k][bsl[k].start + idx[k]] for k in range(3)], np.float64)
    half = 1.4 * r_mm + 3 * float(g.sp.max())
    sl = g.box(centre - half, centre + half)
    P = g.coords(sl, deformed=False)
    f = _superellipsoid(P, centre, axes, R) + 0.12 * smooth_field(rng, [g.ax[k][sl[k]] for k in range(3)],
                                                                 centre - half, centre + half, (4, 4, 4))
    view, host_local = tissue[sl], mask[sl]
    main = _CODE[_HOST_MAIN[host]]
    if cls != "liver tumor":  # mass effect: the organ swells around the lesion
        soft_names = ("fat", "muscle", "bowel", "gas", "pancreas", "liver", "stomach wall")
        soft = np.isin(view, [_CODE[n] for n in soft_names] + host_codes) & ~ndi.binary_dilation(view >= _LESION0)
        swell = (_superellipsoid(P, centre, axes + 1.5 * float(g.sp.max()), R) < 0.15) & soft & ~host_local
        view[swell] = main
        host_local = host_local | swell
    inside = ndi.binary_erosion(host_local, border_value=0)
    lesion = (f < 0) & inside
    if not lesion.any():
        return None
    code = max(max(codes) + 1, _LESION0)
    base = hu[main]
    d = {"liver tumor": -20 - 40 * delta if kind < 0.7 else 25 + 35 * delta,  # hypo- or hyperdense
         "kidney tumor": -20 - 70 * delta}.get(cls, -15 - 30 * delta)
    codes[code], hu[code] = (cls, host), (base[0] + d, base[1])
    view[lesion] = code
    core = lesion & (f < -0.45)
    if (cls == "kidney tumor" and r_mm > 15) or (cls == "liver tumor" and kind < 0.25):
        necrosis = (15.0, 0.0) if cls == "kidney tumor" else (base[0] + d - 15, base[1])
        codes[code + 1], hu[code + 1] = (cls, host), necrosis
        view[core] = code + 1
    return {"class": cls, "host": host, "radius_mm": round(float(r_mm), 1), "delta_hu": round(float(d), 1),
            "voxels": int(lesion.sum()), "centre_mm": [round(float(v), 1) for v in centre]}
