"""View geometry: where each voxel of an augmented view came from in the source image.

Dense (local) BYOL compares the two views' feature maps at corresponding locations, so the
spatial transforms of a view must be known exactly. :class:`byol3d.transforms.crops.RandResizedCropd`
records its crop box (``{key}_box``); the two transforms here record the flips and the
90-degree rotations that follow it:

* :class:`RecordedRandFlipd` - MONAI's ``RandFlipd`` that also stores ``{key}_flip``, an int64
  array of shape ``(spatial_dims,)`` with 1 on each axis flipped an odd number of times;
* :class:`RecordedRandRotate90d` - MONAI's ``RandRotate90d`` that also stores ``{key}_rot90``,
  the number k in 0..3 of quarter turns applied in ``spatial_axes``.

Both draw exactly the same random numbers as the MONAI transforms they extend (so seeded
pipelines produce the same views as before) and their records collate into tensors
(``(B, spatial_dims)`` and ``(B,)``). :func:`byol3d.models.correspondence.source_to_view` maps
continuous source voxel coordinates into a view's normalised coordinates;
:func:`~byol3d.models.correspondence.overlap_points` samples a regular grid in the overlap of
two crop boxes. Coordinates are continuous voxel-edge coordinates: voxel i
of an axis spans [i, i + 1), its centre is i + 0.5; normalised coordinates are in [0, 1] over
the view (0 the first edge, 1 the last), i.e. ``grid_sample``'s ``align_corners=False``
convention after ``2 * u - 1``.

>>> import torch
>>> from byol3d.models.correspondence import source_to_view
>>> box = torch.tensor([[[10, 20], [0, 8]]])            # one 2D view: rows 10..19, columns 0..7
>>> source_to_view(torch.tensor([[[15.0, 2.0]]]), box, torch.tensor([[0, 1]]))
tensor([[[0.5000, 0.7500]]])
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.transforms import RandFlipd, RandRotate90d


def _spatial_dims(img: Any) -> int:
    return len(img.shape) - 1  # channel first


class RecordedRandFlipd(RandFlipd):
    """``monai.transforms.RandFlipd`` that records the flips it applied as ``{key}_flip``.

    The record is an int64 array of shape ``(spatial_dims,)``: entry a is 1 when spatial axis a
    has been flipped an odd number of times by the recorded flips so far (several instances, one
    per axis, update the same record). Same arguments and random draws as ``RandFlipd``.

    Example:
        >>> import torch
        >>> t = RecordedRandFlipd("img", prob=1.0, spatial_axis=1)
        >>> t({"img": torch.zeros(1, 4, 5, 6)})["img_flip"]
        array([0, 1, 0])
    """

    def __call__(
        self, data: Mapping[Hashable, Any], lazy: bool | None = None
    ) -> dict[Hashable, Any]:
        d = super().__call__(data, lazy=lazy)
        for key in self.key_iterator(d):
            dims = _spatial_dims(d[key])
            axes = self.flipper.spatial_axis
            axes = range(dims) if axes is None else ([axes] if isinstance(axes, int) else axes)
            record = np.array(d.get(f"{key}_flip", np.zeros(dims, dtype=np.int64)), dtype=np.int64)
            if self._do_transform:
                for axis in axes:
                    record[axis % dims] ^= 1
            d[f"{key}_flip"] = record
        return d


class RecordedRandRotate90d(RandRotate90d):
    """``monai.transforms.RandRotate90d`` that records the quarter turns as ``{key}_rot90``.

    The record is an int64 scalar k in 0..3: the image was rotated by ``torch.rot90(img, k,
    spatial_axes)`` (k = 0 when the transform did not fire). A second recorded rotation on the
    same key adds to k modulo 4 and must use the same ``spatial_axes``. Same arguments and random
    draws as ``RandRotate90d``; :func:`byol3d.models.correspondence.source_to_view` assumes ``spatial_axes=(0, 1)`` unless
    told otherwise.

    Example:
        >>> import torch
        >>> t = RecordedRandRotate90d("img", prob=1.0, max_k=1)
        >>> int(t({"img": torch.zeros(1, 4, 4, 6)})["img_rot90"])
        1
    """

    def __call__(
        self, data: Mapping[Hashable, Any], lazy: bool | None = None
    ) -> dict[Hashable, Any]:
        d = super().__call__(data, lazy=lazy)
        k = int(self._rand_k) if self._do_transform else 0
        for key in self.key_iterator(d):
            previous = int(d.get(f"{key}_rot90", 0))
            d[f"{key}_rot90"] = np.int64((previous + k) % 4)
        return d
