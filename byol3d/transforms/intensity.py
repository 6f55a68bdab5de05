"""Intensity normalisation per modality: the CT window, foreground percentiles, z-scores.

``transforms.intensity`` picks one rule, applied per volume (and per channel) after
resampling and before the foreground crop:

- ``ct_window`` (CT, the default): ``transforms.hu_window`` mapped to [0, 1], values
  outside clipped. Hounsfield units mean the same tissue in every scanner, so one fixed
  window fits every volume; a volume that does not look like HU
  (:func:`byol3d.data.sanity.hu_problem`) is warned about, naming the file.
- ``percentile``: clipped to the ``transforms.percentiles`` (default [0.5, 99.5]) of the
  foreground voxels, then mapped to [0, 1]. For modalities without absolute units (MR, PET)
  when a bounded range is wanted; a few very bright voxels no longer squeeze the rest.
- ``zscore``: minus the mean, divided by the standard deviation of the foreground voxels
  (nnU-Net's rule for non-CT images; Isensee et al. 2021). The background then lies below
  0 and padding uses the volume's minimum.

The foreground (``transforms.foreground``) is where the statistics come from, what the
foreground crop keeps, and what must not be empty (a volume without any is a
:class:`~byol3d.errors.DataError` naming the file): ``hu`` = above ``foreground_hu`` (CT:
the body without the air around it), ``otsu`` = above Otsu's threshold (MR: the head or
body against the dark background), ``nonzero`` = not 0 (skull-stripped or masked volumes,
as BraTS); ``auto`` is ``hu`` for ``ct_window`` and ``otsu`` otherwise.

>>> import torch
>>> from monai.data import MetaTensor
>>> norm = NormalizeIntensityd("image", mode="zscore", foreground="nonzero")
>>> out = norm({"image": MetaTensor(torch.tensor([[0.0, 2.0, 4.0, 6.0]]))})["image"]
>>> [round(v, 3) for v in out[0].tolist()]
[-2.449, -1.225, 0.0, 1.225]
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from byol3d.data.readers import as_tensor, filename_of
from byol3d.data.sanity import SOURCE_DTYPE, hu_problem, note_file
from byol3d.errors import DataError

__all__ = [
    "FOREGROUND_RULES",
    "INTENSITY_MODES",
    "NormalizeIntensityd",
    "foreground_mask",
    "otsu_threshold",
    "resolve_foreground",
]

#: Values of ``transforms.intensity``.
INTENSITY_MODES = ("ct_window", "percentile", "zscore")
#: Values of ``transforms.foreground``.
FOREGROUND_RULES = ("auto", "hu", "otsu", "nonzero")

#: Foreground voxels the percentiles are computed from at most (a regular stride beyond).
_PERCENTILE_SAMPLE = 1 << 22


def resolve_foreground(mode: str, foreground: str) -> str:
    """The foreground rule ``auto`` stands for: ``hu`` with ``ct_window``, else ``otsu``."""
    if mode not in INTENSITY_MODES:
        raise ValueError(f"invalid intensity {mode!r}, must be one of {', '.join(INTENSITY_MODES)}")
    if foreground not in FOREGROUND_RULES:
        raise ValueError(
            f"invalid foreground {foreground!r}, must be one of {', '.join(FOREGROUND_RULES)}"
        )
    if foreground != "auto":
        return foreground
    return "hu" if mode == "ct_window" else "otsu"


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the cut of a ``bins``-bin histogram that maximises the
    between-class variance (Otsu 1979). A constant input returns its value.

    >>> otsu_threshold(torch.tensor([0.0] * 50 + [10.0] * 50)) < 10
    True
    """
    v = values.reshape(-1).float()
    low, high = float(v.min()), float(v.max())
    if high <= low:
        return low
    hist = torch.histc(v, bins=bins, min=low, max=high).double()
    centres = low + (torch.arange(bins, dtype=torch.float64) + 0.5) * (high - low) / bins
    w0 = torch.cumsum(hist, 0)
    w1 = w0[-1] - w0
    m0 = torch.cumsum(hist * centres, 0)
    mu0 = m0 / w0.clamp(min=1)
    mu1 = (m0[-1] - m0) / w1.clamp(min=1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(torch.argmax(between[:-1]))
    return low + (k + 1) * (high - low) / bins  # the upper edge of the last background bin


def foreground_mask(image: torch.Tensor, rule: str, threshold_hu: float = -500.0) -> torch.Tensor:
    """Boolean foreground of a channel-first image, channel by channel, by ``rule``.

    ``hu``: ``image > threshold_hu``; ``nonzero``: ``image != 0``; ``otsu``: above each
    channel's :func:`otsu_threshold` (all of a constant channel: nothing to separate).
    """
    x = as_tensor(image)
    if rule == "hu":
        return x > threshold_hu
    if rule == "nonzero":
        return x != 0
    if rule != "otsu":
        raise ValueError(f"invalid foreground rule {rule!r}, must be hu, otsu or nonzero")
    masks = []
    for channel in x:
        low, high = channel.min(), channel.max()
        masks.append(channel > otsu_threshold(channel) if high > low else torch.ones_like(channel, dtype=torch.bool))  # fmt: skip
    return torch.stack(masks)


def _percentiles(values: torch.Tensor, q: Sequence[float]) -> tuple[float, float]:
    step = max(1, -(-values.numel() // _PERCENTILE_SAMPLE))
    sample = values[::step].numpy()
    low, high = np.percentile(sample, list(q))
    return float(low), float(high)


class NormalizeIntensityd(MapTransform):
    """One intensity rule (``ct_window``, ``percentile`` or ``zscore``) per volume and channel.

    The foreground is computed on the raw values; with ``mask_key`` it is also stored there
    (a boolean tensor of the image's shape, for ``CropForegroundd`` to crop by, then deleted).
    The output is float32.

    Args:
        keys: the image key(s).
        mode: ``ct_window``, ``percentile`` or ``zscore`` (see the module docstring).
        hu_window: ``(low, high)`` HU mapped to [0, 1] by ``ct_window``.
        percentiles: ``(low, high)`` foreground percentiles in [0, 100] for ``percentile``.
        foreground: ``auto``, ``hu``, ``otsu`` or ``nonzero``.
        foreground_hu: the threshold of the ``hu`` rule, in the file's units.
        mask_key: where to put the foreground mask (None: nowhere).
        check_hu: with ``ct_window``, warn (once per file) when the values do not look like HU.

    Raises:
        DataError: from ``__call__``, naming the file, when its foreground is empty.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mode: str = "ct_window",
        hu_window: Sequence[float] = (-1000.0, 1000.0),
        percentiles: Sequence[float] = (0.5, 99.5),
        foreground: str = "auto",
        foreground_hu: float = -500.0,
        mask_key: str | None = None,
        check_hu: bool = True,
    ) -> None:
        super().__init__(keys)
        self.rule = resolve_foreground(mode, foreground)
        self.mode = mode
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles must be (low, high) with 0 <= low < high <= 100, got {percentiles!r}")  # fmt: skip
        self.foreground_hu = float(foreground_hu)
        self.mask_key = mask_key
        self.check_hu = check_hu

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = filename_of(img, key)
            if self.mode == "ct_window" and self.check_hu:
                self._check_hu(img, name)
            mask = foreground_mask(img, self.rule, self.foreground_hu)
            if not bool(mask.any()):
                raise DataError(f"{name}: no foreground voxel ({self._rule_text()}): the volume is empty or not what the config expects")  # fmt: skip
            values = self._normalise(as_tensor(img).float(), mask, name)
            d[key] = _with_values(img, values)
            if self.mask_key is not None:
                d[self.mask_key] = mask
        return d

    def _rule_text(self) -> str:
        return {
            "hu": f"none above {self.foreground_hu:g} HU, transforms.foreground_hu",
            "otsu": "none above Otsu's threshold",
            "nonzero": "every voxel is 0",
        }[self.rule]

    def _check_hu(self, img: Any, name: str) -> None:
        meta = getattr(img, "meta", None) or {}
        problem = hu_problem(as_tensor(img), meta.get(SOURCE_DTYPE))
        if problem:
            low, high = self.hu_window
            note_file(
                "values that do not look like HU",
                name,
                f"{name}: the CT window [{low:g}, {high:g}] is applied to {problem}; for MR or "
                "other non-CT images set transforms.intensity to zscore or percentile",
            )

    def _normalise(self, x: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
        if self.mode == "ct_window":
            low, high = self.hu_window
            return ((x - low) / (high - low)).clamp_(0.0, 1.0)
        out = torch.empty_like(x)
        for c in range(x.shape[0]):
            fg = x[c][mask[c]] if bool(mask[c].any()) else x[c].reshape(-1)
            if self.mode == "percentile":
                low, high = _percentiles(fg, self.percentiles)
                scale = high - low if high > low else 1.0
                out[c] = ((x[c] - low) / scale).clamp_(0.0, 1.0)
            else:
                mean, std = float(fg.double().mean()), float(fg.double().std(correction=0))
                out[c] = (x[c] - mean) / (std if std > 1e-8 else 1.0)
        return out


def _with_values(img: Any, values: torch.Tensor) -> Any:
    """``values`` with ``img``'s metadata (a MetaTensor in, a MetaTensor out)."""
    if not isinstance(img, MetaTensor):
        return values
    out = MetaTensor(values)
    out.copy_meta_from(img)
    return out
