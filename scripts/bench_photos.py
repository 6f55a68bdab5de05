"""Labelled tiles of real photographs for the quality benchmark, from images installed with
byol3d's own dependencies (nothing is downloaded).

The photos: scikit-learn's ``load_sample_images`` (``china.jpg``, the Summer Palace pagoda over
a lake with trees; ``flower.jpg``, a dahlia against green foliage; both 427 x 640) and
matplotlib's sample ``grace_hopper.jpg`` (a portrait in uniform before a flag; 600 x 512).
Each photo is cut into non-overlapping square tiles of ``tile`` pixels on a regular grid (no
pixel belongs to two tiles, so cross-validation folds never share image content); each tile
is resized to ``size`` pixels (bicubic, PIL) and written as a PNG. A tile's class is its
photo and the horizontal band (top / middle / bottom third of the photo) its centre lies in:
3 photos x 3 bands = 9 classes, each a kind of real texture and colour (sky and pagoda roof;
lake and pagoda; trees; foliage above, around and below the flower; flag and cap; face and
flag; uniform). Bands, not left/right halves: BYOL's views are flipped horizontally, so a
left/right distinction would test the augmentation, not the encoder.

With the defaults (48-pixel tiles resized to 64): 104 + 104 + 120 = 328 tiles.

>>> tiles = photo_tiles(tile=48, size=64)   # doctest: +SKIP
>>> len(tiles), tiles[0].label, tiles[0].pixels.shape
(328, 'china_top', (64, 64, 3))
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BANDS = ("top", "middle", "bottom")


@dataclass(frozen=True)
class Tile:
    """One labelled tile: its pixels (``size x size x 3`` uint8) and where it came from."""

    pixels: np.ndarray
    label: str
    photo: str
    box: tuple[int, int, int, int]  # (top, left, bottom, right) in the photo's pixels


def bundled_photos() -> dict[str, np.ndarray]:
    """The real colour photos installed with scikit-learn and matplotlib, as ``H x W x 3`` uint8."""
    from matplotlib import cbook
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    photos = {
        Path(name).stem: np.asarray(img, dtype=np.uint8)
        for name, img in zip(sample.filenames, sample.images, strict=True)
    }
    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        photos["grace_hopper"] = np.asarray(Image.open(fh).convert("RGB"), dtype=np.uint8)
    return photos


def tile_photo(
    name: str, photo: np.ndarray, tile: int = 48, size: int = 64, bands: Sequence[str] = BANDS
) -> list[Tile]:
    """Non-overlapping ``tile``-pixel tiles of one photo (grid centred in it), resized to ``size``.

    The label is ``f"{name}_{band}"``, the band being the one of ``len(bands)`` equal horizontal
    bands of the photo that holds the tile's centre row.
    """
    if tile < 1 or size < 1:
        raise ValueError(f"tile and size must be positive, got {tile!r} and {size!r}")
    h, w = photo.shape[:2]
    rows, cols = h // tile, w // tile
    if rows < 1 or cols < 1:
        raise ValueError(f"photo {name!r} of {h}x{w} is smaller than one {tile}-pixel tile")
    top0, left0 = (h - rows * tile) // 2, (w - cols * tile) // 2
    out = []
    for r in range(rows):
        top = top0 + r * tile
        band = bands[min(len(bands) - 1, int((top + tile / 2) * len(bands) / h))]
        for c in range(cols):
            left = left0 + c * tile
            patch = Image.fromarray(photo[top : top + tile, left : left + tile])
            if size != tile:
                patch = patch.resize((size, size), Image.BICUBIC)
            box = (top, left, top + tile, left + tile)
            out.append(Tile(np.asarray(patch, dtype=np.uint8), f"{name}_{band}", name, box))
    return out


def photo_tiles(
    tile: int = 48, size: int = 64, photos: dict[str, np.ndarray] | None = None
) -> list[Tile]:
    """The tiles of every photo (:func:`bundled_photos` by default), photo by photo."""
    photos = bundled_photos() if photos is None else photos
    return [t for name in sorted(photos) for t in tile_photo(name, photos[name], tile, size)]


def write_tiles(tiles: Sequence[Tile], out_dir: str | Path) -> Path:
    """PNG files ``out_dir/images/<label>/<photo>_<top>_<left>.png`` and ``out_dir/labels.csv``.

    ``labels.csv`` has the columns ``path`` (relative to ``out_dir``) and ``label``, what
    :func:`byol3d.data.discovery.read_image_list` and ``byol3d evaluate --csv`` read;
    ``out_dir/images`` is a ``data.root`` for ``byol3d pretrain``. Returns the CSV's path.
    """
    out = Path(out_dir)
    rows = []
    for t in tiles:
        rel = Path("images") / t.label / f"{t.photo}_{t.box[0]:04d}_{t.box[1]:04d}.png"
        (out / rel.parent).mkdir(parents=True, exist_ok=True)
        Image.fromarray(t.pixels).save(out / rel)
        rows.append((rel.as_posix(), t.label))
    csv_path = out / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return csv_path
