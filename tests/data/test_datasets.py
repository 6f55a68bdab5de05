from __future__ import annotations

import logging
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import DataLoader
from monai.data.utils import set_rnd

from byol3d.data.datasets import build_dataset, estimate_cache_bytes
from byol3d.data.discovery import find_images, split_train_val
from byol3d.errors import DataError
from byol3d.transforms.ct import ct_preprocess
from byol3d.transforms.volume_views import view_transforms

ROI = (8, 8, 8)


def _nifti(path, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0), seed=0, array=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = np.random.default_rng(seed).integers(-200, 300, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)
    return str(path)


def _sitk(shape=(16, 12, 10), spacing=(1.0, 1.0, 2.0)):
    image = sitk.GetImageFromArray(np.zeros(shape[::-1], np.int16))
    image.SetSpacing(spacing)
    return image


def _pipeline(**kwargs):
    return ct_preprocess(roi_size=ROI, **kwargs), view_transforms(roi_size=ROI)


# ---------------------------------------------------------------- find_images


def test_find_images_is_recursive_sorted_and_finds_dicom_folders(tmp_path, write_dicom_series):
    root = tmp_path / "data"
    _nifti(root / "b" / "scan2.NII.GZ")
    _nifti(root / "a" / "scan1.nii")
    (root / "a" / "deep").mkdir(parents=True)
    (root / "c").mkdir()
    sitk.WriteImage(_sitk(), str(root / "a" / "deep" / "x.mha"))
    sitk.WriteImage(_sitk(), str(root / "c" / "vol.mhd"))  # writes vol.raw next to it
    _nifti(root / ".hidden" / "h.nii.gz")
    _nifti(root / "a" / ".h.nii.gz")
    (root / "d").mkdir()
    (root / "d" / "notes.txt").write_text("x")
    write_dicom_series(_sitk(), root / "dcm", "1.2.826.0.1.3680043.2.1125.1")
    write_dicom_series(_sitk(), root / "dcm_nosuffix", "1.2.826.0.1.3680043.2.1125.2", suffix="")
    write_dicom_series(_sitk(), root / "dcm_uid", "1.2.826.0.1.3680043.2.1125.3", suffix=".1")
    (root / "notdicom").mkdir()
    (root / "notdicom" / "README").write_text("plain text, no suffix")
    assert os.path.exists(root / "c" / "vol.raw")

    found = find_images(root)

    expected = [
        "a/deep/x.mha",
        "a/scan1.nii",
        "b/scan2.NII.GZ",
        "c/vol.mhd",
        "dcm",
        "dcm_nosuffix",
        "dcm_uid",
    ]
    assert found == [str(root / e) for e in expected]
    assert find_images(root) == found
    assert find_images(root, dicom=False) == [str(root / e) for e in expected[:4]]


def test_find_images_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="missing.*does not exist"):
        find_images(tmp_path / "missing")
    (tmp_path / "file.nii").write_text("")
    with pytest.raises(DataError, match="file.nii is not a directory"):
        find_images(tmp_path / "file.nii")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*holds no files"):
        find_images(tmp_path / "empty")
    (tmp_path / "texts").mkdir()
    for i in range(3):
        (tmp_path / "texts" / f"{i}.txt").write_text("x")
    with pytest.raises(DataError, match=r"texts: found 3 files \(3 \.txt\), none of them \.nii/"):
        find_images(tmp_path / "texts")


# ---------------------------------------------------------------- split_train_val


def test_split_is_deterministic_disjoint_and_sized():
    files = [f"/d/{i:02d}.nii.gz" for i in range(20)]
    train, val = split_train_val(files, 0.1, seed=3)
    assert len(val) == 2 and len(train) == 18
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(files)
    assert split_train_val(list(reversed(files)), 0.1, seed=3) == (train, val)  # order-independent
    others = {tuple(split_train_val(files, 0.1, seed=s)[1]) for s in range(10)}
    assert len(others) > 1  # the seed matters


@pytest.mark.parametrize(
    "n, fraction, n_val", [(10, 0.01, 1), (2, 0.9, 1), (1, 0.5, 0), (10, 0.0, 0)]
)
def test_split_sizes_at_the_edges(n, fraction, n_val):
    train, val = split_train_val([f"{i}.nii" for i in range(n)], fraction)
    assert len(val) == n_val and len(train) == n - n_val


