"""2D frames on disk: find them, read a CSV list of them, load them as RGB (or grey) tensors.

Surgical-video datasets ship as folders of extracted frames (one sub-folder per video) or as
a CSV list (e.g. ``id,label`` with the images under ``root/images/ID.png``). This module
turns either into the list of image paths that :func:`byol3d.data.build_dataset` takes, and
provides the MONAI loader that reads a frame in any PIL mode (greyscale, palette, RGBA,
16-bit) as the configured channel count:

>>> from byol3d.frames import find_frames, list_images, read_image_list
>>> find_frames("/data/frames")[:2]                                      # doctest: +SKIP
['/data/frames/video01/000000.png', '/data/frames/video01/000025.png']
>>> read_image_list("/data/train.csv", root="/data")[0]                  # doctest: +SKIP
{'image': '/data/images/0001.png', 'id': '0001', 'label': '3'}
>>> list_images(root="/data", csv="/data/train.csv", spatial_dims=2)[:1]  # doctest: +SKIP
['/data/images/0001.png']

Labels are carried along for evaluation tools and are never needed to pretrain.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection, PathLike
from monai.data import PILReader
from monai.transforms import LoadImaged
from monai.utils import ensure_tuple
from PIL import Image

from byol3d.data import walk_visible
from byol3d.errors import DataError

__all__ = [
    "FRAME_SUFFIXES",
    "VIDEO_SUFFIXES",
    "FrameReader",
    "find_frames",
    "frame_loader",
    "list_images",
    "read_image_list",
]

#: Frame files :func:`find_frames` collects (matched case-insensitively).
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Video files: not read directly; ``byol3d extract-frames`` turns them into frames first.
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".mpg", ".mpeg", ".webm")
#: Suffixes tried, in order, for a CSV row that gives an ``id`` without a ``path``.
_ID_SUFFIXES = (*FRAME_SUFFIXES, ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def find_frames(root: PathLike) -> list[str]:
    """All frames under ``root``, recursively, as a sorted list of paths.

    Collects files ending in :data:`FRAME_SUFFIXES` (any case), e.g. ``root/video01/0001.png``;
    hidden files and folders (``.name``) are skipped.

    Raises:
        DataError: when ``root`` does not exist, is not a folder, or holds no frame (the
            message counts the files it did find by suffix, and points videos to
            ``byol3d extract-frames``).
    """
    found: list[str] = []
    others: Counter[str] = Counter()
    for dirpath, names in walk_visible(root):
        for name in names:
            if name.lower().endswith(FRAME_SUFFIXES):
                found.append(os.path.join(dirpath, name))
            else:
                others[Path(name).suffix.lower() or "(no suffix)"] += 1
    if found:
        return found
    looked = "/".join(FRAME_SUFFIXES)
    if not others:
        raise DataError(
            f"no frames in {root}: it holds no files (looked for {looked}, recursively)"
        )
    kinds = ", ".join(f"{n} {s}" for s, n in others.most_common(5))
    hint = ""
    if any(s in VIDEO_SUFFIXES for s in others):
        hint = "; extract frames from videos first: byol3d extract-frames VIDEO_DIR FRAME_DIR --every N"
    raise DataError(
        f"no frames in {root}: found {sum(others.values())} files ({kinds}), none of them {looked}{hint}"
    )


def _resolve(value: str, root: Path | None, base: Path) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    return (root if root is not None else base) / path


def read_image_list(csv_path: PathLike, root: PathLike | None = None) -> list[dict[str, Any]]:
    """The rows of a CSV list of images, each as ``{"image": path, "id": ..., "label": ...}``.

    Columns: ``path`` (a file, absolute or relative to ``root``) or ``id`` (then the file is
    the first existing ``root/images/ID.EXT`` or ``root/ID.EXT`` for EXT in .png, .jpg,
    .jpeg, .bmp, .tif, .tiff, .nii.gz, .nii, .nrrd, .mha, .mhd, or ``ID`` itself when it
    already carries a suffix), at least one of them; ``label`` is optional and passed on as
    the string it is (empty cells are left out). Other columns are ignored. ``root``
    defaults to the CSV's folder.

    Args:
        csv_path: the CSV file (comma-separated, with a header row).
        root: the folder that relative paths and ids are resolved against.

    Returns:
        One dict per row, in file order; ``"id"`` is the ``id`` cell, or the path's stem.

    Raises:
        DataError: an unreadable CSV, no ``path``/``id`` column, an empty cell, a file that
            does not exist (named with its CSV line), or the same file listed twice.
    """
    csv_file = Path(csv_path).expanduser()
    base = Path(root).expanduser() if root else None
    try:
        with csv_file.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [
                {(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read data.csv {csv_path}: {err}") from err
    if "path" not in columns and "id" not in columns:
        raise DataError(
            f"data.csv {csv_path} needs a 'path' or an 'id' column, found columns {columns}"
        )
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        item = _row_item(row, base, csv_file, line)
        key = os.path.normpath(item["image"])
        if key in seen:
            raise DataError(
                f"data.csv {csv_path} line {line}: {item['image']} is already listed on line {seen[key]}"
            )
        seen[key] = line
        out.append(item)
    if not out:
        raise DataError(f"data.csv {csv_path} lists no images (only a header)")
    return out


def _row_item(row: dict[str, str], base: Path | None, csv_file: Path, line: int) -> dict[str, Any]:
    where = f"data.csv {csv_file} line {line}"
    if row.get("path"):
        path = _resolve(row["path"], base, csv_file.parent)
        if not path.exists():
            raise DataError(f"{where}: image {path} does not exist")
    elif row.get("id"):
        folder = base if base is not None else csv_file.parent
        candidates = [
            folder / sub / f"{row['id']}{ext}" for ext in _ID_SUFFIXES for sub in ("images", ".")
        ]
        if Path(row["id"]).suffix:
            candidates.insert(0, _resolve(row["id"], base, csv_file.parent))
        path = next((c for c in candidates if c.exists()), None)
        if path is None:
            raise DataError(
                f"{where}: no image for id {row['id']!r} ({folder / 'images' / row['id']}.png, "
                f"{folder / row['id']}.png or another of {', '.join(_ID_SUFFIXES)})"
            )
    else:
        raise DataError(f"{where}: empty 'path' and 'id'")
    item: dict[str, Any] = {"image": os.path.normpath(str(path)), "id": row.get("id") or path.stem}
    if row.get("label"):
        item["label"] = row["label"]
    return item


def list_images(
    root: PathLike | None = None,
    csv: PathLike | None = None,
    spatial_dims: int = 3,
    dicom: bool = True,
) -> list[str]:
    """The image paths a run trains on: a CSV list if given, else a folder search.

    - ``csv`` set: the rows of :func:`read_image_list` (2D or 3D files alike);
    - otherwise, for ``spatial_dims`` 2, :func:`find_frames` under ``root``; for 3, the
      volumes and DICOM series of :func:`byol3d.data.find_images`.

    Raises:
        DataError: as the functions above, or when neither ``root`` nor ``csv`` is given.
    """
    if csv:
        return [item["image"] for item in read_image_list(csv, root)]
    if not root:
        raise DataError(
            "data.root is not set: give the data folder (e.g. data.root=/data/frames) or a "
            "CSV list (data.csv=/data/train.csv)"
        )
    if spatial_dims == 2:
        return find_frames(root)
    from byol3d.data import find_images

    return find_images(root, dicom=dicom)


class _ToMode:
    """PIL converter to ``mode`` ("RGB" or "L"); 16/32-bit images are rescaled to 8 bit first.

    A class, not a lambda, so the loader pickles into DataLoader workers.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            arr = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
            image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
        if image.mode in ("RGBA", "LA", "PA") or (
            image.mode == "P" and "transparency" in image.info
        ):
            # composite on black (what a masked-out endoscope border is), not on PIL's default
            rgba = image.convert("RGBA")
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            image = Image.alpha_composite(black, rgba)
        return image.convert(self.mode)


