"""Random resized crop for 2D and 3D images: torchvision's RandomResizedCrop, generalised.

BYOL's main augmentation is a random crop of a random size and aspect ratio, resized to a
fixed shape. :class:`RandResizedCropd` does that for channel-first images of any spatial
dimension and records each view's crop box (``{key}_box``), so the location in the source
image of every output voxel is known. :class:`SpatialPadNoted` pads preprocessed volumes
smaller than the crop size (and says so).

>>> import torch
>>> from byol3d.transforms.crops import RandResizedCropd
>>> crop = RandResizedCropd(keys="image", roi_size=(32, 32, 32), scale=(0.2, 1.0))
>>> out = crop({"image": torch.rand(1, 64, 64, 48)})
>>> out["image"].shape, out["image_box"].shape
(torch.Size([1, 32, 32, 32]), (3, 2))
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, SpatialPad, SpatialPadd

from byol3d.checks import check_pair
from byol3d.data.readers import as_tensor, filename_of

logger = logging.getLogger("byol3d")


def check_roi(roi_size: Sequence[int]) -> tuple[int, ...]:
    if isinstance(roi_size, (int, str)) or len(roi_size) not in (2, 3):
        raise ValueError(f"roi_size must be a sequence of 2 or 3 positive ints, got {roi_size!r}")
    if not all(
        isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r > 0 for r in roi_size
    ):
        raise ValueError(f"roi_size must hold positive ints, got {roi_size!r}")
    return tuple(int(r) for r in roi_size)


_EPS = 1e-9  # relative slack when comparing side ratios computed in floating point


def _ratios_ok(size: Sequence[int], lo: float, hi: float) -> bool:
    """True when ``size[b] / size[a]`` lies in ``[lo, hi]`` for every pair of axes ``a < b``."""
    d = len(size)
    return all(
        lo * (1 - _EPS) <= size[b] / size[a] <= hi * (1 + _EPS)
        for a in range(d)
        for b in range(a + 1, d)
    )


def _shrink_to_ratios(size: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Shorten sides of an integer box (never lengthen) until its ratios lie in ``[lo, hi]``."""
    size = size.astype(np.int64).copy()
    d = len(size)
    changed = True
    while changed:
        changed = False
        for a in range(d):
            for b in range(a + 1, d):
                if size[b] > hi * size[a] * (1 + _EPS):
                    new = max(1, math.floor(hi * size[a] * (1 + _EPS)))
                    changed |= new < size[b]
                    size[b] = min(size[b], new)
                elif size[b] < lo * size[a] * (1 - _EPS):
                    new = max(1, math.floor(size[b] / lo * (1 + _EPS)))
                    changed |= new < size[a]
                    size[a] = min(size[a], new)
    return size


@functools.lru_cache(maxsize=256)
def _largest_box(shape: tuple[int, ...], lo: float, hi: float) -> tuple[int, ...]:
    """The sides of the largest box inside ``shape`` whose ratios lie in ``[lo, hi]``.

    In log sides ``x`` the ratio constraints are differences ``x_b - x_a`` in
    ``[log lo, log hi]`` (``a < b``) and the image bounds ``x_a <= log shape[a]``: the
    componentwise largest solution of such difference constraints is
    ``x_a = min_b (log shape[b] + D[b, a])``, D the shortest-path bounds on ``x_a - x_b``
    (Floyd-Warshall on ``spatial_dims`` nodes). Its sides are then floored to integers and
    shortened where rounding broke a ratio.
    """
    d = len(shape)
    bound = np.zeros((d, d))  # bound[a, b]: upper bound on x_b - x_a
    for a in range(d):
        for b in range(a + 1, d):
            bound[a, b], bound[b, a] = math.log(hi), -math.log(lo)
    for k in range(d):
        bound = np.minimum(bound, bound[:, [k]] + bound[[k], :])
    logs = np.log(np.asarray(shape, dtype=np.float64))
    x = np.min(logs[:, None] + bound, axis=0)
    size = np.clip(np.floor(np.exp(x) * (1 + _EPS)), 1, shape).astype(np.int64)
    return tuple(int(s) for s in _shrink_to_ratios(size, lo, hi))