@pytest.mark.parametrize("fraction", [1.0, -0.1, 2])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(["a.nii", "b.nii"], fraction)


# ---------------------------------------------------------------- build_dataset


@pytest.mark.parametrize("cache", ["none", "cache", "persistent"])
def test_every_cache_kind_gives_two_view_samples(tmp_path, cache):
    files = [_nifti(tmp_path / f"{i}.nii.gz", seed=i) for i in range(2)]
    pre, views = _pipeline()
    ds = build_dataset(files, pre, views, cache=cache, cache_dir=tmp_path / "cache", progress=False)
    assert len(ds) == 2
    sample = ds[1]
    assert set(sample) == {
        *("view1", "view1_box", "view1_flip", "view1_rot90"),
        *("view2", "view2_box", "view2_flip", "view2_rot90"),
    }
    assert sample["view1"].shape == sample["view2"].shape == (1, *ROI)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["view1"].shape == (2, 1, *ROI) and batch["view1_box"].shape == (2, 3, 2)


def test_cache_holds_one_preprocessed_image_and_is_never_mutated(tmp_path):
    files = [_nifti(tmp_path / "0.nii.gz")]
    pre, views = _pipeline()
    ds = build_dataset(files, pre, views, cache="cache", progress=False)
    cached = ds.data._cache[0]
    assert ds.data[0] is cached  # MONAI hands out the cached dict itself: views must not touch it
    snapshot = cached["image"].clone()
    samples = [ds[0] for _ in range(4)]
    assert list(cached) == ["image"]  # no view copies in the cache
    assert torch.equal(cached["image"], snapshot)
    assert not torch.equal(samples[0]["view1"], samples[1]["view1"])  # fresh views each access


def test_worker_seeding_reaches_the_views(tmp_path):
    files = [_nifti(tmp_path / "0.nii.gz"), _nifti(tmp_path / "copy" / "0.nii.gz")]  # same content
    ds = build_dataset(files, *_pipeline(), cache="cache", progress=False)
    set_rnd(ds, seed=5)
    a = ds[0]["view1"]
    set_rnd(ds, seed=5)
    assert torch.equal(ds[0]["view1"], a)
    set_rnd(ds, seed=6)
    assert not torch.equal(ds[0]["view1"], a)
    # two workers forked with the same transform state must still draw different views
    loader = DataLoader(ds, batch_size=1, num_workers=2, shuffle=False)
    first, second = (b["view1"][0] for b in loader)
    assert not torch.equal(first, second)


def test_persistent_cache_is_written_and_keyed_to_the_preprocessing(tmp_path):
    files = [_nifti(tmp_path / f"{i}.nii.gz", seed=i) for i in range(2)]
    cache_dir = tmp_path / "cache"
    ds = build_dataset(files, *_pipeline(), cache="persistent", cache_dir=cache_dir)
    ds[0], ds[1]
    written = sorted(cache_dir.glob("*.pt"))
    assert len(written) == 2
    ds = build_dataset(files, *_pipeline(), cache="persistent", cache_dir=cache_dir)
    ds[0], ds[1]
    assert sorted(cache_dir.glob("*.pt")) == written  # same preprocessing: reused
    ds = build_dataset(
        files, *_pipeline(pixdim=(2.0, 2.0, 2.0)), cache="persistent", cache_dir=cache_dir
    )
    ds[0]
    assert len(list(cache_dir.glob("*.pt"))) == 3  # other preprocessing: new files


def test_unusable_file_raises_data_error_not_runtime_error(tmp_path):
    good = _nifti(tmp_path / "good.nii.gz")
    bad = _nifti(tmp_path / "bad.nii.gz", array=np.full((16, 16, 16), np.nan, np.float32))
    pre, views = _pipeline()
    with pytest.raises(DataError, match="bad.nii.gz"):
        build_dataset([good, bad], pre, views, cache="cache", progress=False)
    ds = build_dataset([good, bad], pre, views, cache="none")
    with pytest.raises(DataError, match="bad.nii.gz"):
        ds[1]


