"""Box statistics of RandResizedCropd on elongated images, with the shipped scale and ratio.

The defaults are the shipped ones: scale (0.2, 1.0) for volumes (``view_transforms``) and
(0.08, 1.0) for frames (``frame_view_transforms``), ratio (3/4, 4/3). Boxes are drawn with
``randomize`` (2000 per shape, seeded) so the statistics are exact reruns, not flaky samples.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from byol3d.transforms.crops import RandResizedCropd

DRAWS = 2000
SCALE_3D, SCALE_2D = (0.2, 1.0), (0.08, 1.0)
LO, HI = 3 / 4, 4 / 3  # the default ratio range, as the fractions 3/4 and 4/3

ELONGATED = [
    ((240, 170, 430), SCALE_3D),  # body-cropped chest-abdomen-pelvis CT
    ((340, 240, 128), SCALE_3D),  # short z-range scan
    ((512, 512, 80), SCALE_3D),  # thin slab: the largest allowed box is 4% of it
    ((640, 200), SCALE_2D),
    ((200, 640), SCALE_2D),
]
ROOMY = [((200, 180, 160), SCALE_3D), ((300, 260), SCALE_2D)]  # within the ratio range


def ratios_in_range(size) -> bool:
    """Every size[b] / size[a] (a < b) in [3/4, 4/3], in exact integer arithmetic."""
    return all(
        3 * size[b] <= 4 * size[a] and 4 * size[b] >= 3 * size[a]
        for a in range(len(size))
        for b in range(a + 1, len(size))
    )


def largest_fraction(shape) -> float:
    """Brute force: the largest volume fraction of an integer box inside ``shape`` whose
    pairwise side ratios are in [3/4, 4/3]."""
    if len(shape) == 2:
        h = np.arange(1, shape[0] + 1)
        w = np.minimum(shape[1], (4 * h) // 3)
        ok = 4 * w >= 3 * h
        return float((h * w)[ok].max()) / np.prod(shape)
    b0, b1 = np.meshgrid(np.arange(1, shape[0] + 1), np.arange(1, shape[1] + 1), indexing="ij")
    b2 = np.minimum(np.minimum(shape[2], (4 * b0) // 3), (4 * b1) // 3)
    ok = (3 * b1 <= 4 * b0) & (4 * b1 >= 3 * b0) & (4 * b2 >= 3 * np.maximum(b0, b1))
    return float((b0 * b1 * b2)[ok].max()) / np.prod(shape)


def draw_boxes(shape, scale, seed=0, n=DRAWS) -> np.ndarray:
    crop = RandResizedCropd("img", roi_size=(16,) * len(shape), scale=scale)
    crop.set_random_state(seed)
    boxes = []
    for _ in range(n):
        crop.randomize(shape)
        boxes.append(crop.box.copy())
    return np.stack(boxes)


@pytest.mark.parametrize("shape, scale", ELONGATED + ROOMY, ids=str)
def test_boxes_fit_keep_the_ratio_range_and_rarely_take_the_whole_image(shape, scale):
    boxes = draw_boxes(shape, scale)
    sizes = boxes[..., 1] - boxes[..., 0]
    assert boxes.dtype == np.int64 and boxes.shape == (DRAWS, len(shape), 2)
    assert (boxes[..., 0] >= 0).all() and (boxes[..., 1] <= np.array(shape)).all()
    assert (sizes >= 1).all()
    out_of_range = np.mean([not ratios_in_range(s) for s in sizes])
    whole = np.mean((sizes == np.array(shape)).all(axis=1))
    assert out_of_range == 0.0, f"{out_of_range:.1%} of the boxes are squashed beyond the ratio"
    assert whole <= 0.01, f"{whole:.1%} of the views are the whole image"
    if not ratios_in_range(shape):  # an image outside the range is never taken whole
        assert whole == 0.0
    for a in range(len(shape)):  # positions vary on every axis with room to move
        if sizes[:, a].min() < shape[a]:
            assert len(np.unique(boxes[:, a, 0])) > 10


@pytest.mark.parametrize("shape, scale", ELONGATED + ROOMY, ids=str)
def test_volume_fractions_are_uniform_in_scale_as_far_as_the_ratio_range_allows(shape, scale):
    """Fractions follow U[scale[0], min(scale[1], f_max)], f_max the largest box with ratios in
    range (brute force); an image too elongated for even scale[0] gives its largest box.
    Tolerance: mean and the 5%..95% quantiles within 3% of the interval's width (the sampling
    error of a quantile over 2000 draws is about 1.1% of it; rounding sides to voxels adds less
    than 1%)."""
    sizes = (lambda b: b[..., 1] - b[..., 0])(draw_boxes(shape, scale, seed=1))
    fractions = sizes.prod(axis=1) / np.prod(shape)
    f_max = largest_fraction(shape)
    hi = min(scale[1], f_max)
    lo = min(scale[0], hi)
    assert fractions.max() <= f_max + 1e-12
    if hi - lo < 1e-9:  # only the largest box fits the ratio range
        assert np.allclose(fractions, f_max, rtol=1e-6)
        return
    width = hi - lo
    assert abs(fractions.mean() - (lo + hi) / 2) < 0.03 * width
    q = np.linspace(0.05, 0.95, 19)
    gap = np.abs(np.quantile(fractions, q) - (lo + q * width)).max()
    assert gap < 0.03 * width, f"quantiles off by {gap / width:.1%} of [{lo:.3f}, {hi:.3f}]"


def test_the_largest_box_is_the_whole_range_on_the_ct_shapes():
    # what the fraction test above relies on: scale is clipped to these on elongated CTs
    assert largest_fraction((340, 240, 128)) == pytest.approx(170 * 170 * 128 / (340 * 240 * 128))
    assert 0.49 < largest_fraction((240, 170, 430)) < 0.5
    assert largest_fraction((200, 180, 160)) == 1.0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_box_shapes_spread_over_the_ratio_range(spatial_dims):
    """On an image large enough for every box, log(size[b] / size[a]) spans log(ratio), and in
    2D it is uniform there (torchvision's log-uniform aspect ratio)."""
    shape = (1000,) * spatial_dims
    sizes = (lambda b: b[..., 1] - b[..., 0])(draw_boxes(shape, (0.05, 0.3)))
    log_r = np.log(sizes[:, -1] / sizes[:, 0])
    assert log_r.min() < 0.9 * np.log(LO) and log_r.max() > 0.9 * np.log(HI)
    if spatial_dims == 2:
        q = np.linspace(0.1, 0.9, 9)
        expected = np.log(LO) + q * (np.log(HI) - np.log(LO))
        assert np.abs(np.quantile(log_r, q) - expected).max() < 0.03 * np.log(HI / LO)


@pytest.mark.parametrize("shape, scale", ELONGATED[:2] + ELONGATED[3:4], ids=str)
def test_crops_of_elongated_images_have_roi_shape(shape, scale):
    roi = (12,) * len(shape)
    crop = RandResizedCropd("img", roi_size=roi, scale=scale).set_random_state(2)
    img = torch.rand(1, *shape)
    for _ in range(10):
        out = crop({"img": img})
        assert out["img"].shape == (1, *roi) and out["img_box"].shape == (len(shape), 2)


def test_boxes_are_reproducible_from_the_random_state():
    a = draw_boxes((240, 170, 430), SCALE_3D, seed=5, n=50)
    b = draw_boxes((240, 170, 430), SCALE_3D, seed=5, n=50)
    c = draw_boxes((240, 170, 430), SCALE_3D, seed=6, n=50)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_a_ratio_range_no_3d_box_can_satisfy_is_an_error():
    RandResizedCropd("img", (8, 8), ratio=(1.5, 2.0))  # fine in 2D: one ratio
    with pytest.raises(ValueError, match="ratio"):
        RandResizedCropd("img", (8, 8, 8), ratio=(1.5, 2.0))  # 2.0 < 1.5 * 1.5
