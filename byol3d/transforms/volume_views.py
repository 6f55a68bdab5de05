"""Transforms: BYOL's two independently augmented views of a preprocessed volume.

:func:`view_transforms` takes what :func:`byol3d.transforms.ct.ct_preprocess` (or the store)
gives and makes ``view1`` and ``view2``, each with its own random draws, one sample at a time
(``transforms.views: cpu``). ``transforms.views: batched`` draws the same parameters with the
same distributions in :class:`byol3d.transforms.batched.BoxViewsd` and makes the views per
batch (:mod:`byol3d.transforms.batched_ops`).

>>> from byol3d.transforms.volume_views import view_transforms
>>> import torch
>>> out = view_transforms(roi_size=(16, 16, 16))({"image": torch.rand(1, 24, 24, 20)})
>>> out["view1"].shape, out["view2"].shape
(torch.Size([1, 16, 16, 16]), torch.Size([1, 16, 16, 16]))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureTyped,
    Identityd,
    OneOf,
    RandAdjustContrastd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from byol3d.checks import check_pair, non_negative, per_view
from byol3d.transforms.crops import RandResizedCropd, ShareItemsd, check_roi
from byol3d.transforms.geometry import RecordedRandFlipd, RecordedRandRotate90d


def view_transforms(
    source_key: str = "image",
    view_keys: Sequence[str] = ("view1", "view2"),
    roi_size: Sequence[int] = (128, 128, 128),
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    flip_prob: float | Sequence[float] = 0.5,
    rotate90_prob: float | Sequence[float] = 0.5,
    intensity_prob: float | Sequence[float] = 0.8,
    intensity_scale: float = 0.1,
    intensity_shift: float = 0.1,
    gamma_prob: float | Sequence[float] = 0.5,
    gamma: Sequence[float] = (0.7, 1.5),
    noise_prob: float | Sequence[float] = 0.2,
    noise_std: float = 0.03,
    blur_prob: float | Sequence[float] = (1.0, 0.1),
    blur_sigma: Sequence[float] = (0.5, 1.5),
) -> Compose:
    """BYOL's two views of one preprocessed image, each augmented with its own random draws.

    ``ShareItemsd`` puts ``source_key`` under the two ``view_keys`` (no copy: the random
    resized crop that starts each view never writes into its input); each view then gets
    freshly built random transforms of its own. (One random MONAI dict transform over two
    keys draws ONE random state for both, which would give the views the same flip, crop
    and blur: the bug this structure avoids.) In order, per view:

    1. :class:`RandResizedCropd` to ``roi_size`` (``scale``, ``ratio``) - BYOL's main
       augmentation; its box is kept under ``"<view>_box"``.
    2. ``RandFlipd`` on each spatial axis separately (``flip_prob`` each), recorded under
       ``"<view>_flip"`` (:class:`byol3d.transforms.geometry.RecordedRandFlipd`).
    3. ``RandRotate90d`` by 90/180/270 degrees in the axial plane (``spatial_axes=(0, 1)``,
       i.e. x-y after RAS orientation) with ``rotate90_prob``, recorded under ``"<view>_rot90"``
       (:class:`byol3d.transforms.geometry.RecordedRandRotate90d`). With the box, flips and turns known,
       every view voxel's source location is known (dense BYOL, :mod:`byol3d.models.dense`).
    4. ``RandAdjustContrastd`` gamma in ``gamma`` with ``gamma_prob`` (MONAI applies it to the
       min-max-normalised view, so it is well defined for any intensity range).
    5. Intensity jitter with ``intensity_prob`` - the paper's colour jitter (p=0.8): the
       intensities are scaled by ``1 + U(-intensity_scale, intensity_scale)`` and shifted by
       ``U(-intensity_shift, intensity_shift)``, both or neither.
    6. ``RandGaussianSmoothd`` with sigma in ``blur_sigma`` voxels drawn per axis, with
       ``blur_prob``.
    7. ``RandGaussianNoised`` with std drawn in [0, ``noise_std``], with ``noise_prob`` (last,
       so blur does not remove it).

    Finally the source key is deleted, so a sample holds only the views and their geometry,
    and the views become float32 ``torch.Tensor`` (no metadata): they collate with
    ``monai.data.list_data_collate`` into ``{"view1": [B, C, *roi_size], "view1_box":
    [B, spatial_dims, 2], "view1_flip": [B, spatial_dims], "view1_rot90": [B], ...}``.

    Every ``*_prob`` is one probability for both views or a pair ``[view1, view2]``. The
    defaults follow BYOL's asymmetric recipe where it transfers to CT: blur 1.0 for view 1
    and 0.1 for view 2 (Grill et al. 2020, table 6; the solarisation asymmetry has no CT
    counterpart); jitter 0.8 as in the paper; flips and rotations 0.5 since anatomy seen
    mirrored or rotated is still anatomy; gamma and noise mimic reconstruction kernels and
    dose. Intensity amplitudes are in the [0, 1] units of the windowed image (0.1 = 200 HU
    with the default window).

    Args:
        source_key: key of the preprocessed image (output of
            :func:`byol3d.transforms.ct.ct_preprocess`).
        view_keys: the two output keys.
        roi_size: spatial size of each view (2 or 3 ints); with rotations on, its first
            two sizes must match so rotated views keep the same shape.
        scale: range of the crop volume as a fraction of the image volume (not of a side:
            0.2 is a box of about 0.58 of each side in 3D).
        ratio: range of the crop's aspect ratios (see :class:`RandResizedCropd`).
        flip_prob, rotate90_prob, intensity_prob, gamma_prob, noise_prob, blur_prob:
            probabilities, each a float or a pair [view1, view2].
        intensity_scale, intensity_shift: jitter amplitudes (>= 0).
        gamma: (min, max) gamma exponent, > 0.
        noise_std: maximal noise standard deviation (>= 0).
        blur_sigma: (min, max) Gaussian sigma in voxels (>= 0).

    Returns:
        A ``Compose``: ``[ShareItemsd, Compose(view1 transforms), Compose(view2 transforms),
        DeleteItemsd, EnsureTyped]``. ``set_random_state(seed)`` on it seeds every view
        transform differently and reproducibly.
    """
    roi = check_roi(roi_size)
    view_keys = _check_view_keys(source_key, view_keys)
    scale, ratio = check_pair("scale", scale, 0.0, 1.0), check_pair("ratio", ratio)
    gamma = check_pair("gamma", gamma)
    blur_sigma = check_pair("blur_sigma", blur_sigma, strict=False)
    amounts = {
        "intensity_scale": non_negative("intensity_scale", intensity_scale),
        "intensity_shift": non_negative("intensity_shift", intensity_shift),
        "noise_std": non_negative("noise_std", noise_std),
    }
    probs = view_probabilities(
        roi, flip_prob, rotate90_prob, intensity_prob, gamma_prob, noise_prob, blur_prob
    )
    return Compose(
        [
            ShareItemsd(source_key, names=view_keys),  # no copy: the crop never writes its input
            _one_view(view_keys[0], 0, roi, scale, ratio, gamma, blur_sigma, amounts, probs),
            _one_view(view_keys[1], 1, roi, scale, ratio, gamma, blur_sigma, amounts, probs),
            DeleteItemsd(source_key),
            EnsureTyped(view_keys, dtype=torch.float32, track_meta=False),
        ]
    )


def _check_view_keys(source_key: str, view_keys: str | Sequence[str]) -> list[str]:
    """:func:`view_transforms`' two view keys as a list, checked."""
    view_keys = [view_keys] if isinstance(view_keys, str) else list(view_keys)
    if len(view_keys) != 2 or len(set(view_keys)) != 2 or source_key in view_keys:
        raise ValueError(
            f"view_keys must be two distinct keys other than source_key {source_key!r}, got {view_keys!r}"
        )
    return view_keys


