"""byol3d's 2D photometric ops (float tensors) vs torchvision/PIL's (uint8), at the same parameters.

    .bench-venv/bin/python scripts/bench_views_vs_pil.py      # seconds; needs torchvision

On the quality benchmark's photo tiles (:mod:`bench_photos`), with the same factors on both
sides: the mean absolute difference, in 1/255 units, of each colour-jitter adjustment and of
all four in a row (byol3d's ``RandColorJitterd`` vs torchvision's ``adjust_*`` on PIL images,
which lightly's ``ColorJitter`` calls), and of the Gaussian blur (byol3d's ``RandGaussianBlurd``
vs PIL's ``GaussianBlur(radius=sigma)``, which lightly's ``GaussianBlur`` calls), beside how
much that blur changes the tile at all.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF
from bench_photos import photo_tiles
from PIL import Image, ImageFilter

from byol3d.transforms.photometric import RandColorJitterd, RandGaussianBlurd

ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _unit(pixels) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255.0


def jitter_differences(tiles, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    out = {name: [] for name in ("brightness", "contrast", "saturation", "hue", "all four")}
    jitter = RandColorJitterd("image", prob=1.0)
    for t in tiles:
        drawn = [rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2),
                 rng.uniform(-0.1, 0.1)]  # fmt: skip
        for name, only in zip(out, (0, 1, 2, 3, None), strict=True):
            jitter.order = [0, 1, 2, 3] if only is None else [only]
            jitter.factors = [f if only in (i, None) else (0.0 if i == 3 else 1.0)
                              for i, f in enumerate(drawn)]  # fmt: skip
            ref = Image.fromarray(t.pixels)
            for i in jitter.order:
                ref = ADJUST[i](ref, jitter.factors[i])
            out[name].append(float((jitter.apply(_unit(t.pixels)) - _unit(ref)).abs().mean()))
    return {k: 255 * float(np.mean(v)) for k, v in out.items()}


def blur_differences(tiles, sigmas=(0.3, 0.6, 1.0, 2.0)) -> dict[float, tuple[float, float]]:
    out = {}
    for sigma in sigmas:
        blur = RandGaussianBlurd("image", prob=1.0, sigma=(sigma, sigma))
        blur.sigma = sigma
        diff, change = [], []
        for t in tiles:
            ref = _unit(Image.fromarray(t.pixels).filter(ImageFilter.GaussianBlur(radius=sigma)))
            diff.append(float((blur.apply(_unit(t.pixels)) - ref).abs().mean()))
            change.append(float((_unit(t.pixels) - ref).abs().mean()))
        out[sigma] = (255 * float(np.mean(diff)), 255 * float(np.mean(change)))
    return out


def main() -> None:
    tiles = photo_tiles()[::8]
    print(f"{len(tiles)} tiles; mean |byol3d - torchvision/PIL| in 1/255")
    for name, d in jitter_differences(tiles).items():
        print(f"colour jitter, {name}: {d:.2f}")
    for sigma, (d, change) in blur_differences(tiles).items():
        print(f"blur sigma {sigma}: {d:.2f} (the blur itself changes the tile by {change:.2f})")


if __name__ == "__main__":
    main()
