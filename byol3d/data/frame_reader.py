"""Reading 2D frames: PNG/JPEG/BMP/TIFF in any PIL mode as 8-bit RGB (or grey) tensors.

Surgical-video frames come greyscale, palette, RGBA (a masked-out endoscope border) or 16-bit;
:class:`FrameReader` converts every one to the configured channel count, so a stray frame
is converted rather than crashing the run, and names a file it cannot decode in a
:class:`~byol3d.errors.DataError`. :func:`frame_loader` is the ``LoadImaged`` the frame
pipeline (:func:`byol3d.transforms.frames.frame_preprocess`) starts with:

>>> from byol3d.data.frame_reader import frame_loader
>>> load = frame_loader("image", channels=3)
>>> load({"image": "frame.png"})["image"].shape        # doctest: +SKIP
torch.Size([1920, 1080, 3])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection, PathLike
from monai.data import PILReader
from monai.transforms import LoadImaged
from monai.utils import ensure_tuple
from PIL import Image

from byol3d.errors import DataError

#: Frame files :func:`byol3d.data.discovery.find_frames` collects (matched case-insensitively).
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


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


def frame_std(path: PathLike, size: int = 256) -> float:
    """Pixel standard deviation of a frame in 0..1 units, read at most ``size`` pixels a side.

    JPEGs are decoded at reduced size (PIL's draft mode), so a pass over many frames stays
    cheap; converted to RGB as :class:`FrameReader` does. NaN for a file that cannot be read
    (left to the run's bad-file rule).
    """
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))
            image = _ToMode("RGB")(image)
            image.thumbnail((size, size))
            return float(np.asarray(image, dtype=np.float32).std() / 255.0)
    except Exception:  # noqa: BLE001 - PIL raises many types; the reader names the file later
        return float("nan")


#: PIL modes whose pixel values are the labels themselves (a palette image's indices).
LABEL_MAP_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")


def read_label_map(path: PathLike) -> np.ndarray:
    """A 2D label map as ``(W, H)`` int64 (axis 0 horizontal, the frames' MONAI/PIL order).

    Single-channel PNG/TIFF/BMP in mode ``L``, ``I``, ``I;16``, ``1`` or ``P`` (palette
    indices are the labels, as most annotation tools write them); 0 is background.

    Raises:
        DataError: the file cannot be read, or it has colour channels (an RGB rendering of a
            mask is not a label map: its colours would first have to be mapped to labels).
    """
    try:
        with Image.open(path) as image:
            if image.mode not in LABEL_MAP_MODES:
                raise DataError(
                    f"label map {str(path)!r} is a {image.mode} image; a label map has one channel "
                    f"of integer labels (PIL modes {', '.join(LABEL_MAP_MODES)})"
                )
            arr = np.asarray(image).astype(np.int64)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types
        raise DataError(
            f"cannot read label map {str(path)!r}: {type(err).__name__}: {err}"
        ) from err
    return np.ascontiguousarray(arr.T)
