"""Synthetic abdominal/thoracic CT phantoms with organ labels and a per-volume class.

Lets the project demo BYOL pretraining and evaluate it (linear probe on the class label,
segmentation Dice on the organ labels) without real data. Each phantom is a volume in
Hounsfield units (HU) covering the lower thorax and the upper abdomen: air outside the
body, subcutaneous fat, a muscle wall, lungs with vessels above a domed diaphragm, heart,
mediastinal fat, liver (patient's right), spleen (patient's left), stomach with an air-fluid
level, gallbladder, bowel loops with gas in visceral fat, two kidneys (cortex and medulla),
aorta, inferior vena cava, psoas and paraspinal muscles, vertebrae with discs and spinal
canal, ribs and sternum. Sizes are in millimetres, so a finer grid gives the same anatomy at
a higher resolution. The anatomy is centred in the field of view (about 380 x 380 x 320 mm
at the default shape and spacing); a smaller field of view crops it, as a real scan would.

Approximate HU before blur and noise (per-subject jitter in brackets):

=====================  ==========================================
air                    -1000
fat (subcutaneous)     -100
muscle                 +45
lung parenchyma        -860 (denser posteriorly), vessels up to +40
liver                  +60 (52..68), vessels +130
spleen                 +50 (42..58)
kidney                 medulla +30, cortex +150
aorta                  +200 (170..240, contrast), IVC +110
vertebral body         +280..+480, cortex +1000; ribs +650
=====================  ==========================================

Scanner noise of 10..20 HU (slightly correlated in-plane) is added last.

Organ labels (:data:`LABEL_NAMES`; liver lesions keep the liver label; heart, stomach,
gallbladder, bowel, IVC, renal sinus fat, discs and the spinal canal are background)::

    0 background  1 liver  2 spleen  3 kidney_left  4 kidney_right  5 lungs  6 bone  7 aorta

Per-volume classes (:data:`CLASS_NAMES`)::

    0 normal
    1 liver_lesions  3..6 hypodense spheres, radius 10..22 mm, -20..+20 HU, in the liver
    2 splenomegaly   spleen 1.45..1.75 times larger along each axis (volume x3..x5)

The classes change the mean intensity far less than body habitus does, so a probe has to
see the finding. With the same seed, every class gives the same subject otherwise.

Array axes and affine: ``image[i, j, k]`` with ``i`` towards the patient's left, ``j``
posterior, ``k`` superior, as a NIfTI converted from DICOM (LPS) stores it. The affine is
``diag(-sx, -sy, sz)`` plus a non-zero origin (``nibabel.aff2axcodes`` gives
``('L', 'P', 'S')``): in RAS+ world coordinates x increases towards the patient's right, so
MONAI's ``Orientationd(axcodes="RAS")`` flips the first two axes.

Example:
    >>> from byol3d.data.synthetic_ct import write_demo_dataset
    >>> paths = write_demo_dataset("data/demo", n=16)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

LABEL_NAMES: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "lungs",
    6: "bone",
    7: "aorta",
}


CLASS_NAMES: dict[int, str] = {0: "normal", 1: "liver_lesions", 2: "splenomegaly"}


# Per-subject parameters, each drawn uniformly from (low, high) in this order. Lengths in mm.
_RANGES: dict[str, tuple[float, float]] = {
    "dx": (-15, 15), "dy": (-12, 12), "dz": (-20, 20), "rot": (-6, 6),  # pose (rot: degrees)
    "zd": (45, 75), "size": (0.92, 1.08), "ap": (0.9, 1.1),  # diaphragm dome height, build
    "fat": (6, 38), "visc": (0.3, 0.75),  # subcutaneous fat (mm), visceral fat fraction
    "liver": (0.88, 1.12), "spleen": (0.85, 1.12), "big": (1.45, 1.75), "kidney": (0.9, 1.1),
    "kid_dz": (-12, 12), "liver_hu": (52, 68), "spleen_hu": (42, 58), "aorta_hu": (170, 240),
    "bone_hu": (280, 480), "noise": (10, 20), "disc_ph": (0, 31), "rib_ph": (0, 28),
    "ox": (-15, 15), "oy": (-40, 40), "oz": (-700, -400),  # affine origin offsets
}  # fmt: skip


@dataclass
class Phantom:
    """One synthetic CT volume.

    Attributes:
        image: int16 HU, array axes (i, j, k) as stored in the NIfTI (towards L, P, S).
        labels: uint8 organ map of the same shape, values from :data:`LABEL_NAMES`.
        class_label: per-volume class, a key of :data:`CLASS_NAMES`.
        affine: 4x4 float64 NIfTI affine (voxel indices -> RAS+ world mm).
    """

    image: np.ndarray
    labels: np.ndarray
    class_label: int
    affine: np.ndarray


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_geometry(shape, spacing) -> tuple[tuple[int, ...], tuple[float, ...]]:
    try:
        ok = len(shape) == 3 and all(
            not isinstance(s, bool) and isinstance(s, (int, np.integer)) and s >= 16 for s in shape
        )
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"shape must be 3 integers >= 16, got {shape!r}")
    try:
        sp = tuple(float(s) for s in spacing)
        ok = len(sp) == 3 and all(math.isfinite(s) and s > 0 for s in sp)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"spacing must be 3 positive finite numbers (mm), got {spacing!r}")
    return tuple(int(s) for s in shape), sp


def _noise(rng: np.random.Generator, shape: tuple, spacing: tuple, sigma_mm: float) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed by a Gaussian of ``sigma_mm`` (periodic).

    White noise is drawn directly in the Fourier domain, which saves the forward FFT.
    """
    kx, ky = (np.fft.fftfreq(n, d) for n, d in zip(shape[:2], spacing[:2], strict=True))
    kz = np.fft.rfftfreq(shape[2], spacing[2])
    c = -2.0 * (np.pi * sigma_mm) ** 2
    g = [np.exp(c * k**2).astype(np.float32) for k in (kx, ky, kz)]
    f = rng.standard_normal((2, *shape[:2], len(kz)), dtype=np.float32)
    f = (f[0] + 1j * f[1]) * (g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :])
    out = np.fft.irfftn(f, s=shape, axes=(0, 1, 2)).astype(np.float32)
    return out / max(float(out.std()), 1e-12)