class FrameReader(PILReader):
    """MONAI's ``PILReader`` converting every frame to RGB (or grey) and naming bad files.

    Greyscale, palette, RGBA (composited on black), CMYK and 16-bit frames all come out
    as 8-bit ``channels`` channels, so a stray frame in a dataset is converted rather than
    crashing the run. Arrays are ``(W, H[, C])`` (MONAI's PILReader convention: spatial
    axis 0 is x, horizontal), with values 0..255.

    Args:
        channels: 3 (RGB) or 1 (greyscale).

    Raises:
        DataError: from ``read``/``get_data`` when a file cannot be decoded (named).
    """

    def __init__(self, channels: int = 3) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3 for frames, got {channels!r}")
        super().__init__(converter=_ToMode("RGB" if channels == 3 else "L"))
        self.channels = channels

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(str(f).lower().endswith(FRAME_SUFFIXES) for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Any:
        try:
            return super().read(data, **kwargs)
        except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError ...
            name = str(ensure_tuple(data)[0])
            raise DataError(f"cannot read image {name}: {type(err).__name__}: {err}") from err

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        try:
            return super().get_data(img)
        except Exception as err:  # a truncated file fails when its pixels are decoded
            first = img[0] if isinstance(img, (list, tuple)) else img
            name = getattr(first, "filename", "an image")
            raise DataError(f"cannot read image {name}: {type(err).__name__}: {err}") from err


class _LoadFramed(LoadImaged):
    """``LoadImaged`` that always reads with its :class:`FrameReader`.

    (A plain ``LoadImaged(reader=...)`` falls back to MONAI's other readers when that one
    fails, which buries the file's real problem under theirs.)
    """

    def __init__(self, keys: KeysCollection, reader: FrameReader) -> None:
        super().__init__(keys=keys, reader=reader, image_only=True, dtype=np.uint8)
        self.frame_reader = reader

    def __call__(self, data: Any, reader: Any = None) -> Any:
        return super().__call__(data, reader or self.frame_reader)


def frame_loader(keys: KeysCollection, channels: int = 3) -> LoadImaged:
    """A ``LoadImaged`` with :class:`FrameReader`: a path in, a ``(W, H, C)`` uint8 MetaTensor out."""
    return _LoadFramed(keys, FrameReader(channels=channels))
