"""Transforms for 2D frames: deterministic preprocessing, then BYOL's two asymmetric RGB views.

Same split as the CT pipeline (:mod:`byol3d.transforms`), for ``data.spatial_dims: 2``:

- :func:`frame_preprocess` - load a frame as RGB (:class:`byol3d.data.frame_reader.FrameReader`:
  greyscale, palette, RGBA and 16-bit frames converted), check it, shrink its shorter side
  to ``frame_size``, keep it as uint8 (a quarter of float32's RAM in the cache).
- :func:`frame_views` - ``CopyItemsd`` into ``view1``/``view2``, then per view, as in BYOL
  (Grill et al. 2020, appendix B): random resized crop, horizontal flip, colour jitter,
  grayscale, Gaussian blur, solarize, and per-channel normalisation.
- :func:`compute_mean_std` (:mod:`byol3d.data.stats`) - the per-channel mean and std of a dataset
  for that normalisation (endoscopy colours are nothing like ImageNet's); ``byol3d stats``
  prints them.

>>> from byol3d.transforms.frames import frame_preprocess, frame_views
>>> pre, views = frame_preprocess(frame_size=256), frame_views(roi_size=(224, 224))
>>> item = views(pre({"image": "frame.png"}))                  # doctest: +SKIP
>>> item["view1"].shape, item["view1"].dtype                    # doctest: +SKIP
(torch.Size([3, 224, 224]), torch.float32)

The random colour operations (:mod:`byol3d.transforms.photometric`) draw their parameters from MONAI's
per-transform random state (``set_random_state`` seeds them, as it seeds every other view
transform) and apply kornia's implementations of torchvision's formulas, so a run is
reproducible the same way on the CT and the frame path.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CopyItemsd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
)

from byol3d.checks import check_number, check_pair, per_view
from byol3d.data.frame_reader import frame_loader, read_label_map
from byol3d.data.readers import ValidateImaged, as_tensor
from byol3d.errors import DataError
from byol3d.transforms.crops import RandResizedCropd, check_roi
from byol3d.transforms.ct import PreprocessCompose
from byol3d.transforms.geometry import RecordedRandFlipd
from byol3d.transforms.photometric import (
    RandColorJitterd,
    RandGaussianBlurd,
    RandGrayscaled,
    RandSolarized,
)


def short_side_size(shape: Sequence[int], size: int | None) -> tuple[int, ...]:
    """The spatial shape :class:`ShortSideResized` gives a frame of ``shape`` (None: unchanged)."""
    short = min(shape)
    if size is None or short <= size:
        return tuple(int(s) for s in shape)
    return tuple(max(1, round(s * size / short)) for s in shape)


class ShortSideResized(MapTransform):
    """Shrink a ``(C, W, H)`` image so its shorter side is ``size`` (aspect kept, antialiased).

    Images whose shorter side is already ``<= size`` pass unchanged (never upsampled: the
    random resized crop upsamples as needed). Output dtype is the input's (uint8 stays uint8).
    """

    def __init__(self, keys: KeysCollection, size: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.size = check_number("frame_size", size, 1, integer=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = as_tensor(d[key])
            new = short_side_size(img.shape[1:], self.size)
            if new == tuple(img.shape[1:]):
                continue
            out = torch.nn.functional.interpolate(
                img[None].float(), size=new, mode="bilinear", antialias=True, align_corners=False
            )[0]
            if not img.is_floating_point():
                out = out.round().clamp(0, 255)
            out = out.to(img.dtype)
            d[key] = MetaTensor(out, meta=d[key].meta) if isinstance(d[key], MetaTensor) else out
        return d


class LoadFrameLabelMapd(MapTransform):
    """Load ``label_key``'s 2D label map with the geometry of the preprocessed ``image_key``.

    The map (:func:`~byol3d.data.frame_reader.read_label_map`) must have the frame's original
    size; when :class:`ShortSideResized` shrank the frame, the map is shrunk to the same size
    with nearest-neighbour sampling (labels are never blended). Output: ``(1, W, H)`` int64.

    Raises:
        DataError: a map whose size cannot be the frame's (naming both files).
    """

    def __init__(self, label_key: str, image_key: str = "image", frame_size: int | None = None) -> None:  # fmt: skip
        super().__init__([label_key])
        self.label_key, self.image_key, self.frame_size = label_key, image_key, frame_size

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        path = d[self.label_key]
        label = torch.as_tensor(read_label_map(path))[None]
        want = tuple(d[self.image_key].shape[1:])
        if short_side_size(label.shape[1:], self.frame_size) != want:
            image = d[self.image_key].meta.get("filename_or_obj", self.image_key) if isinstance(d[self.image_key], MetaTensor) else self.image_key  # fmt: skip
            raise DataError(f"label map {str(path)!r} is {label.shape[1]}x{label.shape[2]} pixels, which does not match its image {str(image)!r} ({want[0]}x{want[1]} after preprocessing)")  # fmt: skip
        if tuple(label.shape[1:]) != want:
            label = torch.nn.functional.interpolate(label[None].float(), size=want, mode="nearest-exact")[0].long()  # fmt: skip
        d[self.label_key] = label
        return d


def frame_preprocess(
    keys: KeysCollection = "image", in_channels: int = 3, frame_size: int | None = None
) -> PreprocessCompose:
    """The deterministic (cacheable) part of the frame pipeline: a path in, a uint8 tensor out.

    Steps: :func:`byol3d.data.frame_reader.frame_loader` (PNG/JPEG/BMP/TIFF as ``in_channels`` 8-bit
    channels) -> ``EnsureChannelFirstd`` -> :class:`~byol3d.data.readers.ValidateImaged` (2D,
    ``in_channels``) -> :class:`ShortSideResized` to ``frame_size`` if given -> uint8.

    Args:
        keys: the data-dict key(s) holding the frame path(s).
        in_channels: 3 (RGB, the default) or 1 (greyscale frames).
        frame_size: shrink frames whose shorter side is longer than this (e.g. a 1920x1080
            frame to 455x256 with 256); None keeps the native size. A 1080p RGB frame takes
            6.2 MB in the cache, 0.35 MB at 256: set it for RAM caches of many frames.

    Returns:
        A :class:`~byol3d.transforms.PreprocessCompose`; ``image`` comes out as a uint8
        ``MetaTensor`` of shape ``(in_channels, W, H)`` (axis 1 horizontal, MONAI's PIL order).
    """
    key_list = [keys] if isinstance(keys, str) else list(keys)
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3 for 2D frames, got {in_channels!r}")
    transforms: list = [
        frame_loader(key_list, channels=in_channels),
        EnsureChannelFirstd(key_list),
        ValidateImaged(key_list, in_channels=in_channels, spatial_dims=2),
    ]
    if frame_size is not None:
        transforms.append(ShortSideResized(key_list, size=frame_size))
    transforms.append(EnsureTyped(key_list, dtype=torch.uint8))
    config = {"keys": key_list, "in_channels": in_channels, "frame_size": frame_size, "kind": "2d"}
    return PreprocessCompose(transforms, config=config)


class _ToUnitd(MapTransform):
    """uint8 0..255 (or float) -> float32 0..1 tensor without metadata."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = as_tensor(d[key])
            d[key] = img.float() / 255.0 if not img.is_floating_point() else img.float().clone()
        return d


#: The random ops of a view, in order, by name (what :func:`applied` reports).
VIEW_OPS = {
    "flip": RecordedRandFlipd,
    "colour_jitter": RandColorJitterd,
    "grayscale": RandGrayscaled,
    "blur": RandGaussianBlurd,
    "solarize": RandSolarized,
}


def frame_views(
    source_key: str = "image",
    view_keys: Sequence[str] = ("view1", "view2"),
    roi_size: Sequence[int] = (224, 224),
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    flip_prob: float | Sequence[float] = 0.5,
    colour_jitter_prob: float | Sequence[float] = 0.8,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    grayscale_prob: float | Sequence[float] = 0.2,
    blur_prob: float | Sequence[float] = (1.0, 0.1),
    blur_sigma: Sequence[float] = (0.1, 2.0),
    solarize_prob: float | Sequence[float] = (0.0, 0.2),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Compose:
    """BYOL's two views of one preprocessed frame, each augmented with its own random draws.

    ``CopyItemsd`` copies ``source_key`` into the two views, each view gets its own
    freshly built random transforms (as in :func:`byol3d.transforms.view_transforms`), in
    BYOL's order (Grill et al. 2020, table 6):

    1. to float in [0, 1]; :class:`~byol3d.transforms.crops.RandResizedCropd` to ``roi_size``
       (``scale`` is the area fraction, BYOL 0.08-1.0; the box is kept as ``"<view>_box"``);
    2. horizontal flip (``RecordedRandFlipd`` on spatial axis 0, the image's x, recorded as
       ``{view}_flip`` for the dense term) with ``flip_prob``;
    3. :class:`RandColorJitterd` with ``colour_jitter_prob`` (0.8; brightness 0.4,
       contrast 0.4, saturation 0.2, hue 0.1);
    4. :class:`RandGrayscaled` with ``grayscale_prob`` (0.2);
    5. :class:`RandGaussianBlurd`, sigma in ``blur_sigma`` pixels, with ``blur_prob``
       (1.0 for view 1, 0.1 for view 2);
    6. :class:`RandSolarized` at 0.5 with ``solarize_prob`` (0.0 for view 1, 0.2 for view 2);
    7. ``NormalizeIntensityd`` per channel: ``(x - mean) / std``.

    Every ``*_prob`` is one probability for both views or a pair ``[view1, view2]``.

    Args:
        mean, std: per-channel statistics of the [0, 1] frames (one value per channel, or one
            for all); None gives 0.5 and 0.5 (values in [-1, 1]). Measure them with
            :func:`compute_mean_std` or ``byol3d stats CONFIG``.

    Returns:
        A ``Compose`` whose output holds float32 ``(C, *roi_size)`` tensors under the view
        keys and their crop boxes; the source key is removed.
    """
    roi = check_roi(roi_size)
    if len(roi) != 2:
        raise ValueError(f"roi_size must be 2 sizes for frames, got {roi_size!r}")
    view_keys = list(view_keys)
    if len(view_keys) != 2 or len(set(view_keys)) != 2 or source_key in view_keys:
        raise ValueError(
            f"view_keys must be two distinct keys other than source_key {source_key!r}, got {view_keys!r}"
        )
    mean_t, std_t = check_mean_std(mean, std)
    check_pair("scale", scale, 0.0, 1.0)
    probs = {
        name: per_view(name, value)
        for name, value in [
            ("flip_prob", flip_prob),
            ("colour_jitter_prob", colour_jitter_prob),
            ("grayscale_prob", grayscale_prob),
            ("blur_prob", blur_prob),
            ("solarize_prob", solarize_prob),
        ]
    }
    jitter = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}

    def one_view(key: str, i: int) -> Compose:
        p = {name: pair[i] for name, pair in probs.items()}
        return Compose(
            [
                _ToUnitd(key),
                RandResizedCropd(key, roi_size=roi, scale=scale, ratio=ratio),
                RecordedRandFlipd(key, prob=p["flip_prob"], spatial_axis=0),
                RandColorJitterd(key, prob=p["colour_jitter_prob"], **jitter),
                RandGrayscaled(key, prob=p["grayscale_prob"]),
                RandGaussianBlurd(key, prob=p["blur_prob"], sigma=blur_sigma),
                RandSolarized(key, prob=p["solarize_prob"]),
                _normalise(key, mean_t, std_t),
            ]
        )

    return Compose(
        [
            CopyItemsd(source_key, times=2, names=view_keys),
            one_view(view_keys[0], 0),
            one_view(view_keys[1], 1),
            DeleteItemsd(source_key),
            EnsureTyped(view_keys, dtype=torch.float32, track_meta=False),
        ]
    )


def check_mean_std(
    mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[list[float], list[float]]:
    """The views' normalisation as lists (one value per channel, or one for all; None: 0.5).

    Raises:
        ValueError: a value that is not a list of numbers, an empty list, a std <= 0.
    """
    mean_t, std_t = _stats("mean", mean), _stats("std", std)
    if min(std_t) <= 0:
        raise ValueError(f"std must be positive, got {std!r}")
    return mean_t, std_t


def _stats(name: str, value: Sequence[float] | None) -> list[float]:
    if value is None:
        return [0.5]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of numbers, got {value!r}") from None
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def _normalise(key: str, mean: list[float], std: list[float]) -> NormalizeIntensityd:
    if len(mean) == len(std) == 1:  # one value for every channel
        return NormalizeIntensityd(key, subtrahend=mean[0], divisor=std[0])
    return NormalizeIntensityd(key, subtrahend=mean, divisor=std, channel_wise=True)


def frame_network_input(
    key: str = "image", mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Compose:
    """What every view ends with, without the augmentations: uint8 -> [0, 1] -> ``(x - mean) / std``.

    Evaluation, extraction and the kNN monitor apply it after :func:`frame_preprocess`, so a
    frozen 2D encoder sees inputs on the scale it was trained on (the views normalise inside
    :func:`frame_views`). ``mean``/``std`` as in :func:`frame_views`.
    """
    mean_t, std_t = check_mean_std(mean, std)
    return Compose([_ToUnitd(key), _normalise(key, mean_t, std_t)])


def applied(views: Compose) -> list[dict[str, bool]]:
    """Which random ops fired in the last call of a :func:`frame_views` pipeline, per view.

    >>> views = frame_views(roi_size=(32, 32))
    >>> _ = views({"image": torch.zeros(3, 40, 40, dtype=torch.uint8)})
    >>> sorted(applied(views)[0])
    ['blur', 'colour_jitter', 'flip', 'grayscale', 'solarize']
    """
    out = []
    for view in views.transforms[1:3]:
        ops = {}
        for t in view.transforms:
            for name, kind in VIEW_OPS.items():
                if isinstance(t, kind):
                    ops[name] = bool(t._do_transform)
        out.append(ops)
    return out


#: ``transforms.*`` keys of :func:`frame_views` that the 3D views do not take.
_FRAME_VIEW_ONLY = (
    "colour_jitter_prob",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "grayscale_prob",
    "solarize_prob",
    "mean",
    "std",
)

#: ``transforms.*`` config keys only the 2D path reads (the 3D views never see them).
FRAME_ONLY_KEYS = ("frame_size", *_FRAME_VIEW_ONLY)

#: ``transforms.*`` config keys :func:`frame_views` takes (by the same names).
VIEW_KEYS_2D = (
    "roi_size",
    "scale",
    "ratio",
    "flip_prob",
    "blur_prob",
    "blur_sigma",
    *_FRAME_VIEW_ONLY,
)


def build_frame_transforms(
    cfg: Mapping[str, Any], views: Callable[..., Any] | None = None
) -> tuple[PreprocessCompose, Any]:
    """The 2D preprocessing and views of a config (``data.spatial_dims: 2``).

    ``data.in_channels`` and ``transforms.frame_size`` go to :func:`frame_preprocess`,
    the keys of :data:`VIEW_KEYS_2D` to ``views`` (default :func:`frame_views`; with
    ``transforms.views: batched``, :class:`byol3d.transforms.batched.FrameBoxViewsd`, which
    takes the same keys); the 3D-only keys (``hu_window``, ``pixdim``, ``rotate90_prob``,
    ``intensity_*``, ``gamma*``, ``noise_*``, ...) are unused.

    ``cfg`` is a validated config (:func:`byol3d.config.validate_config` checks ``mean``
    and ``std`` against ``data.in_channels``).

    Raises:
        ValueError: a setting the transforms reject (:func:`byol3d.transforms.build_transforms`
            turns it into a ConfigError).
    """
    tf_cfg, channels = cfg["transforms"], cfg["data"]["in_channels"]
    preprocess = frame_preprocess(in_channels=channels, frame_size=tf_cfg.get("frame_size"))
    make = frame_views if views is None else views
    return preprocess, make(**{k: tf_cfg[k] for k in VIEW_KEYS_2D if k in tf_cfg})


def for_display(
    sample: Mapping[str, Any],
    image: Any,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    view_keys: Sequence[str] = ("view1", "view2"),
) -> dict[str, Any]:
    """A :func:`frame_views` sample in [0, 1] for drawing: the normalisation undone.

    Args:
        sample: the views' output (normalised float views).
        image: the preprocessed frame (uint8 0..255, or float in [0, 1]); added as ``"image"``.
        mean, std: the values the views were normalised with (None: 0.5).

    Returns:
        A copy of ``sample`` with ``view * std + mean`` clipped to [0, 1] under the view keys.
    """
    m = torch.tensor(_stats("mean", mean)).view(-1, 1, 1)
    s = torch.tensor(_stats("std", std)).view(-1, 1, 1)
    out = dict(sample)
    for key in view_keys:
        out[key] = (as_tensor(sample[key]).float() * s + m).clamp(0.0, 1.0)
    img = as_tensor(image)
    out["image"] = img.float() / 255.0 if not img.is_floating_point() else img.float()
    return out
