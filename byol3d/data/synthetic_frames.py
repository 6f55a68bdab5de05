"""Synthetic endoscopy-like RGB frames with frame-level classes, for demos and tests.

Each frame imitates what an endoscope sees: pink-red tissue with a smooth random texture and
darker vessels, a few specular highlights (small saturated white blobs), and the dark
circular vignette of the scope's optics. Three classes make visible differences, so a linear
probe of pretrained features has something to find:

- 0 ``tissue``: tissue only;
- 1 ``instrument``: a grey metallic shaft entering from the frame's edge (with a highlight);
- 2 ``bleeding``: a dark-red pool of blood on the tissue.

Frames are grouped into "videos": frames of one video share the tissue's colour and
texture (drifting slowly), as consecutive frames of a real video do.

>>> from byol3d.data.synthetic_frames import endoscopy_frame
>>> frame = endoscopy_frame(size=(96, 80), label=1, seed=0)
>>> frame.shape, frame.dtype
((80, 96, 3), dtype('uint8'))

``byol3d demo-data data/demo_endoscopy --kind endoscopy`` writes a dataset
(:func:`write_endoscopy_dataset`).
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

#: Class names by label.
CLASS_NAMES = ("tissue", "instrument", "bleeding")
#: Pixel labels of the label maps (``labels/``), for the frozen dense probe.
MASK_NAMES = ("background", "instrument", "blood")


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1] of shape (h, w): ``cells`` x ``cells`` noise, bicubic."""
    small = (rng.random((cells, cells)) * 255).astype(np.uint8)
    big = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    return np.asarray(big, dtype=np.float32) / 255.0


