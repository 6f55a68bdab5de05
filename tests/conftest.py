"""Shared test fixtures."""

from __future__ import annotations

import locale
import os
from pathlib import Path

import pytest
import SimpleITK as sitk


def _write_dicom_series(image: sitk.Image, folder: Path, uid: str, suffix: str = ".dcm") -> Path:
    """Write a 3D int16 SimpleITK image as a DICOM series (one file a slice) into ``folder``.

    ``suffix=""`` gives suffix-less files, as many scanners write them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves LC_CTYPE at "C"
    try:
        return _write_slices(image, folder, uid, suffix)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)


def _write_slices(image: sitk.Image, folder: Path, uid: str, suffix: str) -> Path:
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    for i in range(image.GetDepth()):
        s = image[:, :, i]
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": uid,
            "0008|0018": f"{uid}.{i + 1}",
            "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, i))),
            "0020|0013": str(i + 1),
            "0018|0050": str(image.GetSpacing()[2]),
        }
        for key, value in tags.items():
            s.SetMetaData(key, value)
        path = folder / f"{uid.rsplit('.', 1)[-1]}_{i:03d}"
        writer.SetFileName(f"{path}.dcm")  # the writer picks GDCM by the suffix
        writer.Execute(s)
        os.replace(f"{path}.dcm", f"{path}{suffix}")
    return folder


@pytest.fixture
def write_dicom_series():
    """``write_dicom_series(image, folder, uid, suffix=".dcm") -> folder``."""
    return _write_dicom_series


@pytest.fixture(autouse=True)
def _fresh_file_notes():
    """Once-per-file warnings start afresh in every test (they are counted per process)."""
    from byol3d.data.sanity import forget_notes

    forget_notes()
    yield
    forget_notes()


@pytest.fixture(autouse=True)
def _fresh_dicom_scans():
    """DICOM folder scans are cached per process: every test scans its own folders afresh."""
    from byol3d.data.dicom import forget_scans

    forget_scans()
    yield