class RandResizedCropd(Randomizable, MapTransform):
    """torchvision's ``RandomResizedCrop`` for N-D (2D and 3D) channel-first images.

    Draws a box with a random volume (area in 2D) and a random shape at a random position
    inside the image; crops it and resizes it to ``roi_size`` (linear interpolation,
    ``align_corners=False``). The same box is used for every key. The crop can be smaller or
    larger than ``roi_size``, including when the whole image is smaller than ``roi_size`` (it
    is then upsampled). Every box fits the image: nothing is redrawn into a fallback that
    squashes the whole image.

    Ratios: ``ratio`` bounds every aspect ratio of the box. With sides ``size[0..d-1]`` in the
    array's axis order, ``size[b] / size[a]`` lies in ``[ratio[0], ratio[1]]`` for every pair
    of axes ``a < b``: in 2D the one ratio ``size[1] / size[0]`` (width / height,
    torchvision's), in 3D the three ratios ``size[1] / size[0]``, ``size[2] / size[0]`` and
    ``size[2] / size[1]``. With the default ``(3/4, 4/3)`` (symmetric: ``lo = 1 / hi``) no
    side is more than 4/3 times another. The box's shape is drawn uniformly over the allowed
    shapes in log space: the log sides relative to axis 0, ``log(size[a] / size[0])``, are
    uniform in ``log(ratio)`` given that all pairwise ratios are in range (in 2D exactly
    torchvision's log-uniform aspect ratio). Resizing the box to ``roi_size`` then stretches
    each axis by at most the ratio range (relative to ``roi_size``'s own aspect).

    Volume: the box's fraction of the image volume is uniform in ``scale``, clipped to what
    the ratio range allows in this image: when even the largest box with ratios in range is
    smaller than ``scale[1]`` of the image (an elongated image, e.g. a 340x240x128 CT, whose
    largest such box is 170x170x128, 35% of it), the fraction is uniform in ``[scale[0],
    f_max]``, ``f_max`` that box's fraction; when ``f_max < scale[0]`` the box is that
    largest box, at a random position (torchvision falls back to the centre crop with the
    ratio clamped). The whole image is only taken when the image's own ratios are in range.
    For a drawn fraction, the shape is redrawn up to ``max_attempts`` times until the box
    (sides rounded to voxels) fits with its fraction and ratios in range; otherwise the
    largest box's shape scaled to that fraction is used, which fits by construction.

    The box is stored in the output under ``f"{key}_box"``: an int64 array of shape
    ``(spatial_dims, 2)`` holding ``[start, stop)`` per axis in input voxel coordinates
    (dense/local variants of BYOL need the overlap of the two views' boxes).

    The output is a float32 ``torch.Tensor`` of shape ``(C, *roi_size)`` without metadata:
    the input affine no longer describes it. The input is never modified. A NumPy input
    (such as a read-only ``np.memmap`` of :mod:`byol3d.data.store`) is sliced before it is
    converted, so only the box is read from it.

    Args:
        keys: keys of the images to crop (same spatial shape).
        roi_size: output spatial size, e.g. ``(128, 128, 128)``.
        scale: range of the box volume as a fraction of the image volume; default
            ``(0.2, 1.0)`` (torchvision's default is (0.08, 1.0); 3D volumes hold less
            redundant context than photographs, so a larger lower bound is used).
        ratio: range of every aspect ratio of the box (see above); default ``(3/4, 4/3)``,
            torchvision's. In 3D the range must admit three consistent ratios (it does
            whenever it contains 1).
        mode: ``"linear"`` (bilinear/trilinear), ``"nearest"`` or ``"area"``.
        max_attempts: shape draws for a drawn fraction before the largest box's shape is
            used (default 30).
        allow_missing_keys: do not raise if a key is missing.

    Example:
        >>> crop = RandResizedCropd("image", roi_size=(32, 32, 32))
        >>> out = crop({"image": torch.rand(1, 64, 48, 40)})
        >>> out["image"].shape, out["image_box"].shape
        (torch.Size([1, 32, 32, 32]), (3, 2))
    """

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: Sequence[int],
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        mode: str = "linear",
        max_attempts: int = 30,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.roi_size = check_roi(roi_size)
        self.spatial_dims = len(self.roi_size)
        self.scale = check_pair("scale", scale, 0.0, 1.0)
        self.ratio = check_pair("ratio", ratio)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        if self.spatial_dims == 3 and max(log_lo, 2 * log_lo) > min(log_hi, 2 * log_hi) + 1e-12:
            raise ValueError(
                f"ratio {ratio!r} admits no 3D box: size[1]/size[0], size[2]/size[1] and their "
                "product size[2]/size[0] cannot all lie in it"
            )
        if mode not in ("linear", "nearest", "area"):
            raise ValueError(f"mode must be one of 'linear', 'nearest', 'area', got {mode!r}")
        self.mode = mode
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts!r}")
        self.max_attempts = int(max_attempts)
        self.box: np.ndarray | None = None

    def _draw_log_shape(self) -> np.ndarray:
        """Log sides (mean 0) uniform over the shapes whose pairwise ratios are in range."""
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        d = self.spatial_dims
        for _ in range(100):  # rejection; accepts 3/4 of the draws for a range around 1
            logs = np.concatenate([[0.0], self.R.uniform(lo, hi, size=d - 1)])
            diffs = [logs[b] - logs[a] for a in range(d) for b in range(a + 1, d)]
            if all(lo - 1e-12 <= v <= hi + 1e-12 for v in diffs):
                break
        else:  # a narrow 3D range: the point of the allowed set nearest the cube
            q = min(max(0.0, max(lo, 2 * lo)), min(hi, 2 * hi))
            logs = np.array([0.0, q / 2, q])
        return logs - logs.mean()

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        """Draw ``self.box`` (``[start, stop)`` per axis) for an image of ``spatial_shape``."""
        shape = np.asarray(spatial_shape, dtype=np.int64)
        if shape.shape != (self.spatial_dims,) or np.any(shape < 1):
            raise ValueError(
                f"spatial_shape must hold {self.spatial_dims} positive sizes, got {spatial_shape!r}"
            )
        total = float(np.prod(shape))
        largest = np.array(_largest_box(tuple(int(s) for s in shape), *self.ratio))
        top = float(np.prod(largest)) / total
        hi = min(self.scale[1], top)
        lo = min(self.scale[0], hi)
        fraction = self.R.uniform(lo, hi)
        side = (fraction * total) ** (1 / self.spatial_dims)
        size = largest if lo == top else None  # only the largest box is allowed
        for _ in range(0 if size is not None else self.max_attempts):
            draw = np.round(side * np.exp(self._draw_log_shape())).astype(np.int64)
            frac = float(np.prod(draw)) / total
            if (
                np.all(draw >= 1)
                and np.all(draw <= shape)
                and lo * (1 - _EPS) <= frac <= hi * (1 + _EPS)
                and _ratios_ok(draw, *self.ratio)
            ):
                size = draw
                break
        if size is None:  # the largest box's shape scaled to the fraction: it fits
            scaled = np.round(largest * (fraction / top) ** (1 / self.spatial_dims))
            size = _shrink_to_ratios(np.clip(scaled, 1, largest), *self.ratio)
        start = np.array([self.R.randint(0, s - c + 1) for s, c in zip(shape, size, strict=True)])
        self.box = np.stack([start, start + size], axis=1).astype(np.int64)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        shape = tuple(d[keys[0]].shape[1:])
        if len(shape) != self.spatial_dims:
            raise ValueError(
                f"RandResizedCropd: roi_size {self.roi_size} is {self.spatial_dims}D but {keys[0]!r} has "
                f"channel-first shape {tuple(d[keys[0]].shape)}"
            )
        self.randomize(shape)
        box = self.box
        for key in keys:
            if tuple(d[key].shape[1:]) != shape:
                raise ValueError(
                    f"RandResizedCropd: {key!r} and {keys[0]!r} differ in spatial shape"
                )
            d[key] = self._crop_resize(d[key], box)
            d[f"{key}_box"] = box.copy()
        return d

    def _crop_resize(self, img: Any, box: np.ndarray) -> torch.Tensor:
        index = (slice(None), *(slice(int(a), int(b)) for a, b in box))
        if isinstance(img, np.ndarray):  # e.g. the store's read-only np.memmap: read the box only
            patch = torch.from_numpy(np.array(img[index], dtype=np.float32))
        else:
            patch = as_tensor(img)[index].float()
        if tuple(patch.shape[1:]) == self.roi_size:
            return (
                patch if isinstance(img, np.ndarray) else patch.clone()
            )  # never a view of the input
        if self.mode == "linear":
            mode, align = ("bilinear", "trilinear")[self.spatial_dims - 2], False
        else:
            mode, align = self.mode, None
        return F.interpolate(patch[None], size=self.roi_size, mode=mode, align_corners=align)[0]


