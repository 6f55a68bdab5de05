"""Multi-sequence subjects: several co-registered images of one subject as the channels of one.

BraTS-like data hold T1, T1c, T2 and FLAIR of each subject as separate files. With
``data.channels: [t1, t2, flair]`` they become one ``(3, X, Y, Z)`` image:

- listed in a CSV with one column per channel (``subject,t1,t2,flair``), read by
  :func:`byol3d.data.discovery.read_image_list`; or
- found by :func:`find_subjects` in per-subject folders, one file per channel matched by a
  file-name pattern (``data.channel_patterns``; default ``*NAME.*``, e.g. ``*t1.*`` matches
  ``BraTS_001_t1.nii.gz`` but not ``..._t1ce.nii.gz``).

:class:`StackChannelsd` loads such a list: each file is read alone and the grids are compared
(shape, and the affine within 1% of the smallest voxel); images on different grids are a
:class:`~byol3d.errors.DataError` naming the subject and both grids, or, with ``resample``
(``data.resample_channels: true``), resampled onto the first channel's grid (linear
interpolation). A single path (one channel) is read as before.

>>> from byol3d.data.channels import StackChannelsd
>>> load = StackChannelsd("image", names=["t1", "t2"])
>>> load({"image": ["sub1/t1.nii.gz", "sub1/t2.nii.gz"]})["image"].shape  # doctest: +SKIP
torch.Size([2, 240, 240, 155])
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirst, MapTransform, ResampleToMatch
from monai.utils import MetaKeys

from byol3d.data.readers import image_loader
from byol3d.errors import DataError

__all__ = ["StackChannelsd", "channel_patterns", "find_subjects", "grid_text"]


def channel_patterns(channels: Sequence[str], patterns: Sequence[str] | None = None) -> list[str]:
    """The file-name pattern of each channel: ``patterns`` as given, else ``*NAME.*``.

    Raises:
        DataError: when ``patterns`` does not hold one pattern per channel.
    """
    if patterns is None:
        return [f"*{name}.*" for name in channels]
    if len(patterns) != len(channels):
        raise DataError(
            f"data.channel_patterns holds {len(patterns)} patterns for {len(channels)} channels "
            f"{list(channels)}: give one per channel"
        )
    return list(patterns)


def find_subjects(
    folders: Iterable[tuple[str, list[str]]],
    channels: Sequence[str],
    patterns: Sequence[str] | None = None,
) -> list[list[str]]:
    """One list of channel files per subject folder, in channel order.

    A subject folder is any folder (from ``folders``, e.g.
    :func:`byol3d.data.discovery.walk_visible`) with a file or sub-folder matching one of the
    patterns (case-insensitive); it must then match each pattern exactly once.

    Raises:
        DataError: naming the subject folder and the channel with no file or several files,
            or when no folder matches at all.
    """
    globs = channel_patterns(channels, patterns)
    subjects = []
    for folder, names in folders:
        entries = sorted(set(names) | {d for d in _subfolders(folder)})
        hits = [[n for n in entries if fnmatch.fnmatch(n.lower(), g.lower())] for g in globs]
        if not any(hits):
            continue
        for name, glob, found in zip(channels, globs, hits, strict=True):
            if len(found) != 1:
                what = "no file" if not found else f"{len(found)} files ({', '.join(found)})"
                raise DataError(f"subject {folder}: {what} for channel {name!r} (pattern {glob!r})")  # fmt: skip
        subjects.append([os.path.join(folder, found[0]) for found in hits])
    if not subjects:
        raise DataError(f"no subject folder holds files matching the channel patterns {globs}")
    return subjects


def _subfolders(folder: str) -> list[str]:
    """Sub-folders of ``folder`` (a channel may be a DICOM series folder)."""
    try:
        return [e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        return []


def grid_text(img: MetaTensor) -> str:
    """``shape (X, Y, Z), spacing (...) mm, origin (...)`` of a channel-first image."""
    affine = np.asarray(img.affine, dtype=np.float64)
    dims = affine.shape[0] - 1
    spacing = np.sqrt((affine[:dims, :dims] ** 2).sum(axis=0))
    fmt = ", ".join
    return (
        f"shape {tuple(int(s) for s in img.shape[1:])}, spacing ({fmt(f'{s:.4g}' for s in spacing)}) mm, "
        f"origin ({fmt(f'{o:.4g}' for o in affine[:dims, dims])})"
    )


def _same_grid(a: MetaTensor, b: MetaTensor) -> bool:
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        return False
    fa, fb = np.asarray(a.affine, np.float64), np.asarray(b.affine, np.float64)
    dims = fa.shape[0] - 1
    voxel = float(np.sqrt((fa[:dims, :dims] ** 2).sum(axis=0)).min())
    return bool(np.allclose(fa, fb, rtol=0.0, atol=0.01 * voxel))


class StackChannelsd(MapTransform):
    """Load images, stacking a list of co-registered files per key as channels.

    A key holding one path is loaded as :func:`byol3d.data.readers.image_loader` loads it
    (channels still where the file has them). A key holding a list is loaded file by file,
    each made channel-first, checked to share the first file's grid (or resampled onto it),
    and concatenated: a channel-first ``MetaTensor`` with the first file's metadata.

    Args:
        keys: the data-dict keys holding a path or a list of paths.
        names: channel names for messages (default ``channel 1, channel 2, ...``).
        resample: resample channels on another grid onto the first channel's (linear
            interpolation) instead of raising.
        dicom_series: the series to read from DICOM folders (``data.dicom_series``).

    Raises:
        DataError: from ``__call__``, when the grids differ (naming the subject, both
            files and both grids) and ``resample`` is off, or a file cannot be read.
    """

    def __init__(
        self,
        keys: KeysCollection,
        names: Sequence[str] | None = None,
        resample: bool = False,
        dicom_series: str | None = None,
    ) -> None:
        super().__init__(keys)
        self.names = list(names) if names else None
        self.resample = bool(resample)
        self.loader = image_loader(self.keys, dicom_series=dicom_series)
        self._one = image_loader("image", dicom_series=dicom_series)
        self._first_channel = EnsureChannelFirst()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        singles = [k for k in self.key_iterator(d) if not isinstance(d[k], (list, tuple))]
        if singles:
            d.update(self.loader({k: d[k] for k in singles}))
        for key in self.key_iterator(d):
            if isinstance(d[key], (list, tuple)):
                d[key] = self._stack([str(p) for p in d[key]])
        return d

    def _name(self, i: int) -> str:
        return repr(self.names[i]) if self.names and i < len(self.names) else f"channel {i + 1}"

    def _stack(self, paths: list[str]) -> MetaTensor:
        images = [self._first_channel(self._one({"image": p})["image"]) for p in paths]
        first = images[0]
        for i in range(1, len(images)):
            if _same_grid(first, images[i]):
                continue
            if not self.resample:
                subject = os.path.commonpath([os.path.dirname(p) for p in paths]) or paths[0]
                raise DataError(
                    f"subject {subject}: {self._name(i)} ({paths[i]}: {grid_text(images[i])}) is not on "
                    f"the grid of {self._name(0)} ({paths[0]}: {grid_text(first)}); co-register the "
                    "sequences, or set data.resample_channels: true to resample onto the first"
                )
            images[i] = ResampleToMatch(mode="bilinear", padding_mode="zeros")(
                images[i].float(), img_dst=first
            )
        values = torch.cat([torch.as_tensor(im.as_tensor(), dtype=torch.float32) for im in images])
        out = MetaTensor(values, meta=dict(first.meta))
        out.meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        out.meta["filename_or_obj"] = paths[0]
        return out
