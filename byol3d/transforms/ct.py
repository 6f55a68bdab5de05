"""Transforms: deterministic CT preprocessing, then two independently augmented BYOL views.

The data pipeline is split where caching stops (MONAI caches everything before the first
random transform):

- :func:`ct_preprocess` - load, validate, reorient to RAS, resample, normalise the
  intensities (the CT window to [0, 1], or foreground percentiles or z-scores for MR:
  :mod:`byol3d.transforms.intensity`), crop to the foreground, pad to ``roi_size``.
  Deterministic, so its output can be cached.
- :func:`view_transforms` - copy the preprocessed image into ``view1`` and ``view2`` and
  augment each with its own random transforms (random resized crop, flips, 90 degree
  rotations, intensity jitter, gamma, blur, noise), as BYOL's two asymmetric views.

>>> from byol3d.transforms import ct_preprocess, view_transforms
>>> pre = ct_preprocess(roi_size=(96, 96, 96), pixdim=(1.5, 1.5, 2.0))
>>> views = view_transforms(roi_size=(96, 96, 96))
>>> batch_item = views(pre({"image": "ct.nii.gz"}))          # doctest: +SKIP
>>> batch_item["view1"].shape, batch_item["view1_box"].shape  # doctest: +SKIP
(torch.Size([1, 96, 96, 96]), (3, 2))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    Identityd,
    OneOf,
    Orientationd,
    RandAdjustContrastd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
)

from byol3d.checks import check_pair, non_negative, per_view
from byol3d.data.channels import StackChannelsd
from byol3d.data.readers import ValidateImaged, data_errors_unwrapped
from byol3d.transforms.crops import RandResizedCropd, ShareItemsd, SpatialPadNoted, check_roi
from byol3d.transforms.geometry import RecordedRandFlipd, RecordedRandRotate90d
from byol3d.transforms.intensity import NormalizeIntensityd, resolve_foreground

logger = logging.getLogger("byol3d")


class PreprocessCompose(Compose):
    """A ``Compose`` that raises a :class:`DataError` from its transforms unwrapped.

    Attributes:
        config: the arguments it was built with; :func:`byol3d.data.datasets.build_dataset` keys the
            on-disk cache to them, so changed preprocessing never reuses stale files.
    """

    def __init__(self, transforms: Sequence, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(transforms)
        self.config = dict(config or {})

    def __call__(self, input_, *args, **kwargs):  # noqa: D102 - same as Compose.__call__
        with data_errors_unwrapped():
            return super().__call__(input_, *args, **kwargs)


def _check_ct_arguments(
    dims, hu_window, pixdim, crop_foreground, foreground_hu, in_channels, hu_crop
):
    """:func:`ct_preprocess`'s argument checks; ``(low, high, pixdim as a tuple or None)``."""
    low, high = check_pair("hu_window", hu_window, -math.inf, strict=False)
    if not low < high:
        raise ValueError(f"hu_window must be (low, high) with low < high, got {hu_window!r}")
    if pixdim is not None:
        if isinstance(pixdim, (int, float, str)) or len(pixdim) != dims:
            raise ValueError(
                f"pixdim must hold {dims} spacings (one per axis of roi_size), got {pixdim!r}"
            )
        if not all(float(p) > 0 for p in pixdim):
            raise ValueError(f"pixdim must be positive spacings in mm, got {pixdim!r}")
        pixdim = tuple(float(p) for p in pixdim)
    if crop_foreground and hu_crop and not low < foreground_hu < high:
        raise ValueError(
            f"foreground_hu must lie inside hu_window {tuple(hu_window)}, got {foreground_hu!r}"
        )
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    return low, high, pixdim


