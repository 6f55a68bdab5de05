"""Tests of byol3d.preview: the PNG of the two BYOL views, and its radiological orientation."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from byol3d.config import load_config
from byol3d.data.synthetic_ct import write_demo_dataset
from byol3d.viz.preview import display_slice, draw_views, preview_views, view_panels, views_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# views without geometric or intensity augmentation: the whole image, as preprocessed
_IDENTITY_VIEWS = [
    "transforms.flip_prob=0",
    "transforms.rotate90_prob=0",
    "transforms.scale=[1.0, 1.0]",
    "transforms.ratio=[1.0, 1.0]",
    "transforms.intensity_prob=0",
    "transforms.gamma_prob=0",
    "transforms.noise_prob=0",
    "transforms.blur_prob=0",
    "transforms.crop_foreground=false",
]


def _png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    h, w = matplotlib.image.imread(path).shape[:2]
    return w, h


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    write_demo_dataset(out, n=2, shape=(48, 48, 32), spacing=(8, 8, 10), seed=0)
    return out / "images"


def _cfg(root: Path, *overrides: str) -> dict:
    return load_config(None, [f"data.root={root}", "transforms.roi_size=[32, 32, 32]", *overrides])


def test_preview_writes_a_png_of_sensible_size_with_the_window_in_the_title(phantoms, tmp_path):
    out = preview_views(_cfg(phantoms), n=2, output=tmp_path / "sub" / "views.png")
    assert out == tmp_path / "sub" / "views.png"
    w, h = _png_size(out)
    assert w > 300 and h > 300
    fig = views_figure(_cfg(phantoms), n=2)
    assert "HU window [-1000, 1000]" in fig._suptitle.get_text()
    assert "roi_size [32, 32, 32]" in fig._suptitle.get_text()
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [f"view {v} {p}" for v in (1, 2) for p in ("axial", "coronal", "sagittal")]


def test_preview_shows_two_different_non_blank_views_per_volume(phantoms):
    fig = views_figure(_cfg(phantoms), n=2, seed=3)
    rows = fig.byol3d_panels
    assert len(rows) == 2 and all(len(r) == 6 for r in rows)
    for row in rows:
        for _, arr in row:
            assert arr.shape == (32, 32) and arr.std() > 0.01  # no blank panel
        view1 = np.stack([a for _, a in row[:3]])
        view2 = np.stack([a for _, a in row[3:]])
        assert np.abs(view1 - view2).mean() > 0.01


def test_preview_is_reproducible_for_a_seed(phantoms):
    a = views_figure(_cfg(phantoms), n=1, seed=7).byol3d_panels[0][0][1]
    b = views_figure(_cfg(phantoms), n=1, seed=7).byol3d_panels[0][0][1]
    np.testing.assert_array_equal(a, b)


def _world_to_voxel(affine: np.ndarray, xyz) -> tuple[int, int, int]:
    return tuple(int(round(v)) for v in np.linalg.inv(affine) @ np.array([*xyz, 1.0]))[:3]


def test_axial_shows_patient_left_on_image_right_and_anterior_at_top(tmp_path):
    """A marker placed through an LPS affine (as DICOM-converted NIfTI) at the patient's left
    must appear on the image's right; one anterior at the top; one superior at the top."""
    n, s = 32, 4.0
    affine = np.diag([-s, -s, s, 1.0])
    affine[:3, 3] = [s * (n - 1) / 2, s * (n - 1) / 2, -s * (n - 1) / 2]  # centre at world 0
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    vol = np.full((n, n, n), -1000, np.int16)
    # RAS+ world: x < 0 is the patient's left, y > 0 anterior, z > 0 superior
    i, j, _ = _world_to_voxel(affine, (-40, 0, 0))
    vol[i - 1 : i + 2, j - 2 : j + 2, :] = 1000  # left bar along z -> 1.0 after windowing
    i, j, _ = _world_to_voxel(affine, (0, 40, 0))
    vol[i - 2 : i + 2, j - 1 : j + 2, :] = 400  # anterior bar along z -> 0.7
    i, j, k = _world_to_voxel(affine, (40, 0, 40))
    vol[i - 1 : i + 2, j - 2 : j + 2, k - 1 : k + 2] = 0  # right, superior blob -> 0.5
    (tmp_path / "images").mkdir()
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "images" / "marker.nii.gz")

    cfg = _cfg(tmp_path / "images", *_IDENTITY_VIEWS)
    row = dict(views_figure(cfg, n=1).byol3d_panels[0])
    centre = n / 2
    axial = row["view 1 axial"]
    left_r, left_c = np.argwhere(axial > 0.95).mean(0)
    assert left_c > centre + 5 and abs(left_r - centre) < 4  # left on the image's right
    ant_r, ant_c = np.argwhere((axial > 0.6) & (axial < 0.8)).mean(0)
    assert ant_r < centre - 5 and abs(ant_c - centre) < 4  # anterior at the top
    coronal = row["view 1 coronal"]
    sup_r, sup_c = np.argwhere((coronal > 0.4) & (coronal < 0.6)).mean(0)
    assert sup_r < centre - 5 and sup_c < centre - 5  # superior at the top, right on the left
    assert np.argwhere(coronal > 0.95).mean(0)[1] > centre + 5
    sagittal = row["view 1 sagittal"]
    assert np.argwhere((sagittal > 0.6) & (sagittal < 0.8)).mean(0)[1] < centre - 5  # A on left
    np.testing.assert_array_equal(axial, row["view 2 axial"])  # identity views: identical


def test_display_slice_rejects_a_bad_plane_naming_it():
    with pytest.raises(ValueError, match="'oblique'"):
        display_slice(np.zeros((4, 4, 4)), "oblique")


def test_draw_views_2d_shows_the_image_and_its_two_views():
    rng = torch.Generator().manual_seed(0)
    samples = [
        {k: torch.rand(1, 40, 30, generator=rng) for k in ("image", "view1", "view2")}
        for _ in range(2)
    ]
    fig = draw_views(samples, "2D frames")
    assert [t for t, _ in fig.byol3d_panels[0]] == ["image", "view 1", "view 2"]
    assert fig.byol3d_panels[0][1][1].shape == (30, 40)  # rows = Y, columns = X
    assert [
        t for t, _ in view_panels({"view1": samples[0]["view1"], "view2": samples[0]["view2"]})
    ] == [
        "view 1",
        "view 2",
    ]


def test_draw_views_2d_png(tmp_path):
    samples = [{"view1": torch.rand(1, 64, 64), "view2": torch.rand(1, 64, 64)}]
    fig = draw_views(samples, "2D")
    fig.savefig(tmp_path / "v.png", dpi=100)
    w, h = _png_size(tmp_path / "v.png")
    assert w > 300 and h > 200
