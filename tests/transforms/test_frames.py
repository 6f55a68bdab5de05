from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.networks.layers import gaussian_1d
from PIL import Image

from byol3d.config import load_config
from byol3d.data.stats import compute_mean_std
from byol3d.errors import ConfigError
from byol3d.transforms import build_transforms
from byol3d.transforms.frames import (
    ShortSideResized,
    applied,
    for_display,
    frame_preprocess,
    frame_views,
)
from byol3d.transforms.photometric import (
    RandColorJitterd,
    RandGaussianBlurd,
    RandGrayscaled,
    RandSolarized,
)

FRAME_2D = ["data.spatial_dims=2", "data.in_channels=3", "transforms.roi_size=[32,32]"]


def _rgb(tmp_path, name="f.png", size=(40, 30), seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / name)
    return str(tmp_path / name), arr


def test_preprocess_gives_uint8_channel_first_and_shrinks_the_short_side(tmp_path):
    path, arr = _rgb(tmp_path, size=(40, 30))
    img = frame_preprocess()({"image": path})["image"]
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 40, 30)
    # (C, W, H): axis 1 is x; the pixel at row 2, column 5 of the PNG
    assert img[:, 5, 2].tolist() == arr[2, 5].tolist()
    small = frame_preprocess(frame_size=15)({"image": path})["image"]
    assert small.dtype == torch.uint8 and tuple(small.shape) == (3, 20, 15)
    # never upsampled
    same = frame_preprocess(frame_size=100)({"image": path})["image"]
    assert tuple(same.shape) == (3, 40, 30)


def test_short_side_resize_keeps_a_constant_image_constant():
    img = torch.full((3, 100, 60), 77, dtype=torch.uint8)
    out = ShortSideResized("image", size=30)({"image": img})["image"]
    assert tuple(out.shape) == (3, 50, 30) and out.dtype == torch.uint8 and out.eq(77).all()
    with pytest.raises(ValueError, match="frame_size"):
        ShortSideResized("image", size=0)


def test_views_are_float32_normalised_tensors_that_differ(tmp_path):
    path, _ = _rgb(tmp_path)
    pre, views = frame_preprocess(), frame_views(roi_size=(32, 32))
    views.set_random_state(seed=0)
    out = views(pre({"image": path}))
    assert set(out) == {"view1", "view2", "view1_box", "view2_box", "view1_flip", "view2_flip"}
    for key in ("view1", "view2"):
        assert type(out[key]) is torch.Tensor and out[key].dtype == torch.float32
        assert tuple(out[key].shape) == (3, 32, 32)
        assert out[f"{key}_box"].shape == (2, 2)
        assert out[f"{key}_flip"].shape == (2,) and out[f"{key}_flip"][1] == 0  # horizontal only
    assert not torch.allclose(out["view1"], out["view2"])


def test_normalisation_uses_the_configured_mean_and_std():
    img = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    mean, std = [0.2, 0.4, 0.6], [0.5, 0.25, 0.1]
    views = frame_views(
        roi_size=(32, 32),
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip_prob=0.0,
        colour_jitter_prob=0.0,
        grayscale_prob=0.0,
        blur_prob=0.0,
        solarize_prob=0.0,
        mean=mean,
        std=std,
    )
    out = views({"image": img})
    for c in range(3):
        expected = (128 / 255 - mean[c]) / std[c]
        assert torch.allclose(out["view1"][c], torch.full((32, 32), expected), atol=1e-6)
    shown = for_display(out, img, mean, std)
    assert torch.allclose(shown["view2"], torch.full((3, 32, 32), 128 / 255), atol=1e-6)
    assert torch.allclose(shown["image"], img.float() / 255)


def test_horizontal_flip_mirrors_the_x_axis_only():
    img = torch.arange(32 * 32, dtype=torch.float32).reshape(1, 32, 32).repeat(3, 1, 1) / 1024
    views = frame_views(
        roi_size=(32, 32),
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip_prob=[1.0, 0.0],
        colour_jitter_prob=0.0,
        grayscale_prob=0.0,
        blur_prob=0.0,
        solarize_prob=0.0,
        mean=[0.0],
        std=[1.0],
    )
    out = views({"image": img})
    assert torch.allclose(out["view1"], img.flip(1)) and torch.allclose(out["view2"], img)


def test_brightness_multiplies_and_hue_rotates_red_to_green():
    jitter = RandColorJitterd("image", prob=1.0, brightness=0.4, contrast=0, saturation=0, hue=0)
    jitter.set_random_state(seed=3)
    img = torch.rand(3, 8, 8) * 0.5
    out = jitter({"image": img})["image"]
    f = jitter.factors[0]
    assert 0.6 <= f <= 1.4 and jitter.factors[1:] == [1.0, 1.0, 0.0]
    assert torch.allclose(out, (img * f).clamp(0, 1), atol=1e-6)
    red = torch.zeros(3, 4, 4)
    red[0] = 1.0
    jitter.order, jitter.factors = [3], [1.0, 1.0, 1.0, 1 / 3]
    green = jitter.apply(red)
    assert torch.allclose(
        green, torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 4, 4), atol=1e-4
    )


def test_jitter_draws_its_order_and_factors_in_range():
    jitter = RandColorJitterd("image", prob=1.0)
    jitter.set_random_state(seed=0)
    orders = set()
    for _ in range(200):
        jitter({"image": torch.rand(3, 4, 4)})
        b, c, s, h = jitter.factors
        assert 0.6 <= b <= 1.4 and 0.6 <= c <= 1.4 and 0.8 <= s <= 1.2 and -0.1 <= h <= 0.1
        assert sorted(jitter.order) == [0, 1, 2, 3]
        orders.add(tuple(jitter.order))
    assert len(orders) > 12  # random order, as torchvision's ColorJitter
    with pytest.raises(ValueError, match="hue"):
        RandColorJitterd("image", hue=0.6)


