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

from byol3d.data.phantom_anatomy import (
    Canvas,
    body_frame,
    paint_bone,
    paint_organs,
    paint_soft_tissue,
    scanner,
    smooth_noise,
)

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

    sx, sy, sz = spacing
    b = body_frame(shape, spacing, p)
    rng_tex = np.random.default_rng(rng.integers(2**63))
    tex = smooth_noise(rng_tex, shape, spacing, 3.0)
    bowel_n = smooth_noise(rng_tex, shape, spacing, 7.0)
    v1, v2 = smooth_noise(rng_tex, shape, spacing, 5.0), smooth_noise(rng_tex, shape, spacing, 5.0)
    vmax = np.maximum(np.abs(v1), np.abs(v2))
    canvas = Canvas(shape, tex)
    paint_soft_tissue(canvas, b, p, bowel_n, v1, vmax)
    paint_organs(canvas, b, p, class_label, lesions[:n_lesions], vmax)
    paint_bone(canvas, b, p, spacing)
    image = scanner(canvas.img, rng_tex, p["noise"])

    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [
        (shape[0] - 1) / 2 * sx + p["ox"],
        (shape[1] - 1) / 2 * sy + p["oy"],
        p["oz"],
    ]
    return Phantom(image=image, labels=canvas.lab, class_label=int(class_label), affine=affine)


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
