"""Per-channel mean and std of a dataset, for the normalisation of 2D views.

Endoscopy colours are nothing like ImageNet's (the synthetic demo frames: mean about
[0.46, 0.18, 0.20] against ImageNet's [0.485, 0.456, 0.406]); ``transforms.mean`` and
``transforms.std`` should be the data's own.

    byol3d stats configs/endoscopy_resnet50.yaml data.root=/data/frames

prints them in a form to paste into the config (:func:`byol3d.transforms.config_mean_std`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from byol3d.data.readers import as_tensor


class _Pixels(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[str], preprocess) -> None:
        self.files, self.preprocess = list(files), preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        img = as_tensor(self.preprocess({"image": self.files[index]})["image"])
        x = img.double() / 255.0 if not img.is_floating_point() else img.double()
        flat = x.reshape(x.shape[0], -1)
        return torch.stack(
            [flat.sum(1), (flat**2).sum(1), torch.full_like(flat[:, 0], flat.shape[1])]
        )


def compute_mean_std(
    files: Sequence[str], preprocess, max_files: int | None = 1000, num_workers: int = 0
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the preprocessed images, in [0, 1] units, over all pixels.

    For :func:`frame_views`' ``mean``/``std`` (``transforms.mean``/``transforms.std``):
    every pixel of every file counts once (a large frame weighs more than a small one), as
    torchvision's ImageNet statistics were computed. With more than ``max_files`` files, an
    evenly spaced subset of ``max_files`` is used (deterministic; sorted frame lists spread
    it over all videos).

    Args:
        files: image paths, e.g. :func:`byol3d.data.discovery.list_images`.
        preprocess: the deterministic transform (:func:`frame_preprocess`; uint8 output is
            divided by 255, float output is taken as it is).
        max_files: the most files read (None: all).
        num_workers: DataLoader worker processes reading them.

    Returns:
        ``(mean, std)``, one float per channel, rounded to 4 decimals.
    """
    files = list(files)
    if not files:
        raise ValueError("files is empty: no image to measure")
    if max_files is not None and len(files) > max_files:
        picks = np.linspace(0, len(files) - 1, max_files).round().astype(int)
        files = [files[i] for i in sorted(set(picks.tolist()))]
    loader = torch.utils.data.DataLoader(
        _Pixels(files, preprocess), batch_size=None, num_workers=num_workers
    )
    total = None
    for sums in loader:
        if total is not None and sums.shape != total.shape:
            raise ValueError(
                f"images differ in channel count ({total.shape[1]} vs {sums.shape[1]})"
            )
        total = sums if total is None else total + sums
    s, sq, n = total
    mean = s / n
    std = (sq / n - mean**2).clamp_min(0).sqrt()
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]
