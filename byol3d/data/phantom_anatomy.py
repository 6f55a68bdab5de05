"""The anatomy of :func:`byol3d.data.synthetic_ct.make_phantom`, painted region by region.

:func:`body_frame` lays out the patient's coordinates and trunk masks for one subject's
parameters; :class:`Canvas` holds the HU image and the label map being painted;
:func:`paint_soft_tissue`, :func:`paint_organs` and :func:`paint_bone` paint, in that order
(later regions overwrite earlier ones); :func:`scanner` adds partial-volume blur and noise.
Lengths are in millimetres, so the anatomy does not depend on the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def smooth_noise(
    rng: np.random.Generator, shape: tuple, spacing: tuple, sigma_mm: float
) -> np.ndarray:
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


def blur3(a: np.ndarray, axis: int, w: float) -> np.ndarray:
    """Three-tap [w, 1-2w, w] blur along ``axis`` with edge padding."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (1, 1)
    p = np.pad(a, pad, mode="edge")
    n = a.shape[axis]
    take = [np.take(p, np.arange(o, o + n), axis=axis) for o in range(3)]
    return w * (take[0] + take[2]) + (1 - 2 * w) * take[1]


def ellipsoid(x, y, z, c, r, rot: float = 0.0) -> np.ndarray:
    """Squared normalised radius of an ellipsoid (centre ``c``, semi-axes ``r``, in-plane
    rotation ``rot`` degrees); an infinite z semi-axis gives a cylinder."""
    dx, dy = x - c[0], y - c[1]
    if rot:
        cs, sn = math.cos(math.radians(rot)), math.sin(math.radians(rot))
        dx, dy = cs * dx + sn * dy, -sn * dx + cs * dy
    return (dx / r[0]) ** 2 + (dy / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2


def superellipse(x, y, a, b, p) -> np.ndarray:
    """Normalised superellipse radius (``p`` = 2: ellipse; larger: boxier)."""
    return (np.abs(x / a) ** p + np.abs(y / b) ** p) ** (1.0 / p)


@dataclass
class Body:
    """One subject's coordinates (mm: x towards the patient's left, y posterior, z superior,
    broadcastable (i, j, 1) and (1, 1, k)) and trunk masks."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    rho: np.ndarray
    ant: np.ndarray
    post: np.ndarray
    zd: float
    size: float
    thorax: np.ndarray
    t: np.ndarray
    a_m: np.ndarray
    b_m: np.ndarray
    pw: np.ndarray
    body: np.ndarray
    r_mus: np.ndarray
    muscle: np.ndarray
    y_vb: np.ndarray
    para: np.ndarray
    cavity: np.ndarray
    abdomen: np.ndarray


def body_frame(shape: tuple[int, int, int], spacing: tuple[float, float, float], p: dict) -> Body:
    """The coordinates and trunk masks of a subject with parameters ``p``."""
    # Patient coordinates (mm): x towards the patient's left, y posterior, z superior.
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
    body = superellipse(x, y, a_m + fat, b_m + fat, pw) <= 1
    r_mus = superellipse(x, y, a_m, b_m, pw)
    muscle = r_mus <= 1
    wall = 12 + 4 * t
    y_vb = b_m - 55  # vertebral body centre
    para = superellipse(x, y - y_vb - 40, 62 - 12 * t, 38 - 6 * t, 2.5) <= 1  # paraspinal muscles
    cavity = (superellipse(x, y, a_m - wall, b_m - wall, pw) <= 1) & ~para
    abdomen = cavity & ~thorax
    return Body(
        x=x,
        y=y,
        z=z,
        rho=rho,
        ant=ant,
        post=post,
        zd=zd,
        size=size,
        thorax=thorax,
        t=t,
        a_m=a_m,
        b_m=b_m,
        pw=pw,
        body=body,
        r_mus=r_mus,
        muscle=muscle,
        y_vb=y_vb,
        para=para,
        cavity=cavity,
        abdomen=abdomen,
    )


class Canvas:
    """The HU image (air) and the label map (background) being painted, with the texture."""

    def __init__(self, shape: tuple[int, int, int], tex: np.ndarray) -> None:
        self.shape, self.tex = shape, tex
        self.img = np.full(shape, -1000.0, dtype=np.float32)
        self.lab = np.zeros(shape, dtype=np.uint8)

    def paint(self, m: np.ndarray, hu, amp: float = 0.0, label: int | None = None) -> None:
        """Set ``hu + amp * texture`` (and ``label``, if given) where ``m`` holds."""
        m = np.broadcast_to(m, self.shape)
        self.img[m] = np.broadcast_to(hu + amp * self.tex, self.shape)[m]
        if label is not None:
            self.lab[m] = label


def paint_soft_tissue(
    c: Canvas, b: Body, p: dict, bowel_n: np.ndarray, v1: np.ndarray, vmax: np.ndarray
) -> None:
    """Fat, muscle, bowel with gas, mediastinum, lungs with vessels, heart, psoas, stomach."""
    paint = c.paint
    x, y, z, post, zd, thorax = b.x, b.y, b.z, b.post, b.zd, b.thorax
    b_m, body, muscle, y_vb, cavity, abdomen = b.b_m, b.body, b.muscle, b.y_vb, b.cavity, b.abdomen
    paint(body, -100.0, 8)
    paint(muscle, 45.0, 6)
    # Abdomen: bowel loops (some gas) in visceral fat; thorax: mediastinal fat.
    bowel = (bowel_n > (p["visc"] - 0.5) * 2.6) & (y < y_vb - 25)  # retroperitoneum: fat
    paint(abdomen, np.where(bowel, 30.0, -95.0), 8)
    paint(abdomen & bowel & (v1 > 1.6), -900.0, 30)
    paint(cavity & thorax, -90.0, 8)
    hil = np.sqrt((np.abs(x) - 50) ** 2 + (y - y_vb + 30) ** 2)
    strength = np.clip(1 - vmax / (0.15 + 0.35 * np.exp(-hil / 40)), 0, 1)
    heart_r = ellipsoid(x, y, z, (28, -0.35 * b_m, zd + 30), (54, 40, 50), 35)
    med = superellipse(x - 6, y - y_vb + 50, 38, 60, 2.0) <= 1
    lungs = cavity & thorax & ~med & (heart_r > 1.25)
    paint(lungs, -860 + 50 * post + 900 * np.sqrt(strength), 25, 5)
    paint(thorax & cavity & (heart_r <= 1), np.where(heart_r < 0.7, 140.0, 45.0), 8)
    psoas = np.hypot(np.abs(x) - 30, y - y_vb + 2) < np.clip((zd - 110 - z) * 0.25 + 8, 0, 24)
    paint(abdomen & psoas, 45.0, 6)
    # Stomach with an air-fluid level (anterior air, patient supine) and a gallbladder.
    st = ellipsoid(x, y, z, (45, -45, zd - 45), (45, 35, 45), 30)
    paint(abdomen & (st <= 1), np.where(st > 0.75, 40.0, 10.0), 5)
    paint(abdomen & (st <= 0.75) & (y < -45 - 18), -1000.0)


def paint_organs(
    c: Canvas, b: Body, p: dict, class_label: int, lesions: np.ndarray, vmax: np.ndarray
) -> None:
    """Liver (with ``lesions`` for class 1), gallbladder, spleen (larger for class 2),
    kidneys, aorta and inferior vena cava."""
    paint, lab = c.paint, c.lab  # lab: painted in place, read to keep lesions in the liver
    x, y, z, zd, size, t = b.x, b.y, b.z, b.zd, b.size, b.t
    body, muscle, y_vb, para, abdomen = b.body, b.muscle, b.y_vb, b.para, b.abdomen
    # Liver (right lobe + left lobe), then spleen where not liver.
    lv = p["liver"]
    liver = (ellipsoid(x, y, z, (-62, 0, zd - 55), (78 * lv, 82 * lv, 85 * lv)) <= 1) | (
        ellipsoid(x, y, z, (12, -45, zd - 35), (55 * lv, 32 * lv, 40 * lv)) <= 1
    )
    liver &= abdomen
    paint(liver, p["liver_hu"] + 70 * np.clip(1 - vmax / 0.09, 0, 1), 6, 1)
    paint(abdomen & (ellipsoid(x, y, z, (-35, -40, zd - 95), (15, 15, 30)) <= 1), 10.0, 3, 0)
    s = p["spleen"] * (p["big"] if class_label == 2 else 1.0)
    shift = (s / p["spleen"] - 1) / 0.6
    spl = ellipsoid(x, y, z, (80 - 8 * shift, 28 - 30 * shift, zd - 55 - 36 * shift), (24 * s, 58 * s, 52 * s), 38)  # fmt: skip
    paint(abdomen & (spl <= 1) & (lab != 1), p["spleen_hu"], 5, 2)
    # Kidneys: lower poles lateral; cortex, medulla, hilar sinus fat.
    for side, label, cz in ((1, 3, zd - 120), (-1, 4, zd - 135 + p["kid_dz"])):
        kv = p["kidney"]
        cx = side * (72 + 0.25 * (cz - z))
        kr = ellipsoid(x, y, z, (cx, y_vb + 10, cz), (27 * kv, 24 * kv, 55 * kv), side * 30)
        m = muscle & (kr <= 1) & ~para
        paint(m, np.where(kr > 0.5, 150.0, 30.0), 6, label)
        sinus = ellipsoid(x, y, z, (cx - side * 14, y_vb + 2, cz), (12, 10, 25)) <= 1
        paint(m & sinus, -50.0, 10, 0)
    if class_label == 1:
        for dx, dy, dz, r, hu in lesions:
            c = (-62 + dx * 78 * lv, dy * 82 * lv, zd - 55 + dz * 85 * lv)
            paint((ellipsoid(x, y, z, c, (r, r, r)) <= 1) & (lab == 1), hu, 5)
    # Vessels: aorta (label) and inferior vena cava (unlabelled, carves the liver).
    aorta = ellipsoid(x, y, z, (14 + 16 * t, y_vb - 30 + 16 * t, 0), (11 * size, 11 * size, np.inf))
    paint(body & (aorta <= 1), p["aorta_hu"], 8, 7)
    ivc = ellipsoid(x, y, z, (-24, y_vb - 24, 0), (13, 10, np.inf)) <= 1
    paint(body & ivc & (z < zd + 10), 110.0, 8, 0)


def paint_bone(c: Canvas, b: Body, p: dict, spacing: tuple[float, float, float]) -> None:
    """Vertebral body (cortex, discs), spinal canal, posterior elements, ribs, sternum."""
    paint = c.paint
    x, y, z, rho, ant, zd = b.x, b.y, b.z, b.rho, b.ant, b.zd
    a_m, b_m, r_mus, muscle, y_vb = b.a_m, b.b_m, b.r_mus, b.muscle, b.y_vb
    # Bone: vertebral body (cortex, discs), canal, posterior elements, ribs, sternum.
    ct = max(3.0, 0.75 * min(spacing[:2])) / 17
    vb = superellipse(x, y - y_vb, 22, 17, 2.0)
    disc = np.mod(z - p["disc_ph"], 31) < 7
    paint((vb <= 1) & disc, 90.0, 6, 0)
    paint((vb <= 1) & ~disc, np.where(vb > 1 - ct, 1000.0, p["bone_hu"]), 25, 6)
    yc = y_vb + 27
    rc = np.sqrt(x**2 + (y - yc) ** 2)
    arch = ((rc <= 16) & (y >= yc - 3)) | (
        ellipsoid(x, y, 0, (0, yc + 28, 0), (5, 16, np.inf)) <= 1
    )
    arch |= ellipsoid(np.abs(x), y, 0, (28, yc + 2, 0), (16, 4, np.inf)) <= 1
    paint(muscle & arch & (rc > 9), 700.0, 30, 6)
    paint(rc <= 9, 15.0, 5, 0)
    depth = (1 - r_mus) * 0.5 * (a_m + b_m)
    drop = 100 * (1 - y / rho) / 2  # ribs slope down anteriorly
    ribs = (depth > 4) & (depth < 14) & (np.mod(z + drop - p["rib_ph"], 28) < 10)
    ribs &= (ant < 0.9) & ~((np.abs(x) < 30) & (y > 0)) & (z > zd - 80 + 60 * ant)
    paint(ribs, 650.0, 40, 6)
    stern = ellipsoid(x, y, z, (0, -b_m + 9, 0), (16, 6, np.inf)) <= 1
    paint(stern & (z > zd - 25), 450.0, 30, 6)


def scanner(img: np.ndarray, rng: np.random.Generator, noise_hu: float) -> np.ndarray:
    """Partial-volume blur, then in-plane-correlated noise; int16 HU clipped to the CT range."""
    img = blur3(blur3(blur3(img, 0, 0.15), 1, 0.15), 2, 0.1)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    img += blur3(blur3(noise, 0, 0.25), 1, 0.25) * (noise_hu / 0.375)
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16)