def _blur(a: np.ndarray, axis: int, w: float) -> np.ndarray:
    """Three-tap [w, 1-2w, w] blur along ``axis`` with edge padding."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (1, 1)
    p = np.pad(a, pad, mode="edge")
    n = a.shape[axis]
    take = [np.take(p, np.arange(o, o + n), axis=axis) for o in range(3)]
    return w * (take[0] + take[2]) + (1 - 2 * w) * take[1]


def _ell(x, y, z, c, r, rot: float = 0.0) -> np.ndarray:
    """Squared normalised radius of an ellipsoid (centre ``c``, semi-axes ``r``, in-plane
    rotation ``rot`` degrees); an infinite z semi-axis gives a cylinder."""
    dx, dy = x - c[0], y - c[1]
    if rot:
        cs, sn = math.cos(math.radians(rot)), math.sin(math.radians(rot))
        dx, dy = cs * dx + sn * dy, -sn * dx + cs * dy
    return (dx / r[0]) ** 2 + (dy / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2


def _sup(x, y, a, b, p) -> np.ndarray:
    """Normalised superellipse radius (``p`` = 2: ellipse; larger: boxier)."""
    return (np.abs(x / a) ** p + np.abs(y / b) ** p) ** (1.0 / p)


def make_phantom(
    seed: int,
    shape: tuple[int, int, int] = (96, 96, 64),
    spacing: tuple[float, float, float] = (4.0, 4.0, 5.0),
    class_label: int | None = None,
) -> Phantom:
    """Generate one synthetic CT phantom.

    Args:
        seed: Non-negative integer; the same seed gives identical output. All subject
            parameters (pose, build, organ sizes and HU, lesions) come from
            ``np.random.default_rng(seed)`` and do not depend on ``shape`` or ``class_label``.
        shape: Array shape (i, j, k), each at least 16.
        spacing: Voxel size in mm along (i, j, k), all positive.
        class_label: A key of :data:`CLASS_NAMES`; ``None`` uses ``seed % 3``.

    Returns:
        The :class:`Phantom`.

    Raises:
        ValueError: If an argument is out of range.
    """
    seed = _check_int("seed", seed, 0)
    shape, spacing = _check_geometry(shape, spacing)
    if class_label is None:
        class_label = seed % 3
    elif isinstance(class_label, bool) or class_label not in CLASS_NAMES:
        raise ValueError(f"class_label must be one of {sorted(CLASS_NAMES)}, got {class_label!r}")
    rng = np.random.default_rng(seed)
    p = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in _RANGES.items()}
    lesions = rng.uniform([-0.5, -0.5, -0.6, 10, -20], [0.5, 0.5, 0.2, 22, 20], size=(6, 5))
    n_lesions = int(rng.integers(3, 7))

    # Patient coordinates (mm): x towards the patient's left, y posterior, z superior.
    sx, sy, sz = spacing
    ax = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    gx, gy = np.meshgrid(ax[0] - p["dx"], ax[1] - p["dy"], indexing="ij")
    cs, sn = math.cos(math.radians(p["rot"])), math.sin(math.radians(p["rot"]))
    x = (cs * gx + sn * gy)[:, :, None].astype(np.float32)
    y = (-sn * gx + cs * gy)[:, :, None].astype(np.float32)
    z = (ax[2] - p["dz"])[None, None, :].astype(np.float32)
    rho = np.sqrt(x**2 + y**2) + 1e-3
    ant, post = np.clip(-y / rho, 0, 1), np.clip(y / rho, 0, 1)
    zd, size = p["zd"], p["size"]

    # Diaphragm: two domes (right one higher), deeper posterior recesses; thorax above it.
    def dome(cx: float, top: float) -> np.ndarray:
        return top - 70 * (((x - cx) / 95) ** 2 + ((y + 5) / 85) ** 2) - 25 * post

    thorax = z > np.maximum(dome(-65, zd), dome(65, zd - 12))
    t = 1 / (1 + np.exp(-(z - zd + 20) / 25))  # 0 in the abdomen, 1 in the chest
    a_m = size * (125 + 5 * t)  # muscle outline semi-axes
    b_m = size * p["ap"] * (88 + 7 * t)
    pw = np.where(y > 0, np.float32(2.7), np.float32(2.1))  # flatter back
    fat = p["fat"] * (1 - 0.35 * t) * (1 + 0.4 * ant - 0.3 * post)
    body = _sup(x, y, a_m + fat, b_m + fat, pw) <= 1
    r_mus = _sup(x, y, a_m, b_m, pw)
    muscle = r_mus <= 1
    wall = 12 + 4 * t
    y_vb = b_m - 55  # vertebral body centre
    para = _sup(x, y - y_vb - 40, 62 - 12 * t, 38 - 6 * t, 2.5) <= 1  # paraspinal muscles
    cavity = (_sup(x, y, a_m - wall, b_m - wall, pw) <= 1) & ~para
    abdomen = cavity & ~thorax

    rng_tex = np.random.default_rng(rng.integers(2**63))
    tex = _noise(rng_tex, shape, spacing, 3.0)
    bowel_n = _noise(rng_tex, shape, spacing, 7.0)
    v1, v2 = _noise(rng_tex, shape, spacing, 5.0), _noise(rng_tex, shape, spacing, 5.0)
    vmax = np.maximum(np.abs(v1), np.abs(v2))

    img = np.full(shape, -1000.0, dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint8)

    def paint(m: np.ndarray, hu, amp: float = 0.0, label: int | None = None) -> None:
        m = np.broadcast_to(m, shape)
        img[m] = np.broadcast_to(hu + amp * tex, shape)[m]
        if label is not None:
            lab[m] = label

    paint(body, -100.0, 8)
    paint(muscle, 45.0, 6)
    # Abdomen: bowel loops (some gas) in visceral fat; thorax: mediastinal fat.
    bowel = (bowel_n > (p["visc"] - 0.5) * 2.6) & (y < y_vb - 25)  # retroperitoneum: fat
    paint(abdomen, np.where(bowel, 30.0, -95.0), 8)
    paint(abdomen & bowel & (v1 > 1.6), -900.0, 30)
    paint(cavity & thorax, -90.0, 8)
    hil = np.sqrt((np.abs(x) - 50) ** 2 + (y - y_vb + 30) ** 2)
    strength = np.clip(1 - vmax / (0.15 + 0.35 * np.exp(-hil / 40)), 0, 1)
    heart_r = _ell(x, y, z, (28, -0.35 * b_m, zd + 30), (54, 40, 50), 35)
    med = _sup(x - 6, y - y_vb + 50, 38, 60, 2.0) <= 1
    lungs = cavity & thorax & ~med & (heart_r > 1.25)
    paint(lungs, -860 + 50 * post + 900 * np.sqrt(strength), 25, 5)
    paint(thorax & cavity & (heart_r <= 1), np.where(heart_r < 0.7, 140.0, 45.0), 8)
    psoas = np.hypot(np.abs(x) - 30, y - y_vb + 2) < np.clip((zd - 110 - z) * 0.25 + 8, 0, 24)
    paint(abdomen & psoas, 45.0, 6)
    # Stomach with an air-fluid level (anterior air, patient supine) and a gallbladder.
    st = _ell(x, y, z, (45, -45, zd - 45), (45, 35, 45), 30)
    paint(abdomen & (st <= 1), np.where(st > 0.75, 40.0, 10.0), 5)
    paint(abdomen & (st <= 0.75) & (y < -45 - 18), -1000.0)
    # Liver (right lobe + left lobe), then spleen where not liver.
    lv = p["liver"]
    liver = (_ell(x, y, z, (-62, 0, zd - 55), (78 * lv, 82 * lv, 85 * lv)) <= 1) | (
        _ell(x, y, z, (12, -45, zd - 35), (55 * lv, 32 * lv, 40 * lv)) <= 1
    )
    liver &= abdomen
    paint(liver, p["liver_hu"] + 70 * np.clip(1 - vmax / 0.09, 0, 1), 6, 1)
    paint(abdomen & (_ell(x, y, z, (-35, -40, zd - 95), (15, 15, 30)) <= 1), 10.0, 3, 0)
    s = p["spleen"] * (p["big"] if class_label == 2 else 1.0)
    shift = (s / p["spleen"] - 1) / 0.6
    spl = _ell(x, y, z, (80 - 8 * shift, 28 - 30 * shift, zd - 55 - 36 * shift), (24 * s, 58 * s, 52 * s), 38)  # fmt: skip
    paint(abdomen & (spl <= 1) & (lab != 1), p["spleen_hu"], 5, 2)
    # Kidneys: lower poles lateral; cortex, medulla, hilar sinus fat.
    for side, label, cz in ((1, 3, zd - 120), (-1, 4, zd - 135 + p["kid_dz"])):
        kv = p["kidney"]
        cx = side * (72 + 0.25 * (cz - z))
        kr = _ell(x, y, z, (cx, y_vb + 10, cz), (27 * kv, 24 * kv, 55 * kv), side * 30)
        m = muscle & (kr <= 1) & ~para
        paint(m, np.where(kr > 0.5, 150.0, 30.0), 6, label)
        sinus = _ell(x, y, z, (cx - side * 14, y_vb + 2, cz), (12, 10, 25)) <= 1
        paint(m & sinus, -50.0, 10, 0)
    if class_label == 1:
        for dx, dy, dz, r, hu in lesions[:n_lesions]:
            c = (-62 + dx * 78 * lv, dy * 82 * lv, zd - 55 + dz * 85 * lv)
            paint((_ell(x, y, z, c, (r, r, r)) <= 1) & (lab == 1), hu, 5)
    # Vessels: aorta (label) and inferior vena cava (unlabelled, carves the liver).
    aorta = _ell(x, y, z, (14 + 16 * t, y_vb - 30 + 16 * t, 0), (11 * size, 11 * size, np.inf))
    paint(body & (aorta <= 1), p["aorta_hu"], 8, 7)
    ivc = _ell(x, y, z, (-24, y_vb - 24, 0), (13, 10, np.inf)) <= 1
    paint(body & ivc & (z < zd + 10), 110.0, 8, 0)

    # Bone: vertebral body (cortex, discs), canal, posterior elements, ribs, sternum.
    ct = max(3.0, 0.75 * min(sx, sy)) / 17
    vb = _sup(x, y - y_vb, 22, 17, 2.0)
    disc = np.mod(z - p["disc_ph"], 31) < 7
    paint((vb <= 1) & disc, 90.0, 6, 0)
    paint((vb <= 1) & ~disc, np.where(vb > 1 - ct, 1000.0, p["bone_hu"]), 25, 6)
    yc = y_vb + 27
    rc = np.sqrt(x**2 + (y - yc) ** 2)
    arch = ((rc <= 16) & (y >= yc - 3)) | (_ell(x, y, 0, (0, yc + 28, 0), (5, 16, np.inf)) <= 1)
    arch |= _ell(np.abs(x), y, 0, (28, yc + 2, 0), (16, 4, np.inf)) <= 1
    paint(muscle & arch & (rc > 9), 700.0, 30, 6)
    paint(rc <= 9, 15.0, 5, 0)
    depth = (1 - r_mus) * 0.5 * (a_m + b_m)
    drop = 100 * (1 - y / rho) / 2  # ribs slope down anteriorly
    ribs = (depth > 4) & (depth < 14) & (np.mod(z + drop - p["rib_ph"], 28) < 10)
    ribs &= (ant < 0.9) & ~((np.abs(x) < 30) & (y > 0)) & (z > zd - 80 + 60 * ant)
    paint(ribs, 650.0, 40, 6)
    stern = _ell(x, y, z, (0, -b_m + 9, 0), (16, 6, np.inf)) <= 1
    paint(stern & (z > zd - 25), 450.0, 30, 6)

    # Scanner: partial-volume blur, then in-plane-correlated noise.
    img = _blur(_blur(_blur(img, 0, 0.15), 1, 0.15), 2, 0.1)
    noise = rng_tex.standard_normal(shape, dtype=np.float32)
    img += _blur(_blur(noise, 0, 0.25), 1, 0.25) * (p["noise"] / 0.375)
    image = np.clip(np.rint(img), -1024, 3071).astype(np.int16)

    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [
        (shape[0] - 1) / 2 * sx + p["ox"],
        (shape[1] - 1) / 2 * sy + p["oy"],
        p["oz"],
    ]
    return Phantom(image=image, labels=lab, class_label=int(class_label), affine=affine)


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:

    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def write_demo_dataset(
    out_dir: str | Path,
    n: int = 16,
    shape: tuple[int, int, int] = (96, 96, 64),
    spacing: tuple[float, float, float] = (4.0, 4.0, 5.0),
    seed: int = 0,
) -> list[Path]:
    """Write ``n`` phantoms as NIfTI files plus ``classes.csv``.

    Layout: ``out_dir/images/ct_000.nii.gz`` (int16 HU), ``out_dir/labels/ct_000.nii.gz``
    (uint8 organ labels, same affine) and ``out_dir/classes.csv`` with the header
    ``id,path,label,label_name,segmentation`` (paths relative to ``out_dir``). Volume ``i``
    has class ``i % 3`` (balanced, also for any contiguous split) and a subject seed derived
    from ``(seed, i)``, so datasets written with different seeds do not share subjects. The
    in-plane spacing of each volume is ``spacing`` times a factor in 0.92..1.08 (as the
    reconstruction field of view varies on real scanners); the slice spacing is kept.
    Existing ``ct_*.nii.gz`` files in ``images/`` and ``labels/`` that are not part of the new
    dataset are deleted, so an older, larger dataset does not leak into it.

    Args:
        out_dir: Output folder, created if missing.
        n: Number of volumes, at least 1.
        shape: Array shape of every volume.
        spacing: Nominal voxel size in mm.
        seed: Non-negative dataset seed.

    Returns:
        The image paths, in order.

    Raises:
        ValueError: If an argument is out of range.
    """
    n = _check_int("n", n, 1)
    seed = _check_int("seed", seed, 0)
    shape, spacing = _check_geometry(shape, spacing)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for i in range(n):
        ss = np.random.SeedSequence([seed, i])
        sub_seed = int(ss.generate_state(1)[0])
        f = float(np.random.default_rng(ss.spawn(1)[0]).uniform(0.92, 1.08))
        sp = (spacing[0] * f, spacing[1] * f, spacing[2])
        ph = make_phantom(sub_seed, shape, sp, class_label=i % 3)
        name = f"ct_{i:03d}"
        _save_nifti(ph.image, ph.affine, out / "images" / f"{name}.nii.gz")
        _save_nifti(ph.labels, ph.affine, out / "labels" / f"{name}.nii.gz")
        paths.append(out / "images" / f"{name}.nii.gz")
        rows.append([name, f"images/{name}.nii.gz", ph.class_label, CLASS_NAMES[ph.class_label],
                     f"labels/{name}.nii.gz"])  # fmt: skip
    keep = {f"{r[0]}.nii.gz" for r in rows}
    for sub in ("images", "labels"):
        for old in (out / sub).iterdir():
            if re.fullmatch(r"ct_\d+\.nii\.gz", old.name) and old.name not in keep:
                old.unlink()
    with open(out / "classes.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["id", "path", "label", "label_name", "segmentation"])
        w.writerows(rows)
    return paths
