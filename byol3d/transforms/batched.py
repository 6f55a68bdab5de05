"""Batched views, CPU side: draw each view's box and parameters, slice the box, collate.

``transforms.views: batched`` splits BYOL's two views of a volume in two parts. Per sample,
in the DataLoader workers, :class:`BoxViewsd` only *draws*: the crop box (the distribution
of :class:`byol3d.transforms.crops.RandResizedCropd`, which it calls), the flips and the
90-degree turn (as :class:`~byol3d.transforms.geometry.RecordedRandFlipd` and
``RecordedRandRotate90d`` draw them), the gamma, the intensity scale and shift, the blur
sigmas and the noise std (as MONAI's ``RandAdjustContrastd``, ``RandScaleIntensityd`` +
``RandShiftIntensityd``, ``RandGaussianSmoothd`` and ``RandGaussianNoised`` in
:func:`byol3d.transforms.volume_views.view_transforms` draw them, with the same config keys), and
copies the box's region out of the preprocessed volume: a plain ``np.ndarray``, an ``np.memmap`` (only the box's pages are
read) or a torch tensor. No resampling, no filtering, no noise on the CPU.

:func:`collate_boxes` keeps the differently sized patches as a list (pinned by the
DataLoader with ``pin_memory``) and stacks the parameters. The device side,
:func:`byol3d.transforms.batched_ops.make_views`, then makes the whole batch's views at once
(one ``affine_grid``/``grid_sample`` per patch for crop-resize-flip-rot90, fused intensity
ops, per-sample separable blur, ``torch.randn`` noise) on the GPU, or on the CPU in the
workers (:class:`~byol3d.transforms.batched_ops.MakeViewsCollate`, the all-CPU fallback:
the same code).

2D frames (``data.spatial_dims: 2``) get the same split: :class:`FrameBoxViewsd` draws what
:func:`byol3d.transforms.frames.frame_views` draws (the box, the horizontal flip, the colour
jitter's coin, order and factors, grayscale, the blur sigma, solarize, with the same config
keys, by the same code) and slices the box out of the uint8 frame; ``make_views`` then crops,
resizes and flips, applies the colour ops batched (kornia) and normalises with
``transforms.mean/std``.

A sample after :class:`BoxViewsd` holds, per view ``v`` (``view1``, ``view2``):
``v_patch`` (C, *box size) in the source dtype, ``v_box`` (spatial_dims, 2) ``[start, stop)``, ``v_flip`` (spatial_dims,), ``v_rot90``
() - the records the dense term reads, as the CPU path writes them - and ``v_gamma`` (0: off),
``v_scale`` (1: off), ``v_shift``, ``v_sigma`` (spatial_dims,) (0: off), ``v_noise_std``
(0: off), ``v_noise_seed``.

>>> import torch
>>> draw = BoxViewsd(roi_size=(32, 32, 32))
>>> s = draw.set_random_state(seed=0)({"image": torch.rand(1, 60, 50, 40)})
>>> s["view1_patch"].ndim, s["view1_box"].shape, sorted(k for k in s if k.startswith("view2"))[:3]
(4, (3, 2), ['view2_box', 'view2_flip', 'view2_gamma'])
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable, Transform
from torch.utils.data import default_collate

from byol3d.checks import check_pair, non_negative, per_view
from byol3d.transforms.crops import RandResizedCropd, check_roi
from byol3d.transforms.frames import check_mean_std
from byol3d.transforms.photometric import (
    RandColorJitterd,
    RandGaussianBlurd,
    RandGrayscaled,
    RandSolarized,
)
from byol3d.transforms.volume_views import view_probabilities

__all__ = ["BoxViewsd", "FrameBoxViewsd", "ViewDraws", "collate_boxes", "slice_box", "PATCH_SUFFIX"]

#: The key suffix of the sliced regions (kept as a list by :func:`collate_boxes`).
PATCH_SUFFIX = "_patch"


def slice_box(image: Any, lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
    """A contiguous copy of ``image[:, lo0:hi0, lo1:hi1, ...]`` as a torch tensor, source dtype.

    ``image`` is channel-first: an ``np.ndarray``/``np.memmap`` (only the pages of the region
    are read), a ``torch.Tensor`` or a MONAI ``MetaTensor`` (its metadata is dropped). The copy
    never shares memory with the source (a cache or a store stays untouched).
    """
    index = (slice(None), *(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)))
    if isinstance(image, torch.Tensor):
        part = image.as_tensor() if hasattr(image, "as_tensor") else image
        if part.device.type != "cpu" or part.dtype == torch.bfloat16:
            return part[index].clone(memory_format=torch.contiguous_format)
        image = part.numpy()  # numpy's strided copy is about 3x torch's on one core
    return torch.from_numpy(np.array(np.asarray(image)[index], copy=True, order="C"))


class ViewDraws(Randomizable, Transform):
    """Two views' boxes and parameters drawn from one random stream; the boxes sliced out.

    The common part of :class:`BoxViewsd` (3D) and :class:`FrameBoxViewsd` (2D): the view
    keys, the :class:`RandResizedCropd` whose box distribution both use (it draws from this
    transform's ``R``), and ``__call__``. A subclass draws one view's parameters in
    :meth:`randomize`; what it returns goes into the sample as ``f"{view}_{name}"``.
    """

    def __init__(
        self,
        source_key: str,
        view_keys: Sequence[str],
        roi_size: Sequence[int],
        scale: Sequence[float],
        ratio: Sequence[float],
    ) -> None:
        self.roi_size = check_roi(roi_size)
        self.view_keys = [view_keys] if isinstance(view_keys, str) else list(view_keys)
        if (
            len(self.view_keys) != 2
            or len(set(self.view_keys)) != 2
            or source_key in self.view_keys
        ):
            raise ValueError(
                f"view_keys must be two distinct keys other than source_key {source_key!r}, got {view_keys!r}"
            )
        self.source_key = source_key
        self.crop = RandResizedCropd("_", roi_size=self.roi_size, scale=scale, ratio=ratio)

    def set_random_state(self, seed: int | None = None, state=None) -> ViewDraws:
        super().set_random_state(seed=seed, state=state)
        for part in self._shared_stream():  # one random stream: their draws are this transform's
            part.R = self.R
        return self

    def _shared_stream(self) -> list:
        """The transforms whose draws come from this one's ``R``."""
        return [self.crop]

    def randomize(self, spatial_shape: Sequence[int], view: int) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d.pop(self.source_key)
        shape = tuple(int(s) for s in image.shape[1:])
        if len(shape) != len(self.roi_size):
            raise ValueError(
                f"{type(self).__name__}: roi_size {self.roi_size} is {len(self.roi_size)}D but "
                f"{self.source_key!r} has channel-first shape {tuple(image.shape)}"
            )
        for i, key in enumerate(self.view_keys):
            params = self.randomize(shape, i)
            d[key + PATCH_SUFFIX] = slice_box(image, params["box"][:, 0], params["box"][:, 1])
            d.update({f"{key}_{name}": value for name, value in params.items()})
        return d


class BoxViewsd(ViewDraws):
    """Draw two views' boxes and augmentation parameters; slice the boxes out of the image.

    The arguments are those of :func:`byol3d.transforms.volume_views.view_transforms` (same names,
    defaults, checks and distributions). Per view: the box of
    :class:`RandResizedCropd` (``scale``, ``ratio``); a flip on each axis with
    ``flip_prob``; with ``rotate90_prob`` a turn by k in {1, 2, 3} quarter turns in the axial
    plane (else k = 0); with ``gamma_prob`` a gamma uniform in ``gamma``; with
    ``intensity_prob`` a scale ``1 + U(-intensity_scale, intensity_scale)`` and a shift
    ``U(-intensity_shift, intensity_shift)``; with ``blur_prob`` one sigma per axis uniform
    in ``blur_sigma``; with ``noise_prob`` a noise std uniform in ``[0, noise_std]`` and a
    seed for the device's ``torch.randn``.

    Args:
        source_key: the preprocessed image (removed from the output).
        view_keys: the two views' key prefixes.

    The patch is the box itself, no margin: the resize then clamps at the box's border as
    ``RandResizedCropd`` does, so both paths make the same view of the same box.
    """

    def __init__(
        self,
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
    ) -> None:
        super().__init__(source_key, view_keys, roi_size, scale, ratio)
        self.gamma = check_pair("gamma", gamma)
        self.blur_sigma = check_pair("blur_sigma", blur_sigma, strict=False)
        self.intensity_scale = non_negative("intensity_scale", intensity_scale)
        self.intensity_shift = non_negative("intensity_shift", intensity_shift)
        self.noise_std = non_negative("noise_std", noise_std)
        self.probs = view_probabilities(
            self.roi_size, flip_prob, rotate90_prob, intensity_prob, gamma_prob, noise_prob, blur_prob
        )  # fmt: skip
        self.set_random_state(seed=0)

    def randomize(self, spatial_shape: Sequence[int], view: int) -> dict[str, Any]:
        """One view's parameters (index ``view`` picks its probabilities) for an image shape."""
        p = {name: pair[view] for name, pair in self.probs.items()}
        dims, r = len(spatial_shape), self.R
        self.crop.randomize(spatial_shape)
        out: dict[str, Any] = {"box": self.crop.box.copy()}
        out["flip"] = (r.random_sample(dims) < p["flip_prob"]).astype(np.int64)
        rotate = r.random_sample() < p["rotate90_prob"]
        out["rot90"] = np.int64(r.randint(3) + 1 if rotate else 0)
        out["gamma"] = np.float32(r.uniform(*self.gamma) if r.random_sample() < p["gamma_prob"] else 0.0)  # fmt: skip
        jitter = r.random_sample() < p["intensity_prob"]
        s, o = self.intensity_scale, self.intensity_shift
        out["scale"] = np.float32(1.0 + r.uniform(-s, s) if jitter else 1.0)
        out["shift"] = np.float32(r.uniform(-o, o) if jitter else 0.0)
        blur = r.random_sample() < p["blur_prob"]
        sigma = r.uniform(*self.blur_sigma, size=dims) if blur else np.zeros(dims)
        out["sigma"] = sigma.astype(np.float32)
        noise = r.random_sample() < p["noise_prob"]
        out["noise_std"] = np.float32(r.uniform(0.0, self.noise_std) if noise else 0.0)
        out["noise_seed"] = np.int64(r.randint(2**31))
        return out


class FrameBoxViewsd(ViewDraws):
    """Draw two 2D views' boxes and colour parameters; slice the boxes out of the frame.

    The arguments are those of :func:`byol3d.transforms.frames.frame_views` (same names,
    defaults and checks), and so are the draws: per view the box of
    :class:`RandResizedCropd` (``scale``, ``ratio``), a horizontal flip (spatial axis 0) with
    ``flip_prob``, then the coin and parameters of the view's own
    :class:`~byol3d.transforms.photometric.RandColorJitterd` (the order of the four
    adjustments and their factors), ``RandGrayscaled``, ``RandGaussianBlurd`` (one sigma in
    ``blur_sigma``) and ``RandSolarized``, each drawn by that transform's own ``sample``
    (from this transform's random stream). The patch is the box of the preprocessed frame
    in its dtype (uint8: a quarter of float32 in pinned memory).

    A sample holds, per view ``v``: ``v_patch`` (C, *box size), ``v_box`` (2, 2), ``v_flip``
    (2,) (``[flipped, 0]``, as ``RecordedRandFlipd`` records it), ``v_rot90`` (0: frames are
    not turned), ``v_jitter`` (4,) float32 brightness, contrast, saturation and hue factors
    (``[1, 1, 1, 0]``: off), ``v_jitter_order`` (4,), ``v_grayscale`` and ``v_solarize``
    (0/1), ``v_sigma`` (2,) (the isotropic sigma on both axes; 0: off), and ``v_mean`` /
    ``v_std``, the normalisation (one value per channel, or one for all), so that a batch
    says everything :func:`~byol3d.transforms.batched_ops.make_views` needs.

    >>> draw = FrameBoxViewsd(roi_size=(32, 32))
    >>> s = draw({"image": torch.zeros(3, 48, 40, dtype=torch.uint8)})
    >>> s["view1_patch"].dtype, s["view2_box"].shape, s["view1_jitter"].shape
    (torch.uint8, (2, 2), (4,))
    """

    def __init__(
        self,
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
    ) -> None:
        if len(check_roi(roi_size)) != 2:
            raise ValueError(f"roi_size must be 2 sizes for frames, got {roi_size!r}")
        check_pair("scale", scale, 0.0, 1.0)
        super().__init__(source_key, view_keys, roi_size, scale, ratio)
        mean_t, std_t = check_mean_std(mean, std)
        self.mean, self.std = np.float32(mean_t), np.float32(std_t)
        self.flip_prob = per_view("flip_prob", flip_prob)
        probs = {name: per_view(name, value) for name, value in [
            ("colour_jitter_prob", colour_jitter_prob), ("grayscale_prob", grayscale_prob),
            ("blur_prob", blur_prob), ("solarize_prob", solarize_prob)]}  # fmt: skip
        jitter = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}  # fmt: skip
        self.ops = [
            {
                "jitter": RandColorJitterd("_", prob=probs["colour_jitter_prob"][v], **jitter),
                "grayscale": RandGrayscaled("_", prob=probs["grayscale_prob"][v]),
                "blur": RandGaussianBlurd("_", prob=probs["blur_prob"][v], sigma=blur_sigma),
                "solarize": RandSolarized("_", prob=probs["solarize_prob"][v]),
            }
            for v in (0, 1)
        ]
        self.set_random_state(seed=0)

    def _shared_stream(self) -> list:
        return [self.crop, *(op for ops in self.ops for op in ops.values())]

    def randomize(self, spatial_shape: Sequence[int], view: int) -> dict[str, Any]:
        """One view's parameters (index ``view`` picks its probabilities) for a frame shape."""
        ops = self.ops[view]
        self.crop.randomize(spatial_shape)
        out: dict[str, Any] = {"box": self.crop.box.copy()}
        out["flip"] = np.array([self.R.rand() < self.flip_prob[view], 0], dtype=np.int64)
        out["rot90"] = np.int64(0)
        jitter = ops["jitter"]
        fired = jitter.sample()
        out["jitter"] = np.float32(jitter.factors if fired else (1.0, 1.0, 1.0, 0.0))
        out["jitter_order"] = np.int64(jitter.order if fired else (0, 1, 2, 3))
        out["grayscale"] = np.int64(ops["grayscale"].sample())
        blur = ops["blur"]
        sigma = blur.sigma if blur.sample() else 0.0
        out["sigma"] = np.full(2, max(sigma, 0.0), dtype=np.float32)
        out["solarize"] = np.int64(ops["solarize"].sample())
        out["mean"], out["std"] = self.mean.copy(), self.std.copy()
        return out


def collate_boxes(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate :class:`BoxViewsd` samples: patches as a list per view, the rest stacked."""
    keys = samples[0].keys()
    return {
        k: [s[k] for s in samples] if k.endswith(PATCH_SUFFIX) else default_collate([s[k] for s in samples])
        for k in keys
    }  # fmt: skip
