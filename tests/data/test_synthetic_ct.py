"""Tests for the synthetic CT phantom generator."""

from __future__ import annotations

import csv
import math

import nibabel as nib
import numpy as np
import pytest

from byol3d.data.synthetic_ct import (
    CLASS_NAMES,
    LABEL_NAMES,
    Phantom,
    make_phantom,
    write_demo_dataset,
)

# Same field of view as the default (96, 96, 64) at (4, 4, 5) mm, at half the resolution.
SMALL = {"shape": (48, 48, 32), "spacing": (8.0, 8.0, 10.0)}


@pytest.fixture(scope="module")
def normal() -> Phantom:
    return make_phantom(11, class_label=0)  # default shape: HU without heavy partial volume


def _world(ph: Phantom, label: int) -> np.ndarray:
    """RAS+ world centroid (mm) of a label, computed through the affine only."""
    idx = np.argwhere(ph.labels == label).astype(float)
    assert len(idx), f"label {label} is empty"
    return ph.affine[:3, :3] @ idx.mean(axis=0) + ph.affine[:3, 3]


def test_tables() -> None:
    assert sorted(LABEL_NAMES) == list(range(8))
    assert LABEL_NAMES[0] == "background" and LABEL_NAMES[1] == "liver"
    assert LABEL_NAMES[2] == "spleen" and LABEL_NAMES[5] == "lungs"
    assert CLASS_NAMES == {0: "normal", 1: "liver_lesions", 2: "splenomegaly"}


def test_types_shapes_and_every_label_present() -> None:
    ph = make_phantom(0, **SMALL)
    assert ph.image.shape == ph.labels.shape == (48, 48, 32)
    assert ph.image.dtype == np.int16 and ph.labels.dtype == np.uint8
    assert ph.affine.shape == (4, 4) and ph.affine.dtype == np.float64
    assert set(np.unique(ph.labels)) == set(LABEL_NAMES)
    assert ph.class_label == 0


def test_hu_ranges_by_label(normal: Phantom) -> None:
    im, lb = normal.image.astype(float), normal.labels
    assert -1010 < im[:4, :4, :].mean() < -990  # air in the corners
    assert -900 < np.median(im[lb == 5]) < -750  # lungs
    bone = im[lb == 6]
    assert np.median(bone) > 250 and np.percentile(bone, 99) > max(600, np.median(bone) + 150)
    assert 45 < im[lb == 1].mean() < 80  # liver
    assert 30 < np.median(im[lb == 2]) < 70  # spleen
    assert np.median(im[lb == 7]) > 120  # contrast-enhanced aorta
    for kidney in (3, 4):  # brighter cortex around the medulla
        k = im[lb == kidney]
        assert np.percentile(k, 90) > np.percentile(k, 10) + 60
    body = im[lb == 0]
    assert ((body > -130) & (body < -70)).mean() > 0.01  # fat
    assert ((body > 20) & (body < 70)).mean() > 0.01  # muscle and soft tissue
    assert im.min() >= -1024 and im.max() <= 3071


def test_deterministic_and_seed_dependent() -> None:
    a, b, c = make_phantom(3, **SMALL), make_phantom(3, **SMALL), make_phantom(4, **SMALL)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.affine, b.affine) and a.class_label == b.class_label
    assert not np.array_equal(a.labels, c.labels)
    assert np.abs(a.image.astype(float) - c.image).mean() > 20
    assert not np.allclose(a.affine, c.affine)


def test_default_class_cycles_with_seed() -> None:
    assert [make_phantom(s, **SMALL).class_label for s in range(6)] == [0, 1, 2, 0, 1, 2]


def _interior(mask: np.ndarray) -> np.ndarray:
    """``mask`` eroded by one voxel along each axis (6-neighbourhood)."""
    out = mask.copy()
    for ax in range(3):
        for shift in (1, -1):
            out &= np.roll(mask, shift, axis=ax)
    return out