def ct_preprocess(
    keys: KeysCollection = "image",
    roi_size: Sequence[int] = (128, 128, 128),
    hu_window: Sequence[float] = (-1000.0, 1000.0),
    pixdim: Sequence[float] | None = None,
    crop_foreground: bool = True,
    foreground_hu: float = -500.0,
    in_channels: int = 1,
    label_key: str | None = None,
    intensity: str = "ct_window",
    percentiles: Sequence[float] = (0.5, 99.5),
    foreground: str = "auto",
    channel_names: Sequence[str] | None = None,
    resample_channels: bool = False,
    dicom_series: str | None = None,
) -> PreprocessCompose:
    """The deterministic (cacheable) part of the 3D pipeline: a path in, a tensor out.

    Steps: load (:func:`byol3d.data.readers.image_loader`: NIfTI, NRRD, MetaImage, DICOM
    series; a list of files as channels: :class:`~byol3d.data.channels.StackChannelsd`) ->
    ``EnsureChannelFirstd`` -> :class:`ValidateImaged` -> ``Orientationd("RAS")``
    -> ``Spacingd(pixdim)`` if given -> :class:`~byol3d.transforms.intensity.NormalizeIntensityd`
    (``intensity``: the CT window mapping ``hu_window`` to [0, 1] with clipping, foreground
    percentiles or z-scores; a volume without foreground is an error naming it) ->
    ``CropForegroundd`` to the foreground's bounding box if ``crop_foreground`` ->
    ``SpatialPadd(roi_size)`` (smaller volumes are padded with 0, the bottom of the window
    or percentile range, or with a z-scored volume's minimum; logged at info level) -> float32.

    Args:
        keys: the data-dict key(s) holding the image path(s); rows look like
            ``{"image": "/data/ct/001.nii.gz"}``.
        roi_size: size of the views the network sees; volumes are padded to at least this
            size. Its length sets the spatial dimensions (2 or 3).
        hu_window: (low, high) Hounsfield units mapped to 0 and 1, values outside clipped.
            Default (-1000, 1000): air to dense bone, a generic window for pretraining.
        pixdim: target voxel spacing in mm, one value per spatial axis; None (default) keeps
            the native spacing. Resampling to a common spacing makes the random crops of
            different scans cover comparable anatomy.
        crop_foreground: crop to the bounding box of the body (HU > ``foreground_hu``) so the
            random crops are not wasted on air. Default True.
        foreground_hu: the HU threshold of the body (``foreground`` ``hu``); default -500
            (above lung's about -850, so only the air outside the patient is cut away).
        in_channels: expected number of channels; a file with another count is an error.
        label_key: also load a label map under this key (e.g. ``"label"`` for rows
            ``{"image": ..., "label": ...}``) and give it the same geometry: reoriented,
            resampled with nearest neighbour, cropped to the image's body box and padded
            with 0, returned as int64. The image path is unchanged by it, so evaluation
            with labels sees exactly the voxels pretraining saw.
        intensity: ``ct_window`` (default), ``percentile`` or ``zscore``; see
            :mod:`byol3d.transforms.intensity`.
        percentiles: ``(low, high)`` foreground percentiles of ``percentile``; default
            (0.5, 99.5).
        foreground: ``auto`` (``hu`` for ``ct_window``, else ``otsu``), ``hu``, ``otsu`` or
            ``nonzero``: the voxels the statistics and the crop use.
        channel_names: names of the channels of multi-sequence rows (``{"image": [t1, t2]}``,
            loaded by :class:`byol3d.data.channels.StackChannelsd`), for its messages.
        resample_channels: resample channels on another grid onto the first channel's
            instead of refusing the subject.
        dicom_series: the series of DICOM folders to read (a SeriesInstanceUID or part of a
            SeriesDescription); None: the largest (:mod:`byol3d.data.dicom`).

    Returns:
        A :class:`PreprocessCompose` (a ``monai.transforms.Compose``) whose output ``image``
        is a float32 ``MetaTensor`` of shape ``(in_channels, *spatial)`` (values in [0, 1]
        except with ``zscore``); a file that cannot be used raises :class:`DataError` naming it.
    """
    roi = check_roi(roi_size)
    dims = len(roi)
    rule = resolve_foreground(intensity, foreground)
    low, high, pixdim = _check_ct_arguments(dims, hu_window, pixdim, crop_foreground, foreground_hu, in_channels, hu_crop=intensity == "ct_window" and rule == "hu")  # fmt: skip
    key_list = [keys] if isinstance(keys, str) else list(keys)
    if label_key is not None and label_key in key_list:
        raise ValueError(f"label_key {label_key!r} must differ from the image keys {key_list}")
    labels = [label_key] if label_key is not None else []
    geometric = key_list + labels

    transforms: list = [
        StackChannelsd(
            geometric, names=channel_names, resample=resample_channels, dicom_series=dicom_series
        ),  # fmt: skip
        EnsureChannelFirstd(geometric),
        ValidateImaged(key_list, in_channels=in_channels, spatial_dims=dims),
        *([ValidateImaged(labels, in_channels=1, spatial_dims=dims)] if labels else []),
        Orientationd(geometric, axcodes="RAS"[:dims], labels=None),
    ]
    if pixdim is not None:
        modes = ["bilinear"] * len(key_list) + ["nearest"] * len(labels)
        transforms.append(Spacingd(geometric, pixdim=pixdim, mode=modes, dtype=np.float32))
    transforms += _intensity_and_foreground(key_list, geometric, intensity, (low, high), percentiles, rule, foreground_hu, crop_foreground)  # fmt: skip
    transforms += [
        SpatialPadNoted(
            geometric, spatial_size=roi, minimum_keys=key_list if intensity == "zscore" else ()
        ),  # fmt: skip
        EnsureTyped(key_list, dtype=torch.float32),
        *([EnsureTyped(labels, dtype=torch.int64)] if labels else []),
    ]
    config = _preprocess_config(key_list, roi, (low, high), pixdim, crop_foreground, foreground_hu, in_channels, intensity, percentiles, rule, resample_channels, dicom_series, label_key)  # fmt: skip
    return PreprocessCompose(transforms, config=config)


