"""DICOM series folders: which series to read, and whether its slices make one volume.

A folder may hold several series (a localiser, thin and thick reconstructions, contrast
phases). :func:`scan_folder` asks GDCM for its series once per folder and process (cached)
and reads each slice's header (position, orientation, rescale). :func:`series_files` then

- picks a series: ``data.dicom_series`` as a SeriesInstanceUID or a SeriesDescription
  (case-insensitive substring), else the one with the most files; the choice is logged
  once per folder, not at every read;
- checks that its slices stack into one volume, raising a :class:`~byol3d.errors.DataError`
  naming the folder and the series instead of stacking them anyway (SimpleITK only warns):
  several slices at one position (a 4D or multi-phase series), a missing slice (a gap of
  a multiple of the spacing), or otherwise non-uniform slice spacing.

Rescale slope and intercept (0028,1053/0028,1052) are applied by GDCM when the pixels are
read; when they differ between slices the series is read as float32 so none is rounded.

>>> from byol3d.data.dicom import series_files
>>> files, as_float = series_files("/data/ct/patient01")               # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from byol3d.errors import DataError

logger = logging.getLogger("byol3d")

__all__ = ["Series", "scan_folder", "series_files"]

#: Relative deviation of a slice step from the median step that counts as non-uniform.
SPACING_TOLERANCE = 0.05


@dataclass(frozen=True)
class Series:
    """One DICOM series of a folder: its files sorted by GDCM and their slice positions."""

    uid: str
    description: str
    files: tuple[str, ...]
    positions: tuple[float, ...]  # along the slice normal, mm, in file order (NaN: unknown)
    rescale: tuple[tuple[str, str], ...]  # (slope, intercept) of each file, as written

    def describe(self) -> str:
        text = f"series {self.uid}"
        return f"{text} ({self.description!r})" if self.description else text


def _tag(reader: sitk.ImageFileReader, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _slice_position(reader: sitk.ImageFileReader) -> float:
    """Position of a slice along its normal (ImagePositionPatient . (row x column))."""
    try:
        ipp = np.array([float(v) for v in _tag(reader, "0020|0032").split("\\")])
        iop = np.array([float(v) for v in _tag(reader, "0020|0037").split("\\")])
        return float(ipp @ np.cross(iop[:3], iop[3:6]))
    except ValueError:  # a tag missing or malformed
        return float("nan")


@functools.lru_cache(maxsize=4096)
def scan_folder(folder: str) -> tuple[Series, ...]:
    """The DICOM series of ``folder``, scanned by GDCM once per folder and process.

    Raises:
        DataError: when the folder holds no DICOM series SimpleITK/GDCM can read.
    """
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not uids:
        raise DataError(f"no DICOM series found in folder {folder}")
    found = []
    reader = sitk.ImageFileReader()
    for uid in uids:
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
        positions, rescale, description = [], [], ""
        for name in files:
            reader.SetFileName(name)
            try:
                reader.ReadImageInformation()
            except RuntimeError:
                positions.append(float("nan"))
                rescale.append(("", ""))
                continue
            description = description or _tag(reader, "0008|103e")
            positions.append(_slice_position(reader))
            rescale.append((_tag(reader, "0028|1053"), _tag(reader, "0028|1052")))
        found.append(Series(uid, description, files, tuple(positions), tuple(rescale)))
    return tuple(found)


_lock = threading.Lock()
_logged: set[tuple[str, str | None]] = set()


def choose_series(folder: str, wanted: str | None = None) -> Series:
    """The series of ``folder`` to read: ``wanted`` (a UID, or part of a description), else
    the one with the most files (then the highest UID). Logged once per folder.

    Raises:
        DataError: when ``wanted`` matches no series (the message lists them) or several.
    """
    series = scan_folder(folder)
    listing = "; ".join(f"{s.describe()}: {len(s.files)} files" for s in series)
    if wanted:
        hits = [s for s in series if s.uid == wanted] or [
            s for s in series if wanted.lower() in s.description.lower()
        ]
        if len(hits) != 1:
            what = "no series" if not hits else f"{len(hits)} series"
            raise DataError(f"{folder}: {what} match data.dicom_series {wanted!r} ({listing})")
        chosen = hits[0]
    else:
        chosen = max(series, key=lambda s: (len(s.files), s.uid))
    with _lock:
        first = (folder, wanted) not in _logged
        _logged.add((folder, wanted))
    if first and len(series) > 1:
        how = f"matching {wanted!r}" if wanted else "the largest; data.dicom_series chooses another"
        logger.warning(
            "%s holds %d DICOM series (%s): reading %s, %s",
            folder,
            len(series),
            listing,
            chosen.describe(),
            how,
        )
    return chosen


def check_slices(folder: str, series: Series) -> None:
    """Raise a :class:`DataError` when the slices of ``series`` do not make one volume."""
    pos = np.asarray(series.positions, dtype=np.float64)
    if len(pos) < 2 or not np.isfinite(pos).all():
        return
    where = f"{folder}: {series.describe()}"
    order = np.sort(pos)
    steps = np.diff(order)
    unique = np.unique(order.round(3))
    if len(unique) < len(pos):
        repeats = len(pos) / len(unique)
        raise DataError(
            f"{where} has {len(pos)} slices at {len(unique)} positions (about {repeats:.3g} per "
            "position): a 4D or multi-phase series, not one volume; split it into one series "
            "per phase (or time point)"
        )
    step = float(np.median(steps))
    ratio = steps / step
    gaps = np.flatnonzero(ratio > 1.5)
    if len(gaps) and np.allclose(ratio[gaps], ratio[gaps].round(), atol=SPACING_TOLERANCE * 2):
        i = int(gaps[0])
        missing = int(np.round(ratio[gaps] - 1).sum())
        raise DataError(
            f"{where}: {missing} missing slice(s), e.g. a gap of {steps[i]:.4g} mm after position "
            f"{order[i]:.4g} mm (slice spacing {step:.4g} mm)"
        )
    if np.abs(ratio - 1).max() > SPACING_TOLERANCE:
        raise DataError(
            f"{where}: non-uniform slice spacing, {steps.min():.4g} to {steps.max():.4g} mm "
            "between neighbouring slices: resample the series to a uniform grid first"
        )


def series_files(folder: str, wanted: str | None = None) -> tuple[list[str], bool]:
    """The files of ``folder``'s chosen series in slice order, checked, and whether to read
    them as float32 (rescale slope or intercept differing between slices).

    Raises:
        DataError: no series, no or an ambiguous match for ``wanted``, or slices that do not
            make one volume (see :func:`check_slices`).
    """
    chosen = choose_series(str(folder), wanted)
    check_slices(str(folder), chosen)
    return list(chosen.files), len(set(chosen.rescale)) > 1


def forget_scans() -> None:
    """Drop the cached scans (after files changed on disk) and the logged choices."""
    scan_folder.cache_clear()
    with _lock:
        _logged.clear()