@pytest.mark.parametrize("seed", [5, 6, 11])
def test_liver_lesions_class(seed: int) -> None:
    n, les = (make_phantom(seed, class_label=c) for c in (0, 1))
    assert les.class_label == 1
    assert np.array_equal(n.labels, les.labels)  # lesions keep the liver label
    liver = n.labels == 1
    inner = _interior(liver)
    ln, ll = n.image[inner].astype(float), les.image[inner].astype(float)
    assert (ll < 25).mean() > (ln < 25).mean() + 0.02
    assert np.percentile(ll, 5) < np.percentile(ln, 5) - 4
    assert abs(np.median(ll) - np.median(ln)) < 5  # a focal finding, not a global shift
    changed = n.image != les.image
    assert changed[~liver].sum() < 0.5 * changed[liver].sum()  # only around the liver


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_splenomegaly_class(seed: int) -> None:
    n, big = (make_phantom(seed, class_label=c, **SMALL) for c in (0, 2))
    vn, vb = (n.labels == 2).sum(), (big.labels == 2).sum()
    assert vb > 2.5 * vn > 0
    for organ in (1, 3, 4, 5):  # the rest of the subject is unchanged
        assert np.array_equal(n.labels == organ, big.labels == organ)


def test_class_not_given_away_by_mean_intensity() -> None:
    means = {c: [] for c in CLASS_NAMES}
    for s in range(24):
        ph = make_phantom(100 + s, **SMALL)
        means[ph.class_label].append(ph.image.mean())
    for c in (1, 2):  # AUC of "mean HU" for normal vs class c stays far from 0 and 1
        auc = np.mean([[float(b > a) for a in means[0]] for b in means[c]])
        assert 0.15 < auc < 0.85, (c, auc)


def test_organ_sizes_in_mm_not_voxels() -> None:
    coarse = make_phantom(9, **SMALL)
    fine = make_phantom(9, shape=(96, 96, 64), spacing=(4.0, 4.0, 5.0))
    for organ in (1, 2, 3, 5):
        v_c = (coarse.labels == organ).sum() * 8 * 8 * 10
        v_f = (fine.labels == organ).sum() * 4 * 4 * 5
        assert v_c == pytest.approx(v_f, rel=0.12), LABEL_NAMES[organ]
    assert 800e3 < (fine.labels == 1).sum() * 80 < 2000e3  # liver volume in mm^3


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_left_right_anatomy_in_world_coordinates(seed: int) -> None:
    ph = make_phantom(seed, **SMALL)
    # RAS+ world: +x towards the patient's right, +y anterior, +z superior.
    liver, spleen = _world(ph, 1), _world(ph, 2)
    assert liver[0] > spleen[0] + 60
    assert _world(ph, 4)[0] > _world(ph, 3)[0] + 80  # kidney_right right of kidney_left
    assert _world(ph, 5)[2] > _world(ph, 3)[2] + 60  # lungs above the kidneys
    assert _world(ph, 7)[1] > _world(ph, 3)[1]  # aorta anterior to the kidneys
    # Same answer from the axis codes: the array axis that runs along L/R.
    codes = nib.aff2axcodes(ph.affine)
    assert codes == ("L", "P", "S")
    ax = next(i for i, code in enumerate(codes) if code in "LR")
    towards_right = 1 if codes[ax] == "R" else -1
    li, sp = (np.argwhere(ph.labels == lab)[:, ax].mean() for lab in (1, 2))
    assert (li - sp) * towards_right > 0


