from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import Compose, EnsureChannelFirstd, Orientationd

from byol3d.data.readers import SimpleITKReader, ValidateImaged, find_data_error, image_loader
from byol3d.errors import DataError

# a RAS affine with a flipped x axis and y/z swapped, anisotropic spacing
AFFINE = np.array(
    [[-0.8, 0.0, 0.0, 10.0], [0.0, 0.0, 1.5, -20.0], [0.0, 1.2, 0.0, 30.0], [0.0, 0.0, 0.0, 1.0]]
)


def _volume() -> np.ndarray:
    return np.random.default_rng(0).integers(-1000, 1000, (16, 18, 20)).astype(np.int16)


def _sitk_image(array: np.ndarray, ras_affine: np.ndarray) -> sitk.Image:
    """The same volume as nibabel's (array [x, y, z], RAS affine), as SimpleITK (LPS)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras_affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    return image


def _load_ras(path) -> torch.Tensor:
    load = Compose(
        [
            image_loader("image"),
            EnsureChannelFirstd("image"),
            Orientationd("image", "RAS", labels=None),
        ]
    )
    return load({"image": str(path)})["image"]


@pytest.mark.parametrize("fmt", ["nrrd", "mha", "mhd", "dicom"])
def test_format_gives_same_ras_array_and_affine_as_nifti(tmp_path, fmt, write_dicom_series):
    array = _volume()
    nib.save(nib.Nifti1Image(array, AFFINE), tmp_path / "v.nii.gz")
    image = _sitk_image(array, AFFINE)
    if fmt == "dicom":
        other = write_dicom_series(image, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.7")
    else:
        other = tmp_path / f"v.{fmt}"
        sitk.WriteImage(image, str(other))

    ref, got = _load_ras(tmp_path / "v.nii.gz"), _load_ras(other)

    assert got.shape == ref.shape == (1, 16, 20, 18)  # RAS: y and z swapped back
    assert torch.equal(got.as_tensor(), ref.as_tensor())
    np.testing.assert_allclose(got.affine.numpy(), ref.affine.numpy(), atol=1e-5)
    np.testing.assert_allclose(got.meta["original_affine"], AFFINE, atol=1e-5)
    assert got.meta["space"] == "RAS"
    np.testing.assert_array_equal(got.meta["spatial_shape"], ref.meta["spatial_shape"])
    assert got.meta["filename_or_obj"] == str(other)


def test_folder_with_two_series_reads_the_largest_and_warns(tmp_path, write_dicom_series, caplog):
    image = _sitk_image(_volume(), AFFINE)
    folder = tmp_path / "series"
    write_dicom_series(image, folder, "1.2.826.0.1.3680043.2.1125.10")
    write_dicom_series(image[:, :, :4], folder, "1.2.826.0.1.3680043.2.1125.20")
    with caplog.at_level(logging.WARNING, logger="byol3d"):
        img = _load_ras(folder)
    assert img.shape == (1, 16, 20, 18)
    assert "2 DICOM series" in caplog.text and "1.2.826.0.1.3680043.2.1125.10" in caplog.text


def test_vector_pixels_become_channels(tmp_path):
    rgb = np.random.default_rng(1).random((6, 7, 8, 3)).astype(np.float32)  # [z, y, x, c]
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "v.mha"))
    img = _load_ras(tmp_path / "v.mha")
    assert img.shape == (3, 8, 7, 6)
    # channel c at voxel (x, y, z) is rgb[z, y, x, c]; RAS flips x and y of the LPS data
    np.testing.assert_allclose(img[1, -1, -1, 0].item(), rgb[0, 0, 0, 1])


def test_reader_suffixes():
    reader = SimpleITKReader()
    assert reader.verify_suffix("a.NRRD") and reader.verify_suffix(["a.mha", "b.mhd"])
    assert not reader.verify_suffix("a.nii.gz") and not reader.verify_suffix(["a.mha", "b.nii"])


@pytest.mark.parametrize("name", ["broken.nrrd", "broken.nii.gz", "truncated.nii.gz", "no_series"])
def test_unreadable_image_raises_data_error_naming_it(tmp_path, name):
    path = tmp_path / name
    if name == "no_series":
        path.mkdir()
        (path / "notes.txt").write_text("not dicom")
    elif name == "truncated.nii.gz":  # header fine, voxels cut off: fails in get_data
        noise = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)  # ~29 kB gzipped
        nib.save(nib.Nifti1Image(noise, np.eye(4)), path)
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataError, match=name):
        image_loader("image")({"image": str(path)})


def test_validate_rejects_wrong_channels_dims_and_nan():
    ok = {"image": torch.zeros(1, 4, 4, 4)}
    check = ValidateImaged("image", in_channels=1, spatial_dims=3)
    assert check(ok)["image"] is ok["image"]
    with pytest.raises(DataError, match="channel"):
        check({"image": torch.zeros(5, 4, 4, 4)})
    with pytest.raises(DataError, match="3D"):
        check({"image": torch.zeros(1, 4, 4)})
    with pytest.raises(DataError, match="NaN"):
        check({"image": torch.full((1, 4, 4, 4), float("inf"))})


def test_find_data_error_unwraps_monai_runtime_errors():
    try:
        try:
            raise DataError("x.nii.gz: bad")
        except DataError as inner:
            raise RuntimeError("applying transform") from inner
    except RuntimeError as outer:
        assert str(find_data_error(outer)) == "x.nii.gz: bad"
    assert find_data_error(RuntimeError("other")) is None
