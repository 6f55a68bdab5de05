"""Is this image what the config thinks it is? Cheap intensity checks and once-per-file notes.

- :func:`hu_problem`: does a volume look like CT in Hounsfield units? Run on the voxels
  already loaded (a strided sample of at most :data:`SAMPLE` of them) and the dtype the file
  stores, before a CT window is applied: MR, 8-bit exports and HU + 1024 stored as unsigned
  integers all fail it, each with its own reason.
- :func:`note_file`: a warning about a file, logged once per file and process however often
  the file is read (``data.cache: none`` reads it every epoch), naming the first
  :data:`NAMED` files of each kind and then one line for the rest; :func:`noted_counts` gives
  the totals for a summary line.

>>> import torch
>>> hu_problem(torch.arange(0, 256.0).reshape(1, 16, 16), "uint8")       # doctest: +ELLIPSIS
'values 0..255 (uint8), an 8-bit image...'
>>> hu_problem(torch.linspace(-1024, 2000, 1000), "int16") is None
True
"""

from __future__ import annotations

import logging
import threading

import torch

logger = logging.getLogger("byol3d")

#: Voxels a check reads at most (a regular stride through the volume): about 1 ms of work.
SAMPLE = 1 << 18

#: Files named one by one per kind of note before the rest are only counted.
NAMED = 5

#: The metadata key under which byol3d's readers store the dtype of the values a file holds
#: (after its own rescale slope/intercept, if any), e.g. ``"uint16"``, ``"int16"``, ``"float32"``.
SOURCE_DTYPE = "source_dtype"

_lock = threading.Lock()
_noted: dict[str, set[str]] = {}


def strided_sample(values: torch.Tensor, size: int = SAMPLE) -> torch.Tensor:
    """At most about ``size`` values of ``values`` (flattened, every k-th), as float32."""
    flat = values.reshape(-1)
    step = max(1, -(-flat.numel() // size))
    return flat[::step].float()


def hu_problem(values: torch.Tensor, source_dtype: str | None = None) -> str | None:
    """Why ``values`` do not look like CT in Hounsfield units, or None when they do.

    CT in HU has air at about -1000 (outside the body and in the lungs), so its 1st
    percentile lies below -900 in any scan that shows some air; values read from the file
    without a rescale intercept are at least 0. In order:

    - integers within 0..255: an 8-bit export (PNG stack, screenshot), not HU;
    - non-negative integers reaching above 1024 with a 1st percentile under 100: HU + 1024
      stored without its rescale intercept (common in DICOM-to-NIfTI conversions), or
      non-CT data such as MR;
    - otherwise a 1st percentile above -900: no air, hence probably not CT (MR, PET, a
      volume already normalised), or a CT cropped tightly to the body.

    Args:
        values: the voxels as loaded (any shape; a strided sample is read).
        source_dtype: the dtype the file stores its values in (``"uint16"``, ...), if known.

    Returns:
        A short reason, or None.
    """
    sample = strided_sample(values)
    if sample.numel() == 0:
        return None
    low, high = float(sample.min()), float(sample.max())
    p1 = float(torch.quantile(sample, 0.01))
    dtype = f" ({source_dtype})" if source_dtype else ""
    integral = bool(torch.equal(sample, sample.round()))
    if low >= 0 and high <= 255 and integral:
        return f"values {low:g}..{high:g}{dtype}, an 8-bit image rather than HU (air is -1000 HU)"
    unsigned = bool(source_dtype and source_dtype.startswith("uint"))
    if low >= 0 and integral and high > 1024 and p1 < 100:
        kind = "unsigned integers" if unsigned else "non-negative integers"
        return (
            f"{kind}{dtype} from {low:g} to {high:g} with 1st percentile {p1:g}: HU + 1024 "
            "stored without its rescale intercept, or not CT (air is -1000 HU)"
        )
    if p1 > -900:
        return f"1st percentile {p1:g}{dtype} above -900 HU: no air, so probably not CT"
    return None


def note_file(kind: str, name: str, message: str, named: int = NAMED) -> None:
    """Warn ``message`` about file ``name`` once per process; past ``named`` files of a
    ``kind``, one line says further ones are only counted (see :func:`noted_counts`).
    ``named=0`` (frames: thousands of black ones) logs only that line, with ``message``."""
    with _lock:
        seen = _noted.setdefault(kind, set())
        if name in seen:
            return
        seen.add(name)
        count = len(seen)
    if named == 0 and count == 1:
        logger.warning("%s (further ones are counted, not named)", message)
    elif count <= named:
        logger.warning("%s", message)
    elif named and count == named + 1:
        logger.warning(
            "more files with %s: not named one by one (the total is reported before training)",
            kind,
        )


def noted_counts() -> dict[str, int]:
    """``{kind: number of distinct files noted}`` in this process so far."""
    with _lock:
        return {kind: len(names) for kind, names in _noted.items()}


def report_noted() -> None:
    """One summary line per kind of note that named only its first files."""
    for kind, count in sorted(noted_counts().items()):
        if kind == FLAT_FRAMES and count > 1:
            logger.warning("%d %s (data.min_frame_std drops such frames before training)", count, kind)  # fmt: skip
        elif kind != FLAT_FRAMES and count > NAMED:
            logger.warning("%d files with %s (the first %d are named above)", count, kind, NAMED)


#: The kind of note for frames below :data:`FLAT_FRAME_STD`.
FLAT_FRAMES = "constant or near-black frames"

#: Pixel standard deviation (in 0..1 units over all channels) under which a frame counts as
#: constant or near-black: about 5 grey levels of 255, sensor noise on a black frame.
FLAT_FRAME_STD = 0.02


def frame_std(values: torch.Tensor) -> float:
    """Standard deviation of a frame's pixels in 0..1 units (uint8 frames divided by 255)."""
    sample = strided_sample(values)
    scale = 255.0 if values.dtype == torch.uint8 else 1.0
    return float(sample.std(correction=0)) / scale if sample.numel() else 0.0


def forget_notes() -> None:
    """Start counting afresh (a new run in the same process)."""
    with _lock:
        _noted.clear()