def test_monai_ras_orientation_flips_first_two_axes(tmp_path) -> None:
    monai = pytest.importorskip("monai.transforms")
    write_demo_dataset(tmp_path, n=1, **SMALL)
    keys = ["image", "label"]
    tf = monai.Compose(
        [
            monai.LoadImaged(keys=keys),
            monai.EnsureChannelFirstd(keys=keys),
            monai.Orientationd(keys=keys, axcodes="RAS"),
        ]
    )
    d = tf({"image": str(tmp_path / "images/ct_000.nii.gz"), "label": str(tmp_path / "labels/ct_000.nii.gz")})  # fmt: skip
    raw = np.asarray(nib.load(tmp_path / "images/ct_000.nii.gz").dataobj)
    assert np.array_equal(d["image"][0].numpy(), raw[::-1, ::-1, :])
    lab = d["label"][0].numpy()
    liver_i, spleen_i = (np.argwhere(lab == v)[:, 0].mean() for v in (1, 2))
    assert liver_i > spleen_i  # RAS axis 0 increases towards the patient's right


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_write_demo_dataset(tmp_path) -> None:
    paths = write_demo_dataset(tmp_path / "demo", n=6, seed=3, **SMALL)
    out = tmp_path / "demo"
    assert paths == [out / f"images/ct_{i:03d}.nii.gz" for i in range(6)]
    with open(out / "classes.csv") as fh:
        assert fh.readline().strip() == "id,path,label,label_name,segmentation"
    rows = _read_csv(out / "classes.csv")
    assert [r["path"] for r in rows] == [f"images/ct_{i:03d}.nii.gz" for i in range(6)]
    assert [int(r["label"]) for r in rows].count(0) == 2  # balanced
    assert sorted(int(r["label"]) for r in rows) == [0, 0, 1, 1, 2, 2]
    images = []
    for r in rows:
        assert r["label_name"] == CLASS_NAMES[int(r["label"])]
        img, seg = nib.load(out / r["path"]), nib.load(out / r["segmentation"])
        assert img.header.get_data_dtype() == np.int16
        assert seg.header.get_data_dtype() == np.uint8
        assert img.shape == seg.shape == (48, 48, 32)
        assert np.allclose(img.affine, seg.affine)
        assert img.header.get_xyzt_units()[0] == "mm"
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert np.allclose(img.get_qform(), img.affine) and np.allclose(img.get_sform(), img.affine)
        diag = np.diag(img.affine)[:3]
        assert diag[0] < 0 and diag[1] < 0 and diag[2] > 0  # needs a flip to RAS
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        assert np.abs(img.affine[:3, 3]).max() > 10  # a real origin, not zero
        zooms = img.header.get_zooms()
        assert 8 * 0.92 <= zooms[0] == zooms[1] <= 8 * 1.08 and zooms[2] == pytest.approx(10)
        data = np.asarray(img.dataobj)
        assert data.dtype == np.int16 and data.min() < -900 and data.max() > 500
        labels = np.asarray(seg.dataobj)
        assert set(np.unique(labels)) <= set(LABEL_NAMES) and (labels == 1).any()
        images.append(data)
    assert not np.array_equal(images[0], images[3])  # same class, different subjects
    # Overwrite with a smaller dataset: stale volumes are removed, the csv is rewritten.
    write_demo_dataset(out, n=2, seed=3, **SMALL)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["ct_000.nii.gz", "ct_001.nii.gz"]
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["ct_000.nii.gz", "ct_001.nii.gz"]
    assert len(_read_csv(out / "classes.csv")) == 2
    assert np.array_equal(np.asarray(nib.load(out / "images/ct_000.nii.gz").dataobj), images[0])


def test_dataset_seeds_give_different_subjects(tmp_path) -> None:
    a = write_demo_dataset(tmp_path / "a", n=3, seed=0, **SMALL)
    b = write_demo_dataset(tmp_path / "b", n=3, seed=1, **SMALL)
    ia = [np.asarray(nib.load(p).dataobj) for p in a]
    for p in b:
        ib = np.asarray(nib.load(p).dataobj)
        assert all(not np.array_equal(ib, x) for x in ia)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"shape": (15, 96, 64)}, "shape"),
        ({"shape": (96, 96)}, "shape"),
        ({"shape": (96, 96, 64.0)}, "shape"),
        ({"spacing": (0.0, 4.0, 5.0)}, "spacing"),
        ({"spacing": (4.0, -4.0, 5.0)}, "spacing"),
        ({"spacing": (4.0, 4.0, math.nan)}, "spacing"),
        ({"spacing": (4.0, 4.0)}, "spacing"),
        ({"class_label": 3}, "class_label"),
        ({"class_label": True}, "class_label"),
    ],
)
def test_make_phantom_argument_errors(kwargs: dict, name: str) -> None:
    args = {"seed": 0, **SMALL, **kwargs}
    with pytest.raises(ValueError, match=name) as err:
        make_phantom(**args)
    value = kwargs[name]
    assert repr(value) in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n": 0}, "n"),
        ({"n": -3}, "n"),
        ({"seed": -1}, "seed"),
        ({"shape": (8, 8, 8)}, "shape"),
        ({"spacing": (4.0, 0.0, 5.0)}, "spacing"),
    ],
)
def test_write_demo_dataset_argument_errors(tmp_path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name) as err:
        write_demo_dataset(tmp_path / "x", **kwargs)
    assert repr(kwargs[name]) in str(err.value)
    assert not (tmp_path / "x").exists()  # nothing written