def test_bad_cache_arguments_raise_value_error(tmp_path):
    pre, views = _pipeline()
    with pytest.raises(
        ValueError, match="cache must be one of none, cache, persistent, store, got 'ram'"
    ):
        build_dataset(["a.nii"], pre, views, cache="ram")
    with pytest.raises(ValueError, match="cache_dir"):
        build_dataset(["a.nii"], pre, views, cache="persistent")
    with pytest.raises(ValueError, match="cache_dir must be given for cache='store'"):
        build_dataset(["a.nii"], pre, views, cache="store")
    with pytest.raises(ValueError, match="cache_rate"):
        build_dataset(["a.nii"], pre, views, cache_rate=1.5)


# ---------------------------------------------------------------- cache cost


def test_estimate_matches_known_shapes_across_formats(tmp_path, write_dicom_series):
    nii = _nifti(
        tmp_path / "a.nii.gz", array=np.zeros((16, 12, 10), np.int16), spacing=(1.0, 1.0, 2.0)
    )
    nrrd = str(tmp_path / "a.nrrd")
    sitk.WriteImage(_sitk(), nrrd)
    dcm = write_dicom_series(_sitk(), tmp_path / "dcm", "1.2.826.0.1.3680043.2.1125.3")
    voxels = 16 * 12 * 10
    for f in (nii, nrrd, dcm):
        assert estimate_cache_bytes([f]) == 4 * voxels
        assert estimate_cache_bytes([f], pixdim=(2.0, 2.0, 1.0)) == 4 * 8 * 6 * 20
        assert estimate_cache_bytes([f], roi_size=(32, 8, 8)) == 4 * 32 * 12 * 10
    assert estimate_cache_bytes([nii, nrrd]) == 8 * voxels


def test_cache_cost_is_logged_and_close_to_the_real_size(tmp_path, caplog):
    files = [_nifti(tmp_path / f"{i}.nii.gz", shape=(16, 16, 12), seed=i) for i in range(3)]
    pre, views = _pipeline(crop_foreground=False)
    with caplog.at_level(logging.INFO, logger="byol3d"):
        ds = build_dataset(files, pre, views, cache="cache", progress=False)
    real = sum(item["image"].numel() * 4 for item in ds.data._cache)
    assert ds.cache_bytes == real == 3 * 16 * 16 * 12 * 4
    assert "caching 3 volumes in RAM: about 36.0 KiB" in caplog.text


def test_partial_ram_cache_estimates_only_the_cached_volumes(tmp_path):
    files = [_nifti(tmp_path / f"{i}.nii.gz", seed=i) for i in range(4)]
    ds = build_dataset(files, *_pipeline(crop_foreground=False), cache_rate=0.5, progress=False)
    assert ds.cache_bytes == 2 * 16**3 * 4
    assert sum(item is not None for item in ds.data._cache) == 2
    assert ds[3]["view1"].shape == (1, *ROI)  # uncached items are preprocessed on the fly


def test_views_follow_the_epoch_seed_and_index_whatever_the_workers():
    from byol3d.data.datasets import ViewDataset
    from byol3d.training.distributed import make_loader
    from byol3d.transforms.batched import BoxViewsd, collate_boxes

    base = [{"image": torch.rand(1, 24, 22, 20, generator=torch.Generator().manual_seed(i))} for i in range(6)]  # fmt: skip
    ds = ViewDataset(base, BoxViewsd(roi_size=(16, 16, 16)))

    def epochs(loader, seeds):
        out = []
        for s in seeds:
            loader.sampler.set_epoch(s)  # what the trainer does at each epoch start
            out.append([(b["view1_box"], b["view2_sigma"]) for b in loader])
        return out

    kwargs = dict(
        batch_size=2, shuffle=True, drop_last=False, pin_memory=False, collate_fn=collate_boxes
    )
    single = epochs(make_loader(ds, num_workers=0, **kwargs), [1, 2])
    workers = make_loader(ds, num_workers=2, **kwargs)
    assert workers.persistent_workers
    persistent = epochs(workers, [1, 2])
    resumed = epochs(make_loader(ds, num_workers=2, **kwargs), [2])  # a fresh loader at epoch 2
    for a, b in zip(single + single[1:], persistent + resumed):
        for (box_a, sig_a), (box_b, sig_b) in zip(a, b, strict=True):
            assert torch.equal(box_a, box_b) and torch.equal(sig_a, sig_b)
    assert not torch.equal(single[0][0][0], single[1][0][0])  # epochs differ