class ShareItemsd(MapTransform):
    """Put the item under ``keys`` also under ``names``, by reference (no copy).

    The zero-copy counterpart of ``monai.transforms.CopyItemsd`` for pipelines whose next
    transform on each name never writes into its input, such as :class:`RandResizedCropd`
    (it returns a new tensor): BYOL's two views then start from the same source volume
    without deep-copying it (a copy of a 320x320x280 CT costs about 0.14 s per sample).

    >>> d = ShareItemsd("image", names=("view1", "view2"))({"image": torch.zeros(1, 4, 4, 4)})
    >>> d["view1"] is d["image"] is d["view2"]
    True
    """

    def __init__(
        self, keys: KeysCollection, names: Sequence[str], allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.names = [names] if isinstance(names, str) else list(names)
        if len(self.keys) != 1 or not self.names:
            raise ValueError(
                f"ShareItemsd takes one source key and at least one name, got {self.keys} and {names!r}"
            )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            for name in self.names:
                d[name] = d[key]
        return d


class SpatialPadNoted(SpatialPadd):
    """``SpatialPadd`` that logs (info) which files were smaller than ``spatial_size``.

    With ``fill_minimum`` the images of ``minimum_keys`` are padded with their own minimum
    (z-scored volumes, whose background lies below 0) instead of 0.
    """

    def __init__(self, keys, spatial_size, minimum_keys: Sequence[str] = ()) -> None:
        super().__init__(keys, spatial_size=spatial_size)
        self.minimum_keys = tuple(minimum_keys)

    def __call__(self, data, lazy=None):  # noqa: D102
        small = False
        for key in self.key_iterator(data):
            shape = tuple(data[key].shape[1:])
            size = tuple(self.padder.spatial_size)
            if any(s < r for s, r in zip(shape, size, strict=True)):
                small = True
                logger.info(
                    "%s (%s after preprocessing) is padded to %s",
                    filename_of(data[key], key),
                    shape,
                    size,
                )
        if not small or not self.minimum_keys:
            return super().__call__(data, lazy=lazy)
        d = dict(data)
        for key in self.key_iterator(d):
            value = float(d[key].min()) if key in self.minimum_keys else 0.0
            d[key] = SpatialPad(self.padder.spatial_size, value=value)(d[key])
        return d
