"""Random resized crop for 2D and 3D images: torchvision's RandomResizedCrop, generalised.

BYOL's main augmentation is a random crop of a random size and aspect ratio, resized to a
fixed shape. :class:`RandResizedCropd` does that for channel-first images of any spatial
dimension and records each view's crop box (``{key}_box``), so the location in the source
image of every output voxel is known.

>>> import torch
>>> from byol3d.crops import RandResizedCropd
>>> crop = RandResizedCropd(keys="image", roi_size=(32, 32, 32), scale=(0.2, 1.0))
>>> out = crop({"image": torch.rand(1, 64, 64, 48)})
>>> out["image"].shape, out["image_box"].shape
(torch.Size([1, 32, 32, 32]), (3, 2))
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable


def check_roi(roi_size: Sequence[int]) -> tuple[int, ...]:
    if isinstance(roi_size, (int, str)) or len(roi_size) not in (2, 3):
        raise ValueError(f"roi_size must be a sequence of 2 or 3 positive ints, got {roi_size!r}")
    if not all(
        isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r > 0 for r in roi_size
    ):
        raise ValueError(f"roi_size must hold positive ints, got {roi_size!r}")
    return tuple(int(r) for r in roi_size)


def check_range(
    name: str, value: Sequence[float], low: float = 0.0, high: float = math.inf, strict=True
):
    """A (min, max) pair with low (<) min <= max <= high; ValueError naming ``name`` otherwise."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (min, max), got {value!r}") from None
    if not (lo <= hi and (lo > low if strict else lo >= low) and hi <= high):
        bound = f"{low} <{'' if strict else '='} min <= max <= {high}"
        raise ValueError(f"{name} must satisfy {bound}, got {value!r}")
    return lo, hi


class RandResizedCropd(Randomizable, MapTransform):
    """torchvision's ``RandomResizedCrop`` for N-D (2D and 3D) channel-first images.

    Draws a box whose volume (area in 2D) is a fraction of the input's spatial extent
    uniform in ``scale``, with a random shape, at a random position inside the image; crops
    it and resizes it to ``roi_size`` (linear interpolation, ``align_corners=False``). The
    same box is used for every key. The crop can be smaller or larger than ``roi_size``,
    including when the whole image is smaller than ``roi_size`` (it is then upsampled).

    Box shape: in 2D, exactly torchvision (the ratio of the two sides is log-uniform in
    ``ratio``); in 3D, a log-factor per axis is drawn uniformly in ``log(ratio)`` and the
    factors are centred so their product is 1 (the volume stays as drawn). A box that does
    not fit the image (or rounds outside ``scale``) is redrawn, up to ``max_attempts`` times,
    then the whole image is taken, as torchvision does.

    The box is stored in the output under ``f"{key}_box"``: an int64 array of shape
    ``(spatial_dims, 2)`` holding ``[start, stop)`` per axis in input voxel coordinates
    (dense/local variants of BYOL need the overlap of the two views' boxes).

    The output is a float32 ``torch.Tensor`` of shape ``(C, *roi_size)`` without metadata:
    the input affine no longer describes it. The input is never modified.

    Args:
        keys: keys of the images to crop (same spatial shape).
        roi_size: output spatial size, e.g. ``(128, 128, 128)``.
        scale: range of the box volume as a fraction of the image volume; default
            ``(0.2, 1.0)`` (torchvision's default is (0.08, 1.0); 3D volumes hold less
            redundant context than photographs, so a larger lower bound is used).
        ratio: range of the aspect ratio; default ``(3/4, 4/3)``, torchvision's.
        mode: ``"linear"`` (bilinear/trilinear), ``"nearest"`` or ``"area"``.
        max_attempts: draws before falling back to the whole image (torchvision: 10).
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
        max_attempts: int = 10,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.roi_size = check_roi(roi_size)
        self.spatial_dims = len(self.roi_size)
        self.scale = check_range("scale", scale, 0.0, 1.0)
        self.ratio = check_range("ratio", ratio)
        if mode not in ("linear", "nearest", "area"):
            raise ValueError(f"mode must be one of 'linear', 'nearest', 'area', got {mode!r}")
        self.mode = mode
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts!r}")
        self.max_attempts = int(max_attempts)
        self.box: np.ndarray | None = None

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        """Draw ``self.box`` (``[start, stop)`` per axis) for an image of ``spatial_shape``."""
        shape = np.asarray(spatial_shape, dtype=np.int64)
        total = float(np.prod(shape))
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(self.max_attempts):
            fraction = self.R.uniform(*self.scale)
            if self.spatial_dims == 2:  # torchvision: one aspect ratio, split between the sides
                a = self.R.uniform(log_lo, log_hi)
                log_f = np.array([-a / 2, a / 2])
            else:
                log_f = self.R.uniform(log_lo, log_hi, size=self.spatial_dims)
                log_f -= log_f.mean()
            size = np.round((fraction * total) ** (1 / self.spatial_dims) * np.exp(log_f)).astype(
                np.int64
            )
            if np.all(size >= 1) and np.all(size <= shape):
                if self.scale[0] <= np.prod(size) / total <= self.scale[1]:
                    start = np.array(
                        [self.R.randint(0, s - c + 1) for s, c in zip(shape, size, strict=True)]
                    )
                    self.box = np.stack([start, start + size], axis=1).astype(np.int64)
                    return
        self.box = np.stack([np.zeros_like(shape), shape], axis=1).astype(np.int64)

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
        t = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        patch = t[(slice(None), *(slice(int(a), int(b)) for a, b in box))].float()
        if tuple(patch.shape[1:]) == self.roi_size:
            return patch.clone()  # never hand out a view of the input
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
