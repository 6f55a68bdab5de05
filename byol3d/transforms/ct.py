"""Transforms: the deterministic preprocessing of CT (and MR) volumes, before the views.

The data pipeline is split where caching stops (MONAI caches everything before the first
random transform):

- :func:`ct_preprocess` (here) - load, validate, reorient to RAS, resample, normalise the
  intensities (the CT window to [0, 1], or foreground percentiles or z-scores for MR:
  :mod:`byol3d.transforms.intensity`), crop to the foreground, pad to ``roi_size``.
  Deterministic, so its output can be cached.
- :func:`byol3d.transforms.volume_views.view_transforms` - copy the preprocessed image into
  ``view1`` and ``view2`` and augment each with its own random transforms (random resized
  crop, flips, 90 degree rotations, intensity jitter, gamma, blur, noise), as BYOL's two
  asymmetric views.

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
    Orientationd,
    Spacingd,
)

from byol3d.checks import check_pair
from byol3d.data.channels import StackChannelsd
from byol3d.data.readers import ValidateImaged, data_errors_unwrapped
from byol3d.transforms.crops import SpatialPadNoted, check_roi
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
    low, high, pixdim = _check_ct_arguments(
        dims, hu_window, pixdim, crop_foreground, foreground_hu, in_channels,
        hu_crop=intensity == "ct_window" and rule == "hu",
    )  # fmt: skip
    key_list, labels = _image_and_label_keys(keys, label_key)
    geometric = key_list + labels

    transforms = _load_and_resample(
        key_list, labels, dims, pixdim, in_channels, channel_names, resample_channels, dicom_series
    )
    transforms += _intensity_and_foreground(
        key_list, geometric, intensity, (low, high), percentiles, rule, foreground_hu, crop_foreground
    )  # fmt: skip
    transforms += [
        SpatialPadNoted(
            geometric, spatial_size=roi, minimum_keys=key_list if intensity == "zscore" else ()
        ),  # fmt: skip
        EnsureTyped(key_list, dtype=torch.float32),
        *([EnsureTyped(labels, dtype=torch.int64)] if labels else []),
    ]
    config = _preprocess_config(
        key_list, roi, (low, high), pixdim, crop_foreground, foreground_hu, in_channels,
        intensity, percentiles, rule, resample_channels, dicom_series, label_key,
    )  # fmt: skip
    return PreprocessCompose(transforms, config=config)


def _image_and_label_keys(keys: KeysCollection, label_key: str | None) -> tuple[list, list]:
    """The image keys as a list, and ``[label_key]`` (or ``[]``); a label key among the
    image keys is refused."""
    key_list = [keys] if isinstance(keys, str) else list(keys)
    if label_key is not None and label_key in key_list:
        raise ValueError(f"label_key {label_key!r} must differ from the image keys {key_list}")
    return key_list, [label_key] if label_key is not None else []


def _load_and_resample(
    key_list, labels, dims, pixdim, in_channels, channel_names, resample_channels, dicom_series
) -> list:
    """:func:`ct_preprocess`'s first steps: load (channels stacked), channel first, validate,
    reorient to RAS and, with ``pixdim``, resample (labels by nearest neighbour)."""
    geometric = key_list + labels
    steps: list = [
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
        steps.append(Spacingd(geometric, pixdim=pixdim, mode=modes, dtype=np.float32))
    return steps


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
        steps.append(
            NormalizeIntensityd(
                key_list[1:],
                mode=intensity,
                hu_window=hu_window,
                percentiles=percentiles,
                foreground=rule,
                foreground_hu=foreground_hu,
            )
        )
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