def view_probabilities(
    roi, flip_prob, rotate90_prob, intensity_prob, gamma_prob, noise_prob, blur_prob
) -> dict[str, tuple[float, float]]:
    """The views' ``*_prob`` arguments as ``{name: (view1, view2)}``, checked (rotations need
    equal first two ``roi`` sizes): for :func:`view_transforms` and
    :class:`byol3d.transforms.batched.BoxViewsd` alike."""
    probs = {
        name: per_view(name, value)
        for name, value in [
            ("flip_prob", flip_prob),
            ("rotate90_prob", rotate90_prob),
            ("intensity_prob", intensity_prob),
            ("gamma_prob", gamma_prob),
            ("noise_prob", noise_prob),
            ("blur_prob", blur_prob),
        ]
    }
    if max(probs["rotate90_prob"]) > 0 and roi[0] != roi[1]:
        raise ValueError(
            f"roi_size {roi} must have equal first two sizes when rotate90_prob > 0 (rotating the "
            "axial plane swaps them), or set rotate90_prob=0"
        )
    return probs


def _one_view(key, i, roi, scale, ratio, gamma, blur_sigma, amounts, probs) -> Compose:
    """The random transforms of view ``i`` under ``key`` (steps 1-7 of :func:`view_transforms`),
    built afresh so that each view draws its own random state."""
    dims = len(roi)
    p = {name: pair[i] for name, pair in probs.items()}
    jitter = Compose(
        [
            RandScaleIntensityd(key, factors=amounts["intensity_scale"], prob=1.0),
            RandShiftIntensityd(key, offsets=amounts["intensity_shift"], prob=1.0),
        ]
    )
    return Compose(
        [
            RandResizedCropd(key, roi_size=roi, scale=scale, ratio=ratio),
            *(
                RecordedRandFlipd(key, prob=p["flip_prob"], spatial_axis=axis)
                for axis in range(dims)
            ),
            RecordedRandRotate90d(key, prob=p["rotate90_prob"], max_k=3, spatial_axes=(0, 1)),
            RandAdjustContrastd(key, prob=p["gamma_prob"], gamma=gamma),
            OneOf(
                [jitter, Identityd(key)],
                weights=[p["intensity_prob"], 1.0 - p["intensity_prob"]],
            ),
            RandGaussianSmoothd(
                key,
                sigma_x=blur_sigma,
                sigma_y=blur_sigma,
                sigma_z=blur_sigma,
                prob=p["blur_prob"],
            ),
            RandGaussianNoised(key, prob=p["noise_prob"], mean=0.0, std=amounts["noise_std"]),
        ]
    )