def endoscopy_frame(
    size: tuple[int, int] = (128, 112),
    label: int = 0,
    seed: int = 0,
    video_seed: int | None = None,
    t: float = 0.0,
    with_mask: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One synthetic frame, ``(height, width, 3)`` uint8 RGB (and its label map).

    Args:
        size: ``(width, height)`` in pixels, each at least 16.
        label: 0 tissue, 1 instrument, 2 bleeding (:data:`CLASS_NAMES`).
        seed: the frame's own randomness (highlights, instrument, blood, noise).
        video_seed: the randomness shared by a video (tissue colour and texture); default
            ``seed``.
        t: position in the video in [0, 1]: the shared texture drifts with it.
        with_mask: also return the ``(height, width)`` uint8 label map of the frame's pixels
            (:data:`MASK_NAMES`: 1 where the instrument is drawn, 2 where the blood pool is more
            than half opaque, 0 elsewhere); the frame itself is the same either way.
    """
    width, height = (int(s) for s in size)
    if min(width, height) < 16:
        raise ValueError(f"size must be at least (16, 16), got {size!r}")
    if label not in range(len(CLASS_NAMES)):
        raise ValueError(f"label must be one of 0..{len(CLASS_NAMES) - 1}, got {label!r}")
    rng = np.random.default_rng(seed)
    vrng = np.random.default_rng(seed if video_seed is None else video_seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    mask = np.zeros((height, width), dtype=np.uint8)

    # tissue: a pink-red base, a slow texture and dark-red vessels
    base = np.array([0.78, 0.36, 0.34]) + vrng.normal(0, 0.04, 3)
    pad = 8
    tex = _smooth_noise(vrng, height + 2 * pad, width + 2 * pad, 6)
    dy, dx = int(round(t * pad)), int(round(t * pad * 0.7))
    texture = tex[pad + dy - pad // 2 : pad + dy - pad // 2 + height, dx : dx + width]
    vessels = _smooth_noise(vrng, height, width, 9)
    vessel = np.exp(-(((vessels - 0.5) / 0.03) ** 2))  # thin ridges along a level line
    shade = 0.75 + 0.35 * texture
    img = base[None, None, :] * shade[..., None]
    img = img * (1 - 0.45 * vessel[..., None] * np.array([0.4, 1.0, 1.0]))

    if label == 2:  # bleeding: a dark-red pool with a soft edge
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        r = rng.uniform(0.15, 0.28) * min(width, height)
        wobble = 1 + 0.25 * (_smooth_noise(rng, height, width, 4) - 0.5)
        dist = np.hypot(yy - cy, xx - cx) / (r * wobble)
        pool = np.clip((1.2 - dist) / 0.4, 0, 1)[..., None]
        img = img * (1 - pool) + np.array([0.42, 0.03, 0.05]) * pool
        mask[pool[..., 0] > 0.5] = 2

    if label == 1:  # instrument: a grey bar from an edge towards the centre
        angle = rng.uniform(0, 2 * np.pi)
        ux, uy = np.cos(angle), np.sin(angle)
        cx, cy = width / 2 + rng.uniform(-0.1, 0.1) * width, height / 2
        along = (xx - cx) * ux + (yy - cy) * uy  # > 0 towards the entry edge
        across = -(xx - cx) * uy + (yy - cy) * ux
        half = rng.uniform(0.06, 0.1) * min(width, height)
        bar = (np.abs(across) < half) & (along > -rng.uniform(0.0, 0.15) * min(width, height))
        metal = 0.55 + 0.25 * (1 - np.abs(across) / half)  # a cylinder's shading
        gleam = np.exp(-(((across + 0.4 * half) / (0.2 * half)) ** 2)) * 0.4
        grey = np.clip(metal + gleam, 0, 1)[..., None] * np.array([0.92, 0.94, 1.0])
        img = np.where(bar[..., None], grey, img)
        mask[bar] = 1

    # specular highlights: small, saturated, white
    for _ in range(rng.integers(2, 6)):
        hy, hx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
        hr = rng.uniform(0.01, 0.03) * min(width, height) + 0.8
        spot = np.exp(-((np.hypot(yy - hy, xx - hx) / hr) ** 2))[..., None]
        img = img * (1 - spot) + spot

    # the scope's circular vignette: dark outside the field of view, fading towards its rim
    radius = 0.5 * min(width, height) * 1.08
    rim = np.hypot(yy - height / 2, xx - width / 2) / radius
    img = img * np.clip((1.0 - rim) / 0.25, 0, 1)[..., None] ** 0.7
    img = img + rng.normal(0, 0.012, img.shape)
    frame = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return (frame, mask) if with_mask else frame


def write_endoscopy_dataset(
    out_dir: str | Path,
    n: int = 48,
    videos: int = 4,
    size: tuple[int, int] = (128, 112),
    seed: int = 0,
) -> list[Path]:
    """Write ``n`` frames in ``videos`` video folders as PNG, their label maps, and ``frames.csv``.

    Layout: ``out_dir/images/video_00/frame_000.png`` ..., the label map of each frame
    (uint8 PNG, :data:`MASK_NAMES`) at ``out_dir/labels/video_00/frame_000.png``, and
    ``out_dir/frames.csv`` with the header ``id,path,label,label_name,segmentation`` (paths
    relative to ``out_dir``): the CSV ``data.csv`` reads (``byol3d pretrain ...
    data.csv=OUT/frames.csv data.root=OUT``) and ``byol3d evaluate RUN --segmentation
    OUT/frames.csv`` pairs.
    Frame ``i`` is in video ``i % videos`` and has class ``(i // videos) % 3``, so classes
    are balanced within and across videos. Re-writing replaces ``out_dir/images`` and
    ``out_dir/labels``.

    Args:
        out_dir: output folder, created if missing.
        n: number of frames (>= 1).
        videos: number of video folders (1..n).
        size: ``(width, height)`` of each frame.
        seed: randomness of the whole dataset.

    Returns:
        The frame paths, in frame order.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(videos, bool) or not isinstance(videos, int) or not 1 <= videos <= n:
        raise ValueError(f"videos must be an int in [1, n={n}], got {videos!r}")
    out = Path(out_dir)
    images, labels = out / "images", out / "labels"
    for folder in (images, labels):
        if folder.is_dir() and all(re.fullmatch(r"video_\d+", p.name) for p in folder.iterdir()):
            shutil.rmtree(folder)  # an older, larger dataset must not leak into this one
    per_video = -(-n // videos)
    paths, rows = [], []
    for i in range(n):
        v, k = i % videos, i // videos
        label = k % len(CLASS_NAMES)
        frame, mask = endoscopy_frame(
            size=size,
            label=label,
            seed=seed * 1_000_003 + i,
            video_seed=seed * 1_000_003 + 500_000 + v,
            t=k / max(per_video - 1, 1),
            with_mask=True,
        )
        path = images / f"video_{v:02d}" / f"frame_{k:03d}.png"
        mask_path = labels / path.relative_to(images)
        for folder in (path.parent, mask_path.parent):
            folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(path)
        Image.fromarray(mask).save(mask_path)
        paths.append(path)
        rows.append(
            [
                f"video_{v:02d}_frame_{k:03d}",
                path.relative_to(out).as_posix(),
                label,
                CLASS_NAMES[label],
                mask_path.relative_to(out).as_posix(),
            ]
        )
    with open(out / "frames.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["id", "path", "label", "label_name", "segmentation"])
        w.writerows(rows)
    return paths