def test_grayscale_solarize_and_blur_match_their_formulas():
    img = torch.rand(3, 16, 16)
    grey = RandGrayscaled("image", prob=1.0)({"image": img})["image"]
    luma = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    for c in range(3):
        assert torch.allclose(grey[c], luma, atol=1e-3)
    values = torch.tensor([0.2, 0.5, 0.9]).view(1, 1, 3).expand(3, 1, 3)
    sol = RandSolarized("image", prob=1.0)({"image": values})["image"]
    assert torch.allclose(sol[0, 0], torch.tensor([0.2, 0.5, 0.1]))
    blur = RandGaussianBlurd("image", prob=1.0, sigma=(2.0, 2.0))
    flat = blur({"image": torch.full((3, 32, 32), 0.7)})["image"]
    assert torch.allclose(flat, torch.full((3, 32, 32), 0.7), atol=1e-4)  # no dark border
    spike = torch.zeros(1, 33, 33)
    spike[0, 16, 16] = 1.0
    out = blur({"image": spike})["image"]
    g = gaussian_1d(torch.tensor(2.0), truncated=4.0)  # MONAI's kernel, 17 taps at sigma 2
    assert g.numel() == 17 and abs(float(g.sum()) - 1) < 1e-4
    assert torch.allclose(out[0, 8:25, 16], g * g[8], atol=1e-6)
    assert torch.allclose(out[0, 8:25, 8:25], g[:, None] * g[None, :], atol=1e-6)


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (DataLoader workers also use one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _count(views, frame, n):
    fired = {}
    for _ in range(n):
        views({"image": frame})
        for i, ops in enumerate(applied(views)):
            for name, on in ops.items():
                fired.setdefault((name, i), 0)
                fired[(name, i)] += int(on)
    return fired


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # BYOL's recipe: the defaults
        [
            "transforms.blur_prob=[0.3,0.6]",
            "transforms.solarize_prob=0.5",
            "transforms.grayscale_prob=[0.0,1.0]",
            "transforms.colour_jitter_prob=[0.25,0.9]",
        ],
    ],
)
def test_asymmetric_probabilities_are_what_the_config_says(overrides, one_thread):
    cfg = load_config(None, [*FRAME_2D, *overrides])
    _, views = build_transforms(cfg)
    views.set_random_state(seed=1)
    n = 300
    fired = _count(views, torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8), n)
    tf = cfg["transforms"]
    for name, key in [
        ("blur", "blur_prob"),
        ("solarize", "solarize_prob"),
        ("grayscale", "grayscale_prob"),
        ("colour_jitter", "colour_jitter_prob"),
        ("flip", "flip_prob"),
    ]:
        pair = tf[key] if isinstance(tf[key], list) else [tf[key], tf[key]]
        for i, p in enumerate(pair):
            k = fired[(name, i)]
            if p in (0.0, 1.0):
                assert k == p * n, (name, i, k)
            else:  # 4.5 binomial standard deviations: fails by chance about once in 150,000 runs
                assert abs(k - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)), (name, i, k, p)
    if not overrides:
        assert fired[("blur", 0)] == n and fired[("solarize", 0)] == 0
        assert 0 < fired[("blur", 1)] < n / 4 and 0 < fired[("solarize", 1)] < n / 2


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="transforms.mean"):
        load_config(None, [*FRAME_2D, "transforms.mean=[0.5,0.5]"])
    with pytest.raises(ConfigError, match="transforms.std"):
        load_config(None, [*FRAME_2D, "transforms.std=[0.5,0,0.5]"])
    with pytest.raises(ConfigError, match="transforms.hue"):
        load_config(None, [*FRAME_2D, "transforms.hue=0.7"])
    with pytest.raises(ConfigError, match="data.in_channels"):
        load_config(
            None, ["data.spatial_dims=2", "data.in_channels=4", "transforms.roi_size=[32,32]"]
        )


def test_3d_transforms_ignore_the_2d_keys():
    cfg = load_config(None, ["transforms.roi_size=[32,32,32]", "transforms.solarize_prob=0.5"])
    preprocess, views = build_transforms(cfg)
    out = views({"image": torch.rand(1, 40, 40, 40)})
    assert tuple(out["view1"].shape) == (1, 32, 32, 32)


def test_compute_mean_std_matches_torch_over_all_pixels(tmp_path):
    black = np.zeros((10, 12, 3), dtype=np.uint8)
    white = np.full((10, 12, 3), 255, dtype=np.uint8)
    Image.fromarray(black).save(tmp_path / "a.png")
    Image.fromarray(white).save(tmp_path / "b.png")
    pre = frame_preprocess()
    mean, std = compute_mean_std([str(tmp_path / "a.png"), str(tmp_path / "b.png")], pre)
    assert mean == [0.5, 0.5, 0.5] and std == [0.5, 0.5, 0.5]
    p1, a1 = _rgb(tmp_path, "c.png", size=(20, 10), seed=1)
    p2, a2 = _rgb(tmp_path, "d.png", size=(8, 6), seed=2)
    mean, std = compute_mean_std([p1, p2], pre)
    pixels = np.concatenate([a1.reshape(-1, 3), a2.reshape(-1, 3)]) / 255.0
    assert np.allclose(mean, pixels.mean(0), atol=1e-4)
    assert np.allclose(std, pixels.std(0), atol=1e-4)
    # a subset of evenly spaced files
    assert compute_mean_std([str(tmp_path / "a.png")] * 3 + [p1], pre, max_files=2)[0] != mean
