"""Random photometric operations of BYOL's 2D views, as MONAI dictionary transforms.

MONAI has no hue, saturation, grayscale or solarize transform; these four (and an isotropic
Gaussian blur) follow torchvision's ``ColorJitter``, ``RandomGrayscale``, ``GaussianBlur``
and ``RandomSolarize``, which BYOL's recipe is written in (Grill et al. 2020, table 6).
Their parameters are drawn from MONAI's per-transform random state (``self.R``), so
``set_random_state`` on the view pipeline seeds them like every other view transform (the
engine's ``Reseed`` and MONAI's DataLoader worker seeding both rely on that). The pixel
maths is kornia's (``kornia.enhance``, ``kornia.color``: torchvision's formulas in pure
PyTorch) and MONAI's separable Gaussian filter.

Images are ``(C, W, H)`` float tensors in [0, 1]; every transform fires with probability
``prob`` and records it in ``_do_transform`` (what :func:`byol3d.transforms.frames.applied`
reports).

>>> import torch
>>> from byol3d.transforms.photometric import RandColorJitterd
>>> jitter = RandColorJitterd("image", prob=1.0)
>>> jitter = jitter.set_random_state(seed=0)  # returns the transform itself
>>> out = jitter({"image": torch.rand(3, 8, 8)})
>>> out["image"].shape
torch.Size([3, 8, 8])
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from kornia.color import rgb_to_grayscale
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
    solarize,
)
from monai.config import KeysCollection
from monai.networks.layers import gaussian_1d, separable_filtering
from monai.transforms import MapTransform, RandomizableTransform

from byol3d.checks import check_number, check_pair, non_negative
from byol3d.data.readers import as_tensor


class _RandOpd(RandomizableTransform, MapTransform):
    """A random op on ``(C, W, H)`` float images in [0, 1], applied with probability ``prob``."""

    def __init__(self, keys: KeysCollection, prob: float) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)

    def draw(self) -> None:
        """Draw the op's parameters after the coin flip (only when it fires)."""

    def apply(self, img: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self) -> bool:
        """Draw what one call draws: the coin flip, then the op's parameters if it fires.

        Returns whether it fired.

        :class:`byol3d.transforms.batched.FrameBoxViewsd` calls it to draw a view's
        parameters exactly as this transform draws them, leaving the pixels to the device.
        """
        self.randomize(None)
        if self._do_transform:
            self.draw()
        return bool(self._do_transform)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self.sample():
            return d
        for key in self.key_iterator(d):
            d[key] = self.apply(as_tensor(d[key]))
        return d


class RandColorJitterd(_RandOpd):
    """torchvision's ``ColorJitter`` (random order of the four adjustments), with ``prob``.

    Factors: brightness and contrast and saturation in ``[1 - x, 1 + x]``, hue in
    ``[-hue, hue]`` (a fraction of the colour circle, hue <= 0.5). Brightness multiplies,
    contrast blends with the grey mean, saturation with the grey image, hue rotates in HSV
    (kornia's implementations of torchvision's formulas). On 1-channel images saturation and
    hue do nothing. Results are clamped to [0, 1].
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
    ) -> None:
        super().__init__(keys, prob)
        self.amounts = {
            "brightness": non_negative("brightness", brightness),
            "contrast": non_negative("contrast", contrast),
            "saturation": non_negative("saturation", saturation),
            "hue": float(check_number("hue", hue, 0.0, 0.5)),
        }
        self.order: list[int] = [0, 1, 2, 3]
        self.factors: list[float] = [1.0, 1.0, 1.0, 0.0]

    def draw(self) -> None:
        b, c, s, h = (self.amounts[k] for k in ("brightness", "contrast", "saturation", "hue"))
        self.order = [int(i) for i in self.R.permutation(4)]
        self.factors = [
            self.R.uniform(max(0.0, 1 - b), 1 + b),
            self.R.uniform(max(0.0, 1 - c), 1 + c),
            self.R.uniform(max(0.0, 1 - s), 1 + s),
            self.R.uniform(-h, h),
        ]

    def apply(self, img: torch.Tensor) -> torch.Tensor:
        rgb = img.shape[0] == 3
        for i in self.order:
            f = self.factors[i]
            if i == 0 and f != 1.0:
                img = adjust_brightness_accumulative(img, f)
            elif i == 1 and f != 1.0:
                img = adjust_contrast_with_mean_subtraction(img, f)
            elif i == 2 and f != 1.0 and rgb:
                img = adjust_saturation_with_gray_subtraction(img, f)
            elif i == 3 and f != 0.0 and rgb:
                img = adjust_hue(img, f * 2 * np.pi)
        return img.clamp(0.0, 1.0)


class RandGrayscaled(_RandOpd):
    """RGB -> ITU-R 601 luma, copied to the 3 channels (torchvision ``RandomGrayscale``)."""

    def apply(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[0] != 3:
            return img
        return rgb_to_grayscale(img).expand(3, *img.shape[1:]).clone()


class RandGaussianBlurd(_RandOpd):
    """Isotropic Gaussian blur with one sigma drawn uniformly in ``sigma`` (pixels), with ``prob``.

    BYOL draws one sigma in [0.1, 2.0] for a 224-pixel view. The filter is MONAI's separable
    Gaussian (``gaussian_1d``, truncated at 4 sigma) with reflected borders, as torchvision
    pads, so a blurred view gets no dark frame that would tell it apart from the other.
    """

    def __init__(self, keys: KeysCollection, prob: float, sigma: Sequence[float] = (0.1, 2.0)):
        super().__init__(keys, prob)
        self.sigma_range = check_pair("blur_sigma", sigma, strict=False)
        self.sigma = self.sigma_range[0]

    def draw(self) -> None:
        self.sigma = float(self.R.uniform(*self.sigma_range))

    def apply(self, img: torch.Tensor) -> torch.Tensor:
        if self.sigma <= 0:
            return img
        kernel = gaussian_1d(torch.tensor(self.sigma), truncated=4.0).to(img)
        radius = (kernel.numel() - 1) // 2
        if radius >= min(img.shape[1:]):  # reflection needs a border narrower than the image
            kernel = gaussian_1d(
                torch.tensor(self.sigma), truncated=(min(img.shape[1:]) - 1) / self.sigma
            ).to(img)
        return separable_filtering(img[None], [kernel, kernel], mode="reflect")[0]


#: BYOL's solarization threshold on [0, 1] images (Grill et al. 2020, table 6).
SOLARIZE_THRESHOLD = 0.5


class RandSolarized(_RandOpd):
    """Invert the pixels at or above ``threshold`` (torchvision ``RandomSolarize``), with ``prob``."""

    def __init__(
        self, keys: KeysCollection, prob: float, threshold: float = SOLARIZE_THRESHOLD
    ) -> None:
        super().__init__(keys, prob)
        self.threshold = float(threshold)

    def apply(self, img: torch.Tensor) -> torch.Tensor:
        return solarize(img, thresholds=self.threshold)
