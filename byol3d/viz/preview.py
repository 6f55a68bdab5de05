"""Pictures of what BYOL trains on: the two augmented views of a few images, side by side.

Self-supervised runs fail quietly when the augmentations are too strong (views that share
nothing) or too weak (views that are nearly identical). :func:`preview_views` runs the
configured preprocessing (:func:`byol3d.transforms.ct_preprocess`) and views
(:func:`byol3d.transforms.view_transforms`) on the first ``n`` images under ``data.root``
and draws one row per image:

- 3D: for each view, the axial, coronal and sagittal slice through the view's centre
  (6 panels a row);
- 2D: the preprocessed image, then its two views (3 panels a row).

Display convention (radiological, as CT is read). After ``Orientationd("RAS")`` array axis
0 increases towards the patient's Right, axis 1 towards Anterior, axis 2 towards Superior
(``nibabel.aff2axcodes(numpy.eye(4)) == ("R", "A", "S")``). Panels are drawn so that

- axial: the patient's left is on the image's right, anterior at the top;
- coronal: the patient's left is on the image's right, superior at the top;
- sagittal: anterior on the image's left, superior at the top.

The views are randomly flipped and rotated (``transforms.flip_prob``, ``rotate90_prob``),
so a single view may show anatomy mirrored: that is the augmentation, not the display.
Intensities are the windowed [0, 1] units the network sees, drawn with a fixed grey scale
(0 = bottom of ``hu_window``, 1 = top), so intensity jitter stays visible.

Matplotlib is used through ``matplotlib.figure.Figure`` and the Agg canvas only: no
display, no global backend switch, safe on servers and in DataLoader-free scripts.

>>> from byol3d.config import load_config
>>> from byol3d.viz.preview import preview_views
>>> cfg = load_config("configs/demo_ct.yaml", ["data.root=data/demo/images"])  # doctest: +SKIP
>>> preview_views(cfg, n=4, output="views.png")                              # doctest: +SKIP
PosixPath('views.png')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from byol3d.data.discovery import list_images
from byol3d.errors import ConfigError
from byol3d.transforms import build_transforms
from byol3d.transforms.batched import ViewDraws, collate_boxes
from byol3d.transforms.batched_ops import make_views
from byol3d.transforms.frames import for_display

#: The three planes of a 3D view, in column order.
PLANES = ("axial", "coronal", "sagittal")


_PANEL_INCHES = 2.2


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def display_slice(volume: Any, plane: str, index: int | None = None) -> np.ndarray:
    """The 2D array of one plane of a RAS volume, oriented as it is drawn (row 0 at the top).

    Args:
        volume: ``(C, X, Y, Z)`` or ``(X, Y, Z)`` array or tensor in RAS orientation (the
            output of :func:`~byol3d.transforms.ct_preprocess` or of the view transforms);
            the first channel is shown.
        plane: ``"axial"`` (slice along Z), ``"coronal"`` (along Y) or ``"sagittal"``
            (along X).
        index: the slice index along the plane's normal; default the centre.

    Returns:
        A ``(rows, columns)`` float32 array: axial ``(Y, X)`` with anterior in row 0 and the
        patient's left in the last column; coronal ``(Z, X)`` with superior in row 0 and the
        patient's left in the last column; sagittal ``(Z, Y)`` with superior in row 0 and
        anterior in column 0.

    >>> v = np.zeros((4, 5, 6))
    >>> v[0, 0, 0] = 1  # x = 0: the patient's far left; y = 0: posterior; z = 0: inferior
    >>> np.argwhere(display_slice(v, "axial", 0)).tolist()  # bottom row, right-most column
    [[4, 3]]
    """
    arr = _as_numpy(volume)
    if arr.ndim == 4:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"volume must be (C, X, Y, Z) or (X, Y, Z), got shape {arr.shape}")
    axis = {"sagittal": 0, "coronal": 1, "axial": 2}.get(plane)
    if axis is None:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    if index is None:
        index = arr.shape[axis] // 2
    cut = np.take(arr, index, axis=axis)  # (X, Y), (X, Z) or (Y, Z): (columns, rows) in RAS
    # rows: the second axis (A or S) increasing upwards; columns: the first axis (R or A)
    # decreasing left to right, i.e. patient's right / anterior on the image's left
    return np.ascontiguousarray(cut.T[::-1, ::-1])


def _frame(image: Any) -> np.ndarray:
    """A 2D ``(C, X, Y)`` or ``(X, Y)`` image as drawn: rows = Y, columns = X (no flip)."""
    arr = _as_numpy(image)
    if arr.ndim == 3:
        arr = arr[0] if arr.shape[0] != 3 else arr.transpose(1, 2, 0)  # RGB: keep colour
    if arr.ndim == 2:
        return np.ascontiguousarray(arr.T)
    if arr.ndim == 3:
        return np.ascontiguousarray(np.clip(arr.transpose(1, 0, 2), 0.0, 1.0))
    raise ValueError(f"a 2D image must be (C, X, Y) or (X, Y), got shape {arr.shape}")


def view_panels(
    sample: Mapping[str, Any], view_keys: Sequence[str] = ("view1", "view2")
) -> list[tuple[str, np.ndarray]]:
    """The panels of one row of the preview: ``(column title, 2D array as drawn)`` pairs.

    3D views (``(C, X, Y, Z)`` tensors) give, per view, the axial, coronal and sagittal
    slices through the view's centre (:func:`display_slice`). 2D views (``(C, X, Y)``) give
    one panel each, preceded by the sample's ``"image"`` if it holds one.
    """
    missing = [k for k in view_keys if k not in sample]
    if missing:
        raise KeyError(f"sample has no {missing} (keys: {sorted(sample)})")
    first = _as_numpy(sample[view_keys[0]])
    if first.ndim == 4:
        return [
            (f"view {i} {plane}", display_slice(sample[key], plane))
            for i, key in enumerate(view_keys, start=1)
            for plane in PLANES
        ]
    if first.ndim == 3:
        panels = [("image", _frame(sample["image"]))] if "image" in sample else []
        return panels + [(f"view {i}", _frame(sample[k])) for i, k in enumerate(view_keys, 1)]
    raise ValueError(f"views must be (C, X, Y, Z) or (C, X, Y) tensors, got shape {first.shape}")


def draw_views(
    volumes: Sequence[Mapping[str, Any]],
    title: str,
    row_labels: Sequence[str] | None = None,
    view_keys: Sequence[str] = ("view1", "view2"),
    value_range: tuple[float, float] = (0.0, 1.0),
):
    """Draw the preview grid: one row per sample, columns from :func:`view_panels`.

    Args:
        volumes: samples holding the two views (``view1``/``view2`` tensors, 2D or 3D, in
            [0, 1] window units), e.g. the output of ``view_transforms(...)(preprocessed)``.
        title: the figure title (:func:`preview_views` puts the HU window and roi_size here).
        row_labels: one label per row (e.g. file names), drawn left of each row.
        value_range: the intensities drawn black and white (z-scored volumes: (-2, 3)).
        view_keys: the keys of the two views.

    Returns:
        A ``matplotlib.figure.Figure`` on an Agg canvas; ``fig.savefig(path)`` writes it.
        ``fig.byol3d_panels`` holds the drawn arrays, ``[[(title, array), ...], ...]`` per
        row, for tests and notebooks.
    """

    if not volumes:
        raise ValueError("volumes is empty: nothing to draw")
    rows = [view_panels(v, view_keys) for v in volumes]
    ncols = max(len(r) for r in rows)
    fig = Figure(
        figsize=(_PANEL_INCHES * ncols + 0.6, _PANEL_INCHES * len(rows) + 0.9),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(len(rows), ncols, squeeze=False))
    image = None
    for r, panels in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels):
                ax.set_axis_off()
                continue
            name, arr = panels[c]
            image = ax.imshow(arr, cmap="gray", vmin=value_range[0], vmax=value_range[1], interpolation="nearest")  # fmt: skip
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=8)
    fig.suptitle(title, fontsize=11)
    if image is not None:
        units = "window units, 0..1" if value_range == (0.0, 1.0) else "z-score"
        fig.colorbar(image, ax=axes, shrink=0.6, label=f"intensity ({units})")
    fig.byol3d_panels = rows
    return fig


def preview_views(
    cfg: Mapping[str, Any],
    n: int = 4,
    output: str | Path = "views.png",
    seed: int = 0,
    dpi: int = 100,
) -> Path:
    """Write a PNG of the two BYOL views of the first ``n`` images under ``cfg["data"]["root"]``.

    See :func:`views_figure` for what is drawn; this saves it to ``output`` (folder created)
    and returns that path.
    """
    fig = views_figure(cfg, n=n, seed=seed)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def views_figure(cfg: Mapping[str, Any], n: int = 4, seed: int = 0):
    """The preview figure of the first ``n`` images under ``cfg["data"]["root"]``.

    The images go through the configured preprocessing and view transforms exactly as in
    ``byol3d pretrain`` (same config keys, see ``byol3d.training.pretrain``), with the views' random
    state set from ``seed``, so the same call draws the same picture.

    Args:
        cfg: a config from :func:`byol3d.config.load_config`.
        n: number of images (rows), at least 1; fewer if the folder holds fewer.
        seed: random state of the augmentations.

    Returns:
        The ``Figure`` of :func:`draw_views` (a 3D row is about 13 x 2.2 inches; at the
        default 100 dpi a PNG about 1380 x 230*n+90 pixels); ``fig.byol3d_panels`` holds
        the drawn arrays.

    Raises:
        ConfigError: if ``data.root`` is unset or a transforms key is invalid.
        DataError: if the folder holds no image or an image cannot be read.
    """

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    data_cfg, tf_cfg = cfg["data"], cfg["transforms"]
    if not data_cfg.get("root") and not data_cfg.get("csv"):
        raise ConfigError("data.root is not set: give the data folder, e.g. data.root=/data/ct")
    roi = list(tf_cfg["roi_size"])
    preprocess, views = build_transforms(cfg)  # exactly as byol3d pretrain builds them
    views.set_random_state(seed=seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # for any transform drawing from torch's generator
    try:
        files = list_images(
            data_cfg["root"],
            csv=data_cfg.get("csv"),
            spatial_dims=data_cfg["spatial_dims"],
            dicom=data_cfg.get("dicom", True),
            channels=data_cfg.get("channels"),
            channel_patterns=data_cfg.get("channel_patterns"),
        )[:n]
        samples = []
        for path in files:
            image = preprocess({"image": path})
            sample = views(dict(image))
            if isinstance(views, ViewDraws):  # transforms.views batched: a batch of one
                made = make_views(collate_boxes([sample]), roi, "cpu")
                sample = {k: v[0] for k, v in made.items()}
            if data_cfg["spatial_dims"] == 2:  # frames: undo the normalisation for display
                sample = for_display(sample, image["image"], tf_cfg["mean"], tf_cfg["std"])
            samples.append(sample)
    finally:
        torch.random.set_rng_state(torch_state)
    if data_cfg["spatial_dims"] == 2:
        title = (
            f"BYOL views: roi_size {roi}, normalisation undone for display (RGB 0..1); seed {seed}"
        )
        return draw_views(samples, title, row_labels=[Path(p).name for p in files])
    files = [p[0] if isinstance(p, list) else p for p in files]  # a subject: its first channel
    low, high = tf_cfg["hu_window"]
    spacing = f", pixdim {list(tf_cfg['pixdim'])} mm" if tf_cfg.get("pixdim") else ""
    rule = tf_cfg.get("intensity", "ct_window")
    scale = {
        "ct_window": f"HU window [{low:g}, {high:g}]",
        "percentile": f"foreground percentiles {list(tf_cfg['percentiles'])}",
        "zscore": "foreground z-scores",
    }[rule]
    grey = "grey 0..1 = window" if rule != "zscore" else "grey -2..3 = z-score"
    title = f"BYOL views: {scale}, roi_size {roi}{spacing}; {grey}; seed {seed}"
    if len(roi) == 3:
        title += "\naxial/coronal: patient's left on the right; views may be flipped/rotated"
    shown = (-2.0, 3.0) if rule == "zscore" else (0.0, 1.0)
    return draw_views(samples, title, row_labels=[Path(p).name for p in files], value_range=shown)
