"""DICOM edge cases on real series written slice by slice with SimpleITK/GDCM in tmp_path."""

from __future__ import annotations

import locale
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from byol3d.data.discovery import find_images
from byol3d.data.readers import image_loader
from byol3d.errors import DataError
from byol3d.transforms.ct import ct_preprocess

STUDY = "1.2.826.0.1.3680043.2.1125.7"


def write_slices(folder, slices, positions, uid, tags=None, per_slice=None):
    """One file per 2D array of ``slices`` at z = ``positions`` (mm), series ``uid``.

    ``tags`` go into every file, ``per_slice[i]`` into file i (e.g. its rescale). GDCM stores
    ``(value - intercept) / slope`` when rescale tags are given, as scanners do.
    """
    folder.mkdir(parents=True, exist_ok=True)
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves LC_CTYPE at "C"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    start = len(list(folder.iterdir()))
    try:
        for i, (array, z) in enumerate(zip(slices, positions, strict=True)):
            image = sitk.GetImageFromArray(np.asarray(array))
            image.SetSpacing((0.8, 0.8))
            meta = {
                "0008|0060": "CT", "0020|000d": STUDY, "0020|000e": uid,
                "0008|0018": f"{uid}.{start + i + 1}", "0020|0037": "1\\0\\0\\0\\1\\0",
                "0020|0032": f"0\\0\\{z}", "0020|0013": str(start + i + 1),
                **(tags or {}), **((per_slice or {}).get(i, {})),
            }  # fmt: skip
            for key, value in meta.items():
                image.SetMetaData(key, str(value))
            writer.SetFileName(str(folder / f"{uid.rsplit('.', 1)[-1]}_{start + i:03d}.dcm"))
            writer.Execute(image)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    return folder


def _hu(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(-500, 500, size=(12, 12)).astype(np.int16) * 2 for _ in range(n)]


def _load(folder, **kwargs):
    return image_loader("image", **kwargs)({"image": str(folder)})["image"]


def test_series_with_a_missing_slice_is_refused_naming_it(tmp_path):
    folder = write_slices(tmp_path / "gap", _hu(5), [0, 2, 4, 8, 10], "1.2.3.40")
    with pytest.raises(DataError) as info:
        _load(folder)
    assert str(info.value) == (
        f"{folder}: series 1.2.3.40: 1 missing slice(s), e.g. a gap of 4 mm after position 4 mm "
        "(slice spacing 2 mm)"
    )


def test_two_phases_in_one_series_are_refused_not_stacked(tmp_path):
    folder = write_slices(tmp_path / "phases", _hu(4), [0, 2, 4, 6], "1.2.3.41", {"0008|103e": "ARTERIAL"})  # fmt: skip
    write_slices(folder, _hu(4, seed=1), [0, 2, 4, 6], "1.2.3.41", {"0008|103e": "ARTERIAL"})
    with pytest.raises(DataError, match=r"phases: series 1\.2\.3\.41 \('ARTERIAL'\) has 8 slices at 4 positions \(about 2 per position\): a 4D or multi-phase series"):  # fmt: skip
        _load(folder)


def test_non_uniform_slice_spacing_is_refused(tmp_path):
    folder = write_slices(tmp_path / "uneven", _hu(5), [0, 2, 4, 7, 9.5], "1.2.3.42")
    with pytest.raises(DataError, match=r"non-uniform slice spacing, 2 to 3 mm"):
        _load(folder)


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    hu = _hu(4)  # even values, so (HU + 1024) / 2 is exact
    folder = write_slices(tmp_path / "rescaled", hu, [0, 2, 4, 6], "1.2.3.43",
                          {"0028|1053": "2", "0028|1052": "-1024"})  # fmt: skip
    first = sorted(folder.iterdir())[0].read_bytes()[-288:]
    raw = np.frombuffer(first, np.int16).reshape(12, 12)
    assert np.array_equal(raw, (hu[0] + 1024) // 2)  # the file holds (HU + 1024) / 2 ...
    image = _load(folder)
    np.testing.assert_array_equal(image.numpy()[..., 0].T, hu[0])  # ... and HU are read back
    assert float(image.min()) < -900


def test_per_slice_rescale_is_read_as_float_without_rounding(tmp_path):
    values = [np.full((12, 12), v, np.float64) for v in (-1000.0, 0.5, 37.25)]
    per_slice = {i: {"0028|1053": s, "0028|1052": 0} for i, s in enumerate(("1", "0.5", "0.25"))}
    int16 = {"0028|0100": 16, "0028|0101": 16, "0028|0102": 15, "0028|0103": 1}  # stored type
    folder = write_slices(tmp_path / "mixed", values, [0, 2, 4], "1.2.3.44", int16, per_slice)
    image = _load(folder)
    got = [float(image[0, 0, k]) for k in range(3)]
    assert got == [-1000.0, 0.5, 37.25]  # stored integers times each slice's own slope


def test_series_choice_by_description_or_uid_largest_by_default_logged_once(tmp_path, caplog):
    folder = write_slices(tmp_path / "study", _hu(5), [0, 2, 4, 6, 8], "1.2.3.50", {"0008|103e": "AX SOFT"})  # fmt: skip
    write_slices(folder, _hu(3, seed=2), [0, 10, 20], "1.2.3.51", {"0008|103e": "Localizer"})
    pre = ct_preprocess(roi_size=(4, 4, 4), crop_foreground=False)
    with caplog.at_level(logging.WARNING, logger="byol3d"):
        for _ in range(3):
            assert pre({"image": str(folder)})["image"].shape[-1] == 5
    choices = [r.getMessage() for r in caplog.records if "DICOM series" in r.getMessage()]
    assert len(choices) == 1 and "reading series 1.2.3.50 ('AX SOFT')" in choices[0]
    assert _load(folder, dicom_series="localizer").shape[-1] == 3  # part of the description
    assert _load(folder, dicom_series="1.2.3.51").shape[-1] == 3  # the UID
    with pytest.raises(DataError, match=r"no series match data.dicom_series 'sagittal' \(series 1\.2\.3\.50 \('AX SOFT'\): 5 files; "):  # fmt: skip
        _load(folder, dicom_series="sagittal")


def test_each_folder_is_scanned_by_gdcm_once(tmp_path, monkeypatch):
    write_slices(tmp_path / "data" / "a", _hu(4), [0, 2, 4, 6], "1.2.3.60")
    write_slices(tmp_path / "data" / "b", _hu(4), [0, 2, 4, 6], "1.2.3.61")
    calls = []
    scan = sitk.ImageSeriesReader.GetGDCMSeriesIDs
    monkeypatch.setattr(sitk.ImageSeriesReader, "GetGDCMSeriesIDs", staticmethod(lambda d: calls.append(d) or scan(d)))  # fmt: skip
    folders = find_images(tmp_path / "data")
    pre = ct_preprocess(roi_size=(8, 8, 8), crop_foreground=False)
    for _ in range(2):  # two epochs
        for f in folders:
            pre({"image": f})
    assert sorted(calls) == sorted(folders)
