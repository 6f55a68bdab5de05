"""Intensity rules per modality and the HU sanity check, on real NIfTI files in tmp_path."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from byol3d.config import load_config
from byol3d.data.sanity import NAMED, hu_problem, report_noted
from byol3d.errors import DataError
from byol3d.transforms import build_eval_transform
from byol3d.transforms.ct import ct_preprocess
from byol3d.transforms.intensity import foreground_mask, otsu_threshold


def _save(path, array, inter=None):
    img = nib.Nifti1Image(np.asarray(array), np.eye(4))
    if inter is not None:
        img.header.set_slope_inter(1.0, inter)
    nib.save(img, path)
    return str(path)


def _head_mr(seed=0, shape=(20, 20, 16)):
    """A uint16 'MR head': background 0, a box of tissue around 800 (300..1300), one bright vessel."""
    rng = np.random.default_rng(seed)
    a = np.zeros(shape, np.uint16)
    a[4:16, 3:17, 2:14] = rng.normal(800, 120, size=(12, 14, 12)).clip(300, 1300).round()
    a[10, 10, 8] = 4000
    return a


def _ct(shape=(20, 20, 16)):
    """int16 HU: air around a soft-tissue body with a bone rod."""
    a = np.full(shape, -1000, np.int16)
    a[4:16, 4:16, 2:14] = 40
    a[9:11, 9:11, 2:14] = 700
    return a


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------ rules


def test_zscore_gives_the_foreground_mean_zero_and_std_one(tmp_path):
    a = _head_mr()
    path = _save(tmp_path / "t1.nii.gz", a)
    pre = ct_preprocess(roi_size=(8, 8, 8), intensity="zscore", foreground="nonzero", crop_foreground=False)  # fmt: skip
    out = pre({"image": path})["image"][0].numpy().astype(np.float64)
    fg = a > 0
    mean, std = a[fg].astype(np.float64).mean(), a[fg].astype(np.float64).std()
    np.testing.assert_allclose(out, (a - mean) / std, rtol=1e-5, atol=1e-5)
    assert abs(out[fg].mean()) < 1e-5 and out[fg].std() == pytest.approx(1.0, abs=1e-5)


def test_percentile_clips_to_foreground_percentiles_then_maps_to_unit_range(tmp_path):
    a = _head_mr()
    path = _save(tmp_path / "t2.nii.gz", a)
    pre = ct_preprocess(roi_size=(8, 8, 8), intensity="percentile", percentiles=(1.0, 99.0),
                        foreground="nonzero", crop_foreground=False)  # fmt: skip
    out = pre({"image": path})["image"][0].numpy()
    low, high = np.percentile(a[a > 0].astype(np.float64), [1.0, 99.0])
    np.testing.assert_allclose(out, np.clip((a - low) / (high - low), 0, 1), atol=1e-5)
    assert out[10, 10, 8] == 1.0  # the bright vessel is clipped, not squeezing the rest


def test_otsu_foreground_finds_the_head_and_the_crop_keeps_it(tmp_path):
    a = _head_mr()
    threshold = otsu_threshold(torch.as_tensor(a, dtype=torch.float32))
    assert 0 < threshold < np.percentile(a[a > 0], 1)  # between background and nearly all tissue
    mask = foreground_mask(torch.as_tensor(a[None], dtype=torch.float32), "otsu")[0].numpy()
    np.testing.assert_array_equal(mask, a > threshold)
    pre = ct_preprocess(roi_size=(8, 8, 8), intensity="zscore")  # foreground auto = otsu
    out = pre({"image": _save(tmp_path / "head.nii.gz", a)})["image"]
    assert tuple(out.shape[1:]) == (12, 14, 12)  # the tissue box, background cropped


def test_zscore_pads_with_the_volume_minimum(tmp_path):
    a = np.zeros((10, 10, 10), np.uint16)
    a[2:8, 2:8, 2:8] = np.arange(216).reshape(6, 6, 6) + 100
    pre = ct_preprocess(roi_size=(8, 8, 8), intensity="zscore", foreground="nonzero")
    out = pre({"image": _save(tmp_path / "small.nii.gz", a)})["image"]
    assert tuple(out.shape) == (1, 8, 8, 8)
    assert float(out[0, 7, 7, 7]) == pytest.approx(float(out[0, :6, :6, :6].min()))


def test_ct_window_is_unchanged_for_ct(tmp_path, caplog):
    a = _ct()
    with caplog.at_level(logging.WARNING, logger="byol3d"):
        out = ct_preprocess(roi_size=(8, 8, 8))({"image": _save(tmp_path / "ct.nii.gz", a)})["image"]  # fmt: skip
    assert tuple(out.shape[1:]) == (12, 12, 12)  # crop at -500 HU
    np.testing.assert_allclose(
        np.unique(out.numpy()), [0.52, 0.85], atol=1e-6
    )  # (HU + 1000) / 2000
    assert _warnings(caplog) == []


def test_volume_without_foreground_is_an_error_naming_the_file(tmp_path):
    air = _save(tmp_path / "air.nii.gz", np.full((8, 8, 8), -1024, np.int16))
    with pytest.raises(DataError, match=r"air\.nii\.gz: no foreground voxel \(none above -500 HU"):
        ct_preprocess(roi_size=(8, 8, 8))({"image": air})
    zeros = _save(tmp_path / "zeros.nii.gz", np.zeros((8, 8, 8), np.uint16))
    with pytest.raises(DataError, match=r"zeros\.nii\.gz: no foreground voxel \(every voxel is 0"):
        ct_preprocess(roi_size=(8, 8, 8), intensity="zscore", foreground="nonzero")({"image": zeros})  # fmt: skip


# ------------------------------------------------------------------ HU sanity check


@pytest.mark.parametrize(
    "name, array, inter, defect",
    [
        ("mr_t1.nii.gz", _head_mr(), None, "unsigned integers (uint16) from 0 to 4000"),
        (
            "ct_plus1024.nii.gz",
            (_ct().astype(np.int32) + 1024).astype(np.uint16),
            None,
            "HU + 1024",
        ),
        (
            "export8bit.nii.gz",
            np.random.default_rng(0).integers(0, 256, (16, 16, 16)).astype(np.uint8),
            None,
            "values 0..255 (uint8)",
        ),  # fmt: skip
        (
            "mr_float.nii.gz",
            _head_mr().astype(np.float32) / 1000 + 0.5,
            None,
            "1st percentile 0.5 (float32) above -900 HU",
        ),  # fmt: skip
    ],
)
def test_ct_window_on_data_that_is_not_hu_warns_once_naming_the_file(tmp_path, caplog, name, array, inter, defect):  # fmt: skip
    path = _save(tmp_path / name, array, inter)
    pre = ct_preprocess(roi_size=(8, 8, 8), crop_foreground=False)
    with caplog.at_level(logging.WARNING, logger="byol3d"):
        pre({"image": path})
        pre({"image": path})  # read again (data.cache: none): no second line
    lines = _warnings(caplog)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: the CT window [-1000, 1000] is applied to") and defect in lines[0]  # fmt: skip
    assert "transforms.intensity" in lines[0]


def test_hu_plus_1024_with_its_rescale_intercept_loads_as_hu(tmp_path, caplog):
    stored = (_ct().astype(np.int32) + 1024).astype(np.uint16)
    path = _save(tmp_path / "ct_inter.nii.gz", stored, inter=-1024.0)
    with caplog.at_level(logging.WARNING, logger="byol3d"):
        out = ct_preprocess(roi_size=(8, 8, 8), crop_foreground=False)({"image": path})["image"]
    assert _warnings(caplog) == []
    assert float(out.max()) == pytest.approx(0.85) and float(out.min()) == 0.0


def test_zscore_does_not_check_hu(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="byol3d"):
        ct_preprocess(roi_size=(8, 8, 8), intensity="zscore")({"image": _save(tmp_path / "t1.nii.gz", _head_mr())})  # fmt: skip
    assert _warnings(caplog) == []


def test_many_non_hu_files_name_the_first_few_then_one_summary_line(tmp_path, caplog):
    pre = ct_preprocess(roi_size=(8, 8, 8), crop_foreground=False)
    n = NAMED + 4
    with caplog.at_level(logging.WARNING, logger="byol3d"):
        for i in range(n):
            pre({"image": _save(tmp_path / f"mr_{i}.nii.gz", _head_mr(seed=i))})
        report_noted()
    lines = _warnings(caplog)
    assert len(lines) == NAMED + 2
    assert all(f"mr_{i}.nii.gz" in lines[i] for i in range(NAMED))
    assert lines[-1] == f"{n} files with values that do not look like HU (the first {NAMED} are named above)"  # fmt: skip


def test_hu_problem_accepts_ct_and_names_the_defects():
    ct = torch.as_tensor(_ct(), dtype=torch.float32)
    assert hu_problem(ct, "int16") is None
    assert "HU + 1024" in hu_problem(ct + 1024, "uint16")
    assert "above -900" in hu_problem(ct * 0 + 300, "int16")


# ------------------------------------------------------------------ configs


def test_mr_config_is_zscore_at_1mm_and_the_eval_transform_uses_it(tmp_path):
    cfg = load_config("configs/mr_resnet50.yaml", [f"data.root={tmp_path}"])
    tf = cfg["transforms"]
    assert (tf["intensity"], tf["pixdim"], tf["foreground"]) == ("zscore", [1.0, 1.0, 1.0], "otsu")
    cfg["transforms"]["roi_size"] = [32, 32, 32]
    out = build_eval_transform(cfg)({"image": _save(tmp_path / "t1.nii.gz", _head_mr(shape=(40, 40, 36)))})["image"]  # fmt: skip
    assert float(out.mean()) < 0.5 and float(out.max()) > 1.0  # z-scores, not a [0, 1] window


def test_bad_percentiles_are_a_config_error_naming_the_key():
    from byol3d.errors import ConfigError

    with pytest.raises(ConfigError, match="transforms.percentiles"):
        load_config(None, ["transforms.percentiles=[99, 1]"])