def _intensity_and_foreground(
    key_list, geometric, intensity, hu_window, percentiles, rule, foreground_hu, crop_foreground
) -> list:
    """:func:`ct_preprocess`'s intensity step and, with ``crop_foreground``, the crop to the
    foreground the first image key's normalisation found (its mask is then deleted)."""
    mask_key = "foreground_mask" if crop_foreground else None
    steps: list = [
        NormalizeIntensityd(
            key_list[0],
            mode=intensity,
            hu_window=hu_window,
            percentiles=percentiles,
            foreground=rule,
            foreground_hu=foreground_hu,
            mask_key=mask_key,
        )  # fmt: skip
    ]
    if len(key_list) > 1:
        steps.append(NormalizeIntensityd(key_list[1:], mode=intensity, hu_window=hu_window, percentiles=percentiles, foreground=rule, foreground_hu=foreground_hu))  # fmt: skip
    if crop_foreground:
        steps += [
            CropForegroundd(
                geometric,
                source_key=mask_key,
                allow_smaller=True,
                start_coord_key=None,
                end_coord_key=None,
            ),  # fmt: skip
            DeleteItemsd(mask_key),
        ]
    return steps


def _preprocess_config(
    key_list,
    roi,
    hu_window,
    pixdim,
    crop_foreground,
    foreground_hu,
    in_channels,
    intensity,
    percentiles,
    rule,
    resample_channels,
    dicom_series,
    label_key,
) -> dict[str, Any]:
    """:func:`ct_preprocess`'s checked arguments as :attr:`PreprocessCompose.config` records
    them (the on-disk cache's key); the optional ones only when set."""
    config = {
        "keys": key_list,
        "roi_size": list(roi),
        "hu_window": list(hu_window),
        "pixdim": None if pixdim is None else list(pixdim),
        "crop_foreground": bool(crop_foreground),
        "foreground_hu": float(foreground_hu),
        "in_channels": in_channels,
        "intensity": intensity,
        "percentiles": [float(p) for p in percentiles],
        "foreground": rule,
    }
    if resample_channels:
        config["resample_channels"] = True
    if dicom_series:
        config["dicom_series"] = dicom_series
    if label_key is not None:
        config["label_key"] = label_key
    return config


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
        source_key: key of the preprocessed image (output of :func:`ct_preprocess`).
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
    probs = _view_probabilities(
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


def _view_probabilities(
    roi, flip_prob, rotate90_prob, intensity_prob, gamma_prob, noise_prob, blur_prob
) -> dict[str, tuple[float, float]]:
    """:func:`view_transforms`' ``*_prob`` arguments as ``{name: (view1, view2)}``, checked
    (rotations need equal first two ``roi`` sizes)."""
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
