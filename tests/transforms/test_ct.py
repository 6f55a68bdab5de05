from __future__ import annotations

import logging
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import list_data_collate
from monai.transforms import Compose, RandFlipd, RandGaussianSmoothd

from byol3d.errors import DataError
from byol3d.transforms.crops import RandResizedCropd
from byol3d.transforms.ct import ct_preprocess
from byol3d.transforms.volume_views import view_transforms


def _save(path, array, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), path)
    return str(path)


def _pre(**kwargs):
    kwargs = {"roi_size": (8, 8, 8), "crop_foreground": False, **kwargs}
    return ct_preprocess(**kwargs)


# ---------------------------------------------------------------- ct_preprocess


def test_hu_window_maps_to_unit_range_and_clips(tmp_path):
    a = np.zeros((16, 16, 16), np.float32)
    a[0, 0, :5] = [-3000, -1000, 0, 1000, 4000]
    out = _pre()({"image": _save(tmp_path / "a.nii.gz", a)})["image"]
    np.testing.assert_allclose(out[0, 0, 0, :5].numpy(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert out.dtype == torch.float32 and out.shape == (1, 16, 16, 16)


def test_lps_volume_is_reoriented_to_ras(tmp_path):
    a = np.full((16, 18, 20), -1000, np.int16)
    a[0, 0, 0] = 1000  # marker at the first voxel: right-anterior-inferior in an LPS array
    path = _save(tmp_path / "lps.nii.gz", a, np.diag([-1.0, -1.0, 1.0, 1.0]))
    out = _pre()({"image": path})["image"]
    assert out.shape == (1, 16, 18, 20)
    assert out[0, -1, -1, 0] == 1.0 and out.sum() == 1.0
    assert np.all(np.diag(out.affine.numpy())[:3] > 0)


def test_pixdim_resamples(tmp_path):
    path = _save(
        tmp_path / "a.nii.gz", np.zeros((16, 16, 16), np.int16), np.diag([2.0, 2.0, 1.0, 1.0])
    )
    out = _pre(pixdim=(1.0, 1.0, 2.0))({"image": path})["image"]
    assert tuple(out.shape[1:]) in {(31, 31, 8), (32, 32, 8)}


def test_foreground_crop_removes_air(tmp_path):
    a = np.full((24, 24, 24), -1000, np.int16)
    a[5:17, 6:20, 3:11] = 40  # soft tissue block
    a[20, 20, 20] = -700  # lung-like air pocket: below the -500 threshold, not foreground
    data = ct_preprocess(roi_size=(8, 8, 8))({"image": _save(tmp_path / "a.nii.gz", a)})
    assert list(data) == ["image"]  # no foreground coordinate keys left in the (cached) item
    assert data["image"].shape == (1, 12, 14, 8)
    assert data["image"].min() > 0.5  # no air left


def test_small_volume_is_padded_and_noted(tmp_path, caplog):
    path = _save(tmp_path / "small.nii.gz", np.full((5, 6, 7), 100, np.int16))
    with caplog.at_level(logging.INFO, logger="byol3d"):
        out = _pre(roi_size=(16, 16, 16))({"image": path})
    assert out["image"].shape == (1, 16, 16, 16)
    assert "small.nii.gz" in caplog.text and "padded" in caplog.text


@pytest.mark.parametrize(
    "name, array, match",
    [
        ("series4d.nii.gz", np.zeros((8, 8, 8, 5), np.float32), "5"),
        ("slice2d.nii.gz", np.zeros((8, 8), np.float32), "2 spatial"),
        ("nan.nii.gz", np.where(np.eye(8)[..., None] > 0, np.nan, 0).repeat(8, -1), "NaN"),
    ],
)
def test_unusable_volume_raises_data_error_naming_the_file(tmp_path, name, array, match):
    path = _save(tmp_path / name, array.astype(np.float32))
    with pytest.raises(DataError, match=match) as info:
        _pre()({"image": path})
    assert name in str(info.value)


def test_constant_volume_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="byol3d"):
        _pre()({"image": _save(tmp_path / "flat.nii.gz", np.zeros((8, 8, 8), np.int16))})
    assert "flat.nii.gz is constant" in caplog.text


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"hu_window": (100, -100)}, "hu_window"),
        ({"pixdim": (1.0, 1.0)}, "pixdim"),
        ({"pixdim": (1.0, 0.0, 1.0)}, "pixdim"),
        ({"roi_size": (0, 8, 8)}, "roi_size"),
        ({"foreground_hu": 2000.0, "crop_foreground": True}, "foreground_hu"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
def test_preprocess_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _pre(**kwargs)


def test_preprocess_pickles():  # DataLoader workers started with "spawn" pickle the dataset
    pre = pickle.loads(pickle.dumps(ct_preprocess(pixdim=(1.0, 1.0, 1.0))))
    assert pre.config["pixdim"] == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------- RandResizedCropd


@pytest.mark.parametrize("shape, roi", [((1, 40, 32, 24), (16, 16, 16)), ((2, 40, 30), (16, 16))])
def test_crop_boxes_are_inside_the_image_with_volume_fraction_in_scale(shape, roi):
    crop = RandResizedCropd("img", roi_size=roi, scale=(0.3, 0.6))
    crop.set_random_state(0)
    img = torch.rand(shape)
    fractions = []
    for _ in range(100):
        out = crop({"img": img})
        box = out["img_box"]
        assert out["img"].shape == (shape[0], *roi) and out["img"].dtype == torch.float32
        assert box.dtype == np.int64 and box.shape == (len(roi), 2)
        assert (
            np.all(box[:, 0] >= 0)
            and np.all(box[:, 1] <= shape[1:])
            and np.all(box[:, 1] > box[:, 0])
        )
        fractions.append(np.prod(box[:, 1] - box[:, 0]) / np.prod(shape[1:]))
    assert 0.3 <= min(fractions) and max(fractions) <= 0.6
    assert max(fractions) - min(fractions) > 0.15  # the fraction really varies


def test_crop_takes_the_recorded_box():
    ramp = torch.arange(48, dtype=torch.float32)[:, None, None].expand(48, 40, 36)[None]
    crop = RandResizedCropd("img", roi_size=(12, 12, 12), scale=(0.1, 0.5))
    crop.set_random_state(3)
    for _ in range(20):
        out = crop({"img": ramp})
        (start, stop) = out["img_box"][0]
        # the output spans the x range of the box: its mean is the box's mean x
        assert abs(out["img"].mean().item() - (start + stop - 1) / 2) < 0.6


def test_crop_is_reproducible_and_does_not_modify_its_input():
    img = torch.rand(1, 20, 20, 20)
    before = img.clone()
    a, b = RandResizedCropd("img", (8, 8, 8)), RandResizedCropd("img", (8, 8, 8))
    a.set_random_state(7)
    b.set_random_state(7)
    for _ in range(5):
        oa, ob = a({"img": img}), b({"img": img})
        assert torch.equal(oa["img"], ob["img"]) and np.array_equal(oa["img_box"], ob["img_box"])
    assert torch.equal(img, before)
    out = RandResizedCropd("img", (20, 20, 20), scale=(1.0, 1.0), ratio=(1.0, 1.0))({"img": img})
    out["img"] += 1  # a full-size crop is a copy, not a view of the input
    assert torch.equal(img, before)


def test_crop_upsamples_an_image_smaller_than_roi():
    out = RandResizedCropd("img", (16, 16, 16))({"img": np.ones((1, 6, 5, 4), np.int16)})
    assert out["img"].shape == (1, 16, 16, 16)
    assert torch.allclose(out["img"], torch.ones(1))


# ---------------------------------------------------------------- view_transforms


def _find(view: Compose, kind: type) -> list:
    return [t for t in view.transforms if isinstance(t, kind)]


def test_views_have_roi_shape_and_differ():
    views = view_transforms(roi_size=(12, 12, 12))
    views.set_random_state(0)
    src = torch.rand(1, 24, 20, 16)
    before = src.clone()
    out = views({"image": src})
    assert set(out) == {
        *("view1", "view1_box", "view1_flip", "view1_rot90"),
        *("view2", "view2_box", "view2_flip", "view2_rot90"),
    }
    for k in ("view1", "view2"):
        assert type(out[k]) is torch.Tensor and out[k].dtype == torch.float32
        assert out[k].shape == (1, 12, 12, 12)
    assert not torch.allclose(out["view1"], out["view2"])
    assert torch.equal(src, before)
    batch = list_data_collate([out, views({"image": src})])
    assert batch["view1"].shape == (2, 1, 12, 12, 12) and batch["view2_box"].shape == (2, 3, 2)
    assert batch["view1_flip"].shape == (2, 3) and batch["view2_rot90"].shape == (2,)


def test_view_random_states_are_independent_and_reproducible():
    views = view_transforms(roi_size=(8, 8, 8))
    views.set_random_state(1)
    flips = (_find(views.transforms[1], RandFlipd)[0], _find(views.transforms[2], RandFlipd)[0])
    src = torch.rand(1, 12, 12, 12)
    same_flip, same_box, first = 0, 0, []
    for i in range(100):
        out = views({"image": src})
        if i < 3:
            first.append(out)
        same_flip += flips[0]._do_transform == flips[1]._do_transform
        same_box += np.array_equal(out["view1_box"], out["view2_box"])
    assert 30 <= same_flip <= 70  # independent fair coins agree about half the time
    assert same_box < 5
    views.set_random_state(1)
    for expected in first:
        again = views({"image": src})
        assert torch.equal(again["view1"], expected["view1"]) and torch.equal(
            again["view2"], expected["view2"]
        )


def test_blur_probability_is_asymmetric():
    views = view_transforms(roi_size=(8, 8, 8), scale=(0.5, 1.0))  # default blur_prob (1.0, 0.1)
    views.set_random_state(0)
    blur1 = _find(views.transforms[1], RandGaussianSmoothd)[0]
    blur2 = _find(views.transforms[2], RandGaussianSmoothd)[0]
    src = torch.rand(1, 8, 8, 8)
    n1 = n2 = 0
    for _ in range(200):
        views({"image": src})
        n1 += blur1._do_transform
        n2 += blur2._do_transform
    assert n1 == 200
    assert 6 <= n2 <= 40  # Binomial(200, 0.1): mean 20, sd 4.2


def test_blur_really_smooths_view1():
    off = {
        k: 0.0 for k in ("flip_prob", "rotate90_prob", "intensity_prob", "gamma_prob", "noise_prob")
    }
    views = view_transforms(
        roi_size=(16, 16, 16), scale=(1.0, 1.0), ratio=(1.0, 1.0), blur_prob=(1.0, 0.0), **off
    )
    out = views({"image": torch.rand(1, 16, 16, 16)})
    assert out["view2"].std() > 2 * out["view1"].std()


def test_views_work_in_2d():
    views = view_transforms(roi_size=(16, 16))
    out = views({"image": torch.rand(3, 40, 30)})
    assert out["view1"].shape == out["view2"].shape == (3, 16, 16)
    assert out["view1_box"].shape == (2, 2)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"blur_prob": 1.5}, "blur_prob"),
        ({"flip_prob": [0.1, 0.2, 0.3]}, "flip_prob"),
        ({"noise_prob": (-0.1, 0.5)}, "noise_prob"),
        ({"scale": (0.5, 0.2)}, "scale"),
        ({"gamma": (0.0, 1.0)}, "gamma"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"roi_size": (16, 8, 8)}, "roi_size"),  # rotation in x-y needs equal x and y
        ({"view_keys": ("image", "view2")}, "view_keys"),
    ],
)
def test_view_transforms_reject_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        view_transforms(**kwargs)


def test_per_view_probability_pair_is_applied_per_view():
    views = view_transforms(roi_size=(8, 8, 8), flip_prob=[0.0, 1.0])
    assert all(t.prob == 0.0 for t in _find(views.transforms[1], RandFlipd))
    assert all(t.prob == 1.0 for t in _find(views.transforms[2], RandFlipd))
